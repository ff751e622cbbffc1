//! The platform's OpenTelemetry spans, exported over OTLP (docs/contracts.md, "Telemetry contract").
//!
//! The resource of a span names its tenant (`service.namespace`), and one SDK tracer provider
//! has one resource, so the core keeps one provider per tenant, created on first use. Each has
//! an [`OtlpProcessor`] with a bounded queue: requests are never blocked and memory never
//! grows. What the collector does not take goes to the tenant's spool on disk
//! ([`spool`]) until it is replayed; a full queue or a full spool drops spans, loudly.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub mod logs;
mod otlp;
pub mod spool;

#[cfg(feature = "bench")]
pub use otlp::spool_throughput;
pub use otlp::{OtlpProcessor, SpanQueue};

use crate::function::Usage;
use crate::semconv;
use crate::state::{Owner, UsageInterval};
use crate::tenant::TenantId;

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies; the endpoint is the base URL (`/v1/traces` is added).
    Http,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "grpc" => Ok(Self::Grpc),
            "http" | "http/protobuf" => Ok(Self::Http),
            other => Err(format!("unknown OTLP protocol {other:?} (use grpc or http)")),
        }
    }
}

/// Where the core's spans go.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// OTLP endpoint, for example `http://127.0.0.1:4317`; `None` turns span export off.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Sent as `Authorization: Bearer` (the platform's meter token).
    pub token: Option<String>,
    /// Spans buffered per tenant: past it, the platform's own droppable spans are dropped, and
    /// the tenant's new calls are refused (429) until its spans leave (billed usage is never
    /// dropped).
    pub max_queue_size: usize,
    /// Where export requests the collector cannot take yet wait (a folder per tenant, replayed
    /// in order); `None`: they are lost.
    pub spool_dir: Option<std::path::PathBuf>,
    /// Bytes each tenant's spool may hold.
    pub spool_max_bytes: u64,
    /// Bytes of function log lines a tenant may export a UTC day (`None`:
    /// [`logs::DEFAULT_BYTES_PER_DAY`]).
    pub log_bytes_per_day: Option<u64>,
}

/// A tenant's span export.
struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    queue: SpanQueue,
}

/// The core's span pipeline, and its function logs'.
pub struct Telemetry {
    config: RwLock<TelemetryConfig>,
    /// Per tenant: the provider (kept for shutdown), its tracer (cloned per span) and its
    /// processor's queue (for invocation spans).
    providers: RwLock<HashMap<TenantId, Exporter>>,
    /// Started with the first line once export is on.
    logs: std::sync::OnceLock<Option<std::sync::Arc<logs::FunctionLogs>>>,
}

impl Telemetry {
    pub fn new(config: TelemetryConfig) -> Self {
        Self { config: RwLock::new(config), providers: RwLock::new(HashMap::new()), logs: std::sync::OnceLock::new() }
    }

    /// The function-log pipeline, or `None` while export is off (lines then go to the
    /// gateway's own log, as before export is set).
    pub fn function_logs(&self) -> Option<std::sync::Arc<logs::FunctionLogs>> {
        // The hot path (every invocation asks): started already.
        if let Some(logs) = self.logs.get() {
            return logs.clone();
        }
        let config = self.config.read().unwrap();
        let endpoint = config.endpoint.clone()?;
        self.logs
            .get_or_init(|| match logs::FunctionLogs::start(&config, &endpoint) {
                Ok(logs) => Some(logs),
                Err(error) => {
                    tracing::error!(%error, endpoint, "cannot set up function log export; function logs are not exported");
                    None
                }
            })
            .clone()
    }

    /// Points span export somewhere else (`sfaas up` does, once its collector listens);
    /// tenants whose tracer exists already keep theirs.
    pub fn set_export(&self, endpoint: String, protocol: OtlpProtocol, token: Option<String>) {
        let mut config = self.config.write().unwrap();
        config.endpoint = Some(endpoint);
        config.protocol = protocol;
        config.token = token;
    }

    /// Starts the exporters of the tenants whose spools hold requests (left by a collector
    /// outage before a restart), so that they are replayed whether or not the tenant calls.
    pub fn resume_spooled(&self) {
        let Some(dir) = self.config.read().unwrap().spool_dir.clone() else { return };
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            let has_requests = std::fs::read_dir(entry.path()).is_ok_and(|mut files| files.next().is_some());
            if let (true, Some(tenant)) = (has_requests, entry.file_name().to_str().and_then(|n| TenantId::new(n).ok()))
            {
                self.with_exporter(&tenant, |_| ());
            }
        }
    }

    /// The tracer for a tenant's platform spans, or `None` when export is off.
    pub fn tracer(&self, tenant: &TenantId) -> Option<SdkTracer> {
        self.with_exporter(tenant, |exporter| exporter.tracer.clone())
    }

    /// Starts the span of one invocation of a tenant's function (see [`InvocationSpan`]), or
    /// `None` when export is off.
    pub fn start_invocation(&self, tenant: &TenantId, parent: &Context) -> Option<InvocationSpan> {
        self.with_exporter(tenant, |exporter| InvocationSpan::start(exporter.queue.clone(), parent))
    }

    /// Whether a tenant's spans are not leaving as fast as they come: its queue is full.
    pub fn behind(&self, tenant: &TenantId) -> bool {
        self.providers.read().unwrap().get(tenant).is_some_and(|exporter| exporter.queue.is_full())
    }

    /// `f` of the tenant's exporter, created on first use.
    fn with_exporter<T>(&self, tenant: &TenantId, f: impl FnOnce(&Exporter) -> T) -> Option<T> {
        // The hot path: a tenant that has its exporter already.
        if let Some(exporter) = self.providers.read().unwrap().get(tenant) {
            return Some(f(exporter));
        }
        let config = {
            let config = self.config.read().unwrap();
            config.endpoint.as_ref()?; // export is off: nothing to clone
            config.clone()
        };
        let endpoint = config.endpoint.as_ref()?;
        let mut providers = self.providers.write().unwrap();
        if let Some(exporter) = providers.get(tenant) {
            return Some(f(exporter));
        }
        let spool = config.spool_dir.as_ref().map(|dir| dir.join(tenant.as_str()));
        let processor = match OtlpProcessor::new(&config, endpoint, config.max_queue_size, spool.as_deref()) {
            Ok(processor) => processor,
            Err(error) => {
                tracing::error!(%error, endpoint, "cannot set up OTLP span export; spans are not exported");
                return None;
            }
        };
        let queue = processor.queue();
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new(semconv::ATTR_SERVICE_NAME, semconv::SERVICE_NAME),
                KeyValue::new(semconv::ATTR_SERVICE_NAMESPACE, tenant.to_string()),
            ])
            .build();
        // Every platform span is recorded, whatever a caller's `traceparent` says about sampling
        // or OTEL_TRACES_SAMPLER: invocation and state spans are what billing meters.
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOn)
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(semconv::SERVICE_NAME);
        let exporter = providers.entry(tenant.clone()).or_insert(Exporter { provider, tracer, queue });
        Some(f(exporter))
    }

    /// Emits one `state.usage` span per record (docs/contracts.md, "Telemetry contract";
    /// docs/decisions.md): an INTERNAL root span whose start and end are the record's interval.
    /// Records of tenants without a tracer (export off) are dropped.
    pub fn emit_state_usage(&self, records: Vec<(TenantId, UsageInterval)>) {
        let mut current: Option<(TenantId, Option<SdkTracer>)> = None;
        for (tenant, record) in records {
            if current.as_ref().is_none_or(|(t, _)| *t != tenant) {
                current = Some((tenant.clone(), self.tracer(&tenant)));
            }
            let Some((_, Some(tracer))) = &current else { continue };
            let mut attributes = Vec::with_capacity(5);
            match &record.owner {
                Owner::Standing => {
                    attributes.push(KeyValue::new(semconv::SFAAS_STATE_OWNER, semconv::STATE_OWNER_STANDING));
                }
                Owner::Job(job) => {
                    attributes.push(KeyValue::new(semconv::SFAAS_STATE_OWNER, semconv::STATE_OWNER_JOB));
                    attributes.push(KeyValue::new(semconv::SFAAS_STATE_JOB, job.clone()));
                }
            }
            attributes.push(KeyValue::new(semconv::SFAAS_STATE_BYTE_SECONDS, record.byte_seconds.to_decimal_string()));
            attributes.push(KeyValue::new(semconv::SFAAS_USAGE_ID, record.usage_id()));
            attributes.push(KeyValue::new(semconv::SFAAS_BILLABLE, true));
            let at = |ns: u64| std::time::UNIX_EPOCH + Duration::from_nanos(ns);
            let mut span = tracer
                .span_builder(semconv::SPAN_STATE_USAGE)
                .with_kind(SpanKind::Internal)
                .with_start_time(at(record.start_ns))
                .with_attributes(attributes)
                .start_with_context(tracer, &Context::new());
            span.end_with_timestamp(at(record.end_ns));
        }
    }

    /// One `instance.usage` span per record: a managed instance's CPU time outside requests,
    /// billed to its tenant as CPU-ms of its function (not as an invocation).
    pub fn emit_instance_usage(&self, records: Vec<crate::function::http::InstanceUsage>) {
        for record in records {
            let Some(tracer) = self.tracer(&record.tenant) else { continue };
            let attributes = vec![
                KeyValue::new(semconv::FAAS_NAME, record.function),
                KeyValue::new(semconv::SFAAS_FUNCTION_KIND, "http"),
                KeyValue::new(semconv::SFAAS_CPU_MS, record.cpu_ms as i64),
                KeyValue::new(semconv::SFAAS_USAGE_ID, record.usage_id),
                KeyValue::new(semconv::SFAAS_BILLABLE, true),
            ];
            let mut span = tracer
                .span_builder(semconv::SPAN_INSTANCE_USAGE)
                .with_kind(SpanKind::Internal)
                .with_start_time(record.start)
                .with_attributes(attributes)
                .start_with_context(&tracer, &Context::new());
            span.end_with_timestamp(record.end);
        }
    }

    /// Sends every span ended so far and waits until the receivers have them. Blocking: call
    /// from a blocking thread (DEPENDENCIES.md, gotcha 6).
    pub fn flush(&self) {
        for exporter in self.providers.read().unwrap().values() {
            if let Err(error) = exporter.provider.force_flush() {
                tracing::warn!(%error, "span export did not flush");
            }
        }
    }

    /// Flushes and stops every provider. Blocking: call from a blocking thread (DEPENDENCIES.md,
    /// gotcha 6).
    pub fn shutdown(&self) {
        let providers: Vec<_> =
            self.providers.write().unwrap().drain().map(|(_, exporter)| exporter.provider).collect();
        for provider in providers {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "span export did not shut down cleanly");
            }
        }
    }
}

/// The span of one invocation (docs/contracts.md, "Telemetry contract"): `invoke NAME`, SERVER, a child
/// of the caller's `traceparent` (or a root), ended with the measured usage, sizes and status.
///
/// It is written to OTLP straight from the gateway's own fields instead of through the SDK's
/// span object: on every request, the SDK's span (its attribute list, name and span data, each
/// allocated and freed, and the provider's bookkeeping) cost about 5 % of a no-op's throughput
/// (BENCHMARKS.md, issue 2). Ending it copies its fields into the tenant's queue; the export
/// thread encodes them with the batch. The span is the same one, field for field, as the SDK
/// builds with an always-on sampler ([`sdk_invocation_span`], compared in the tests), and it
/// goes out in the tenant's batches with its other spans.
#[derive(Debug)]
pub struct InvocationSpan {
    queue: SpanQueue,
    context: SpanContext,
    parent_span_id: SpanId,
    parent_span_is_remote: bool,
    start: SystemTime,
}

/// What an invocation's span records once it ends.
#[derive(Debug, Clone, Copy)]
pub struct Invoked<'a> {
    pub function: &'a str,
    /// `sfaas.function.kind`: builtin, exec or http.
    pub kind: &'static str,
    /// `faas.invocation_id`: made by the gateway for this execution.
    pub execution_id: uuid::Uuid,
    pub call_id: &'a str,
    pub trigger: &'static str,
    /// The state job the call runs in (a flow run's id for flow nodes).
    pub job: Option<&'a str>,
    pub usage: &'a Usage,
    pub wall: Duration,
    pub bytes_in: usize,
    pub bytes_out: usize,
    /// Bytes of the log lines exported for it (`sfaas.log_bytes`, billed as `log_bytes`).
    pub log_bytes: u64,
    pub status: u16,
}

impl InvocationSpan {
    /// Starts now, as a child of `parent`'s span when it is valid (taking its trace id, and its
    /// trace state and flags with "sampled" set, as the SDK's always-on sampler does).
    pub fn start(queue: SpanQueue, parent: &Context) -> Self {
        let parent = parent.span();
        let parent = parent.span_context();
        let span_id = SpanId::from(nonzero(rand::random::<u64>));
        let (context, parent_span_id) = if parent.is_valid() {
            let flags = parent.trace_flags().with_sampled(true);
            let context = SpanContext::new(parent.trace_id(), span_id, flags, false, parent.trace_state().clone());
            (context, parent.span_id())
        } else {
            let trace_id = TraceId::from(nonzero(rand::random::<u128>));
            (SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::NONE), SpanId::INVALID)
        };
        Self { queue, context, parent_span_id, parent_span_is_remote: parent.is_remote(), start: SystemTime::now() }
    }

    /// Its ids, for the `traceparent` handed to the function.
    pub fn span_context(&self) -> &SpanContext {
        &self.context
    }

    /// Ends it now and queues it for export.
    pub fn end(self, invoked: &Invoked) {
        let end = SystemTime::now();
        let context = &self.context;
        // Empty, without allocating, unless the caller's `traceparent` came with a `tracestate`.
        let trace_state = context.trace_state().header();
        let texts = otlp::InvocationTexts {
            function: invoked.function,
            call_id: invoked.call_id,
            job: invoked.job,
            trace_state: &trace_state,
        };
        let ended = otlp::EndedInvocation {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            parent_span_id: self.parent_span_id.to_bytes(),
            flags: otlp::span_flags(self.parent_span_is_remote, context.trace_flags().to_u8()),
            start_ns: otlp::nanos(self.start),
            end_ns: otlp::nanos(end),
            kind: invoked.kind,
            trigger: invoked.trigger,
            execution_id: *invoked.execution_id.as_bytes(),
            cold_start: invoked.usage.cold_start,
            cpu_ms: invoked.usage.cpu_ms(),
            wall_ms: invoked.wall.as_millis() as u64,
            memory_peak_bytes: invoked.usage.peak_memory_bytes,
            bytes_in: invoked.bytes_in as u64,
            bytes_out: invoked.bytes_out as u64,
            log_bytes: invoked.log_bytes,
            status: invoked.status,
        };
        self.queue.push_invocation(&ended, &texts);
    }
}

/// The instrumentation scope of the platform's tracers (`provider.tracer(SERVICE_NAME)`).
fn invocation_scope() -> &'static InstrumentationScope {
    static SCOPE: std::sync::OnceLock<InstrumentationScope> = std::sync::OnceLock::new();
    SCOPE.get_or_init(|| InstrumentationScope::builder(semconv::SERVICE_NAME).build())
}

/// A random id that is not zero (zero is the invalid id).
fn nonzero<T: Default + PartialEq>(random: impl Fn() -> T) -> T {
    loop {
        let id = random();
        if id != T::default() {
            return id;
        }
    }
}

/// An invocation span's error status: a function's 5xx.
fn error_status(status: u16) -> Option<String> {
    (status >= 500).then(|| format!("function answered {status}"))
}

/// The invocation span of [`InvocationSpan`], built by the OpenTelemetry SDK: the reference the
/// tests compare the direct encoding with, and the one `sfaas bench gateway` measures the
/// SDK's batch processor and opentelemetry-otlp's exporter with.
pub fn sdk_invocation_span(tracer: &SdkTracer, parent: &Context, invoked: &Invoked) {
    let i = invoked;
    let mut attributes = vec![
        KeyValue::new(semconv::FAAS_NAME, i.function.to_string()),
        KeyValue::new(semconv::FAAS_INVOCATION_ID, i.execution_id.hyphenated().to_string()),
        KeyValue::new(semconv::SFAAS_CALL_ID, i.call_id.to_string()),
        KeyValue::new(semconv::FAAS_TRIGGER, i.trigger.to_string()),
        KeyValue::new(semconv::SFAAS_FUNCTION_KIND, i.kind.to_string()),
    ];
    if let Some(job) = i.job {
        attributes.push(KeyValue::new(semconv::SFAAS_STATE_JOB, job.to_string()));
    }
    attributes.extend([
        KeyValue::new(semconv::FAAS_COLDSTART, i.usage.cold_start),
        KeyValue::new(semconv::SFAAS_CPU_MS, i.usage.cpu_ms() as i64),
        KeyValue::new(semconv::SFAAS_WALL_MS, i.wall.as_millis() as i64),
        KeyValue::new(semconv::SFAAS_MEMORY_PEAK_BYTES, i.usage.peak_memory_bytes as i64),
        KeyValue::new(semconv::SFAAS_BYTES_IN, i.bytes_in as i64),
        KeyValue::new(semconv::SFAAS_BYTES_OUT, i.bytes_out as i64),
        KeyValue::new(semconv::SFAAS_LOG_BYTES, i.log_bytes as i64),
        KeyValue::new(semconv::HTTP_RESPONSE_STATUS_CODE, i64::from(i.status)),
        KeyValue::new(semconv::SFAAS_BILLABLE, true),
    ]);
    let mut span = tracer
        .span_builder(semconv::invoke_span_name(i.function))
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    if let Some(description) = error_status(i.status) {
        span.set_status(Status::error(description));
    }
    span.end();
}

/// The parent context named by a caller's W3C `traceparent` header, if valid.
pub fn extract_parent(traceparent: Option<&str>) -> Context {
    let Some(value) = traceparent else {
        return Context::new();
    };
    let carrier = HashMap::from([(semconv::HEADER_TRACEPARENT.to_string(), value.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// W3C `traceparent` naming a span as parent.
pub fn traceparent(context: &SpanContext) -> String {
    // Written in place: `format!` of the ids' hex costs as much as encoding the whole span.
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let hex = |bytes: &[u8], at: std::ops::Range<usize>, out: &mut [u8; 55]| {
        hex::encode_to_slice(bytes, &mut out[at]).expect("the slot fits the id");
    };
    hex(&context.trace_id().to_bytes(), 3..35, &mut out);
    hex(&context.span_id().to_bytes(), 36..52, &mut out);
    hex(&[context.trace_flags().to_u8()], 53..55, &mut out);
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn traceparent_is_w3c_and_round_trips() {
        let context = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let header = traceparent(&context);
        assert_eq!(header, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let parent = extract_parent(Some(&header));
        let extracted = parent.span().span_context().clone();
        assert_eq!((extracted.trace_id(), extracted.span_id()), (context.trace_id(), context.span_id()));
        assert!(extracted.is_sampled() && extracted.is_remote());
    }
}
