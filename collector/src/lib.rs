//! The collector: receivers for OTLP (HTTP and gRPC), tenant resolution and token checks, a
//! bounded ingest pipeline, and the telemetry store (SQLite and PostgreSQL through sqlx). It
//! owns the telemetry schema.

pub mod auth;
pub mod background;
#[cfg(any(test, feature = "bench"))]
pub mod bench;
pub mod clock;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod receivers;
pub mod sqlite;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use auth::TokenResolver;
use metrics::CollectorMetrics;
use pipeline::{Pipeline, PipelineConfig};
use store::{StoreError, TelemetryStore};

/// Configuration of the collector.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// `sqlite://PATH` or `postgres://...`.
    pub database_url: String,
    /// Where spans are stored in blocks (by default beside a SQLite database's file; a store
    /// on PostgreSQL needs one).
    pub blocks_dir: Option<std::path::PathBuf>,
    /// An object store that blocks go to (`blocks_dir` is then this host's cache of them).
    pub blocks_remote: Option<store::blocks::remote::Remote>,
    pub otlp_grpc_addr: SocketAddr,
    pub otlp_http_addr: SocketAddr,
    /// Jaeger thrift over HTTP (`POST /api/traces`).
    pub jaeger_addr: SocketAddr,
    /// Largest request (after decompression), in bytes (413 / RESOURCE_EXHAUSTED beyond).
    pub max_body_bytes: usize,
    pub pipeline: PipelineConfig,
    /// How long telemetry is kept (spans, samples, logs), unless the tenant has its own period.
    pub retention: Duration,
    /// Tenants' own retention periods.
    pub tenant_retention: std::collections::BTreeMap<String, Duration>,
    /// Targets to scrape (see [`receivers::scrape`]).
    pub scrape: Vec<receivers::scrape::ScrapeTarget>,
    /// What "now" is for arrival times, scrapes and retention (the system's by default).
    pub clock: clock::Clock,
    /// How OTLP metrics are named: as Prometheus's OTLP receiver names them (the default), or
    /// as sent.
    pub metric_names: receivers::prometheus_names::MetricNames,
}

impl CollectorConfig {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            blocks_dir: None,
            blocks_remote: None,
            otlp_grpc_addr: SocketAddr::from(([127, 0, 0, 1], 4317)),
            otlp_http_addr: SocketAddr::from(([127, 0, 0, 1], 4318)),
            jaeger_addr: SocketAddr::from(([127, 0, 0, 1], 14268)),
            max_body_bytes: 16 << 20,
            pipeline: PipelineConfig::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            tenant_retention: Default::default(),
            scrape: Vec::new(),
            clock: clock::Clock::system(),
            metric_names: Default::default(),
        }
    }
}

/// Why the collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// What the receivers share.
pub struct Collector {
    pub config: CollectorConfig,
    pub store: TelemetryStore,
    pub pipeline: Pipeline,
    pub resolver: Arc<dyn TokenResolver>,
    pub metrics: Arc<CollectorMetrics>,
}

/// A running collector: its bound addresses and the switch that stops it.
pub struct RunningCollector {
    pub collector: Arc<Collector>,
    pub otlp_grpc_addr: SocketAddr,
    pub otlp_http_addr: SocketAddr,
    pub jaeger_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningCollector {
    /// Starts scraping one more target (for targets known only once the collector runs).
    pub fn scrape(&mut self, target: receivers::scrape::ScrapeTarget) {
        let tasks = receivers::scrape::spawn(self.collector.clone(), vec![target], self.shutdown.subscribe());
        self.tasks.extend(tasks);
    }
}

impl Collector {
    /// Stores an exposition of `target` read in process (a target that is stopping, or one
    /// read now to settle a reconciliation), as metered samples.
    pub async fn store_exposition(
        &self,
        target: &receivers::scrape::ScrapeTarget,
        text: &str,
    ) -> Result<(), pipeline::SubmitError> {
        let batch = receivers::scrape::exposition(target, text, true, self.store.clock().now_ns());
        self.pipeline.submit(batch, pipeline::Source::Meter).await.map(|_| ())
    }

    /// Opens the store, binds the receivers and starts serving.
    pub async fn start(
        config: CollectorConfig,
        resolver: Arc<dyn TokenResolver>,
    ) -> Result<RunningCollector, CollectorError> {
        let store = match (&config.blocks_dir, &config.blocks_remote) {
            (Some(blocks), remote) => {
                TelemetryStore::open_with_remote_blocks(&config.database_url, blocks, remote.clone()).await?
            }
            (None, None) => TelemetryStore::open(&config.database_url).await?,
            (None, Some(_)) => {
                return Err(StoreError::Open(sqlx::Error::Configuration(
                    "blocks on an object store need a local folder for their cache (blocks_dir)".into(),
                ))
                .into());
            }
        }
        .with_clock(config.clock.clone());
        let metrics = Arc::new(CollectorMetrics::default());
        let pipeline = Pipeline::start(store.clone(), config.pipeline.clone(), metrics.clone());
        let collector = Arc::new(Collector { config: config.clone(), store, pipeline, resolver, metrics });
        let (shutdown, stop) = watch::channel(false);

        let http = tokio::net::TcpListener::bind(config.otlp_http_addr)
            .await
            .map_err(|e| CollectorError::Listen(config.otlp_http_addr, e))?;
        let otlp_http_addr = http.local_addr().map_err(|e| CollectorError::Listen(config.otlp_http_addr, e))?;
        let grpc = tokio::net::TcpListener::bind(config.otlp_grpc_addr)
            .await
            .map_err(|e| CollectorError::Listen(config.otlp_grpc_addr, e))?;
        let otlp_grpc_addr = grpc.local_addr().map_err(|e| CollectorError::Listen(config.otlp_grpc_addr, e))?;
        let jaeger = tokio::net::TcpListener::bind(config.jaeger_addr)
            .await
            .map_err(|e| CollectorError::Listen(config.jaeger_addr, e))?;
        let jaeger_addr = jaeger.local_addr().map_err(|e| CollectorError::Listen(config.jaeger_addr, e))?;

        let router = Router::new()
            .route("/v1/traces", post(receivers::otlp_http::traces))
            .route("/v1/metrics", post(receivers::otlp_http::metrics))
            .route("/v1/logs", post(receivers::otlp_http::logs))
            .route("/api/v1/write", post(receivers::remote_write::write))
            .route("/healthz", get(|| async { "OK\n" }))
            .route("/metrics", get(own_metrics))
            .layer(DefaultBodyLimit::max(config.max_body_bytes))
            .layer(axum::middleware::from_fn(catch_panic))
            .with_state(collector.clone());
        let jaeger_router = Router::new()
            .route("/api/traces", post(receivers::jaeger_thrift::traces))
            .layer(DefaultBodyLimit::max(config.max_body_bytes))
            .layer(axum::middleware::from_fn(catch_panic))
            .with_state(collector.clone());
        let mut tasks = vec![
            serve_http(http, router, stop.clone(), "OTLP/HTTP"),
            serve_http(jaeger, jaeger_router, stop.clone(), "Jaeger"),
        ];

        let (traces, metrics_service, logs) =
            receivers::otlp_grpc::Services(collector.clone()).servers(config.max_body_bytes);
        let mut grpc_stop = stop.clone();
        tasks.push(background::spawn(async move {
            // Large frames and windows: an export of a few hundred KiB arrives in a frame or
            // two instead of dozens of 16 KiB ones (each a wake-up and a copy on both sides);
            // a request is buffered whole anyway, up to the body limit.
            let serve = tonic::transport::Server::builder()
                .max_frame_size(1 << 20)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(4 << 20)
                .add_service(traces)
                .add_service(metrics_service)
                .add_service(logs)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc), async move {
                    let _ = grpc_stop.wait_for(|s| *s).await;
                });
            if let Err(error) = serve.await {
                tracing::error!(%error, "OTLP/gRPC receiver stopped");
            }
        }));
        tasks.extend(receivers::scrape::spawn(collector.clone(), config.scrape.clone(), stop.clone()));
        tasks.push(background::spawn(retention(collector.clone(), stop)));
        Ok(RunningCollector { collector, otlp_grpc_addr, otlp_http_addr, jaeger_addr, shutdown, tasks })
    }
}

/// Answers 500 in plain text when a handler panics ([`contract::panic`]). The dashboard wraps
/// its routes in it too.
pub async fn catch_panic(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    contract::panic::catch_panic(request, next, || {
        let message = "internal error: this request failed (it is in the server's log)\n";
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
    })
    .await
}

fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) -> JoinHandle<()> {
    background::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(error) = serve.await {
            tracing::error!(%error, "{what} receiver stopped");
        }
    })
}

impl RunningCollector {
    /// Stops accepting; requests in flight finish (and are committed) first.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn own_metrics(State(collector): State<Arc<Collector>>) -> String {
    collector.metrics.queue_depth.set(collector.pipeline.depth() as i64);
    collector.metrics.encode()
}

/// Deletes telemetry older than the retention period, every minute (the first a minute after
/// start, when startup's own work is done).
async fn retention(collector: Arc<Collector>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(error) = retention_pass(&collector, collector.store.clock().now_ns()).await {
            tracing::warn!(%error, "retention failed");
        }
    }
}

/// One retention pass as of `now_ns`: every tenant's telemetry older than its period goes.
pub async fn retention_pass(collector: &Collector, now_ns: i64) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for tenant in collector.store.tenants().await? {
        let period = collector.config.tenant_retention.get(&tenant).unwrap_or(&collector.config.retention);
        let period_ns = i64::try_from(period.as_nanos()).unwrap_or(i64::MAX);
        let count = collector.store.delete_before(&tenant, now_ns.saturating_sub(period_ns)).await?;
        if count > 0 {
            tracing::info!(%tenant, deleted = count, "retention: deleted old telemetry");
        }
        deleted += count;
    }
    Ok(deleted)
}
