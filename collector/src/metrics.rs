//! The collector's own Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    pub signal: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub signal: &'static str,
    pub reason: &'static str,
}

/// Accepted and rejected items, queue depth, commit latency.
pub struct CollectorMetrics {
    registry: Registry,
    pub accepted: Family<SignalLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub queue_depth: Gauge,
    pub commit_seconds: Histogram,
}

impl Default for CollectorMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let accepted = Family::<SignalLabels, Counter>::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let queue_depth = Gauge::default();
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register("sfaas_collector_accepted", "Items stored, by signal and protocol", accepted.clone());
        registry.register("sfaas_collector_rejected", "Items refused, by signal and reason", rejected.clone());
        registry.register("sfaas_collector_queue_depth", "Items waiting to be committed", queue_depth.clone());
        registry.register("sfaas_collector_commit_seconds", "Time to commit one batch", commit_seconds.clone());
        Self { registry, accepted, rejected, queue_depth, commit_seconds }
    }
}

impl CollectorMetrics {
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
