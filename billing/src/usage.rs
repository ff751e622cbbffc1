//! Usage records: one per billable item, extracted from metered spans only (docs/contracts.md,
//! "Tenants, tokens and trust" and "Billing contract"; the extraction itself is in `extract.rs`).
//!
//! - `invoke <function>` spans with `sfaas.billable = true` give one record per invocation,
//!   keyed by (tenant, `faas.invocation_id`);
//! - `state.usage` spans give one record per state interval and owner (a flow run's job, or
//!   the tenant's standing storage), keyed by (tenant, `sfaas.usage_id`), with exact decimal
//!   byte-seconds;
//! - `instance.usage` spans give one record per stretch of a managed instance's CPU time
//!   between requests (its idle work), keyed by (tenant, `sfaas.usage_id`): CPU-ms of its
//!   function, no invocation.
//!
//! A record is inserted once and never updated: duplicate deliveries of a span (or of the same
//! invocation in another span) insert nothing; the record names the first span that arrived.

use rust_decimal::Decimal;
use serde::Serialize;

/// What a record bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invocation,
    State,
    Instance,
}

impl Kind {
    /// Its name in `usage_records.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Invocation => "invocation",
            Kind::State => "state",
            Kind::Instance => "instance",
        }
    }

    /// A stored kind (anything unknown reads as an invocation, as rows did before kinds).
    pub fn parse(text: &str) -> Self {
        match text {
            "state" => Kind::State,
            "instance" => Kind::Instance,
            _ => Kind::Invocation,
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
    /// The caller's call id (invocations): the attempts of one call share it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    pub trace_id: String,
    pub span_id: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub memory_peak_bytes: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    /// Bytes of the log lines the platform exported for the invocation (`sfaas.log_bytes`).
    pub log_bytes: i64,
    pub status_code: i64,
    pub state_byte_seconds: Decimal,
    /// Where it belongs: the period it happened in, the invoice it is billed on, the plan.
    pub period: String,
    pub billed_period: String,
    pub plan: String,
    pub received_ms: i64,
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
    pub log_bytes: i64,
    pub state_byte_seconds: Decimal,
}

impl Totals {
    /// Adds `other`, saturating: absurd figures in spans pin a sum at its limit rather than
    /// wrap it or stop billing with a panic.
    pub fn add(&mut self, other: &Totals) {
        self.records = self.records.saturating_add(other.records);
        self.invocations = self.invocations.saturating_add(other.invocations);
        self.errors = self.errors.saturating_add(other.errors);
        self.cpu_ms = self.cpu_ms.saturating_add(other.cpu_ms);
        self.wall_ms = self.wall_ms.saturating_add(other.wall_ms);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.log_bytes = self.log_bytes.saturating_add(other.log_bytes);
        self.state_byte_seconds = self.state_byte_seconds.saturating_add(other.state_byte_seconds);
    }

    /// The raw quantity of a billed metric (invocations, ms, byte-seconds, bytes).
    pub fn quantity(&self, metric: crate::plans::Metric) -> Decimal {
        use crate::plans::Metric;
        match metric {
            Metric::Invocations => Decimal::from(self.invocations),
            Metric::CpuMs => Decimal::from(self.cpu_ms),
            Metric::StateByteSeconds => self.state_byte_seconds,
            Metric::BytesOut => Decimal::from(self.bytes_out),
            Metric::LogBytes => Decimal::from(self.log_bytes),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut sum = Totals { cpu_ms: i64::MAX - 1, state_byte_seconds: Decimal::MAX, ..Totals::default() };
        sum.add(&Totals { records: 1, cpu_ms: 5, state_byte_seconds: Decimal::ONE, ..Totals::default() });
        assert_eq!((sum.records, sum.cpu_ms, sum.state_byte_seconds), (1, i64::MAX, Decimal::MAX));
    }
}
