//! Usage as CloudEvents 1.0 (JSON event format, batched), the format OpenMeter ingests: one
//! event per usage record, `subject` = tenant, `id` = the usage id (so re-sending is
//! idempotent on the receiving side), `data` = the record's quantities and its cost.

use serde_json::{Value, json};

use crate::period::rfc3339;
use crate::usage::{Kind, UsageRecord};

/// The media type of a batch.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

pub fn event(record: &UsageRecord, cost: Option<&rust_decimal::Decimal>) -> Value {
    let (kind, data) = match record.kind {
        Kind::Invocation => (
            "io.stateful-faas.invocation",
            json!({
                "function": record.function,
                "flow_run": record.flow_run,
                "call_id": record.call_id,
                "invocations": 1,
                "cpu_ms": record.cpu_ms,
                "wall_ms": record.wall_ms,
                "memory_peak_bytes": record.memory_peak_bytes,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "log_bytes": record.log_bytes,
                "status_code": record.status_code,
            }),
        ),
        Kind::Instance => (
            "io.stateful-faas.instance",
            json!({"function": record.function, "cpu_ms": record.cpu_ms, "interval_end": rfc3339(record.end_ns)}),
        ),
        Kind::State => (
            "io.stateful-faas.state",
            json!({
                "flow_run": record.flow_run,
                "state_byte_seconds": record.state_byte_seconds.to_string(),
                "interval_end": rfc3339(record.end_ns),
            }),
        ),
    };
    let mut data = data;
    data["plan"] = json!(record.plan);
    data["trace_id"] = json!(record.trace_id);
    data["span_id"] = json!(record.span_id);
    if let Some(cost) = cost {
        data["cost"] = json!(cost.to_string());
    }
    json!({
        "specversion": "1.0",
        "id": record.usage_id,
        "source": format!("stateful-faas/{}", record.tenant),
        "type": kind,
        "subject": record.tenant,
        "time": rfc3339(record.start_ns),
        "datacontenttype": "application/json",
        "data": data,
    })
}
