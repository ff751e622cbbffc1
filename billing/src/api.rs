//! The billing HTTP API under `/billing` on the dashboard address. The admin token sees every
//! tenant; a tenant's read token only its own plans, usage and invoices.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;

use contract::Viewer;

use crate::period::Period;
use crate::{Billing, BillingError};

/// Resolves a request's token (see [`contract::token`]) to who it is, if anyone.
pub trait ViewerResolver: Send + Sync + 'static {
    fn resolve(&self, token: &str) -> Option<Viewer>;
}

/// A refused or failed request, answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::error!(status = %self.0, error = %self.1, "billing request failed");
        }
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<BillingError> for ApiError {
    fn from(error: BillingError) -> Self {
        let status = match &error {
            BillingError::InvalidRateCard(_)
            | BillingError::Locked { .. }
            | BillingError::PlansInUse(_)
            | BillingError::UnknownPlan { .. }
            | BillingError::PlanChangeTooEarly { .. }
            | BillingError::RunInFuture
            | BillingError::PeriodOpen { .. }
            | BillingError::Period(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BillingError::NotFound(_) => StatusCode::NOT_FOUND,
            BillingError::Database(_)
            | BillingError::Corrupt { .. }
            | BillingError::Migrate(_)
            | BillingError::Telemetry(_)
            | BillingError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, error.to_string())
    }
}

/// Checks the request's token; `X-Scope-OrgID`, when sent, must name the token's tenant.
pub fn authenticate(resolver: &dyn ViewerResolver, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
        ApiError(StatusCode::UNAUTHORIZED, "missing Authorization header: send `Authorization: Bearer TOKEN`".into())
    })?;
    let invalid = || ApiError(StatusCode::UNAUTHORIZED, "invalid token: not an admin or read token".into());
    let viewer = contract::token(authorization).and_then(|token| resolver.resolve(&token)).ok_or_else(invalid)?;
    let org = headers.get(contract::semconv::HEADER_SCOPE_ORG_ID).and_then(|v| v.to_str().ok());
    if let (Viewer::Tenant(tenant), Some(org)) = (&viewer, org)
        && org != tenant
    {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("X-Scope-OrgID {org:?} does not match the token's tenant"),
        ));
    }
    Ok(viewer)
}

#[derive(Clone)]
pub struct ApiState {
    pub billing: Arc<Billing>,
    pub resolver: Arc<dyn ViewerResolver>,
    /// Brings the platform's side up to now before a settled reconciliation (`sfaas up` has
    /// one; split deployments do not).
    pub settle: Option<Arc<dyn Settle>>,
}

/// What a settled reconciliation needs from the platform first: its spans sent (or kept in the
/// spool) and its counters stored as they are now.
pub trait Settle: Send + Sync {
    fn settle(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

impl ApiState {
    fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, ApiError> {
        authenticate(self.resolver.as_ref(), headers)
    }

    fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.viewer(headers)? {
            Viewer::Admin => Ok(()),
            Viewer::Tenant(_) => Err(ApiError(StatusCode::FORBIDDEN, "this needs the admin token".into())),
        }
    }

    fn tenant(&self, headers: &HeaderMap, tenant: &str) -> Result<(), ApiError> {
        if self.viewer(headers)?.may_see(tenant) {
            Ok(())
        } else {
            Err(ApiError(StatusCode::FORBIDDEN, format!("this token cannot read tenant {tenant:?}")))
        }
    }

    async fn period(&self, period: Option<String>) -> Result<String, ApiError> {
        let card = self.billing.rate_card().await?;
        match period {
            Some(key) => Ok(Period::parse(card.period, &key)
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?
                .key()),
            None => Ok(Period::containing(card.period, self.billing.now_ns()).key()),
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/billing/plans", get(plans).put(apply_plans))
        .route("/billing/tenants", get(tenants))
        .route("/billing/tenants/{tenant}/plan", put(assign_plan))
        .route("/billing/run", post(run))
        .route("/billing/finalize", post(finalize))
        .route("/billing/invoices", get(invoices))
        .route("/billing/invoices/{tenant}/{period}", get(invoice))
        .route("/billing/usage/{tenant}", get(usage))
        .route("/billing/usage/{tenant}/events", get(events))
        .route("/billing/reconciliation", get(reconciliation))
        .route("/billing/reconciliation/settle", post(settle_and_reconcile))
        .with_state(state)
}

async fn plans(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.viewer(&headers)?;
    Ok(Json(state.billing.rate_card().await?).into_response())
}

async fn apply_plans(State(state): State<ApiState>, headers: HeaderMap, body: String) -> Result<Response, ApiError> {
    state.admin(&headers)?;
    Ok(Json(state.billing.apply_rate_card(&body).await?).into_response())
}

async fn tenants(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let viewer = state.viewer(&headers)?;
    let card = state.billing.rate_card().await?;
    let assignments = state.billing.plan_assignments().await?;
    let list: Vec<_> = state
        .billing
        .tenants()
        .await?
        .into_iter()
        .filter(|t| viewer.may_see(t))
        .map(|tenant| {
            let plans: Vec<_> = assignments
                .get(&tenant)
                .map(|list| {
                    list.iter()
                        .map(|(from, plan)| json!({"from": crate::period::rfc3339(*from), "plan": plan}))
                        .collect()
                })
                .unwrap_or_default();
            let current =
                assignments.get(&tenant).and_then(|l| l.last()).map_or(card.default_plan.clone(), |l| l.1.clone());
            json!({"tenant": tenant, "plan": current, "plans": plans})
        })
        .collect();
    Ok(Json(list).into_response())
}

#[derive(Deserialize)]
struct PlanChange {
    plan: String,
    /// RFC 3339; default now.
    from: Option<String>,
}

fn parse_time(text: &str) -> Result<i64, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, format!("{text:?} is not an RFC 3339 time")))
}

async fn assign_plan(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Json(change): Json<PlanChange>,
) -> Result<Response, ApiError> {
    state.admin(&headers)?;
    let from = change.from.as_deref().map(parse_time).transpose()?;
    let from = state.billing.assign_plan(&tenant, &change.plan, from).await?;
    Ok(Json(json!({"tenant": tenant, "plan": change.plan, "from": crate::period::rfc3339(from)})).into_response())
}

#[derive(Deserialize, Default)]
struct RunRequest {
    until: Option<String>,
}

async fn run(State(state): State<ApiState>, headers: HeaderMap, body: String) -> Result<Response, ApiError> {
    state.admin(&headers)?;
    let request: RunRequest = if body.trim().is_empty() {
        RunRequest::default()
    } else {
        serde_json::from_str(&body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("run request: {e}")))?
    };
    let until = request.until.as_deref().map(parse_time).transpose()?;
    let report = state.billing.run(until).await?;
    state.billing.merge_segments().await?;
    Ok(Json(report).into_response())
}

#[derive(Deserialize)]
struct FinalizeRequest {
    period: String,
}

async fn finalize(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(request): Json<FinalizeRequest>,
) -> Result<Response, ApiError> {
    state.admin(&headers)?;
    let finalized = state.billing.finalize(&request.period).await?;
    Ok(Json(json!({"period": request.period, "finalized": finalized})).into_response())
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
    period: Option<String>,
    format: Option<String>,
    by: Option<String>,
}

async fn invoices(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    let tenant = match (state.viewer(&headers)?, query.tenant) {
        (Viewer::Admin, tenant) => tenant,
        (Viewer::Tenant(own), None) => Some(own),
        (Viewer::Tenant(own), Some(asked)) if asked == own => Some(own),
        (Viewer::Tenant(_), Some(asked)) => {
            return Err(ApiError(StatusCode::FORBIDDEN, format!("this token cannot read tenant {asked:?}")));
        }
    };
    Ok(Json(state.billing.invoices(tenant.as_deref()).await?).into_response())
}

async fn invoice(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((tenant, period)): Path<(String, String)>,
    Query(query): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    state.tenant(&headers, &tenant)?;
    let (period, format) = match period.rsplit_once('.') {
        Some((period, extension)) => (period.to_string(), extension.to_string()),
        None => (period, query.format.unwrap_or_else(|| "json".into())),
    };
    match format.as_str() {
        "json" => {
            let document = state.billing.invoice_document(&tenant, &period).await?;
            Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response())
        }
        "csv" => {
            let invoice = state.billing.invoice(&tenant, &period).await?;
            let disposition = format!("attachment; filename=\"invoice-{tenant}-{period}.csv\"");
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                    (header::CONTENT_DISPOSITION, disposition),
                ],
                invoice.to_csv(),
            )
                .into_response())
        }
        other => Err(ApiError(StatusCode::BAD_REQUEST, format!("format {other:?}: use json or csv"))),
    }
}

async fn usage(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Query(query): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    state.tenant(&headers, &tenant)?;
    let period = state.period(query.period).await?;
    let costs = state.billing.invocation_costs(&tenant, &period).await?;
    let by = query.by.unwrap_or_else(|| "function".into());
    let body = match by.as_str() {
        "invocation" => json!({"tenant": tenant, "period": period, "records": costs}),
        "function" | "day" => {
            #[derive(Default, serde::Serialize)]
            struct Row {
                records: i64,
                invocations: i64,
                cpu_ms: i64,
                bytes_out: i64,
                log_bytes: i64,
                state_byte_seconds: Decimal,
                cost: Decimal,
            }
            let mut rows: BTreeMap<String, Row> = BTreeMap::new();
            for record in &costs {
                let key = if by == "function" {
                    if record.function.is_empty() { "(state)".to_string() } else { record.function.clone() }
                } else {
                    crate::period::rfc3339(record.start_ns)[..10].to_string()
                };
                let row = rows.entry(key).or_default();
                // Saturating, like the running totals (docs/decisions.md, Billing).
                row.records += 1;
                row.invocations += i64::from(record.kind == crate::usage::Kind::Invocation);
                row.cpu_ms = row.cpu_ms.saturating_add(record.cpu_ms);
                row.bytes_out = row.bytes_out.saturating_add(record.bytes_out);
                row.log_bytes = row.log_bytes.saturating_add(record.log_bytes);
                row.state_byte_seconds = row.state_byte_seconds.saturating_add(record.state_byte_seconds);
                row.cost = row.cost.saturating_add(record.cost);
            }
            json!({"tenant": tenant, "period": period, "by": by, "rows": rows})
        }
        other => {
            return Err(ApiError(StatusCode::BAD_REQUEST, format!("by={other:?}: use invocation, function or day")));
        }
    };
    Ok(Json(body).into_response())
}

async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Query(query): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    state.tenant(&headers, &tenant)?;
    let period = state.period(query.period).await?;
    let records = state.billing.records(&tenant, &period).await?;
    let events: Vec<_> = records.iter().map(|r| crate::events::event(r, None)).collect();
    Ok(([(header::CONTENT_TYPE, crate::events::BATCH_CONTENT_TYPE)], serde_json::to_string(&events).expect("json"))
        .into_response())
}

/// `POST /billing/reconciliation/settle`: the platform's spans sent and its counters stored
/// now, billing run once they are billable, then the reconciliation, which is exactly 0 for
/// every function when nothing was lost (and no call ran meanwhile).
async fn settle_and_reconcile(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    state.admin(&headers)?;
    let Some(settle) = &state.settle else {
        return Err(ApiError(
            StatusCode::NOT_IMPLEMENTED,
            "settling needs the core, the collector and billing in one process (sfaas up); \
             compare GET /billing/reconciliation after a billing run instead"
                .into(),
        ));
    };
    settle.settle().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    // What arrived is billed once its arrival is `settle` old.
    tokio::time::sleep(state.billing.settle() + std::time::Duration::from_millis(200)).await;
    let run = state.billing.run(None).await?;
    let period = state.period(query.period).await?;
    let reconciliation = state.billing.reconcile(&period, query.tenant.as_deref()).await?;
    Ok(Json(serde_json::json!({"run": run, "period": period, "reconciliation": reconciliation})).into_response())
}

async fn reconciliation(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    let tenant = match state.viewer(&headers)? {
        Viewer::Admin => query.tenant.clone(),
        Viewer::Tenant(own) => Some(own),
    };
    let period = state.period(query.period).await?;
    Ok(Json(state.billing.reconcile(&period, tenant.as_deref()).await?).into_response())
}
