//! Running LogQL over a tenant's stored log records: log queries (the newest or oldest
//! `limit` entries in a range) and metric queries (per step, over windows `(t - range, t]`).
//! Records are read a batch at a time and run through the pipeline on a blocking thread, so a
//! query over millions of lines holds neither the request runtime nor more than a batch.

use std::collections::HashMap;
use std::time::Instant;

use collector::store::{LogScan, MAX_LOG_READ, TelemetryStore};

use super::logql::{AggOp, BinOp, Grouping, LogExpr, MatchOp, MetricExpr, RangeFunc, Stage};
use super::pipeline::{ERROR, Entry, Kind, Labels, Pipeline};

/// Most series a metric query may hold (before its outer `sum`, if it has one): Loki's
/// default `max_query_series`.
pub const MAX_SERIES: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Bad(String),
    #[error("query timed out")]
    Timeout,
    #[error("{0}")]
    Store(#[from] collector::store::StoreError),
    #[error("query evaluation failed")]
    Panicked,
}

/// What a query read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub lines: u64,
    pub bytes: u64,
}

/// The scan a log expression needs: the tenant, the range, and what SQL can decide.
fn scan_of(tenant: &str, expr: &LogExpr, start_ns: i64, end_ns: i64, backward: bool) -> LogScan {
    let mut scan =
        LogScan { tenant: tenant.to_string(), start_ns, end_ns, backward, limit: MAX_LOG_READ, ..LogScan::default() };
    for matcher in expr.selector.iter().filter(|m| m.op == MatchOp::Eq) {
        match (matcher.name.as_str(), matcher.value.as_str()) {
            ("source", "function") => scan.metered = Some(true),
            ("source", "otlp") => scan.metered = Some(false),
            ("function", function) => {
                scan.metered = Some(true);
                scan.function = Some(function.to_string());
            }
            _ => {}
        }
    }
    // Literal line filters before any stage that changes the line hold on the stored body.
    for stage in &expr.stages {
        match stage {
            Stage::Line(filter) if !filter.negate => {
                if let [super::logql::LinePattern::Contains(text)] = filter.patterns.as_slice() {
                    scan.contains.push(text.clone());
                }
            }
            Stage::LineFormat(_) => break,
            _ => {}
        }
    }
    scan
}

/// Reads `scan` batch by batch, running `each` over every batch's entries (on a blocking
/// thread, with `state`) until it returns `false` or the records end.
async fn read<S: Send + 'static>(
    store: &TelemetryStore,
    mut scan: LogScan,
    expr: &LogExpr,
    deadline: Instant,
    mut state: S,
    each: fn(&mut S, Entry) -> Result<bool, EvalError>,
) -> Result<(S, Stats), EvalError> {
    let mut stats = Stats::default();
    loop {
        if Instant::now() > deadline {
            return Err(EvalError::Timeout);
        }
        let batch = store.scan_logs(&scan).await?;
        let full = batch.len() >= scan.limit;
        if let Some(last) = batch.last() {
            scan.after = Some((last.ts_ns, last.record_hash.clone()));
        }
        stats.lines += batch.len() as u64;
        stats.bytes += batch.iter().map(|r| r.body.len() as u64).sum::<u64>();
        let expr = expr.clone();
        let (back, more) = tokio::task::spawn_blocking(move || {
            let pipeline = Pipeline::new(&expr);
            for record in batch {
                if let Some(entry) = pipeline.run(record) {
                    match each(&mut state, entry) {
                        Ok(true) => {}
                        Ok(false) => return (state, Ok(false)),
                        Err(error) => return (state, Err(error)),
                    }
                }
            }
            (state, Ok(true))
        })
        .await
        .map_err(|_| EvalError::Panicked)?;
        state = back;
        if !more? || !full {
            return Ok((state, stats));
        }
    }
}

/// A log query's entries in `[start_ns, end_ns)`: the first `limit` in its direction (newest
/// first when `backward`).
pub async fn log_query(
    store: &TelemetryStore,
    tenant: &str,
    expr: &LogExpr,
    (start_ns, end_ns): (i64, i64),
    limit: usize,
    backward: bool,
    deadline: Instant,
) -> Result<(Vec<Entry>, Stats), EvalError> {
    let scan = scan_of(tenant, expr, start_ns, end_ns, backward);
    let state = (Vec::with_capacity(limit.min(MAX_LOG_READ)), limit);
    let ((entries, _), stats) = read(store, scan, expr, deadline, state, |(entries, limit), entry| {
        if entries.len() < *limit {
            entries.push(entry);
        }
        Ok(entries.len() < *limit)
    })
    .await?;
    Ok((entries, stats))
}

/// The times a metric query is evaluated at.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub start_ns: i64,
    pub step_ns: i64,
    pub count: usize,
}

impl Steps {
    pub fn time(&self, k: usize) -> i64 {
        let t = i128::from(self.start_ns) + i128::from(self.step_ns) * k as i128;
        t.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

/// A metric query's result: series (labels, and `(time ns, value)` points at the steps where
/// they have one), sorted by labels.
pub type Matrix = Vec<(SeriesLabels, Vec<(i64, f64)>)>;

/// A series' labels, sorted by name.
pub type SeriesLabels = Vec<(String, String)>;

/// A range function, the log query it counts and its range (ns).
type RangeOf<'a> = (RangeFunc, &'a LogExpr, i64);

/// Per series, at each step: the lines in its window (count) and the range function's sum.
struct Window {
    count: Vec<f64>,
    sum: Vec<f64>,
}

/// What a metric query accumulates while reading: per series, difference arrays over the
/// steps (a line adds to the steps whose windows hold it: O(1) a line).
struct Accumulator {
    steps: Steps,
    range_ns: i64,
    bytes: bool,
    /// Groupings applied to each line's labels on the way in: those of the outer `sum`s, which
    /// add up, so that the series under them need not be held.
    groupings: Vec<Grouping>,
    series: HashMap<Vec<(String, String)>, Window>,
}

fn accumulate(acc: &mut Accumulator, entry: Entry) -> Result<bool, EvalError> {
    if let Some((error, _)) = entry.labels.get(ERROR) {
        return Err(EvalError::Bad(format!(
            "pipeline error: '{error}' for series: '{}'. Use a label filter to intentionally skip this error. (e.g \
             | __error__!=\"{error}\"). To skip all errors you can use `| drop __error__,__error_details__`",
            show(&label_pairs(&entry.labels))
        )));
    }
    let steps = acc.steps;
    // Steps k whose windows (t_k - range, t_k] hold the line.
    let step = steps.step_ns.max(1);
    // In i128: a line's time, the range and the first step are any of i64's.
    let (ts, start, step, range) =
        (i128::from(entry.ts_ns), i128::from(steps.start_ns), i128::from(step), i128::from(acc.range_ns));
    let first = ((ts - start).max(0) + step - 1) / step;
    let last = (ts + range - 1 - start).div_euclid(step).min(steps.count as i128 - 1);
    if first > last {
        return Ok(true);
    }
    // The series' labels: grouped by the first `sum` straight from the line's labels.
    let key = match acc.groupings.split_first() {
        Some((first, rest)) => {
            let mut key: SeriesLabels = entry
                .labels
                .iter()
                .filter(|(name, _)| first.labels.iter().any(|l| l == name.as_ref()) != first.without)
                .map(|(name, (value, _))| (name.to_string(), value.clone()))
                .collect();
            for grouping in rest {
                key = group(&key, grouping);
            }
            key
        }
        None => label_pairs(&entry.labels),
    };
    if !acc.series.contains_key(&key) && acc.series.len() >= MAX_SERIES {
        return Err(EvalError::Bad(format!(
            "maximum number of series ({MAX_SERIES}) reached for a single query; consider reducing query \
             cardinality by adding more filters or aggregating with sum by"
        )));
    }
    let window = acc
        .series
        .entry(key)
        .or_insert_with(|| Window { count: vec![0.0; steps.count + 1], sum: vec![0.0; steps.count + 1] });
    let value = if acc.bytes { entry.line.len() as f64 } else { 1.0 };
    let (first, last) = (first as usize, last as usize);
    window.count[first] += 1.0;
    window.count[last + 1] -= 1.0;
    window.sum[first] += value;
    window.sum[last + 1] -= value;
    Ok(true)
}

fn label_pairs(labels: &Labels) -> Vec<(String, String)> {
    labels.iter().map(|(k, (v, _))| (k.to_string(), v.clone())).collect()
}

fn show(labels: &[(String, String)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

fn group(labels: &[(String, String)], grouping: &Grouping) -> Vec<(String, String)> {
    labels.iter().filter(|(k, _)| grouping.labels.contains(k) != grouping.without).cloned().collect()
}

/// What a metric expression evaluates to.
enum Evaluated {
    Scalar(f64),
    Series(Matrix),
}

/// A metric query at `steps`.
pub async fn metric_query(
    store: &TelemetryStore,
    tenant: &str,
    expr: &MetricExpr,
    steps: Steps,
    deadline: Instant,
) -> Result<(Matrix, Stats), EvalError> {
    let mut stats = Stats::default();
    let mut matrix = match evaluate(store, tenant, expr, steps, deadline, &mut stats).await? {
        Evaluated::Scalar(value) => vec![(Vec::new(), (0..steps.count).map(|k| (steps.time(k), value)).collect())],
        Evaluated::Series(matrix) => matrix,
    };
    matrix.retain(|(_, points)| !points.is_empty());
    matrix.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((matrix, stats))
}

type Evaluation<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Evaluated, EvalError>> + Send + 'a>>;

fn evaluate<'a>(
    store: &'a TelemetryStore,
    tenant: &'a str,
    expr: &'a MetricExpr,
    steps: Steps,
    deadline: Instant,
    stats: &'a mut Stats,
) -> Evaluation<'a> {
    Box::pin(async move {
        match expr {
            MetricExpr::Number(value) => Ok(Evaluated::Scalar(*value)),
            MetricExpr::Vector(value) => {
                Ok(Evaluated::Series(vec![(Vec::new(), (0..steps.count).map(|k| (steps.time(k), *value)).collect())]))
            }
            MetricExpr::Binary { op, lhs, rhs } => {
                let lhs = evaluate(store, tenant, lhs, steps, deadline, stats).await?;
                let rhs = evaluate(store, tenant, rhs, steps, deadline, stats).await?;
                Ok(binary(*op, lhs, rhs))
            }
            MetricExpr::Range { .. } | MetricExpr::Aggregate { .. } => {
                if let Some((sums, range)) = summed_range(expr) {
                    let (matrix, read) = range_function(store, tenant, range, sums, steps, deadline).await?;
                    stats.lines += read.lines;
                    stats.bytes += read.bytes;
                    return Ok(Evaluated::Series(matrix));
                }
                let MetricExpr::Aggregate { op, grouping, inner } = expr else {
                    unreachable!("a range function is a summed range of no sums")
                };
                match evaluate(store, tenant, inner, steps, deadline, stats).await? {
                    Evaluated::Series(series) => Ok(Evaluated::Series(aggregate(series, *op, grouping.as_ref()))),
                    Evaluated::Scalar(_) => Err(EvalError::Bad("an aggregation needs a vector, not a scalar".into())),
                }
            }
        }
    })
}

/// A range function under nothing but `sum`s: its groupings (innermost first, applied as lines
/// come in, so that the series under them need not be held) and the range function.
fn summed_range(mut expr: &MetricExpr) -> Option<(Vec<Grouping>, RangeOf<'_>)> {
    let mut sums = Vec::new();
    loop {
        match expr {
            MetricExpr::Aggregate { op: AggOp::Sum, grouping, inner } => {
                sums.push(grouping.clone().unwrap_or(Grouping { without: false, labels: Vec::new() }));
                expr = inner;
            }
            MetricExpr::Range { func, log, range_ns } => {
                sums.reverse();
                return Some((sums, (*func, log, *range_ns)));
            }
            _ => return None,
        }
    }
}

/// `lhs op rhs`: a scalar applies to every point; two series sets are matched on all their
/// labels, at the steps where both have a point.
fn binary(op: BinOp, lhs: Evaluated, rhs: Evaluated) -> Evaluated {
    match (lhs, rhs) {
        (Evaluated::Scalar(a), Evaluated::Scalar(b)) => Evaluated::Scalar(op.apply(a, b)),
        (Evaluated::Series(m), Evaluated::Scalar(b)) => Evaluated::Series(
            m.into_iter()
                .map(|(l, points)| (l, points.into_iter().map(|(t, a)| (t, op.apply(a, b))).collect()))
                .collect(),
        ),
        (Evaluated::Scalar(a), Evaluated::Series(m)) => Evaluated::Series(
            m.into_iter()
                .map(|(l, points)| (l, points.into_iter().map(|(t, b)| (t, op.apply(a, b))).collect()))
                .collect(),
        ),
        (Evaluated::Series(lhs), Evaluated::Series(rhs)) => {
            let rhs: HashMap<_, std::collections::BTreeMap<i64, f64>> =
                rhs.into_iter().map(|(labels, points)| (labels, points.into_iter().collect())).collect();
            Evaluated::Series(
                lhs.into_iter()
                    .filter_map(|(labels, points)| {
                        let other = rhs.get(&labels)?;
                        let points = points
                            .into_iter()
                            .filter_map(|(t, a)| other.get(&t).map(|b| (t, op.apply(a, *b))))
                            .collect();
                        Some((labels, points))
                    })
                    .collect(),
            )
        }
    }
}

/// A range function's series at `steps`, summed by `sums` (innermost first) as lines come in.
async fn range_function(
    store: &TelemetryStore,
    tenant: &str,
    (func, log, range_ns): RangeOf<'_>,
    groupings: Vec<Grouping>,
    steps: Steps,
    deadline: Instant,
) -> Result<(Matrix, Stats), EvalError> {
    let last = steps.time(steps.count.saturating_sub(1));
    let scan = scan_of(tenant, log, steps.start_ns.saturating_sub(range_ns) + 1, last.saturating_add(1), false);
    let bytes = matches!(func, RangeFunc::BytesOverTime | RangeFunc::BytesRate);
    let acc = Accumulator { steps, range_ns, bytes, groupings, series: HashMap::new() };
    let (acc, stats) = read(store, scan, log, deadline, acc, accumulate).await?;
    let per_second = matches!(func, RangeFunc::Rate | RangeFunc::BytesRate);
    let matrix = acc
        .series
        .into_iter()
        .map(|(labels, window)| {
            let (mut count, mut sum, mut points) = (0.0, 0.0, Vec::new());
            for k in 0..steps.count {
                count += window.count[k];
                sum += window.sum[k];
                if count > 0.5 {
                    let value = if per_second { sum / (range_ns as f64 / 1e9) } else { sum };
                    points.push((steps.time(k), value));
                }
            }
            (labels, points)
        })
        .collect();
    Ok((matrix, stats))
}

/// `op by/without (...)` over a matrix, step by step.
fn aggregate(matrix: Matrix, op: AggOp, grouping: Option<&Grouping>) -> Matrix {
    let all = Grouping { without: false, labels: Vec::new() };
    let grouping = grouping.unwrap_or(&all);
    // Per group, per time: (sum, count, min, max).
    let mut groups: HashMap<SeriesLabels, std::collections::BTreeMap<i64, [f64; 4]>> = HashMap::new();
    for (labels, points) in matrix {
        let times = groups.entry(group(&labels, grouping)).or_default();
        for (t, v) in points {
            let slot = times.entry(t).or_insert([0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY]);
            slot[0] += v;
            slot[1] += 1.0;
            slot[2] = slot[2].min(v);
            slot[3] = slot[3].max(v);
        }
    }
    groups
        .into_iter()
        .map(|(labels, times)| {
            let points = times
                .into_iter()
                .map(|(t, [sum, count, min, max])| {
                    let value = match op {
                        AggOp::Sum => sum,
                        AggOp::Avg => sum / count,
                        AggOp::Min => min,
                        AggOp::Max => max,
                        AggOp::Count => count,
                    };
                    (t, value)
                })
                .collect();
            (labels, points)
        })
        .collect()
}

/// Entries grouped into streams: by their stream labels alone (`categorized`, the others go
/// with each line), or by all their labels (Loki's answer without categorized labels).
pub fn streams(entries: Vec<Entry>, categorized: bool) -> Vec<(Labels, Vec<Entry>)> {
    let mut streams: std::collections::BTreeMap<Labels, Vec<Entry>> = Default::default();
    for entry in entries {
        let key: Labels = entry
            .labels
            .iter()
            .filter(|(_, (_, kind))| !categorized || *kind == Kind::Stream)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        streams.entry(key).or_default().push(entry);
    }
    streams.into_iter().collect()
}
