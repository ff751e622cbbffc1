//! What the Prometheus API reads: the stored metric samples (`metric_samples`) and the
//! synthesized usage and billing counters (`usage.rs`), as series with labels, scoped to the
//! caller's tenant.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use collector::store::StoreError;
use serde_json::Value as Json;

use super::eval::{
    LOOKBACK_MS, Labels, METRIC_NAME, Plan, QueryError, STALE, Selector, Series, SeriesData, TOO_MANY_SAMPLES,
    counter_read_times,
};
use super::usage;
use crate::DashboardState;

/// The label that tells whose a series is, in the answers to the admin, who reads every
/// tenant's. A tenant reads its own series with their own labels only, as from Prometheus
/// (its token scopes the query, as a header does in Mimir).
pub const TENANT_LABEL: &str = "tenant";
/// Where a stored sample's own `tenant` label goes in the admin's answers (the tenant label
/// is ours there).
pub const EXPORTED_TENANT_LABEL: &str = "exported_tenant";

const NS_PER_MS: i64 = 1_000_000;
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_count", "_sum"];

/// When a query is evaluated: `start..=end` every `step` (an instant query: `step` 0).
#[derive(Debug, Clone, Copy)]
pub struct Times {
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl Times {
    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        let step = self.step.max(1);
        let n = if self.step == 0 { 0 } else { self.end.saturating_sub(self.start) / step };
        (0..=n).map(move |k| self.start.saturating_add(k.saturating_mul(step)))
    }
}

/// The names a stored metric is exposed under: itself, and for histograms and summaries
/// (stored with their buckets or quantiles as JSON) `_bucket`, `_count` and `_sum` too.
fn exposed_names(metric: &str) -> [String; 4] {
    [metric.to_string(), format!("{metric}_bucket"), format!("{metric}_count"), format!("{metric}_sum")]
}

/// The stored metric names that may hold samples of metric `name`.
fn stored_names(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    for suffix in HISTOGRAM_SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix)
            && !base.is_empty()
        {
            out.push(base.to_string());
        }
    }
    out
}

/// A float as Go's `strconv.FormatFloat(f, 'g', -1, 64)` writes it (how Prometheus clients
/// write `le` and `quantile`).
pub fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..6).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    format!("{f}")
}

fn bucket_bound(value: &Json) -> String {
    match value {
        Json::Number(n) => n.as_f64().map_or_else(|| n.to_string(), go_float),
        Json::String(s) => match s.as_str() {
            "inf" | "Inf" | "+inf" => "+Inf".into(),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// A series a stored row contributes to: exposed name, extra label (`le`, `quantile`), value.
type Exposed = (String, Option<(&'static str, String)>, f64);

fn is_marker(histogram: &str) -> bool {
    histogram == collector::model::STALE_MARKER
}

/// A stored row as the samples it exposes.
fn expand(metric: &str, value: Option<f64>, histogram: Option<&str>, wanted: &dyn Fn(&str) -> bool) -> Vec<Exposed> {
    let value = if histogram.is_some_and(is_marker) { STALE } else { value.unwrap_or(f64::NAN) };
    let Some(detail) = histogram.filter(|h| !is_marker(h)).and_then(|h| serde_json::from_str::<Json>(h).ok()) else {
        return if wanted(metric) { vec![(metric.to_string(), None, value)] } else { Vec::new() };
    };
    let number = |v: Option<&Json>| v.and_then(Json::as_f64).unwrap_or(f64::NAN);
    let mut out = Vec::new();
    let [_, bucket, count, sum] = exposed_names(metric);
    if let Some(buckets) = detail.get("buckets").and_then(Json::as_array) {
        if wanted(&bucket) {
            for pair in buckets {
                if let Some([le, c]) = pair.as_array().map(Vec::as_slice) {
                    out.push((bucket.clone(), Some(("le", bucket_bound(le))), c.as_f64().unwrap_or(f64::NAN)));
                }
            }
        }
    } else if let Some(quantiles) = detail.get("quantiles").and_then(Json::as_array)
        && wanted(metric)
    {
        for pair in quantiles {
            if let Some([q, v]) = pair.as_array().map(Vec::as_slice) {
                out.push((metric.to_string(), Some(("quantile", bucket_bound(q))), v.as_f64().unwrap_or(f64::NAN)));
            }
        }
    }
    if wanted(&count) {
        out.push((count, None, number(detail.get("count"))));
    }
    if wanted(&sum) {
        out.push((sum, None, number(detail.get("sum"))));
    }
    out
}

/// Labels of a stored series: the sample's labels (the JSON object) and the metric name, and
/// for the admin (`every_tenant`) the tenant.
fn stored_labels(
    cache: &mut HashMap<String, Vec<(String, String)>>,
    every_tenant: bool,
    tenant: &str,
    name: &str,
    labels_json: &str,
    extra: Option<(&'static str, String)>,
) -> Labels {
    let base = cache.entry(labels_json.to_string()).or_insert_with(|| {
        let object: serde_json::Map<String, Json> = serde_json::from_str(labels_json).unwrap_or_default();
        object
            .into_iter()
            .filter(|(k, _)| k != METRIC_NAME)
            .map(|(k, v)| {
                let k = if every_tenant && k == TENANT_LABEL { EXPORTED_TENANT_LABEL.to_string() } else { k };
                let v = match v {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .filter(|(_, v)| !v.is_empty())
            .collect()
    });
    let mut labels = base.clone();
    labels.push((METRIC_NAME.to_string(), name.to_string()));
    if every_tenant {
        labels.push((TENANT_LABEL.to_string(), tenant.to_string()));
    }
    if let Some((k, v)) = extra {
        labels.retain(|(name, _)| name != k);
        labels.push((k.to_string(), v));
    }
    labels.sort();
    Arc::new(labels)
}

/// The tenants whose stored samples the caller reads: its own, or (the admin) every tenant
/// with samples.
async fn sample_tenants(state: &DashboardState, tenant: Option<&str>) -> Result<Vec<String>, QueryError> {
    match tenant {
        Some(tenant) => Ok(vec![tenant.to_string()]),
        None => Ok(state.store.sample_tenants().await?),
    }
}

/// A selector's stored series with their samples in `(lo, hi]` (ms).
async fn stored_series(
    state: &DashboardState,
    every_tenant: bool,
    tenants: &[String],
    selector: &Selector,
    lo: i64,
    hi: i64,
    budget: &mut usize,
) -> Result<Vec<Series>, QueryError> {
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    let metrics: BTreeSet<String> = match selector.exact_name() {
        Some(name) => stored_names(name).into_iter().collect(),
        None => {
            let mut names = BTreeSet::new();
            for tenant in tenants {
                for (metric, _) in state.store.stored_metrics(tenant).await? {
                    if exposed_names(&metric).iter().any(|n| selector.may_select_name(n)) {
                        names.insert(metric);
                    }
                }
            }
            names
        }
    };
    // Rows come ordered by series, so the work on labels (parsing, matching, finding the
    // series) is done once per series and plain rows only append their point.
    let mut series: Vec<(Labels, Vec<(i64, f64)>)> = Vec::new();
    let mut slots: HashMap<Labels, usize> = HashMap::new();
    let mut cache = HashMap::new();
    let wanted = |name: &str| selector.may_select_name(name);
    let mut slot = |labels: Labels, series: &mut Vec<(Labels, Vec<(i64, f64)>)>| -> Option<usize> {
        if !selector.matches(&labels) {
            return None;
        }
        Some(*slots.entry(labels.clone()).or_insert_with(|| {
            series.push((labels, Vec::new()));
            series.len() - 1
        }))
    };
    fn push(points: &mut Vec<(i64, f64)>, t: i64, v: f64) {
        match points.last_mut() {
            Some(last) if last.0 == t => last.1 = v,
            _ => points.push((t, v)),
        }
    }
    for metric in metrics {
        let groups = state
            .store
            .series_samples(tenants, &metric, lo.saturating_mul(NS_PER_MS), hi.saturating_mul(NS_PER_MS), budget)
            .await?;
        for group in groups {
            // Staleness markers belong with plain samples (a histogram's parts are plain series
            // once remote-written).
            let plain = group.samples.iter().all(|(_, _, histogram)| histogram.as_deref().is_none_or(is_marker));
            if plain {
                // One labels computation for the series, then only its points.
                let target = wanted(&metric)
                    .then(|| stored_labels(&mut cache, every_tenant, &group.tenant, &metric, &group.labels, None))
                    .and_then(|labels| slot(labels, &mut series));
                if let Some(i) = target {
                    let points = &mut series[i].1;
                    points.reserve(group.samples.len());
                    for (ts_ns, value, histogram) in &group.samples {
                        let value = if histogram.is_some() { STALE } else { value.unwrap_or(f64::NAN) };
                        push(points, ts_ns.div_euclid(NS_PER_MS), value);
                    }
                }
                continue;
            }
            for (ts_ns, value, histogram) in &group.samples {
                let t = ts_ns.div_euclid(NS_PER_MS);
                for (name, extra, v) in expand(&metric, *value, histogram.as_deref(), &wanted) {
                    let labels = stored_labels(&mut cache, every_tenant, &group.tenant, &name, &group.labels, extra);
                    if let Some(i) = slot(labels, &mut series) {
                        push(&mut series[i].1, t, v);
                    }
                }
            }
        }
    }
    series.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(series
        .into_iter()
        .map(|(labels, mut points)| {
            points.sort_by_key(|p| p.0);
            Series { labels, data: SeriesData::stored(Arc::new(points)) }
        })
        .collect())
}

fn is_synthesized(name: &str) -> bool {
    usage::METRICS.iter().any(|(n, _)| *n == name)
}

/// Most stored samples one query may load, all its selectors together (Prometheus's
/// `--query.max-samples` is 50 million; ours are held longer, as rows, so fewer).
pub const MAX_SAMPLES: usize = 5_000_000;

/// Every selector's series, loaded once for all the evaluation times.
pub async fn load(
    state: &DashboardState,
    cache: &usage::Cache,
    tenant: Option<&str>,
    plan: &Plan,
    times: &Times,
    now_ms: i64,
    max_samples: usize,
) -> Result<Vec<Vec<Series>>, QueryError> {
    let last = usage::last_sample(now_ms);
    let mut wanted = usage::Wanted::default();
    let mut points = Vec::new();
    let mut out = Vec::with_capacity(plan.selectors.len());
    if plan.selectors.is_empty() {
        return Ok(out);
    }
    let tenants = sample_tenants(state, tenant).await?;
    let mut budget = max_samples;
    let outer: Vec<i64> = times.iter().collect();
    let read_times = plan.read_times(&outer, times.start, times.end)?;
    for (selector, instants) in plan.selectors.iter().zip(read_times) {
        let (Some(&min_e), Some(&max_e)) = (instants.first(), instants.last()) else {
            out.push(Vec::new());
            continue;
        };
        let reaches = selector.range_ms.unwrap_or(LOOKBACK_MS);
        if selector.exact_name().is_some_and(is_synthesized) {
            out.push(Vec::new());
        } else {
            let lo = min_e.saturating_sub(reaches);
            out.push(stored_series(state, tenant.is_none(), &tenants, selector, lo, max_e, &mut budget).await?);
        }
        let reads_usage =
            usage::METRICS.iter().filter(|(n, _)| *n != usage::COST).any(|(n, _)| selector.may_select_name(n));
        let reads_cost = selector.may_select_name(usage::COST);
        if reads_usage || reads_cost {
            wanted.usage |= reads_usage;
            wanted.cost |= reads_cost;
            for e in instants {
                counter_read_times(selector, e, last, &mut points)?;
            }
        }
    }
    if wanted.usage || wanted.cost {
        points.sort_unstable();
        points.dedup();
        let step = (times.step > 0).then_some(times.step);
        let synthesized = usage::series(state, cache, tenant, &points, step, last, wanted).await?;
        for (selector, series) in plan.selectors.iter().zip(out.iter_mut()) {
            // A stored metric of a synthesized name would clash: the synthesized one wins.
            series.retain(|s| !is_synthesized(super::eval::label(&s.labels, METRIC_NAME)));
            series.extend(synthesized.iter().filter(|(labels, _)| selector.matches(labels)).map(
                |(labels, counter)| Series { labels: labels.clone(), data: SeriesData::Counter(counter.clone()) },
            ));
        }
    }
    Ok(out)
}

/// Every series with data in `[lo, hi]` (ms): stored ones and synthesized ones. `names`
/// restricts the stored metrics read (when every selector names its metric).
pub async fn catalogue(
    state: &DashboardState,
    tenant: Option<&str>,
    lo: i64,
    hi: i64,
    names: Option<&BTreeSet<String>>,
    now_ms: i64,
) -> Result<Vec<Labels>, QueryError> {
    let tenants = sample_tenants(state, tenant).await?;
    let stored: Option<Vec<String>> = names.map(|n| n.iter().flat_map(|name| stored_names(name)).collect());
    let rows = state
        .store
        .series_in(&tenants, stored.as_deref(), lo.saturating_mul(NS_PER_MS), hi.saturating_mul(NS_PER_MS))
        .await?;
    let mut out: BTreeSet<Labels> = BTreeSet::new();
    let mut cache = HashMap::new();
    for (row_tenant, metric, labels_json, histogram) in rows {
        for (name, extra, _) in expand(&metric, None, histogram.as_deref(), &|_| true) {
            if is_synthesized(&name) {
                continue;
            }
            out.insert(stored_labels(&mut cache, tenant.is_none(), &row_tenant, &name, &labels_json, extra));
        }
    }
    let wants_synthesized = names.is_none_or(|n| n.iter().any(|name| is_synthesized(name)));
    if wants_synthesized && hi >= lo {
        out.extend(usage::catalogue(state, tenant, hi, now_ms).await?);
    }
    Ok(out.into_iter().collect())
}

/// Metric metadata: (name, type, help), stored metrics by the kind they were stored with.
pub async fn metadata(
    state: &DashboardState,
    tenant: Option<&str>,
) -> Result<Vec<(String, String, String)>, QueryError> {
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    for t in sample_tenants(state, tenant).await? {
        for (metric, kind) in state.store.stored_metrics(&t).await? {
            // Flat histogram series (`x_bucket` scraped) belong to the family `x`.
            let family = match kind.as_str() {
                "histogram" | "summary" => HISTOGRAM_SUFFIXES
                    .iter()
                    .find_map(|s| metric.strip_suffix(s).filter(|b| !b.is_empty()))
                    .unwrap_or(&metric)
                    .to_string(),
                _ => metric.clone(),
            };
            if !is_synthesized(&family) {
                out.entry(family).or_insert((kind, String::new()));
            }
        }
    }
    if usage::any(state, tenant).await? {
        for (name, help) in usage::METRICS {
            out.insert(name.to_string(), ("counter".into(), help.to_string()));
        }
    }
    Ok(out.into_iter().map(|(name, (kind, help))| (name, kind, help)).collect())
}

impl From<StoreError> for QueryError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::OverBudget => QueryError::Execution(TOO_MANY_SAMPLES.into()),
            error => QueryError::Store(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_as_go_writes_them() {
        assert_eq!(go_float(0.005), "0.005");
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(2.5), "2.5");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
        assert_eq!(go_float(1e21), "1e+21");
        assert_eq!(go_float(1e6), "1e+06");
        assert_eq!(go_float(100000.0), "100000");
        assert_eq!(go_float(1e-5), "1e-05");
    }

    #[test]
    fn histograms_expand_to_buckets_count_and_sum() {
        let json = r#"{"count":4,"sum":1.5,"buckets":[[0.1,1],[1,3],["+Inf",4]]}"#;
        let rows = expand("lat", Some(1.5), Some(json), &|_| true);
        let names: Vec<_> = rows.iter().map(|(n, e, v)| (n.as_str(), e.as_ref().map(|e| e.1.as_str()), *v)).collect();
        assert_eq!(
            names,
            vec![
                ("lat_bucket", Some("0.1"), 1.0),
                ("lat_bucket", Some("1"), 3.0),
                ("lat_bucket", Some("+Inf"), 4.0),
                ("lat_count", None, 4.0),
                ("lat_sum", None, 1.5)
            ]
        );
    }
}
