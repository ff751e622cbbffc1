//! The runtime every trigger shares: one invocation of a function, from its limits to its span
//! and its metrics. HTTP calls, the async queue and flow nodes all run functions through
//! [`Invoker::dispatch`]; this layer knows nothing of HTTP, queues or flows.

use std::sync::Arc;
use std::time::Instant;

use crate::function::outbound::Outbound;
use crate::function::{Invocation, Outcome, Registry, RunContext, Target, Usage};
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::telemetry::{self, Telemetry};
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
}

impl Invoker {
    /// Runs one invocation of `function` for `tenant`: the path every trigger takes.
    pub async fn dispatch(
        &self,
        tenant: &TenantId,
        function_name: &str,
        mut invocation: Invocation,
        trigger: &'static str,
    ) -> Outcome {
        let Some(function) = self.functions.get(tenant, function_name) else {
            return Outcome::text(
                404,
                format!("function {function_name} not found in namespace {tenant}\n"),
                Usage::default(),
            );
        };
        let started = Instant::now();
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
        let context = RunContext {
            outbound: &self.outbound,
            tenant,
            state: &self.state,
            state_addresses: self.functions.state_addresses.get(),
            state_token: state_token.as_ref().map_or("", |t| t.token.as_str()),
            builtins: self.functions.builtins(),
        };
        let mut still_running = None;
        let outcome = match function.run(&context, &invocation).await {
            Ok(outcome) => outcome,
            Err(mut error) => {
                tracing::warn!(%tenant, function = function_name, call_id = %invocation.call_id, %execution_id, %error, "invocation failed");
                if let crate::function::FunctionError::Timeout { still_running: running, .. } = &mut error {
                    still_running = running.take();
                }
                Outcome::text(error.status(), format!("{error}\n"), error.usage())
            }
        };
        let wall = started.elapsed();
        self.metrics.record_invocation(tenant, function_name, outcome.status, wall.as_secs_f64(), &outcome.usage);

        let Some(span) = span else { return outcome };
        let kind = function.spec.kind.as_str();
        let bytes_out = outcome.body.len();
        match still_running {
            None => span.end(&telemetry::Invoked {
                function: function_name,
                kind,
                execution_id,
                call_id: &invocation.call_id,
                trigger,
                job: invocation.job.as_deref(),
                usage: &outcome.usage,
                wall,
                bytes_in,
                bytes_out,
                status: outcome.status,
            }),
            // A builtin past its timeout still runs: its span (and so its bill) waits for its CPU.
            Some(running) => {
                let (function, call_id, job, status) =
                    (function_name.to_string(), invocation.call_id.clone(), invocation.job.clone(), outcome.status);
                let mut usage = outcome.usage;
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
                        status,
                    });
                });
            }
        }
        outcome
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
