//! Reading metric samples: what the Prometheus API asks of them. Samples stay rows in the SQL
//! database (their reads go by series through the primary key and are fast there); every
//! reader takes the tenants it may read.

use super::{Bind, Pool, StoreError, TelemetryStore, kind_name, rows};
use crate::model::SampleRow;

/// The stored samples of one series, in time order: (ts_ns, value, histogram JSON).
pub struct SeriesRows {
    pub tenant: String,
    /// The series' labels as stored (a canonical JSON object).
    pub labels: String,
    pub samples: Vec<(i64, Option<f64>, Option<String>)>,
}

/// At most this many series are listed at once (by the Prometheus API's series, labels and
/// label values): a tenant's cardinality is its own, the listing's memory the platform's.
pub const MAX_LISTED_SERIES: usize = 1_000_000;

/// What a sample costs of a read's budget: one, and a histogram one more per 64 bytes of its
/// buckets (a tenant chooses how many buckets a histogram has).
fn cost(histogram: Option<&str>) -> usize {
    1 + histogram.map_or(0, |h| h.len() / 64)
}

/// `tenant IN (?, ...)` for `tenants`, and their binds.
fn tenants_in(tenants: &[String]) -> (String, Vec<Bind<'_>>) {
    let text = format!("tenant IN ({})", vec!["?"; tenants.len()].join(", "));
    (text, tenants.iter().map(|t| Bind::Str(t)).collect())
}

impl TelemetryStore {
    /// A tenant's samples of one metric, by series and time.
    pub async fn samples(&self, tenant: &str, metric: &str) -> Result<Vec<SampleRow>, StoreError> {
        let text = "SELECT tenant, metric, labels, kind, ts_ns, value, histogram, metered FROM metric_samples \
                    WHERE tenant = ? AND metric = ? ORDER BY labels, ts_ns";
        Ok(rows!(&self.pool, text, &[Bind::Str(tenant), Bind::Str(metric)], |row| SampleRow {
            tenant: row.try_get(0)?,
            metric: row.try_get(1)?,
            labels: row.try_get(2)?,
            kind: kind_name(&row.try_get::<String, _>(3)?),
            ts_ns: row.try_get(4)?,
            value: row.try_get::<Option<f64>, _>(5)?.unwrap_or(f64::NAN),
            histogram: row.try_get(6)?,
            metered: row.try_get::<i64, _>(7)? != 0,
        }))
    }

    /// Every tenant with stored samples: a skip scan over the primary key (one index probe per
    /// tenant).
    pub async fn sample_tenants(&self) -> Result<Vec<String>, StoreError> {
        let text = "WITH RECURSIVE t(name) AS ( \
                      SELECT (SELECT tenant FROM metric_samples ORDER BY tenant LIMIT 1) \
                      UNION ALL \
                      SELECT (SELECT tenant FROM metric_samples WHERE tenant > t.name ORDER BY tenant LIMIT 1) \
                      FROM t WHERE t.name IS NOT NULL) \
                    SELECT name FROM t WHERE name IS NOT NULL";
        Ok(rows!(&self.pool, text, &[], |row| row.try_get::<String, _>(0)?))
    }

    /// A tenant's stored metric names with the kind they were stored as: a skip scan over the
    /// primary key.
    pub async fn stored_metrics(&self, tenant: &str) -> Result<Vec<(String, String)>, StoreError> {
        let text = "WITH RECURSIVE m(name) AS ( \
                      SELECT (SELECT metric FROM metric_samples WHERE tenant = ? ORDER BY metric LIMIT 1) \
                      UNION ALL \
                      SELECT (SELECT metric FROM metric_samples WHERE tenant = ? AND metric > m.name ORDER BY metric LIMIT 1) \
                      FROM m WHERE m.name IS NOT NULL) \
                    SELECT m.name, (SELECT s.kind FROM metric_samples s WHERE s.tenant = ? AND s.metric = m.name LIMIT 1) \
                    FROM m WHERE m.name IS NOT NULL";
        Ok(rows!(&self.pool, text, &[Bind::Str(tenant), Bind::Str(tenant), Bind::Str(tenant)], |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?
        )))
    }

    /// The series of `metric` of these tenants with data in `[lo_ns, hi_ns]`: (tenant, labels,
    /// the latest histogram JSON if any), for listing series; `metrics` (when given) restricts
    /// the metric names read. More than [`MAX_LISTED_SERIES`] is [`StoreError::OverBudget`].
    pub async fn series_in(
        &self,
        tenants: &[String],
        metrics: Option<&[String]>,
        lo_ns: i64,
        hi_ns: i64,
    ) -> Result<Vec<(String, String, String, Option<String>)>, StoreError> {
        if tenants.is_empty() || metrics.is_some_and(<[String]>::is_empty) {
            return Ok(Vec::new());
        }
        let (mut filter, mut binds) = tenants_in(tenants);
        if let Some(metrics) = metrics {
            filter.push_str(&format!(" AND metric IN ({})", vec!["?"; metrics.len()].join(", ")));
            binds.extend(metrics.iter().map(|m| Bind::Str(m)));
        }
        // The times are integers, written into the statement.
        let text = format!(
            "SELECT tenant, metric, labels, MAX(histogram) FROM metric_samples \
             WHERE ts_ns >= {lo_ns} AND ts_ns <= {hi_ns} AND {filter} GROUP BY tenant, metric, labels LIMIT {}",
            MAX_LISTED_SERIES + 1
        );
        let series = rows!(&self.pool, &text, &binds, |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?,
            row.try_get::<String, _>(2)?,
            row.try_get::<Option<String>, _>(3)?,
        ));
        if series.len() > MAX_LISTED_SERIES {
            return Err(StoreError::OverBudget);
        }
        Ok(series)
    }

    /// The samples of `metric` in `(lo_ns, hi_ns]` of these tenants, grouped by series (in
    /// tenant and labels order), at most `budget` of them: more is [`StoreError::OverBudget`],
    /// and `budget` is left with what was not used. A histogram sample costs more than one
    /// (see `cost`), and on SQLite each series looked at costs one.
    ///
    /// On SQLite they are read through the C API on a connection of the pool, one primary-key
    /// range per series (found by a skip scan): sqlx hands every row from its worker thread
    /// over a channel, about 3 µs a row, and one query over all series lets SQLite pick the
    /// time index and sort, so a 30-day read of ten per-minute series took two seconds.
    pub async fn series_samples(
        &self,
        tenants: &[String],
        metric: &str,
        lo_ns: i64,
        hi_ns: i64,
        budget: &mut usize,
    ) -> Result<Vec<SeriesRows>, StoreError> {
        if tenants.is_empty() {
            return Ok(Vec::new());
        }
        let Pool::Sqlite(pool) = &self.pool else {
            let (filter, mut binds) = tenants_in(tenants);
            binds.push(Bind::Str(metric));
            let text = format!(
                "SELECT tenant, labels, ts_ns, value, histogram FROM metric_samples \
                 WHERE {filter} AND metric = ? AND ts_ns > {lo_ns} AND ts_ns <= {hi_ns} \
                 ORDER BY tenant, labels, ts_ns LIMIT {}",
                *budget + 1
            );
            let rows = rows!(&self.pool, &text, &binds, |row| (
                row.try_get::<String, _>(0)?,
                row.try_get::<String, _>(1)?,
                row.try_get::<i64, _>(2)?,
                row.try_get::<Option<f64>, _>(3)?,
                row.try_get::<Option<String>, _>(4)?,
            ));
            let used = rows.iter().map(|row| cost(row.4.as_deref())).sum();
            *budget = budget.checked_sub(used).ok_or(StoreError::OverBudget)?;
            let mut out: Vec<SeriesRows> = Vec::new();
            for (tenant, labels, ts_ns, value, histogram) in rows {
                match out.last_mut() {
                    Some(last) if last.tenant == tenant && last.labels == labels => {
                        last.samples.push((ts_ns, value, histogram))
                    }
                    _ => out.push(SeriesRows { tenant, labels, samples: vec![(ts_ns, value, histogram)] }),
                }
            }
            return Ok(out);
        };
        let mut connection = pool.acquire().await?;
        let read = |db: &crate::sqlite::Connection<'_>| -> Result<(Vec<SeriesRows>, Option<usize>), crate::sqlite::SqliteError> {
            use crate::sqlite::Value::Text;
            let mut tenants: Vec<&String> = tenants.iter().collect();
            tenants.sort();
            let mut series = db.prepare(
                "WITH RECURSIVE s(labels) AS (\
                   SELECT (SELECT labels FROM metric_samples WHERE tenant = ?1 AND metric = ?2 ORDER BY labels LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT labels FROM metric_samples WHERE tenant = ?1 AND metric = ?2 AND labels > s.labels \
                           ORDER BY labels LIMIT 1) FROM s WHERE s.labels IS NOT NULL) \
                 SELECT labels FROM s WHERE labels IS NOT NULL",
            )?;
            let mut samples = db.prepare(&format!(
                "SELECT ts_ns, value, histogram FROM metric_samples \
                 WHERE tenant = ?1 AND metric = ?2 AND labels = ?3 AND ts_ns > {lo_ns} AND ts_ns <= {hi_ns} ORDER BY ts_ns"
            ))?;
            let mut out = Vec::new();
            let mut left = *budget;
            for tenant in tenants {
                series.reset();
                series.bind(1, Text(tenant))?;
                series.bind(2, Text(metric))?;
                // Each series listed costs one from the budget, samples in the window or not:
                // a tenant's metric of millions of short-lived series is refused, not listed.
                while series.step()? {
                    let Some(rest) = left.checked_sub(1) else { return Ok((out, None)) };
                    left = rest;
                    let labels = String::from_utf8_lossy(series.text(0).unwrap_or_default()).into_owned();
                    samples.reset();
                    samples.bind(1, Text(tenant))?;
                    samples.bind(2, Text(metric))?;
                    samples.bind(3, Text(&labels))?;
                    let mut rows = Vec::new();
                    while samples.step()? {
                        let histogram = samples.text(2).map(|h| String::from_utf8_lossy(h).into_owned());
                        // Over the budget: stop reading (the caller refuses the read).
                        let Some(rest) = left.checked_sub(cost(histogram.as_deref())) else { return Ok((out, None)) };
                        left = rest;
                        rows.push((samples.int(0), samples.double(1), histogram));
                    }
                    if !rows.is_empty() {
                        out.push(SeriesRows { tenant: tenant.clone(), labels, samples: rows });
                    }
                }
            }
            Ok((out, Some(left)))
        };
        let (out, left) = crate::sqlite::run(&mut connection, read).await.map_err(StoreError::Sqlite)?;
        *budget = left.ok_or(StoreError::OverBudget)?;
        Ok(out)
    }
}
