//! Functions: what a deployed function is and how each kind runs one invocation.
//!
//! Every runner returns an [`Outcome`] with the usage it measured; the invoker turns it into
//! the span and the metrics ([`crate::invoker::Invoker::dispatch`]), the trigger into a
//! response. A runner dropped before it ends (its caller went away) stops what it runs and
//! reports what that used as [`Abandoned`], which the invoker bills the same way.

pub mod builtin;
pub mod cgroup;
pub mod deployment;
pub mod exec;
pub mod http;
pub mod outbound;
pub mod output;
mod process;
pub mod registry;
pub mod sandbox;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;

pub use deployment::{FunctionDeployment, FunctionKind, FunctionSpec, Limits, Target};
pub use registry::{DeployedFunction, Registry};

/// One request to a function, as the gateway received it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub call_id: String,
    pub method: String,
    /// Path after the function name (`/function/f/a/b` → `/a/b`), at least `/`.
    pub path: String,
    pub query: String,
    /// Request headers, lowercase names; the caller's credentials are already removed.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// W3C `traceparent` of the invocation span, handed to the function.
    pub traceparent: Option<String>,
    /// The state-store job the call belongs to (a flow run), if any.
    pub job: Option<String>,
}

/// Where the state store listens, as the host reaches it (a sandboxed function reaches the
/// same servers at addresses of its own network: see `sandbox::Jail`).
#[derive(Debug, Clone)]
pub struct StateAddresses {
    /// `http://ADDR/state`.
    pub http: String,
    /// `HOST:PORT` of the Redis protocol, when the core serves it.
    pub redis: Option<String>,
}

/// `url` (`redis://[USER:TOKEN@]HOST:PORT`) with its address replaced by `address`.
pub fn redis_url_at(url: &str, address: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    match rest.rsplit_once('@') {
        Some((credentials, _)) => format!("redis://{credentials}@{address}"),
        None => format!("redis://{address}"),
    }
}

/// What a runner may use besides the request: the outbound client, and the tenant's state
/// store (in process for builtins, over HTTP with a per-invocation token for processes).
pub struct RunContext<'a> {
    /// For requests a tenant directs (upstream functions), under the operator's policy.
    pub outbound: &'a outbound::Outbound,
    pub tenant: &'a crate::tenant::TenantId,
    pub state: &'a std::sync::Arc<crate::state::StateStore>,
    /// Where the state store listens, once the gateway does.
    pub state_addresses: Option<&'a StateAddresses>,
    /// Valid while the invocation runs; reaches the tenant's job-less objects and `job`'s.
    pub state_token: &'a str,
    /// The builtins, for builtin functions.
    pub builtins: &'a builtin::Builtins,
    /// Room for the invocation's buffers (its request's body is in it): a response takes room
    /// as it is read, and fails when there is none.
    pub buffers: &'a std::sync::Arc<crate::room::Buffers>,
    /// Where the invocation's output lines go as its tenant's logs (`None`: export is off, and
    /// they go to the gateway's own log).
    pub logs: Option<std::sync::Arc<dyn output::LogSink>>,
}

impl RunContext<'_> {
    /// Environment of a process function for one invocation.
    fn state_env(&self, job: Option<&str>) -> Vec<(String, String)> {
        use crate::semconv::{ENV_JOB, ENV_STATE_REDIS_URL, ENV_STATE_TOKEN, ENV_STATE_URL};
        let mut env = vec![(ENV_STATE_TOKEN.to_string(), self.state_token.to_string())];
        if let Some(addresses) = self.state_addresses {
            env.push((ENV_STATE_URL.to_string(), addresses.http.clone()));
            if let Some(redis) = &addresses.redis {
                let url = format!("redis://{}:{}@{redis}", self.tenant, self.state_token);
                env.push((ENV_STATE_REDIS_URL.to_string(), url));
            }
        }
        if let Some(job) = job {
            env.push((ENV_JOB.to_string(), job.to_string()));
        }
        env
    }
}

/// What an invocation produced and used.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub usage: Usage,
}

/// Resources one invocation used, measured by the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time in nanoseconds (user + system), as the kernel accounted it.
    pub cpu_ns: u64,
    /// Peak resident memory, in bytes, where the kind can measure it.
    pub peak_memory_bytes: u64,
    /// The invocation had to start an instance first.
    pub cold_start: bool,
}

impl Usage {
    /// CPU-ms as billed: rounded up to a whole millisecond, at least 1 (docs/contracts.md,
    /// "Telemetry contract").
    pub fn cpu_ms(&self) -> u64 {
        self.cpu_ns.div_ceil(1_000_000).max(1)
    }
}

impl Outcome {
    /// An outcome that carries a plain-text message.
    pub fn text(status: u16, message: impl Into<String>, usage: Usage) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: Bytes::from(message.into()),
            usage,
        }
    }
}

/// What an invocation used up to its stop when its caller dropped it before it ended (an HTTP
/// client that went away, a flow run cancelled or failed elsewhere). The runner's guard kills
/// what the invocation runs, measures it and reports here as it drops; the invoker reads the
/// report as it drops in turn, and bills it.
#[derive(Debug, Default)]
pub struct Abandoned(Mutex<Option<(Usage, Option<JoinHandle<u64>>)>>);

tokio::task_local! {
    /// The report of the invocation a runner runs. Task-local because the runners' signatures
    /// are the registry's; tokio keeps it set while a scoped future is dropped, which is when
    /// the guards report.
    static ABANDONED: Arc<Abandoned>;
}

impl Abandoned {
    /// Runs a runner's future so that its guards' reports land here.
    pub async fn watch<T>(self: &Arc<Self>, run: impl Future<Output = T>) -> T {
        ABANDONED.scope(self.clone(), run).await
    }

    /// Reports what the invocation being run used up to its stop, and CPU time still to come
    /// (a process whose CPU is known once it is reaped): called by runners' guards as they
    /// drop. Outside [`Abandoned::watch`], nothing is reported.
    pub fn report(usage: Usage, still_running: Option<JoinHandle<u64>>) {
        let _ = ABANDONED.try_with(|abandoned| *abandoned.0.lock().unwrap() = Some((usage, still_running)));
    }

    /// The report, if a runner made one.
    pub fn take(&self) -> Option<(Usage, Option<JoinHandle<u64>>)> {
        self.0.lock().unwrap().take()
    }
}

/// Why an invocation could not produce an outcome.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    #[error("function {name} timed out after {timeout:?}")]
    Timeout {
        name: String,
        timeout: Duration,
        usage: Usage,
        /// A builtin's thread, which cannot be killed and runs on: its CPU time once it ends.
        still_running: Option<tokio::task::JoinHandle<u64>>,
    },
    #[error("cannot start function {name}: {message}")]
    Start { name: String, message: String },
    #[error("function {name} is unreachable: {message}")]
    Upstream { name: String, message: String },
    #[error("function {name} response is larger than {limit} bytes")]
    ResponseTooLarge { name: String, limit: usize },
    #[error("function {name} cannot start: {reason}")]
    Busy { name: String, reason: String },
    #[error("function {name}'s response cannot be held: {error}")]
    NoRoom {
        name: String,
        #[source]
        error: crate::room::RoomError,
    },
    /// A failure once the function had run (its answer could not be returned): what it used is
    /// still billed.
    #[error("{error}")]
    AfterRunning { error: Box<FunctionError>, usage: Usage },
}

impl FunctionError {
    /// HTTP status that the caller sees.
    pub fn status(&self) -> u16 {
        match self {
            FunctionError::Timeout { .. } => 504,
            FunctionError::Busy { .. } | FunctionError::NoRoom { .. } => 429,
            FunctionError::AfterRunning { error, .. } => error.status(),
            FunctionError::Start { .. } | FunctionError::Upstream { .. } | FunctionError::ResponseTooLarge { .. } => {
                502
            }
        }
    }

    /// What the failed invocation still used (a timed-out process burned CPU).
    pub fn usage(&self) -> Usage {
        match self {
            FunctionError::Timeout { usage, .. } | FunctionError::AfterRunning { usage, .. } => *usage,
            _ => Usage::default(),
        }
    }

    /// This error, for an invocation that ran and used `usage` (which a timeout carries in
    /// place of what it measured).
    pub fn after_running(self, usage: Usage) -> Self {
        match self {
            FunctionError::Timeout { name, timeout, still_running, .. } => {
                FunctionError::Timeout { name, timeout, usage, still_running }
            }
            error => FunctionError::AfterRunning { error: Box::new(error), usage },
        }
    }
}

/// Largest response body a function may return.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
