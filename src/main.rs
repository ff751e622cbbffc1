//! `sfaas`: the command line of stateful-faas. It wires the crates together; nothing else.

#[cfg(feature = "bench")]
mod bench;
mod client;
mod demo;
mod etl;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use stateful_faas_core::function::cgroup::{CgroupConfig, GroupLimits};
use stateful_faas_core::function::sandbox::SandboxConfig;
use stateful_faas_core::telemetry::OtlpProtocol;
use stateful_faas_core::tenant::{Principal, Scope};
use stateful_faas_core::{Core, CoreConfig};

#[derive(Parser)]
#[command(name = "sfaas", version, about = "stateful serverless platform with built-in observability and billing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once, at start: the size of the server commands' flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run every component in one process (the main job).
    Up(UpArgs),
    /// Run only the core: the gateway, functions, flows, state and the async queue.
    Core(CoreCommandArgs),
    /// Run only the collector (it checks tokens against the core's database in DATA_DIR).
    Collector(CollectorCommandArgs),
    /// Run only the dashboard: the billing API (and billing runs), over the telemetry store.
    Dashboard(DashboardCommandArgs),
    /// Manage tenants (admin).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Deploy the functions of a stack file.
    Deploy {
        #[arg(short = 'f', long = "file", default_value = "stack.yml")]
        file: PathBuf,
        /// Namespace for functions that name none (default: the token's tenant).
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Invoke a function; the request body is read from --data or stdin.
    Invoke {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
        /// Queue the call durably and return its call id at once.
        #[arg(long = "async")]
        is_async: bool,
        #[arg(long)]
        callback_url: Option<String>,
        /// Request body (default: stdin).
        #[arg(short = 'd', long)]
        data: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List functions.
    List {
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Remove a function.
    Remove {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Deploy, run and inspect flows (DAGs of functions).
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Billing: run it, show and finalize invoices (admin).
    #[command(subcommand)]
    Bill(BillCommand),
    /// Rate cards and tenants' plans (admin).
    #[command(subcommand)]
    Plan(PlanCommand),
    /// The streaming ETL example (examples/etl/): set it up, generate and stream records.
    #[command(subcommand)]
    Etl(EtlCommand),
    /// Benchmarks (figures go to BENCHMARKS.md; built with the `bench` feature, on by default).
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand)]
enum EtlCommand {
    /// Deploy the ETL functions, the `etl` flow and the zone lookup table into a namespace.
    Setup {
        #[arg(long)]
        namespace: String,
        /// How stages hand data on: state (the state store), inline, or s3 (the bucket the
        /// platform was started with, --etl-s3-url).
        #[arg(long, default_value = "state", value_parser = ["state", "inline", "s3"])]
        transport: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Print generated trip records: JSON lines, or CSV with --csv.
    Generate {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        records: usize,
        #[arg(long)]
        csv: bool,
        /// Bad records per thousand (malformed, missing fare, negative distance, unknown zone, no passengers).
        #[arg(long, default_value_t = 50)]
        bad_per_mille: u32,
        /// Time of the first trip, ms since the epoch (default: now).
        #[arg(long)]
        start_ms: Option<i64>,
    },
    /// Stream generated records into a namespace's etl flow (POST /stream/etl.NAMESPACE).
    Stream {
        #[arg(long)]
        namespace: String,
        #[arg(long, default_value_t = 10_000)]
        records: usize,
        /// Records per second (0: as fast as the pipeline accepts them).
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 50)]
        bad_per_mille: u32,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum BillCommand {
    /// Bill the usage that arrived since the last run; finalize periods whose grace is over.
    Run {
        /// Finalize as of this RFC 3339 time instead of now (not in the future).
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show a tenant's invoice (default: the current period).
    Show {
        #[arg(long)]
        tenant: String,
        /// YYYY-MM (or YYYY-MM-DD with daily periods).
        #[arg(long)]
        period: Option<String>,
        /// json or csv.
        #[arg(long, default_value = "json")]
        format: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List invoices (of one tenant, or all).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Make a period's invoices (and all earlier ones) final now, before the grace window ends.
    Finalize {
        #[arg(long)]
        period: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Metered invocations against the gateway's own counts, per tenant and function.
    Reconcile {
        #[arg(long)]
        tenant: Option<String>,
        /// YYYY-MM (or YYYY-MM-DD with daily periods); default the current one.
        #[arg(long)]
        period: Option<String>,
        /// First bring both sides up to now (`sfaas up` only): the core's spans sent, its
        /// counters stored, billing run once they are billable (about 5 s). Exactly 0 for every
        /// function when nothing was lost and no call ran meanwhile.
        #[arg(long)]
        settle: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Replace the rate card (YAML; see examples/billing/plans.yml).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Put a tenant on a plan from a time (default now).
    Assign {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        plan: String,
        /// RFC 3339 time the plan takes effect (now or later).
        #[arg(long)]
        from: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show the rate card in force.
    Show {
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints {"tenant","ingest_token","read_token"} once.
    Create {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum FlowCommand {
    /// Deploy (create or replace) a flow from a YAML or JSON file.
    Deploy {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Run a flow; prints its output (or, with --async, the run id).
    Run {
        name: String,
        /// Input file (default: stdin; `-` is stdin too).
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long = "async")]
        is_async: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show a run: status, nodes, output.
    Status {
        run_id: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Cancel a running run.
    Cancel {
        run_id: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Draw a flow's DAG.
    Graph {
        name: String,
        /// text or dot.
        #[arg(long, default_value = "text")]
        format: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

/// Where a server keeps its data: every server command takes these.
#[derive(Args)]
struct DataArgs {
    /// Data directory: database, admin.token, addresses.json.
    #[arg(long, env = "SFAAS_DATA_DIR", default_value = "./sfaas-data")]
    data_dir: PathBuf,
    /// Telemetry store: sqlite://PATH (default DATA_DIR/telemetry.db) or postgres://...
    #[arg(long, env = "SFAAS_DATABASE_URL")]
    database_url: Option<String>,
    /// Span blocks on an S3-compatible object store: s3://BUCKET/PREFIX (credentials and
    /// region from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION). DATA_DIR/blocks then
    /// caches them. With a PostgreSQL --database-url, hosts that share both serve one store.
    #[arg(long, env = "SFAAS_BLOCKS_URL")]
    blocks_url: Option<String>,
    /// The object store's endpoint when it is not AWS (MinIO, s3rver, …), e.g. http://HOST:9000.
    #[arg(long, env = "SFAAS_BLOCKS_ENDPOINT", requires = "blocks_url")]
    blocks_endpoint: Option<String>,
    /// With --blocks-url: the most DATA_DIR/blocks may hold of the blocks this host read or
    /// wrote, in MiB (the blocks used longest ago are removed first; they stay in the store).
    #[arg(long, env = "SFAAS_BLOCKS_CACHE_MIB", default_value_t = 4096)]
    blocks_cache_mib: u64,
}

/// The core's flags: gateway, functions, state store, async queue, span export (`sfaas up`,
/// `sfaas core`).
#[derive(Args)]
struct CoreArgs {
    #[arg(long, env = "SFAAS_GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    gateway_addr: SocketAddr,
    /// The state store over the Redis protocol: HOST:PORT, or `off`. By default the gateway's
    /// host at port 6380, or any free port when the gateway's port is 0.
    #[arg(long, env = "SFAAS_STATE_REDIS_ADDR", value_parser = parse_redis_addr)]
    state_redis_addr: Option<RedisAddr>,
    /// Threads serving the Redis protocol, each an event loop of its own (default: half the cores, at least one).
    #[arg(long, env = "SFAAS_STATE_REDIS_THREADS")]
    state_redis_threads: Option<usize>,
    /// Connections the Redis protocol listener holds at once (Redis's `maxclients`).
    #[arg(long, env = "SFAAS_STATE_REDIS_MAX_CLIENTS", default_value_t = 10_000)]
    state_redis_max_clients: usize,
    /// Connections one tenant may hold authenticated on the Redis protocol listener.
    #[arg(long, env = "SFAAS_STATE_REDIS_TENANT_MAX_CLIENTS", default_value_t = 1_000)]
    state_redis_tenant_max_clients: usize,
    /// State store: seconds per reported state usage interval (must divide a day).
    #[arg(long, env = "SFAAS_STATE_USAGE_INTERVAL_SECS", default_value_t = 60)]
    state_usage_interval_secs: u64,
    /// OTLP endpoint for the platform's spans (default with `up`: its own collector; with
    /// `core`: off unless set).
    #[arg(long, env = "SFAAS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// grpc or http.
    #[arg(long, env = "SFAAS_OTLP_PROTOCOL", default_value = "grpc")]
    otlp_protocol: OtlpProtocol,
    /// Token sent with the spans (the platform's meter token).
    #[arg(long, env = "SFAAS_OTLP_TOKEN")]
    otlp_token: Option<String>,
    /// Largest request body, in bytes.
    #[arg(long, env = "SFAAS_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Bytes all invocations' buffers may hold at once (requests' bodies and functions'
    /// responses), half of them one tenant's.
    #[arg(long, env = "SFAAS_BUFFER_BYTES", default_value_t = 1 << 30)]
    buffer_bytes: u64,
    /// Concurrent deliveries of async calls.
    #[arg(long, env = "SFAAS_ASYNC_WORKERS", default_value_t = 4)]
    async_workers: usize,
    /// State store: bytes all tenants may hold together (each object: its value, its address
    /// and 128 bytes).
    #[arg(long, env = "SFAAS_STATE_BUDGET_BYTES", default_value_t = 4 << 30)]
    state_budget_bytes: u64,
    /// State store: bytes one tenant may hold, counted as the budget is.
    #[arg(long, env = "SFAAS_STATE_TENANT_QUOTA_BYTES", default_value_t = 1 << 30)]
    state_tenant_quota_bytes: u64,
    /// State store: jobs one tenant may have registered at once.
    #[arg(long, env = "SFAAS_STATE_TENANT_MAX_JOBS", default_value_t = 10_000)]
    state_tenant_max_jobs: usize,
    /// State store: jobs a tenant may register a second over HTTP or Redis (bursts of ten times
    /// as many); flow runs' jobs are not counted.
    #[arg(long, env = "SFAAS_STATE_TENANT_JOBS_PER_SECOND", default_value_t = 100)]
    state_tenant_jobs_per_second: u32,
    /// State store: largest value.
    #[arg(long, env = "SFAAS_STATE_MAX_VALUE_BYTES", default_value_t = 256 << 20)]
    state_max_value_bytes: u64,
    /// Run process functions in sandboxes (on: namespaces, a uid per tenant, seccomp, and
    /// cgroups that limit and meter them; needs root), or as plain child processes (off: they
    /// see the host and the gateway's files and escape metering; see the README).
    #[arg(long, env = "SFAAS_SANDBOX", default_value = "on", value_parser = ["on", "off"])]
    sandbox: String,
    /// Sandbox: memory of one invocation or instance, unless the function sets limits.memory.
    #[arg(long, env = "SFAAS_FUNCTION_MEMORY_BYTES", default_value_t = 512 << 20)]
    function_memory_bytes: u64,
    /// Sandbox: processes one invocation or instance may have at once.
    #[arg(long, env = "SFAAS_FUNCTION_PIDS", default_value_t = 256)]
    function_pids: u64,
    /// Sandbox: memory of all of one tenant's invocations and instances together.
    #[arg(long, env = "SFAAS_TENANT_MEMORY_BYTES", default_value_t = 4 << 30)]
    tenant_memory_bytes: u64,
    /// Sandbox: processes of all of one tenant's invocations and instances together.
    #[arg(long, env = "SFAAS_TENANT_PIDS", default_value_t = 1024)]
    tenant_pids: u64,
    /// Sandbox: the uids (and gids) tenants' processes run as, FIRST-LAST, one per tenant.
    #[arg(long, env = "SFAAS_SANDBOX_UIDS", default_value = "200000-265535", value_parser = parse_uid_range)]
    sandbox_uids: std::ops::RangeInclusive<u32>,
    /// Sandbox: size of each invocation's or instance's private /tmp (counted as its memory).
    #[arg(long, env = "SFAAS_SANDBOX_TMP_BYTES", default_value_t = 64 << 20)]
    sandbox_tmp_bytes: u64,
    /// Sandbox: a tenant whose functions may reach outside networks (repeatable). They then
    /// share the host's network, its loopback services included: see the README.
    #[arg(long, env = "SFAAS_SANDBOX_EGRESS", value_delimiter = ',')]
    sandbox_egress: Vec<String>,
    /// An internal address that tenants' upstream functions and callbacks may reach: a CIDR
    /// block or a host name (repeatable; by default loopback, private and link-local addresses
    /// are refused).
    #[arg(long, env = "SFAAS_ALLOW_OUTBOUND", value_delimiter = ',')]
    allow_outbound: Vec<String>,
    /// Functions one tenant may have.
    #[arg(long, env = "SFAAS_TENANT_MAX_FUNCTIONS", default_value_t = 100)]
    tenant_max_functions: usize,
    /// Flows one tenant may have.
    #[arg(long, env = "SFAAS_TENANT_MAX_FLOWS", default_value_t = 100)]
    tenant_max_flows: usize,
    /// Managed instances (`http` functions' servers) one tenant may have running at once.
    #[arg(long, env = "SFAAS_TENANT_MAX_INSTANCES", default_value_t = 20)]
    tenant_max_instances: usize,
    /// Async calls one tenant may have waiting or running.
    #[arg(long, env = "SFAAS_TENANT_MAX_ASYNC_CALLS", default_value_t = 10_000)]
    tenant_max_async_calls: u64,
    /// Bytes of requests (bodies, headers, paths, queries) one tenant's waiting or running async calls may hold together.
    #[arg(long, env = "SFAAS_TENANT_MAX_ASYNC_BYTES", default_value_t = 256 << 20)]
    tenant_max_async_bytes: u64,
    /// Where the ETL example's etl-load loads: sqlite://PATH or postgres://… for every tenant
    /// (`{tenant}` becomes the tenant's name), or TENANT=URL for one (repeatable). Default:
    /// sqlite://DATA_DIR/etl/{tenant}.db.
    #[arg(long, env = "SFAAS_ETL_DATABASE_URL")]
    etl_database_url: Vec<String>,
    /// The S3-compatible bucket (http://HOST:PORT/BUCKET) of the ETL example's s3 transport;
    /// each tenant's objects are under TENANT/ in it.
    #[arg(long, env = "SFAAS_ETL_S3_URL")]
    etl_s3_url: Option<String>,
    /// Bytes of span export requests each tenant's spool (DATA_DIR/span-spool) may hold while
    /// the collector is unreachable; beyond it they are lost, loudly.
    #[arg(long, env = "SFAAS_SPAN_SPOOL_BYTES", default_value_t = 1 << 30)]
    span_spool_bytes: u64,
}

/// The collector's flags: receivers, retention, ingest quotas (`sfaas up`, `sfaas collector`).
#[derive(Args)]
struct CollectorArgs {
    /// Collector: OTLP/gRPC address.
    #[arg(long, env = "SFAAS_OTLP_GRPC_ADDR", default_value = "127.0.0.1:4317")]
    otlp_grpc_addr: SocketAddr,
    /// Collector: OTLP/HTTP address.
    #[arg(long, env = "SFAAS_OTLP_HTTP_ADDR", default_value = "127.0.0.1:4318")]
    otlp_http_addr: SocketAddr,
    /// Collector: Jaeger thrift over HTTP address.
    #[arg(long, env = "SFAAS_JAEGER_ADDR", default_value = "127.0.0.1:14268")]
    jaeger_addr: SocketAddr,
    /// Collector: targets to scrape, per tenant (YAML; see the README).
    #[arg(long, env = "SFAAS_SCRAPE_CONFIG")]
    scrape_config: Option<PathBuf>,
    /// Collector: hours of telemetry kept (older spans, samples and logs are deleted).
    #[arg(long, env = "SFAAS_RETENTION_HOURS", default_value_t = 168)]
    retention_hours: u64,
    /// Collector: a tenant's own retention, as TENANT=HOURS (repeatable).
    #[arg(long = "tenant-retention", value_parser = parse_tenant_hours)]
    tenant_retention: Vec<(String, u64)>,
    /// Telemetry: spans and log records one tenant may send a second (its own telemetry; the
    /// platform's metering is never limited). Ten seconds' worth may come at once.
    #[arg(long, env = "SFAAS_TENANT_INGEST_SPANS_PER_SECOND", default_value_t = 5_000)]
    tenant_ingest_spans_per_second: u64,
    /// Telemetry: metric samples one tenant may send a second.
    #[arg(long, env = "SFAAS_TENANT_INGEST_SAMPLES_PER_SECOND", default_value_t = 20_000)]
    tenant_ingest_samples_per_second: u64,
    /// Telemetry: bytes of spans, samples and log records one tenant may send a UTC day.
    #[arg(long, env = "SFAAS_TENANT_INGEST_BYTES_PER_DAY", default_value_t = 4 << 30)]
    tenant_ingest_bytes_per_day: u64,
}

/// The dashboard's flags (`sfaas up`, `sfaas dashboard`).
#[derive(Args)]
struct DashboardArgs {
    /// Dashboard: web UI, billing API and Grafana datasource APIs.
    #[arg(long, env = "SFAAS_UI_ADDR", default_value = "127.0.0.1:16686")]
    ui_addr: SocketAddr,
    /// Dashboard: seconds between background billing runs (0: only `sfaas bill run`).
    #[arg(long, env = "SFAAS_BILLING_INTERVAL_SECS", default_value_t = 10)]
    billing_interval_secs: u64,
}

/// `sfaas up`: every component's flags, and the demo.
#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    core: CoreArgs,
    #[command(flatten)]
    platform: PlatformArgs,
}

/// What `sfaas up` runs beside the core.
#[derive(Args)]
struct PlatformArgs {
    #[command(flatten)]
    collector: CollectorArgs,
    #[command(flatten)]
    dashboard: DashboardArgs,
    /// `up` only: also create two demo tenants, deploy the demo functions and flow for both,
    /// and keep a small workload running.
    #[arg(long)]
    demo: bool,
    /// Collector (with `up`): seconds between scrapes of the gateway's own /metrics.
    #[arg(long, env = "SFAAS_PLATFORM_SCRAPE_SECS", default_value_t = 15)]
    platform_scrape_secs: u64,
}

/// `sfaas core`.
#[derive(Args)]
struct CoreCommandArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    core: CoreArgs,
}

/// `sfaas collector`.
#[derive(Args)]
struct CollectorCommandArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    collector: CollectorArgs,
}

/// `sfaas dashboard`.
#[derive(Args)]
struct DashboardCommandArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    dashboard: DashboardArgs,
}

impl CoreArgs {
    fn config(&self, data_dir: &std::path::Path) -> anyhow::Result<CoreConfig> {
        let mut config = CoreConfig::new(data_dir);
        let mut etl = stateful_faas_core::etl::EtlConfig::new(data_dir);
        for value in &self.etl_database_url {
            etl.set_database_url(value).map_err(anyhow::Error::msg)?;
        }
        if let Some(url) = &self.etl_s3_url {
            etl.set_s3_url(url).map_err(anyhow::Error::msg)?;
        }
        stateful_faas_core::etl::register(&mut config.builtins, etl);
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
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // No transparent huge pages: mimalloc asks for them on its arenas and returns freed memory
    // to the kernel after 10 ms, so memory that churns (request bodies, state values) came back
    // as fresh 2 MiB pages that the kernel zeroes on each first touch: half the CPU of the
    // state store's HTTP benchmark went there (docs/decisions.md). Redis advises the same.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    // Workers look for new I/O every 7 task polls (tokio's default is 61): under load, a new
    // request is then noticed after a few of the tasks queued before it, not after dozens,
    // which is what keeps one tenant's burst of calls from delaying another's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(7)
        .build()
        .expect("a tokio runtime starts");
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SFAAS_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Up(UpArgs { data, core, platform }) => serve(data, core, Some(platform)).await,
        Command::Core(CoreCommandArgs { data, core }) => serve(data, core, None).await,
        Command::Collector(CollectorCommandArgs { data, collector }) => serve_collector(data, collector).await,
        Command::Dashboard(DashboardCommandArgs { data, dashboard }) => serve_dashboard(data, dashboard).await,
        Command::Bill(BillCommand::Run { until, client }) => client::bill_run(&client, until).await,
        Command::Bill(BillCommand::Show { tenant, period, format, client }) => {
            client::bill_show(&client, &tenant, period, &format).await
        }
        Command::Bill(BillCommand::List { tenant, client }) => client::bill_list(&client, tenant).await,
        Command::Bill(BillCommand::Finalize { period, client }) => client::bill_finalize(&client, &period).await,
        Command::Bill(BillCommand::Reconcile { tenant, period, settle, client }) => {
            client::bill_reconcile(&client, tenant, period, settle).await
        }
        Command::Plan(PlanCommand::Apply { file, client }) => client::plan_apply(&client, &file).await,
        Command::Plan(PlanCommand::Assign { tenant, plan, from, client }) => {
            client::plan_assign(&client, &tenant, &plan, from).await
        }
        Command::Plan(PlanCommand::Show { client }) => client::plan_show(&client).await,
        Command::Tenant(TenantCommand::Create { name, plan, client }) => {
            client::tenant_create(&client, &name, plan).await
        }
        Command::Tenant(TenantCommand::List { client }) => client::tenant_list(&client).await,
        Command::Deploy { file, namespace, client } => client::deploy(&client, &file, namespace).await,
        Command::Invoke { name, namespace, is_async, callback_url, data, client } => {
            client::invoke(&client, &name, namespace, is_async, callback_url, data).await
        }
        Command::List { namespace, client } => client::list(&client, namespace).await,
        Command::Remove { name, namespace, client } => client::remove(&client, &name, namespace).await,
        Command::Flow(FlowCommand::Deploy { file, client }) => client::flow_deploy(&client, &file).await,
        Command::Flow(FlowCommand::Run { name, input, is_async, client }) => {
            client::flow_run(&client, &name, input, is_async).await
        }
        Command::Flow(FlowCommand::Status { run_id, client }) => client::flow_status(&client, &run_id).await,
        Command::Flow(FlowCommand::Cancel { run_id, client }) => client::flow_cancel(&client, &run_id).await,
        Command::Flow(FlowCommand::Graph { name, format, client }) => client::flow_graph(&client, &name, &format).await,
        Command::Etl(EtlCommand::Setup { namespace, transport, client }) => {
            client::etl_setup(&client, &namespace, &transport).await
        }
        Command::Etl(EtlCommand::Generate { seed, records, csv, bad_per_mille, start_ms }) => {
            etl::print_generated(seed, records, bad_per_mille, csv, start_ms);
            Ok(())
        }
        Command::Etl(EtlCommand::Stream { namespace, records, rate, seed, bad_per_mille, client }) => {
            client::etl_stream(&client, &namespace, records, rate, seed, bad_per_mille).await
        }
        #[cfg(feature = "bench")]
        Command::Bench(command) => bench::run(command).await,
    }
}

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
async fn serve(data: DataArgs, args: CoreArgs, platform: Option<PlatformArgs>) -> anyhow::Result<()> {
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

/// `--state-redis-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
enum RedisAddr {
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
async fn serve_collector(data: DataArgs, args: CollectorArgs) -> anyhow::Result<()> {
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
async fn serve_dashboard(data: DataArgs, args: DashboardArgs) -> anyhow::Result<()> {
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
