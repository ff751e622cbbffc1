//! The functions (range functions such as `rate`, instant ones such as `abs`) and the
//! aggregations, as Prometheus 3 computes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::plan::{AggOp, Func, Grouping, Node};
use super::series::Window;
use super::{Evaluator, METRIC_NAME, QueryError, Sample, Value, check_unique, drop_name, label};

impl Evaluator<'_> {
    pub(super) fn call(&self, func: Func, args: &[Node], t: i64) -> Result<Value, QueryError> {
        let map = |samples: Vec<Sample>, f: &dyn Fn(f64) -> f64| -> Result<Value, QueryError> {
            let out: Vec<Sample> =
                samples.into_iter().map(|s| Sample { labels: drop_name(&s.labels), value: f(s.value) }).collect();
            check_unique(&out)?;
            Ok(Value::Vector(out))
        };
        match func {
            Func::Rate | Func::Increase | Func::Delta | Func::Irate | Func::Idelta => {
                let Some(Node::Matrix(id)) = args.first() else {
                    return Err(QueryError::Execution("expected a range vector argument".into()));
                };
                let selector = &self.plan.selectors[*id];
                let e = selector.eval_time(t, self.start, self.end);
                let range = selector.range_ms.unwrap_or(0);
                let mut out = Vec::new();
                for series in &self.data[*id] {
                    let Some(window) = series.data.window(e, range) else { continue };
                    let value = match func {
                        Func::Rate => extrapolated_rate(&window, e - range, e, range, true, true),
                        Func::Increase => extrapolated_rate(&window, e - range, e, range, true, false),
                        Func::Delta => extrapolated_rate(&window, e - range, e, range, false, false),
                        Func::Irate => instant_delta(&window, true),
                        _ => instant_delta(&window, false),
                    };
                    if let Some(value) = value {
                        out.push(Sample { labels: drop_name(&series.labels), value });
                    }
                }
                check_unique(&out)?;
                Ok(Value::Vector(out))
            }
            Func::HistogramQuantile => {
                let q = self.scalar_arg(&args[0], t)?;
                let samples = self.vector_arg(&args[1], t)?;
                Ok(Value::Vector(histogram_quantile(q, samples)))
            }
            Func::Time => Ok(Value::Scalar(t as f64 / 1000.0)),
            Func::Vector => {
                let v = self.scalar_arg(&args[0], t)?;
                Ok(Value::Vector(vec![Sample { labels: Arc::new(Vec::new()), value: v }]))
            }
            Func::Scalar => {
                let samples = self.vector_arg(&args[0], t)?;
                Ok(Value::Scalar(if samples.len() == 1 { samples[0].value } else { f64::NAN }))
            }
            Func::Abs => map(self.vector_arg(&args[0], t)?, &f64::abs),
            Func::Ceil => map(self.vector_arg(&args[0], t)?, &f64::ceil),
            Func::Floor => map(self.vector_arg(&args[0], t)?, &f64::floor),
            Func::Sqrt => map(self.vector_arg(&args[0], t)?, &f64::sqrt),
            Func::Exp => map(self.vector_arg(&args[0], t)?, &f64::exp),
            Func::Ln => map(self.vector_arg(&args[0], t)?, &f64::ln),
            Func::Log2 => map(self.vector_arg(&args[0], t)?, &f64::log2),
            Func::Log10 => map(self.vector_arg(&args[0], t)?, &f64::log10),
            Func::Round => {
                let samples = self.vector_arg(&args[0], t)?;
                let to_nearest = match args.get(1) {
                    Some(arg) => self.scalar_arg(arg, t)?,
                    None => 1.0,
                };
                let inverse = 1.0 / to_nearest;
                map(samples, &|v| (v * inverse + 0.5).floor() / inverse)
            }
            Func::ClampMin => {
                let samples = self.vector_arg(&args[0], t)?;
                let min = self.scalar_arg(&args[1], t)?;
                map(samples, &|v| if v.is_nan() || min.is_nan() { f64::NAN } else { v.max(min) })
            }
            Func::ClampMax => {
                let samples = self.vector_arg(&args[0], t)?;
                let max = self.scalar_arg(&args[1], t)?;
                map(samples, &|v| if v.is_nan() || max.is_nan() { f64::NAN } else { v.min(max) })
            }
            Func::Clamp => {
                let samples = self.vector_arg(&args[0], t)?;
                let min = self.scalar_arg(&args[1], t)?;
                let max = self.scalar_arg(&args[2], t)?;
                if max < min {
                    return Ok(Value::Vector(Vec::new()));
                }
                map(samples, &|v| {
                    if v.is_nan() || min.is_nan() || max.is_nan() { f64::NAN } else { v.max(min).min(max) }
                })
            }
        }
    }
}

/// `rate`, `increase` and `delta` as Prometheus 3 computes them (`extrapolatedRate`): the
/// change between the window's first and last samples (counter resets added back),
/// extrapolated to the window's edges when the samples reach close to them (within 110 % of
/// the average sample interval), else by half an interval; a counter is never extrapolated
/// below zero.
fn extrapolated_rate(
    w: &Window,
    range_start: i64,
    range_end: i64,
    range_ms: i64,
    is_counter: bool,
    is_rate: bool,
) -> Option<f64> {
    if w.count < 2 {
        return None;
    }
    let mut result = w.last.1 - w.first.1;
    if is_counter {
        result += w.correction;
    }
    let mut duration_to_start = (w.first.0 - range_start) as f64 / 1000.0;
    let mut duration_to_end = (range_end - w.last.0) as f64 / 1000.0;
    let sampled = (w.last.0 - w.first.0) as f64 / 1000.0;
    let average = sampled / (w.count - 1) as f64;
    let threshold = average * 1.1;
    let mut interval = sampled;
    if duration_to_start >= threshold {
        duration_to_start = average / 2.0;
    }
    if is_counter && result > 0.0 && w.first.1 >= 0.0 {
        let to_zero = sampled * (w.first.1 / result);
        if to_zero < duration_to_start {
            duration_to_start = to_zero;
        }
    }
    interval += duration_to_start;
    if duration_to_end >= threshold {
        duration_to_end = average / 2.0;
    }
    interval += duration_to_end;
    let mut factor = interval / sampled;
    if is_rate {
        factor /= range_ms as f64 / 1000.0;
    }
    Some(result * factor)
}

/// `irate` / `idelta`: from the window's last two samples.
fn instant_delta(w: &Window, is_rate: bool) -> Option<f64> {
    let (pt, pv) = w.previous?;
    let (lt, lv) = w.last;
    let mut result = if is_rate && lv < pv { lv } else { lv - pv };
    let interval = lt - pt;
    if interval == 0 {
        return None;
    }
    if is_rate {
        result /= interval as f64 / 1000.0;
    }
    Some(result)
}

fn grouped_labels(labels: &[(String, String)], grouping: &Grouping) -> Vec<(String, String)> {
    match grouping {
        Grouping::By(names) => labels.iter().filter(|(k, _)| names.iter().any(|n| n == k)).cloned().collect(),
        Grouping::Without(names) => {
            labels.iter().filter(|(k, _)| k != METRIC_NAME && !names.iter().any(|n| n == k)).cloned().collect()
        }
    }
}

pub(super) fn aggregate(op: AggOp, samples: Vec<Sample>, grouping: &Grouping) -> Vec<Sample> {
    #[derive(Default)]
    struct Acc {
        count: f64,
        sum: f64,
        mean: f64,
        m2: f64,
        value: Option<f64>,
    }
    let mut groups: BTreeMap<Vec<(String, String)>, Acc> = BTreeMap::new();
    for s in samples {
        let acc = groups.entry(grouped_labels(&s.labels, grouping)).or_default();
        acc.count += 1.0;
        acc.sum += s.value;
        let delta = s.value - acc.mean;
        acc.mean += delta / acc.count;
        acc.m2 += delta * (s.value - acc.mean);
        acc.value = Some(match (op, acc.value) {
            (_, None) => s.value,
            (AggOp::Min, Some(v)) => {
                if v.is_nan() || s.value < v {
                    s.value
                } else {
                    v
                }
            }
            (AggOp::Max, Some(v)) => {
                if v.is_nan() || s.value > v {
                    s.value
                } else {
                    v
                }
            }
            (_, Some(v)) => v,
        });
    }
    groups
        .into_iter()
        .map(|(labels, acc)| {
            let value = match op {
                AggOp::Sum => acc.sum,
                AggOp::Avg => acc.mean,
                AggOp::Min | AggOp::Max => acc.value.unwrap_or(f64::NAN),
                AggOp::Count => acc.count,
                AggOp::Group => 1.0,
                AggOp::Stdvar => acc.m2 / acc.count,
                AggOp::Stddev => (acc.m2 / acc.count).sqrt(),
            };
            Sample { labels: Arc::new(labels), value }
        })
        .collect()
}

/// Buckets (upper bound, cumulative count) by the labels of their histogram.
type HistogramGroups = BTreeMap<Vec<(String, String)>, Vec<(f64, f64)>>;

fn histogram_quantile(q: f64, samples: Vec<Sample>) -> Vec<Sample> {
    let mut groups: HistogramGroups = BTreeMap::new();
    for s in samples {
        let Some(le) = parse_float(label(&s.labels, "le")) else { continue };
        let key: Vec<(String, String)> =
            s.labels.iter().filter(|(k, _)| k != "le" && k != METRIC_NAME).cloned().collect();
        groups.entry(key).or_default().push((le, s.value));
    }
    groups
        .into_iter()
        .map(|(labels, buckets)| Sample { labels: Arc::new(labels), value: bucket_quantile(q, buckets) })
        .collect()
}

/// A float as Prometheus's label values write it (`+Inf`, `-Inf`, `NaN`, decimals).
pub fn parse_float(text: &str) -> Option<f64> {
    match text.trim() {
        "" => None,
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

/// Prometheus's `bucketQuantile` for classic histograms: buckets sorted by upper bound,
/// duplicates merged, counts forced monotonic, linear interpolation inside the bucket.
fn bucket_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (le, count) in buckets {
        match merged.last_mut() {
            Some(last) if last.0 == le => last.1 += count,
            _ => merged.push((le, count)),
        }
    }
    let mut max = f64::NEG_INFINITY;
    for b in &mut merged {
        if b.1 > max {
            max = b.1;
        } else {
            b.1 = max;
        }
    }
    if merged.len() < 2 {
        return f64::NAN;
    }
    let observations = merged[merged.len() - 1].1;
    if observations == 0.0 || observations.is_nan() {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = merged[..merged.len() - 1].partition_point(|b| b.1 < rank);
    if b == merged.len() - 1 {
        return merged[merged.len() - 2].0;
    }
    if b == 0 && merged[0].0 <= 0.0 {
        return merged[0].0;
    }
    let (mut start, end, mut count) = (0.0, merged[b].0, merged[b].1);
    if b > 0 {
        start = merged[b - 1].0;
        count -= merged[b - 1].1;
        rank -= merged[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::eval::SeriesData;

    fn window(samples: &[(i64, f64)], e: i64, range: i64) -> Window {
        SeriesData::Samples(Arc::new(samples.to_vec())).window(e, range).unwrap()
    }

    #[test]
    fn rate_extrapolates_like_prometheus() {
        // Every 15 s, +10 per sample: window (240 s, 300 s] holds 255..300 (4 samples).
        let samples: Vec<(i64, f64)> = (0..=20).map(|i| (i * 15_000, i as f64 * 10.0)).collect();
        let w = window(&samples, 300_000, 60_000);
        assert_eq!(w.count, 4);
        let increase = extrapolated_rate(&w, 240_000, 300_000, 60_000, true, false).unwrap();
        assert!((increase - 40.0).abs() < 1e-9, "{increase}");
        let rate = extrapolated_rate(&w, 240_000, 300_000, 60_000, true, true).unwrap();
        assert!((rate - 40.0 / 60.0).abs() < 1e-12, "{rate}");
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let q = bucket_quantile(0.5, vec![(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (f64::INFINITY, 40.0)]);
        assert!((q - 0.3).abs() < 1e-12, "{q}");
        assert!(bucket_quantile(0.5, vec![(0.1, 1.0)]).is_nan());
    }
}
