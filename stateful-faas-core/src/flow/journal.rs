//! The durable journal of flow runs, in the core's database.
//!
//! A run's row is committed before the run is acknowledged. Node transitions go through one
//! writer task that commits them in batches (group commit), so the engine never waits for a
//! disk flush per node; a run's final state is awaited before its caller is answered. After a
//! crash, a node whose completion was committed is not executed again.
//!
//! What only a restart needs (the run's input, its copy of the definition, its nodes' inline
//! outputs) is dropped when the run ends, and a tenant's finished runs are kept within a
//! [`Retention`]: oldest finished first are deleted beyond it. A running run is never deleted.

use std::collections::HashSet;

use bytes::Bytes;
use serde::Serialize;
use sqlx::{AssertSqlSafe, Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::database::now_ms;
use crate::tenant::TenantId;

/// Node outputs up to this size are kept in the journal itself; larger ones only by reference.
pub const INLINE_OUTPUT_BYTES: usize = 64 << 10;

/// How much of a tenant's finished runs the journal keeps, newest finished first (the newest
/// one always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished runs kept per tenant.
    pub max_runs: usize,
    /// Bytes of their outputs and errors kept per tenant.
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        // `GET /flow-runs` lists at most 1 000 runs; the bytes match a tenant's async calls' default.
        Self { max_runs: 1000, max_bytes: 256 << 20 }
    }
}

/// One change to record.
#[derive(Debug)]
pub enum Entry {
    NodeStarted { tenant: TenantId, run_id: String, node: String },
    NodeFinished(NodeRecord),
    RunFinished { record: RunEnd, ack: oneshot::Sender<()> },
}

/// A node's final state.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub tenant: TenantId,
    pub run_id: String,
    pub node: String,
    pub state: &'static str,
    pub attempts: u32,
    pub output: Option<Bytes>,
    pub output_ref: Option<String>,
    pub output_bytes: Option<u64>,
    pub error: Option<String>,
}

/// A run's final state.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub tenant: TenantId,
    pub run_id: String,
    pub status: &'static str,
    pub output: Option<Bytes>,
    pub error: Option<String>,
    pub state_byte_seconds: String,
}

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    pub flow: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_byte_seconds: Option<String>,
    pub created_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    #[serde(skip)]
    pub output: Option<Vec<u8>>,
}

/// A node of a run as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub node: String,
    pub state: String,
    pub attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
}

/// What a restart needs to resume a run.
pub struct Interrupted {
    pub tenant: String,
    pub run_id: String,
    pub definition: String,
    pub input: Vec<u8>,
    pub callback_url: Option<String>,
    pub parent_run: Option<String>,
    pub traceparent: Option<String>,
    /// Nodes committed as finished: (node, state, inline output).
    pub finished: Vec<(String, String, Option<Vec<u8>>)>,
}

/// The journal: a handle on the writer task and the database.
#[derive(Clone)]
pub struct Journal {
    pool: SqlitePool,
    sender: mpsc::Sender<Entry>,
}

impl Journal {
    /// Starts the writer task, keeping the default [`Retention`].
    pub fn start(pool: SqlitePool) -> Self {
        Self::with_retention(pool, Retention::default())
    }

    /// Starts the writer task, keeping `retention` of each tenant's finished runs.
    pub fn with_retention(pool: SqlitePool, retention: Retention) -> Self {
        // Bounded: when the disk falls behind, node transitions wait (backpressure), memory does not grow.
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(write_batches(pool.clone(), receiver, retention));
        Self { pool, sender }
    }

    /// Records a new run; returns once it is committed.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_run(
        &self,
        tenant: &TenantId,
        run_id: &str,
        flow: &str,
        definition: &str,
        input: &[u8],
        callback_url: Option<&str>,
        parent_run: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO flow_runs (tenant, run_id, flow, definition, status, input, callback_url, parent_run, traceparent, created_ms) \
             VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
        )
        .bind(tenant.as_str())
        .bind(run_id)
        .bind(flow)
        .bind(definition)
        .bind(input)
        .bind(callback_url)
        .bind(parent_run)
        .bind(traceparent)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Queues a change for the writer (waits only when the writer is far behind).
    pub async fn record(&self, entry: Entry) {
        if self.sender.send(entry).await.is_err() {
            tracing::error!("flow journal writer stopped; a node transition was not recorded");
        }
    }

    /// Records a run's end and waits for the commit.
    pub async fn finish_run(&self, record: RunEnd) {
        let (ack, done) = oneshot::channel();
        self.record(Entry::RunFinished { record, ack }).await;
        let _ = done.await;
    }

    pub async fn run(&self, tenant: &TenantId, run_id: &str) -> Result<Option<RunInfo>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT run_id, flow, status, error, parent_run, state_byte_seconds, created_ms, finished_ms, output \
             FROM flow_runs WHERE tenant = ? AND run_id = ?",
        )
        .bind(tenant.as_str())
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| run_info(&row)).transpose()
    }

    pub async fn runs(
        &self,
        tenant: &TenantId,
        flow: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunInfo>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT run_id, flow, status, error, parent_run, state_byte_seconds, created_ms, finished_ms, NULL AS output \
             FROM flow_runs WHERE tenant = ?1 AND (?2 IS NULL OR flow = ?2) AND (?3 IS NULL OR status = ?3) \
             ORDER BY created_ms DESC LIMIT ?4",
        )
        .bind(tenant.as_str())
        .bind(flow)
        .bind(status)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_info).collect()
    }

    pub async fn nodes(&self, tenant: &TenantId, run_id: &str) -> Result<Vec<NodeInfo>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT node, state, attempts, output_ref, output_bytes, error, started_ms, finished_ms \
             FROM flow_nodes WHERE tenant = ? AND run_id = ? ORDER BY COALESCE(started_ms, finished_ms), node",
        )
        .bind(tenant.as_str())
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeInfo {
                    node: row.try_get("node")?,
                    state: row.try_get("state")?,
                    attempts: row.try_get("attempts")?,
                    output_ref: row.try_get("output_ref")?,
                    output_bytes: row.try_get("output_bytes")?,
                    error: row.try_get("error")?,
                    started_ms: row.try_get("started_ms")?,
                    finished_ms: row.try_get("finished_ms")?,
                })
            })
            .collect()
    }

    /// Runs that were running when the process stopped.
    pub async fn interrupted(&self) -> Result<Vec<Interrupted>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT tenant, run_id, definition, input, callback_url, parent_run, traceparent FROM flow_runs \
             WHERE status = 'running' ORDER BY created_ms",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut runs = Vec::new();
        for row in rows {
            let tenant: String = row.try_get("tenant")?;
            let run_id: String = row.try_get("run_id")?;
            let finished = sqlx::query_as::<_, (String, String, Option<Vec<u8>>)>(
                "SELECT node, state, output FROM flow_nodes WHERE tenant = ? AND run_id = ? AND state IN ('succeeded', 'skipped')",
            )
            .bind(&tenant)
            .bind(&run_id)
            .fetch_all(&self.pool)
            .await?;
            runs.push(Interrupted {
                definition: row.try_get("definition")?,
                input: row.try_get("input")?,
                callback_url: row.try_get("callback_url")?,
                parent_run: row.try_get("parent_run")?,
                traceparent: row.try_get("traceparent")?,
                tenant,
                run_id,
                finished,
            });
        }
        Ok(runs)
    }
}

fn run_info(row: &sqlx::sqlite::SqliteRow) -> Result<RunInfo, sqlx::Error> {
    Ok(RunInfo {
        run_id: row.try_get("run_id")?,
        flow: row.try_get("flow")?,
        status: row.try_get("status")?,
        error: row.try_get("error")?,
        parent_run: row.try_get("parent_run")?,
        state_byte_seconds: row.try_get("state_byte_seconds")?,
        created_ms: row.try_get("created_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        output: row.try_get("output")?,
    })
}

/// Most entries committed in one transaction.
const BATCH: usize = 512;

async fn write_batches(pool: SqlitePool, mut receiver: mpsc::Receiver<Entry>, retention: Retention) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let mut acks = Vec::new();
        let mut finished_by = HashSet::new();
        if let Err(error) = write(&pool, &mut batch, &mut acks, &mut finished_by).await {
            tracing::error!(%error, "flow journal: cannot commit a batch");
        }
        for ack in acks {
            let _ = ack.send(());
        }
        batch.clear();
        // After the commit and the answers: retention never delays a run's end.
        for tenant in finished_by {
            if let Err(error) = prune(&pool, &tenant, retention).await {
                tracing::error!(%tenant, %error, "flow journal: cannot delete old finished runs");
            }
        }
    }
}

/// Deletes `tenant`'s finished runs beyond `retention`, with their nodes.
async fn prune(pool: &SqlitePool, tenant: &TenantId, retention: Retention) -> Result<(), sqlx::Error> {
    // The newest finished run that does not fit; it and every run finished before it go.
    let cutoff: Option<(i64, String)> = sqlx::query_as(
        "SELECT finished_ms, run_id FROM ( \
             SELECT finished_ms, run_id, ROW_NUMBER() OVER newest AS rank, \
                    SUM(COALESCE(length(output), 0) + COALESCE(length(error), 0)) OVER newest AS bytes \
             FROM flow_runs WHERE tenant = ?1 AND status != 'running' \
             WINDOW newest AS (ORDER BY finished_ms DESC, run_id DESC) \
         ) WHERE rank > 1 AND (rank > ?2 OR bytes > ?3) ORDER BY finished_ms DESC, run_id DESC LIMIT 1",
    )
    .bind(tenant.as_str())
    .bind(i64::try_from(retention.max_runs).unwrap_or(i64::MAX))
    .bind(i64::try_from(retention.max_bytes).unwrap_or(i64::MAX))
    .fetch_optional(pool)
    .await?;
    let Some((finished_ms, run_id)) = cutoff else { return Ok(()) };
    const OLD: &str = "tenant = ?1 AND status != 'running' AND (finished_ms, run_id) <= (?2, ?3)";
    let mut tx = pool.begin().await?;
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM flow_nodes WHERE tenant = ?1 AND run_id IN (SELECT run_id FROM flow_runs WHERE {OLD})"
    )))
    .bind(tenant.as_str())
    .bind(finished_ms)
    .bind(&run_id)
    .execute(&mut *tx)
    .await?;
    let deleted = sqlx::query(AssertSqlSafe(format!("DELETE FROM flow_runs WHERE {OLD}")))
        .bind(tenant.as_str())
        .bind(finished_ms)
        .bind(&run_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::debug!(%tenant, runs = deleted.rows_affected(), "flow journal: old finished runs deleted");
    Ok(())
}

async fn write(
    pool: &SqlitePool,
    batch: &mut Vec<Entry>,
    acks: &mut Vec<oneshot::Sender<()>>,
    finished_by: &mut HashSet<TenantId>,
) -> Result<(), sqlx::Error> {
    // A node that started and finished within one batch is written once, finished.
    let finished: HashSet<(String, String)> = batch
        .iter()
        .filter_map(|entry| match entry {
            Entry::NodeFinished(record) => Some((record.run_id.clone(), record.node.clone())),
            _ => None,
        })
        .collect();
    let mut started = Vec::new();
    let mut records = Vec::new();
    let mut ends = Vec::new();
    for entry in batch.drain(..) {
        match entry {
            Entry::NodeStarted { tenant, run_id, node } => {
                if !finished.contains(&(run_id.clone(), node.clone())) {
                    started.push((tenant, run_id, node));
                }
            }
            Entry::NodeFinished(record) => records.push(record),
            Entry::RunFinished { record, ack } => {
                ends.push(record);
                acks.push(ack);
            }
        }
    }
    let now = now_ms();
    let mut tx = pool.begin().await?;
    // Multi-row statements: one round trip to SQLite's thread per kind of change, not per row.
    for chunk in started.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("INSERT INTO flow_nodes (tenant, run_id, node, state, attempts, started_ms) VALUES ");
        sql.push_str(&vec!["(?, ?, ?, 'running', 0, ?)"; chunk.len()].join(", "));
        sql.push_str(
            " ON CONFLICT (tenant, run_id, node) DO UPDATE SET state = 'running', started_ms = excluded.started_ms",
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (tenant, run_id, node) in chunk {
            query = query.bind(tenant.as_str()).bind(run_id).bind(node).bind(now);
        }
        query.execute(&mut *tx).await?;
    }
    for chunk in records.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO flow_nodes (tenant, run_id, node, state, attempts, output, output_ref, output_bytes, error, \
             started_ms, finished_ms) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
        sql.push_str(
            " ON CONFLICT (tenant, run_id, node) DO UPDATE SET state = excluded.state, attempts = excluded.attempts, \
             output = excluded.output, output_ref = excluded.output_ref, output_bytes = excluded.output_bytes, \
             error = excluded.error, finished_ms = excluded.finished_ms",
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for record in chunk {
            query = query
                .bind(record.tenant.as_str())
                .bind(&record.run_id)
                .bind(&record.node)
                .bind(record.state)
                .bind(record.attempts as i64)
                .bind(record.output.as_deref())
                .bind(&record.output_ref)
                .bind(record.output_bytes.map(|b| b as i64))
                .bind(&record.error)
                .bind(now)
                .bind(now);
        }
        query.execute(&mut *tx).await?;
    }
    for record in ends {
        // The input, the definition and the nodes' outputs served only to resume the run.
        sqlx::query(
            "UPDATE flow_runs SET status = ?, output = ?, error = ?, state_byte_seconds = ?, finished_ms = ?, \
             input = x'', definition = '' WHERE tenant = ? AND run_id = ?",
        )
        .bind(record.status)
        .bind(record.output.as_deref())
        .bind(&record.error)
        .bind(&record.state_byte_seconds)
        .bind(now)
        .bind(record.tenant.as_str())
        .bind(&record.run_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE flow_nodes SET output = NULL WHERE tenant = ? AND run_id = ? AND output IS NOT NULL")
            .bind(record.tenant.as_str())
            .bind(&record.run_id)
            .execute(&mut *tx)
            .await?;
        finished_by.insert(record.tenant);
    }
    tx.commit().await
}

/// Rows per multi-row statement (11 parameters each, well under SQLite's limit).
const ROWS_PER_STATEMENT: usize = 256;
