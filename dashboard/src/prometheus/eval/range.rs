//! The functions of a range vector (`rate`, `deriv`, the `*_over_time` family, ...), over a
//! matrix selector's windows or a subquery's samples, as Prometheus computes them. All but
//! `last_over_time` drop the metric name.

use std::sync::Arc;

use super::plan::{AbsentLabels, Node, RangeFunc};
use super::series::Window;
use super::{Evaluator, QueryError, Sample, Value, check_unique, drop_name};

impl RangeFunc {
    /// Whether the function needs only a window's first, last and previous samples and its
    /// counter resets (read without copying the samples).
    fn reads_window(self) -> bool {
        matches!(self, RangeFunc::Rate | RangeFunc::Increase | RangeFunc::Delta | RangeFunc::Irate | RangeFunc::Idelta)
    }
}

/// The function's scalar arguments (`quantile_over_time`'s first, `predict_linear`'s and
/// `holt_winters`' after the range), and the range vector.
fn split_args(f: RangeFunc, args: &[Node]) -> Result<(&Node, &[Node]), QueryError> {
    let split = match f {
        RangeFunc::QuantileOverTime => args.split_last(),
        _ => args.split_first(),
    };
    split.ok_or_else(|| QueryError::Execution("expected a range vector argument".into()))
}

impl Evaluator<'_> {
    pub(super) fn range_call(
        &self,
        f: RangeFunc,
        args: &[Node],
        absent: &AbsentLabels,
        t: i64,
    ) -> Result<Value, QueryError> {
        let (matrix, scalar_args) = split_args(f, args)?;
        let mut params = Vec::with_capacity(scalar_args.len());
        for arg in scalar_args {
            params.push(self.scalar_arg(arg, t)?);
        }
        if f == RangeFunc::HoltWinters {
            check_smoothing(&params)?;
        }
        let mut out = Vec::new();
        let mut present = false;
        let mut push = |labels: &super::Labels, value: Option<f64>| {
            if let Some(value) = value {
                let labels = if f == RangeFunc::LastOverTime { labels.clone() } else { drop_name(labels) };
                out.push(Sample { labels, value });
            }
        };
        match matrix {
            Node::Matrix(id) => {
                let selector = &self.plan.selectors[*id];
                let e = selector.eval_time(t, self.start, self.end);
                let range = selector.range_ms.unwrap_or(0);
                for series in &self.data[*id] {
                    if f.reads_window() {
                        let value = series.data.window(e, range).and_then(|w| window_value(f, &w, e, range));
                        push(&series.labels, value);
                    } else {
                        let samples = series.data.samples(e, range);
                        present |= !samples.is_empty();
                        push(&series.labels, samples_value(f, &samples, &params, t));
                    }
                }
            }
            Node::Subquery(sub) => {
                let e = sub.end_time(t, self.start, self.end);
                for (labels, samples) in self.subquery(sub, t)? {
                    present |= !samples.is_empty();
                    let value = if f.reads_window() {
                        Window::of(&samples).and_then(|w| window_value(f, &w, e, sub.range_ms))
                    } else {
                        samples_value(f, &samples, &params, t)
                    };
                    push(&labels, value);
                }
            }
            _ => return Err(QueryError::Execution("expected a range vector argument".into())),
        }
        if f == RangeFunc::AbsentOverTime {
            return Ok(Value::Vector(if present {
                Vec::new()
            } else {
                vec![Sample { labels: Arc::new(absent.0.clone()), value: 1.0 }]
            }));
        }
        check_unique(&out)?;
        Ok(Value::Vector(out))
    }
}

/// `holt_winters`' factors must lie strictly between 0 and 1 (Prometheus's words).
fn check_smoothing(params: &[f64]) -> Result<(), QueryError> {
    for (value, what, short) in [(params[0], "smoothing", "sf"), (params[1], "trend", "tf")] {
        if !(value > 0.0 && value < 1.0) {
            return Err(QueryError::Execution(format!(
                "invalid {what} factor. Expected: 0 < {short} < 1, got: {value:.6}"
            )));
        }
    }
    Ok(())
}

fn window_value(f: RangeFunc, w: &Window, e: i64, range: i64) -> Option<f64> {
    match f {
        RangeFunc::Rate => extrapolated_rate(w, e - range, e, range, true, true),
        RangeFunc::Increase => extrapolated_rate(w, e - range, e, range, true, false),
        RangeFunc::Delta => extrapolated_rate(w, e - range, e, range, false, false),
        RangeFunc::Irate => instant_delta(w, true),
        _ => instant_delta(w, false),
    }
}

/// A function of every sample of a window (in time order, at least one unless the window
/// is empty, which gives nothing); `t` is the evaluation time (`predict_linear`'s origin).
fn samples_value(f: RangeFunc, samples: &[(i64, f64)], params: &[f64], t: i64) -> Option<f64> {
    let (_, last) = *samples.last()?;
    let values = || samples.iter().map(|s| s.1);
    Some(match f {
        RangeFunc::AvgOverTime => mean(values()),
        RangeFunc::SumOverTime => kahan_sum(values()),
        RangeFunc::CountOverTime => samples.len() as f64,
        RangeFunc::MinOverTime => values().fold(samples[0].1, |min, v| if v < min || min.is_nan() { v } else { min }),
        RangeFunc::MaxOverTime => values().fold(samples[0].1, |max, v| if v > max || max.is_nan() { v } else { max }),
        RangeFunc::QuantileOverTime => quantile(params[0], values().collect()),
        RangeFunc::StddevOverTime => variance(values()).sqrt(),
        RangeFunc::StdvarOverTime => variance(values()),
        RangeFunc::MadOverTime => {
            let median = quantile(0.5, values().collect());
            quantile(0.5, values().map(|v| (v - median).abs()).collect())
        }
        RangeFunc::LastOverTime => last,
        RangeFunc::PresentOverTime | RangeFunc::AbsentOverTime => 1.0,
        RangeFunc::Changes => {
            let changed = samples.windows(2).filter(|p| p[1].1 != p[0].1 && !(p[1].1.is_nan() && p[0].1.is_nan()));
            changed.count() as f64
        }
        RangeFunc::Resets => samples.windows(2).filter(|p| p[1].1 < p[0].1).count() as f64,
        RangeFunc::Deriv => {
            if samples.len() < 2 {
                return None;
            }
            linear_regression(samples, samples[0].0).0
        }
        RangeFunc::PredictLinear => {
            if samples.len() < 2 {
                return None;
            }
            let (slope, intercept) = linear_regression(samples, t);
            slope * params[0] + intercept
        }
        RangeFunc::HoltWinters => holt_winters(samples, params[0], params[1])?,
        // Read through `window_value`.
        RangeFunc::Rate | RangeFunc::Increase | RangeFunc::Delta | RangeFunc::Irate | RangeFunc::Idelta => return None,
    })
}

/// Prometheus's `kahanSumInc`: Kahan–Neumaier compensated addition.
pub(super) fn kahan_add(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if t.is_infinite() {
        0.0
    } else if sum.abs() >= inc.abs() {
        c + ((sum - t) + inc)
    } else {
        c + ((inc - t) + sum)
    };
    (t, c)
}

pub(super) fn kahan_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, c) = values.fold((0.0, 0.0), |(sum, c), v| kahan_add(v, sum, c));
    if sum.is_infinite() { sum } else { sum + c }
}

/// The mean as Prometheus's `avg_over_time` and `avg` compute it: incremental (no overflow),
/// with infinities kept rather than turned into NaN.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Mean {
    mean: f64,
    c: f64,
    count: f64,
}

impl Mean {
    pub(super) fn add(&mut self, v: f64) {
        self.count += 1.0;
        if self.mean.is_infinite() {
            if v.is_infinite() && (self.mean > 0.0) == (v > 0.0) {
                return;
            }
            if !v.is_infinite() && !v.is_nan() {
                return;
            }
        }
        (self.mean, self.c) = kahan_add(v / self.count - self.mean / self.count, self.mean, self.c);
    }

    pub(super) fn value(&self) -> f64 {
        if self.mean.is_infinite() { self.mean } else { self.mean + self.c }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let mut mean = Mean::default();
    values.for_each(|v| mean.add(v));
    mean.value()
}

/// The population variance as Prometheus's `stdvar_over_time` computes it.
fn variance(values: impl Iterator<Item = f64>) -> f64 {
    let (mut count, mut mean, mut c_mean, mut aux, mut c_aux) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for v in values {
        count += 1.0;
        let delta = v - (mean + c_mean);
        (mean, c_mean) = kahan_add(delta / count, mean, c_mean);
        (aux, c_aux) = kahan_add(delta * (v - (mean + c_mean)), aux, c_aux);
    }
    (aux + c_aux) / count
}

/// Prometheus's `quantile`: NaN sorted first, linear interpolation between ranks.
pub(super) fn quantile(q: f64, mut values: Vec<f64>) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(|a, b| match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        _ => a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal),
    });
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (lower + 1.0).min(n - 1.0);
    let weight = rank - rank.floor();
    values[lower as usize] * (1.0 - weight) + values[upper as usize] * weight
}

/// Least squares over (seconds since `origin`, value): (slope, intercept at `origin`), as
/// Prometheus's `linearRegression` (a constant series has slope 0).
fn linear_regression(samples: &[(i64, f64)], origin: i64) -> (f64, f64) {
    let first = samples[0].1;
    if samples.iter().all(|s| s.1 == first) {
        return if first.is_infinite() { (f64::NAN, f64::NAN) } else { (0.0, first) };
    }
    let (mut n, mut sum_x, mut c_x, mut sum_y, mut c_y) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sum_xy, mut c_xy, mut sum_x2, mut c_x2) = (0.0, 0.0, 0.0, 0.0);
    for &(ts, v) in samples {
        n += 1.0;
        let x = (ts - origin) as f64 / 1e3;
        (sum_x, c_x) = kahan_add(x, sum_x, c_x);
        (sum_y, c_y) = kahan_add(v, sum_y, c_y);
        (sum_xy, c_xy) = kahan_add(x * v, sum_xy, c_xy);
        (sum_x2, c_x2) = kahan_add(x * x, sum_x2, c_x2);
    }
    let (sum_x, sum_y, sum_xy, sum_x2) = (sum_x + c_x, sum_y + c_y, sum_xy + c_xy, sum_x2 + c_x2);
    let cov_xy = sum_xy - sum_x * sum_y / n;
    let var_x = sum_x2 - sum_x * sum_x / n;
    let slope = cov_xy / var_x;
    (slope, sum_y / n - slope * sum_x / n)
}

/// `holt_winters` (`double_exponential_smoothing`): the last smoothed value.
fn holt_winters(samples: &[(i64, f64)], sf: f64, tf: f64) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let (mut s0, mut s1) = (0.0, samples[0].1);
    let mut b = samples[1].1 - samples[0].1;
    for (i, &(_, v)) in samples.iter().enumerate().skip(1) {
        if i > 1 {
            b = tf * (s1 - s0) + (1.0 - tf) * b;
        }
        let next = sf * v + (1.0 - sf) * (s1 + b);
        (s0, s1) = (s1, next);
    }
    Some(s1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::eval::SeriesData;

    fn window(samples: &[(i64, f64)], e: i64, range: i64) -> Window {
        SeriesData::stored(Arc::new(samples.to_vec())).window(e, range).unwrap()
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
    fn means_keep_infinities_and_quantiles_sort_nan_first() {
        assert_eq!(mean([f64::INFINITY, 1.0, 2.0].into_iter()), f64::INFINITY);
        assert!(mean([f64::INFINITY, f64::NEG_INFINITY].into_iter()).is_nan());
        assert!(quantile(0.0, vec![3.0, f64::NAN, 1.0]).is_nan());
        assert_eq!(quantile(1.0, vec![3.0, f64::NAN, 1.0]), 3.0);
        assert_eq!(quantile(0.5, vec![1.0, 2.0, 3.0, 4.0]), 2.5);
    }
}
