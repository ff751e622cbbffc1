//! Answers in Prometheus's JSON: the `success` and `error` envelopes and the query results as
//! serde types, with sample values, timestamps and label sets written as Prometheus writes them.

use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::eval::{Labels, QueryError};

/// A failed request, in Prometheus's error JSON.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
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
            QueryError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
        };
        Self { status, kind, message: error.to_string() }
    }
}

/// `{"status":"error","errorType":…,"error":…}`
#[derive(Serialize)]
struct Failure<'a> {
    status: &'static str,
    #[serde(rename = "errorType")]
    error_type: &'a str,
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "prometheus API request failed");
        }
        let body = Failure { status: "error", error_type: self.kind, error: &self.message };
        (self.status, json(&body)).into_response()
    }
}

pub(super) type ApiResult = Result<Response, ApiError>;

/// `{"status":"success","data":…,"warnings":[…]}` (no `warnings` when there are none).
#[derive(Serialize)]
struct Success<'a, T> {
    status: &'static str,
    data: T,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

pub(super) fn success(data: impl Serialize, warnings: &[String]) -> Response {
    json(&Success { status: "success", data, warnings })
}

fn json(body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        // Only a serializer's own error (a map key that is not a string) lands here: none of
        // the types above has one.
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// A query's result: `{"resultType":"matrix","result":[…]}` and its three siblings.
#[derive(Serialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
pub(super) enum QueryData<'a> {
    Scalar(Point<'a>),
    String(Point<'a>),
    Vector(Vec<VectorItem<'a>>),
    Matrix(Vec<MatrixItem<'a>>),
}

/// One element of an instant vector: `{"metric":{…},"value":[t,"v"]}`.
#[derive(Serialize)]
pub(super) struct VectorItem<'a> {
    pub(super) metric: LabelSet<'a>,
    pub(super) value: Point<'a>,
}

/// One series of a matrix: `{"metric":{…},"values":[[t,"v"],…]}`.
#[derive(Serialize)]
pub(super) struct MatrixItem<'a> {
    pub(super) metric: LabelSet<'a>,
    #[serde(serialize_with = "points")]
    pub(super) values: &'a [(i64, f64)],
}

pub(super) fn matrix(series: &[(Labels, Vec<(i64, f64)>)]) -> QueryData<'_> {
    QueryData::Matrix(series.iter().map(|(labels, values)| MatrixItem { metric: LabelSet(labels), values }).collect())
}

/// A label set as a JSON object, in its own order.
pub(super) struct LabelSet<'a>(pub(super) &'a [(String, String)]);

impl Serialize for LabelSet<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A sample as `[<seconds>, "<value>"]`: a number value is written as Prometheus writes it, a
/// string result as itself.
pub(super) enum Point<'a> {
    Number(i64, f64),
    Text(i64, &'a str),
}

impl Serialize for Point<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Point::Number(t, v) => (Seconds(t), format_value(v)).serialize(serializer),
            Point::Text(t, s) => (Seconds(t), s).serialize(serializer),
        }
    }
}

fn points<S: Serializer>(values: &&[(i64, f64)], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(values.iter().map(|&(t, v)| Point::Number(t, v)))
}

/// A timestamp in ms as float seconds, the way Prometheus writes it (`1435781451.781`, `4`).
struct Seconds(i64);

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0 % 1000 == 0 {
            serializer.serialize_i64(self.0 / 1000)
        } else {
            serializer.serialize_f64(self.0 as f64 / 1000.0)
        }
    }
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

/// `Server-Timing` (loading the data; everything), for clients and benchmarks.
pub(super) fn timed(mut response: Response, load: Duration, started: Instant) -> Response {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let value = format!("load;dur={:.1}, total;dur={:.1}", ms(load), ms(started.elapsed()));
    if let Ok(value) = header::HeaderValue::from_str(&value) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: impl Serialize) -> String {
        serde_json::to_string(&value).unwrap()
    }

    #[test]
    fn times_and_values_as_prometheus_writes_them() {
        assert_eq!(text(Seconds(4000)), "4");
        assert_eq!(text(Seconds(1435781451781)), "1435781451.781");
        assert_eq!(text(Seconds(1500)), "1.5");
        assert_eq!(text(Seconds(-1500)), "-1.5");
        assert_eq!(format_value(2.0), "2");
        assert_eq!(format_value(0.1), "0.1");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(1e21), "1000000000000000000000");
    }

    #[test]
    fn results_in_prometheus_envelopes() {
        let labels: Labels = std::sync::Arc::new(vec![("__name__".into(), "up".into()), ("job".into(), "a\"b".into())]);
        let series = vec![(labels.clone(), vec![(1000, 1.0), (1500, f64::INFINITY)])];
        assert_eq!(
            text(Success { status: "success", data: matrix(&series), warnings: &[] }),
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"__name__":"up","job":"a\"b"},"values":[[1,"1"],[1.5,"+Inf"]]}]}}"#
        );
        let vector = QueryData::Vector(vec![VectorItem { metric: LabelSet(&labels), value: Point::Number(2000, 0.5) }]);
        assert_eq!(
            text(vector),
            r#"{"resultType":"vector","result":[{"metric":{"__name__":"up","job":"a\"b"},"value":[2,"0.5"]}]}"#
        );
        assert_eq!(text(QueryData::String(Point::Text(3000, "x"))), r#"{"resultType":"string","result":[3,"x"]}"#);
        let warnings = ["results truncated due to limit".to_string()];
        assert_eq!(
            text(Success { status: "success", data: ["a"], warnings: &warnings }),
            r#"{"status":"success","data":["a"],"warnings":["results truncated due to limit"]}"#
        );
        assert_eq!(
            text(Failure { status: "error", error_type: "bad_data", error: "no \"x\"" }),
            r#"{"status":"error","errorType":"bad_data","error":"no \"x\""}"#
        );
    }
}
