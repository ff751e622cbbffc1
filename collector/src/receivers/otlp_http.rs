//! OTLP/HTTP: `POST /v1/traces`, `/v1/metrics`, `/v1/logs`, protobuf or JSON, optionally gzip.
//!
//! Status codes as the OTLP specification gives them: 200 (with `partial_success` when some
//! items were refused), 400 for undecodable data, 401 without a valid token, 413 over the size
//! limit, 415 for other content types, 503 with `Retry-After` when the ingest queue is full.
//! Errors carry a `google.rpc.Status` in the request's encoding.

use std::io::Read;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Refusal;
use super::otlp::{self, Converted};
use crate::Collector;
use crate::auth::authenticate_http;
use crate::metrics::{RejectLabels, SignalLabels};

/// `google.rpc.Status`, the error body OTLP/HTTP specifies.
#[derive(Clone, PartialEq, Message, Serialize)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Encoding {
    Protobuf,
    Json,
}

/// The request's encoding, from its content type.
fn encoding(headers: &HeaderMap) -> Result<Encoding, String> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    match mime {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        other => Err(format!("unsupported content type {other:?}: use application/x-protobuf or application/json")),
    }
}

fn error(encoding: Encoding, status: StatusCode, code: i32, message: String) -> Response {
    let body = RpcStatus { code, message };
    let mut response = match encoding {
        Encoding::Protobuf => {
            (status, [(header::CONTENT_TYPE, "application/x-protobuf")], body.encode_to_vec()).into_response()
        }
        Encoding::Json => {
            (status, [(header::CONTENT_TYPE, "application/json")], serde_json::to_vec(&body).expect("json"))
                .into_response()
        }
    };
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, "1".parse().expect("ascii"));
    }
    response
}

/// The answer to a request the pipeline refused (`reject` counts it).
fn refuse<T>(
    encoding: Encoding,
    refused: crate::pipeline::SubmitError,
    reject: impl Fn(&'static str) -> T,
) -> Response {
    let refusal = Refusal::from(refused);
    reject(refusal.reason);
    // 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE.
    let code = if refusal.status == StatusCode::TOO_MANY_REQUESTS { 8 } else { 14 };
    let mut response = error(encoding, refusal.status, code, refusal.message);
    super::retry_after(&mut response, refusal.retry_after_secs);
    response
}

/// The body, gunzipped when `Content-Encoding: gzip`, never beyond `limit` bytes.
fn body(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, (StatusCode, String)> {
    match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => Ok(body),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid gzip body: {e}")))?;
            if out.len() > limit {
                return Err((StatusCode::PAYLOAD_TOO_LARGE, format!("decompressed body is larger than {limit} bytes")));
            }
            Ok(Bytes::from(out))
        }
        Some(other) => Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("unsupported content encoding {other:?}"))),
    }
}

pub(crate) fn decode<T: Message + Default + DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, String> {
    match encoding {
        Encoding::Protobuf => T::decode(bytes).map_err(|e| format!("invalid protobuf: {e}")),
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| format!("invalid OTLP JSON: {e}")),
    }
}

fn encode<T: Message + Serialize>(encoding: Encoding, message: &T) -> Response {
    match encoding {
        Encoding::Protobuf => {
            ([(header::CONTENT_TYPE, "application/x-protobuf")], message.encode_to_vec()).into_response()
        }
        Encoding::Json => {
            ([(header::CONTENT_TYPE, "application/json")], serde_json::to_vec(message).expect("json")).into_response()
        }
    }
}

/// The shared path: encoding → body → auth → decode → attribute → store → answer.
async fn receive<Resp>(
    collector: &Collector,
    signal: &'static str,
    headers: &HeaderMap,
    raw: Bytes,
    convert: impl FnOnce(Encoding, &[u8], &crate::auth::Sender) -> Result<Converted, String>,
    respond: fn(&Converted) -> Resp,
) -> Response
where
    Resp: Message + Serialize,
{
    let encoding = match encoding(headers) {
        Ok(encoding) => encoding,
        Err(message) => return error(Encoding::Protobuf, StatusCode::UNSUPPORTED_MEDIA_TYPE, 3, message),
    };
    let reject =
        |reason: &'static str| collector.metrics.rejected.get_or_create(&RejectLabels { signal, reason }).inc();
    let sender = match authenticate_http(collector.resolver.as_ref(), headers) {
        Ok(sender) => sender,
        Err(e) => {
            reject("unauthenticated");
            let (status, code) = match e {
                crate::auth::AuthError::OrgMismatch { .. } => (StatusCode::FORBIDDEN, 7),
                _ => (StatusCode::UNAUTHORIZED, 16),
            };
            return error(encoding, status, code, e.to_string());
        }
    };
    if let Err(refused) = collector.pipeline.precheck(sender.source(), signal == "metrics") {
        return refuse(encoding, refused, reject);
    }
    let bytes = match body(headers, raw, collector.config.max_body_bytes) {
        Ok(bytes) => bytes,
        Err((status, message)) => return error(encoding, status, 3, message),
    };
    let mut converted = match convert(encoding, &bytes, &sender) {
        Ok(converted) => converted,
        Err(message) => {
            reject("invalid");
            return error(encoding, StatusCode::BAD_REQUEST, 3, message);
        }
    };
    if converted.rejected > 0 {
        collector
            .metrics
            .rejected
            .get_or_create(&RejectLabels { signal, reason: "tenant_or_data" })
            .inc_by(converted.rejected);
    }
    let items = converted.batch.len() as u64;
    match collector.pipeline.submit(std::mem::take(&mut converted.batch), sender.source()).await {
        Ok(_) => {
            collector.metrics.accepted.get_or_create(&SignalLabels { signal, protocol: "otlp_http" }).inc_by(items);
            encode(encoding, &respond(&converted))
        }
        Err(refused) => refuse(encoding, refused, reject),
    }
}

pub async fn traces(State(collector): State<Arc<Collector>>, headers: HeaderMap, raw: Bytes) -> Response {
    // Protobuf is read straight into span rows; JSON through prost's structs.
    let convert = |encoding, bytes: &[u8], sender: &_| match encoding {
        Encoding::Protobuf => otlp::traces_from_protobuf(bytes, sender).map_err(|e| e.to_string()),
        Encoding::Json => {
            otlp::traces(decode::<ExportTraceServiceRequest>(encoding, bytes)?, sender).map_err(|e| e.to_string())
        }
    };
    receive(&collector, "traces", &headers, raw, convert, |c| ExportTraceServiceResponse {
        partial_success: (c.rejected > 0)
            .then(|| ExportTracePartialSuccess { rejected_spans: c.rejected as i64, error_message: c.message() }),
    })
    .await
}

pub async fn metrics(State(collector): State<Arc<Collector>>, headers: HeaderMap, raw: Bytes) -> Response {
    let names = collector.config.metric_names;
    let convert = move |encoding, bytes: &[u8], sender: &_| {
        otlp::metrics(decode(encoding, bytes)?, sender, names).map_err(|e| e.to_string())
    };
    receive(&collector, "metrics", &headers, raw, convert, |c| ExportMetricsServiceResponse {
        partial_success: (c.rejected > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: c.rejected as i64,
            error_message: c.message(),
        }),
    })
    .await
}

pub async fn logs(State(collector): State<Arc<Collector>>, headers: HeaderMap, raw: Bytes) -> Response {
    let convert =
        |encoding, bytes: &[u8], sender: &_| otlp::logs(decode(encoding, bytes)?, sender).map_err(|e| e.to_string());
    receive(&collector, "logs", &headers, raw, convert, |c| ExportLogsServiceResponse {
        partial_success: (c.rejected > 0)
            .then(|| ExportLogsPartialSuccess { rejected_log_records: c.rejected as i64, error_message: c.message() }),
    })
    .await
}
