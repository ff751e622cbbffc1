//! Merges of an invoice's full levels of segments into one segment of the next level.

use super::FANOUT;
use super::format::each;
use super::keys::KeyCache;
use super::sql::Conn;
use crate::Result;
use crate::db::{Db, on_pool};

/// Segments of this level and above are never merged: a merge holds its records in memory
/// (level 3 is up to 524 288 records).
pub const TOP_LEVEL: i64 = 3;

/// Merges every full level below [`TOP_LEVEL`] (of an invoice that has [`FANOUT`] segments of
/// it), each merge in a transaction of its own, until none is full; returns how many segments
/// were merged away. This runs after billing runs, out of extraction's way.
pub async fn merge_levels(db: &Db, cache: &KeyCache) -> Result<u64> {
    let mut merged = 0;
    loop {
        let full = on_pool!(db, pool => pool.acquire().await?.full_levels(0..TOP_LEVEL).await?);
        if full.is_empty() {
            return Ok(merged);
        }
        for (tenant, billed_period, level) in full {
            on_pool!(db, pool => {
                let mut tx = match db {
                    Db::Sqlite(_) => pool.begin_with("BEGIN IMMEDIATE").await?,
                    Db::Postgres(_) => {
                        let mut tx = pool.begin().await?;
                        sqlx::query("SELECT pg_advisory_xact_lock(7305011)").execute(&mut *tx).await?;
                        tx
                    }
                };
                let (ids, into) = merge(&mut *tx, &tenant, &billed_period, level).await?;
                tx.commit().await?;
                merged += ids.len() as u64;
                // The merged segment holds the hashes of those it replaced.
                if let (Some(into), Some(keys)) = (into, cache.0.lock().expect("key cache").get_mut(&tenant))
                    && ids.iter().all(|id| keys.covered.contains(id))
                {
                    keys.covered.retain(|id| !ids.contains(id));
                    keys.covered.insert(into);
                }
            });
        }
    }
}

/// Merges the oldest [`FANOUT`] of an invoice's segments of one level into one, if it has that
/// many; returns the ids merged away and the new segment's.
async fn merge(conn: &mut impl Conn, tenant: &str, billed_period: &str, level: i64) -> Result<(Vec<i64>, Option<i64>)> {
    let mut ids = conn.level_ids(tenant, billed_period, level).await?;
    if ids.len() < FANOUT {
        return Ok((Vec::new(), None));
    }
    // The oldest FANOUT: a merge's records are in memory at once.
    ids.truncate(FANOUT);
    let mut blobs = Vec::with_capacity(ids.len());
    for id in &ids {
        blobs.push(conn.data(*id).await?);
    }
    let mut records = Vec::new();
    for blob in &blobs {
        each(blob, |r| {
            records.push(r);
            Ok(())
        })?;
    }
    records.sort_unstable_by(|a, b| a.order().cmp(&b.order()));
    let (id, _) = conn.insert(tenant, billed_period, &records).await?;
    for old in &ids {
        conn.delete(*old).await?;
    }
    Ok((ids, Some(id)))
}
