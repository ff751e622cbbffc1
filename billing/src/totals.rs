//! The running totals (`usage_totals`): usage summed per invoice (tenant, billed period), usage
//! period, plan and function, which invoices are priced from; added to by extraction, import
//! and rebuild inside their transactions, read by pricing and by readers.

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;
use sqlx::Row;

use crate::db::{Db, on_pool, value_groups};
use crate::usage::{Totals, TotalsKey};
use crate::{Billing, Result};

/// Rows per multi-row statement.
pub(crate) const ROWS_PER_STATEMENT: usize = 500;

impl Billing {
    /// Totals of one tenant's invoice, by (usage period, plan, function).
    pub async fn totals(&self, tenant: &str, billed_period: &str) -> Result<BTreeMap<TotalsKey, Totals>> {
        self.totals_where("tenant = ? AND billed_period = ?", &[tenant, billed_period]).await
    }

    pub(crate) async fn totals_where(&self, condition: &str, binds: &[&str]) -> Result<BTreeMap<TotalsKey, Totals>> {
        let sql = self.db.sql(&format!(
            "SELECT tenant, billed_period, period, plan, function, records, invocations, errors, cpu_ms, wall_ms, \
             bytes_out, log_bytes, state_byte_seconds FROM usage_totals WHERE {condition}"
        ));
        on_pool!(&self.db, pool => {
            let mut query = sqlx::query(sql);
            for bind in binds {
                query = query.bind(*bind);
            }
            let rows = query.fetch_all(pool).await?;
            rows.iter().map(|row| Ok((key_of(row)?, totals_of(row)?))).collect()
        })
    }

    /// Usage of a tenant's period (whatever invoice it is billed on), by function.
    pub async fn usage_by_function(&self, tenant: &str, period: &str) -> Result<BTreeMap<String, Totals>> {
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for (key, totals) in self.totals_where("tenant = ? AND period = ?", &[tenant, period]).await? {
            out.entry(key.function).or_default().add(&totals);
        }
        Ok(out)
    }

    /// Tenants with usage or a plan.
    pub async fn tenants(&self) -> Result<Vec<String>> {
        let sql = "SELECT tenant FROM tenant_plans UNION SELECT tenant FROM usage_totals ORDER BY 1";
        Ok(on_pool!(&self.db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?))
    }
}

/// Adds sums to the totals rows (read, add, write back), inside the caller's transaction.
pub(crate) async fn add_totals<DB>(
    db: &Db,
    tx: &mut sqlx::Transaction<'_, DB>,
    delta: HashMap<TotalsKey, Totals>,
) -> Result<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::ColumnIndex<DB::Row>,
{
    if delta.is_empty() {
        return Ok(());
    }
    let mut merged: BTreeMap<TotalsKey, Totals> = BTreeMap::new();
    let invoices: HashSet<(String, String)> =
        delta.keys().map(|k| (k.tenant.clone(), k.billed_period.clone())).collect();
    for (tenant, billed_period) in invoices {
        let sql = db.sql(
            "SELECT period, plan, function, records, invocations, errors, cpu_ms, wall_ms, bytes_out, log_bytes, \
             state_byte_seconds FROM usage_totals WHERE tenant = ? AND billed_period = ?",
        );
        let rows = sqlx::query(sql).bind(tenant.clone()).bind(billed_period.clone()).fetch_all(&mut **tx).await?;
        for row in rows {
            let key = TotalsKey {
                tenant: tenant.clone(),
                billed_period: billed_period.clone(),
                period: row.try_get("period")?,
                plan: row.try_get("plan")?,
                function: row.try_get("function")?,
            };
            if delta.contains_key(&key) {
                merged.insert(key, totals_of(&row)?);
            }
        }
    }
    for (key, totals) in delta {
        merged.entry(key).or_default().add(&totals);
    }
    let rows: Vec<_> = merged.into_iter().collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = db.sql(&format!(
            "INSERT INTO usage_totals (tenant, billed_period, period, plan, function, records, invocations, errors, \
             cpu_ms, wall_ms, bytes_out, log_bytes, state_byte_seconds) VALUES {} \
             ON CONFLICT (tenant, billed_period, period, plan, function) DO UPDATE SET records = excluded.records, \
             invocations = excluded.invocations, errors = excluded.errors, cpu_ms = excluded.cpu_ms, \
             wall_ms = excluded.wall_ms, bytes_out = excluded.bytes_out, log_bytes = excluded.log_bytes, \
             state_byte_seconds = excluded.state_byte_seconds",
            value_groups(chunk.len(), 13)
        ));
        let mut query = sqlx::query(sql);
        for (k, t) in chunk {
            query = query
                .bind(k.tenant.clone())
                .bind(k.billed_period.clone())
                .bind(k.period.clone())
                .bind(k.plan.clone())
                .bind(k.function.clone())
                .bind(t.records)
                .bind(t.invocations)
                .bind(t.errors)
                .bind(t.cpu_ms)
                .bind(t.wall_ms)
                .bind(t.bytes_out)
                .bind(t.log_bytes)
                .bind(t.state_byte_seconds.to_string());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The key of a `usage_totals` row, on either database.
pub(crate) fn key_of<R>(row: &R) -> Result<TotalsKey, sqlx::Error>
where
    R: Row,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'q> &'q str: sqlx::ColumnIndex<R>,
{
    Ok(TotalsKey {
        tenant: row.try_get("tenant")?,
        billed_period: row.try_get("billed_period")?,
        period: row.try_get("period")?,
        plan: row.try_get("plan")?,
        function: row.try_get("function")?,
    })
}

/// The figures of a `usage_totals` row, on either database.
pub(crate) fn totals_of<R>(row: &R) -> Result<Totals, sqlx::Error>
where
    R: Row,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'q> &'q str: sqlx::ColumnIndex<R>,
{
    Ok(Totals {
        records: row.try_get("records")?,
        invocations: row.try_get("invocations")?,
        errors: row.try_get("errors")?,
        cpu_ms: row.try_get("cpu_ms")?,
        wall_ms: row.try_get("wall_ms")?,
        bytes_out: row.try_get("bytes_out")?,
        log_bytes: row.try_get("log_bytes")?,
        state_byte_seconds: decimal(&row.try_get::<String, _>("state_byte_seconds")?)?,
    })
}

pub(crate) fn decimal(text: &str) -> Result<Decimal, sqlx::Error> {
    text.parse().map_err(|e| sqlx::Error::Decode(format!("{text:?} is not a decimal: {e}").into()))
}
