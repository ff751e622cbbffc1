//! PromQL evaluation: the parsed expression (promql-parser) is checked and turned into a small
//! plan ([`plan()`]), its selectors are loaded once for the whole query (`data.rs`, at the times
//! [`Plan::read_times`] gives), and the plan is evaluated at every step ([`Evaluator`]) with
//! Prometheus 3's semantics: left-open windows `(t - range, t]`, a 5-minute lookback for
//! instant selectors that stops at staleness markers, extrapolated `rate`/`increase`.
//!
//! `planner.rs` makes the plan that `plan.rs` defines; `series.rs` holds the loaded series
//! (stored samples and synthesized counters), `range.rs` the functions of range vectors,
//! `functions.rs` the other functions, `aggregate.rs` the aggregations, `binary.rs` the binary
//! operators and vector matching, `promqltest.rs` (tests only) the runner of the test files in
//! `testdata/`; here are the query's errors, its time bounds, the evaluation of a node and of
//! subqueries.

mod aggregate;
mod binary;
mod functions;
mod plan;
mod planner;
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

pub use plan::{MAX_SUBQUERY_STEPS, Plan, Selector};
pub use planner::plan;

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
    /// When evaluation gives up (checked at each step of a range query and every few
    /// thousand subquery times).
    deadline: Option<Instant>,
    /// Each subquery's evaluations by time, kept while a later step may read them again.
    memo: RefCell<Vec<Memo>>,
    /// How many times subqueries were evaluated (bounded by [`MAX_SUBQUERY_STEPS`]) and how
    /// many of their times were read, evaluated or remembered (bounded by the deadline).
    evaluations: Cell<usize>,
    visits: Cell<usize>,
}

/// Most samples a query's subqueries may hold remembered at once (Prometheus counts them
/// against `--query.max-samples` too).
pub const MAX_SUBQUERY_SAMPLES: usize = 5_000_000;

/// A subquery's evaluations by time, and how many samples they hold.
#[derive(Default, Clone)]
struct Memo {
    by_time: BTreeMap<i64, Arc<Vec<Sample>>>,
    samples: usize,
}

impl Memo {
    fn forget_before(&mut self, time: i64) {
        let kept = self.by_time.split_off(&time);
        self.samples -= self.by_time.values().map(|s| s.len()).sum::<usize>();
        self.by_time = kept;
    }

    fn keep(&mut self, time: i64, samples: Arc<Vec<Sample>>) -> Result<(), QueryError> {
        self.samples += samples.len();
        if self.samples > MAX_SUBQUERY_SAMPLES {
            return Err(QueryError::Execution(TOO_MANY_SAMPLES.into()));
        }
        self.by_time.insert(time, samples);
        Ok(())
    }
}

/// Prometheus's words when a query would hold more samples than it may (422, `execution`).
pub const TOO_MANY_SAMPLES: &str = "query processing would load too many samples into memory in query execution";

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
            memo: RefCell::new(vec![Memo::default(); plan.subqueries]),
            evaluations: Cell::new(0),
            visits: Cell::new(0),
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
            self.memo.borrow_mut()[sub.id].forget_before(*first);
        }
        for ti in times {
            // Every time visited is work, remembered or not: the deadline bounds it.
            let visits = self.visits.get() + 1;
            self.visits.set(visits);
            if visits.is_multiple_of(4096) && self.deadline.is_some_and(|d| Instant::now() > d) {
                return Err(QueryError::Timeout);
            }
            let known = self.memo.borrow()[sub.id].by_time.get(&ti).cloned();
            let samples = match known {
                Some(samples) => samples,
                None => {
                    let evaluations = self.evaluations.get() + 1;
                    if evaluations > MAX_SUBQUERY_STEPS {
                        return Err(QueryError::Execution(format!(
                            "the query's subqueries would be evaluated at more than {MAX_SUBQUERY_STEPS} times: use a longer subquery step or a shorter range"
                        )));
                    }
                    self.evaluations.set(evaluations);
                    let samples = Arc::new(match self.eval(&sub.expr, ti)? {
                        Value::Vector(samples) => samples,
                        Value::Scalar(value) => vec![Sample { labels: Arc::new(Vec::new()), value }],
                        _ => return Err(QueryError::Execution("a subquery needs an instant vector".into())),
                    });
                    self.memo.borrow_mut()[sub.id].keep(ti, samples.clone())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of `query` over `series` series for each of its selectors, each with a
    /// sample every second of the first 10 000.
    fn planned(query: &str, series: usize) -> (Plan, Vec<Vec<Series>>) {
        let plan = plan(&promql_parser::parser::parse(query).unwrap()).unwrap();
        let points = Arc::new((0..10_000).map(|s| (s * 1000, 1.0)).collect::<Vec<_>>());
        let data = plan
            .selectors
            .iter()
            .map(|_| {
                (0..series)
                    .map(|i| Series {
                        labels: Arc::new(vec![("i".into(), i.to_string())]),
                        data: SeriesData::stored(points.clone()),
                    })
                    .collect()
            })
            .collect();
        (plan, data)
    }

    #[test]
    fn nested_subqueries_stop_at_the_deadline() {
        // 86 400 outer times, each reading 86 400 inner ones: hours of work without a bound.
        let (plan, data) = planned("max_over_time(max_over_time(m[1d:1s])[1d:1s])", 1);
        let deadline = Instant::now() + std::time::Duration::from_millis(200);
        let evaluator = Evaluator::new(&plan, &data, 0, 0, Some(deadline));
        // Without the check a failure here takes hours (the test run's own timeout finds it).
        assert!(matches!(evaluator.eval(&plan.root, 86_400_000), Err(QueryError::Timeout)));
    }

    #[test]
    fn subqueries_hold_a_bounded_number_of_samples() {
        // 1 000 series at 10 000 times: 10 million samples.
        let (plan, data) = planned("count_over_time(m[10000s:1s])", 1000);
        let evaluator = Evaluator::new(&plan, &data, 0, 0, None);
        match evaluator.eval(&plan.root, 9_999_000) {
            Err(QueryError::Execution(message)) => assert_eq!(message, TOO_MANY_SAMPLES),
            other => panic!("{:?}", other.map(|_| "an answer")),
        }
        // Within the bound it answers: 1 000 series at 1 000 times.
        let (plan, data) = planned("count_over_time(m[1000s:1s])", 1000);
        let evaluator = Evaluator::new(&plan, &data, 0, 0, None);
        let Ok(Value::Vector(samples)) = evaluator.eval(&plan.root, 9_999_000) else { panic!() };
        assert_eq!(samples.len(), 1000);
        assert!(samples.iter().all(|s| s.value == 1000.0));
    }
}

#[cfg(test)]
mod depth {
    use super::*;

    /// The deepest queries the shape limits let through (`parse.rs`: 64 brackets, 256
    /// operators) are planned, walked and evaluated within a 2 MiB stack, a runtime thread's.
    #[test]
    fn the_deepest_accepted_queries_fit_a_runtime_threads_stack() {
        let accepted = |query: &str| super::super::parse::parse_query(Some(query)).is_ok();
        let chain = vec!["up"; 257].join(" + ");
        let nested = format!("{}up{}", "(".repeat(64), ")".repeat(64));
        let subqueries = (1..64)
            .rev()
            .map(|n| format!("{}up{}", "max_over_time(".repeat(n), "[5m:1m])".repeat(n)))
            .find(|q| accepted(q))
            .unwrap();
        let calls =
            (1..64).rev().map(|n| format!("{}up{}", "abs(".repeat(n), ")".repeat(n))).find(|q| accepted(q)).unwrap();
        for query in [chain, nested, subqueries, calls] {
            assert!(accepted(&query), "{query}");
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let expr = super::super::parse::parse_query(Some(&query)).unwrap();
                    let plan = plan(&expr).unwrap();
                    plan.read_times(&[600_000], 600_000, 600_000).unwrap();
                    let data: Vec<Vec<Series>> = plan.selectors.iter().map(|_| Vec::new()).collect();
                    let evaluator = Evaluator::new(&plan, &data, 600_000, 600_000, None);
                    evaluator.eval(&plan.root, 600_000).unwrap();
                })
                .unwrap()
                .join()
                .unwrap();
        }
    }
}
