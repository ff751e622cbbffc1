//! `/state/*`: the state store over HTTP, for functions in any language.
//!
//! Objects of a job: `/state/jobs/{job}/buckets/{bucket}/objects/{key}`; the tenant's
//! job-less objects: `/state/buckets/{bucket}/objects/{key}`. `PUT` stores (`?persist=true`,
//! `?ttl=30s`), `GET` reads (`?delete_after_read=true`), `HEAD` looks up, `DELETE` removes;
//! `GET` on a bucket enumerates it. Jobs: `POST /state/jobs {"job"}`, `DELETE /state/jobs/{job}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::Core;
use super::auth::Caller;
use super::error::ApiError;
use crate::function::deployment::parse_duration;
use crate::state::{ObjectInfo, ObjectKey, PutOptions, TenantUsage};

#[derive(Debug, Default, Deserialize)]
pub struct ObjectQuery {
    #[serde(default)]
    persist: bool,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    delete_after_read: bool,
}

#[derive(Debug, Deserialize)]
pub struct ObjectPath {
    #[serde(default)]
    job: Option<String>,
    bucket: String,
    #[serde(default)]
    key: Option<String>,
}

impl ObjectPath {
    fn object_key(&self) -> Result<ObjectKey, ApiError> {
        let key = self.key.as_deref().ok_or_else(|| ApiError::BadRequest("missing object key".into()))?;
        Ok(ObjectKey::new(self.job.as_deref(), &self.bucket, key)?)
    }
}

#[derive(Debug, Deserialize)]
pub struct RegisterJob {
    job: String,
}

/// `POST /state/jobs`.
pub async fn register_job(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Json(request): Json<RegisterJob>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.state_tenant(Some(&request.job), true, true)?;
    core.invoker.state.register(&tenant, &request.job)?;
    Ok(StatusCode::CREATED)
}

/// `DELETE /state/jobs/{job}`: answers the job's byte-seconds.
pub async fn deregister_job(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(job): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = caller.state_tenant(Some(&job), true, true)?;
    let byte_seconds = core.invoker.state.deregister(&tenant, &job)?;
    Ok(Json(serde_json::json!({ "job": job, "byte_seconds": byte_seconds })))
}

/// `PUT .../objects/{key}`. The caller's scope and the declared size are checked before the
/// body is read: a value nobody may write, or one too large, is never buffered.
pub async fn put_object(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(path): Path<ObjectPath>,
    Query(query): Query<ObjectQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.state_tenant(path.job.as_deref(), true, false)?;
    let key = path.object_key()?;
    let ttl = match &query.ttl {
        Some(ttl) => Some(parse_duration(ttl).map_err(|e| ApiError::BadRequest(format!("ttl: {e}")))?),
        None => None,
    };
    let max = core.config.state.max_value_bytes;
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(size) = declared.filter(|size| *size > max) {
        return Err(ApiError::PayloadTooLarge(format!("value of {size} bytes is over the largest value, {max} bytes")));
    }
    // Refused before a byte of the body is read when the declared size cannot fit.
    if let Some(size) = declared {
        core.invoker.state.check_room(&tenant, &key, size)?;
    }
    let body = axum::body::to_bytes(body, max as usize).await.map_err(|error| {
        ApiError::PayloadTooLarge(format!("the value is over the largest value, {max} bytes, or unreadable: {error}"))
    })?;
    core.invoker.state.put(&tenant, key, body, PutOptions { persist: query.persist, ttl })?;
    Ok(StatusCode::CREATED)
}

/// `GET .../objects/{key}`.
pub async fn get_object(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(path): Path<ObjectPath>,
    Query(query): Query<ObjectQuery>,
) -> Result<Response, ApiError> {
    let tenant = caller.state_tenant(path.job.as_deref(), query.delete_after_read, false)?;
    let value = core.invoker.state.get(&tenant, &path.object_key()?, query.delete_after_read)?;
    Ok(([("content-type", "application/octet-stream")], value).into_response())
}

/// `HEAD .../objects/{key}`: size in `Content-Length`, flags in `X-Sfaas-*` headers.
pub async fn lookup_object(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(path): Path<ObjectPath>,
) -> Result<Response, ApiError> {
    let tenant = caller.state_tenant(path.job.as_deref(), false, false)?;
    let info = core.invoker.state.lookup(&tenant, &path.object_key()?)?;
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert("content-length", info.size.into());
    headers.insert("x-sfaas-persist", if info.persist { "true" } else { "false" }.parse().expect("ascii"));
    if let Some(expires) = info.expires_at_ns {
        headers.insert("x-sfaas-expires-at-ns", expires.into());
    }
    Ok(response)
}

/// `DELETE .../objects/{key}`.
pub async fn delete_object(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(path): Path<ObjectPath>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.state_tenant(path.job.as_deref(), true, false)?;
    core.invoker.state.delete(&tenant, &path.object_key()?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET .../buckets/{bucket}`: the bucket's objects.
pub async fn enumerate(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(path): Path<ObjectPath>,
) -> Result<Json<Vec<ObjectInfo>>, ApiError> {
    let tenant = caller.state_tenant(path.job.as_deref(), false, false)?;
    crate::state::ObjectKey::new(path.job.as_deref(), &path.bucket, "-")?;
    Ok(Json(core.invoker.state.enumerate(&tenant, path.job.as_deref(), &path.bucket)))
}

/// `GET /state/usage`: the tenant's bytes and byte-seconds.
pub async fn usage(State(core): State<Arc<Core>>, caller: Caller) -> Result<Json<TenantUsage>, ApiError> {
    let tenant = caller.state_tenant(None, false, false)?;
    Ok(Json(core.invoker.state.usage(&tenant)))
}
