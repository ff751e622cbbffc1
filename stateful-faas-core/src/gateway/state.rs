//! `/state/*`: the state store over HTTP, for functions in any language.
//!
//! Objects of a job: `/state/jobs/{job}/buckets/{bucket}/objects/{key}`; the tenant's
//! job-less objects: `/state/buckets/{bucket}/objects/{key}`. `PUT` stores (`?persist=true`,
//! `?ttl=30s`), `GET` reads (`?delete_after_read=true`), `HEAD` looks up, `DELETE` removes;
//! `GET` on a bucket lists a page of it (`?limit=`, `?cursor=`). Jobs: `POST /state/jobs
//! {"job"}`, `DELETE /state/jobs/{job}`.
//!
//! Tenants are hostile and the gateway is shared: a PUT's body is read only into room held
//! for it (see [`crate::state::receiving`]), and a listing costs a page, not the bucket.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::Core;
use super::auth::Caller;
use super::error::ApiError;
use crate::function::deployment::parse_duration;
use crate::state::receiving::{Held, ReceiveError};
use crate::state::{MAX_PAGE, ObjectKey, PutOptions, StateStore, TenantUsage};
use crate::tenant::TenantId;

/// How long a PUT's body may send nothing before it is refused (nginx's `client_body_timeout`).
const STALL: Duration = Duration::from_secs(60);

/// Room a body of unknown length holds first; it doubles as the body grows.
const FIRST_ROOM: u64 = 64 << 10;

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
/// body is read: a value nobody may write, or one too large, is never buffered. The body is
/// read into room held for it ([`receive`]), given back once the value is stored.
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
    // Refused before a byte of the body is read when the declared size (or, without one, an
    // empty value) cannot fit.
    let state = &core.invoker.state;
    state.check_room(&tenant, &key, declared.unwrap_or(0))?;
    let (value, _room) = receive(state, &tenant, &key, declared, body).await?;
    state.put(&tenant, key, value, PutOptions { persist: query.persist, ttl })?;
    Ok(StatusCode::CREATED)
}

/// Reads a PUT's body into room held for it: a declared length holds all of it before the
/// first byte is read (waiting for room: backpressure); a body of unknown length holds room as
/// its buffer doubles, refused when there is no more (429) or it passes the largest value
/// (413) or the quota (507). The room is held until the returned [`Held`] is dropped.
async fn receive(
    state: &StateStore,
    tenant: &TenantId,
    key: &ObjectKey,
    declared: Option<u64>,
    mut body: axum::body::Body,
) -> Result<(Bytes, Held), ApiError> {
    let max = state.config().max_value_bytes;
    let room = state.receiving();
    let first = declared.unwrap_or(FIRST_ROOM.min(max));
    let mut held = room.hold(tenant, first).await?;
    let mut buffer: Vec<u8> = Vec::with_capacity(first as usize);
    loop {
        let frame = match tokio::time::timeout(STALL, body.frame()).await {
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "the body sent nothing for {}s after {} bytes",
                    STALL.as_secs(),
                    buffer.len()
                )));
            }
            Ok(None) => break,
            Ok(Some(frame)) => {
                frame.map_err(|error| ApiError::BadRequest(format!("the body is unreadable: {error}")))?
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        let needed = (buffer.len() + data.len()) as u64;
        if needed > max {
            return Err(ApiError::PayloadTooLarge(format!("the value is over the largest value, {max} bytes")));
        }
        if needed > buffer.capacity() as u64 {
            let grown = needed.max(2 * buffer.capacity() as u64).min(max);
            state.check_room(tenant, key, needed)?;
            room.grow(&mut held, grown)?;
            buffer.reserve_exact(grown as usize - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    // A stored value keeps its allocation: no room beyond its bytes.
    buffer.shrink_to_fit();
    Ok((Bytes::from(buffer), held))
}

impl From<ReceiveError> for ApiError {
    fn from(error: ReceiveError) -> Self {
        ApiError::TooManyRequests(error.to_string())
    }
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
