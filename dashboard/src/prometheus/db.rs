//! SQL on either backend for the Prometheus API: SQL is written once with `?` placeholders
//! (PostgreSQL gets `$n`; no `?` may appear in SQL text otherwise) and computed integers are
//! written into the text; only strings are bound.

use collector::store::TelemetryStore;
use sqlx::AssertSqlSafe;

use super::eval::QueryError;

pub fn sql(store: &TelemetryStore, text: &str) -> AssertSqlSafe<String> {
    match store {
        TelemetryStore::Sqlite(_) => AssertSqlSafe(text.to_string()),
        TelemetryStore::Postgres(_) => {
            let mut out = String::with_capacity(text.len() + 16);
            let mut n = 0;
            for c in text.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            AssertSqlSafe(out)
        }
    }
}

pub fn is_sqlite(store: &TelemetryStore) -> bool {
    matches!(store, TelemetryStore::Sqlite(_))
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
        let text = $crate::prometheus::db::sql(store, $sql);
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
        match (store, setup) {
            (collector::store::TelemetryStore::Sqlite(pool), _) => run!(pool),
            (collector::store::TelemetryStore::Postgres(pool), None) => run!(pool),
            (collector::store::TelemetryStore::Postgres(pool), Some(setup)) => {
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
