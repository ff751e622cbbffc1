//! Reconciliation: usage records against the gateway's own counters, so an operator sees
//! invocations that were served but never metered (spans lost), or metered twice.
//!
//! For each tenant, function and period, the invocation records are compared with the increase
//! of `gateway_function_invocation_total` (every status code) as scraped with the meter token.
//! The increase is taken from the last sample before the period (or from zero when the series
//! starts inside it) to the last sample inside it, with counter resets handled as Prometheus
//! does; invocations after the period's last scrape show up in the next period, so differences
//! of a scrape interval's worth at period edges are expected.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use crate::db::on_pool;
use crate::period::Period;
use crate::{Billing, Result};

pub const COUNTER: &str = "gateway_function_invocation_total";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    pub tenant: String,
    pub function: String,
    pub period: String,
    /// Invocation usage records (metered spans).
    pub metered: i64,
    /// The gateway counter's increase over the period.
    pub counted: i64,
    /// `counted − metered`: positive = served but not metered.
    pub difference: i64,
}

impl Billing {
    /// Per tenant (all, or one) and function: metered invocations against the gateway counter
    /// for `period`. Every pair is listed; `difference` 0 means they agree.
    pub async fn reconcile(&self, period: &str, tenant: Option<&str>) -> Result<Vec<Difference>> {
        let card = self.rate_card().await?;
        let period = Period::parse(card.period, period)?;
        let key = period.key();
        let mut rows: BTreeMap<(String, String), Difference> = BTreeMap::new();
        let condition = if tenant.is_some() { "period = ? AND tenant = ?" } else { "period = ?" };
        let binds: Vec<&str> = std::iter::once(key.as_str()).chain(tenant).collect();
        for (totals_key, totals) in self.totals_where(condition, &binds).await? {
            if totals.invocations > 0 {
                entry(&mut rows, &key, &totals_key.tenant, &totals_key.function).metered += totals.invocations;
            }
        }
        // Samples from a day before the period (for each series' baseline) to its end.
        let sql = self.db.sql(
            "SELECT tenant, labels, ts_ns, value FROM metric_samples WHERE metric = ? AND metered = 1 \
             AND histogram IS NULL AND ts_ns >= ? AND ts_ns < ? AND (? IS NULL OR tenant = ?) ORDER BY tenant, labels, ts_ns",
        );
        let samples: Vec<(String, String, i64, Option<f64>)> = on_pool!(&self.db, pool => {
            let rows = sqlx::query(sql)
                .bind(COUNTER)
                .bind(period.start_ns() - 86_400_000_000_000)
                .bind(period.end_ns())
                .bind(tenant)
                .bind(tenant)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get("tenant")?, r.try_get("labels")?, r.try_get("ts_ns")?, r.try_get("value")?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        let mut series: BTreeMap<(String, String), Vec<(i64, f64)>> = BTreeMap::new();
        for (tenant, labels, ts, value) in samples {
            if let Some(value) = value {
                series.entry((tenant, labels)).or_default().push((ts, value));
            }
        }
        for ((tenant, labels), points) in series {
            let labels: BTreeMap<String, String> = serde_json::from_str(&labels).unwrap_or_default();
            let Some(name) = labels.get("function_name") else { continue };
            let function = name.strip_suffix(&format!(".{tenant}")).unwrap_or(name);
            let increase = increase(&points, period.start_ns());
            entry(&mut rows, &key, &tenant, function).counted += increase.round() as i64;
        }
        Ok(rows
            .into_values()
            .map(|mut d| {
                d.difference = d.counted - d.metered;
                d
            })
            .collect())
    }
}

fn entry<'a>(
    rows: &'a mut BTreeMap<(String, String), Difference>,
    period: &str,
    tenant: &str,
    function: &str,
) -> &'a mut Difference {
    rows.entry((tenant.to_string(), function.to_string())).or_insert_with(|| Difference {
        tenant: tenant.to_string(),
        function: function.to_string(),
        period: period.to_string(),
        metered: 0,
        counted: 0,
        difference: 0,
    })
}

/// A counter's increase from `start` on: from the last point before `start` (or zero) to the
/// last point, resets counted as restarts from zero.
fn increase(points: &[(i64, f64)], start: i64) -> f64 {
    let mut previous = 0.0;
    let mut total = 0.0;
    for &(ts, value) in points {
        if ts < start {
            previous = value;
            continue;
        }
        total += if value >= previous { value - previous } else { value };
        previous = value;
    }
    total
}

#[cfg(test)]
mod tests {
    #[test]
    fn increase_handles_baselines_and_resets() {
        let points = [(5, 10.0), (10, 12.0), (20, 15.0), (30, 2.0), (40, 4.0)];
        // from 10 (baseline at t=5): +2 +3, reset to 2: +2, +2
        assert_eq!(super::increase(&points, 10), 9.0);
        // the series starts inside the period: counted from zero
        assert_eq!(super::increase(&points, 0), 19.0);
    }
}
