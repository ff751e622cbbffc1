//! The servers' command-line arguments, in groups: each server command takes only its own
//! (`sfaas core`, `collector`, `dashboard`), and `sfaas up` takes them all.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use stateful_faas_core::CoreConfig;
use stateful_faas_core::function::cgroup::{CgroupConfig, GroupLimits};
use stateful_faas_core::function::sandbox::SandboxConfig;
use stateful_faas_core::telemetry::OtlpProtocol;

/// Where a server keeps its data: every server command takes these.
#[derive(Args)]
pub struct DataArgs {
    /// Data directory: database, admin.token, addresses.json.
    #[arg(long, env = "SFAAS_DATA_DIR", default_value = "./sfaas-data")]
    pub data_dir: PathBuf,
    /// Telemetry store: sqlite://PATH (default DATA_DIR/telemetry.db) or postgres://...
    #[arg(long, env = "SFAAS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Span blocks on an S3-compatible object store: s3://BUCKET/PREFIX (credentials and
    /// region from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION). DATA_DIR/blocks then
    /// caches them. With a PostgreSQL --database-url, hosts that share both serve one store.
    #[arg(long, env = "SFAAS_BLOCKS_URL")]
    pub blocks_url: Option<String>,
    /// The object store's endpoint when it is not AWS (MinIO, s3rver, …), e.g. http://HOST:9000.
    #[arg(long, env = "SFAAS_BLOCKS_ENDPOINT", requires = "blocks_url")]
    pub blocks_endpoint: Option<String>,
    /// With --blocks-url: the most DATA_DIR/blocks may hold of the blocks this host read or
    /// wrote, in MiB (the blocks used longest ago are removed first; they stay in the store).
    #[arg(long, env = "SFAAS_BLOCKS_CACHE_MIB", default_value_t = 4096)]
    pub blocks_cache_mib: u64,
}

/// The core's flags: gateway, functions, state store, async queue, span export (`sfaas up`,
/// `sfaas core`).
#[derive(Args)]
pub struct CoreArgs {
    #[arg(long, env = "SFAAS_GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub gateway_addr: SocketAddr,
    /// The state store over the Redis protocol: HOST:PORT, or `off`. By default the gateway's
    /// host at port 6380, or any free port when the gateway's port is 0.
    #[arg(long, env = "SFAAS_STATE_REDIS_ADDR", value_parser = parse_redis_addr)]
    pub state_redis_addr: Option<RedisAddr>,
    /// Threads serving the Redis protocol, each an event loop of its own (default: half the cores, at least one).
    #[arg(long, env = "SFAAS_STATE_REDIS_THREADS")]
    pub state_redis_threads: Option<usize>,
    /// Connections the Redis protocol listener holds at once (Redis's `maxclients`).
    #[arg(long, env = "SFAAS_STATE_REDIS_MAX_CLIENTS", default_value_t = 10_000)]
    pub state_redis_max_clients: usize,
    /// Connections one tenant may hold authenticated on the Redis protocol listener.
    #[arg(long, env = "SFAAS_STATE_REDIS_TENANT_MAX_CLIENTS", default_value_t = 1_000)]
    pub state_redis_tenant_max_clients: usize,
    /// State store: seconds per reported state usage interval (must divide a day).
    #[arg(long, env = "SFAAS_STATE_USAGE_INTERVAL_SECS", default_value_t = 60)]
    pub state_usage_interval_secs: u64,
    /// OTLP endpoint for the platform's spans (default with `up`: its own collector; with
    /// `core`: off unless set).
    #[arg(long, env = "SFAAS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// grpc or http.
    #[arg(long, env = "SFAAS_OTLP_PROTOCOL", default_value = "grpc")]
    pub otlp_protocol: OtlpProtocol,
    /// Token sent with the spans (the platform's meter token).
    #[arg(long, env = "SFAAS_OTLP_TOKEN")]
    pub otlp_token: Option<String>,
    /// Largest request body, in bytes.
    #[arg(long, env = "SFAAS_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Bytes all invocations' buffers may hold at once (requests' bodies and functions'
    /// responses), half of them one tenant's.
    #[arg(long, env = "SFAAS_BUFFER_BYTES", default_value_t = 1 << 30)]
    pub buffer_bytes: u64,
    /// Concurrent deliveries of async calls.
    #[arg(long, env = "SFAAS_ASYNC_WORKERS", default_value_t = 4)]
    pub async_workers: usize,
    /// State store: bytes all tenants may hold together (each object: its value, its address
    /// and 128 bytes).
    #[arg(long, env = "SFAAS_STATE_BUDGET_BYTES", default_value_t = 4 << 30)]
    pub state_budget_bytes: u64,
    /// State store: bytes one tenant may hold, counted as the budget is.
    #[arg(long, env = "SFAAS_STATE_TENANT_QUOTA_BYTES", default_value_t = 1 << 30)]
    pub state_tenant_quota_bytes: u64,
    /// State store: jobs one tenant may have registered at once.
    #[arg(long, env = "SFAAS_STATE_TENANT_MAX_JOBS", default_value_t = 10_000)]
    pub state_tenant_max_jobs: usize,
    /// State store: jobs a tenant may register a second over HTTP or Redis (bursts of ten times
    /// as many); flow runs' jobs are not counted.
    #[arg(long, env = "SFAAS_STATE_TENANT_JOBS_PER_SECOND", default_value_t = 100)]
    pub state_tenant_jobs_per_second: u32,
    /// State store: largest value.
    #[arg(long, env = "SFAAS_STATE_MAX_VALUE_BYTES", default_value_t = 256 << 20)]
    pub state_max_value_bytes: u64,
    /// Run process functions in sandboxes (on: namespaces, a uid per tenant, seccomp, and
    /// cgroups that limit and meter them; needs root), or as plain child processes (off: they
    /// see the host and the gateway's files and escape metering; see the README).
    #[arg(long, env = "SFAAS_SANDBOX", default_value = "on", value_parser = ["on", "off"])]
    pub sandbox: String,
    /// Sandbox: memory of one invocation or instance, unless the function sets limits.memory.
    #[arg(long, env = "SFAAS_FUNCTION_MEMORY_BYTES", default_value_t = 512 << 20)]
    pub function_memory_bytes: u64,
    /// Sandbox: processes one invocation or instance may have at once.
    #[arg(long, env = "SFAAS_FUNCTION_PIDS", default_value_t = 256)]
    pub function_pids: u64,
    /// Sandbox: memory of all of one tenant's invocations and instances together.
    #[arg(long, env = "SFAAS_TENANT_MEMORY_BYTES", default_value_t = 4 << 30)]
    pub tenant_memory_bytes: u64,
    /// Sandbox: processes of all of one tenant's invocations and instances together.
    #[arg(long, env = "SFAAS_TENANT_PIDS", default_value_t = 1024)]
    pub tenant_pids: u64,
    /// Sandbox: the uids (and gids) tenants' processes run as, FIRST-LAST, one per tenant.
    #[arg(long, env = "SFAAS_SANDBOX_UIDS", default_value = "200000-265535", value_parser = parse_uid_range)]
    pub sandbox_uids: std::ops::RangeInclusive<u32>,
    /// Sandbox: size of each invocation's or instance's private /tmp (counted as its memory).
    #[arg(long, env = "SFAAS_SANDBOX_TMP_BYTES", default_value_t = 64 << 20)]
    pub sandbox_tmp_bytes: u64,
    /// Sandbox: a tenant whose functions may reach outside networks (repeatable). They then
    /// share the host's network, its loopback services included: see the README.
    #[arg(long, env = "SFAAS_SANDBOX_EGRESS", value_delimiter = ',')]
    pub sandbox_egress: Vec<String>,
    /// An internal address that tenants' upstream functions and callbacks may reach: a CIDR
    /// block or a host name (repeatable; by default loopback, private and link-local addresses
    /// are refused).
    #[arg(long, env = "SFAAS_ALLOW_OUTBOUND", value_delimiter = ',')]
    pub allow_outbound: Vec<String>,
    /// Functions one tenant may have.
    #[arg(long, env = "SFAAS_TENANT_MAX_FUNCTIONS", default_value_t = 100)]
    pub tenant_max_functions: usize,
    /// Flows one tenant may have.
    #[arg(long, env = "SFAAS_TENANT_MAX_FLOWS", default_value_t = 100)]
    pub tenant_max_flows: usize,
    /// Managed instances (`http` functions' servers) one tenant may have running at once.
    #[arg(long, env = "SFAAS_TENANT_MAX_INSTANCES", default_value_t = 20)]
    pub tenant_max_instances: usize,
    /// Async calls one tenant may have waiting or running.
    #[arg(long, env = "SFAAS_TENANT_MAX_ASYNC_CALLS", default_value_t = 10_000)]
    pub tenant_max_async_calls: u64,
    /// Bytes of requests (bodies, headers, paths, queries) one tenant's waiting or running async calls may hold together.
    #[arg(long, env = "SFAAS_TENANT_MAX_ASYNC_BYTES", default_value_t = 256 << 20)]
    pub tenant_max_async_bytes: u64,
    /// Where the ETL example's etl-load loads: sqlite://PATH or postgres://… for every tenant
    /// (`{tenant}` becomes the tenant's name), or TENANT=URL for one (repeatable). Default:
    /// sqlite://DATA_DIR/etl/{tenant}.db.
    #[arg(long, env = "SFAAS_ETL_DATABASE_URL")]
    pub etl_database_url: Vec<String>,
    /// The S3-compatible bucket (http://HOST:PORT/BUCKET) of the ETL example's s3 transport;
    /// each tenant's objects are under TENANT/ in it.
    #[arg(long, env = "SFAAS_ETL_S3_URL")]
    pub etl_s3_url: Option<String>,
    /// Bytes of span export requests each tenant's spool (DATA_DIR/span-spool) may hold while
    /// the collector is unreachable; beyond it they are lost, loudly.
    #[arg(long, env = "SFAAS_SPAN_SPOOL_BYTES", default_value_t = 1 << 30)]
    pub span_spool_bytes: u64,
    /// Bytes of function log lines each tenant's functions may export a UTC day; past them,
    /// lines are counted and dropped until midnight UTC.
    #[arg(long, env = "SFAAS_TENANT_LOG_BYTES_PER_DAY", default_value_t = stateful_faas_core::telemetry::logs::DEFAULT_BYTES_PER_DAY)]
    pub tenant_log_bytes_per_day: u64,
}

/// The collector's flags: receivers, retention, ingest quotas (`sfaas up`, `sfaas collector`).
#[derive(Args)]
pub struct CollectorArgs {
    /// Collector: OTLP/gRPC address.
    #[arg(long, env = "SFAAS_OTLP_GRPC_ADDR", default_value = "127.0.0.1:4317")]
    pub otlp_grpc_addr: SocketAddr,
    /// Collector: OTLP/HTTP address.
    #[arg(long, env = "SFAAS_OTLP_HTTP_ADDR", default_value = "127.0.0.1:4318")]
    pub otlp_http_addr: SocketAddr,
    /// Collector: Jaeger thrift over HTTP address.
    #[arg(long, env = "SFAAS_JAEGER_ADDR", default_value = "127.0.0.1:14268")]
    pub jaeger_addr: SocketAddr,
    /// Collector: targets to scrape, per tenant (YAML; see the README).
    #[arg(long, env = "SFAAS_SCRAPE_CONFIG")]
    pub scrape_config: Option<PathBuf>,
    /// Collector: how OTLP metrics are named: `prometheus` (as Prometheus's OTLP receiver
    /// names them: `http.server.duration` in s is `http_server_duration_seconds`, attributes as
    /// label names, `job` and `instance` from the resource) or `otlp` (as sent).
    #[arg(long, env = "SFAAS_OTLP_METRIC_NAMES", default_value = "prometheus")]
    pub otlp_metric_names: collector::receivers::prometheus_names::MetricNames,
    /// Collector: hours of telemetry kept (older spans, samples and logs are deleted).
    #[arg(long, env = "SFAAS_RETENTION_HOURS", default_value_t = 168)]
    pub retention_hours: u64,
    /// Collector: a tenant's own retention, as TENANT=HOURS (repeatable).
    #[arg(long = "tenant-retention", value_parser = parse_tenant_hours)]
    pub tenant_retention: Vec<(String, u64)>,
    /// Telemetry: spans and log records one tenant may send a second (its own telemetry; the
    /// platform's metering is never limited). Ten seconds' worth may come at once.
    #[arg(long, env = "SFAAS_TENANT_INGEST_SPANS_PER_SECOND", default_value_t = 5_000)]
    pub tenant_ingest_spans_per_second: u64,
    /// Telemetry: metric samples one tenant may send a second.
    #[arg(long, env = "SFAAS_TENANT_INGEST_SAMPLES_PER_SECOND", default_value_t = 20_000)]
    pub tenant_ingest_samples_per_second: u64,
    /// Telemetry: bytes of spans, samples and log records one tenant may send a UTC day.
    #[arg(long, env = "SFAAS_TENANT_INGEST_BYTES_PER_DAY", default_value_t = 4 << 30)]
    pub tenant_ingest_bytes_per_day: u64,
}

/// The dashboard's flags (`sfaas up`, `sfaas dashboard`).
#[derive(Args)]
pub struct DashboardArgs {
    /// Dashboard: web UI, billing API and Grafana datasource APIs.
    #[arg(long, env = "SFAAS_UI_ADDR", default_value = "127.0.0.1:16686")]
    pub ui_addr: SocketAddr,
    /// Dashboard: seconds between background billing runs (0: only `sfaas bill run`).
    #[arg(long, env = "SFAAS_BILLING_INTERVAL_SECS", default_value_t = 10)]
    pub billing_interval_secs: u64,
}

/// `sfaas up`: every component's flags, and the demo.
#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub core: CoreArgs,
    #[command(flatten)]
    pub platform: PlatformArgs,
}

/// What `sfaas up` runs beside the core.
#[derive(Args)]
pub struct PlatformArgs {
    #[command(flatten)]
    pub collector: CollectorArgs,
    #[command(flatten)]
    pub dashboard: DashboardArgs,
    /// `up` only: also create two demo tenants, deploy the demo functions and flow for both,
    /// and keep a small workload running.
    #[arg(long)]
    pub demo: bool,
    /// Collector (with `up`): seconds between scrapes of the gateway's own /metrics.
    #[arg(long, env = "SFAAS_PLATFORM_SCRAPE_SECS", default_value_t = 15)]
    pub platform_scrape_secs: u64,
}

/// `sfaas core`.
#[derive(Args)]
pub struct CoreCommandArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub core: CoreArgs,
}

/// `sfaas collector`.
#[derive(Args)]
pub struct CollectorCommandArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub collector: CollectorArgs,
}

/// `sfaas dashboard`.
#[derive(Args)]
pub struct DashboardCommandArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub dashboard: DashboardArgs,
}

impl CoreArgs {
    pub fn config(&self, data_dir: &std::path::Path) -> anyhow::Result<CoreConfig> {
        let mut config = CoreConfig::new(data_dir);
        let mut etl = etl_example::EtlConfig::new(data_dir);
        for value in &self.etl_database_url {
            etl.set_database_url(value).map_err(anyhow::Error::msg)?;
        }
        if let Some(url) = &self.etl_s3_url {
            etl.set_s3_url(url).map_err(anyhow::Error::msg)?;
        }
        etl_example::register(&mut config.builtins, etl);
        config.gateway_addr = self.gateway_addr;
        config.state_redis_addr = match self.state_redis_addr {
            Some(RedisAddr::Off) => None,
            Some(RedisAddr::At(addr)) => Some(addr),
            None if self.gateway_addr.port() == 0 => Some(SocketAddr::new(self.gateway_addr.ip(), 0)),
            None => Some(SocketAddr::new(self.gateway_addr.ip(), 6380)),
        };
        if let Some(threads) = self.state_redis_threads {
            config.state_redis.threads = threads.max(1);
        }
        config.state_redis.max_clients = self.state_redis_max_clients;
        config.state_redis.max_clients_per_tenant = self.state_redis_tenant_max_clients;
        config.admin_token = std::env::var("SFAAS_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
        config.telemetry.endpoint = self.otlp_endpoint.clone();
        config.telemetry.protocol = self.otlp_protocol;
        config.telemetry.token = self.otlp_token.clone();
        config.max_body_bytes = self.max_body_bytes;
        config.buffer_bytes = self.buffer_bytes;
        config.async_queue.workers = self.async_workers;
        config.async_queue.max_calls_per_tenant = self.tenant_max_async_calls;
        config.async_queue.max_bytes_per_tenant = self.tenant_max_async_bytes;
        config.state.total_budget_bytes = self.state_budget_bytes;
        config.state.tenant_quota_bytes = self.state_tenant_quota_bytes;
        config.state.max_jobs_per_tenant = self.state_tenant_max_jobs;
        config.state.job_registrations_per_second = self.state_tenant_jobs_per_second;
        config.state.max_value_bytes = self.state_max_value_bytes;
        config.state.usage_interval = std::time::Duration::from_secs(self.state_usage_interval_secs);
        config.allow_outbound = self.allow_outbound.clone();
        config.max_functions_per_tenant = self.tenant_max_functions;
        config.max_flows_per_tenant = self.tenant_max_flows;
        config.max_instances_per_tenant = self.tenant_max_instances;
        config.telemetry.spool_max_bytes = self.span_spool_bytes;
        config.telemetry.log_bytes_per_day = Some(self.tenant_log_bytes_per_day);
        config.sandbox = (self.sandbox == "on").then(|| SandboxConfig {
            limits: CgroupConfig {
                function: GroupLimits { memory_bytes: self.function_memory_bytes, pids: self.function_pids },
                tenant: GroupLimits { memory_bytes: self.tenant_memory_bytes, pids: self.tenant_pids },
            },
            uids: self.sandbox_uids.clone(),
            tmp_bytes: self.sandbox_tmp_bytes,
            egress: self.sandbox_egress.iter().cloned().collect(),
        });
        Ok(config)
    }
}

/// mimalloc rather than glibc's malloc: a span is built on a gateway worker and freed on the
/// export thread, and glibc returns such frees to the allocating thread's arena under its lock.
/// With spans on, the no-op's throughput rose by about 8 % (BENCHMARKS.md, issue 2).
/// `FIRST-LAST`, a range of uids above root.
fn parse_uid_range(text: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (first, last) = text.split_once('-').ok_or("expected FIRST-LAST, for example 200000-265535")?;
    let parse = |n: &str| n.trim().parse::<u32>().map_err(|e| format!("{n:?}: {e}"));
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || last < first {
        return Err(format!("{text}: the range must be non-empty and above 0 (root)"));
    }
    Ok(first..=last)
}

/// `--state-redis-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub enum RedisAddr {
    Off,
    At(SocketAddr),
}

fn parse_redis_addr(text: &str) -> Result<RedisAddr, String> {
    if text == "off" {
        return Ok(RedisAddr::Off);
    }
    text.parse().map(RedisAddr::At).map_err(|e| format!("{text:?}: {e} (use HOST:PORT, or off)"))
}

fn parse_tenant_hours(text: &str) -> Result<(String, u64), String> {
    let (tenant, hours) = text.split_once('=').ok_or_else(|| format!("{text:?}: use TENANT=HOURS"))?;
    let hours = hours.parse().map_err(|_| format!("{text:?}: {hours:?} is not a number of hours"))?;
    Ok((tenant.to_string(), hours))
}
