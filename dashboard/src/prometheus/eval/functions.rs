//! The instant functions (`abs`, `sin`, `hour`, `label_replace`, `sort`, `absent`, ...),
//! as Prometheus computes them; the range functions are in `range.rs`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Timelike};

use super::plan::{AbsentLabels, Func, MathFunc, Node, Replace};
use super::{Evaluator, METRIC_NAME, QueryError, Sample, Value, check_unique, drop_name, label};

impl Evaluator<'_> {
    pub(super) fn call(&self, func: Func, args: &[Node], absent: &AbsentLabels, t: i64) -> Result<Value, QueryError> {
        let map = |samples: Vec<Sample>, f: &dyn Fn(f64) -> f64| -> Result<Value, QueryError> {
            let out: Vec<Sample> =
                samples.into_iter().map(|s| Sample { labels: drop_name(&s.labels), value: f(s.value) }).collect();
            check_unique(&out)?;
            Ok(Value::Vector(out))
        };
        let now = || Sample { labels: Arc::new(Vec::new()), value: t as f64 / 1000.0 };
        match func {
            Func::Range(f) => self.range_call(f, args, absent, t),
            Func::Math(f) => {
                let samples = match args.first() {
                    Some(arg) => self.vector_arg(arg, t)?,
                    // The date functions without an argument read the evaluation time.
                    None => vec![now()],
                };
                map(samples, &|v| math(f, v))
            }
            Func::HistogramQuantile => {
                let q = self.scalar_arg(&args[0], t)?;
                let samples = self.vector_arg(&args[1], t)?;
                Ok(Value::Vector(histogram_quantile(q, samples)))
            }
            Func::NativeHistogram => {
                // Evaluated for its errors; float samples have no native histogram to read.
                for arg in args {
                    self.eval(arg, t)?;
                }
                Ok(Value::Vector(Vec::new()))
            }
            Func::Time => Ok(Value::Scalar(t as f64 / 1000.0)),
            Func::Pi => Ok(Value::Scalar(std::f64::consts::PI)),
            Func::Vector => {
                let v = self.scalar_arg(&args[0], t)?;
                Ok(Value::Vector(vec![Sample { labels: Arc::new(Vec::new()), value: v }]))
            }
            Func::Scalar => {
                let samples = self.vector_arg(&args[0], t)?;
                Ok(Value::Scalar(if samples.len() == 1 { samples[0].value } else { f64::NAN }))
            }
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
            Func::Timestamp => {
                // Of a selector, the samples' own times; of anything else, the evaluation time.
                let out: Vec<Sample> = match &args[0] {
                    Node::Selector(id) => {
                        let e = self.plan.selectors[*id].eval_time(t, self.start, self.end);
                        self.data[*id]
                            .iter()
                            .filter_map(|s| {
                                let (at, _) = s.data.instant(e)?;
                                Some(Sample { labels: drop_name(&s.labels), value: at as f64 / 1000.0 })
                            })
                            .collect()
                    }
                    arg => self
                        .vector_arg(arg, t)?
                        .into_iter()
                        .map(|s| Sample { labels: drop_name(&s.labels), value: t as f64 / 1000.0 })
                        .collect(),
                };
                check_unique(&out)?;
                Ok(Value::Vector(out))
            }
            Func::Absent => Ok(Value::Vector(if self.vector_arg(&args[0], t)?.is_empty() {
                vec![Sample { labels: Arc::new(absent.0.clone()), value: 1.0 }]
            } else {
                Vec::new()
            })),
            Func::Sort | Func::SortDesc => {
                let mut samples = self.vector_arg(&args[0], t)?;
                // NaN last either way.
                samples.sort_by(|a, b| match (a.value.is_nan(), b.value.is_nan()) {
                    (true, true) => Ordering::Equal,
                    (true, false) => Ordering::Greater,
                    (false, true) => Ordering::Less,
                    _ if func == Func::Sort => a.value.total_cmp(&b.value),
                    _ => b.value.total_cmp(&a.value),
                });
                Ok(Value::Vector(samples))
            }
            Func::SortByLabel | Func::SortByLabelDesc => {
                let mut samples = self.vector_arg(&args[0], t)?;
                let mut names = Vec::new();
                for arg in &args[1..] {
                    match self.eval(arg, t)? {
                        Value::Str(name) => names.push(name),
                        _ => return Err(QueryError::Execution("sort_by_label takes label names".into())),
                    }
                }
                samples.sort_by(|a, b| {
                    let by_names = names
                        .iter()
                        .map(|n| natural_cmp(label(&a.labels, n), label(&b.labels, n)))
                        .find(|o| o.is_ne())
                        .unwrap_or_else(|| a.labels.cmp(&b.labels));
                    if func == Func::SortByLabel { by_names } else { by_names.reverse() }
                });
                Ok(Value::Vector(samples))
            }
            Func::LabelReplace | Func::LabelJoin => {
                Err(QueryError::Execution("label_replace and label_join are planned as their own nodes".into()))
            }
        }
    }
}

/// A function of one value. The date functions read it as seconds since 1970 (UTC); a value
/// no date holds gives NaN.
fn math(f: MathFunc, v: f64) -> f64 {
    if f.is_date() {
        let date = (v.is_finite() && v.abs() < 1e17).then(|| DateTime::from_timestamp(v as i64, 0)).flatten();
        let Some(date) = date else { return f64::NAN };
        return f64::from(match f {
            MathFunc::DayOfMonth => date.day(),
            MathFunc::DayOfWeek => date.weekday().num_days_from_sunday(),
            MathFunc::DayOfYear => date.ordinal(),
            MathFunc::DaysInMonth => days_in_month(date.year(), date.month()),
            MathFunc::Hour => date.hour(),
            MathFunc::Minute => date.minute(),
            MathFunc::Month => date.month(),
            _ => return f64::from(date.year()),
        });
    }
    match f {
        MathFunc::Abs => v.abs(),
        MathFunc::Ceil => v.ceil(),
        MathFunc::Floor => v.floor(),
        MathFunc::Sqrt => v.sqrt(),
        MathFunc::Exp => v.exp(),
        MathFunc::Ln => v.ln(),
        MathFunc::Log2 => v.log2(),
        MathFunc::Log10 => v.log10(),
        MathFunc::Sgn => {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                v
            }
        }
        MathFunc::Sin => v.sin(),
        MathFunc::Cos => v.cos(),
        MathFunc::Tan => v.tan(),
        MathFunc::Asin => v.asin(),
        MathFunc::Acos => v.acos(),
        MathFunc::Atan => v.atan(),
        MathFunc::Sinh => v.sinh(),
        MathFunc::Cosh => v.cosh(),
        MathFunc::Tanh => v.tanh(),
        MathFunc::Asinh => v.asinh(),
        MathFunc::Acosh => v.acosh(),
        MathFunc::Atanh => v.atanh(),
        MathFunc::Deg => v * 180.0 / std::f64::consts::PI,
        MathFunc::Rad => v * std::f64::consts::PI / 180.0,
        _ => f64::NAN,
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    chrono::NaiveDate::from_ymd_opt(next_year, next_month, 1).and_then(|d| d.pred_opt()).map_or(31, |d| d.day())
}

/// Strings in natural order: runs of digits compare as numbers (`a2` before `a10`).
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while let (Some(&x), Some(&y)) = (a.first(), b.first()) {
        if x.is_ascii_digit() && y.is_ascii_digit() {
            let run = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
            let (ra, rb) = (run(a), run(b));
            let trim = |s: &[u8]| -> usize { s.iter().take_while(|c| **c == b'0').count() };
            let (da, db) = (&a[trim(&a[..ra]).min(ra)..ra], &b[trim(&b[..rb]).min(rb)..rb]);
            let order = da.len().cmp(&db.len()).then_with(|| da.cmp(db)).then_with(|| ra.cmp(&rb));
            if order.is_ne() {
                return order;
            }
            (a, b) = (&a[ra..], &b[rb..]);
        } else {
            if x != y {
                return x.cmp(&y);
            }
            (a, b) = (&a[1..], &b[1..]);
        }
    }
    a.len().cmp(&b.len())
}

/// `label_replace`: where the source label's value matches the regex (anchored), the
/// destination is set to the expanded replacement (removed when empty); other samples pass.
pub(super) fn label_replace(samples: Vec<Sample>, r: &Replace) -> Result<Vec<Sample>, QueryError> {
    let mut out = Vec::with_capacity(samples.len());
    for s in samples {
        let Some(captures) = r.regex.captures(label(&s.labels, &r.src)) else {
            out.push(s);
            continue;
        };
        let mut value = String::new();
        captures.expand(&r.replacement, &mut value);
        out.push(Sample { labels: with_label(&s.labels, &r.dst, value), value: s.value });
    }
    check_unique(&out)?;
    Ok(out)
}

/// `label_join`: the destination set to the source labels' values joined by the separator.
pub(super) fn label_join(
    samples: Vec<Sample>,
    dst: &str,
    separator: &str,
    sources: &[String],
) -> Result<Vec<Sample>, QueryError> {
    let out: Vec<Sample> = samples
        .into_iter()
        .map(|s| {
            let values: Vec<&str> = sources.iter().map(|n| label(&s.labels, n)).collect();
            let joined = values.join(separator);
            Sample { labels: with_label(&s.labels, dst, joined), value: s.value }
        })
        .collect();
    check_unique(&out)?;
    Ok(out)
}

/// The labels with `name` set to `value` (removed when `value` is empty), sorted.
fn with_label(labels: &[(String, String)], name: &str, value: String) -> super::Labels {
    let mut out: Vec<(String, String)> = labels.iter().filter(|(k, _)| k != name).cloned().collect();
    if !value.is_empty() {
        out.push((name.to_string(), value));
        out.sort();
    }
    Arc::new(out)
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

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let q = bucket_quantile(0.5, vec![(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (f64::INFINITY, 40.0)]);
        assert!((q - 0.3).abs() < 1e-12, "{q}");
        assert!(bucket_quantile(0.5, vec![(0.1, 1.0)]).is_nan());
    }

    #[test]
    fn natural_order_compares_digit_runs_as_numbers() {
        let mut names = vec!["a10", "a2", "a1", "b", "a02"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, vec!["a1", "a2", "a02", "a10", "b"]);
    }
}
