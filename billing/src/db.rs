//! The billing tables, beside the collector's telemetry in the same database (SQLite or
//! PostgreSQL). SQL is written once with `?` placeholders; PostgreSQL gets `$n`.

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, SqlSafeStr};

use collector::store::{Pool, TelemetryStore};

#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds (the body is compiled once per
/// backend).
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

fn migrator(sqls: [&'static str; 4]) -> Migrator {
    let migrations = sqls
        .into_iter()
        .zip(1..)
        .map(|(sql, version)| {
            Migration::new(version, "billing".into(), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name("_sfaas_billing_migrations");
    migrator
}

impl Db {
    /// The billing tables in the telemetry store's database, created if missing.
    pub async fn open(store: &TelemetryStore) -> Result<Self, sqlx::migrate::MigrateError> {
        Ok(match store.shared_pool() {
            Pool::Sqlite(pool) => {
                migrator([
                    include_str!("../../migrations/sqlite/billing_0001_billing.sql"),
                    include_str!("../../migrations/sqlite/billing_0002_call_id.sql"),
                    include_str!("../../migrations/sqlite/billing_0003_usage_segments.sql"),
                    include_str!("../../migrations/sqlite/billing_0004_log_bytes.sql"),
                ])
                .run(pool)
                .await?;
                Db::Sqlite(pool.clone())
            }
            Pool::Postgres(pool) => {
                migrator([
                    include_str!("../../migrations/postgres/billing_0001_billing.sql"),
                    include_str!("../../migrations/postgres/billing_0002_call_id.sql"),
                    include_str!("../../migrations/postgres/billing_0003_usage_segments.sql"),
                    include_str!("../../migrations/postgres/billing_0004_log_bytes.sql"),
                ])
                .run(pool)
                .await?;
                Db::Postgres(pool.clone())
            }
        })
    }

    /// `sql` with `?` placeholders in this backend's syntax.
    pub fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        match self {
            Db::Sqlite(_) => AssertSqlSafe(sql.to_string()),
            Db::Postgres(_) => AssertSqlSafe(collector::store::numbered_placeholders(sql)),
        }
    }
}

/// `(?, ?, ...)` groups for a multi-row insert of `rows` rows of `columns` values.
pub fn value_groups(rows: usize, columns: usize) -> String {
    let group = format!("({})", vec!["?"; columns].join(", "));
    vec![group; rows].join(", ")
}
