//! OTLP ingest with real clients (the Rust OpenTelemetry SDK over HTTP and gRPC) and hand-made
//! bad input, on SQLite and on PostgreSQL.

use crate::common;

use std::collections::HashMap;
use std::io::Write;

use common::{backends, start};
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as ProtoKeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as ProtoSpan};
use prost::Message;

fn resource(service: &str, namespace: Option<&str>) -> opentelemetry_sdk::Resource {
    let mut attributes = vec![KeyValue::new("service.name", service.to_string())];
    if let Some(ns) = namespace {
        attributes.push(KeyValue::new("service.namespace", ns.to_string()));
    }
    opentelemetry_sdk::Resource::builder_empty().with_attributes(attributes).build()
}

/// Sends a parent and a child span with the SDK; returns (trace id, parent id, child id).
async fn send_with_sdk(exporter: opentelemetry_otlp::SpanExporter) -> (String, String, String) {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource("checkout", Some("acme")))
        .build();
    let tracer = provider.tracer("collector-test");
    let parent = tracer.start("GET /cart");
    let ids = (parent.span_context().trace_id().to_string(), parent.span_context().span_id().to_string());
    let context = Context::current_with_span(parent);
    let mut child = tracer.start_with_context("SELECT cart", &context);
    child.set_attribute(KeyValue::new("db.rows", 42));
    let child_id = child.span_context().span_id().to_string();
    child.end();
    context.span().end();
    // Shut down off the runtime's threads (DEPENDENCIES.md gotcha 6).
    tokio::task::spawn_blocking(move || provider.shutdown()).await.unwrap().unwrap();
    (ids.0, ids.1, child_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_spans_over_http_and_grpc_are_stored_once_under_their_tenant() {
    for backend in backends() {
        let running = start(&backend, |_| {}).await;
        let http = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("http://{}/v1/traces", running.otlp_http_addr))
            .with_headers(HashMap::from([("authorization".to_string(), "Bearer acme-token".to_string())]))
            .build()
            .unwrap();
        let mut metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::new();
        metadata.insert("authorization", "Bearer acme-token".parse().unwrap());
        let grpc = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{}", running.otlp_grpc_addr))
            .with_metadata(metadata)
            .with_compression(opentelemetry_otlp::Compression::Gzip)
            .build()
            .unwrap();
        for (protocol, exporter) in [("http", http), ("grpc", grpc)] {
            let (trace_id, parent_id, child_id) = send_with_sdk(exporter).await;
            let spans = running.collector.store.trace("acme", &trace_id).await.unwrap();
            assert_eq!(spans.len(), 2, "{} over {protocol}: {spans:?}", backend.name());
            let parent = spans.iter().find(|s| s.span_id == parent_id).unwrap();
            let child = spans.iter().find(|s| s.span_id == child_id).unwrap();
            assert_eq!(parent.parent_span_id, None);
            assert_eq!(child.parent_span_id.as_deref(), Some(parent_id.as_str()), "parent link intact");
            assert_eq!(child.name, "SELECT cart");
            assert_eq!(child.service_name, "checkout");
            assert_eq!(serde_json::from_str::<serde_json::Value>(&child.attributes).unwrap()["db.rows"], 42);
            assert!(!child.metered, "a tenant's own spans are never billable");
            assert!(child.end_ns >= child.start_ns && child.start_ns > 0);
            assert!(running.collector.store.trace("globex", &trace_id).await.unwrap().is_empty());
        }
        assert_eq!(running.collector.store.counts("acme").await.unwrap().spans, 4);
        running.shutdown().await;
    }
}

fn kv(key: &str, value: &str) -> ProtoKeyValue {
    ProtoKeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

fn resource_spans(namespace: Option<&str>, spans: usize, seed: u8) -> ResourceSpans {
    let mut attributes = vec![kv("service.name", "api")];
    if let Some(ns) = namespace {
        attributes.push(kv("service.namespace", ns));
    }
    ResourceSpans {
        resource: Some(ProtoResource { attributes, ..Default::default() }),
        scope_spans: vec![ScopeSpans {
            spans: (0..spans)
                .map(|i| ProtoSpan {
                    trace_id: vec![seed; 16],
                    span_id: vec![seed, i as u8 + 1, 0, 0, 0, 0, 0, 1],
                    name: format!("op-{i}"),
                    kind: 2,
                    start_time_unix_nano: 1_700_000_000_000_000_000,
                    end_time_unix_nano: 1_700_000_000_500_000_000,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn post(url: &str, token: Option<&str>, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(url).header("content-type", content_type).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_never_reattributed_and_duplicates_are_stored_once() {
    for backend in backends() {
        let running = start(&backend, |_| {}).await;
        let url = format!("http://{}/v1/traces", running.otlp_http_addr);
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                resource_spans(Some("acme"), 3, 1),
                resource_spans(Some("globex"), 2, 2),
                resource_spans(None, 1, 3),
            ],
        };
        // acme's token: acme's and the unnamed resource are acme's; globex's are refused.
        let response = post(&url, Some("acme-token"), "application/x-protobuf", request.encode_to_vec()).await;
        assert_eq!(response.status(), 200);
        let answer = ExportTraceServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
        let partial = answer.partial_success.expect("partial success");
        assert_eq!(partial.rejected_spans, 2);
        assert!(
            partial.error_message.contains("\"globex\" does not match the token's tenant \"acme\""),
            "{}",
            partial.error_message
        );
        let store = &running.collector.store;
        assert_eq!(store.counts("acme").await.unwrap().spans, 4, "{}", backend.name());
        assert_eq!(store.counts("globex").await.unwrap().spans, 0);
        // The same request again: acknowledged, stored once.
        let again = post(&url, Some("acme-token"), "application/x-protobuf", request.encode_to_vec()).await;
        assert_eq!(again.status(), 200);
        assert_eq!(store.counts("acme").await.unwrap().spans, 4);

        // The meter token names tenants by service.namespace, and what it sends is billable.
        let metered = ExportTraceServiceRequest {
            resource_spans: vec![resource_spans(Some("globex"), 2, 4), resource_spans(None, 1, 5)],
        };
        let response = post(&url, Some("meter-token"), "application/x-protobuf", metered.encode_to_vec()).await;
        let answer = ExportTraceServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
        assert_eq!(answer.partial_success.unwrap().rejected_spans, 1, "unnamed metered resources are refused");
        let globex = store.trace("globex", &hex(&[4; 16])).await.unwrap();
        assert_eq!(globex.len(), 2);
        assert!(globex.iter().all(|s| s.metered));
        running.shutdown().await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_a_clear_message() {
    for backend in backends() {
        let running = start(&backend, |config| config.max_body_bytes = 1 << 20).await;
        let url = format!("http://{}/v1/traces", running.otlp_http_addr);
        let valid = ExportTraceServiceRequest { resource_spans: vec![resource_spans(None, 2, 9)] }.encode_to_vec();
        let status_message = |bytes: &[u8]| collector::receivers::otlp_http::RpcStatus::decode(bytes).unwrap().message;

        let r = post(&url, None, "application/x-protobuf", valid.clone()).await;
        assert_eq!(r.status(), 401);
        assert!(status_message(&r.bytes().await.unwrap()).contains("missing Authorization"));
        assert_eq!(post(&url, Some("wrong"), "application/x-protobuf", valid.clone()).await.status(), 401);
        let r = reqwest::Client::new()
            .post(&url)
            .bearer_auth("acme-token")
            .header("x-scope-orgid", "globex")
            .header("content-type", "application/x-protobuf")
            .body(valid.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let r = post(&url, Some("acme-token"), "text/plain", valid.clone()).await;
        assert_eq!(r.status(), 415);
        assert!(status_message(&r.bytes().await.unwrap()).contains("unsupported content type"));
        let r = post(&url, Some("acme-token"), "application/x-protobuf", valid[..valid.len() / 2].to_vec()).await;
        assert_eq!(r.status(), 400);
        assert!(status_message(&r.bytes().await.unwrap()).contains("invalid protobuf"));
        let r = post(&url, Some("acme-token"), "application/json", b"{\"resourceSpans\": [".to_vec()).await;
        assert_eq!(r.status(), 400);
        let error: serde_json::Value = r.json().await.unwrap();
        assert!(error["message"].as_str().unwrap().contains("invalid OTLP JSON"));
        assert_eq!(post(&url, Some("acme-token"), "application/x-protobuf", vec![0u8; 2 << 20]).await.status(), 413);

        // A gzip bomb: 30 MiB of zeros in a few KiB.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&vec![0u8; 30 << 20]).unwrap();
        let bomb = gzip.finish().unwrap();
        let r = reqwest::Client::new()
            .post(&url)
            .bearer_auth("acme-token")
            .header("content-type", "application/x-protobuf")
            .header("content-encoding", "gzip")
            .body(bomb)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);

        // Invalid ids are refused item by item; the rest of the request is stored.
        let mut request = ExportTraceServiceRequest { resource_spans: vec![resource_spans(None, 3, 7)] };
        request.resource_spans[0].scope_spans[0].spans[0].span_id = vec![0; 8];
        request.resource_spans[0].scope_spans[0].spans[1].trace_id = vec![1, 2, 3];
        let r = post(&url, Some("acme-token"), "application/x-protobuf", request.encode_to_vec()).await;
        let answer = ExportTraceServiceResponse::decode(r.bytes().await.unwrap()).unwrap();
        assert_eq!(answer.partial_success.unwrap().rejected_spans, 2);

        // OTLP JSON (hex ids), gzip-compressed protobuf: accepted; and the collector kept serving.
        let json = serde_json::json!({"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "web"}}]},
        "scopeSpans": [{"spans": [{"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "eee19b7ec3c1b173", "name": "json-span", "kind": 2, "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": "1544712661000000000", "attributes": [{"key": "http.status", "value": {"intValue": "200"}}]}]}]}]});
        let r = post(&url, Some("acme-token"), "application/json", serde_json::to_vec(&json).unwrap()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&valid).unwrap();
        let r = reqwest::Client::new()
            .post(&url)
            .bearer_auth("acme-token")
            .header("content-type", "application/x-protobuf")
            .header("content-encoding", "gzip")
            .body(gzip.finish().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let stored = running.collector.store.trace("acme", "5b8efff798038103d269b633813fc60c").await.unwrap();
        assert_eq!(stored[0].parent_span_id.as_deref(), Some("eee19b7ec3c1b173"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&stored[0].attributes).unwrap()["http.status"], 200);
        assert_eq!(running.collector.store.counts("acme").await.unwrap().spans, 1 + 2 + 1);

        // The collector's own metrics count what it refused.
        let metrics =
            reqwest::get(format!("http://{}/metrics", running.otlp_http_addr)).await.unwrap().text().await.unwrap();
        assert!(
            metrics.contains(r#"sfaas_collector_rejected_total{signal="traces",reason="unauthenticated"} 3"#),
            "{metrics}"
        );
        assert!(metrics.contains(r#"sfaas_collector_accepted_total{signal="traces",protocol="otlp_http"}"#));
        running.shutdown().await;
    }
}

/// A tenant flooding its own telemetry is refused itself: the platform's metered spans and
/// another tenant's own telemetry are all taken meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_is_refused_alone() {
    let backend = common::Backend::Sqlite(tempfile::tempdir().unwrap());
    let collector = start(&backend, |config| {
        config.pipeline.capacity = 400;
        // The queue's shares are what this test floods, not the tenant's rate quota.
        config.pipeline.tenant_quota.spans_per_second = 1 << 40;
    })
    .await;
    let url = format!("http://{}/v1/traces", collector.otlp_http_addr);
    let body = |namespace: &str, spans: usize, request: u32| {
        let mut resource = resource_spans(Some(namespace), spans, 7);
        for span in &mut resource.scope_spans[0].spans {
            span.trace_id[..4].copy_from_slice(&request.to_be_bytes());
        }
        ExportTraceServiceRequest { resource_spans: vec![resource] }.encode_to_vec()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for client in 0..24u32 {
        let (url, stop) = (url.clone(), stop.clone());
        flooders.push(tokio::spawn(async move {
            let (mut sent, mut refused) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let request = 1_000_000 + client * 100_000 + sent;
                let response =
                    post(&url, Some("acme-token"), "application/x-protobuf", body("acme", 200, request)).await;
                match response.status().as_u16() {
                    200 => {}
                    503 => refused += 1,
                    other => panic!("the flood answered {other}"),
                }
                sent += 1;
            }
            refused
        }));
    }
    // Meanwhile: the platform's metered spans of globex, and globex's own telemetry.
    for request in 0..40u32 {
        let response = post(&url, Some("meter-token"), "application/x-protobuf", body("globex", 20, request)).await;
        assert_eq!(response.status(), 200, "metered request {request} refused during the flood");
        let own = body("globex", 20, 500_000 + request);
        let response = post(&url, Some("globex-token"), "application/x-protobuf", own).await;
        assert_eq!(response.status(), 200, "globex's own request {request} refused during the flood");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for flooder in flooders {
        refused += flooder.await.unwrap();
    }
    assert!(refused > 0, "the flood was never refused: the test did not flood");
    let spans =
        collector.collector.store.spans_named("globex", "", (i64::MIN, i64::MAX), usize::MAX, &|_| true).await.unwrap();
    assert_eq!(spans.iter().filter(|s| s.metered).count(), 40 * 20, "every metered span stored");
}

/// A tenant over its rate of spans is refused (429, naming the quota, with Retry-After) and
/// nothing of the refused request is stored; another tenant and the platform's metering go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_ingest_rate_gets_429_naming_the_quota() {
    let backend = common::Backend::Sqlite(tempfile::tempdir().unwrap());
    // 20 spans a second: 200 may come at once.
    let collector = start(&backend, |config| config.pipeline.tenant_quota.spans_per_second = 20).await;
    let url = format!("http://{}/v1/traces", collector.otlp_http_addr);
    let body = |namespace: &str, spans: usize, seed: u8| {
        ExportTraceServiceRequest { resource_spans: vec![resource_spans(Some(namespace), spans, seed)] }.encode_to_vec()
    };
    let protobuf = "application/x-protobuf";
    assert_eq!(post(&url, Some("acme-token"), protobuf, body("acme", 150, 1)).await.status(), 200);
    // Into debt by one request: no request is refused forever for being larger than a burst.
    assert_eq!(post(&url, Some("acme-token"), protobuf, body("acme", 150, 2)).await.status(), 200);
    let refused = post(&url, Some("acme-token"), protobuf, body("acme", 1, 3)).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry_after), "the debt of 100 spans at 20 a second: {retry_after}");
    let message = String::from_utf8_lossy(&refused.bytes().await.unwrap()).into_owned();
    assert!(message.contains("--tenant-ingest-spans-per-second") && message.contains("acme"), "{message}");
    // Over quota, a request is refused before its body is decoded: garbage gets the same 429.
    let garbage = post(&url, Some("acme-token"), protobuf, b"not protobuf".to_vec()).await;
    assert_eq!(garbage.status(), 429);
    // The same instant: another tenant's own spans, and the platform's metered spans of acme.
    assert_eq!(post(&url, Some("globex-token"), protobuf, body("globex", 100, 4)).await.status(), 200);
    assert_eq!(post(&url, Some("meter-token"), protobuf, body("acme", 200, 5)).await.status(), 200);
    assert_eq!(post(&url, Some("meter-token"), protobuf, body("acme", 200, 6)).await.status(), 200);

    let store = &collector.collector.store;
    let acme = store.spans_named("acme", "", (i64::MIN, i64::MAX), usize::MAX, &|_| true).await.unwrap();
    assert_eq!(acme.iter().filter(|s| !s.metered).count(), 300);
    assert_eq!(acme.iter().filter(|s| s.metered).count(), 400);
    assert_eq!(store.counts("globex").await.unwrap().spans, 100);
}

/// The gRPC export services' refusals, as a gRPC client sees them (a trailers-only response's
/// `grpc-status`): no token (checked before the body is read: garbage without a token is
/// UNAUTHENTICATED), a body that is not a request, a method a service does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refusals_carry_otlps_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let backend = common::Backend::Sqlite(dir);
    let running = start(&backend, |_| {}).await;
    let client = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    for service in ["trace.v1.TraceService", "metrics.v1.MetricsService", "logs.v1.LogsService"] {
        let call = |method: &'static str, token: Option<&'static str>, message: Vec<u8>| {
            let mut frame = vec![0];
            frame.extend((message.len() as u32).to_be_bytes());
            frame.extend(message);
            let mut request = client
                .post(format!("http://{}/opentelemetry.proto.collector.{service}/{method}", running.otlp_grpc_addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(frame);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            async move {
                let response = request.send().await.unwrap();
                response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string())
            }
        };
        let valid = ExportTraceServiceRequest::default().encode_to_vec(); // empty: valid for all three
        assert_eq!(call("Export", None, valid.clone()).await.as_deref(), Some("16"), "{service}: UNAUTHENTICATED");
        assert_eq!(call("Export", None, vec![0x0a, 0xff]).await.as_deref(), Some("16"), "{service}: before decoding");
        assert_eq!(call("Export", Some("nobody"), vec![0x0a, 0xff]).await.as_deref(), Some("16"), "{service}");
        let bad = call("Export", Some("acme-token"), vec![0x0a, 0xff]).await;
        assert_eq!(bad.as_deref(), Some("3"), "{service}: INVALID_ARGUMENT");
        let bad = call("Export", Some("acme-token"), vec![0x0a, 0x02, 0x12, 0x00, 0xff]).await;
        assert_eq!(bad.as_deref(), Some("3"), "{service}");
        assert_eq!(call("Export", Some("acme-token"), valid.clone()).await.as_deref(), None, "{service}: OK");
        assert_eq!(call("Nothing", Some("acme-token"), valid).await.as_deref(), Some("12"), "{service}: UNIMPLEMENTED");
    }
    running.shutdown().await;
}
