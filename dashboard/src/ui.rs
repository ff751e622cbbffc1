//! The server-rendered web UI: bills for operators, functions, flow runs and DAG traces for
//! developers. No JavaScript at all: HTML and CSS written here, charts as SVG from plotters
//! (`charts.rs`), the DAG drawn as SVG by hand.
//!
//! Sign-in takes a token (the admin token, or a tenant's read token) once and sets a session
//! cookie (`HttpOnly`, `SameSite=Strict`, 12 hours; sessions live in memory, so a restart signs
//! everyone out). A request may also carry `Authorization` instead. A tenant sees only its own
//! namespace: every page names its tenant, and another tenant's gets 403.

// Page handlers return early with a ready response (a redirect to sign in, 403, 404).
#![allow(clippy::result_large_err)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use billing::RecordCost;
use billing::period::{Period, rfc3339};
use billing::usage::UsageRecord;
use collector::model::SpanRow;
use contract::{Viewer, semconv};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;

use crate::dag::{self, DagNode, critical_path};
use crate::{DashboardState, charts};

const COOKIE: &str = "sfaas_session";
const SESSION_HOURS: u64 = 12;
/// Sessions one viewer (the admin, or one tenant's readers) may hold at once; signing in
/// beyond them ends the viewer's oldest.
const SESSIONS_PER_VIEWER: usize = 64;

/// What the UI needs beyond the shared state.
#[derive(Debug, Clone, Default)]
pub struct UiConfig {
    /// The collector's own `/metrics` (for the health page), when one is known.
    pub collector_metrics_url: Option<String>,
}

struct Ui {
    state: DashboardState,
    config: UiConfig,
    sessions: Mutex<HashMap<String, (Viewer, Instant)>>,
    /// The collector's counters, sampled every 10 s for the last hour.
    health: Mutex<VecDeque<HealthSample>>,
    /// Per-invocation costs and records of recently viewed (tenant, period)s, valid while
    /// billing's version stays the same.
    costs: Cache<RecordCost>,
    records: Cache<UsageRecord>,
}

/// Per (tenant, period): the billing version it was computed at, and the rows.
type Cache<T> = Mutex<HashMap<(String, String), (u64, Arc<Vec<T>>)>>;

/// (tenant, period)s kept in each cache.
const CACHED: usize = 8;

#[derive(Debug, Clone, Default)]
struct HealthSample {
    at: i64,
    accepted: f64,
    rejected: BTreeMap<String, f64>,
    queue_depth: f64,
    commit_seconds_sum: f64,
    commits: f64,
}

pub fn router(state: DashboardState, config: UiConfig) -> Router {
    let ui = Arc::new(Ui {
        state,
        config,
        sessions: Mutex::default(),
        health: Mutex::default(),
        costs: Mutex::default(),
        records: Mutex::default(),
    });
    if ui.config.collector_metrics_url.is_some() {
        tokio::spawn(sample_health(Arc::downgrade(&ui)));
    }
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/favicon.svg", get(favicon))
        .route("/logout", axum::routing::post(logout))
        .route("/ui/tenants", get(tenants))
        .route("/ui/tenants/{tenant}", get(tenant))
        .route("/ui/invoices/{tenant}/{period}", get(invoice))
        .route("/ui/reconciliation", get(reconciliation))
        .route("/ui/health", get(health))
        .route("/ui/functions", get(functions))
        .route("/ui/runs", get(runs))
        .route("/ui/runs/{tenant}/{run_id}", get(run))
        .route("/ui/traces", get(traces))
        .route("/ui/traces/{tenant}/{trace_id}", get(trace))
        .with_state(ui)
}

/// HTML escaping for text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string component.
pub(crate) fn url(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const STYLE: &str = "
:root { color-scheme: light dark; --fg: #1d232b; --bg: #ffffff; --muted: #5d6b7a; --line: #d9dee4;
        --accent: #2f7ed8; --bad: #c4314b; --good: #1f8a4c; --card: #f6f8fa; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e9ed; --bg: #14181d; --muted: #9aa7b4; --line: #2c333b; --accent: #5aa2f0;
          --bad: #f0697f; --good: #4cc38a; --card: #1b2027; } }
body { font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 0; }
header { display: flex; gap: 1.2em; align-items: center; padding: .6em 1.2em; border-bottom: 1px solid var(--line); }
header nav a { margin-right: .9em; } header form { margin-left: auto; }
main { padding: 1em 1.2em; max-width: 1200px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: .6em 0 1.2em; }
th, td { border-bottom: 1px solid var(--line); padding: .3em .8em; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: var(--muted); } .bad { color: var(--bad); } .good { color: var(--good); }
.cards { display: flex; gap: 1em; flex-wrap: wrap; } .card { background: var(--card); padding: .6em 1em; border-radius: 6px; }
.card b { display: block; font-size: 1.4em; }
svg.chart, svg.dag { color: var(--fg); max-width: 100%; height: auto; }
.split { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1.2em; }
.bar { position: relative; height: 16px; background: var(--card); }
.bar span { position: absolute; top: 2px; height: 12px; background: var(--accent); border-radius: 2px; }
.bar span.error { background: var(--bad); }
input, select, button { font: inherit; padding: .25em .5em; }
form.filters { display: flex; gap: .6em; flex-wrap: wrap; align-items: end; margin: .4em 0 1em; }
form.filters label { display: flex; flex-direction: column; font-size: .85em; color: var(--muted); }
";

fn page(title: &str, viewer: Option<&Viewer>, body: &str) -> Html<String> {
    let nav = match viewer {
        Some(Viewer::Admin) => "<nav><a href=\"/ui/tenants\">Tenants</a><a href=\"/ui/reconciliation\">Reconciliation</a>\
             <a href=\"/ui/health\">Collector</a><a href=\"/ui/functions\">Functions</a><a href=\"/ui/runs\">Flow runs</a>\
             <a href=\"/ui/traces\">Traces</a></nav>"
            .to_string(),
        Some(Viewer::Tenant(t)) => format!(
            "<nav><a href=\"/ui/tenants/{t}\">Bills</a><a href=\"/ui/functions\">Functions</a>\
             <a href=\"/ui/runs\">Flow runs</a><a href=\"/ui/traces\">Traces</a></nav><span class=\"muted\">tenant {t}</span>",
            t = esc(t)
        ),
        None => String::new(),
    };
    let logout =
        if viewer.is_some() { "<form method=\"post\" action=\"/logout\"><button>Sign out</button></form>" } else { "" };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width\"><link rel=\"icon\" href=\"/favicon.svg\"><title>{title} · stateful-faas</title><style>{STYLE}</style></head><body>\
         <header><strong>stateful-faas</strong>{nav}{logout}</header><main><h1>{title}</h1>{body}</main></body></html>",
        title = esc(title)
    ))
}

fn error_page(status: StatusCode, viewer: Option<&Viewer>, message: &str) -> Response {
    (status, page(status.canonical_reason().unwrap_or("Error"), viewer, &format!("<p>{}</p>", esc(message))))
        .into_response()
}

impl Ui {
    /// The signed-in viewer (session cookie, or an `Authorization` header), else a redirect to
    /// the sign-in page.
    fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, Response> {
        if let Some(id) = cookie(headers, COOKIE) {
            let sessions = self.sessions.lock().unwrap();
            if let Some((viewer, at)) = sessions.get(&id)
                && at.elapsed() < Duration::from_secs(SESSION_HOURS * 3600)
            {
                return Ok(viewer.clone());
            }
        }
        if headers.contains_key(header::AUTHORIZATION) {
            return self.state.viewer(headers).map_err(|e| error_page(e.0, None, &e.1));
        }
        Err(Redirect::to("/login").into_response())
    }

    /// The viewer and the tenant a page is about, or the response that refuses the page.
    async fn signed_in(&self, headers: &HeaderMap, asked: Option<&str>) -> Result<(Viewer, String), Response> {
        let viewer = self.viewer(headers)?;
        let tenant = self.tenant(&viewer, asked).await?;
        Ok((viewer, tenant))
    }

    /// The tenant a page is about: a tenant viewer's own (asking for another is 403); for the
    /// admin, the one asked for, else the first tenant.
    async fn tenant(&self, viewer: &Viewer, asked: Option<&str>) -> Result<String, Response> {
        match (viewer, asked.filter(|t| !t.is_empty())) {
            (Viewer::Tenant(own), None) => Ok(own.clone()),
            (Viewer::Tenant(own), Some(asked)) if asked == own => Ok(own.clone()),
            (Viewer::Tenant(_), Some(asked)) => Err(error_page(
                StatusCode::FORBIDDEN,
                Some(viewer),
                &format!("this sign-in cannot see tenant {asked:?}"),
            )),
            (Viewer::Admin, Some(asked)) => Ok(asked.to_string()),
            (Viewer::Admin, None) => {
                let tenants = self.state.billing.tenants().await.map_err(|e| internal(viewer, e))?;
                Ok(tenants.into_iter().next().unwrap_or_default())
            }
        }
    }

    /// Per-invocation costs of a tenant's invoice for `period`, computed once per billing change.
    async fn costs(&self, tenant: &str, period: &str) -> Arc<Vec<RecordCost>> {
        let version = self.state.billing.version().await;
        let key = (tenant.to_string(), period.to_string());
        if let Some((v, costs)) = self.costs.lock().unwrap().get(&key)
            && *v == version
        {
            return costs.clone();
        }
        let costs = Arc::new(self.state.billing.invocation_costs(tenant, period).await.unwrap_or_default());
        let mut cache = self.costs.lock().unwrap();
        if cache.len() >= CACHED {
            cache.clear();
        }
        cache.insert(key, (version, costs.clone()));
        costs
    }

    /// Usage records of a tenant's period, read once per billing change.
    async fn records(&self, tenant: &str, period: &str) -> Arc<Vec<UsageRecord>> {
        let version = self.state.billing.version().await;
        let key = (tenant.to_string(), period.to_string());
        if let Some((v, records)) = self.records.lock().unwrap().get(&key)
            && *v == version
        {
            return records.clone();
        }
        let records = Arc::new(self.state.billing.records(tenant, period).await.unwrap_or_default());
        let mut cache = self.records.lock().unwrap();
        if cache.len() >= CACHED {
            cache.clear();
        }
        cache.insert(key, (version, records.clone()));
        records
    }

    async fn current_period(&self, viewer: &Viewer) -> Result<String, Response> {
        let card = self.state.billing.rate_card().await.map_err(|e| internal(viewer, e))?;
        Ok(Period::containing(card.period, self.state.store.clock().now_ns()).key())
    }
}

fn internal(viewer: &Viewer, error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "dashboard page failed");
    error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(viewer), &error.to_string())
}

fn billing_error(viewer: &Viewer, error: billing::BillingError) -> Response {
    let api: billing::api::ApiError = error.into();
    if api.0.is_server_error() {
        tracing::error!(error = %api.1, "a dashboard page failed");
    }
    error_page(api.0, Some(viewer), &api.1)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.to_string())
    })
}

async fn favicon() -> Response {
    let svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" \
               fill=\"#2f7ed8\"/><path d=\"M4 11l3-6 2 4 3-5\" stroke=\"#fff\" stroke-width=\"1.6\" fill=\"none\"/></svg>";
    ([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "max-age=86400")], svg).into_response()
}

async fn home(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    match ui.viewer(&headers) {
        Ok(Viewer::Admin) => Redirect::to("/ui/tenants").into_response(),
        Ok(Viewer::Tenant(t)) => Redirect::to(&format!("/ui/tenants/{}", url(&t))).into_response(),
        Err(response) => response,
    }
}

fn login_page(message: Option<&str>) -> Html<String> {
    let message = message.map_or(String::new(), |m| format!("<p class=\"bad\">{}</p>", esc(m)));
    page(
        "Sign in",
        None,
        &format!(
            "{message}<form method=\"post\" action=\"/login\"><p><label>Token (admin, or a tenant's read token)<br>\
             <input type=\"password\" name=\"token\" size=\"70\" autocomplete=\"off\" autofocus required></label></p>\
             <p><button type=\"submit\">Sign in</button></p></form>"
        ),
    )
}

async fn login_form() -> Html<String> {
    login_page(None)
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(ui): State<Arc<Ui>>, Form(form): Form<Login>) -> Response {
    let Some(viewer) = ui.state.resolver.resolve(form.token.trim()) else {
        return (StatusCode::UNAUTHORIZED, login_page(Some("That token is not an admin or read token.")))
            .into_response();
    };
    let id = match session_id() {
        Ok(id) => id,
        Err(error) => {
            tracing::error!(%error, "no random bytes for a session id");
            let message = "cannot sign in now: the server has no random bytes for a session (it is in its log)";
            return error_page(StatusCode::INTERNAL_SERVER_ERROR, None, message);
        }
    };
    let mut sessions = ui.sessions.lock().unwrap();
    // Expired sessions go, and a viewer keeps its newest few: signing in again and again with
    // one token neither grows the table nor signs anyone else out.
    sessions.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(SESSION_HOURS * 3600));
    let mut own: Vec<(Instant, String)> =
        sessions.iter().filter(|(_, (v, _))| *v == viewer).map(|(id, (_, at))| (*at, id.clone())).collect();
    if own.len() >= SESSIONS_PER_VIEWER {
        own.sort();
        for (_, old) in &own[..=own.len() - SESSIONS_PER_VIEWER] {
            sessions.remove(old);
        }
    }
    sessions.insert(id.clone(), (viewer, Instant::now()));
    drop(sessions);
    let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_HOURS * 3600);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        ui.sessions.lock().unwrap().remove(&id);
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// 256 random bits from the kernel, as hex; an error rather than a guessable id.
fn session_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn money(amount: Decimal, currency: &str) -> String {
    format!("{} {currency}", billing::plans::round_money(amount, currency))
}

#[derive(Deserialize, Default)]
struct Params {
    tenant: Option<String>,
    period: Option<String>,
    sort: Option<String>,
    flow: Option<String>,
    status: Option<String>,
    function: Option<String>,
    min_ms: Option<String>,
    max_ms: Option<String>,
    attr: Option<String>,
    hours: Option<String>,
    trace: Option<String>,
}

/// Operators: this period's usage and charges per tenant.
async fn tenants(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
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
        let class = if numeric { " class=\"n\"" } else { "" };
        let mark = if key == sort { " ▾" } else { "" };
        format!("<th{class}><a href=\"?sort={key}&period={}\">{label}</a>{mark}</th>", url(&period))
    };
    let mut body = format!(
        "<p class=\"muted\">Period {} (invoices are drafts until the period and its grace window are over).</p>\
         <table id=\"tenants\"><thead><tr>{}<th>plan</th>{}{}{}<th>invoice</th>{}</tr></thead><tbody>",
        esc(&period),
        sortable("tenant", "tenant", false),
        sortable("invocations", "invocations", true),
        sortable("cpu", "CPU-ms", true),
        sortable("state", "state GB-s", true),
        sortable("charge", "charges", true),
    );
    for (tenant, plan, total, status, charge) in &rows {
        let _ = write!(
            body,
            "<tr><td><a href=\"/ui/tenants/{u}\">{t}</a></td><td>{plan}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td>{status}</td><td class=\"n\" data-charge=\"{charge}\">{}</td></tr>",
            total.invocations,
            total.cpu_ms,
            (total.state_byte_seconds / Decimal::from(1_000_000_000)).round_dp(6),
            money(*charge, card.currency()),
            u = url(tenant),
            t = esc(tenant),
            plan = esc(plan),
            status = esc(status),
        );
    }
    body.push_str("</tbody></table>");
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">No tenant has usage yet.</p>");
    }
    page("Tenants", Some(&viewer), &body).into_response()
}

/// One tenant: usage and cost over time, top functions by cost, invoices.
async fn tenant(State(ui): State<Arc<Ui>>, headers: HeaderMap, Path(tenant): Path<String>) -> Response {
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
    let mut body = format!(
        "<div class=\"cards\"><div class=\"card\">period<b>{}</b></div><div class=\"card\">invocations<b id=\"invocations\">{}</b></div>\
         <div class=\"card\">usage cost (exact, before minimums)<b id=\"usage-cost\">{}</b></div></div>\
         <div class=\"split\"><div>{}</div><div>{}</div></div><h2>Top functions by cost</h2>\
         <table id=\"functions\"><thead><tr><th>function</th><th class=\"n\">invocations</th><th class=\"n\">CPU-ms</th>\
         <th class=\"n\">cost</th></tr></thead><tbody>",
        esc(&period),
        costs.iter().filter(|c| c.kind == billing::usage::Kind::Invocation).count(),
        esc(&format!("{} {}", total_cost.round_dp(10).normalize(), card.currency())),
        charts::line("Invocations per hour", "invocations", &invocations),
        charts::line(&format!("Cost this period ({})", card.currency()), card.currency(), &cost),
    );
    for (function, (n, cpu, cost)) in top.iter().take(10) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"n\">{n}</td><td class=\"n\">{cpu}</td><td class=\"n\">{}</td></tr>",
            esc(function),
            cost.round_dp(10).normalize()
        );
    }
    body.push_str("</tbody></table><h2>Invoices</h2><table id=\"invoices\"><thead><tr><th>period</th><th>status</th><th class=\"n\">total</th></tr></thead><tbody>");
    for invoice in billing.invoices(Some(&tenant)).await.unwrap_or_default() {
        let _ = write!(
            body,
            "<tr><td><a href=\"/ui/invoices/{}/{}\">{}</a></td><td>{}</td><td class=\"n\">{}</td></tr>",
            url(&tenant),
            url(&invoice.period),
            esc(&invoice.period),
            esc(&invoice.status),
            esc(&format!("{} {}", invoice.total, invoice.currency))
        );
    }
    body.push_str("</tbody></table>");
    let _ = write!(
        body,
        "<p><a href=\"/ui/functions?tenant={t}\">Functions</a> · <a href=\"/ui/runs?tenant={t}\">Flow runs</a> · \
         <a href=\"/ui/traces?tenant={t}\">Traces</a></p>",
        t = url(&tenant)
    );
    page(&format!("Tenant {tenant}"), Some(&viewer), &body).into_response()
}

/// One invoice: its lines (adjustments marked), JSON and CSV downloads.
async fn invoice(
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
    let mut body = format!(
        "<div class=\"cards\"><div class=\"card\">status<b id=\"status\">{}</b></div><div class=\"card\">total<b id=\"total\">{} {}</b></div>\
         <div class=\"card\">period<b>{} – {}</b></div></div>\
         <p><a href=\"/ui/invoices/{u}/{p}.json\">Download JSON</a> · <a href=\"/ui/invoices/{u}/{p}.csv\">Download CSV</a></p>\
         <table id=\"lines\"><thead><tr><th>kind</th><th>usage period</th><th>plan</th><th>metric</th><th class=\"n\">quantity</th>\
         <th>unit</th><th class=\"n\">free</th><th class=\"n\">records</th><th class=\"n\">exact amount</th><th class=\"n\">amount</th></tr></thead><tbody>",
        invoice.status.as_str(),
        invoice.total,
        esc(&invoice.currency),
        esc(&invoice.period_start[..10]),
        esc(&invoice.period_end[..10]),
        u = url(&tenant),
        p = url(&period),
    );
    for line in &invoice.lines {
        let kind =
            serde_json::to_value(line.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let class = if kind == "adjustment" { " class=\"bad\"" } else { "" };
        let _ = write!(
            body,
            "<tr{class}><td>{kind}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&line.usage_period),
            esc(&line.plan),
            line.metric.map_or("—", |m| m.name()),
            line.quantity,
            esc(&line.unit),
            line.free,
            line.records,
            line.amount_exact,
            line.amount
        );
    }
    let _ = write!(
        body,
        "</tbody><tfoot><tr><th colspan=\"9\">total</th><th class=\"n\">{} {}</th></tr></tfoot></table>",
        invoice.total,
        esc(&invoice.currency)
    );
    page(&format!("Invoice {tenant} {period}"), Some(&viewer), &body).into_response()
}

/// Operators: metered invocations against the gateway's counters.
async fn reconciliation(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
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
    let mut body = format!(
        "<p id=\"summary\" class=\"{}\">{warnings} of {} function(s) differ in {}.</p>\
         <table id=\"reconciliation\"><thead><tr><th>tenant</th><th>function</th><th class=\"n\">metered</th>\
         <th class=\"n\">gateway counted</th><th class=\"n\">difference</th></tr></thead><tbody>",
        if warnings > 0 { "bad" } else { "good" },
        rows.len(),
        esc(&period)
    );
    for row in &rows {
        let class = if row.difference != 0 { " class=\"bad\"" } else { "" };
        let _ = write!(
            body,
            "<tr{class}><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:+}</td></tr>",
            esc(&row.tenant),
            esc(&row.function),
            row.metered,
            row.counted,
            row.difference
        );
    }
    body.push_str(
        "</tbody></table><p class=\"muted\">A positive difference: invocations the gateway served that were never \
         metered. Differences of a scrape interval's worth at period edges are expected.</p>",
    );
    page("Reconciliation", Some(&viewer), &body).into_response()
}

/// Scrapes the collector's counters every 10 s (the last hour is kept).
async fn sample_health(ui: std::sync::Weak<Ui>) {
    let http = |url: &str| {
        let url = url.to_string();
        async move { crate::http_get(&url, None).await.filter(|r| r.0 == 200).map(|r| r.1) }
    };
    loop {
        let Some(strong) = ui.upgrade() else { return };
        let url = strong.config.collector_metrics_url.clone().unwrap_or_default();
        drop(strong);
        if let Some(sample) = http(&url).await.map(|text| parse_health(&text)) {
            let Some(strong) = ui.upgrade() else { return };
            let mut health = strong.health.lock().unwrap();
            health.push_back(sample);
            while health.len() > 360 {
                health.pop_front();
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

fn parse_health(text: &str) -> HealthSample {
    let mut sample = HealthSample { at: chrono::Utc::now().timestamp(), ..HealthSample::default() };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let name = series.split('{').next().unwrap_or_default();
        match name {
            "sfaas_collector_accepted_total" => sample.accepted += value,
            "sfaas_collector_rejected_total" => {
                let reason = series.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
                *sample.rejected.entry(reason.to_string()).or_default() += value;
            }
            "sfaas_collector_queue_depth" => sample.queue_depth = value,
            "sfaas_collector_commit_seconds_sum" => sample.commit_seconds_sum = value,
            "sfaas_collector_commit_seconds_count" => sample.commits = value,
            _ => {}
        }
    }
    sample
}

/// Operators: the collector's ingest rate, refusals by reason, queue depth, commit latency.
async fn health(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    let viewer = match ui.viewer(&headers) {
        Ok(v @ Viewer::Admin) => v,
        Ok(v) => return error_page(StatusCode::FORBIDDEN, Some(&v), "the collector's health is for operators"),
        Err(r) => return r,
    };
    let Some(url) = &ui.config.collector_metrics_url else {
        return page("Collector", Some(&viewer), "<p>No collector is known to this dashboard.</p>").into_response();
    };
    // A fresh reading now, beside the last hour's.
    let now = crate::http_get(url, None).await.filter(|r| r.0 == 200).map(|r| parse_health(&r.1));
    let samples: Vec<HealthSample> = ui.health.lock().unwrap().iter().cloned().chain(now.clone()).collect();
    let rate: Vec<(i64, f64)> = samples
        .windows(2)
        .filter(|w| w[1].at > w[0].at)
        .map(|w| (w[1].at, ((w[1].accepted - w[0].accepted) / (w[1].at - w[0].at) as f64).max(0.0)))
        .collect();
    let Some(latest) = now.or_else(|| samples.last().cloned()) else {
        return page("Collector", Some(&viewer), "<p class=\"bad\">The collector does not answer.</p>").into_response();
    };
    let latency_ms = if latest.commits > 0.0 { latest.commit_seconds_sum / latest.commits * 1000.0 } else { 0.0 };
    let mut body = format!(
        "<div class=\"cards\"><div class=\"card\">items accepted<b id=\"accepted\">{}</b></div>\
         <div class=\"card\">queue depth<b id=\"queue\">{}</b></div><div class=\"card\">mean commit<b>{latency_ms:.1} ms</b></div></div>{}\
         <h2>Refused, by reason</h2><table id=\"rejected\"><tbody>",
        latest.accepted,
        latest.queue_depth,
        charts::line("Ingest rate (items/s)", "items/s", &rate),
    );
    for (reason, count) in &latest.rejected {
        let _ = write!(body, "<tr><td>{}</td><td class=\"n\">{count}</td></tr>", esc(reason));
    }
    if latest.rejected.is_empty() {
        body.push_str("<tr><td class=\"muted\">nothing refused</td></tr>");
    }
    body.push_str("</tbody></table>");
    page("Collector", Some(&viewer), &body).into_response()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn tenant_form(viewer: &Viewer, tenant: &str, extra: &str) -> String {
    let tenant_field = match viewer {
        Viewer::Admin => format!("<label>tenant<input name=\"tenant\" value=\"{}\"></label>", esc(tenant)),
        Viewer::Tenant(_) => String::new(),
    };
    format!("<form class=\"filters\" method=\"get\">{tenant_field}{extra}<button>Show</button></form>")
}

/// Developers: per function, this period.
async fn functions(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
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
    struct Row {
        latencies: Vec<f64>,
        errors: i64,
        cpu: i64,
        cost: Decimal,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut all = Vec::new();
    for r in records.iter().filter(|r| r.kind == billing::usage::Kind::Invocation) {
        let row = rows.entry(r.function.clone()).or_insert(Row {
            latencies: Vec::new(),
            errors: 0,
            cpu: 0,
            cost: Decimal::ZERO,
        });
        row.latencies.push(r.wall_ms as f64);
        all.push(r.wall_ms as f64);
        row.errors += i64::from(r.status_code >= 500);
        row.cpu += r.cpu_ms;
        row.cost += costs.get(r.usage_id.as_str()).copied().unwrap_or_default();
    }
    let mut body = tenant_form(&viewer, &tenant, "");
    let _ = write!(
        body,
        "<p class=\"muted\">Tenant {}, period {}. Latency is the wall time the gateway measured.</p>\
         <table id=\"functions\"><thead><tr><th>function</th><th class=\"n\">invocations</th><th class=\"n\">errors</th>\
         <th class=\"n\">p50 ms</th><th class=\"n\">p95 ms</th><th class=\"n\">p99 ms</th><th class=\"n\">CPU-ms</th>\
         <th class=\"n\">cost</th></tr></thead><tbody>",
        esc(&tenant),
        esc(&period)
    );
    for (function, row) in rows.iter_mut() {
        row.latencies.sort_by(f64::total_cmp);
        let _ = write!(
            body,
            "<tr><td><a href=\"/ui/traces?tenant={}&function={}\">{}</a></td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            url(&tenant),
            url(function),
            esc(function),
            row.latencies.len(),
            row.errors,
            percentile(&row.latencies, 0.5),
            percentile(&row.latencies, 0.95),
            percentile(&row.latencies, 0.99),
            row.cpu,
            row.cost.round_dp(8)
        );
    }
    body.push_str("</tbody></table>");
    body.push_str(&charts::histogram("Latency, all functions", "ms", &all, 20));
    page("Functions", Some(&viewer), &body).into_response()
}

fn attributes(span: &SpanRow) -> serde_json::Map<String, Value> {
    serde_json::from_str(&span.attributes).unwrap_or_default()
}

fn text_attr(attributes: &serde_json::Map<String, Value>, key: &str) -> String {
    match attributes.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The window a page shows: `hours` (default a week) up to a minute past `now`.
fn lookback(params: &Params, now: i64) -> (i64, i64) {
    let hours: i64 = params.hours.as_deref().and_then(|h| h.parse().ok()).unwrap_or(24 * 7).clamp(1, 24 * 400);
    (now.saturating_sub(hours * 3_600_000_000_000), now.saturating_add(60_000_000_000))
}

/// Developers: flow runs, filtered by flow, status and time.
async fn runs(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
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
    let mut body = tenant_form(
        &viewer,
        &tenant,
        &format!(
            "<label>flow<input name=\"flow\" value=\"{}\"></label><label>status<select name=\"status\">{}</select></label>\
             <label>last hours<input name=\"hours\" size=\"5\" value=\"{}\"></label>",
            esc(&flow_filter),
            ["", "succeeded", "failed", "cancelled"]
                .iter()
                .map(|s| format!("<option{}>{s}</option>", if *s == status_filter { " selected" } else { "" }))
                .collect::<String>(),
            (until - since) / 3_600_000_000_000
        ),
    );
    body.push_str(
        "<table id=\"runs\"><thead><tr><th>run</th><th>flow</th><th>status</th><th>started</th>\
         <th class=\"n\">duration ms</th><th class=\"n\">state byte-s</th><th class=\"n\">cost (this period)</th></tr></thead><tbody>",
    );
    let mut shown = 0;
    for span in &spans {
        let a = attributes(span);
        let flow = text_attr(&a, semconv::SFAAS_FLOW_NAME);
        let status = text_attr(&a, semconv::SFAAS_FLOW_STATUS);
        if (!flow_filter.is_empty() && flow != flow_filter) || (!status_filter.is_empty() && status != status_filter) {
            continue;
        }
        let run_id = text_attr(&a, semconv::SFAAS_FLOW_RUN_ID);
        shown += 1;
        let _ = write!(
            body,
            "<tr><td><a href=\"/ui/runs/{}/{}?trace={}\">{}</a></td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td class=\"n\">{:.1}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            url(&tenant),
            url(&run_id),
            url(&span.trace_id),
            esc(&run_id),
            esc(&flow),
            if status == "failed" { "bad" } else { "" },
            esc(&status),
            esc(&rfc3339(span.start_ns)),
            span.duration_ns() as f64 / 1e6,
            esc(&text_attr(&a, semconv::SFAAS_STATE_BYTE_SECONDS)),
            run_costs.get(&run_id).map_or("—".into(), |c| c.round_dp(8).to_string())
        );
    }
    body.push_str("</tbody></table>");
    if shown == 0 {
        body.push_str("<p class=\"muted\">No flow runs match.</p>");
    }
    page("Flow runs", Some(&viewer), &body).into_response()
}

/// Developers: a flow run's trace as its DAG (critical path highlighted) beside the waterfall.
async fn run(
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
    let flow = &flow;
    let period = Period::containing(billing_kind(&ui).await, flow.start_ns).key();
    let costs: HashMap<String, Decimal> = ui
        .costs(&tenant, &period)
        .await
        .iter()
        .filter(|c| c.flow_run.as_deref() == Some(run_id.as_str()))
        .map(|c| (c.usage_id.clone(), c.cost))
        .collect();
    // Nodes: `node <id>` spans of the run; their `invoke` children carry CPU and cost.
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
    let critical = critical_path(&nodes);
    let a = attributes(flow);
    let total_cost: Decimal = costs.values().copied().sum();
    let mut body = format!(
        "<div class=\"cards\"><div class=\"card\">flow<b>{}</b></div><div class=\"card\">status<b id=\"run-status\">{}</b></div>\
         <div class=\"card\">duration<b>{:.1} ms</b></div><div class=\"card\">nodes<b id=\"node-count\">{}</b></div>\
         <div class=\"card\">state byte-s<b>{}</b></div><div class=\"card\">cost<b id=\"run-cost\">{}</b></div></div>\
         <p class=\"muted\">Critical path (longest chain of node durations): {}</p>",
        esc(&text_attr(&a, semconv::SFAAS_FLOW_NAME)),
        esc(&text_attr(&a, semconv::SFAAS_FLOW_STATUS)),
        flow.duration_ns() as f64 / 1e6,
        nodes.len(),
        esc(&text_attr(&a, semconv::SFAAS_STATE_BYTE_SECONDS)),
        total_cost.round_dp(10),
        esc(&critical.iter().map(|&i| nodes[i].id.as_str()).collect::<Vec<_>>().join(" → "))
    );
    let _ = write!(
        body,
        "<div class=\"split\"><div>{}</div><div>{}</div></div>",
        dag_svg(&nodes, &critical),
        waterfall(&spans)
    );
    let _ = write!(body, "<p><a href=\"/ui/traces/{}/{}\">The whole trace</a></p>", url(&tenant), url(&flow.trace_id));
    page(&format!("Flow run {run_id}"), Some(&viewer), &body).into_response()
}

async fn billing_kind(ui: &Ui) -> billing::period::PeriodKind {
    ui.state.billing.rate_card().await.map(|c| c.period).unwrap_or_default()
}

/// The DAG as SVG: columns by dependency depth, one box per node with its figures.
fn dag_svg(nodes: &[DagNode], critical: &[usize]) -> String {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let position = dag::layout(nodes);
    let (box_w, box_h, gap_x, gap_y) = (180, 86, 50, 18);
    let columns = position.iter().map(|(column, _)| column + 1).max().unwrap_or(1);
    let rows = position.iter().map(|(_, row)| row + 1).max().unwrap_or(1);
    let (width, height) = (columns * (box_w + gap_x) + 10, rows * (box_h + gap_y) + 10);
    let on_path: std::collections::HashSet<usize> = critical.iter().copied().collect();
    let xy = |i: usize| (5 + position[i].0 * (box_w + gap_x), 5 + position[i].1 * (box_h + gap_y));
    let mut svg = format!(
        "<svg class=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"sans-serif\" font-size=\"11\"><defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" \
         markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0L10,5L0,10z\" fill=\"currentColor\"/></marker></defs>"
    );
    for (i, node) in nodes.iter().enumerate() {
        for need in &node.needs {
            if let Some(&j) = index.get(need.as_str()) {
                let ((x1, y1), (x2, y2)) = (xy(j), xy(i));
                let critical_edge = on_path.contains(&i) && on_path.contains(&j);
                let _ = write!(
                    svg,
                    "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"{}\" marker-end=\"url(#arrow)\"/>",
                    x1 + box_w,
                    y1 + box_h / 2,
                    x2,
                    y2 + box_h / 2,
                    if critical_edge { "#e8913a" } else { "currentColor" },
                    if critical_edge { 3 } else { 1 }
                );
            }
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let (x, y) = xy(i);
        let stroke = if on_path.contains(&i) { "#e8913a" } else { "currentColor" };
        let fill = if node.failed { "rgba(196,49,75,.18)" } else { "rgba(47,126,216,.12)" };
        let _ = write!(
            svg,
            "<g class=\"node{}\" data-node=\"{id}\"><rect x=\"{x}\" y=\"{y}\" width=\"{box_w}\" height=\"{box_h}\" rx=\"6\" fill=\"{fill}\" \
             stroke=\"{stroke}\" stroke-width=\"{}\"/><text x=\"{}\" y=\"{}\" font-weight=\"bold\" fill=\"currentColor\">{id}</text>\
             <text x=\"{tx}\" y=\"{}\" fill=\"currentColor\">{:.1} ms · {} · {} attempt(s)</text>\
             <text x=\"{tx}\" y=\"{}\" fill=\"currentColor\">CPU {} ms · state {} B</text>\
             <text x=\"{tx}\" y=\"{}\" fill=\"currentColor\">cost {}</text></g>",
            if on_path.contains(&i) { " critical" } else { "" },
            if on_path.contains(&i) { 3 } else { 1 },
            x + 8,
            y + 18,
            y + 36,
            node.duration_ns() as f64 / 1e6,
            if node.failed { "failed" } else { "ok" },
            node.attempts,
            y + 54,
            node.cpu_ms,
            node.state_bytes,
            y + 72,
            node.cost.round_dp(10),
            id = esc(&node.id),
            tx = x + 8,
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The spans of a trace as a waterfall (offset and length relative to the whole trace).
fn waterfall(spans: &[SpanRow]) -> String {
    let Some(start) = spans.iter().map(|s| s.start_ns).min() else {
        return "<p class=\"muted\">No spans.</p>".into();
    };
    let end = spans.iter().map(|s| s.end_ns).max().unwrap_or(start);
    // The times are the sender's (any i64): differences are taken exactly, in i128.
    let since_start = |t: i64| (i128::from(t) - i128::from(start)) as f64;
    let total = since_start(end).max(1.0);
    let parents: HashMap<&str, Option<&str>> =
        spans.iter().map(|s| (s.span_id.as_str(), s.parent_span_id.as_deref())).collect();
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
    let mut out = String::from(
        "<table id=\"waterfall\"><thead><tr><th>span</th><th class=\"n\">ms</th><th style=\"width:50%\">timeline</th></tr></thead><tbody>",
    );
    for span in spans {
        let left = since_start(span.start_ns) / total * 100.0;
        let width = (span.duration_ns() as f64 / total * 100.0).max(0.3);
        let _ = write!(
            out,
            "<tr><td style=\"padding-left:{}em\">{}</td><td class=\"n\">{:.2}</td><td><div class=\"bar\"><span{} style=\"left:{left:.2}%;width:{width:.2}%\"></span></div></td></tr>",
            0.8 + depth_of(&parents, &span.span_id) as f64,
            esc(&span.name),
            span.duration_ns() as f64 / 1e6,
            if span.status_code == 2 { " class=\"error\"" } else { "" }
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// Developers: invocation spans by function, status, duration and attribute.
async fn traces(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(params): Query<Params>) -> Response {
    let (viewer, tenant) = match ui.signed_in(&headers, params.tenant.as_deref()).await {
        Ok(signed_in) => signed_in,
        Err(r) => return r,
    };
    let function = params.function.clone().unwrap_or_default();
    let status = params.status.clone().unwrap_or_default();
    let min_ms: Option<f64> = params.min_ms.as_deref().and_then(|v| v.parse().ok());
    let max_ms: Option<f64> = params.max_ms.as_deref().and_then(|v| v.parse().ok());
    let attr = params.attr.clone().unwrap_or_default();
    let (since, until) = lookback(&params, ui.state.store.clock().now_ns());
    let prefix = semconv::invoke_span_name(&function);
    let spans = match ui.state.store.spans_named(&tenant, &prefix, (since, until), 2000, &|_| true).await {
        Ok(s) => s,
        Err(e) => return internal(&viewer, e),
    };
    let mut body = tenant_form(
        &viewer,
        &tenant,
        &format!(
            "<label>function<input name=\"function\" value=\"{}\"></label><label>status<select name=\"status\">{}</select></label>\
             <label>min ms<input name=\"min_ms\" size=\"6\" value=\"{}\"></label><label>max ms<input name=\"max_ms\" size=\"6\" value=\"{}\"></label>\
             <label>attribute (key=value)<input name=\"attr\" value=\"{}\"></label>",
            esc(&function),
            ["", "ok", "error"]
                .iter()
                .map(|s| format!("<option{}>{s}</option>", if *s == status { " selected" } else { "" }))
                .collect::<String>(),
            params.min_ms.as_deref().map(esc).unwrap_or_default(),
            params.max_ms.as_deref().map(esc).unwrap_or_default(),
            esc(&attr)
        ),
    );
    body.push_str(
        "<table id=\"traces\"><thead><tr><th>span</th><th>started</th><th class=\"n\">ms</th><th>status</th><th>trace</th></tr></thead><tbody>",
    );
    let (attr_key, attr_value) = attr.split_once('=').unwrap_or((attr.as_str(), ""));
    let mut shown = 0;
    for span in &spans {
        if !function.is_empty() && span.name != semconv::invoke_span_name(&function) {
            continue;
        }
        let ms = span.duration_ns() as f64 / 1e6;
        let a = attributes(span);
        let code = a.get(semconv::HTTP_RESPONSE_STATUS_CODE).and_then(Value::as_i64).unwrap_or(0);
        let is_error = span.status_code == 2 || code >= 500;
        if (status == "ok" && is_error) || (status == "error" && !is_error) {
            continue;
        }
        if min_ms.is_some_and(|m| ms < m) || max_ms.is_some_and(|m| ms > m) {
            continue;
        }
        if !attr_key.is_empty() && text_attr(&a, attr_key.trim()) != attr_value.trim() {
            continue;
        }
        shown += 1;
        if shown > 200 {
            break;
        }
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{ms:.2}</td><td class=\"{}\">{}</td><td><a href=\"/ui/traces/{}/{}\">{}</a></td></tr>",
            esc(&span.name),
            esc(&rfc3339(span.start_ns)),
            if is_error { "bad" } else { "" },
            if is_error { format!("error ({code})") } else { format!("ok ({code})") },
            url(&tenant),
            url(&span.trace_id),
            esc(&span.trace_id[..16.min(span.trace_id.len())])
        );
    }
    body.push_str("</tbody></table>");
    if shown == 0 {
        body.push_str("<p class=\"muted\">No spans match.</p>");
    }
    page("Traces", Some(&viewer), &body).into_response()
}

/// Any trace of the tenant as a waterfall.
async fn trace(
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
    page(&format!("Trace {trace_id}"), Some(&viewer), &waterfall(&spans)).into_response()
}
