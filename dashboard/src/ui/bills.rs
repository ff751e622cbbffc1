//! Bills: the operators' tenants overview and reconciliation, a tenant's usage and invoices,
//! one invoice.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use billing::invoice::Line;
use contract::Viewer;
use maud::{Markup, PreEscaped, html};
use rust_decimal::Decimal;

use super::{Params, Ui, billing_error, page, url};
use crate::charts;

fn money(amount: Decimal, currency: &str) -> String {
    format!("{} {currency}", billing::plans::round_money(amount, currency))
}

/// Operators: this period's usage and charges per tenant.
pub(super) async fn tenants(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
    let viewer = match ui.viewer(&headers) {
        Ok(Viewer::Tenant(t)) => return Redirect::to(&format!("/ui/tenants/{}", url(&t))).into_response(),
        Ok(v) => v,
        Err(r) => return r,
    };
    let billing = &ui.state.billing;
    let period = match ui.current_period(&viewer).await {
        Ok(p) => params.period.clone().unwrap_or(p),
        Err(r) => return r,
    };
    let card = match billing.rate_card().await {
        Ok(c) => c,
        Err(e) => return billing_error(&viewer, e),
    };
    let assignments = billing.plan_assignments().await.unwrap_or_default();
    let invoices: HashMap<String, (String, Decimal)> = billing
        .invoices(None)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.period == period)
        .map(|i| (i.tenant, (i.status, i.total)))
        .collect();
    let mut rows = Vec::new();
    for tenant in billing.tenants().await.unwrap_or_default() {
        let usage = billing.usage_by_function(&tenant, &period).await.unwrap_or_default();
        let mut total = billing::usage::Totals::default();
        for t in usage.values() {
            total.add(t);
        }
        let plan = assignments.get(&tenant).and_then(|a| a.last()).map_or(card.default_plan.clone(), |a| a.1.clone());
        let (status, charge) = invoices.get(&tenant).cloned().unwrap_or(("—".into(), Decimal::ZERO));
        rows.push((tenant, plan, total, status, charge));
    }
    let sort = params.sort.as_deref().unwrap_or("charge");
    match sort {
        "tenant" => rows.sort_by(|a, b| a.0.cmp(&b.0)),
        "invocations" => rows.sort_by_key(|r| Reverse(r.2.invocations)),
        "cpu" => rows.sort_by_key(|r| Reverse(r.2.cpu_ms)),
        "state" => rows.sort_by_key(|r| Reverse(r.2.state_byte_seconds)),
        _ => rows.sort_by(|a, b| b.4.cmp(&a.4).then(a.0.cmp(&b.0))),
    }
    let sortable = |key: &str, label: &str, numeric: bool| {
        html! {
            th class=[numeric.then_some("n")] {
                a href={ "?sort=" (key) "&period=" (url(&period)) } { (label) }
                @if key == sort { " ▾" }
            }
        }
    };
    let body = html! {
        p.muted { "Period " (period) " (invoices are drafts until the period and its grace window are over)." }
        table #tenants {
            thead {
                tr {
                    (sortable("tenant", "tenant", false))
                    th { "plan" }
                    (sortable("invocations", "invocations", true))
                    (sortable("cpu", "CPU-ms", true))
                    (sortable("state", "state GB-s", true))
                    th { "invoice" }
                    (sortable("charge", "charges", true))
                }
            }
            tbody {
                @for (tenant, plan, total, status, charge) in &rows {
                    tr {
                        td { a href={ "/ui/tenants/" (url(tenant)) } { (tenant) } }
                        td { (plan) }
                        td.n { (total.invocations) }
                        td.n { (total.cpu_ms) }
                        td.n { ((total.state_byte_seconds / Decimal::from(1_000_000_000)).round_dp(6)) }
                        td { (status) }
                        td.n data-charge=(charge) { (money(*charge, card.currency())) }
                    }
                }
            }
        }
        @if rows.is_empty() {
            p.muted { "No tenant has usage yet." }
        }
    };
    page("Tenants", Some(&viewer), body).into_response()
}

/// One tenant: usage and cost over time, top functions by cost, invoices.
pub(super) async fn tenant(State(ui): State<Arc<Ui>>, headers: HeaderMap, Path(tenant): Path<String>) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, Some(&tenant)).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let billing = &ui.state.billing;
    let period = match ui.current_period(&viewer).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let card = match billing.rate_card().await {
        Ok(c) => c,
        Err(e) => return billing_error(&viewer, e),
    };
    let costs = ui.costs(&tenant, &period).await;
    // Per hour: invocations, and cumulative cost.
    let mut hours: BTreeMap<i64, (f64, Decimal)> = BTreeMap::new();
    let mut by_function: BTreeMap<String, (i64, i64, Decimal)> = BTreeMap::new();
    for record in costs.iter() {
        let hour = record.start_ns / 3_600_000_000_000 * 3600;
        let entry = hours.entry(hour).or_default();
        if record.kind == billing::usage::Kind::Invocation {
            entry.0 += 1.0;
        }
        entry.1 += record.cost;
        let name = if record.function.is_empty() { "(state)".to_string() } else { record.function.clone() };
        let f = by_function.entry(name).or_default();
        f.0 += i64::from(record.kind == billing::usage::Kind::Invocation);
        f.1 += record.cpu_ms;
        f.2 += record.cost;
    }
    let invocations: Vec<(i64, f64)> = hours.iter().map(|(h, (n, _))| (*h, *n)).collect();
    let mut cumulative = Decimal::ZERO;
    let cost: Vec<(i64, f64)> = hours
        .iter()
        .map(|(h, (_, c))| {
            cumulative += c;
            (*h, cumulative.to_string().parse().unwrap_or(0.0))
        })
        .collect();
    let mut top: Vec<_> = by_function.into_iter().collect();
    top.sort_by(|a, b| b.1.2.cmp(&a.1.2).then(a.0.cmp(&b.0)));
    let total_cost: Decimal = costs.iter().map(|c| c.cost).sum();
    let invoices = billing.invoices(Some(&tenant)).await.unwrap_or_default();
    // plotters escapes the text it draws.
    let invocations_chart = PreEscaped(charts::line("Invocations per hour", "invocations", &invocations));
    let cost_title = format!("Cost this period ({})", card.currency());
    let cost_chart = PreEscaped(charts::line(&cost_title, card.currency(), &cost));
    let body = html! {
        .cards {
            .card { "period" b { (period) } }
            .card {
                "invocations"
                b #invocations { (costs.iter().filter(|c| c.kind == billing::usage::Kind::Invocation).count()) }
            }
            .card {
                "usage cost (exact, before minimums)"
                b #usage-cost { (total_cost.round_dp(10).normalize()) " " (card.currency()) }
            }
        }
        .split {
            div { (invocations_chart) }
            div { (cost_chart) }
        }
        h2 { "Top functions by cost" }
        table #functions {
            thead {
                tr { th { "function" } th.n { "invocations" } th.n { "CPU-ms" } th.n { "cost" } }
            }
            tbody {
                @for (function, (invocations, cpu_ms, cost)) in top.iter().take(10) {
                    tr {
                        td { (function) }
                        td.n { (invocations) }
                        td.n { (cpu_ms) }
                        td.n { (cost.round_dp(10).normalize()) }
                    }
                }
            }
        }
        h2 { "Invoices" }
        table #invoices {
            thead {
                tr { th { "period" } th { "status" } th.n { "total" } }
            }
            tbody {
                @for invoice in &invoices {
                    tr {
                        td { a href={ "/ui/invoices/" (url(&tenant)) "/" (url(&invoice.period)) } { (invoice.period) } }
                        td { (invoice.status) }
                        td.n { (invoice.total) " " (invoice.currency) }
                    }
                }
            }
        }
        p {
            a href={ "/ui/functions?tenant=" (url(&tenant)) } { "Functions" }
            " · "
            a href={ "/ui/runs?tenant=" (url(&tenant)) } { "Flow runs" }
            " · "
            a href={ "/ui/traces?tenant=" (url(&tenant)) } { "Traces" }
        }
    };
    page(&format!("Tenant {tenant}"), Some(&viewer), body).into_response()
}

/// One invoice: its lines (adjustments marked), JSON and CSV downloads.
pub(super) async fn invoice(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path((tenant, period)): Path<(String, String)>,
) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, Some(&tenant)).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let (period, download) = match period.rsplit_once('.') {
        Some((p, ext)) if ext == "json" || ext == "csv" => (p.to_string(), Some(ext.to_string())),
        _ => (period, None),
    };
    let billing = &ui.state.billing;
    match download.as_deref() {
        Some("json") => {
            return match billing.invoice_document(&tenant, &period).await {
                Ok(doc) => ([(header::CONTENT_TYPE, "application/json")], doc).into_response(),
                Err(e) => billing_error(&viewer, e),
            };
        }
        Some(_) => {
            return match billing.invoice(&tenant, &period).await {
                Ok(inv) => {
                    let disposition = format!("attachment; filename=\"invoice-{tenant}-{period}.csv\"");
                    (
                        [
                            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                            (header::CONTENT_DISPOSITION, disposition),
                        ],
                        inv.to_csv(),
                    )
                        .into_response()
                }
                Err(e) => billing_error(&viewer, e),
            };
        }
        None => {}
    }
    let invoice = match billing.invoice(&tenant, &period).await {
        Ok(i) => i,
        Err(e) => return billing_error(&viewer, e),
    };
    let download = |ext: &str| html! { "/ui/invoices/" (url(&tenant)) "/" (url(&period)) "." (ext) };
    let body = html! {
        .cards {
            .card { "status" b #status { (invoice.status.as_str()) } }
            .card { "total" b #total { (invoice.total) " " (invoice.currency) } }
            .card { "period" b { (invoice.period_start[..10]) " – " (invoice.period_end[..10]) } }
        }
        p {
            a href=(download("json")) { "Download JSON" }
            " · "
            a href=(download("csv")) { "Download CSV" }
        }
        table #lines {
            thead {
                tr {
                    th { "kind" }
                    th { "usage period" }
                    th { "plan" }
                    th { "metric" }
                    th.n { "quantity" }
                    th { "unit" }
                    th.n { "free" }
                    th.n { "records" }
                    th.n { "exact amount" }
                    th.n { "amount" }
                }
            }
            tbody {
                @for line in &invoice.lines {
                    (invoice_line(line))
                }
            }
            tfoot {
                tr {
                    th colspan="9" { "total" }
                    th.n { (invoice.total) " " (invoice.currency) }
                }
            }
        }
    };
    page(&format!("Invoice {tenant} {period}"), Some(&viewer), body).into_response()
}

fn invoice_line(line: &Line) -> Markup {
    let kind = serde_json::to_value(line.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    html! {
        tr class=[(kind == "adjustment").then_some("bad")] {
            td { (kind) }
            td { (line.usage_period) }
            td { (line.plan) }
            td { (line.metric.map_or("—", |m| m.name())) }
            td.n { (line.quantity) }
            td { (line.unit) }
            td.n { (line.free) }
            td.n { (line.records) }
            td.n { (line.amount_exact) }
            td.n { (line.amount) }
        }
    }
}

/// Operators: metered invocations against the gateway's counters.
pub(super) async fn reconciliation(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let viewer = match ui.viewer(&headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let period = match ui.current_period(&viewer).await {
        Ok(p) => params.period.clone().unwrap_or(p),
        Err(r) => return r,
    };
    let tenant = match &viewer {
        Viewer::Admin => params.tenant.clone().filter(|t| !t.is_empty()),
        Viewer::Tenant(t) => Some(t.clone()),
    };
    let rows = match ui.state.billing.reconcile(&period, tenant.as_deref()).await {
        Ok(r) => r,
        Err(e) => return billing_error(&viewer, e),
    };
    let warnings = rows.iter().filter(|r| r.difference != 0).count();
    let body = html! {
        p #summary class=(if warnings > 0 { "bad" } else { "good" }) {
            (warnings) " of " (rows.len()) " function(s) differ in " (period) "."
        }
        table #reconciliation {
            thead {
                tr {
                    th { "tenant" }
                    th { "function" }
                    th.n { "metered" }
                    th.n { "gateway counted" }
                    th.n { "difference" }
                }
            }
            tbody {
                @for row in &rows {
                    tr class=[(row.difference != 0).then_some("bad")] {
                        td { (row.tenant) }
                        td { (row.function) }
                        td.n { (row.metered) }
                        td.n { (row.counted) }
                        td.n { (format!("{:+}", row.difference)) }
                    }
                }
            }
        }
        p.muted {
            "A positive difference: invocations the gateway served that were never metered. Differences of a \
             scrape interval's worth at period edges are expected."
        }
    };
    page("Reconciliation", Some(&viewer), body).into_response()
}
