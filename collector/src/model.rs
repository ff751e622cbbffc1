//! The rows the collector stores: one model for every protocol it receives.

use serde::Serialize;

/// A span, attributed to a tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpanRow {
    pub tenant: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: i64,
    pub start_ns: i64,
    pub end_ns: i64,
    pub status_code: i64,
    pub status_message: String,
    pub service_name: String,
    /// JSON object.
    pub attributes: String,
    /// JSON array of {name, time_ns, attributes}.
    pub events: String,
    /// JSON array of {trace_id, span_id, attributes}.
    pub links: String,
    /// JSON object of the resource's attributes.
    pub resource: String,
    /// JSON {name, version}.
    pub scope: String,
    pub metered: bool,
}

impl SpanRow {
    /// What the row holds, about as stored (see [`Batch::bytes`]).
    pub fn bytes(&self) -> u64 {
        (self.trace_id.len()
            + self.span_id.len()
            + self.parent_span_id.as_ref().map_or(0, String::len)
            + self.name.len()
            + self.status_message.len()
            + self.service_name.len()
            + self.attributes.len()
            + self.events.len()
            + self.links.len()
            + self.resource.len()
            + self.scope.len()
            + 40) as u64
    }

    /// How long the span took, in ns: 0 when it ends before it starts, at most `i64::MAX`.
    /// Its times are the sender's (any `i64`), so the plain difference can overflow.
    pub fn duration_ns(&self) -> i64 {
        self.end_ns.saturating_sub(self.start_ns).max(0)
    }
}

/// One metric sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleRow {
    pub tenant: String,
    pub metric: String,
    /// Canonical JSON object (keys sorted).
    pub labels: String,
    pub kind: &'static str,
    pub ts_ns: i64,
    pub value: f64,
    /// Histograms and summaries: {"count","sum","buckets":[[le, cumulative count], ...]}.
    pub histogram: Option<String>,
    pub metered: bool,
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogRow {
    pub tenant: String,
    pub record_hash: String,
    pub ts_ns: i64,
    pub severity_number: i64,
    pub severity_text: String,
    pub body: String,
    pub attributes: String,
    pub resource: String,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    pub metered: bool,
}

/// The `histogram` of a staleness marker row (value NaN): the series ended at its time, as
/// Prometheus marks it (a scraped series gone from its target, or a target gone), so that a
/// query stops selecting it there rather than 5 minutes (the lookback) after its last sample.
pub const STALE_MARKER: &str = r#"{"stale":true}"#;

impl SampleRow {
    /// A staleness marker for a series at `ts_ns` (see [`STALE_MARKER`]).
    pub fn stale(
        tenant: String,
        metric: String,
        labels: String,
        kind: &'static str,
        ts_ns: i64,
        metered: bool,
    ) -> Self {
        SampleRow {
            tenant,
            metric,
            labels,
            kind,
            ts_ns,
            value: f64::NAN,
            histogram: Some(STALE_MARKER.into()),
            metered,
        }
    }

    /// Whether the row is a staleness marker.
    pub fn is_stale(&self) -> bool {
        self.histogram.as_deref() == Some(STALE_MARKER)
    }

    /// What the row holds, about as stored (see [`Batch::bytes`]).
    pub fn bytes(&self) -> u64 {
        (self.metric.len() + self.labels.len() + self.histogram.as_ref().map_or(0, String::len) + 24) as u64
    }
}

impl LogRow {
    /// What the row holds, about as stored (see [`Batch::bytes`]).
    pub fn bytes(&self) -> u64 {
        (self.record_hash.len()
            + self.severity_text.len()
            + self.body.len()
            + self.attributes.len()
            + self.resource.len()
            + self.trace_id.as_ref().map_or(0, String::len)
            + self.span_id.as_ref().map_or(0, String::len)
            + 16) as u64
    }
}

/// What one request carries to the store.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub spans: Vec<SpanRow>,
    pub samples: Vec<SampleRow>,
    pub logs: Vec<LogRow>,
}

impl Batch {
    /// Items in the batch (the unit of the ingest queue's bound).
    pub fn len(&self) -> usize {
        self.spans.len() + self.samples.len() + self.logs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the rows hold, about as stored: their text and numbers, not their indexes. The
    /// unit of a tenant's daily telemetry quota.
    pub fn bytes(&self) -> u64 {
        self.spans.iter().map(SpanRow::bytes).sum::<u64>()
            + self.samples.iter().map(SampleRow::bytes).sum::<u64>()
            + self.logs.iter().map(LogRow::bytes).sum::<u64>()
    }

    pub fn append(&mut self, other: Batch) {
        self.spans.extend(other.spans);
        self.samples.extend(other.samples);
        self.logs.extend(other.logs);
    }
}

/// A stored span kind's name as Jaeger and the OpenTelemetry Collector's translator write it
/// (`span.kind`): 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
pub fn span_kind_name(kind: i64) -> Option<&'static str> {
    match kind {
        1 => Some("internal"),
        2 => Some("server"),
        3 => Some("client"),
        4 => Some("producer"),
        5 => Some("consumer"),
        _ => None,
    }
}

/// A stored status code's name (`otel.status_code`): 1 OK, 2 ERROR (0, unset, has none).
pub fn status_name(code: i64) -> Option<&'static str> {
    match code {
        1 => Some("OK"),
        2 => Some("ERROR"),
        _ => None,
    }
}
