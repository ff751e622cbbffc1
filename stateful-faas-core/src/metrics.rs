//! The gateway's Prometheus metrics: OpenFaaS names, with a `namespace` label added.
//!
//! As in OpenFaaS, `function_name` is `NAME.NAMESPACE`, so dashboards written for OpenFaaS keep
//! working; `namespace` repeats the tenant for per-tenant queries.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::function::Usage;
use crate::semconv;
use crate::state::StateStore;
use crate::tenant::TenantId;

/// Content type of [`Metrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`Metrics::encode_text`].
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    function_name: String,
    namespace: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function_name: String,
    namespace: String,
}

impl FunctionLabels {
    fn new(tenant: &TenantId, function: &str) -> Self {
        Self { function_name: format!("{function}.{tenant}"), namespace: tenant.to_string() }
    }
}

/// Every metric the gateway exposes on `/metrics`.
pub struct Metrics {
    registry: Registry,
    invocations: Family<CodeLabels, Counter>,
    seconds: Family<FunctionLabels, Histogram>,
    service_count: Family<FunctionLabels, Gauge>,
    cpu_seconds: Family<FunctionLabels, Counter<f64, AtomicU64>>,
    cold_starts: Family<FunctionLabels, Counter>,
    inflight: Family<FunctionLabels, Gauge>,
    async_queue_depth: Gauge,
    async_dead_letters: Gauge,
}

impl Metrics {
    pub fn new(state: Arc<StateStore>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StateCollector(state)));
        let invocations = Family::<CodeLabels, Counter>::default();
        let seconds = Family::<FunctionLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.5, 14))) as fn() -> Histogram,
        );
        let service_count = Family::<FunctionLabels, Gauge>::default();
        let cpu_seconds = Family::<FunctionLabels, Counter<f64, AtomicU64>>::default();
        let cold_starts = Family::<FunctionLabels, Counter>::default();
        let inflight = Family::<FunctionLabels, Gauge>::default();
        let async_queue_depth = Gauge::default();
        let async_dead_letters = Gauge::default();
        registry.register(semconv::METRIC_INVOCATIONS, "Function invocations by status code", invocations.clone());
        registry.register(semconv::METRIC_FUNCTION_SECONDS, "Function call duration in seconds", seconds.clone());
        registry.register(
            semconv::METRIC_SERVICE_COUNT,
            "Instances ready to serve each function",
            service_count.clone(),
        );
        registry.register(
            semconv::METRIC_CPU_SECONDS,
            "CPU time used by functions, as the kernel measured it",
            cpu_seconds.clone(),
        );
        registry.register(
            semconv::METRIC_COLD_STARTS,
            "Invocations that had to start an instance",
            cold_starts.clone(),
        );
        registry.register(semconv::METRIC_INFLIGHT, "Invocations running now", inflight.clone());
        registry.register(
            semconv::METRIC_ASYNC_QUEUE_DEPTH,
            "Async calls waiting or running",
            async_queue_depth.clone(),
        );
        registry.register(
            semconv::METRIC_ASYNC_DEAD_LETTERS,
            "Async calls that exhausted their retries",
            async_dead_letters.clone(),
        );
        Self {
            registry,
            invocations,
            seconds,
            service_count,
            cpu_seconds,
            cold_starts,
            inflight,
            async_queue_depth,
            async_dead_letters,
        }
    }

    /// Records one finished invocation (including refused ones: `code` 429 and so on).
    pub fn record_invocation(&self, tenant: &TenantId, function: &str, code: u16, seconds: f64, usage: &Usage) {
        let labels = FunctionLabels::new(tenant, function);
        self.invocations
            .get_or_create(&CodeLabels {
                function_name: labels.function_name.clone(),
                namespace: labels.namespace.clone(),
                code: code.to_string(),
            })
            .inc();
        self.seconds.get_or_create(&labels).observe(seconds);
        if usage.cpu_ns > 0 {
            self.cpu_seconds.get_or_create(&labels).inc_by(usage.cpu_ns as f64 / 1e9);
        }
        if usage.cold_start {
            self.cold_starts.get_or_create(&labels).inc();
        }
    }

    /// Tracks a running invocation; the returned guard decrements on drop.
    pub fn begin_inflight(&self, tenant: &TenantId, function: &str) -> InflightGuard {
        let gauge = self.inflight.get_or_create_owned(&FunctionLabels::new(tenant, function));
        gauge.inc();
        InflightGuard(gauge)
    }

    /// Sets the instance count of every function (called before each exposition).
    pub fn set_service_counts<'a>(&self, functions: impl IntoIterator<Item = (&'a TenantId, &'a str, usize)>) {
        self.service_count.clear();
        for (tenant, function, replicas) in functions {
            self.service_count.get_or_create(&FunctionLabels::new(tenant, function)).set(replicas as i64);
        }
    }

    pub fn set_async_queue(&self, depth: i64, dead_letters: i64) {
        self.async_queue_depth.set(depth);
        self.async_dead_letters.set(dead_letters);
    }

    /// The OpenMetrics 1.0 text exposition.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// The Prometheus text format 0.0.4, for scrapers that do not ask for OpenMetrics.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode_openmetrics())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter's family is named after its
/// `_total` samples there, and `# EOF` / `# UNIT` do not exist.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

/// Reads the state store's exact per-tenant figures at each scrape.
#[derive(Debug)]
struct StateCollector(Arc<StateStore>);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = self.0.usage_by_tenant();
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            semconv::METRIC_STATE_BYTES,
            "Bytes held in the state store (values, addresses and 128 bytes an object), as byte-seconds integrate them",
            None,
            gauge.metric_type(),
        )?;
        for (tenant, usage) in &usage {
            let labels = NamespaceLabels { namespace: tenant.to_string() };
            ConstGauge::new(usage.held as i64).encode(family.encode_family(&labels)?)?;
        }
        let counter = ConstCounter::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            semconv::METRIC_STATE_BYTE_SECONDS,
            "Byte-seconds held in the state store, integrated exactly at every change",
            None,
            counter.metric_type(),
        )?;
        for (tenant, usage) in &usage {
            let labels = NamespaceLabels { namespace: tenant.to_string() };
            ConstCounter::new(usage.total.as_f64()).encode(family.encode_family(&labels)?)?;
        }
        // The span spool: what waits for the collector, and what a full spool lost.
        use crate::telemetry::spool::{DROPPED_REQUESTS, SPOOLED_BYTES};
        use std::sync::atomic::Ordering::Relaxed;
        let spooled = ConstGauge::new(SPOOLED_BYTES.load(Relaxed) as i64);
        let family = encoder.encode_descriptor(
            semconv::METRIC_SPAN_SPOOL_BYTES,
            "Bytes of span export requests waiting on disk for the collector",
            None,
            spooled.metric_type(),
        )?;
        spooled.encode(family)?;
        let dropped = ConstCounter::new(DROPPED_REQUESTS.load(Relaxed));
        let family = encoder.encode_descriptor(
            semconv::METRIC_SPAN_SPOOL_DROPPED,
            "Span export requests lost because the spool was full",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(family)?;
        Ok(())
    }
}

/// Decrements the in-flight gauge when the invocation ends.
pub struct InflightGuard(Gauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counter_families_after_their_samples() {
        let openmetrics =
            "# HELP c Calls.\n# TYPE c counter\nc_total{a=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP c_total Calls.\n# TYPE c_total counter\nc_total{a=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }
}
