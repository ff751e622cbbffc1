//! Shared helpers of the billing tests: a telemetry store (SQLite, or a real PostgreSQL the
//! test starts) with billing over it, and metered spans as the core emits them.
#![allow(dead_code, unused_imports)]

use std::time::Duration;

use billing::Billing;
use collector::clock::Clock;
use collector::model::{Batch, SpanRow};
use collector::store::TelemetryStore;
pub use testkit::{Backend, backends};

pub struct Fixture {
    pub store: TelemetryStore,
    pub billing: Billing,
}

/// What "now" is when a fixture opens: the fixed dates of the tests are before it (October
/// 2026 is over, with its grace window), and no test result depends on the day it runs.
pub const NOW: &str = "2026-11-20T00:00:00Z";

/// Billing over a fresh store with `card` applied, its clock at [`NOW`]; spans are billed as
/// soon as they arrive.
pub async fn open(backend: &Backend, card: &str) -> Fixture {
    let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks())
        .await
        .unwrap()
        .with_clock(Clock::starting_at(ns(NOW)));
    let mut billing = Billing::open(&store).await.unwrap();
    billing.set_settle(Duration::ZERO);
    billing.apply_rate_card(card).await.unwrap();
    Fixture { store, billing }
}

impl Fixture {
    /// Stores spans as the collector does (metered: sent with the meter token), and waits out
    /// the millisecond they arrived in, so that the next billing run sees them.
    pub async fn deliver(&self, spans: Vec<SpanRow>) {
        self.store.write(&Batch { spans, ..Batch::default() }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

pub fn ns(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_nanos_opt().unwrap()
}

fn span(tenant: &str, span_id: &str, name: &str, start_ns: i64, end_ns: i64, attributes: serde_json::Value) -> SpanRow {
    SpanRow {
        tenant: tenant.into(),
        trace_id: format!("{:032x}", 0xabcu128 + span_id.len() as u128),
        span_id: span_id.into(),
        parent_span_id: None,
        name: name.into(),
        kind: 2,
        start_ns,
        end_ns,
        status_code: 0,
        status_message: String::new(),
        service_name: "sfaas-core".into(),
        attributes: attributes.to_string(),
        events: "[]".into(),
        links: "[]".into(),
        resource: serde_json::json!({"service.name": "sfaas-core", "service.namespace": tenant}).to_string(),
        scope: "{}".into(),
        metered: true,
    }
}

/// The gateway's execution id (a UUID, the billing key) of a test call: derived from its call id.
pub fn execution_id(call_id: &str) -> String {
    let h = fxhash(call_id);
    format!("{:08x}-0000-7000-8000-{:012x}", h >> 32, h & 0xffff_ffff_ffff)
}

/// An `invoke` span of the core; its span id and execution id derive from the call id.
pub fn invoke(
    tenant: &str,
    call_id: &str,
    function: &str,
    start_ns: i64,
    cpu_ms: i64,
    bytes_out: i64,
    status: i64,
) -> SpanRow {
    span(
        tenant,
        &format!("{:016x}", fxhash(call_id)),
        &format!("invoke {function}"),
        start_ns,
        start_ns + 5_000_000,
        serde_json::json!({
            "faas.name": function,
            "faas.invocation_id": execution_id(call_id),
            "sfaas.call_id": call_id,
            "faas.trigger": "http",
            "faas.coldstart": false,
            "sfaas.cpu_ms": cpu_ms,
            "sfaas.wall_ms": 5,
            "sfaas.memory.peak_bytes": 1_048_576,
            "sfaas.bytes_in": 100,
            "sfaas.bytes_out": bytes_out,
            "http.response.status_code": status,
            "sfaas.billable": true,
        }),
    )
}

/// A `state.usage` span: one state interval of standing storage or of a job.
pub fn state(tenant: &str, job: Option<&str>, start_ns: i64, end_ns: i64, byte_seconds: &str) -> SpanRow {
    let usage_id = match job {
        Some(job) => format!("state/job/{job}/{start_ns}"),
        None => format!("state/standing/{start_ns}"),
    };
    let mut attributes = serde_json::json!({
        "sfaas.usage_id": usage_id,
        "sfaas.state.owner": if job.is_some() { "job" } else { "standing" },
        "sfaas.state.byte_seconds": byte_seconds,
        "sfaas.billable": true,
    });
    if let Some(job) = job {
        attributes["sfaas.state.job"] = job.into();
    }
    span(tenant, &format!("{:016x}", fxhash(&usage_id)), "state.usage", start_ns, end_ns, attributes)
}

fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3)) | 1
}
