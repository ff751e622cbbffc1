//! Configuration of the core (flags and environment variables are mapped onto it by the binary).

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::function::sandbox::SandboxConfig;
use crate::state::StateConfig;
use crate::telemetry::TelemetryConfig;

/// Everything the core needs to run.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Holds the database, `admin.token` and `addresses.json`.
    pub data_dir: PathBuf,
    /// `sqlite://...`; default `DATA_DIR/sfaas.db`.
    pub database_url: Option<String>,
    pub gateway_addr: SocketAddr,
    /// The state store's Redis protocol listener (`--state-redis-addr`); `None`: not served.
    pub state_redis_addr: Option<SocketAddr>,
    /// Limits of that listener.
    pub state_redis: crate::redis::RedisConfig,
    /// The operator's token; default: read or created at `DATA_DIR/admin.token`.
    pub admin_token: Option<String>,
    pub telemetry: TelemetryConfig,
    /// Largest request body accepted by `/function/*` and `/async-function/*` (413 beyond).
    pub max_body_bytes: usize,
    /// Bytes all invocations' buffers may hold at once (requests' bodies and functions'
    /// responses), half of them one tenant's: beyond, a body waits for room and a response is
    /// refused (429).
    pub buffer_bytes: u64,
    /// How long a request body may send nothing before it is refused, and its grace before it
    /// must arrive at `gateway::body::MIN_RATE` (60 s).
    pub body_stall: std::time::Duration,
    pub async_queue: AsyncQueueConfig,
    pub state: StateConfig,
    /// Process functions run in sandboxes (namespaces, a uid per tenant, seccomp, and cgroups
    /// that limit and meter them: `--sandbox on`, the default); `None` runs them as plain
    /// child processes (`--sandbox off`).
    pub sandbox: Option<SandboxConfig>,
    /// Internal addresses (CIDR blocks or host names) that tenants' upstream functions and
    /// callbacks may reach (`--allow-outbound`); by default none.
    pub allow_outbound: Vec<String>,
    /// Functions one tenant may have (`--tenant-max-functions`).
    pub max_functions_per_tenant: usize,
    /// Flows one tenant may have (`--tenant-max-flows`).
    pub max_flows_per_tenant: usize,
    /// Managed `http` instances one tenant may have running at once (`--tenant-max-instances`).
    pub max_instances_per_tenant: usize,
    /// The builtins deployments may name: the platform's own, and those registered beside
    /// them (the binary adds the ETL example's, `etl_example::register`).
    pub builtins: crate::function::builtin::Builtins,
}

/// Delivery of async calls.
#[derive(Debug, Clone)]
pub struct AsyncQueueConfig {
    /// Calls delivered concurrently.
    pub workers: usize,
    /// Attempts before a call goes to the dead-letter list.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Calls one tenant may have waiting or running (`--tenant-max-async-calls`).
    pub max_calls_per_tenant: u64,
    /// Bytes of requests (bodies, headers, paths, queries) one tenant's waiting or running calls may hold together
    /// (`--tenant-max-async-bytes`).
    pub max_bytes_per_tenant: u64,
}

impl Default for AsyncQueueConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            max_calls_per_tenant: 10_000,
            max_bytes_per_tenant: 256 << 20,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl CoreConfig {
    /// Defaults for a data directory, as `sfaas up` uses them.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir: PathBuf = data_dir.into();
        Self {
            database_url: None,
            gateway_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_redis_addr: Some(SocketAddr::from(([127, 0, 0, 1], 6380))),
            state_redis: Default::default(),
            admin_token: None,
            telemetry: TelemetryConfig {
                max_queue_size: 16_384,
                // Export requests the collector cannot take yet (see `TelemetryConfig`).
                spool_dir: Some(data_dir.join("span-spool")),
                spool_max_bytes: 1 << 30,
                ..Default::default()
            },
            max_body_bytes: 16 << 20,
            buffer_bytes: 1 << 30,
            body_stall: std::time::Duration::from_secs(60),
            async_queue: AsyncQueueConfig::default(),
            state: StateConfig::default(),
            sandbox: Some(SandboxConfig::default()),
            allow_outbound: Vec::new(),
            max_functions_per_tenant: 100,
            max_flows_per_tenant: 100,
            max_instances_per_tenant: 20,
            builtins: Default::default(),
            data_dir,
        }
    }
}

/// The admin token file of a data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// The platform's meter token file of a data directory.
pub fn meter_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("meter.token")
}

/// Reads `DATA_DIR/admin.token`, creating it (mode 0600) with a fresh token on first start.
pub fn load_or_create_admin_token(data_dir: &Path) -> std::io::Result<String> {
    load_or_create_token(&admin_token_path(data_dir))
}

/// Reads a token file, creating it (mode 0600) with a fresh token if missing or empty.
pub fn load_or_create_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let token = crate::tenant::generate_token();
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(token)
}
