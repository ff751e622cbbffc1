//! The tokens the core accepts, published in the telemetry database for collectors and
//! dashboards that run where the core's own database is not (other hosts). Only SHA-256
//! hashes are stored, as the core stores them; the core replaces the whole set whenever its
//! tokens change, and readers re-read it.

use std::collections::BTreeSet;

use super::{Pool, StoreError, TelemetryStore};

/// One accepted token: its hash, its tenant (none for the admin and meter tokens) and scope
/// (`admin`, `meter`, `ingest` or `read`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedToken {
    pub hash: String,
    pub tenant: Option<String>,
    pub scope: String,
}

impl TelemetryStore {
    /// Makes `tokens` the published set: rows not in it go, new ones are added, in one
    /// transaction (readers see the old set or the new one). Returns whether anything changed.
    pub async fn publish_tokens(&self, tokens: &[PublishedToken]) -> Result<bool, StoreError> {
        let wanted: BTreeSet<&PublishedToken> = tokens.iter().collect();
        let delete = || self.sql("DELETE FROM published_tokens WHERE hash = ?");
        let insert = || self.sql("INSERT INTO published_tokens (hash, tenant, scope) VALUES (?, ?, ?)");
        macro_rules! publish {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                let rows: Vec<(String, Option<String>, String)> =
                    sqlx::query_as("SELECT hash, tenant, scope FROM published_tokens").fetch_all(&mut *tx).await?;
                let stored: BTreeSet<PublishedToken> =
                    rows.into_iter().map(|(hash, tenant, scope)| PublishedToken { hash, tenant, scope }).collect();
                let mut changed = false;
                for gone in stored.iter().filter(|t| !wanted.contains(t)) {
                    sqlx::query(delete()).bind(&gone.hash).execute(&mut *tx).await?;
                    changed = true;
                }
                for new in wanted.iter().filter(|t| !stored.contains(*t)) {
                    sqlx::query(insert()).bind(&new.hash).bind(&new.tenant).bind(&new.scope).execute(&mut *tx).await?;
                    changed = true;
                }
                tx.commit().await?;
                changed
            }};
        }
        Ok(match &self.pool {
            Pool::Sqlite(pool) => publish!(pool),
            Pool::Postgres(pool) => publish!(pool),
        })
    }

    /// The published tokens.
    pub async fn published_tokens(&self) -> Result<Vec<PublishedToken>, StoreError> {
        let sql = "SELECT hash, tenant, scope FROM published_tokens ORDER BY hash";
        let rows: Vec<(String, Option<String>, String)> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
            Pool::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
        };
        Ok(rows.into_iter().map(|(hash, tenant, scope)| PublishedToken { hash, tenant, scope }).collect())
    }
}
