//! Tenants (namespaces), tokens and their scopes (docs/contracts.md, "Tenants, tokens and trust").

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use contract::tenant::{MAX_NAME_LEN, NameError, TenantId, validate_name};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The operator: everything, every tenant.
    Admin,
    /// A tenant's write credential: send its telemetry, deploy and invoke its functions.
    Ingest,
    /// A tenant's read credential: list its functions, query its data and bills.
    Read,
    /// The platform itself: may send telemetry for any tenant; only its data is billed.
    Meter,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Meter => "meter",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "admin" => Some(Scope::Admin),
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            "meter" => Some(Scope::Meter),
            _ => None,
        }
    }
}

/// Who presented a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Meter,
    Tenant {
        tenant: TenantId,
        scope: Scope,
    },
    /// A running function: may use its tenant's state store, for its job and the tenant's
    /// job-less objects, while the invocation lasts.
    Function {
        tenant: TenantId,
        job: Option<String>,
    },
}

/// A fresh random 256-bit token, hex encoded.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The stored form of a token: tokens are never kept in clear.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Credentials of a new tenant, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantCredentials {
    pub tenant: String,
    pub ingest_token: String,
    pub read_token: String,
}

/// A tenant as listed by the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantInfo {
    pub name: String,
    pub plan: Option<String>,
    pub created_ms: i64,
}

/// Why a tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("tenant {0} already exists")]
    Exists(String),
    #[error("tenant store: {0}")]
    Database(#[from] sqlx::Error),
}

/// Tenants and their tokens: persisted in the database, with token hashes cached in memory so
/// that authenticating a request costs one hash and one map lookup.
pub struct TenantStore {
    pool: sqlx::SqlitePool,
    admin_hash: String,
    tokens: std::sync::RwLock<std::collections::HashMap<String, Principal>>,
    /// Tokens of running invocations: in memory only, revoked when the invocation ends.
    function_tokens: std::sync::RwLock<std::collections::HashMap<String, Principal>>,
    /// Counts revocations, so that a long-lived session (the state store's Redis protocol)
    /// checks its token again only when one happened.
    revocations: std::sync::atomic::AtomicU64,
    /// Notified when a stored token is added (so that it is published at once).
    changed: tokio::sync::Notify,
}

/// A running invocation's token; revoked on drop.
pub struct FunctionToken {
    pub token: String,
    hash: String,
    store: std::sync::Arc<TenantStore>,
}

impl Drop for FunctionToken {
    fn drop(&mut self) {
        self.store.function_tokens.write().unwrap().remove(&self.hash);
        self.store.revocations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TenantStore {
    /// Loads the token hashes; `admin_token` is the operator's token.
    pub async fn load(pool: sqlx::SqlitePool, admin_token: &str) -> Result<Self, TenantError> {
        let tokens = read_tokens(&pool).await?;
        Ok(Self {
            pool,
            admin_hash: hash_token(admin_token),
            tokens: std::sync::RwLock::new(tokens),
            function_tokens: Default::default(),
            revocations: Default::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Who a presented token belongs to, if anyone.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        self.authenticate_hash(&hash_token(token))
    }

    /// Who the token of this hash ([`hash_token`]) belongs to, if it is still valid.
    pub fn authenticate_hash(&self, hash: &str) -> Option<Principal> {
        if hash == self.admin_hash {
            return Some(Principal::Admin);
        }
        if let Some(principal) = self.tokens.read().unwrap().get(hash) {
            return Some(principal.clone());
        }
        self.function_tokens.read().unwrap().get(hash).cloned()
    }

    /// How many tokens were revoked so far: a session that authenticated earlier checks its
    /// token again ([`TenantStore::authenticate_hash`]) when this changed.
    pub fn revocations(&self) -> u64 {
        self.revocations.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A token for one running invocation, valid until the returned guard is dropped.
    pub fn issue_function_token(self: &std::sync::Arc<Self>, tenant: &TenantId, job: Option<&str>) -> FunctionToken {
        let token = generate_token();
        let hash = hash_token(&token);
        let principal = Principal::Function { tenant: tenant.clone(), job: job.map(str::to_string) };
        self.function_tokens.write().unwrap().insert(hash.clone(), principal);
        FunctionToken { token, hash, store: self.clone() }
    }

    /// Creates a tenant with fresh ingest and read tokens.
    pub async fn create(&self, name: &str, plan: Option<&str>) -> Result<TenantCredentials, TenantError> {
        let tenant = TenantId::new(name)?;
        let ingest_token = generate_token();
        let read_token = generate_token();
        let now = crate::database::now_ms();
        let mut tx = self.pool.begin().await?;
        let inserted =
            sqlx::query("INSERT INTO tenants (name, plan, created_ms) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
                .bind(tenant.as_str())
                .bind(plan)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        if inserted.rows_affected() == 0 {
            return Err(TenantError::Exists(name.to_string()));
        }
        for (token, scope) in [(&ingest_token, Scope::Ingest), (&read_token, Scope::Read)] {
            sqlx::query("INSERT INTO tokens (hash, tenant, scope, created_ms) VALUES (?, ?, ?, ?)")
                .bind(hash_token(token))
                .bind(tenant.as_str())
                .bind(scope.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut tokens = self.tokens.write().unwrap();
        tokens.insert(hash_token(&ingest_token), Principal::Tenant { tenant: tenant.clone(), scope: Scope::Ingest });
        tokens.insert(hash_token(&read_token), Principal::Tenant { tenant: tenant.clone(), scope: Scope::Read });
        self.changed.notify_one();
        Ok(TenantCredentials { tenant: tenant.to_string(), ingest_token, read_token })
    }

    /// Makes sure a given token is a valid `meter` token (for a token kept in a file).
    pub async fn ensure_meter_token(&self, token: &str) -> Result<(), TenantError> {
        let hash = hash_token(token);
        sqlx::query(
            "INSERT INTO tokens (hash, tenant, scope, created_ms) VALUES (?, NULL, 'meter', ?) ON CONFLICT DO NOTHING",
        )
        .bind(&hash)
        .bind(crate::database::now_ms())
        .execute(&self.pool)
        .await?;
        self.tokens.write().unwrap().insert(hash, Principal::Meter);
        self.changed.notify_one();
        Ok(())
    }

    /// Every token this store accepts but the function tokens (which live and die in its
    /// process), as (hash, tenant, scope) rows: what collectors and dashboards elsewhere
    /// need to check the same tokens.
    pub async fn accepted(&self) -> Result<Vec<(String, Option<String>, String)>, TenantError> {
        let mut rows: Vec<(String, Option<String>, String)> =
            sqlx::query_as("SELECT hash, tenant, scope FROM tokens").fetch_all(&self.pool).await?;
        rows.retain(|(_, tenant, scope)| principal(tenant.as_deref(), scope).is_some());
        rows.push((self.admin_hash.clone(), None, Scope::Admin.as_str().to_string()));
        Ok(rows)
    }

    /// Waits until a token is added (or was, since the last call).
    pub async fn token_added(&self) {
        self.changed.notified().await;
    }

    /// All tenants, by name.
    pub async fn list(&self) -> Result<Vec<TenantInfo>, TenantError> {
        let rows: Vec<(String, Option<String>, i64)> =
            sqlx::query_as("SELECT name, plan, created_ms FROM tenants ORDER BY name").fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|(name, plan, created_ms)| TenantInfo { name, plan, created_ms }).collect())
    }

    /// Whether a tenant exists.
    pub async fn exists(&self, tenant: &TenantId) -> Result<bool, TenantError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM tenants WHERE name = ?")
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }
}

/// Every stored token's hash and principal.
async fn read_tokens(pool: &sqlx::SqlitePool) -> Result<std::collections::HashMap<String, Principal>, TenantError> {
    let rows: Vec<(String, Option<String>, String)> =
        sqlx::query_as("SELECT hash, tenant, scope FROM tokens").fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(hash, tenant, scope)| Some((hash, principal(tenant.as_deref(), &scope)?)))
        .collect())
}

/// Who a token of `scope` (and `tenant`) stands for, as stored or published; `None` for a
/// combination the core never writes.
pub fn principal(tenant: Option<&str>, scope: &str) -> Option<Principal> {
    match (Scope::parse(scope)?, tenant) {
        (Scope::Admin, None) => Some(Principal::Admin),
        (Scope::Meter, None) => Some(Principal::Meter),
        (scope @ (Scope::Ingest | Scope::Read), Some(tenant)) => {
            Some(Principal::Tenant { tenant: TenantId::new(tenant).ok()?, scope })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let first = generate_token();
        let second = generate_token();
        assert_eq!(first.len(), 64);
        assert_ne!(first, second);
        assert_eq!(hash_token(&first), hash_token(&first));
        assert_ne!(hash_token(&first), first);
    }
}
