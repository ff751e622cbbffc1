//! SQL on either backend for the Prometheus API: SQL is written once with `?` placeholders
//! (`TelemetryStore::sql` numbers them for PostgreSQL) and computed integers are written into
//! the text; only strings are bound.

use collector::store::{Pool, TelemetryStore};

use super::eval::QueryError;

pub fn is_sqlite(store: &TelemetryStore) -> bool {
    matches!(store.pool, Pool::Sqlite(_))
}

impl From<sqlx::Error> for QueryError {
    fn from(error: sqlx::Error) -> Self {
        tracing::error!(%error, "prometheus query failed");
        QueryError::Internal(format!("telemetry store: {error}"))
    }
}

impl From<billing::BillingError> for QueryError {
    fn from(error: billing::BillingError) -> Self {
        tracing::error!(%error, "prometheus query failed");
        QueryError::Internal(error.to_string())
    }
}

/// Runs `$sql` binding the strings `$binds` on whichever pool `$store` holds, and decodes every
/// row with `$decode` (compiled once per backend).
macro_rules! fetch {
    ($store:expr, $sql:expr, $binds:expr, |$row:ident| $decode:expr) => {
        $crate::prometheus::db::fetch!($store, $sql, $binds, pg_setup = None, |$row| $decode)
    };
    // `pg_setup`: a statement run first in the same transaction on PostgreSQL (`SET LOCAL`).
    ($store:expr, $sql:expr, $binds:expr, pg_setup = $setup:expr, |$row:ident| $decode:expr) => {{
        let setup: Option<&'static str> = $setup;
        let store: &collector::store::TelemetryStore = $store;
        let text = store.sql($sql);
        let binds: &[&str] = $binds;
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query(text);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(|$row| -> std::result::Result<_, sqlx::Error> {
                        #[allow(unused_imports)]
                        use sqlx::Row as _;
                        Ok($decode)
                    })
                    .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?
            }};
        }
        match (&store.pool, setup) {
            (collector::store::Pool::Sqlite(pool), _) => run!(pool),
            (collector::store::Pool::Postgres(pool), None) => run!(pool),
            (collector::store::Pool::Postgres(pool), Some(setup)) => {
                let mut tx = pool.begin().await?;
                sqlx::query(setup).execute(&mut *tx).await?;
                let rows = run!(&mut *tx);
                tx.commit().await?;
                rows
            }
        }
    }};
}
pub(crate) use fetch;

/// The stored samples of one series, in time order: (ts_ns, value, histogram JSON).
pub struct SeriesRows {
    pub tenant: String,
    pub labels: String,
    pub samples: Vec<(i64, Option<f64>, Option<String>)>,
}

/// The samples of `metric` in `(lo_ns, hi_ns]` of these tenants, grouped by series (in tenant
/// and labels order). On SQLite they are read through the C API on a connection of the pool,
/// one primary-key range per series (found by a skip scan): sqlx hands every row from its worker
/// thread over a channel, about 3 µs a row, and one query over all series lets SQLite pick the
/// time index and sort, so a 30-day read of ten per-minute series took two seconds.
pub async fn series_rows(
    store: &TelemetryStore,
    tenants: &[String],
    metric: &str,
    lo_ns: i64,
    hi_ns: i64,
    budget: &mut usize,
) -> Result<Vec<SeriesRows>, QueryError> {
    let over = || QueryError::Execution(super::data::TOO_MANY_SAMPLES.into());
    let Pool::Sqlite(pool) = &store.pool else {
        let placeholders = vec!["?"; tenants.len()].join(", ");
        let text = format!(
            "SELECT tenant, labels, ts_ns, value, histogram FROM metric_samples \
             WHERE tenant IN ({placeholders}) AND metric = ? AND ts_ns > {lo_ns} AND ts_ns <= {hi_ns} \
             ORDER BY tenant, labels, ts_ns LIMIT {}",
            *budget + 1
        );
        let mut binds: Vec<&str> = tenants.iter().map(String::as_str).collect();
        binds.push(metric);
        let rows = fetch!(store, &text, &binds, |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?,
            row.try_get::<i64, _>(2)?,
            row.try_get::<Option<f64>, _>(3)?,
            row.try_get::<Option<String>, _>(4)?,
        ));
        *budget = budget.checked_sub(rows.len()).ok_or_else(over)?;
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
    // Tens of milliseconds of CPU: off the async workers where the runtime allows.
    let read = |db: &collector::sqlite::Connection<'_>| -> Result<(Vec<SeriesRows>, Option<usize>), String> {
        use collector::sqlite::Value::Text;
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
            let mut labels_of_tenant = Vec::new();
            while series.step()? {
                labels_of_tenant.push(String::from_utf8_lossy(series.text(0).unwrap_or_default()).into_owned());
            }
            for labels in labels_of_tenant {
                samples.reset();
                samples.bind(1, Text(tenant))?;
                samples.bind(2, Text(metric))?;
                samples.bind(3, Text(&labels))?;
                let mut rows = Vec::new();
                while samples.step()? {
                    // Over the query's budget: stop reading (the caller refuses the query).
                    let Some(rest) = left.checked_sub(1) else { return Ok((out, None)) };
                    left = rest;
                    let histogram = samples.text(2).map(|h| String::from_utf8_lossy(h).into_owned());
                    rows.push((samples.int(0), samples.double(1), histogram));
                }
                if !rows.is_empty() {
                    out.push(SeriesRows { tenant: tenant.clone(), labels, samples: rows });
                }
            }
        }
        Ok((out, Some(left)))
    };
    let (out, left) = collector::sqlite::run(&mut connection, read).await.map_err(|error| {
        tracing::error!(%error, "prometheus query failed");
        QueryError::Internal(format!("telemetry store: {error}"))
    })?;
    *budget = left.ok_or_else(over)?;
    Ok(out)
}
