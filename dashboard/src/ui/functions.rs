//! Developers: each function's invocations, errors, latency percentiles, CPU and cost.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use maud::{PreEscaped, html};
use rust_decimal::Decimal;

use super::{Params, Ui, page, tenant_form, url};
use crate::charts;

/// One function's invocations this period.
#[derive(Default)]
struct Row {
    latencies: Vec<f64>,
    errors: i64,
    cpu: i64,
    cost: Decimal,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Developers: per function, this period.
pub(super) async fn functions(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, params.tenant.as_deref()).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let period = match ui.current_period(&viewer).await {
        Ok(p) => params.period.clone().unwrap_or(p),
        Err(r) => return r,
    };
    let records = ui.records(&tenant, &period).await;
    let all_costs = ui.costs(&tenant, &period).await;
    let costs: HashMap<&str, Decimal> = all_costs.iter().map(|c| (c.usage_id.as_str(), c.cost)).collect();
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut all = Vec::new();
    for r in records.iter().filter(|r| r.kind == billing::usage::Kind::Invocation) {
        let row = rows.entry(r.function.clone()).or_default();
        row.latencies.push(r.wall_ms as f64);
        all.push(r.wall_ms as f64);
        row.errors += i64::from(r.status_code >= 500);
        row.cpu += r.cpu_ms;
        row.cost += costs.get(r.usage_id.as_str()).copied().unwrap_or_default();
    }
    for row in rows.values_mut() {
        row.latencies.sort_by(f64::total_cmp);
    }
    let body = html! {
        (tenant_form(&viewer, &tenant, html! {}))
        p.muted { "Tenant " (tenant) ", period " (period) ". Latency is the wall time the gateway measured." }
        table #functions {
            thead {
                tr {
                    th { "function" }
                    th.n { "invocations" }
                    th.n { "errors" }
                    th.n { "p50 ms" }
                    th.n { "p95 ms" }
                    th.n { "p99 ms" }
                    th.n { "CPU-ms" }
                    th.n { "cost" }
                }
            }
            tbody {
                @for (function, row) in &rows {
                    tr {
                        td { a href={ "/ui/traces?tenant=" (url(&tenant)) "&function=" (url(function)) } { (function) } }
                        td.n { (row.latencies.len()) }
                        td.n { (row.errors) }
                        td.n { (percentile(&row.latencies, 0.5)) }
                        td.n { (percentile(&row.latencies, 0.95)) }
                        td.n { (percentile(&row.latencies, 0.99)) }
                        td.n { (row.cpu) }
                        td.n { (row.cost.round_dp(8)) }
                    }
                }
            }
        }
        // plotters escapes the text it draws.
        (PreEscaped(charts::histogram("Latency, all functions", "ms", &all, 20)))
    };
    page("Functions", Some(&viewer), body).into_response()
}
