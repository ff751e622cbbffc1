//! Function invocation: `/function/*` (sync), `/async-function/*` (queued), and the one
//! `dispatch` path that both use, which enforces limits, runs the function and records the
//! span and the metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::Core;
use super::auth::Caller;
use super::error::ApiError;
use crate::function::{Invocation, Outcome, RunContext, Target, Usage};
use crate::semconv;
use crate::telemetry;
use crate::tenant::{TenantId, validate_name};

/// Longest accepted `X-Call-Id`.
const MAX_CALL_ID_LEN: usize = 128;

/// Runs one invocation of `function` for `tenant`: the path every trigger takes.
pub async fn dispatch(
    core: &Core,
    tenant: &TenantId,
    function_name: &str,
    mut invocation: Invocation,
    trigger: &'static str,
) -> Outcome {
    let Some(function) = core.functions.get(tenant, function_name) else {
        return Outcome::text(
            404,
            format!("function {function_name} not found in namespace {tenant}\n"),
            Usage::default(),
        );
    };
    let started = Instant::now();
    let Some(_permit) = function.try_begin() else {
        core.metrics.record_invocation(tenant, function_name, 429, started.elapsed().as_secs_f64(), &Usage::default());
        return Outcome::text(
            429,
            format!(
                "function {function_name} already has {} calls in flight (max_inflight)\n",
                function.spec.limits.max_inflight
            ),
            Usage::default(),
        );
    };
    let _inflight = core.metrics.begin_inflight(tenant, function_name);
    let bytes_in = invocation.body.len();

    let parent = telemetry::extract_parent(invocation.traceparent.as_deref());
    let span = core.telemetry.start_invocation(tenant, &parent);
    // This execution's own id, the billing key of its usage: a caller's `X-Call-Id` repeats
    // (retries, async attempts, a caller reusing one), an execution's id never does.
    let execution_id = new_uuid_v7();
    // Handed to process functions (header or `TRACEPARENT`); builtins do not read it.
    if let Some(span) = &span
        && !matches!(function.spec.target, Target::Builtin { .. })
    {
        invocation.traceparent = Some(telemetry::traceparent(span.span_context()));
    }

    // Only processes the platform runs get a state token; builtins use the store in process.
    let state_token = matches!(function.spec.target, Target::Exec { .. } | Target::Managed { .. })
        .then(|| core.tenants.issue_function_token(tenant, invocation.job.as_deref()));
    let context = RunContext {
        outbound: &core.outbound,
        tenant,
        state: &core.state,
        state_addresses: core.functions.state_addresses.get(),
        state_token: state_token.as_ref().map_or("", |t| t.token.as_str()),
        etl: &core.config.etl,
    };
    let mut still_running = None;
    let outcome = match function.run(&context, &invocation).await {
        Ok(outcome) => outcome,
        Err(mut error) => {
            tracing::warn!(%tenant, function = function_name, call_id = %invocation.call_id, %execution_id, %error, "invocation failed");
            if let crate::function::FunctionError::Timeout { still_running: running, .. } = &mut error {
                still_running = running.take();
            }
            Outcome::text(error.status(), format!("{error}\n"), error.usage())
        }
    };
    let wall = started.elapsed();
    core.metrics.record_invocation(tenant, function_name, outcome.status, wall.as_secs_f64(), &outcome.usage);

    let Some(span) = span else { return outcome };
    let kind = function.spec.kind.as_str();
    let bytes_out = outcome.body.len();
    match still_running {
        None => span.end(&telemetry::Invoked {
            function: function_name,
            kind,
            execution_id,
            call_id: &invocation.call_id,
            trigger,
            job: invocation.job.as_deref(),
            usage: &outcome.usage,
            wall,
            bytes_in,
            bytes_out,
            status: outcome.status,
        }),
        // A builtin past its timeout still runs: its span (and so its bill) waits for its CPU.
        Some(running) => {
            let (function, call_id, job, status) =
                (function_name.to_string(), invocation.call_id.clone(), invocation.job.clone(), outcome.status);
            let mut usage = outcome.usage;
            tokio::spawn(async move {
                usage.cpu_ns = running.await.unwrap_or(0);
                span.end(&telemetry::Invoked {
                    function: &function,
                    kind,
                    execution_id,
                    call_id: &call_id,
                    trigger,
                    job: job.as_deref(),
                    usage: &usage,
                    wall,
                    bytes_in,
                    bytes_out,
                    status,
                });
            });
        }
    }
    outcome
}

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

/// A new UUIDv7, ordered by time like the flow runs' ids, so that billing's usage records
/// (keyed by tenant and execution id) are appended per tenant instead of inserted at random
/// places in a large B-tree. Its random bits come from the thread's generator (`rand`), not a
/// `getrandom` system call per request as `Uuid::now_v7` does.
fn new_uuid_v7() -> uuid::Uuid {
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    uuid::Builder::from_unix_timestamp_millis(millis.as_millis() as u64, &rand::random()).into_uuid()
}

/// The caller's `X-Call-Id`, or a new one (a UUIDv7).
fn call_id(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(semconv::HEADER_CALL_ID) {
        None => Ok(new_uuid_v7().to_string()),
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

/// `ANY /function/{name}[/{*rest}]`: a synchronous call.
pub async fn call(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Path(params): Path<Vec<(String, String)>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (name, tenant, rest) = target(&caller, params)?;
    let name = name.as_str();
    let invocation = invocation(&method, &uri, &headers, rest, body)?;
    let call_id = invocation.call_id.clone();
    let started = Instant::now();
    let outcome = dispatch(&core, &tenant, name, invocation, semconv::TRIGGER_HTTP).await;
    let mut response =
        (StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::BAD_GATEWAY), outcome.body).into_response();
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
    body: Bytes,
) -> Result<Response, ApiError> {
    let (name, tenant, rest) = target(&caller, params)?;
    let name = name.as_str();
    if core.functions.get(&tenant, name).is_none() {
        return Err(ApiError::NotFound(format!("function {name} not found in namespace {tenant}")));
    }
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
