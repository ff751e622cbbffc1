//! The durable queue behind `/async-function/*`.
//!
//! A call is acknowledged (202) only after its row is committed, so a crash loses nothing
//! accepted. Delivery is at-least-once: a call that was running when the process stopped runs
//! again at the next start. Calls are de-duplicated by `(tenant, X-Call-Id)`. A 429 or 5xx
//! answer is retried with exponential backoff; after `max_attempts` the call is dead-lettered
//! and listed by `GET /system/async-dead-letters`. Workers serve tenants fairly: the next call
//! is the oldest due one of the tenant with the fewest calls in flight (then the one served
//! longest ago), and no tenant has more than half the workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::SqlitePool;
use tokio::sync::{Notify, watch};

use crate::config::AsyncQueueConfig;
use crate::database::now_ms;
use crate::function::outbound::Outbound;
use crate::function::{Invocation, Outcome};
use crate::invoker::Invoker;
use crate::semconv;
use crate::tenant::TenantId;

/// How often idle workers look for calls whose backoff has passed.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Finished calls (their state, for `GET /async-function/...` and dead letters, and their id,
/// which de-duplicates a call sent again) are kept this long after they finish, and at most
/// [`FINISHED_PER_TENANT`] of a tenant's, newest first; what a finished call held of its
/// request (body, headers, query) is dropped when it finishes.
pub const FINISHED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const FINISHED_PER_TENANT: i64 = 100_000;
/// How often a worker deletes finished calls past the retention.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// One queued call, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AsyncCall {
    pub tenant: String,
    pub call_id: String,
    pub function: String,
    pub state: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub callback_url: Option<String>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

impl<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> for AsyncCall {
    fn from_row(row: &'r sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            tenant: row.try_get("tenant")?,
            call_id: row.try_get("call_id")?,
            function: row.try_get("function")?,
            state: row.try_get("state")?,
            attempts: row.try_get("attempts")?,
            last_status: row.try_get("last_status")?,
            last_error: row.try_get("last_error")?,
            callback_url: row.try_get("callback_url")?,
            created_ms: row.try_get("created_ms")?,
            finished_ms: row.try_get("finished_ms")?,
        })
    }
}

/// The columns of [`AsyncCall`], then the rest of the query.
macro_rules! select_calls {
    ($rest:literal) => {
        concat!(
            "SELECT tenant, call_id, function, state, attempts, last_status, last_error, callback_url, ",
            "created_ms, finished_ms FROM async_calls ",
            $rest
        )
    };
}

struct Claimed {
    tenant: String,
    call_id: String,
    function: String,
    method: String,
    path: String,
    query: String,
    headers: String,
    body: Vec<u8>,
    callback_url: Option<String>,
    traceparent: Option<String>,
    attempts: i64,
}

impl<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> for Claimed {
    fn from_row(row: &'r sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            tenant: row.try_get("tenant")?,
            call_id: row.try_get("call_id")?,
            function: row.try_get("function")?,
            method: row.try_get("method")?,
            path: row.try_get("path")?,
            query: row.try_get("query")?,
            headers: row.try_get("headers")?,
            body: row.try_get("body")?,
            callback_url: row.try_get("callback_url")?,
            traceparent: row.try_get("traceparent")?,
            attempts: row.try_get("attempts")?,
        })
    }
}

/// Why a call was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Quota(String),
}

/// The queue's state in the database, and the bell that wakes its workers.
pub struct AsyncQueue {
    pool: SqlitePool,
    config: AsyncQueueConfig,
    quotas: Arc<crate::quota::Quotas>,
    bell: Notify,
    /// Per tenant: calls being delivered now, and when it was last served (a counter).
    tenants: std::sync::Mutex<HashMap<String, (usize, u64)>>,
    served: std::sync::atomic::AtomicU64,
    /// Per tenant: callbacks being posted now (see [`CALLBACKS_PER_TENANT`]).
    callbacks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// Callbacks one tenant's calls may have being posted at once. They are posted beside the
/// workers (a callback URL that never answers takes up to half a minute), and past this many a
/// call's callback is not sent (its result stays at `/system/async-calls/ID`), so that neither
/// the workers nor memory (each holds its call's output) go to one tenant's slow receivers.
pub const CALLBACKS_PER_TENANT: usize = 16;

impl AsyncQueue {
    /// Opens the queue, re-queuing calls that were running when the process last stopped.
    pub async fn open(
        pool: SqlitePool,
        config: AsyncQueueConfig,
        quotas: Arc<crate::quota::Quotas>,
    ) -> Result<Self, sqlx::Error> {
        let recovered =
            sqlx::query("UPDATE async_calls SET state = 'queued' WHERE state = 'running'").execute(&pool).await?;
        if recovered.rows_affected() > 0 {
            tracing::info!(calls = recovered.rows_affected(), "re-queued async calls interrupted by the last stop");
        }
        Ok(Self {
            pool,
            config,
            quotas,
            bell: Notify::new(),
            tenants: Default::default(),
            served: Default::default(),
            callbacks: Default::default(),
        })
    }

    /// Stores a call durably. Returns false when the same `(tenant, call id)` was already
    /// accepted (the duplicate is not queued again). Over the tenant's quotas (calls waiting or
    /// running, and their bodies' bytes) nothing is stored: checked in the insert itself.
    pub async fn enqueue(
        &self,
        tenant: &TenantId,
        function: &str,
        invocation: &Invocation,
        callback_url: Option<&str>,
    ) -> Result<bool, EnqueueError> {
        let now = now_ms();
        let headers = serde_json::to_string(&invocation.headers).expect("headers serialize");
        let plan = self.quotas.of(tenant.as_str());
        let max_calls = plan.async_calls.unwrap_or(self.config.max_calls_per_tenant);
        let max_bytes = plan.async_bytes.unwrap_or(self.config.max_bytes_per_tenant);
        let result = sqlx::query(
            "INSERT INTO async_calls (tenant, call_id, function, method, path, query, headers, body, callback_url, \
             traceparent, state, attempts, next_attempt_ms, created_ms) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'queued', 0, ?11, ?11 \
             WHERE (SELECT COUNT(*) FROM async_calls WHERE tenant = ?1 AND state IN ('queued', 'running')) < ?12 \
               AND (SELECT COALESCE(SUM(length(body) + length(headers) + length(query) + length(path)), 0) \
                    FROM async_calls WHERE tenant = ?1 AND state IN ('queued', 'running')) \
                   + length(?8) + length(?7) + length(?6) + length(?5) <= ?13 \
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(&invocation.call_id)
        .bind(function)
        .bind(&invocation.method)
        .bind(&invocation.path)
        .bind(&invocation.query)
        .bind(headers)
        .bind(invocation.body.as_ref())
        .bind(callback_url)
        .bind(&invocation.traceparent)
        .bind(now)
        .bind(i64::try_from(max_calls).unwrap_or(i64::MAX))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 1 {
            self.bell.notify_one();
            return Ok(true);
        }
        // Not stored: a duplicate of an accepted call, or over a quota.
        if self.get(tenant, &invocation.call_id).await?.is_some() {
            return Ok(false);
        }
        Err(EnqueueError::Quota(format!(
            "tenant {tenant} has reached its async queue quota: at most {} calls waiting or running, holding at most \
             {} bytes of requests (bodies, headers, paths and queries; its plan's async_calls and async_bytes, by default \
             --tenant-max-async-calls and --tenant-max-async-bytes); retry once some are done",
            max_calls, max_bytes
        )))
    }

    /// Deletes finished calls past [`FINISHED_RETENTION`], and each tenant's beyond its newest
    /// [`FINISHED_PER_TENANT`]; returns how many.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, sqlx::Error> {
        let before = now_ms.saturating_sub(FINISHED_RETENTION.as_millis() as i64);
        let mut deleted = sqlx::query("DELETE FROM async_calls WHERE state IN ('done', 'dead') AND finished_ms < ?")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let crowded: Vec<String> = sqlx::query_scalar(
            "SELECT tenant FROM async_calls WHERE state IN ('done', 'dead') GROUP BY tenant HAVING COUNT(*) > ?",
        )
        .bind(FINISHED_PER_TENANT)
        .fetch_all(&self.pool)
        .await?;
        for tenant in crowded {
            deleted += sqlx::query(
                "DELETE FROM async_calls WHERE tenant = ?1 AND state IN ('done', 'dead') AND call_id NOT IN ( \
                   SELECT call_id FROM async_calls WHERE tenant = ?1 AND state IN ('done', 'dead') \
                   ORDER BY finished_ms DESC, call_id DESC LIMIT ?2)",
            )
            .bind(&tenant)
            .bind(FINISHED_PER_TENANT)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(deleted)
    }

    /// One call's state, for its tenant.
    pub async fn get(&self, tenant: &TenantId, call_id: &str) -> Result<Option<AsyncCall>, sqlx::Error> {
        sqlx::query_as(select_calls!("WHERE tenant = ? AND call_id = ?"))
            .bind(tenant.as_str())
            .bind(call_id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Dead-lettered calls of one tenant, or of all.
    pub async fn dead_letters(&self, tenant: Option<&TenantId>) -> Result<Vec<AsyncCall>, sqlx::Error> {
        sqlx::query_as(select_calls!(
            "WHERE state = 'dead' AND (?1 IS NULL OR tenant = ?1) ORDER BY finished_ms LIMIT 1000"
        ))
        .bind(tenant.map(TenantId::as_str))
        .fetch_all(&self.pool)
        .await
    }

    /// Calls waiting or running, and dead-lettered calls.
    pub async fn counts(&self) -> Result<(i64, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT COALESCE(SUM(state IN ('queued', 'running')), 0), COALESCE(SUM(state = 'dead'), 0) FROM async_calls",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Calls of one tenant a worker may deliver at once: half the workers (at least one), so
    /// that one tenant's slow calls cannot hold them all.
    fn per_tenant_cap(&self) -> usize {
        self.config.workers.div_ceil(2).max(1)
    }

    /// The next due call, fairly: among the tenants with calls due and under their cap, the
    /// one with the fewest in flight, then the one served longest ago; its oldest due call.
    async fn claim(&self) -> Result<Option<Claimed>, sqlx::Error> {
        let now = now_ms();
        let due: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT tenant FROM async_calls WHERE state = 'queued' AND next_attempt_ms <= ?")
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
        let tenant = {
            let mut tenants = self.tenants.lock().unwrap();
            let cap = self.per_tenant_cap();
            let chosen = due
                .into_iter()
                .map(|(tenant,)| tenant)
                .filter(|tenant| tenants.get(tenant).is_none_or(|(running, _)| *running < cap))
                .min_by_key(|tenant| tenants.get(tenant).copied().unwrap_or_default());
            let Some(tenant) = chosen else { return Ok(None) };
            // Reserved before the claim, so that two workers do not both take a tenant's last place.
            let entry = tenants.entry(tenant.clone()).or_default();
            entry.0 += 1;
            entry.1 = self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tenant
        };
        let claimed: Result<Option<Claimed>, sqlx::Error> = sqlx::query_as(
            "UPDATE async_calls SET state = 'running', attempts = attempts + 1 \
             WHERE rowid = (SELECT rowid FROM async_calls WHERE state = 'queued' AND next_attempt_ms <= ? AND tenant = ? \
                            ORDER BY next_attempt_ms LIMIT 1) \
             RETURNING tenant, call_id, function, method, path, query, headers, body, callback_url, traceparent, attempts",
        )
        .bind(now)
        .bind(&tenant)
        .fetch_optional(&self.pool)
        .await;
        if !matches!(claimed, Ok(Some(_))) {
            self.delivered(&tenant);
        }
        claimed
    }

    /// A claimed call of `tenant` is over (or was not claimed after all): its place is free.
    fn delivered(&self, tenant: &str) {
        let mut tenants = self.tenants.lock().unwrap();
        if let Some((running, _)) = tenants.get_mut(tenant) {
            *running = running.saturating_sub(1);
        }
        drop(tenants);
        self.bell.notify_one();
    }

    async fn finish(&self, call: &Claimed, outcome: &Outcome) -> Result<(), sqlx::Error> {
        let retriable = outcome.status == 429 || outcome.status >= 500;
        let error =
            retriable.then(|| String::from_utf8_lossy(&outcome.body[..outcome.body.len().min(512)]).into_owned());
        let now = now_ms();
        if retriable && (call.attempts as u32) < self.config.max_attempts {
            let backoff = self.backoff(call.attempts as u32);
            sqlx::query(
                "UPDATE async_calls SET state = 'queued', next_attempt_ms = ?, last_status = ?, last_error = ? \
                 WHERE tenant = ? AND call_id = ?",
            )
            .bind(now + backoff.as_millis() as i64)
            .bind(outcome.status as i64)
            .bind(error)
            .bind(&call.tenant)
            .bind(&call.call_id)
            .execute(&self.pool)
            .await?;
            return Ok(());
        }
        let state = if retriable { "dead" } else { "done" };
        sqlx::query(
            "UPDATE async_calls SET state = ?, last_status = ?, last_error = ?, finished_ms = ?, body = x'', \
             headers = '[]', query = '' WHERE tenant = ? AND call_id = ?",
        )
        .bind(state)
        .bind(outcome.status as i64)
        .bind(error)
        .bind(now)
        .bind(&call.tenant)
        .bind(&call.call_id)
        .execute(&self.pool)
        .await?;
        if retriable {
            tracing::warn!(tenant = %call.tenant, call_id = %call.call_id, function = %call.function,
                attempts = call.attempts, status = outcome.status, "async call dead-lettered");
        }
        Ok(())
    }

    /// Backoff before attempt `attempt + 1`: initial × 2^(attempt-1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.config.initial_backoff.saturating_mul(factor).min(self.config.max_backoff)
    }
}

/// Starts the delivery workers; they stop when `shutdown` turns true, after their current call.
pub fn spawn_workers(
    invoker: Arc<Invoker>,
    queue: Arc<AsyncQueue>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let pruner = {
        let (queue, mut shutdown) = (queue.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
                    _ = shutdown.changed() => return,
                }
                match queue.prune(now_ms()).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "async queue: finished calls past their retention deleted"),
                    Err(error) => tracing::error!(%error, "async queue: cannot delete old finished calls"),
                }
            }
        })
    };
    let workers = (0..queue.config.workers.max(1)).map(|_| {
        let (invoker, queue) = (invoker.clone(), queue.clone());
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !*shutdown.borrow() {
                match queue.claim().await {
                    Ok(Some(call)) => {
                        let tenant = call.tenant.clone();
                        deliver(&invoker, &queue, call).await;
                        queue.delivered(&tenant);
                    }
                    Ok(None) => {
                        tokio::select! {
                            _ = queue.bell.notified() => {}
                            _ = tokio::time::sleep(POLL_INTERVAL) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "async queue: cannot claim a call");
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                }
            }
        })
    });
    std::iter::once(pruner).chain(workers).collect()
}

async fn deliver(invoker: &Invoker, queue: &AsyncQueue, call: Claimed) {
    let outcome = match TenantId::new(&call.tenant) {
        Ok(tenant) => {
            let invocation = Invocation {
                call_id: call.call_id.clone(),
                method: call.method.clone(),
                path: call.path.clone(),
                query: call.query.clone(),
                headers: serde_json::from_str(&call.headers).unwrap_or_default(),
                body: call.body.clone().into(),
                traceparent: call.traceparent.clone(),
                job: None,
            };
            invoker.dispatch(&tenant, &call.function, invocation, semconv::TRIGGER_PUBSUB).await
        }
        Err(error) => Outcome::text(400, error.to_string(), Default::default()),
    };
    let retriable = outcome.status == 429 || outcome.status >= 500;
    let last_attempt = call.attempts as u32 >= queue.config.max_attempts;
    if let Err(error) = queue.finish(&call, &outcome).await {
        // The call stays `running` and is delivered again at the next start.
        tracing::error!(%error, call_id = %call.call_id, "async queue: cannot record the result");
        return;
    }
    if let Some(url) = call.callback_url.clone()
        && (!retriable || last_attempt)
    {
        let share = queue
            .callbacks
            .lock()
            .unwrap()
            .entry(call.tenant.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(CALLBACKS_PER_TENANT)))
            .clone();
        let Ok(permit) = share.try_acquire_owned() else {
            return tracing::warn!(
                url, call_id = %call.call_id, tenant = %call.tenant,
                "callback not sent: the tenant has {CALLBACKS_PER_TENANT} callbacks being posted already"
            );
        };
        let outbound = invoker.outbound.clone();
        tokio::spawn(async move {
            post_callback(&outbound, &url, &call.call_id, &outcome).await;
            drop(permit);
        });
    }
}

/// POSTs the result to the caller's `X-Callback-Url`, retrying briefly on failure.
async fn post_callback(outbound: &Outbound, url: &str, call_id: &str, outcome: &Outcome) {
    let client = match outbound.to(url) {
        Ok(client) => client,
        Err(error) => return tracing::warn!(url, call_id, %error, "callback not sent"),
    };
    for attempt in 0..3u32 {
        let mut request = client
            .post(url)
            .timeout(Duration::from_secs(10))
            .header(semconv::HEADER_FUNCTION_STATUS, outcome.status.to_string())
            .header(semconv::HEADER_CALL_ID, call_id)
            .body(outcome.body.clone());
        if let Some((_, content_type)) = outcome.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            request = request.header("content-type", content_type);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => tracing::warn!(url, call_id, status = %response.status(), "callback refused"),
            Err(error) => tracing::warn!(url, call_id, %error, "callback failed"),
        }
        tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
    }
}
