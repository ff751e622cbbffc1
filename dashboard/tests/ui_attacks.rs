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

/// A dashboard over a fresh SQLite store in a temp dir (kept while the first is held): the
/// store, to write a tenant's spans into, and the dashboard's address.
async fn dashboard() -> (tempfile::TempDir, TelemetryStore, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("telemetry.db").display());
    let store = TelemetryStore::open_with_blocks(&url, &dir.path().join("blocks")).await.unwrap();
    let billing = Arc::new(Billing::open(&store).await.unwrap());
    let state = DashboardState { store: store.clone(), billing, resolver: Arc::new(Tokens), settle: None };
    let app = dashboard::app(state, dashboard::ui::UiConfig { collector_metrics_url: None });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (dir, store, base)
}

/// `GET base + path` with acme's read token: the status and the body's text. It must answer:
/// a dropped connection (a crashed handler) fails the test, naming the path.
async fn get(base: &str, path: String) -> (u16, String) {
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
    let response = client
        .get(format!("{base}{path}"))
        .bearer_auth("acme-read")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} answers: {e}"));
    (response.status().as_u16(), response.text().await.unwrap())
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
        end_ns: start_ns.saturating_add(1_000_000),
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

/// A flow run whose nodes need each other in a cycle, and a chain of 9 990 nodes beside it (a
/// trace is read up to its 10 000 earliest spans): the run page draws it, in time, and another
/// tenant cannot open it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_nodes_need_each_other_in_a_cycle_is_drawn_not_looped_on() {
    let (_dir, store, base) = dashboard().await;

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
    for i in 0..9_990u64 {
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
    for node in ["a", "b", "c", "n0", "n9989"] {
        assert!(html.contains(&format!("data-node=\"{node}\"")), "node {node} is drawn");
    }
    // The dashboard still serves, and another tenant cannot open acme's run.
    let other = client.get(&page).bearer_auth("globex-read").send().await.unwrap();
    assert_eq!(other.status(), 403);
}

/// A span of `TRACE_AT_THE_ENDS` with any start and end: a tenant's clock, or its malice,
/// chooses both.
fn span_between(id: u64, parent: Option<u64>, name: &str, start_ns: i64, end_ns: i64, run: &str) -> SpanRow {
    let mut attributes = json!({ semconv::SFAAS_FLOW_RUN_ID: run, semconv::SFAAS_FLOW_NAME: "edge" });
    if name.starts_with("node ") {
        attributes[semconv::SFAAS_FLOW_NODE] = json!(name.trim_start_matches("node "));
    }
    let mut row = span(id, parent, name, start_ns, attributes);
    row.trace_id = TRACE_AT_THE_ENDS.into();
    row.end_ns = end_ns;
    row.events =
        json!([{"name": "far", "time_ns": 1e300}, {"name": "early", "time_ns": i64::MIN}, {"name": "late", "time_ns": u64::MAX}])
            .to_string();
    row
}

const TRACE_AT_THE_ENDS: &str = "1af7651916cd43dd8448eb211c80319d";

/// Spans that start or end at the ends of time (`i64::MIN`, `i64::MAX` ns, as OTLP's unsigned
/// nanoseconds and Jaeger's microseconds arrive saturated), end before they start, or both: every
/// page and every Jaeger route that shows them answers, with durations that make sense (a span
/// that ends before it starts lasted 0), and never a 500 (a debug build's overflow panic) or a
/// wrapped duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_at_the_ends_of_time_are_shown_not_overflowed() {
    let (_dir, store, base) = dashboard().await;

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    let (min, max) = (i64::MIN, i64::MAX);
    let spans = vec![
        // Within the pages' lookback windows, so that the lists show them.
        span_between(1, None, "flow edge", now - 60_000_000_000, min, "r-edge"),
        span_between(2, Some(1), "node a", now - 50_000_000_000, min, "r-edge"),
        span_between(3, Some(1), "node b", min, max, "r-edge"),
        span_between(4, Some(1), "node c", max, min, "r-edge"),
        span_between(5, Some(2), "invoke edge", now - 40_000_000_000, min, "r-edge"),
        span_between(6, Some(2), "invoke edge", now - 30_000_000_000, max, "r-edge"),
        span_between(7, Some(2), "invoke edge", max, max, "r-edge"),
        span_between(8, Some(2), "invoke edge", min, min, "r-edge"),
    ];
    store.write(&Batch { spans, ..Batch::default() }).await.unwrap();

    let get = |path: String| get(&base, path);
    for path in [
        "/ui/traces?tenant=acme".to_string(),
        "/ui/traces?tenant=acme&min_ms=0&max_ms=1e300&hours=9223372036854775807".into(),
        "/ui/traces?tenant=acme&hours=-9223372036854775808".into(),
        format!("/ui/traces/acme/{TRACE_AT_THE_ENDS}"),
        "/ui/runs?tenant=acme".into(),
        "/ui/runs?tenant=acme&hours=99999999999999999999999".into(),
        format!("/ui/runs/acme/r-edge?trace={TRACE_AT_THE_ENDS}"),
        "/ui/runs/acme/r-edge".into(),
    ] {
        let (status, html) = get(path.clone()).await;
        assert_eq!(status, 200, "GET {path}: {html}");
        assert!(!html.contains(">-"), "GET {path}: a negative duration is shown: {html}");
    }
    // The traces list: a span that ends before it starts lasted 0 ms; one that ends at the end
    // of time lasted until then (about 7e12 ms from now, not a wrapped negative).
    let (_, html) = get("/ui/traces?tenant=acme".into()).await;
    assert!(html.contains("<td class=\"n\">0.00</td>"), "{html}");
    assert!(html.contains("<td class=\"n\">7"), "{html}");

    // The Jaeger API: the trace, with each span's duration 0 or saturated, and a warning for
    // each span that ends before it starts.
    let (status, body) = get(format!("/api/traces/{TRACE_AT_THE_ENDS}")).await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let spans = body["data"][0]["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 8, "{body}");
    for span in spans {
        let duration = span["duration"].as_i64().unwrap();
        assert!(duration >= 0, "{span}");
        let warned = span["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().unwrap().contains("before it starts")));
        let id = span["spanID"].as_str().unwrap();
        let backwards = matches!(id, "0000000000000001" | "0000000000000002" | "0000000000000004" | "0000000000000005");
        assert_eq!(warned, backwards, "{span}");
        if id == "0000000000000003" {
            assert_eq!(duration, i64::MAX / 1000, "saturated, not wrapped: {span}");
        }
    }
    // Dependencies windows at the ends of time: answered (empty) or refused as too long, never
    // a 500.
    for (path, want) in [
        (format!("/api/dependencies?endTs={min}&lookback={max}"), 200),
        (format!("/api/dependencies?endTs={max}&lookback={min}"), 200),
        (format!("/api/dependencies?endTs={min}&lookback={min}"), 200),
        (format!("/api/dependencies?endTs={max}&lookback={max}"), 400),
    ] {
        let (status, body) = get(path.clone()).await;
        assert_eq!(status, want, "GET {path}: {body}");
    }
}

/// A Jaeger search over the spans above (the head of the store filters them by duration): the
/// span whose duration overflows does not take the search down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_among_spans_at_the_ends_of_time_answers() {
    let (_dir, store, base) = dashboard().await;

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    let spans = vec![
        span_between(1, None, "invoke edge", now - 60_000_000_000, i64::MIN, "r"),
        span_between(2, None, "invoke edge", i64::MAX, i64::MIN, "r"),
        span_between(3, None, "invoke edge", now - 30_000_000_000, now - 29_000_000_000, "r"),
    ];
    store.write(&Batch { spans, ..Batch::default() }).await.unwrap();
    let get = |path: String| async {
        let (status, text) = get(&base, path).await;
        (status, serde_json::from_str::<serde_json::Value>(&text).unwrap())
    };
    // Span 1 ends before it starts (0 long: not matched); span 3 lasted a second.
    let (status, body) = get("/api/traces?service=shop&minDuration=1ms".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    // Windows and durations at the ends of time: answered (empty) or refused as too long.
    let (min, max) = (i64::MIN, i64::MAX);
    for (path, want) in [
        (format!("/api/traces?service=shop&start={min}&end={max}"), 400),
        (format!("/api/traces?service=shop&start={max}&end={max}&lookback=custom"), 200),
        (format!("/api/traces?service=shop&start={min}&end={min}"), 200),
        (format!("/api/traces?service=shop&end={min}"), 200),
        ("/api/traces?service=shop&minDuration=2562047h47m16.854775807s".into(), 200),
        ("/api/traces?service=shop&maxDuration=-2562047h47m16.854775808s".into(), 200),
    ] {
        let (status, body) = get(path.clone()).await;
        assert_eq!(status, want, "GET {path}: {body}");
    }
}

/// One tenant's reader signing in again and again (a script with its read token): the
/// sessions table does not grow without end, that reader's oldest sessions end, and another
/// tenant's session is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_again_and_again_ends_only_ones_own_oldest_sessions() {
    let (_dir, _, base) = dashboard().await;
    let http = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let sign_in = |token: &'static str| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let response = http
                .post(format!("{base}/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 303, "signed in");
            let cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
            cookie.split(';').next().unwrap().to_string()
        }
    };
    let opens = |cookie: String| {
        let http = http.clone();
        let base = base.clone();
        async move { http.get(format!("{base}/ui/runs")).header("cookie", cookie).send().await.unwrap().status() == 200 }
    };
    let globex = sign_in("globex-read").await;
    let first = sign_in("acme-read").await;
    let mut last = first.clone();
    for _ in 0..100 {
        last = sign_in("acme-read").await;
    }
    assert!(!opens(first).await, "acme's oldest session ended");
    assert!(opens(last).await, "acme's newest session works");
    assert!(opens(globex).await, "globex's session is untouched");
}
