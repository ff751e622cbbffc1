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

    pub fn append(&mut self, other: Batch) {
        self.spans.extend(other.spans);
        self.samples.extend(other.samples);
        self.logs.extend(other.logs);
    }
}
