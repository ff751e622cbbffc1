//! Function invocation over HTTP: `/function/*` (sync) and `/async-function/*` (queued); both
//! end in [`crate::invoker::Invoker::dispatch`].

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::auth::Caller;
use super::error::ApiError;
use super::{Core, body};
use crate::function::Invocation;
use crate::room::{Buffers, Held};
use crate::semconv;
use crate::tenant::{TenantId, validate_name};

/// Longest accepted `X-Call-Id`.
const MAX_CALL_ID_LEN: usize = 128;

/// Splits `NAME` or `NAME.NAMESPACE`.
fn split_name(qualified: &str) -> Result<(&str, Option<&str>), ApiError> {
    let (name, namespace) = match qualified.split_once('.') {
        Some((name, namespace)) => (name, Some(namespace)),
        None => (qualified, None),
    };
    validate_name("function", name)?;
    if let Some(namespace) = namespace {
        validate_name("namespace", namespace)?;
    }
    Ok((name, namespace))
}

/// The caller's `X-Call-Id`, or a new one (a UUIDv7).
fn call_id(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(semconv::HEADER_CALL_ID) {
        None => Ok(crate::invoker::new_uuid_v7().to_string()),
        Some(value) => {
            let id = value.to_str().map_err(|_| ApiError::BadRequest("X-Call-Id is not visible ASCII".into()))?;
            if id.is_empty() || id.len() > MAX_CALL_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::BadRequest(format!(
                    "X-Call-Id must be 1 to {MAX_CALL_ID_LEN} visible ASCII characters"
                )));
            }
            Ok(id.to_string())
        }
    }
}

/// Builds the invocation handed to a function: the caller's credentials are not forwarded.
fn invocation(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    rest: Option<String>,
    body: Bytes,
) -> Result<Invocation, ApiError> {
    let call_id = call_id(headers)?;
    let forwarded = headers
        .iter()
        .filter(|(name, _)| *name != axum::http::header::AUTHORIZATION && *name != axum::http::header::COOKIE)
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
        .filter(|(name, _)| name != semconv::HEADER_CALL_ID)
        .chain(std::iter::once((semconv::HEADER_CALL_ID.to_string(), call_id.clone())))
        .collect();
    Ok(Invocation {
        call_id,
        method: method.as_str().to_string(),
        path: format!("/{}", rest.unwrap_or_default()),
        query: uri.query().unwrap_or_default().to_string(),
        headers: forwarded,
        body,
        traceparent: headers.get(semconv::HEADER_TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_string),
        job: None,
    })
}

/// Reads a call's body into the invocations' room (see [`crate::room`]).
pub(super) async fn receive(
    core: &Core,
    tenant: &TenantId,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, Held), ApiError> {
    let incoming = body::Incoming {
        what: "the request body",
        declared: body::declared_length(headers),
        max: core.config.max_body_bytes as u64,
        stall: core.config.body_stall,
    };
    body::receive(&core.invoker.buffers, tenant, incoming, body, |_| Ok(())).await
}

/// A response's body that keeps its invocation's buffers held until it is sent: handed over
/// in chunks, as the connection takes them, so the room is given back with the last one.
struct HeldBody {
    body: Bytes,
    _buffers: Arc<Buffers>,
}

/// Bytes handed to the connection at a time.
const CHUNK: usize = 256 << 10;

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let len = self.body.len().min(CHUNK);
        std::task::Poll::Ready((len > 0).then(|| Ok(http_body::Frame::data(self.body.split_to(len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.body.len() as u64)
    }
}

/// `ANY /function/{name}[/{*rest}]`: a synchronous call.
pub async fn call(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(params): Path<Vec<(String, String)>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (name, tenant, rest) = target(&caller, params)?;
    let name = name.as_str();
    let (body, held) = receive(&core, &tenant, &headers, body).await?;
    let invocation = invocation(&method, &uri, &headers, rest, body)?;
    let call_id = invocation.call_id.clone();
    let started = Instant::now();
    let (outcome, buffers) = core.invoker.dispatch_held(&tenant, name, invocation, semconv::TRIGGER_HTTP, held).await;
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, Body::new(HeldBody { body: outcome.body, _buffers: buffers })).into_response();
    let response_headers = response.headers_mut();
    for (key, value) in outcome.headers {
        if let (Ok(key), Ok(value)) = (key.parse::<axum::http::HeaderName>(), value.parse()) {
            response_headers.insert(key, value);
        }
    }
    response_headers.insert(semconv::HEADER_CALL_ID, call_id.parse().expect("validated call id"));
    response_headers.insert(
        semconv::HEADER_DURATION_SECONDS,
        format!("{:.6}", started.elapsed().as_secs_f64()).parse().expect("number"),
    );
    Ok(response)
}

/// `POST /async-function/{name}[/{*rest}]`: queued durably, answered 202 with `X-Call-Id`.
pub async fn call_async(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(params): Path<Vec<(String, String)>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (name, tenant, rest) = target(&caller, params)?;
    let name = name.as_str();
    if core.invoker.functions.get(&tenant, name).is_none() {
        return Err(ApiError::NotFound(format!("function {name} not found in namespace {tenant}")));
    }
    let (body, _held) = receive(&core, &tenant, &headers, body).await?;
    let callback = match headers.get(semconv::HEADER_CALLBACK_URL) {
        None => None,
        Some(value) => {
            let url = value.to_str().map_err(|_| ApiError::BadRequest("X-Callback-Url is not ASCII".into()))?;
            if reqwest::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                return Err(ApiError::BadRequest(format!("X-Callback-Url {url:?} is not an http(s) URL")));
            }
            Some(url.to_string())
        }
    };
    let invocation = invocation(&method, &uri, &headers, rest, body)?;
    let call_id = invocation.call_id.clone();
    core.queue.enqueue(&tenant, name, &invocation, callback.as_deref()).await?;
    let mut response = StatusCode::ACCEPTED.into_response();
    response.headers_mut().insert(semconv::HEADER_CALL_ID, call_id.parse().expect("validated call id"));
    Ok(response)
}

/// The function a call names (`NAME` or `NAME.NAMESPACE`), its tenant, and the rest of the path.
fn target(caller: &Caller, params: Vec<(String, String)>) -> Result<(String, TenantId, Option<String>), ApiError> {
    let (qualified, rest) = path_params(params);
    caller.require_write()?;
    let (name, namespace) = split_name(&qualified)?;
    let tenant = caller.namespace(namespace)?;
    Ok((name.to_string(), tenant, rest))
}

fn path_params(params: Vec<(String, String)>) -> (String, Option<String>) {
    let mut name = String::new();
    let mut rest = None;
    for (key, value) in params {
        match key.as_str() {
            "name" => name = value,
            "rest" => rest = Some(value),
            _ => {}
        }
    }
    (name, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_call_id_is_a_uuid_v7_of_now_and_a_given_one_is_kept() {
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let (a, b) = (call_id(&HeaderMap::new()).unwrap(), call_id(&HeaderMap::new()).unwrap());
        let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        assert_ne!(a, b);
        let id = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(id.get_version_num(), 7);
        let (seconds, nanos) = id.get_timestamp().unwrap().to_unix();
        let millis = seconds * 1000 + u64::from(nanos) / 1_000_000;
        assert!((before..=after).contains(&millis), "{millis} not in {before}..={after}");

        let mut headers = HeaderMap::new();
        headers.insert(semconv::HEADER_CALL_ID, "order-42".parse().unwrap());
        assert_eq!(call_id(&headers).unwrap(), "order-42");
    }
}
