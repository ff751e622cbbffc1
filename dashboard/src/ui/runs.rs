//! Developers: flow runs, and one run's trace as its DAG (critical path highlighted) beside the
//! waterfall.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use billing::period::{Period, rfc3339};
use collector::model::SpanRow;
use contract::semconv;
use maud::{Markup, html};
use rust_decimal::Decimal;
use serde_json::Value;

use super::traces::{attributes, lookback, text_attr, trace_logs, waterfall};
use super::{Params, Ui, error_page, internal, page, tenant_form, url};
use crate::dag::{self, DagNode, critical_path};

/// Developers: flow runs, filtered by flow, status and time.
pub(super) async fn runs(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, params.tenant.as_deref()).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let (since, until) = lookback(&params, ui.state.store.clock().now_ns());
    let spans =
        match ui.state.store.spans_named(&tenant, semconv::FLOW_SPAN_PREFIX, (since, until), 500, &|_| true).await {
            Ok(s) => s,
            Err(e) => return internal(&viewer, e),
        };
    let period = ui.current_period(&viewer).await.unwrap_or_default();
    let mut run_costs: HashMap<String, Decimal> = HashMap::new();
    for cost in ui.costs(&tenant, &period).await.iter() {
        if let Some(run) = &cost.flow_run {
            *run_costs.entry(run.clone()).or_default() += cost.cost;
        }
    }
    let flow_filter = params.flow.clone().unwrap_or_default();
    let status_filter = params.status.clone().unwrap_or_default();
    let rows: Vec<Markup> = spans
        .iter()
        .filter_map(|span| {
            let a = attributes(span);
            let flow = text_attr(&a, semconv::SFAAS_FLOW_NAME);
            let status = text_attr(&a, semconv::SFAAS_FLOW_STATUS);
            if (!flow_filter.is_empty() && flow != flow_filter)
                || (!status_filter.is_empty() && status != status_filter)
            {
                return None;
            }
            let run_id = text_attr(&a, semconv::SFAAS_FLOW_RUN_ID);
            let cost = run_costs.get(&run_id).map_or("—".into(), |c| c.round_dp(8).to_string());
            Some(html! {
                tr {
                    td {
                        a href={ "/ui/runs/" (url(&tenant)) "/" (url(&run_id)) "?trace=" (url(&span.trace_id)) } {
                            (run_id)
                        }
                    }
                    td { (flow) }
                    td class=[(status == "failed").then_some("bad")] { (status) }
                    td { (rfc3339(span.start_ns)) }
                    td.n { (format!("{:.1}", span.duration_ns() as f64 / 1e6)) }
                    td.n { (text_attr(&a, semconv::SFAAS_STATE_BYTE_SECONDS)) }
                    td.n { (cost) }
                }
            })
        })
        .collect();
    let form = html! {
        label { "flow" input name="flow" value=(flow_filter); }
        label {
            "status"
            select name="status" {
                @for status in ["", "succeeded", "failed", "cancelled"] {
                    option selected[status == status_filter] { (status) }
                }
            }
        }
        label { "last hours" input name="hours" size="5" value=((until - since) / 3_600_000_000_000); }
    };
    let body = html! {
        (tenant_form(&viewer, &tenant, form))
        table #runs {
            thead {
                tr {
                    th { "run" }
                    th { "flow" }
                    th { "status" }
                    th { "started" }
                    th.n { "duration ms" }
                    th.n { "state byte-s" }
                    th.n { "cost (this period)" }
                }
            }
            tbody {
                @for row in &rows {
                    (row)
                }
            }
        }
        @if rows.is_empty() {
            p.muted { "No flow runs match." }
        }
    };
    page("Flow runs", Some(&viewer), body).into_response()
}

/// Developers: a flow run's trace as its DAG (critical path highlighted) beside the waterfall.
pub(super) async fn run(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path((tenant, run_id)): Path<(String, String)>,
    Query(params): Query<Params>,
) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, Some(&tenant)).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let store = &ui.state.store;
    // The runs list links with the trace id; otherwise look the run's flow span up.
    let flow_of = |spans: &[SpanRow]| {
        spans
            .iter()
            .find(|s| {
                s.name.starts_with(semconv::FLOW_SPAN_PREFIX)
                    && text_attr(&attributes(s), semconv::SFAAS_FLOW_RUN_ID) == run_id
            })
            .cloned()
    };
    let known = match params.trace.as_deref() {
        Some(trace) => store.trace(&tenant, trace).await.ok().and_then(|spans| flow_of(&spans).map(|f| (f, spans))),
        None => None,
    };
    let (flow, spans) = match known {
        Some(found) => found,
        None => {
            // The newest flow span of the run, however many runs the tenant has.
            let window = (i64::MIN, i64::MAX);
            let of_run = |s: &SpanRow| text_attr(&attributes(s), semconv::SFAAS_FLOW_RUN_ID) == run_id;
            let flows = match store.spans_named(&tenant, semconv::FLOW_SPAN_PREFIX, window, 1, &of_run).await {
                Ok(s) => s,
                Err(e) => return internal(&viewer, e),
            };
            let Some(flow) = flow_of(&flows) else {
                return error_page(
                    StatusCode::NOT_FOUND,
                    Some(&viewer),
                    &format!("no flow run {run_id:?} in tenant {tenant:?}"),
                );
            };
            match store.trace(&tenant, &flow.trace_id).await {
                Ok(spans) => (flow, spans),
                Err(e) => return internal(&viewer, e),
            }
        }
    };
    let period = Period::containing(billing_kind(&ui).await, flow.start_ns).key();
    let costs: HashMap<String, Decimal> = ui
        .costs(&tenant, &period)
        .await
        .iter()
        .filter(|c| c.flow_run.as_deref() == Some(run_id.as_str()))
        .map(|c| (c.usage_id.clone(), c.cost))
        .collect();
    let nodes = dag_nodes(&spans, &run_id, &costs);
    let critical = critical_path(&nodes);
    let a = attributes(&flow);
    let total_cost: Decimal = costs.values().copied().sum();
    let critical_names = critical.iter().map(|&i| nodes[i].id.as_str()).collect::<Vec<_>>().join(" → ");
    let logs = trace_logs(store, &tenant, &flow.trace_id, &spans).await;
    let body = html! {
        .cards {
            .card { "flow" b { (text_attr(&a, semconv::SFAAS_FLOW_NAME)) } }
            .card { "status" b #run-status { (text_attr(&a, semconv::SFAAS_FLOW_STATUS)) } }
            .card { "duration" b { (format!("{:.1}", flow.duration_ns() as f64 / 1e6)) " ms" } }
            .card { "nodes" b #node-count { (nodes.len()) } }
            .card { "state byte-s" b { (text_attr(&a, semconv::SFAAS_STATE_BYTE_SECONDS)) } }
            .card { "cost" b #run-cost { (total_cost.round_dp(10)) } }
        }
        p.muted { "Critical path (longest chain of node durations): " (critical_names) }
        .split {
            div { (dag_svg(&nodes, &critical)) }
            div { (waterfall(&spans)) }
        }
        (logs)
        p { a href={ "/ui/traces/" (url(&tenant)) "/" (url(&flow.trace_id)) } { "The whole trace" } }
    };
    page(&format!("Flow run {run_id}"), Some(&viewer), body).into_response()
}

/// The run's nodes: its `node <id>` spans, with the CPU and cost of their `invoke` children.
fn dag_nodes(spans: &[SpanRow], run_id: &str, costs: &HashMap<String, Decimal>) -> Vec<DagNode> {
    let mut nodes: Vec<DagNode> = Vec::new();
    let mut by_span: HashMap<&str, usize> = HashMap::new();
    for span in spans.iter().filter(|s| s.name.starts_with(semconv::NODE_SPAN_PREFIX)) {
        let a = attributes(span);
        if text_attr(&a, semconv::SFAAS_FLOW_RUN_ID) != run_id {
            continue; // a sub-flow's node
        }
        let id = text_attr(&a, semconv::SFAAS_FLOW_NODE);
        let needs = match a.get(semconv::SFAAS_FLOW_NEEDS) {
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        };
        by_span.insert(&span.span_id, nodes.len());
        nodes.push(DagNode {
            id,
            needs,
            start_ns: span.start_ns,
            end_ns: span.end_ns,
            failed: span.status_code == 2,
            attempts: a.get(semconv::SFAAS_FLOW_ATTEMPT).and_then(Value::as_i64).unwrap_or(1),
            state_bytes: a.get(semconv::SFAAS_STATE_VALUE_BYTES).and_then(Value::as_i64).unwrap_or(0),
            ..DagNode::default()
        });
    }
    for span in spans.iter().filter(|s| s.name.starts_with(semconv::INVOKE_SPAN_PREFIX)) {
        let Some(&index) = span.parent_span_id.as_deref().and_then(|p| by_span.get(p)) else { continue };
        let a = attributes(span);
        nodes[index].cpu_ms += a.get(semconv::SFAAS_CPU_MS).and_then(Value::as_i64).unwrap_or(0);
        nodes[index].cost += costs.get(&text_attr(&a, semconv::FAAS_INVOCATION_ID)).copied().unwrap_or_default();
    }
    nodes
}

async fn billing_kind(ui: &Ui) -> billing::period::PeriodKind {
    ui.state.billing.rate_card().await.map(|c| c.period).unwrap_or_default()
}

/// A node's box in the DAG, and the gaps between boxes.
const BOX_W: usize = 180;
const BOX_H: usize = 86;
const GAP_X: usize = 50;
const GAP_Y: usize = 18;
/// The critical path's colour.
const CRITICAL: &str = "#e8913a";

/// The DAG as SVG: columns by dependency depth, one box per node with its figures.
fn dag_svg(nodes: &[DagNode], critical: &[usize]) -> Markup {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let position = dag::layout(nodes);
    let columns = position.iter().map(|(column, _)| column + 1).max().unwrap_or(1);
    let rows = position.iter().map(|(_, row)| row + 1).max().unwrap_or(1);
    let (width, height) = (columns * (BOX_W + GAP_X) + 10, rows * (BOX_H + GAP_Y) + 10);
    let on_path: HashSet<usize> = critical.iter().copied().collect();
    let xy = |i: usize| (5 + position[i].0 * (BOX_W + GAP_X), 5 + position[i].1 * (BOX_H + GAP_Y));
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={ "0 0 " (width) " " (height) } font-family="sans-serif" font-size="11" {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto" {
                    path d="M0,0L10,5L0,10z" fill="currentColor" {}
                }
            }
            @for (i, node) in nodes.iter().enumerate() {
                @for need in &node.needs {
                    @if let Some(&j) = index.get(need.as_str()) {
                        (edge(xy(j), xy(i), on_path.contains(&i) && on_path.contains(&j)))
                    }
                }
            }
            @for (i, node) in nodes.iter().enumerate() {
                (node_box(node, xy(i), on_path.contains(&i)))
            }
        }
    }
}

/// An arrow from the box at `from` to the box at `to`.
fn edge(from: (usize, usize), to: (usize, usize), on_critical_path: bool) -> Markup {
    html! {
        line x1=(from.0 + BOX_W) y1=(from.1 + BOX_H / 2) x2=(to.0) y2=(to.1 + BOX_H / 2)
            stroke=(if on_critical_path { CRITICAL } else { "currentColor" })
            stroke-width=(if on_critical_path { 3 } else { 1 }) marker-end="url(#arrow)" {}
    }
}

/// A node's box at `(x, y)`: its id, duration, outcome, attempts, CPU, state and cost.
fn node_box(node: &DagNode, (x, y): (usize, usize), on_critical_path: bool) -> Markup {
    let fill = if node.failed { "rgba(196,49,75,.18)" } else { "rgba(47,126,216,.12)" };
    html! {
        g.node.critical[on_critical_path] data-node=(node.id) {
            rect x=(x) y=(y) width=(BOX_W) height=(BOX_H) rx="6" fill=(fill)
                stroke=(if on_critical_path { CRITICAL } else { "currentColor" })
                stroke-width=(if on_critical_path { 3 } else { 1 }) {}
            text x=(x + 8) y=(y + 18) font-weight="bold" fill="currentColor" { (node.id) }
            text x=(x + 8) y=(y + 36) fill="currentColor" {
                (format!("{:.1}", node.duration_ns() as f64 / 1e6)) " ms · "
                (if node.failed { "failed" } else { "ok" }) " · " (node.attempts) " attempt(s)"
            }
            text x=(x + 8) y=(y + 54) fill="currentColor" {
                "CPU " (node.cpu_ms) " ms · state " (node.state_bytes) " B"
            }
            text x=(x + 8) y=(y + 72) fill="currentColor" { "cost " (node.cost.round_dp(10)) }
        }
    }
}
