//! Developers: invocation spans searched by function, status, duration and attribute, and any
//! trace as a waterfall.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use billing::period::rfc3339;
use collector::model::SpanRow;
use contract::semconv;
use maud::{Markup, html};
use serde_json::Value;

use super::{Params, Ui, error_page, internal, page, tenant_form, url};

/// Rows the traces list shows at most.
const SHOWN: usize = 200;

pub(super) fn attributes(span: &SpanRow) -> serde_json::Map<String, Value> {
    serde_json::from_str(&span.attributes).unwrap_or_default()
}

pub(super) fn text_attr(attributes: &serde_json::Map<String, Value>, key: &str) -> String {
    match attributes.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The window a page shows: `hours` (default a week) up to a minute past `now`.
pub(super) fn lookback(params: &Params, now: i64) -> (i64, i64) {
    let hours: i64 = params.hours.as_deref().and_then(|h| h.parse().ok()).unwrap_or(24 * 7).clamp(1, 24 * 400);
    (now.saturating_sub(hours * 3_600_000_000_000), now.saturating_add(60_000_000_000))
}

/// What the traces list is asked to show.
struct Filters {
    function: String,
    status: String,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
    attr: String,
}

/// Developers: invocation spans by function, status, duration and attribute.
pub(super) async fn traces(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, params.tenant.as_deref()).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let filters = Filters {
        function: params.function.clone().unwrap_or_default(),
        status: params.status.clone().unwrap_or_default(),
        min_ms: params.min_ms.as_deref().and_then(|v| v.parse().ok()),
        max_ms: params.max_ms.as_deref().and_then(|v| v.parse().ok()),
        attr: params.attr.clone().unwrap_or_default(),
    };
    let (since, until) = lookback(&params, ui.state.store.clock().now_ns());
    let prefix = semconv::invoke_span_name(&filters.function);
    let spans = match ui.state.store.spans_named(&tenant, &prefix, (since, until), 2000, &|_| true).await {
        Ok(s) => s,
        Err(e) => return internal(&viewer, e),
    };
    let rows: Vec<Markup> = spans.iter().filter_map(|span| span_row(&tenant, span, &filters)).take(SHOWN).collect();
    let form = html! {
        label { "function" input name="function" value=(filters.function); }
        label {
            "status"
            select name="status" {
                @for status in ["", "ok", "error"] {
                    option selected[status == filters.status] { (status) }
                }
            }
        }
        label { "min ms" input name="min_ms" size="6" value=(params.min_ms.as_deref().unwrap_or_default()); }
        label { "max ms" input name="max_ms" size="6" value=(params.max_ms.as_deref().unwrap_or_default()); }
        label { "attribute (key=value)" input name="attr" value=(filters.attr); }
    };
    let body = html! {
        (tenant_form(&viewer, &tenant, form))
        table #traces {
            thead {
                tr { th { "span" } th { "started" } th.n { "ms" } th { "status" } th { "trace" } }
            }
            tbody {
                @for row in &rows {
                    (row)
                }
            }
        }
        @if rows.is_empty() {
            p.muted { "No spans match." }
        }
    };
    page("Traces", Some(&viewer), body).into_response()
}

/// A span's row in the traces list, if it passes the filters.
fn span_row(tenant: &str, span: &SpanRow, filters: &Filters) -> Option<Markup> {
    if !filters.function.is_empty() && span.name != semconv::invoke_span_name(&filters.function) {
        return None;
    }
    let ms = span.duration_ns() as f64 / 1e6;
    let a = attributes(span);
    let code = a.get(semconv::HTTP_RESPONSE_STATUS_CODE).and_then(Value::as_i64).unwrap_or(0);
    let is_error = span.status_code == 2 || code >= 500;
    if (filters.status == "ok" && is_error) || (filters.status == "error" && !is_error) {
        return None;
    }
    if filters.min_ms.is_some_and(|m| ms < m) || filters.max_ms.is_some_and(|m| ms > m) {
        return None;
    }
    let (attr_key, attr_value) = filters.attr.split_once('=').unwrap_or((filters.attr.as_str(), ""));
    if !attr_key.is_empty() && text_attr(&a, attr_key.trim()) != attr_value.trim() {
        return None;
    }
    Some(html! {
        tr {
            td { (span.name) }
            td { (rfc3339(span.start_ns)) }
            td.n { (format!("{ms:.2}")) }
            td class=[is_error.then_some("bad")] { (if is_error { "error" } else { "ok" }) " (" (code) ")" }
            td {
                a href={ "/ui/traces/" (url(tenant)) "/" (url(&span.trace_id)) } {
                    (span.trace_id[..16.min(span.trace_id.len())])
                }
            }
        }
    })
}

/// Any trace of the tenant as a waterfall.
pub(super) async fn trace(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path((tenant, trace_id)): Path<(String, String)>,
) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, Some(&tenant)).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let spans = match ui.state.store.trace(&tenant, &trace_id).await {
        Ok(s) => s,
        Err(e) => return internal(&viewer, e),
    };
    if spans.is_empty() {
        return error_page(
            StatusCode::NOT_FOUND,
            Some(&viewer),
            &format!("no trace {trace_id:?} in tenant {tenant:?}"),
        );
    }
    let logs = trace_logs(&ui.state.store, &tenant, &trace_id, &spans).await;
    page(&format!("Trace {trace_id}"), Some(&viewer), html! { (waterfall(&spans)) (logs) }).into_response()
}

/// Most log lines the logs page shows.
const LOG_LINES: usize = 500;
const SEVERITIES: [&str; 7] = ["", "FATAL", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// Developers: a tenant's function log lines by function, text, severity and time, newest
/// last, each linked to its trace.
pub(super) async fn logs(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, params.tenant.as_deref()).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let function = params.function.clone().unwrap_or_default();
    let text = params.text.clone().unwrap_or_default();
    let severity = params.severity.clone().filter(|s| SEVERITIES.contains(&s.as_str())).unwrap_or_default();
    let (since, _) = lookback(&params, ui.state.store.clock().now_ns());
    let query = collector::store::LogQuery {
        tenant: tenant.clone(),
        function: Some(function.clone()).filter(|f| !f.is_empty()),
        contains: Some(text.clone()).filter(|t| !t.is_empty()),
        severity: Some(severity.clone()).filter(|s| !s.is_empty()),
        since_ns: since,
        limit: LOG_LINES,
        ..Default::default()
    };
    let logs = match ui.state.store.function_logs(&query).await {
        Ok(logs) => logs,
        Err(e) => return internal(&viewer, e),
    };
    let form = html! {
        label { "function" input name="function" value=(function); }
        label { "text" input name="text" value=(text); }
        label {
            "severity"
            select name="severity" {
                @for s in SEVERITIES {
                    option selected[s == severity] { (s) }
                }
            }
        }
        label { "hours" input name="hours" size="4" value=(params.hours.as_deref().unwrap_or("168")); }
    };
    let body = html! {
        (tenant_form(&viewer, &tenant, form))
        @if logs.len() == LOG_LINES { p.muted { "The newest " (LOG_LINES) " lines." } }
        table #logs {
            thead { tr { th { "time" } th { "function" } th { "severity" } th { "line" } th { "trace" } } }
            tbody {
                @for log in &logs {
                    @let a: serde_json::Map<String, Value> = serde_json::from_str(&log.attributes).unwrap_or_default();
                    tr {
                        td { (rfc3339(log.ts_ns)) }
                        td { (text_attr(&a, semconv::FAAS_NAME)) }
                        td class=[(log.severity_text == "ERROR" || log.severity_text == "FATAL").then_some("bad")] { (log.severity_text) }
                        td { code { (log.body) } }
                        td {
                            @if let Some(trace) = &log.trace_id {
                                a href={ "/ui/traces/" (url(&tenant)) "/" (url(trace)) } { (trace[..16.min(trace.len())]) }
                            }
                        }
                    }
                }
            }
        }
        @if logs.is_empty() { p.muted { "No log lines match." } }
    };
    page("Logs", Some(&viewer), body).into_response()
}

/// Most log lines a trace's page shows.
const TRACE_LOG_LINES: usize = 1000;

/// The log lines the trace's invocations wrote (the functions' output), oldest first.
pub(super) async fn trace_logs(
    store: &collector::store::TelemetryStore,
    tenant: &str,
    trace_id: &str,
    spans: &[SpanRow],
) -> Markup {
    // The trace's lines are dated within its spans' times (a minute either side: clocks).
    let since_ns = spans.iter().map(|s| s.start_ns).min().unwrap_or(0).saturating_sub(60_000_000_000);
    let until_ns = spans.iter().map(|s| s.end_ns).max().unwrap_or(i64::MAX).saturating_add(60_000_000_000);
    let query = collector::store::LogQuery {
        tenant: tenant.to_string(),
        trace_id: Some(trace_id.to_string()),
        since_ns,
        until_ns: Some(until_ns),
        limit: TRACE_LOG_LINES,
        ..Default::default()
    };
    let logs = match store.function_logs(&query).await {
        Ok(logs) => logs,
        Err(error) => return html! { p.muted { "The log lines cannot be read: " (error) } },
    };
    if logs.is_empty() {
        return html! { h2 { "Logs" } p.muted { "No log lines." } };
    }
    let names: HashMap<&str, &str> = spans.iter().map(|s| (s.span_id.as_str(), s.name.as_str())).collect();
    html! {
        h2 { "Logs" }
        @if logs.len() == TRACE_LOG_LINES { p.muted { "The first " (TRACE_LOG_LINES) " lines." } }
        table #logs {
            thead { tr { th { "time" } th { "span" } th { "severity" } th { "line" } } }
            tbody {
                @for log in &logs {
                    @let time = chrono::DateTime::from_timestamp_nanos(log.ts_ns).format("%H:%M:%S%.3f").to_string();
                    @let span = log.span_id.as_deref().and_then(|id| names.get(id).copied()).unwrap_or("");
                    tr {
                        td { (time) }
                        td { (span) }
                        td class=[(log.severity_text == "ERROR" || log.severity_text == "FATAL").then_some("bad")] { (log.severity_text) }
                        td { code { (log.body) } }
                    }
                }
            }
        }
    }
}

/// The spans of a trace as a waterfall (offset and length relative to the whole trace).
pub(super) fn waterfall(spans: &[SpanRow]) -> Markup {
    let Some(start) = spans.iter().map(|s| s.start_ns).min() else {
        return html! { p.muted { "No spans." } };
    };
    let end = spans.iter().map(|s| s.end_ns).max().unwrap_or(start);
    // The times are the sender's (any i64): differences are taken exactly, in i128.
    let since_start = |t: i64| (i128::from(t) - i128::from(start)) as f64;
    let total = since_start(end).max(1.0);
    let parents: HashMap<&str, Option<&str>> =
        spans.iter().map(|s| (s.span_id.as_str(), s.parent_span_id.as_deref())).collect();
    html! {
        table #waterfall {
            thead {
                tr { th { "span" } th.n { "ms" } th style="width:50%" { "timeline" } }
            }
            tbody {
                @for row in spans {
                    @let left = since_start(row.start_ns) / total * 100.0;
                    @let width = (row.duration_ns() as f64 / total * 100.0).max(0.3);
                    @let indent = 0.8 + depth_of(&parents, &row.span_id) as f64;
                    tr {
                        td style={ "padding-left:" (indent) "em" } { (row.name) }
                        td.n { (format!("{:.2}", row.duration_ns() as f64 / 1e6)) }
                        td {
                            div.bar {
                                span class=[(row.status_code == 2).then_some("error")]
                                    style=(format!("left:{left:.2}%;width:{width:.2}%")) {}
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How deep a span is under the trace's root (a cycle of parents stops at 65).
fn depth_of<'a>(parents: &HashMap<&'a str, Option<&'a str>>, mut id: &'a str) -> usize {
    let mut depth = 0;
    while let Some(Some(parent)) = parents.get(id) {
        if depth > 64 {
            break;
        }
        depth += 1;
        id = parent;
    }
    depth
}
