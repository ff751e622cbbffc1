//! The aggregations (`sum`, `avg`, ..., `topk`, `bottomk`, `quantile`, `count_values`) with
//! `by`/`without`, as Prometheus computes them. Groups come in the order of their first
//! sample (what `topk`'s answer to an instant query shows).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::plan::{AggOp, Grouping};
use super::range::{Mean, kahan_add, quantile};
use super::{METRIC_NAME, QueryError, Sample, Value};
use crate::prometheus::response::format_value;

/// A group's labels.
type GroupKey = Vec<(String, String)>;

fn grouped_labels(labels: &[(String, String)], grouping: &Grouping) -> Vec<(String, String)> {
    match grouping {
        Grouping::By(names) => labels.iter().filter(|(k, _)| names.iter().any(|n| n == k)).cloned().collect(),
        Grouping::Without(names) => {
            labels.iter().filter(|(k, _)| k != METRIC_NAME && !names.iter().any(|n| n == k)).cloned().collect()
        }
    }
}

/// `topk`'s and `bottomk`'s k: the parameter truncated, refused when no integer holds it.
fn k_of(param: Option<&Value>) -> Result<usize, QueryError> {
    let Some(&Value::Scalar(k)) = param else {
        return Err(QueryError::Execution("expected a scalar parameter".into()));
    };
    if !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&k) {
        return Err(QueryError::Execution(format!(
            "Scalar value {} overflows int64",
            crate::prometheus::data::go_float(k)
        )));
    }
    Ok(if k < 1.0 { 0 } else { k as usize })
}

/// A group's running aggregate; every sample is kept only by the aggregations that need
/// them all (`topk`, `bottomk`, `quantile`).
struct Group {
    key: GroupKey,
    count: usize,
    /// `sum` (Kahan: the sum and its compensation), `min`/`max` (the value so far), `avg`.
    sum: f64,
    compensation: f64,
    value: f64,
    mean: Mean,
    /// `stddev`/`stdvar` (Welford).
    running_mean: f64,
    m2: f64,
    members: Vec<Sample>,
}

impl Group {
    fn new(key: GroupKey) -> Self {
        Group {
            key,
            count: 0,
            sum: 0.0,
            compensation: 0.0,
            value: f64::NAN,
            mean: Mean::default(),
            running_mean: 0.0,
            m2: 0.0,
            members: Vec::new(),
        }
    }

    fn add(&mut self, op: AggOp, s: Sample) {
        self.count += 1;
        let v = s.value;
        match op {
            AggOp::Sum => (self.sum, self.compensation) = kahan_add(v, self.sum, self.compensation),
            AggOp::Avg => self.mean.add(v),
            // NaN gives way to any value.
            AggOp::Min if self.count == 1 || v < self.value || self.value.is_nan() => self.value = v,
            AggOp::Max if self.count == 1 || v > self.value || self.value.is_nan() => self.value = v,
            AggOp::Stddev | AggOp::Stdvar => {
                let delta = v - self.running_mean;
                self.running_mean += delta / self.count as f64;
                self.m2 += delta * (v - self.running_mean);
            }
            AggOp::Topk | AggOp::Bottomk | AggOp::Quantile => self.members.push(s),
            _ => {}
        }
    }
}

pub(super) fn aggregate(
    op: AggOp,
    param: Option<Value>,
    samples: Vec<Sample>,
    grouping: &Grouping,
) -> Result<Vec<Sample>, QueryError> {
    let k = match op {
        AggOp::Topk | AggOp::Bottomk => k_of(param.as_ref())?,
        _ => 0,
    };
    let q = match (op, &param) {
        (AggOp::Quantile, Some(Value::Scalar(q))) => *q,
        (AggOp::Quantile, _) => return Err(QueryError::Execution("expected a scalar parameter".into())),
        _ => f64::NAN,
    };
    let count_label = match (op, &param) {
        (AggOp::CountValues, Some(Value::Str(label))) => Some(label.clone()),
        (AggOp::CountValues, _) => return Err(QueryError::Execution("expected a string parameter".into())),
        _ => None,
    };
    // Groups in the order of their first sample.
    // A BTreeMap: few groups, and comparing labels is cheaper than hashing them all.
    let mut index: BTreeMap<GroupKey, usize> = BTreeMap::new();
    let mut groups: Vec<Group> = Vec::new();
    for mut s in samples {
        let key = match &count_label {
            Some(label) => {
                let mut labels: Vec<(String, String)> = s.labels.iter().filter(|(k, _)| k != label).cloned().collect();
                // The value as Prometheus writes sample values (Go's `FormatFloat(v, 'f', -1, 64)`).
                labels.push((label.clone(), format_value(s.value)));
                labels.sort();
                let grouping = match grouping {
                    Grouping::By(names) => Grouping::By(names.iter().cloned().chain([label.clone()]).collect()),
                    without => without.clone(),
                };
                let key = grouped_labels(&labels, &grouping);
                s.labels = Arc::new(labels);
                key
            }
            None => grouped_labels(&s.labels, grouping),
        };
        let i = match index.get(&key) {
            Some(&i) => i,
            None => {
                index.insert(key.clone(), groups.len());
                groups.push(Group::new(key));
                groups.len() - 1
            }
        };
        groups[i].add(op, s);
    }
    let mut out = Vec::with_capacity(groups.len());
    for mut group in groups {
        let value = match op {
            AggOp::Sum if group.sum.is_infinite() => group.sum,
            AggOp::Sum => group.sum + group.compensation,
            AggOp::Avg => group.mean.value(),
            AggOp::Min | AggOp::Max => group.value,
            AggOp::Count | AggOp::CountValues => group.count as f64,
            AggOp::Group => 1.0,
            AggOp::Quantile => quantile(q, group.members.iter().map(|s| s.value).collect()),
            AggOp::Stdvar => group.m2 / group.count as f64,
            AggOp::Stddev => (group.m2 / group.count as f64).sqrt(),
            AggOp::Topk | AggOp::Bottomk => {
                // The k best samples themselves, name and all. NaN is the worst for both;
                // among the rest the largest (topk) or the smallest come first.
                group.members.sort_by(|a, b| match (a.value.is_nan(), b.value.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ if op == AggOp::Topk => b.value.total_cmp(&a.value),
                    _ => a.value.total_cmp(&b.value),
                });
                group.members.truncate(k);
                out.extend(group.members);
                continue;
            }
        };
        out.push(Sample { labels: Arc::new(group.key), value });
    }
    Ok(out)
}
