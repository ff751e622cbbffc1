//! The OpenFaaS-compatible gateway (axum) and the [`Core`] it serves.

pub mod auth;
pub mod body;
pub mod error;
pub mod flows;
pub mod invoke;
pub mod logs;
pub mod state;
pub mod system;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, delete, get, post};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::async_queue::{self, AsyncQueue};
use crate::config::{CoreConfig, load_or_create_admin_token};
use crate::database::{self, DatabaseError};
use crate::flow::Flows;
use crate::function::Registry;
use crate::function::registry::RegistryError;
use crate::invoker::Invoker;
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::state::metering::SystemClock;
use crate::telemetry::Telemetry;
use crate::tenant::{TenantError, TenantStore};

/// Why the core could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("cannot read or create the admin token in {0}: {1}")]
    AdminToken(String, std::io::Error),
    #[error("cannot create data directory {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error(transparent)]
    Tenants(#[from] TenantError),
    #[error(transparent)]
    Functions(#[from] RegistryError),
    #[error(transparent)]
    Flows(#[from] crate::flow::FlowError),
    #[error("async queue: {0}")]
    Queue(#[from] sqlx::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    StateConfig(#[from] crate::state::InvalidUsageInterval),
    #[error(transparent)]
    Sandbox(#[from] crate::function::sandbox::SandboxError),
    #[error("{0}")]
    Outbound(String),
}

/// The core: the runtime that runs functions, composed with the async queue and the flows,
/// and served over HTTP by the gateway's handlers.
pub struct Core {
    pub config: CoreConfig,
    pub pool: sqlx::SqlitePool,
    pub invoker: Arc<Invoker>,
    pub queue: Arc<AsyncQueue>,
    pub flows: Arc<Flows>,
    pub admin_token: String,
    /// Tenants' plans, where they change a quota.
    quotas: Arc<crate::quota::Quotas>,
    /// Where `/system/logs` reads function logs (set by the binary, which has the store).
    pub log_reader: std::sync::OnceLock<Arc<dyn logs::LogReader>>,
    /// Set when the gateway stops: long responses (followed logs) end then.
    stop: watch::Sender<bool>,
}

impl Core {
    /// Applies the limits of tenants' plans (`fallback` to tenants assigned none): new
    /// functions, flows, instances, async calls, state objects and jobs are counted against
    /// them from now on.
    pub fn set_plan_limits(
        &self,
        fallback: crate::quota::Limits,
        tenants: std::collections::HashMap<String, crate::quota::Limits>,
    ) {
        self.quotas.set(fallback, tenants);
        self.invoker.functions.resize_instances();
    }

    /// Opens the data directory and the database, and loads tenants and functions.
    pub async fn open(config: CoreConfig) -> Result<Arc<Self>, CoreError> {
        config.state.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| CoreError::DataDir(config.data_dir.display().to_string(), e))?;
        let admin_token = match &config.admin_token {
            Some(token) => token.clone(),
            None => load_or_create_admin_token(&config.data_dir)
                .map_err(|e| CoreError::AdminToken(config.data_dir.display().to_string(), e))?,
        };
        let url = config.database_url.clone().unwrap_or_else(|| database::default_url(&config.data_dir));
        let pool = database::open(&url).await?;
        let tenants = Arc::new(TenantStore::load(pool.clone(), &admin_token).await?);
        let quotas = Arc::new(crate::quota::Quotas::default());
        let state = Arc::new(StateStore::new(config.state.clone(), Arc::new(SystemClock), quotas.clone()));
        let sandbox = match config.sandbox.clone() {
            Some(sandbox) => Some(Arc::new(crate::function::sandbox::Sandbox::start(sandbox, &config.data_dir).await?)),
            None => None,
        };
        let functions = Registry::load(
            pool.clone(),
            sandbox,
            config.builtins.clone(),
            config.max_functions_per_tenant,
            config.max_instances_per_tenant,
            quotas.clone(),
        )
        .await?;
        let queue = Arc::new(AsyncQueue::open(pool.clone(), config.async_queue.clone(), quotas.clone()).await?);
        let flow_store =
            crate::flow::FlowStore::load(pool.clone(), config.max_flows_per_tenant, quotas.clone()).await?;
        let flow_journal = crate::flow::journal::Journal::start(pool.clone());
        let policy =
            crate::function::outbound::OutboundPolicy::new(&config.allow_outbound).map_err(CoreError::Outbound)?;
        let invoker = Arc::new(Invoker {
            tenants,
            functions,
            metrics: Metrics::new(state.clone()),
            telemetry: Telemetry::new(config.telemetry.clone()),
            state,
            outbound: crate::function::outbound::Outbound::new(policy),
            buffers: Arc::new(crate::room::Room::new(
                config.buffer_bytes,
                config.max_body_bytes as u64 + crate::function::MAX_RESPONSE_BYTES as u64,
                "invocations' buffers (--buffer-bytes)",
            )),
        });
        // A tenant whose usage records are not leaving may not make more by registering jobs.
        let weak = Arc::downgrade(&invoker);
        invoker.state.gate_usage(move |tenant| weak.upgrade().is_some_and(|invoker| invoker.telemetry.behind(tenant)));
        let flows = Arc::new(Flows::new(invoker.clone(), flow_store, flow_journal));
        Ok(Arc::new(Self {
            config,
            pool,
            invoker,
            queue,
            flows,
            admin_token,
            quotas,
            log_reader: std::sync::OnceLock::new(),
            stop: watch::channel(false).0,
        }))
    }

    /// The gateway's routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "OK\n" }))
            .route("/metrics", get(system::metrics))
            .route("/system/info", get(system::info))
            .route(
                "/system/functions",
                get(system::list_functions)
                    .post(system::create_function)
                    .put(system::update_function)
                    .delete(system::delete_function),
            )
            .route("/system/function/{name}", get(system::get_function))
            .route("/system/scale-function/{name}", post(system::scale_function))
            .route("/system/namespaces", get(system::list_namespaces))
            .route("/system/tenants", get(system::list_tenants).post(system::create_tenant))
            .route("/system/async-calls/{call_id}", get(system::get_async_call))
            .route("/system/async-dead-letters", get(system::dead_letters))
            .route("/system/logs", get(logs::logs))
            .route("/function/{name}", any(invoke::call))
            .route("/function/{name}/", any(invoke::call))
            .route("/function/{name}/{*rest}", any(invoke::call))
            .route("/system/flows", get(flows::list).post(flows::deploy))
            .route("/system/flows/{name}", get(flows::get).delete(flows::remove))
            .route("/flow/{name}", post(flows::run_sync))
            .route("/async-flow/{name}", post(flows::run_async))
            .route("/stream/{name}", post(flows::stream))
            .route("/flow-runs", get(flows::runs))
            .route("/flow-runs/{run_id}", get(flows::run).delete(flows::cancel))
            .route("/async-function/{name}", post(invoke::call_async))
            .route("/async-function/{name}/{*rest}", post(invoke::call_async))
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .layer(axum::middleware::from_fn(error::catch_panic))
            .merge(self.state_router())
            .with_state(self.clone())
    }

    /// `/state/*`, whose bodies may be as large as the store's largest value.
    fn state_router(self: &Arc<Self>) -> Router<Arc<Self>> {
        let object =
            get(state::get_object).put(state::put_object).head(state::lookup_object).delete(state::delete_object);
        Router::new()
            .route("/state/usage", get(state::usage))
            .route("/state/jobs", post(state::register_job))
            .route("/state/jobs/{job}", delete(state::deregister_job))
            .route("/state/jobs/{job}/buckets/{bucket}", get(state::enumerate))
            .route("/state/jobs/{job}/buckets/{bucket}/objects/{key}", object.clone())
            .route("/state/buckets/{bucket}", get(state::enumerate))
            .route("/state/buckets/{bucket}/objects/{key}", object)
            .layer(DefaultBodyLimit::max(self.config.state.max_value_bytes as usize))
            .layer(axum::middleware::from_fn(error::catch_panic))
    }

    /// Binds the gateway address and starts serving, with the async workers and the idle
    /// reaper beside it.
    pub async fn start(self: Arc<Self>) -> Result<RunningCore, CoreError> {
        let addr = self.config.gateway_addr;
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| CoreError::Listen(addr, e))?;
        let local_addr = listener.local_addr().map_err(|e| CoreError::Listen(addr, e))?;
        let shutdown_rx = self.stop.subscribe();
        let redis = match self.config.state_redis_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| CoreError::Listen(addr, e))?;
                let bound = listener.local_addr().map_err(|e| CoreError::Listen(addr, e))?;
                let server = crate::redis::Server::new(
                    self.invoker.state.clone(),
                    self.invoker.tenants.clone(),
                    self.config.state_redis.clone(),
                );
                let mut stop = shutdown_rx.clone();
                let stopped = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                tokio::spawn(server.clone().serve(listener, stopped));
                Some((server, bound))
            }
            None => None,
        };
        let state_redis_addr = redis.as_ref().map(|(_, addr)| *addr);
        let _ = self.invoker.functions.state_addresses.set(crate::function::StateAddresses {
            http: format!("http://{local_addr}/state"),
            redis: state_redis_addr.map(|addr| addr.to_string()),
        });
        if let Some(sandbox) = self.invoker.functions.sandbox() {
            sandbox.serve_state(crate::function::sandbox::StateServers {
                http: self.state_router().with_state(self.clone()),
                redis: redis.map(|(server, _)| server),
            });
        }
        let mut tasks = async_queue::spawn_workers(self.invoker.clone(), self.queue.clone(), shutdown_rx.clone());
        tasks.push(tokio::spawn(housekeeping(self.invoker.clone(), shutdown_rx.clone())));
        let router = self.router();
        match crate::flow::executor::resume_interrupted(&self.flows).await {
            Ok(0) => {}
            Ok(runs) => tracing::info!(runs, "resumed interrupted flow runs"),
            Err(error) => tracing::error!(%error, "cannot resume interrupted flow runs"),
        }
        let mut server_shutdown = shutdown_rx;
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = server_shutdown.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "gateway stopped with an error");
            }
        });
        Ok(RunningCore { core: self, gateway_addr: local_addr, state_redis_addr, server, tasks })
    }
}

/// Once a second: stop idle function instances, report managed instances' usage outside
/// requests (one `instance.usage` span each), drop expired state objects, and report the state
/// usage intervals closed since (one `state.usage` span each).
async fn housekeeping(core: Arc<Invoker>, mut shutdown: watch::Receiver<bool>) {
    core.telemetry.resume_spooled();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                core.functions.reap_idle();
                core.telemetry.emit_instance_usage(core.functions.take_instance_usage());
                // Closing the boundaries sweeps what expired, too.
                core.telemetry.emit_state_usage(core.state.take_usage());
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// A started core: its bound address and the handle that stops it.
pub struct RunningCore {
    pub core: Arc<Core>,
    pub gateway_addr: SocketAddr,
    /// The state store's Redis protocol listener, when served.
    pub state_redis_addr: Option<SocketAddr>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningCore {
    /// Stops accepting requests, lets in-flight requests and async deliveries finish, reports
    /// the state usage up to now (the current partial interval included), and flushes the spans.
    pub async fn shutdown(self) {
        self.core.stop.send_replace(true);
        let _ = self.server.await;
        for task in self.tasks {
            let _ = task.await;
        }
        let invoker = &self.core.invoker;
        invoker.functions.stop_instances();
        invoker.telemetry.emit_instance_usage(invoker.functions.take_instance_usage());
        invoker.telemetry.emit_state_usage(invoker.state.take_usage_final());
        let invoker = invoker.clone();
        let _ = tokio::task::spawn_blocking(move || invoker.telemetry.shutdown()).await;
        self.core.pool.close().await;
    }
}
