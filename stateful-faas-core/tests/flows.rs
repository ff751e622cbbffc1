//! The composition engine through the gateway: every DSL feature, validation, retries and
//! catch, sub-flows, async runs and cancellation, isolation.

use crate::common;

use std::time::Duration;

use common::{COUNT_RUNS, RECORD_RUN, Tenant, TestCore, eventually, running, start};
use serde_json::{Value, json};

async fn deploy_flow(core: &TestCore, tenant: &Tenant, yaml: &str) -> reqwest::Response {
    core.http
        .post(format!("{}/system/flows", core.url))
        .bearer_auth(&tenant.ingest)
        .body(yaml.to_string())
        .send()
        .await
        .unwrap()
}

async fn run(core: &TestCore, tenant: &Tenant, flow: &str, input: &str) -> (u16, String, String) {
    let response = core
        .http
        .post(format!("{}/flow/{flow}", core.url))
        .bearer_auth(&tenant.ingest)
        .body(input.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let run_id = response.headers().get("x-run-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, response.text().await.unwrap(), run_id)
}

type Calls = std::sync::Arc<std::sync::Mutex<Vec<((String, String), String)>>>;

/// Receives flow callbacks: ((X-Run-Id, X-Flow-Status), body).
async fn callback_server() -> (String, Calls) {
    let calls: Calls = Default::default();
    let sink = calls.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let get = |name: &str| headers[name].to_str().unwrap().to_string();
                sink.lock().unwrap().push(((get("x-run-id"), get("x-flow-status")), body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/done", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

async fn setup() -> (TestCore, Tenant) {
    let core = start(common::allow_loopback).await;
    let acme = core.tenant("acme").await;
    for (name, builtin) in
        [("echo", "echo"), ("upper", "uppercase"), ("count", "wordcount"), ("boom", "fail"), ("nap", "sleep")]
    {
        core.deploy(&acme, json!({"service": name, "builtin": builtin})).await;
    }
    (core, acme)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_branches_and_joins_pass_data_between_nodes() {
    let (core, acme) = setup().await;
    let yaml = r#"
name: shout-and-count
nodes:
  first: {function: echo}
  loud: {function: upper, needs: [first]}
  words: {function: count, needs: [first]}
  join: {function: echo, needs: [loud, words]}
"#;
    assert_eq!(deploy_flow(&core, &acme, yaml).await.status(), 201);
    let (status, output, run_id) = run(&core, &acme, "shout-and-count", "hello big world").await;
    assert_eq!(status, 200, "{output}");
    let output: Value = serde_json::from_str(&output).unwrap();
    assert_eq!(output, json!({"loud": "HELLO BIG WORLD", "words": {"words": 3, "bytes": 15}}));

    let (status, record) = core.get_json(&acme.read, &format!("/flow-runs/{run_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["output"], output);
    let nodes = record["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    assert!(nodes.iter().all(|n| n["state"] == "succeeded" && n["attempts"] == 1), "{nodes:?}");
    let loud = nodes.iter().find(|n| n["node"] == "loud").unwrap();
    assert_eq!((loud["output_ref"].as_str(), loud["output_bytes"].as_i64()), (Some("nodes/loud"), Some(15)));
    // Outputs went through the run's job in the state store: it was metered, then released.
    let byte_seconds: f64 = record["state_byte_seconds"].as_str().unwrap().parse().unwrap();
    assert!(byte_seconds > 0.0, "{record}");
    let (_, usage) = core.get_json(&acme.read, "/state/usage").await;
    assert_eq!(usage["bytes"], 0, "the run's job was deregistered");

    // The graph, as text and DOT.
    let text =
        core.http.get(format!("{}/system/flows/shout-and-count?format=text", core.url)).bearer_auth(&acme.read).send();
    let text = text.await.unwrap().text().await.unwrap();
    assert!(text.contains("join <- [loud, words] function echo"), "{text}");
    let dot =
        core.http.get(format!("{}/system/flows/shout-and-count?format=dot", core.url)).bearer_auth(&acme.read).send();
    assert!(dot.await.unwrap().text().await.unwrap().contains("\"first\" -> \"loud\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_choose_branches_and_skips_propagate() {
    let (core, acme) = setup().await;
    let yaml = r#"
name: route
nodes:
  measure: {function: count}
  long: {function: echo, needs: [measure], when: "$.words >= 3"}
  short: {function: upper, needs: [measure], when: "$.words < 3 && $.bytes > 0"}
  after-long: {function: echo, needs: [long]}
  merge: {function: echo, needs: [after-long, short]}
output: merge
"#;
    assert_eq!(deploy_flow(&core, &acme, yaml).await.status(), 201);
    let (status, output, run_id) = run(&core, &acme, "route", "one two three").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&output).unwrap(), json!({"after-long": {"words": 3, "bytes": 13}}));
    let (_, record) = core.get_json(&acme.read, &format!("/flow-runs/{run_id}")).await;
    let state =
        |id: &str| record["nodes"].as_array().unwrap().iter().find(|n| n["node"] == id).unwrap()["state"].clone();
    assert_eq!(state("short"), "skipped");
    assert_eq!(state("long"), "succeeded");

    let (_, output, _) = run(&core, &acme, "route", "hi").await;
    // The uppercased JSON is still JSON, so the join embeds it as such.
    assert_eq!(serde_json::from_str::<Value>(&output).unwrap(), json!({"short": {"WORDS": 1, "BYTES": 2}}));

    // A skip that is the run's last event still reaches the nodes after it, wherever they
    // stand in the flow's order (`after` sorts before `gate`).
    let yaml = "name: gate\nnodes:\n  start: {function: count}\n  gate: {function: echo, needs: [start], when: \"$.words >= 3\"}\n  after: {function: echo, needs: [gate]}\n";
    assert_eq!(deploy_flow(&core, &acme, yaml).await.status(), 201);
    let (status, output, run_id) = run(&core, &acme, "gate", "hi").await;
    assert_eq!((status, output.as_str()), (200, "null"));
    let (_, record) = core.get_json(&acme.read, &format!("/flow-runs/{run_id}")).await;
    let states: Vec<(&str, &str)> = record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap(), n["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&("gate", "skipped")) && states.contains(&("after", "skipped")), "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreach_fans_out_with_a_limit_and_fans_in_in_order() {
    let (core, acme) = setup().await;
    let yaml = r#"
name: fan
nodes:
  each: {function: upper, foreach: "$.items", concurrency: 3}
  total: {function: echo, needs: [each]}
"#;
    assert_eq!(deploy_flow(&core, &acme, yaml).await.status(), 201);
    let items: Vec<String> = (0..20).map(|i| format!("item-{i}")).collect();
    let (status, output, run_id) = run(&core, &acme, "fan", &json!({"items": items}).to_string()).await;
    assert_eq!(status, 200, "{output}");
    let expected: Vec<Value> = items.iter().map(|i| json!(i.to_uppercase())).collect();
    assert_eq!(serde_json::from_str::<Value>(&output).unwrap(), Value::Array(expected));
    // Each element was one invocation of the function.
    let (_, function) = core.get_json(&acme.read, "/system/function/upper").await;
    assert_eq!(function["invocationCount"], 20);
    let (_, record) = core.get_json(&acme.read, &format!("/flow-runs/{run_id}")).await;
    assert_eq!(record["status"], "succeeded");

    let (status, output, _) = run(&core, &acme, "fan", "{\"items\": 3}").await;
    assert_eq!(status, 500);
    assert!(output.contains("node each: foreach $.items: the input has no array there"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_catch_takes_over() {
    let (core, acme) = setup().await;
    // Fails twice, then succeeds.
    let flaky = format!("n=$({COUNT_RUNS}); echo | {RECORD_RUN}; test $n -ge 2 && echo recovered || exit 1");
    core.deploy(&acme, json!({"service": "flaky", "envProcess": flaky})).await;
    let yaml = r#"
name: resilient
nodes:
  try: {function: flaky, retry: {attempts: 4, initial_interval: 10ms, backoff_rate: 2, max_delay: 50ms}}
  risky: {function: boom, needs: [try], retry: {attempts: 2, initial_interval: 10ms}, catch: rescue}
  rescue: {function: echo}
  done: {function: echo, needs: [risky]}
"#;
    assert_eq!(deploy_flow(&core, &acme, yaml).await.status(), 201);
    let (status, output, run_id) = run(&core, &acme, "resilient", "go").await;
    assert_eq!(status, 200, "{output}");
    // The catch node got the failure as input, and its output stood in for the failed node.
    let output: Value = serde_json::from_str(&output).unwrap();
    assert_eq!(output["node"], "risky");
    assert!(output["error"].as_str().unwrap().contains("failing on purpose"), "{output}");
    let (_, record) = core.get_json(&acme.read, &format!("/flow-runs/{run_id}")).await;
    let node = |id: &str| record["nodes"].as_array().unwrap().iter().find(|n| n["node"] == id).unwrap().clone();
    assert_eq!((node("try")["state"].clone(), node("try")["attempts"].clone()), (json!("succeeded"), json!(3)));
    assert_eq!((node("risky")["state"].clone(), node("risky")["attempts"].clone()), (json!("failed"), json!(2)));
    assert_eq!(node("rescue")["state"], "succeeded");
    assert_eq!(node("done")["state"], "succeeded");

    // Without a catch, a failure fails the run and names the node.
    let yaml = "name: fragile\nnodes:\n  a: {function: echo}\n  b: {function: boom, needs: [a]}\n";
    assert_eq!(deploy_flow(&core, &acme, yaml).await.status(), 201);
    let (status, output, _) = run(&core, &acme, "fragile", "x").await;
    assert_eq!(status, 500);
    assert!(output.starts_with("node b: function boom answered 500"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_subflows_async_runs_and_cancellation() {
    let (core, acme) = setup().await;
    assert_eq!(deploy_flow(&core, &acme, "name: inner\nnodes:\n  up: {function: upper}\n").await.status(), 201);
    let outer = "name: outer\nnodes:\n  pre: {function: echo}\n  sub: {flow: inner, needs: [pre]}\n";
    assert_eq!(deploy_flow(&core, &acme, outer).await.status(), 201);
    let (status, output, run_id) = run(&core, &acme, "outer", "nested").await;
    assert_eq!((status, output.as_str()), (200, "NESTED"));
    let (_, runs) = core.get_json(&acme.read, "/flow-runs?flow=inner").await;
    assert_eq!(runs[0]["parent_run"], run_id.as_str(), "the sub-flow ran as a child run");

    let slow = "name: slow\nnodes:\n  wait: {function: nap, timeout: 100ms}\n";
    assert_eq!(deploy_flow(&core, &acme, slow).await.status(), 201);
    let (status, output, _) = run(&core, &acme, "slow", "2000").await;
    assert_eq!(status, 500);
    assert!(output.contains("timed out after 100ms"), "{output}");

    // Async: 202 at once, status and output at /flow-runs/{id}, and a callback at the end.
    let (callback, called) = callback_server().await;
    let response = core
        .http
        .post(format!("{}/async-flow/outer", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Callback-Url", &callback)
        .body("call me")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let called_run = response.headers()["x-run-id"].to_str().unwrap().to_string();
    let (headers, body) = eventually(Duration::from_secs(5), || async { called.lock().unwrap().first().cloned() })
        .await
        .expect("the callback arrives");
    assert_eq!((headers.0.as_str(), headers.1.as_str(), body.as_str()), (called_run.as_str(), "succeeded", "CALL ME"));
    core.deploy(&acme, json!({"service": "hang", "envProcess": "exec sleep 3071"})).await;
    let long = "name: long\nnodes:\n  wait: {function: hang}\n";
    assert_eq!(deploy_flow(&core, &acme, long).await.status(), 201);
    let response = core
        .http
        .post(format!("{}/async-flow/outer", core.url))
        .bearer_auth(&acme.ingest)
        .body("later")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let done = eventually(Duration::from_secs(5), || async {
        let (_, run) = core.get_json(&acme.read, &location).await;
        (run["status"] == "succeeded").then_some(run)
    })
    .await
    .expect("async run finishes");
    assert_eq!(done["output"], "LATER");

    let response = core
        .http
        .post(format!("{}/async-flow/long", core.url))
        .bearer_auth(&acme.ingest)
        .body("30000")
        .send()
        .await
        .unwrap();
    let run_id = response.headers()["x-run-id"].to_str().unwrap().to_string();
    eventually(Duration::from_secs(5), || async { (!running(&["sleep", "3071"]).is_empty()).then_some(()) })
        .await
        .expect("the node runs");
    let cancel =
        core.http.delete(format!("{}/flow-runs/{run_id}", core.url)).bearer_auth(&acme.ingest).send().await.unwrap();
    assert_eq!(cancel.status(), 202);
    let cancelled = eventually(Duration::from_secs(5), || async {
        let (_, run) = core.get_json(&acme.read, &format!("/flow-runs/{run_id}")).await;
        (run["status"] == "cancelled").then_some(run)
    })
    .await
    .expect("the run is cancelled");
    assert_eq!(cancelled["nodes"][0]["state"], "cancelled");
    // The cancelled node's process was killed, not left running.
    let gone =
        eventually(Duration::from_secs(5), || async { running(&["sleep", "3071"]).is_empty().then_some(()) }).await;
    assert!(gone.is_some(), "the cancelled node's process still runs");
    let again =
        core.http.delete(format!("{}/flow-runs/{run_id}", core.url)).bearer_auth(&acme.ingest).send().await.unwrap();
    assert_eq!(again.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_flows_get_located_errors_and_tenants_stay_apart() {
    let (core, acme) = setup().await;
    let response = deploy_flow(
        &core,
        &acme,
        "name: bad\nnodes:\n  a: {function: ghost}\n  b: {function: echo, needs: [a, zzz], when: \"$.x ==\"}\n",
    )
    .await;
    assert_eq!(response.status(), 400);
    let message = response.text().await.unwrap();
    for expected in
        ["node a: function \"ghost\" is not deployed", "node b: needs unknown node \"zzz\"", "node b: when \"$.x ==\""]
    {
        assert!(message.contains(expected), "{expected:?} missing in {message}");
    }
    let cycle = deploy_flow(
        &core,
        &acme,
        "name: loop\nnodes:\n  a: {function: echo, needs: [b]}\n  b: {function: echo, needs: [a]}\n",
    )
    .await;
    assert_eq!(cycle.status(), 400);
    assert!(cycle.text().await.unwrap().contains("cycle: "));
    assert_eq!(deploy_flow(&core, &acme, "not: [yaml").await.status(), 400);

    assert_eq!(deploy_flow(&core, &acme, "name: mine\nnodes:\n  a: {function: echo}\n").await.status(), 201);
    let (_, _, run_id) = run(&core, &acme, "mine", "x").await;
    let globex = core.tenant("globex").await;
    assert_eq!(run(&core, &globex, "mine", "x").await.0, 404);
    assert_eq!(run(&core, &globex, "mine.acme", "x").await.0, 403);
    assert_eq!(core.get_json(&globex.read, &format!("/flow-runs/{run_id}")).await.0, 404);
    assert_eq!(core.get_json(&globex.read, "/flow-runs").await.1, json!([]));
    assert_eq!(core.get_json(&globex.read, "/system/flows").await.1, json!([]));
    assert_eq!(core.get_json(&globex.read, "/system/flows/mine").await.0, 404);
    let cancel =
        core.http.delete(format!("{}/flow-runs/{run_id}", core.url)).bearer_auth(&globex.ingest).send().await.unwrap();
    assert_eq!(cancel.status(), 404);
    // A flow may only use its own tenant's functions.
    let response = deploy_flow(&core, &globex, "name: steal\nnodes:\n  a: {function: echo}\n").await;
    assert_eq!(response.status(), 400);
    assert_eq!(run(&core, &acme, "mine", "x").await.0, 200);
    assert_eq!(
        core.http.post(format!("{}/flow/mine", core.url)).bearer_auth(&acme.read).send().await.unwrap().status(),
        403
    );
}

/// A tenant's flows are bounded (`--tenant-max-flows`): one over it answers 429 naming the
/// quota, a replacement always passes, and other tenants are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_flows_are_bounded_by_its_quota() {
    let core = start(|config| config.max_flows_per_tenant = 1).await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    for tenant in [&acme, &globex] {
        core.deploy(tenant, json!({"service": "echo", "builtin": "echo"})).await;
    }
    let flow = |name: &str| format!("name: {name}\nnodes:\n  a: {{function: echo}}\n");
    assert_eq!(deploy_flow(&core, &acme, &flow("one")).await.status(), 201);
    let over = deploy_flow(&core, &acme, &flow("two")).await;
    assert_eq!(over.status(), 429);
    assert!(over.text().await.unwrap().contains("--tenant-max-flows"));
    assert!(deploy_flow(&core, &acme, &flow("one")).await.status().is_success(), "a replacement passes");
    assert_eq!(deploy_flow(&core, &globex, &flow("two")).await.status(), 201);
}
