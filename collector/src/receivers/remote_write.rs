//! Prometheus remote_write 1.0: `POST /api/v1/write`, a snappy-compressed (block format)
//! protobuf `WriteRequest`.
//!
//! Prometheus sends no custom headers on remote_write: the tenant comes from its credentials
//! (`basic_auth` with the tenant as user and the token as password, or `authorization`). 204 on
//! success; 400 for data Prometheus must not retry; 401/403; 413; 503 + `Retry-After` when the
//! queue is full (Prometheus retries).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prost::Message;

use super::Refusal;
use super::{Expansion, TooLarge, basic_or_bearer_sender, text};
use crate::Collector;
use crate::metrics::{RejectLabels, SignalLabels};
use crate::model::{Batch, SampleRow};

/// `prometheus.WriteRequest` (the fields remote_write 1.0 uses).
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The NaN Prometheus writes as a staleness marker.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// Decodes a remote_write body: snappy block, then protobuf.
pub fn decode(body: &[u8], limit: usize) -> Result<WriteRequest, (StatusCode, String)> {
    let length =
        snap::raw::decompress_len(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid snappy body: {e}")))?;
    if length > limit {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("decompressed body of {length} bytes is larger than {limit}"),
        ));
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid snappy body: {e}")))?;
    WriteRequest::decode(raw.as_slice())
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid WriteRequest protobuf: {e}")))
}

/// Why a request's samples are refused whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("{0} samples belong to series without __name__")]
    Unnamed(usize),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

/// The samples of a decoded request, for `tenant`, or why the request is refused whole.
/// Staleness markers are stored as markers ([`crate::model::STALE_MARKER`]).
pub(crate) fn samples(request: WriteRequest, tenant: &str, metered: bool) -> Result<Batch, Refused> {
    let mut batch = Batch::default();
    let mut expansion = Expansion::default();
    let mut unnamed = 0;
    for series in request.timeseries {
        let mut labels: BTreeMap<String, String> = series.labels.into_iter().map(|l| (l.name, l.value)).collect();
        let Some(name) = labels.remove("__name__") else {
            unnamed += series.samples.len();
            continue;
        };
        let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
        let labels = serde_json::to_string(&labels).expect("json");
        for sample in series.samples {
            let ts_ns = sample.timestamp.saturating_mul(1_000_000);
            let row = if sample.value.to_bits() == STALE_NAN {
                SampleRow::stale(tenant.to_string(), name.clone(), labels.clone(), kind, ts_ns, metered)
            } else {
                SampleRow {
                    tenant: tenant.to_string(),
                    metric: name.clone(),
                    labels: labels.clone(),
                    kind,
                    ts_ns,
                    value: sample.value,
                    histogram: None,
                    metered,
                }
            };
            expansion.add(row.bytes())?;
            batch.samples.push(row);
        }
    }
    if unnamed > 0 {
        return Err(Refused::Unnamed(unnamed));
    }
    Ok(batch)
}

/// `POST /api/v1/write`.
pub async fn write(State(collector): State<Arc<Collector>>, headers: HeaderMap, body: Bytes) -> Response {
    let reject = |reason: &'static str| {
        collector.metrics.rejected.get_or_create(&RejectLabels { signal: "metrics", reason }).inc()
    };
    let sender = match basic_or_bearer_sender(&collector, &headers, "metrics") {
        Ok(sender) => sender,
        Err((status, message)) => return text(status, message),
    };
    if let Err(refused) = collector.pipeline.precheck(sender.source(), true) {
        let refusal = Refusal::from(refused);
        reject(refusal.reason);
        return refusal.text();
    }
    let (tenant, metered) = match sender.tenant_for(None) {
        Ok(attribution) => attribution,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let request = match decode(&body, collector.config.max_body_bytes) {
        Ok(request) => request,
        Err((status, message)) => {
            reject("invalid");
            return text(status, message);
        }
    };
    let batch = match samples(request, &tenant, metered) {
        Ok(batch) => batch,
        Err(refused) => {
            reject("invalid");
            return text(StatusCode::BAD_REQUEST, refused.to_string());
        }
    };
    let items = batch.len() as u64;
    match collector.pipeline.submit(batch, sender.source()).await {
        Ok(_) => {
            collector
                .metrics
                .accepted
                .get_or_create(&SignalLabels { signal: "metrics", protocol: "remote_write" })
                .inc_by(items);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => {
            let refusal = Refusal::from(error);
            reject(refusal.reason);
            refusal.text()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_markers_are_kept_as_markers() {
        let series = |name: &str| TimeSeries {
            labels: vec![Label { name: "__name__".into(), value: name.into() }],
            samples: vec![
                Sample { value: 1.0, timestamp: 1_000 },
                Sample { value: f64::from_bits(STALE_NAN), timestamp: 2_000 },
            ],
        };
        let request = WriteRequest { timeseries: vec![series("up")] };
        let batch = samples(request, "acme", false).unwrap();
        let rows: Vec<(i64, bool)> = batch.samples.iter().map(|s| (s.ts_ns, s.is_stale())).collect();
        assert_eq!(rows, vec![(1_000_000_000, false), (2_000_000_000, true)]);
    }
}
