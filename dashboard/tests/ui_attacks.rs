//! The dashboard's pages against a tenant's hostile spans: a tenant sends its own spans with
//! any attributes (its ingest token), then opens its pages; nothing it sends may hang or crash
//! the dashboard that every tenant shares.

use std::sync::Arc;
use std::time::Duration;

use billing::Billing;
use billing::api::ViewerResolver;
use collector::model::{Batch, SpanRow};
use collector::store::TelemetryStore;
use contract::{Viewer, semconv};
use dashboard::DashboardState;
use serde_json::json;

struct Tokens;

impl ViewerResolver for Tokens {
    fn resolve(&self, token: &str) -> Option<Viewer> {
        match token {
            "acme-read" => Some(Viewer::Tenant("acme".into())),
            "globex-read" => Some(Viewer::Tenant("globex".into())),
            _ => None,
        }
    }
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn span(id: u64, parent: Option<u64>, name: &str, start_ns: i64, attributes: serde_json::Value) -> SpanRow {
    SpanRow {
        tenant: "acme".into(),
        trace_id: TRACE.into(),
        span_id: format!("{id:016x}"),
        parent_span_id: parent.map(|p| format!("{p:016x}")),
        name: name.into(),
        kind: 1,
        start_ns,
        end_ns: start_ns + 1_000_000,
        status_code: 0,
        status_message: String::new(),
        service_name: "shop".into(),
        attributes: attributes.to_string(),
        events: "[]".into(),
        links: "[]".into(),
        resource: json!({"service.name": "shop", "service.namespace": "acme"}).to_string(),
        scope: "{}".into(),
        metered: false,
    }
}

/// A flow run whose nodes need each other in a cycle, and a chain of 20 000 nodes beside it:
/// the run page draws it, in time, and another tenant cannot open it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_nodes_need_each_other_in_a_cycle_is_drawn_not_looped_on() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("telemetry.db").display());
    let store = TelemetryStore::open_with_blocks(&url, &dir.path().join("blocks")).await.unwrap();
    let billing = Arc::new(Billing::open(&store).await.unwrap());
    let state = DashboardState { store: store.clone(), billing, resolver: Arc::new(Tokens), settle: None };
    let app = dashboard::app(state, dashboard::ui::UiConfig { collector_metrics_url: None });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let start =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64 - 60_000_000_000;
    let run = |extra: serde_json::Value| {
        let mut attributes = json!({ semconv::SFAAS_FLOW_RUN_ID: "r1" });
        attributes.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        attributes
    };
    let mut spans = vec![span(1, None, "flow shop", start, run(json!({ semconv::SFAAS_FLOW_NAME: "shop" })))];
    for (id, node, needs) in [(2, "a", "b"), (3, "b", "a"), (4, "c", "c")] {
        let attributes = run(json!({ semconv::SFAAS_FLOW_NODE: node, semconv::SFAAS_FLOW_NEEDS: [needs] }));
        spans.push(span(id, Some(1), &format!("node {node}"), start, attributes));
    }
    for i in 0..20_000u64 {
        let needs = if i == 0 { json!([]) } else { json!([format!("n{}", i - 1)]) };
        let attributes = run(json!({ semconv::SFAAS_FLOW_NODE: format!("n{i}"), semconv::SFAAS_FLOW_NEEDS: needs }));
        spans.push(span(100 + i, Some(1), &format!("node n{i}"), start, attributes));
    }
    store.write(&Batch { spans, ..Batch::default() }).await.unwrap();

    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
    let page = format!("{base}/ui/runs/acme/r1?trace={TRACE}");
    let response = client.get(&page).bearer_auth("acme-read").send().await.expect("the run page answers");
    assert_eq!(response.status(), 200);
    let html = response.text().await.unwrap();
    for node in ["a", "b", "c", "n0", "n19999"] {
        assert!(html.contains(&format!("data-node=\"{node}\"")), "node {node} is drawn");
    }
    // The dashboard still serves, and another tenant cannot open acme's run.
    let other = client.get(&page).bearer_auth("globex-read").send().await.unwrap();
    assert_eq!(other.status(), 403);
}
