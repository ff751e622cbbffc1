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
//! `[{code, msg}]` with the HTTP status on failure, 401/403 included); traces and spans are
//! jaeger-query's, translated from the stored spans as `model.rs` describes. The request's
//! parameters are read in `request.rs`.
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

mod model;
mod request;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use collector::model::{SpanRow, span_kind_name};
use collector::store::{StoreError, TelemetryStore};
use contract::Viewer;
use serde::Serialize;
use serde_json::Value;

use crate::DashboardState;
use model::{JaegerTrace, jaeger_trace, jaeger_trace_id};
use request::{check_window, first, int_param, params, parse_search, parse_trace_id};

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
/// Longest window a search or a dependencies request may read (each reads every matching span
/// of its window): 31 days, a month of any length.
const MAX_WINDOW_NS: i64 = 31 * 24 * 3600 * 1_000_000_000;
/// Most tag conditions a search may have, and the longest key or value.
const MAX_TAGS: usize = 32;
const MAX_TAG_BYTES: usize = 1024;

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

// ---------------------------------------------------------------------------------------------
// Tenancy

/// The tenants the caller may read and asked for (checked before anything else is looked at).
async fn scope(state: &DashboardState, headers: &HeaderMap) -> Result<Vec<String>> {
    let viewer = state.viewer(headers).map_err(|error| JaegerError(error.0, error.1))?;
    match viewer {
        Viewer::Tenant(tenant) => Ok(vec![tenant]),
        Viewer::Admin => match crate::scope_org_id(headers) {
            Some(org) => Ok(vec![org]),
            None => Ok(state.store.span_tenants().await?),
        },
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
