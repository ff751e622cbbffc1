//! Writing spans (to the log, then the head) and sealing the head into blocks: a block per
//! tenant, listed in the catalog with the last log segment it came from, after which that log
//! is removed.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::catalog::{BlockRow, Listing, list};
use super::format::{self, BlockError, Stored};
use super::unsealed::{Head, key};
use super::{SEAL_ROWS, SpanBlocks, StoreError, io, wal};
use crate::model::SpanRow;

impl SpanBlocks {
    /// Writes spans that arrived at `received_ms`, durably; returns how many were new to the
    /// head, and whether the head is due to be sealed.
    pub fn write(&self, spans: &[SpanRow], received_ms: i64) -> Result<(u64, bool), StoreError> {
        self.write_stored(spans.iter().map(|span| Stored { span: span.clone(), received_ms }))
    }

    /// Writes spans with their own arrival times (as [`Self::write`]).
    pub(crate) fn write_stored(&self, spans: impl IntoIterator<Item = Stored>) -> Result<(u64, bool), StoreError> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch_keys = HashSet::new();
        let new: Vec<Stored> = spans
            .into_iter()
            .filter(|s| !writer.head.contains(&s.span) && batch_keys.insert((s.span.tenant.clone(), key(&s.span))))
            .collect();
        if new.is_empty() {
            return Ok((0, false));
        }
        writer.segment.append(&new).map_err(io)?;
        let count = new.len() as u64;
        for stored in new {
            writer.head.insert(stored);
        }
        let due = writer.head.rows >= SEAL_ROWS;
        drop(writer);
        if due
            && !self.sealing_soon.swap(true, std::sync::atomic::Ordering::AcqRel)
            && let (Ok(runtime), Some(me)) = (tokio::runtime::Handle::try_current(), self.me.upgrade())
        {
            runtime.spawn(async move {
                if let Err(error) = me.seal().await {
                    tracing::error!(%error, "sealing spans into blocks failed; they stay in the log and are tried again");
                }
            });
        }
        Ok((count, due))
    }

    /// Seals the head into blocks (nothing when it is empty); returns the spans sealed.
    pub async fn seal(&self) -> Result<usize, StoreError> {
        let _one = self.seal_lock.lock().await;
        self.sealing_soon.store(false, std::sync::atomic::Ordering::Release);
        let (head, sealed_seq) = {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            if writer.head.rows == 0 {
                return Ok(0);
            }
            let next = wal::Segment::create(&self.wal_dir(), writer.segment.seq + 1).map_err(io)?;
            let sealed = std::mem::replace(&mut writer.segment, next).seq;
            let head = Arc::new(std::mem::take(&mut writer.head));
            *self.sealing.lock().unwrap_or_else(|e| e.into_inner()) = Some(head.clone());
            (head, sealed)
        };
        let result = self.write_blocks(&head, sealed_seq).await;
        let rows = head.rows;
        if result.is_err() {
            // Back into the head, to be sealed again (the log still holds them).
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            for stored in head.all() {
                writer.head.insert(stored.clone());
            }
        }
        *self.sealing.lock().unwrap_or_else(|e| e.into_inner()) = None;
        result?;
        self.seals.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for seq in wal::segments(&self.wal_dir()).map_err(io)? {
            if seq <= sealed_seq {
                std::fs::remove_file(wal::segment_path(&self.wal_dir(), seq)).map_err(io)?;
            }
        }
        Ok(rows)
    }

    async fn write_blocks(&self, head: &Arc<Head>, sealed_seq: u64) -> Result<(), StoreError> {
        let mut listed = Vec::new();
        for tenant in head.tenants.keys() {
            let (head, tenant_key) = (head.clone(), tenant.clone());
            let (dir, collector) = (self.dir.clone(), self.collector.clone());
            let block = tokio::task::spawn_blocking(move || {
                write_block(&dir, &collector, head.spans(&tenant_key).iter().collect())
            })
            .await
            .map_err(|error| io(std::io::Error::other(format!("sealing span blocks failed: {error}"))))?
            .map_err(StoreError::Blocks)?;
            self.upload(&block.location).await?;
            listed.push((tenant.clone(), block));
        }
        list(&self.pool, &listed, Listing::Sealed { collector: &self.collector, through: sealed_seq }).await
    }
}

/// Writes one tenant's spans as a block file under `<dir>/spans/`, named for the writer
/// `collector`, durably; returns its catalog row.
pub(super) fn write_block(dir: &Path, collector: &str, mut spans: Vec<&Stored>) -> Result<BlockRow, BlockError> {
    format::sort(&mut spans);
    let (dir, name) = (dir.join("spans"), format!("{collector}-{}.parquet", uuid::Uuid::now_v7()));
    let temporary = dir.join(format!("{name}.tmp"));
    let bytes = format::write(std::fs::File::create(&temporary)?, &spans)?;
    std::fs::rename(&temporary, dir.join(&name))?;
    std::fs::File::open(&dir)?.sync_all()?;
    let services: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.span.service_name.as_str()).collect();
    let min = |f: fn(&Stored) -> i64| spans.iter().map(|s| f(s)).min().unwrap_or(0);
    let max = |f: fn(&Stored) -> i64| spans.iter().map(|s| f(s)).max().unwrap_or(0);
    Ok(BlockRow {
        id: name.trim_end_matches(".parquet").to_string(),
        location: format!("spans/{name}"),
        min_start_ns: min(|s| s.span.start_ns),
        max_start_ns: max(|s| s.span.start_ns),
        min_received_ms: min(|s| s.received_ms),
        max_received_ms: max(|s| s.received_ms),
        rows: spans.len() as i64,
        bytes: bytes as i64,
        services: serde_json::to_string(&services).expect("strings serialize"),
    })
}
