//! OTLP requests → rows, per resource: resolve the tenant, validate, convert. Shared by the
//! HTTP and gRPC receivers.

use std::collections::BTreeMap;

use serde::ser::{Serialize, SerializeMap, Serializer};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::prometheus_names::{self, Kind, MetricNames};
use super::{Expansion, TooLarge};
use crate::auth::Sender;
use crate::model::{Batch, LogRow, SampleRow, SpanRow};

/// What a request yields: the accepted rows, and how many items were rejected and why.
#[derive(Debug, Default)]
pub struct Converted {
    pub batch: Batch,
    /// What the rows so far hold (bounded: [`super::MAX_EXPANDED_BYTES`]).
    expansion: Expansion,
    pub rejected: u64,
    /// Distinct reasons, for `partial_success.error_message`.
    pub reasons: Vec<String>,
}

impl Converted {
    fn push_span(&mut self, row: SpanRow) -> Result<(), TooLarge> {
        self.expansion.add(row.bytes())?;
        self.batch.spans.push(row);
        Ok(())
    }

    fn push_sample(&mut self, row: SampleRow) -> Result<(), TooLarge> {
        self.expansion.add(row.bytes())?;
        self.batch.samples.push(row);
        Ok(())
    }

    fn push_log(&mut self, row: LogRow) -> Result<(), TooLarge> {
        self.expansion.add(row.bytes())?;
        self.batch.logs.push(row);
        Ok(())
    }

    fn reject(&mut self, count: usize, reason: String) {
        if count == 0 {
            return;
        }
        self.rejected += count as u64;
        if !self.reasons.contains(&reason) && self.reasons.len() < 10 {
            self.reasons.push(reason);
        }
    }

    /// The partial-success message, when something was rejected.
    pub fn message(&self) -> String {
        self.reasons.join("; ")
    }
}

/// JSON text of a value that always serializes.
fn json_text(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("attributes serialize to JSON")
}

/// An attribute value as JSON text, or the string itself for a string (label values, log bodies).
fn plain_text(any: Option<&AnyValue>) -> String {
    match any {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) => s.clone(),
        Some(any) => json_text(&Any(&value(any))),
        None => "null".into(),
    }
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Bytes as lowercase hex (`hex::encode` builds its string a `char` at a time: slower, per id).
pub fn lower_hex(bytes: &[u8]) -> String {
    let mut text = vec![0; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut text).expect("twice as long");
    String::from_utf8(text).expect("hex digits are ASCII")
}

/// A non-zero id of `len` bytes, as lowercase hex.
fn id_hex(bytes: &[u8], len: usize) -> Option<String> {
    (bytes.len() == len && bytes.iter().any(|&b| b != 0)).then(|| lower_hex(bytes))
}

/// OTLP's unsigned nanoseconds as the store's signed ones: times past 2262 (any `u64` a sender
/// writes) saturate at `i64::MAX` rather than wrap to before 1970.
fn unix_ns(ns: u64) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

/// A trace request as the conversion reads it, borrowing from prost's message or straight
/// from the body ([`super::otlp_wire`]). Only the fields the conversion uses.
#[derive(Debug, Default)]
pub struct Request<'a> {
    pub resource_spans: Vec<ResourceSpans<'a>>,
}

#[derive(Debug, Default)]
pub struct ResourceSpans<'a> {
    pub resource_attributes: Vec<Kv<'a>>,
    pub scope_spans: Vec<ScopeSpans<'a>>,
}

#[derive(Debug, Default)]
pub struct ScopeSpans<'a> {
    /// The scope's (name, version), when the request has a scope.
    pub scope: Option<(&'a str, &'a str)>,
    pub spans: Vec<Span<'a>>,
}

#[derive(Debug, Default)]
pub struct Span<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub parent_span_id: &'a [u8],
    pub name: &'a str,
    pub kind: i32,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub attributes: Vec<Kv<'a>>,
    pub events: Vec<SpanEvent<'a>>,
    pub links: Vec<SpanLink<'a>>,
    pub status: Option<SpanStatus<'a>>,
}

#[derive(Debug, Default)]
pub struct SpanEvent<'a> {
    pub time_unix_nano: u64,
    pub name: &'a str,
    pub attributes: Vec<Kv<'a>>,
}

#[derive(Debug, Default)]
pub struct SpanLink<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub attributes: Vec<Kv<'a>>,
}

#[derive(Debug, Default)]
pub struct SpanStatus<'a> {
    pub code: i32,
    pub message: &'a str,
}

/// An attribute: a key and its value (`None`: no value, or a value with nothing set).
#[derive(Debug, Default)]
pub struct Kv<'a> {
    pub key: &'a str,
    pub value: Option<AttrValue<'a>>,
}

#[derive(Debug)]
pub enum AttrValue<'a> {
    String(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Array(Vec<Option<AttrValue<'a>>>),
    Kvlist(Vec<Kv<'a>>),
    Bytes(&'a [u8]),
    Strindex(i32),
}

/// Attributes prost decoded, borrowed.
fn kvs(attributes: &[KeyValue]) -> Vec<Kv<'_>> {
    attributes.iter().map(|kv| Kv { key: &kv.key, value: kv.value.as_ref().and_then(value) }).collect()
}

/// A value prost decoded, borrowed (`None`: no variant set).
fn value(any: &AnyValue) -> Option<AttrValue<'_>> {
    Some(match any.value.as_ref()? {
        any_value::Value::StringValue(s) => AttrValue::String(s),
        any_value::Value::BoolValue(b) => AttrValue::Bool(*b),
        any_value::Value::IntValue(i) => AttrValue::Int(*i),
        any_value::Value::DoubleValue(d) => AttrValue::Double(*d),
        any_value::Value::ArrayValue(array) => AttrValue::Array(array.values.iter().map(value).collect()),
        any_value::Value::KvlistValue(list) => AttrValue::Kvlist(kvs(&list.values)),
        any_value::Value::BytesValue(bytes) => AttrValue::Bytes(bytes),
        any_value::Value::StringValueStrindex(index) => AttrValue::Strindex(*index),
    })
}

impl<'a> Request<'a> {
    /// The request prost decoded, borrowed.
    pub fn of(request: &'a ExportTraceServiceRequest) -> Self {
        Request {
            resource_spans: request
                .resource_spans
                .iter()
                .map(|rs| ResourceSpans {
                    resource_attributes: rs.resource.as_ref().map(|r| kvs(&r.attributes)).unwrap_or_default(),
                    scope_spans: rs
                        .scope_spans
                        .iter()
                        .map(|ss| ScopeSpans {
                            scope: ss.scope.as_ref().map(|s| (s.name.as_str(), s.version.as_str())),
                            spans: ss
                                .spans
                                .iter()
                                .map(|span| Span {
                                    trace_id: &span.trace_id,
                                    span_id: &span.span_id,
                                    parent_span_id: &span.parent_span_id,
                                    name: &span.name,
                                    kind: span.kind,
                                    start_time_unix_nano: span.start_time_unix_nano,
                                    end_time_unix_nano: span.end_time_unix_nano,
                                    attributes: kvs(&span.attributes),
                                    events: span
                                        .events
                                        .iter()
                                        .map(|e| SpanEvent {
                                            time_unix_nano: e.time_unix_nano,
                                            name: &e.name,
                                            attributes: kvs(&e.attributes),
                                        })
                                        .collect(),
                                    links: span
                                        .links
                                        .iter()
                                        .map(|l| SpanLink {
                                            trace_id: &l.trace_id,
                                            span_id: &l.span_id,
                                            attributes: kvs(&l.attributes),
                                        })
                                        .collect(),
                                    status: span
                                        .status
                                        .as_ref()
                                        .map(|s| SpanStatus { code: s.code, message: &s.message }),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// An attribute value as JSON (integers stay integers; bytes become hex; no value is null),
/// written straight to text by serde_json without building a `Value` tree first.
struct Any<'a, 'b>(&'b Option<AttrValue<'a>>);

impl Serialize for Any<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(AttrValue::String(s)) => serializer.serialize_str(s),
            Some(AttrValue::Bool(b)) => serializer.serialize_bool(*b),
            Some(AttrValue::Int(i)) => serializer.serialize_i64(*i),
            Some(AttrValue::Double(d)) => serializer.serialize_f64(*d),
            Some(AttrValue::Array(values)) => serializer.collect_seq(values.iter().map(Any)),
            Some(AttrValue::Kvlist(list)) => Attributes(list).serialize(serializer),
            Some(AttrValue::Bytes(bytes)) => serializer.serialize_str(&lower_hex(bytes)),
            Some(AttrValue::Strindex(index)) => serializer.serialize_i32(*index),
            None => serializer.serialize_unit(),
        }
    }
}

/// Attributes as a JSON object, keys sorted; of repeated keys, the last value is kept.
pub struct Attributes<'a, 'b>(pub &'b [Kv<'a>]);

impl Serialize for Attributes<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut sorted: Vec<&Kv<'_>> = self.0.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(b.key));
        let mut map = serializer.serialize_map(None)?;
        for (i, kv) in sorted.iter().enumerate() {
            if sorted.get(i + 1).is_some_and(|next| next.key == kv.key) {
                continue;
            }
            map.serialize_entry(kv.key, &Any(&kv.value))?;
        }
        map.end()
    }
}

/// The first attribute named `key`, if its value is a string.
fn kv_string<'a>(attributes: &[Kv<'a>], key: &str) -> Option<&'a str> {
    match attributes.iter().find(|kv| kv.key == key)?.value {
        Some(AttrValue::String(s)) => Some(s),
        _ => None,
    }
}

/// Why a request's body gives no rows.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Wire(#[from] super::otlp_wire::WireError),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

/// Spans of a request prost decoded (OTLP/JSON's).
pub fn traces(request: ExportTraceServiceRequest, sender: &Sender) -> Result<Converted, TooLarge> {
    convert_traces(Request::of(&request), sender)
}

/// Spans of a request's protobuf body, read without prost ([`super::otlp_wire`]).
pub fn traces_from_protobuf(body: &[u8], sender: &Sender) -> Result<Converted, ReadError> {
    Ok(convert_traces(super::otlp_wire::decode(body)?, sender)?)
}

pub fn convert_traces(request: Request<'_>, sender: &Sender) -> Result<Converted, TooLarge> {
    let mut out = Converted::default();
    for resource_spans in request.resource_spans {
        let resource_attributes = resource_spans.resource_attributes;
        let count: usize = resource_spans.scope_spans.iter().map(|s| s.spans.len()).sum();
        let (tenant, metered) = match sender.tenant_for(kv_string(&resource_attributes, "service.namespace")) {
            Ok(attribution) => attribution,
            Err(reason) => {
                out.reject(count, reason);
                continue;
            }
        };
        let service = kv_string(&resource_attributes, "service.name").unwrap_or("unknown_service").to_string();
        let resource = json_text(&Attributes(&resource_attributes));
        for scope_spans in resource_spans.scope_spans {
            let scope = scope_spans
                .scope
                .map_or(json!({}), |(name, version)| json!({"name": name, "version": version}))
                .to_string();
            for span in scope_spans.spans {
                let (Some(trace_id), Some(span_id)) = (id_hex(span.trace_id, 16), id_hex(span.span_id, 8)) else {
                    out.reject(1, "invalid trace or span id (need 16 and 8 non-zero bytes)".into());
                    continue;
                };
                let parent_span_id = match span.parent_span_id.len() {
                    0 => None,
                    _ => match id_hex(span.parent_span_id, 8) {
                        Some(parent) => Some(parent),
                        None => {
                            out.reject(1, "invalid parent span id (need 8 bytes)".into());
                            continue;
                        }
                    },
                };
                let events: Vec<Value> = span
                    .events
                    .iter()
                    .map(|e| json!({"name": e.name, "time_ns": e.time_unix_nano, "attributes": Attributes(&e.attributes)}))
                    .collect();
                let links: Vec<Value> = span
                    .links
                    .iter()
                    .map(|l| json!({"trace_id": lower_hex(l.trace_id), "span_id": lower_hex(l.span_id), "attributes": Attributes(&l.attributes)}))
                    .collect();
                let status = span.status.unwrap_or_default();
                out.push_span(SpanRow {
                    tenant: tenant.clone(),
                    trace_id,
                    span_id,
                    parent_span_id,
                    name: span.name.to_string(),
                    kind: span.kind as i64,
                    start_ns: unix_ns(span.start_time_unix_nano),
                    end_ns: unix_ns(span.end_time_unix_nano),
                    status_code: status.code as i64,
                    status_message: status.message.to_string(),
                    service_name: service.clone(),
                    attributes: json_text(&Attributes(&span.attributes)),
                    events: Value::Array(events).to_string(),
                    links: Value::Array(links).to_string(),
                    resource: resource.clone(),
                    scope: scope.clone(),
                    metered,
                })?;
            }
        }
    }
    Ok(out)
}

/// Label values as Prometheus has them: strings.
/// A point's labels (JSON): its attributes, and what the resource says of the series. As
/// Prometheus's OTLP receiver makes them (`names`' default): attribute names as label names,
/// `job` from `service.namespace`/`service.name` and `instance` from `service.instance.id`;
/// as sent: attribute names as they are, and `service_name`.
fn labels(point_attributes: &[KeyValue], resource: &[KeyValue], names: MetricNames) -> String {
    let service = string_attribute(resource, "service.name");
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    match names {
        MetricNames::Prometheus => {
            for kv in point_attributes {
                let label = prometheus_names::label_name(&kv.key);
                let value = plain_text(kv.value.as_ref());
                // Two attributes that become one label name: their values joined, as
                // Prometheus does.
                labels.entry(label).and_modify(|v| *v = format!("{v};{value}")).or_insert(value);
            }
            let job = match (string_attribute(resource, "service.namespace"), service) {
                (Some(namespace), Some(service)) => Some(format!("{namespace}/{service}")),
                (_, service) => service.map(str::to_string),
            };
            let instance = string_attribute(resource, "service.instance.id").map(str::to_string);
            for (label, value) in [("job", job), ("instance", instance)] {
                if let Some(value) = value {
                    labels.insert(label.into(), value);
                }
            }
        }
        MetricNames::Otlp => {
            labels.extend(point_attributes.iter().map(|kv| (kv.key.clone(), plain_text(kv.value.as_ref()))));
            if let Some(service) = service {
                labels.entry("service_name".into()).or_insert_with(|| service.to_string());
            }
        }
    }
    serde_json::to_string(&labels).expect("json")
}

/// The resource attributes that name the series (`job`, `instance`) rather than describe it.
const IDENTIFYING: [&str; 3] = ["service.name", "service.namespace", "service.instance.id"];

/// `target_info`'s labels (JSON) for a resource, as Prometheus's OTLP receiver makes them:
/// `job` and `instance`, and every other resource attribute as a label; `None` when the
/// resource has no other attribute (Prometheus then writes no `target_info`).
fn target_info_labels(resource: &[KeyValue]) -> Option<String> {
    let described: Vec<&KeyValue> = resource.iter().filter(|kv| !IDENTIFYING.contains(&kv.key.as_str())).collect();
    if described.is_empty() {
        return None;
    }
    let mut labels: BTreeMap<String, String> =
        serde_json::from_str(&labels(&[], resource, MetricNames::Prometheus)).ok()?;
    for kv in described {
        let value = plain_text(kv.value.as_ref());
        labels
            .entry(prometheus_names::label_name(&kv.key))
            .and_modify(|v| *v = format!("{v};{value}"))
            .or_insert(value);
    }
    Some(serde_json::to_string(&labels).expect("json"))
}

/// A metric's stored name: see [`prometheus_names`].
fn metric_name(metric: &opentelemetry_proto::tonic::metrics::v1::Metric, names: MetricNames) -> String {
    let kind = match &metric.data {
        Some(metric::Data::Gauge(_)) => Kind::Gauge,
        Some(metric::Data::Sum(sum)) if sum.is_monotonic => Kind::Counter,
        _ => Kind::Other,
    };
    match names {
        MetricNames::Prometheus => prometheus_names::metric_name(&metric.name, &metric.unit, kind),
        MetricNames::Otlp => metric.name.clone(),
    }
}

pub fn metrics(
    request: ExportMetricsServiceRequest,
    sender: &Sender,
    names: MetricNames,
) -> Result<Converted, TooLarge> {
    let mut out = Converted::default();
    for resource_metrics in request.resource_metrics {
        let resource_attributes = resource_metrics.resource.map(|r| r.attributes).unwrap_or_default();
        let points: usize = resource_metrics.scope_metrics.iter().flat_map(|s| &s.metrics).map(point_count).sum();
        let (tenant, metered) = match sender.tenant_for(string_attribute(&resource_attributes, "service.namespace")) {
            Ok(attribution) => attribution,
            Err(reason) => {
                out.reject(points, reason);
                continue;
            }
        };
        let labels = |attributes: &[KeyValue]| labels(attributes, &resource_attributes, names);
        let stored_before = out.batch.samples.len();
        for metric in resource_metrics.scope_metrics.into_iter().flat_map(|s| s.metrics) {
            let name = metric_name(&metric, names);
            let row = |labels: String, kind: &'static str, ts: u64, value: f64, histogram: Option<String>| SampleRow {
                tenant: tenant.clone(),
                metric: name.clone(),
                labels,
                kind,
                ts_ns: unix_ns(ts),
                value,
                histogram,
                metered,
            };
            let number = |value: &Option<number_data_point::Value>| match value {
                Some(number_data_point::Value::AsDouble(d)) => *d,
                Some(number_data_point::Value::AsInt(i)) => *i as f64,
                None => 0.0,
            };
            match &metric.data {
                Some(metric::Data::Gauge(gauge)) => {
                    for p in &gauge.data_points {
                        out.push_sample(row(labels(&p.attributes), "gauge", p.time_unix_nano, number(&p.value), None))?;
                    }
                }
                Some(metric::Data::Sum(sum)) => {
                    let kind = if sum.is_monotonic { "counter" } else { "gauge" };
                    for p in &sum.data_points {
                        out.push_sample(row(labels(&p.attributes), kind, p.time_unix_nano, number(&p.value), None))?;
                    }
                }
                Some(metric::Data::Histogram(histogram)) => {
                    for p in &histogram.data_points {
                        let mut cumulative = 0u64;
                        let mut buckets: Vec<(Value, u64)> = Vec::new();
                        for (i, count) in p.bucket_counts.iter().enumerate() {
                            cumulative = cumulative.saturating_add(*count);
                            let le = p.explicit_bounds.get(i).map_or(json!("+Inf"), |b| json!(b));
                            buckets.push((le, cumulative));
                        }
                        let sum = p.sum.unwrap_or(0.0);
                        let detail = json!({"count": p.count, "sum": sum, "buckets": buckets}).to_string();
                        out.push_sample(row(labels(&p.attributes), "histogram", p.time_unix_nano, sum, Some(detail)))?;
                    }
                }
                Some(metric::Data::Summary(summary)) => {
                    for p in &summary.data_points {
                        let quantiles: Vec<(f64, f64)> =
                            p.quantile_values.iter().map(|q| (q.quantile, q.value)).collect();
                        let detail = json!({"count": p.count, "sum": p.sum, "quantiles": quantiles}).to_string();
                        out.push_sample(row(labels(&p.attributes), "summary", p.time_unix_nano, p.sum, Some(detail)))?;
                    }
                }
                Some(metric::Data::ExponentialHistogram(h)) => {
                    out.reject(h.data_points.len(), "exponential histograms are not supported".into());
                }
                None => {}
            }
        }
        // The resource's other attributes, on `target_info` at its latest point's time.
        let latest = out.batch.samples[stored_before..].iter().map(|s| s.ts_ns).max();
        if let (MetricNames::Prometheus, Some(ts_ns), Some(labels)) =
            (names, latest, target_info_labels(&resource_attributes))
        {
            let row = SampleRow {
                tenant: tenant.clone(),
                metric: "target_info".into(),
                labels,
                kind: "gauge",
                ts_ns,
                value: 1.0,
                histogram: None,
                metered,
            };
            out.push_sample(row)?;
        }
    }
    Ok(out)
}

fn point_count(metric: &opentelemetry_proto::tonic::metrics::v1::Metric) -> usize {
    match &metric.data {
        Some(metric::Data::Gauge(g)) => g.data_points.len(),
        Some(metric::Data::Sum(s)) => s.data_points.len(),
        Some(metric::Data::Histogram(h)) => h.data_points.len(),
        Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(metric::Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

pub fn logs(request: ExportLogsServiceRequest, sender: &Sender) -> Result<Converted, TooLarge> {
    let mut out = Converted::default();
    for resource_logs in request.resource_logs {
        let resource_attributes = resource_logs.resource.map(|r| r.attributes).unwrap_or_default();
        let count: usize = resource_logs.scope_logs.iter().map(|s| s.log_records.len()).sum();
        let (tenant, metered) = match sender.tenant_for(string_attribute(&resource_attributes, "service.namespace")) {
            Ok(attribution) => attribution,
            Err(reason) => {
                out.reject(count, reason);
                continue;
            }
        };
        let resource = json_text(&Attributes(&kvs(&resource_attributes)));
        for record in resource_logs.scope_logs.into_iter().flat_map(|s| s.log_records) {
            let ts = if record.time_unix_nano != 0 { record.time_unix_nano } else { record.observed_time_unix_nano };
            let body = plain_text(record.body.as_ref());
            let attributes = json_text(&Attributes(&kvs(&record.attributes)));
            let trace_id = id_hex(&record.trace_id, 16);
            let span_id = id_hex(&record.span_id, 8);
            let mut hash = Sha256::new();
            for part in [
                &ts.to_string(),
                &record.severity_number.to_string(),
                &record.severity_text,
                &body,
                &attributes,
                &resource,
            ] {
                hash.update(part.as_bytes());
                hash.update([0]);
            }
            hash.update(trace_id.as_deref().unwrap_or_default());
            hash.update(span_id.as_deref().unwrap_or_default());
            out.push_log(LogRow {
                tenant: tenant.clone(),
                record_hash: hex::encode(hash.finalize()),
                ts_ns: unix_ns(ts),
                severity_number: record.severity_number as i64,
                severity_text: record.severity_text,
                body,
                attributes,
                resource: resource.clone(),
                trace_id,
                span_id,
                metered,
            })?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{ArrayValue as Array, KeyValueList};

    use super::*;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    #[test]
    fn attributes_are_json_with_sorted_keys_and_the_last_of_repeated_ones() {
        use any_value::Value::*;
        let attributes = [
            kv("z", StringValue("quote \" and \u{e9}".into())),
            kv("a", IntValue(-7)),
            kv("dup", IntValue(1)),
            kv("d", DoubleValue(0.5)),
            kv("nan", DoubleValue(f64::NAN)),
            kv("b", BoolValue(true)),
            kv("bytes", BytesValue(vec![0xde, 0xad])),
            kv(
                "list",
                ArrayValue(Array { values: vec![AnyValue { value: Some(IntValue(1)) }, AnyValue { value: None }] }),
            ),
            kv(
                "map",
                KvlistValue(KeyValueList { values: vec![kv("y", IntValue(2)), kv("x", StringValue("s".into()))] }),
            ),
            kv("dup", IntValue(2)),
            KeyValue { key: "none".into(), value: None, ..Default::default() },
        ];
        assert_eq!(
            json_text(&Attributes(&kvs(&attributes))),
            r#"{"a":-7,"b":true,"bytes":"dead","d":0.5,"dup":2,"list":[1,null],"map":{"x":"s","y":2},"nan":null,"none":null,"z":"quote \" and é"}"#
        );
        assert_eq!(plain_text(Some(&AnyValue { value: Some(StringValue("GET".into())) })), "GET");
        assert_eq!(plain_text(Some(&AnyValue { value: Some(IntValue(200)) })), "200");
        assert_eq!(plain_text(None), "null");
    }

    /// `MetricNames::Otlp` keeps a metric's name and attributes as sent, with `service_name`;
    /// the default makes them Prometheus's.
    #[test]
    fn metric_names_as_sent_or_as_prometheus_names_them() {
        use opentelemetry_proto::tonic::common::v1::AnyValue;
        use opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue;
        use opentelemetry_proto::tonic::metrics::v1::{
            Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric,
        };
        use opentelemetry_proto::tonic::resource::v1::Resource;
        let kv = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(StringValue(value.into())) }),
            ..Default::default()
        };
        let point = NumberDataPoint { attributes: vec![kv("disk.name", "sda")], ..Default::default() };
        let metric = Metric {
            name: "disk.free".into(),
            unit: "By".into(),
            data: Some(metric::Data::Gauge(Gauge { data_points: vec![point] })),
            ..Default::default()
        };
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "db"), kv("service.instance.id", "db-1")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics { metrics: vec![metric], ..Default::default() }],
                ..Default::default()
            }],
        };
        let sender = Sender { credential: crate::auth::Credential::Ingest { tenant: "acme".into() }, org_id: None };
        let stored = |names| {
            let converted = metrics(request.clone(), &sender, names).unwrap();
            let sample = &converted.batch.samples[0];
            (sample.metric.clone(), sample.labels.clone())
        };
        assert_eq!(
            stored(MetricNames::Prometheus),
            ("disk_free_bytes".into(), r#"{"disk_name":"sda","instance":"db-1","job":"db"}"#.into())
        );
        assert_eq!(
            stored(MetricNames::Otlp),
            ("disk.free".into(), r#"{"disk.name":"sda","service_name":"db"}"#.into())
        );
    }

    /// Bucket counts summing past u64 (a tenant's own numbers) saturate: they panicked
    /// (debug) or wrapped (release) where the cumulative counts are made.
    #[test]
    fn histogram_bucket_counts_past_u64_saturate() {
        use opentelemetry_proto::tonic::metrics::v1::{
            Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
        };
        let point = HistogramDataPoint {
            bucket_counts: vec![u64::MAX, u64::MAX],
            explicit_bounds: vec![1.0],
            ..Default::default()
        };
        let metric = Metric {
            name: "latency".into(),
            data: Some(metric::Data::Histogram(Histogram { data_points: vec![point], ..Default::default() })),
            ..Default::default()
        };
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics { metrics: vec![metric], ..Default::default() }],
                ..Default::default()
            }],
        };
        let sender = Sender { credential: crate::auth::Credential::Ingest { tenant: "acme".into() }, org_id: None };
        let converted = metrics(request, &sender, MetricNames::Prometheus).unwrap();
        let histogram = converted.batch.samples[0].histogram.as_deref().unwrap();
        assert!(histogram.contains(&format!("[\"+Inf\",{}]", u64::MAX)), "{histogram}");
    }

    #[test]
    fn times_past_what_an_i64_holds_saturate() {
        assert_eq!(unix_ns(1_700_000_000_000_000_000), 1_700_000_000_000_000_000);
        assert_eq!(unix_ns(1 << 63), i64::MAX);
        assert_eq!(unix_ns(u64::MAX), i64::MAX);
    }
}
