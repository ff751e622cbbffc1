//! The server-rendered web UI: bills for operators, functions, flow runs and DAG traces for
//! developers. No JavaScript at all: HTML from maud templates (every value escaped), CSS in
//! `style.css`, charts as SVG from plotters (`charts.rs`), the DAG drawn as SVG by hand.
//!
//! Sign-in takes a token (the admin token, or a tenant's read token) once and sets a session
//! cookie (`HttpOnly`, `SameSite=Strict`, 12 hours; sessions live in memory, so a restart signs
//! everyone out). A request may also carry `Authorization` instead. A tenant sees only its own
//! namespace: every page names its tenant, and another tenant's gets 403.

// Page handlers return early with a ready response (a redirect to sign in, 403, 404).
#![allow(clippy::result_large_err)]

mod bills;
mod functions;
mod health;
mod runs;
mod traces;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use billing::RecordCost;
use billing::period::Period;
use billing::usage::UsageRecord;
use contract::Viewer;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use crate::DashboardState;
use health::HealthSample;

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
    /// For the collector's `/metrics`.
    http: reqwest::Client,
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

pub fn router(state: DashboardState, config: UiConfig) -> Router {
    let ui = Arc::new(Ui {
        state,
        config,
        http: crate::http_client(),
        sessions: Mutex::default(),
        health: Mutex::default(),
        costs: Mutex::default(),
        records: Mutex::default(),
    });
    if ui.config.collector_metrics_url.is_some() {
        tokio::spawn(health::sample(Arc::downgrade(&ui)));
    }
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/favicon.svg", get(favicon))
        .route("/logout", post(logout))
        .route("/ui/tenants", get(bills::tenants))
        .route("/ui/tenants/{tenant}", get(bills::tenant))
        .route("/ui/invoices/{tenant}/{period}", get(bills::invoice))
        .route("/ui/reconciliation", get(bills::reconciliation))
        .route("/ui/health", get(health::health))
        .route("/ui/functions", get(functions::functions))
        .route("/ui/runs", get(runs::runs))
        .route("/ui/runs/{tenant}/{run_id}", get(runs::run))
        .route("/ui/traces", get(traces::traces))
        .route("/ui/traces/{tenant}/{trace_id}", get(traces::trace))
        .route("/ui/logs", get(traces::logs))
        .with_state(ui)
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

const STYLE: &str = include_str!("style.css");

/// The layout of every page: the header with the viewer's links, the title, the body.
fn page(title: &str, viewer: Option<&Viewer>, body: Markup) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width";
                link rel="icon" href="/favicon.svg";
                title { (title) " · stateful-faas" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "stateful-faas" }
                    (nav(viewer))
                    @if viewer.is_some() {
                        form method="post" action="/logout" { button { "Sign out" } }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(markup.into_string())
}

/// The pages a viewer may open.
fn nav(viewer: Option<&Viewer>) -> Markup {
    html! {
        @match viewer {
            Some(Viewer::Admin) => nav {
                a href="/ui/tenants" { "Tenants" }
                a href="/ui/reconciliation" { "Reconciliation" }
                a href="/ui/health" { "Collector" }
                a href="/ui/functions" { "Functions" }
                a href="/ui/runs" { "Flow runs" }
                a href="/ui/traces" { "Traces" }
                a href="/ui/logs" { "Logs" }
            },
            Some(Viewer::Tenant(tenant)) => {
                nav {
                    a href={ "/ui/tenants/" (url(tenant)) } { "Bills" }
                    a href="/ui/functions" { "Functions" }
                    a href="/ui/runs" { "Flow runs" }
                    a href="/ui/traces" { "Traces" }
                    a href="/ui/logs" { "Logs" }
                }
                span.muted { "tenant " (tenant) }
            },
            None => {},
        }
    }
}

fn error_page(status: StatusCode, viewer: Option<&Viewer>, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    (status, page(title, viewer, html! { p { (message) } })).into_response()
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
    let body = html! {
        @if let Some(message) = message {
            p.bad { (message) }
        }
        form method="post" action="/login" {
            p {
                label {
                    "Token (admin, or a tenant's read token)"
                    br;
                    input type="password" name="token" size="70" autocomplete="off" autofocus required;
                }
            }
            p { button type="submit" { "Sign in" } }
        }
    };
    page("Sign in", None, body)
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

/// The query string of every page (each reads the parameters it knows).
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
    /// The logs page's text and severity.
    text: Option<String>,
    severity: Option<String>,
}

/// The filter form of the developers' pages: a tenant field for the admin, then `filters`.
fn tenant_form(viewer: &Viewer, tenant: &str, filters: Markup) -> Markup {
    html! {
        form.filters method="get" {
            @if *viewer == Viewer::Admin {
                label { "tenant" input name="tenant" value=(tenant); }
            }
            (filters)
            button { "Show" }
        }
    }
}
