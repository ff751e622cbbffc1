//! The platform's OpenTelemetry spans, exported over OTLP (DESIGN.md §4).
//!
//! The resource of a span names its tenant (`service.namespace`), and one SDK tracer provider
//! has one resource, so the core keeps one provider per tenant, created on first use. Each has
//! an [`OtlpProcessor`] with a bounded queue: when the collector is slow or down, spans are
//! dropped (and counted in a warning), requests are never blocked and memory never grows.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, SpanContext, SpanKind, Status, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

mod otlp;

pub use otlp::OtlpProcessor;

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
    /// Spans buffered per tenant before new ones are dropped.
    pub max_queue_size: usize,
}

/// The core's span pipeline.
pub struct Telemetry {
    config: RwLock<TelemetryConfig>,
    /// Per tenant: the provider (kept for shutdown) and its tracer (cloned per span).
    providers: RwLock<HashMap<TenantId, (SdkTracerProvider, SdkTracer)>>,
}

impl Telemetry {
    pub fn new(config: TelemetryConfig) -> Self {
        Self { config: RwLock::new(config), providers: RwLock::new(HashMap::new()) }
    }

    /// Points span export somewhere else (`sfaas up` does, once its collector listens);
    /// tenants whose tracer exists already keep theirs.
    pub fn set_export(&self, endpoint: String, protocol: OtlpProtocol, token: Option<String>) {
        let mut config = self.config.write().unwrap();
        config.endpoint = Some(endpoint);
        config.protocol = protocol;
        config.token = token;
    }

    /// The tracer for a tenant's platform spans, or `None` when export is off.
    pub fn tracer(&self, tenant: &TenantId) -> Option<SdkTracer> {
        // The hot path: a tenant that has its tracer already.
        if let Some((_, tracer)) = self.providers.read().unwrap().get(tenant) {
            return Some(tracer.clone());
        }
        let config = self.config.read().unwrap().clone();
        let endpoint = config.endpoint.as_ref()?;
        let mut providers = self.providers.write().unwrap();
        if let Some((_, tracer)) = providers.get(tenant) {
            return Some(tracer.clone());
        }
        let processor = match OtlpProcessor::new(&config, endpoint, config.max_queue_size) {
            Ok(processor) => processor,
            Err(error) => {
                tracing::error!(%error, endpoint, "cannot set up OTLP span export; spans are not exported");
                return None;
            }
        };
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new(semconv::ATTR_SERVICE_NAME, semconv::SERVICE_NAME),
                KeyValue::new(semconv::ATTR_SERVICE_NAMESPACE, tenant.to_string()),
            ])
            .build();
        let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
        let tracer = provider.tracer(semconv::SERVICE_NAME);
        providers.insert(tenant.clone(), (provider, tracer.clone()));
        Some(tracer)
    }

    /// Emits one `state.usage` span per record (DESIGN.md §4, docs/decisions.md): an INTERNAL
    /// root span whose start and end are the record's interval. Records of tenants without a
    /// tracer (export off) are dropped.
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

    /// Flushes and stops every provider. Blocking: call from a blocking thread (DEPENDENCIES.md,
    /// gotcha 6).
    pub fn shutdown(&self) {
        let providers: Vec<_> = self.providers.write().unwrap().drain().map(|(_, (provider, _))| provider).collect();
        for provider in providers {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "span export did not shut down cleanly");
            }
        }
    }
}

/// Starts the span of one invocation (DESIGN.md §4): `invoke NAME`, SERVER, with what is known
/// before the function runs.
pub fn start_invocation_span(
    tracer: &SdkTracer,
    function: &str,
    kind: &'static str,
    call_id: &str,
    trigger: &'static str,
    parent: &Context,
) -> opentelemetry_sdk::trace::Span {
    tracer
        .span_builder(semconv::invoke_span_name(function))
        .with_kind(SpanKind::Server)
        .with_start_time(std::time::SystemTime::now())
        .with_attributes([
            KeyValue::new(semconv::FAAS_NAME, function.to_string()),
            KeyValue::new(semconv::FAAS_INVOCATION_ID, call_id.to_string()),
            KeyValue::new(semconv::FAAS_TRIGGER, trigger),
            KeyValue::new(semconv::SFAAS_FUNCTION_KIND, kind),
        ])
        .start_with_context(tracer, parent)
}

/// Ends an invocation's span with its outcome: the measured usage, sizes and status.
pub fn end_invocation_span(
    span: &mut opentelemetry_sdk::trace::Span,
    usage: &Usage,
    wall: Duration,
    bytes_in: usize,
    bytes_out: usize,
    status: u16,
) {
    span.set_attributes([
        KeyValue::new(semconv::FAAS_COLDSTART, usage.cold_start),
        KeyValue::new(semconv::SFAAS_CPU_MS, usage.cpu_ms() as i64),
        KeyValue::new(semconv::SFAAS_WALL_MS, wall.as_millis() as i64),
        KeyValue::new(semconv::SFAAS_MEMORY_PEAK_BYTES, usage.peak_memory_bytes as i64),
        KeyValue::new(semconv::SFAAS_BYTES_IN, bytes_in as i64),
        KeyValue::new(semconv::SFAAS_BYTES_OUT, bytes_out as i64),
        KeyValue::new(semconv::HTTP_RESPONSE_STATUS_CODE, i64::from(status)),
        KeyValue::new(semconv::SFAAS_BILLABLE, true),
    ]);
    if status >= 500 {
        span.set_status(Status::error(format!("function answered {status}")));
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
