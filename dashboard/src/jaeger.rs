//! The Jaeger v1 query JSON API (the Jaeger UI's `/api`), as Grafana's Jaeger datasource calls it
//! (issue 6). Every route is `GET` at the dashboard address:
//!
//! | route | data |
//! |---|---|
//! | `/api/services` | service names (Grafana's health check: success needs at least one) |
//! | `/api/services/{service}/operations` | operation names (what Grafana's search form lists) |
//! | `/api/operations?service=&spanKind=` | `[{name, spanKind}]` (Jaeger's newer form; the Jaeger UI uses it) |
//! | `/api/traces?service&operation&tags&tag&minDuration&maxDuration&limit&start&end&traceID` | traces |
//! | `/api/traces/{traceID}` | one trace (404 when unknown) |
//! | `/api/dependencies?endTs&lookback&service` | `[{parent, child, callCount}]` |
//!
//! Shapes are jaeger-query's (`model/json`, `structuredResponse`): the envelope
//! `{data, total, limit, offset, errors}` (`total` is the count for services and operations and 0
//! for traces and dependencies, `limit`/`offset` 0, as jaeger-query sends them; `errors` is `null`
//! on success, never `[]`, which Grafana's dependency graph would take for a failure, and
//! `[{code, msg}]` with the HTTP status on failure, 401/403 included); a trace is
//! `{traceID, spans, processes: {p1: {serviceName, tags}}, warnings}`, a span
//! `{traceID, spanID, flags, operationName, references, startTime, duration, tags, logs,
//! processID, warnings}` with times in microseconds (truncated, duration from the nanosecond
//! difference), `flags` 1 (sampled), and `references`, `tags` and `logs` always arrays (Grafana
//! maps `span.logs` unconditionally). Tags are typed `{key, type, value}` with
//! `type` one of `string`, `bool`, `int64`, `float64` (integers beyond JavaScript's safe range
//! are sent as strings, as jaeger-query does). Stored spans are translated the way the
//! OpenTelemetry Collector's OTLP→Jaeger translator does: scope → `otel.scope.name` /
//! `otel.scope.version`, kind → `span.kind` (`internal`, `server`, `client`, `producer`,
//! `consumer`), status → `otel.status_code` (`OK`/`ERROR`), `error=true` and
//! `otel.status_description`; events → logs whose first field is `event` = the event name; the
//! parent → the first `CHILD_OF` reference, links → `FOLLOWS_FROM` (or `CHILD_OF` when the link
//! says `opentracing.ref_type=child_of`); the resource → the process (`service.name` is its
//! `serviceName`, every other attribute a process tag). A synthetic tag is left out when the
//! span already has an attribute of that name (spans from Jaeger clients keep their own `error`).
//!
//! Decisions:
//! - Tenancy. Every query runs per tenant. A read token sees its tenant only, so another
//!   tenant's trace id is a plain 404 and its services, operations, traces and dependencies are
//!   absent. The admin token sees every tenant, or only the tenant named by `X-Scope-OrgID`
//!   when it sends one (so that an operator can point one Grafana datasource per tenant at the
//!   dashboard with the admin token). No or a bad token is 401, a read token with another
//!   tenant's `X-Scope-OrgID` is 403, both in the error envelope above.
//! - A trace id is unique within a tenant only. For the admin, `/api/traces/{id}` returns one
//!   trace per tenant that has it (ordered by tenant; Grafana shows `data[0]`), each with a
//!   `warnings` entry naming its tenant when there is more than one; a search lists each
//!   (tenant, trace id) separately. The admin's dependency counts add up over tenants.
//! - Trace ids are written as jaeger-query writes them: 32 hex digits, or 16 when the high 64
//!   bits are zero (traces of 64-bit Jaeger clients). Any 1..=32 hex digits are accepted
//!   (left-padded with zeros, case-insensitive), so both forms, and OTLP's, find the trace.
//!   Span ids are 16 hex digits.
//! - `start`/`end` on `/api/traces/{id}` are checked to be integers and otherwise ignored: the
//!   lookup is by id through the primary key anyway, and Grafana's backend sends milliseconds
//!   there where the Jaeger API means microseconds.
//! - Search follows jaeger-query's semantics: a trace is found when one of its spans is of the
//!   service and matches every given condition (operation; start within `start`..`end`, default
//!   the last two days; duration within `minDuration`..`maxDuration`, Go duration strings such
//!   as `1.2s`, `100ms`, `500us`; every tag, which may be a span tag, a synthetic tag above, a
//!   process tag or a log field, compared as text). The found traces come whole, most recently
//!   matched first, at most `limit` of them (default 20, at most 1500), read until they hold
//!   200 000 spans (the newest traces then; each trace has at most 10 000). A window longer than 31
//!   days, more than 32 tag conditions or a tag key or value over 1 KiB is refused (400): each
//!   search reads every matching span of its window. `tags` is a JSON object
//!   (what Grafana sends) or logfmt (`http.status_code=500 error=true`, what users type into
//!   Grafana's tags field before Grafana turns it into JSON); `tag=key:value` may repeat; `lookback` and `prettyPrint` are ignored;
//!   `traceID` (repeatable) fetches those traces instead, with `errors` naming the missing ones.
//! - `/api/dependencies` counts, for spans that started in `endTs - lookback`..`endTs`
//!   (milliseconds; lookback defaults to 24 h, at most 31 days), each parent→child pair of different services,
//!   as jaeger-query's in-memory store does.
//! - Speed. A trace is read through the primary key (tenant, trace id, span id), without the
//!   `ORDER BY start_ns` that makes SQLite walk `spans_by_time` instead; a search walks
//!   `spans_by_service` (tenant, service, start) backwards in pages, lets the database drop
//!   spans whose JSON lacks a tag's value text, and stops at `limit` traces (a search that finds
//!   fewer reads the service's whole window); services and tenants are listed with a skip scan
//!   (one index probe per distinct value). Listing a service's operations reads every span of
//!   the service (no index has the span name), and dependencies every span of the window.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use collector::model::{SpanRow, span_kind_name, status_name};
use collector::store::{StoreError, TelemetryStore, TraceSearch};
use contract::Viewer;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::DashboardState;

pub fn router(state: DashboardState) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route("/api/services/{service}/operations", get(service_operations))
        .route("/api/operations", get(operations))
        .route("/api/traces", get(search))
        .route("/api/traces/{trace_id}", get(trace))
        .route("/api/dependencies", get(dependencies))
        .with_state(state)
}

/// Search `limit` when none is given (the Jaeger UI's and Grafana's default).
const DEFAULT_LIMIT: usize = 20;
/// The largest search `limit` honoured (the Jaeger UI's own maximum).
const MAX_LIMIT: usize = 1500;
/// Traces one request may name by id (`traceID=` repeated): each is a read of its own.
const MAX_TRACE_IDS: usize = 100;
/// Spans a search answers with at most, over all its traces (each of which has at most
/// `MAX_TRACE_SPANS`): traces are read newest first, 50 at a time, until this many are held.
const MAX_SEARCH_SPANS: usize = 200_000;
/// Search window when `start` is not given (jaeger-query's default lookback).
const DEFAULT_SEARCH_LOOKBACK_NS: i64 = 2 * 24 * 3600 * 1_000_000_000;
/// Dependencies window when `lookback` is not given (jaeger-query's default).
const DEFAULT_DEPENDENCIES_LOOKBACK_MS: i64 = 24 * 3600 * 1000;
const JS_MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;
/// Longest window a search or a dependencies request may read (each reads every matching span
/// of its window): 31 days, a month of any length.
const MAX_WINDOW_NS: i64 = 31 * 24 * 3600 * 1_000_000_000;
/// Most tag conditions a search may have, and the longest key or value.
const MAX_TAGS: usize = 32;
const MAX_TAG_BYTES: usize = 1024;

/// Refuses a window longer than [`MAX_WINDOW_NS`] (400, naming the limit).
fn check_window(what: &str, start_ns: i64, end_ns: i64) -> Result<()> {
    if end_ns.saturating_sub(start_ns) > MAX_WINDOW_NS {
        return Err(bad_request(format!(
            "the {what} window is longer than 31 days, the limit: narrow it (start/end or lookback)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Envelope and errors

#[derive(Serialize)]
struct Envelope<T> {
    data: T,
    total: usize,
    limit: usize,
    offset: usize,
    errors: Option<Vec<StructuredError>>,
}

#[derive(Serialize)]
struct StructuredError {
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    msg: String,
    #[serde(rename = "traceID", skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

fn respond<T: Serialize>(data: T, total: usize, errors: Option<Vec<StructuredError>>) -> Response {
    Json(Envelope { data, total, limit: 0, offset: 0, errors }).into_response()
}

/// A failed request, answered in jaeger-query's error envelope.
#[derive(Debug)]
pub struct JaegerError(StatusCode, String);

impl IntoResponse for JaegerError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::error!(status = %self.0, error = %self.1, "jaeger query failed");
        }
        let error = StructuredError { code: Some(self.0.as_u16()), msg: self.1, trace_id: None };
        let body = Envelope { data: Value::Null, total: 0, limit: 0, offset: 0, errors: Some(vec![error]) };
        (self.0, Json(body)).into_response()
    }
}

impl From<StoreError> for JaegerError {
    fn from(error: StoreError) -> Self {
        if let StoreError::OverBudget = error {
            return JaegerError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the window holds more than {} spans: narrow it (lookback or endTs)",
                    collector::store::blocks::MAX_DEPENDENCY_SPANS
                ),
            );
        }
        JaegerError(StatusCode::INTERNAL_SERVER_ERROR, format!("telemetry store: {error}"))
    }
}

type Result<T> = std::result::Result<T, JaegerError>;

fn bad_request(msg: impl Into<String>) -> JaegerError {
    JaegerError(StatusCode::BAD_REQUEST, msg.into())
}

type Params = std::result::Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The query string as (name, value) pairs, repeats kept.
fn params(query: Params) -> Result<Vec<(String, String)>> {
    query.map(|Query(pairs)| pairs).map_err(|rejection| bad_request(rejection.body_text()))
}

/// The first non-empty value of `name` (Go's `FormValue`, with empty meaning absent).
fn first<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.as_str())
}

fn int_param(params: &[(String, String)], name: &str) -> Result<Option<i64>> {
    first(params, name)
        .map(|v| v.trim().parse::<i64>().map_err(|e| bad_request(format!("unable to parse param '{name}': {e}"))))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Tenancy

/// The tenants the caller may read and asked for (checked before anything else is looked at).
async fn scope(state: &DashboardState, headers: &HeaderMap) -> Result<Vec<String>> {
    let viewer = state.viewer(headers).map_err(|error| JaegerError(error.0, error.1))?;
    match viewer {
        Viewer::Tenant(tenant) => Ok(vec![tenant]),
        Viewer::Admin => {
            let org = headers.get(contract::semconv::HEADER_SCOPE_ORG_ID).and_then(|v| v.to_str().ok()).map(str::trim);
            match org.filter(|org| !org.is_empty()) {
                Some(org) => Ok(vec![org.to_string()]),
                None => Ok(state.store.span_tenants().await?),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /api/services, /api/services/{service}/operations, /api/operations

async fn services(State(state): State<DashboardState>, headers: HeaderMap) -> Result<Response> {
    let tenants = scope(&state, &headers).await?;
    let mut names = BTreeSet::new();
    for tenant in &tenants {
        names.extend(state.store.services(tenant).await?);
    }
    let names: Vec<String> = names.into_iter().collect();
    let total = names.len();
    Ok(respond(names, total, None))
}

/// (operation, span kind name) pairs of a service over the caller's tenants.
async fn operation_pairs(
    state: &DashboardState,
    tenants: &[String],
    service: &str,
) -> Result<BTreeSet<(String, &'static str)>> {
    let mut pairs = BTreeSet::new();
    for tenant in tenants {
        for (name, kind) in state.store.operations(tenant, service).await? {
            pairs.insert((name, span_kind_name(kind).unwrap_or("")));
        }
    }
    Ok(pairs)
}

async fn service_operations(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> Result<Response> {
    let tenants = scope(&state, &headers).await?;
    let pairs = operation_pairs(&state, &tenants, service.trim()).await?;
    let names: Vec<String> = pairs.into_iter().map(|(name, _)| name).collect::<BTreeSet<_>>().into_iter().collect();
    let total = names.len();
    Ok(respond(names, total, None))
}

#[derive(Serialize)]
struct Operation {
    name: String,
    #[serde(rename = "spanKind")]
    span_kind: &'static str,
}

async fn operations(State(state): State<DashboardState>, headers: HeaderMap, query: Params) -> Result<Response> {
    let tenants = scope(&state, &headers).await?;
    let params = params(query)?;
    let service = first(&params, "service").ok_or_else(|| bad_request("parameter 'service' is required"))?;
    let kind = first(&params, "spanKind").map(|k| {
        let k = k.to_ascii_lowercase();
        k.strip_prefix("span_kind_").map(str::to_string).unwrap_or(k)
    });
    let data: Vec<Operation> = operation_pairs(&state, &tenants, service.trim())
        .await?
        .into_iter()
        .filter(|(_, span_kind)| kind.as_deref().is_none_or(|k| k == *span_kind))
        .map(|(name, span_kind)| Operation { name, span_kind })
        .collect();
    let total = data.len();
    Ok(respond(data, total, None))
}

// ---------------------------------------------------------------------------------------------
// /api/traces/{traceID}

/// A trace id as stored: 32 lowercase hex digits, from 1..=32 hex digits (jaeger-query's
/// `TraceIDFromString` accepts as many).
fn parse_trace_id(raw: &str) -> Result<String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 32 || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_request(format!("cannot parse traceID {raw:?}: want 1 to 32 hexadecimal digits")));
    }
    Ok(format!("{:0>32}", raw.to_ascii_lowercase()))
}

/// A stored trace id as jaeger-query writes it: without the high half when that is zero.
fn jaeger_trace_id(stored: &str) -> String {
    match stored.strip_prefix("0000000000000000") {
        Some(low) if stored.len() == 32 => low.to_string(),
        _ => stored.to_string(),
    }
}

/// The traces with this id among `tenants` (one per tenant that has it).
async fn traces_by_id(store: &TelemetryStore, tenants: &[String], trace_id: &str) -> Result<Vec<JaegerTrace>> {
    let mut found = Vec::new();
    for tenant in tenants {
        if let Some(rows) = store.traces(tenant, &[trace_id]).await?.remove(trace_id) {
            found.push((tenant.as_str(), rows));
        }
    }
    let several = found.len() > 1;
    let names: Vec<&str> = found.iter().map(|(tenant, _)| *tenant).collect();
    Ok(found
        .iter()
        .map(|(tenant, rows)| {
            let mut trace = jaeger_trace(rows);
            if several {
                trace.warnings = Some(vec![format!(
                    "this trace id is in {} tenants ({}); these are the spans of tenant {tenant}",
                    names.len(),
                    names.join(", ")
                )]);
            }
            trace
        })
        .collect())
}

async fn trace(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(raw_id): Path<String>,
    query: Params,
) -> Result<Response> {
    let tenants = scope(&state, &headers).await?;
    let params = params(query)?;
    int_param(&params, "start")?;
    int_param(&params, "end")?;
    let trace_id = parse_trace_id(&raw_id)?;
    let traces = traces_by_id(&state.store, &tenants, &trace_id).await?;
    if traces.is_empty() {
        return Err(JaegerError(StatusCode::NOT_FOUND, "trace not found".into()));
    }
    Ok(respond(traces, 0, None))
}

// ---------------------------------------------------------------------------------------------
// /api/traces (search)

/// Go's `time.ParseDuration` (what jaeger-query uses for `minDuration`/`maxDuration`), in ns.
fn parse_go_duration(text: &str) -> Option<i64> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (whole, after) = rest.split_at(digits);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => {
                let digits = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
                after.split_at(digits)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: f64 = match unit {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let value: f64 = format!("{}.{}", if whole.is_empty() { "0" } else { whole }, fraction).parse().ok()?;
        total += value * scale;
        rest = after;
    }
    if total > i64::MAX as f64 {
        return None;
    }
    let total = total.round() as i64;
    Some(if negative { -total } else { total })
}

/// logfmt (`key=value key2="quoted value" flag`), as Grafana's search form takes tags.
fn parse_logfmt(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i == chars.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        if key.is_empty() {
            return Err(format!(
                "malformed 'tags' parameter: expected a key at {:?}",
                chars[i..].iter().collect::<String>()
            ));
        }
        if i < chars.len() && chars[i] == '=' {
            i += 1;
            let mut value = String::new();
            if i < chars.len() && chars[i] == '"' {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(format!("malformed 'tags' parameter: unterminated quote after {key}=")),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some('n') => value.push('\n'),
                                Some('t') => value.push('\t'),
                                Some('r') => value.push('\r'),
                                Some(&c) => value.push(c),
                                None => {
                                    return Err(format!("malformed 'tags' parameter: unterminated quote after {key}="));
                                }
                            }
                            i += 2;
                        }
                        Some(&c) => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                while i < chars.len() && !chars[i].is_whitespace() {
                    value.push(chars[i]);
                    i += 1;
                }
            }
            pairs.push((key, value));
        } else {
            pairs.push((key, "true".into()));
        }
    }
}

/// `tags` as Grafana sends it (a JSON object of strings), or logfmt.
fn parse_tags(text: &str) -> Result<Vec<(String, String)>> {
    let text = text.trim();
    if text.starts_with('{') {
        let object: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| bad_request(format!("malformed 'tags' parameter, cannot unmarshal JSON: {e}")))?;
        Ok(object
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (key, value)
            })
            .collect())
    } else {
        parse_logfmt(text).map_err(bad_request)
    }
}

/// The search a request asks for; its window ends at `now_ns` unless it says otherwise.
fn parse_search(params: &[(String, String)], now_ns: i64) -> Result<TraceSearch> {
    let service = first(params, "service").map(|s| s.trim().to_string());
    let operation = first(params, "operation").map(str::to_string);
    let mut tags = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "tag" if !value.is_empty() => match value.split_once(':') {
                Some((k, v)) => tags.push((k.to_string(), v.to_string())),
                None => {
                    return Err(bad_request(format!(
                        "malformed 'tag' parameter, expecting key:value, received: {value}"
                    )));
                }
            },
            "tags" if !value.is_empty() => tags.extend(parse_tags(value)?),
            _ => {}
        }
    }
    let duration = |name: &str| -> Result<i64> {
        first(params, name)
            .map(|v| {
                parse_go_duration(v.trim()).ok_or_else(|| {
                    bad_request(format!(
                        "unable to parse param '{name}': invalid duration {v:?} (use e.g. 1.2s, 100ms, 500us)"
                    ))
                })
            })
            .transpose()
            .map(|d| d.unwrap_or(0))
    };
    let min_ns = duration("minDuration")?;
    let max_ns = duration("maxDuration")?;
    if min_ns != 0 && max_ns != 0 && max_ns < min_ns {
        return Err(bad_request("'maxDuration' should be greater than 'minDuration'"));
    }
    let limit = match int_param(params, "limit")? {
        Some(limit) if limit > 0 => (limit as usize).min(MAX_LIMIT),
        _ => DEFAULT_LIMIT,
    };
    let end_ns = int_param(params, "end")?.map_or(now_ns, |us| us.saturating_mul(1000));
    let start_ns = int_param(params, "start")?
        .map_or_else(|| end_ns.saturating_sub(DEFAULT_SEARCH_LOOKBACK_NS), |us| us.saturating_mul(1000));
    let service = service.ok_or_else(|| bad_request("parameter 'service' is required"))?;
    check_window("search", start_ns, end_ns)?;
    if tags.len() > MAX_TAGS {
        return Err(bad_request(format!("{} tag conditions, more than the limit of {MAX_TAGS}", tags.len())));
    }
    if let Some((key, _)) = tags.iter().find(|(k, v)| k.len().max(v.len()) > MAX_TAG_BYTES) {
        let key: String = key.chars().take(40).collect();
        return Err(bad_request(format!(
            "tag {key:?}: a key or value is longer than {MAX_TAG_BYTES} bytes, the limit"
        )));
    }
    Ok(TraceSearch { service, operation, tags, min_ns, max_ns, limit, start_ns, end_ns })
}

async fn search(State(state): State<DashboardState>, headers: HeaderMap, query: Params) -> Result<Response> {
    let tenants = scope(&state, &headers).await?;
    let params = params(query)?;
    let trace_ids: Vec<&str> =
        params.iter().filter(|(k, v)| k == "traceID" && !v.is_empty()).map(|(_, v)| v.as_str()).collect();
    if trace_ids.len() > MAX_TRACE_IDS {
        return Err(bad_request(format!("{} traceID parameters: at most {MAX_TRACE_IDS} at once", trace_ids.len())));
    }
    if !trace_ids.is_empty() {
        let mut traces = Vec::new();
        let mut errors = Vec::new();
        for raw in trace_ids {
            let trace_id = parse_trace_id(raw)?;
            let found = traces_by_id(&state.store, &tenants, &trace_id).await?;
            if found.is_empty() {
                errors.push(StructuredError {
                    code: None,
                    msg: "trace not found".into(),
                    trace_id: Some(jaeger_trace_id(&trace_id)),
                });
            }
            traces.extend(found);
        }
        return Ok(respond(traces, 0, (!errors.is_empty()).then_some(errors)));
    }
    let search = parse_search(&params, state.store.clock().now_ns())?;
    let mut found: Vec<(i64, &str, String)> = Vec::new();
    match &tenants[..] {
        [tenant] => {
            for (trace_id, start_ns) in state.store.find_traces(tenant, &search).await? {
                found.push((start_ns, tenant.as_str(), trace_id));
            }
        }
        // The administrator's search over every tenant: one pass.
        _ => {
            for (tenant, trace_id, start_ns) in state.store.find_traces_of_every_tenant(&search).await? {
                if let Some(tenant) = tenants.iter().find(|t| **t == tenant) {
                    found.push((start_ns, tenant.as_str(), trace_id));
                }
            }
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)).then_with(|| a.2.cmp(&b.2)));
    found.truncate(search.limit);
    let mut spans: HashMap<(&str, String), Vec<SpanRow>> = HashMap::new();
    let mut held = 0;
    for chunk in found.chunks(50) {
        if held >= MAX_SEARCH_SPANS {
            break;
        }
        let mut by_tenant: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (_, tenant, trace_id) in chunk {
            by_tenant.entry(tenant).or_default().push(trace_id);
        }
        for (tenant, trace_ids) in by_tenant {
            for (trace_id, rows) in state.store.traces(tenant, &trace_ids).await? {
                held += rows.len();
                spans.insert((tenant, trace_id), rows);
            }
        }
    }
    let traces: Vec<JaegerTrace> = found
        .iter()
        .filter_map(|(_, tenant, trace_id)| spans.get(&(*tenant, trace_id.clone())).map(|rows| jaeger_trace(rows)))
        .collect();
    Ok(respond(traces, 0, None))
}

// ---------------------------------------------------------------------------------------------
// /api/dependencies

#[derive(Serialize)]
struct DependencyLink {
    parent: String,
    child: String,
    #[serde(rename = "callCount")]
    call_count: i64,
}

async fn dependencies(State(state): State<DashboardState>, headers: HeaderMap, query: Params) -> Result<Response> {
    let tenants = scope(&state, &headers).await?;
    let params = params(query)?;
    let end_ms = int_param(&params, "endTs")?.unwrap_or_else(|| state.store.clock().now_ms());
    let lookback_ms = int_param(&params, "lookback")?.unwrap_or(DEFAULT_DEPENDENCIES_LOOKBACK_MS);
    let service = first(&params, "service");
    let end_ns = end_ms.saturating_mul(1_000_000);
    let start_ns = end_ms.saturating_sub(lookback_ms).saturating_mul(1_000_000);
    check_window("dependencies", start_ns, end_ns)?;
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for tenant in &tenants {
        let links = state.store.dependencies(tenant, start_ns, end_ns).await?;
        for (parent, child, count) in links {
            *counts.entry((parent, child)).or_default() += count;
        }
    }
    let data: Vec<DependencyLink> = counts
        .into_iter()
        .filter(|((parent, child), _)| service.is_none_or(|s| s == parent || s == child))
        .map(|((parent, child), call_count)| DependencyLink { parent, child, call_count })
        .collect();
    Ok(respond(data, 0, None))
}

// ---------------------------------------------------------------------------------------------
// Stored spans → Jaeger's JSON model

#[derive(Serialize)]
struct JaegerTrace {
    #[serde(rename = "traceID")]
    trace_id: String,
    spans: Vec<JaegerSpan>,
    processes: BTreeMap<String, JaegerProcess>,
    warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JaegerSpan {
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
    flags: u32,
    operation_name: String,
    references: Vec<Reference>,
    start_time: i64,
    duration: i64,
    tags: Vec<KeyValue>,
    logs: Vec<Log>,
    #[serde(rename = "processID")]
    process_id: String,
    warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Reference {
    #[serde(rename = "refType")]
    ref_type: &'static str,
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
}

#[derive(Serialize)]
struct JaegerProcess {
    #[serde(rename = "serviceName")]
    service_name: String,
    tags: Vec<KeyValue>,
}

#[derive(Serialize)]
struct Log {
    timestamp: i64,
    fields: Vec<KeyValue>,
}

#[derive(Serialize)]
struct KeyValue {
    key: String,
    #[serde(rename = "type")]
    kind: &'static str,
    value: Value,
}

fn string_tag(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.to_string(), kind: "string", value: Value::String(value.to_string()) }
}

/// A typed tag from a stored attribute value (jaeger-query's `convertKeyValues`).
fn tag(key: &str, value: &Value) -> KeyValue {
    let (kind, value) = match value {
        Value::String(_) => ("string", value.clone()),
        Value::Bool(_) => ("bool", value.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) if (-JS_MAX_SAFE_INTEGER..=JS_MAX_SAFE_INTEGER).contains(&i) => ("int64", value.clone()),
            Some(i) => ("int64", Value::String(i.to_string())),
            None if n.is_u64() => ("int64", Value::String(n.to_string())),
            None => ("float64", value.clone()),
        },
        Value::Null => ("string", Value::String(String::new())),
        other => ("string", Value::String(other.to_string())),
    };
    KeyValue { key: key.to_string(), kind, value }
}

fn object(text: &str, what: &str, warnings: &mut Vec<String>) -> Map<String, Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        _ => {
            warnings.push(format!("stored {what} are not a JSON object"));
            Map::new()
        }
    }
}

fn hex_id_ok(id: &str, len: usize) -> bool {
    id.len() == len && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0')
}

fn jaeger_span(row: &SpanRow, trace_id: &str, process_id: String) -> JaegerSpan {
    let mut warnings = Vec::new();
    let attributes = object(&row.attributes, "attributes", &mut warnings);
    let mut tags = Vec::with_capacity(attributes.len() + 4);
    if row.scope != "{}" {
        let scope = object(&row.scope, "scope", &mut warnings);
        for (field, key) in [("name", "otel.scope.name"), ("version", "otel.scope.version")] {
            if let Some(value) = scope.get(field).and_then(Value::as_str).filter(|v| !v.is_empty()) {
                tags.push(string_tag(key, value));
            }
        }
    }
    for (key, value) in &attributes {
        tags.push(tag(key, value));
    }
    let mut synthetic = |key: &str, value: Value| {
        if !attributes.contains_key(key) {
            tags.push(tag(key, &value));
        }
    };
    if let Some(kind) = span_kind_name(row.kind) {
        synthetic("span.kind", Value::String(kind.into()));
    }
    if let Some(status) = status_name(row.status_code) {
        synthetic("otel.status_code", Value::String(status.into()));
    }
    if row.status_code == 2 {
        synthetic("error", Value::Bool(true));
    }
    if !row.status_message.is_empty() {
        synthetic("otel.status_description", Value::String(row.status_message.clone()));
    }

    let mut references = Vec::new();
    if let Some(parent) = row.parent_span_id.as_deref().filter(|p| !p.is_empty()) {
        references.push(Reference {
            ref_type: "CHILD_OF",
            trace_id: trace_id.to_string(),
            span_id: parent.to_string(),
        });
    }
    if row.links != "[]" {
        let links: Vec<Value> = serde_json::from_str(&row.links).unwrap_or_else(|_| {
            warnings.push("stored links are not a JSON array".into());
            Vec::new()
        });
        for link in links {
            let (Some(link_trace), Some(link_span)) =
                (link.get("trace_id").and_then(Value::as_str), link.get("span_id").and_then(Value::as_str))
            else {
                continue;
            };
            if !hex_id_ok(link_trace, 32) || !hex_id_ok(link_span, 16) {
                continue;
            }
            let child_of = link.get("attributes").and_then(|a| a.get("opentracing.ref_type")).and_then(Value::as_str)
                == Some("child_of");
            let ref_type = if child_of { "CHILD_OF" } else { "FOLLOWS_FROM" };
            let link_trace = jaeger_trace_id(link_trace);
            if row.parent_span_id.as_deref() == Some(link_span) && link_trace == trace_id && !references.is_empty() {
                references[0].ref_type = ref_type;
                continue;
            }
            references.push(Reference { ref_type, trace_id: link_trace, span_id: link_span.to_string() });
        }
    }

    let mut logs = Vec::new();
    if row.events != "[]" {
        let events: Vec<Value> = serde_json::from_str(&row.events).unwrap_or_else(|_| {
            warnings.push("stored events are not a JSON array".into());
            Vec::new()
        });
        for event in events {
            let time_ns =
                event.get("time_ns").and_then(|t| t.as_i64().or_else(|| t.as_f64().map(|f| f as i64))).unwrap_or(0);
            let attributes = event.get("attributes").and_then(Value::as_object);
            let mut fields = Vec::with_capacity(attributes.map_or(0, Map::len) + 1);
            if let Some(name) = event.get("name").and_then(Value::as_str).filter(|n| !n.is_empty())
                && !attributes.is_some_and(|a| a.contains_key("event"))
            {
                fields.push(string_tag("event", name));
            }
            for (key, value) in attributes.into_iter().flatten() {
                fields.push(tag(key, value));
            }
            logs.push(Log { timestamp: time_ns / 1000, fields });
        }
    }

    if row.end_ns < row.start_ns {
        // In i128: the gap between two i64 times can be more than an i64 holds.
        let gap = i128::from(row.start_ns) - i128::from(row.end_ns);
        warnings.push(format!("the span ends {gap} ns before it starts; duration shown as 0"));
    }
    JaegerSpan {
        trace_id: trace_id.to_string(),
        span_id: row.span_id.clone(),
        // The span was recorded and exported: sampled.
        flags: 1,
        operation_name: row.name.clone(),
        references,
        start_time: row.start_ns / 1000,
        duration: row.duration_ns() / 1000,
        tags,
        logs,
        process_id,
        warnings: (!warnings.is_empty()).then_some(warnings),
    }
}

/// One tenant's spans of one trace (non-empty) in Jaeger's JSON model.
fn jaeger_trace(rows: &[SpanRow]) -> JaegerTrace {
    let trace_id = jaeger_trace_id(&rows[0].trace_id);
    let mut ids: HashMap<(&str, &str), String> = HashMap::new();
    let mut processes = BTreeMap::new();
    let spans = rows
        .iter()
        .map(|row| {
            let key = (row.service_name.as_str(), row.resource.as_str());
            let process_id = match ids.get(&key) {
                Some(id) => id.clone(),
                None => {
                    let id = format!("p{}", ids.len() + 1);
                    let mut ignored = Vec::new();
                    let resource = object(&row.resource, "resource", &mut ignored);
                    let tags =
                        resource.iter().filter(|(key, _)| *key != "service.name").map(|(k, v)| tag(k, v)).collect();
                    processes.insert(id.clone(), JaegerProcess { service_name: row.service_name.clone(), tags });
                    ids.insert(key, id.clone());
                    id
                }
            };
            jaeger_span(row, &trace_id, process_id)
        })
        .collect();
    JaegerTrace { trace_id, spans, processes, warnings: None }
}
