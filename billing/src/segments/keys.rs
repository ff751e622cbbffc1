//! The usage-id hashes that de-duplicate records: a segment's sorted `keys` column, and each
//! tenant's index of every hash in its segments, in memory ([`KeyCache`]).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::format::{Stored, corrupt};
use crate::Result;

/// The hash of a usage id in a segment's keys (FNV-1a, then SplitMix64's finalizer so that the
/// hashes spread evenly over 64 bits, for [`contains`]). Stored: it never changes.
pub fn key_hash(usage_id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for byte in usage_id.bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The keys column of `records`: their hashes, sorted, little-endian.
pub fn keys_of(records: &[Stored<'_>]) -> (Vec<u64>, Vec<u8>) {
    let mut hashes: Vec<u64> = records.iter().map(|r| key_hash(r.usage_id)).collect();
    hashes.sort_unstable();
    let bytes = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    (hashes, bytes)
}

pub(super) fn hashes_of(bytes: &[u8]) -> Result<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(corrupt("its keys are not whole 64-bit hashes"));
    }
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Whether the sorted hashes hold `h`: interpolation search (hashes are spread evenly, so a
/// few probes), then binary search if that has not converged.
pub fn contains(sorted: &[u64], h: u64) -> bool {
    let (mut lo, mut hi) = (0, sorted.len());
    for _ in 0..8 {
        if lo >= hi {
            return false;
        }
        let (a, b) = (sorted[lo], sorted[hi - 1]);
        if h < a || h > b {
            return false;
        }
        if a == b {
            return true;
        }
        let offset = (u128::from(h - a) * (hi - 1 - lo) as u128 / u128::from(b - a)) as usize;
        let probe = lo + offset;
        match sorted[probe].cmp(&h) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => lo = probe + 1,
            std::cmp::Ordering::Greater => hi = probe,
        }
    }
    sorted[lo.min(hi)..hi].binary_search(&h).is_ok()
}

/// The usage-id hashes of each tenant's segments, for de-duplication: one lookup per record
/// however many segments a tenant has. Built from the segments' keys the first time a tenant
/// is billed in this process, then kept up to date with the segments written (by this process
/// or another: the segments it covers are checked against the catalog on every chunk).
#[derive(Default)]
pub struct KeyCache(pub(super) Mutex<HashMap<String, TenantKeys>>);

#[derive(Default)]
pub(super) struct TenantKeys {
    /// The segments whose hashes are in: segments never change and ids are never reused.
    pub(super) covered: HashSet<i64>,
    /// Sorted hashes, and those added since (merged in when they are an eighth as many: a
    /// linear merge, about nine moves per hash over a tenant's life).
    sorted: Vec<u64>,
    recent: HashSet<u64>,
}

impl TenantKeys {
    pub(super) fn contains(&self, h: u64) -> bool {
        self.recent.contains(&h) || contains(&self.sorted, h)
    }

    pub(super) fn add(&mut self, hashes: &[u64]) {
        self.recent.extend(hashes);
        if self.recent.len() > 4096 && self.recent.len() * 8 > self.sorted.len() {
            let mut recent: Vec<u64> = self.recent.drain().collect();
            recent.sort_unstable();
            let old = std::mem::take(&mut self.sorted);
            self.sorted.reserve(old.len() + recent.len());
            let (mut i, mut j) = (0, 0);
            while i < old.len() || j < recent.len() {
                let next = match (old.get(i), recent.get(j)) {
                    (Some(a), Some(b)) if a <= b => {
                        i += 1;
                        *a
                    }
                    (_, Some(b)) => {
                        j += 1;
                        *b
                    }
                    (Some(a), None) => {
                        i += 1;
                        *a
                    }
                    (None, None) => unreachable!(),
                };
                if self.sorted.last() != Some(&next) {
                    self.sorted.push(next);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_find_every_member_and_few_others() {
        let ids: Vec<String> = (0..50_000).map(|i| format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}")).collect();
        let mut hashes: Vec<u64> = ids.iter().map(|id| key_hash(id)).collect();
        hashes.sort_unstable();
        assert!(ids.iter().all(|id| contains(&hashes, key_hash(id))));
        let strangers =
            (50_000..100_000).filter(|i| contains(&hashes, key_hash(&format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}"))));
        assert_eq!(strangers.count(), 0);
        // Uneven arrays: duplicates, extremes, one element, none.
        let odd = [0, 0, 5, 5, 5, 9, u64::MAX];
        for h in [0, 5, 9, u64::MAX] {
            assert!(contains(&odd, h));
        }
        for h in [1, 6, 10, u64::MAX - 1] {
            assert!(!contains(&odd, h));
        }
        assert!(contains(&[7], 7) && !contains(&[7], 8) && !contains(&[], 7));
    }
}
