//! Log blocks: a tenant's log records move from the SQL table `logs`, where writes land and
//! the newest lines are read (a live tail, `sfaas logs --follow`), into Parquet blocks
//! ([`log_format`]) under `<dir>/logs/`, listed in `log_blocks`.
//!
//! A tenant's records are sealed when it has [`LOG_SEAL_ROWS`] of them in the table, or its
//! oldest arrived [`LOG_SEAL_AGE`] ago: the oldest arrivals first, at most
//! [`LOG_BLOCK_ROWS`] records and about [`LOG_BLOCK_BYTES`] a block. The block file is written and made durable, then one
//! transaction lists it and deletes exactly the rows it holds (by arrival, up to its last
//! row); if the delete does not remove exactly those rows (another writer sealed them first,
//! retention deleted some, a slow write committed among them), the transaction is undone and
//! the file removed: a record is in the table or in one listed block, never lost, and a block
//! is never listed beside the rows it holds. Files no catalog row lists (a crash between
//! writing and listing) are removed when their writer's folder is opened again.
//!
//! Readers read the table first, then the catalog: a seal between the two makes a record come
//! twice (readers keep one per record hash), never not at all.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::AssertSqlSafe;

use super::catalog::now_ms;
use super::log_format::{self, LogBlock, LogFilter, LogGroup, StoredLog};
use super::{Bind, Pool, SpanBlocks, StoreError, blocking, io, rows};
use crate::model::LogRow;

/// A tenant's records are sealed once the table holds this many of them…
pub const LOG_SEAL_ROWS: i64 = 65_536;
/// …or its oldest arrived this long ago (a quiet tenant's blocks are not many small files).
pub const LOG_SEAL_AGE: std::time::Duration = std::time::Duration::from_secs(600);
/// Most records in one block (its rows' deletion holds the table's writers for a moment)…
pub const LOG_BLOCK_ROWS: usize = 131_072;
/// …and about most bytes (as [`LogRow::bytes`] counts them): what a seal holds in memory.
pub const LOG_BLOCK_BYTES: u64 = 64 << 20;
/// Records that arrived this recently are not sealed: a write stamped before a seal read the
/// table may commit after it.
const LOG_SEAL_MARGIN_MS: i64 = 5_000;

/// The columns of a record in `logs`, as [`read_rows`] decodes them.
pub(crate) const LOG_COLUMNS: &str = "tenant, record_hash, ts_ns, severity_number, severity_text, body, attributes, \
                                      resource, trace_id, span_id, metered, received_ms";

/// Runs a `SELECT` of [`LOG_COLUMNS`] (then nothing else) on the pool: the records and when
/// each arrived. SQLite's through its C API: sqlx hands rows over from its worker thread one
/// at a time, which costs more than SQLite's reading them (a query over millions of lines).
pub(crate) async fn read_rows(pool: &Pool, text: &str, binds: &[Bind<'_>]) -> Result<Vec<(LogRow, i64)>, StoreError> {
    if let Pool::Sqlite(pool) = pool {
        let mut connection = pool.acquire().await?;
        let read = |db: &crate::sqlite::Connection<'_>| {
            let mut statement = db.prepare(text)?;
            for (i, bind) in binds.iter().enumerate() {
                let value = match bind {
                    Bind::Str(s) => crate::sqlite::Value::Text(s),
                    Bind::Int(n) => crate::sqlite::Value::Int(*n),
                };
                statement.bind(i as i32 + 1, value)?;
            }
            let text = |statement: &crate::sqlite::Statement<'_>, column| {
                statement.text(column).map(|t| match std::str::from_utf8(t) {
                    Ok(text) => text.to_owned(),
                    Err(_) => String::from_utf8_lossy(t).into_owned(),
                })
            };
            let mut out = Vec::new();
            while statement.step()? {
                let text = |column| text(&statement, column);
                let row = LogRow {
                    tenant: text(0).unwrap_or_default(),
                    record_hash: text(1).unwrap_or_default(),
                    ts_ns: statement.int(2),
                    severity_number: statement.int(3),
                    severity_text: text(4).unwrap_or_default(),
                    body: text(5).unwrap_or_default(),
                    attributes: text(6).unwrap_or_default(),
                    resource: text(7).unwrap_or_default(),
                    trace_id: text(8),
                    span_id: text(9),
                    metered: statement.int(10) != 0,
                };
                out.push((row, statement.int(11)));
            }
            Ok(out)
        };
        return crate::sqlite::run(&mut connection, read).await.map_err(StoreError::Sqlite);
    }
    Ok(rows!(pool, text, binds, |row| (
        LogRow {
            tenant: row.try_get(0)?,
            record_hash: row.try_get(1)?,
            ts_ns: row.try_get(2)?,
            severity_number: row.try_get(3)?,
            severity_text: row.try_get(4)?,
            body: row.try_get(5)?,
            attributes: row.try_get(6)?,
            resource: row.try_get(7)?,
            trace_id: row.try_get(8)?,
            span_id: row.try_get(9)?,
            metered: row.try_get::<i64, _>(10)? != 0,
        },
        row.try_get::<i64, _>(11)?
    )))
}

/// A log block's catalog row: its times (min and max record time, min and max arrival).
struct LogBlockRow {
    id: String,
    location: String,
    times: [i64; 4],
    rows: usize,
    bytes: i64,
}

/// A row group of a listed log block.
#[derive(Clone)]
pub struct LogGroupOf {
    pub block: Arc<LogBlock>,
    pub group: LogGroup,
    /// Whose the catalog says the block is.
    pub tenant: Arc<str>,
}

impl LogGroupOf {
    /// Its rows that pass `filter` (blocking file work).
    pub fn read(&self, filter: &LogFilter<'_>) -> Result<Vec<StoredLog>, StoreError> {
        blocking(|| self.block.read_group(self.group.index, &self.tenant, filter)).map_err(StoreError::Blocks)
    }

    /// Its rows that pass `filter` and are not in `skip`, as time, stream and bytes (blocking
    /// file work).
    pub fn lines(
        &self,
        filter: &LogFilter<'_>,
        skip: &HashSet<(i64, String)>,
    ) -> Result<log_format::StreamLines, StoreError> {
        blocking(|| self.block.group_lines(self.group.index, &self.tenant, filter, skip)).map_err(StoreError::Blocks)
    }
}

impl SpanBlocks {
    /// Seals every tenant's log records that are due (see the module's text); returns how
    /// many records went into blocks.
    pub async fn seal_logs(&self, force: bool) -> Result<usize, StoreError> {
        let _one = self.log_seal_lock.lock().await;
        let now = now_ms();
        let text = "SELECT tenant, COUNT(*), MIN(received_ms) FROM logs GROUP BY tenant";
        let tenants = rows!(&self.pool, text, &[], |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<i64, _>(1)?,
            row.try_get::<i64, _>(2)?
        ));
        let (mut sealed, mut failed) = (0, None);
        for (tenant, count, oldest_ms) in tenants {
            let due = count >= LOG_SEAL_ROWS || oldest_ms <= now - LOG_SEAL_AGE.as_millis() as i64;
            if !(due || force) {
                continue;
            }
            let upto_ms = if force { i64::MAX } else { now - LOG_SEAL_MARGIN_MS };
            loop {
                match self.seal_tenant_logs(&tenant, upto_ms).await {
                    Ok((n, more)) => {
                        sealed += n;
                        if !more {
                            break;
                        }
                    }
                    // The other tenants are sealed still; the first error is reported.
                    Err(error) => {
                        failed.get_or_insert(error);
                        break;
                    }
                }
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(sealed),
        }
    }

    /// Seals a block of `tenant`'s oldest arrivals up to `upto_ms` (at most [`LOG_BLOCK_ROWS`]
    /// records and about [`LOG_BLOCK_BYTES`]); returns how many records, and whether there may
    /// be more (the block is full).
    async fn seal_tenant_logs(&self, tenant: &str, upto_ms: i64) -> Result<(usize, bool), StoreError> {
        const CHUNK: usize = 16_384;
        let mut found: Vec<(LogRow, i64)> = Vec::new();
        let (mut bytes, mut full) = (0u64, false);
        loop {
            let mut text = format!("SELECT {LOG_COLUMNS} FROM logs WHERE tenant = ? AND received_ms <= ?");
            let last = found.last().map(|(row, ms)| (*ms, row.record_hash.clone()));
            let mut binds = vec![Bind::Str(tenant), Bind::Int(upto_ms)];
            if let Some((ms, hash)) = &last {
                text.push_str(" AND (received_ms > ? OR (received_ms = ? AND record_hash > ?))");
                binds.extend([Bind::Int(*ms), Bind::Int(*ms), Bind::Str(hash)]);
            }
            text.push_str(&format!(" ORDER BY received_ms, record_hash LIMIT {CHUNK}"));
            let chunk = read_rows(&self.pool, &text, &binds).await?;
            let more = chunk.len() == CHUNK;
            for (row, ms) in chunk {
                bytes += row.bytes();
                found.push((row, ms));
                if found.len() >= LOG_BLOCK_ROWS || bytes >= LOG_BLOCK_BYTES {
                    full = true;
                    break;
                }
            }
            if full || !more {
                break;
            }
        }
        let Some((last, last_ms)) = found.last().map(|(row, ms)| (row.record_hash.clone(), *ms)) else {
            return Ok((0, false));
        };
        let count = found.len();
        let mut logs: Vec<StoredLog> = found.into_iter().map(|(row, ms)| StoredLog::new(row, ms)).collect();
        log_format::sort(&mut logs);
        let logs = self.not_in_blocks(tenant, logs).await?;
        if logs.is_empty() {
            // Each was delivered again after it was sealed: only the rows go.
            return match self.list_log_block(tenant, None, count, (last_ms, &last)).await? {
                true => Ok((count, full)),
                false => Ok((0, false)),
            };
        }
        let (dir, collector, rows) = (self.dir.clone(), self.collector.clone(), logs.len());
        let block = tokio::task::spawn_blocking(move || {
            let name = format!("{collector}-{}.parquet", uuid::Uuid::now_v7());
            let folder = dir.join("logs");
            let temporary = folder.join(format!("{name}.tmp"));
            let bytes = log_format::write(std::fs::File::create(&temporary)?, &logs)?;
            std::fs::rename(&temporary, folder.join(&name))?;
            std::fs::File::open(&folder)?.sync_all()?;
            let min = |f: fn(&StoredLog) -> i64| logs.iter().map(f).min().unwrap_or(0);
            let max = |f: fn(&StoredLog) -> i64| logs.iter().map(f).max().unwrap_or(0);
            Ok::<_, super::BlockError>((
                name.trim_end_matches(".parquet").to_string(),
                format!("logs/{name}"),
                [min(|s| s.row.ts_ns), max(|s| s.row.ts_ns), min(|s| s.received_ms), max(|s| s.received_ms)],
                bytes as i64,
            ))
        })
        .await
        .map_err(|error| io(std::io::Error::other(format!("sealing log blocks failed: {error}"))))?
        .map_err(StoreError::Blocks)?;
        let (id, location, times, bytes) = block;
        self.upload(&location).await?;
        let listed = LogBlockRow { id, location, times, rows, bytes };
        if !self.list_log_block(tenant, Some(&listed), count, (last_ms, &last)).await? {
            tracing::debug!(%tenant, "the log records of a block changed while it was sealed; it is dropped, and they are sealed again");
            self.remove(&listed.location).await?;
            return Ok((0, false));
        }
        Ok((count, full))
    }

    /// `logs` (in block order) but those a block of `tenant` holds already (delivered again
    /// after they were sealed): blocks hold each record once.
    async fn not_in_blocks(&self, tenant: &str, logs: Vec<StoredLog>) -> Result<Vec<StoredLog>, StoreError> {
        let (Some(first), Some(last)) = (logs.first(), logs.last()) else { return Ok(logs) };
        let filter = LogFilter { ts_ns: (first.row.ts_ns, last.row.ts_ns.saturating_add(1)), ..LogFilter::default() };
        let mut held = HashSet::new();
        for group in self.log_groups(tenant, &filter, false).await? {
            // Only the row groups whose time range holds one of the records' times.
            let from = logs.partition_point(|l| l.row.ts_ns < group.group.min_ts_ns);
            if logs.get(from).is_none_or(|l| l.row.ts_ns > group.group.max_ts_ns) {
                continue;
            }
            let keys =
                blocking(|| group.block.group_keys(group.group.index, filter.ts_ns)).map_err(StoreError::Blocks)?;
            held.extend(keys);
        }
        if held.is_empty() {
            return Ok(logs);
        }
        Ok(logs.into_iter().filter(|l| !held.contains(&(l.row.ts_ns, l.row.record_hash.clone()))).collect())
    }

    /// Lists `block` (if any) and deletes the `count` oldest arrivals of `tenant` from the
    /// table, through `last` (arrival ms, hash), in one transaction; `false` (and nothing
    /// done) when those are not exactly the rows there.
    async fn list_log_block(
        &self,
        tenant: &str,
        block: Option<&LogBlockRow>,
        count: usize,
        (last_ms, last): (i64, &str),
    ) -> Result<bool, StoreError> {
        let insert = self.pool.sql(
            "INSERT INTO log_blocks (id, tenant, location, min_ts_ns, max_ts_ns, min_received_ms, max_received_ms, \
             rows, bytes, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        );
        let delete = self
            .pool
            .sql("DELETE FROM logs WHERE tenant = ? AND (received_ms < ? OR (received_ms = ? AND record_hash <= ?))");
        macro_rules! run {
            ($p:expr) => {{
                let mut tx = $p.begin().await?;
                if let Some(b) = block {
                    let [min_ts, max_ts, min_received, max_received] = b.times;
                    sqlx::query(AssertSqlSafe(insert.0.clone()))
                        .bind(&b.id)
                        .bind(tenant)
                        .bind(&b.location)
                        .bind(min_ts)
                        .bind(max_ts)
                        .bind(min_received)
                        .bind(max_received)
                        .bind(b.rows as i64)
                        .bind(b.bytes)
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await?;
                }
                let query =
                    sqlx::query(AssertSqlSafe(delete.0.clone())).bind(tenant).bind(last_ms).bind(last_ms).bind(last);
                if query.execute(&mut *tx).await?.rows_affected() == count as u64 {
                    tx.commit().await?;
                    true
                } else {
                    tx.rollback().await?;
                    false
                }
            }};
        }
        Ok(match &self.pool {
            Pool::Sqlite(p) => run!(p),
            Pool::Postgres(p) => run!(p),
        })
    }

    /// The row groups of `tenant`'s log blocks that may hold records of `filter` (by time,
    /// and arrival), in time order: by their first record, or by their last and the newest
    /// first when `backward`.
    pub async fn log_groups(
        &self,
        tenant: &str,
        filter: &LogFilter<'_>,
        backward: bool,
    ) -> Result<Vec<LogGroupOf>, StoreError> {
        let text = "SELECT location FROM log_blocks WHERE tenant = ? AND max_ts_ns >= ? AND min_ts_ns < ? \
                    AND max_received_ms >= ?";
        let binds = [
            Bind::Str(tenant),
            Bind::Int(filter.ts_ns.0),
            Bind::Int(filter.ts_ns.1),
            Bind::Int(filter.received_from_ms.unwrap_or(i64::MIN)),
        ];
        let locations = rows!(&self.pool, text, &binds, |row| row.try_get::<String, _>(0)?);
        let tenant: Arc<str> = tenant.into();
        let mut groups = Vec::new();
        for location in locations {
            let Some(block) = self.listed_log_block(&location).await? else { continue };
            for group in block.groups() {
                if group.max_ts_ns >= filter.ts_ns.0 && group.min_ts_ns < filter.ts_ns.1 {
                    groups.push(LogGroupOf { block: block.clone(), group, tenant: tenant.clone() });
                }
            }
        }
        match backward {
            true => groups.sort_by_key(|g| std::cmp::Reverse(g.group.max_ts_ns)),
            false => groups.sort_by_key(|g| g.group.min_ts_ns),
        }
        Ok(groups)
    }

    /// Deletes `tenant`'s log blocks whose records all are dated before `before_ns` or all
    /// arrived before it; returns the records deleted.
    pub async fn delete_logs_before(&self, tenant: &str, before_ns: i64) -> Result<u64, StoreError> {
        let before_ms = before_ns.div_euclid(1_000_000);
        let text = "SELECT location, rows FROM log_blocks WHERE tenant = ? AND (max_ts_ns < ? OR max_received_ms < ?)";
        let binds = [Bind::Str(tenant), Bind::Int(before_ns), Bind::Int(before_ms)];
        let old = rows!(&self.pool, text, &binds, |row| (row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?));
        self.unlist("log_blocks", old).await
    }

    /// Removes this writer's log block files that no catalog row lists (a crash while sealing).
    pub(super) async fn remove_unlisted_log_blocks(&self) -> Result<(), StoreError> {
        let listed: HashSet<String> = rows!(&self.pool, "SELECT location FROM log_blocks", &[], |row| row
            .try_get::<String, _>(0)?)
        .into_iter()
        .collect();
        let prefix = format!("{}-", self.collector);
        for entry in std::fs::read_dir(self.dir.join("logs")).map_err(io)? {
            let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && !listed.contains(&format!("logs/{name}")) {
                tracing::warn!(block = %name, "removing a log block that was never listed (a crash while sealing)");
                std::fs::remove_file(self.dir.join("logs").join(&name)).map_err(io)?;
            }
        }
        if let Some(remote) = &self.remote {
            remote.cache().scan(&self.dir, "logs").map_err(io)?;
            for location in remote.list("logs", &prefix).await? {
                if !listed.contains(&location) {
                    tracing::warn!(block = %location, "removing an uploaded log block that was never listed (a crash while sealing)");
                    remote.delete(&location).await?;
                }
            }
        }
        Ok(())
    }
}
