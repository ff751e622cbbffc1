//! Merging a tenant's small blocks into bigger ones, in the background.
//!
//! A seal writes one block per tenant, so a tenant that sends few spans gets many small blocks
//! (one every [`super::SEAL_AGE`]), and a reader opens and reads each. A merge reads some of a
//! tenant's small blocks, keeps one span per identity (the first to arrive), and writes them as
//! one block; in one transaction it lists that block and retires the others. A retired block is
//! no longer listed to readers, and its file is removed [`RETIRED_GRACE`] later, so that a
//! reader that listed it just before still reads it. A crash before the transaction leaves an
//! unlisted file, which the writer removes when it opens again; after it, nothing is lost.
//!
//! Which blocks: size tiers by powers of [`FAN_IN`] rows. When a tenant has at least `FAN_IN`
//! blocks of one tier below [`super::SEAL_ROWS`] rows, the oldest of them (by start) are merged
//! into one block of at most `SEAL_ROWS` rows. A span is rewritten about once per tier it
//! climbs: log₄ of `SEAL_ROWS` over the size of the seals it came in. Blocks of `SEAL_ROWS` rows
//! or more are never merged. Several writers may merge the same catalog: the transaction retires
//! only blocks still listed, and the loser of a race removes its file.

use std::collections::HashSet;
use std::time::Duration;

use super::catalog::{Listing, list, now_ms};
use super::format::{BlockError, Filter, Stored};
use super::seal::write_block;
use super::{Bind, SEAL_ROWS, SpanBlocks, StoreError, io, key, rows};

/// Blocks of one tier merged at once (at least), and the ratio between tiers.
pub const FAN_IN: usize = 4;

/// How long a retired block's file stays, for readers that listed it before its merge.
pub const RETIRED_GRACE: Duration = Duration::from_secs(300);

/// A listed block a merge may take.
#[derive(Debug, Clone)]
struct Small {
    id: String,
    tenant: String,
    location: String,
    rows: i64,
}

/// A block's size tier: ⌊log₄ rows⌋.
fn tier(rows: i64) -> u32 {
    (63 - rows.max(1).leading_zeros()) / 2
}

/// The blocks to merge next, if any: `listed` is every small block, by tenant and start.
fn plan(listed: Vec<Small>) -> Option<Vec<Small>> {
    let mut tenants: Vec<Vec<Small>> = Vec::new();
    for small in listed {
        match tenants.last_mut() {
            Some(last) if last[0].tenant == small.tenant => last.push(small),
            _ => tenants.push(vec![small]),
        }
    }
    for blocks in tenants {
        let mut tiers: std::collections::BTreeMap<u32, Vec<Small>> = Default::default();
        for small in blocks {
            tiers.entry(tier(small.rows)).or_default().push(small);
        }
        for (_, same) in tiers {
            if same.len() < FAN_IN {
                continue;
            }
            let mut total = 0;
            let take: Vec<Small> = same
                .into_iter()
                .take_while(|b| {
                    total += b.rows;
                    total <= SEAL_ROWS as i64
                })
                .collect();
            if take.len() >= 2 {
                return Some(take);
            }
        }
    }
    None
}

impl SpanBlocks {
    /// Merges one group of a tenant's small blocks (see the module); returns how many blocks it
    /// merged (0: none is due, or another writer merged them first).
    pub async fn merge(&self) -> Result<usize, StoreError> {
        let text = "SELECT id, tenant, location, rows FROM span_blocks WHERE retired_ms IS NULL AND rows < ? \
                    ORDER BY tenant, min_start_ns, id";
        let listed = rows!(&self.pool, text, &[Bind::Int(SEAL_ROWS as i64)], |row| Small {
            id: row.try_get(0)?,
            tenant: row.try_get(1)?,
            location: row.try_get(2)?,
            rows: row.try_get(3)?,
        });
        let Some(group) = plan(listed) else { return Ok(0) };
        let tenant = group[0].tenant.clone();
        let mut spans: Vec<Stored> = Vec::new();
        for small in &group {
            let block = self.block(&small.location).await;
            match block.and_then(|block| super::blocking(|| block.read(&Filter::default()))) {
                Ok(found) => spans.extend(found.into_iter().filter(|s| s.span.tenant == tenant)),
                // Retired and removed by another writer's merge since it was listed.
                Err(BlockError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(error) => return Err(StoreError::Blocks(error)),
            }
        }
        // One span per identity: the first delivery.
        spans.sort_by_key(|s| s.received_ms);
        let mut seen = HashSet::new();
        spans.retain(|s| seen.insert(key(&s.span)));
        let (dir, collector) = (self.dir.clone(), self.collector.clone());
        let merged = tokio::task::spawn_blocking(move || write_block(&dir, &collector, spans.iter().collect()))
            .await
            .map_err(|error| io(std::io::Error::other(format!("merging span blocks failed: {error}"))))?
            .map_err(StoreError::Blocks)?;
        let location = merged.location.clone();
        let retired: Vec<String> = group.iter().map(|b| b.id.clone()).collect();
        let listed = match self.upload(&location).await {
            Ok(()) => list(&self.pool, &[(tenant, merged)], Listing::Merged { retired: &retired }).await,
            Err(error) => Err(error),
        };
        match listed {
            Ok(()) => Ok(group.len()),
            Err(error) => {
                let _ = self.remove(&location).await;
                match error {
                    StoreError::Conflict => Ok(0),
                    error => Err(error),
                }
            }
        }
    }

    /// Merges until no merge is due; returns how many blocks were merged.
    pub async fn merge_all(&self) -> Result<usize, StoreError> {
        let mut merged = 0;
        loop {
            match self.merge().await? {
                0 => return Ok(merged),
                n => merged += n,
            }
        }
    }

    /// Removes the files and catalog rows of blocks retired at least `grace` ago; returns how
    /// many. The file goes first: a row whose file is gone is removed by the next pass.
    pub async fn remove_retired(&self, grace: Duration) -> Result<usize, StoreError> {
        let before = now_ms() - grace.as_millis() as i64;
        let text = "SELECT id, location FROM span_blocks WHERE retired_ms IS NOT NULL AND retired_ms <= ?";
        let retired = rows!(&self.pool, text, &[Bind::Int(before)], |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?
        ));
        for (id, location) in &retired {
            self.remove(location).await?;
            rows!(&self.pool, "DELETE FROM span_blocks WHERE id = ?", &[Bind::Str(id)], |_row| ());
        }
        Ok(retired.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(tenant: &str, rows: i64) -> Small {
        Small { id: format!("{tenant}{rows}"), tenant: tenant.into(), location: String::new(), rows }
    }

    #[test]
    fn merges_take_four_blocks_of_one_tier_and_never_grow_past_a_seal() {
        assert_eq!((tier(1), tier(3), tier(4), tier(15), tier(16), tier(262_143)), (0, 0, 1, 1, 2, 8));
        // Three of a tier: nothing yet.
        assert!(plan(vec![small("a", 100), small("a", 101), small("a", 102), small("b", 5000)]).is_none());
        // The fourth: all four, of that tenant only, a big block left out.
        let four = plan(vec![
            small("a", 5),
            small("b", 100),
            small("b", 200_000),
            small("b", 101),
            small("b", 102),
            small("b", 103),
        ]);
        let ids: Vec<String> = four.unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, ["b100", "b101", "b102", "b103"]);
        // Blocks so big that no two fit in a seal's size are final.
        assert!(plan(vec![small("a", 140_000); 6]).is_none());
        let three = plan(vec![small("a", 80_000); 6]).unwrap();
        assert_eq!(three.len(), 3);
    }
}
