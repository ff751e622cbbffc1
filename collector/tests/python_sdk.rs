//! OTLP from the OpenTelemetry Python SDK (from PyPI, in a virtualenv of its own under
//! target/), over HTTP and over gRPC.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{backends, start};

fn otlp_venv() -> Option<PathBuf> {
    let import = "import opentelemetry.exporter.otlp.proto.http.trace_exporter, opentelemetry.exporter.otlp.proto.grpc.trace_exporter";
    let packages =
        ["opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-exporter-otlp-proto-grpc"];
    testkit::python_venv("otlp-python", import, &packages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_over_http_and_grpc_is_stored_once_with_parents() {
    let Some(python) = otlp_venv() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/otlp_sdk.py");
    for backend in backends() {
        let running = start(&backend, |_| {}).await;
        let endpoints = [
            ("http", format!("http://{}/v1/traces", running.otlp_http_addr)),
            ("grpc", format!("http://{}", running.otlp_grpc_addr)),
        ];
        for (protocol, endpoint) in endpoints {
            let output = tokio::task::block_in_place(|| {
                Command::new(&python)
                    .arg(&script)
                    .args([protocol, endpoint.as_str(), "acme-token", "acme"])
                    .output()
                    .unwrap()
            });
            assert!(output.status.success(), "{protocol}: {}", String::from_utf8_lossy(&output.stderr));
            let ids = String::from_utf8(output.stdout).unwrap();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            let spans = running.collector.store.trace("acme", ids[0]).await.unwrap();
            assert_eq!(spans.len(), 2, "{} over {protocol}: {spans:?}", backend.name());
            let child = spans.iter().find(|s| s.span_id == ids[2]).unwrap();
            assert_eq!(child.parent_span_id.as_deref(), Some(ids[1]));
            assert_eq!((child.kind, child.service_name.as_str()), (3, "py-api"));
            let parent = spans.iter().find(|s| s.span_id == ids[1]).unwrap();
            assert_eq!(parent.kind, 2);
        }
        assert_eq!(running.collector.store.counts("acme").await.unwrap().spans, 4);
        running.shutdown().await;
    }
}
