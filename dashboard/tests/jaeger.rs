//! The Jaeger v1 query API at the dashboard address (docs/contracts.md, "Protocols") as Grafana's
//! Jaeger datasource uses it: the exact requests Grafana sends
//! (tests/fixtures/grafana-jaeger-requests.txt), the shapes Grafana decodes, search semantics,
//! errors, and tenant isolation; on SQLite and on a real PostgreSQL the test starts itself.
//!
//! `cargo test --release -p dashboard --test integration -- --ignored --nocapture jaeger::bench`
//! measures trace fetches among a million stored spans (`SFAAS_BENCH_SPANS` to change the
//! count).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use billing::Billing;
use billing::api::ViewerResolver;
use collector::model::{Batch, SpanRow};
use collector::store::TelemetryStore;
use contract::Viewer;
use dashboard::DashboardState;
use serde_json::{Value, json};
use testkit::{Backend, backends};

// ---------------------------------------------------------------------------------------------
// Harness

/// Fixed tokens: `admin`, and the read tokens of acme and globex.
pub(crate) struct Tokens;

impl ViewerResolver for Tokens {
    fn resolve(&self, token: &str) -> Option<Viewer> {
        match token {
            "admin" => Some(Viewer::Admin),
            "acme-read" => Some(Viewer::Tenant("acme".into())),
            "globex-read" => Some(Viewer::Tenant("globex".into())),
            _ => None,
        }
    }
}

const ADMIN: &str = "admin";
const ACME: &str = "acme-read";
const GLOBEX: &str = "globex-read";

struct Server {
    base: String,
    client: reqwest::Client,
    store: TelemetryStore,
    backend: Backend,
}

/// The Jaeger router on 127.0.0.1:0.
async fn start(backend: Backend) -> Server {
    let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
    let billing = Arc::new(Billing::open(&store).await.unwrap());
    let app = dashboard::jaeger::router(DashboardState {
        store: store.clone(),
        billing,
        resolver: Arc::new(Tokens),
        settle: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base: format!("http://{addr}"), client: reqwest::Client::new(), store, backend }
}

impl Server {
    async fn request(&self, token: Option<&str>, org: Option<&str>, path: &str) -> (u16, Value) {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(org) = org {
            request = request.header("X-Scope-OrgID", org);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{} GET {path}: {status} with a body that is not JSON ({e}): {text}", self.backend.name())
        });
        assert_eq!(content_type.as_deref(), Some("application/json"), "GET {path}");
        (status, body)
    }

    /// A 200 response's envelope, checked; returns `data`.
    async fn ok(&self, token: &str, path: &str) -> Value {
        let (status, body) = self.request(Some(token), None, path).await;
        assert_eq!(status, 200, "{} GET {path} as {token}: {body}", self.backend.name());
        check_envelope(&body);
        // Not even `[]`: Grafana's dependency graph takes any `errors` array as a failure.
        assert_eq!(body["errors"], Value::Null, "GET {path}: {body}");
        body["data"].clone()
    }

    /// An error response: status and jaeger-query's error envelope; returns the message.
    async fn error(&self, token: Option<&str>, org: Option<&str>, path: &str, want: u16) -> String {
        let (status, body) = self.request(token, org, path).await;
        assert_eq!(status, want, "{} GET {path} as {token:?}: {body}", self.backend.name());
        assert_eq!(body["data"], Value::Null, "{body}");
        assert_eq!(body["total"], 0);
        assert_eq!(body["limit"], 0);
        assert_eq!(body["offset"], 0);
        let errors = body["errors"].as_array().unwrap_or_else(|| panic!("errors array: {body}"));
        assert_eq!(errors.len(), 1, "{body}");
        assert_eq!(errors[0]["code"], want, "{body}");
        errors[0]["msg"].as_str().unwrap().to_string()
    }

    async fn write(&self, spans: Vec<SpanRow>) {
        self.store.write(&Batch { spans, ..Batch::default() }).await.unwrap();
    }
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

// ---------------------------------------------------------------------------------------------
// Shapes Grafana decodes (types.ts, responseTransform.ts, pkg/tsdb/jaeger/querydata.go)

fn check_envelope(body: &Value) {
    let object = body.as_object().unwrap_or_else(|| panic!("envelope object: {body}"));
    for key in ["data", "total", "limit", "offset", "errors"] {
        assert!(object.contains_key(key), "envelope without {key}: {body}");
    }
    assert!(body["total"].is_u64() && body["limit"].is_u64() && body["offset"].is_u64(), "{body}");
    assert!(body["errors"].is_null() || body["errors"].is_array(), "{body}");
}

fn is_hex(text: &str, lengths: &[usize]) -> bool {
    lengths.contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn check_key_values(tags: &Value, context: &str) {
    for tag in tags.as_array().unwrap_or_else(|| panic!("{context}: tags array: {tags}")) {
        let key = tag["key"].as_str().unwrap_or_else(|| panic!("{context}: key: {tag}"));
        let value = &tag["value"];
        let consistent = match tag["type"].as_str() {
            Some("string") => value.is_string(),
            Some("bool") => value.is_boolean(),
            Some("int64") => value.is_i64() || value.as_str().is_some_and(|s| s.parse::<i64>().is_ok()),
            Some("float64") => value.is_f64(),
            other => panic!("{context}: tag {key} of type {other:?}"),
        };
        assert!(consistent, "{context}: tag {key}: {tag}");
    }
}

/// A trace as Grafana's createTraceFrame/toSpanRow and its Go backend decode it.
fn check_trace(trace: &Value) {
    let trace_id = trace["traceID"].as_str().unwrap_or_else(|| panic!("traceID: {trace}"));
    assert!(is_hex(trace_id, &[16, 32]), "traceID {trace_id}");
    assert!(trace.get("warnings").is_some(), "trace warnings");
    assert!(trace["warnings"].is_null() || trace["warnings"].is_array());
    let processes = trace["processes"].as_object().unwrap_or_else(|| panic!("processes: {trace}"));
    for (id, process) in processes {
        assert!(id.starts_with('p'), "process id {id}");
        assert!(process["serviceName"].is_string(), "{process}");
        check_key_values(&process["tags"], "process");
        assert!(!process["tags"].as_array().unwrap().iter().any(|t| t["key"] == "service.name"));
    }
    let spans = trace["spans"].as_array().unwrap_or_else(|| panic!("spans: {trace}"));
    assert!(!spans.is_empty());
    for span in spans {
        assert_eq!(span["traceID"], trace_id, "{span}");
        assert!(is_hex(span["spanID"].as_str().unwrap(), &[16]), "{span}");
        assert!(span["flags"].is_u64(), "{span}");
        assert!(span["operationName"].is_string(), "{span}");
        assert!(span["startTime"].is_u64() && span["duration"].is_u64(), "{span}");
        assert!(processes.contains_key(span["processID"].as_str().unwrap()), "{span}");
        assert!(span["warnings"].is_null() || span["warnings"].is_array(), "{span}");
        for reference in span["references"].as_array().unwrap_or_else(|| panic!("references: {span}")) {
            assert!(matches!(reference["refType"].as_str(), Some("CHILD_OF" | "FOLLOWS_FROM")), "{reference}");
            assert!(is_hex(reference["traceID"].as_str().unwrap(), &[16, 32]), "{reference}");
            assert!(is_hex(reference["spanID"].as_str().unwrap(), &[16]), "{reference}");
        }
        check_key_values(&span["tags"], "span");
        for log in span["logs"].as_array().unwrap_or_else(|| panic!("logs: {span}")) {
            assert!(log["timestamp"].is_u64(), "{log}");
            check_key_values(&log["fields"], "log");
        }
    }
}

fn trace_ids(traces: &Value) -> Vec<String> {
    traces.as_array().unwrap().iter().map(|t| t["traceID"].as_str().unwrap().to_string()).collect()
}

fn span_ids(trace: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        trace["spans"].as_array().unwrap().iter().map(|s| s["spanID"].as_str().unwrap().into()).collect();
    ids.sort();
    ids
}

fn find_tag<'a>(tags: &'a Value, key: &str) -> Vec<&'a Value> {
    tags.as_array().unwrap().iter().filter(|t| t["key"] == key).collect()
}

fn tag_of<'a>(tags: &'a Value, key: &str) -> &'a Value {
    let found = find_tag(tags, key);
    assert_eq!(found.len(), 1, "one tag {key} in {tags}");
    found[0]
}

fn strings(data: &Value) -> Vec<String> {
    data.as_array().unwrap_or_else(|| panic!("array: {data}")).iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Data: two tenants, a trace id both have, a 64-bit Jaeger trace id

const TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACE_B: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const TRACE_LEGACY: &str = "0000000000000000a1b2c3d4e5f60718";
const TRACE_LEGACY_JAEGER: &str = "a1b2c3d4e5f60718";
const TRACE_GLOBEX: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const MS: i64 = 1_000_000;

#[allow(clippy::too_many_arguments)]
fn span(
    tenant: &str,
    trace: &str,
    id: &str,
    parent: Option<&str>,
    service: &str,
    name: &str,
    kind: i64,
    start_ns: i64,
    duration_ns: i64,
    attributes: Value,
) -> SpanRow {
    SpanRow {
        tenant: tenant.into(),
        trace_id: trace.into(),
        span_id: id.into(),
        parent_span_id: parent.map(Into::into),
        name: name.into(),
        kind,
        start_ns,
        end_ns: start_ns + duration_ns,
        status_code: 0,
        status_message: String::new(),
        service_name: service.into(),
        attributes: attributes.to_string(),
        events: "[]".into(),
        links: "[]".into(),
        resource: json!({"service.name": service, "service.namespace": tenant}).to_string(),
        scope: "{}".into(),
        metered: false,
    }
}

/// Seeds both tenants; returns the base time (ns) the spans start from.
async fn seed(server: &Server) -> i64 {
    let base = now_ns() - 30 * 60 * 1_000_000_000;
    let mut a1 = span(
        ACME_T,
        TRACE_A,
        "00f067aa0ba902b7",
        None,
        "sfaas-core",
        "flow etl",
        2,
        base,
        50 * MS,
        json!({"sfaas.flow.name": "etl", "sfaas.flow.run_id": "run-1"}),
    );
    a1.scope = json!({"name": "sfaas", "version": "0.1.0"}).to_string();
    a1.resource = json!({"service.name": "sfaas-core", "service.namespace": "acme", "host.name": "node-1"}).to_string();
    let mut a2 = span(
        ACME_T,
        TRACE_A,
        "1111111111111111",
        Some("00f067aa0ba902b7"),
        "sfaas-core",
        "node extract",
        1,
        base + MS,
        30 * MS,
        json!({"sfaas.flow.node": "extract", "sfaas.flow.attempt": 1}),
    );
    a2.resource = a1.resource.clone();
    let mut a3 = span(
        ACME_T,
        TRACE_A,
        "2222222222222222",
        Some("1111111111111111"),
        "sfaas-core",
        "invoke extract",
        2,
        base + 2 * MS,
        20 * MS,
        json!({"faas.name": "extract", "sfaas.cpu_ms": 12, "sfaas.wall_ms": 3.5, "faas.coldstart": false,
               "sfaas.big": 9_007_199_254_740_993i64, "http.response.status_code": 500, "sfaas.tags": ["a", "b"]}),
    );
    a3.resource = a1.resource.clone();
    a3.status_code = 2;
    a3.status_message = "boom".into();
    a3.events = json!([{"name": "exception", "time_ns": base + 5 * MS, "attributes": {"exception.message": "boom"}}])
        .to_string();
    a3.links = json!([{"trace_id": TRACE_B, "span_id": "3333333333333333", "attributes": {}}]).to_string();
    let mut a4 = span(
        ACME_T,
        TRACE_A,
        "4444444444444444",
        Some("2222222222222222"),
        "frontend",
        "GET /api",
        3,
        base + 3 * MS,
        2 * MS,
        json!({"http.status_code": 500, "http.method": "GET"}),
    );
    a4.status_code = 2;

    let mut b1 = span(
        ACME_T,
        TRACE_B,
        "3333333333333333",
        None,
        "frontend",
        "GET /api",
        2,
        base + 10_000 * MS,
        200 * MS,
        json!({"http.status_code": 200}),
    );
    b1.status_code = 1;
    let b2 = span(
        ACME_T,
        TRACE_B,
        "5555555555555555",
        Some("3333333333333333"),
        "frontend",
        "SELECT users",
        3,
        base + 10_001 * MS,
        100 * MS,
        json!({"db.system": "postgresql", "note": "say \"hi\" \u{e9}\\"}),
    );

    // As the collector stores a span of a 64-bit Jaeger client: the `error` tag kept, status derived.
    let mut legacy = span(
        ACME_T,
        TRACE_LEGACY,
        "6666666666666666",
        None,
        "legacy",
        "GET /old",
        3,
        base + 20_000 * MS,
        5 * MS,
        json!({"error": true, "component": "jaeger-client"}),
    );
    legacy.status_code = 2;
    let odd = span(
        ACME_T,
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "aaaaaaaaaaaaaaa1",
        None,
        "my svc/v2",
        "op",
        0,
        base,
        MS,
        json!({}),
    );

    let mut g1 = span(
        GLOBEX_T,
        TRACE_GLOBEX,
        "7777777777777777",
        None,
        "globex-api",
        "POST /charge",
        2,
        base + 1_000 * MS,
        40 * MS,
        json!({"http.status_code": 500}),
    );
    g1.status_code = 2;
    let g2 = span(
        GLOBEX_T,
        TRACE_GLOBEX,
        "8888888888888888",
        Some("7777777777777777"),
        "billing-svc",
        "charge",
        2,
        base + 1_001 * MS,
        20 * MS,
        json!({}),
    );
    // Globex has a trace with acme's trace id, and a service of the same name as acme's.
    let mut shared = span(
        GLOBEX_T,
        TRACE_A,
        "9999999999999999",
        None,
        "frontend",
        "GET /globex-only",
        2,
        base + 2_000 * MS,
        3 * MS,
        json!({"http.status_code": 500, "http.method": "GET"}),
    );
    shared.status_code = 2;
    server.write(vec![a1, a2, a3, a4, b1, b2, legacy, odd, g1, g2, shared]).await;
    base
}

const ACME_T: &str = "acme";
const GLOBEX_T: &str = "globex";

// ---------------------------------------------------------------------------------------------
// Tests

/// Every request of the fixture, as Grafana sends it, answered 200 in the shapes Grafana decodes.
#[tokio::test]
async fn grafana_requests() {
    let fixture = include_str!("fixtures/grafana-jaeger-requests.txt");
    for backend in backends() {
        let server = start(backend).await;
        let base = seed(&server).await;
        let (start_us, end_us) = ((base - 3_600_000 * MS) / 1000, (now_ns() + 60_000 * MS) / 1000);
        let mut replayed = 0;
        for line in fixture.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let path = line.strip_prefix("GET ").unwrap_or_else(|| panic!("fixture line {line:?}"));
            let path = path
                .replace("{service}", "frontend")
                .replace("{trace_id}", TRACE_A)
                .replace("{start_us}", &start_us.to_string())
                .replace("{end_us}", &end_us.to_string())
                .replace("{from_ms}", &(start_us / 1000).to_string())
                .replace("{to_ms}", &(end_us / 1000).to_string())
                .replace("{end_ms}", &(end_us / 1000).to_string())
                .replace("{lookback_ms}", &((end_us - start_us) / 1000).to_string());
            let data = server.ok(ACME, &path).await;
            let route = path.split('?').next().unwrap();
            if route == "/api/services" {
                // The health check succeeds only with services.
                let services = strings(&data);
                assert!(
                    services.contains(&"frontend".to_string()) && services.contains(&"sfaas-core".to_string()),
                    "{data}"
                );
            } else if route.ends_with("/operations") {
                assert_eq!(strings(&data), ["GET /api", "SELECT users"], "{path}");
            } else if route == "/api/traces" {
                for trace in data.as_array().unwrap() {
                    check_trace(trace);
                }
                assert!(trace_ids(&data).contains(&TRACE_A.to_string()), "{path}: {data}");
            } else if route.starts_with("/api/traces/") {
                assert_eq!(data.as_array().unwrap().len(), 1, "{path}");
                check_trace(&data[0]);
                assert_eq!(data[0]["traceID"], TRACE_A);
                assert_eq!(data[0]["spans"].as_array().unwrap().len(), 4, "acme's spans only");
            } else if route == "/api/dependencies" {
                assert_eq!(data, json!([{"parent": "sfaas-core", "child": "frontend", "callCount": 1}]), "{path}");
            } else {
                panic!("fixture route {route} not checked");
            }
            replayed += 1;
        }
        assert!(replayed >= 12, "fixture requests: {replayed}");
        eprintln!("{}: {replayed} Grafana requests replayed", server.backend.name());
    }
}

/// A trace in detail: what the OTLP→Jaeger translation gives and what Grafana reads of it.
#[tokio::test]
async fn trace_shape() {
    for backend in backends() {
        let server = start(backend).await;
        let base = seed(&server).await;
        let data = server.ok(ACME, &format!("/api/traces/{TRACE_A}")).await;
        let trace = &data[0];
        check_trace(trace);
        assert_eq!(trace["warnings"], Value::Null);
        let spans = trace["spans"].as_array().unwrap();
        let by_id = |id: &str| spans.iter().find(|s| s["spanID"] == id).unwrap_or_else(|| panic!("span {id}"));

        // Processes: one per (service, resource), service.name as serviceName.
        let processes = trace["processes"].as_object().unwrap();
        assert_eq!(processes.len(), 2);
        let core = &processes[by_id("00f067aa0ba902b7")["processID"].as_str().unwrap()];
        assert_eq!(core["serviceName"], "sfaas-core");
        assert_eq!(
            *tag_of(&core["tags"], "service.namespace"),
            json!({"key": "service.namespace", "type": "string", "value": "acme"})
        );
        assert_eq!(tag_of(&core["tags"], "host.name")["value"], "node-1");
        assert_eq!(by_id("1111111111111111")["processID"], by_id("00f067aa0ba902b7")["processID"]);
        let frontend = &processes[by_id("4444444444444444")["processID"].as_str().unwrap()];
        assert_eq!(frontend["serviceName"], "frontend");

        // The root: no references; scope and kind as tags; no status tags while unset.
        let root = by_id("00f067aa0ba902b7");
        assert_eq!(root["operationName"], "flow etl");
        assert_eq!(root["references"], json!([]));
        assert_eq!(root["startTime"], base / 1000);
        assert_eq!(root["duration"], 50_000);
        assert_eq!(root["logs"], json!([]));
        assert_eq!(root["warnings"], Value::Null);
        assert_eq!(tag_of(&root["tags"], "otel.scope.name")["value"], "sfaas");
        assert_eq!(tag_of(&root["tags"], "otel.scope.version")["value"], "0.1.0");
        assert_eq!(
            *tag_of(&root["tags"], "span.kind"),
            json!({"key": "span.kind", "type": "string", "value": "server"})
        );
        assert!(find_tag(&root["tags"], "otel.status_code").is_empty() && find_tag(&root["tags"], "error").is_empty());
        assert_eq!(tag_of(&by_id("1111111111111111")["tags"], "span.kind")["value"], "internal");

        // The invoke span: typed tags, status, the parent first, the link after, the event as a log.
        let invoke = by_id("2222222222222222");
        let tags = &invoke["tags"];
        assert_eq!(*tag_of(tags, "sfaas.cpu_ms"), json!({"key": "sfaas.cpu_ms", "type": "int64", "value": 12}));
        assert_eq!(*tag_of(tags, "sfaas.wall_ms"), json!({"key": "sfaas.wall_ms", "type": "float64", "value": 3.5}));
        assert_eq!(*tag_of(tags, "faas.coldstart"), json!({"key": "faas.coldstart", "type": "bool", "value": false}));
        assert_eq!(*tag_of(tags, "faas.name"), json!({"key": "faas.name", "type": "string", "value": "extract"}));
        // Beyond JavaScript's safe integers: a string, as jaeger-query sends it.
        assert_eq!(
            *tag_of(tags, "sfaas.big"),
            json!({"key": "sfaas.big", "type": "int64", "value": "9007199254740993"})
        );
        assert_eq!(
            *tag_of(tags, "sfaas.tags"),
            json!({"key": "sfaas.tags", "type": "string", "value": "[\"a\",\"b\"]"})
        );
        assert_eq!(tag_of(tags, "span.kind")["value"], "server");
        assert_eq!(
            *tag_of(tags, "otel.status_code"),
            json!({"key": "otel.status_code", "type": "string", "value": "ERROR"})
        );
        assert_eq!(*tag_of(tags, "error"), json!({"key": "error", "type": "bool", "value": true}));
        assert_eq!(tag_of(tags, "otel.status_description")["value"], "boom");
        assert_eq!(
            invoke["references"],
            json!([
                {"refType": "CHILD_OF", "traceID": TRACE_A, "spanID": "1111111111111111"},
                {"refType": "FOLLOWS_FROM", "traceID": TRACE_B, "spanID": "3333333333333333"},
            ])
        );
        assert_eq!(
            invoke["logs"],
            json!([{"timestamp": (base + 5 * MS) / 1000, "fields": [
                {"key": "event", "type": "string", "value": "exception"},
                {"key": "exception.message", "type": "string", "value": "boom"},
            ]}])
        );
        assert_eq!(invoke["startTime"], (base + 2 * MS) / 1000);
        assert_eq!(invoke["duration"], 20_000);
        assert_eq!(tag_of(&by_id("4444444444444444")["tags"], "span.kind")["value"], "client");

        // A 64-bit Jaeger trace id: written with 16 digits, found by either form, any case.
        for id in [TRACE_LEGACY_JAEGER, TRACE_LEGACY, "A1B2C3D4E5F60718"] {
            let data = server.ok(ACME, &format!("/api/traces/{id}")).await;
            check_trace(&data[0]);
            assert_eq!(data[0]["traceID"], TRACE_LEGACY_JAEGER);
            assert_eq!(data[0]["spans"][0]["traceID"], TRACE_LEGACY_JAEGER);
            // The client's own `error` tag is kept and not doubled.
            let tags = &data[0]["spans"][0]["tags"];
            assert_eq!(*tag_of(tags, "error"), json!({"key": "error", "type": "bool", "value": true}));
            assert_eq!(tag_of(tags, "otel.status_code")["value"], "ERROR");
        }
        // start/end (µs from Grafana's frontend, ms from its backend) do not hide the trace.
        let data = server.ok(ACME, &format!("/api/traces/{TRACE_A}?start=1&end=2&raw=true")).await;
        assert_eq!(data[0]["spans"].as_array().unwrap().len(), 4);
    }
}

/// Search: service, operation, tags (JSON, logfmt, `tag=k:v`, synthetic, process, log fields),
/// durations, limit and time window; and traceID lookups.
#[tokio::test]
async fn search() {
    for backend in backends() {
        let server = start(backend).await;
        let base = seed(&server).await;
        let search = |query: String| {
            let server = &server;
            async move {
                let data = server.ok(ACME, &format!("/api/traces?{query}")).await;
                for trace in data.as_array().unwrap() {
                    check_trace(trace);
                }
                trace_ids(&data)
            }
        };
        let enc = |text: &str| {
            text.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        let (a, b) = (TRACE_A, TRACE_B);

        // Most recently matched first; whole traces.
        assert_eq!(search("service=frontend".into()).await, [b, a]);
        let data = server.ok(ACME, "/api/traces?service=frontend").await;
        assert_eq!(span_ids(&data[1]).len(), 4, "the whole trace, not the matching span");
        assert_eq!(search("service=frontend&operation=GET%20%2Fapi".into()).await, [b, a]);
        assert_eq!(search("service=frontend&operation=SELECT+users".into()).await, [b]);
        assert_eq!(search("service=frontend&limit=1".into()).await, [b]);
        assert_eq!(search("service=nobody".into()).await, Vec::<String>::new());

        // Tags: Grafana's JSON object, logfmt, Jaeger's tag=key:value; all on one span.
        let tags = enc(r#"{"http.status_code":"500","error":"true"}"#);
        assert_eq!(search(format!("service=frontend&tags={tags}")).await, [a]);
        assert_eq!(search(format!("service=frontend&tags={}", enc("http.status_code=500 error=true"))).await, [a]);
        assert_eq!(search("service=frontend&tag=http.status_code:500&tag=http.method:GET".into()).await, [a]);
        assert_eq!(
            search(format!("service=frontend&tags={}", enc(r#"http.method="GET"  http.status_code=500"#))).await,
            [a]
        );
        assert_eq!(search(format!("service=frontend&tags={}", enc("http.method"))).await, Vec::<String>::new());
        assert_eq!(
            search(format!("service=frontend&tags={}", enc(r#"{"http.status_code":"200","error":"true"}"#))).await,
            Vec::<String>::new()
        );
        assert_eq!(
            search(format!("service=frontend&tags={}", enc(r#"{"http.status_code":"404"}"#))).await,
            Vec::<String>::new()
        );
        // Synthetic tags, process tags, log fields, typed values compared as text.
        assert_eq!(search(format!("service=frontend&tags={}", enc(r#"{"span.kind":"server"}"#))).await, [b]);
        assert_eq!(search(format!("service=frontend&tags={}", enc(r#"{"otel.status_code":"OK"}"#))).await, [b]);
        assert_eq!(search(format!("service=frontend&tags={}", enc(r#"{"service.namespace":"acme"}"#))).await, [b, a]);
        for tags in [
            r#"{"host.name":"node-1","sfaas.flow.name":"etl"}"#,
            r#"{"exception.message":"boom"}"#,
            r#"{"event":"exception"}"#,
            r#"{"otel.scope.name":"sfaas"}"#,
            r#"{"otel.status_description":"boom"}"#,
            r#"{"sfaas.wall_ms":"3.5","faas.coldstart":"false","sfaas.cpu_ms":"12"}"#,
        ] {
            assert_eq!(search(format!("service=sfaas-core&tags={}", enc(tags))).await, [a], "{tags}");
        }
        assert_eq!(search(format!("service=legacy&tags={}", enc(r#"{"error":"true"}"#))).await, [TRACE_LEGACY_JAEGER]);
        // Values whose JSON text differs from the text compared.
        assert_eq!(search(format!("service=frontend&tags={}", enc(r#"{"http.status_code":"500.0"}"#))).await, [a]);
        assert_eq!(search(format!("service=frontend&tags={}", enc(r#"{"note":"say \"hi\" \u00e9\\"}"#))).await, [b]);
        assert_eq!(search(format!("service=frontend&tags={}", enc("note=\"say \\\"hi\\\" \u{e9}\\\\\""))).await, [b]);
        assert_eq!(search(format!("service=sfaas-core&tags={}", enc(r#"{"sfaas.tags":"[\"a\",\"b\"]"}"#))).await, [a]);

        // Durations (Go syntax), inclusive.
        assert_eq!(search("service=frontend&minDuration=100ms".into()).await, [b]);
        assert_eq!(search("service=frontend&minDuration=0.2s".into()).await, [b]);
        assert_eq!(search("service=frontend&minDuration=201ms".into()).await, Vec::<String>::new());
        assert_eq!(search("service=frontend&maxDuration=5ms".into()).await, [a]);
        assert_eq!(search("service=frontend&minDuration=1.2ms&maxDuration=2000us".into()).await, [a]);
        assert_eq!(search("service=frontend&minDuration=1.2ms&maxDuration=1999us".into()).await, Vec::<String>::new());
        assert_eq!(search("service=frontend&minDuration=1500%C2%B5s&maxDuration=1h2m".into()).await, [b, a]);
        assert_eq!(search("service=frontend&maxDuration=.002s&minDuration=0".into()).await, [a]);

        // The time window (µs).
        let us = |ns: i64| (ns / 1000).to_string();
        assert_eq!(search(format!("service=frontend&start={}&end={}", us(base), us(base + 5_000 * MS))).await, [a]);
        assert_eq!(
            search(format!("service=frontend&start={}&end={}", us(base + 5_000 * MS), us(base + 60_000 * MS))).await,
            [b]
        );
        assert_eq!(search(format!("service=frontend&start={}", us(base + 60_000 * MS))).await, Vec::<String>::new());
        assert_eq!(
            search(format!("service=frontend&end={}&lookback=custom", us(base - MS))).await,
            Vec::<String>::new()
        );

        // traceID lookups: found ones as data, missing ones as errors.
        let (status, body) =
            server.request(Some(ACME), None, &format!("/api/traces?traceID={TRACE_A}&traceID={TRACE_GLOBEX}")).await;
        assert_eq!(status, 200);
        check_envelope(&body);
        assert_eq!(trace_ids(&body["data"]), [a]);
        assert_eq!(body["errors"], json!([{"msg": "trace not found", "traceID": TRACE_GLOBEX}]));
    }
}

/// Services and operations, both operation routes, span kinds, a service name that needs encoding.
#[tokio::test]
async fn services_and_operations() {
    for backend in backends() {
        let server = start(backend).await;
        seed(&server).await;
        let services = server.ok(ACME, "/api/services").await;
        assert_eq!(strings(&services), ["frontend", "legacy", "my svc/v2", "sfaas-core"]);
        assert_eq!(
            strings(&server.ok(ACME, "/api/services/sfaas-core/operations").await),
            ["flow etl", "invoke extract", "node extract"]
        );
        // encodeURIComponent("my svc/v2")
        assert_eq!(strings(&server.ok(ACME, "/api/services/my%20svc%2Fv2/operations").await), ["op"]);
        assert_eq!(strings(&server.ok(ACME, "/api/services/nobody/operations").await), Vec::<String>::new());
        assert_eq!(
            server.ok(ACME, "/api/operations?service=frontend").await,
            json!([
                {"name": "GET /api", "spanKind": "client"},
                {"name": "GET /api", "spanKind": "server"},
                {"name": "SELECT users", "spanKind": "client"},
            ])
        );
        assert_eq!(
            server.ok(ACME, "/api/operations?service=frontend&spanKind=server").await,
            json!([{"name": "GET /api", "spanKind": "server"}])
        );
        assert_eq!(
            server.ok(ACME, "/api/operations?service=my%20svc%2Fv2").await,
            json!([{"name": "op", "spanKind": ""}])
        );
        let (_, body) = server.request(Some(ACME), None, "/api/services").await;
        assert_eq!(body["total"], 4);
    }
}

#[tokio::test]
async fn dependencies() {
    for backend in backends() {
        let server = start(backend).await;
        let base = seed(&server).await;
        let end_ms = now_ns() / MS;
        let edge = json!([{"parent": "sfaas-core", "child": "frontend", "callCount": 1}]);
        assert_eq!(server.ok(ACME, &format!("/api/dependencies?endTs={end_ms}&lookback=3600000")).await, edge);
        // Defaults: now, 24 h.
        assert_eq!(server.ok(ACME, "/api/dependencies").await, edge);
        assert_eq!(server.ok(ACME, "/api/dependencies?service=frontend").await, edge);
        assert_eq!(server.ok(ACME, "/api/dependencies?service=legacy").await, json!([]));
        let before = base / MS - 1;
        assert_eq!(server.ok(ACME, &format!("/api/dependencies?endTs={before}&lookback=60000")).await, json!([]));
        // More calls add up.
        let mut more = span(
            ACME_T,
            TRACE_B,
            "abababababababab",
            Some("5555555555555555"),
            "sfaas-core",
            "invoke db",
            2,
            base + 10_002 * MS,
            MS,
            json!({}),
        );
        more.resource = json!({"service.name": "sfaas-core"}).to_string();
        let mut again = more.clone();
        again.span_id = "cdcdcdcdcdcdcdcd".into();
        server.write(vec![more, again]).await;
        assert_eq!(
            server.ok(ACME, "/api/dependencies").await,
            json!([
                {"parent": "frontend", "child": "sfaas-core", "callCount": 2},
                {"parent": "sfaas-core", "child": "frontend", "callCount": 1},
            ])
        );
        assert_eq!(
            server.ok(ADMIN, "/api/dependencies").await,
            json!([
                {"parent": "frontend", "child": "sfaas-core", "callCount": 2},
                {"parent": "globex-api", "child": "billing-svc", "callCount": 1},
                {"parent": "sfaas-core", "child": "frontend", "callCount": 1},
            ])
        );
    }
}

/// A tenant's token never sees another tenant's spans, through any route; the admin sees all.
#[tokio::test]
async fn isolation() {
    for backend in backends() {
        let server = start(backend).await;
        seed(&server).await;

        // Services and operations.
        assert_eq!(strings(&server.ok(GLOBEX, "/api/services").await), ["billing-svc", "frontend", "globex-api"]);
        for service in ["globex-api", "billing-svc"] {
            assert!(!strings(&server.ok(ACME, "/api/services").await).contains(&service.to_string()));
            assert_eq!(server.ok(ACME, &format!("/api/services/{service}/operations")).await, json!([]));
            assert_eq!(server.ok(ACME, &format!("/api/operations?service={service}")).await, json!([]));
            assert_eq!(server.ok(ACME, &format!("/api/traces?service={service}")).await, json!([]));
        }
        assert_eq!(strings(&server.ok(GLOBEX, "/api/services/frontend/operations").await), ["GET /globex-only"]);
        assert_eq!(strings(&server.ok(ACME, "/api/services/frontend/operations").await), ["GET /api", "SELECT users"]);

        // Traces by id: another tenant's id is unknown; a shared id shows one's own spans only.
        assert_eq!(
            server.error(Some(ACME), None, &format!("/api/traces/{TRACE_GLOBEX}"), 404).await,
            "trace not found"
        );
        assert_eq!(server.error(Some(GLOBEX), None, &format!("/api/traces/{TRACE_B}"), 404).await, "trace not found");
        assert_eq!(
            server.error(Some(GLOBEX), None, &format!("/api/traces/{TRACE_LEGACY_JAEGER}"), 404).await,
            "trace not found"
        );
        let acme_a = server.ok(ACME, &format!("/api/traces/{TRACE_A}")).await;
        assert_eq!(acme_a.as_array().unwrap().len(), 1);
        assert!(!span_ids(&acme_a[0]).contains(&"9999999999999999".to_string()));
        let globex_a = server.ok(GLOBEX, &format!("/api/traces/{TRACE_A}")).await;
        assert_eq!(span_ids(&globex_a[0]), ["9999999999999999"]);
        assert_eq!(globex_a[0]["warnings"], Value::Null);

        // Search: the same service name in both tenants.
        let acme_found = server.ok(ACME, "/api/traces?service=frontend").await;
        assert_eq!(trace_ids(&acme_found), [TRACE_B, TRACE_A]);
        assert!(acme_found.as_array().unwrap().iter().all(|t| !span_ids(t).contains(&"9999999999999999".to_string())));
        let globex_found = server.ok(GLOBEX, "/api/traces?service=frontend").await;
        assert_eq!(trace_ids(&globex_found), [TRACE_A]);
        assert_eq!(span_ids(&globex_found[0]), ["9999999999999999"]);
        let (status, body) = server.request(Some(ACME), None, &format!("/api/traces?traceID={TRACE_GLOBEX}")).await;
        assert_eq!((status, &body["data"]), (200, &json!([])));
        assert_eq!(body["errors"], json!([{"msg": "trace not found", "traceID": TRACE_GLOBEX}]));

        // Dependencies.
        assert_eq!(
            server.ok(GLOBEX, "/api/dependencies").await,
            json!([{"parent": "globex-api", "child": "billing-svc", "callCount": 1}])
        );

        // X-Scope-OrgID: must agree with a read token; selects a tenant for the admin.
        let message = server.error(Some(ACME), Some("globex"), "/api/services", 403).await;
        assert!(message.contains("X-Scope-OrgID"), "{message}");
        server.error(Some(ACME), Some("globex"), &format!("/api/traces/{TRACE_A}"), 403).await;
        let (status, body) = server.request(Some(ACME), Some("acme"), "/api/services").await;
        assert_eq!((status, strings(&body["data"]).len()), (200, 4));
        let (_, body) = server.request(Some(ADMIN), Some("globex"), "/api/services").await;
        assert_eq!(strings(&body["data"]), ["billing-svc", "frontend", "globex-api"]);
        let (_, body) = server.request(Some(ADMIN), Some("globex"), &format!("/api/traces/{TRACE_A}")).await;
        assert_eq!(span_ids(&body["data"][0]), ["9999999999999999"]);

        // The admin: every tenant; a shared trace id is one trace per tenant, each saying whose.
        assert_eq!(
            strings(&server.ok(ADMIN, "/api/services").await),
            ["billing-svc", "frontend", "globex-api", "legacy", "my svc/v2", "sfaas-core"]
        );
        let both = server.ok(ADMIN, &format!("/api/traces/{TRACE_A}")).await;
        assert_eq!(both.as_array().unwrap().len(), 2);
        assert_eq!(span_ids(&both[0]).len(), 4);
        assert_eq!(span_ids(&both[1]), ["9999999999999999"]);
        assert!(both[0]["warnings"][0].as_str().unwrap().contains("tenant acme"), "{}", both[0]["warnings"]);
        assert!(both[1]["warnings"][0].as_str().unwrap().contains("tenant globex"));
        assert_eq!(server.ok(ADMIN, &format!("/api/traces/{TRACE_GLOBEX}")).await[0]["traceID"], TRACE_GLOBEX);
        let found = server.ok(ADMIN, "/api/traces?service=frontend").await;
        assert_eq!(trace_ids(&found), [TRACE_B, TRACE_A, TRACE_A]);
        // With a limit, the latest traces of all tenants together, in the same order.
        for limit in 1..=3 {
            let some = server.ok(ADMIN, &format!("/api/traces?service=frontend&limit={limit}")).await;
            assert_eq!(some.as_array().unwrap()[..], found.as_array().unwrap()[..limit], "limit {limit}");
        }
    }
}

/// No or a bad token is 401, bad parameters 400, an unknown trace 404, all in jaeger-query's
/// error envelope.
#[tokio::test]
async fn errors() {
    for backend in backends() {
        let server = start(backend).await;
        seed(&server).await;
        let routes = [
            "/api/services".to_string(),
            "/api/services/frontend/operations".to_string(),
            "/api/operations?service=frontend".to_string(),
            "/api/traces?service=frontend".to_string(),
            format!("/api/traces/{TRACE_A}"),
            "/api/dependencies".to_string(),
        ];
        for route in &routes {
            let message = server.error(None, None, route, 401).await;
            assert!(message.contains("Authorization"), "{message}");
            server.error(Some("wrong"), None, route, 401).await;
            // Even with a tenant named: the token decides.
            server.error(None, Some("acme"), route, 401).await;
        }
        assert_eq!(
            server.error(Some(ACME), None, "/api/traces/00000000000000000000000000000123", 404).await,
            "trace not found"
        );
        for (path, needle) in [
            ("/api/traces/not-a-trace-id", "traceID"),
            ("/api/traces/123456789012345678901234567890123", "traceID"),
            ("/api/traces", "service"),
            ("/api/traces?operation=x", "service"),
            ("/api/traces?service=frontend&minDuration=abc", "minDuration"),
            ("/api/traces?service=frontend&maxDuration=1.2%20s", "maxDuration"),
            ("/api/traces?service=frontend&minDuration=2s&maxDuration=1s", "maxDuration"),
            ("/api/traces?service=frontend&limit=many", "limit"),
            ("/api/traces?service=frontend&start=yesterday", "start"),
            ("/api/traces?service=frontend&tags=%7Bnot%20json", "tags"),
            ("/api/traces?service=frontend&tag=nocolon", "tag"),
            ("/api/traces?traceID=xyz", "traceID"),
            ("/api/operations", "service"),
            ("/api/dependencies?endTs=soon", "endTs"),
            ("/api/dependencies?lookback=1h", "lookback"),
            (&format!("/api/traces/{TRACE_A}?start=x"), "start"),
            // Limits: each search reads every matching span of its window.
            ("/api/traces?service=frontend&start=0&end=2764800000000", "longer than 31 days"),
            ("/api/dependencies?endTs=2764800001&lookback=2764800001", "longer than 31 days"),
            (&format!("/api/traces?{}", format!("traceID={TRACE_A}&").repeat(101)), "101 traceID parameters"),
            (
                &format!("/api/traces?service=frontend{}", "&tag=k:v".repeat(33)),
                "33 tag conditions, more than the limit of 32",
            ),
            (&format!("/api/traces?service=frontend&tag=k:{}", "v".repeat(1025)), "longer than 1024 bytes"),
        ] {
            let message = server.error(Some(ACME), None, path, 400).await;
            assert!(message.contains(needle), "{path}: {message}");
        }
    }
}
