//! `/system/*`: the OpenFaaS management API, plus tenants and the async queue's state.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::ApiError;
use super::{Core, body};
use crate::async_queue::AsyncCall;
use crate::function::{DeployedFunction, FunctionDeployment};
use crate::tenant::{Principal, TenantCredentials, TenantInfo};

#[derive(Debug, Deserialize)]
pub struct NamespaceQuery {
    namespace: Option<String>,
}

/// A function as `GET /system/functions` lists it (OpenFaaS `FunctionStatus`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    name: String,
    namespace: String,
    image: String,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    env_process: Option<String>,
    invocation_count: u64,
    replicas: usize,
    available_replicas: usize,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    created_at: String,
}

impl FunctionStatus {
    fn of(function: &DeployedFunction) -> Self {
        let deployment = &function.deployment;
        Self {
            name: function.spec.name.clone(),
            namespace: function.tenant.to_string(),
            image: deployment.image.clone().unwrap_or_default(),
            kind: function.spec.kind.as_str(),
            env_process: deployment.env_process.clone(),
            invocation_count: function.invocation_count(),
            replicas: function.replicas(),
            available_replicas: function.replicas(),
            labels: deployment.labels.clone(),
            annotations: deployment.annotations.clone(),
            created_at: chrono::DateTime::from_timestamp_millis(function.created_ms).unwrap_or_default().to_rfc3339(),
        }
    }
}

/// `GET /system/functions[?namespace=]`.
pub async fn list_functions(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Query(query): Query<NamespaceQuery>,
) -> Result<Json<Vec<FunctionStatus>>, ApiError> {
    let scope = caller.list_scope(query.namespace.as_deref())?;
    Ok(Json(core.invoker.functions.list(scope.as_ref()).iter().map(|f| FunctionStatus::of(f)).collect()))
}

/// `GET /system/function/{name}[?namespace=]`.
pub async fn get_function(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Result<Json<FunctionStatus>, ApiError> {
    let tenant = caller.namespace(query.namespace.as_deref())?;
    let function = core
        .invoker
        .functions
        .get(&tenant, &name)
        .ok_or_else(|| ApiError::NotFound(format!("function {name} not found in namespace {tenant}")))?;
    Ok(Json(FunctionStatus::of(&function)))
}

/// Largest body of the management API: a deployment with its environment, labels and
/// annotations, well within what `execve` takes as an environment (a deployment is kept in
/// memory and in the database, and a process function's environment is built from it).
pub const MAX_SYSTEM_BODY: u64 = 256 << 10;

/// A management request's body, for a caller that may write: at most [`MAX_SYSTEM_BODY`],
/// read as any call's body is (into the tenant's room, arriving steadily).
async fn read_body(
    core: &Core,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<Bytes, ApiError> {
    caller.require_write()?;
    let incoming = body::Incoming {
        what,
        declared: body::declared_length(headers),
        max: MAX_SYSTEM_BODY,
        stall: core.config.body_stall,
    };
    match &caller.principal {
        Principal::Tenant { tenant, .. } => {
            Ok(body::receive(&core.invoker.buffers, tenant, incoming, body, |_| Ok(())).await?.0)
        }
        // The operator's own requests are not counted in any tenant's room.
        _ => axum::body::to_bytes(body, MAX_SYSTEM_BODY as usize)
            .await
            .map_err(|_| ApiError::PayloadTooLarge(format!("{what} is over the largest, {MAX_SYSTEM_BODY} bytes"))),
    }
}

fn parse_deployment(body: &[u8]) -> Result<FunctionDeployment, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid FunctionDeployment JSON: {e}")))
}

async fn deploy(core: &Core, caller: &Caller, body: &[u8], replace: bool) -> Result<Response, ApiError> {
    caller.require_write()?;
    let deployment = parse_deployment(body)?;
    let tenant = caller.namespace(deployment.namespace.as_deref())?;
    if !core.invoker.tenants.exists(&tenant).await? {
        return Err(ApiError::NotFound(format!("namespace {tenant} does not exist; create the tenant first")));
    }
    let function = core.invoker.functions.deploy(&tenant, deployment, replace).await?;
    tracing::info!(%tenant, function = %function.spec.name, kind = function.spec.kind.as_str(), replace, "deployed");
    let status = if replace { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, Json(FunctionStatus::of(&function))).into_response())
}

/// `POST /system/functions`: deploys a new function (409 if it exists).
pub async fn create_function(
    State(core): State<Arc<Core>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&core, &caller, &headers, body, "a FunctionDeployment").await?;
    deploy(&core, &caller, &body, false).await
}

/// `PUT /system/functions`: updates an existing function (404 if it does not).
pub async fn update_function(
    State(core): State<Arc<Core>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&core, &caller, &headers, body, "a FunctionDeployment").await?;
    deploy(&core, &caller, &body, true).await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteRequest {
    function_name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// `DELETE /system/functions` with `{"functionName": ...}`.
pub async fn delete_function(
    State(core): State<Arc<Core>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let body = read_body(&core, &caller, &headers, body, "the request").await?;
    let request: DeleteRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"functionName\": \"...\"}}: {e}")))?;
    let tenant = caller.namespace(request.namespace.as_deref())?;
    core.invoker.functions.remove(&tenant, &request.function_name).await?;
    tracing::info!(%tenant, function = %request.function_name, "removed");
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleRequest {
    #[serde(default)]
    namespace: Option<String>,
    replicas: u64,
}

/// `POST /system/scale-function/{name}` with `{"replicas": N}`.
pub async fn scale_function(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let body = read_body(&core, &caller, &headers, body, "the request").await?;
    let request: ScaleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"replicas\": N}}: {e}")))?;
    let tenant = caller.namespace(request.namespace.as_deref())?;
    core.invoker.functions.scale(&tenant, &name, request.replicas as usize).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `GET /system/namespaces`: every tenant for the admin, its own for a tenant.
pub async fn list_namespaces(State(core): State<Arc<Core>>, caller: Caller) -> Result<Json<Vec<String>>, ApiError> {
    let scope = caller.list_scope(None)?;
    let names = core.invoker.tenants.list().await?.into_iter().map(|t| t.name);
    Ok(Json(names.filter(|name| scope.as_ref().is_none_or(|t| t.as_str() == name)).collect()))
}

#[derive(Debug, Deserialize)]
pub struct CreateTenant {
    name: String,
    #[serde(default)]
    plan: Option<String>,
}

/// `POST /system/tenants` (admin): creates a tenant; its tokens are shown only in this answer.
pub async fn create_tenant(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Json(request): Json<CreateTenant>,
) -> Result<(StatusCode, Json<TenantCredentials>), ApiError> {
    caller.require_admin()?;
    let credentials = core.invoker.tenants.create(&request.name, request.plan.as_deref()).await?;
    tracing::info!(tenant = %credentials.tenant, "tenant created");
    Ok((StatusCode::CREATED, Json(credentials)))
}

/// `GET /system/tenants` (admin).
pub async fn list_tenants(State(core): State<Arc<Core>>, caller: Caller) -> Result<Json<Vec<TenantInfo>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(core.invoker.tenants.list().await?))
}

/// `GET /system/async-calls/{call_id}`: the state of one async call.
pub async fn get_async_call(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(call_id): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Result<Json<AsyncCall>, ApiError> {
    let tenant = caller.namespace(query.namespace.as_deref())?;
    core.queue
        .get(&tenant, &call_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no async call {call_id} in namespace {tenant}")))
}

/// `GET /system/async-dead-letters[?namespace=]`.
pub async fn dead_letters(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Query(query): Query<NamespaceQuery>,
) -> Result<Json<Vec<AsyncCall>>, ApiError> {
    let scope = caller.list_scope(query.namespace.as_deref())?;
    Ok(Json(core.queue.dead_letters(scope.as_ref()).await?))
}

/// `GET /system/info` (OpenFaaS shape).
pub async fn info(_caller: Caller) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "provider": {
            "provider": "stateful-faas",
            "orchestration": "process",
            "version": {"release": env!("CARGO_PKG_VERSION"), "sha": "", "commit_message": ""},
        },
        "version": {"release": env!("CARGO_PKG_VERSION"), "sha": "", "commit_message": ""},
        "arch": std::env::consts::ARCH,
    }))
}

/// `GET /metrics`: the admin or the platform's meter token (it names every tenant's functions).
/// OpenMetrics when the scraper asks for it (as Prometheus does), else text 0.0.4.
pub async fn metrics(
    State(core): State<Arc<Core>>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if !matches!(caller.principal, crate::tenant::Principal::Admin | crate::tenant::Principal::Meter) {
        return Err(ApiError::Forbidden("/metrics needs the admin or a meter token".into()));
    }
    let functions = core.invoker.functions.list(None);
    core.invoker.metrics.set_service_counts(functions.iter().map(|f| (&f.tenant, f.spec.name.as_str(), f.replicas())));
    let (depth, dead) = core.queue.counts().await?;
    core.invoker.metrics.set_async_queue(depth, dead);
    let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    Ok(if accept.contains("application/openmetrics-text") {
        ([("content-type", crate::metrics::OPENMETRICS_CONTENT_TYPE)], core.invoker.metrics.encode_openmetrics())
            .into_response()
    } else {
        ([("content-type", crate::metrics::TEXT_CONTENT_TYPE)], core.invoker.metrics.encode_text()).into_response()
    })
}
