//! Running the servers: the core, the collector and the dashboard, alone or together (`sfaas
//! up`), with the tokens and plans that tie them together.

use anyhow::Context;
use stateful_faas_core::Core;
use stateful_faas_core::telemetry::OtlpProtocol;
use stateful_faas_core::tenant::{Principal, Scope};

use crate::args::{CollectorArgs, CoreArgs, DashboardArgs, DataArgs, PlatformArgs};
use crate::demo;

/// What every serving process does first: files it creates (databases, tokens, spool) are its
/// own only (umask 077), and it is not dumpable, so no process of another uid, such as a
/// sandboxed function, can read its memory or its `/proc` entries (environment, maps).
fn harden_process() {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        libc::umask(0o077);
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
    }
}

/// Runs the core, and with `platform` (`sfaas up`) a collector and a dashboard beside it, its
/// spans going to the collector with the platform's meter token.
pub async fn serve(data: DataArgs, args: CoreArgs, platform: Option<PlatformArgs>) -> anyhow::Result<()> {
    harden_process();
    let stopping = shutdown_signal();
    let with_collector = platform.is_some();
    let config = args.config(&data.data_dir)?;
    let data_dir = config.data_dir.clone();
    let core = Core::open(config).await.context("starting the core")?;
    let mut addresses = serde_json::Map::new();
    let collector = if let Some(platform) = &platform {
        let meter_token =
            stateful_faas_core::config::load_or_create_token(&stateful_faas_core::config::meter_token_path(&data_dir))
                .context("creating the meter token")?;
        core.invoker.tenants.ensure_meter_token(&meter_token).await?;
        let config = collector_config(&data, &platform.collector)?;
        let resolver = std::sync::Arc::new(Tokens::Core(core.invoker.tenants.clone()));
        let running = collector::Collector::start(config, resolver).await.context("starting the collector")?;
        if args.otlp_endpoint.is_none() {
            core.invoker.telemetry.set_export(
                format!("http://{}", running.otlp_grpc_addr),
                OtlpProtocol::Grpc,
                Some(meter_token.clone()),
            );
        }
        addresses.insert("otlp_grpc".into(), running.otlp_grpc_addr.to_string().into());
        addresses.insert("otlp_http".into(), running.otlp_http_addr.to_string().into());
        addresses.insert("jaeger".into(), running.jaeger_addr.to_string().into());
        Some((running, meter_token))
    } else {
        None
    };
    // The gateway's counters, stored in the collector on demand (a settled reconciliation) and
    // at shutdown; the scrape target is known once the gateway listens.
    let counters = collector.as_ref().map(|(running, _)| {
        std::sync::Arc::new(UpSettle {
            core: core.clone(),
            collector: running.collector.clone(),
            target: std::sync::OnceLock::new(),
        })
    });
    let dashboard = match (&collector, &platform) {
        (Some((running, _)), Some(platform)) => {
            let _ = core.log_reader.set(std::sync::Arc::new(StoredLogs(running.collector.store.clone())));
            publish_tokens(core.invoker.tenants.clone(), running.collector.store.clone());
            let billing =
                std::sync::Arc::new(billing::Billing::open(&running.collector.store).await.context("opening billing")?);
            follow_plans(billing.clone(), Some(core.clone()), Some(running.collector.pipeline.clone())).await;
            let viewers = std::sync::Arc::new(Tokens::Core(core.invoker.tenants.clone()));
            let store = running.collector.store.clone();
            let mut config = dashboard_config(&platform.dashboard);
            config.collector_metrics_url = Some(format!("http://{}/metrics", running.otlp_http_addr));
            config.settle = counters.clone().map(|counters| counters as std::sync::Arc<dyn billing::api::Settle>);
            let dashboard = dashboard::start(config, store, billing, viewers).await?;
            addresses.insert("ui".into(), dashboard.addr.to_string().into());
            Some(dashboard)
        }
        _ => {
            // The core alone: it publishes its tokens in the telemetry database (for collectors and
            // dashboards elsewhere), and its quotas follow the plans there.
            match telemetry_store(&data).await {
                Ok(store) => {
                    let _ = core.log_reader.set(std::sync::Arc::new(StoredLogs(store.clone())));
                    publish_tokens(core.invoker.tenants.clone(), store.clone());
                    let billing = billing::Billing::open(&store).await.context("opening billing")?;
                    follow_plans(std::sync::Arc::new(billing), Some(core.clone()), None).await;
                }
                Err(error) => eprintln!(
                    "sfaas: WARNING: the telemetry database cannot be opened ({error}); tenants' quotas are the \
                     --tenant-… flags' for all, whatever their plans say, and collectors and dashboards of their \
                     own know none of this core's tokens"
                ),
            }
            None
        }
    };
    let running = core.start().await?;
    // The gateway's metrics reach the collector too: scraped with the meter token, each series
    // under the tenant its `namespace` label names.
    let collector = collector.map(|(mut collector, meter_token)| {
        let url = format!("http://{}/metrics", running.gateway_addr);
        let mut target = collector::receivers::scrape::platform_target(url, meter_token);
        let scrape_secs = platform.as_ref().map_or(1, |platform| platform.platform_scrape_secs);
        let interval = std::time::Duration::from_secs(scrape_secs.max(1));
        target.interval = Some(interval);
        target.timeout = target.timeout.map(|timeout| timeout.min(interval));
        collector.scrape(target.clone());
        if let Some(counters) = &counters {
            let _ = counters.target.set(target);
        }
        collector
    });
    addresses.insert("gateway".into(), running.gateway_addr.to_string().into());
    if let Some(addr) = running.state_redis_addr {
        addresses.insert("state_redis".into(), addr.to_string().into());
    }
    announce(&data_dir, addresses, with_collector)?;
    eprintln!(
        "sfaas is up: gateway http://{}{}{}{} (admin token in {}); Ctrl-C stops",
        running.gateway_addr,
        running.state_redis_addr.map_or(String::new(), |addr| format!(", state store (Redis protocol) redis://{addr}")),
        collector.as_ref().map_or(String::new(), |c| format!(
            ", OTLP gRPC {} and HTTP http://{}",
            c.otlp_grpc_addr, c.otlp_http_addr
        )),
        dashboard.as_ref().map_or(String::new(), |d| format!(", dashboard http://{}", d.addr)),
        stateful_faas_core::config::admin_token_path(&data_dir).display()
    );
    let demo = match (&dashboard, platform.as_ref().is_some_and(|platform| platform.demo)) {
        (Some(dashboard), true) => {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let admin = match std::env::var("SFAAS_ADMIN_TOKEN") {
                Ok(token) if !token.is_empty() => token,
                _ => std::fs::read_to_string(stateful_faas_core::config::admin_token_path(&data_dir))
                    .context("the admin token for the demo")?
                    .trim()
                    .to_string(),
            };
            let (gateway, ui) = (format!("http://{}", running.gateway_addr), format!("http://{}", dashboard.addr));
            let dir = data_dir.clone();
            let task = tokio::spawn(async move {
                if let Err(error) = demo::run(gateway, ui, admin, &dir, stopped).await {
                    eprintln!("sfaas demo: stopped: {error:#}");
                }
            });
            Some((stop, task))
        }
        _ => None,
    };
    stopping.await;
    eprintln!("sfaas: shutting down (finishing in-flight calls, flushing spans, committing telemetry)");
    if let Some((stop, task)) = demo {
        let _ = stop.send(true);
        let _ = task.await;
    }
    running.shutdown().await;
    // The gateway's final counts, read once it served its last call: reconciliation then
    // compares them with every metered span, to the last one.
    if let Some(counters) = &counters
        && let Err(error) = counters.store_counters().await
    {
        eprintln!("sfaas: the gateway's final counters were not stored: {error}");
    }
    if let Some(collector) = collector {
        collector.shutdown().await;
    }
    if let Some(dashboard) = dashboard {
        dashboard.shutdown().await;
    }
    eprintln!("sfaas: stopped");
    Ok(())
}

/// Prints the bound addresses as one JSON line (docs/contracts.md, "Addresses and the command
/// line") after writing them to `DATA_DIR/addresses.json` (replaced atomically), so that
/// whoever reads the line finds the file up to date. Unless `replace`, the file keeps the
/// addresses of components that run in other processes on the same data directory.
fn announce(
    data_dir: &std::path::Path,
    ours: serde_json::Map<String, serde_json::Value>,
    replace: bool,
) -> anyhow::Result<()> {
    let file = data_dir.join("addresses.json");
    let mut all = if replace {
        serde_json::Map::new()
    } else {
        std::fs::read_to_string(&file).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    };
    all.extend(ours.clone());
    // A name of our own: components starting together on one data directory must not rename
    // each other's half-written file.
    let temporary = data_dir.join(format!("addresses.json.{}.tmp", std::process::id()));
    std::fs::write(&temporary, format!("{}\n", serde_json::Value::Object(all))).context("writing addresses.json")?;
    std::fs::rename(&temporary, &file).context("writing addresses.json")?;
    println!("{}", serde_json::Value::Object(ours));
    Ok(())
}

/// `sfaas collector`: the collector alone, checking the tokens the core published in the
/// telemetry database (re-read every two seconds, so tenants created by a running core are known).
pub async fn serve_collector(data: DataArgs, args: CollectorArgs) -> anyhow::Result<()> {
    harden_process();
    let stopping = shutdown_signal();
    let data_dir = data.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let tokens = Tokens::published();
    let running = collector::Collector::start(collector_config(&data, &args)?, std::sync::Arc::new(tokens.clone()))
        .await
        .context("starting the collector")?;
    tokens.follow(&running.collector.store).await?;
    let billing = billing::Billing::open(&running.collector.store).await.context("opening billing")?;
    follow_plans(std::sync::Arc::new(billing), None, Some(running.collector.pipeline.clone())).await;
    let mut addresses = serde_json::Map::new();
    addresses.insert("otlp_grpc".into(), running.otlp_grpc_addr.to_string().into());
    addresses.insert("otlp_http".into(), running.otlp_http_addr.to_string().into());
    addresses.insert("jaeger".into(), running.jaeger_addr.to_string().into());
    announce(&data_dir, addresses, false)?;
    eprintln!(
        "sfaas collector is up: OTLP gRPC {}, HTTP http://{}; Ctrl-C stops",
        running.otlp_grpc_addr, running.otlp_http_addr
    );
    stopping.await;
    running.shutdown().await;
    Ok(())
}

/// `sfaas dashboard`: the billing API over the telemetry store, checking the tokens the core
/// published there.
pub async fn serve_dashboard(data: DataArgs, args: DashboardArgs) -> anyhow::Result<()> {
    harden_process();
    let stopping = shutdown_signal();
    let data_dir = data.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let store = telemetry_store(&data).await?;
    let viewers = Tokens::published();
    viewers.follow(&store).await?;
    let billing = billing::Billing::open(&store).await.context("opening billing")?;
    let mut config = dashboard_config(&args);
    // A collector running beside it on the same data directory, if any.
    config.collector_metrics_url = std::fs::read_to_string(data_dir.join("addresses.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|addresses| addresses["otlp_http"].as_str().map(|a| format!("http://{a}/metrics")));
    let running = dashboard::start(config, store, std::sync::Arc::new(billing), std::sync::Arc::new(viewers)).await?;
    let mut addresses = serde_json::Map::new();
    addresses.insert("ui".into(), running.addr.to_string().into());
    announce(&data_dir, addresses, false)?;
    eprintln!("sfaas dashboard is up: http://{}; Ctrl-C stops", running.addr);
    stopping.await;
    running.shutdown().await;
    Ok(())
}

fn dashboard_config(args: &DashboardArgs) -> dashboard::DashboardConfig {
    dashboard::DashboardConfig {
        addr: args.ui_addr,
        billing_every: (args.billing_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(args.billing_interval_secs)),
        collector_metrics_url: None,
        settle: None,
    }
}

/// `sfaas up`'s side of a settled reconciliation: the core's spans flushed and its counters
/// stored as the platform scrape would store them, now.
struct UpSettle {
    core: std::sync::Arc<stateful_faas_core::Core>,
    collector: std::sync::Arc<collector::Collector>,
    /// The platform's scrape target, once the gateway listens.
    target: std::sync::OnceLock<collector::receivers::scrape::ScrapeTarget>,
}

impl UpSettle {
    /// Stores the gateway's counters as they are now, as the platform scrape would.
    async fn store_counters(&self) -> Result<(), String> {
        let target = self.target.get().ok_or("the gateway is not serving yet")?;
        let text = self.core.invoker.metrics.encode_openmetrics();
        self.collector.store_exposition(target, &text).await.map_err(|e| e.to_string())
    }
}

impl billing::api::Settle for UpSettle {
    fn settle(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let core = self.core.clone();
            tokio::task::spawn_blocking(move || core.invoker.telemetry.flush()).await.map_err(|e| e.to_string())?;
            self.store_counters().await
        })
    }
}

/// Applies the limits of tenants' plans to the core's and the collector's quotas now, then
/// follows the rate card: re-read whenever billing's generation changes (checked every two
/// seconds) and at least every minute (a plan change may take effect later than it was made).
async fn follow_plans(
    billing: std::sync::Arc<billing::Billing>,
    core: Option<std::sync::Arc<Core>>,
    pipeline: Option<collector::pipeline::Pipeline>,
) {
    let plans = PlanLimits { billing, core, pipeline };
    let mut seen = plans.refresh(None).await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            seen = plans.refresh(seen).await;
        }
    });
}

/// Where the limits of tenants' plans go.
struct PlanLimits {
    billing: std::sync::Arc<billing::Billing>,
    core: Option<std::sync::Arc<Core>>,
    pipeline: Option<collector::pipeline::Pipeline>,
}

impl PlanLimits {
    /// Applies the plans' limits unless billing's generation is still the one `seen` applied,
    /// less than a minute ago; returns what is applied now.
    async fn refresh(&self, seen: Option<(u64, std::time::Instant)>) -> Option<(u64, std::time::Instant)> {
        let generation = self.billing.version().await;
        if seen.is_some_and(|(applied, at)| applied == generation && at.elapsed().as_secs() < 60) {
            return seen;
        }
        match self.billing.limits_now().await {
            Ok((fallback, tenants)) => {
                self.apply(&fallback, &tenants);
                Some((generation, std::time::Instant::now()))
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the plans' limits; the quotas stay as they were");
                seen
            }
        }
    }

    fn apply(
        &self,
        fallback: &billing::plans::Limits,
        tenants: &std::collections::BTreeMap<String, billing::plans::Limits>,
    ) {
        use billing::plans::Limits;
        if let Some(core) = &self.core {
            let of = |l: &Limits| stateful_faas_core::quota::Limits {
                functions: l.functions,
                flows: l.flows,
                instances: l.instances,
                async_calls: l.async_calls,
                async_bytes: l.async_bytes,
                state_bytes: l.state_bytes,
                state_jobs: l.state_jobs,
            };
            core.set_plan_limits(of(fallback), tenants.iter().map(|(t, l)| (t.clone(), of(l))).collect());
        }
        if let Some(pipeline) = &self.pipeline {
            let default = pipeline.default_quota();
            let of = |l: &Limits| collector::pipeline::TenantQuota {
                spans_per_second: l.ingest_spans_per_second.unwrap_or(default.spans_per_second),
                samples_per_second: l.ingest_samples_per_second.unwrap_or(default.samples_per_second),
                bytes_per_day: l.ingest_bytes_per_day.unwrap_or(default.bytes_per_day),
            };
            pipeline.set_plan_quotas(of(fallback), tenants.iter().map(|(t, l)| (t.clone(), of(l))).collect());
        }
    }
}

fn telemetry_url(args: &DataArgs) -> String {
    args.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("telemetry.db").display()))
}

/// Where spans are stored in blocks: `DATA_DIR/blocks`, whichever database holds the rest.
fn blocks_dir(args: &DataArgs) -> std::path::PathBuf {
    args.data_dir.join("blocks")
}

/// The object store that span blocks go to, if `--blocks-url` names one.
fn blocks_remote(args: &DataArgs) -> anyhow::Result<Option<collector::store::blocks::remote::Remote>> {
    let Some(url) = &args.blocks_url else { return Ok(None) };
    let remote = collector::store::blocks::remote::Remote::s3(url, args.blocks_endpoint.as_deref(), None)
        .with_context(|| format!("--blocks-url {url}"))?
        .with_cache_limit(args.blocks_cache_mib << 20);
    Ok(Some(remote))
}

/// The gateway's `/system/logs` reads function logs from the telemetry store.
struct StoredLogs(collector::store::TelemetryStore);

impl stateful_faas_core::gateway::logs::LogReader for StoredLogs {
    fn read(
        &self,
        query: stateful_faas_core::gateway::logs::LogRead,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<stateful_faas_core::gateway::logs::LogLine>, String>>
                + Send
                + '_,
        >,
    > {
        use collector::store::{LogCursor, LogQuery};
        use stateful_faas_core::semconv;
        Box::pin(async move {
            let query = LogQuery {
                tenant: query.tenant,
                function: query.function,
                invocation: query.invocation,
                trace_id: None,
                contains: None,
                severity: None,
                since_ns: query.since_ns,
                until_ns: None,
                after: query.after.map(|(received_ms, record_hash)| LogCursor { received_ms, record_hash }),
                limit: query.limit,
            };
            let logs = self.0.function_logs(&query).await.map_err(|error| error.to_string())?;
            Ok(logs
                .into_iter()
                .map(|log| {
                    let attributes: serde_json::Value = serde_json::from_str(&log.attributes).unwrap_or_default();
                    let text = |key: &str| attributes.get(key).and_then(|v| v.as_str()).map(str::to_string);
                    stateful_faas_core::gateway::logs::LogLine {
                        ts_ns: log.ts_ns,
                        function: text(semconv::FAAS_NAME).unwrap_or_default(),
                        instance: text(semconv::FAAS_INSTANCE).unwrap_or_default(),
                        invocation_id: text(semconv::FAAS_INVOCATION_ID),
                        severity: log.severity_text,
                        text: log.body,
                        cursor: (log.cursor.received_ms, log.cursor.record_hash),
                    }
                })
                .collect())
        })
    }
}

async fn telemetry_store(args: &DataArgs) -> anyhow::Result<collector::store::TelemetryStore> {
    let remote = blocks_remote(args)?;
    Ok(collector::store::TelemetryStore::open_with_remote_blocks(&telemetry_url(args), &blocks_dir(args), remote)
        .await?)
}

/// The collector's configuration from the command line.
fn collector_config(data: &DataArgs, args: &CollectorArgs) -> anyhow::Result<collector::CollectorConfig> {
    let mut config = collector::CollectorConfig::new(telemetry_url(data));
    config.blocks_dir = Some(blocks_dir(data));
    config.blocks_remote = blocks_remote(data)?;
    config.otlp_grpc_addr = args.otlp_grpc_addr;
    config.otlp_http_addr = args.otlp_http_addr;
    config.jaeger_addr = args.jaeger_addr;
    config.retention = std::time::Duration::from_secs(args.retention_hours * 3600);
    config.pipeline.tenant_quota = collector::pipeline::TenantQuota {
        spans_per_second: args.tenant_ingest_spans_per_second,
        samples_per_second: args.tenant_ingest_samples_per_second,
        bytes_per_day: args.tenant_ingest_bytes_per_day,
    };
    config.metric_names = args.otlp_metric_names;
    config.tenant_retention = args
        .tenant_retention
        .iter()
        .map(|(tenant, hours)| (tenant.clone(), std::time::Duration::from_secs(hours * 3600)))
        .collect();
    if let Some(path) = &args.scrape_config {
        config.scrape = collector::receivers::scrape::load(path).map_err(anyhow::Error::msg)?;
    }
    Ok(config)
}

/// Who a token belongs to: the core's tenant store, in the core's process, or the token hashes
/// the core published in the telemetry database, for a collector or dashboard of its own.
#[derive(Clone)]
enum Tokens {
    Core(std::sync::Arc<stateful_faas_core::tenant::TenantStore>),
    Published(std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, Principal>>>),
}

impl Tokens {
    fn principal(&self, token: &str) -> Option<Principal> {
        match self {
            Tokens::Core(store) => store.authenticate(token),
            Tokens::Published(tokens) => {
                tokens.read().unwrap().get(&stateful_faas_core::tenant::hash_token(token)).cloned()
            }
        }
    }

    /// An empty set of published tokens, to be filled by [`Self::follow`].
    fn published() -> Self {
        Tokens::Published(Default::default())
    }

    /// Reads the tokens the core published in `store`, then again every two seconds (so that
    /// tenants created by a running core are known).
    async fn follow(&self, store: &collector::store::TelemetryStore) -> anyhow::Result<()> {
        let Tokens::Published(tokens) = self else { return Ok(()) };
        let read = |store: collector::store::TelemetryStore, tokens: std::sync::Arc<std::sync::RwLock<_>>| async move {
            let map: std::collections::HashMap<String, Principal> = store
                .published_tokens()
                .await?
                .into_iter()
                .filter_map(|t| Some((t.hash, stateful_faas_core::tenant::principal(t.tenant.as_deref(), &t.scope)?)))
                .collect();
            let empty = map.is_empty();
            *tokens.write().unwrap() = map;
            Ok::<bool, collector::store::StoreError>(empty)
        };
        if read(store.clone(), tokens.clone()).await.context("reading the tokens the core published")? {
            eprintln!(
                "sfaas: WARNING: no core has published its tokens in this telemetry database yet; every token is \
                 refused until `sfaas up` or `sfaas core` runs with the same --database-url"
            );
        }
        let (store, tokens) = (store.clone(), tokens.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                if let Err(error) = read(store.clone(), tokens.clone()).await {
                    tracing::warn!(%error, "cannot re-read the published tokens");
                }
            }
        });
        Ok(())
    }
}

/// Publishes the core's tokens in the telemetry database (hashes only), at once and whenever a
/// token is added, so that collectors and dashboards on other hosts check the same tokens.
fn publish_tokens(
    tenants: std::sync::Arc<stateful_faas_core::tenant::TenantStore>,
    store: collector::store::TelemetryStore,
) {
    tokio::spawn(async move {
        loop {
            let published = async {
                let tokens: Vec<_> = tenants
                    .accepted()
                    .await?
                    .into_iter()
                    .map(|(hash, tenant, scope)| collector::store::PublishedToken { hash, tenant, scope })
                    .collect();
                anyhow::Ok(store.publish_tokens(&tokens).await?)
            };
            if let Err(error) = published.await {
                tracing::warn!(%error, "cannot publish the tokens in the telemetry database; tried again in 10 s");
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                continue;
            }
            tenants.token_added().await;
        }
    });
}

/// The dashboard's viewers: the admin token, and tenants' read tokens.
impl billing::api::ViewerResolver for Tokens {
    fn resolve(&self, token: &str) -> Option<contract::Viewer> {
        match self.principal(token)? {
            Principal::Admin => Some(contract::Viewer::Admin),
            Principal::Tenant { tenant, scope: Scope::Read } => Some(contract::Viewer::Tenant(tenant.to_string())),
            _ => None,
        }
    }
}

/// The collector's senders: tenants' ingest tokens and the platform's meter token.
impl collector::auth::TokenResolver for Tokens {
    fn resolve(&self, token: &str) -> Option<collector::auth::Credential> {
        match self.principal(token)? {
            Principal::Tenant { tenant, scope: Scope::Ingest } => {
                Some(collector::auth::Credential::Ingest { tenant: tenant.to_string() })
            }
            Principal::Meter => Some(collector::auth::Credential::Meter),
            _ => None,
        }
    }
}

/// Ctrl-C or SIGTERM, listened for from the call on (the default action, death, is replaced at
/// once: a signal that comes before the server awaits it still shuts it down cleanly).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}
