//! The dashboard address (`--ui-addr`): the web UI, the billing API under `/billing`, and the
//! Grafana datasource APIs (the Jaeger v1 query API under `/api`, the Prometheus HTTP API under
//! `/prometheus`, Loki's under `/loki/api/v1`). It also runs billing periodically, so that invoices follow usage without
//! anyone calling `sfaas bill run`.

#[cfg(feature = "bench")]
pub mod bench;
pub mod charts;
pub mod dag;
pub mod jaeger;
pub mod loki;
pub mod prometheus;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use billing::Billing;
use billing::api::{ApiError, ApiState, ViewerResolver};
use collector::store::TelemetryStore;
use contract::Viewer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

pub struct DashboardConfig {
    pub addr: SocketAddr,
    /// How often billing runs in the background (`None`: never; `sfaas bill run` only).
    pub billing_every: Option<Duration>,
    /// The collector's own `/metrics`, for the health page.
    pub collector_metrics_url: Option<String>,
    /// The platform's side of a settled reconciliation (`sfaas up` only).
    pub settle: Option<Arc<dyn billing::api::Settle>>,
}

/// A started dashboard.
pub struct RunningDashboard {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What every handler of the dashboard address reads.
#[derive(Clone)]
pub struct DashboardState {
    pub store: TelemetryStore,
    pub billing: Arc<Billing>,
    pub resolver: Arc<dyn ViewerResolver>,
    /// The platform's side of a settled reconciliation (`sfaas up` only).
    pub settle: Option<Arc<dyn billing::api::Settle>>,
}

impl DashboardState {
    /// The caller, from `Authorization` (Bearer, or Basic with the token as password), with
    /// `X-Scope-OrgID` honoured when it agrees with the token's tenant.
    pub fn viewer(&self, headers: &axum::http::HeaderMap) -> Result<Viewer, ApiError> {
        billing::api::authenticate(self.resolver.as_ref(), headers)
    }
}

/// The tenant a request names in `X-Scope-OrgID`, if it names one (the admin's way of reading
/// one tenant through a datasource).
pub(crate) fn scope_org_id(headers: &axum::http::HeaderMap) -> Option<String> {
    let org = headers.get(contract::semconv::HEADER_SCOPE_ORG_ID).and_then(|v| v.to_str().ok()).map(str::trim);
    org.filter(|org| !org.is_empty()).map(str::to_string)
}

/// Every route of the dashboard address.
pub fn app(state: DashboardState, ui: ui::UiConfig) -> Router {
    // PromQL and LogQL queries wait for the same places: a tenant's queries of both kinds
    // together hold at most half of them.
    let places = prometheus::places::Places::per_core();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(billing::api::router(ApiState {
            billing: state.billing.clone(),
            resolver: state.resolver.clone(),
            settle: state.settle.clone(),
        }))
        .merge(jaeger::router(state.clone()))
        .merge(prometheus::routes(state.clone(), prometheus::Options::default(), places.clone()))
        .merge(loki::routes(state.clone(), places))
        .merge(ui::router(state, ui))
        .layer(axum::middleware::from_fn(collector::catch_panic))
}

pub async fn start(
    config: DashboardConfig,
    store: TelemetryStore,
    billing: Arc<Billing>,
    resolver: Arc<dyn ViewerResolver>,
) -> Result<RunningDashboard, DashboardError> {
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| DashboardError::Bind { addr: config.addr, source })?;
    let addr = listener.local_addr().map_err(|source| DashboardError::Bind { addr: config.addr, source })?;
    let ui = ui::UiConfig { collector_metrics_url: config.collector_metrics_url.clone() };
    let app = app(DashboardState { store, billing: billing.clone(), resolver, settle: config.settle.clone() }, ui);
    let (shutdown, mut stop) = watch::channel(false);
    let mut server_stop = shutdown.subscribe();
    let mut tasks = vec![tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "dashboard stopped with an error");
        }
    })];
    if let Some(every) = config.billing_every {
        // Billing runs are heavy and no request waits on them.
        tasks.push(collector::background::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                match billing.run(None).await {
                    Ok(report) if report.records > 0 || report.invoices_finalized > 0 => {
                        tracing::info!(?report, "billing run");
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "billing run failed; retrying at the next interval"),
                }
                if let Err(error) = billing.merge_segments().await {
                    tracing::warn!(%error, "merging usage segments failed; retrying after the next run");
                }
            }
        }));
    }
    Ok(RunningDashboard { addr, shutdown, tasks })
}

impl RunningDashboard {
    /// Stops serving; a billing run under way finishes first (its work is one transaction per
    /// chunk, so stopping between chunks loses nothing either).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The client of `http_get`: no proxy (the targets are the collector's `/metrics` and the
/// benchmark's own dashboard), 2 s to connect, 30 s for the whole answer, and a new connection
/// per request, so that the benchmark's timings include connecting, as they always have.
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .expect("a plain HTTP client builds")
}

/// A GET (the collector's metrics; the benchmark): the status and the body, or `None` when
/// there is no answer in time.
pub(crate) async fn http_get(
    client: &reqwest::Client,
    target: &str,
    authorization: Option<&str>,
) -> Option<(u16, String)> {
    let mut request = client.get(target);
    if let Some(authorization) = authorization {
        request = request.header(reqwest::header::AUTHORIZATION, authorization);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.text().await.ok()?;
    Some((status, body))
}
