//! The Prometheus HTTP API under `/prometheus`, for Grafana's Prometheus datasource with no
//! plugin (issue 6): point the datasource at `http://DASHBOARD/prometheus` with
//! `Authorization: Bearer <read token>` (or Basic auth with the token as password).
//!
//! # Endpoints
//!
//! Every route accepts `GET` and `POST`; parameters come from the query string and, for
//! `POST`, from an `application/x-www-form-urlencoded` body (body values first, as Go's
//! `ParseForm` orders them), so a `POST` with the parameters in the URL and an empty body works.
//!
//! | route | answer |
//! |---|---|
//! | `/api/v1/query` (`query`, `time`) | instant query: `vector`, `scalar`, `string`, or `matrix` for a range selector |
//! | `/api/v1/query_range` (`query`, `start`, `end`, `step`) | `matrix` (at most 11 000 steps) |
//! | `/api/v1/series` (`match[]`…, `start`, `end`, `limit`) | label sets |
//! | `/api/v1/labels` (`match[]`, `start`, `end`, `limit`) | label names |
//! | `/api/v1/label/{name}/values` (same) | label values (`__name__`: metric names); `/api/v1/labels/{name}/values` too |
//! | `/api/v1/metadata` (`metric`, `limit`, `limit_per_metric`) | `{metric: [{type, help, unit}]}` |
//! | `/api/v1/status/buildinfo` | version 3.0.0-sfaas and an empty `features` object (Grafana decodes a `map[string]string` and takes "no features" for Prometheus rather than Mimir); no token needed |
//! | `/api/v1/format_query` (`query`) | the query pretty-printed |
//! | `/api/v1/query_exemplars`, `/api/v1/rules`, `/api/v1/alerts` | empty (`[]`, `{groups: []}`, `{alerts: []}`): Grafana probes them |
//! | anything else under `/prometheus` | 404 `{status: "error", errorType: "not_found", error}` |
//!
//! Query answers carry `Server-Timing: load;dur=…, total;dur=…` (milliseconds spent reading
//! the data, and in all).
//!
//! Answers are Prometheus's JSON (`{status: "success", data, warnings?}`; values as strings,
//! `NaN` and `±Inf` included; timestamps as float seconds). Errors are
//! `{status: "error", errorType, error}`: `bad_data` (400) for an unparsable query or
//! parameter, `execution` (422) for a query that cannot run, and 422 `execution` naming the
//! construct for PromQL outside the supported subset (`unsupported PromQL: function
//! holt_winters`), `internal` (500) when the store fails, `unauthorized` (401) /
//! `forbidden` (403) for tokens, `timeout` (503) for a query past its 2 minutes (waiting for
//! one of the two evaluation places, which run on blocking threads, off the request runtime,
//! and evaluating: a range query checks its deadline at each step).
//!
//! # PromQL
//!
//! Parsed by promql-parser and evaluated here, with Prometheus 3's semantics:
//! - vector selectors with `=`, `!=`, `=~`, `!~` (regexes fully anchored) and `or` groups,
//!   range selectors `[d]` (left-open windows `(t - d, t]`), `offset` (also negative), `@`
//!   (time, `start()`, `end()`); instant selectors look back 5 minutes (no staleness markers);
//! - `rate`, `increase`, `delta` with Prometheus's extrapolation (to the window's edges when
//!   the samples reach within 110 % of their average interval of them, else by half an
//!   interval; counters not below zero; counter resets added back), `irate`, `idelta`;
//! - `sum`, `avg`, `min`, `max`, `count`, `group`, `stddev`, `stdvar` with `by`/`without`;
//! - `histogram_quantile` over classic `_bucket` series (`le`), as Prometheus interpolates;
//! - `+ - * / % ^ atan2`, `== != > < >= <=` (with `bool`), `and or unless` between scalars and
//!   vectors, one-to-one vector matching with `on (...)` / `ignoring (...)`;
//! - number and string literals, parentheses, unary minus; `time()`, `vector()`, `scalar()`,
//!   `abs`, `ceil`, `floor`, `round`, `sqrt`, `exp`, `ln`, `log2`, `log10`, `clamp`,
//!   `clamp_min`, `clamp_max`.
//!
//! Anything else (other functions, `topk` and other parameterised aggregations, subqueries,
//! `group_left`/`group_right`, `fill`) is refused with 422 naming it.
//!
//! # Series
//!
//! **Stored samples** (`metric_samples`, what the collector received by OTLP, remote_write or
//! scraping): the metric name is the `metric` column and the labels are the sample's label
//! object. Histograms stored whole (OTLP: `{"count","sum","buckets":[[le, cumulative], ...]}`)
//! are exposed as Prometheus exposes classic histograms: `<name>_bucket{le="..."}` (cumulative
//! counts; `le` written as Go's `%g`, `+Inf` last), `<name>_count` and `<name>_sum`; summaries
//! (`quantiles`) as `<name>{quantile="..."}`, `_count` and `_sum`. A `NULL` value is `NaN`.
//!
//! **Usage and billing counters**, synthesized from billing's usage records (every metered
//! invocation and state interval that billing has recorded; `sfaas bill run` or the dashboard's
//! periodic run brings them up to date):
//!
//! | metric | labels | value |
//! |---|---|---|
//! | `sfaas_usage_invocations_total` | `tenant`, `function`, `plan` | invocations |
//! | `sfaas_usage_cpu_ms_total` | `tenant`, `function`, `plan` | CPU milliseconds |
//! | `sfaas_usage_bytes_out_total` | `tenant`, `function`, `plan` | bytes sent |
//! | `sfaas_usage_state_byte_seconds_total` | `tenant`, `plan` | state byte-seconds |
//! | `sfaas_billing_cost_total` | `tenant`, `function`, `currency` | cost in the rate card's currency |
//!
//! Each is a counter that behaves as if scraped every minute, at whole minutes (UTC), from
//! the minute of its first record to the last whole minute up to now: its sample at minute
//! `g` counts what *started* before `g`. So `increase(x[1d])` and `rate(x[5m])` work as on any
//! scraped counter (with Prometheus's extrapolation: a window that begins inside the series'
//! history is extrapolated to its start), and `x - (x offset 30d or x * 0)` at a whole minute
//! is the exact usage of those 30 days (`or x * 0` for series that did not exist yet). `plan` is the tenant's plan when the usage happened (a plan change
//! starts new series). State usage has no function: its series (and the cost of state) carry no
//! `function` label, where the billing API shows the row `(state)`. The cost is the running sum
//! of the per-record costs that `Billing::invocation_costs` gives (full precision, records
//! priced in time order within each invoice, usage period and plan: free allowances and cheaper
//! tiers go to a period's first usage; late usage is priced after what earlier invoices billed):
//! invoice-level rounding and minimum charges are not in it. Records are placed at their start
//! time, late ones too. Computation is exact decimal; the sample value is a float. On SQLite,
//! state byte-seconds are summed in double precision (SQLite has no decimal type); on
//! PostgreSQL exactly.
//!
//! # Tenancy
//!
//! Every series carries a `tenant` label (a stored sample's own `tenant` label becomes
//! `exported_tenant`). A read token sees only its tenant's series, in every endpoint: the
//! tenant is a condition of every SQL read, whatever the query's matchers say
//! (`{tenant="other"}` simply selects nothing). `X-Scope-OrgID`, when sent with a read token,
//! must name its tenant (403 otherwise). The admin token sees every tenant, or only the one
//! `X-Scope-OrgID` names (so that an operator can point one Grafana datasource per tenant at the
//! dashboard).
//!
//! # Speed
//!
//! A query's selectors are loaded once for all its steps, and each step is evaluated from
//! them in memory. Stored samples are read through the primary key and `samples_by_time`
//! (the admin's tenants are listed by a skip scan and read with `tenant IN (...)`).
//!
//! The synthesized counters are read only at the sample times the query needs (for a range
//! query those repeat with its step), from the usage records summed per (invoice, usage
//! period, plan, function) and interval between those times (`usage.rs`):
//! - from memory: a scope's records (up to [`Options::cache_max_records`], default 500 000)
//!   are kept summed per minute and brought up to date on each query with what billing
//!   recorded since the watermark the sums are at (one small statement when nothing changed;
//!   only the new records otherwise; everything again, in the background, if the record count
//!   disagrees with `usage_totals`). A scope's first query loads them in the background and is
//!   answered the second way. At most 4 scopes are kept (a function's minute takes 64 bytes:
//!   at most some 130 MB with 500 000 records each, every one in a minute of its own);
//! - or by one aggregation per query over billing's usage segments, which groups the records
//!   from the query's first read time on into the intervals (what came before is
//!   `usage_totals` minus that, read in the same snapshot); segments whose records all started
//!   before that time are not read.
//!
//! Costs are then computed per (interval, function), record by record only around the end of a
//! free allowance or a tier. `/series`, `/labels` and label values list the synthesized series
//! from `usage_totals` (small); the stored ones from the samples in the requested time range.
//!
//! # Other decisions
//!
//! - `holt_winters` (Prometheus 2's name, unknown to promql-parser) is registered with the
//!   parser so that it is refused by name (422) rather than as a parse error.
//! - Results of instant queries are sorted by labels; range results (matrices) too.
//! - No staleness markers: a series ends 5 minutes after its last sample.
//! - Times (`time`, `start`, `end`, `@`) lie within what a timestamp in nanoseconds holds,
//!   1677-09-21 to 2262-04-11 (Prometheus clients' "min time" and "max time" are its ends), and
//!   ranges and offsets are at most 10^12 s (about 31 700 years); beyond either, 400
//!   `bad_data` naming the value. Prometheus takes any time and wraps; inside these bounds no
//!   sum of a time, an offset and a range overflows.

mod data;
mod eval;
#[cfg(fuzzing)]
pub mod fuzzing;
mod usage;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use contract::Viewer;
use promql_parser::parser::Expr;

use crate::DashboardState;
use data::Times;
use eval::{Evaluator, Labels, Plan, QueryError, Selector, Series, Value};

pub use data::{EXPORTED_TENANT_LABEL, TENANT_LABEL};
pub use usage::{BYTES_OUT, COST, CPU_MS, INVOCATIONS, STATE};

/// The most steps a range query may have (Prometheus's limit).
const MAX_POINTS: i64 = 11_000;
/// The version reported by `/api/v1/status/buildinfo` (the Prometheus API level implemented).
pub const VERSION: &str = "3.0.0-sfaas";

/// What the handlers read: the dashboard's state, and the usage cache (`usage.rs`).
#[derive(Clone)]
struct Api {
    state: DashboardState,
    usage: std::sync::Arc<usage::Cache>,
    /// Places of queries loading or evaluating (evaluation runs on blocking threads, off the
    /// request runtime).
    places: std::sync::Arc<Places>,
    query_timeout: Duration,
    max_samples: usize,
}

/// Places for PromQL queries to load and evaluate in: `all` at once, of which one tenant's (or
/// the operator's) queries hold at most half, so that a tenant's query storm leaves room for
/// the others'. More wait for a place.
///
/// Each scope also has a budget of query time at the request threads' priority
/// ([`FOREGROUND_SHARE`] of a core, a second of it at once): a dashboard's queries stay within
/// it and are answered at once; a scope over it has its queries loaded and evaluated on the
/// background runtime ([`collector::background`]), where they take the CPU that calls leave.
struct Places {
    all: std::sync::Arc<tokio::sync::Semaphore>,
    per_scope: usize,
    scopes: std::sync::Mutex<HashMap<Option<String>, Scope>>,
}

/// The share of a core each scope's queries may use at the request threads' priority.
const FOREGROUND_SHARE: f64 = 0.1;
/// Seconds of query time a scope may spend at once before its budget holds it back.
const FOREGROUND_BURST: f64 = 1.0;

struct Scope {
    share: std::sync::Arc<tokio::sync::Semaphore>,
    /// Seconds of query time left in the foreground budget (below zero: in debt), as of `at`.
    budget: f64,
    at: Instant,
}

/// A query's place: its scope's share and one of all, held until it is dropped.
struct Place {
    _share: tokio::sync::OwnedSemaphorePermit,
    _place: tokio::sync::OwnedSemaphorePermit,
    /// Within its scope's foreground budget.
    foreground: bool,
}

impl Places {
    /// `all` places (at least two).
    fn new(all: usize) -> Self {
        let all = all.max(2);
        Self {
            all: std::sync::Arc::new(tokio::sync::Semaphore::new(all)),
            per_scope: all / 2,
            scopes: Default::default(),
        }
    }

    /// Runs `f` on `scope`'s state, its budget refilled to now.
    fn scope<T>(&self, scope: Option<&str>, f: impl FnOnce(&mut Scope) -> T) -> T {
        let mut scopes = self.scopes.lock().unwrap();
        let state = scopes.entry(scope.map(str::to_string)).or_insert_with(|| Scope {
            share: std::sync::Arc::new(tokio::sync::Semaphore::new(self.per_scope)),
            budget: FOREGROUND_BURST,
            at: Instant::now(),
        });
        let now = Instant::now();
        state.budget = (state.budget + (now - state.at).as_secs_f64() * FOREGROUND_SHARE).min(FOREGROUND_BURST);
        state.at = now;
        f(state)
    }

    /// Waits for a place for a query of `scope`, until `deadline`.
    async fn take(&self, scope: Option<&str>, deadline: Instant) -> Result<Place, ApiError> {
        let share = self.scope(scope, |state| state.share.clone());
        let queued = async {
            let _share = share.acquire_owned().await.expect("the semaphore is never closed");
            let _place = self.all.clone().acquire_owned().await.expect("the semaphore is never closed");
            let foreground = self.scope(scope, |state| state.budget > 0.0);
            Place { _share, _place, foreground }
        };
        tokio::time::timeout_at(deadline.into(), queued)
            .await
            .map_err(|_| ApiError::timeout("query timed out in query queue"))
    }

    /// Counts `spent` seconds of a query against its scope's foreground budget.
    fn spend(&self, scope: Option<&str>, spent: Duration) {
        self.scope(scope, |state| state.budget -= spent.as_secs_f64());
    }
}

impl Api {
    /// Loads what `plan` selects at `times` for `scope` and runs `evaluate` on it with the
    /// query's deadline (it checks the deadline between evaluation steps), once the query has
    /// a place: at the request threads' priority while its scope is within its budget, else on
    /// the background runtime. Returns what `evaluate` made and how long loading took.
    async fn execute<T: Send + 'static>(
        &self,
        scope: Option<String>,
        started: Instant,
        plan: Plan,
        times: Times,
        evaluate: impl FnOnce(&Plan, &[Vec<Series>], Instant) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<(T, Duration), ApiError> {
        let deadline = started + self.query_timeout;
        let place = self.places.take(scope.as_deref(), deadline).await?;
        let (api, placed) = (self.clone(), Instant::now());
        let work = async move {
            let now = api.state.store.clock().now_ms();
            let loaded =
                data::load(&api.state, &api.usage, scope.as_deref(), &plan, &times, now, api.max_samples).await;
            let load = started.elapsed();
            let value = match loaded {
                Ok(loaded) => tokio::task::spawn_blocking(move || evaluate(&plan, &loaded, deadline))
                    .await
                    .map_err(panicked)
                    .and_then(|value| value),
                Err(error) => Err(error.into()),
            };
            api.places.spend(scope.as_deref(), placed.elapsed());
            Ok::<_, ApiError>((value?, load))
        };
        if place.foreground {
            // A panic here is caught by the router's layer, as in any handler.
            work.await
        } else {
            collector::background::spawn(work).await.map_err(panicked)?
        }
    }
}

/// A panic in loading or evaluation is a bug: this query fails, the server goes on.
fn panicked(error: tokio::task::JoinError) -> ApiError {
    tracing::error!(%error, "PromQL evaluation panicked");
    ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "internal", message: "query evaluation failed".into() }
}

/// How the API is served.
#[derive(Debug, Clone)]
pub struct Options {
    /// The usage of a scope (a tenant, or every tenant for the admin) is kept summed per minute
    /// in memory when it has at most this many usage records (0: never; read per query).
    pub cache_max_records: i64,
    /// A query that finds a scope's sums not loaded waits for them (else they load in the
    /// background while queries read per query: the default).
    pub cache_wait: bool,
    /// Longest a query may take, waiting for a place and evaluating (Prometheus's
    /// `--query.timeout`, 2 minutes by default).
    pub query_timeout: Duration,
    /// Most stored samples one query may load (422 `execution` beyond, as Prometheus's
    /// `--query.max-samples`): [`data::MAX_SAMPLES`] by default.
    pub max_samples: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cache_max_records: usage::MAX_CACHED_RECORDS,
            cache_wait: false,
            query_timeout: Duration::from_secs(120),
            max_samples: data::MAX_SAMPLES,
        }
    }
}

pub fn router(state: DashboardState) -> Router {
    router_with(state, Options::default())
}

pub fn router_with(state: DashboardState, options: Options) -> Router {
    let api = Api {
        state,
        usage: std::sync::Arc::new(usage::Cache::new(options.cache_max_records, options.cache_wait)),
        // One per core.
        places: std::sync::Arc::new(Places::new(std::thread::available_parallelism().map_or(2, usize::from))),
        query_timeout: options.query_timeout,
        max_samples: options.max_samples,
    };
    // Warm the operator's scope (every tenant) now, so that the first dashboards do not read
    // usage per query while its sums load (a few seconds for 100 000 records).
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let (cache, state) = (api.usage.clone(), api.state.clone());
        runtime.spawn(async move { cache.warm(&state, None).await });
    }
    Router::new()
        .route("/prometheus/api/v1/query", get(query).post(query))
        .route("/prometheus/api/v1/query_range", get(query_range).post(query_range))
        .route("/prometheus/api/v1/series", get(series).post(series))
        .route("/prometheus/api/v1/labels", get(labels).post(labels))
        .route("/prometheus/api/v1/label/{name}/values", get(label_values).post(label_values))
        .route("/prometheus/api/v1/labels/{name}/values", get(label_values).post(label_values))
        .route("/prometheus/api/v1/metadata", get(metadata).post(metadata))
        .route("/prometheus/api/v1/status/buildinfo", get(buildinfo).post(buildinfo))
        .route("/prometheus/api/v1/format_query", get(format_query).post(format_query))
        .route("/prometheus/api/v1/query_exemplars", get(exemplars).post(exemplars))
        .route("/prometheus/api/v1/rules", get(rules).post(rules))
        .route("/prometheus/api/v1/alerts", get(alerts).post(alerts))
        .route("/prometheus", any(not_found))
        .route("/prometheus/", any(not_found))
        .route("/prometheus/{*rest}", any(not_found))
        .with_state(api)
}

// ---------------------------------------------------------------------------------------------
// Responses

/// A failed request, in Prometheus's error JSON.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad_data(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "bad_data", message: message.into() }
    }

    fn param(name: &str, error: impl std::fmt::Display) -> Self {
        Self::bad_data(format!("invalid parameter {name:?}: {error}"))
    }

    /// Prometheus's answer to a query past its timeout: 503, `timeout`.
    fn timeout(message: &str) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, kind: "timeout", message: message.into() }
    }
}

impl From<QueryError> for ApiError {
    fn from(error: QueryError) -> Self {
        let (status, kind) = match &error {
            QueryError::BadData(_) => (StatusCode::BAD_REQUEST, "bad_data"),
            QueryError::Execution(_) | QueryError::Unsupported(_) => (StatusCode::UNPROCESSABLE_ENTITY, "execution"),
            QueryError::Store(_) | QueryError::Billing(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self { status, kind, message: error.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "prometheus API request failed");
        }
        let body = format!(
            "{{\"status\":\"error\",\"errorType\":{},\"error\":{}}}",
            json_string(self.kind),
            json_string(&self.message)
        );
        (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// `{"status":"success","data":<data>}` with `data` already JSON.
fn success(data: String, warnings: &[String]) -> Response {
    let mut body = format!("{{\"status\":\"success\",\"data\":{data}");
    if !warnings.is_empty() {
        let list: Vec<String> = warnings.iter().map(|w| json_string(w)).collect();
        let _ = write!(body, ",\"warnings\":[{}]", list.join(","));
    }
    body.push('}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// A sample value as Prometheus writes it (Go's `FormatFloat(v, 'f', -1, 64)`).
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// A timestamp in ms as float seconds (`1435781451.781`, `4`).
fn format_time(ms: i64) -> String {
    if ms < 0 {
        return format!("{}", ms as f64 / 1000.0);
    }
    let (secs, frac) = (ms / 1000, ms % 1000);
    if frac == 0 { secs.to_string() } else { format!("{secs}.{}", format!("{frac:03}").trim_end_matches('0')) }
}

fn labels_json(labels: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(k));
        out.push(':');
        out.push_str(&json_string(v));
    }
    out.push('}');
    out
}

fn pair(t: i64, v: &str) -> String {
    format!("[{},{}]", format_time(t), json_string(v))
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Request parameters: the form body's, then the query string's (Go's `ParseForm` order).
struct Params(Vec<(String, String)>);

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(text: &str, out: &mut Vec<(String, String)>) {
    for part in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k), percent_decode(v)));
    }
}

impl Params {
    fn new(headers: &HeaderMap, uri: &Uri, body: &[u8]) -> Self {
        let mut pairs = Vec::new();
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let form = content_type.is_empty() || content_type.starts_with("application/x-www-form-urlencoded");
        if !body.is_empty() && form {
            parse_form(&String::from_utf8_lossy(body), &mut pairs);
        }
        if let Some(query) = uri.query() {
            parse_form(query, &mut pairs);
        }
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    fn time(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| parse_time(v).map_err(|e| ApiError::param(name, e)))
            .transpose()
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        match self.get("limit").filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => {
                let n: i64 =
                    v.parse().map_err(|_| ApiError::param("limit", format!("cannot parse {v:?} to an integer")))?;
                Ok((n > 0).then_some(n as usize))
            }
        }
    }
}

/// A time as Prometheus takes it: float seconds or RFC 3339, in ms, within the times a query
/// may name ([`eval::bounded_time`]: a time beyond them would overflow the arithmetic on it).
fn parse_time(text: &str) -> Result<i64, String> {
    let ms = if let Ok(seconds) = text.parse::<f64>()
        && seconds.is_finite()
    {
        // Saturates: a time past an i64 of ms is refused below like any out of bounds.
        (seconds * 1000.0).round() as i64
    } else {
        match text {
            // Prometheus clients' "min time" and "max time" (Go's extremes).
            "-292273086-05-16T16:47:06Z" => eval::MIN_TIME_MS,
            "292277025-08-17T07:12:55.807Z" => eval::MAX_TIME_MS,
            _ => chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.timestamp_millis())
                .map_err(|_| format!("cannot parse {text:?} to a valid timestamp"))?,
        }
    };
    eval::bounded_time(ms, &format!("cannot parse {text:?} to a valid timestamp: it"))
}

/// A duration as Prometheus takes it: float seconds or a PromQL duration (`1h30m`).
fn parse_duration(text: &str) -> Result<i64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if !seconds.is_finite() || seconds.abs() * 1000.0 > i64::MAX as f64 {
            return Err(format!("cannot parse {text:?} to a valid duration. It overflows int64"));
        }
        return Ok((seconds * 1000.0).round() as i64);
    }
    promql_parser::util::parse_duration(text)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .map_err(|_| format!("cannot parse {text:?} to a valid duration"))
}

/// The tenant the caller reads (`None`: the admin, every tenant).
fn scope(state: &DashboardState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match state.viewer(headers) {
        Ok(Viewer::Tenant(tenant)) => Ok(Some(tenant)),
        Ok(Viewer::Admin) => Ok(headers
            .get(contract::semconv::HEADER_SCOPE_ORG_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)),
        Err(error) => Err(ApiError {
            status: error.0,
            kind: if error.0 == StatusCode::FORBIDDEN { "forbidden" } else { "unauthorized" },
            message: error.1,
        }),
    }
}

/// Functions promql-parser does not know but that queries written for Prometheus 2 use:
/// parsed, so that they are refused by name (422) like every other unsupported function.
fn register_legacy_functions() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use promql_parser::parser::Function;
        use promql_parser::parser::value::ValueType;
        let holt_winters = Function::new(
            "holt_winters",
            vec![ValueType::Matrix, ValueType::Scalar, ValueType::Scalar],
            0,
            ValueType::Vector,
            false,
        );
        if let Err(error) = promql_parser::parser::register_extra_functions(vec![holt_winters]) {
            tracing::debug!(%error, "holt_winters is known to promql-parser");
        }
    });
}

fn parse_query(text: Option<&str>) -> Result<Expr, ApiError> {
    let text = text.unwrap_or("");
    if text.trim().is_empty() {
        return Err(ApiError::param("query", "query is empty"));
    }
    parse_bounded("query", text)
}

/// Parses PromQL given as `param`, within the shape limits (checked first: the parser
/// recurses once per level), as every route that takes PromQL must.
fn parse_bounded(param: &str, text: &str) -> Result<Expr, ApiError> {
    register_legacy_functions();
    check_shape(text).map_err(|e| ApiError::param(param, e))?;
    promql_parser::parser::parse(text).map_err(|e| ApiError::param(param, e.trim()))
}

/// Longest query accepted, in bytes.
const MAX_QUERY_BYTES: usize = 16 << 10;
/// Deepest nesting of brackets, and most operators, a query may have: the parser, the planner
/// and the evaluator recurse once per level (a query of 1 000 nested parentheses overflowed a
/// 2 MiB thread stack and aborted the process), so the depth a query can reach is bounded
/// before any of them runs. Dashboards written for Prometheus stay far below.
const MAX_NESTING: usize = 64;
const MAX_OPERATORS: usize = 256;

/// Checks, without parsing, that a query is within the limits above: brackets and operators
/// are counted outside string literals (an over-count only makes the check stricter).
fn check_shape(text: &str) -> Result<(), String> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(format!("query is {} bytes long, more than the limit of {MAX_QUERY_BYTES}", text.len()));
    }
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut word = String::new();
    // Inside `[…]` (ranges, subqueries) and after `offset`, a plain number is a duration.
    let (mut ranges, mut after_offset) = (0usize, false);
    for c in text.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q != '`' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c.to_ascii_lowercase());
            continue;
        }
        operators += usize::from(matches!(word.as_str(), "and" | "or" | "unless" | "atan2"));
        if ranges > 0 || after_offset {
            check_duration_number(&word)?;
        }
        if !word.is_empty() {
            after_offset = word == "offset";
        }
        word.clear();
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
                ranges += usize::from(c == '[');
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                ranges = ranges.saturating_sub(usize::from(c == ']'));
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '=' | '!' | '<' | '>' => operators += 1,
            _ => {}
        }
    }
    operators += usize::from(matches!(word.as_str(), "and" | "or" | "unless" | "atan2"));
    if ranges > 0 || after_offset {
        check_duration_number(&word)?;
    }
    if deepest > MAX_NESTING {
        return Err(format!("query nests {deepest} brackets deep, more than the limit of {MAX_NESTING}"));
    }
    if operators > MAX_OPERATORS {
        return Err(format!("query has {operators} operators, more than the limit of {MAX_OPERATORS}"));
    }
    Ok(())
}

/// Longest duration a query may write as a plain number of seconds (about 31 700 years): the
/// longest range or offset evaluated.
const MAX_DURATION_SECONDS: f64 = (eval::MAX_DURATION_MS / 1000) as f64;

/// A plain number where PromQL reads a duration (`x[300]`, `x offset 60`) must be a finite
/// number of seconds that a duration holds: the parser panics on `NaN`, `Inf` or 1e30 there.
fn check_duration_number(word: &str) -> Result<(), String> {
    let number = match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok().map(|n| n as f64),
        None => word.parse::<f64>().ok(),
    };
    match number {
        Some(seconds) if !(0.0..=MAX_DURATION_SECONDS).contains(&seconds) => {
            Err(format!("duration {word:?} is not a number of seconds from 0 to {MAX_DURATION_SECONDS}"))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Queries

async fn query(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let started = Instant::now();
    let tenant = scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let now = state.store.clock().now_ms();
    let time = params.time("time")?.unwrap_or(now);
    let expr = parse_query(params.get("query"))?;
    let plan = eval::plan(&expr)?;
    let times = Times { start: time, end: time, step: 0 };
    let (value, load) = api
        .execute(tenant, started, plan, times, move |plan, loaded, _| {
            let evaluator = Evaluator { plan, data: loaded, start: time, end: time };
            Ok(evaluator.eval(&plan.root, time)?)
        })
        .await?;
    let data = match value {
        Value::Scalar(v) => format!("{{\"resultType\":\"scalar\",\"result\":{}}}", pair(time, &format_value(v))),
        Value::Str(s) => format!("{{\"resultType\":\"string\",\"result\":{}}}", pair(time, &s)),
        Value::Vector(mut samples) => {
            samples.sort_by(|a, b| a.labels.cmp(&b.labels));
            let items: Vec<String> = samples
                .iter()
                .map(|s| {
                    format!(
                        "{{\"metric\":{},\"value\":{}}}",
                        labels_json(&s.labels),
                        pair(time, &format_value(s.value))
                    )
                })
                .collect();
            format!("{{\"resultType\":\"vector\",\"result\":[{}]}}", items.join(","))
        }
        Value::Matrix(mut series) => {
            series.sort_by(|a, b| a.0.cmp(&b.0));
            format!("{{\"resultType\":\"matrix\",\"result\":[{}]}}", matrix_items(&series))
        }
    };
    Ok(timed(success(data, &[]), load, started))
}

/// `Server-Timing` (loading the data; everything), for clients and benchmarks.
fn timed(mut response: Response, load: Duration, started: Instant) -> Response {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let value = format!("load;dur={:.1}, total;dur={:.1}", ms(load), ms(started.elapsed()));
    if let Ok(value) = header::HeaderValue::from_str(&value) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

fn matrix_items(series: &[(Labels, Vec<(i64, f64)>)]) -> String {
    let mut out = String::new();
    for (i, (labels, values)) in series.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"metric\":{},\"values\":[", labels_json(labels));
        for (j, (t, v)) in values.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&pair(*t, &format_value(*v)));
        }
        out.push_str("]}");
    }
    out
}

async fn query_range(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let started = Instant::now();
    let tenant = scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let start =
        params.time("start")?.ok_or_else(|| ApiError::param("start", "cannot parse \"\" to a valid timestamp"))?;
    let end = params.time("end")?.ok_or_else(|| ApiError::param("end", "cannot parse \"\" to a valid timestamp"))?;
    if end < start {
        return Err(ApiError::param("end", "end timestamp must not be before start time"));
    }
    let step = parse_duration(params.get("step").unwrap_or("")).map_err(|e| ApiError::param("step", e))?;
    if step <= 0 {
        return Err(ApiError::param(
            "step",
            "zero or negative query resolution step widths are not accepted. Try a positive integer",
        ));
    }
    if end.saturating_sub(start) / step >= MAX_POINTS {
        return Err(ApiError::bad_data(
            "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)",
        ));
    }
    let expr = parse_query(params.get("query"))?;
    let plan = eval::plan(&expr)?;
    if plan.returns_matrix() || plan.returns_string() {
        let kind = if plan.returns_matrix() { "range vector" } else { "string" };
        return Err(ApiError::bad_data(format!(
            "invalid expression type {kind:?} for range query, must be Scalar or instant Vector"
        )));
    }
    let times = Times { start, end, step };
    let (series, load) = api
        .execute(tenant, started, plan, times, move |plan, loaded, deadline| {
            let evaluator = Evaluator { plan, data: loaded, start, end };
            let mut series: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
            for t in times.iter() {
                if Instant::now() > deadline {
                    return Err(ApiError::timeout("query timed out in expression evaluation"));
                }
                match evaluator.eval(&plan.root, t)? {
                    Value::Scalar(v) => series.entry(std::sync::Arc::new(Vec::new())).or_default().push((t, v)),
                    Value::Vector(samples) => {
                        for s in samples {
                            series.entry(s.labels).or_default().push((t, s.value));
                        }
                    }
                    _ => return Err(ApiError::bad_data("range queries must return a scalar or an instant vector")),
                }
            }
            Ok(series.into_iter().collect::<Vec<(Labels, Vec<(i64, f64)>)>>())
        })
        .await?;
    let body = success(format!("{{\"resultType\":\"matrix\",\"result\":[{}]}}", matrix_items(&series)), &[]);
    Ok(timed(body, load, started))
}

// ---------------------------------------------------------------------------------------------
// Series, labels, metadata

/// `match[]` selectors (each must be a vector selector).
fn selectors(params: &Params) -> Result<Vec<Selector>, ApiError> {
    let mut out = Vec::new();
    for text in params.all("match[]") {
        let expr = parse_bounded("match[]", text)?;
        let Expr::VectorSelector(vs) = expr else {
            return Err(ApiError::param("match[]", format!("{text:?} is not a series selector")));
        };
        out.push(Selector {
            name: vs.name.clone(),
            matchers: vs.matchers.clone(),
            offset_ms: 0,
            at: None,
            range_ms: None,
            needs_previous: false,
            all_samples: false,
        });
    }
    Ok(out)
}

/// The caller's series with data in the request's `start..end` that any `match[]` selects
/// (every series when there is none).
async fn matching_series(
    state: &DashboardState,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Vec<Labels>, ApiError> {
    let tenant = scope(state, headers)?;
    let selectors = selectors(params)?;
    let now = state.store.clock().now_ms();
    let lo = params.time("start")?.unwrap_or(eval::MIN_TIME_MS);
    let hi = params.time("end")?.unwrap_or(eval::MAX_TIME_MS);
    let names: Option<BTreeSet<String>> = if !selectors.is_empty() && selectors.iter().all(|s| s.exact_name().is_some())
    {
        Some(selectors.iter().filter_map(|s| s.exact_name().map(str::to_string)).collect())
    } else {
        None
    };
    let all = data::catalogue(state, tenant.as_deref(), lo, hi, names.as_ref(), now).await?;
    Ok(all.into_iter().filter(|labels| selectors.is_empty() || selectors.iter().any(|s| s.matches(labels))).collect())
}

fn truncate<T>(list: &mut Vec<T>, limit: Option<usize>) -> Vec<String> {
    match limit {
        Some(limit) if list.len() > limit => {
            list.truncate(limit);
            vec!["results truncated due to limit".to_string()]
        }
        _ => Vec::new(),
    }
}

async fn series(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let params = Params::new(&headers, &uri, &body);
    scope(state, &headers)?;
    if params.all("match[]").is_empty() {
        return Err(ApiError::bad_data("no match[] parameter provided"));
    }
    let limit = params.limit()?;
    let mut list = matching_series(state, &headers, &params).await?;
    let warnings = truncate(&mut list, limit);
    let items: Vec<String> = list.iter().map(|l| labels_json(l)).collect();
    Ok(success(format!("[{}]", items.join(",")), &warnings))
}

async fn labels(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let params = Params::new(&headers, &uri, &body);
    let limit = params.limit()?;
    let list = matching_series(state, &headers, &params).await?;
    let mut names: Vec<String> =
        list.iter().flat_map(|l| l.iter().map(|(k, _)| k.clone())).collect::<BTreeSet<_>>().into_iter().collect();
    let warnings = truncate(&mut names, limit);
    let items: Vec<String> = names.iter().map(|n| json_string(n)).collect();
    Ok(success(format!("[{}]", items.join(",")), &warnings))
}

async fn label_values(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let state = &api.state;
    let params = Params::new(&headers, &uri, &body);
    let limit = params.limit()?;
    let list = matching_series(state, &headers, &params).await?;
    let mut values: Vec<String> = list
        .iter()
        .map(|l| eval::label(l, &name).to_string())
        .filter(|v| !v.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let warnings = truncate(&mut values, limit);
    let items: Vec<String> = values.iter().map(|n| json_string(n)).collect();
    Ok(success(format!("[{}]", items.join(",")), &warnings))
}

async fn metadata(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let tenant = scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let limit = params.limit()?;
    let metric = params.get("metric").filter(|m| !m.is_empty());
    let mut list = data::metadata(state, tenant.as_deref()).await?;
    list.retain(|(name, _, _)| metric.is_none_or(|m| m == name));
    let warnings = truncate(&mut list, limit);
    let items: Vec<String> = list
        .iter()
        .map(|(name, kind, help)| {
            format!(
                "{}:[{{\"type\":{},\"help\":{},\"unit\":\"\"}}]",
                json_string(name),
                json_string(kind),
                json_string(help)
            )
        })
        .collect();
    Ok(success(format!("{{{}}}", items.join(",")), &warnings))
}

// ---------------------------------------------------------------------------------------------
// The rest of what Grafana calls

async fn buildinfo() -> Response {
    success(
        format!(
            "{{\"version\":{},\"revision\":\"sfaas\",\"branch\":\"sfaas\",\"buildUser\":\"sfaas\",\
             \"buildDate\":\"\",\"goVersion\":\"none (stateful-faas dashboard)\",\"features\":{{}}}}",
            json_string(VERSION)
        ),
        &[],
    )
}

async fn format_query(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let expr = parse_query(params.get("query"))?;
    Ok(success(json_string(&expr.prettify()), &[]))
}

async fn exemplars(State(api): State<Api>, headers: HeaderMap) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    Ok(success("[]".into(), &[]))
}

async fn rules(State(api): State<Api>, headers: HeaderMap) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    Ok(success("{\"groups\":[]}".into(), &[]))
}

async fn alerts(State(api): State<Api>, headers: HeaderMap) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    Ok(success("{\"alerts\":[]}".into(), &[]))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found",
        message: format!("unknown API endpoint {}", uri.path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant whose queries hold its share of places does not keep another's waiting, and
    /// one whose queries took much time runs the next ones in the background.
    #[tokio::test]
    async fn one_scope_holds_at_most_half_the_places() {
        let places = Places::new(4);
        let soon = || Instant::now() + Duration::from_millis(50);
        let held =
            [places.take(Some("storm"), soon()).await.unwrap(), places.take(Some("storm"), soon()).await.unwrap()];
        let error = places.take(Some("storm"), soon()).await.err().expect("storm's share is taken");
        assert_eq!(error.message, "query timed out in query queue");
        let calm = [places.take(Some("calm"), soon()).await.unwrap(), places.take(None, soon()).await.unwrap()];
        assert!(places.take(Some("other"), soon()).await.is_err(), "all four places are taken");
        drop(held);
        assert!(places.take(Some("storm"), soon()).await.unwrap().foreground);
        drop(calm);
        // Past its budget of query time, a scope's queries go to the background; others' do not.
        places.spend(Some("storm"), Duration::from_secs(2));
        assert!(!places.take(Some("storm"), soon()).await.unwrap().foreground);
        assert!(places.take(Some("calm"), soon()).await.unwrap().foreground);
    }

    #[test]
    fn times_and_values_as_prometheus_writes_them() {
        assert_eq!(format_time(4000), "4");
        assert_eq!(format_time(1435781451781), "1435781451.781");
        assert_eq!(format_time(1500), "1.5");
        assert_eq!(format_value(2.0), "2");
        assert_eq!(format_value(0.1), "0.1");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(1e21), "1000000000000000000000");
    }

    #[test]
    fn parameters_times_and_durations() {
        let mut pairs = Vec::new();
        parse_form("query=1%2B1&time=4&match%5B%5D=a+b&x", &mut pairs);
        assert_eq!(pairs[0], ("query".into(), "1+1".into()));
        assert_eq!(pairs[2], ("match[]".into(), "a b".into()));
        assert_eq!(pairs[3], ("x".into(), "".into()));
        assert_eq!(parse_time("1435781451.781"), Ok(1435781451781));
        assert_eq!(parse_time("2015-07-01T20:10:51.781Z"), Ok(1435781451781));
        assert!(parse_time("yesterday").is_err());
        // Prometheus clients' extremes are the bounds; past them (an i64 of ns) is refused.
        assert_eq!(parse_time("-292273086-05-16T16:47:06Z"), Ok(eval::MIN_TIME_MS));
        assert_eq!(parse_time("292277025-08-17T07:12:55.807Z"), Ok(eval::MAX_TIME_MS));
        assert_eq!(parse_time("9223372036.854"), Ok(eval::MAX_TIME_MS));
        assert_eq!(
            parse_time("1e300"),
            Err("cannot parse \"1e300\" to a valid timestamp: it is outside the times a query may name, \
                 1677-09-21T00:12:43.146Z to 2262-04-11T23:47:16.854Z"
                .into())
        );
        assert!(parse_time("9999-12-31T23:59:59Z").is_err());
        assert_eq!(parse_duration("3600"), Ok(3_600_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("15.5"), Ok(15_500));
    }
}
