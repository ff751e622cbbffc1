//! The state store over HTTP: the API, isolation, quotas, and functions using it (the
//! examples in examples/state, in Python and shell).

use crate::common;

use common::{require_program, start};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_api_follows_pocket_over_http() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let url = |path: &str| format!("{}/state{path}", core.url);
    let http = &core.http;

    let r = http.post(url("/jobs")).bearer_auth(&acme.ingest).json(&json!({"job": "run-1"})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = http.post(url("/jobs")).bearer_auth(&acme.ingest).json(&json!({"job": "run-1"})).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let object = url("/jobs/run-1/buckets/b/objects/k");
    let r = http.put(format!("{object}?persist=true")).bearer_auth(&acme.ingest).body("hello").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r =
        http.put(url("/jobs/run-1/buckets/b/objects/tmp")).bearer_auth(&acme.ingest).body("x").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = http.put(url("/jobs/nope/buckets/b/objects/k")).bearer_auth(&acme.ingest).body("x").send().await.unwrap();
    assert_eq!(r.status(), 404, "puts need a registered job");

    let r = http.get(&object).bearer_auth(&acme.read).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = http.head(&object).bearer_auth(&acme.read).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["content-length"].to_str().unwrap()), (200, "5"));
    assert_eq!(r.headers()["x-sfaas-persist"], "true");
    let (status, listed) = core.get_json(&acme.read, "/state/jobs/run-1/buckets/b").await;
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap()).collect::<Vec<_>>(), ["k", "tmp"]);

    // Read tokens read only.
    assert_eq!(http.put(&object).bearer_auth(&acme.read).body("x").send().await.unwrap().status(), 403);
    assert_eq!(http.delete(&object).bearer_auth(&acme.read).send().await.unwrap().status(), 403);
    let r = http.get(format!("{object}?delete_after_read=true")).bearer_auth(&acme.read).send().await.unwrap();
    assert_eq!(r.status(), 403);

    // delete_after_read, deregistration (persistent objects survive), job-less objects, TTL syntax.
    let r = http.get(url("/jobs/run-1/buckets/b/objects/tmp?delete_after_read=true")).bearer_auth(&acme.ingest).send();
    assert_eq!(r.await.unwrap().text().await.unwrap(), "x");
    assert_eq!(core.get_json(&acme.read, "/state/jobs/run-1/buckets/b/objects/tmp").await.0, 404);
    let r = http.delete(url("/jobs/run-1")).bearer_auth(&acme.ingest).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ended: serde_json::Value = r.json().await.unwrap();
    assert!(ended["byte_seconds"].as_str().unwrap().contains('.'), "exact decimal byte-seconds: {ended}");
    assert_eq!(http.get(&object).bearer_auth(&acme.read).send().await.unwrap().text().await.unwrap(), "hello");
    let r =
        http.put(url("/buckets/tables/objects/t?ttl=1h")).bearer_auth(&acme.ingest).body("table").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r =
        http.put(url("/buckets/tables/objects/t?ttl=soon")).bearer_auth(&acme.ingest).body("x").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let (_, usage) = core.get_json(&acme.read, "/state/usage").await;
    assert_eq!(usage["bytes"], 10);
    // Each object holds its value, its address and 128 B: run-1/b/k 5 + 7 + 128, tables/t 5 + 7 + 128.
    assert_eq!(usage["held"], 280);

    // Another tenant sees none of it, at the same paths.
    let globex = core.tenant("globex").await;
    assert_eq!(http.get(&object).bearer_auth(&globex.ingest).send().await.unwrap().status(), 404);
    assert_eq!(
        http.head(url("/buckets/tables/objects/t")).bearer_auth(&globex.read).send().await.unwrap().status(),
        404
    );
    let (_, listed) = core.get_json(&globex.read, "/state/buckets/tables").await;
    assert_eq!(listed, json!([]));
    let (_, usage) = core.get_json(&globex.read, "/state/usage").await;
    assert_eq!(usage["bytes"], 0);
    assert_eq!(http.get(url("/usage")).send().await.unwrap().status(), 401);

    // The state gauges and byte-second counters, per namespace.
    let metrics = http.get(format!("{}/metrics", core.url)).bearer_auth(common::ADMIN).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.lines().any(|l| l == r#"sfaas_state_bytes{namespace="acme"} 280"#), "{metrics}");
    assert!(metrics.contains(r#"sfaas_state_byte_seconds_total{namespace="acme"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_answer_507_and_keep_what_is_stored() {
    let core = start(|config| {
        config.state.tenant_quota_bytes = 1000;
        config.state.max_value_bytes = 600;
    })
    .await;
    let acme = core.tenant("acme").await;
    let put = |key: &str, size: usize| {
        core.http
            .put(format!("{}/state/buckets/b/objects/{key}", core.url))
            .bearer_auth(&acme.ingest)
            .body(vec![b'x'; size])
            .send()
    };
    assert_eq!(put("a", 600).await.unwrap().status(), 201);
    let over = put("b", 500).await.unwrap();
    assert_eq!(over.status(), 507);
    assert!(over.text().await.unwrap().contains("quota"));
    assert_eq!(put("c", 601).await.unwrap().status(), 413);
    let (_, usage) = core.get_json(&acme.read, "/state/usage").await;
    assert_eq!(usage["bytes"], 600, "the refused puts evicted nothing");
    // Held: the value, the address ("b", "a") and 128 bytes.
    assert_eq!(usage["held"], 600 + 2 + 128);

    // A declared size over the quota is refused before the body is read: the answer comes
    // while the client has sent the headers only.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(core.url.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "PUT /state/buckets/b/objects/d HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 500\r\n\r\n",
        acme.ingest
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), socket.read(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer[..read.expect("answered without the body").unwrap()]).to_string();
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(answer.contains("--state-tenant-quota-bytes"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_use_the_state_store_with_their_own_short_lived_token() {
    let (Some(_), Some(_)) = (require_program("python3"), require_program("curl")) else {
        return;
    };
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/state");
    let workdir = examples.canonicalize().unwrap().display().to_string();
    core.deploy(&acme, json!({"service": "counter", "envProcess": "python3 counter.py", "workdir": workdir})).await;
    core.deploy(&acme, json!({"service": "stash", "envProcess": "sh stash.sh", "workdir": workdir})).await;
    core.deploy(&acme, json!({"service": "leak", "envProcess": "printf %s \"$SFAAS_STATE_TOKEN\""})).await;

    for expected in 1..=3 {
        let response = core.invoke(&acme.ingest, "counter", "visits").await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["count"], expected);
    }
    let r = core.http.get(format!("{}/state/buckets/counters/objects/visits", core.url)).bearer_auth(&acme.read).send();
    assert_eq!(r.await.unwrap().text().await.unwrap(), "3");

    let response = core
        .http
        .post(format!("{}/function/stash", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Call-Id", "stash-1")
        .body(vec![b'z'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, json!({"key": "stash-1", "stored_bytes": 4096}));

    // A function's token is revoked when its invocation ends, and never reaches beyond state.
    let token = core.invoke(&acme.ingest, "leak", "").await.text().await.unwrap();
    assert_eq!(token.len(), 64);
    let r = core.http.get(format!("{}/state/usage", core.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 401, "the token outlived its invocation");

    // While it runs, a function's token cannot manage jobs, reach other jobs, or leave /state.
    let probe = "for p in 'POST /state/jobs' 'GET /state/jobs/other/buckets/b' 'GET /system/functions'; do \
                 set -- $p; curl -s -o /dev/null -w '%{http_code} ' -X $1 -H \"Authorization: Bearer $SFAAS_STATE_TOKEN\" \
                 -H 'Content-Type: application/json' -d '{\"job\":\"x\"}' \"${SFAAS_STATE_URL%/state}$2\"; done";
    core.deploy(&acme, json!({"service": "probe", "envProcess": probe})).await;
    let codes = core.invoke(&acme.ingest, "probe", "").await.text().await.unwrap();
    // (In the sandbox the state store is all that listens on its network: /system is not there.)
    assert_eq!(codes.trim(), "403 403 404");
}

/// A state PUT is refused before its body is read when the token may not write there or the
/// declared size is over the largest value (issue 21: bodies were buffered whole first). Each
/// request declares a large body and sends a few bytes: the answer comes without the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_puts_are_refused_before_their_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let core = start(|config| config.state.max_value_bytes = 64 << 20).await;
    let acme = core.tenant("acme").await;
    let address = core.url.trim_start_matches("http://").to_string();
    for (token, size, expected) in [(&acme.read, 32 << 20, "403"), (&acme.ingest, 100 << 20, "413")] {
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        let head = format!(
            "PUT /state/buckets/b/objects/k HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {size}\r\n\r\nfirst bytes"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut response = vec![0u8; 1024];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut response))
            .await
            .expect("answered without the body")
            .unwrap();
        let status_line = String::from_utf8_lossy(&response[..read]).lines().next().unwrap_or_default().to_string();
        assert!(status_line.contains(expected), "{expected}: {status_line}");
    }
}
