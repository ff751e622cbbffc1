//! PromQL evaluation: the parsed expression (promql-parser) is checked and turned into a small
//! plan ([`plan()`]), its selectors are loaded once for the whole query (`data.rs`), and the plan
//! is evaluated at every step ([`Evaluator`]) with Prometheus 3's semantics: left-open windows
//! `(t - range, t]`, a 5-minute lookback for instant selectors, extrapolated `rate`/`increase`.
//!
//! `plan.rs` holds the plan and its selectors, `series.rs` the loaded series (stored samples
//! and synthesized counters), `functions.rs` the functions and aggregations, `binary.rs` the
//! binary operators and vector matching; here are the query's errors, its time bounds and the
//! evaluation of a node.

mod binary;
mod functions;
mod plan;
mod series;

use std::sync::Arc;

use binary::binary;
use functions::aggregate;
use plan::Node;

pub use plan::{Plan, Selector, plan};
pub use series::{Counter, RESOLUTION_MS, Series, SeriesData, counter_read_times};

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

impl Evaluator<'_> {
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
                        .filter_map(|s| s.data.instant(e).map(|value| Sample { labels: s.labels.clone(), value }))
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
                        .map(|s| (s.labels.clone(), s.data.samples(e, range)))
                        .filter(|(_, samples)| !samples.is_empty())
                        .collect(),
                )
            }
            Node::Neg(inner) => match self.eval(inner, t)? {
                Value::Scalar(v) => Value::Scalar(-v),
                Value::Vector(samples) => Value::Vector(
                    samples.into_iter().map(|s| Sample { labels: drop_name(&s.labels), value: -s.value }).collect(),
                ),
                _ => return Err(QueryError::Execution("unary minus needs a scalar or an instant vector".into())),
            },
            Node::Binary { op, lhs, rhs, return_bool, matching } => {
                let l = self.eval(lhs, t)?;
                let r = self.eval(rhs, t)?;
                binary(*op, l, r, *return_bool, matching)?
            }
            Node::Aggregate { op, expr, grouping } => match self.eval(expr, t)? {
                Value::Vector(samples) => Value::Vector(aggregate(*op, samples, grouping)),
                _ => return Err(QueryError::Execution("aggregations need an instant vector".into())),
            },
            Node::Call { func, args } => self.call(*func, args, t)?,
        })
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
