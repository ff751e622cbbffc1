//! Spans reach a real OTLP receiver (the generated OTLP gRPC service, and OTLP/HTTP protobuf)
//! with the contract's attributes and CPU-ms as the kernel measured it.

use crate::common;

use std::sync::{Arc, Mutex};

use common::otlp::{bool_attr, export_to, grpc_receiver, int_attr, spans, string_attr};
use common::{require_program, start};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use stateful_faas_core::telemetry::OtlpProtocol;

/// Burns ~300 ms of CPU, then prints the CPU time the kernel accounted to this process (ms).
/// `PYTHON` is replaced by the interpreter's real path: a version-manager shim (pyenv) would
/// add CPU time of its own that the function cannot see.
const BURN: &str = "PYTHON -c 'import resource\nr = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))\nx = 0\nwhile r() < 0.3:\n    x += 1\nprint(r() * 1000)'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_spans_reach_an_otlp_grpc_receiver_with_kernel_cpu_time() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| {
        export_to(config, endpoint);
        config.telemetry.token = Some("meter-token-for-test".into());
    })
    .await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "burn", "envProcess": BURN.replace("PYTHON", &common::python())})).await;
    core.deploy(&acme, json!({"service": "spin", "builtin": "cpu-burn"})).await;
    core.deploy(&acme, json!({"service": "trace", "envProcess": "echo $TRACEPARENT"})).await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = core
        .http
        .post(format!("{}/function/burn", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Call-Id", "burn-1")
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .body("in")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let kernel_ms: f64 = response.text().await.unwrap().trim().parse().unwrap();
    let spin = core.invoke(&acme.ingest, "spin", "200").await;
    assert_eq!(spin.status(), 200);
    let spin_id = spin.headers()["x-call-id"].to_str().unwrap().to_string();
    // A caller that does not sample its trace: the invocation is metered all the same.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let traced = core
        .http
        .post(format!("{}/function/trace", core.url))
        .bearer_auth(&acme.ingest)
        .header("traceparent", format!("00-{unsampled_trace}-b7ad6b7169203331-00"))
        .send()
        .await
        .unwrap();
    let traceparent = traced.text().await.unwrap().trim().to_string();
    core.stop().await; // flushes the batch processors

    let requests = received.requests.lock().unwrap().clone();
    let spans = spans(&requests);
    assert!(received.authorization.lock().unwrap().iter().all(|a| a == "Bearer meter-token-for-test"));
    assert!(!received.authorization.lock().unwrap().is_empty(), "the meter token is sent");

    let (service, namespace, burn) =
        spans.iter().find(|(_, _, s)| s.name == "invoke burn").expect("invoke burn span").clone();
    assert_eq!((service.as_str(), namespace.as_str()), ("sfaas-core", "acme"));
    assert_eq!(burn.kind, 2, "SERVER");
    assert_eq!(hex(&burn.trace_id), caller_trace, "joins the caller's trace");
    assert_eq!(hex(&burn.parent_span_id), caller_span);
    let a = &burn.attributes;
    assert_eq!(string_attr(a, "faas.name").as_deref(), Some("burn"));
    // The caller's call id is its own attribute; the billing key is the gateway's execution id.
    assert_eq!(string_attr(a, "sfaas.call_id").as_deref(), Some("burn-1"));
    let execution = uuid::Uuid::parse_str(&string_attr(a, "faas.invocation_id").unwrap()).unwrap();
    assert_eq!(execution.get_version_num(), 7, "a UUIDv7");
    assert_eq!(string_attr(a, "faas.trigger").as_deref(), Some("http"));
    assert_eq!(bool_attr(a, "faas.coldstart"), Some(false));
    assert_eq!(bool_attr(a, "sfaas.billable"), Some(true));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(200));
    assert_eq!(int_attr(a, "sfaas.bytes_in"), Some(2));
    assert!(int_attr(a, "sfaas.bytes_out").unwrap() > 0);
    assert!(int_attr(a, "sfaas.memory.peak_bytes").unwrap() > 1 << 20);
    assert!(int_attr(a, "sfaas.wall_ms").unwrap() >= 300);
    let cpu_ms = int_attr(a, "sfaas.cpu_ms").unwrap() as f64;
    assert!(
        (cpu_ms - kernel_ms).abs() <= kernel_ms * 0.10,
        "span cpu_ms {cpu_ms} vs the process's own kernel accounting {kernel_ms} ms"
    );

    let (_, _, spin) = spans.iter().find(|(_, _, s)| s.name == "invoke spin").expect("invoke spin span").clone();
    assert_eq!(string_attr(&spin.attributes, "sfaas.call_id"), Some(spin_id));
    assert_ne!(string_attr(&spin.attributes, "faas.invocation_id"), string_attr(a, "faas.invocation_id"));
    let spin_ms = int_attr(&spin.attributes, "sfaas.cpu_ms").unwrap() as f64;
    assert!((spin_ms - 200.0).abs() <= 20.0, "builtin cpu-burn of 200 ms measured {spin_ms} ms");

    // The function got a traceparent naming its own invocation span, which is recorded (and so
    // sampled) though its caller's trace was not: billing meters it.
    let (_, _, trace) = spans
        .iter()
        .find(|(_, _, s)| s.name == "invoke trace")
        .expect("an unsampled caller's invocation is recorded")
        .clone();
    assert_eq!(hex(&trace.trace_id), unsampled_trace, "joins the caller's trace");
    assert_eq!(hex(&trace.parent_span_id), "b7ad6b7169203331");
    assert_eq!(bool_attr(&trace.attributes, "sfaas.billable"), Some(true));
    assert_eq!(traceparent, format!("00-{}-{}-01", hex(&trace.trace_id), hex(&trace.span_id)));
}

type HttpReceived = Arc<Mutex<Vec<(String, ExportTraceServiceRequest)>>>;

/// An OTLP/HTTP protobuf receiver: records the content type and the decoded request.
async fn http_receiver() -> (String, HttpReceived) {
    use prost::Message;
    let received: HttpReceived = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let content_type = headers["content-type"].to_str().unwrap().to_string();
                sink.lock().unwrap().push((content_type, ExportTraceServiceRequest::decode(body).unwrap()));
                ([("content-type", "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (endpoint, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_http_protobuf_too() {
    let (endpoint, received) = http_receiver().await;
    let mut core = start(|config| {
        config.telemetry.endpoint = Some(endpoint);
        config.telemetry.protocol = OtlpProtocol::Http;
    })
    .await;
    let acme = core.tenant("acme").await;
    let globex = core.tenant("globex").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    core.deploy(&globex, json!({"service": "echo", "builtin": "echo"})).await;
    assert_eq!(core.invoke(&acme.ingest, "echo", "a").await.status(), 200);
    assert_eq!(core.invoke(&globex.ingest, "echo", "b").await.status(), 200);
    let r = core
        .http
        .post(format!("{}/async-function/echo", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Call-Id", "async-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    common::eventually(std::time::Duration::from_secs(5), || async {
        let (_, call) = core.get_json(&acme.read, "/system/async-calls/async-1").await;
        (call["state"] == "done").then_some(())
    })
    .await
    .expect("async call delivered");
    core.stop().await;

    let received = received.lock().unwrap().clone();
    assert!(received.iter().all(|(content_type, _)| content_type == "application/x-protobuf"));
    let requests: Vec<_> = received.into_iter().map(|(_, request)| request).collect();
    let spans = spans(&requests);
    let namespaces: std::collections::BTreeSet<_> = spans.iter().map(|(_, ns, _)| ns.as_str()).collect();
    assert_eq!(namespaces, ["acme", "globex"].into_iter().collect(), "one resource per tenant");
    let async_span = spans
        .iter()
        .find(|(_, _, s)| string_attr(&s.attributes, "sfaas.call_id").as_deref() == Some("async-1"))
        .expect("the async invocation has a span");
    assert_eq!(async_span.1, "acme");
    assert_eq!(string_attr(&async_span.2.attributes, "faas.trigger").as_deref(), Some("pubsub"));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_run_is_one_trace_of_flow_node_and_invoke_spans() {
    let (endpoint, received) = http_receiver().await;
    let mut core = start(|config| {
        config.telemetry.endpoint = Some(endpoint);
        config.telemetry.protocol = OtlpProtocol::Http;
    })
    .await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    core.deploy(&acme, json!({"service": "upper", "builtin": "uppercase"})).await;
    let yaml = "name: pipe\nnodes:\n  a: {function: echo}\n  b: {function: upper, needs: [a]}\n";
    let r =
        core.http.post(format!("{}/system/flows", core.url)).bearer_auth(&acme.ingest).body(yaml).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = core
        .http
        .post(format!("{}/flow/pipe", core.url))
        .bearer_auth(&acme.ingest)
        .body("x".repeat(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let run_id = r.headers()["x-run-id"].to_str().unwrap().to_string();
    core.stop().await;

    let requests: Vec<_> = received.lock().unwrap().iter().map(|(_, request)| request.clone()).collect();
    let spans: Vec<Span> = spans(&requests).into_iter().map(|(_, _, span)| span).collect();
    let find = |name: &str| spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no span {name}")).clone();
    let flow = find("flow pipe");
    assert_eq!(flow.kind, 2, "SERVER");
    assert_eq!(string_attr(&flow.attributes, "sfaas.flow.run_id"), Some(run_id.clone()));
    assert_eq!(string_attr(&flow.attributes, "sfaas.flow.name").as_deref(), Some("pipe"));
    let byte_seconds: f64 = string_attr(&flow.attributes, "sfaas.state.byte_seconds").unwrap().parse().unwrap();
    assert!(byte_seconds > 0.0, "two outputs of 1000 bytes were held during the run");
    for (node, function) in [("a", "echo"), ("b", "upper")] {
        let node_span = find(&format!("node {node}"));
        assert_eq!(node_span.kind, 1, "INTERNAL");
        assert_eq!(node_span.parent_span_id, flow.span_id, "node {node} is a child of the flow span");
        assert_eq!(node_span.trace_id, flow.trace_id);
        assert_eq!(string_attr(&node_span.attributes, "sfaas.flow.node").as_deref(), Some(node));
        assert_eq!(string_attr(&node_span.attributes, "sfaas.flow.run_id"), Some(run_id.clone()));
        assert_eq!(int_attr(&node_span.attributes, "sfaas.flow.attempt"), Some(1));
        let invoke = find(&format!("invoke {function}"));
        assert_eq!(invoke.parent_span_id, node_span.span_id, "invoke {function} is a child of node {node}");
        assert_eq!(invoke.trace_id, flow.trace_id);
        assert_eq!(string_attr(&invoke.attributes, "faas.trigger").as_deref(), Some("other"));
        assert_eq!(bool_attr(&invoke.attributes, "sfaas.billable"), Some(true));
    }
}

/// The state store's usage reaches billing as `state.usage` spans, one per owner and interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_usage_is_reported_per_interval_as_billable_spans() {
    let (endpoint, received) = http_receiver().await;
    let mut core = start(|config| {
        config.telemetry.endpoint = Some(endpoint);
        config.telemetry.protocol = OtlpProtocol::Http;
        config.state.usage_interval = std::time::Duration::from_secs(1);
    })
    .await;
    let acme = core.tenant("acme").await;
    let state = |path: &str| format!("{}/state{path}", core.url);
    let r = core.http.put(state("/buckets/b/objects/k")).bearer_auth(&acme.ingest).body("x".repeat(1000)).send();
    assert_eq!(r.await.unwrap().status(), 201);
    let r = core.http.post(state("/jobs")).bearer_auth(&acme.ingest).json(&json!({"job": "run-1"})).send();
    assert_eq!(r.await.unwrap().status(), 201);
    let r = core.http.put(state("/jobs/run-1/buckets/b/objects/k")).bearer_auth(&acme.ingest).body("y").send();
    assert_eq!(r.await.unwrap().status(), 201);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let r = core.http.delete(state("/jobs/run-1")).bearer_auth(&acme.ingest).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let usage_spans = || {
        let requests: Vec<_> = received.lock().unwrap().iter().map(|(_, request)| request.clone()).collect();
        spans(&requests).into_iter().filter(|(_, _, span)| span.name == "state.usage").collect::<Vec<_>>()
    };
    let has = |owner: &'static str| {
        let found = usage_spans()
            .into_iter()
            .any(|(_, _, s)| string_attr(&s.attributes, "sfaas.state.owner").as_deref() == Some(owner));
        async move { found.then_some(()) }
    };
    common::eventually(std::time::Duration::from_secs(10), || has("standing")).await.expect("a standing usage span");
    common::eventually(std::time::Duration::from_secs(10), || has("job")).await.expect("a job usage span");
    core.stop().await;

    let spans = usage_spans();
    let mut ids = std::collections::BTreeSet::new();
    for (service, namespace, span) in &spans {
        assert_eq!((service.as_str(), namespace.as_str()), ("sfaas-core", "acme"));
        assert_eq!(span.kind, 1, "INTERNAL");
        assert!(span.parent_span_id.is_empty(), "a root span");
        let (start, end) = (span.start_time_unix_nano, span.end_time_unix_nano);
        assert!(start < end && start / 1_000_000_000 == (end - 1) / 1_000_000_000, "within one interval: {span:?}");
        let a = &span.attributes;
        assert_eq!(bool_attr(a, "sfaas.billable"), Some(true));
        let byte_seconds = string_attr(a, "sfaas.state.byte_seconds").unwrap();
        let (whole, fraction) = byte_seconds.split_once('.').expect("exact decimal text");
        assert!(whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) && fraction.len() == 9);
        assert!(byte_seconds.parse::<f64>().unwrap() > 0.0, "{byte_seconds}");
        let id = string_attr(a, "sfaas.usage_id").unwrap();
        match string_attr(a, "sfaas.state.owner").as_deref() {
            Some("standing") => {
                assert_eq!(string_attr(a, "sfaas.state.job"), None);
                assert_eq!(id, format!("state/standing/{start}"));
            }
            Some("job") => {
                assert_eq!(string_attr(a, "sfaas.state.job").as_deref(), Some("run-1"));
                assert_eq!(id, format!("state/job/run-1/{start}"));
            }
            other => panic!("owner {other:?}"),
        }
        assert!(ids.insert(id.clone()), "usage id {id} repeated");
    }
    // The standing object was held from its put to the shutdown, without gaps or overlaps:
    // 1130 B (1000 of value, 2 of address, 128) over the time its records cover.
    let mut standing: Vec<_> = spans
        .iter()
        .filter(|(_, _, s)| string_attr(&s.attributes, "sfaas.state.owner").as_deref() == Some("standing"))
        .map(|(_, _, s)| {
            (
                s.start_time_unix_nano,
                s.end_time_unix_nano,
                string_attr(&s.attributes, "sfaas.state.byte_seconds").unwrap(),
            )
        })
        .collect();
    standing.sort();
    for pair in standing.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "contiguous records");
    }
    for (start, end, byte_seconds) in &standing {
        let byte_nanos = 1130 * u128::from(end - start);
        assert_eq!(byte_seconds, &format!("{}.{:09}", byte_nanos / 1_000_000_000, byte_nanos % 1_000_000_000));
    }
}

/// Many spans at once, the SDK's and invocation spans interleaved, reach the receiver complete,
/// in requests small enough for any receiver (at most 2,048 spans each: gRPC servers refuse
/// messages over 4 MiB by default), with the token, and a flush sends what is still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_spans_arrives_whole_in_bounded_requests() {
    use opentelemetry::KeyValue as Attribute;
    use opentelemetry::trace::{Span as _, Tracer, TracerProvider};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use stateful_faas_core::function::Usage;
    use stateful_faas_core::telemetry::{InvocationSpan, Invoked, OtlpProcessor, TelemetryConfig};

    let (endpoint, received) = grpc_receiver().await;
    let config = TelemetryConfig {
        endpoint: Some(endpoint.clone()),
        protocol: OtlpProtocol::Grpc,
        token: Some("meter-token".into()),
        max_queue_size: 20_000,
        ..Default::default()
    };
    let processor = OtlpProcessor::new(&config, &endpoint, 20_000, None).unwrap();
    let queue = processor.queue();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).build();
    let tracer = provider.tracer("burst");
    let usage = Usage { cpu_ns: 7_000_000, peak_memory_bytes: 0, cold_start: false };
    for i in 0..10_000_usize {
        if i.is_multiple_of(2) {
            let mut span = tracer.start(format!("invoke f{i}"));
            span.set_attribute(Attribute::new("sfaas.call_id", format!("call-{i}")));
            span.end();
        } else {
            let call_id = format!("call-{i}");
            let function = format!("f{i}");
            InvocationSpan::start(queue.clone(), &opentelemetry::Context::new()).end(&Invoked {
                function: &function,
                kind: "builtin",
                execution_id: uuid::Uuid::from_u128(i as u128),
                call_id: &call_id,
                trigger: "http",
                job: i.is_multiple_of(3).then_some("run-1"),
                usage: &usage,
                wall: std::time::Duration::from_millis(9),
                bytes_in: i,
                bytes_out: 2,
                log_bytes: 0,
                status: 200,
            });
        }
    }
    tokio::task::spawn_blocking(move || provider.force_flush().unwrap()).await.unwrap();

    let requests = received.requests.lock().unwrap().clone();
    let per_request: Vec<usize> = requests.iter().map(|r| spans(std::slice::from_ref(r)).len()).collect();
    assert!(per_request.iter().all(|&n| n <= 2048), "spans per request: {per_request:?}");
    let mut ids: Vec<String> =
        spans(&requests).iter().map(|(_, _, span)| string_attr(&span.attributes, "sfaas.call_id").unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10_000, "every span arrived once");
    assert!(received.authorization.lock().unwrap().iter().all(|a| a == "Bearer meter-token"));
    // Invocation spans keep their own fields, whichever batch they went in.
    let invocations: Vec<Span> =
        spans(&requests).into_iter().map(|(_, _, span)| span).filter(|span| span.kind == 2).collect();
    assert_eq!(invocations.len(), 5_000);
    for span in &invocations {
        let i: usize = span.name.strip_prefix("invoke f").unwrap().parse().unwrap();
        assert_eq!(string_attr(&span.attributes, "sfaas.call_id"), Some(format!("call-{i}")));
        assert_eq!(
            string_attr(&span.attributes, "faas.invocation_id"),
            Some(uuid::Uuid::from_u128(i as u128).to_string())
        );
        assert_eq!(int_attr(&span.attributes, "sfaas.bytes_in"), Some(i as i64));
        assert_eq!(int_attr(&span.attributes, "sfaas.cpu_ms"), Some(7));
        let job = string_attr(&span.attributes, "sfaas.state.job");
        assert_eq!(job.as_deref(), i.is_multiple_of(3).then_some("run-1"), "span {i}");
    }
}

/// The platform's spans carry the bill: while the collector is down they wait in the spool on
/// disk, across a restart of the core, and arrive, every one, once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_wait_in_the_spool_while_the_collector_is_down_and_arrive_after() {
    // A free port where nothing listens yet: the collector is down.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let configure = |config: &mut stateful_faas_core::CoreConfig| {
        export_to(config, format!("http://{addr}"));
        config.telemetry.spool_dir = Some(spool.path().to_path_buf());
        config.telemetry.spool_max_bytes = 64 << 20;
    };
    let mut core = start(configure).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    for i in 0..20 {
        assert_eq!(core.invoke(&acme.ingest, "echo", format!("down {i}")).await.status(), 200);
    }
    // Stopping flushes: the spans go to the spool, not nowhere.
    core.stop().await;
    let spooled = std::fs::read_dir(spool.path().join("acme")).unwrap().count();
    assert!(spooled > 0, "nothing was spooled");

    // The collector is back, and so is the core (its spool found and replayed at start).
    let (_, received) = common::otlp::grpc_receiver_at(addr).await;
    let mut core = start(configure).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    for i in 0..5 {
        assert_eq!(core.invoke(&acme.ingest, "echo", format!("up {i}")).await.status(), 200);
    }
    let arrived = common::eventually(std::time::Duration::from_secs(20), || async {
        let requests = received.requests.lock().unwrap().clone();
        let invocations = spans(&requests).iter().filter(|(_, _, s)| s.name == "invoke echo").count();
        (invocations >= 25).then_some(invocations)
    })
    .await;
    core.stop().await;
    let requests = received.requests.lock().unwrap().clone();
    let mut ids: Vec<_> = spans(&requests)
        .iter()
        .filter(|(_, _, s)| s.name == "invoke echo")
        .map(|(_, _, s)| string_attr(&s.attributes, "faas.invocation_id").unwrap())
        .collect();
    assert_eq!(arrived, Some(25), "every invocation's span arrived: {} of 25", ids.len());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 25, "each once");
    assert_eq!(std::fs::read_dir(spool.path().join("acme")).unwrap().count(), 0, "the spool is empty again");
}
