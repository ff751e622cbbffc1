//! `/metrics`: OpenFaaS names with a namespace label, valid for Prometheus's own linter.

use crate::common;

use std::io::Write;

use common::{ADMIN, require_program, start};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_openfaas_names_and_pass_promtool() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    core.deploy(&acme, json!({"service": "bad", "builtin": "fail"})).await;
    for _ in 0..3 {
        assert_eq!(core.invoke(&acme.ingest, "echo", "x").await.status(), 200);
    }
    assert_eq!(core.invoke(&acme.ingest, "bad", "x").await.status(), 500);

    let response = core.http.get(format!("{}/metrics", core.url)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for line in [
        r#"gateway_function_invocation_total{function_name="echo.acme",namespace="acme",code="200"} 3"#,
        r#"gateway_function_invocation_total{function_name="bad.acme",namespace="acme",code="500"} 1"#,
        r#"gateway_functions_seconds_count{function_name="echo.acme",namespace="acme"} 3"#,
        r#"gateway_service_count{function_name="echo.acme",namespace="acme"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in:\n{text}");
    }
    assert!(text.contains(r#"sfaas_function_cpu_seconds_total{function_name="echo.acme",namespace="acme"}"#));

    let Some(promtool) = require_program("promtool") else {
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // promtool exits 3 for naming lints and 1 for invalid exposition. The one lint allowed is
    // on `gateway_service_count`, the OpenFaaS name kept for compatibility (docs/contracts.md,
    // "Telemetry contract").
    let lints: Vec<_> = report.lines().filter(|line| !line.trim().is_empty()).collect();
    let only_openfaas_name = lints.iter().all(|line| line.starts_with("gateway_service_count "));
    assert!(
        output.status.success() || (output.status.code() == Some(3) && only_openfaas_name),
        "promtool check metrics failed ({:?}):\n{report}",
        output.status.code()
    );

    // Scrapers that ask for OpenMetrics get it.
    let response = core
        .http
        .get(format!("{}/metrics", core.url))
        .bearer_auth(ADMIN)
        .header("Accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(response.text().await.unwrap().ends_with("# EOF\n"));
}
