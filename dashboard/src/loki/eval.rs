//! Running LogQL over a tenant's stored log records: log queries (the newest or oldest
//! `limit` entries in a range) and metric queries (per step, over windows `(t - range, t]`).
//! Records are read a batch at a time and run through the pipeline on a blocking thread, so a
//! query over millions of lines holds neither the request runtime nor more than a batch.

use std::collections::HashMap;
use std::time::Instant;

use collector::store::{LogScan, MAX_LOG_READ, StreamKey, StreamLines, TelemetryStore};

use super::logql::{AggOp, BinOp, Grouping, LinePattern, LogExpr, MatchOp, MetricExpr, RangeFunc, Stage};
use super::pipeline::{ERROR, Entry, Kind, Labels, Pipeline, stream_labels};

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

/// Reads `scan` batch by batch (the first of `scan.limit` records, each next one twice as
/// large, up to [`MAX_LOG_READ`]), running `each` over every batch's entries (on a blocking
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
        scan.limit = (scan.limit * 2).min(MAX_LOG_READ);
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
    // The first batch as large as the answer (a query whose filters the scan decides needs no
    // more), each next one twice the last.
    let scan = LogScan { limit: limit.clamp(100, MAX_LOG_READ), ..scan_of(tenant, expr, start_ns, end_ns, backward) };
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

    /// The steps `first..=last` whose windows `(t_k - range, t_k]` hold a line at `ts_ns`.
    fn holding(&self, ts_ns: i64, range_ns: i64) -> Option<(usize, usize)> {
        // In i128: a line's time, the range and the first step are any of i64's.
        let (ts, start, step, range) =
            (i128::from(ts_ns), i128::from(self.start_ns), i128::from(self.step_ns.max(1)), i128::from(range_ns));
        let first = ((ts - start).max(0) + step - 1) / step;
        let last = (ts + range - 1 - start).div_euclid(step).min(self.count as i128 - 1);
        (first <= last).then_some((first as usize, last as usize))
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
    let Some((first, last)) = steps.holding(entry.ts_ns, acc.range_ns) else { return Ok(true) };
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
        return Err(too_many_series());
    }
    let window = acc.series.entry(key).or_insert_with(|| Window::new(steps));
    window.add(first, last, if acc.bytes { entry.line.len() as f64 } else { 1.0 });
    Ok(true)
}

fn too_many_series() -> EvalError {
    EvalError::Bad(format!(
        "maximum number of series ({MAX_SERIES}) reached for a single query; consider reducing query \
         cardinality by adding more filters or aggregating with sum by"
    ))
}

impl Window {
    fn new(steps: Steps) -> Self {
        Self { count: vec![0.0; steps.count + 1], sum: vec![0.0; steps.count + 1] }
    }

    /// A line of `value` in the windows of steps `first..=last`.
    fn add(&mut self, first: usize, last: usize, value: f64) {
        self.count[first] += 1.0;
        self.count[last + 1] -= 1.0;
        self.sum[first] += value;
        self.sum[last + 1] -= value;
    }
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
    let (acc, stats) = match by_streams(log, &scan, &acc.groupings) {
        true => read_streams(store, scan, log, deadline, acc).await?,
        false => read(store, scan, log, deadline, acc, accumulate).await?,
    };
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

/// Labels that are a stream's for every record (see `pipeline::entry_of`); then those that are
/// a function's record's stream labels, and those that are an SDK record's (in a record of the
/// other source, a label of that name is metadata, from its attributes).
const STREAM_LABELS: [&str; 3] = ["source", "service_name", "level"];
const FUNCTION_STREAM_LABELS: [&str; 3] = ["function", "instance", "stream"];
const SDK_STREAM_LABELS: [&str; 2] = ["service_namespace", "deployment_environment"];

/// Whether a range function's lines can be counted from their streams alone: its first `sum`
/// keeps stream labels only, and its stages are line filters the scan decides and `drop`s of
/// labels that `sum` does not keep (no parser: no `__error__`).
fn by_streams(log: &LogExpr, scan: &LogScan, groupings: &[Grouping]) -> bool {
    let Some(first) = groupings.first() else { return false };
    let stream_label = |name: &str| {
        STREAM_LABELS.contains(&name)
            || (scan.metered == Some(true) && FUNCTION_STREAM_LABELS.contains(&name))
            || (scan.metered == Some(false) && SDK_STREAM_LABELS.contains(&name))
    };
    if first.without || !first.labels.iter().all(|l| stream_label(l)) {
        return false;
    }
    let mut filters = 0;
    for stage in &log.stages {
        match stage {
            Stage::Line(filter)
                if !filter.negate && matches!(filter.patterns.as_slice(), [LinePattern::Contains(_)]) =>
            {
                filters += 1
            }
            Stage::Drop(labels) if labels.iter().all(|(name, _)| !first.labels.contains(name)) => {}
            _ => return false,
        }
    }
    filters == scan.contains.len()
}

/// A range function's lines counted by stream (see [`by_streams`]): each stream's series
/// found once, each line added to it, no record built.
async fn read_streams(
    store: &TelemetryStore,
    scan: LogScan,
    log: &LogExpr,
    deadline: Instant,
    mut acc: Accumulator,
) -> Result<(Accumulator, Stats), EvalError> {
    let pipeline = Pipeline::new(log);
    let mut stats = Stats::default();
    let mut series_of: HashMap<StreamKey, Option<usize>> = HashMap::new();
    let mut series: Vec<(SeriesLabels, Window)> = Vec::new();
    let mut index: HashMap<SeriesLabels, usize> = HashMap::new();
    let mut failed = None;
    store
        .scan_log_lines(&scan, &mut |batch: StreamLines| {
            if Instant::now() > deadline {
                failed = Some(EvalError::Timeout);
                return false;
            }
            let mut streams = Vec::with_capacity(batch.streams.len());
            for stream in batch.streams {
                if let Some(found) = series_of.get(&stream) {
                    streams.push(*found);
                    continue;
                }
                let labels = stream_labels(&stream);
                let found = match pipeline.selects(&labels) {
                    false => None,
                    true => {
                        let mut key = label_pairs(&labels);
                        for grouping in &acc.groupings {
                            key = group(&key, grouping);
                        }
                        match index.get(&key) {
                            Some(at) => Some(*at),
                            None if series.len() >= MAX_SERIES => {
                                failed = Some(too_many_series());
                                return false;
                            }
                            None => {
                                index.insert(key.clone(), series.len());
                                series.push((key, Window::new(acc.steps)));
                                Some(series.len() - 1)
                            }
                        }
                    }
                };
                series_of.insert(stream, found);
                streams.push(found);
            }
            stats.lines += batch.lines.len() as u64;
            for (ts_ns, stream, bytes) in batch.lines {
                stats.bytes += u64::from(bytes);
                let Some(at) = streams[stream as usize] else { continue };
                if let Some((first, last)) = acc.steps.holding(ts_ns, acc.range_ns) {
                    series[at].1.add(first, last, if acc.bytes { f64::from(bytes) } else { 1.0 });
                }
            }
            true
        })
        .await?;
    if let Some(error) = failed {
        return Err(error);
    }
    acc.series = series.into_iter().collect();
    Ok((acc, stats))
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
