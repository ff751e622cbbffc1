//! Binary operators between scalars and instant vectors, and vector matching (`on`,
//! `ignoring`, `group_left`, `group_right`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::plan::{BinOp, Card, Matching};
use super::{Labels, METRIC_NAME, QueryError, Sample, Value, check_unique, drop_name, label};

impl BinOp {
    fn is_comparison(self) -> bool {
        matches!(self, BinOp::Eq | BinOp::Ne | BinOp::Gt | BinOp::Lt | BinOp::Ge | BinOp::Le)
    }

    fn is_set(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or | BinOp::Unless)
    }

    /// Arithmetic: the value, or for a comparison 1/0 (true/false).
    fn apply(self, a: f64, b: f64) -> f64 {
        let truth = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Mod => a % b,
            BinOp::Pow => a.powf(b),
            BinOp::Atan2 => a.atan2(b),
            BinOp::Eq => truth(a == b),
            BinOp::Ne => truth(a != b),
            BinOp::Gt => truth(a > b),
            BinOp::Lt => truth(a < b),
            BinOp::Ge => truth(a >= b),
            BinOp::Le => truth(a <= b),
            BinOp::And | BinOp::Or | BinOp::Unless => f64::NAN,
        }
    }
}

fn signature(labels: &[(String, String)], matching: &Option<Matching>) -> String {
    let mut out = String::new();
    for (k, v) in labels {
        let keep = match matching {
            None => k != METRIC_NAME,
            Some(Matching::On(names)) => names.iter().any(|n| n == k),
            Some(Matching::Ignoring(names)) => k != METRIC_NAME && !names.iter().any(|n| n == k),
        };
        if keep {
            out.push_str(k);
            out.push('\u{ff}');
            out.push_str(v);
            out.push('\u{ff}');
        }
    }
    out
}

fn format_labels(labels: &[(String, String)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

pub(super) fn binary(
    op: BinOp,
    l: Value,
    r: Value,
    return_bool: bool,
    matching: &Option<Matching>,
    card: &Card,
) -> Result<Value, QueryError> {
    match (l, r) {
        (Value::Scalar(a), Value::Scalar(b)) => Ok(Value::Scalar(op.apply(a, b))),
        (Value::Vector(v), Value::Scalar(s)) => vector_scalar(op, v, s, false, return_bool),
        (Value::Scalar(s), Value::Vector(v)) => vector_scalar(op, v, s, true, return_bool),
        (Value::Vector(l), Value::Vector(r)) => vector_vector(op, l, r, return_bool, matching, card),
        _ => Err(QueryError::Execution("binary expressions need scalars or instant vectors".into())),
    }
}

fn vector_scalar(op: BinOp, v: Vec<Sample>, s: f64, scalar_left: bool, return_bool: bool) -> Result<Value, QueryError> {
    let mut out = Vec::with_capacity(v.len());
    for sample in v {
        let (a, b) = if scalar_left { (s, sample.value) } else { (sample.value, s) };
        let result = op.apply(a, b);
        if op.is_comparison() {
            if return_bool {
                out.push(Sample { labels: drop_name(&sample.labels), value: result });
            } else if result == 1.0 {
                out.push(sample);
            }
        } else {
            out.push(Sample { labels: drop_name(&sample.labels), value: result });
        }
    }
    if !op.is_comparison() || return_bool {
        check_unique(&out)?;
    }
    Ok(Value::Vector(out))
}

fn vector_vector(
    op: BinOp,
    lhs: Vec<Sample>,
    rhs: Vec<Sample>,
    return_bool: bool,
    matching: &Option<Matching>,
    card: &Card,
) -> Result<Value, QueryError> {
    if op.is_set() {
        let right: std::collections::HashSet<String> = rhs.iter().map(|s| signature(&s.labels, matching)).collect();
        return Ok(Value::Vector(match op {
            BinOp::And => lhs.into_iter().filter(|s| right.contains(&signature(&s.labels, matching))).collect(),
            BinOp::Unless => lhs.into_iter().filter(|s| !right.contains(&signature(&s.labels, matching))).collect(),
            _ => {
                let left: std::collections::HashSet<String> =
                    lhs.iter().map(|s| signature(&s.labels, matching)).collect();
                let mut out = lhs;
                out.extend(rhs.into_iter().filter(|s| !left.contains(&signature(&s.labels, matching))));
                out
            }
        }));
    }
    // Nothing to match, so nothing to check either (as Prometheus: no duplicate error).
    if lhs.is_empty() || rhs.is_empty() {
        return Ok(Value::Vector(Vec::new()));
    }
    // The "many" side is iterated and matched into the "one" side: group_right swaps them.
    let (many, one, swapped, include): (Vec<Sample>, Vec<Sample>, bool, &[String]) = match card {
        Card::OneToMany(include) => (rhs, lhs, true, include),
        Card::ManyToOne(include) => (lhs, rhs, false, include),
        Card::OneToOne | Card::ManyToMany => (lhs, rhs, false, &[]),
    };
    let mut ones: HashMap<String, &Sample> = HashMap::with_capacity(one.len());
    for s in &one {
        if let Some(other) = ones.insert(signature(&s.labels, matching), s) {
            return Err(QueryError::Execution(format!(
                "found duplicate series for the match group on the {} hand-side of the operation: [{}, {}]; \
                 many-to-many matching not allowed: matching labels must be unique on one side",
                if swapped { "left" } else { "right" },
                format_labels(&other.labels),
                format_labels(&s.labels)
            )));
        }
    }
    let one_to_one = *card == Card::OneToOne;
    let mut matched: HashMap<String, HashSet<Labels>> = HashMap::new();
    let mut out = Vec::new();
    for s in &many {
        let sig = signature(&s.labels, matching);
        let Some(o) = ones.get(&sig) else { continue };
        let (vl, vr) = if swapped { (o.value, s.value) } else { (s.value, o.value) };
        let result = op.apply(vl, vr);
        let value = if op.is_comparison() && !return_bool {
            if result != 1.0 {
                continue;
            }
            vl
        } else {
            result
        };
        let labels = result_labels(&s.labels, &o.labels, op, return_bool, matching, one_to_one, include);
        let results = matched.entry(sig).or_default();
        if one_to_one && !results.is_empty() {
            return Err(QueryError::Execution(format!(
                "multiple matches for labels: many-to-one matching must be explicit (group_left/group_right): {}",
                format_labels(&s.labels)
            )));
        }
        if !results.insert(labels.clone()) {
            return Err(QueryError::Execution(
                "multiple matches for labels: grouping labels must ensure unique matches".into(),
            ));
        }
        out.push(Sample { labels, value });
    }
    check_unique(&out)?;
    Ok(Value::Vector(out))
}

/// The labels of a result: the "many" side's, without the name for arithmetic (and `bool`),
/// only the `on` labels (or without the `ignoring` ones) in one-to-one matching, and the
/// `group_left`/`group_right` labels copied from the "one" side.
fn result_labels(
    many: &[(String, String)],
    one: &[(String, String)],
    op: BinOp,
    return_bool: bool,
    matching: &Option<Matching>,
    one_to_one: bool,
    include: &[String],
) -> Labels {
    let drop_name = !op.is_comparison() || return_bool;
    let mut labels: Vec<(String, String)> = many
        .iter()
        .filter(|(k, _)| {
            if drop_name && k == METRIC_NAME {
                return false;
            }
            if include.iter().any(|n| n == k) {
                return false;
            }
            match matching {
                Some(Matching::On(names)) if one_to_one => names.iter().any(|n| n == k),
                Some(Matching::Ignoring(names)) if one_to_one => !names.iter().any(|n| n == k),
                _ => true,
            }
        })
        .cloned()
        .collect();
    for name in include {
        let value = label(one, name);
        if !value.is_empty() {
            labels.push((name.clone(), value.to_string()));
        }
    }
    labels.sort();
    Arc::new(labels)
}
