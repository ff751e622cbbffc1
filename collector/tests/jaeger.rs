//! Jaeger thrift over HTTP with a real client: the OpenTelemetry Python SDK's Jaeger exporter
//! (1.21.0, in a virtualenv of its own, created on first use under target/).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{backends, start};

/// A virtualenv with the exporter, or `None` (skipped) when it cannot be installed here.
fn jaeger_venv() -> Option<PathBuf> {
    let packages = [
        "opentelemetry-api==1.21.0",
        "opentelemetry-sdk==1.21.0",
        "opentelemetry-exporter-jaeger-thrift==1.21.0",
        "deprecated",
    ];
    testkit::python_venv("jaeger-thrift", "import opentelemetry.exporter.jaeger.thrift", &packages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_jaeger_exporter_is_understood() {
    let Some(python) = jaeger_venv() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/jaeger_thrift.py");
    for backend in backends() {
        let running = start(&backend, |_| {}).await;
        let endpoint = format!("http://{}/api/traces", running.jaeger_addr);
        let run = |user: &str, password: &str, namespace: &str| {
            Command::new(&python).arg(&script).args([endpoint.as_str(), user, password, namespace]).output().unwrap()
        };
        let output = tokio::task::block_in_place(|| run("acme", "acme-token", "acme"));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let ids = String::from_utf8(output.stdout).unwrap();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        let (trace_id, parent_id, child_id) = (ids[0], ids[1], ids[2]);
        let spans = running.collector.store.trace("acme", trace_id).await.unwrap();
        assert_eq!(spans.len(), 2, "{}: {spans:?}", backend.name());
        let parent = spans.iter().find(|s| s.span_id == parent_id).unwrap();
        let child = spans.iter().find(|s| s.span_id == child_id).unwrap();
        assert_eq!(child.parent_span_id.as_deref(), Some(parent_id), "parentSpanId is the parent link");
        assert_eq!(parent.parent_span_id, None);
        assert_eq!((child.name.as_str(), child.kind, child.service_name.as_str()), ("SELECT basket", 3, "py-shop"));
        let attributes: serde_json::Value = serde_json::from_str(&child.attributes).unwrap();
        assert_eq!(attributes["db.rows"], 3);
        assert!(child.end_ns > child.start_ns && !child.metered);

        // Resource attributes copied onto span tags name another tenant: refused, not re-attributed.
        let output = tokio::task::block_in_place(|| run("acme", "acme-token", "globex"));
        let ids = String::from_utf8(output.stdout).unwrap();
        let trace_id = ids.split_whitespace().next().unwrap().to_string();
        assert!(running.collector.store.trace("acme", &trace_id).await.unwrap().is_empty());
        assert!(running.collector.store.trace("globex", &trace_id).await.unwrap().is_empty());
        // A wrong password is refused.
        let output = tokio::task::block_in_place(|| run("acme", "wrong", "acme"));
        let ids = String::from_utf8(output.stdout).unwrap();
        let trace_id = ids.split_whitespace().next().unwrap().to_string();
        assert!(running.collector.store.trace("acme", &trace_id).await.unwrap().is_empty());
        assert_eq!(running.collector.store.counts("acme").await.unwrap().spans, 2);
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_thrift_gets_clear_errors() {
    let backend = common::Backend::Sqlite(tempfile::tempdir().unwrap());
    let running = start(&backend, |_| {}).await;
    let url = format!("http://{}/api/traces", running.jaeger_addr);
    let post = |content_type: &str, body: Vec<u8>| {
        reqwest::Client::new()
            .post(&url)
            .basic_auth("acme", Some("acme-token"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let r = post("application/x-thrift", vec![15, 0, 2, 12, 0, 0]).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid thrift Batch: truncated"));
    assert_eq!(post("application/json", b"{}".to_vec()).await.unwrap().status(), 415);
    let r = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-thrift")
        .body(vec![0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    running.shutdown().await;
}
