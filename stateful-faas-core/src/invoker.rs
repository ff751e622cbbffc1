//! The runtime every trigger shares: one invocation of a function, from its limits to its span
//! and its metrics. HTTP calls, the async queue and flow nodes all run functions through
//! [`Invoker::dispatch`]; this layer knows nothing of HTTP, queues or flows.

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::function::outbound::Outbound;
use crate::function::{Abandoned, Invocation, Outcome, Registry, RunContext, Target, Usage};
use crate::metrics::Metrics;
use crate::room::{Buffers, Held, Room};
use crate::state::StateStore;
use crate::telemetry::{self, InvocationSpan, Telemetry};
use crate::tenant::{TenantId, TenantStore};

/// Functions, state, telemetry, metrics and tenants: what running a function needs.
pub struct Invoker {
    pub tenants: Arc<TenantStore>,
    pub functions: Registry,
    pub metrics: Metrics,
    pub telemetry: Telemetry,
    pub state: Arc<StateStore>,
    /// Client for requests tenants direct: upstream functions and callbacks.
    pub outbound: Outbound,
    /// Room for invocations' buffers (requests' bodies and functions' responses).
    pub buffers: Arc<Room>,
}

impl Invoker {
    /// Runs one invocation of `function` for `tenant`: the path every trigger takes. Its body
    /// and its function's response are held in [`Invoker::buffers`] while it runs (waiting for
    /// room for the body: backpressure).
    pub async fn dispatch(
        &self,
        tenant: &TenantId,
        function_name: &str,
        invocation: Invocation,
        trigger: &'static str,
    ) -> Outcome {
        match self.buffers.hold(tenant, invocation.body.len() as u64).await {
            Ok(held) => self.dispatch_held(tenant, function_name, invocation, trigger, held).await.0,
            Err(error) => {
                self.metrics.record_invocation(tenant, function_name, 429, 0.0, &Usage::default());
                Outcome::text(429, format!("{error}\n"), Usage::default())
            }
        }
    }

    /// [`Invoker::dispatch`] of an invocation whose body is `held` already (read into room as
    /// it arrived). Gives back the invocation's buffers, to be kept until its response is sent.
    pub async fn dispatch_held(
        &self,
        tenant: &TenantId,
        function_name: &str,
        invocation: Invocation,
        trigger: &'static str,
        held: Held,
    ) -> (Outcome, Arc<Buffers>) {
        let buffers = Arc::new(Buffers::new(self.buffers.clone(), held, invocation.body.len() as u64));
        let outcome = self.run(tenant, function_name, invocation, trigger, &buffers).await;
        (outcome, buffers)
    }

    async fn run(
        &self,
        tenant: &TenantId,
        function_name: &str,
        mut invocation: Invocation,
        trigger: &'static str,
        buffers: &Arc<Buffers>,
    ) -> Outcome {
        let Some(function) = self.functions.get(tenant, function_name) else {
            return Outcome::text(
                404,
                format!("function {function_name} not found in namespace {tenant}\n"),
                Usage::default(),
            );
        };
        let started = Instant::now();
        // Every invocation's span is queued, full queue or not, because billing meters it: so
        // while a tenant's spans are not leaving (its queue is full), its new calls wait.
        if self.telemetry.behind(tenant) {
            self.metrics.record_invocation(tenant, function_name, 429, 0.0, &Usage::default());
            return Outcome::text(
                429,
                format!(
                    "namespace {tenant}'s telemetry is behind (its span queue is full, so its calls \
                     could not be metered): retry in a moment\n"
                ),
                Usage::default(),
            );
        }
        let Some(_permit) = function.try_begin() else {
            self.metrics.record_invocation(
                tenant,
                function_name,
                429,
                started.elapsed().as_secs_f64(),
                &Usage::default(),
            );
            return Outcome::text(
                429,
                format!(
                    "function {function_name} already has {} calls in flight (max_inflight)\n",
                    function.spec.limits.max_inflight
                ),
                Usage::default(),
            );
        };
        let _inflight = self.metrics.begin_inflight(tenant, function_name);
        let bytes_in = invocation.body.len();

        let parent = telemetry::extract_parent(invocation.traceparent.as_deref());
        let span = self.telemetry.start_invocation(tenant, &parent);
        // This execution's own id, the billing key of its usage: a caller's `X-Call-Id` repeats
        // (retries, async attempts, a caller reusing one), an execution's id never does.
        let execution_id = new_uuid_v7();
        // Handed to process functions (header or `TRACEPARENT`); builtins do not read it.
        if let Some(span) = &span
            && !matches!(function.spec.target, Target::Builtin { .. })
        {
            invocation.traceparent = Some(telemetry::traceparent(span.span_context()));
        }

        // Only processes the platform runs get a state token; builtins use the store in process.
        let state_token = matches!(function.spec.target, Target::Exec { .. } | Target::Managed { .. })
            .then(|| self.tenants.issue_function_token(tenant, invocation.job.as_deref()));
        // A process's output lines are its tenant's logs, tied to this invocation and its span
        // (a managed instance's while it serves it); a builtin's failure too, once it fails.
        let ids = span.as_ref().map(|span| {
            let ids = span.span_context();
            (ids.trace_id().to_bytes(), ids.span_id().to_bytes())
        });
        // Bytes of the lines exported as this invocation's, billed with it (`log_bytes`).
        let log_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sink = |instance: &str| -> Option<Arc<dyn crate::function::output::LogSink>> {
            let logs = self.telemetry.function_logs()?;
            Some(Arc::new(telemetry::logs::Sink {
                logs,
                tenant: tenant.clone(),
                context: telemetry::logs::LogContext {
                    function: function_name.to_string(),
                    instance: instance.to_string(),
                    invocation_id: Some(execution_id.to_string()),
                    call_id: (!invocation.call_id.is_empty()).then(|| invocation.call_id.clone()),
                    trace_id: ids.map(|ids| ids.0),
                    span_id: ids.map(|ids| ids.1),
                },
                exported: log_bytes.clone(),
            }))
        };
        let logs = match &function.spec.target {
            Target::Exec { .. } | Target::Managed { .. } => sink("exec"),
            _ => None,
        };
        let context = RunContext {
            outbound: &self.outbound,
            tenant,
            state: &self.state,
            state_addresses: self.functions.state_addresses.get(),
            state_token: state_token.as_ref().map_or("", |t| t.token.as_str()),
            builtins: self.functions.builtins(),
            buffers,
            logs,
        };
        let abandoned = Arc::new(Abandoned::default());
        let mut underway = Underway {
            invoker: self,
            tenant,
            function: function_name,
            kind: function.spec.kind.as_str(),
            trigger,
            execution_id,
            call_id: &invocation.call_id,
            job: invocation.job.as_deref(),
            started,
            bytes_in,
            log_bytes: log_bytes.clone(),
            span,
            abandoned: &abandoned,
            ended: false,
        };
        // If this call is dropped here, the runner's future drops first (stopping the
        // invocation and reporting what it used), then `underway` (billing it).
        let result = abandoned.watch(function.run(&context, &invocation)).await;
        let mut still_running = None;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(mut error) => {
                tracing::warn!(%tenant, function = function_name, call_id = %invocation.call_id, %execution_id, %error, "invocation failed");
                if let crate::function::FunctionError::Timeout { still_running: running, .. } = &mut error {
                    still_running = running.take();
                }
                Outcome::text(error.status(), format!("{error}\n"), error.usage())
            }
        };
        if matches!(function.spec.target, Target::Builtin { .. })
            && outcome.status >= 500
            && let Some(sink) = sink("builtin")
        {
            let message =
                String::from_utf8_lossy(&outcome.body[..outcome.body.len().min(crate::function::output::MAX_LINE)]);
            sink.line("stderr", &format!("ERROR: {}", message.trim_end()), false);
        }
        underway.end(outcome.status, outcome.usage, outcome.body.len(), still_running);
        outcome
    }
}

/// The status a cancelled invocation is recorded with, its caller having gone away before it
/// ended (a client that disconnected, a flow run cancelled or failed elsewhere): nginx's
/// "client closed request".
pub const STATUS_CANCELLED: u16 = 499;

/// An invocation under way, ended exactly once: its metrics and its span (its bill). By
/// [`Underway::end`] with its outcome, or, if its call is dropped first, as it drops: as
/// cancelled ([`STATUS_CANCELLED`]), with what its runner measured up to the stop.
struct Underway<'a> {
    invoker: &'a Invoker,
    tenant: &'a TenantId,
    function: &'a str,
    kind: &'static str,
    trigger: &'static str,
    execution_id: uuid::Uuid,
    call_id: &'a str,
    job: Option<&'a str>,
    started: Instant,
    bytes_in: usize,
    /// Bytes of the lines exported as the invocation's by the time its span ends.
    log_bytes: Arc<std::sync::atomic::AtomicU64>,
    span: Option<InvocationSpan>,
    abandoned: &'a Abandoned,
    ended: bool,
}

impl Underway<'_> {
    /// Records the invocation's metrics and ends its span; with `still_running` (a builtin past
    /// its timeout, a process not yet reaped), the span waits for the rest of its CPU time.
    fn end(&mut self, status: u16, usage: Usage, bytes_out: usize, still_running: Option<JoinHandle<u64>>) {
        self.ended = true;
        let wall = self.started.elapsed();
        self.invoker.metrics.record_invocation(self.tenant, self.function, status, wall.as_secs_f64(), &usage);
        let Some(span) = self.span.take() else { return };
        let Some(running) = still_running else {
            span.end(&telemetry::Invoked {
                function: self.function,
                kind: self.kind,
                execution_id: self.execution_id,
                call_id: self.call_id,
                trigger: self.trigger,
                job: self.job,
                usage: &usage,
                wall,
                bytes_in: self.bytes_in,
                bytes_out,
                log_bytes: self.log_bytes.load(std::sync::atomic::Ordering::Relaxed),
                status,
            });
            return;
        };
        let (function, call_id, job) =
            (self.function.to_string(), self.call_id.to_string(), self.job.map(str::to_string));
        let (kind, trigger, execution_id, bytes_in) = (self.kind, self.trigger, self.execution_id, self.bytes_in);
        let log_bytes = self.log_bytes.clone();
        let mut usage = usage;
        tokio::spawn(async move {
            usage.cpu_ns = running.await.unwrap_or(0);
            span.end(&telemetry::Invoked {
                function: &function,
                kind,
                execution_id,
                call_id: &call_id,
                trigger,
                job: job.as_deref(),
                usage: &usage,
                wall,
                bytes_in,
                bytes_out,
                log_bytes: log_bytes.load(std::sync::atomic::Ordering::Relaxed),
                status,
            });
        });
    }
}

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (tenant, function, call_id, execution_id) = (self.tenant, self.function, self.call_id, self.execution_id);
        tracing::info!(%tenant, function, call_id, %execution_id, "invocation cancelled: its caller went away");
        let (usage, still_running) = self.abandoned.take().unwrap_or_default();
        self.end(STATUS_CANCELLED, usage, 0, still_running);
    }
}

/// A new UUIDv7, ordered by time like the flow runs' ids, so that billing's usage records
/// (keyed by tenant and execution id) are appended per tenant instead of inserted at random
/// places in a large B-tree. Its random bits come from the thread's generator (`rand`), not a
/// `getrandom` system call per request as `Uuid::now_v7` does.
pub fn new_uuid_v7() -> uuid::Uuid {
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    uuid::Builder::from_unix_timestamp_millis(millis.as_millis() as u64, &rand::random()).into_uuid()
}
