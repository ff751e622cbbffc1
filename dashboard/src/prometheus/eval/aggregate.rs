//! The aggregations (`sum`, `avg`, ..., `topk`, `bottomk`, `quantile`, `count_values`) with
//! `by`/`without`, as Prometheus computes them. Groups come in the order of their first
//! sample (what `topk`'s answer to an instant query shows).

use std::collections::HashMap;
use std::sync::Arc;

use super::plan::{AggOp, Grouping};
use super::range::{kahan_add, mean, quantile};
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

pub(super) fn aggregate(
    op: AggOp,
    param: Option<Value>,
    samples: Vec<Sample>,
    grouping: &Grouping,
) -> Result<Vec<Sample>, QueryError> {
    // Samples by group, groups in the order of their first sample.
    let mut index: HashMap<GroupKey, usize> = HashMap::new();
    let mut groups: Vec<(GroupKey, Vec<Sample>)> = Vec::new();
    let count_label = match (op, &param) {
        (AggOp::CountValues, Some(Value::Str(label))) => Some(label.clone()),
        (AggOp::CountValues, _) => return Err(QueryError::Execution("expected a string parameter".into())),
        _ => None,
    };
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
        let i = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(s);
    }
    let k = match op {
        AggOp::Topk | AggOp::Bottomk => k_of(param.as_ref())?,
        _ => 0,
    };
    let q = match (op, &param) {
        (AggOp::Quantile, Some(Value::Scalar(q))) => *q,
        (AggOp::Quantile, _) => return Err(QueryError::Execution("expected a scalar parameter".into())),
        _ => f64::NAN,
    };
    let mut out = Vec::with_capacity(groups.len());
    for (labels, mut members) in groups {
        let values = || members.iter().map(|s| s.value);
        let first = members[0].value;
        let value = match op {
            AggOp::Sum => {
                let (sum, c) = values().fold((0.0, 0.0), |(sum, c), v| kahan_add(v, sum, c));
                if sum.is_infinite() { sum } else { sum + c }
            }
            AggOp::Avg => mean(values()),
            AggOp::Min => values().fold(first, |min, v| if v < min || min.is_nan() { v } else { min }),
            AggOp::Max => values().fold(first, |max, v| if v > max || max.is_nan() { v } else { max }),
            AggOp::Count | AggOp::CountValues => members.len() as f64,
            AggOp::Group => 1.0,
            AggOp::Quantile => quantile(q, values().collect()),
            AggOp::Stdvar | AggOp::Stddev => {
                let (mut count, mut mean, mut m2) = (0.0, 0.0, 0.0);
                for v in values() {
                    count += 1.0;
                    let delta = v - mean;
                    mean += delta / count;
                    m2 += delta * (v - mean);
                }
                if op == AggOp::Stddev { (m2 / count).sqrt() } else { m2 / count }
            }
            AggOp::Topk | AggOp::Bottomk => {
                // The k best samples themselves, name and all. NaN is the worst for both;
                // among the rest the largest (topk) or the smallest come first.
                members.sort_by(|a, b| match (a.value.is_nan(), b.value.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ if op == AggOp::Topk => b.value.total_cmp(&a.value),
                    _ => a.value.total_cmp(&b.value),
                });
                members.truncate(k);
                out.extend(members);
                continue;
            }
        };
        out.push(Sample { labels: Arc::new(labels), value });
    }
    Ok(out)
}
