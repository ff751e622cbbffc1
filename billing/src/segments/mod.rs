//! Usage records as immutable segments: the billing engine's storage of records.
//!
//! A segment holds the records of one tenant's invoice (tenant, billed period) that one
//! extraction chunk wrote, or that one merge joined, sorted in billing's order (start, then
//! usage id). It is one row of `usage_segments`: a catalog (tenant, billed period, level,
//! count, start and arrival ranges), the sorted 64-bit hashes of its usage ids (`keys`), and the
//! records themselves (`data`, in the format of `format.rs`). A chunk's segments, its running
//! totals and billing's watermark commit in one transaction, so a crash loses nothing
//! acknowledged and bills nothing twice.
//!
//! - **De-duplication** by (tenant, usage id), across every segment: a new record's hash is
//!   looked up in its tenant's index of every hash in its segments ([`KeyCache`], in memory,
//!   built from the segments' keys and kept up to date with them: a segment never changes,
//!   and ids are never reused); a hit is verified against the tenant's records, so a hash
//!   collision never drops a record.
//! - **Merges.** Segments are levelled by size ([`level`]); when an invoice has [`FANOUT`]
//!   segments of one level, they become one segment (of the next level, by its size), by
//!   [`merge_levels`] after billing runs, a transaction per merge, out of extraction's way;
//!   level [`TOP_LEVEL`] and above are never merged, since a merge holds its records in
//!   memory. Between runs an invoice keeps fewer than `FANOUT` segments per merged level, so
//!   a reader reads few rows. De-duplication does not depend on the number of segments.
//! - **Reading.** Readers list the catalog, keep the segments their scope, start range or
//!   arrival range needs, and decode them one at a time ([`each`]), borrowing the strings from
//!   the segment's bytes; the list and the segments are read in one snapshot, with the
//!   watermark.
//!
//! The parts: the segment format (`format.rs`), the usage-id hashes and their cache
//! (`keys.rs`), the statements on `usage_segments` and the snapshot reads (`sql.rs`), and the
//! merges (`merge.rs`); storing new records, here, is written once over them.

mod format;
mod keys;
mod merge;
mod sql;

pub use format::{Stored, each, encode};
pub use keys::{KeyCache, contains, key_hash, keys_of};
pub use merge::{TOP_LEVEL, merge_levels};
pub use sql::{Listed, Snapshot, convert_rows, scan};

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::Result;
use crate::usage::{Totals, TotalsKey};
use keys::{TenantKeys, hashes_of};
use sql::Conn;

/// Segments of one level of one invoice are merged into one when there are this many.
pub const FANOUT: usize = 8;
/// The largest segment of level 0, in records; each level holds up to [`FANOUT`] times more.
const LEVEL_0: usize = 1024;

/// A segment's level by its size: 0 up to [`LEVEL_0`] records, then one more per factor of
/// [`FANOUT`].
pub fn level(records: usize) -> i64 {
    let (mut level, mut cap) = (0, LEVEL_0);
    while records > cap {
        cap = cap.saturating_mul(FANOUT);
        level += 1;
    }
    level
}

/// A new record: its tenant and billed period, and the record.
pub type New<'a> = (&'a str, &'a str, Stored<'a>);

/// The sums of the records that were `new`, by totals key, with how many were new and how many
/// of them late (billed on a later invoice than their period's).
pub fn sum_new(records: &[New<'_>], new: &[bool]) -> Result<(HashMap<TotalsKey, Totals>, u64, u64)> {
    // Summed under borrowed keys; one owned key per group.
    let mut sums: HashMap<[&str; 5], Totals> = HashMap::new();
    let (mut count, mut late) = (0, 0);
    for ((tenant, billed_period, r), _) in records.iter().zip(new).filter(|(_, new)| **new) {
        sums.entry([tenant, billed_period, r.period, r.plan, r.function]).or_default().add(&r.totals()?);
        count += 1;
        late += u64::from(r.period != *billed_period);
    }
    let totals = sums
        .into_iter()
        .map(|([tenant, billed_period, period, plan, function], totals)| {
            let key = TotalsKey {
                tenant: tenant.into(),
                billed_period: billed_period.into(),
                period: period.into(),
                plan: plan.into(),
                function: function.into(),
            };
            (key, totals)
        })
        .collect();
    Ok((totals, count, late))
}

/// Stores the records that are new by (tenant, usage id) — `records` hold each key once — as
/// one segment per invoice, then merges full levels; inside the caller's transaction. Returns
/// which records were new.
pub(crate) async fn store(conn: &mut impl Conn, cache: &KeyCache, records: &[New<'_>]) -> Result<Vec<bool>> {
    let tenants: Vec<&str> =
        records.iter().map(|r| r.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
    for (id, tenant, ..) in conn.segments_of(&tenants).await? {
        ids.entry(tenant).or_default().push(id);
    }
    // Each tenant's index brought up to its segments (taken out of the cache meanwhile: the
    // run lock makes this the only writer).
    let mut index: HashMap<&str, TenantKeys> = HashMap::new();
    for tenant in &tenants {
        let mut keys = cache.0.lock().expect("key cache").remove(*tenant).unwrap_or_default();
        let listed = ids.remove(*tenant).unwrap_or_default();
        keys.covered.retain(|id| listed.contains(id));
        for id in listed {
            if !keys.covered.contains(&id) {
                keys.add(&hashes_of(&conn.keys(id).await?)?);
                keys.covered.insert(id);
            }
        }
        index.insert(tenant, keys);
    }
    let mut new = Vec::with_capacity(records.len());
    let mut verified: HashMap<&str, HashSet<String>> = HashMap::new();
    for (tenant, _, record) in records {
        let seen = index[tenant].contains(key_hash(record.usage_id))
            && verified_in(conn, &mut verified, tenant, record.usage_id).await?;
        new.push(!seen);
    }
    let mut invoices: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, (tenant, billed_period, _)) in records.iter().enumerate().filter(|(i, _)| new[*i]) {
        invoices.entry((tenant, billed_period)).or_default().push(i);
    }
    for ((tenant, billed_period), indexes) in invoices {
        let mut records: Vec<Stored> = indexes.into_iter().map(|i| records[i].2).collect();
        records.sort_unstable_by(|a, b| a.order().cmp(&b.order()));
        let (id, hashes) = conn.insert(tenant, billed_period, &records).await?;
        let keys = index.get_mut(tenant).expect("indexed");
        keys.add(&hashes);
        keys.covered.insert(id);
    }
    let mut cache = cache.0.lock().expect("key cache");
    for (tenant, keys) in index {
        cache.insert(tenant.to_string(), keys);
    }
    Ok(new)
}

/// Whether a tenant's segments hold a record of `usage_id` (its hash was found: a duplicate,
/// or rarely a collision). The tenant's usage ids are read once per chunk, when the first of
/// its hashes is found.
async fn verified_in<'a>(
    conn: &mut impl Conn,
    verified: &mut HashMap<&'a str, HashSet<String>>,
    tenant: &'a str,
    usage_id: &str,
) -> Result<bool> {
    if !verified.contains_key(tenant) {
        let mut ids = HashSet::new();
        for id in conn.segments_of(&[tenant]).await?.into_iter().map(|(id, ..)| id) {
            each(&conn.data(id).await?, |r| {
                ids.insert(r.usage_id.to_string());
                Ok(())
            })?;
        }
        verified.insert(tenant, ids);
    }
    Ok(verified[tenant].contains(usage_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_grow_by_the_fanout() {
        assert_eq!([level(0), level(1024), level(1025), level(8192), level(8193)], [0, 0, 1, 1, 2]);
    }
}
