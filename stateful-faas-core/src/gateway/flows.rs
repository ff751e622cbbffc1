//! Flows over HTTP: deploy and inspect definitions (`/system/flows`), run them synchronously
//! (`/flow/{name}`) or asynchronously (`/async-flow/{name}`), follow and cancel runs
//! (`/flow-runs`).

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Caller;
use super::error::ApiError;
use super::{Core, invoke};
use crate::flow::FlowError;
use crate::flow::definition::{self, render_dot, render_text};
use crate::flow::executor::{self, RunRequest, RunStatus, as_json};
use crate::room::Held;
use crate::semconv;

impl From<FlowError> for ApiError {
    fn from(error: FlowError) -> Self {
        let message = error.to_string();
        match error {
            FlowError::Invalid(_) | FlowError::TooDeep(_) => ApiError::BadRequest(message),
            FlowError::NotFound { .. } | FlowError::RunNotFound(_) => ApiError::NotFound(message),
            FlowError::State(state) => state.into(),
            FlowError::Database(_) => ApiError::Internal(message),
            FlowError::Quota { .. } | FlowError::Behind(_) => ApiError::TooManyRequests(message),
        }
    }
}

/// `POST /system/flows`: a flow definition in YAML or JSON; creates or replaces it.
pub async fn deploy(
    State(core): State<Arc<Core>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_write()?;
    let tenant = caller.namespace(None)?;
    let (body, _held) = invoke::receive(&core, &tenant, &headers, body).await?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("the flow definition is not UTF-8".into()))?;
    let definition = definition::parse(text).map_err(FlowError::from)?;
    let (flow, created) = core.flows.store.deploy(&tenant, definition, &core.invoker.functions).await?;
    tracing::info!(%tenant, flow = flow.name(), nodes = flow.nodes.len(), "flow deployed");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({"name": flow.name(), "nodes": flow.nodes.len()}))).into_response())
}

/// `GET /system/flows`.
pub async fn list(State(core): State<Arc<Core>>, caller: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = caller.namespace(None)?;
    let flows: Vec<_> = core
        .flows
        .store
        .list(&tenant)
        .iter()
        .map(|flow| {
            serde_json::json!({
                "name": flow.name(),
                "description": flow.definition.description,
                "nodes": flow.nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(serde_json::Value::Array(flows)))
}

#[derive(Debug, Deserialize)]
pub struct GraphQuery {
    #[serde(default)]
    format: Option<String>,
}

/// `GET /system/flows/{name}[?format=text|dot]`: the definition (JSON), or the DAG drawn.
pub async fn get(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<GraphQuery>,
) -> Result<Response, ApiError> {
    let tenant = caller.namespace(None)?;
    let flow = core.flows.store.get(&tenant, &name).ok_or(FlowError::NotFound { tenant: tenant.to_string(), name })?;
    Ok(match query.format.as_deref() {
        None | Some("json") => Json(&flow.definition).into_response(),
        Some("text") => render_text(&flow).into_response(),
        Some("dot") => ([("content-type", "text/vnd.graphviz")], render_dot(&flow)).into_response(),
        Some(other) => return Err(ApiError::BadRequest(format!("unknown format {other:?}: use json, text or dot"))),
    })
}

/// `DELETE /system/flows/{name}`.
pub async fn remove(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    let tenant = caller.namespace(None)?;
    core.flows.store.remove(&tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /stream/{name}`: records into the flow's stream (`flow::stream`); 202 with the runs
/// they went into, once those are committed.
pub async fn stream(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    use crate::flow::stream::{Format, StreamError};
    caller.require_write()?;
    let (flow, namespace) = qualified(&name);
    let tenant = caller.namespace(namespace)?;
    let (body, _held) = invoke::receive(&core, &tenant, &headers, body).await?;
    let csv = headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/csv"));
    let format = if csv { Format::Csv { header: Bytes::new() } } else { Format::JsonLines };
    match core.flows.streams.send(&core.flows, &tenant, flow, format, body).await {
        Ok(accepted) => Ok((StatusCode::ACCEPTED, Json(accepted)).into_response()),
        Err(error) => Err(match error {
            StreamError::Flow(flow) => flow.into(),
            StreamError::BadRequest(m) => ApiError::BadRequest(m),
            e @ StreamError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            e @ StreamError::Busy(_) => ApiError::TooManyRequests(e.to_string()),
            e @ (StreamError::Stopped(_) | StreamError::Run(_)) => ApiError::Internal(e.to_string()),
        }),
    }
}

/// `NAME` or `NAME.NAMESPACE` of a flow route.
fn qualified(name: &str) -> (&str, Option<&str>) {
    match name.split_once('.') {
        Some((flow, namespace)) => (flow, Some(namespace)),
        None => (name, None),
    }
}

/// A run's request, its input read into the invocations' room (held while the handler runs).
async fn request(
    core: &Core,
    caller: &Caller,
    name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(RunRequest, Held), ApiError> {
    caller.require_write()?;
    let (flow, namespace) = qualified(name);
    let tenant = caller.namespace(namespace)?;
    let (body, held) = invoke::receive(core, &tenant, headers, body).await?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let callback_url = header(semconv::HEADER_CALLBACK_URL);
    if let Some(url) = &callback_url
        && reqwest::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
    {
        return Err(ApiError::BadRequest(format!("X-Callback-Url {url:?} is not an http(s) URL")));
    }
    let request = RunRequest {
        tenant,
        flow: flow.to_string(),
        input: body,
        callback_url,
        traceparent: header(semconv::HEADER_TRACEPARENT),
        parent_run: None,
        depth: 0,
    };
    Ok((request, held))
}

/// `POST /flow/{name}`: runs the flow and answers its output (200), or the failure (500, or
/// 409 when cancelled); `X-Run-Id` names the run either way.
pub async fn run_sync(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (request, _held) = request(&core, &caller, &name, &headers, body).await?;
    let (run_id, done) = executor::start(&core.flows, request).await?;
    let result = done.await.map_err(|_| ApiError::Internal(format!("flow run {run_id} was lost")))?;
    let mut response = match result.status {
        RunStatus::Succeeded => (StatusCode::OK, result.output.unwrap_or_default()).into_response(),
        RunStatus::Failed => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{}\n", result.error.unwrap_or_default())).into_response()
        }
        RunStatus::Cancelled => (StatusCode::CONFLICT, "run cancelled\n").into_response(),
    };
    response.headers_mut().insert(semconv::HEADER_RUN_ID, run_id.parse().expect("uuid"));
    response.headers_mut().insert(semconv::HEADER_FLOW_STATUS, result.status.as_str().parse().expect("ascii"));
    Ok(response)
}

/// `POST /async-flow/{name}`: 202 once the run is journaled; `X-Run-Id` and `Location` name it.
pub async fn run_async(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (request, held) = request(&core, &caller, &name, &headers, body).await?;
    let (run_id, done) = executor::start(&core.flows, request).await?;
    // The run keeps its input to its end: so does the room it was read into.
    tokio::spawn(async move {
        let _held = held;
        let _ = done.await;
    });
    let mut response = (StatusCode::ACCEPTED, Json(serde_json::json!({"run_id": run_id}))).into_response();
    response.headers_mut().insert(semconv::HEADER_RUN_ID, run_id.parse().expect("uuid"));
    response.headers_mut().insert("location", format!("/flow-runs/{run_id}").parse().expect("ascii"));
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    #[serde(default)]
    flow: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

/// `GET /flow-runs[?flow=&status=&limit=]`: newest first.
pub async fn runs(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Query(query): Query<RunsQuery>,
) -> Result<Json<Vec<crate::flow::journal::RunInfo>>, ApiError> {
    let tenant = caller.namespace(None)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(core.flows.journal.runs(&tenant, query.flow.as_deref(), query.status.as_deref(), limit).await?))
}

/// `GET /flow-runs/{id}`: the run, its nodes and its output.
pub async fn run(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(run_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = caller.namespace(None)?;
    let run = core.flows.journal.run(&tenant, &run_id).await?.ok_or(FlowError::RunNotFound(run_id.clone()))?;
    let nodes = core.flows.journal.nodes(&tenant, &run_id).await?;
    let mut value = serde_json::to_value(&run).expect("json");
    value["output"] = run.output.as_deref().map_or(serde_json::Value::Null, as_json);
    value["nodes"] = serde_json::to_value(nodes).expect("json");
    Ok(Json(value))
}

/// `DELETE /flow-runs/{id}`: cancels a running run.
pub async fn cancel(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(run_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    let tenant = caller.namespace(None)?;
    if core.flows.store.cancel(&tenant, &run_id) {
        return Ok(StatusCode::ACCEPTED);
    }
    match core.flows.journal.run(&tenant, &run_id).await? {
        Some(run) => Err(ApiError::Conflict(format!("run {run_id} is already {}", run.status))),
        None => Err(FlowError::RunNotFound(run_id).into()),
    }
}
