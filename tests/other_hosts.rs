//! A collector and a dashboard on other hosts: each on a data directory of its own, without the
//! core's `sfaas.db`, sharing only the telemetry database (PostgreSQL). They check the tokens the
//! core published there: a tenant created on the core sends telemetry to the collector and reads
//! its bills on the dashboard within seconds, with its own tokens only; the meter and admin
//! tokens keep their powers; anything else is refused.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

fn stop(mut child: std::process::Child) {
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_and_dashboards_elsewhere_check_the_tokens_the_core_published() {
    let Some(postgres) = testkit::PgServer::start().or_else(|| testkit::required("PostgreSQL's server binaries"))
    else {
        return;
    };
    let url = postgres.url();
    let dir = tempfile::tempdir().unwrap();
    let (core_dir, collector_dir, dashboard_dir) =
        (dir.path().join("core"), dir.path().join("c"), dir.path().join("d"));
    let (core, core_addresses) = common::up(&["--database-url", &url], &core_dir);
    let gateway = format!("http://{}", core_addresses["gateway"].as_str().unwrap());
    let any = "127.0.0.1:0";
    let collector_args =
        ["--database-url", &url, "--otlp-grpc-addr", any, "--otlp-http-addr", any, "--jaeger-addr", any];
    let (collector, addresses) = common::serve("collector", &collector_args, &collector_dir);
    let otlp = format!("http://{}/v1/traces", addresses["otlp_http"].as_str().unwrap());
    let (dashboard, addresses) =
        common::serve("dashboard", &["--database-url", &url, "--ui-addr", any], &dashboard_dir);
    let ui = format!("http://{}", addresses["ui"].as_str().unwrap());
    for other in [&collector_dir, &dashboard_dir] {
        assert!(!other.join("sfaas.db").exists() && !other.join("admin.token").exists());
    }

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = std::fs::read_to_string(core_dir.join("admin.token")).unwrap().trim().to_string();
    let meter = std::fs::read_to_string(core_dir.join("meter.token")).unwrap().trim().to_string();
    // Tenants created on the running core, after the collector and the dashboard started.
    let mut tokens = std::collections::HashMap::new();
    for name in ["acme", "globex"] {
        let response = http
            .post(format!("{gateway}/system/tenants"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "creating {name}: {}", response.status());
        let created: Value = response.json().await.unwrap();
        let token = |scope: &str| created[scope].as_str().unwrap().to_string();
        tokens.insert(name, (token("ingest_token"), token("read_token")));
    }
    let send = |token: String, org: Option<&'static str>, seed: u64| {
        let mut request = http
            .post(&otlp)
            .bearer_auth(token)
            .header("content-type", "application/x-protobuf")
            .body(collector::bench::realistic_body(seed, 5));
        if let Some(org) = org {
            request = request.header("x-scope-orgid", org);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let read = |path: &'static str, token: String| {
        let request = http.get(format!("{ui}{path}")).bearer_auth(token);
        async move { request.send().await.unwrap().status().as_u16() }
    };

    // Published within seconds of the tenant's creation (the readers re-read every 2 s).
    let (acme_ingest, acme_read) = tokens["acme"].clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    while send(acme_ingest.clone(), None, 1).await != 200 {
        assert!(Instant::now() < deadline, "the collector never accepted a new tenant's ingest token");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while read("/billing/invoices", acme_read.clone()).await != 200 {
        assert!(Instant::now() < deadline, "the dashboard never accepted a new tenant's read token");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (globex_ingest, globex_read) = tokens["globex"].clone();
    assert_eq!(send(globex_ingest.clone(), None, 2).await, 200);
    assert_eq!(send(meter.clone(), None, 3).await, 200, "the platform's meter token");

    // Each token keeps to its scope and tenant.
    assert_eq!(send(acme_ingest.clone(), Some("globex"), 4).await, 403, "an ingest token naming another tenant");
    for refused in [acme_read.clone(), admin.clone(), "0".repeat(64), String::new()] {
        assert_eq!(send(refused, None, 5).await, 401, "only ingest and meter tokens send telemetry");
    }
    assert_eq!(read("/billing/usage/globex", acme_read.clone()).await, 403, "another tenant's usage");
    assert_eq!(read("/billing/usage/globex", globex_read.clone()).await, 200);
    assert_eq!(read("/billing/usage/globex", admin.clone()).await, 200, "the core's admin token");
    for refused in [globex_ingest, meter, "0".repeat(64)] {
        assert_eq!(read("/billing/invoices", refused).await, 401, "only read and admin tokens read");
    }

    for child in [dashboard, collector, core] {
        stop(child);
    }
}
