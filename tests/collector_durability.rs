//! Nothing the collector acknowledged is lost to a kill -9: spans are acknowledged only after
//! their batch is committed. Drives the `sfaas up` binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

use crate::common;

use common::sfaas as sfaas_command;

fn request(batch: u32) -> Vec<u8> {
    let spans = (0..50u32)
        .map(|i| {
            let mut trace_id = [7u8; 16];
            trace_id[..4].copy_from_slice(&batch.to_be_bytes());
            let mut span_id = [1u8; 8];
            span_id[..4].copy_from_slice(&i.to_be_bytes());
            Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                name: format!("op-{i}"),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_spans_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut up, addresses) = common::serve(
        "up",
        &[
            "--gateway-addr",
            "127.0.0.1:0",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--jaeger-addr",
            "127.0.0.1:0",
            // The spans sent have no timestamps (1970): keep them from the retention pass.
            "--retention-hours",
            "1000000",
        ],
        &data,
    );
    let otlp_http = addresses["otlp_http"].as_str().expect("up runs the collector").to_string();
    for key in ["gateway", "otlp_grpc", "otlp_http", "jaeger"] {
        assert!(addresses[key].is_string(), "{key} missing from {addresses}");
    }
    let created = sfaas_command().args(["tenant", "create", "acme", "--data-dir"]).arg(&data).output().unwrap();
    let credentials: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let token = credentials["ingest_token"].as_str().unwrap().to_string();

    // Four senders post batches of 50 spans as fast as they can; count what was acknowledged.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut senders = Vec::new();
    for sender in 0..4u32 {
        let (client, token, acknowledged, url) =
            (client.clone(), token.clone(), acknowledged.clone(), format!("http://{otlp_http}/v1/traces"));
        senders.push(tokio::spawn(async move {
            for batch in 0..10_000u32 {
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/x-protobuf")
                    .body(request(sender * 100_000 + batch))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 200 => {
                        acknowledged.fetch_add(50, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    while acknowledged.load(Ordering::SeqCst) < 20_000 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    up.kill().unwrap(); // SIGKILL, with requests in flight
    up.wait().unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acknowledged.load(Ordering::SeqCst);

    let url = format!("sqlite://{}", data.join("telemetry.db").display());
    let store = collector::store::TelemetryStore::open_with_blocks(&url, &data.join("blocks")).await.unwrap();
    let stored = store.counts("acme").await.unwrap().spans;
    assert!(stored >= acknowledged, "{acknowledged} spans were acknowledged but only {stored} survived the crash");
}

/// `sfaas core` and `sfaas collector` as two processes on one data directory: the collector
/// learns the tenants the core creates, and both addresses end up in addresses.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_collector_knows_the_cores_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = |component: &str, args: &[&str]| common::serve(component, args, &data);
    let (mut core, _) = start("core", &["--gateway-addr", "127.0.0.1:0"]);
    let (mut collector, addresses) = start(
        "collector",
        &["--otlp-grpc-addr", "127.0.0.1:0", "--otlp-http-addr", "127.0.0.1:0", "--jaeger-addr", "127.0.0.1:0"],
    );
    assert!(addresses.get("gateway").is_none(), "the collector lists only its own addresses: {addresses}");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("addresses.json")).unwrap()).unwrap();
    assert!(file["gateway"].is_string() && file["otlp_http"].is_string(), "{file}");

    let created = sfaas_command().args(["tenant", "create", "acme", "--data-dir"]).arg(&data).output().unwrap();
    let credentials: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let token = credentials["ingest_token"].as_str().unwrap().to_string();
    let url = format!("http://{}/v1/traces", addresses["otlp_http"].as_str().unwrap());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut status = 0;
    for _ in 0..50 {
        let response = client
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/x-protobuf")
            .body(request(1))
            .send()
            .await
            .unwrap();
        status = response.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "the collector never learned the new tenant's token");
    for child in [&mut core, &mut collector] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
