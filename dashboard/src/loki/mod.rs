//! Loki's HTTP API under `/loki/api/v1`, for Grafana's Loki datasource with no plugin: point
//! the datasource at the dashboard's address (`http://DASHBOARD`; Grafana adds
//! `/loki/api/v1/...`) with `Authorization: Bearer <read token>`. A read token reads its
//! tenant's logs; the admin token reads the tenant `X-Scope-OrgID` names (and must name one).
//!
//! # Endpoints
//!
//! Every route accepts `GET` and `POST` (form parameters in the body or the query string).
//!
//! | route | answer |
//! |---|---|
//! | `query_range` (`query`, `start`, `end`, `since`, `limit`, `direction`, `step`) | log query: `streams`; metric query: `matrix` (at most 11 000 steps) |
//! | `query` (`query`, `time`, `limit`, `direction`) | log query: `streams` (the `limit` lines before `time`); metric query: `vector` |
//! | `labels`, `label` (`start`, `end`, `since`) | stream label names (of the range's newest 1 000 000 lines, as the three below) |
//! | `label/{name}/values` (same, `query`) | a stream label's values |
//! | `series` (`match[]`…, `start`, `end`) | stream label sets |
//! | `index/stats` (`query`, `start`, `end`) | `{streams, chunks, bytes, entries}` of the selector's streams |
//! | `status/buildinfo` | the Loki API level implemented |
//! | `tail` (`query`, `start`, `limit`) | a WebSocket: the newest lines, then each new one (`tail.rs`) |
//!
//! Times are Loki's: nanoseconds (an integer of more than 10 digits), seconds (an integer of
//! at most 10 digits, or a decimal), or RFC 3339; `end` defaults to now and `start` to an hour
//! before it (`since` instead gives the range's length); `step` is a duration or seconds,
//! by default the range / 250 (at least a second). Log queries read `[start, end)`, `limit`
//! (default 100, at most 5 000) lines, `backward` (newest first, the default) or `forward`.
//! Errors are plain text, as Loki's: 400 for a query that does not parse or cannot run,
//! 401/403 for tokens, 503 for a query past its 2 minutes, 500 when the store fails.
//!
//! # Streams
//!
//! A tenant's log records are of two sources, told apart by the `source` label:
//! - `source="function"`: the platform's records of its functions' output (see the gateway's
//!   function logs): `service_name` and `function` (the function's name), `instance` (`exec`
//!   or a managed server's id), `stream` (`stdout`/`stderr`), `level`; with structured
//!   metadata `trace_id`, `span_id`, `invocation_id`, `call_id`;
//! - `source="otlp"`: what the tenant's own OpenTelemetry SDKs sent: `service_name` (the
//!   resource's `service.name`), `service_namespace` and `deployment_environment` when the
//!   resource has them, `level`; with structured metadata `trace_id`, `span_id` and the
//!   record's attributes (names with `.` and other characters as `_`).
//!
//! `level` is `trace`, `debug`, `info`, `warn`, `error` or `critical` from the record's
//! severity (`unknown` without one). Answers sent with `X-Loki-Response-Encoding-Flags:
//! categorize-labels` (as Grafana sends it) carry each line's structured metadata and parsed
//! labels beside it, and streams by their stream labels; others merge them into the streams'
//! labels, as Loki does.
//!
//! # LogQL
//!
//! Stream selectors (`=`, `!=`, `=~`, `!~`, regexes anchored; at least one matcher that an
//! empty value fails), line filters (`|=`, `!=`, `|~`, `!~`, regexes unanchored, `or`
//! alternatives), `| json` and `| logfmt` (without parameters: nested JSON keys joined with
//! `_`, arrays skipped; a name taken by a stream label or metadata gets `_extracted`; a line
//! that does not parse gets `__error__`), label filters (`=`, `!=`, `=~`, `!~` on text;
//! `==`, `!=`, `>`, `>=`, `<`, `<=` on numbers, durations and byte sizes; `and`, `or`, `,`,
//! parentheses), `| line_format` (`{{.label}}`, `{{__line__}}`, `{{__timestamp__}}`),
//! `| drop` and `| keep`; metric queries `count_over_time`, `rate`, `bytes_over_time`,
//! `bytes_rate` over windows `(t - range, t]`, and `sum`, `avg`, `min`, `max`, `count` with
//! `by`/`without`. A metric query whose lines carry `__error__` fails as Loki's does (drop it
//! with `| drop __error__` or filter it). Refused with 400 naming it: `regexp`, `pattern`,
//! `unpack`, `label_format`, `unwrap`, parsers with parameters, `offset`, `topk` and the
//! other aggregations.
//!
//! # Limits
//!
//! A query reads its records 10 000 at a time, in time order, running the pipeline over each
//! batch on a blocking thread (literal line filters before any `line_format`, `source` and
//! `function` matchers are decided in SQL); it waits for one of the places the dashboard's queries share with PromQL
//! (one per core, half of them at most a tenant's) and stops at 2 minutes. A metric query
//! holds at most 500 series before its outer `sum` (Loki's default), each as two arrays over
//! its steps; a log query at most its `limit` lines.

mod eval;
#[cfg(fuzzing)]
pub mod fuzzing;
mod logql;
mod pipeline;
mod tail;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use collector::store::LogStream;
use contract::Viewer;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::DashboardState;
use crate::prometheus::params::Params;
use crate::prometheus::places::Places;
use eval::{EvalError, Matrix, Stats, Steps};
use logql::{LogExpr, Query};
use pipeline::{Kind, Labels, stream_labels};

/// Most lines a log query may return (Loki's default `max_entries_limit_per_query`).
pub const MAX_LIMIT: usize = 5_000;
/// Most steps a range query may have.
const MAX_POINTS: i64 = 11_000;
/// The Loki API level implemented, for `status/buildinfo`.
const VERSION: &str = "3.0.0-sfaas";
const QUERY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
struct Api {
    state: DashboardState,
    places: Arc<Places>,
    /// Live tails open per tenant.
    tails: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

pub fn router(state: DashboardState) -> Router {
    routes(state, Places::per_core())
}

/// The routes, their queries in `places` (the dashboard's, shared with PromQL's).
pub(crate) fn routes(state: DashboardState, places: Arc<Places>) -> Router {
    let routes = Router::new()
        .route("/loki/api/v1/query_range", get(query_range).post(query_range))
        .route("/loki/api/v1/query", get(query).post(query))
        .route("/loki/api/v1/labels", get(labels).post(labels))
        .route("/loki/api/v1/label", get(labels).post(labels))
        .route("/loki/api/v1/label/{name}/values", get(label_values).post(label_values))
        .route("/loki/api/v1/series", get(series).post(series))
        .route("/loki/api/v1/index/stats", get(index_stats).post(index_stats))
        .route("/loki/api/v1/status/buildinfo", get(buildinfo))
        .route("/loki/api/v1/tail", get(tail::tail))
        .route("/loki/api/v1/{*rest}", any(not_found))
        .with_state(Api { state, places, tails: Arc::default() });
    // A datasource URL of `http://DASHBOARD/loki` has Grafana ask for `/loki/loki/api/v1/...`.
    Router::new().nest("/loki", routes.clone()).merge(routes)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A failed request: a status and Loki's plain-text message.
#[derive(Debug)]
struct LokiError(StatusCode, String);

impl LokiError {
    fn bad(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }
}

impl From<EvalError> for LokiError {
    fn from(error: EvalError) -> Self {
        let status = match &error {
            EvalError::Bad(_) => StatusCode::BAD_REQUEST,
            EvalError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            EvalError::Store(_) | EvalError::Panicked => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, error.to_string())
    }
}

impl From<collector::store::StoreError> for LokiError {
    fn from(error: collector::store::StoreError) -> Self {
        EvalError::Store(error).into()
    }
}

impl IntoResponse for LokiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::error!(status = %self.0, error = %self.1, "loki API request failed");
        }
        (self.0, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", self.1)).into_response()
    }
}

type LokiResult = Result<Response, LokiError>;

fn json_response(value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("answers serialize");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_found(uri: Uri) -> LokiError {
    LokiError(StatusCode::NOT_FOUND, format!("{} is not served (see the dashboard's Loki API)", uri.path()))
}

async fn buildinfo() -> Response {
    json_response(
        &json!({"version": VERSION, "revision": "", "branch": "", "buildUser": "", "buildDate": "", "goVersion": ""}),
    )
}

/// The tenant whose logs the caller reads.
fn tenant(state: &DashboardState, headers: &HeaderMap) -> Result<String, LokiError> {
    let viewer = state.viewer(headers).map_err(|error| LokiError(error.0, error.1))?;
    match viewer {
        Viewer::Tenant(tenant) => Ok(tenant),
        Viewer::Admin => crate::scope_org_id(headers)
            .ok_or_else(|| LokiError::bad("the admin token reads one tenant's logs: name it in X-Scope-OrgID")),
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// A time as Loki takes it, in ns.
fn parse_time(text: &str) -> Result<i64, String> {
    let bad = || format!("cannot parse {text:?} to a valid timestamp");
    if text.contains('.')
        && let Ok(seconds) = text.parse::<f64>()
    {
        return (seconds.is_finite() && seconds.abs() < 9.2e9).then(|| (seconds * 1e9).round() as i64).ok_or_else(bad);
    }
    if let Ok(number) = text.parse::<i64>() {
        return if text.trim_start_matches('-').len() <= 10 {
            number.checked_mul(1_000_000_000).ok_or_else(bad)
        } else {
            Ok(number)
        };
    }
    chrono::DateTime::parse_from_rfc3339(text).ok().and_then(|t| t.timestamp_nanos_opt()).ok_or_else(bad)
}

/// A duration as Loki takes it (`5m`, or seconds), in ns.
fn parse_duration(text: &str) -> Result<i64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds.abs() < 9.2e9)
            .then(|| (seconds * 1e9).round() as i64)
            .ok_or_else(|| format!("cannot parse {text:?} to a valid duration"));
    }
    logql::parse_duration_ns(text).ok_or_else(|| format!("cannot parse {text:?} to a valid duration"))
}

struct Range {
    start_ns: i64,
    end_ns: i64,
}

impl Range {
    /// `end - start`, which an i64 may not hold.
    fn length(&self) -> i128 {
        i128::from(self.end_ns) - i128::from(self.start_ns)
    }
}

fn range(params: &Params, now_ns: i64, default_length_ns: i64) -> Result<Range, LokiError> {
    let time = |name: &str| {
        params
            .get(name)
            .filter(|v| !v.is_empty())
            .map(|v| parse_time(v).map_err(|e| LokiError::bad(format!("invalid {name}: {e}"))))
            .transpose()
    };
    let end_ns = time("end")?.unwrap_or(now_ns);
    let start_ns = match (time("start")?, params.get("since").filter(|v| !v.is_empty())) {
        (Some(start), _) => start,
        (None, Some(since)) => {
            end_ns.saturating_sub(parse_duration(since).map_err(|e| LokiError::bad(format!("invalid since: {e}")))?)
        }
        (None, None) => end_ns.saturating_sub(default_length_ns),
    };
    if end_ns < start_ns {
        return Err(LokiError::bad("the query time range is invalid: end is before start"));
    }
    Ok(Range { start_ns, end_ns })
}

fn limit(params: &Params) -> Result<usize, LokiError> {
    match params.get("limit").filter(|v| !v.is_empty()) {
        None => Ok(100),
        Some(text) => {
            let limit: i64 = text.parse().map_err(|_| LokiError::bad(format!("invalid limit: {text:?}")))?;
            if limit <= 0 {
                return Err(LokiError::bad("limit must be a positive value"));
            }
            if limit as usize > MAX_LIMIT {
                return Err(LokiError::bad(format!(
                    "max entries limit per query exceeded, limit > max_entries_limit ({limit} > {MAX_LIMIT})"
                )));
            }
            Ok(limit as usize)
        }
    }
}

fn backward(params: &Params) -> Result<bool, LokiError> {
    match params.get("direction").map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("backward") => Ok(true),
        Some("forward") => Ok(false),
        Some(other) => Err(LokiError::bad(format!("invalid direction {other:?}: backward or forward"))),
    }
}

fn parse_query(params: &Params) -> Result<Query, LokiError> {
    logql::parse(params.get("query").unwrap_or("")).map_err(LokiError::bad)
}

fn categorized(headers: &HeaderMap) -> bool {
    headers
        .get_all("x-loki-response-encoding-flags")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|flag| flag.trim() == "categorize-labels"))
}

fn now_ns(state: &DashboardState) -> i64 {
    state.store.clock().now_ms().saturating_mul(1_000_000)
}

// ---------------------------------------------------------------------------------------------
// Queries

impl Api {
    /// Runs `work` once the tenant's query has a place, within the query timeout.
    async fn placed<T>(
        &self,
        tenant: &str,
        work: impl std::future::Future<Output = Result<T, EvalError>>,
        deadline: Instant,
    ) -> Result<T, LokiError> {
        let place = self.places.take(Some(tenant), deadline).await.map_err(|_| LokiError::from(EvalError::Timeout))?;
        let placed = Instant::now();
        let result = work.await;
        self.places.spend(Some(tenant), placed.elapsed());
        drop(place);
        Ok(result?)
    }
}

async fn query_range(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> LokiResult {
    let started = Instant::now();
    let tenant = tenant(&api.state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let range = range(&params, now_ns(&api.state), 3_600_000_000_000)?;
    let query = parse_query(&params)?;
    let deadline = started + QUERY_TIMEOUT;
    match query {
        Query::Log(expr) => {
            let (limit, backward) = (limit(&params)?, backward(&params)?);
            let store = &api.state.store;
            let work =
                eval::log_query(store, &tenant, &expr, (range.start_ns, range.end_ns), limit, backward, deadline);
            let (entries, stats) = api.placed(&tenant, work, deadline).await?;
            Ok(streams_response(entries, categorized(&headers), stats, started))
        }
        Query::Metric(expr) => {
            let step_ns = match params.get("step").filter(|v| !v.is_empty()) {
                Some(step) => parse_duration(step).map_err(|e| LokiError::bad(format!("invalid step: {e}")))?,
                None => (range.length() / 250 / 1_000_000_000).clamp(1, 1 << 32) as i64 * 1_000_000_000,
            };
            if step_ns <= 0 {
                return Err(LokiError::bad(
                    "zero or negative query resolution step widths are not accepted. Try a positive integer",
                ));
            }
            // In i128: the times are any two of i64's, and their distance may not fit one.
            let count = range.length() / i128::from(step_ns) + 1;
            if count > i128::from(MAX_POINTS) {
                return Err(LokiError::bad(format!(
                    "exceeded maximum resolution of {MAX_POINTS} points per timeseries. Try decreasing the query \
                     resolution (?step=XX)"
                )));
            }
            let steps = Steps { start_ns: range.start_ns, step_ns, count: count as usize };
            let work = eval::metric_query(&api.state.store, &tenant, &expr, steps, deadline);
            let (matrix, stats) = api.placed(&tenant, work, deadline).await?;
            Ok(matrix_response(&matrix, stats, started))
        }
    }
}

async fn query(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> LokiResult {
    let started = Instant::now();
    let tenant = tenant(&api.state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let time = match params.get("time").filter(|v| !v.is_empty()) {
        Some(time) => parse_time(time).map_err(|e| LokiError::bad(format!("invalid time: {e}")))?,
        None => now_ns(&api.state),
    };
    let deadline = started + QUERY_TIMEOUT;
    match parse_query(&params)? {
        Query::Log(expr) => {
            // As Loki: an instant log query reads the hour before `time`.
            let (limit, backward) = (limit(&params)?, backward(&params)?);
            let bounds = (time.saturating_sub(3_600_000_000_000), time);
            let work = eval::log_query(&api.state.store, &tenant, &expr, bounds, limit, backward, deadline);
            let (entries, stats) = api.placed(&tenant, work, deadline).await?;
            Ok(streams_response(entries, categorized(&headers), stats, started))
        }
        Query::Metric(expr) => {
            let steps = Steps { start_ns: time, step_ns: 1, count: 1 };
            let work = eval::metric_query(&api.state.store, &tenant, &expr, steps, deadline);
            let (matrix, stats) = api.placed(&tenant, work, deadline).await?;
            let result: Vec<Value> = matrix
                .iter()
                .filter_map(|(labels, points)| {
                    let (t, v) = points.last()?;
                    Some(json!({"metric": label_object(labels), "value": [seconds(*t), number(*v)]}))
                })
                .collect();
            Ok(query_response("vector", false, result, stats_json(stats, started, matrix.len())))
        }
    }
}

fn label_object(labels: &[(String, String)]) -> Map<String, Value> {
    labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()
}

fn labels_object(labels: &Labels, kind: Option<Kind>) -> Map<String, Value> {
    labels
        .iter()
        .filter(|(_, (_, k))| kind.is_none_or(|kind| *k == kind))
        .map(|(name, (value, _))| (name.to_string(), Value::String(value.clone())))
        .collect()
}

/// A time in seconds, as Loki writes metric points (a whole second without a fraction).
fn seconds(ns: i64) -> Value {
    if ns % 1_000_000_000 == 0 { json!(ns / 1_000_000_000) } else { json!(ns as f64 / 1e9) }
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        value.to_string()
    }
}

fn stats_json(stats: Stats, started: Instant, returned: usize) -> Value {
    let seconds = started.elapsed().as_secs_f64();
    let per_second = |n: u64| if seconds > 0.0 { (n as f64 / seconds) as u64 } else { 0 };
    json!({"summary": {
        "bytesProcessedPerSecond": per_second(stats.bytes),
        "linesProcessedPerSecond": per_second(stats.lines),
        "totalBytesProcessed": stats.bytes,
        "totalLinesProcessed": stats.lines,
        "execTime": seconds,
        "queueTime": 0,
        "subqueries": 0,
        "totalEntriesReturned": returned,
        "splits": 0,
        "shards": 0,
    }})
}

/// `{"status":"success","data":…}`
#[derive(Serialize)]
struct Success<T> {
    status: &'static str,
    data: T,
}

/// A query's `data`, its fields in Loki's order (Grafana reads `encodingFlags` before
/// `result` to know how to read the result).
#[derive(Serialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: &'static str,
    #[serde(rename = "encodingFlags", skip_serializing_if = "Option::is_none")]
    encoding_flags: Option<[&'static str; 1]>,
    result: Vec<Value>,
    stats: Value,
}

fn query_response(result_type: &'static str, categorized: bool, result: Vec<Value>, stats: Value) -> Response {
    let encoding_flags = categorized.then_some(["categorize-labels"]);
    json_response(&Success { status: "success", data: QueryData { result_type, encoding_flags, result, stats } })
}

/// Streams: `{"stream": labels, "values": [["ns", "line"], ...]}`; categorized, each line has
/// a third element with its structured metadata and parsed labels (`{}` when it has none).
fn streams_response(entries: Vec<pipeline::Entry>, categorized: bool, stats: Stats, started: Instant) -> Response {
    let returned = entries.len();
    query_response("streams", categorized, streams_json(entries, categorized), stats_json(stats, started, returned))
}

/// Entries as Loki's streams (see [`streams_response`]).
fn streams_json(entries: Vec<pipeline::Entry>, categorized: bool) -> Vec<Value> {
    eval::streams(entries, categorized)
        .into_iter()
        .map(|(labels, entries)| {
            let values: Vec<Value> = entries
                .into_iter()
                .map(|entry| {
                    if categorized {
                        let mut extra = Map::new();
                        for (key, kind) in [("structuredMetadata", Kind::Metadata), ("parsed", Kind::Parsed)] {
                            let object = labels_object(&entry.labels, Some(kind));
                            if !object.is_empty() {
                                extra.insert(key.into(), Value::Object(object));
                            }
                        }
                        json!([entry.ts_ns.to_string(), entry.line, extra])
                    } else {
                        json!([entry.ts_ns.to_string(), entry.line])
                    }
                })
                .collect();
            json!({"stream": labels_object(&labels, None), "values": values})
        })
        .collect()
}

fn matrix_response(matrix: &Matrix, stats: Stats, started: Instant) -> Response {
    let returned = matrix.iter().map(|(_, points)| points.len()).sum();
    let result: Vec<Value> = matrix
        .iter()
        .map(|(labels, points)| {
            let values: Vec<Value> = points.iter().map(|(t, v)| json!([seconds(*t), number(*v)])).collect();
            json!({"metric": label_object(labels), "values": values})
        })
        .collect();
    query_response("matrix", false, result, stats_json(stats, started, returned))
}

// ---------------------------------------------------------------------------------------------
// Labels, series and stats

/// The tenant's streams in the request's range (by default the last 6 hours, as Loki's), with
/// their lines and bytes, as the newest million lines of the range show them.
async fn streams_of(api: &Api, headers: &HeaderMap, params: &Params) -> Result<Vec<(Labels, LogStream)>, LokiError> {
    let tenant = tenant(&api.state, headers)?;
    let range = range(params, now_ns(&api.state), 6 * 3_600_000_000_000)?;
    // A label query waits for a place as queries do: it reads up to a million lines.
    let read =
        async { Ok(api.state.store.log_streams(&tenant, range.start_ns, range.end_ns.saturating_add(1)).await?) };
    let rows = api.placed(&tenant, read, Instant::now() + QUERY_TIMEOUT).await?;
    Ok(rows.into_iter().map(|row| (stream_labels(&row.stream), row)).collect())
}

/// The selector of a `query` or `match[]` parameter (`None`: every stream).
fn selector_of(text: Option<&str>) -> Result<Option<LogExpr>, LokiError> {
    match text.filter(|t| !t.trim().is_empty()) {
        None => Ok(None),
        Some(text) => match logql::parse(text).map_err(LokiError::bad)? {
            Query::Log(expr) => Ok(Some(expr)),
            Query::Metric(expr) => Ok(expr.logs().first().map(|log| (*log).clone())),
        },
    }
}

fn selects(expr: &Option<LogExpr>, labels: &Labels) -> bool {
    expr.as_ref().is_none_or(|expr| {
        expr.selector.iter().all(|m| m.matches(labels.get(m.name.as_str()).map_or("", |(v, _)| v.as_str())))
    })
}

async fn labels(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> LokiResult {
    let params = Params::new(&headers, &uri, &body);
    let selector = selector_of(params.get("query"))?;
    let streams = streams_of(&api, &headers, &params).await?;
    let names: std::collections::BTreeSet<&str> = streams
        .iter()
        .filter(|(labels, _)| selects(&selector, labels))
        .flat_map(|(labels, _)| labels.keys())
        .map(|k| k.as_ref())
        .collect();
    Ok(json_response(&Success { status: "success", data: names }))
}

async fn label_values(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> LokiResult {
    let params = Params::new(&headers, &uri, &body);
    let selector = selector_of(params.get("query"))?;
    let streams = streams_of(&api, &headers, &params).await?;
    let values: std::collections::BTreeSet<&String> = streams
        .iter()
        .filter(|(labels, _)| selects(&selector, labels))
        .filter_map(|(labels, _)| labels.get(name.as_str()).map(|(v, _)| v))
        .collect();
    Ok(json_response(&Success { status: "success", data: values }))
}

async fn series(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> LokiResult {
    let params = Params::new(&headers, &uri, &body);
    let mut selectors = Vec::new();
    for text in params.all("match[]").into_iter().chain(params.all("match")) {
        selectors.push(selector_of(Some(text))?);
    }
    if selectors.is_empty() {
        selectors.push(None);
    }
    let streams = streams_of(&api, &headers, &params).await?;
    let sets: std::collections::BTreeSet<Vec<(&str, &String)>> = streams
        .iter()
        .filter(|(labels, _)| selectors.iter().any(|s| selects(s, labels)))
        .map(|(labels, _)| labels.iter().map(|(k, (v, _))| (k.as_ref(), v)).collect())
        .collect();
    let data: Vec<Map<String, Value>> = sets
        .into_iter()
        .map(|set| set.into_iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect())
        .collect();
    Ok(json_response(&Success { status: "success", data }))
}

async fn index_stats(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> LokiResult {
    let params = Params::new(&headers, &uri, &body);
    let selector = selector_of(params.get("query"))?;
    let streams = streams_of(&api, &headers, &params).await?;
    let mut distinct = std::collections::BTreeSet::new();
    let (mut bytes, mut entries) = (0i64, 0i64);
    for (labels, row) in streams.iter().filter(|(labels, _)| selects(&selector, labels)) {
        distinct.insert(labels);
        bytes += row.bytes;
        entries += row.lines;
    }
    // No chunks here: every stream's lines are rows of one table.
    Ok(json_response(&json!({"streams": distinct.len(), "chunks": distinct.len(), "bytes": bytes, "entries": entries})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_as_loki_takes_them() {
        assert_eq!(parse_time("1791547200"), Ok(1_791_547_200_000_000_000));
        assert_eq!(parse_time("1791547200000000000"), Ok(1_791_547_200_000_000_000));
        assert_eq!(parse_time("1791547200.5"), Ok(1_791_547_200_500_000_000));
        assert_eq!(parse_time("2026-10-10T12:00:00Z"), Ok(1_791_633_600_000_000_000));
        assert!(parse_time("soon").is_err());
        assert!(parse_time("9999999999999999999999").is_err());
        assert_eq!(parse_duration("5m"), Ok(300_000_000_000));
        assert_eq!(parse_duration("15"), Ok(15_000_000_000));
    }
}
