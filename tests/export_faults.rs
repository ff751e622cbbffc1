//! Fault injection, end to end with the binary: a workload of sync, async and flow calls for
//! two tenants while the collector is killed (`kill -9`) and comes back later, and the core is
//! restarted meanwhile. Afterwards every execution the gateway served has its metered span in
//! the telemetry store, once: nothing billable was lost, nothing doubled.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

use common::cli_ok as ok;

fn collector(data: &Path, grpc: &str) -> Child {
    let args = ["--otlp-grpc-addr", grpc, "--otlp-http-addr", "127.0.0.1:0", "--jaeger-addr", "127.0.0.1:0"];
    common::serve("collector", &args, data).0
}

fn core(data: &Path, grpc: &str) -> (Child, String) {
    let meter = std::fs::read_to_string(data.join("meter.token")).unwrap();
    let endpoint = format!("http://{grpc}");
    let args = ["--gateway-addr", "127.0.0.1:0", "--otlp-endpoint", &endpoint, "--otlp-token", meter.trim()];
    let (child, addresses) = common::serve("core", &args, data);
    (child, format!("http://{}", addresses["gateway"].as_str().unwrap()))
}

fn stop(mut child: Child) {
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// Metered `invoke` spans per tenant in the store: (rows, distinct execution ids).
async fn metered(data: &Path) -> Vec<(String, i64, i64)> {
    let url = format!("sqlite://{}", data.join("telemetry.db").display());
    let store = collector::store::TelemetryStore::open_with_blocks(&url, &data.join("blocks")).await.unwrap();
    let mut by_tenant: std::collections::BTreeMap<String, (i64, std::collections::BTreeSet<String>)> =
        Default::default();
    for span in store.metered_spans(i64::MIN, i64::MAX).await.unwrap() {
        if !span.name.starts_with("invoke ") {
            continue;
        }
        let attributes: Value = serde_json::from_str(&span.attributes).unwrap();
        let entry = by_tenant.entry(span.tenant).or_default();
        entry.0 += 1;
        entry.1.insert(attributes["faas.invocation_id"].to_string());
    }
    by_tenant.into_iter().map(|(tenant, (rows, ids))| (tenant, rows, ids.len() as i64)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billable_spans_survive_a_collector_outage_and_a_core_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // `sfaas up` once makes the meter token and the schemas (as the README's split setup says).
    stop(common::up(&[], data).0);
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut collector_process = collector(data, &grpc);
    let (core_process, gateway) = core(data, &grpc);

    let tenants: Vec<Value> = ["acme", "globex"]
        .iter()
        .map(|name| serde_json::from_str(&ok(data, &["tenant", "create", name], "")).unwrap())
        .collect();
    let ingest = |i: usize| tenants[i]["ingest_token"].as_str().unwrap().to_string();
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/stack.yml");
    let flow = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/text-report.yml");
    for i in 0..2 {
        ok(data, &["deploy", "-f", stack, "--token", &ingest(i)], "");
    }
    ok(data, &["flow", "deploy", "-f", flow, "--token", &ingest(0)], "");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let calls = |gateway: String, tenant: usize, n: usize| {
        let (http, token) = (http.clone(), ingest(tenant));
        async move {
            for i in 0..n {
                let url = format!("{gateway}/function/shout");
                let response = http.post(url).bearer_auth(&token).body(format!("call {i}")).send().await.unwrap();
                assert_eq!(response.status(), 200);
            }
        }
    };
    // A flow run of text-report: 4 executions (its `loud` branch runs for 9 words).
    let words = "the quick brown fox jumps over the lazy dog";
    let flow_run = || ok(data, &["flow", "run", "text-report", "--token", &ingest(0)], words);
    let mut expected = [0usize; 2];

    calls(gateway.clone(), 0, 10).await;
    calls(gateway.clone(), 1, 10).await;
    flow_run();
    expected[0] += 14;
    expected[1] += 10;

    // The collector dies; the workload goes on.
    collector_process.kill().unwrap();
    collector_process.wait().unwrap();
    calls(gateway.clone(), 0, 10).await;
    calls(gateway.clone(), 1, 10).await;
    flow_run();
    let mut async_calls = Vec::new();
    for i in 0..3 {
        let response = http
            .post(format!("{gateway}/async-function/echo"))
            .bearer_auth(ingest(0))
            .header("X-Call-Id", format!("async-{i}"))
            .body("later")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        async_calls.push(format!("async-{i}"));
    }
    expected[0] += 10 + 4 + 3;
    expected[1] += 10;
    // Down a while longer: the exporters try their spools again and again meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Delivered before the core stops (a call running at a stop runs again: another execution).
    let read = tenants[0]["read_token"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for call in &async_calls {
        loop {
            let url = format!("{gateway}/system/async-calls/{call}");
            let state: Value = http.get(url).bearer_auth(read).send().await.unwrap().json().await.unwrap();
            if state["state"] == "done" {
                break;
            }
            assert!(Instant::now() < deadline, "{state}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The core restarts while the collector is still down: what waits is on disk.
    stop(core_process);
    let spooled = |tenant: &str| std::fs::read_dir(data.join("span-spool").join(tenant)).map_or(0, |d| d.count());
    assert!(spooled("acme") > 0 && spooled("globex") > 0, "the spans wait in the spools");
    let (core_process, gateway) = core(data, &grpc);
    calls(gateway.clone(), 1, 5).await;
    expected[1] += 5;

    // The collector is back; the spool drains, and new calls go straight through.
    let collector_process = collector(data, &grpc);
    calls(gateway.clone(), 0, 5).await;
    calls(gateway.clone(), 1, 5).await;
    expected[0] += 5;
    expected[1] += 5;

    let want = vec![
        ("acme".to_string(), expected[0] as i64, expected[0] as i64),
        ("globex".to_string(), expected[1] as i64, expected[1] as i64),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = metered(data).await;
    while seen != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen = metered(data).await;
    }
    assert_eq!(seen, want, "metered invoke spans (rows, distinct executions) per tenant");
    // A spooled request's file goes once the collector has answered it, which may be a moment
    // after its spans are seen stored.
    let empty = || {
        std::fs::read_dir(data.join("span-spool"))
            .unwrap()
            .flatten()
            .all(|tenant| std::fs::read_dir(tenant.path()).unwrap().next().is_none())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(empty(), "the spools are empty again");
    stop(core_process);
    stop(collector_process);
}
