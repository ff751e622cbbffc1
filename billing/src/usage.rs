//! Usage records: one per billable item, extracted from metered spans only (DESIGN.md §3, §6).
//!
//! - `invoke <function>` spans with `sfaas.billable = true` give one record per invocation,
//!   keyed by (tenant, `faas.invocation_id`);
//! - `state.usage` spans give one record per state interval and owner (a flow run's job, or
//!   the tenant's standing storage), keyed by (tenant, `sfaas.usage_id`), with exact decimal
//!   byte-seconds.
//!
//! A record is inserted once and never updated: duplicate deliveries of a span (or of the same
//! invocation in another span) insert nothing.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

/// What a record bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invocation,
    State,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Invocation => "invocation",
            Kind::State => "state",
        }
    }
}

/// One billable item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecord {
    pub tenant: String,
    pub usage_id: String,
    pub kind: Kind,
    pub function: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_run: Option<String>,
    pub trace_id: String,
    pub span_id: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub memory_peak_bytes: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub status_code: i64,
    pub state_byte_seconds: Decimal,
    /// Where it belongs: the period it happened in, the invoice it is billed on, the plan.
    pub period: String,
    pub billed_period: String,
    pub plan: String,
    pub received_ms: i64,
}

/// A metered span as the collector stored it.
#[derive(Debug, Clone)]
pub struct SpanFields {
    pub tenant: String,
    pub trace_id: String,
    pub span_id: String,
    pub name: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub attributes: String,
    pub received_ms: i64,
}

/// The part of a record that comes from its span; `None` when the span bills nothing.
pub fn from_span(span: &SpanFields) -> Result<Option<UsageRecord>, String> {
    let attributes: serde_json::Map<String, Value> = serde_json::from_str(&span.attributes)
        .map_err(|e| format!("span {}/{}: attributes are not a JSON object: {e}", span.trace_id, span.span_id))?;
    let text = |key: &str| attributes.get(key).and_then(Value::as_str).map(str::to_string);
    let int = |key: &str| attributes.get(key).and_then(Value::as_i64).unwrap_or(0).max(0);
    let mut record = UsageRecord {
        tenant: span.tenant.clone(),
        usage_id: String::new(),
        kind: Kind::Invocation,
        function: String::new(),
        // Flow nodes run in their run's state job, named by the run id.
        flow_run: text("sfaas.flow.run_id").or_else(|| text("sfaas.state.job")),
        trace_id: span.trace_id.clone(),
        span_id: span.span_id.clone(),
        start_ns: span.start_ns,
        end_ns: span.end_ns,
        cpu_ms: 0,
        wall_ms: 0,
        memory_peak_bytes: 0,
        bytes_in: 0,
        bytes_out: 0,
        status_code: 0,
        state_byte_seconds: Decimal::ZERO,
        period: String::new(),
        billed_period: String::new(),
        plan: String::new(),
        received_ms: span.received_ms,
    };
    if span.name == "state.usage" {
        let Some(usage_id) = text("sfaas.usage_id") else {
            return Err(format!("state.usage span {}/{} has no sfaas.usage_id", span.trace_id, span.span_id));
        };
        let byte_seconds =
            text("sfaas.state.byte_seconds").and_then(|t| t.parse::<Decimal>().ok()).ok_or_else(|| {
                format!(
                    "state.usage span {}/{}: sfaas.state.byte_seconds is not a decimal string",
                    span.trace_id, span.span_id
                )
            })?;
        record.kind = Kind::State;
        record.usage_id = usage_id;
        record.state_byte_seconds = byte_seconds;
        if text("sfaas.state.owner").as_deref() == Some("job") {
            record.flow_run = text("sfaas.state.job");
        }
        return Ok(Some(record));
    }
    if !span.name.starts_with("invoke ") || attributes.get("sfaas.billable") != Some(&Value::Bool(true)) {
        return Ok(None);
    }
    let Some(invocation_id) = text("faas.invocation_id") else {
        return Err(format!("invoke span {}/{} has no faas.invocation_id", span.trace_id, span.span_id));
    };
    record.usage_id = invocation_id;
    record.function = text("faas.name").unwrap_or_else(|| span.name["invoke ".len()..].to_string());
    record.cpu_ms = int("sfaas.cpu_ms");
    record.wall_ms = int("sfaas.wall_ms");
    record.memory_peak_bytes = int("sfaas.memory.peak_bytes");
    record.bytes_in = int("sfaas.bytes_in");
    record.bytes_out = int("sfaas.bytes_out");
    record.status_code = int("http.response.status_code");
    Ok(Some(record))
}

/// Sums of records that share (tenant, billed period, period, plan, function).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub records: i64,
    pub invocations: i64,
    /// Invocations answered with a status ≥ 500.
    pub errors: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub bytes_out: i64,
    pub state_byte_seconds: Decimal,
}

impl Totals {
    pub fn add_record(&mut self, record: &UsageRecord) {
        self.records += 1;
        if record.kind == Kind::Invocation {
            self.invocations += 1;
            self.errors += i64::from(record.status_code >= 500);
        }
        self.cpu_ms += record.cpu_ms;
        self.wall_ms += record.wall_ms;
        self.bytes_out += record.bytes_out;
        self.state_byte_seconds += record.state_byte_seconds;
    }

    pub fn add(&mut self, other: &Totals) {
        self.records += other.records;
        self.invocations += other.invocations;
        self.errors += other.errors;
        self.cpu_ms += other.cpu_ms;
        self.wall_ms += other.wall_ms;
        self.bytes_out += other.bytes_out;
        self.state_byte_seconds += other.state_byte_seconds;
    }

    /// The raw quantity of a billed metric (invocations, ms, byte-seconds, bytes).
    pub fn quantity(&self, metric: crate::plans::Metric) -> Decimal {
        use crate::plans::Metric;
        match metric {
            Metric::Invocations => Decimal::from(self.invocations),
            Metric::CpuMs => Decimal::from(self.cpu_ms),
            Metric::StateByteSeconds => self.state_byte_seconds,
            Metric::BytesOut => Decimal::from(self.bytes_out),
        }
    }
}

/// The key of a totals row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TotalsKey {
    pub tenant: String,
    pub billed_period: String,
    pub period: String,
    pub plan: String,
    pub function: String,
}

impl TotalsKey {
    pub fn of(record: &UsageRecord) -> Self {
        Self {
            tenant: record.tenant.clone(),
            billed_period: record.billed_period.clone(),
            period: record.period.clone(),
            plan: record.plan.clone(),
            function: record.function.clone(),
        }
    }
}

/// Sums records by their totals key.
pub fn aggregate<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> HashMap<TotalsKey, Totals> {
    let mut sums: HashMap<TotalsKey, Totals> = HashMap::new();
    for record in records {
        sums.entry(TotalsKey::of(record)).or_default().add_record(record);
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, attributes: &str) -> SpanFields {
        SpanFields {
            tenant: "acme".into(),
            trace_id: "t".into(),
            span_id: "s".into(),
            name: name.into(),
            start_ns: 1,
            end_ns: 2,
            attributes: attributes.into(),
            received_ms: 3,
        }
    }

    #[test]
    fn invocations_and_state_intervals_become_records() {
        let record = from_span(&span(
            "invoke resize",
            r#"{"faas.name":"resize","faas.invocation_id":"c1","sfaas.billable":true,"sfaas.cpu_ms":7,"sfaas.bytes_out":10,"http.response.status_code":200}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (record.usage_id.as_str(), record.function.as_str(), record.cpu_ms, record.bytes_out),
            ("c1", "resize", 7, 10)
        );
        let unbilled = span("invoke resize", r#"{"faas.name":"resize","faas.invocation_id":"c1"}"#);
        assert_eq!(from_span(&unbilled).unwrap(), None);
        assert_eq!(from_span(&span("flow etl", r#"{}"#)).unwrap(), None);
        let state = from_span(&span(
            "state.usage",
            r#"{"sfaas.usage_id":"state/job/r1/60","sfaas.state.owner":"job","sfaas.state.job":"r1","sfaas.state.byte_seconds":"12.000000001","sfaas.billable":true}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(state.kind, Kind::State);
        assert_eq!(state.flow_run.as_deref(), Some("r1"));
        assert_eq!(state.state_byte_seconds.to_string(), "12.000000001");
        let error =
            from_span(&span("state.usage", r#"{"sfaas.usage_id":"x","sfaas.state.byte_seconds":1.5}"#)).unwrap_err();
        assert!(error.contains("decimal string"), "{error}");
    }
}
