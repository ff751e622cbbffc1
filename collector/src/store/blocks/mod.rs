//! Where spans are stored: a log, a head in memory, and Parquet blocks.
//!
//! A write appends its spans to the write-ahead log ([`wal`]) and returns once they are on
//! disk; they are then in the head, in memory, where readers see them at once. Sealing turns
//! the head into blocks ([`format`]: a Parquet file per tenant) under `<dir>/spans/`, lists
//! them in the catalog table `span_blocks` of the SQL database, and records in the same
//! transaction the last log segment they came from (`span_wal_seals`, per collector), after
//! which those segments are deleted. Opening replays the segments after that one, and removes
//! block files of this collector that no catalog row lists (a crash between writing a block
//! and listing it): a crash at any point loses nothing written and stores nothing twice.
//!
//! A span is identified by (tenant, trace id, span id): a write leaves out spans already in the
//! head, and readers keep one span per identity across the head and blocks (a client's retry
//! can reach a later block than its first delivery).
//!
//! Every process that opens the store is a writer with a log folder of its own, and follows
//! the other writers' logs on the host, so that it reads every acknowledged span
//! ([`SpanBlocks::open`]). The queries are in `queries.rs`.
//!
//! The parts: the head and the other writers' logs, the spans not in blocks yet
//! (`unsealed.rs`); writing and sealing (`seal.rs`); the block files, opened, cached and
//! uploaded (`files.rs`); the catalog of blocks in SQL (`catalog.rs`); merges (`merge.rs`).

mod catalog;
mod files;
pub mod format;
pub mod log_format;
mod logs;
mod merge;
mod queries;
pub mod remote;
mod seal;
mod unsealed;
pub mod wal;

pub use logs::{LOG_BLOCK_BYTES, LOG_BLOCK_ROWS, LOG_SEAL_AGE, LOG_SEAL_ROWS, LogGroupOf};
pub(crate) use logs::{LOG_COLUMNS, read_rows};
pub use queries::{MAX_DEPENDENCY_SPANS, MAX_TRACE_SPANS};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use catalog::{blocks_of, locations, sealed_through};
use format::{Block, BlockError, Filter, Stored};
use unsealed::{Followed, Head, key};

use super::{Bind, Pool, StoreError, rows};

/// When the head is sealed into blocks: at this many spans…
pub const SEAL_ROWS: usize = 262_144;

struct Writer {
    segment: wal::Segment,
    head: Head,
}

/// The span blocks of one writer (its log and head), every writer's blocks, and the logs of
/// the other writers on this host, followed as they grow.
pub struct SpanBlocks {
    dir: PathBuf,
    /// This writer's id: its log's folder, its blocks' name prefix, its row in `span_wal_seals`.
    collector: String,
    /// The lock on this writer's log folder, held while this is open.
    _slot: std::fs::File,
    pool: Pool,
    /// The object store blocks go to, if not only the local folder (then a cache).
    remote: Option<remote::Remote>,
    writer: Mutex<Writer>,
    /// The head being sealed: still read until its blocks are listed.
    sealing: Mutex<Option<Arc<Head>>>,
    /// One seal at a time.
    seal_lock: tokio::sync::Mutex<()>,
    /// Blocks opened (their footers and bloom filters read), by location.
    opened: Mutex<HashMap<String, Arc<Block>>>,
    /// Log blocks opened, by location.
    opened_logs: Mutex<HashMap<String, Arc<log_format::LogBlock>>>,
    /// One log seal at a time.
    log_seal_lock: tokio::sync::Mutex<()>,
    /// The other writers' log segments, as far as they were read.
    followed: Mutex<HashMap<PathBuf, Followed>>,
    /// Itself, for the seals it starts.
    me: std::sync::Weak<SpanBlocks>,
    /// A seal is under way or about to start.
    sealing_soon: std::sync::atomic::AtomicBool,
    /// Seals done since this was opened.
    seals: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SpanBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanBlocks").field("dir", &self.dir).field("writer", &self.collector).finish()
    }
}

/// Seconds between looks at which tenants' log records are due to be sealed.
const LOG_SEAL_EVERY: u64 = 10;

/// …or when its first span is this old (then readers on other hosts see it: they read blocks).
pub const SEAL_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// Locks a writer's log folder for this process (`flock`, released when the file is closed,
/// also by a crash); `None` when another process holds it.
fn lock_slot(folder: &Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(folder.join("LOCK"))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(None),
        _ => Err(error),
    }
}

/// Runs blocking file work from async code: off the runtime's queue where it allows that
/// (multi-threaded), else in place.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn io(error: std::io::Error) -> StoreError {
    StoreError::Blocks(BlockError::Io(error))
}

impl SpanBlocks {
    /// Opens the blocks under `dir` as a writer: in the first log folder under `<dir>/wal/`
    /// that no other process holds (a writer that stopped or crashed left it; what its log holds
    /// beyond its last seal is replayed into this head), or else in a new one.
    pub async fn open(dir: &Path, pool: Pool, remote: Option<remote::Remote>) -> Result<Arc<Self>, StoreError> {
        let wals = dir.join("wal");
        std::fs::create_dir_all(&wals).map_err(io)?;
        let mut slot = None;
        let mut existing: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&wals).map_err(io)? {
            existing.push(entry.map_err(io)?.file_name().to_string_lossy().into_owned());
        }
        existing.sort();
        for id in existing {
            if let Some(lock) = lock_slot(&wals.join(&id)).map_err(io)? {
                slot = Some((id, lock));
                break;
            }
        }
        let (collector, lock) = match slot {
            Some(slot) => slot,
            None => {
                let id = uuid::Uuid::now_v7().simple().to_string();
                std::fs::create_dir_all(wals.join(&id)).map_err(io)?;
                let lock = lock_slot(&wals.join(&id)).map_err(io)?.ok_or_else(|| {
                    io(std::io::Error::other(format!("a new span log folder {id} is locked by another process")))
                })?;
                (id, lock)
            }
        };
        Self::open_slot(dir, collector, lock, pool, remote).await
    }

    async fn open_slot(
        dir: &Path,
        collector: String,
        lock: std::fs::File,
        pool: Pool,
        remote: Option<remote::Remote>,
    ) -> Result<Arc<Self>, StoreError> {
        let collector = collector.as_str();
        let wal_dir = dir.join("wal").join(collector);
        std::fs::create_dir_all(dir.join("spans")).map_err(io)?;
        std::fs::create_dir_all(dir.join("logs")).map_err(io)?;
        let sealed_through = sealed_through(&pool, collector).await?;
        let mut head = Head::default();
        let mut last = sealed_through;
        for seq in wal::segments(&wal_dir).map_err(io)? {
            let path = wal::segment_path(&wal_dir, seq);
            if seq <= sealed_through {
                std::fs::remove_file(&path).map_err(io)?;
                continue;
            }
            let (records, torn) = wal::read(&path).map_err(io)?;
            if torn {
                tracing::warn!(segment = %path.display(), "the span log ends in a torn record (a crash while writing it): it was never acknowledged, and is skipped");
            }
            for stored in records.into_iter().flatten() {
                head.insert(stored);
            }
            last = last.max(seq);
        }
        let listed: HashSet<String> = locations(&pool).await?.into_iter().collect();
        let prefix = format!("{collector}-");
        for entry in std::fs::read_dir(dir.join("spans")).map_err(io)? {
            let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && !listed.contains(&format!("spans/{name}")) {
                tracing::warn!(block = %name, "removing a span block that was never listed (a crash while sealing)");
                std::fs::remove_file(dir.join("spans").join(&name)).map_err(io)?;
            }
        }
        if let Some(remote) = &remote {
            remote.cache().scan(dir, "spans").map_err(io)?;
            for location in remote.list("spans", &prefix).await? {
                if !listed.contains(&location) {
                    tracing::warn!(block = %location, "removing an uploaded span block that was never listed (a crash while sealing)");
                    remote.delete(&location).await?;
                }
            }
        }
        let segment = wal::Segment::create(&wal_dir, last + 1).map_err(io)?;
        let blocks = Arc::new_cyclic(|me| Self {
            dir: dir.to_path_buf(),
            collector: collector.to_string(),
            _slot: lock,
            pool,
            remote,
            writer: Mutex::new(Writer { segment, head }),
            sealing: Mutex::new(None),
            seal_lock: tokio::sync::Mutex::new(()),
            opened: Mutex::new(HashMap::new()),
            opened_logs: Mutex::new(HashMap::new()),
            log_seal_lock: tokio::sync::Mutex::new(()),
            followed: Mutex::new(HashMap::new()),
            me: me.clone(),
            sealing_soon: std::sync::atomic::AtomicBool::new(false),
            seals: std::sync::atomic::AtomicU64::new(0),
        });
        blocks.remove_unlisted_log_blocks().await?;
        // Seals by age and merges, while these blocks are open, their database is, and a runtime runs.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let me = Arc::downgrade(&blocks);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                let (mut merged_after, mut ticks) = (0, 0u64);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(blocks) = me.upgrade() else { return };
                    if blocks.pool.is_closed() {
                        return; // the store's owner closed its database
                    }
                    if blocks.head_age().is_some_and(|age| age >= SEAL_AGE)
                        && let Err(error) = blocks.seal().await
                    {
                        tracing::error!(%error, "sealing spans into blocks failed; they stay in the log and are tried again");
                    }
                    ticks += 1;
                    if ticks % LOG_SEAL_EVERY == 0
                        && let Err(error) = blocks.seal_logs(false).await
                    {
                        tracing::error!(%error, "sealing log records into blocks failed; they stay in the table and are tried again");
                    }
                    // Merges after seals only: an idle store does no work.
                    let seals = blocks.seals.load(std::sync::atomic::Ordering::Acquire);
                    if seals != merged_after {
                        merged_after = seals;
                        if let Err(error) = blocks.merge_all().await {
                            tracing::error!(%error, "merging span blocks failed; they are tried again");
                        }
                        if let Err(error) = blocks.remove_retired(merge::RETIRED_GRACE).await {
                            tracing::error!(%error, "removing merged span blocks failed; they are tried again");
                        }
                    }
                }
            });
        }
        Ok(blocks)
    }

    /// Spans in the head.
    pub(crate) fn head_rows(&self) -> usize {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).head.rows
    }

    /// How long ago the head's first span was written.
    fn head_age(&self) -> Option<std::time::Duration> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).head.since.map(|since| since.elapsed())
    }

    /// This writer's id.
    pub fn id(&self) -> &str {
        &self.collector
    }

    fn wal_dir(&self) -> PathBuf {
        self.dir.join("wal").join(&self.collector)
    }

    /// A tenant's spans that pass `filter`, from the head and the blocks, one per identity.
    pub async fn read(&self, tenant: &str, filter: &Filter<'_>) -> Result<Vec<Stored>, StoreError> {
        self.scan(Some(tenant), filter).await
    }

    /// The spans of `tenant` that pass `filter`, handed to `each` a batch at a time (the
    /// unsealed ones, then each row group's), so that a caller folding them never holds them
    /// all. Not deduplicated: a span being sealed may come twice.
    async fn each_batch(
        &self,
        tenant: &str,
        filter: &Filter<'_>,
        each: &mut (dyn FnMut(Vec<Stored>) + Send),
    ) -> Result<(), StoreError> {
        let traces = filter.trace_set();
        each(self.unsealed(Some(tenant), |s| filter.keeps(s, &traces))?);
        for listed in blocks_of(&self.pool, Some(tenant), filter).await? {
            let Some(block) = self.listed_block(&listed.location).await? else { continue };
            for (group, _) in block.groups_newest_first() {
                let found = blocking(|| block.read_group(group, filter)).map_err(StoreError::Blocks)?;
                // The catalog says whose a block is; the rows say it again.
                each(found.into_iter().filter(|s| s.span.tenant == listed.tenant).collect());
            }
        }
        Ok(())
    }

    /// The spans of `tenant` (or of every tenant) that pass `filter`, one per identity.
    async fn scan(&self, tenant: Option<&str>, filter: &Filter<'_>) -> Result<Vec<Stored>, StoreError> {
        let traces = filter.trace_set();
        let mut out = self.unsealed(tenant, |s| filter.keeps(s, &traces))?;
        for listed in blocks_of(&self.pool, tenant, filter).await? {
            let Some(block) = self.listed_block(&listed.location).await? else { continue };
            let found = blocking(|| block.read(filter)).map_err(StoreError::Blocks)?;
            // The catalog says whose a block is; the rows say it again.
            out.extend(found.into_iter().filter(|s| s.span.tenant == listed.tenant));
        }
        let mut seen = HashSet::new();
        out.retain(|s| seen.insert((s.span.tenant.clone(), key(&s.span))));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SpanRow;
    use crate::store::TelemetryStore;

    fn span(tenant: &str, i: usize) -> SpanRow {
        SpanRow {
            tenant: tenant.into(),
            trace_id: format!("{:032x}", i / 3 + 1),
            span_id: format!("{:016x}", i + 1),
            parent_span_id: None,
            name: "op".into(),
            kind: 2,
            start_ns: 1_000 + i as i64,
            end_ns: 2_000 + i as i64,
            status_code: 0,
            status_message: String::new(),
            service_name: "svc".into(),
            attributes: format!(r#"{{"owner":"{tenant}"}}"#),
            events: "[]".into(),
            links: "[]".into(),
            resource: "{}".into(),
            scope: "{}".into(),
            metered: false,
        }
    }

    /// Drops a writer as a crash would, once its background work lets go of it.
    async fn crash(blocks: Arc<SpanBlocks>) {
        let weak = Arc::downgrade(&blocks);
        drop(blocks);
        while weak.strong_count() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn all(blocks: &SpanBlocks, tenant: &str) -> Vec<SpanRow> {
        let mut spans: Vec<SpanRow> =
            blocks.read(tenant, &Filter::default()).await.unwrap().into_iter().map(|s| s.span).collect();
        spans.sort_by(|a, b| a.span_id.cmp(&b.span_id));
        spans
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_written_is_lost_or_stored_twice_across_seals_crashes_and_retries() {
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let root = dir.path().join("blocks");
        let acme: Vec<SpanRow> = (0..30).map(|i| span("acme", i)).collect();
        let globex: Vec<SpanRow> = (0..30).map(|i| span("globex", i)).collect();

        // Written, then a crash before any seal: the log replays.
        let blocks = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert_eq!(blocks.write(&acme[..20], 5).unwrap(), (20, false));
        assert_eq!(blocks.write(&acme[10..], 6).unwrap().0, 10, "the first ten were there already");
        assert_eq!(blocks.write(&globex, 6).unwrap().0, 30);
        crash(blocks).await;
        let blocks = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert_eq!(all(&blocks, "acme").await, acme);
        assert_eq!(blocks.write(&acme, 7).unwrap().0, 0, "the replayed head still knows them");

        // Sealed: read from blocks, the log's segments gone, a restart replays nothing.
        assert_eq!(blocks.seal().await.unwrap(), 60);
        assert_eq!(wal::segments(&root.join("wal").join(blocks.id())).unwrap().len(), 1, "only the new, empty segment");
        assert_eq!(all(&blocks, "acme").await, acme);
        crash(blocks).await;
        let blocks = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert_eq!(all(&blocks, "acme").await, acme);
        assert_eq!(all(&blocks, "globex").await, globex);

        // A client's retry after the seal lands in the head again: readers keep one of each.
        assert_eq!(blocks.write(&acme[..5], 8).unwrap().0, 5);
        assert_eq!(all(&blocks, "acme").await, acme);

        // A crash after a block file was written but before it was listed: the file goes, the
        // log replays.
        let id = blocks.id().to_string();
        std::fs::write(root.join(format!("spans/{id}-orphan.parquet")), b"half a block").unwrap();
        std::fs::write(root.join("spans/another-writers.parquet"), b"not ours to remove").unwrap();
        crash(blocks).await;
        let blocks = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert_eq!(blocks.id(), id, "the writer's log folder is free again: it is taken again");
        assert!(!root.join(format!("spans/{id}-orphan.parquet")).exists());
        assert!(root.join("spans/another-writers.parquet").exists());
        assert_eq!(all(&blocks, "acme").await, acme);

        // Filters, and no tenant reads another's.
        let trace = acme[4].trace_id.clone();
        let found = blocks.read("acme", &Filter { trace_ids: &[&trace], ..Filter::default() }).await.unwrap();
        assert_eq!(found.len(), 3);
        assert!(blocks.read("nobody", &Filter::default()).await.unwrap().is_empty());
        let arrived = blocks.read("globex", &Filter { received_ms: Some((5, 6)), ..Filter::default() }).await.unwrap();
        assert_eq!(arrived.len(), 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_sees_what_another_writer_on_the_host_logged_before_and_after_its_seal() {
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let root = dir.path().join("blocks");
        let collector = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        let dashboard = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert_ne!(collector.id(), dashboard.id(), "a held log folder is not shared");
        let acme: Vec<SpanRow> = (0..30).map(|i| span("acme", i)).collect();
        collector.write(&acme[..20], 5).unwrap();
        assert_eq!(all(&dashboard, "acme").await, acme[..20]);
        collector.write(&acme[20..], 6).unwrap();
        // A record being written (its first bytes only) is not read until it is whole.
        let segment = wal::segment_path(&root.join("wal").join(collector.id()), 1);
        let whole = std::fs::read(&segment).unwrap();
        std::fs::write(&segment, &whole[..whole.len() - 10]).unwrap();
        assert_eq!(all(&dashboard, "acme").await, acme[..20]);
        std::fs::write(&segment, &whole).unwrap();
        assert_eq!(all(&dashboard, "acme").await, acme);
        collector.seal().await.unwrap();
        assert_eq!(all(&dashboard, "acme").await, acme, "from the blocks now");
        assert!(
            dashboard.followed.lock().unwrap().values().all(|f| f.tenants.is_empty()),
            "the sealed segments are forgotten"
        );
        assert!(all(&dashboard, "globex").await.is_empty());
    }

    fn log(tenant: &str, i: i64) -> crate::model::LogRow {
        crate::model::LogRow {
            tenant: tenant.into(),
            record_hash: format!("{tenant}-{i:04}"),
            ts_ns: 1_000 + i,
            severity_number: 9,
            severity_text: "INFO".into(),
            body: format!("line {i}"),
            attributes: "{}".into(),
            resource: "{}".into(),
            trace_id: None,
            span_id: None,
            metered: false,
        }
    }

    async fn log_files(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root.join("logs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_records_move_into_blocks_once_whoever_seals_and_whatever_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let root = dir.path().join("blocks");
        let one = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        let two = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        let mut logs: Vec<_> = (0..100).map(|i| log("acme", i)).collect();
        logs.extend((0..10).map(|i| log("globex", i)));
        store.write(&crate::model::Batch { logs, ..Default::default() }).await.unwrap();
        let count = |sql: &'static str| {
            let pool = store.pool.clone();
            async move { Ok::<_, StoreError>(rows!(&pool, sql, &[], |row| row.try_get::<i64, _>(0)?)[0]) }
        };

        // Not due yet (few, and new): nothing moves.
        assert_eq!(one.seal_logs(false).await.unwrap(), 0);
        // Both writers seal at once: each record goes into one block, listed once; the loser's
        // file is removed.
        let (a, b) = tokio::join!(one.seal_logs(true), two.seal_logs(true));
        assert_eq!(a.unwrap() + b.unwrap(), 110);
        assert_eq!(count("SELECT COUNT(*) FROM logs").await.unwrap(), 0);
        assert_eq!(count("SELECT COUNT(*) FROM log_blocks").await.unwrap(), 2, "a block per tenant");
        assert_eq!(count("SELECT SUM(rows) FROM log_blocks").await.unwrap(), 110);
        assert_eq!(log_files(&root).await.len(), 2);
        let filter = log_format::LogFilter { ts_ns: (i64::MIN, i64::MAX), ..Default::default() };
        let mut read = Vec::new();
        for group in one.log_groups("acme", &filter, false).await.unwrap() {
            read.extend(group.read(&filter).unwrap().into_iter().map(|s| s.row));
        }
        assert_eq!(read, (0..100).map(|i| log("acme", i)).collect::<Vec<_>>(), "as written, in time order");

        // Delivered again after they were sealed (a retry), with a new one: sealed again, the
        // block holds the new one only.
        let mut again: Vec<_> = (0..10).map(|i| log("acme", i)).collect();
        again.push(log("acme", 100));
        store.write(&crate::model::Batch { logs: again, ..Default::default() }).await.unwrap();
        assert_eq!(one.seal_logs(true).await.unwrap(), 11);
        assert_eq!(count("SELECT COUNT(*) FROM logs").await.unwrap(), 0);
        assert_eq!(count("SELECT SUM(rows) FROM log_blocks").await.unwrap(), 111);
        // Only duplicates: the rows go, no block is made.
        store.write(&crate::model::Batch { logs: vec![log("acme", 5)], ..Default::default() }).await.unwrap();
        assert_eq!(one.seal_logs(true).await.unwrap(), 1);
        assert_eq!(count("SELECT COUNT(*) FROM log_blocks").await.unwrap(), 3);
        assert_eq!(count("SELECT COUNT(*) FROM logs").await.unwrap(), 0);

        // A crash after a block was written, before it was listed: the file goes at open, not
        // another writer's.
        let id = one.id().to_string();
        std::fs::write(root.join(format!("logs/{id}-orphan.parquet")), b"half a block").unwrap();
        std::fs::write(root.join(format!("logs/{}-in-the-making.parquet", two.id())), b"not ours").unwrap();
        crash(one).await;
        let one = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert_eq!(one.id(), id);
        assert!(!root.join(format!("logs/{id}-orphan.parquet")).exists());
        assert!(root.join(format!("logs/{}-in-the-making.parquet", two.id())).exists());
        std::fs::remove_file(root.join(format!("logs/{}-in-the-making.parquet", two.id()))).unwrap();

        // Retention goes by whole blocks, a tenant's only.
        assert_eq!(one.delete_logs_before("acme", 1_050).await.unwrap(), 0, "half of the block is newer");
        assert_eq!(one.delete_logs_before("acme", 1_101).await.unwrap(), 101);
        assert_eq!(count("SELECT SUM(rows) FROM log_blocks").await.unwrap(), 10);
        assert_eq!(log_files(&root).await.len(), 1, "globex's");
    }

    async fn listed(blocks: &SpanBlocks, retired: bool) -> Vec<String> {
        let text =
            format!("SELECT location FROM span_blocks WHERE retired_ms IS {} NULL", if retired { "NOT" } else { "" });
        let listed = async { Ok::<_, StoreError>(rows!(&blocks.pool, &text, &[], |row| row.try_get::<String, _>(0)?)) };
        listed.await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_blocks_keep_every_span_once_and_two_writers_never_merge_the_same_block_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let root = dir.path().join("blocks");
        let one = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        let two = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        let acme: Vec<SpanRow> = (0..90).map(|i| span("acme", i)).collect();
        // Nine seals of ten spans: nine small blocks of one tier; every third a retry of the
        // span before it (a second delivery, later, into another block).
        for (seal, chunk) in acme.chunks(10).enumerate() {
            one.write(chunk, 100 + seal as i64).unwrap();
            if seal > 0 {
                one.write(&acme[seal * 10 - 1..seal * 10], 100 + seal as i64).unwrap();
            }
            one.write(&[span("globex", seal)], 100).unwrap();
            one.seal().await.unwrap();
        }
        assert_eq!(listed(&one, false).await.len(), 18);
        let before = all(&two, "acme").await;
        assert_eq!(before, acme);

        // Both writers merge at once: every block is merged by one of them.
        let (a, b) = tokio::join!(one.merge_all(), two.merge_all());
        assert_eq!(a.unwrap() + b.unwrap(), 18, "each block merged once");
        assert_eq!(listed(&one, false).await.len(), 2, "a block per tenant");
        assert_eq!(all(&one, "acme").await, acme, "every span once, nothing of another tenant");
        assert_eq!(all(&two, "globex").await.len(), 9);
        // One copy of each retried span, the first delivery's.
        let retried = one.read("acme", &Filter { trace_ids: &[&acme[9].trace_id], ..Filter::default() }).await.unwrap();
        let copies: Vec<i64> =
            retried.iter().filter(|s| s.span.span_id == acme[9].span_id).map(|s| s.received_ms).collect();
        assert_eq!(copies, [100]);

        // The retired files stay for readers that listed them, then go.
        let retired = listed(&one, true).await;
        assert!(!retired.is_empty());
        assert_eq!(one.remove_retired(merge::RETIRED_GRACE).await.unwrap(), 0);
        assert!(retired.iter().all(|location| root.join(location).exists()));
        assert_eq!(two.remove_retired(std::time::Duration::ZERO).await.unwrap(), retired.len());
        assert!(retired.iter().all(|location| !root.join(location).exists()));
        assert!(listed(&one, true).await.is_empty());
        assert_eq!(all(&one, "acme").await, acme);

        // A crash after a merged block was written and before it was listed: it goes at open.
        let id = one.id().to_string();
        crash(one).await;
        std::fs::write(root.join(format!("spans/{id}-merged-in-a-crash.parquet")), b"half").unwrap();
        let one = SpanBlocks::open(&root, store.pool.clone(), None).await.unwrap();
        assert!(!root.join(format!("spans/{id}-merged-in-a-crash.parquet")).exists());
        assert_eq!(all(&one, "acme").await, acme);
    }

    /// A function knows its invocation span's ids (its `traceparent`); its tenant sending a
    /// span with those ids first, under its own token, must not make the platform's metered
    /// span a duplicate: in the head, in blocks, or in a merge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenants_copy_of_a_metered_spans_ids_never_hides_it_from_billing() {
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let blocks = SpanBlocks::open(&dir.path().join("blocks"), store.pool.clone(), None).await.unwrap();
        let metered = |i: usize| SpanRow { name: "invoke f".into(), metered: true, ..span("acme", i) };
        let forged = |i: usize| SpanRow { name: "invoke f".into(), ..span("acme", i) };
        let billed = |blocks: Arc<SpanBlocks>| async move {
            let mut ids: Vec<String> =
                blocks.metered_spans(i64::MIN, i64::MAX).await.unwrap().into_iter().map(|s| s.span_id).collect();
            ids.sort();
            ids
        };
        let expected: Vec<String> = (0..4).map(|i| metered(i).span_id).collect();
        // The forgeries first, in the head, then sealed; the metered spans after each.
        blocks.write(&[forged(0), forged(1)], 10).unwrap();
        assert_eq!(blocks.write(&[metered(0)], 11).unwrap().0, 1, "not a duplicate of the tenant's span");
        blocks.seal().await.unwrap();
        assert_eq!(blocks.write(&[metered(1)], 12).unwrap().0, 1, "nor of one in a block");
        blocks.write(&[forged(2), forged(3)], 13).unwrap();
        blocks.seal().await.unwrap();
        blocks.write(&[metered(2), metered(3)], 14).unwrap();
        assert_eq!(blocks.write(&[metered(3)], 15).unwrap().0, 0, "a metered span delivered again is one");
        assert_eq!(billed(blocks.clone()).await, expected);
        blocks.seal().await.unwrap();
        for i in 4..8 {
            blocks.write(&[forged(i * 10)], 20).unwrap();
            blocks.seal().await.unwrap();
        }
        assert!(blocks.merge_all().await.unwrap() > 0);
        assert_eq!(billed(blocks.clone()).await, expected, "after the merge");
        assert_eq!(all(&blocks, "acme").await.len(), 12, "the tenant's own spans stay too, as its own");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_search_over_many_spans_in_the_head_and_blocks_returns_the_latest_traces() {
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
        let blocks = SpanBlocks::open(&dir.path().join("blocks"), store.pool.clone(), None).await.unwrap();
        // 3 000 spans, three per trace, their starts shuffled; the first half sealed.
        let mut spans: Vec<SpanRow> = (0..3000).map(|i| span("acme", (i * 7919) % 3000)).collect();
        for (n, span) in spans.iter_mut().enumerate() {
            span.name = if n % 5 == 0 { "rare".into() } else { "op".into() };
        }
        blocks.write(&spans[..1500], 1).unwrap();
        blocks.seal().await.unwrap();
        blocks.write(&spans[1500..], 2).unwrap();
        for (operation, limit) in [(None, 7), (Some("rare"), 20), (None, 2000)] {
            let search = crate::store::TraceSearch {
                service: "svc".into(),
                operation: operation.map(str::to_string),
                tags: Vec::new(),
                min_ns: 0,
                max_ns: 0,
                limit,
                start_ns: 0,
                end_ns: i64::MAX,
            };
            // By hand: each trace's latest matching start, the latest first.
            let mut latest: HashMap<&str, i64> = HashMap::new();
            for s in spans.iter().filter(|s| operation.is_none_or(|op| s.name == op)) {
                let start = latest.entry(&s.trace_id).or_insert(i64::MIN);
                *start = (*start).max(s.start_ns);
            }
            let mut expected: Vec<(String, i64)> = latest.into_iter().map(|(t, s)| (t.to_string(), s)).collect();
            expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
            expected.truncate(limit);
            let found = blocks.find_traces(Some("acme"), &search).await.unwrap();
            let found: Vec<(String, i64)> = found.into_iter().map(|(start, trace, _)| (trace, start)).collect();
            assert_eq!(found, expected, "{operation:?}, {limit}");
        }
    }
}
