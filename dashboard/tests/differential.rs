//! Differential PromQL: the dashboard's `/prometheus` API answers the queries of
//! `fixtures/differential-queries.txt` as a real Prometheus does, over the same samples.
//!
//! Debian's Prometheus (2.42, `prometheus` on `PATH`) scrapes a target that this test serves
//! every second (values that change with each scrape: counters with resets, gauges with
//! negative, NaN and infinite values, a classic histogram, info metrics, many label sets; see
//! [`exposition`]) and remote-writes what it scrapes to the collector, with Basic auth (tenant
//! `acme`, its ingest token), which stores it on SQLite (the evaluator does not depend on the
//! backend). After some 70 s, once the collector holds exactly the samples Prometheus holds,
//! every query of the fixture goes to both, as an instant query at a time T between two
//! scrapes or as a range query over (T - 40 s, T] by 5 s, and the answers are compared: result
//! type, label sets (exactly; `__name__` included), timestamps, values (within 1e-9 relative,
//! or 1e-12 absolute; NaN equals NaN, infinities of one sign are equal), the order of `sort` and
//! `sort_desc` results, and an error answered by an error (not by "unsupported PromQL").
//!
//! T is placed away from every sample's time, and the fixture writes every range, offset and
//! step in whole seconds, so that no window edge lands on a sample: the dashboard follows
//! Prometheus 3's left-open windows `(t - range, t]`, Prometheus 2.42 closed ones. Two groups
//! of the fixture are reported apart and not counted: `staleness`, the queries touching the one
//! series that disappears half way (`ephemeral_jobs_total`, which Prometheus ends with a
//! staleness marker), and `versions`, where Prometheus 3 differs from 2.42.
//!
//! The report (on stderr) gives the figure and every differing query with its first
//! difference; at least 95 % must agree. `SFAAS_DIFFERENTIAL_REPORT=FILE` writes it to FILE too
//! (for BENCHMARKS.md):
//! `cargo test -p dashboard --test integration differential:: -- --nocapture`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use billing::Billing;
use billing::api::ViewerResolver;
use collector::auth::{Credential, TokenResolver};
use collector::{Collector, CollectorConfig};
use contract::Viewer;
use dashboard::DashboardState;
use serde_json::Value;

use crate::prometheus::encode;

/// The tenant's ingest token (Prometheus's remote_write password) and read token (the queries').
const INGEST: &str = "acme-token";
const READ: &str = "acme-read-token";

/// How long Prometheus scrapes before the queries (the fixture's windows reach 80 s back).
const SCRAPE_FOR: Duration = Duration::from_secs(70);
/// How long remote_write may take to deliver what Prometheus holds up to T.
const CATCH_UP: Duration = Duration::from_secs(20);
/// Range queries: from T minus this many seconds to T, by [`RANGE_STEP`] seconds.
const RANGE_SECONDS: i64 = 40;
const RANGE_STEP: &str = "5";
/// The scrape from which `ephemeral_jobs_total` is gone (half way).
const EPHEMERAL_UNTIL: u64 = 35;
/// The share of queries (outside the groups reported apart) that must agree.
const REQUIRED_PERCENT: usize = 95;

struct IngestTokens;

impl TokenResolver for IngestTokens {
    fn resolve(&self, token: &str) -> Option<Credential> {
        (token == INGEST).then(|| Credential::Ingest { tenant: "acme".into() })
    }
}

struct ReadTokens;

impl ViewerResolver for ReadTokens {
    fn resolve(&self, token: &str) -> Option<Viewer> {
        (token == READ).then(|| Viewer::Tenant("acme".into()))
    }
}

// ---------------------------------------------------------------------------------------------
// The scrape target

const BUCKETS: [&str; 7] = ["0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"];
/// What one observation in each bucket adds to `_sum`.
const BUCKET_VALUES: [f64; 7] = [0.03, 0.07, 0.2, 0.4, 0.8, 2.0, 4.0];

/// The exposition of the `n`th scrape (from 0): every value a function of `n`.
fn exposition(n: u64) -> String {
    let mut out = String::new();
    let nf = n as f64;
    let mut line = |name: &str, labels: &str, value: String| {
        if labels.is_empty() {
            writeln!(out, "{name} {value}").unwrap();
        } else {
            writeln!(out, "{name}{{{labels}}} {value}").unwrap();
        }
    };
    let float = show;

    // Counters.
    for (method, path, code, value) in [
        ("GET", "/api/v1/x", "200", 5 * n),
        ("GET", "/api/v1/x", "500", n / 4),
        ("POST", "/api/v1/x", "200", 2 * n + n % 3),
        ("GET", "/api/v1/y", "200", 3 * n),
        ("POST", "/api/v1/y", "201", 7 * n + 1),
        ("GET", "/healthz", "200", n),
    ] {
        line("http_requests_total", &format!(r#"method="{method}",path="{path}",code="{code}""#), value.to_string());
    }
    // b resets once half way, c every 25 scrapes.
    let b = if n < 30 { 100 + 4 * n } else { 2 * (n - 30) };
    for (queue, value) in [("a", 10 * n), ("b", b), ("c", 3 * (n % 25) + 1)] {
        line("jobs_processed_total", &format!(r#"queue="{queue}""#), value.to_string());
    }
    for cpu in 0..4u64 {
        let per = (cpu + 1) as f64;
        line("cpu_seconds_total", &format!(r#"cpu="{cpu}",mode="user""#), float(0.25 * per * nf));
        line("cpu_seconds_total", &format!(r#"cpu="{cpu}",mode="system""#), float(0.1 * per * nf));
    }
    if n < EPHEMERAL_UNTIL {
        line("ephemeral_jobs_total", r#"worker="w1""#, n.to_string());
    }

    // Gauges.
    line("temperature_celsius", r#"room="kitchen""#, float(20.0 + 5.0 * (nf / 4.0).sin()));
    line("temperature_celsius", r#"room="cellar""#, float(-3.0 + 2.0 * (nf / 3.0).cos()));
    line("temperature_celsius", r#"room="attic""#, float((n % 11) as f64 - 5.0));
    line("queue_depth", r#"queue="a""#, float(((n % 20) as f64 - 10.0).abs()));
    line("queue_depth", r#"queue="b""#, float(((7 * n) % 13) as f64 - 6.0));
    line("queue_depth", r#"queue="c""#, float(4.0));
    let flaky = if n % 4 == 2 { f64::NAN } else { (n % 10) as f64 / 10.0 };
    line("flaky_ratio", r#"sensor="a""#, float(flaky));
    line("flaky_ratio", r#"sensor="b""#, float((n % 5) as f64 / 4.0));
    // Always NaN, so that every T has one (a's NaN comes and goes with the scrape T falls after).
    line("flaky_ratio", r#"sensor="c""#, float(f64::NAN));
    line("limits_bytes", r#"kind="hard""#, float(1e9));
    line("limits_bytes", r#"kind="soft""#, float(5e8 + 1000.0 * nf));
    line("limits_bytes", r#"kind="none""#, float(f64::INFINITY));
    line("signal_strength_dbm", r#"antenna="1""#, float(-60.0 - (n % 7) as f64));
    let weak = if n.is_multiple_of(10) { f64::NEG_INFINITY } else { -80.0 + (n % 5) as f64 };
    line("signal_strength_dbm", r#"antenna="2""#, float(weak));
    line("build_info", r#"version="1.2.3",revision="abc123""#, float(1.0));
    line("machine_cpu_cores", "", float(4.0));
    for shard in 0..12u64 {
        // A permutation of 0..12 that turns with n, plus a distinct fraction: no ties.
        let latency = ((7 * shard + n) % 12) as f64 + shard as f64 / 48.0;
        line("shard_latency_seconds", &format!(r#"shard="{shard}""#), float(latency));
        line("shard_load", &format!(r#"shard="{shard}""#), ((shard * n + shard) % 5).to_string());
    }

    // A classic histogram: per scrape, a base number of observations in each bucket and one
    // more in a bucket that turns with the scrape.
    for (handler, base, turn) in [("api", [1u64, 2, 4, 3, 1, 1, 0], 7u64), ("static", [5, 2, 1, 0, 0, 0, 0], 3)] {
        let mut counts = [0u64; 7];
        for k in 0..=n {
            for (i, count) in counts.iter_mut().enumerate() {
                *count += base[i] + u64::from(k % turn == i as u64);
            }
        }
        let sum: f64 = counts.iter().zip(BUCKET_VALUES).map(|(c, v)| *c as f64 * v).sum();
        let mut cumulative = 0;
        for (le, count) in BUCKETS.iter().zip(counts) {
            cumulative += count;
            line("req_duration_seconds_bucket", &format!(r#"handler="{handler}",le="{le}""#), cumulative.to_string());
        }
        line("req_duration_seconds_sum", &format!(r#"handler="{handler}""#), float(sum));
        line("req_duration_seconds_count", &format!(r#"handler="{handler}""#), cumulative.to_string());
    }
    out
}

/// Serves [`exposition`] at `/metrics`, the next scrape's at each request.
async fn serve_target() -> SocketAddr {
    let scrapes = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let n = scrapes.fetch_add(1, Ordering::SeqCst);
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], exposition(n)) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// A running Prometheus, killed when dropped (its log's end printed if the test panics).
struct Prometheus {
    child: std::process::Child,
    log: PathBuf,
    url: String,
}

impl Prometheus {
    fn start(program: &Path, dir: &Path, target: SocketAddr, collector: SocketAddr) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // The evaluation interval is the step of a subquery written without one: Prometheus's
        // default, 1m, as the dashboard's.
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1m}}\n\
             scrape_configs:\n\
             - job_name: target\n  static_configs: [{{targets: ['{target}']}}]\n\
             remote_write:\n\
             - url: http://{collector}/api/v1/write\n  basic_auth: {{username: acme, password: {INGEST}}}\n  \
               queue_config: {{batch_send_deadline: 1s}}\n"
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = dir.join("prometheus.log");
        let child = std::process::Command::new(program)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Prometheus { child, log, url: format!("http://127.0.0.1:{port}") }
    }

    /// Panics if Prometheus has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("Prometheus exited ({status}); its log is below");
        }
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.assert_running();
            let ready = http.get(format!("{}/-/ready", self.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "Prometheus not ready after 30 s; its log is below");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("Prometheus's log ends with:\n{}", self.log_tail());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Queries and answers

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Instant,
    Range,
}

struct Query {
    kind: Kind,
    /// As written in the fixture (placeholders not substituted).
    text: String,
    group: String,
}

/// Whether a group's queries are reported apart and not counted: those touching the series
/// that disappears (`staleness`), and those where Prometheus 3 differs from 2.42 (`versions`).
fn is_apart(group: &str) -> bool {
    group == "staleness" || group == "versions"
}

fn fixture() -> Vec<Query> {
    let mut group = String::from("(none)");
    let mut out = Vec::new();
    for (i, line) in include_str!("fixtures/differential-queries.txt").lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("## ") {
            group = name.trim().to_string();
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kind, text) = match line.split_once(' ') {
            Some(("instant", text)) => (Kind::Instant, text),
            Some(("range", text)) => (Kind::Range, text),
            _ => panic!("differential-queries.txt:{}: neither `instant QUERY` nor `range QUERY`: {line}", i + 1),
        };
        out.push(Query { kind, text: text.trim().to_string(), group: group.clone() });
    }
    out
}

/// Seconds with ms, as the API takes times.
fn secs(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

/// `{T}`, `{T-30}`, `{T+5}` replaced by T (ms) plus or minus whole seconds.
fn substitute(query: &str, t: i64) -> String {
    let mut out = String::new();
    let mut rest = query;
    while let Some(i) = rest.find("{T") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').unwrap_or_else(|| panic!("unclosed placeholder in {query}"));
        let seconds: i64 = match &after[..end] {
            "" => 0,
            delta => delta.parse().unwrap_or_else(|_| panic!("placeholder {{T{delta}}} in {query}")),
        };
        out.push_str(&secs(t + seconds * 1000));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// An API's answer: its `data`, or its error.
#[derive(Debug)]
enum Answer {
    Data(Value),
    Error { kind: String, message: String },
}

impl Answer {
    fn is_unsupported(&self) -> bool {
        matches!(self, Answer::Error { message, .. } if message.contains("unsupported PromQL"))
    }
}

/// `GET url?params` (with the read token for ours).
async fn ask(http: &reqwest::Client, url: &str, token: Option<&str>, params: &[(&str, &str)]) -> Answer {
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
    let mut request = http.get(format!("{url}?{}", query.join("&")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => return Answer::Error { kind: "transport".into(), message: e.to_string() },
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(body) if body["status"] == "success" => Answer::Data(body["data"].clone()),
        Ok(body) if body["status"] == "error" => Answer::Error {
            kind: body["errorType"].as_str().unwrap_or("?").to_string(),
            message: body["error"].as_str().unwrap_or("?").to_string(),
        },
        _ => Answer::Error { kind: format!("HTTP {status}, not the API's JSON"), message: text },
    }
}

/// The two servers' query URLs.
struct Servers {
    http: reqwest::Client,
    prometheus: String,
    ours: String,
}

impl Servers {
    async fn both(&self, kind: Kind, query: &str, t: i64) -> (Answer, Answer) {
        let (path, t_s, start) = match kind {
            Kind::Instant => ("/api/v1/query", secs(t), String::new()),
            Kind::Range => ("/api/v1/query_range", secs(t), secs(t - RANGE_SECONDS * 1000)),
        };
        let params: Vec<(&str, &str)> = match kind {
            Kind::Instant => vec![("query", query), ("time", &t_s)],
            Kind::Range => vec![("query", query), ("start", &start), ("end", &t_s), ("step", RANGE_STEP)],
        };
        let theirs = ask(&self.http, &format!("{}{path}", self.prometheus), None, &params).await;
        let ours = ask(&self.http, &format!("{}{path}", self.ours), Some(READ), &params).await;
        (theirs, ours)
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison

/// `{a="b", c="d"}`: a result's labels, sorted by name (`__name__` included).
fn labels(metric: &Value) -> Result<String, String> {
    let object = metric.as_object().ok_or_else(|| format!("metric is not an object: {metric}"))?;
    let sorted: BTreeMap<&str, &str> = object.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("?"))).collect();
    let inner: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    Ok(format!("{{{}}}", inner.join(", ")))
}

fn number(v: &Value) -> Result<f64, String> {
    let text = v.as_str().ok_or_else(|| format!("value is not a string: {v}"))?;
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text.parse().map_err(|_| format!("value is not a number: {text}")),
    }
}

/// `[seconds, "value"]` as (ms, value).
fn point(p: &Value) -> Result<(i64, f64), String> {
    let seconds = p[0].as_f64().ok_or_else(|| format!("point without a time: {p}"))?;
    Ok(((seconds * 1000.0).round() as i64, number(&p[1])?))
}

fn same(a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    let difference = (a - b).abs();
    difference <= 1e-9 * a.abs().max(b.abs()) || difference <= 1e-12
}

fn show(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// A time relative to T: `T`, `T-5s`.
fn at(ms: i64, t: i64) -> String {
    match ms - t {
        0 => "T".into(),
        d if d % 1000 == 0 => format!("T{:+}s", d / 1000),
        d => format!("T{:+}s", d as f64 / 1000.0),
    }
}

/// A sample vector as (labels, ms, value), in the answer's order.
fn vector(result: &Value) -> Result<Vec<(String, i64, f64)>, String> {
    let items = result.as_array().ok_or("vector result is not an array")?;
    items
        .iter()
        .map(|s| {
            let (ms, v) = point(&s["value"])?;
            Ok((labels(&s["metric"])?, ms, v))
        })
        .collect()
}

/// A series' labels and its points (ms, value).
type Points = (String, Vec<(i64, f64)>);

fn matrix(result: &Value) -> Result<Vec<Points>, String> {
    let items = result.as_array().ok_or("matrix result is not an array")?;
    items
        .iter()
        .map(|s| {
            let values = s["values"].as_array().ok_or("series without values")?;
            Ok((labels(&s["metric"])?, values.iter().map(point).collect::<Result<Vec<_>, _>>()?))
        })
        .collect()
}

/// The series only one side has, as a short list.
fn only<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&String> = names.collect();
    let mut out = names.iter().take(2).map(|s| s.as_str()).collect::<Vec<_>>().join(" ");
    if names.len() > 2 {
        write!(out, " (and {} more)", names.len() - 2).unwrap();
    }
    out
}

/// Keys of `a` not in `b`, and of `b` not in `a`, as a difference (if any).
fn same_series<V>(theirs: &BTreeMap<String, V>, ours: &BTreeMap<String, V>) -> Result<(), String> {
    let missing: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let mut out = format!("{} series from Prometheus, {} from ours", theirs.len(), ours.len());
    if !missing.is_empty() {
        write!(out, "; only Prometheus's: {}", only(missing.into_iter())).unwrap();
    }
    if !extra.is_empty() {
        write!(out, "; only ours: {}", only(extra.into_iter())).unwrap();
    }
    Err(out)
}

/// Whether two `data` objects agree; the first difference otherwise.
fn compare_data(theirs: &Value, ours: &Value, ordered: bool, t: i64) -> Result<(), String> {
    let kind = theirs["resultType"].as_str().unwrap_or("?");
    let our_kind = ours["resultType"].as_str().unwrap_or("?");
    if kind != our_kind {
        return Err(format!("result type: Prometheus {kind}, ours {our_kind}"));
    }
    let (a, b) = (&theirs["result"], &ours["result"]);
    match kind {
        "scalar" => {
            let ((ta, va), (tb, vb)) = (point(a)?, point(b).map_err(|e| format!("ours: {e}"))?);
            if ta != tb || !same(va, vb) {
                return Err(format!("Prometheus {} at {}, ours {} at {}", show(va), at(ta, t), show(vb), at(tb, t)));
            }
        }
        "string" => {
            if a != b {
                return Err(format!("Prometheus {a}, ours {b}"));
            }
        }
        "vector" => {
            let (va, vb) = (vector(a)?, vector(b).map_err(|e| format!("ours: {e}"))?);
            let ma: BTreeMap<String, (i64, f64)> = va.iter().map(|(l, ms, v)| (l.clone(), (*ms, *v))).collect();
            let mb: BTreeMap<String, (i64, f64)> = vb.iter().map(|(l, ms, v)| (l.clone(), (*ms, *v))).collect();
            if mb.len() != vb.len() {
                return Err(format!("ours answers a label set twice ({} samples, {} label sets)", vb.len(), mb.len()));
            }
            same_series(&ma, &mb)?;
            for (labels, (ta, x)) in &ma {
                let (tb, y) = mb[labels];
                if ta != &tb || !same(*x, y) {
                    return Err(format!(
                        "{labels}: Prometheus {} at {}, ours {} at {}",
                        show(*x),
                        at(*ta, t),
                        show(y),
                        at(tb, t)
                    ));
                }
            }
            if ordered {
                let (sa, sb): (Vec<f64>, Vec<f64>) =
                    (va.iter().map(|s| s.2).collect(), vb.iter().map(|s| s.2).collect());
                if sa.iter().zip(&sb).any(|(x, y)| !same(*x, *y)) {
                    let show_all = |s: &[f64]| s.iter().map(|v| show(*v)).collect::<Vec<_>>().join(" ");
                    return Err(format!("order: Prometheus {}, ours {}", show_all(&sa), show_all(&sb)));
                }
            }
        }
        "matrix" => {
            let (va, vb) = (matrix(a)?, matrix(b).map_err(|e| format!("ours: {e}"))?);
            let ma: BTreeMap<String, Vec<(i64, f64)>> = va.into_iter().collect();
            let count = vb.len();
            let mb: BTreeMap<String, Vec<(i64, f64)>> = vb.into_iter().collect();
            if mb.len() != count {
                return Err(format!("ours answers a label set twice ({count} series, {} label sets)", mb.len()));
            }
            same_series(&ma, &mb)?;
            for (labels, pa) in &ma {
                let pb = &mb[labels];
                for i in 0..pa.len().max(pb.len()) {
                    match (pa.get(i), pb.get(i)) {
                        (Some((ta, x)), Some((tb, y))) if ta == tb && same(*x, *y) => {}
                        (Some((ta, x)), Some((tb, y))) => {
                            return Err(format!(
                                "{labels}, point {i}: Prometheus {} at {}, ours {} at {}",
                                show(*x),
                                at(*ta, t),
                                show(*y),
                                at(*tb, t)
                            ));
                        }
                        (Some((ta, x)), None) => {
                            return Err(format!(
                                "{labels}: ours has {} points, Prometheus {} (next: {} at {})",
                                pb.len(),
                                pa.len(),
                                show(*x),
                                at(*ta, t)
                            ));
                        }
                        (None, Some((tb, y))) => {
                            return Err(format!(
                                "{labels}: ours has {} points, Prometheus {} (ours' next: {} at {})",
                                pb.len(),
                                pa.len(),
                                show(*y),
                                at(*tb, t)
                            ));
                        }
                        (None, None) => unreachable!(),
                    }
                }
            }
        }
        other => return Err(format!("unknown result type {other}")),
    }
    Ok(())
}

/// A short description of an answer, for a difference.
fn summary(answer: &Answer) -> String {
    match answer {
        Answer::Error { kind, message } => format!("error {kind}: {}", message.chars().take(200).collect::<String>()),
        Answer::Data(data) => {
            let kind = data["resultType"].as_str().unwrap_or("?");
            match data["result"].as_array() {
                Some(items) => format!("{kind} of {} series", items.len()),
                None => format!("{kind} {}", data["result"]),
            }
        }
    }
}

/// Whether the two answers agree; why not otherwise.
fn compare(theirs: &Answer, ours: &Answer, ordered: bool, t: i64) -> Result<(), String> {
    match (theirs, ours) {
        (Answer::Error { .. }, Answer::Error { .. }) if ours.is_unsupported() => {
            Err(format!("Prometheus: {}; ours: {}", summary(theirs), summary(ours)))
        }
        (Answer::Error { .. }, Answer::Error { .. }) => Ok(()),
        (Answer::Data(a), Answer::Data(b)) => compare_data(a, b, ordered, t),
        _ => Err(format!("Prometheus: {}; ours: {}", summary(theirs), summary(ours))),
    }
}

/// The sample times (ms) of a matrix answer.
fn sample_times(answer: &Answer) -> Vec<i64> {
    let Answer::Data(data) = answer else { return Vec::new() };
    matrix(&data["result"]).unwrap_or_default().into_iter().flat_map(|(_, points)| points).map(|(ms, _)| ms).collect()
}

/// A time just after the last sample, in the middle of the widest gap between the samples'
/// ms-within-the-second (and whole seconds, where subqueries' steps fall): no window that
/// starts or ends a whole number of seconds from it, or at a whole second, holds a sample on
/// its edge.
fn time_between_scrapes(times: &[i64]) -> i64 {
    let last = *times.iter().max().expect("samples");
    let mut fractions: Vec<i64> = times.iter().map(|t| t.rem_euclid(1000)).chain([0]).collect();
    fractions.sort_unstable();
    fractions.dedup();
    let (mut gap, mut from) = (0, 0);
    for (i, f) in fractions.iter().enumerate() {
        let next = fractions.get(i + 1).copied().unwrap_or(fractions[0] + 1000);
        if next - f > gap {
            (gap, from) = (next - f, *f);
        }
    }
    let phase = (from + gap / 2).rem_euclid(1000);
    last + (phase - last.rem_euclid(1000)).rem_euclid(1000)
}

// ---------------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_answers_equal_a_real_prometheus() {
    let Some(program) = testkit::require_program("prometheus") else { return };
    let queries = fixture();
    assert!(queries.len() >= 170, "the fixture has {} queries", queries.len());

    // The collector (remote_write) and the dashboard's API, on one store.
    let backend = testkit::Backend::Sqlite(tempfile::tempdir().unwrap());
    let mut config = CollectorConfig::new(backend.url());
    config.blocks_dir = Some(backend.blocks());
    config.otlp_grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    config.jaeger_addr = "127.0.0.1:0".parse().unwrap();
    // Never delete what arrives, whatever the date (CI also runs tests a year ahead).
    config.retention = Duration::from_secs(100 * 365 * 24 * 3600);
    let running = Collector::start(config, Arc::new(IngestTokens)).await.unwrap();
    let store = running.collector.store.clone();
    let billing = Arc::new(Billing::open(&store).await.unwrap());
    let state = DashboardState { store, billing, resolver: Arc::new(ReadTokens), settle: None };
    let app = dashboard::prometheus::router_with(state, dashboard::prometheus::Options::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dashboard_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The target, and Prometheus scraping it.
    let target = serve_target().await;
    let dir = tempfile::tempdir().unwrap();
    let mut prometheus = Prometheus::start(&program, dir.path(), target, running.otlp_http_addr);
    let servers = Servers {
        http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap(),
        prometheus: prometheus.url.clone(),
        ours: format!("http://{dashboard_addr}/prometheus"),
    };
    prometheus.wait_ready(&servers.http).await;
    let scraping = Instant::now();
    while scraping.elapsed() < SCRAPE_FOR {
        tokio::time::sleep(Duration::from_secs(1)).await;
        prometheus.assert_running();
    }

    // T: just after the last scrape (by Prometheus's clock: the test's may be shifted),
    // between two scrapes; then Prometheus holds everything up to T.
    let everything = r#"{__name__=~".+"}[5m]"#;
    let url = format!("{}/api/v1/query", servers.prometheus);
    let now = ask(&servers.http, &url, None, &[("query", everything)]).await;
    let times = sample_times(&now);
    assert!(times.len() > 1000, "Prometheus scraped too little ({} samples): {now:?}", times.len());
    let t = time_between_scrapes(&times);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The collector holds the same samples up to T once remote_write has caught up.
    let caught_up = Instant::now();
    let (probe, behind) = loop {
        let (theirs, ours) = servers.both(Kind::Instant, everything, t).await;
        match compare(&theirs, &ours, false, t) {
            Ok(()) => break (theirs, None),
            Err(difference) if caught_up.elapsed() > CATCH_UP => break (theirs, Some(difference)),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let probe_times = sample_times(&probe);
    let on_whole_seconds = probe_times.iter().filter(|ms| ms.rem_euclid(1000) == 0).count();
    let nearest_to_t = probe_times.iter().map(|ms| (ms - t).rem_euclid(1000).min((t - ms).rem_euclid(1000))).min();

    // The queries.
    struct Outcome<'a> {
        query: &'a Query,
        difference: Option<String>,
        /// Both failed, with different error types.
        error_types: Option<(String, String)>,
        /// What Prometheus answered: an error, or no series.
        prometheus_error: bool,
        prometheus_empty: bool,
    }
    let mut outcomes = Vec::new();
    for query in &queries {
        let text = substitute(&query.text, t);
        let (theirs, ours) = servers.both(query.kind, &text, t).await;
        let ordered = query.kind == Kind::Instant && (text.starts_with("sort(") || text.starts_with("sort_desc("));
        let error_types = match (&theirs, &ours) {
            (Answer::Error { kind: a, .. }, Answer::Error { kind: b, .. }) if a != b => Some((a.clone(), b.clone())),
            _ => None,
        };
        outcomes.push(Outcome {
            query,
            difference: compare(&theirs, &ours, ordered, t).err(),
            error_types,
            prometheus_error: matches!(theirs, Answer::Error { .. }),
            prometheus_empty: matches!(&theirs, Answer::Data(d) if d["result"].as_array().is_some_and(|r| r.is_empty())),
        });
    }
    prometheus.assert_running();
    let version = match ask(&servers.http, &format!("{}/api/v1/status/buildinfo", servers.prometheus), None, &[]).await
    {
        Answer::Data(data) => data["version"].as_str().unwrap_or("?").to_string(),
        Answer::Error { .. } => "?".into(),
    };
    drop(prometheus);
    running.shutdown().await;

    // The report.
    let (counted, apart): (Vec<&Outcome>, Vec<&Outcome>) = outcomes.iter().partition(|o| !is_apart(&o.query.group));
    let equal = counted.iter().filter(|o| o.difference.is_none()).count();
    let mut report = String::new();
    writeln!(
        report,
        "differential PromQL against Prometheus {version}: {equal} of {} queries equal ({:.1} %), at T = {} \
         (range queries: T-{RANGE_SECONDS}s..T by {RANGE_STEP}s)",
        counted.len(),
        100.0 * equal as f64 / counted.len() as f64,
        secs(t)
    )
    .unwrap();
    writeln!(
        report,
        "  Prometheus answered {} with no series and {} with an error; the data: {} samples, none within {} ms \
         of T's phase, {on_whole_seconds} on a whole second (where subquery windows end)",
        counted.iter().filter(|o| o.prometheus_empty).count(),
        counted.iter().filter(|o| o.prometheus_error).count(),
        probe_times.len(),
        nearest_to_t.unwrap_or(0),
    )
    .unwrap();
    if let Some(difference) = &behind {
        writeln!(
            report,
            "  WARNING: the collector's samples still differ from Prometheus's after {CATCH_UP:?}: {difference}"
        )
        .unwrap();
    }
    let mut groups: Vec<&str> = Vec::new();
    for o in &outcomes {
        if !groups.contains(&o.query.group.as_str()) {
            groups.push(&o.query.group);
        }
    }
    for group in &groups {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.query.group == *group).collect();
        let equal = of.iter().filter(|o| o.difference.is_none()).count();
        let apart = if is_apart(group) { " (not counted)" } else { "" };
        writeln!(report, "  {equal:>3} of {:>3} equal: {group}{apart}", of.len()).unwrap();
    }
    for (title, list) in [("differing queries", &counted), ("differing queries of the groups not counted", &apart)] {
        let differing: Vec<&&Outcome> = list.iter().filter(|o| o.difference.is_some()).collect();
        if differing.is_empty() {
            continue;
        }
        writeln!(report, "{title} ({}):", differing.len()).unwrap();
        for o in differing {
            let kind = if o.query.kind == Kind::Instant { "instant" } else { "range" };
            writeln!(report, "  [{}] {kind} {}", o.query.group, o.query.text).unwrap();
            writeln!(report, "      {}", o.difference.as_deref().unwrap_or_default()).unwrap();
        }
    }
    let mismatched: Vec<&Outcome> = outcomes.iter().filter(|o| o.error_types.is_some()).collect();
    if !mismatched.is_empty() {
        writeln!(report, "errors on both sides, of different types (counted as equal):").unwrap();
        for o in mismatched {
            let (a, b) = o.error_types.as_ref().unwrap();
            writeln!(report, "  {}: Prometheus {a}, ours {b}", o.query.text).unwrap();
        }
    }
    eprintln!("{report}");
    if let Ok(path) = std::env::var("SFAAS_DIFFERENTIAL_REPORT") {
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("cannot write the report to {path}: {e}"));
    }
    assert!(
        equal * 100 >= counted.len() * REQUIRED_PERCENT,
        "only {equal} of {} PromQL answers equal Prometheus's (at least {REQUIRED_PERCENT} % must): see the report above",
        counted.len()
    );
}
