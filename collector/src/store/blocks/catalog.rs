//! The catalog of blocks in the SQL database: `span_blocks` (a row per block: its tenant, file,
//! time and arrival ranges, and when a merge retired it) and `span_wal_seals` (each writer's
//! last sealed log segment).

use sqlx::AssertSqlSafe;

use super::format::Filter;
use super::{Bind, Pool, StoreError, rows};

/// One listed block.
#[derive(Debug, Clone)]
pub(super) struct Listed {
    pub(super) tenant: String,
    pub(super) location: String,
    pub(super) max_start_ns: i64,
}

/// A block's catalog row.
pub(super) struct BlockRow {
    pub(super) id: String,
    pub(super) location: String,
    pub(super) min_start_ns: i64,
    pub(super) max_start_ns: i64,
    pub(super) min_received_ms: i64,
    pub(super) max_received_ms: i64,
    pub(super) rows: i64,
    pub(super) bytes: i64,
    pub(super) services: String,
}

pub(super) async fn sealed_through(pool: &Pool, collector: &str) -> Result<u64, StoreError> {
    let text = "SELECT sealed_through FROM span_wal_seals WHERE collector = ?";
    let found = rows!(pool, text, &[Bind::Str(collector)], |row| row.try_get::<i64, _>(0)?);
    Ok(found.first().copied().unwrap_or(0).max(0) as u64)
}

pub(super) async fn locations(pool: &Pool) -> Result<Vec<String>, StoreError> {
    Ok(rows!(pool, "SELECT location FROM span_blocks", &[], |row| row.try_get::<String, _>(0)?))
}

/// The blocks of `tenant` (or of every tenant) that may hold spans passing `filter`, by their
/// time and arrival ranges.
pub(super) async fn blocks_of(
    pool: &Pool,
    tenant: Option<&str>,
    filter: &Filter<'_>,
) -> Result<Vec<Listed>, StoreError> {
    let (lo, hi) = filter.start_ns.unwrap_or((i64::MIN, i64::MAX));
    let (after, upto) = filter.received_ms.unwrap_or((i64::MIN, i64::MAX));
    let text = format!(
        "SELECT tenant, location, max_start_ns FROM span_blocks WHERE retired_ms IS NULL AND {} max_start_ns >= ? AND min_start_ns <= ? \
         AND max_received_ms > ? AND min_received_ms <= ? ORDER BY min_start_ns",
        if tenant.is_some() { "tenant = ? AND" } else { "" }
    );
    let mut binds: Vec<Bind<'_>> = tenant.map(Bind::Str).into_iter().collect();
    binds.extend([Bind::Int(lo), Bind::Int(hi), Bind::Int(after), Bind::Int(upto)]);
    Ok(rows!(pool, &text, &binds, |row| Listed {
        tenant: row.try_get(0)?,
        location: row.try_get(1)?,
        max_start_ns: row.try_get(2)?,
    }))
}

/// What listed blocks replace.
pub(super) enum Listing<'a> {
    /// A writer's log, through this segment.
    Sealed { collector: &'a str, through: u64 },
    /// These blocks (by id), which must all be listed still: a merge.
    Merged { retired: &'a [String] },
}

/// Now, in ms since the epoch.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Lists blocks (per tenant) and records what they replace, in one transaction; a merge whose
/// blocks another merge retired first lists nothing ([`StoreError::Conflict`]).
pub(super) async fn list(pool: &Pool, blocks: &[(String, BlockRow)], replaces: Listing<'_>) -> Result<(), StoreError> {
    let insert = pool.sql(
        "INSERT INTO span_blocks (id, tenant, location, min_start_ns, max_start_ns, min_received_ms, \
         max_received_ms, rows, bytes, services, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    );
    let seal = pool.sql(
        "INSERT INTO span_wal_seals (collector, sealed_through) VALUES (?, ?) \
         ON CONFLICT (collector) DO UPDATE SET sealed_through = excluded.sealed_through",
    );
    let retire = match replaces {
        Listing::Merged { retired } => pool.sql(&format!(
            "UPDATE span_blocks SET retired_ms = ? WHERE retired_ms IS NULL AND id IN ({})",
            vec!["?"; retired.len()].join(", ")
        )),
        Listing::Sealed { .. } => pool.sql(""),
    };
    let now_ms = now_ms();
    macro_rules! run {
        ($p:expr) => {{
            let mut tx = $p.begin().await?;
            for (tenant, b) in blocks {
                sqlx::query(AssertSqlSafe(insert.0.clone()))
                    .bind(&b.id)
                    .bind(tenant)
                    .bind(&b.location)
                    .bind(b.min_start_ns)
                    .bind(b.max_start_ns)
                    .bind(b.min_received_ms)
                    .bind(b.max_received_ms)
                    .bind(b.rows)
                    .bind(b.bytes)
                    .bind(&b.services)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            match replaces {
                Listing::Sealed { collector, through } => {
                    sqlx::query(AssertSqlSafe(seal.0.clone()))
                        .bind(collector)
                        .bind(through as i64)
                        .execute(&mut *tx)
                        .await?;
                }
                Listing::Merged { retired } => {
                    let mut query = sqlx::query(AssertSqlSafe(retire.0.clone())).bind(now_ms);
                    for id in retired {
                        query = query.bind(id);
                    }
                    if query.execute(&mut *tx).await?.rows_affected() != retired.len() as u64 {
                        tx.rollback().await?;
                        return Err(StoreError::Conflict);
                    }
                }
            }
            tx.commit().await?;
        }};
    }
    match pool {
        Pool::Sqlite(p) => run!(p),
        Pool::Postgres(p) => run!(p),
    }
    Ok(())
}
