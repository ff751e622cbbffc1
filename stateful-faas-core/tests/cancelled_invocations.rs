//! Every started invocation is billed with the CPU it used, whatever happens to its caller: a
//! client that goes away, a flow run stopped by a failure elsewhere, a managed server that never
//! listens or burns CPU while it is idle.

use crate::common;

use std::time::Duration;

use common::otlp::{Received, export_to, grpc_receiver, int_attr, spans, string_attr};
use common::{ADMIN, Tenant, TestCore, eventually, python, require_program, start};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;

/// Burns `MS` ms of its own CPU time (as the kernel accounts it), then exits.
const BURNER: &str = "PYTHON -c 'import time\nwhile time.process_time() < MS / 1000: pass'";

fn burner(ms: u64) -> String {
    BURNER.replace("PYTHON", &python()).replace("MS", &ms.to_string())
}

/// The first span named `name` that the receiver got within 15 s.
async fn span_named(received: &Received, name: &str) -> Option<Span> {
    eventually(Duration::from_secs(15), || async {
        spans(&received.requests.lock().unwrap()).into_iter().map(|(_, _, span)| span).find(|span| span.name == name)
    })
    .await
}

/// CPU-ms of `function`'s `instance.usage` records received so far.
fn instance_cpu_ms(received: &Received, function: &str) -> i64 {
    spans(&received.requests.lock().unwrap())
        .iter()
        .filter(|(_, _, span)| span.name == "instance.usage")
        .filter(|(_, _, span)| string_attr(&span.attributes, "faas.name").as_deref() == Some(function))
        .map(|(_, _, span)| int_attr(&span.attributes, "sfaas.cpu_ms").unwrap())
        .sum()
}

async fn metrics(core: &TestCore) -> String {
    let response = core.http.get(format!("{}/metrics", core.url)).bearer_auth(ADMIN).send().await.unwrap();
    response.text().await.unwrap()
}

/// A call that the client gives up on after `after`.
async fn abandon(core: &TestCore, tenant: &Tenant, function: &str, after: Duration) {
    let request = core.http.post(format!("{}/function/{function}", core.url)).bearer_auth(&tenant.ingest);
    let sent = request.timeout(after).send().await;
    assert!(sent.is_err_and(|error| error.is_timeout()), "the call ended before the client gave up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_whose_client_goes_away_is_stopped_and_billed_up_to_then() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "burn", "envProcess": burner(2000)})).await;

    abandon(&core, &acme, "burn", Duration::from_millis(500)).await;

    let span = span_named(&received, "invoke burn").await.expect("the abandoned invocation's span");
    assert_eq!(int_attr(&span.attributes, "http.response.status_code"), Some(499), "recorded as cancelled");
    let cpu_ms = int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    // Half a second of a 2 s burn (less on a busy machine, never the rest: it was killed).
    assert!((100..1500).contains(&cpu_ms), "billed {cpu_ms} ms for a burner stopped after 0.5 s");
    let counted = r#"gateway_function_invocation_total{function_name="burn.acme",namespace="acme",code="499"} 1"#;
    let text = metrics(&core).await;
    assert!(text.lines().any(|line| line == counted), "missing {counted} in:\n{text}");
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_node_stopped_by_a_failure_elsewhere_is_billed() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "burn", "envProcess": burner(5000)})).await;
    core.deploy(&acme, json!({"service": "fail", "envProcess": "sleep 0.7; exit 1"})).await;
    let yaml = "name: burn-and-fail\nnodes:\n  a: {function: burn}\n  b: {function: fail}\n";
    let response =
        core.http.post(format!("{}/system/flows", core.url)).bearer_auth(&acme.ingest).body(yaml).send().await.unwrap();
    assert_eq!(response.status(), 201);

    let response = core.http.post(format!("{}/flow/burn-and-fail", core.url)).bearer_auth(&acme.ingest).send();
    let body = response.await.unwrap().text().await.unwrap();
    assert!(body.contains("node b"), "the run fails at node b: {body}");

    let span = span_named(&received, "invoke burn").await.expect("the span of node a's stopped invocation");
    assert_eq!(int_attr(&span.attributes, "http.response.status_code"), Some(499));
    let cpu_ms = int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    assert!((150..4000).contains(&cpu_ms), "billed {cpu_ms} ms for node a, stopped after about 0.7 s");
    core.stop().await;
}

/// A managed server that burns `MS` ms of CPU, then exits without ever listening.
const BURN_THEN_EXIT: &str =
    "PYTHON -c 'import time\nwhile time.process_time() < MS / 1000: pass\nraise SystemExit(3)'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_server_that_never_listens_is_billed_for_its_start() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    let command = BURN_THEN_EXIT.replace("PYTHON", &python()).replace("MS", "500");
    core.deploy(&acme, json!({"service": "quitter", "kind": "http", "envProcess": command})).await;
    // Burns until it is stopped: here, when its only caller goes away during the start.
    core.deploy(&acme, json!({"service": "spinner", "kind": "http", "envProcess": burner(60_000)})).await;

    let response = core.invoke(&acme.ingest, "quitter", "").await;
    assert_eq!(response.status(), 502);
    assert!(response.text().await.unwrap().contains("exited before listening"));
    abandon(&core, &acme, "spinner", Duration::from_millis(1000)).await;
    // The stopped start is metered at once, and reported at the next housekeeping tick.
    let spinner_ms = eventually(Duration::from_secs(10), || async {
        Some(instance_cpu_ms(&received, "spinner")).filter(|&ms| ms > 0)
    })
    .await
    .unwrap_or(0);
    core.stop().await;

    let quitter_ms = instance_cpu_ms(&received, "quitter");
    assert!((500..1500).contains(&quitter_ms), "billed {quitter_ms} ms for a failed start that burned 500 ms");
    assert!((200..2000).contains(&spinner_ms), "billed {spinner_ms} ms for a start stopped after 1 s");
}

/// A managed server that burns 1.5 s of CPU after its first response, while idle.
const IDLE_BURNER: &str = r#"
import http.server, os, threading, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        threading.Thread(target=burn, args=(1.5,)).start()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_is_billed_for_its_idle_cpu_as_it_goes() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    std::fs::write(core.functions_dir().join("idle.py"), IDLE_BURNER).unwrap();
    let workdir = core.functions_dir().display().to_string();
    core.deploy(&acme, json!({"service": "idle", "kind": "http", "envProcess": "python3 idle.py", "workdir": workdir}))
        .await;
    assert_eq!(core.invoke(&acme.ingest, "idle", "").await.text().await.unwrap(), "ok");

    // No other request, the instance still running: its idle burn is metered on the way.
    let metered = eventually(Duration::from_secs(15), || async {
        Some(instance_cpu_ms(&received, "idle")).filter(|&ms| ms >= 1200)
    })
    .await;
    assert!(
        metered.is_some(),
        "{} ms metered of a warm instance's 1.5 s idle burn",
        instance_cpu_ms(&received, "idle")
    );
    core.stop().await;
}

/// A builtin's thread cannot be stopped: when its client goes away, the invocation is recorded
/// as cancelled once the thread ends, with all the CPU the thread took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builtin_whose_client_goes_away_is_billed_all_its_thread_took() {
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "burn", "builtin": "cpu-burn"})).await;
    let request = core.http.post(format!("{}/function/burn", core.url)).bearer_auth(&acme.ingest).body("1500");
    let sent = request.timeout(Duration::from_millis(300)).send().await;
    assert!(sent.is_err_and(|error| error.is_timeout()), "the call ended before the client gave up");

    let span = span_named(&received, "invoke burn").await.expect("the abandoned invocation's span");
    assert_eq!(int_attr(&span.attributes, "http.response.status_code"), Some(499), "recorded as cancelled");
    let cpu_ms = int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    // The thread burned its 1.5 s of CPU to the end (it cannot be stopped): all of it billed.
    assert!(cpu_ms >= 1500, "billed {cpu_ms} ms for a builtin thread that burned 1500 ms");
    core.stop().await;
}

/// Invocation spans are what billing meters: they are never dropped for a full queue. While a
/// tenant's spans are not leaving (its collector hangs), its queue fills and its new calls are
/// refused (429) instead of run unmetered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_while_their_tenants_spans_cannot_leave() {
    // A collector that takes connections and never answers.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", hanging.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            held.push(socket);
        }
    });
    let mut core = start(|config| {
        export_to(config, endpoint);
        config.telemetry.max_queue_size = 64;
    })
    .await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    // More calls than the queue holds, 16 at a time.
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let calls = (0..16).map(|_| core.invoke(&acme.ingest, "echo", "x"));
        let answers = futures_util::future::join_all(calls).await;
        statuses.extend(answers.iter().map(|answer| answer.status().as_u16()));
        if statuses.contains(&429) {
            break;
        }
    }
    let refused = statuses.iter().filter(|status| **status == 429).count();
    assert!(refused > 0, "all {} calls ran while their spans could not leave", statuses.len());
    assert!(statuses.iter().all(|status| [200, 429].contains(status)), "{statuses:?}");
    core.stop().await;
}

/// With the collector away and the span spool full, billed spans are kept, not dropped: the
/// tenant's queue fills and its new calls are refused (429) until the collector is back, and
/// then every call that ran has its span; and a tenant's job registrations are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_keeps_billed_spans_and_refuses_calls_until_the_collector_is_back() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let mut core = start(|config| {
        export_to(config, format!("http://{addr}"));
        config.telemetry.max_queue_size = 64;
        config.telemetry.spool_dir = Some(spool.path().to_path_buf());
        // Smaller than one request: nothing fits.
        config.telemetry.spool_max_bytes = 1024;
    })
    .await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    // Calls until they are refused, 16 at a time: the 200s that ran.
    let until_refused = || async {
        let mut ran = 0;
        for _ in 0..20 {
            let calls = (0..16).map(|_| core.invoke(&acme.ingest, "echo", "x"));
            let statuses: Vec<u16> =
                futures_util::future::join_all(calls).await.iter().map(|answer| answer.status().as_u16()).collect();
            assert!(statuses.iter().all(|status| [200, 429].contains(status)), "{statuses:?}");
            ran += statuses.iter().filter(|status| **status == 200).count();
            if statuses.contains(&429) {
                return Some(ran);
            }
        }
        None
    };
    let mut ran = until_refused().await.expect("calls refused while their spans cannot leave");
    // The exporter has tried, failed and found no room in the spool meanwhile. It holds the
    // batch it took, so a queue's worth of calls more runs, and no more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ran += until_refused().await.expect("calls refused again once the queue is full");
    let register = core.http.post(format!("{}/state/jobs", core.url)).bearer_auth(&acme.ingest);
    let refused = register.json(&json!({"job": "j"})).send().await.unwrap();
    assert_eq!(refused.status(), 429, "a job registration while the tenant's usage cannot leave");

    // The collector comes back: every call that ran is there, once.
    let (_, received) = common::otlp::grpc_receiver_at(addr).await;
    let invoked = || {
        let spans = spans(&received.requests.lock().unwrap());
        spans.iter().filter(|(_, _, span)| span.name == "invoke echo").count()
    };
    let all = eventually(Duration::from_secs(30), || async { (invoked() >= ran).then_some(()) }).await;
    assert!(all.is_some(), "{} of {ran} calls' spans arrived", invoked());
    assert_eq!(invoked(), ran);
    let again = eventually(Duration::from_secs(10), || async {
        (core.invoke(&acme.ingest, "echo", "x").await.status() == 200).then_some(())
    })
    .await;
    assert!(again.is_some(), "calls run again once the spans leave");
    core.stop().await;
}

/// A function whose answer cannot be returned (over the largest response) still ran: its CPU is
/// billed, not dropped with the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_whose_answer_is_too_large_is_billed_its_cpu() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    let flood = format!(
        "{} -c 'import sys,time\nwhile time.process_time() < 0.4: pass\nsys.stdout.buffer.write(bytes(65 << 20))'",
        python()
    );
    core.deploy(&acme, json!({"service": "flood", "envProcess": flood})).await;
    let response = core.http.post(format!("{}/function/flood", core.url)).bearer_auth(&acme.ingest).send();
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    assert!(response.text().await.unwrap().contains("larger than"), "answered {status}");

    let span = span_named(&received, "invoke flood").await.expect("the invocation's span");
    assert_eq!(int_attr(&span.attributes, "http.response.status_code"), Some(status.into()));
    let cpu_ms = int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    assert!(cpu_ms >= 350, "billed {cpu_ms} ms for a function that burned 400 ms before answering too much");
    core.stop().await;
}
