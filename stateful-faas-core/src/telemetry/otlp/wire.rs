//! The OTLP protobuf wire format, written by hand: export requests framed around spans already
//! encoded, the SDK's spans and the gateway's invocation fields encoded field by field.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use super::{Batch, EndedInvocation, TextLengths};

/// The export request for a batch: its invocation spans encoded into `buffer` (emptied first),
/// then [`frame`]d with its other spans, which are taken out of it. The buffer comes back too,
/// shared with the request, to be reused once the transport has let go of it.
pub(super) fn export_request(
    resource: &[u8],
    resource_schema_url: &str,
    batch: &mut Batch,
    mut buffer: Vec<u8>,
) -> (Vec<Bytes>, Bytes) {
    buffer.clear();
    let mut texts = &batch.texts[..];
    for (invocation, lengths) in &batch.invocations {
        message(&mut buffer, 2, |buf| encode_invocation(buf, invocation, lengths, &mut texts));
    }
    let invocations = Bytes::from(buffer);
    let request = frame(resource, resource_schema_url, std::mem::take(&mut batch.scopes), invocations.clone());
    (request, invocations)
}

/// An `ExportTraceServiceRequest` of one `ResourceSpans` with one `ScopeSpans` per
/// instrumentation scope, around spans already encoded: those of `scopes`, and `invocations`
/// under the platform's scope. It is returned as the buffers to send one after the other: the
/// framing, written with every length known, and between its pieces the spans' buffers, which
/// are not copied.
fn frame(
    resource: &[u8],
    resource_schema_url: &str,
    scopes: Vec<(InstrumentationScope, Vec<u8>)>,
    invocations: Bytes,
) -> Vec<Bytes> {
    let platform = super::super::invocation_scope();
    let mut scopes: Vec<(InstrumentationScope, Vec<Bytes>)> =
        scopes.into_iter().map(|(scope, spans)| (scope, vec![Bytes::from(spans)])).collect();
    if !invocations.is_empty() {
        match scopes.iter_mut().find(|(scope, _)| scope == platform) {
            Some((_, spans)) => spans.push(invocations),
            None => scopes.push((platform.clone(), vec![invocations])),
        }
    }
    /// A `ScopeSpans`: its scope (field 1) before its spans, its schema URL (field 3) after.
    struct Part {
        head: Vec<u8>,
        spans: Vec<Bytes>,
        tail: Vec<u8>,
        len: usize,
    }
    let scopes: Vec<Part> = scopes
        .into_iter()
        .map(|(scope, spans)| {
            let mut head = Vec::new();
            message(&mut head, 1, |buf| {
                string(buf, 1, scope.name());
                string(buf, 2, scope.version().unwrap_or_default());
                for attribute in scope.attributes() {
                    key_value(buf, 3, attribute);
                }
            });
            let mut tail = Vec::new();
            string(&mut tail, 3, scope.schema_url().unwrap_or_default());
            let len = head.len() + spans.iter().map(Bytes::len).sum::<usize>() + tail.len();
            Part { head, spans, tail, len }
        })
        .collect();
    let mut resource_tail = Vec::new();
    string(&mut resource_tail, 3, resource_schema_url);
    let resource_spans_len = resource.len()
        + scopes.iter().map(|part| 1 + encoded_len_varint(part.len as u64) + part.len).sum::<usize>()
        + resource_tail.len();

    let mut chunks = Vec::new();
    let mut framing = Vec::with_capacity(256 + resource.len());
    encode_key(1, WireType::LengthDelimited, &mut framing);
    encode_varint(resource_spans_len as u64, &mut framing);
    framing.extend_from_slice(resource);
    for Part { head, spans, tail, len } in scopes {
        encode_key(2, WireType::LengthDelimited, &mut framing);
        encode_varint(len as u64, &mut framing);
        framing.extend_from_slice(&head);
        for spans in spans {
            chunks.push(Bytes::from(std::mem::take(&mut framing)));
            chunks.push(spans);
        }
        framing.extend_from_slice(&tail);
    }
    framing.extend_from_slice(&resource_tail);
    chunks.push(Bytes::from(framing));
    chunks
}

/// `ResourceSpans.resource` (field 1) for a resource.
pub fn encode_resource(resource: &Resource) -> Vec<u8> {
    let mut buf = Vec::new();
    message(&mut buf, 1, |buf| {
        for (key, value) in resource.iter() {
            message(buf, 1, |buf| {
                string(buf, 1, key.as_str());
                message(buf, 2, |buf| any_value(buf, value));
            });
        }
    });
    buf
}

pub(super) fn encode_span(buf: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    bytes(buf, 1, &context.trace_id().to_bytes());
    bytes(buf, 2, &context.span_id().to_bytes());
    string(buf, 3, &context.trace_state().header());
    if span.parent_span_id != SpanId::INVALID {
        bytes(buf, 4, &span.parent_span_id.to_bytes());
    }
    fixed32(buf, 16, span_flags(span.parent_span_is_remote, context.trace_flags().to_u8()));
    string(buf, 5, &span.name);
    uint(
        buf,
        6,
        match span.span_kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
            SpanKind::Producer => 4,
            SpanKind::Consumer => 5,
        },
    );
    fixed64(buf, 7, nanos(span.start_time));
    fixed64(buf, 8, nanos(span.end_time));
    for attribute in &span.attributes {
        key_value(buf, 9, attribute);
    }
    uint(buf, 10, u64::from(span.dropped_attributes_count));
    for event in span.events.iter() {
        message(buf, 11, |buf| {
            fixed64(buf, 1, nanos(event.timestamp));
            string(buf, 2, &event.name);
            for attribute in &event.attributes {
                key_value(buf, 3, attribute);
            }
            uint(buf, 4, u64::from(event.dropped_attributes_count));
        });
    }
    uint(buf, 12, u64::from(span.events.dropped_count));
    for link in span.links.iter() {
        message(buf, 13, |buf| {
            let context = &link.span_context;
            bytes(buf, 1, &context.trace_id().to_bytes());
            bytes(buf, 2, &context.span_id().to_bytes());
            string(buf, 3, &context.trace_state().header());
            for attribute in &link.attributes {
                key_value(buf, 4, attribute);
            }
            uint(buf, 5, u64::from(link.dropped_attributes_count));
            fixed32(buf, 6, span_flags(context.is_remote(), context.trace_flags().to_u8()));
        });
    }
    uint(buf, 14, u64::from(span.links.dropped_count));
    message(buf, 15, |buf| match &span.status {
        Status::Unset => {}
        Status::Ok => uint(buf, 3, 1),
        Status::Error { description } => {
            string(buf, 2, description);
            uint(buf, 3, 2);
        }
    });
}

/// An invocation's span as [`super::super::sdk_invocation_span`] has the SDK build it and
/// [`encode_span`] writes it, written from its fields, its texts taken from the front of `texts`
/// (the tests compare the two).
fn encode_invocation(buf: &mut Vec<u8>, i: &EndedInvocation, lengths: &TextLengths, texts: &mut &[u8]) {
    use crate::semconv as c;
    let mut text = |len: u32| {
        let (text, rest) = texts.split_at(len as usize);
        *texts = rest;
        text
    };
    let (function, call_id) = (text(lengths.function), text(lengths.call_id));
    let job = lengths.job.map(&mut text);
    let trace_state = text(lengths.trace_state);
    bytes(buf, 1, &i.trace_id);
    bytes(buf, 2, &i.span_id);
    bytes(buf, 3, trace_state);
    if i.parent_span_id != [0; 8] {
        bytes(buf, 4, &i.parent_span_id);
    }
    fixed32(buf, 16, i.flags);
    message(buf, 5, |buf| {
        // The name, `semconv::invoke_span_name` written in place (a string's bytes, as a message's).
        buf.extend_from_slice(c::INVOKE_SPAN_PREFIX.as_bytes());
        buf.extend_from_slice(function);
    });
    uint(buf, 6, 2); // SERVER
    fixed64(buf, 7, i.start_ns);
    fixed64(buf, 8, i.end_ns);
    // `Span.attributes` (field 9), by kind of value.
    let text =
        |buf: &mut Vec<u8>, key: &str, value: &[u8]| key_value_with(buf, 9, key, |buf| always_bytes(buf, 1, value));
    let int =
        |buf: &mut Vec<u8>, key: &str, value: u64| key_value_with(buf, 9, key, |buf| int_value(buf, value as i64));
    let flag = |buf: &mut Vec<u8>, key: &str, value: bool| key_value_with(buf, 9, key, |buf| bool_value(buf, value));
    text(buf, c::FAAS_NAME, function);
    let mut execution_id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::from_bytes(i.execution_id).hyphenated().encode_lower(&mut execution_id);
    text(buf, c::FAAS_INVOCATION_ID, &execution_id);
    text(buf, c::SFAAS_CALL_ID, call_id);
    text(buf, c::FAAS_TRIGGER, i.trigger.as_bytes());
    text(buf, c::SFAAS_FUNCTION_KIND, i.kind.as_bytes());
    if let Some(job) = job {
        text(buf, c::SFAAS_STATE_JOB, job);
    }
    flag(buf, c::FAAS_COLDSTART, i.cold_start);
    int(buf, c::SFAAS_CPU_MS, i.cpu_ms);
    int(buf, c::SFAAS_WALL_MS, i.wall_ms);
    int(buf, c::SFAAS_MEMORY_PEAK_BYTES, i.memory_peak_bytes);
    int(buf, c::SFAAS_BYTES_IN, i.bytes_in);
    int(buf, c::SFAAS_BYTES_OUT, i.bytes_out);
    int(buf, c::SFAAS_LOG_BYTES, i.log_bytes);
    int(buf, c::HTTP_RESPONSE_STATUS_CODE, u64::from(i.status));
    flag(buf, c::SFAAS_BILLABLE, true);
    message(buf, 15, |buf| {
        if let Some(description) = super::super::error_status(i.status) {
            string(buf, 2, &description);
            uint(buf, 3, 2);
        }
    });
}

/// `SpanFlags`: the W3C trace flags, "has is-remote" (0x100) and "is remote" (0x200).
pub(in crate::telemetry) fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if remote { 0x200 } else { 0 }
}

pub(in crate::telemetry) fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

fn key_value(buf: &mut Vec<u8>, tag: u32, attribute: &KeyValue) {
    key_value_with(buf, tag, attribute.key.as_str(), |buf| any_value(buf, &attribute.value));
}

/// A `KeyValue` message in field `tag`, its value's `AnyValue` members written by `value`.
fn key_value_with(buf: &mut Vec<u8>, tag: u32, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    message(buf, tag, |buf| {
        string(buf, 1, key);
        message(buf, 2, value);
    });
}

/// The members of `AnyValue`'s `oneof`.
fn any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(value) => bool_value(buf, *value),
        Value::I64(value) => int_value(buf, *value),
        Value::F64(value) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&value.to_le_bytes());
        }
        Value::Array(array) => message(buf, 5, |buf| match array {
            Array::Bool(values) => values.iter().for_each(|v| message(buf, 1, |buf| any_value(buf, &Value::Bool(*v)))),
            Array::I64(values) => values.iter().for_each(|v| message(buf, 1, |buf| any_value(buf, &Value::I64(*v)))),
            Array::F64(values) => values.iter().for_each(|v| message(buf, 1, |buf| any_value(buf, &Value::F64(*v)))),
            Array::String(values) => {
                values.iter().for_each(|v| message(buf, 1, |buf| always_string(buf, 1, v.as_str())))
            }
            other => message(buf, 1, |buf| always_string(buf, 1, &other.to_string())),
        }),
        // Strings, and any kind a later SDK adds, as their text.
        other => always_string(buf, 1, &other.as_str()),
    }
}

/// `AnyValue.bool_value`.
fn bool_value(buf: &mut Vec<u8>, value: bool) {
    encode_key(2, WireType::Varint, buf);
    encode_varint(u64::from(value), buf);
}

/// `AnyValue.int_value`.
fn int_value(buf: &mut Vec<u8>, value: i64) {
    encode_key(3, WireType::Varint, buf);
    encode_varint(value as u64, buf);
}

/// A length-delimited field holding a message, written even when empty. Its length is known
/// only once the body is written: one byte is reserved for it and the body moved in the case
/// that the length needs more (a span, a batch).
pub(super) fn message(buf: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    let at = buf.len();
    buf.push(0);
    body(buf);
    let len = buf.len() - at - 1;
    if len < 0x80 {
        buf[at] = len as u8;
    } else {
        let more = encoded_len_varint(len as u64) - 1;
        buf.resize(buf.len() + more, 0);
        buf.copy_within(at + 1..at + 1 + len, at + 1 + more);
        encode_varint(len as u64, &mut &mut buf[at..at + 1 + more]);
    }
}

fn string(buf: &mut Vec<u8>, tag: u32, value: &str) {
    bytes(buf, tag, value.as_bytes());
}

fn always_string(buf: &mut Vec<u8>, tag: u32, value: &str) {
    always_bytes(buf, tag, value.as_bytes());
}

fn always_bytes(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

fn bytes(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value);
    }
}

fn uint(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn fixed64(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed32(buf: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}
