//! Names of span attributes, span names and metric names, defined once (docs/contracts.md,
//! "Telemetry contract").

/// `service.name` of every span the platform emits.
pub const SERVICE_NAME: &str = "sfaas-core";

pub const ATTR_SERVICE_NAME: &str = "service.name";
pub const ATTR_SERVICE_NAMESPACE: &str = "service.namespace";

pub const FAAS_NAME: &str = "faas.name";
/// The execution's own id: a UUIDv7 the gateway makes for each execution (each call, each
/// async attempt, each flow node attempt), the billing key of its usage record.
pub const FAAS_INVOCATION_ID: &str = "faas.invocation_id";
/// The caller's `X-Call-Id` (or the one the gateway made): correlation, and the async queue's
/// idempotency key; attempts of one call share it.
pub const SFAAS_CALL_ID: &str = "sfaas.call_id";
/// Function log records (a function's output as the platform exports it): the instance that
/// wrote the line (`exec` for an exec function's process), its stream (`stdout`/`stderr`),
/// whether it was cut, and a sequence number per gateway (identical lines stay distinct).
pub const FAAS_INSTANCE: &str = "faas.instance";
pub const LOG_IOSTREAM: &str = "log.iostream";
pub const SFAAS_LOG_CUT: &str = "sfaas.log.cut";
pub const SFAAS_LOG_SEQUENCE: &str = "sfaas.log.sequence";
pub const FAAS_TRIGGER: &str = "faas.trigger";
pub const FAAS_COLDSTART: &str = "faas.coldstart";
pub const SFAAS_CPU_MS: &str = "sfaas.cpu_ms";
pub const SFAAS_WALL_MS: &str = "sfaas.wall_ms";
pub const SFAAS_MEMORY_PEAK_BYTES: &str = "sfaas.memory.peak_bytes";
pub const SFAAS_BYTES_IN: &str = "sfaas.bytes_in";
pub const SFAAS_BYTES_OUT: &str = "sfaas.bytes_out";
/// Bytes of the log lines the platform exported for an invocation (billed as `log_bytes`).
pub const SFAAS_LOG_BYTES: &str = "sfaas.log_bytes";
pub const SFAAS_BILLABLE: &str = "sfaas.billable";
pub const SFAAS_FUNCTION_KIND: &str = "sfaas.function.kind";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";

/// `faas.trigger` of a synchronous call through the gateway.
pub const TRIGGER_HTTP: &str = "http";
/// `faas.trigger` of a call made by a flow node.
pub const TRIGGER_OTHER: &str = "other";
/// `faas.trigger` of a call delivered from the durable async queue.
pub const TRIGGER_PUBSUB: &str = "pubsub";

/// Span name of one function invocation.
pub fn invoke_span_name(function: &str) -> String {
    format!("{INVOKE_SPAN_PREFIX}{function}")
}

/// What an invocation span's name starts with.
pub const INVOKE_SPAN_PREFIX: &str = "invoke ";
/// What a flow run's span name starts with (`flow NAME`).
pub const FLOW_SPAN_PREFIX: &str = "flow ";
/// What a flow node's span name starts with (`node ID`).
pub const NODE_SPAN_PREFIX: &str = "node ";

pub const SFAAS_FLOW_NAME: &str = "sfaas.flow.name";
pub const SFAAS_FLOW_RUN_ID: &str = "sfaas.flow.run_id";
pub const SFAAS_FLOW_NODE: &str = "sfaas.flow.node";
pub const SFAAS_FLOW_ATTEMPT: &str = "sfaas.flow.attempt";
pub const SFAAS_FLOW_STATUS: &str = "sfaas.flow.status";
/// Node spans: the ids of the nodes this one needs (the DAG's edges).
pub const SFAAS_FLOW_NEEDS: &str = "sfaas.flow.needs";
/// Bytes of a value written to the state store (a node's output).
pub const SFAAS_STATE_VALUE_BYTES: &str = "sfaas.state.value_bytes";
/// Exact decimal text: the run's job's byte-seconds (on `flow` spans), or one owner's
/// byte-seconds in one usage interval (on `state.usage` spans).
pub const SFAAS_STATE_BYTE_SECONDS: &str = "sfaas.state.byte_seconds";

/// Span name of one state usage record: an owner's byte-seconds in one usage interval, the
/// span's start and end being the interval's.
pub const SPAN_STATE_USAGE: &str = "state.usage";
/// Span name of a managed instance's CPU time outside requests (its start, between requests,
/// its stop), with `faas.name`, `sfaas.cpu_ms` and a `sfaas.usage_id` of
/// `instance/<instance id>/<n>`; billed as CPU-ms of the function, not as an invocation.
pub const SPAN_INSTANCE_USAGE: &str = "instance.usage";
/// Who a `state.usage` record bills: [`STATE_OWNER_STANDING`] or [`STATE_OWNER_JOB`].
pub const SFAAS_STATE_OWNER: &str = "sfaas.state.owner";
pub const STATE_OWNER_STANDING: &str = "standing";
pub const STATE_OWNER_JOB: &str = "job";
/// The job of a `state.usage` record owned by a job (a flow run's job is its run id).
pub const SFAAS_STATE_JOB: &str = "sfaas.state.job";
/// Unique id of a usage record within its tenant, for de-duplication:
/// `state/standing/<start_ns>` or `state/job/<job>/<start_ns>`.
pub const SFAAS_USAGE_ID: &str = "sfaas.usage_id";

pub const METRIC_INVOCATIONS: &str = "gateway_function_invocation";
pub const METRIC_FUNCTION_SECONDS: &str = "gateway_functions_seconds";
pub const METRIC_SERVICE_COUNT: &str = "gateway_service_count";
pub const METRIC_CPU_SECONDS: &str = "sfaas_function_cpu_seconds";
pub const METRIC_INFLIGHT: &str = "sfaas_function_inflight";
pub const METRIC_COLD_STARTS: &str = "sfaas_function_cold_starts";
pub const METRIC_STATE_BYTES: &str = "sfaas_state_bytes";
pub const METRIC_STATE_BYTE_SECONDS: &str = "sfaas_state_byte_seconds";
pub const METRIC_ASYNC_QUEUE_DEPTH: &str = "sfaas_async_queue_depth";
pub const METRIC_ASYNC_DEAD_LETTERS: &str = "sfaas_async_dead_letters";
pub const METRIC_SPAN_SPOOL_BYTES: &str = "sfaas_span_spool_bytes";
pub const METRIC_SPAN_SPOOL_DROPPED: &str = "sfaas_span_spool_dropped";

/// Environment of process functions: where and how to reach the state store.
pub const ENV_STATE_URL: &str = "SFAAS_STATE_URL";
pub const ENV_STATE_TOKEN: &str = "SFAAS_STATE_TOKEN";
/// `redis://TENANT:TOKEN@HOST:PORT`: the state store over the Redis protocol (for managed
/// servers `redis://HOST:PORT`, the token coming with each request).
pub const ENV_STATE_REDIS_URL: &str = "SFAAS_STATE_REDIS_URL";
pub const ENV_JOB: &str = "SFAAS_JOB";

/// Headers carrying the state token and job to managed http functions.
pub const HEADER_STATE_TOKEN: &str = "x-sfaas-state-token";
pub const HEADER_JOB: &str = "x-sfaas-job";

/// Headers of flow runs.
pub const HEADER_RUN_ID: &str = "x-run-id";
pub const HEADER_FLOW_STATUS: &str = "x-flow-status";

/// Header carrying the invocation id (OpenFaaS).
pub const HEADER_CALL_ID: &str = "x-call-id";
pub const HEADER_CALLBACK_URL: &str = "x-callback-url";
pub const HEADER_FUNCTION_STATUS: &str = "x-function-status";
pub const HEADER_SCOPE_ORG_ID: &str = "x-scope-orgid";
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_DURATION_SECONDS: &str = "x-duration-seconds";
