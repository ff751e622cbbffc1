//! Jaeger thrift over HTTP: `POST /api/traces` with a binary-protocol `Batch`
//! (`application/x-thrift`), mapped to the same span model as OTLP.
//!
//! Real exporters send the parent only as `parentSpanId` (no CHILD_OF reference) and copy
//! resource attributes — `service.namespace` included — onto every span's tags: both are
//! understood. Process tags become the resource; the `span.kind` tag becomes the kind;
//! CHILD_OF references are parent links when `parentSpanId` is 0; FOLLOWS_FROM references
//! become links; logs become events. Times are µs in Jaeger, ns in the store.
//!
//! The decoder is a small reader of thrift's binary protocol, bounded in depth and sizes, so
//! truncated or hostile input is refused with a clear message.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Refusal;
use super::{Expansion, TooLarge, basic_or_bearer_sender, text};
use crate::Collector;
use crate::auth::Sender;
use crate::metrics::{RejectLabels, SignalLabels};
use crate::model::{Batch, SpanRow};

/// Why a thrift body could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid thrift Batch: {0}")]
pub struct ThriftError(String);

const STOP: u8 = 0;
const BOOL: u8 = 2;
const BYTE: u8 = 3;
const DOUBLE: u8 = 4;
const I16: u8 = 6;
const I32: u8 = 8;
const I64: u8 = 10;
const STRING: u8 = 11;
const STRUCT: u8 = 12;
const MAP: u8 = 13;
const SET: u8 = 14;
const LIST: u8 = 15;
const MAX_DEPTH: usize = 16;

/// A cursor over thrift's binary protocol.
struct Reader<'a> {
    data: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ThriftError> {
        let end = self.position.checked_add(n).filter(|&end| end <= self.data.len());
        let end = end.ok_or_else(|| ThriftError(format!("truncated at byte {}", self.position)))?;
        let bytes = &self.data[self.position..end];
        self.position = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, ThriftError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, ThriftError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn i32(&mut self) -> Result<i32, ThriftError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i64(&mut self) -> Result<i64, ThriftError> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn f64(&mut self) -> Result<f64, ThriftError> {
        Ok(f64::from_bits(self.i64()? as u64))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ThriftError> {
        let length = self.i32()?;
        let length = usize::try_from(length).map_err(|_| ThriftError(format!("negative length {length}")))?;
        self.take(length)
    }
    fn string(&mut self) -> Result<String, ThriftError> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    /// A list header: element type and count (bounded by the bytes left).
    fn list(&mut self) -> Result<(u8, usize), ThriftError> {
        let element = self.u8()?;
        let count = self.i32()?;
        let count = usize::try_from(count).map_err(|_| ThriftError(format!("negative list size {count}")))?;
        if count > self.data.len() - self.position {
            return Err(ThriftError(format!("list of {count} elements in {} bytes", self.data.len() - self.position)));
        }
        Ok((element, count))
    }
    /// Walks a struct's fields, handing each (id, type) to `field`, which reads or skips it.
    fn fields(
        &mut self,
        depth: usize,
        mut field: impl FnMut(&mut Self, i16, u8) -> Result<(), ThriftError>,
    ) -> Result<(), ThriftError> {
        if depth > MAX_DEPTH {
            return Err(ThriftError("nested too deeply".into()));
        }
        loop {
            let kind = self.u8()?;
            if kind == STOP {
                return Ok(());
            }
            let id = self.i16()?;
            field(self, id, kind)?;
        }
    }
    fn skip(&mut self, kind: u8, depth: usize) -> Result<(), ThriftError> {
        if depth > MAX_DEPTH {
            return Err(ThriftError("nested too deeply".into()));
        }
        match kind {
            BOOL | BYTE => self.take(1).map(drop),
            I16 => self.take(2).map(drop),
            I32 => self.take(4).map(drop),
            DOUBLE | I64 => self.take(8).map(drop),
            STRING => self.bytes().map(drop),
            STRUCT => self.fields(depth + 1, |r, _, k| r.skip(k, depth + 1)),
            LIST | SET => {
                let (element, count) = self.list()?;
                (0..count).try_for_each(|_| self.skip(element, depth + 1))
            }
            MAP => {
                let (key, value) = (self.u8()?, self.u8()?);
                let count = self.i32()?.max(0) as usize;
                (0..count).try_for_each(|_| self.skip(key, depth + 1).and_then(|_| self.skip(value, depth + 1)))
            }
            other => Err(ThriftError(format!("unknown field type {other}"))),
        }
    }
}

fn expect(kind: u8, wanted: u8, what: &str) -> Result<(), ThriftError> {
    if kind != wanted {
        return Err(ThriftError(format!("{what} has type {kind}, expected {wanted}")));
    }
    Ok(())
}

/// One tag: its key and value as JSON.
fn tag(reader: &mut Reader<'_>, depth: usize) -> Result<(String, Value), ThriftError> {
    let (mut key, mut value) = (String::new(), Value::Null);
    reader.fields(depth, |r, id, kind| {
        match (id, kind) {
            (1, STRING) => key = r.string()?,
            (3, STRING) => value = Value::String(r.string()?),
            (4, DOUBLE) => value = json!(r.f64()?),
            (5, BOOL) => value = Value::Bool(r.u8()? != 0),
            (6, I64) => value = json!(r.i64()?),
            (7, STRING) => value = Value::String(hex::encode(r.bytes()?)),
            (_, kind) => r.skip(kind, depth)?,
        }
        Ok(())
    })?;
    Ok((key, value))
}

fn tags(reader: &mut Reader<'_>, kind: u8, depth: usize) -> Result<BTreeMap<String, Value>, ThriftError> {
    expect(kind, LIST, "tags")?;
    let (element, count) = reader.list()?;
    expect(element, STRUCT, "a tag")?;
    (0..count).map(|_| tag(reader, depth + 1)).collect()
}

#[derive(Debug, Default)]
struct JaegerSpan {
    trace_low: i64,
    trace_high: i64,
    span_id: i64,
    parent_span_id: i64,
    operation: String,
    /// (type, trace low, trace high, span id).
    references: Vec<(i32, i64, i64, i64)>,
    start_us: i64,
    duration_us: i64,
    tags: BTreeMap<String, Value>,
    /// (time µs, fields).
    logs: Vec<(i64, BTreeMap<String, Value>)>,
}

fn span(reader: &mut Reader<'_>, depth: usize) -> Result<JaegerSpan, ThriftError> {
    let mut span = JaegerSpan::default();
    reader.fields(depth, |r, id, kind| {
        match (id, kind) {
            (1, I64) => span.trace_low = r.i64()?,
            (2, I64) => span.trace_high = r.i64()?,
            (3, I64) => span.span_id = r.i64()?,
            (4, I64) => span.parent_span_id = r.i64()?,
            (5, STRING) => span.operation = r.string()?,
            (6, LIST) => {
                let (element, count) = r.list()?;
                expect(element, STRUCT, "a reference")?;
                for _ in 0..count {
                    let mut reference = (0, 0, 0, 0);
                    r.fields(depth + 1, |r, id, kind| {
                        match (id, kind) {
                            (1, I32) => reference.0 = r.i32()?,
                            (2, I64) => reference.1 = r.i64()?,
                            (3, I64) => reference.2 = r.i64()?,
                            (4, I64) => reference.3 = r.i64()?,
                            (_, kind) => r.skip(kind, depth + 1)?,
                        }
                        Ok(())
                    })?;
                    span.references.push(reference);
                }
            }
            (8, I64) => span.start_us = r.i64()?,
            (9, I64) => span.duration_us = r.i64()?,
            (10, kind) => span.tags = tags(r, kind, depth)?,
            (11, LIST) => {
                let (element, count) = r.list()?;
                expect(element, STRUCT, "a log")?;
                for _ in 0..count {
                    let (mut time, mut fields) = (0, BTreeMap::new());
                    r.fields(depth + 1, |r, id, kind| {
                        match (id, kind) {
                            (1, I64) => time = r.i64()?,
                            (2, kind) => fields = tags(r, kind, depth + 1)?,
                            (_, kind) => r.skip(kind, depth + 1)?,
                        }
                        Ok(())
                    })?;
                    span.logs.push((time, fields));
                }
            }
            (_, kind) => r.skip(kind, depth)?,
        }
        Ok(())
    })?;
    Ok(span)
}

/// A decoded `Batch`: the process (service name, tags) and its spans.
#[derive(Debug)]
pub(crate) struct JaegerBatch {
    service: String,
    process_tags: BTreeMap<String, Value>,
    spans: Vec<JaegerSpan>,
}

pub(crate) fn batch(data: &[u8]) -> Result<JaegerBatch, ThriftError> {
    let mut reader = Reader { data, position: 0 };
    let mut out = JaegerBatch { service: String::new(), process_tags: BTreeMap::new(), spans: Vec::new() };
    reader.fields(0, |r, id, kind| {
        match (id, kind) {
            (1, STRUCT) => r.fields(1, |r, id, kind| {
                match (id, kind) {
                    (1, STRING) => out.service = r.string()?,
                    (2, kind) => out.process_tags = tags(r, kind, 2)?,
                    (_, kind) => r.skip(kind, 2)?,
                }
                Ok(())
            })?,
            (2, LIST) => {
                let (element, count) = r.list()?;
                expect(element, STRUCT, "a span")?;
                for _ in 0..count {
                    out.spans.push(span(r, 2)?);
                }
            }
            (_, kind) => r.skip(kind, 1)?,
        }
        Ok(())
    })?;
    if reader.position != data.len() {
        return Err(ThriftError(format!("{} bytes after the end of the Batch", data.len() - reader.position)));
    }
    Ok(out)
}

fn trace_hex(high: i64, low: i64) -> String {
    format!("{:016x}{:016x}", high as u64, low as u64)
}

fn span_hex(id: i64) -> String {
    format!("{:016x}", id as u64)
}

/// Converts a decoded batch to rows, attributing each span to a tenant.
pub(crate) fn rows(decoded: JaegerBatch, sender: &Sender) -> Result<(Batch, u64, Vec<String>), TooLarge> {
    let mut out = Batch::default();
    let mut expansion = Expansion::default();
    let mut rejected = 0;
    let mut reasons = Vec::new();
    let mut resource = decoded.process_tags.clone();
    resource.insert("service.name".into(), Value::String(decoded.service.clone()));
    let resource_json = serde_json::to_string(&resource).expect("json");
    for span in decoded.spans {
        let namespace = decoded
            .process_tags
            .get("service.namespace")
            .or_else(|| span.tags.get("service.namespace"))
            .and_then(Value::as_str);
        let (tenant, metered) = match sender.tenant_for(namespace) {
            Ok(attribution) => attribution,
            Err(reason) => {
                rejected += 1;
                // At most ten, as OTLP's partial success says them.
                if reasons.len() < 10 && !reasons.contains(&reason) {
                    reasons.push(reason);
                }
                continue;
            }
        };
        if (span.trace_high == 0 && span.trace_low == 0) || span.span_id == 0 {
            rejected += 1;
            continue;
        }
        let parent = match span.parent_span_id {
            0 => span.references.iter().find(|r| r.0 == 0).map(|r| span_hex(r.3)),
            id => Some(span_hex(id)),
        };
        let links: Vec<Value> = span
            .references
            .iter()
            .filter(|r| r.0 == 1)
            .map(|r| json!({"trace_id": trace_hex(r.2, r.1), "span_id": span_hex(r.3), "attributes": {}}))
            .collect();
        let mut attributes = span.tags;
        let kind = match attributes.remove("span.kind").as_ref().and_then(Value::as_str) {
            Some("server") => 2,
            Some("client") => 3,
            Some("producer") => 4,
            Some("consumer") => 5,
            Some("internal") => 1,
            _ => 0,
        };
        let error = attributes.get("error").and_then(Value::as_bool) == Some(true);
        let status_code = match attributes.remove("otel.status_code").as_ref().and_then(Value::as_str) {
            Some("OK") => 1,
            Some("ERROR") => 2,
            _ if error => 2,
            _ => 0,
        };
        let status_message = attributes.remove("otel.status_description").and_then(|v| v.as_str().map(str::to_string));
        let events: Vec<Value> = span
            .logs
            .into_iter()
            .map(|(time, mut fields)| {
                let name =
                    fields.remove("event").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "log".into());
                json!({"name": name, "time_ns": time.saturating_mul(1000), "attributes": fields})
            })
            .collect();
        let row = SpanRow {
            tenant,
            trace_id: trace_hex(span.trace_high, span.trace_low),
            span_id: span_hex(span.span_id),
            parent_span_id: parent,
            name: span.operation,
            kind,
            start_ns: span.start_us.saturating_mul(1000),
            end_ns: span.start_us.saturating_add(span.duration_us).saturating_mul(1000),
            status_code,
            status_message: status_message.unwrap_or_default(),
            service_name: decoded.service.clone(),
            attributes: serde_json::to_string(&attributes).expect("json"),
            events: Value::Array(events).to_string(),
            links: Value::Array(links).to_string(),
            resource: resource_json.clone(),
            scope: "{}".into(),
            metered,
        };
        expansion.add(row.bytes())?;
        out.spans.push(row);
    }
    Ok((out, rejected, reasons))
}

/// `POST /api/traces`.
pub async fn traces(State(collector): State<Arc<Collector>>, headers: HeaderMap, body: Bytes) -> Response {
    let reject = |reason: &'static str| {
        collector.metrics.rejected.get_or_create(&RejectLabels { signal: "traces", reason }).inc()
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !matches!(mime, "application/x-thrift" | "application/vnd.apache.thrift.binary") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content type {mime:?}: use application/x-thrift"),
        );
    }
    let sender = match basic_or_bearer_sender(&collector, &headers, "traces") {
        Ok(sender) => sender,
        Err((status, message)) => return text(status, message),
    };
    if let Err(refused) = collector.pipeline.precheck(sender.source(), false) {
        let refusal = Refusal::from(refused);
        reject(refusal.reason);
        return refusal.text();
    }
    let decoded = match batch(&body) {
        Ok(decoded) => decoded,
        Err(error) => {
            reject("invalid");
            return text(StatusCode::BAD_REQUEST, error.to_string());
        }
    };
    let (batch, rejected, reasons) = match rows(decoded, &sender) {
        Ok(rows) => rows,
        Err(too_large) => {
            reject("invalid");
            return text(StatusCode::BAD_REQUEST, too_large.to_string());
        }
    };
    if rejected > 0 {
        collector
            .metrics
            .rejected
            .get_or_create(&RejectLabels { signal: "traces", reason: "tenant_or_data" })
            .inc_by(rejected);
    }
    let items = batch.len() as u64;
    match collector.pipeline.submit(batch, sender.source()).await {
        Ok(_) => {
            collector
                .metrics
                .accepted
                .get_or_create(&SignalLabels { signal: "traces", protocol: "jaeger_thrift" })
                .inc_by(items);
            if rejected > 0 {
                // Jaeger has no partial success: say what was refused, with the accepted status.
                return text(StatusCode::ACCEPTED, format!("{rejected} spans refused: {}", reasons.join("; ")));
            }
            StatusCode::ACCEPTED.into_response()
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

    /// A thrift writer for the tests' own hand-made batches.
    struct Writer(Vec<u8>);
    impl Writer {
        fn field(&mut self, kind: u8, id: i16) -> &mut Self {
            self.0.push(kind);
            self.0.extend(id.to_be_bytes());
            self
        }
        fn i64(&mut self, id: i16, v: i64) -> &mut Self {
            self.field(I64, id);
            self.0.extend(v.to_be_bytes());
            self
        }
        fn string(&mut self, id: i16, v: &str) -> &mut Self {
            self.field(STRING, id);
            self.0.extend((v.len() as i32).to_be_bytes());
            self.0.extend(v.as_bytes());
            self
        }
        fn stop(&mut self) -> &mut Self {
            self.0.push(STOP);
            self
        }
    }

    fn one_span_batch() -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.field(STRUCT, 1).string(1, "cart").stop();
        w.field(LIST, 2);
        w.0.push(STRUCT);
        w.0.extend(1i32.to_be_bytes());
        w.i64(1, 7).i64(2, 9).i64(3, 5).i64(4, 3).string(5, "checkout").i64(8, 1_000).i64(9, 250).stop();
        w.stop();
        w.0
    }

    #[test]
    fn a_batch_decodes_with_ids_times_and_parent() {
        let decoded = batch(&one_span_batch()).unwrap();
        assert_eq!(decoded.service, "cart");
        let span = &decoded.spans[0];
        assert_eq!((span.trace_low, span.trace_high, span.span_id, span.parent_span_id), (7, 9, 5, 3));
        assert_eq!(trace_hex(span.trace_high, span.trace_low), "00000000000000090000000000000007");
        assert_eq!((span.start_us, span.duration_us, span.operation.as_str()), (1_000, 250, "checkout"));
    }

    /// A 1 MiB service name, shared by 100 minimal spans, would be copied into each span's
    /// row twice (service and resource): 200 MiB of rows from a 1 MiB request. Refused whole.
    #[test]
    fn a_batch_that_expands_past_the_bound_is_refused() {
        let spans = |service: &str| {
            let mut w = Writer(Vec::new());
            w.field(STRUCT, 1).string(1, service).stop();
            w.field(LIST, 2);
            w.0.push(STRUCT);
            w.0.extend(100i32.to_be_bytes());
            for id in 1..=100 {
                w.i64(1, 7).i64(2, 9).i64(3, id).string(5, "op").stop();
            }
            w.stop();
            w.0
        };
        let sender = Sender { credential: crate::auth::Credential::Ingest { tenant: "acme".into() }, org_id: None };
        let refused = rows(batch(&spans(&"s".repeat(1 << 20))).unwrap(), &sender).unwrap_err();
        assert!(refused.to_string().contains("expands to more than 64 MiB"), "{refused}");
        let (accepted, rejected, _) = rows(batch(&spans("cart")).unwrap(), &sender).unwrap();
        assert_eq!((accepted.spans.len(), rejected), (100, 0));
    }

    #[test]
    fn truncated_and_hostile_input_is_refused() {
        let full = one_span_batch();
        for cut in [1, 5, full.len() / 2, full.len() - 1] {
            assert!(batch(&full[..cut]).is_err(), "a batch cut at {cut} bytes decoded");
        }
        // A list claiming two billion elements.
        let mut hostile = vec![LIST, 0, 2, STRUCT];
        hostile.extend(i32::MAX.to_be_bytes());
        assert!(batch(&hostile).unwrap_err().to_string().contains("list of"));
        assert!(batch(&[LIST, 0, 2, STRUCT, 255, 255, 255, 255]).unwrap_err().to_string().contains("negative"));
        let mut trailing = full.clone();
        trailing.push(0);
        assert!(batch(&trailing).unwrap_err().to_string().contains("after the end"));
    }
}
