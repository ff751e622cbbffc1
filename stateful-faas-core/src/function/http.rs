//! `http` functions, proxied like of-watchdog's http mode.
//!
//! A managed function is a server the core starts (`sh -c COMMAND` with `PORT` set) and
//! considers ready once its port accepts connections. Each instance serves one request at a
//! time, so the CPU time it used during a request (its cgroup's; its process's
//! `/proc/PID/task/*/schedstat` with the sandbox off) is that request's alone: the measurement
//! is exact. What it uses outside requests is metered too, as instance usage: each second while
//! it is idle, and to its end however it stops (a start that fails included). A request whose
//! caller goes away stops its instance, and is billed up to then. Up to `max_instances` run at
//! once; a request that finds none idle starts one (a cold start) or waits for one; idle
//! instances above `min_instances` stop after `idle_timeout` (scale to zero).
//!
//! An upstream function is any HTTP server the core does not manage (for example a function
//! behind a real OpenFaaS gateway); its CPU time is not visible to the core and is reported 0.

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::outbound::Outbound;
use super::process;
use super::sandbox::{self, Io, Jail, Sandbox};
use super::{Abandoned, FunctionError, FunctionSpec, Invocation, MAX_RESPONSE_BYTES, Outcome, RunContext, Usage};
use crate::room::Buffers;
use crate::semconv::{HEADER_JOB, HEADER_STATE_TOKEN};
use crate::tenant::TenantId;

/// How long a managed instance may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Request headers that belong to one hop and are not forwarded.
const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
];

/// The request a function receives at `uri`: the caller's method, headers (less hop-by-hop
/// ones and its trace context, replaced by the invocation's) and body, plus `extra_headers`.
fn request_for(
    spec: &FunctionSpec,
    uri: &str,
    invocation: &Invocation,
    extra_headers: &[(String, String)],
) -> Result<http::Request<Bytes>, FunctionError> {
    let invalid = |message: String| FunctionError::Upstream { name: spec.name.clone(), message };
    let mut uri = format!("{uri}{}", invocation.path);
    if !invocation.query.is_empty() {
        uri = format!("{uri}?{}", invocation.query);
    }
    let mut request = http::Request::builder().method(invocation.method.as_str()).uri(uri);
    for (name, value) in &invocation.headers {
        if !HOP_HEADERS.contains(&name.as_str()) && name != "traceparent" {
            request = request.header(name, value);
        }
    }
    if let Some(traceparent) = &invocation.traceparent {
        request = request.header("traceparent", traceparent);
    }
    for (name, value) in extra_headers {
        request = request.header(name, value);
    }
    request.body(invocation.body.clone()).map_err(|e| invalid(e.to_string()))
}

/// A response's status and end-to-end headers, or an error if it declares a body too large.
fn response_head(
    spec: &FunctionSpec,
    status: http::StatusCode,
    headers: &http::HeaderMap,
) -> Result<(u16, Vec<(String, String)>), FunctionError> {
    let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_RESPONSE_BYTES as u64) {
        return Err(FunctionError::ResponseTooLarge { name: spec.name.clone(), limit: MAX_RESPONSE_BYTES });
    }
    let headers = headers
        .iter()
        .filter(|(name, _)| !HOP_HEADERS.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    Ok((status.as_u16(), headers))
}

fn timed_out(spec: &FunctionSpec) -> FunctionError {
    FunctionError::Timeout {
        name: spec.name.clone(),
        timeout: spec.limits.timeout,
        usage: Usage::default(),
        still_running: None,
    }
}

/// An error's message with its causes (a refused connection, a name that did not resolve, the
/// outbound policy are in its sources, not in its own message).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// Appends a chunk of a response to `body`, within the largest response and the room of the
/// invocation's buffers.
fn keep(spec: &FunctionSpec, buffers: &Buffers, body: &mut bytes::BytesMut, chunk: &[u8]) -> Result<(), FunctionError> {
    let len = body.len() + chunk.len();
    if len > MAX_RESPONSE_BYTES {
        return Err(FunctionError::ResponseTooLarge { name: spec.name.clone(), limit: MAX_RESPONSE_BYTES });
    }
    buffers.response(len as u64).map_err(|error| FunctionError::NoRoom { name: spec.name.clone(), error })?;
    body.extend_from_slice(chunk);
    Ok(())
}

/// Calls an external upstream.
pub async fn run_upstream(
    outbound: &Outbound,
    spec: &FunctionSpec,
    url: &str,
    invocation: &Invocation,
    buffers: &Buffers,
) -> Result<Outcome, FunctionError> {
    let unreachable = |message: String| FunctionError::Upstream { name: spec.name.clone(), message };
    let client = outbound.to(url).map_err(unreachable)?;
    let request = request_for(spec, url, invocation, &[])?;
    let mut request = reqwest::Request::try_from(request).map_err(|e| unreachable(with_causes(&e)))?;
    *request.timeout_mut() = Some(spec.limits.timeout);
    let response = client
        .execute(request)
        .await
        .map_err(|error| if error.is_timeout() { timed_out(spec) } else { unreachable(with_causes(&error)) })?;
    let (status, headers) = response_head(spec, response.status(), response.headers())?;
    // Read a chunk at a time up to the limit: an upstream that streams without a length
    // (chunked, for as long as the timeout) is cut off there, not held whole.
    let mut response = response;
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| unreachable(e.to_string()))? {
        keep(spec, buffers, &mut body, &chunk)?;
    }
    Ok(Outcome { status, headers, body: body.freeze(), usage: Usage::default() })
}

/// Sends one request to a managed instance over `stream` (a fresh connection: one request per
/// instance at a time, and servers such as Python's close after each response anyway).
async fn forward_to_instance(
    spec: &FunctionSpec,
    stream: tokio::net::TcpStream,
    invocation: &Invocation,
    extra_headers: &[(String, String)],
    buffers: &Buffers,
) -> Result<(u16, Vec<(String, String)>, Bytes), FunctionError> {
    use http_body_util::BodyExt;
    let unreachable = |message: String| FunctionError::Upstream { name: spec.name.clone(), message };
    let mut request = request_for(spec, "", invocation, extra_headers)?;
    request.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("127.0.0.1"));
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(with_causes(&e)))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request.map(http_body_util::Full::new))
            .await
            .map_err(|e| unreachable(with_causes(&e)))?;
        let (status, headers) = response_head(spec, response.status(), response.headers())?;
        let mut incoming = response.into_body();
        let mut body = bytes::BytesMut::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| unreachable(e.to_string()))?;
            if let Some(chunk) = frame.data_ref() {
                keep(spec, buffers, &mut body, chunk)?;
            }
        }
        Ok((status, headers, body.freeze()))
    };
    tokio::time::timeout(spec.limits.timeout, exchange).await.map_err(|_| timed_out(spec))?
}

/// One running server process of a managed function. However it is dropped (stopped, failed to
/// start, abandoned mid-start) it is killed and what it used since it was last metered is
/// metered.
struct Instance {
    process: process::Running,
    port: u16,
    last_used: Instant,
    /// Its jail: its cgroup (everything it starts runs there; killed with it) and its network.
    jail: Option<Jail>,
    /// Unique among all instances: the stem of its usage records' ids.
    id: uuid::Uuid,
    /// Its place in its tenant's quota of instances, given back when it stops.
    _slot: OwnedSemaphorePermit,
    /// Usage records it has given so far.
    records: u64,
    /// CPU time billed so far, to requests or as instance usage, and since when the rest ran.
    metered_cpu_ns: u64,
    metered_since: SystemTime,
    /// Where its instance usage goes, and whose it is.
    meter: InstanceMeter,
    tenant: TenantId,
    function: String,
    /// Where its output lines go (the invocation it serves, see [`super::output::LogSlot`]).
    log_slot: Arc<super::output::LogSlot>,
}

/// CPU time a managed instance used outside requests (starting, between requests, stopping):
/// billed to its tenant as an `instance.usage` record of its function, never dropped.
#[derive(Debug, Clone)]
pub struct InstanceUsage {
    pub tenant: TenantId,
    pub function: String,
    /// `instance/<instance id>/<n>`: the platform's own, unique per tenant.
    pub usage_id: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub cpu_ms: u64,
}

/// Instance usage not yet reported, shared by every pool.
pub type InstanceMeter = Arc<Mutex<Vec<InstanceUsage>>>;

impl Instance {
    /// CPU time the instance used so far, in nanoseconds: its cgroup's, or its server
    /// process's with the sandbox off.
    fn cpu_ns(&self) -> u64 {
        self.jail.as_ref().map_or_else(|| self.process.cpu_ns(), |jail| jail.group.cpu_ns())
    }

    fn peak_memory_bytes(&self) -> u64 {
        self.jail
            .as_ref()
            .map_or_else(|| process::process_peak_rss(self.process.pid as u32), |jail| jail.group.peak_memory_bytes())
    }

    /// A connection to the server (in its jail's network, or the host's loopback).
    async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        match &self.jail {
            Some(jail) => jail.connect(self.port).await,
            None => tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, self.port)).await,
        }
    }

    /// Kills it, with everything in its cgroup, and returns the CPU time it used to its end.
    fn stop(&mut self) -> u64 {
        let Some(jail) = &self.jail else {
            // A killed process's threads take their CPU times with them: read first.
            let cpu_ns = self.cpu_ns();
            self.process.kill();
            return cpu_ns;
        };
        self.process.kill();
        jail.group.kill();
        jail.group.cpu_ns()
    }

    /// Records its CPU time since it was last metered, up to `cpu_ns`: whole milliseconds (the
    /// rest carries to the next record), or at its end everything, rounded up.
    fn meter(&mut self, cpu_ns: u64, last: bool) {
        let unmetered = cpu_ns.saturating_sub(self.metered_cpu_ns);
        let cpu_ms = if last { unmetered.div_ceil(1_000_000) } else { unmetered / 1_000_000 };
        if cpu_ms == 0 {
            return;
        }
        let now = SystemTime::now();
        self.records += 1;
        self.meter.lock().unwrap().push(InstanceUsage {
            tenant: self.tenant.clone(),
            function: self.function.clone(),
            usage_id: format!("instance/{}/{}", self.id.simple(), self.records),
            start: self.metered_since,
            end: now,
            cpu_ms,
        });
        self.metered_cpu_ns += cpu_ms * 1_000_000;
        self.metered_since = now;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let cpu_ns = self.stop();
        self.meter(cpu_ns, true);
    }
}

/// A request on an instance. If its call is dropped before the request ends (its caller went
/// away), the instance, busy with a request nobody waits for, is stopped: the request is billed
/// the CPU it used until then ([`Abandoned`]), the instance usage metered to its end.
struct Serving<'a> {
    pool: &'a ManagedPool,
    instance: Option<Instance>,
    cpu_before: u64,
    cold_start: bool,
}

impl<'a> Serving<'a> {
    /// A request begins: what the instance used since it was last metered (its start, the time
    /// between requests) is metered first.
    fn begin(pool: &'a ManagedPool, mut instance: Instance, cold_start: bool) -> Self {
        let cpu_before = instance.cpu_ns();
        instance.meter(cpu_before, false);
        Self { pool, instance: Some(instance), cpu_before, cold_start }
    }

    fn instance(&self) -> &Instance {
        self.instance.as_ref().expect("an instance while serving")
    }

    /// The instance, once the request has ended.
    fn end(mut self) -> Instance {
        self.instance.take().expect("an instance while serving")
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let Some(mut instance) = self.instance.take() else { return };
        let peak_memory_bytes = instance.peak_memory_bytes();
        let cpu_after = instance.stop();
        let usage =
            Usage { cpu_ns: cpu_after.saturating_sub(self.cpu_before), peak_memory_bytes, cold_start: self.cold_start };
        instance.metered_cpu_ns = cpu_after.max(instance.metered_cpu_ns);
        Abandoned::report(usage, None);
        self.pool.discard(instance);
    }
}

/// The instances of one managed function.
pub struct ManagedPool {
    name: String,
    command: String,
    tenant: TenantId,
    meter: InstanceMeter,
    sandbox: Option<Arc<Sandbox>>,
    /// The tenant's instances, all functions together (`--tenant-max-instances`).
    tenant_instances: Arc<Semaphore>,
    idle: Mutex<Vec<Instance>>,
    /// One permit per instance that may exist; a request holds one while it runs.
    capacity: Arc<Semaphore>,
    /// Instances to keep even when idle (`min_instances`, or `/system/scale-function`).
    min_instances: Mutex<usize>,
    running: std::sync::atomic::AtomicUsize,
}

impl ManagedPool {
    pub fn new(
        spec: &FunctionSpec,
        command: &str,
        tenant: &TenantId,
        sandbox: Option<Arc<Sandbox>>,
        tenant_instances: Arc<Semaphore>,
        meter: InstanceMeter,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: spec.name.clone(),
            command: command.to_string(),
            tenant: tenant.clone(),
            meter,
            sandbox,
            tenant_instances,
            idle: Mutex::new(Vec::new()),
            capacity: Arc::new(Semaphore::new(spec.limits.max_instances)),
            min_instances: Mutex::new(spec.limits.min_instances),
            running: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Instances running now.
    pub fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the number of instances kept warm and starts them.
    pub async fn scale(
        self: &Arc<Self>,
        spec: &FunctionSpec,
        replicas: usize,
        state: Option<&super::StateAddresses>,
    ) -> Result<(), FunctionError> {
        let replicas = replicas.min(spec.limits.max_instances);
        *self.min_instances.lock().unwrap() = replicas;
        while self.running() < replicas {
            let instance = self.start(spec, state).await?;
            self.idle.lock().unwrap().push(instance);
        }
        Ok(())
    }

    /// Runs one invocation on an idle instance, starting one if none is idle.
    pub async fn run(
        self: &Arc<Self>,
        context: &RunContext<'_>,
        spec: &FunctionSpec,
        invocation: &Invocation,
    ) -> Result<Outcome, FunctionError> {
        let permit: OwnedSemaphorePermit =
            match tokio::time::timeout(spec.limits.timeout, self.capacity.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    return Err(timed_out(spec));
                }
            };
        let reused = self.idle.lock().unwrap().pop();
        let cold_start = reused.is_none();
        let ready = match reused {
            Some(instance) => instance,
            None => self.start(spec, context.state_addresses).await?,
        };
        // A server lives across calls, so the per-call token and job travel as headers.
        let mut headers = vec![(HEADER_STATE_TOKEN.to_string(), context.state_token.to_string())];
        if let Some(job) = &invocation.job {
            headers.push((HEADER_JOB.to_string(), job.clone()));
        }
        let serving = Serving::begin(self, ready, cold_start);
        // What it writes now is this invocation's; afterwards, its instance's.
        let sink = context.logs.as_ref().map(|sink| sink.of_instance(&serving.instance().id.to_string()));
        if let Some(sink) = &sink {
            serving.instance().log_slot.set(sink.clone());
        }
        let cpu_before = serving.cpu_before;
        let result = match serving.instance().connect().await {
            Ok(stream) => forward_to_instance(spec, stream, invocation, &headers, context.buffers).await,
            Err(error) => Err(FunctionError::Upstream { name: spec.name.clone(), message: error.to_string() }),
        };
        let mut instance = serving.end();
        if let Some(sink) = &sink {
            instance.log_slot.set(sink.between_invocations());
        }
        let cpu_after = instance.cpu_ns();
        let usage = Usage {
            cpu_ns: cpu_after.saturating_sub(cpu_before),
            peak_memory_bytes: instance.peak_memory_bytes(),
            cold_start,
        };
        // The request's CPU is its invocation's.
        (instance.metered_cpu_ns, instance.metered_since) = (cpu_after.max(instance.metered_cpu_ns), SystemTime::now());
        let alive = instance.process.try_wait().is_none();
        match &result {
            // A server that timed out or died is not trusted with the next request.
            Err(_) if !alive || matches!(result, Err(FunctionError::Timeout { .. })) => self.discard(instance),
            _ if !alive => self.discard(instance),
            _ => {
                instance.last_used = Instant::now();
                self.idle.lock().unwrap().push(instance);
            }
        }
        drop(permit);
        let (status, headers, body) = result.map_err(|error| error.after_running(usage))?;
        Ok(Outcome { status, headers, body, usage })
    }

    /// Stops a running instance, metering what it used since it was last metered.
    fn discard(&self, instance: Instance) {
        drop(instance);
        self.running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops every idle instance (at shutdown, or when the function goes).
    pub fn stop(&self) {
        let idle: Vec<Instance> = self.idle.lock().unwrap().drain(..).collect();
        for instance in idle {
            self.discard(instance);
        }
    }

    /// Stops idle instances unused for `idle_timeout`, keeping `min_instances`, and meters what
    /// the others used since they were last metered (the gateway's housekeeping, each second):
    /// a warm server that burns CPU between requests is billed as it goes, not at its next
    /// request or its stop only.
    pub fn reap_idle(&self, idle_timeout: Duration) {
        let keep = *self.min_instances.lock().unwrap();
        let mut idle = self.idle.lock().unwrap();
        // Oldest first: idle is a stack, so the front holds the least recently used.
        while self.running() > keep && idle.first().is_some_and(|instance| instance.last_used.elapsed() >= idle_timeout)
        {
            let instance = idle.remove(0);
            self.discard(instance);
        }
        for instance in idle.iter_mut() {
            let cpu_ns = instance.cpu_ns();
            instance.meter(cpu_ns, false);
        }
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        state: Option<&super::StateAddresses>,
    ) -> Result<Instance, FunctionError> {
        let start_error = |message: String| FunctionError::Start { name: spec.name.clone(), message };
        let slot = self.tenant_instances.clone().try_acquire_owned().map_err(|_| FunctionError::Busy {
            name: spec.name.clone(),
            reason: format!(
                "namespace {} has its quota of managed instances running (--tenant-max-instances); \
                 try again when one stops",
                self.tenant
            ),
        })?;
        // In a jail, the instance has a network of its own: its port is nobody else's.
        let jail = self
            .sandbox
            .as_ref()
            .map(|sandbox| sandbox.jail(&self.tenant, spec, true))
            .transpose()
            .map_err(|e| start_error(e.to_string()))?;
        let port = match &jail {
            Some(jail) if jail.has_own_network() => sandbox::INSTANCE_PORT,
            _ => free_port().map_err(|e| start_error(format!("no free port: {e}")))?,
        };
        let mut env = vec![("PORT".to_string(), port.to_string())];
        // A managed server authenticates with each request's token (its header), so its Redis
        // URL carries no credentials.
        if let Some(state) = state {
            env.push((crate::semconv::ENV_STATE_URL.to_string(), state.http.clone()));
            if let Some(redis) = &state.redis {
                env.push((crate::semconv::ENV_STATE_REDIS_URL.to_string(), format!("redis://{redis}")));
            }
        }
        let command = format!("exec {}", self.command);
        let workdir = spec.workdir.as_deref();
        let spawned =
            process::spawn(&command, &spec.env, &env, workdir, spec.limits.memory_bytes, jail.as_ref(), Io::Logged)
                .map_err(|e| start_error(e.to_string()))?;
        let pid = spawned.pid;
        let id = uuid::Uuid::new_v4();
        let log_slot = Arc::new(super::output::LogSlot::default());
        for (fd, stream) in [(spawned.stdout, "stdout"), (spawned.stderr, "stderr")] {
            if let Some(fd) = fd {
                let (tenant, function) = (self.tenant.to_string(), spec.name.clone());
                super::output::forward(fd, stream, tenant, function, id.to_string(), log_slot.clone());
            }
        }
        let mut instance = Instance {
            process: process::Running::new(pid),
            port,
            last_used: Instant::now(),
            jail,
            id,
            _slot: slot,
            records: 0,
            metered_cpu_ns: 0,
            metered_since: SystemTime::now(),
            meter: self.meter.clone(),
            tenant: self.tenant.clone(),
            function: self.name.clone(),
            log_slot,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT.min(spec.limits.timeout.max(Duration::from_secs(1)) * 10);
        loop {
            match instance.connect().await {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(start_error(e.to_string())),
                Err(_) => {}
            }
            if let Some(status) = instance.process.try_wait() {
                let status = std::process::ExitStatus::from_raw(status);
                return Err(start_error(format!("server exited before listening on port {port}: {status}")));
            }
            if Instant::now() >= deadline {
                return Err(start_error(format!("server did not listen on port {port} within {STARTUP_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(function = %spec.name, pid, port, "started function instance");
        Ok(instance)
    }
}

impl Drop for ManagedPool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
