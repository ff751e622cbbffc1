//! PromQL evaluation: the parsed expression (promql-parser) is checked and turned into a small
//! plan ([`plan()`]), its selectors are loaded once for the whole query (`data.rs`), and the plan
//! is evaluated at every step ([`Evaluator`]) with Prometheus 3's semantics: left-open windows
//! `(t - range, t]`, a 5-minute lookback for instant selectors, extrapolated `rate`/`increase`.
//!
//! `plan.rs` holds the plan and its selectors, `series.rs` the loaded series (stored samples
//! and synthesized counters), `functions.rs` the functions and aggregations, `binary.rs` the
//! binary operators and vector matching; here are the query's errors, its time bounds and the
//! evaluation of a node.

mod aggregate;
mod binary;
mod functions;
mod plan;
mod range;
mod series;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use aggregate::aggregate;
use binary::binary;
use functions::{label_join, label_replace};
use plan::{Node, Subquery};

pub use plan::{MAX_SUBQUERY_STEPS, Plan, Selector, plan};

#[cfg(test)]
mod promqltest;
pub use series::{Counter, RESOLUTION_MS, STALE, Series, SeriesData, counter_read_times};

/// A series' labels, sorted by name, without empty values; `__name__` is the metric name.
pub type Labels = Arc<Vec<(String, String)>>;

pub const METRIC_NAME: &str = "__name__";
/// How far back an instant selector looks for a sample (Prometheus's default lookback delta).
pub const LOOKBACK_MS: i64 = 5 * 60 * 1000;

/// The earliest and latest times (ms) a query may name: those a timestamp in nanoseconds holds
/// (1677-09-21 to 2262-04-11), as every stored time is. Prometheus clients' "min time" and
/// "max time" land on them. With ranges and offsets bounded too ([`MAX_DURATION_MS`]), every
/// evaluation time and window edge is far inside an i64 of ms, so no sum of them overflows.
pub const MIN_TIME_MS: i64 = i64::MIN / 1_000_000;
pub const MAX_TIME_MS: i64 = i64::MAX / 1_000_000;
/// The longest range or offset a query may write (10^12 s, about 31 700 years).
pub const MAX_DURATION_MS: i64 = 1_000_000_000_000_000;

/// `ms` if it is a time a query may name; otherwise why not (`what` names the time).
pub fn bounded_time(ms: i64, what: &str) -> Result<i64, String> {
    if (MIN_TIME_MS..=MAX_TIME_MS).contains(&ms) {
        return Ok(ms);
    }
    let rfc3339 = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map_or_else(String::new, |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    Err(format!("{what} is outside the times a query may name, {} to {}", rfc3339(MIN_TIME_MS), rfc3339(MAX_TIME_MS)))
}

/// Why a query failed, as Prometheus classifies it.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A bad request (HTTP 400, `bad_data`): unparsable query, time or parameter.
    #[error("{0}")]
    BadData(String),
    /// The query cannot be executed (HTTP 422, `execution`).
    #[error("{0}")]
    Execution(String),
    /// A PromQL construct this server does not evaluate (HTTP 422, `execution`).
    #[error("unsupported PromQL: {0}")]
    Unsupported(String),
    /// The telemetry store failed (HTTP 500, `internal`).
    #[error("the telemetry store failed: {0}")]
    Store(#[source] collector::store::StoreError),
    /// The query ran past its deadline (HTTP 503, `timeout`).
    #[error("query timed out in expression evaluation")]
    Timeout,
    /// Billing's data could not be read (HTTP 500, `internal`).
    #[error("billing failed: {0}")]
    Billing(#[from] billing::BillingError),
}

/// A label's value ("" when absent, as in Prometheus).
pub fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// Evaluation

#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub enum Value {
    Scalar(f64),
    Str(String),
    Vector(Vec<Sample>),
    Matrix(Vec<(Labels, Vec<(i64, f64)>)>),
}

/// Evaluates a plan over loaded series (one list per selector).
pub struct Evaluator<'a> {
    pub plan: &'a Plan,
    pub data: &'a [Vec<Series>],
    /// The query's first and last evaluation times (for `@ start()` / `@ end()`).
    pub start: i64,
    pub end: i64,
    /// When a subquery's evaluation gives up (the caller checks between its own steps).
    deadline: Option<Instant>,
    /// Each subquery's evaluations by time, kept while a later step may read them again.
    memo: RefCell<Vec<BTreeMap<i64, Arc<Vec<Sample>>>>>,
    /// How many times subqueries were evaluated (bounded by [`MAX_SUBQUERY_STEPS`]).
    steps: Cell<usize>,
}

fn drop_name(labels: &Labels) -> Labels {
    if labels.iter().any(|(k, _)| k == METRIC_NAME) {
        Arc::new(labels.iter().filter(|(k, _)| k != METRIC_NAME).cloned().collect())
    } else {
        labels.clone()
    }
}

/// Fails when two samples of a vector have the same labels (Prometheus's rule).
fn check_unique(samples: &[Sample]) -> Result<(), QueryError> {
    if samples.len() < 2 {
        return Ok(());
    }
    let mut seen: std::collections::HashSet<&[(String, String)]> = std::collections::HashSet::new();
    for s in samples {
        if !seen.insert(s.labels.as_slice()) {
            return Err(QueryError::Execution("vector cannot contain metrics with the same labelset".into()));
        }
    }
    Ok(())
}

/// A range vector: series with their samples in time order.
pub type Matrix = Vec<(Labels, Vec<(i64, f64)>)>;

impl<'a> Evaluator<'a> {
    pub fn new(plan: &'a Plan, data: &'a [Vec<Series>], start: i64, end: i64, deadline: Option<Instant>) -> Self {
        Evaluator {
            plan,
            data,
            start,
            end,
            deadline,
            memo: RefCell::new(vec![BTreeMap::new(); plan.subqueries]),
            steps: Cell::new(0),
        }
    }

    pub fn eval(&self, node: &Node, t: i64) -> Result<Value, QueryError> {
        Ok(match node {
            Node::Number(n) => Value::Scalar(*n),
            Node::Str(s) => Value::Str(s.clone()),
            Node::Selector(id) => {
                let selector = &self.plan.selectors[*id];
                let e = selector.eval_time(t, self.start, self.end);
                Value::Vector(
                    self.data[*id]
                        .iter()
                        .filter_map(|s| s.data.instant(e).map(|(_, value)| Sample { labels: s.labels.clone(), value }))
                        .collect(),
                )
            }
            Node::Matrix(id) => {
                let selector = &self.plan.selectors[*id];
                let e = selector.eval_time(t, self.start, self.end);
                let range = selector.range_ms.unwrap_or(0);
                Value::Matrix(
                    self.data[*id]
                        .iter()
                        .map(|s| (s.labels.clone(), s.data.samples(e, range).into_owned()))
                        .filter(|(_, samples)| !samples.is_empty())
                        .collect(),
                )
            }
            Node::Subquery(sub) => Value::Matrix(self.subquery(sub, t)?),
            Node::Neg(inner) => match self.eval(inner, t)? {
                Value::Scalar(v) => Value::Scalar(-v),
                Value::Vector(samples) => Value::Vector(
                    samples.into_iter().map(|s| Sample { labels: drop_name(&s.labels), value: -s.value }).collect(),
                ),
                _ => return Err(QueryError::Execution("unary minus needs a scalar or an instant vector".into())),
            },
            Node::Binary { op, lhs, rhs, return_bool, matching, card } => {
                let l = self.eval(lhs, t)?;
                let r = self.eval(rhs, t)?;
                binary(*op, l, r, *return_bool, matching, card)?
            }
            Node::Aggregate { op, expr, param, grouping } => {
                let param = match param {
                    Some(param) => Some(self.eval(param, t)?),
                    None => None,
                };
                match self.eval(expr, t)? {
                    Value::Vector(samples) => Value::Vector(aggregate(*op, param, samples, grouping)?),
                    _ => return Err(QueryError::Execution("aggregations need an instant vector".into())),
                }
            }
            Node::Call { func, args, absent } => self.call(*func, args, absent, t)?,
            Node::LabelReplace(expr, replace) => Value::Vector(label_replace(self.vector_arg(expr, t)?, replace)?),
            Node::LabelJoin { expr, dst, separator, sources } => {
                Value::Vector(label_join(self.vector_arg(expr, t)?, dst, separator, sources)?)
            }
        })
    }

    /// A range query's answer: the plan evaluated at each of `times` (ascending), series
    /// merged by labels and sorted by them. Gives up past the deadline.
    pub fn range(&self, times: impl Iterator<Item = i64>) -> Result<Matrix, QueryError> {
        let mut series: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
        for t in times {
            if self.deadline.is_some_and(|d| Instant::now() > d) {
                return Err(QueryError::Timeout);
            }
            match self.eval(&self.plan.root, t)? {
                Value::Scalar(v) => series.entry(Arc::new(Vec::new())).or_default().push((t, v)),
                Value::Vector(samples) => {
                    for s in samples {
                        series.entry(s.labels).or_default().push((t, s.value));
                    }
                }
                _ => return Err(QueryError::BadData("range queries must return a scalar or an instant vector".into())),
            }
        }
        Ok(series.into_iter().collect())
    }

    /// A subquery evaluated at `t`: its expression at each of its times, each time evaluated
    /// once while the steps of the query that read it go on.
    fn subquery(&self, sub: &Subquery, t: i64) -> Result<Matrix, QueryError> {
        let mut series: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
        let mut times = sub.times(t, self.start, self.end).peekable();
        if let Some(first) = times.peek() {
            // Earlier times are behind this step's window (steps go forward in time).
            let mut memo = self.memo.borrow_mut();
            let kept = memo[sub.id].split_off(first);
            memo[sub.id] = kept;
        }
        for ti in times {
            let known = self.memo.borrow()[sub.id].get(&ti).cloned();
            let samples = match known {
                Some(samples) => samples,
                None => {
                    let steps = self.steps.get() + 1;
                    if steps > MAX_SUBQUERY_STEPS {
                        return Err(QueryError::Execution(format!(
                            "the query's subqueries would be evaluated at more than {MAX_SUBQUERY_STEPS} times: use a longer subquery step or a shorter range"
                        )));
                    }
                    self.steps.set(steps);
                    if steps.is_multiple_of(1024) && self.deadline.is_some_and(|d| Instant::now() > d) {
                        return Err(QueryError::Timeout);
                    }
                    let samples = Arc::new(match self.eval(&sub.expr, ti)? {
                        Value::Vector(samples) => samples,
                        Value::Scalar(value) => vec![Sample { labels: Arc::new(Vec::new()), value }],
                        _ => return Err(QueryError::Execution("a subquery needs an instant vector".into())),
                    });
                    self.memo.borrow_mut()[sub.id].insert(ti, samples.clone());
                    samples
                }
            };
            for s in samples.iter() {
                series.entry(s.labels.clone()).or_default().push((ti, s.value));
            }
        }
        Ok(series.into_iter().collect())
    }

    fn scalar_arg(&self, node: &Node, t: i64) -> Result<f64, QueryError> {
        match self.eval(node, t)? {
            Value::Scalar(v) => Ok(v),
            _ => Err(QueryError::Execution("expected a scalar argument".into())),
        }
    }

    fn vector_arg(&self, node: &Node, t: i64) -> Result<Vec<Sample>, QueryError> {
        match self.eval(node, t)? {
            Value::Vector(v) => Ok(v),
            _ => Err(QueryError::Execution("expected an instant vector argument".into())),
        }
    }
}
