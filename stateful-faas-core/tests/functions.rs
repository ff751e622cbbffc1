//! Each function kind and each limit, through the real gateway.

use crate::common;

use std::time::Duration;

use common::{eventually, require_program, running, start};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_functions_follow_the_watchdog_model() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "wc", "envProcess": "wc -c"})).await;
    core.deploy(&acme, json!({"service": "env", "envProcess": "env", "envVars": {"GREETING": "hi"}})).await;
    core.deploy(&acme, json!({"service": "fails", "envProcess": "echo secret-detail >&2; exit 3"})).await;

    let response = core.invoke(&acme.ingest, "wc", "hello world\n").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap().trim(), "12");

    let response = core
        .http
        .post(format!("{}/function/env/some/path?x=1", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Call-Id", "call-123")
        .header("X-Custom-Thing", "abc")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-call-id"], "call-123");
    let env = response.text().await.unwrap();
    for expected in [
        "Http_X_Call_Id=call-123",
        "Http_Method=POST",
        "Http_Path=/some/path",
        "Http_Query=x=1",
        "Http_X_Custom_Thing=abc",
        "GREETING=hi",
    ] {
        assert!(env.lines().any(|line| line == expected), "{expected} missing in:\n{env}");
    }
    // The caller's credentials and the gateway's own secrets never reach a function.
    assert!(!env.contains(&acme.ingest), "token leaked into the function's environment");
    assert!(!env.contains("Http_Authorization"));

    let response = core.invoke(&acme.ingest, "fails", "").await;
    assert_eq!(response.status(), 500);
    let body = response.text().await.unwrap();
    assert!(body.contains("exited with status 3"), "{body}");
    assert!(!body.contains("secret-detail"), "stderr must stay in the log: {body}");

    // A call id is created when the caller sends none.
    let response = core.invoke(&acme.ingest, "wc", "").await;
    assert!(!response.headers()["x-call-id"].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_kills_the_whole_process_group() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let command = "sleep 3061 & wait";
    core.deploy(&acme, json!({"service": "slow", "envProcess": command, "envVars": {"exec_timeout": "300ms"}})).await;

    let response = core.invoke(&acme.ingest, "slow", "").await;
    assert_eq!(response.status(), 504);
    assert!(response.text().await.unwrap().contains("timed out"));
    let gone =
        eventually(Duration::from_secs(5), || async { running(&["sleep", "3061"]).is_empty().then_some(()) }).await;
    assert!(gone.is_some(), "the background child of a timed-out function is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_inflight_answers_429_beyond_the_limit() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "nap", "builtin": "sleep", "envVars": {"max_inflight": "1"}})).await;
    let first = core.invoke(&acme.ingest, "nap", "1000");
    let second = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        core.invoke(&acme.ingest, "nap", "1").await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 429);
    assert!(second.text().await.unwrap().contains("max_inflight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_stops_a_greedy_process() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let greedy = "python3 -c 'x = bytearray(300 * 1024 * 1024); print(len(x))'";
    core.deploy(&acme, json!({"service": "limited", "envProcess": greedy, "limits": {"memory": "128Mi"}})).await;
    core.deploy(&acme, json!({"service": "unlimited", "envProcess": greedy})).await;
    let response = core.invoke(&acme.ingest, "limited", "").await;
    assert_eq!(response.status(), 500);
    let body = response.text().await.unwrap();
    assert!(body.contains("ran out of memory: its limit is 134217728 bytes"), "{body}");
    let response = core.invoke(&acme.ingest, "unlimited", "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap().trim(), (300 * 1024 * 1024).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_functions_run_in_process() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "up", "builtin": "uppercase"})).await;
    core.deploy(&acme, json!({"service": "bad", "builtin": "fail"})).await;
    let response = core.invoke(&acme.ingest, "up", "shout").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "SHOUT");
    assert_eq!(core.invoke(&acme.ingest, "bad", "").await.status(), 500);
}

const PYTHON_SERVER: &str = r#"
import http.server, os, sys, uuid
INSTANCE = uuid.uuid4().hex  # its pid is 1 in its own pid namespace: this tells instances apart
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = ("instance=%s path=%s tp=%s body=%s" % (INSTANCE, self.path, self.headers.get("traceparent"), body.decode())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_http_functions_cold_start_and_scale_to_zero() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    std::fs::write(core.functions_dir().join("server.py"), PYTHON_SERVER).unwrap();
    core.deploy(
        &acme,
        json!({
            "service": "srv", "kind": "http", "envProcess": "python3 server.py",
            "workdir": core.functions_dir().display().to_string(),
            "labels": {"com.openfaas.scale.zero-duration": "1s", "com.openfaas.scale.max": "1"},
        }),
    )
    .await;
    let (_, status) = core.get_json(&acme.read, "/system/function/srv").await;
    assert_eq!(status["replicas"], 0, "scaled to zero before the first call");

    let first = core.invoke(&acme.ingest, "srv/a/b?q=1", "one").await;
    assert_eq!(first.status(), 200);
    let first = first.text().await.unwrap();
    assert!(first.contains("path=/a/b?q=1") && first.contains("body=one"), "{first}");
    assert!(first.contains("tp=None"), "no traceparent invented when tracing is off: {first}");
    let second = core.invoke(&acme.ingest, "srv", "two").await.text().await.unwrap();
    let pid = |text: &str| text.split_whitespace().next().unwrap().to_string();
    assert_eq!(pid(&first), pid(&second), "the warm instance serves the next call");
    let (_, status) = core.get_json(&acme.read, "/system/function/srv").await;
    assert_eq!(status["replicas"], 1);

    let scaled_down = eventually(Duration::from_secs(10), || async {
        let (_, status) = core.get_json(&acme.read, "/system/function/srv").await;
        (status["replicas"] == 0).then_some(())
    })
    .await;
    assert!(scaled_down.is_some(), "idle instance was not stopped after its idle timeout");
    let third = core.invoke(&acme.ingest, "srv", "three").await.text().await.unwrap();
    assert_ne!(pid(&first), pid(&third), "a new instance starts after scale to zero");

    // Both starts were counted as cold starts, and the servers' CPU time was measured.
    let metrics = core.http.get(format!("{}/metrics", core.url)).bearer_auth(common::ADMIN).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"sfaas_function_cold_starts_total{function_name="srv.acme",namespace="acme"} 2"#),
        "{metrics}"
    );
    let cpu_line = metrics
        .lines()
        .find(|l| l.starts_with(r#"sfaas_function_cpu_seconds_total{function_name="srv.acme""#))
        .unwrap();
    assert!(cpu_line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > 0.0, "{cpu_line}");

    // Explicit scaling keeps instances warm.
    let response = core
        .http
        .post(format!("{}/system/scale-function/srv", core.url))
        .bearer_auth(&acme.ingest)
        .json(&json!({"serviceName": "srv", "replicas": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_runs_at_most_its_quota_of_managed_instances() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|config| config.max_instances_per_tenant = 2).await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    std::fs::write(core.functions_dir().join("server.py"), PYTHON_SERVER).unwrap();
    let server = |name: &str| {
        json!({
            "service": name, "kind": "http", "envProcess": "python3 server.py",
            "workdir": core.functions_dir().display().to_string(),
            "labels": {"com.openfaas.scale.zero-duration": "1s", "com.openfaas.scale.max": "2"},
        })
    };
    for tenant in [&acme, &globex] {
        core.deploy(tenant, server("one")).await;
        core.deploy(tenant, server("two")).await;
    }
    let scale = |token: &str, name: &str, replicas: u32| {
        core.http
            .post(format!("{}/system/scale-function/{name}", core.url))
            .bearer_auth(token)
            .json(&json!({"serviceName": name, "replicas": replicas}))
            .send()
    };
    assert_eq!(scale(&acme.ingest, "one", 2).await.unwrap().status(), 202);
    // Both of acme's instances run for "one": "two" cannot start one, whatever its own limit.
    let refused = core.invoke(&acme.ingest, "two", "x").await;
    assert_eq!(refused.status(), 429);
    let message = refused.text().await.unwrap();
    assert!(message.contains("--tenant-max-instances"), "{message}");
    // Another tenant's quota is its own.
    assert_eq!(core.invoke(&globex.ingest, "two", "x").await.status(), 200);
    // When acme's instances stop, "two" starts.
    assert_eq!(scale(&acme.ingest, "one", 0).await.unwrap().status(), 202);
    let started = eventually(Duration::from_secs(15), || async {
        (core.invoke(&acme.ingest, "two", "x").await.status() == 200).then_some(())
    })
    .await;
    assert!(started.is_some(), "an instance slot was not given back when its instance stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_functions_proxy_to_an_external_upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    // `/endless` streams 1 MiB chunks without a length for as long as it is read.
    let endless = || async {
        let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
        let chunks = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
        axum::body::Body::from_stream(chunks)
    };
    let app = axum::Router::new().route("/endless", axum::routing::get(endless)).fallback(
        |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| async move {
            let auth = headers.get("authorization").is_some();
            (axum::http::StatusCode::CREATED, format!("{uri} {body} auth={auth}"))
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // By default a tenant's upstream may not be an internal address: the platform's own
    // collector, dashboard and state store listen there (issue 21: a tenant read the
    // collector's /metrics through an upstream function).
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    for (name, url) in [("ip", format!("http://{upstream}")), ("name", format!("http://localhost:{}", upstream.port()))]
    {
        core.deploy(&acme, json!({"service": name, "kind": "http", "upstream": url})).await;
        let response = core.invoke(&acme.ingest, &format!("{name}/x"), "payload").await;
        assert_eq!(response.status(), 502, "{url}");
        let body = response.text().await.unwrap();
        assert!(body.contains("refused: an internal address"), "{url}: {body}");
    }
    let core = start(common::allow_loopback).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "ext", "kind": "http", "upstream": format!("http://{upstream}")})).await;
    let response = core.invoke(&acme.ingest, "ext/x?y=2", "payload").await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.text().await.unwrap(), "/x?y=2 payload auth=false");
    // An upstream that never stops answering is cut off at the response limit, long before
    // the function's timeout (it was read whole until the timeout, in the gateway's memory).
    let endless = json!({"service": "endless", "kind": "http", "upstream": format!("http://{upstream}"),
                         "envVars": {"exec_timeout": "600s"}});
    core.deploy(&acme, endless).await;
    let response = core.http.get(format!("{}/function/endless/endless", core.url)).bearer_auth(&acme.ingest).send();
    let response = tokio::time::timeout(Duration::from_secs(120), response).await.expect("cut off").unwrap();
    assert_eq!(response.status(), 502);
    assert!(response.text().await.unwrap().contains("larger than"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let core = start(|config| config.max_body_bytes = 1024).await;
    let acme = core.tenant("acme").await;
    let deploy = |body: serde_json::Value| {
        core.http.post(format!("{}/system/functions", core.url)).bearer_auth(&acme.ingest).json(&body).send()
    };
    let response = deploy(json!({"service": "Bad_Name", "builtin": "echo"})).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("Bad_Name"));
    let response = deploy(json!({"service": "x", "builtin": "no-such"})).await.unwrap();
    assert_eq!(response.status(), 400);
    let response =
        deploy(json!({"service": "x", "envProcess": "true", "envVars": {"exec_timeout": "soon"}})).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("exec_timeout"));

    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    let conflict = deploy(json!({"service": "echo", "builtin": "echo"})).await.unwrap();
    assert_eq!(conflict.status(), 409);
    assert_eq!(core.invoke(&acme.ingest, "echo", vec![b'x'; 2048]).await.status(), 413);
    assert_eq!(core.invoke(&acme.ingest, "echo", vec![b'x'; 512]).await.status(), 200);
    assert_eq!(core.invoke(&acme.ingest, "Nope!", "").await.status(), 400);
    assert_eq!(core.invoke(&acme.ingest, "missing", "").await.status(), 404);

    // A deployment is kept in memory and becomes a process's environment: at most 256 KiB.
    let huge = deploy(json!({"service": "env", "envProcess": "true", "envVars": {"BIG": "x".repeat(300 << 10)}}));
    let huge = huge.await.unwrap();
    assert_eq!(huge.status(), 413);
    assert!(huge.text().await.unwrap().contains("262144"));
}

/// Limits out of their bounds are refused at deploy with the field named (issue 21: a huge
/// `max_inflight` panicked the handler after the row was stored, and every start after it),
/// and a stored deployment that no longer validates is skipped at start, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_bounds_limits_are_refused_and_a_bad_stored_row_does_not_stop_a_start() {
    let mut core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let huge = "18446744073709551615";
    for (deployment, field) in [
        (json!({"envVars": {"max_inflight": huge}}), "max_inflight"),
        (json!({"envVars": {"max_inflight": "0"}}), "max_inflight"),
        (json!({"envVars": {"exec_timeout": "99999999999999999999999h"}}), "exec_timeout"),
        (json!({"envVars": {"exec_timeout": huge}}), "exec_timeout"),
        (json!({"labels": {"com.openfaas.scale.max": huge}}), "com.openfaas.scale.max"),
        (json!({"labels": {"com.openfaas.scale.zero-duration": "9999999h"}}), "com.openfaas.scale.zero-duration"),
        (json!({"limits": {"memory": "17179869184Gi"}}), "limits.memory"),
    ] {
        let mut body = json!({"service": "f", "envProcess": "cat"});
        for (key, value) in deployment.as_object().unwrap() {
            body[key] = value.clone();
        }
        let response = core.send_deployment(reqwest::Method::POST, &acme, body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let text = response.text().await.unwrap();
        assert!(text.contains(field), "{field}: {text}");
    }
    core.deploy(&acme, json!({"service": "good", "envProcess": "cat"})).await;
    core.stop().await;

    // A row written by an older version, or by hand, with a limit no longer allowed.
    let url = format!("sqlite://{}", core.dir.path().join("sfaas.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let bad = json!({"service": "bad", "envProcess": "cat", "envVars": {"max_inflight": huge}});
    sqlx::query("INSERT INTO functions (tenant, name, spec, created_ms, updated_ms) VALUES ('acme', 'bad', ?, 0, 0)")
        .bind(bad.to_string())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut config = stateful_faas_core::CoreConfig::new(core.dir.path());
    config.gateway_addr = "127.0.0.1:0".parse().unwrap();
    config.state_redis_addr = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token = Some(common::ADMIN.to_string());
    let running = stateful_faas_core::Core::open(config).await.unwrap().start().await.unwrap();
    let url = format!("http://{}", running.gateway_addr);
    let invoke =
        |name: &str| core.http.post(format!("{url}/function/{name}")).bearer_auth(&acme.ingest).body("x").send();
    assert_eq!(invoke("good").await.unwrap().status(), 200, "the start survived the bad row");
    assert_eq!(invoke("bad").await.unwrap().status(), 404);
    running.shutdown().await;
}

/// A tenant's functions are capped (issue 21: nothing capped them): over the quota, a deploy
/// answers 429 naming it; updates and other tenants are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_per_tenant_are_capped_by_a_quota() {
    let core = start(|config| config.max_functions_per_tenant = 3).await;
    let acme = core.tenant("acme").await;
    let globex = core.tenant("globex").await;
    for name in ["a", "b", "c"] {
        core.deploy(&acme, json!({"service": name, "envProcess": "cat"})).await;
    }
    let send = |method: reqwest::Method, name: &str| {
        core.send_deployment(method, &acme, json!({"service": name, "envProcess": "wc -c"}))
    };
    let response = send(reqwest::Method::POST, "d").await;
    assert_eq!(response.status(), 429);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("namespace acme has 3 functions, its quota") && body.contains("--tenant-max-functions"),
        "{body}"
    );
    assert_eq!(send(reqwest::Method::PUT, "a").await.status(), 200, "an update is not a new function");
    core.deploy(&globex, json!({"service": "d", "envProcess": "cat"})).await;
}
