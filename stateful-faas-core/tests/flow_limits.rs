//! Hostile flows and streams: definitions that would exhaust the gateway's stack or CPU, and
//! streams that would fill its memory or disk, are refused or bounded.

use crate::common;

use common::{Tenant, TestCore, start};
use serde_json::json;
use stateful_faas_core::flow::definition::{MAX_EXPRESSION_BYTES, MAX_NODES};

async fn setup() -> (TestCore, Tenant) {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    (core, acme)
}

async fn deploy_flow(core: &TestCore, tenant: &Tenant, yaml: String) -> (u16, String) {
    let response = core
        .http
        .post(format!("{}/system/flows", core.url))
        .bearer_auth(&tenant.ingest)
        .body(yaml)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// `n0 needs n1, n1 needs n2, …`: one chain of `length` nodes.
fn chain(name: &str, length: usize) -> String {
    let mut yaml = format!("name: {name}\nnodes:\n");
    for i in 0..length {
        match i + 1 < length {
            true => yaml.push_str(&format!("  n{i}: {{function: echo, needs: [n{}]}}\n", i + 1)),
            false => yaml.push_str(&format!("  n{i}: {{function: echo}}\n")),
        }
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chain_of_needs_is_refused_and_the_gateway_stays_up() {
    let (core, acme) = setup().await;
    // 50 000 nodes, 2 MB: a recursive walk of it overflowed a worker's stack and aborted the
    // whole process.
    let (status, text) = deploy_flow(&core, &acme, chain("deep", 50_000)).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("a flow has at most 1000 nodes; this one has 50000"), "{text}");

    // As long as allowed: validated, drawn and run, each in time linear in its size.
    let (status, text) = deploy_flow(&core, &acme, chain("longest", MAX_NODES)).await;
    assert_eq!(status, 201, "{text}");
    let url = format!("{}/system/flows/longest?format=text", core.url);
    let text = core.http.get(url).bearer_auth(&acme.read).send().await.unwrap().text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), MAX_NODES + 1, "{}", &text[..200]);
    assert_eq!(lines[1], "  n999 <- [] function echo", "needs come first");
    assert_eq!(lines[MAX_NODES], "  n0 <- [n1] function echo");
    let response = core.http.post(format!("{}/flow/longest", core.url)).bearer_auth(&acme.ingest).body("through");
    let response = response.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "through", "the input passed down all 1000 nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_deeply_nested_fields_are_refused() {
    let (core, acme) = setup().await;
    // 100 000 `!`: the condition parser recursed once per `!`.
    let deep_when = format!("name: nots\nnodes:\n  a: {{function: echo, when: \"{}$.x\"}}\n", "!".repeat(100_000));
    let (status, text) = deploy_flow(&core, &acme, deep_when).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("node a: when is 100003 bytes; the limit is 1024"), "{text}");
    // Within the length, nesting is bounded too.
    let nested = format!("{}$.x", "!".repeat(MAX_EXPRESSION_BYTES - 3));
    let (status, text) =
        deploy_flow(&core, &acme, format!("name: nots\nnodes:\n  a: {{function: echo, when: \"{nested}\"}}\n")).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("nested deeper than 64 levels"), "{text}");

    let needs: Vec<String> = (0..300).map(|i| format!("n{i}")).collect();
    let mut wide = format!("name: wide\nnodes:\n  join: {{function: echo, needs: [{}]}}\n", needs.join(", "));
    for need in &needs {
        wide.push_str(&format!("  {need}: {{function: echo}}\n"));
    }
    let (status, text) = deploy_flow(&core, &acme, wide).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("node join: at most 256 needs; it has 300"), "{text}");

    let long = format!("name: long\ndescription: {}\nnodes:\n  a: {{function: echo}}\n", "d".repeat(1 << 20));
    let (status, text) = deploy_flow(&core, &acme, long).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("description is 1048576 bytes; the limit is 4096"), "{text}");
    assert!(text.len() < 1000, "the description is not echoed");
}

async fn send_csv(core: &TestCore, tenant: &Tenant, flow: &str, body: String) -> (u16, String) {
    let response = core
        .http
        .post(format!("{}/stream/{flow}", core.url))
        .bearer_auth(&tenant.ingest)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_header_counts_in_every_batch_it_heads() {
    let (core, acme) = setup().await;
    let yaml = "name: one-each\nnodes:\n  a: {function: echo}\nstream: {max_records: 1, max_bytes: 1Ki, max_pending_bytes: 64Ki}\n";
    assert_eq!(deploy_flow(&core, &acme, yaml.into()).await.0, 201);

    // 1 KiB of records, but each of the 100 batches (one record each) carries the 30 KiB
    // header: 3 MB of run inputs, far past the 64 KiB the stream may hold pending.
    let header = format!("{}\n", "h".repeat(30 << 10));
    let records = "123456789\n".repeat(100);
    let (status, text) = send_csv(&core, &acme, "one-each", format!("{header}{records}")).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("the CSV header once per batch"), "{text}");

    // A header longer than any batch should carry is refused outright.
    let huge = format!("{}\n1\n", "h".repeat(100 << 10));
    let (status, text) = send_csv(&core, &acme, "one-each", huge).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("the CSV header is 102400 bytes; the limit is 65536"), "{text}");

    // Within the limits, each run's input is the header and its record.
    let (status, text) = send_csv(&core, &acme, "one-each", "id,v\n1,a\n2,b\n".into()).await;
    assert_eq!(status, 202, "{text}");
    let accepted: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(accepted["records"], 2);
    assert_eq!(accepted["runs"].as_array().unwrap().len(), 2);
}

/// A record costs more than its bytes: 2 MiB of one-character lines would be a million records
/// (64 MiB of handles), though its bytes fit the 16 MiB a stream may hold pending. Refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_a_million_tiny_records_is_refused() {
    let (core, acme) = setup().await;
    let yaml = "name: lines\nnodes:\n  a: {function: echo}\nstream: {max_records: 2000}\n";
    assert_eq!(deploy_flow(&core, &acme, yaml.into()).await.0, 201);
    let send = |body: String| {
        let request = core.http.post(format!("{}/stream/lines", core.url)).bearer_auth(&acme.ingest);
        async move {
            let response = request.body(body).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, text) = send("x\n".repeat(1 << 20)).await;
    assert_eq!(status, 413, "{text}");
    // A thousand such records are taken.
    let (status, text) = send("{}\n".repeat(1000)).await;
    assert_eq!(status, 202, "{text}");
}

async fn run_flow(core: &TestCore, tenant: &Tenant, flow: &str, input: String) -> (u16, String) {
    let response = core.http.post(format!("{}/flow/{flow}", core.url)).bearer_auth(&tenant.ingest).body(input);
    let response = response.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A run keeps its nodes' outputs in its job, within its tenant's state quota: an output the
/// quota cannot hold fails its node, instead of staying in memory beside the store. A `foreach`
/// runs over at most 10 000 elements, whose outputs together are at most the largest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_outputs_stay_within_the_state_quota_and_foreach_is_bounded() {
    let core = start(|config| {
        config.state.tenant_quota_bytes = 1 << 20;
        config.state.max_value_bytes = 1 << 20;
    })
    .await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;

    // Two outputs of 700 KiB: the second is over the 1 MiB quota.
    let yaml = "name: twice\nnodes:\n  a: {function: echo}\n  b: {function: echo, needs: [a]}\n";
    assert_eq!(deploy_flow(&core, &acme, yaml.into()).await.0, 201);
    let (status, text) = run_flow(&core, &acme, "twice", "x".repeat(700 << 10)).await;
    assert_eq!(status, 500, "{}", &text[..text.len().min(300)]);
    assert!(text.contains("node b: output not stored") && text.contains("quota"), "{text}");
    let (status, text) = run_flow(&core, &acme, "twice", "small".into()).await;
    assert_eq!((status, text.as_str()), (200, "small"));

    let yaml = "name: each\nnodes:\n  a: {function: echo, foreach: \"$.items\"}\n";
    assert_eq!(deploy_flow(&core, &acme, yaml.into()).await.0, 201);
    let items = |n: usize, item: &str| json!({ "items": vec![item; n] }).to_string();
    let (status, text) = run_flow(&core, &acme, "each", items(10_001, "0")).await;
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("foreach over 10001 elements: at most 10000"), "{text}");
    // 20 outputs of 100 KB: 2 MB together, over the largest value.
    let (status, text) = run_flow(&core, &acme, "each", items(20, &"y".repeat(100_000))).await;
    assert_eq!(status, 500, "{}", &text[..text.len().min(300)]);
    assert!(text.contains("outputs are over 1048576 bytes"), "{text}");
    let (status, text) = run_flow(&core, &acme, "each", items(3, "z")).await;
    assert_eq!((status, text.as_str()), (200, r#"["z","z","z"]"#));
}
