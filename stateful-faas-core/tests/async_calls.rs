//! The durable async queue: callbacks, de-duplication, retries with backoff, dead letters.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{COUNT_RUNS, RECORD_RUN, allow_loopback, eventually, start};
use serde_json::json;

/// A callback receiver: records (X-Call-Id, X-Function-Status, body).
async fn callback_server() -> (String, Arc<Mutex<Vec<(String, String, String)>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let header =
                    |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                sink.lock().unwrap().push((header("x-call-id"), header("x-function-status"), body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/done", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_are_delivered_once_per_call_id_with_callbacks() {
    let core = start(allow_loopback).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "count", "envProcess": format!("{RECORD_RUN}; echo done")})).await;
    let (callback, received) = callback_server().await;

    let send = |call_id: &'static str, body: &'static str| {
        core.http
            .post(format!("{}/async-function/count", core.url))
            .bearer_auth(&acme.ingest)
            .header("X-Call-Id", call_id)
            .header("X-Callback-Url", &callback)
            .body(body)
            .send()
    };
    let first = send("job-1", "a").await.unwrap();
    assert_eq!(first.status(), 202);
    assert_eq!(first.headers()["x-call-id"], "job-1");
    assert_eq!(send("job-1", "a").await.unwrap().status(), 202, "a duplicate is accepted but not queued again");
    assert_eq!(send("job-2", "b").await.unwrap().status(), 202);

    let both = eventually(Duration::from_secs(10), || async {
        let got = received.lock().unwrap().clone();
        (got.len() >= 2).then_some(got)
    })
    .await
    .expect("both callbacks arrive");
    let mut ids: Vec<_> =
        both.iter().map(|(id, status, body)| (id.clone(), status.clone(), body.trim().to_string())).collect();
    ids.sort();
    assert_eq!(ids, vec![("job-1".into(), "200".into(), "done".into()), ("job-2".into(), "200".into(), "done".into())]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(core.runs(&acme).await, 2, "job-1 ran once despite being sent twice");

    let (status, call) = core.get_json(&acme.read, "/system/async-calls/job-1").await;
    assert_eq!(status, 200);
    assert_eq!(call["state"], "done");
    assert_eq!(call["attempts"], 1);

    // Bad callback URLs and unknown functions are refused before anything is queued.
    let r = core
        .http
        .post(format!("{}/async-function/count", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Callback-Url", "file:///etc/passwd")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r =
        core.http.post(format!("{}/async-function/ghost", core.url)).bearer_auth(&acme.ingest).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_calls_are_retried_then_dead_lettered() {
    let (endpoint, exported) = common::otlp::grpc_receiver().await;
    let mut core = start(|config| {
        allow_loopback(config);
        config.async_queue.max_attempts = 3;
        common::otlp::export_to(config, endpoint);
    })
    .await;
    let acme = core.tenant("acme").await;
    // Fails twice, then succeeds.
    let flaky = format!("n=$({COUNT_RUNS}); echo | {RECORD_RUN}; test $n -ge 2 && echo recovered || exit 1");
    core.deploy(&acme, json!({"service": "flaky", "envProcess": flaky})).await;
    core.deploy(&acme, json!({"service": "broken", "builtin": "fail"})).await;
    let (callback, received) = callback_server().await;
    for (function, id) in [("flaky", "f-1"), ("broken", "b-1")] {
        let r = core
            .http
            .post(format!("{}/async-function/{function}", core.url))
            .bearer_auth(&acme.ingest)
            .header("X-Call-Id", id)
            .header("X-Callback-Url", &callback)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let done = eventually(Duration::from_secs(15), || async {
        let got = received.lock().unwrap().clone();
        (got.len() >= 2).then_some(got)
    })
    .await
    .expect("both calls end with a callback");
    let status_of = |id: &str| done.iter().find(|(call, _, _)| call == id).map(|(_, status, _)| status.clone());
    assert_eq!(status_of("f-1").as_deref(), Some("200"));
    assert_eq!(status_of("b-1").as_deref(), Some("500"));

    let (_, flaky_call) = core.get_json(&acme.read, "/system/async-calls/f-1").await;
    assert_eq!(flaky_call["state"], "done");
    assert_eq!(flaky_call["attempts"], 3);
    let (status, dead) = core.get_json(&acme.read, "/system/async-dead-letters").await;
    assert_eq!(status, 200);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["call_id"], "b-1");
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["last_status"], 500);
    assert!(dead[0]["last_error"].as_str().unwrap().contains("failing on purpose"));

    // Every attempt ran, and is billed: each its own execution id, all with the call's id.
    core.stop().await;
    let spans = common::otlp::spans(&exported.requests.lock().unwrap());
    for (call, function) in [("f-1", "flaky"), ("b-1", "broken")] {
        let attempts: std::collections::BTreeSet<_> = spans
            .iter()
            .filter(|(_, _, s)| common::otlp::string_attr(&s.attributes, "sfaas.call_id").as_deref() == Some(call))
            .map(|(_, _, s)| {
                assert_eq!(s.name, format!("invoke {function}"));
                common::otlp::string_attr(&s.attributes, "faas.invocation_id").unwrap()
            })
            .collect();
        assert_eq!(attempts.len(), 3, "{call}: three attempts, three executions");
    }
}

/// A tenant's callback URL may not point at an internal address unless the operator allows it:
/// the call runs, its callback is not sent (issue 21: callbacks made the core call any URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_to_internal_addresses_are_not_sent() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "mark", "envProcess": format!("echo ran | {RECORD_RUN}")})).await;
    let (callback, received) = callback_server().await;
    let response = core
        .http
        .post(format!("{}/async-function/mark", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Callback-Url", &callback)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    eventually(Duration::from_secs(10), || async { (core.runs(&acme).await > 0).then_some(()) })
        .await
        .expect("the call runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(received.lock().unwrap().is_empty(), "a callback reached loopback");
}

/// One tenant's backlog of slow calls cannot hold every worker: it gets half of them at most,
/// and another tenant's call is delivered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_backlog_does_not_hold_every_worker() {
    let core = start(|config| config.async_queue.workers = 4).await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    core.deploy(&acme, json!({"service": "slow", "builtin": "sleep"})).await;
    core.deploy(&globex, json!({"service": "quick", "builtin": "echo"})).await;
    let send = |tenant: &common::Tenant, function: &str, call_id: String, body: &'static str| {
        core.http
            .post(format!("{}/async-function/{function}", core.url))
            .bearer_auth(&tenant.ingest)
            .header("X-Call-Id", call_id)
            .body(body)
            .send()
    };
    for i in 0..6 {
        assert_eq!(send(&acme, "slow", format!("slow-{i}"), "1500").await.unwrap().status(), 202);
    }
    assert_eq!(send(&globex, "quick", "quick-1".into(), "hi").await.unwrap().status(), 202);
    let state = |tenant: &common::Tenant, call_id: String| {
        let (http, url, token) = (core.http.clone(), core.url.clone(), tenant.read.clone());
        async move {
            let call: serde_json::Value = http
                .get(format!("{url}/system/async-calls/{call_id}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            call["state"].as_str().unwrap_or_default().to_string()
        }
    };
    let most_running = std::sync::atomic::AtomicUsize::new(0);
    let done = eventually(Duration::from_secs(10), || async {
        let mut states = Vec::new();
        for i in 0..6 {
            states.push(state(&acme, format!("slow-{i}")).await);
        }
        let running = states.iter().filter(|s| *s == "running").count();
        most_running.fetch_max(running, std::sync::atomic::Ordering::Relaxed);
        (state(&globex, "quick-1".into()).await == "done").then_some(states)
    })
    .await
    .expect("the other tenant's call is delivered");
    assert!(done.iter().all(|s| s != "done"), "it waited for the backlog: {done:?}");
    let most_running = most_running.into_inner();
    assert!(most_running <= 2, "{most_running} of the backlog ran at once on 4 workers");
}

/// A tenant's async backlog is bounded in calls and in body bytes: over either quota a call is
/// refused with 429 naming it, nothing is stored, and other tenants are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_async_backlog_is_bounded_by_its_quotas() {
    let core = start(|config| {
        config.async_queue.workers = 1;
        config.async_queue.max_calls_per_tenant = 2;
        config.async_queue.max_bytes_per_tenant = 1000;
    })
    .await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    for tenant in [&acme, &globex] {
        core.deploy(tenant, json!({"service": "nap", "builtin": "sleep"})).await;
    }
    let send = |tenant: &common::Tenant, body: String| {
        core.http.post(format!("{}/async-function/nap", core.url)).bearer_auth(&tenant.ingest).body(body).send()
    };
    // One runs (for 3 s), one waits: the third is one call too many.
    for _ in 0..2 {
        assert_eq!(send(&acme, "3000".into()).await.unwrap().status(), 202);
    }
    let over = core
        .http
        .post(format!("{}/async-function/nap", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Call-Id", "over-1")
        .body("10")
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 429);
    let message = over.text().await.unwrap();
    assert!(message.contains("--tenant-max-async-calls"), "{message}");
    // Another tenant's bodies count for it alone: a body over its byte quota is refused, a
    // small one taken.
    let big = send(&globex, "1".repeat(1001)).await.unwrap();
    assert_eq!(big.status(), 429);
    assert!(big.text().await.unwrap().contains("bytes of requests"));
    // Headers are stored with the call, and count as its body does.
    let padded = core
        .http
        .post(format!("{}/async-function/nap", core.url))
        .bearer_auth(&globex.ingest)
        .header("X-Pad", "p".repeat(1000))
        .body("10")
        .send()
        .await
        .unwrap();
    assert_eq!(padded.status(), 429);
    assert_eq!(send(&globex, "10".into()).await.unwrap().status(), 202);
    let (status, _) = core.get_json(&acme.read, "/system/async-calls/over-1").await;
    assert_eq!(status, 404, "nothing of the refused call was stored");
}

/// Finished calls are kept for their retention (their state can be read, their id
/// de-duplicates), then deleted: a tenant's stream of cheap calls does not grow the database
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_calls_are_deleted_after_their_retention() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    let send = |id: &'static str| {
        let request = core.http.post(format!("{}/async-function/echo", core.url)).bearer_auth(&acme.ingest);
        request.header("X-Call-Id", id).body("hello").send()
    };
    assert_eq!(send("first").await.unwrap().status(), 202);
    let done = eventually(Duration::from_secs(10), || async {
        let (_, call) = core.get_json(&acme.read, "/system/async-calls/first").await;
        (call["state"] == "done").then_some(())
    })
    .await;
    assert!(done.is_some(), "the call finished");
    let queue = core.running.as_ref().unwrap().core.queue.clone();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert_eq!(queue.prune(now).await.unwrap(), 0, "kept within its retention");
    assert_eq!(send("first").await.unwrap().status(), 202);
    let (_, call) = core.get_json(&acme.read, "/system/async-calls/first").await;
    assert_eq!(call["state"], "done", "the same id is not queued again");
    let later = now + stateful_faas_core::async_queue::FINISHED_RETENTION.as_millis() as i64 + 1;
    assert_eq!(queue.prune(later).await.unwrap(), 1);
    let (status, _) = core.get_json(&acme.read, "/system/async-calls/first").await;
    assert_eq!(status, 404, "deleted after its retention");
}

/// Callbacks are posted beside the workers: two tenants whose callback URLs never answer (each
/// post waits up to half a minute) do not hold the workers from a third tenant's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_that_never_answer_do_not_hold_the_workers() {
    let core = start(|config| {
        allow_loopback(config);
        config.async_queue.workers = 4;
    })
    .await;
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", hanging.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            held.push(socket);
        }
    });
    let tenants = [core.tenant("acme").await, core.tenant("globex").await, core.tenant("initech").await];
    for tenant in &tenants {
        core.deploy(tenant, json!({"service": "echo", "builtin": "echo"})).await;
    }
    let send = |tenant: &common::Tenant, call_id: String, callback: Option<&str>| {
        let mut request = core
            .http
            .post(format!("{}/async-function/echo", core.url))
            .bearer_auth(&tenant.ingest)
            .header("X-Call-Id", call_id)
            .body("hi");
        if let Some(callback) = callback {
            request = request.header("X-Callback-Url", callback);
        }
        request.send()
    };
    for (t, tenant) in tenants[..2].iter().enumerate() {
        for i in 0..4 {
            assert_eq!(send(tenant, format!("hang-{t}-{i}"), Some(&url)).await.unwrap().status(), 202);
        }
    }
    // Let the workers take those calls and start posting their callbacks.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(send(&tenants[2], "quick".into(), None).await.unwrap().status(), 202);
    let done = eventually(Duration::from_secs(10), || async {
        let (_, call) = core.get_json(&tenants[2].read, "/system/async-calls/quick").await;
        (call["state"] == "done").then_some(())
    })
    .await;
    assert!(done.is_some(), "the third tenant's call waited for the others' callbacks");
}
