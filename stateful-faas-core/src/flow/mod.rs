//! The composition engine: flows are DAGs of functions (and sub-flows) whose intermediate data
//! moves through the state store, with a durable journal so that runs survive a restart.

pub mod definition;
pub mod executor;
pub mod expr;
pub mod journal;
mod node;
mod schedule;
pub mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use crate::database::now_ms;
use crate::function::Registry;
use crate::tenant::TenantId;
pub use definition::{Flow, FlowDefinition, FlowErrors};

/// Why a flow operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Invalid(#[from] FlowErrors),
    #[error("flow {name} not found in namespace {tenant}")]
    NotFound { tenant: String, name: String },
    #[error("flow run {0} not found")]
    RunNotFound(String),
    #[error("sub-flows nest deeper than {0} levels")]
    TooDeep(usize),
    #[error("cannot start the run: {0}")]
    State(#[from] crate::state::StateError),
    #[error("flow store: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "tenant {tenant} has reached its quota of {quota} flows (its plan's `flows`, by default --tenant-max-flows): remove one before deploying another"
    )]
    Quota { tenant: String, quota: usize },
    #[error(
        "namespace {0}'s telemetry is behind (its span queue is full, so its runs could not be metered): retry in a moment"
    )]
    Behind(String),
}

type Key = (TenantId, String);

/// The flow layer: deployed flows, the journal of runs and the streams, over the runtime that
/// runs their nodes.
pub struct Flows {
    pub invoker: Arc<crate::invoker::Invoker>,
    pub store: FlowStore,
    pub journal: journal::Journal,
    pub streams: stream::Streams,
}

impl Flows {
    pub fn new(invoker: Arc<crate::invoker::Invoker>, store: FlowStore, journal: journal::Journal) -> Self {
        Self { invoker, store, journal, streams: Default::default() }
    }
}

/// Deployed flows, and the cancel switches of running runs.
pub struct FlowStore {
    pool: sqlx::SqlitePool,
    flows: RwLock<HashMap<Key, Arc<Flow>>>,
    running: Mutex<HashMap<Key, watch::Sender<bool>>>,
    /// Flows one tenant may have, where its plan does not say.
    max_flows: usize,
    quotas: Arc<crate::quota::Quotas>,
}

impl FlowStore {
    /// Loads the deployed flows (re-validated against the functions deployed now).
    pub async fn load(
        pool: sqlx::SqlitePool,
        max_flows: usize,
        quotas: Arc<crate::quota::Quotas>,
    ) -> Result<Self, FlowError> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT tenant, name, definition FROM flows").fetch_all(&pool).await?;
        let parsed: Vec<(TenantId, FlowDefinition)> = rows
            .into_iter()
            .filter_map(|(tenant, name, json)| {
                let tenant = TenantId::new(&tenant).ok()?;
                match serde_json::from_str(&json) {
                    Ok(definition) => Some((tenant, definition)),
                    Err(error) => {
                        tracing::error!(%tenant, %name, %error, "stored flow does not parse; not loaded");
                        None
                    }
                }
            })
            .collect();
        let mut flows = HashMap::new();
        for (tenant, definition) in &parsed {
            // Functions may have been removed since: runs of such a flow fail at the missing
            // function, with a clear error. A flow that no longer validates at all (its
            // sub-flow gone, rules changed) is skipped with an error; the others load.
            match definition.validate(|_| true, |name| parsed.iter().any(|(t, d)| t == tenant && d.name == name)) {
                Ok(flow) => {
                    flows.insert((tenant.clone(), definition.name.clone()), Arc::new(flow));
                }
                Err(error) => {
                    tracing::error!(%tenant, name = %definition.name, %error, "stored flow no longer validates; not loaded")
                }
            }
        }
        Ok(Self { pool, flows: RwLock::new(flows), running: Mutex::new(HashMap::new()), max_flows, quotas })
    }

    pub fn get(&self, tenant: &TenantId, name: &str) -> Option<Arc<Flow>> {
        self.flows.read().unwrap().get(&(tenant.clone(), name.to_string())).cloned()
    }

    pub fn list(&self, tenant: &TenantId) -> Vec<Arc<Flow>> {
        let mut flows: Vec<_> =
            self.flows.read().unwrap().iter().filter(|((t, _), _)| t == tenant).map(|(_, f)| f.clone()).collect();
        flows.sort_by(|a, b| a.name().cmp(b.name()));
        flows
    }

    /// Validates and stores a flow (creating or replacing it); true when it is new.
    pub async fn deploy(
        &self,
        tenant: &TenantId,
        definition: FlowDefinition,
        functions: &Registry,
    ) -> Result<(Arc<Flow>, bool), FlowError> {
        let flow = definition
            .validate(|function| functions.get(tenant, function).is_some(), |name| self.get(tenant, name).is_some())?;
        let json = serde_json::to_string(&definition).expect("flow definitions serialize");
        let now = now_ms();
        let existed = self.get(tenant, &definition.name).is_some();
        let max_flows = self.quotas.of(tenant.as_str()).flows.map_or(self.max_flows, crate::quota::count);
        // The quota is checked in the insert itself: a replacement always passes.
        let stored = sqlx::query(
            "INSERT INTO flows (tenant, name, definition, created_ms, updated_ms) SELECT ?1, ?2, ?3, ?4, ?4 \
             WHERE (SELECT COUNT(*) FROM flows WHERE tenant = ?1) < ?5 \
                OR EXISTS (SELECT 1 FROM flows WHERE tenant = ?1 AND name = ?2) \
             ON CONFLICT (tenant, name) DO UPDATE SET definition = excluded.definition, updated_ms = excluded.updated_ms",
        )
        .bind(tenant.as_str())
        .bind(&definition.name)
        .bind(json)
        .bind(now)
        .bind(i64::try_from(max_flows).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        if stored.rows_affected() == 0 {
            return Err(FlowError::Quota { tenant: tenant.to_string(), quota: max_flows });
        }
        let flow = Arc::new(flow);
        self.flows.write().unwrap().insert((tenant.clone(), definition.name.clone()), flow.clone());
        Ok((flow, !existed))
    }

    pub async fn remove(&self, tenant: &TenantId, name: &str) -> Result<(), FlowError> {
        let result = sqlx::query("DELETE FROM flows WHERE tenant = ? AND name = ?")
            .bind(tenant.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.flows.write().unwrap().remove(&(tenant.clone(), name.to_string()));
        if result.rows_affected() == 0 {
            return Err(FlowError::NotFound { tenant: tenant.to_string(), name: name.to_string() });
        }
        Ok(())
    }

    /// Registers a running run's cancel switch.
    fn track(&self, tenant: &TenantId, run_id: &str) -> watch::Receiver<bool> {
        let (sender, receiver) = watch::channel(false);
        self.running.lock().unwrap().insert((tenant.clone(), run_id.to_string()), sender);
        receiver
    }

    fn untrack(&self, tenant: &TenantId, run_id: &str) {
        self.running.lock().unwrap().remove(&(tenant.clone(), run_id.to_string()));
    }

    /// Asks a running run to stop; false if it is not running here.
    pub fn cancel(&self, tenant: &TenantId, run_id: &str) -> bool {
        match self.running.lock().unwrap().get(&(tenant.clone(), run_id.to_string())) {
            Some(switch) => switch.send(true).is_ok(),
            None => false,
        }
    }
}
