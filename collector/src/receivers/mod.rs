//! The receivers: each decodes its protocol, checks the sender, attributes every item to a
//! tenant, and hands rows to the pipeline.

pub mod jaeger_thrift;
pub mod otlp;
pub mod otlp_grpc;
pub mod otlp_http;
pub mod otlp_wire;
pub mod prometheus_names;
pub mod remote_write;
pub mod scrape;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use contract::semconv::HEADER_SCOPE_ORG_ID;

use crate::Collector;
use crate::auth::{AuthError, Sender, authenticate};
use crate::metrics::RejectLabels;
use crate::pipeline::SubmitError;

/// At most this much row data (as [`crate::model::Batch::bytes`] counts it) comes of one
/// request. A row holds its own copy of what its request shares (a resource, a scope, a
/// service or metric name, a series' labels): without a bound, a few megabytes of request
/// naming an 8 MiB resource once and a million empty spans would expand to terabytes.
pub const MAX_EXPANDED_BYTES: u64 = 64 << 20;

/// A request whose rows would hold more than [`MAX_EXPANDED_BYTES`]: refused whole (400).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the request expands to more than {} MiB of rows (what its items share, such as a resource, \
     scope, name or labels, is stored with each item): send fewer items per request, or smaller \
     shared attributes",
    MAX_EXPANDED_BYTES >> 20
)]
pub struct TooLarge;

/// The bytes of rows a request has expanded to so far.
#[derive(Debug, Default)]
pub(crate) struct Expansion(u64);

impl Expansion {
    /// Counts a row of `bytes`, made and not yet kept: an error once the request's rows are
    /// past [`MAX_EXPANDED_BYTES`], so that no more than one row is ever made beyond it.
    pub fn add(&mut self, bytes: u64) -> Result<(), TooLarge> {
        self.0 = self.0.saturating_add(bytes);
        if self.0 > MAX_EXPANDED_BYTES { Err(TooLarge) } else { Ok(()) }
    }
}

/// A plain-text answer; 503 carries `Retry-After`.
pub(crate) fn text(status: StatusCode, message: String) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        retry_after(&mut response, 1);
    }
    response
}

pub(crate) fn retry_after(response: &mut Response, seconds: u64) {
    response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
}

/// How a batch the pipeline refused is answered over HTTP: the status, the message, the
/// seconds to retry after, and the reason counted in `sfaas_collector_rejected_total`.
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub retry_after_secs: u64,
    pub reason: &'static str,
}

impl From<SubmitError> for Refusal {
    fn from(error: SubmitError) -> Self {
        let (status, retry_after_secs) = match &error {
            SubmitError::Quota { retry_after_secs, .. } => (StatusCode::TOO_MANY_REQUESTS, *retry_after_secs),
            SubmitError::Overloaded(_) | SubmitError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, 1),
        };
        Self { status, message: error.to_string(), retry_after_secs, reason: error.reason() }
    }
}

impl Refusal {
    /// A plain-text answer with `Retry-After`.
    pub fn text(self) -> Response {
        let mut response = (self.status, format!("{}\n", self.message)).into_response();
        retry_after(&mut response, self.retry_after_secs);
        response
    }
}

/// Checks the credentials of a receiver whose clients can send only Basic auth (Jaeger
/// exporters, Prometheus remote_write): the Basic user names the tenant, like `X-Scope-OrgID`,
/// and must agree with the token's tenant.
pub(crate) fn basic_or_bearer_sender(
    collector: &Collector,
    headers: &HeaderMap,
    signal: &'static str,
) -> Result<Sender, (StatusCode, String)> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let basic_user = get("authorization").and_then(contract::credentials).and_then(|c| c.basic_user);
    let org = get(HEADER_SCOPE_ORG_ID).map(str::to_string).or(basic_user);
    authenticate(collector.resolver.as_ref(), get("authorization"), org.as_deref()).map_err(|e| {
        collector.metrics.rejected.get_or_create(&RejectLabels { signal, reason: "unauthenticated" }).inc();
        let status =
            if matches!(e, AuthError::OrgMismatch { .. }) { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
        (status, e.to_string())
    })
}
