//! The Prometheus HTTP API under `/prometheus` (issue 6), served on a real socket, on SQLite and
//! on a PostgreSQL server the test starts:
//! - Grafana's requests, replayed from `fixtures/grafana-prometheus-requests.txt` (derived from
//!   Grafana's source; see the file), with the response shapes Grafana decodes;
//! - PromQL numbers on fixed samples, checked against values computed by hand below;
//! - the usage and billing series against billing's own figures (the `/billing/usage` API and
//!   `Billing::invocation_costs`), hour by hour and over whole periods, late usage included;
//! - tenant isolation in every endpoint; unsupported PromQL refused by name;
//! - `promtool query instant` / `query range` as a real client.
//!
//! `cargo test --release -p dashboard --test integration -- --ignored --nocapture prometheus::`
//! runs the timing of a 30-day range query over 100 000 invocations (not asserted:
//! BENCHMARKS.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use billing::Billing;
use billing::api::{ApiState, ViewerResolver};
use billing::usage::{Kind, UsageRecord};
use collector::clock::Clock;
use collector::model::{Batch, SampleRow, SpanRow};
use collector::store::TelemetryStore;
use contract::Viewer;
use dashboard::DashboardState;
use serde_json::{Value, json};
use testkit::PgServer;

// ---------------------------------------------------------------------------------------------
// Backends, tokens, server

enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(PgServer),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => format!("sqlite://{}", dir.path().join("telemetry.db").display()),
            Backend::Postgres(server) => server.url(),
        }
    }

    /// Where the store's span blocks go.
    fn blocks(&self) -> std::path::PathBuf {
        match self {
            Backend::Sqlite(dir) => dir.path().join("telemetry.db.blocks"),
            Backend::Postgres(server) => server.blocks_dir(),
        }
    }
}

fn require_all() -> bool {
    std::env::var("SFAAS_TEST_REQUIRE_ALL").as_deref() == Ok("1")
}

/// SQLite always; PostgreSQL when its server binaries are here (required in CI).
fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite(tempfile::tempdir().unwrap())];
    match PgServer::start() {
        Some(server) => backends.push(Backend::Postgres(server)),
        None if require_all() => {
            panic!("PostgreSQL server binaries are required (SFAAS_TEST_REQUIRE_ALL=1): see `pg_config --bindir`")
        }
        None => eprintln!("SKIPPED on PostgreSQL: no server binaries (pg_config --bindir)"),
    }
    backends
}

const ADMIN: &str = "admin-token";
const ACME: &str = "acme-token";
const GLOBEX: &str = "globex-token";

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Fixed tokens: Bearer, or Basic with the token as password (what promtool sends from URL
/// user info).
struct Tokens;

impl ViewerResolver for Tokens {
    fn resolve(&self, token: &str) -> Option<Viewer> {
        match token {
            ADMIN => Some(Viewer::Admin),
            ACME => Some(Viewer::Tenant("acme".into())),
            GLOBEX => Some(Viewer::Tenant("globex".into())),
            _ => None,
        }
    }
}

const CARD: &str = r#"
period: month
grace_hours: 72
default_plan: starter
plans:
  starter:
    currency: EUR
    prices:
      invocations: { unit_price: "0.001", free: "5" }
      cpu_ms:
        free: "100"
        tiers:
          - { up_to: "1000", unit_price: "0.0001" }
          - { unit_price: "0.00005" }
      bytes_out: { unit_price: "0.000001" }
      state_byte_seconds: { unit_price: "0.0000001", free: "1000" }
"#;

/// What "now" is when a test starts: after October's grace window (72 h), so September and
/// October are final at the first billing run, and November is the open period.
const NOW: &str = "2026-11-10T12:00:00Z";

struct Env {
    backend: Backend,
    /// Every component's "now" (the store's clock, which billing and the API read).
    clock: Clock,
    store: TelemetryStore,
    billing: Arc<Billing>,
    /// The API with its usage cache (waiting for it to load), one that reads usage per query,
    /// and one with the default options (the cache loads in the background).
    cached: String,
    uncached: String,
    default: String,
    /// One whose queries time out at once (the default's options, a zero query timeout).
    limited: String,
    base: std::sync::Mutex<String>,
    http: reqwest::Client,
}

async fn env(backend: Backend) -> Env {
    let clock = Clock::starting_at(ns(NOW));
    let store =
        TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap().with_clock(clock.clone());
    let mut billing = Billing::open(&store).await.unwrap();
    billing.set_settle(Duration::ZERO);
    billing.apply_rate_card(CARD).await.unwrap();
    let billing = Arc::new(billing);
    let state =
        DashboardState { store: store.clone(), billing: billing.clone(), resolver: Arc::new(Tokens), settle: None };
    let mut bases = Vec::new();
    // The cached API waits for its sums to load, so that the tests read them deterministically.
    let defaults = dashboard::prometheus::Options::default();
    for options in [
        dashboard::prometheus::Options { cache_wait: true, ..defaults.clone() },
        dashboard::prometheus::Options { cache_max_records: 0, ..defaults.clone() },
        defaults.clone(),
        dashboard::prometheus::Options { query_timeout: Duration::ZERO, max_samples: 3, ..defaults },
    ] {
        let app = dashboard::prometheus::router_with(state.clone(), options).merge(billing::api::router(ApiState {
            billing: billing.clone(),
            resolver: Arc::new(Tokens),
            settle: None,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        bases.push(format!("http://{addr}"));
    }
    let (cached, uncached, default, limited) = (bases[0].clone(), bases[1].clone(), bases[2].clone(), bases[3].clone());
    Env {
        backend,
        clock,
        store,
        billing,
        base: std::sync::Mutex::new(cached.clone()),
        cached,
        uncached,
        default,
        limited,
        http: reqwest::Client::new(),
    }
}

/// Percent-encodes a query parameter.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

impl Env {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    /// Sends the next requests to the API with or without its usage cache.
    fn use_cache(&self, cache: bool) {
        self.use_base(if cache { &self.cached } else { &self.uncached });
    }

    fn use_base(&self, base: &str) {
        *self.base.lock().unwrap() = base.to_string();
    }

    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base());
        let mut request = match method {
            "GET" => self.http.get(&url),
            "POST" => self.http.post(&url),
            other => self.http.request(other.parse().unwrap(), &url),
        };
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        self.send("GET", path, Some(token), &[], None).await
    }

    async fn post_form(&self, token: &str, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
        self.send(
            "POST",
            path,
            Some(token),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(form(pairs)),
        )
        .await
    }

    /// An instant query's `data` (it must succeed).
    async fn instant(&self, token: &str, expr: &str, time: &str) -> Value {
        let (status, body) =
            self.post_form(token, "/prometheus/api/v1/query", &[("query", expr), ("time", time)]).await;
        assert_eq!(status, 200, "{expr} on {}: {body}", self.name());
        assert_eq!(body["status"], "success", "{body}");
        body["data"].clone()
    }

    async fn range(&self, token: &str, expr: &str, start: &str, end: &str, step: &str) -> Value {
        let (status, body) = self
            .post_form(
                token,
                "/prometheus/api/v1/query_range",
                &[("query", expr), ("start", start), ("end", end), ("step", step)],
            )
            .await;
        assert_eq!(status, 200, "{expr} on {}: {body}", self.name());
        assert_eq!(body["data"]["resultType"], "matrix", "{body}");
        body["data"].clone()
    }
}

/// `k=v,k=v` of a result's labels.
fn key(metric: &Value) -> String {
    metric
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",")
}

fn number(v: &Value) -> f64 {
    match v.as_str().unwrap() {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        s => s.parse().unwrap(),
    }
}

/// An instant vector as labels → value.
fn vector(data: &Value) -> BTreeMap<String, f64> {
    assert_eq!(data["resultType"], "vector", "{data}");
    data["result"].as_array().unwrap().iter().map(|s| (key(&s["metric"]), number(&s["value"][1]))).collect()
}

/// A matrix as labels → [(seconds, value)].
fn matrix(data: &Value) -> BTreeMap<String, Vec<(f64, f64)>> {
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let values =
                s["values"].as_array().unwrap().iter().map(|p| (p[0].as_f64().unwrap(), number(&p[1]))).collect();
            (key(&s["metric"]), values)
        })
        .collect()
}

fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0)
}

#[track_caller]
fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(close(actual, expected), "{what}: got {actual}, expected {expected}");
}

// ---------------------------------------------------------------------------------------------
// Data

fn ns(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_nanos_opt().unwrap()
}

fn secs(rfc3339: &str) -> String {
    (ns(rfc3339) / 1_000_000_000).to_string()
}

fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3)) | 1
}

fn span(tenant: &str, span_id: String, name: &str, start_ns: i64, end_ns: i64, attributes: Value) -> SpanRow {
    SpanRow {
        tenant: tenant.into(),
        trace_id: format!("{:032x}", u128::from(fxhash(&span_id))),
        span_id,
        parent_span_id: None,
        name: name.into(),
        kind: 2,
        start_ns,
        end_ns,
        status_code: 0,
        status_message: String::new(),
        service_name: "sfaas-core".into(),
        attributes: attributes.to_string(),
        events: "[]".into(),
        links: "[]".into(),
        resource: json!({"service.name": "sfaas-core", "service.namespace": tenant}).to_string(),
        scope: "{}".into(),
        metered: true,
    }
}

/// An `invoke` span of the core (docs/contracts.md, "Telemetry contract"), metered.
fn invoke(tenant: &str, call_id: &str, function: &str, at: &str, cpu_ms: i64, bytes_out: i64) -> SpanRow {
    let start = ns(at);
    span(
        tenant,
        format!("{:016x}", fxhash(call_id)),
        &format!("invoke {function}"),
        start,
        start + 5_000_000,
        json!({
            "faas.name": function, "sfaas.call_id": call_id, "faas.trigger": "http",
            // The gateway's execution id (the billing key) is a UUID: one made of the call id.
            "faas.invocation_id": format!("00000000-0000-7000-8000-{:012x}", fxhash(call_id) & 0xffff_ffff_ffff),
            "faas.coldstart": false, "sfaas.cpu_ms": cpu_ms, "sfaas.wall_ms": 5,
            "sfaas.memory.peak_bytes": 1_048_576, "sfaas.bytes_in": 100, "sfaas.bytes_out": bytes_out,
            "http.response.status_code": 200, "sfaas.billable": true,
        }),
    )
}

/// A `state.usage` span: one interval of a tenant's standing storage.
fn state_usage(tenant: &str, from: &str, to: &str, byte_seconds: &str) -> SpanRow {
    let usage_id = format!("state/standing/{}", ns(from));
    span(
        tenant,
        format!("{:016x}", fxhash(&usage_id)),
        "state.usage",
        ns(from),
        ns(to),
        json!({
            "sfaas.usage_id": usage_id, "sfaas.state.owner": "standing",
            "sfaas.state.byte_seconds": byte_seconds, "sfaas.billable": true,
        }),
    )
}

fn sample(tenant: &str, metric: &str, labels: Value, kind: &'static str, at_ns: i64, value: f64) -> SampleRow {
    SampleRow {
        tenant: tenant.into(),
        metric: metric.into(),
        labels: labels.to_string(),
        kind,
        ts_ns: at_ns,
        value,
        histogram: None,
        metered: false,
    }
}

/// 2026-10-10T12:00:00Z, where the stored samples start.
const T0: &str = "2026-10-10T12:00:00Z";

/// The fixed data every test reads (see the module docs of each test for the hand-computed
/// values):
/// - acme `http_requests_total{code="200",job="api"}`: every 15 s from T0 for 10 min, 10·i;
///   `{code="500"}`: 2·i, reset after i = 9 to 2·(i − 10) + 1;
/// - acme `request_duration_seconds` (an OTLP histogram, stored whole) every minute m = 0..10:
///   buckets ≤0.1: 10m, ≤0.5: 30m, ≤1: 40m, +Inf: 40m; count 40m, sum 12m;
/// - acme `queue_depth` with a `tenant` label of its own; globex `http_requests_total` and
///   `globex_secret_total`;
/// - usage: acme resize ×3 in September; in October etl daily Oct 2..6 (300 ms, 5000 B),
///   resize ×8 from Oct 10 12:00:05 every 7 min (120 ms, 2048 B), thumb at 12:00:10, 12:00:20,
///   12:02:30 and Oct 15 09:30 (40 ms, 512 B), standing state on Oct 5 (720000.5 byte-s) and
///   Oct 12 (1500.25 byte-s); globex resize ×2 on Oct 10; then, after billing ran and made
///   September final, a late acme resize of September 25 (billed on November's invoice).
async fn seed(env: &Env) {
    let t0 = ns(T0);
    let s = 1_000_000_000i64;
    let mut samples = Vec::new();
    for i in 0..=40i64 {
        let t = t0 + i * 15 * s;
        let api = |code: &str| json!({"code": code, "job": "api"});
        samples.push(sample("acme", "http_requests_total", api("200"), "counter", t, 10.0 * i as f64));
        let v500 = if i < 10 { 2 * i } else { 2 * (i - 10) + 1 };
        samples.push(sample("acme", "http_requests_total", api("500"), "counter", t, v500 as f64));
        samples.push(sample("globex", "http_requests_total", api("200"), "counter", t, 1000.0 * i as f64));
    }
    for m in 0..=10i64 {
        let mf = m as f64;
        let detail = json!({"count": 40 * m, "sum": 12.0 * mf,
            "buckets": [[0.1, 10 * m], [0.5, 30 * m], [1.0, 40 * m], ["+Inf", 40 * m]]});
        let mut row =
            sample("acme", "request_duration_seconds", json!({"job": "api"}), "histogram", t0 + m * 60 * s, 12.0 * mf);
        row.histogram = Some(detail.to_string());
        samples.push(row);
    }
    samples.push(sample("acme", "queue_depth", json!({"queue": "q1", "tenant": "spoof"}), "gauge", t0, 7.0));
    samples.push(sample("globex", "globex_secret_total", json!({"job": "vault"}), "counter", t0, 42.0));
    env.store.write(&Batch { samples, ..Batch::default() }).await.unwrap();

    let mut spans = Vec::new();
    for i in 0..3 {
        spans.push(invoke(
            "acme",
            &format!("sep-{i}"),
            "resize",
            &format!("2026-09-20T10:{:02}:00Z", i * 10),
            50,
            1000,
        ));
    }
    for day in 2..=6 {
        spans.push(invoke("acme", &format!("etl-{day}"), "etl", &format!("2026-10-{day:02}T08:00:00Z"), 300, 5000));
    }
    for i in 0..8 {
        let at = t0 + (5 + i * 7 * 60) * s;
        let at = chrono::DateTime::from_timestamp_nanos(at).to_rfc3339();
        spans.push(invoke("acme", &format!("resize-{i}"), "resize", &at, 120, 2048));
    }
    for (i, at) in ["2026-10-10T12:00:10Z", "2026-10-10T12:00:20Z", "2026-10-10T12:02:30Z", "2026-10-15T09:30:00Z"]
        .iter()
        .enumerate()
    {
        spans.push(invoke("acme", &format!("thumb-{i}"), "thumb", at, 40, 512));
    }
    spans.push(state_usage("acme", "2026-10-05T00:00:00Z", "2026-10-05T01:00:00Z", "720000.5"));
    spans.push(state_usage("acme", "2026-10-12T00:00:00Z", "2026-10-12T01:00:00Z", "1500.25"));
    spans.push(invoke("globex", "g-1", "resize", "2026-10-10T12:01:00Z", 999, 1));
    spans.push(invoke("globex", "g-2", "resize", "2026-10-10T12:03:00Z", 999, 1));
    env.store.write(&Batch { spans, ..Batch::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    env.billing.run(None).await.unwrap();
    // September and October are final now: this one is late, billed on November's invoice.
    let late = vec![invoke("acme", "late-1", "resize", "2026-09-25T10:00:00Z", 70, 100)];
    env.store.write(&Batch { spans: late, ..Batch::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    let report = env.billing.run(None).await.unwrap();
    assert_eq!(report.late_records, 1, "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// (a) Grafana

struct FixtureRequest {
    name: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn grafana_requests() -> Vec<FixtureRequest> {
    let text = include_str!("fixtures/grafana-prometheus-requests.txt");
    let mut out = Vec::new();
    for block in text.split("\n### ").skip(1) {
        let mut lines = block.lines();
        let name = lines.next().unwrap().trim().to_string();
        let (method, path) = lines.next().unwrap().split_once(' ').unwrap();
        let mut headers = Vec::new();
        let mut body = String::new();
        let mut in_body = false;
        for line in lines {
            if in_body {
                if !line.is_empty() {
                    body = line.to_string();
                }
                break;
            }
            if line.is_empty() {
                in_body = true;
            } else if let Some((k, v)) = line.split_once(": ") {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        out.push(FixtureRequest { name, method: method.into(), path: path.into(), headers, body });
    }
    out
}

/// The PromQL of the panels of the Grafana dashboards provisioned with the project
/// (`deploy/grafana/dashboards`), Grafana's interval variables replaced as Grafana would.
fn provisioned_panel_queries() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let Ok(dashboard) = serde_json::from_str::<Value>(&text) else { continue };
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(expr)) = map.get("expr") {
                        out.push(
                            expr.replace("$__rate_interval", "5m")
                                .replace("$__interval", "1h")
                                .replace("$__range", "1d"),
                        );
                    }
                    map.values().for_each(|v| walk(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        walk(&dashboard, &mut out);
    }
    out
}

/// A `[time, "value"]` pair as Grafana's converter reads it (readTimeValuePair).
fn assert_pair(pair: &Value) {
    let pair = pair.as_array().unwrap();
    assert_eq!(pair.len(), 2);
    assert!(pair[0].is_number(), "{pair:?}");
    assert!(pair[1].is_string(), "{pair:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_requests_get_what_grafana_decodes() {
    let requests = grafana_requests();
    assert_eq!(requests.len(), 14, "fixture requests");
    for backend in backends() {
        let env = env(backend).await;
        seed(&env).await;
        for request in &requests {
            let headers: Vec<(&str, &str)> = request.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let body = (request.method == "POST").then(|| request.body.clone());
            let path = format!("/prometheus{}", request.path);
            let (status, answer) = env.send(&request.method, &path, Some(ACME), &headers, body).await;
            let what = format!("{} on {}: {answer}", request.name, env.name());
            assert_eq!(status, 200, "{what}");
            assert_eq!(answer["status"], "success", "{what}");
            let data = &answer["data"];
            match request.name.as_str() {
                "health-check" | "post-params-in-url" => {
                    assert_eq!(data["resultType"], "scalar", "{what}");
                    assert_eq!(data["result"], json!([4, "2"]), "{what}");
                }
                "buildinfo" => {
                    // map[string]string in Grafana: an object, and empty (so: Prometheus).
                    assert_eq!(data["features"], json!({}), "{what}");
                    for field in ["version", "revision", "branch", "buildUser", "buildDate", "goVersion"] {
                        assert!(data[field].is_string(), "{field}: {what}");
                    }
                }
                "metric-names" => {
                    let names: Vec<&str> = data.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                    for name in
                        ["http_requests_total", "request_duration_seconds_bucket", "sfaas_usage_invocations_total"]
                    {
                        assert!(names.contains(&name), "{name}: {what}");
                    }
                    assert!(!names.contains(&"globex_secret_total"), "{what}");
                    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {what}");
                }
                "metadata" => {
                    let object = data.as_object().unwrap();
                    assert_eq!(object["http_requests_total"][0]["type"], "counter", "{what}");
                    assert_eq!(object["request_duration_seconds"][0]["type"], "histogram", "{what}");
                    assert_eq!(object["sfaas_billing_cost_total"][0]["type"], "counter", "{what}");
                    for entries in object.values() {
                        for entry in entries.as_array().unwrap() {
                            for field in ["type", "help", "unit"] {
                                assert!(entry[field].is_string(), "{field}: {what}");
                            }
                        }
                    }
                }
                "label-names" => {
                    let names: Vec<&str> = data.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                    for name in ["__name__", "code", "function", "job", "le", "tenant"] {
                        assert!(names.contains(&name), "{name}: {what}");
                    }
                }
                "label-names-with-match" => {
                    assert_eq!(data, &json!(["__name__", "function", "plan"]), "{what}");
                }
                "label-values-with-match" => {
                    assert_eq!(data, &json!(["etl", "resize", "thumb"]), "{what}");
                }
                "series" => {
                    let series = data.as_array().unwrap();
                    let keys: Vec<String> = series.iter().map(key).collect();
                    assert!(keys.contains(&"__name__=http_requests_total,code=200,job=api".to_string()), "{what}");
                    assert!(
                        keys.contains(&"__name__=sfaas_billing_cost_total,currency=EUR,function=etl".to_string()),
                        "{what}"
                    );
                    // A tenant's series carry their own labels only: none names the tenant.
                    assert!(series.iter().all(|s| s["tenant"] != "acme"), "{what}");
                }
                "rules" => assert_eq!(data["groups"], json!([]), "{what}"),
                "exemplars-probe" => assert!(data.is_array(), "{what}"),
                "panel-query-range" => {
                    assert_eq!(data["resultType"], "matrix", "{what}");
                    let series = matrix(data);
                    assert_eq!(
                        series.keys().cloned().collect::<Vec<_>>(),
                        ["function=etl", "function=resize", "function=thumb"]
                    );
                    for s in data["result"].as_array().unwrap() {
                        for pair in s["values"].as_array().unwrap() {
                            assert_pair(pair);
                        }
                    }
                    // 25 steps of an hour over Oct 10; thumb's series starts at 12:00, so it
                    // has values from 13:00 on. At 13:00 the window (12:00, 13:00] holds the
                    // samples 12:01 (2: the invocations of 12:00:10 and :20) .. 13:00 (3):
                    // an increase of 1 over 59 min, extrapolated to the hour.
                    assert_eq!(series["function=resize"].len(), 25, "{what}");
                    assert_eq!(series["function=thumb"].len(), 12, "{what}");
                    let thirteen = series["function=thumb"].iter().find(|p| p.0 == 1791637200.0).unwrap();
                    assert_close(thirteen.1, 60.0 / 59.0, &what);
                }
                "panel-query-range-get" => {
                    let series = matrix(data);
                    // rate over [1m] of +10 per 15 s: 2/3 per second wherever the window is full.
                    let at_five = series["code=200"].iter().find(|p| p.0 == 1791633900.0).unwrap();
                    assert_close(at_five.1, 2.0 / 3.0, &what);
                }
                "panel-instant" => {
                    assert_eq!(data["resultType"], "vector", "{what}");
                    for s in data["result"].as_array().unwrap() {
                        assert_pair(&s["value"]);
                        assert!(s["metric"].is_object(), "{what}");
                    }
                }
                other => panic!("no check for fixture request {other}"),
            }
        }
        // The provisioned dashboards' panels (deploy/grafana) run.
        let panels = provisioned_panel_queries();
        assert!(!panels.is_empty() || !std::path::Path::new("../deploy/grafana/dashboards").exists(), "{panels:?}");
        for expr in panels {
            let data = env.range(ACME, &expr, "1791590400", "1791676800", "3600").await;
            assert!(data["result"].is_array(), "{expr}: {data}");
        }
        // Grafana retries a POST answered 400/405 with GET: never needed here, every route
        // takes both. A read token with another tenant's X-Scope-OrgID is refused.
        let (status, answer) = env
            .send("GET", "/prometheus/api/v1/query?query=1%2B1", Some(ACME), &[("X-Scope-OrgID", "globex")], None)
            .await;
        assert_eq!(
            (status, answer["status"].as_str(), answer["errorType"].as_str()),
            (403, Some("error"), Some("forbidden"))
        );
        let (status, answer) = env.send("GET", "/prometheus/api/v1/query?query=1%2B1", None, &[], None).await;
        assert_eq!((status, answer["errorType"].as_str()), (401, Some("unauthorized")), "{answer}");
        // Basic auth with the token as password (promtool from URL user info).
        let basic = format!("Basic {}", base64_encode(b"acme:acme-token"));
        let (status, answer) = env
            .send("GET", "/prometheus/api/v1/query?query=vector(3)", None, &[("Authorization", basic.as_str())], None)
            .await;
        assert_eq!(status, 200, "{answer}");
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Numbers

/// Hand-computed, with Prometheus 3's rules (windows `(t - range, t]`, extrapolation to the
/// window's edge when the first/last sample is within 1.1 × the average interval of it,
/// counters not extrapolated below zero):
///
/// - `rate(http_requests_total{code="200"}[1m])` at T0+5m: samples 4:15..5:00 = 170..200
///   (4 samples, 45 s apart in all): 30 × (45 + 15) / 45 = 40 over 60 s = 2/3 per second;
///   `increase` = 40.
/// - `sum by (code) (increase(http_requests_total[2m]))` at T0+5m: i = 13..20 (105 s);
///   code 200: 130→200 = 70 × 120 / 105 = 80; code 500: 7→21 = 14 × 120/105 = 16.
/// - `increase(http_requests_total{code="500"}[3m])` at T0+4m, across the reset: i = 5..16,
///   10, 12, 14, 16, 18, 1, 3, ..., 13: 13 − 10 + 18 (the reset adds the value before it) = 21
///   over 165 s, extrapolated by 15 s: 21 × 180 / 165 = 22.909...
/// - `irate(http_requests_total{code="200"}[1m])` at T0+5m: (200 − 190) / 15 s.
/// - `histogram_quantile(0.5, sum by (le) (rate(request_duration_seconds_bucket[5m])))` at
///   T0+10m: minutes 6..10, increases ≤0.1: 40, ≤0.5: 120, ≤1: 160, +Inf: 160 (the same
///   extrapolation factor for all); rank 80 falls in (0.1, 0.5]: 0.1 + 0.4 × (80 − 40)/(120 − 40)
///   = 0.3; the 0.9 quantile: rank 144 in (0.5, 1]: 0.5 + 0.5 × (144 − 120)/40 = 0.8.
/// - `rate(request_duration_seconds_sum[5m])`: 12 per minute = 0.2 per second.
/// - `sum by (function) (rate(sfaas_usage_invocations_total[5m]))` on Oct 10 at 12:05: the
///   counters are sampled at whole minutes: thumb's 12:00:10 and 12:00:20 are in its first
///   sample of the window (12:01, value 2), the 12:02:30 one raises it to 3 at 12:03; 5 samples
///   12:01..12:05: 1 × 300/240 = 1.25 over 300 s; resize and etl did not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_numbers_match_the_hand_computed_ones() {
    let t0 = ns(T0) / 1_000_000_000;
    let at = |minutes: i64| (t0 + minutes * 60).to_string();
    for backend in backends() {
        let env = env(backend).await;
        seed(&env).await;
        let e = &env;
        let name = env.name();

        let v = vector(&e.instant(ACME, r#"rate(http_requests_total{code="200"}[1m])"#, &at(5)).await);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_close(v["code=200,job=api"], 2.0 / 3.0, name);
        let v = vector(&e.instant(ACME, r#"increase(http_requests_total{code=~"2.."}[1m])"#, &at(5)).await);
        assert_close(v["code=200,job=api"], 40.0, name);
        let v = vector(&e.instant(ACME, "sum by (code) (increase(http_requests_total[2m]))", &at(5)).await);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_close(v["code=200"], 80.0, name);
        assert_close(v["code=500"], 16.0, name);
        let v = vector(&e.instant(ACME, r#"increase(http_requests_total{code!="200"}[3m])"#, &at(4)).await);
        assert_close(v["code=500,job=api"], 21.0 * 180.0 / 165.0, name);
        let v = vector(&e.instant(ACME, r#"irate(http_requests_total{code="200"}[1m])"#, &at(5)).await);
        assert_close(v["code=200,job=api"], 10.0 / 15.0, name);
        // offset: the same rate five minutes earlier (T0+0: only 1 sample in (−1m, 0] → none).
        let v = vector(&e.instant(ACME, r#"rate(http_requests_total{code="200"}[1m] offset 5m)"#, &at(10)).await);
        assert_close(v["code=200,job=api"], 2.0 / 3.0, name);
        // Instant selectors look back 5 minutes: T0+15m sees the last sample (T0+10m).
        // Instant selectors look back 5 minutes, left-open: T0+14m sees the last sample
        // (T0+10m), T0+15m no longer does.
        let v = vector(&e.instant(ACME, r#"http_requests_total{code="200"}"#, &at(14)).await);
        assert_close(v["__name__=http_requests_total,code=200,job=api"], 400.0, name);
        assert!(vector(&e.instant(ACME, r#"http_requests_total{code="200"}"#, &at(15)).await).is_empty());

        let q = "histogram_quantile(0.5, sum by (le) (rate(request_duration_seconds_bucket[5m])))";
        let v = vector(&e.instant(ACME, q, &at(10)).await);
        assert_close(v[""], 0.3, name);
        let q = r#"histogram_quantile(0.9, sum by (le, job) (rate(request_duration_seconds_bucket{job=~"a.*"}[5m])))"#;
        let v = vector(&e.instant(ACME, q, &at(10)).await);
        assert_close(v["job=api"], 0.8, name);
        let v = vector(&e.instant(ACME, "rate(request_duration_seconds_sum[5m])", &at(10)).await);
        assert_close(v["job=api"], 0.2, name);
        let v = vector(&e.instant(ACME, "request_duration_seconds_count", &at(10)).await);
        assert_close(v["__name__=request_duration_seconds_count,job=api"], 400.0, name);
        let v = vector(&e.instant(ACME, r#"request_duration_seconds_bucket{le="+Inf"}"#, &at(10)).await);
        assert_eq!(v.len(), 1, "{v:?}");

        // Arithmetic and comparisons, vector/scalar and vector/vector (on/ignoring), sets.
        let data = e.instant(ACME, "1+1", &at(0)).await;
        assert_eq!(data, json!({"resultType": "scalar", "result": [t0, "2"]}));
        let data = e.instant(ACME, r#""sfaas""#, &at(0)).await;
        assert_eq!(data["resultType"], "string");
        assert_eq!(data["result"][1], "sfaas");
        let data = e.instant(ACME, "-(2 ^ 3) % 5 + 1 / 0", &at(0)).await;
        assert_eq!(data["result"][1], "+Inf");
        let v = vector(&e.instant(ACME, r#"http_requests_total{code="200"} / 10 > 39"#, &at(10)).await);
        assert_close(v["code=200,job=api"], 40.0, name);
        let v = vector(&e.instant(ACME, r#"http_requests_total > bool 100"#, &at(10)).await);
        assert_eq!((v["code=200,job=api"], v["code=500,job=api"]), (1.0, 0.0));
        let v = vector(&e.instant(ACME, r#"http_requests_total > 100"#, &at(10)).await);
        assert_eq!(v.keys().collect::<Vec<_>>(), ["__name__=http_requests_total,code=200,job=api"]);
        let q = r#"http_requests_total{code="200"} - ignoring (code) http_requests_total{code="500"}"#;
        let v = vector(&e.instant(ACME, q, &at(10)).await);
        assert_close(v["job=api"], 400.0 - 61.0, name);
        let q = r#"sum by (job) (http_requests_total) / on (job) sum by (job) (request_duration_seconds_count)"#;
        let v = vector(&e.instant(ACME, q, &at(10)).await);
        assert_close(v["job=api"], 461.0 / 400.0, name);
        let q = r#"http_requests_total and on (code) http_requests_total{code="500"}"#;
        let v = vector(&e.instant(ACME, q, &at(10)).await);
        assert_eq!(v.len(), 1, "{v:?}");
        let v = vector(&e.instant(ACME, "count(http_requests_total) + sum(vector(1))", &at(10)).await);
        assert_close(v[""], 3.0, name);
        let v = vector(
            &e.instant(ACME, "max without (code) (http_requests_total) - min(http_requests_total)", &at(10)).await,
        );
        assert!(v.is_empty(), "no shared labels: {v:?}");
        let v = vector(&e.instant(ACME, "avg without (code) (http_requests_total)", &at(10)).await);
        assert_close(v["job=api"], 230.5, name);
        // A tenant reads its series with their own labels, its own `tenant` label included; the
        // admin, who reads every tenant's, gets the tenant as `tenant` and the series' own as
        // `exported_tenant`.
        let v = vector(&e.instant(ACME, r#"{__name__=~"queue_.*"}"#, &at(0)).await);
        assert_close(v["__name__=queue_depth,queue=q1,tenant=spoof"], 7.0, name);
        let v = vector(&e.instant(ADMIN, r#"{__name__=~"queue_.*"}"#, &at(0)).await);
        assert_close(v["__name__=queue_depth,exported_tenant=spoof,queue=q1,tenant=acme"], 7.0, name);

        // A range selector as the result of an instant query: the raw samples.
        let data = e.instant(ACME, r#"http_requests_total{code="200"}[1m]"#, &at(5)).await;
        assert_eq!(data["resultType"], "matrix");
        assert_eq!(data["result"][0]["values"].as_array().unwrap().len(), 4, "{data}");

        // The synthesized counters.
        let q = "sum by (function) (rate(sfaas_usage_invocations_total[5m]))";
        let v = vector(&e.instant(ACME, q, &at(5)).await);
        assert_eq!(v.len(), 3, "{v:?}");
        assert_close(v["function=thumb"], 1.25 / 300.0, name);
        assert_close(v["function=resize"], 0.0, name);
        assert_close(v["function=etl"], 0.0, name);
        let v = vector(&e.instant(ACME, r#"irate(sfaas_usage_invocations_total{function="thumb"}[5m])"#, &at(3)).await);
        assert_close(v["function=thumb,plan=starter"], 1.0 / 60.0, name);
        let data = e.instant(ACME, r#"sfaas_usage_invocations_total{function="thumb"}[4m]"#, &at(3)).await;
        let values: Vec<f64> = data["result"][0]["values"].as_array().unwrap().iter().map(|p| number(&p[1])).collect();
        assert_eq!(values, [0.0, 2.0, 2.0, 3.0], "12:00..12:03 (the series starts at 12:00): {data}");

        // A range query at a 1-minute step agrees with the instant queries.
        let data = e.range(ACME, q, &at(1), &at(9), "60").await;
        let series = matrix(&data);
        let thumb: BTreeMap<i64, f64> = series["function=thumb"].iter().map(|(t, v)| (*t as i64, *v)).collect();
        for minute in 1..=9 {
            let instant = vector(&e.instant(ACME, q, &at(minute)).await);
            assert_close(thumb[&(t0 + minute * 60)], instant["function=thumb"], &format!("minute {minute} on {name}"));
        }
    }
}

/// Billing's figures by function for a tenant's period, from the `/billing/usage` API.
async fn usage_api(env: &Env, tenant: &str, period: &str) -> BTreeMap<String, Value> {
    let (status, body) = env.get(ADMIN, &format!("/billing/usage/{tenant}?period={period}&by=function")).await;
    assert_eq!(status, 200, "{body}");
    body["rows"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn decimal(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap(),
        other => other.as_f64().unwrap(),
    }
}

/// The usage and billing series against billing's own figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_series_equal_the_billing_figures() {
    for backend in backends() {
        let env = env(backend).await;
        seed(&env).await;
        for cache in [true, false] {
            env.use_cache(cache);
            billing_figures(&env, if cache { "with the usage cache" } else { "read per query" }, true).await;
        }
        // The default options: the first queries are answered per query while the sums load.
        env.use_base(&env.default);
        billing_figures(&env, "while the usage cache loads", true).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        billing_figures(&env, "once the usage cache loaded", true).await;
        let name = env.name();
        let nov1 = secs("2026-11-01T00:00:00Z");
        env.use_cache(true);
        // 3 + 1 late in September, 5 etl, 8 resize and 4 thumb in October.
        assert_eq!(acme_total(&env).await, 21.0, "acme's invocations on {name}");

        // New usage reaches the cached sums through billing's watermark ...
        env.store
            .write(&Batch {
                spans: vec![invoke("acme", "new-1", "thumb", "2026-10-20T10:00:00Z", 40, 512)],
                ..Batch::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        assert_eq!(env.billing.run(None).await.unwrap().records, 1);
        assert_eq!(acme_total(&env).await, 22.0, "after a billing run on {name}");
        billing_figures(&env, "after new usage, cached", false).await;
        // ... and records written some other way, once the totals know them, reload it.
        big_month(&env, "acme", 30, "2026-10-25T00:00:00Z", 3600).await;
        env.billing.rebuild().await.unwrap();
        assert_eq!(acme_total(&env).await, 52.0, "after a rebuild on {name}");
        billing_figures(&env, "after a rebuild, cached", false).await;
        env.use_cache(false);
        billing_figures(&env, "after a rebuild, per query", false).await;

        // Many records in one interval that crosses allowances and tiers: priced in slices.
        big_month(&env, "initech", 5000, "2026-10-01T00:00:00Z", 500).await;
        env.billing.rebuild().await.unwrap();
        let costs = env.billing.invocation_costs("initech", "2026-10").await.unwrap();
        assert_eq!(costs.len(), 5000);
        let mut by_function: BTreeMap<String, f64> = BTreeMap::new();
        for c in &costs {
            *by_function.entry(c.function.clone()).or_default() += c.cost.to_string().parse::<f64>().unwrap();
        }
        for cache in [true, false] {
            env.use_cache(cache);
            let (status, body) = env
                .send(
                    "POST",
                    "/prometheus/api/v1/query",
                    Some(ADMIN),
                    &[("Content-Type", "application/x-www-form-urlencoded"), ("X-Scope-OrgID", "initech")],
                    Some(form(&[("query", "sum by (function) (sfaas_billing_cost_total)"), ("time", &nov1)])),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let v = vector(&body["data"]);
            assert_eq!(v.len(), by_function.len(), "{v:?}");
            for (function, expected) in &by_function {
                assert_close(v[&format!("function={function}")], *expected, &format!("initech {function} on {name}"));
            }
        }
    }
}

async fn acme_total(env: &Env) -> f64 {
    let q = "sum(sfaas_usage_invocations_total)";
    vector(&env.instant(ACME, q, &secs("2026-11-01T00:00:00Z")).await)[""]
}

/// The usage and billing series of acme against billing's figures (`what`: which API and
/// when): the usage that happened in October (`Billing::usage_by_function`, whatever invoice it
/// is billed on) and the per-record costs (`Billing::invocation_costs` of every invoice). With
/// `http`, October's figures are also those of the `/billing/usage` API (which shows October's
/// invoice: true while no late October usage exists).
async fn billing_figures(env: &Env, what: &str, http: bool) {
    let name = &format!("{} {what}", env.name());
    let nov1 = secs("2026-11-01T00:00:00Z");
    let mut records = Vec::new();
    for period in ["2026-09", "2026-10", "2026-11"] {
        records.extend(env.billing.invocation_costs("acme", period).await.unwrap());
    }
    let cost = |r: &billing::RecordCost| r.cost.to_string().parse::<f64>().unwrap();
    let row_name = |f: &str| if f.is_empty() { "(state)".to_string() } else { f.to_string() };
    let mut october: BTreeMap<String, BTreeMap<&str, f64>> = BTreeMap::new();
    for (function, totals) in env.billing.usage_by_function("acme", "2026-10").await.unwrap() {
        let row = october.entry(row_name(&function)).or_default();
        row.insert("invocations", totals.invocations as f64);
        row.insert("cpu_ms", totals.cpu_ms as f64);
        row.insert("bytes_out", totals.bytes_out as f64);
        row.insert("state_byte_seconds", totals.state_byte_seconds.to_string().parse().unwrap());
    }
    for r in records.iter().filter(|r| r.usage_period == "2026-10") {
        *october.entry(row_name(&r.function)).or_default().entry("cost").or_default() += cost(r);
    }
    if http {
        let api = usage_api(env, "acme", "2026-10").await;
        assert_eq!(api.keys().collect::<Vec<_>>(), october.keys().collect::<Vec<_>>(), "{name}");
        for (function, row) in &api {
            for (field, value) in &october[function] {
                assert_close(decimal(&row[*field]), *value, &format!("the billing API's {function} {field} on {name}"));
            }
        }
    }

    // October by function (state: no function label, the API's "(state)" row).
    let function_key =
        |labels: &str| labels.split(',').find_map(|kv| kv.strip_prefix("function=")).unwrap_or("(state)").to_string();
    for (metric, field) in [
        ("sfaas_usage_invocations_total", "invocations"),
        ("sfaas_usage_cpu_ms_total", "cpu_ms"),
        ("sfaas_usage_bytes_out_total", "bytes_out"),
        ("sfaas_usage_state_byte_seconds_total", "state_byte_seconds"),
        ("sfaas_billing_cost_total", "cost"),
    ] {
        // `or X * 0`: series that began in October have no sample on October 1.
        let q = format!("sum by (function) ({metric} - ({metric} offset 31d or {metric} * 0))");
        let got: BTreeMap<String, f64> =
            vector(&env.instant(ACME, &q, &nov1).await).into_iter().map(|(k, v)| (function_key(&k), v)).collect();
        for (function, row) in &october {
            let expected = row.get(field).copied().unwrap_or(0.0);
            if expected != 0.0 || got.contains_key(function) {
                let actual = got.get(function).copied().unwrap_or(f64::NAN);
                assert_close(actual, expected, &format!("{q} {function} on {name}"));
            }
        }
        assert!(got.keys().all(|f| october.contains_key(f)), "{q}: {got:?}");
    }
    // increase() is exact where the series starts inside the window and the window ends at
    // a sample (etl's first invocation is on October 2).
    let v = vector(&env.instant(ACME, r#"increase(sfaas_usage_invocations_total{function="etl"}[31d])"#, &nov1).await);
    assert_close(v["function=etl,plan=starter"], 5.0, name);
    let v = vector(&env.instant(ACME, r#"increase(sfaas_billing_cost_total{function="etl"}[31d])"#, &nov1).await);
    assert_close(v["currency=EUR,function=etl"], october["etl"]["cost"], name);

    // Hour by hour through October: each hour's cost by function equals the sum of the
    // per-record costs of the records that started in it (the allowance and tier crossings
    // of Oct 2, 5 and 10 included).
    let mut expected: BTreeMap<(i64, String), f64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.usage_period == "2026-10") {
        let hour_end = (r.start_ns / 1_000_000_000).div_euclid(3600) * 3600 + 3600;
        *expected.entry((hour_end, r.function.clone())).or_default() += cost(r);
    }
    let q = "sfaas_billing_cost_total - (sfaas_billing_cost_total offset 1h or sfaas_billing_cost_total * 0)";
    let data = env.range(ACME, q, &secs("2026-10-01T01:00:00Z"), &nov1, "3600").await;
    let mut seen = 0;
    for (labels, values) in matrix(&data) {
        let function = labels.split(',').find_map(|kv| kv.strip_prefix("function=")).unwrap_or("").to_string();
        for (t, v) in values {
            let want = expected.get(&(t as i64, function.clone())).copied().unwrap_or(0.0);
            assert_close(v, want, &format!("{function} at {t} on {name}"));
            seen += usize::from(want != 0.0);
        }
    }
    assert_eq!(seen, expected.values().filter(|v| **v != 0.0).count(), "every costly hour on {name}");

    // Everything: September's invoice, the late September record on November's, October.
    let mut total_by_function: BTreeMap<String, f64> = BTreeMap::new();
    for r in &records {
        *total_by_function.entry(r.function.clone()).or_default() += cost(r);
    }
    let v = vector(&env.instant(ACME, "sum by (function) (sfaas_billing_cost_total)", &nov1).await);
    for (function, expected) in &total_by_function {
        let key = if function.is_empty() { String::new() } else { format!("function={function}") };
        assert_close(v[&key], *expected, &format!("total {function} on {name}"));
    }
    // The late September record counts in September (when it happened), priced after
    // September's own usage (its cost is on November's invoice).
    let september: f64 = records.iter().filter(|r| r.usage_period == "2026-09").map(cost).sum();
    let late: f64 = records
        .iter()
        .filter(|r| r.usage_period == "2026-09" && r.start_ns == ns("2026-09-25T10:00:00Z"))
        .map(cost)
        .sum();
    assert!(late > 0.0);
    let v = vector(
        &env.instant(ACME, r#"sfaas_billing_cost_total{function="resize"}"#, &secs("2026-10-01T00:00:00Z")).await,
    );
    assert_close(v["__name__=sfaas_billing_cost_total,currency=EUR,function=resize"], september, name);
}

/// Late usage of a final period, across the grace windows: billing's invoices, its
/// per-invocation costs and the dashboard's cost series agree before and after each period
/// becomes final, and no figure changes when one does (issue 25: a test clock that the wall
/// clock passed moved late usage onto an invoice the test did not read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_costs_agree_before_and_after_the_grace_window() {
    for backend in backends() {
        let env = env(backend).await;
        let name = env.name();
        let deliver = |spans: Vec<SpanRow>| async {
            env.store.write(&Batch { spans, ..Batch::default() }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
            env.billing.run(None).await.unwrap()
        };
        // September's usage, billed while September is open.
        env.clock.set(ns("2026-09-28T12:00:00Z"));
        let spans =
            (0..4).map(|i| invoke("acme", &format!("s{i}"), "resize", "2026-09-20T10:00:00Z", 400, 10)).collect();
        assert_eq!(deliver(spans).await.records, 4, "{name}");
        // October's, after September's grace window (72 h) made it final.
        env.clock.set(ns("2026-10-20T12:00:00Z"));
        let spans =
            (0..6).map(|i| invoke("acme", &format!("o{i}"), "thumb", "2026-10-10T10:00:00Z", 300, 10)).collect();
        assert_eq!(deliver(spans).await.records, 6);
        assert_eq!(invoice_statuses(&env).await, ["2026-09 final", "2026-10 draft"], "{name}");

        // October is over but in its grace window: late September usage goes on October's invoice.
        env.clock.set(ns("2026-11-02T12:00:00Z"));
        let report = deliver(vec![invoke("acme", "late-s", "resize", "2026-09-25T10:00:00Z", 700, 10)]).await;
        assert_eq!((report.records, report.late_records, report.invoices_finalized), (1, 1, 0), "{name}");
        let before = costs_agree(&env, &format!("{name}, October in its grace window")).await;

        // The grace window ends: October becomes final, and no figure moves.
        env.clock.set(ns("2026-11-05T00:00:00Z"));
        assert_eq!(env.billing.run(None).await.unwrap().invoices_finalized, 1, "{name}");
        assert_eq!(invoice_statuses(&env).await, ["2026-09 final", "2026-10 final"], "{name}");
        assert_eq!(costs_agree(&env, &format!("{name}, October final")).await, before, "{name}");

        // Late usage of both final periods now goes on November's invoice, priced where it
        // falls in its own period's allowances and tiers.
        let report = deliver(vec![
            invoke("acme", "late-s2", "resize", "2026-09-26T10:00:00Z", 900, 10),
            invoke("acme", "late-o", "thumb", "2026-10-30T10:00:00Z", 500, 10),
        ])
        .await;
        assert_eq!((report.records, report.late_records), (2, 2), "{name}");
        let november = costs_agree(&env, &format!("{name}, late usage on November's draft")).await;
        env.clock.set(ns("2026-12-10T00:00:00Z"));
        assert_eq!(env.billing.run(None).await.unwrap().invoices_finalized, 1, "{name}");
        assert_eq!(invoice_statuses(&env).await, ["2026-09 final", "2026-10 final", "2026-11 final"], "{name}");
        assert_eq!(costs_agree(&env, &format!("{name}, November final")).await, november, "{name}");
        for (function, cost) in &before {
            assert!(november[function] > *cost, "{function}: late usage adds to its cost on {name}");
        }
    }
}

/// acme's invoices as "period status", oldest first.
async fn invoice_statuses(env: &Env) -> Vec<String> {
    let mut invoices: Vec<String> = env
        .billing
        .invoices(Some("acme"))
        .await
        .unwrap()
        .into_iter()
        .map(|i| format!("{} {}", i.period, i.status))
        .collect();
    invoices.sort();
    invoices
}

/// Checks that acme's invoices, per-invocation costs and cost series agree as of the clock's
/// now, and returns the exact cost by function.
async fn costs_agree(env: &Env, what: &str) -> BTreeMap<String, rust_decimal::Decimal> {
    let mut by_function: BTreeMap<String, rust_decimal::Decimal> = BTreeMap::new();
    for summary in env.billing.invoices(Some("acme")).await.unwrap() {
        let costs = env.billing.invocation_costs("acme", &summary.period).await.unwrap();
        let invoice = env.billing.invoice("acme", &summary.period).await.unwrap();
        assert_eq!(invoice, env.billing.rate_invoice("acme", &summary.period).await.unwrap(), "{what}");
        // Each (usage period, plan) group: its lines' exact amounts are its records' costs.
        let mut lines: BTreeMap<(String, String), rust_decimal::Decimal> = BTreeMap::new();
        for line in &invoice.lines {
            *lines.entry((line.usage_period.clone(), line.plan.clone())).or_default() += line.amount_exact;
        }
        let mut records: BTreeMap<(String, String), rust_decimal::Decimal> = BTreeMap::new();
        for cost in &costs {
            *records.entry((cost.usage_period.clone(), cost.plan.clone())).or_default() += cost.cost;
            *by_function.entry(cost.function.clone()).or_default() += cost.cost;
        }
        assert_eq!(lines, records, "{} invoice vs its records' costs, {what}", summary.period);
    }
    // The dashboard's series, at its own "now" (no `time` parameter), cached and not.
    for cache in [true, false] {
        env.use_cache(cache);
        let (status, body) = env
            .post_form(ACME, "/prometheus/api/v1/query", &[("query", "sum by (function) (sfaas_billing_cost_total)")])
            .await;
        assert_eq!(status, 200, "{body}, {what}");
        let series = vector(&body["data"]);
        assert_eq!(series.len(), by_function.len(), "{series:?}, {what}");
        for (function, cost) in &by_function {
            let cost: f64 = cost.to_string().parse().unwrap();
            assert_close(series[&format!("function={function}")], cost, &format!("{function}, cache {cache}, {what}"));
        }
    }
    by_function
}

/// `count` invocations of a tenant stored as extraction would have (`Billing::import`),
/// `every` seconds from `from`, over 10 functions; then `Billing::rebuild` prices them.
async fn big_month(env: &Env, tenant: &str, count: usize, from: &str, every: i64) {
    let start = ns(from);
    let mut done = 0;
    while done < count {
        let rows = 50_000.min(count - done);
        let records: Vec<UsageRecord> = (done..done + rows)
            .map(|i| {
                let at = start + i as i64 * every * 1_000_000_000;
                let period = chrono::DateTime::from_timestamp_nanos(at).format("%Y-%m").to_string();
                UsageRecord {
                    tenant: tenant.into(),
                    usage_id: format!("{tenant}-{i}"),
                    kind: Kind::Invocation,
                    function: format!("f{}", i % 10),
                    flow_run: None,
                    call_id: None,
                    trace_id: format!("{i:032x}"),
                    span_id: format!("{i:016x}"),
                    start_ns: at,
                    end_ns: at + 5_000_000,
                    cpu_ms: (i % 97) as i64,
                    wall_ms: 5,
                    memory_peak_bytes: 1 << 20,
                    bytes_in: 100,
                    bytes_out: (i % 4096) as i64,
                    log_bytes: 0,
                    status_code: 200,
                    state_byte_seconds: Default::default(),
                    period: period.clone(),
                    billed_period: period,
                    plan: "starter".into(),
                    received_ms: 0,
                }
            })
            .collect();
        assert_eq!(env.billing.import(&records).await.unwrap(), rows as u64);
        done += rows;
    }
}

// ---------------------------------------------------------------------------------------------
// (d) Isolation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_sees_another_tenants_series() {
    for backend in backends() {
        let env = env(backend).await;
        seed(&env).await;
        let name = env.name();
        let t = (ns(T0) / 1_000_000_000 + 300).to_string();
        let nov1 = secs("2026-11-01T00:00:00Z");
        let no_globex = |what: &str, body: &Value| {
            let text = body.to_string();
            assert!(!text.contains("globex"), "{what} on {name} shows globex: {text}");
        };
        // Queries: whatever the matchers say.
        for q in [
            r#"{tenant="globex"}"#,
            r#"{__name__=~".+"}"#,
            "http_requests_total",
            "globex_secret_total",
            r#"sfaas_usage_invocations_total{tenant=~"glob.*"}"#,
            "sum by (tenant) (sfaas_usage_cpu_ms_total)",
            r#"sfaas_billing_cost_total{tenant!="acme"}"#,
        ] {
            for time in [&t, &nov1] {
                let data = env.instant(ACME, q, time).await;
                no_globex(q, &data);
            }
        }
        let v = vector(&env.instant(ACME, r#"count({__name__=~".+"})"#, &t).await);
        let v_admin = vector(&env.instant(ADMIN, r#"count({__name__=~".+"})"#, &t).await);
        assert!(v_admin[""] > v[""], "admin {v_admin:?} vs acme {v:?}");
        let data =
            env.range(ACME, r#"{__name__=~"sfaas_.*|http_.*"}"#, &secs("2026-10-10T00:00:00Z"), &nov1, "3600").await;
        no_globex("range", &data);
        // Series, labels, label values, metadata.
        for path in [
            "/prometheus/api/v1/series?match[]=%7B__name__%3D~%22.%2B%22%7D",
            "/prometheus/api/v1/series?match[]=%7Btenant%3D%22globex%22%7D",
            "/prometheus/api/v1/labels",
            "/prometheus/api/v1/label/tenant/values",
            "/prometheus/api/v1/label/__name__/values",
            "/prometheus/api/v1/label/job/values",
            "/prometheus/api/v1/metadata",
        ] {
            let (status, body) = env.get(ACME, path).await;
            assert_eq!(status, 200, "{path}: {body}");
            no_globex(path, &body);
        }
        let (_, body) = env.get(ACME, "/prometheus/api/v1/label/job/values").await;
        assert_eq!(body["data"], json!(["api"]), "vault is globex's");
        // The admin sees both; with X-Scope-OrgID only that tenant; globex only globex.
        let (_, body) = env.get(ADMIN, "/prometheus/api/v1/label/tenant/values").await;
        assert_eq!(body["data"], json!(["acme", "globex"]));
        let (_, body) = env
            .send("GET", "/prometheus/api/v1/label/tenant/values", Some(ADMIN), &[("X-Scope-OrgID", "globex")], None)
            .await;
        assert_eq!(body["data"], json!([]), "with X-Scope-OrgID the admin reads as that tenant: no tenant label");
        let (_, body) = env
            .send("GET", "/prometheus/api/v1/label/__name__/values", Some(ADMIN), &[("X-Scope-OrgID", "globex")], None)
            .await;
        let names = body["data"].to_string();
        assert!(names.contains("globex_secret_total") && !names.contains("queue_depth"), "{names}");
        let (_, body) = env.get(GLOBEX, "/prometheus/api/v1/label/__name__/values").await;
        let names = body["data"].to_string();
        assert!(
            names.contains("globex_secret_total")
                && !names.contains("queue_depth")
                && !names.contains("request_duration"),
            "{names}"
        );
        let v = vector(&env.instant(GLOBEX, "sum(sfaas_usage_invocations_total)", &nov1).await);
        assert_eq!(v[""], 2.0);
        // X-Scope-OrgID naming the token's own tenant is fine; another is 403 everywhere.
        let (status, _) =
            env.send("GET", "/prometheus/api/v1/labels", Some(ACME), &[("X-Scope-OrgID", "acme")], None).await;
        assert_eq!(status, 200);
        for path in [
            "/prometheus/api/v1/labels",
            "/prometheus/api/v1/series?match[]=up",
            "/prometheus/api/v1/metadata",
            "/prometheus/api/v1/query?query=up",
        ] {
            let (status, body) = env.send("GET", path, Some(ACME), &[("X-Scope-OrgID", "globex")], None).await;
            assert_eq!(status, 403, "{path}: {body}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (e) Errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_promql_is_refused_by_name() {
    for backend in backends() {
        let env = env(backend).await;
        let name = env.name();
        for (q, construct) in [
            // Prometheus 3's experimental functions and aggregations, and other engines' own.
            ("limitk(3, http_requests_total)", "aggregation limitk"),
            ("limit_ratio(0.5, http_requests_total)", "aggregation limit_ratio"),
            ("info(up)", "function info"),
            ("first_over_time(http_requests_total[5m])", "function first_over_time"),
            ("ts_of_max_over_time(http_requests_total[5m])", "function ts_of_max_over_time"),
        ] {
            let (status, body) = env.post_form(ACME, "/prometheus/api/v1/query", &[("query", q)]).await;
            assert_eq!(status, 422, "{q} on {name}: {body}");
            assert_eq!(body["status"], "error");
            assert_eq!(body["errorType"], "execution");
            assert_eq!(body["error"], format!("unsupported PromQL: {construct}"), "{q}");
            let (status, _) = env
                .post_form(
                    ACME,
                    "/prometheus/api/v1/query_range",
                    &[("query", q), ("start", "0"), ("end", "60"), ("step", "15")],
                )
                .await;
            assert_eq!(status, 422, "{q} as a range query");
        }
        for (path, pairs, message) in [
            ("/prometheus/api/v1/query", vec![("query", "sum(")], "invalid parameter \"query\""),
            ("/prometheus/api/v1/query", vec![], "invalid parameter \"query\""),
            ("/prometheus/api/v1/query", vec![("query", "1"), ("time", "noon")], "invalid parameter \"time\""),
            (
                "/prometheus/api/v1/query_range",
                vec![("query", "1"), ("start", "10"), ("end", "0"), ("step", "1")],
                "end timestamp",
            ),
            (
                "/prometheus/api/v1/query_range",
                vec![("query", "1"), ("start", "0"), ("end", "10"), ("step", "0")],
                "zero or negative",
            ),
            (
                "/prometheus/api/v1/query_range",
                vec![("query", "1"), ("start", "0"), ("end", "86400"), ("step", "1")],
                "11,000 points",
            ),
            (
                "/prometheus/api/v1/query_range",
                vec![("query", "up[5m]"), ("start", "0"), ("end", "10"), ("step", "1")],
                "range vector",
            ),
            ("/prometheus/api/v1/series", vec![], "no match[]"),
            ("/prometheus/api/v1/series", vec![("match[]", "rate(up[5m])")], "not a series selector"),
        ] {
            let (status, body) = env.post_form(ACME, path, &pairs).await;
            assert_eq!((status, body["errorType"].as_str()), (400, Some("bad_data")), "{path} {pairs:?}: {body}");
            assert!(body["error"].as_str().unwrap().contains(message), "{path} {pairs:?}: {body}");
        }
        let (status, body) = env
            .post_form(ACME, "/prometheus/api/v1/query", &[("query", "vector(1) + on () (vector(1) or vector(2))")])
            .await;
        assert_eq!(status, 200, "or keeps one of each: {body}");
        let (status, body) = env
            .post_form(
                ACME,
                "/prometheus/api/v1/query",
                &[("query", "label_replace(vector(1), \"1a\", \"b\", \"\", \"\")")],
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"], "invalid destination label name in label_replace(): 1a");
        // Unknown endpoints: Prometheus's error JSON.
        for path in ["/prometheus/api/v1/targets", "/prometheus/api/v2/query", "/prometheus/nope"] {
            let (status, body) = env.get(ACME, path).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(
                (body["status"].as_str(), body["errorType"].as_str()),
                (Some("error"), Some("not_found")),
                "{body}"
            );
        }
        // format_query pretty-prints.
        let (status, body) =
            env.get(ACME, "/prometheus/api/v1/format_query?query=sum(%20rate(x%5B5m%5D)%20)%20by%20(a)").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"], "sum by (a) (rate(x[5m]))");
    }
}

// ---------------------------------------------------------------------------------------------
// (b) promtool

/// Queries that would make the parser or evaluator recurse past its stack are refused before
/// parsing, with Prometheus's error JSON, and the server keeps answering (issue 21: a query of
/// 10 000 nested parentheses aborted the whole process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_too_deep_or_too_long_are_refused_and_the_server_survives() {
    let env = env(Backend::Sqlite(tempfile::tempdir().unwrap())).await;
    let nested = format!("{}1{}", "(".repeat(5_000), ")".repeat(5_000));
    let chain = vec!["1"; 2_000].join("+");
    let long = format!("up{{job=\"{}\"}}", "x".repeat(20_000));
    for (query, message) in [
        (nested.as_str(), "query nests 5000 brackets deep, more than the limit of 64"),
        (chain.as_str(), "query has 1999 operators, more than the limit of 256"),
        (long.as_str(), "more than the limit of 16384"),
        // Found by the PromQL fuzz target: plain numbers of seconds that no duration holds
        // panicked the parser (a 500 at best).
        ("up0504[50111111111111111111111:11111111m]", "is not a number of seconds from 0 to"),
        ("rate(up[NaN])", "duration \"nan\" is not a number of seconds"),
        ("up offset 1e30", "duration \"1e30\" is not a number of seconds"),
    ] {
        let (status, body) = env.post_form(ACME, "/prometheus/api/v1/query", &[("query", query)]).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!((body["status"].as_str(), body["errorType"].as_str()), (Some("error"), Some("bad_data")), "{body}");
        assert!(body["error"].as_str().unwrap().contains(message), "{body}");
    }
    // Within the limits: 64 levels and 256 operators evaluate.
    let deep = format!("{}1{}", "(".repeat(64), ")".repeat(64));
    let v = vector_or_scalar(&env.instant(ACME, &deep, "1000").await);
    assert_eq!(v, 1.0);
    let v = vector_or_scalar(&env.instant(ACME, &vec!["1"; 257].join("+"), "1000").await);
    assert_eq!(v, 257.0);
    // Plain numbers of seconds as durations, and large numbers elsewhere, still evaluate.
    let data = env.instant(ACME, "1e30 + scalar(sum(rate(up[300] offset 60)))", "1000").await;
    assert_eq!(data["resultType"], "scalar", "{data}");
    // Evaluation runs off the request runtime and stops at the query's timeout, answered as
    // Prometheus does (503, `timeout`).
    env.use_base(&env.limited.clone());
    let range = [("query", "1+1"), ("start", "1000"), ("end", "2000"), ("step", "1")];
    let (status, body) = env.post_form(ACME, "/prometheus/api/v1/query_range", &range).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        (body["errorType"].as_str(), body["error"].as_str()),
        (Some("timeout"), Some("query timed out in expression evaluation"))
    ); // A query that would load more stored samples than the limit (3 here) is refused as
    // Prometheus refuses one over --query.max-samples (422, `execution`), before evaluating.
    seed(&env).await;
    let over = [("query", "http_requests_total[5m]"), ("time", "2026-10-10T12:10:00Z")];
    let (status, body) = env.post_form(ACME, "/prometheus/api/v1/query", &over).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        (body["errorType"].as_str(), body["error"].as_str()),
        (Some("execution"), Some("query processing would load too many samples into memory in query execution"))
    );
}

/// The same bounds hold for `match[]` selectors (parsed by the series and label routes), and a
/// range over the usage counters cannot make the server list every minute of ten thousand
/// years: both were found by reading the code for what a tenant's request can make it do (a
/// stack overflow that aborts the process; memory without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_and_usage_ranges_are_bounded_and_the_server_survives() {
    let env = env(Backend::Sqlite(tempfile::tempdir().unwrap())).await;
    seed(&env).await;
    let nested = format!("{}up{}", "(".repeat(200_000), ")".repeat(200_000));
    for route in ["/prometheus/api/v1/series", "/prometheus/api/v1/labels", "/prometheus/api/v1/label/job/values"] {
        let (status, body) = env.post_form(ACME, route, &[("match[]", nested.as_str())]).await;
        assert_eq!(status, 400, "{route}: {body}");
        assert_eq!(body["errorType"], "bad_data", "{route}: {body}");
    }
    for query in ["sfaas_usage_cpu_ms_total[10000y]", "sfaas_billing_cost_total{function!=\"\"}[10000y]"] {
        let (status, body) = env
            .post_form(ACME, "/prometheus/api/v1/query", &[("query", query), ("time", "2026-11-10T12:00:00Z")])
            .await;
        assert_eq!(status, 422, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().contains("more than 1048576 minutes"), "{query}: {body}");
    }
    // Subqueries: their times are counted before any is evaluated.
    let (status, body) = env
        .post_form(ACME, "/prometheus/api/v1/query", &[("query", "max_over_time(up[10000y:1s])"), ("time", "1000")])
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("evaluated at more than 1048576 times"), "{body}");
    // A month of minutes is within the bound, and the server still answers.
    let month = [("query", "sfaas_usage_cpu_ms_total[30d]"), ("time", "2026-11-10T12:00:00Z")];
    let (status, body) = env.post_form(ACME, "/prometheus/api/v1/query", &month).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(vector_or_scalar(&env.instant(ACME, "1+1", "1000").await), 2.0);
}

/// Times, offsets, ranges and steps at the ends of what an i64 holds: each query is answered or
/// refused with a 400 `bad_data` that names the parameter, never a 500 or a dropped connection
/// (a debug build panicked on the overflowing arithmetic; a release build wrapped it into the
/// wrong times). The bounds: times a nanosecond timestamp holds (1677 to 2262, where Prometheus
/// clients' "min time" and "max time" land), ranges and offsets of up to 10^12 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_offsets_and_steps_at_the_ends_of_i64_are_answered_or_refused() {
    let env = env(Backend::Sqlite(tempfile::tempdir().unwrap())).await;
    seed(&env).await;
    let (min_time, max_time) = ("-292273086-05-16T16:47:06Z", "292277025-08-17T07:12:55.807Z");
    let at = "2026-11-10T12:00:00Z";
    // (route, parameters, status, what the error says)
    let cases = vec![
        // Times beyond what a nanosecond timestamp holds.
        (
            "query",
            vec![("query", "up"), ("time", "1e300")],
            400,
            "\"time\": cannot parse \"1e300\" to a valid timestamp",
        ),
        ("query", vec![("query", "up"), ("time", "-1e300")], 400, "outside the times a query may name"),
        ("query", vec![("query", "up offset -5m"), ("time", "9223372036854775807")], 400, "outside the times"),
        ("query", vec![("query", "up"), ("time", "9999-12-31T23:59:59Z")], 400, "outside the times"),
        ("query", vec![("query", "http_requests_total @ 1e300 offset -1m"), ("time", at)], 400, "@ time"),
        ("query", vec![("query", "http_requests_total @ -1e17"), ("time", at)], 400, "@ time"),
        // Offsets and ranges longer than 10^12 s (what PromQL's units can write: 4294967295y).
        ("query", vec![("query", "http_requests_total offset -4294967295y"), ("time", at)], 400, "offset 4294967295y"),
        ("query", vec![("query", "http_requests_total offset 100000000y"), ("time", at)], 400, "longer than"),
        (
            "query",
            vec![("query", "rate(http_requests_total[200000000y] offset 200000000y)"), ("time", min_time)],
            400,
            "longer than",
        ),
        ("query", vec![("query", "sfaas_usage_cpu_ms_total[4294967295y]"), ("time", at)], 400, "range 4294967295y"),
        // At the ends of the bounds: answered.
        ("query", vec![("query", "up offset -5m"), ("time", max_time)], 200, ""),
        ("query", vec![("query", "up offset 10000y"), ("time", min_time)], 200, ""),
        ("query", vec![("query", "rate(http_requests_total[30000y] offset -30000y)"), ("time", max_time)], 200, ""),
        ("query", vec![("query", "http_requests_total @ 9223372036.854 offset -1m"), ("time", at)], 200, ""),
        ("query", vec![("query", "sfaas_billing_cost_total offset 10000y"), ("time", at)], 200, ""),
        ("query", vec![("query", "sfaas_billing_cost_total offset -10000y"), ("time", min_time)], 200, ""),
        (
            "query",
            vec![("query", "increase(sfaas_billing_cost_total[30000y] offset 30000y)"), ("time", max_time)],
            200,
            "",
        ),
        ("query", vec![("query", "sfaas_billing_cost_total @ -9223372036"), ("time", at)], 200, ""),
        // Range queries: the widest window, with steps of any size.
        (
            "query_range",
            vec![("query", "up"), ("start", "-1e300"), ("end", "1e300"), ("step", "1e15")],
            400,
            "\"start\"",
        ),
        (
            "query_range",
            vec![
                ("query", "sfaas_usage_cpu_ms_total"),
                ("start", min_time),
                ("end", max_time),
                ("step", "9223372036854775"),
            ],
            200,
            "",
        ),
        (
            "query_range",
            vec![("query", "sfaas_billing_cost_total"), ("start", min_time), ("end", max_time), ("step", "1e15")],
            200,
            "",
        ),
        (
            "query_range",
            vec![("query", "sfaas_billing_cost_total"), ("start", at), ("end", at), ("step", "9223372036854775.807")],
            200,
            "",
        ),
        (
            "query_range",
            vec![("query", "up"), ("start", min_time), ("end", max_time), ("step", "1")],
            400,
            "11,000 points",
        ),
        ("query_range", vec![("query", "up"), ("start", at), ("end", at), ("step", "1e300")], 400, "\"step\""),
        // Series, labels and label values over the widest window, or beyond it.
        ("series", vec![("match[]", "http_requests_total"), ("start", min_time), ("end", max_time)], 200, ""),
        ("series", vec![("match[]", "http_requests_total"), ("start", "-1e300"), ("end", "1e300")], 400, "\"start\""),
        ("labels", vec![("start", min_time), ("end", max_time)], 200, ""),
        ("labels", vec![("end", "1e19")], 400, "\"end\""),
        ("label/function/values", vec![("start", max_time), ("end", min_time)], 200, ""),
    ];
    for (route, params, want, says) in cases {
        let path = format!("/prometheus/api/v1/{route}");
        let (status, body) = env.post_form(ACME, &path, &params).await;
        assert_eq!(status, want, "{route} {params:?}: {body}");
        if want == 400 {
            assert_eq!(body["errorType"], "bad_data", "{route} {params:?}: {body}");
            assert!(body["error"].as_str().unwrap().contains(says), "{route} {params:?}: {body}");
        }
    }
    // Within the bounds, the answers are the ones a user expects: from the earliest time, `@`
    // reads today's usage as a query of today does; 10 000 years ago there was none.
    let today = vector(&env.instant(ACME, "sum(sfaas_usage_invocations_total)", at).await);
    let from_afar = vector(&env.instant(ACME, "sum(sfaas_usage_invocations_total @ 1794312000)", min_time).await);
    assert!(today[""] > 0.0, "{today:?}");
    assert_eq!(from_afar, today);
    let long_ago = env.instant(ACME, "sum(sfaas_usage_invocations_total offset 10000y)", at).await;
    assert_eq!(long_ago["result"], json!([]), "{long_ago}");
}

fn vector_or_scalar(data: &Value) -> f64 {
    assert_eq!(data["resultType"], "scalar", "{data}");
    number(&data["result"][1])
}

fn promtool() -> Option<std::path::PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates.into_iter().chain([std::path::PathBuf::from("/usr/bin/promtool")]).find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_queries_it_like_a_prometheus() {
    let Some(promtool) = promtool() else {
        assert!(!require_all(), "promtool is required (SFAAS_TEST_REQUIRE_ALL=1): install Debian's prometheus package");
        eprintln!("SKIPPED: promtool not found (Debian's prometheus package provides /usr/bin/promtool)");
        return;
    };
    // promtool ≥ 2.43 takes credentials from --http.config.file; older ones (Debian 12 has
    // 2.42) send the URL's user info as Basic auth (user = tenant, password = token).
    let help = tokio::process::Command::new(&promtool).args(["query", "instant", "--help"]).output().await.unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string() + &String::from_utf8_lossy(&help.stderr);
    let http_config = help.contains("http.config.file");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("http.yml");
    std::fs::write(&config, format!("authorization:\n  type: Bearer\n  credentials: {ACME}\n")).unwrap();
    for backend in backends() {
        let env = env(backend).await;
        seed(&env).await;
        let name = env.name();
        let address = env.cached.trim_start_matches("http://");
        let (url, mut flags) = if http_config {
            (format!("http://{address}/prometheus"), vec![format!("--http.config.file={}", config.display())])
        } else {
            (format!("http://acme:{ACME}@{address}/prometheus"), Vec::new())
        };
        flags.push("-o".into());
        flags.push("json".into());
        let run = |args: Vec<String>| {
            let promtool = promtool.clone();
            async move {
                let output = tokio::process::Command::new(&promtool).args(&args).output().await.unwrap();
                let stdout = String::from_utf8_lossy(&output.stdout).to_string();
                assert!(
                    output.status.success(),
                    "promtool {args:?}: {stdout} {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
            }
        };
        let at = chrono::DateTime::from_timestamp(ns(T0) / 1_000_000_000 + 300, 0).unwrap().to_rfc3339();
        let mut args = vec!["query".to_string(), "instant".into()];
        args.extend(flags.iter().cloned());
        args.extend([format!("--time={at}"), url.clone(), "sum by (code) (increase(http_requests_total[2m]))".into()]);
        let result = run(args).await;
        let v: BTreeMap<String, f64> =
            result.as_array().unwrap().iter().map(|s| (key(&s["metric"]), number(&s["value"][1]))).collect();
        assert_close(v["code=200"], 80.0, name);
        assert_close(v["code=500"], 16.0, name);

        let mut args = vec!["query".to_string(), "range".into()];
        args.extend(flags.iter().cloned());
        args.extend([
            "--start=2026-10-01T00:00:00Z".to_string(),
            "--end=2026-11-01T00:00:00Z".into(),
            "--step=24h".into(),
            url.clone(),
            "sum by (function) (sfaas_usage_invocations_total)".into(),
        ]);
        let result = run(args).await;
        let series: BTreeMap<String, Vec<f64>> = result
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (key(&s["metric"]), s["values"].as_array().unwrap().iter().map(|p| number(&p[1])).collect()))
            .collect();
        // resize: 3 in September, the late one of Sep 25, 8 on Oct 10; etl: one a day Oct 2..6.
        assert_eq!(series["function=resize"].last(), Some(&12.0), "{series:?} on {name}");
        // etl: one a day at 08:00 from Oct 2; daily steps from Oct 3 (before: no sample).
        let etl: Vec<f64> = [1.0, 2.0, 3.0, 4.0].into_iter().chain([5.0; 26]).collect();
        assert_eq!(series["function=etl"], etl, "{name}");
        assert!(!series.contains_key(""), "no globex: {series:?}");

        let mut args = vec!["query".to_string(), "labels".into()];
        if http_config {
            args.extend(flags[..1].iter().cloned());
        }
        args.extend([url.clone(), "function".into()]);
        let output = tokio::process::Command::new(&promtool).args(&args).output().await.unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).split_whitespace().collect::<Vec<_>>(),
            ["etl", "resize", "thumb"]
        );
    }
}
