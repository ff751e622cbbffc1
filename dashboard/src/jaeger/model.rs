//! Stored spans → Jaeger's JSON model (jaeger-query's `model/json`): a trace is
//! `{traceID, spans, processes: {p1: {serviceName, tags}}, warnings}`, a span
//! `{traceID, spanID, flags, operationName, references, startTime, duration, tags, logs,
//! processID, warnings}` with times in microseconds (truncated, duration from the nanosecond
//! difference), `flags` 1 (sampled), and `references`, `tags` and `logs` always arrays (Grafana
//! maps `span.logs` unconditionally). Tags are typed `{key, type, value}` with
//! `type` one of `string`, `bool`, `int64`, `float64` (integers beyond JavaScript's safe range
//! are sent as strings, as jaeger-query does). Stored spans are translated the way the
//! OpenTelemetry Collector's OTLP→Jaeger translator does: scope → `otel.scope.name` /
//! `otel.scope.version`, kind → `span.kind` (`internal`, `server`, `client`, `producer`,
//! `consumer`), status → `otel.status_code` (`OK`/`ERROR`), `error=true` and
//! `otel.status_description`; events → logs whose first field is `event` = the event name; the
//! parent → the first `CHILD_OF` reference, links → `FOLLOWS_FROM` (or `CHILD_OF` when the link
//! says `opentracing.ref_type=child_of`); the resource → the process (`service.name` is its
//! `serviceName`, every other attribute a process tag). A synthetic tag is left out when the
//! span already has an attribute of that name (spans from Jaeger clients keep their own `error`).

use std::collections::{BTreeMap, HashMap};

use collector::model::{SpanRow, span_kind_name, status_name};
use serde::Serialize;
use serde_json::{Map, Value};

const JS_MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// A stored trace id as jaeger-query writes it: without the high half when that is zero.
pub(super) fn jaeger_trace_id(stored: &str) -> String {
    match stored.strip_prefix("0000000000000000") {
        Some(low) if stored.len() == 32 => low.to_string(),
        _ => stored.to_string(),
    }
}

#[derive(Serialize)]
pub(super) struct JaegerTrace {
    #[serde(rename = "traceID")]
    trace_id: String,
    spans: Vec<JaegerSpan>,
    processes: BTreeMap<String, JaegerProcess>,
    pub(super) warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JaegerSpan {
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
    flags: u32,
    operation_name: String,
    references: Vec<Reference>,
    start_time: i64,
    duration: i64,
    tags: Vec<KeyValue>,
    logs: Vec<Log>,
    #[serde(rename = "processID")]
    process_id: String,
    warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Reference {
    #[serde(rename = "refType")]
    ref_type: &'static str,
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
}

#[derive(Serialize)]
struct JaegerProcess {
    #[serde(rename = "serviceName")]
    service_name: String,
    tags: Vec<KeyValue>,
}

#[derive(Serialize)]
struct Log {
    timestamp: i64,
    fields: Vec<KeyValue>,
}

#[derive(Serialize)]
struct KeyValue {
    key: String,
    #[serde(rename = "type")]
    kind: &'static str,
    value: Value,
}

fn string_tag(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.to_string(), kind: "string", value: Value::String(value.to_string()) }
}

/// A typed tag from a stored attribute value (jaeger-query's `convertKeyValues`).
fn tag(key: &str, value: &Value) -> KeyValue {
    let (kind, value) = match value {
        Value::String(_) => ("string", value.clone()),
        Value::Bool(_) => ("bool", value.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) if (-JS_MAX_SAFE_INTEGER..=JS_MAX_SAFE_INTEGER).contains(&i) => ("int64", value.clone()),
            Some(i) => ("int64", Value::String(i.to_string())),
            None if n.is_u64() => ("int64", Value::String(n.to_string())),
            None => ("float64", value.clone()),
        },
        Value::Null => ("string", Value::String(String::new())),
        other => ("string", Value::String(other.to_string())),
    };
    KeyValue { key: key.to_string(), kind, value }
}

fn object(text: &str, what: &str, warnings: &mut Vec<String>) -> Map<String, Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        _ => {
            warnings.push(format!("stored {what} are not a JSON object"));
            Map::new()
        }
    }
}

fn hex_id_ok(id: &str, len: usize) -> bool {
    id.len() == len && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0')
}

fn jaeger_span(row: &SpanRow, trace_id: &str, process_id: String) -> JaegerSpan {
    let mut warnings = Vec::new();
    let attributes = object(&row.attributes, "attributes", &mut warnings);
    let mut tags = Vec::with_capacity(attributes.len() + 4);
    if row.scope != "{}" {
        let scope = object(&row.scope, "scope", &mut warnings);
        for (field, key) in [("name", "otel.scope.name"), ("version", "otel.scope.version")] {
            if let Some(value) = scope.get(field).and_then(Value::as_str).filter(|v| !v.is_empty()) {
                tags.push(string_tag(key, value));
            }
        }
    }
    for (key, value) in &attributes {
        tags.push(tag(key, value));
    }
    let mut synthetic = |key: &str, value: Value| {
        if !attributes.contains_key(key) {
            tags.push(tag(key, &value));
        }
    };
    if let Some(kind) = span_kind_name(row.kind) {
        synthetic("span.kind", Value::String(kind.into()));
    }
    if let Some(status) = status_name(row.status_code) {
        synthetic("otel.status_code", Value::String(status.into()));
    }
    if row.status_code == 2 {
        synthetic("error", Value::Bool(true));
    }
    if !row.status_message.is_empty() {
        synthetic("otel.status_description", Value::String(row.status_message.clone()));
    }

    let mut references = Vec::new();
    if let Some(parent) = row.parent_span_id.as_deref().filter(|p| !p.is_empty()) {
        references.push(Reference {
            ref_type: "CHILD_OF",
            trace_id: trace_id.to_string(),
            span_id: parent.to_string(),
        });
    }
    if row.links != "[]" {
        let links: Vec<Value> = serde_json::from_str(&row.links).unwrap_or_else(|_| {
            warnings.push("stored links are not a JSON array".into());
            Vec::new()
        });
        for link in links {
            let (Some(link_trace), Some(link_span)) =
                (link.get("trace_id").and_then(Value::as_str), link.get("span_id").and_then(Value::as_str))
            else {
                continue;
            };
            if !hex_id_ok(link_trace, 32) || !hex_id_ok(link_span, 16) {
                continue;
            }
            let child_of = link.get("attributes").and_then(|a| a.get("opentracing.ref_type")).and_then(Value::as_str)
                == Some("child_of");
            let ref_type = if child_of { "CHILD_OF" } else { "FOLLOWS_FROM" };
            let link_trace = jaeger_trace_id(link_trace);
            if row.parent_span_id.as_deref() == Some(link_span) && link_trace == trace_id && !references.is_empty() {
                references[0].ref_type = ref_type;
                continue;
            }
            references.push(Reference { ref_type, trace_id: link_trace, span_id: link_span.to_string() });
        }
    }

    let mut logs = Vec::new();
    if row.events != "[]" {
        let events: Vec<Value> = serde_json::from_str(&row.events).unwrap_or_else(|_| {
            warnings.push("stored events are not a JSON array".into());
            Vec::new()
        });
        for event in events {
            let time_ns =
                event.get("time_ns").and_then(|t| t.as_i64().or_else(|| t.as_f64().map(|f| f as i64))).unwrap_or(0);
            let attributes = event.get("attributes").and_then(Value::as_object);
            let mut fields = Vec::with_capacity(attributes.map_or(0, Map::len) + 1);
            if let Some(name) = event.get("name").and_then(Value::as_str).filter(|n| !n.is_empty())
                && !attributes.is_some_and(|a| a.contains_key("event"))
            {
                fields.push(string_tag("event", name));
            }
            for (key, value) in attributes.into_iter().flatten() {
                fields.push(tag(key, value));
            }
            logs.push(Log { timestamp: time_ns / 1000, fields });
        }
    }

    if row.end_ns < row.start_ns {
        // In i128: the gap between two i64 times can be more than an i64 holds.
        let gap = i128::from(row.start_ns) - i128::from(row.end_ns);
        warnings.push(format!("the span ends {gap} ns before it starts; duration shown as 0"));
    }
    JaegerSpan {
        trace_id: trace_id.to_string(),
        span_id: row.span_id.clone(),
        // The span was recorded and exported: sampled.
        flags: 1,
        operation_name: row.name.clone(),
        references,
        start_time: row.start_ns / 1000,
        duration: row.duration_ns() / 1000,
        tags,
        logs,
        process_id,
        warnings: (!warnings.is_empty()).then_some(warnings),
    }
}

/// One tenant's spans of one trace (non-empty) in Jaeger's JSON model.
pub(super) fn jaeger_trace(rows: &[SpanRow]) -> JaegerTrace {
    let trace_id = jaeger_trace_id(&rows[0].trace_id);
    let mut ids: HashMap<(&str, &str), String> = HashMap::new();
    let mut processes = BTreeMap::new();
    let spans = rows
        .iter()
        .map(|row| {
            let key = (row.service_name.as_str(), row.resource.as_str());
            let process_id = match ids.get(&key) {
                Some(id) => id.clone(),
                None => {
                    let id = format!("p{}", ids.len() + 1);
                    let mut ignored = Vec::new();
                    let resource = object(&row.resource, "resource", &mut ignored);
                    let tags =
                        resource.iter().filter(|(key, _)| *key != "service.name").map(|(k, v)| tag(k, v)).collect();
                    processes.insert(id.clone(), JaegerProcess { service_name: row.service_name.clone(), tags });
                    ids.insert(key, id.clone());
                    id
                }
            };
            jaeger_span(row, &trace_id, process_id)
        })
        .collect();
    JaegerTrace { trace_id, spans, processes, warnings: None }
}
