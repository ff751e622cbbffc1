//! The telemetry store: spans in blocks ([`blocks`]), and metric samples, log records and the
//! block catalog in SQL, on two backends through sqlx (SQLite, the embedded default, in WAL
//! mode; PostgreSQL). Schemas are `migrations/{sqlite,postgres}/collector_*`, compiled in and
//! applied at start. Writes are idempotent: a span is keyed by
//! (tenant, trace id, span id), a sample by (tenant, metric, labels, time), a log record by
//! (tenant, hash of its content); storing one twice stores it once.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, QueryBuilder, SqlSafeStr};

use crate::clock::Clock;
use crate::model::{Batch, LogRow, SampleRow, SpanRow};
use crate::sqlite;

pub mod blocks;

use blocks::SpanBlocks;
mod logs;
mod samples;
mod spans;
mod tokens;

pub use tokens::PublishedToken;

pub use blocks::MAX_TRACE_SPANS;
pub use blocks::log_format::{StreamKey, StreamLines};
pub use logs::{
    FunctionLog, LogCursor, LogQuery, LogRecord, LogScan, LogStream, MAX_LOG_READ, MAX_LOG_STREAMS, MAX_STREAM_LINES,
};
pub use samples::SeriesRows;
pub use spans::{MeteredSpan, TraceSearch};

/// A value bound to a `?` of a reader's statement.
#[derive(Clone, Copy)]
pub(crate) enum Bind<'a> {
    Str(&'a str),
    Int(i64),
}

/// Runs `$sql` (with `?` placeholders) binding `$binds` on the pool `$on`, and decodes every
/// row with `$decode` (compiled once per backend, `sqlx::Row` in scope).
macro_rules! rows {
    ($on:expr, $sql:expr, $binds:expr, |$row:ident| $decode:expr) => {{
        let on: &$crate::store::Pool = $on;
        let text = on.sql($sql);
        let binds: &[$crate::store::Bind<'_>] = $binds;
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query(text);
                for bind in binds {
                    query = match bind {
                        $crate::store::Bind::Str(s) => query.bind(*s),
                        $crate::store::Bind::Int(i) => query.bind(*i),
                    };
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
        match on {
            $crate::store::Pool::Sqlite(pool) => run!(pool),
            $crate::store::Pool::Postgres(pool) => run!(pool),
        }
    }};
}
pub(crate) use rows;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    #[error("cannot open the telemetry store: {0}")]
    Open(sqlx::Error),
    #[error("cannot apply the telemetry schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("telemetry store: {0}")]
    Query(#[from] sqlx::Error),
    #[error("telemetry store (SQLite): {0}")]
    Sqlite(#[from] crate::sqlite::SqliteError),
    #[error(transparent)]
    Blocks(#[from] blocks::format::BlockError),
    /// A read would hold more samples or spans than its caller's budget.
    #[error("more samples or spans than the read may load")]
    OverBudget,
    /// Another writer merged some of the same span blocks first.
    #[error("span blocks were merged by another writer first")]
    Conflict,
}

/// The database behind the collector, and the clock its "now" comes from.
#[derive(Clone, Debug)]
pub struct TelemetryStore {
    pool: Pool,
    clock: Clock,
    /// Spans, in blocks (the rest is in the SQL database).
    spans: Arc<SpanBlocks>,
}

/// A connection pool of one of the two backends.
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    /// Whether the pool was closed (its owner is done with the database).
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Pool::Sqlite(pool) => pool.is_closed(),
            Pool::Postgres(pool) => pool.is_closed(),
        }
    }

    /// `sql` (with `?` placeholders) in this backend's syntax.
    pub(crate) fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        match self {
            Pool::Sqlite(_) => AssertSqlSafe(sql.to_string()),
            Pool::Postgres(_) => AssertSqlSafe(numbered_placeholders(sql)),
        }
    }
}

/// Rows written by one commit (duplicates are not counted).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub spans: u64,
    pub samples: u64,
    pub logs: u64,
}

/// The schema's migrations, in order: version N is `sqls[N - 1]`.
fn migrator(sqls: &[&'static str]) -> Migrator {
    let migrations = sqls
        .iter()
        .zip(1..)
        .map(|(sql, version)| {
            let description = if version == 1 { "collector telemetry" } else { "collector telemetry update" };
            Migration::new(version, description.into(), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name("_sfaas_collector_migrations");
    migrator
}

/// Rows per multi-row insert: well under SQLite's and PostgreSQL's parameter limits.
const ROWS_PER_STATEMENT: usize = 500;

/// SQL written once with `?` placeholders, numbered (`$1`, `$2`, …) for PostgreSQL; no `?`
/// may appear in the text otherwise.
pub fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl TelemetryStore {
    /// The database's pool, for a component that keeps tables of its own in it (billing). The
    /// collector's tables are read through this store's methods only: their layout is its own.
    pub fn shared_pool(&self) -> &Pool {
        &self.pool
    }

    /// `sql` (with `?` placeholders) in this backend's syntax.
    pub(crate) fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        self.pool.sql(sql)
    }

    /// Opens the store at `url` with its spans in blocks beside a SQLite database's file
    /// (`<file>.blocks/`); a store on PostgreSQL needs a folder for them: [`Self::open_with_blocks`].
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .map(|p| p.split('?').next().unwrap_or(p));
        match path {
            Some(path) if !path.is_empty() && !path.contains(":memory:") => {
                Self::open_with_blocks(url, Path::new(&format!("{path}.blocks"))).await
            }
            _ => Err(StoreError::Open(sqlx::Error::Configuration(
                format!("{url}: spans are stored in blocks in a folder; open the store with one (the binary: DATA_DIR/blocks)").into(),
            ))),
        }
    }

    /// Opens the store at `url`, its spans in blocks under `blocks`: applies the schema, replays
    /// the span log, and moves the spans of an earlier layout (rows of `spans`) into blocks.
    pub async fn open_with_blocks(url: &str, blocks: &Path) -> Result<Self, StoreError> {
        Self::open_with_remote_blocks(url, blocks, None).await
    }

    /// Opens the store at `url` as [`Self::open_with_blocks`], its blocks on the object store
    /// `remote` when there is one (`blocks` is then this host's cache of them).
    pub async fn open_with_remote_blocks(
        url: &str,
        blocks: &Path,
        remote: Option<blocks::remote::Remote>,
    ) -> Result<Self, StoreError> {
        let pool = Self::open_pool(url).await?;
        let spans = SpanBlocks::open(blocks, pool.clone(), remote).await?;
        let store = Self { pool, clock: Clock::system(), spans };
        store.convert_span_rows().await?;
        Ok(store)
    }

    async fn open_pool(url: &str) -> Result<Pool, StoreError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(StoreError::Open)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .pragma("cache_size", "-65536");
            let pool =
                SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(StoreError::Open)?;
            migrator(&[
                include_str!("../../../migrations/sqlite/collector_0001_telemetry.sql"),
                include_str!("../../../migrations/sqlite/collector_0002_samples_by_series.sql"),
                include_str!("../../../migrations/sqlite/collector_0003_span_blocks.sql"),
                include_str!("../../../migrations/sqlite/collector_0004_span_block_merges.sql"),
                include_str!("../../../migrations/sqlite/collector_0005_published_tokens.sql"),
                include_str!("../../../migrations/sqlite/collector_0006_logs_by_function.sql"),
                include_str!("../../../migrations/sqlite/collector_0007_log_blocks.sql"),
            ])
            .run(&pool)
            .await?;
            Ok(Pool::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new().max_connections(8).connect(url).await.map_err(StoreError::Open)?;
            migrator(&[
                include_str!("../../../migrations/postgres/collector_0001_telemetry.sql"),
                include_str!("../../../migrations/postgres/collector_0002_span_blocks.sql"),
                include_str!("../../../migrations/postgres/collector_0003_span_block_merges.sql"),
                include_str!("../../../migrations/postgres/collector_0004_published_tokens.sql"),
                include_str!("../../../migrations/postgres/collector_0005_logs_by_function.sql"),
                include_str!("../../../migrations/postgres/collector_0006_log_blocks.sql"),
            ])
            .run(&pool)
            .await?;
            Ok(Pool::Postgres(pool))
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }

    /// Moves spans stored as rows of `spans` (the layout before blocks) into blocks, then
    /// empties the table (it stays, empty: billing's first schema version indexes it). A crash
    /// midway leaves the rows: the next start moves them again, and readers keep one span per
    /// identity.
    async fn convert_span_rows(&self) -> Result<(), StoreError> {
        const CHUNK: i64 = 50_000;
        let total: i64 = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_scalar("SELECT COUNT(*) FROM spans").fetch_one(pool).await?,
            Pool::Postgres(pool) => sqlx::query_scalar("SELECT COUNT(*) FROM spans").fetch_one(pool).await?,
        };
        if total == 0 {
            return Ok(());
        }
        tracing::warn!(spans = total, "moving spans from rows (the earlier layout) into blocks");
        let mut moved = 0;
        let mut after = (String::new(), String::new(), String::new());
        while moved < total {
            let text = self.sql(&format!(
                "SELECT {SPAN_COLUMNS}, received_ms FROM spans WHERE (tenant, trace_id, span_id) > (?, ?, ?) \
                 ORDER BY tenant, trace_id, span_id LIMIT {CHUNK}"
            ));
            macro_rules! fetch {
                ($pool:expr) => {
                    sqlx::query(text)
                        .bind(&after.0)
                        .bind(&after.1)
                        .bind(&after.2)
                        .fetch_all($pool)
                        .await?
                        .iter()
                        .map(|row| {
                            use sqlx::Row;
                            Ok(blocks::format::Stored { span: span_from_row!(row)?, received_ms: row.try_get(17)? })
                        })
                        .collect::<Result<Vec<_>, sqlx::Error>>()?
                };
            }
            let chunk: Vec<blocks::format::Stored> = match &self.pool {
                Pool::Sqlite(pool) => fetch!(pool),
                Pool::Postgres(pool) => fetch!(pool),
            };
            let Some(last) = chunk.last() else { break };
            after = (last.span.tenant.clone(), last.span.trace_id.clone(), last.span.span_id.clone());
            moved += chunk.len() as i64;
            blocks::blocking(|| self.spans.write_stored(chunk))?;
            if self.spans.head_rows() >= blocks::SEAL_ROWS {
                self.spans.seal().await?;
            }
            tracing::info!(moved, total, "spans moved into blocks");
        }
        self.spans.seal().await?;
        match &self.pool {
            Pool::Sqlite(pool) => sqlx::query("DELETE FROM spans").execute(pool).await.map(|_| ())?,
            Pool::Postgres(pool) => sqlx::query("TRUNCATE spans").execute(pool).await.map(|_| ())?,
        }
        Ok(())
    }

    /// Seals the spans written so far into blocks (they are sealed anyway at a size or an age;
    /// after this, readers on other hosts see them, and a restart replays nothing).
    pub async fn seal_spans(&self) -> Result<usize, StoreError> {
        self.spans.seal().await
    }

    /// Seals tenants' log records from the table into blocks: those due (by count or age; this
    /// is also done in the background every few seconds), or every record when `all`;
    /// returns how many records were sealed.
    pub async fn seal_logs(&self, all: bool) -> Result<usize, StoreError> {
        self.spans.seal_logs(all).await
    }

    /// Merges small span blocks until none is due (this is also done in the background after
    /// seals); returns how many blocks were merged.
    pub async fn merge_span_blocks(&self) -> Result<usize, StoreError> {
        self.spans.merge_all().await
    }

    /// Removes the span blocks that merges retired at least `grace` ago (in the background:
    /// five minutes); returns how many.
    pub async fn remove_merged_span_blocks(&self, grace: Duration) -> Result<usize, StoreError> {
        self.spans.remove_retired(grace).await
    }

    /// This store, reading "now" from `clock` (for every clone made after).
    pub fn with_clock(self, clock: Clock) -> Self {
        Self { clock, ..self }
    }

    /// The clock this store stamps arrivals with, and every reader of it decides "now" by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Writes a batch: its spans to the span log, then its samples and logs in one transaction;
    /// returns once both are durable.
    pub async fn write(&self, batch: &Batch) -> Result<Written, StoreError> {
        let received_ms = self.clock.now_ms();
        let spans = match batch.spans.is_empty() {
            true => 0,
            false => blocks::blocking(|| self.spans.write(&batch.spans, received_ms))?.0,
        };
        if batch.samples.is_empty() && batch.logs.is_empty() {
            return Ok(Written { spans, ..Written::default() });
        }
        let written = match &self.pool {
            Pool::Sqlite(pool) => {
                let mut connection = pool.acquire().await?;
                sqlite::run(&mut connection, |db| write_sqlite(db, batch, received_ms))
                    .await
                    .map_err(StoreError::Sqlite)
            }
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let written = write_postgres(&mut tx, batch, received_ms).await?;
                tx.commit().await?;
                Ok(written)
            }
        }?;
        Ok(Written { spans, ..written })
    }

    /// Deletes a tenant's spans (whole blocks: see [`SpanBlocks::delete_before`]), samples and
    /// logs dated before `before_ns` or that arrived before it; returns how many. (By date
    /// alone, a tenant's telemetry dated in the far future would be kept for ever.)
    pub async fn delete_before(&self, tenant: &str, before_ns: i64) -> Result<u64, StoreError> {
        let mut deleted = self.spans.delete_before(tenant, before_ns).await?;
        deleted += self.spans.delete_logs_before(tenant, before_ns).await?;
        let before_ms = before_ns.div_euclid(1_000_000);
        for table in ["metric_samples", "logs"] {
            let (tenant_is, ts_before, arrived_before) = (self.param(1), self.param(2), self.param(3));
            let sql = format!(
                "DELETE FROM {table} WHERE tenant = {tenant_is} AND (ts_ns < {ts_before} OR received_ms < {arrived_before})"
            );
            deleted += match &self.pool {
                Pool::Sqlite(pool) => {
                    let query = sqlx::query(AssertSqlSafe(sql)).bind(tenant).bind(before_ns).bind(before_ms);
                    query.execute(pool).await?.rows_affected()
                }
                Pool::Postgres(pool) => {
                    let query = sqlx::query(AssertSqlSafe(sql)).bind(tenant).bind(before_ns).bind(before_ms);
                    query.execute(pool).await?.rows_affected()
                }
            };
        }
        Ok(deleted)
    }

    /// Tenants that have telemetry.
    pub async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let sql = "SELECT DISTINCT tenant FROM metric_samples UNION SELECT DISTINCT tenant FROM logs \
                   UNION SELECT DISTINCT tenant FROM log_blocks";
        let mut tenants: std::collections::BTreeSet<String> =
            rows!(&self.pool, sql, &[], |row| row.try_get::<String, _>(0)?).into_iter().collect();
        tenants.extend(self.spans.span_tenants().await?);
        Ok(tenants.into_iter().collect())
    }

    /// Counts a tenant's stored spans, samples and logs (in the table and in blocks: a
    /// record delivered again after its first delivery was sealed counts twice).
    pub async fn counts(&self, tenant: &str) -> Result<Written, StoreError> {
        let samples = "SELECT COUNT(*) FROM metric_samples WHERE tenant = ?";
        let samples = rows!(&self.pool, samples, &[Bind::Str(tenant)], |row| row.try_get::<i64, _>(0)?)[0];
        let logs = "SELECT CAST((SELECT COUNT(*) FROM logs WHERE tenant = ?) \
                    + (SELECT COALESCE(SUM(rows), 0) FROM log_blocks WHERE tenant = ?) AS BIGINT)";
        let logs = rows!(&self.pool, logs, &[Bind::Str(tenant), Bind::Str(tenant)], |row| row.try_get::<i64, _>(0)?)[0];
        Ok(Written { spans: self.spans.count(tenant).await?, samples: samples as u64, logs: logs as u64 })
    }

    fn param(&self, n: usize) -> String {
        match &self.pool {
            Pool::Sqlite(_) => format!("?{n}"),
            Pool::Postgres(_) => format!("${n}"),
        }
    }
}

/// Reads a [`SpanRow`] from a row selected with [`SPAN_COLUMNS`], on either backend.
macro_rules! span_from_row {
    ($row:expr) => {{
        use sqlx::Row;
        let row = $row;
        Ok::<_, sqlx::Error>(SpanRow {
            tenant: row.try_get(0)?,
            trace_id: row.try_get(1)?,
            span_id: row.try_get(2)?,
            parent_span_id: row.try_get(3)?,
            name: row.try_get(4)?,
            kind: row.try_get(5)?,
            start_ns: row.try_get(6)?,
            end_ns: row.try_get(7)?,
            status_code: row.try_get(8)?,
            status_message: row.try_get(9)?,
            service_name: row.try_get(10)?,
            attributes: row.try_get(11)?,
            events: row.try_get(12)?,
            links: row.try_get(13)?,
            resource: row.try_get(14)?,
            scope: row.try_get(15)?,
            metered: row.try_get::<i64, _>(16)? != 0,
        })
    }};
}
use span_from_row;

const SPAN_COLUMNS: &str = "tenant, trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, status_code, \
                            status_message, service_name, attributes, events, links, resource, scope, metered";

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "counter" => "counter",
        "histogram" => "histogram",
        "summary" => "summary",
        _ => "gauge",
    }
}

/// Writes every row of a batch on SQLite in one transaction: one prepared single-row
/// `INSERT ... ON CONFLICT DO NOTHING` per table, each value bound in place.
fn write_sqlite(db: &sqlite::Connection<'_>, batch: &Batch, received_ms: i64) -> Result<Written, sqlite::SqliteError> {
    use sqlite::Value::{Int, Null, Real, Text};
    fn text(v: &Option<String>) -> sqlite::Value<'_> {
        v.as_deref().map_or(Null, Text)
    }
    let tx = db.begin()?;
    let written = Written {
        spans: 0,
        samples: insert_each(
            db,
            "metric_samples (tenant, metric, labels, kind, ts_ns, value, histogram, metered, received_ms)",
            "(tenant, metric, labels, ts_ns)",
            &batch.samples,
            |sample| {
                [
                    Text(&sample.tenant),
                    Text(&sample.metric),
                    Text(&sample.labels),
                    Text(sample.kind),
                    Int(sample.ts_ns),
                    // SQLite has no NaN: NaN is stored as NULL (and read back as NaN).
                    if sample.value.is_nan() { Null } else { Real(sample.value) },
                    text(&sample.histogram),
                    Int(i64::from(sample.metered)),
                    Int(received_ms),
                ]
            },
        )?,
        logs: insert_each(
            db,
            "logs (tenant, record_hash, ts_ns, severity_number, severity_text, body, attributes, resource, trace_id, \
             span_id, metered, received_ms)",
            "(tenant, record_hash)",
            &batch.logs,
            |log| {
                [
                    Text(&log.tenant),
                    Text(&log.record_hash),
                    Int(log.ts_ns),
                    Int(log.severity_number),
                    Text(&log.severity_text),
                    Text(&log.body),
                    Text(&log.attributes),
                    Text(&log.resource),
                    text(&log.trace_id),
                    text(&log.span_id),
                    Int(i64::from(log.metered)),
                    Int(received_ms),
                ]
            },
        )?,
    };
    tx.commit()?;
    Ok(written)
}

/// Inserts each row `INTO table (columns)` unless its `key` exists; returns the rows inserted.
fn insert_each<'r, T, const N: usize>(
    db: &sqlite::Connection<'_>,
    into: &str,
    key: &str,
    rows: &'r [T],
    values: impl Fn(&'r T) -> [sqlite::Value<'r>; N],
) -> Result<u64, sqlite::SqliteError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let placeholders: Vec<String> = (1..=N).map(|i| format!("?{i}")).collect();
    let mut insert =
        db.prepare(&format!("INSERT INTO {into} VALUES ({}) ON CONFLICT {key} DO NOTHING", placeholders.join(", ")))?;
    rows.iter().map(|row| insert.execute(&values(row))).sum()
}

/// Writes every row of a batch on PostgreSQL with multi-row `INSERT ... ON CONFLICT DO NOTHING`.
async fn write_postgres(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &Batch,
    received_ms: i64,
) -> Result<Written, StoreError> {
    let affected = |r: sqlx::postgres::PgQueryResult| r.rows_affected();
    let mut written = Written::default();
    for chunk in batch.samples.chunks(ROWS_PER_STATEMENT) {
        let mut builder: QueryBuilder<sqlx::Postgres> = QueryBuilder::new(
            "INSERT INTO metric_samples (tenant, metric, labels, kind, ts_ns, value, histogram, metered, received_ms) ",
        );
        builder.push_values(chunk, |mut row, sample: &SampleRow| {
            row.push_bind(sample.tenant.clone())
                .push_bind(sample.metric.clone())
                .push_bind(sample.labels.clone())
                .push_bind(sample.kind)
                .push_bind(sample.ts_ns)
                // SQLite has no NaN: NaN is stored as NULL (and read back as NaN).
                .push_bind((!sample.value.is_nan()).then_some(sample.value))
                .push_bind(sample.histogram.clone())
                .push_bind(i64::from(sample.metered))
                .push_bind(received_ms);
        });
        builder.push(" ON CONFLICT (tenant, metric, labels, ts_ns) DO NOTHING");
        written.samples += affected(builder.build().execute(&mut **tx).await?);
    }
    for chunk in batch.logs.chunks(ROWS_PER_STATEMENT) {
        let mut builder: QueryBuilder<sqlx::Postgres> = QueryBuilder::new(
            "INSERT INTO logs (tenant, record_hash, ts_ns, severity_number, severity_text, body, attributes, resource, \
             trace_id, span_id, metered, received_ms) ",
        );
        builder.push_values(chunk, |mut row, log: &LogRow| {
            row.push_bind(log.tenant.clone())
                .push_bind(log.record_hash.clone())
                .push_bind(log.ts_ns)
                .push_bind(log.severity_number)
                .push_bind(log.severity_text.clone())
                .push_bind(log.body.clone())
                .push_bind(log.attributes.clone())
                .push_bind(log.resource.clone())
                .push_bind(log.trace_id.clone())
                .push_bind(log.span_id.clone())
                .push_bind(i64::from(log.metered))
                .push_bind(received_ms);
        });
        builder.push(" ON CONFLICT (tenant, record_hash) DO NOTHING");
        written.logs += affected(builder.build().execute(&mut **tx).await?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store made before migration 2 keeps its samples when migration 2 clusters them by
    /// series (WITHOUT ROWID).
    #[tokio::test]
    async fn samples_survive_the_move_to_series_order() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("telemetry.db").display());
        let options = SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true);
        let pool = SqlitePoolOptions::new().connect_with(options).await.unwrap();
        migrator(&[include_str!("../../../migrations/sqlite/collector_0001_telemetry.sql")]).run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO metric_samples (tenant, metric, labels, kind, ts_ns, value, histogram, metered, received_ms) \
             VALUES ('acme', 'up', '{\"job\":\"a\"}', 'gauge', 5, 1.5, NULL, 0, 7)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = TelemetryStore::open(&url).await.unwrap();
        let Pool::Sqlite(pool) = &store.pool else { unreachable!() };
        let row: (String, i64, f64, i64) =
            sqlx::query_as("SELECT labels, ts_ns, value, received_ms FROM metric_samples WHERE tenant = 'acme'")
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(row, ("{\"job\":\"a\"}".to_string(), 5, 1.5, 7));
        let sql: String = sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'metric_samples'")
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{sql}");
    }
}
