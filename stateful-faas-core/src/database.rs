//! The core's embedded database (SQLite, WAL): tenants, tokens, functions, the async queue.
//!
//! Migrations live in `migrations/sqlite/core_*.sql` at the workspace root and are compiled
//! into the binary, so an installed `sfaas` needs no source tree. The core keeps its own
//! migration table so that other crates can own their schemas in the same database.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqlSafeStr, SqlitePool};

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database url {0:?} is not supported by the core yet: use sqlite://PATH")]
    Unsupported(String),
}

fn migrator() -> Migrator {
    let init = Migration::new(
        1,
        "core init".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/core_0001_init.sql").into_sql_str(),
        false,
    );
    let flows = Migration::new(
        2,
        "core flows".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/core_0002_flows.sql").into_sql_str(),
        false,
    );
    let async_by_tenant = Migration::new(
        3,
        "async calls by tenant".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/core_0003_async_by_tenant.sql").into_sql_str(),
        false,
    );
    let mut migrator = Migrator::with_migrations(vec![init, flows, async_by_tenant]);
    migrator.dangerous_set_table_name("_sfaas_core_migrations");
    migrator
}

/// Opens (creating if needed) the SQLite database at `url` and applies the core's migrations.
pub async fn open(url: &str) -> Result<SqlitePool, DatabaseError> {
    if !url.starts_with("sqlite:") {
        return Err(DatabaseError::Unsupported(url.to_string()));
    }
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|source| DatabaseError::Open { url: url.to_string(), source })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL in WAL mode can lose the last transactions on power loss, not on a process
        // crash; FULL makes "acknowledged after commit" hold for power loss too.
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(|source| DatabaseError::Open { url: url.to_string(), source })?;
    migrator().run(&pool).await?;
    Ok(pool)
}

/// The default database URL for a data directory.
pub fn default_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("sfaas.db").display())
}

/// Milliseconds since the Unix epoch, the time unit of every `*_ms` column.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
