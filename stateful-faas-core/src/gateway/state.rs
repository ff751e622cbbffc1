//! `/state/*`: the state store over HTTP, for functions in any language.
//!
//! Objects of a job: `/state/jobs/{job}/buckets/{bucket}/objects/{key}`; the tenant's
//! job-less objects: `/state/buckets/{bucket}/objects/{key}`. `PUT` stores (`?persist=true`,
//! `?ttl=30s`), `GET` reads (`?delete_after_read=true`), `HEAD` looks up, `DELETE` removes;
//! `GET` on a bucket lists a page of it (`?limit=`, `?cursor=`). Jobs: `POST /state/jobs
//! {"job"}`, `DELETE /state/jobs/{job}`.
//!
//! Tenants are hostile and the gateway is shared: a PUT's body is read only into room held
//! for it (see [`crate::room`]), and a listing costs a page, not the bucket.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Caller;
use super::error::ApiError;
use super::{Core, body};
use crate::function::deployment::parse_duration;
use crate::state::{MAX_PAGE, ObjectKey, PutOptions, TenantUsage};

/// The header that carries the cursor of a listing's next page.
const NEXT_CURSOR: &str = "x-sfaas-next-cursor";

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
    core.invoker.state.register_paced(&tenant, &request.job)?;
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
/// body is read: a value nobody may write, or one too large, is never buffered. The body is
/// read into room held for it ([`body::receive`]), given back once the value is stored.
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
    let declared = body::declared_length(&headers);
    // Refused before a byte of the body is read when the declared size (or, without one, an
    // empty value) cannot fit.
    let state = &core.invoker.state;
    if declared.is_none_or(|size| size <= max) {
        state.check_room(&tenant, &key, declared.unwrap_or(0))?;
    }
    let check = |size| state.check_room(&tenant, &key, size).map_err(ApiError::from);
    let incoming = body::Incoming { what: "the value", declared, max, stall: core.config.body_stall };
    let (value, _room) = body::receive(state.receiving(), &tenant, incoming, body, check).await?;
    state.put(&tenant, key, value, PutOptions { persist: query.persist, ttl })?;
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

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

/// `GET .../buckets/{bucket}`: a page of the bucket's objects in key order, a JSON array (at
/// most `?limit=`, 1000 by default and at most). When more follow, the `X-Sfaas-Next-Cursor`
/// header holds the cursor of the next page: the same request with `?cursor=` it.
pub async fn enumerate(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(path): Path<ObjectPath>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let tenant = caller.state_tenant(path.job.as_deref(), false, false)?;
    crate::state::ObjectKey::new(path.job.as_deref(), &path.bucket, "-")?;
    let limit = match query.limit.as_deref() {
        None => MAX_PAGE,
        Some(limit) => limit.parse::<usize>().ok().filter(|limit| *limit > 0).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "limit {limit:?} is not a whole number of objects from 1 (at most {MAX_PAGE})"
            ))
        })?,
    };
    let after = query.cursor.as_deref().map(cursor_key).transpose()?;
    let listing = core.invoker.state.enumerate(&tenant, path.job.as_deref(), &path.bucket, after.as_deref(), limit);
    let mut response = Json(listing.objects).into_response();
    if let Some(last) = listing.next_after {
        // Hex: a key may hold any text, a header only some.
        let cursor = hex::encode(last).parse().expect("hex is a valid header value");
        response.headers_mut().insert(NEXT_CURSOR, cursor);
    }
    Ok(response)
}

/// The key a listing's cursor goes on after.
fn cursor_key(cursor: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::BadRequest(format!("cursor {cursor:?} is not one a listing answered in {NEXT_CURSOR}"));
    let key = String::from_utf8(hex::decode(cursor).map_err(|_| invalid())?).map_err(|_| invalid())?;
    ObjectKey::new(None, "-", &key).map_err(|_| invalid())?;
    Ok(key)
}

/// `GET /state/usage`: the tenant's bytes and byte-seconds.
pub async fn usage(State(core): State<Arc<Core>>, caller: Caller) -> Result<Json<TenantUsage>, ApiError> {
    let tenant = caller.state_tenant(None, false, false)?;
    Ok(Json(core.invoker.state.usage(&tenant)))
}
