//! The processor's encoding against opentelemetry-proto's own, its queue and its transport.

use super::transport::{SMALL_CHUNK, Signal, coalesce};
use bytes::Bytes;

#[test]
fn small_chunks_go_out_joined_and_large_ones_as_they_are() {
    let large = Bytes::from(vec![7u8; SMALL_CHUNK]);
    let chunks: Vec<Bytes> = [&b"\0\0\0\0\x05"[..], b"ab", &large, b"c", b"de", &large]
        .iter()
        .map(|chunk| Bytes::copy_from_slice(chunk))
        .collect();
    let joined: Vec<Bytes> = coalesce(chunks.clone()).into();
    let lengths: Vec<usize> = joined.iter().map(Bytes::len).collect();
    assert_eq!(lengths, [7, SMALL_CHUNK, 3, SMALL_CHUNK]);
    assert_eq!(joined.concat(), chunks.concat());
}
use std::borrow::Cow;
use std::time::Duration;

use opentelemetry::trace::{Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message;

use super::wire::{encode_resource, encode_span, export_request, message};
use super::{Batch, queue_span};

/// The request the export thread sends for `batch`, its buffers joined.
fn request(resource: &[u8], schema_url: &str, batch: &mut Batch) -> Vec<u8> {
    export_request(resource, schema_url, batch, Vec::new()).0.concat()
}

/// A batch of `spans`, each encoded as `on_end` does.
fn sdk_batch(spans: &[SpanData]) -> Batch {
    let mut batch = Batch::default();
    for span in spans {
        let mut encoded = Vec::new();
        message(&mut encoded, 2, |buf| encode_span(buf, span));
        queue_span(&mut batch.scopes, &span.instrumentation_scope, &encoded);
    }
    batch
}

/// What the processor sends for `spans`.
fn encode_request(resource: &[u8], schema_url: &str, spans: &[SpanData]) -> Vec<u8> {
    request(resource, schema_url, &mut sdk_batch(spans))
}

fn span(index: u64, scope: &InstrumentationScope) -> SpanData {
    let at = |ns: u64| std::time::UNIX_EPOCH + Duration::from_nanos(ns);
    let context = SpanContext::new(
        TraceId::from(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10 + u128::from(index)),
        SpanId::from(0x1112_1314_1516_1718 + index),
        if index.is_multiple_of(2) { TraceFlags::SAMPLED } else { TraceFlags::default() },
        false,
        if index.is_multiple_of(3) {
            TraceState::from_key_value([("vendor", "x1")]).unwrap()
        } else {
            TraceState::NONE
        },
    );
    let long = "é".repeat(200);
    let mut events = SpanEvents::default();
    events.events.push(Event::new("retry", at(1_700_000_000_000_000_500), vec![KeyValue::new("attempt", 2)], 1));
    events.dropped_count = u32::from(index == 2);
    let mut links = SpanLinks::default();
    if index % 2 == 1 {
        links.links.push(Link::new(
            SpanContext::new(TraceId::from(7), SpanId::from(8), TraceFlags::SAMPLED, true, TraceState::NONE),
            vec![KeyValue::new("link.kind", "follows")],
            3,
        ));
    }
    SpanData {
        span_context: context,
        parent_span_id: if index == 0 { SpanId::INVALID } else { SpanId::from(0x2122_2324_2526_2728) },
        parent_span_is_remote: index == 1,
        span_kind: [SpanKind::Internal, SpanKind::Server, SpanKind::Client, SpanKind::Producer, SpanKind::Consumer]
            [index as usize % 5]
            .clone(),
        name: Cow::Owned(format!("invoke f{index}")),
        start_time: at(1_700_000_000_000_000_000 + index),
        end_time: at(1_700_000_000_123_456_789 + index),
        attributes: vec![
            KeyValue::new("faas.name", "f"),
            KeyValue::new("faas.invocation_id", format!("call-{index}")),
            KeyValue::new("sfaas.cpu_ms", 12i64),
            KeyValue::new("negative", -3i64),
            KeyValue::new("ratio", 0.25),
            KeyValue::new("zero", 0i64),
            KeyValue::new("flag", false),
            KeyValue::new("empty", ""),
            KeyValue::new("long", long),
            KeyValue::new("nodes", Value::Array(Array::String(vec![StringValue::from("a"), StringValue::from("b")]))),
            KeyValue::new("codes", Value::Array(Array::I64(vec![1, -1]))),
            KeyValue::new("bits", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("weights", Value::Array(Array::F64(vec![]))),
        ],
        dropped_attributes_count: u32::from(index == 3),
        events,
        links,
        status: match index % 3 {
            0 => Status::Unset,
            1 => Status::Ok,
            _ => Status::error("function answered 500"),
        },
        instrumentation_scope: scope.clone(),
    }
}

/// What this module writes decodes to exactly the request opentelemetry-proto's own
/// conversion (the one opentelemetry-otlp sends) builds from the same spans.
#[test]
fn the_encoding_equals_opentelemetry_protos_conversion() {
    let platform = InstrumentationScope::builder("stateful-faas").build();
    let other = InstrumentationScope::builder("flows")
        .with_version("1.2.3")
        .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
        .with_attributes([KeyValue::new("scope.attr", true)])
        .build();
    let batch: Vec<SpanData> = (0..7).map(|i| span(i, if i == 4 { &other } else { &platform })).collect();
    let resource = Resource::builder_empty()
        .with_schema_url(
            [KeyValue::new("service.name", "stateful-faas"), KeyValue::new("service.namespace", "acme")],
            "https://opentelemetry.io/schemas/1.29.0",
        )
        .build();

    let ours = ExportTraceServiceRequest::decode(
        &encode_request(&encode_resource(&resource), resource.schema_url().unwrap(), &batch)[..],
    )
    .expect("a valid ExportTraceServiceRequest");
    let theirs = ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(batch, &ResourceAttributesWithSchema::from(&resource)),
    };
    assert_eq!(ours, theirs);
    assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);
    assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 6);
}

/// Keeps the spans the SDK ends.
#[derive(Debug, Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<SpanData>>>);

impl opentelemetry_sdk::trace::SpanProcessor for Capture {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// The gateway's invocation span, written straight to a processor's queue, is the span the
/// SDK builds for the same invocation (with the platform's always-on sampler), as
/// opentelemetry-proto converts it: all but its own span id and clock readings, for a root
/// span and for a child of an unsampled remote parent with a trace state, a job and a 5xx.
#[test]
fn an_invocation_span_written_directly_equals_the_sdks() {
    use opentelemetry::trace::{TraceContextExt, TracerProvider};
    use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;

    use super::super::{InvocationSpan, Invoked, sdk_invocation_span};
    use super::{Shared, SpanQueue};
    use crate::function::Usage;

    let capture = Capture::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_span_processor(capture.clone())
        .build();
    let tracer = provider.tracer(crate::semconv::SERVICE_NAME);
    let remote = SpanContext::new(
        TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
        SpanId::from(0x00f0_67aa_0ba9_02b7),
        TraceFlags::default(),
        true,
        TraceState::from_key_value([("vendor", "x1")]).unwrap(),
    );
    let parents = [opentelemetry::Context::new(), opentelemetry::Context::new().with_remote_span_context(remote)];
    let usages = [Usage::default(), Usage { cpu_ns: 12_300_000, peak_memory_bytes: 3 << 20, cold_start: true }];
    let invocations = [
        Invoked {
            function: "noop",
            kind: "builtin",
            execution_id: uuid::Uuid::now_v7(),
            call_id: "call-1",
            trigger: "http",
            job: None,
            usage: &usages[0],
            wall: Duration::from_micros(300),
            bytes_in: 0,
            bytes_out: 4,
            log_bytes: 0,
            status: 200,
        },
        Invoked {
            function: "resize-ünïcode-".repeat(12).leak(),
            kind: "exec",
            execution_id: uuid::Uuid::from_u128(0x0190b4e2_7c3a_7d2e_9f00_aabbccddeeff),
            call_id: "0190b4e2-7c3a-7d2e-9f00-aabbccddeeff",
            trigger: "pubsub",
            job: Some("run-42"),
            usage: &usages[1],
            wall: Duration::from_millis(1500),
            bytes_in: 1 << 20,
            bytes_out: 17,
            log_bytes: 4096,
            status: 503,
        },
    ];
    for (parent, invoked) in parents.iter().zip(&invocations) {
        let shared = std::sync::Arc::new(Shared::new(10));
        let span = InvocationSpan::start(SpanQueue(shared.clone()), parent);
        span.end(invoked);
        let mut queue = shared.queue.lock().unwrap();
        assert_eq!((queue.open.invocations.len(), queue.open.scopes.len()), (1, 0));
        let request = ExportTraceServiceRequest::decode(&request(&[], "", &mut queue.open)[..]).unwrap();
        let scope_spans = &request.resource_spans[0].scope_spans;
        assert_eq!(scope_spans.len(), 1);
        assert_eq!(scope_spans[0].scope.as_ref().unwrap().name, crate::semconv::SERVICE_NAME);
        let mut ours: ProtoSpan = scope_spans[0].spans[0].clone();

        sdk_invocation_span(&tracer, parent, invoked);
        let sdk = capture.0.lock().unwrap().pop().expect("the SDK recorded the span");
        let theirs = ProtoSpan::from(sdk);
        assert!(ours.start_time_unix_nano > 0 && ours.end_time_unix_nano >= ours.start_time_unix_nano);
        assert_ne!(ours.span_id, theirs.span_id, "a span id of its own");
        ours.span_id = theirs.span_id.clone();
        if !parent.has_active_span() {
            assert_ne!(ours.trace_id, theirs.trace_id, "a root starts a trace of its own");
            ours.trace_id = theirs.trace_id.clone();
        }
        ours.start_time_unix_nano = theirs.start_time_unix_nano;
        ours.end_time_unix_nano = theirs.end_time_unix_nano;
        assert_eq!(ours, theirs);
    }
}

/// A batch's invocation spans go out under the platform's scope, after the SDK's spans of
/// that scope when it has some, or in a scope entry of their own; a batch's size counts at
/// least what each of them encodes to; and a request of several hundred kilobytes (lengths
/// of three bytes) decodes.
#[test]
fn invocation_spans_join_the_platforms_scope_and_their_size_is_bounded() {
    use opentelemetry::trace::TraceContextExt;

    use super::super::{InvocationSpan, Invoked};
    use super::{INVOCATION_FIXED_BYTES, Shared, SpanQueue};
    use crate::function::Usage;

    let usage = Usage { cpu_ns: u64::MAX, peak_memory_bytes: u64::MAX, cold_start: true };
    let parent = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(1),
        SpanId::from(2),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "x".repeat(200))]).unwrap(),
    ));
    let long = "f".repeat(200);
    let platform = InstrumentationScope::builder(crate::semconv::SERVICE_NAME).build();
    let other = InstrumentationScope::builder("flows").build();
    for sdk_scopes in [vec![], vec![&other], vec![&other, &platform]] {
        let shared = std::sync::Arc::new(Shared::new(10_000));
        for (i, scope) in sdk_scopes.iter().enumerate() {
            let mut encoded = Vec::new();
            message(&mut encoded, 2, |buf| encode_span(buf, &span(i as u64, scope)));
            shared.push(scope, &encoded, super::Bound::Droppable);
        }
        for i in 0..500 {
            InvocationSpan::start(SpanQueue(shared.clone()), &parent).end(&Invoked {
                function: &long,
                kind: "exec",
                execution_id: uuid::Uuid::now_v7(),
                call_id: &"c".repeat(128),
                trigger: "http",
                job: Some(&long),
                usage: &usage,
                wall: Duration::MAX,
                bytes_in: usize::MAX,
                bytes_out: i,
                log_bytes: u64::MAX,
                status: 599,
            });
        }
        let mut queue = shared.queue.lock().unwrap();
        assert!(queue.full.is_empty());
        let counted = queue.open.bytes;
        let body = request(&[], "", &mut queue.open);
        let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        let scope_spans = &request.resource_spans[0].scope_spans;
        let names: Vec<&str> = scope_spans.iter().map(|s| s.scope.as_ref().unwrap().name.as_str()).collect();
        let counts: Vec<usize> = scope_spans.iter().map(|s| s.spans.len()).collect();
        match sdk_scopes.len() {
            0 => assert_eq!((names, counts), (vec![crate::semconv::SERVICE_NAME], vec![500])),
            1 => assert_eq!((names, counts), (vec!["flows", crate::semconv::SERVICE_NAME], vec![1, 500])),
            _ => {
                assert_eq!((names, counts), (vec!["flows", crate::semconv::SERVICE_NAME], vec![1, 501]));
                assert_eq!(scope_spans[1].spans[0].name, "invoke f1", "the SDK's span first");
            }
        }
        assert!(body.len() > 1 << 14 && body.len() <= counted, "{} bytes, counted {counted}", body.len());
        let invocation = scope_spans.last().unwrap().spans.last().unwrap();
        assert_eq!(invocation.name, format!("invoke {long}"));
        // What `push_invocation` counts for it: the fixed part, its texts and its name.
        let bound = INVOCATION_FIXED_BYTES + (200 + 128 + 200 + "vendor=".len() + 200) + 200;
        let encoded = invocation.encoded_len() + 3; // with its field key and length
        assert!(encoded <= bound, "{encoded} bytes encoded, {bound} counted");
    }
}

/// The gRPC client, against tonic's server with the generated `TraceService`: a request sent
/// as several buffers arrives whole, with the token; the receiver's partial success is read;
/// an error status comes back with its code and its (percent-decoded) message; a receiver
/// that is not there and an endpoint it cannot use are clear errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_client_is_understood_by_tonics_server() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};

    use super::super::{OtlpProtocol, TelemetryConfig};
    use super::transport::{Transport, send};

    #[derive(Clone, Default)]
    struct Receiver(std::sync::Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            if request.metadata().get("authorization").is_none_or(|token| token != "Bearer right") {
                return Err(tonic::Status::unauthenticated("no such token: «wrong»"));
            }
            self.0.lock().unwrap().push(request.into_inner());
            let partial = ExportTracePartialSuccess { rejected_spans: 1, error_message: "one too old".into() };
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: Some(partial) }))
        }
    }

    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let transport = |endpoint: &str, token: &str| {
        let config = TelemetryConfig {
            endpoint: Some(endpoint.to_string()),
            protocol: OtlpProtocol::Grpc,
            token: Some(token.to_string()),
            max_queue_size: 10,
            ..Default::default()
        };
        Transport::new(&config, endpoint, Signal::Traces)
    };
    let platform = InstrumentationScope::builder("stateful-faas").build();
    let spans: Vec<SpanData> = (0..3).map(|i| span(i, &platform)).collect();
    let resource = encode_resource(&Resource::builder_empty().build());
    let request = || export_request(&resource, "", &mut sdk_batch(&spans), Vec::new()).0;
    assert!(request().len() > 1, "several buffers");

    send(&transport(&endpoint, "right").unwrap(), request()).await.unwrap();
    let received = receiver.0.lock().unwrap().clone();
    assert_eq!(received, vec![ExportTraceServiceRequest::decode(&request().concat()[..]).unwrap()]);
    assert_eq!(received[0].resource_spans[0].scope_spans[0].spans.len(), 3);

    // Worth sending again (a token the collector may learn, a collector that is down)…
    let error = send(&transport(&endpoint, "wrong").unwrap(), request()).await.unwrap_err();
    assert!(error.message.contains("Unauthenticated: no such token: «wrong»") && error.retry, "{error:?}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let error = send(&transport(&format!("http://{closed}"), "right").unwrap(), request()).await.unwrap_err();
    assert!(error.message.contains("unavailable") && error.retry, "{error:?}");

    let error = transport("https://collector.example:4317", "right").unwrap_err();
    assert!(error.contains("TLS is not supported"), "{error}");
}

#[test]
fn an_empty_resource_and_batch_encode_as_protos_conversion_does() {
    let resource = Resource::builder_empty().build();
    let ours = ExportTraceServiceRequest::decode(&encode_request(&encode_resource(&resource), "", &[])[..]).unwrap();
    let theirs = ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(Vec::new(), &ResourceAttributesWithSchema::from(&resource)),
    };
    assert_eq!(ours, theirs);
}
