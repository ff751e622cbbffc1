//! Answers in Prometheus's JSON: the `success` and `error` envelopes (built as text), sample
//! values, timestamps and label sets as Prometheus writes them.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::eval::{Labels, QueryError};

/// A failed request, in Prometheus's error JSON.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn bad_data(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "bad_data", message: message.into() }
    }

    pub(super) fn param(name: &str, error: impl std::fmt::Display) -> Self {
        Self::bad_data(format!("invalid parameter {name:?}: {error}"))
    }

    /// Prometheus's answer to a query past its timeout: 503, `timeout`.
    pub(super) fn timeout(message: &str) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, kind: "timeout", message: message.into() }
    }
}

impl From<QueryError> for ApiError {
    fn from(error: QueryError) -> Self {
        let (status, kind) = match &error {
            QueryError::BadData(_) => (StatusCode::BAD_REQUEST, "bad_data"),
            QueryError::Execution(_) | QueryError::Unsupported(_) => (StatusCode::UNPROCESSABLE_ENTITY, "execution"),
            QueryError::Store(_) | QueryError::Billing(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self { status, kind, message: error.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "prometheus API request failed");
        }
        let body = format!(
            "{{\"status\":\"error\",\"errorType\":{},\"error\":{}}}",
            json_string(self.kind),
            json_string(&self.message)
        );
        (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

pub(super) type ApiResult = Result<Response, ApiError>;

/// `{"status":"success","data":<data>}` with `data` already JSON.
pub(super) fn success(data: String, warnings: &[String]) -> Response {
    let mut body = format!("{{\"status\":\"success\",\"data\":{data}");
    if !warnings.is_empty() {
        let list: Vec<String> = warnings.iter().map(|w| json_string(w)).collect();
        let _ = write!(body, ",\"warnings\":[{}]", list.join(","));
    }
    body.push('}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(super) fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// A sample value as Prometheus writes it (Go's `FormatFloat(v, 'f', -1, 64)`).
pub(super) fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// A timestamp in ms as float seconds (`1435781451.781`, `4`).
fn format_time(ms: i64) -> String {
    if ms < 0 {
        return format!("{}", ms as f64 / 1000.0);
    }
    let (secs, frac) = (ms / 1000, ms % 1000);
    if frac == 0 { secs.to_string() } else { format!("{secs}.{}", format!("{frac:03}").trim_end_matches('0')) }
}

pub(super) fn labels_json(labels: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(k));
        out.push(':');
        out.push_str(&json_string(v));
    }
    out.push('}');
    out
}

pub(super) fn pair(t: i64, v: &str) -> String {
    format!("[{},{}]", format_time(t), json_string(v))
}

/// `Server-Timing` (loading the data; everything), for clients and benchmarks.
pub(super) fn timed(mut response: Response, load: Duration, started: Instant) -> Response {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let value = format!("load;dur={:.1}, total;dur={:.1}", ms(load), ms(started.elapsed()));
    if let Ok(value) = header::HeaderValue::from_str(&value) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

pub(super) fn matrix_items(series: &[(Labels, Vec<(i64, f64)>)]) -> String {
    let mut out = String::new();
    for (i, (labels, values)) in series.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"metric\":{},\"values\":[", labels_json(labels));
        for (j, (t, v)) in values.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&pair(*t, &format_value(*v)));
        }
        out.push_str("]}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_values_as_prometheus_writes_them() {
        assert_eq!(format_time(4000), "4");
        assert_eq!(format_time(1435781451781), "1435781451.781");
        assert_eq!(format_time(1500), "1.5");
        assert_eq!(format_value(2.0), "2");
        assert_eq!(format_value(0.1), "0.1");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(1e21), "1000000000000000000000");
    }
}
