//! PromQL evaluation: the parsed expression (promql-parser) is checked and turned into a small
//! plan ([`plan`]), its selectors are loaded once for the whole query (`data.rs`), and the plan
//! is evaluated at every step ([`Evaluator`]) with Prometheus 3's semantics: left-open windows
//! `(t - range, t]`, a 5-minute lookback for instant selectors, extrapolated `rate`/`increase`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use promql_parser::label::{MatchOp, Matchers};
use promql_parser::parser::token::{
    T_ADD, T_ATAN2, T_AVG, T_COUNT, T_DIV, T_EQLC, T_GROUP, T_GTE, T_GTR, T_LAND, T_LOR, T_LSS, T_LTE, T_LUNLESS,
    T_MAX, T_MIN, T_MOD, T_MUL, T_NEQ, T_POW, T_STDDEV, T_STDVAR, T_SUB, T_SUM,
};
use promql_parser::parser::{AtModifier, Expr, LabelModifier, Offset, VectorMatchCardinality};

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

fn unsupported(what: impl Into<String>) -> QueryError {
    QueryError::Unsupported(what.into())
}

// ---------------------------------------------------------------------------------------------
// The plan

/// `@` on a selector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum At {
    Start,
    End,
    Time(i64),
}

/// One vector or matrix selector of the query.
#[derive(Debug, Clone)]
pub struct Selector {
    pub name: Option<String>,
    pub matchers: Matchers,
    /// Milliseconds into the past (negative: `offset -5m`).
    pub offset_ms: i64,
    pub at: Option<At>,
    /// `Some` for a matrix selector `[range]`.
    pub range_ms: Option<i64>,
    /// The last two samples of each window are needed (`irate`, `idelta`).
    pub needs_previous: bool,
    /// Every sample of each window is needed (a matrix returned as the result).
    pub all_samples: bool,
}

impl Selector {
    /// Whether a series with these labels is selected.
    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        if let Some(name) = &self.name
            && label(labels, METRIC_NAME) != name
        {
            return false;
        }
        matchers_match(&self.matchers, labels)
    }

    /// Whether a metric of this name can be selected (the name matchers only).
    pub fn may_select_name(&self, metric: &str) -> bool {
        if let Some(name) = &self.name {
            return name == metric;
        }
        let name_ok = |group: &[promql_parser::label::Matcher]| {
            group.iter().filter(|m| m.name == METRIC_NAME).all(|m| m.is_match(metric))
        };
        name_ok(&self.matchers.matchers)
            && (self.matchers.or_matchers.is_empty() || self.matchers.or_matchers.iter().any(|g| name_ok(g)))
    }

    /// The metric name when the selector names exactly one.
    pub fn exact_name(&self) -> Option<&str> {
        if let Some(name) = &self.name {
            return Some(name);
        }
        if !self.matchers.or_matchers.is_empty() {
            return None;
        }
        self.matchers
            .matchers
            .iter()
            .find(|m| m.name == METRIC_NAME && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.as_str())
    }

    /// The time the selector reads at, for an evaluation at `t` of a query over `start..=end`.
    pub fn eval_time(&self, t: i64, start: i64, end: i64) -> i64 {
        let base = match self.at {
            None => t,
            Some(At::Start) => start,
            Some(At::End) => end,
            Some(At::Time(at)) => at,
        };
        // Both are bounded (`MAX_TIME_MS`, `MAX_DURATION_MS`): saturating is only a guard.
        base.saturating_sub(self.offset_ms)
    }
}

/// Whether label matchers (with `or` groups) accept these labels.
pub fn matchers_match(matchers: &Matchers, labels: &[(String, String)]) -> bool {
    let all = |group: &[promql_parser::label::Matcher]| group.iter().all(|m| m.is_match(label(labels, &m.name)));
    all(&matchers.matchers) && (matchers.or_matchers.is_empty() || matchers.or_matchers.iter().any(|g| all(g)))
}

/// A label's value ("" when absent, as in Prometheus).
pub fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Atan2,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    And,
    Or,
    Unless,
}

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

/// `on (...)` / `ignoring (...)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Matching {
    On(Vec<String>),
    Ignoring(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
    Group,
    Stddev,
    Stdvar,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Grouping {
    By(Vec<String>),
    Without(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Func {
    Rate,
    Increase,
    Delta,
    Irate,
    Idelta,
    HistogramQuantile,
    Time,
    Vector,
    Scalar,
    Abs,
    Ceil,
    Floor,
    Round,
    Sqrt,
    Exp,
    Ln,
    Log2,
    Log10,
    Clamp,
    ClampMin,
    ClampMax,
}

/// The functions evaluated here (anything else is refused by name).
pub const FUNCTIONS: &[(&str, Func)] = &[
    ("rate", Func::Rate),
    ("increase", Func::Increase),
    ("delta", Func::Delta),
    ("irate", Func::Irate),
    ("idelta", Func::Idelta),
    ("histogram_quantile", Func::HistogramQuantile),
    ("time", Func::Time),
    ("vector", Func::Vector),
    ("scalar", Func::Scalar),
    ("abs", Func::Abs),
    ("ceil", Func::Ceil),
    ("floor", Func::Floor),
    ("round", Func::Round),
    ("sqrt", Func::Sqrt),
    ("exp", Func::Exp),
    ("ln", Func::Ln),
    ("log2", Func::Log2),
    ("log10", Func::Log10),
    ("clamp", Func::Clamp),
    ("clamp_min", Func::ClampMin),
    ("clamp_max", Func::ClampMax),
];

#[derive(Debug, Clone)]
pub enum Node {
    Number(f64),
    Str(String),
    /// An instant vector selector (index into [`Plan::selectors`]).
    Selector(usize),
    /// A matrix selector.
    Matrix(usize),
    Neg(Box<Node>),
    Binary {
        op: BinOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
        return_bool: bool,
        matching: Option<Matching>,
    },
    Aggregate {
        op: AggOp,
        expr: Box<Node>,
        grouping: Grouping,
    },
    Call {
        func: Func,
        args: Vec<Node>,
    },
}

/// A checked query: what to evaluate and what to load.
#[derive(Debug, Clone)]
pub struct Plan {
    pub root: Node,
    pub selectors: Vec<Selector>,
}

impl Plan {
    /// Whether the result is a matrix selector (only allowed in instant queries).
    pub fn returns_matrix(&self) -> bool {
        matches!(self.root, Node::Matrix(_))
    }

    /// Whether the result is a string literal.
    pub fn returns_string(&self) -> bool {
        matches!(self.root, Node::Str(_))
    }
}

/// Checks a parsed expression and plans it; constructs outside the supported subset are
/// refused with [`QueryError::Unsupported`] naming them.
pub fn plan(expr: &Expr) -> Result<Plan, QueryError> {
    let mut planner = Planner { selectors: Vec::new() };
    let root = planner.node(expr)?;
    if let Node::Matrix(id) = root {
        planner.selectors[id].all_samples = true;
    }
    Ok(Plan { root, selectors: planner.selectors })
}

struct Planner {
    selectors: Vec<Selector>,
}

fn millis(d: &Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A range's or offset's ms, refused beyond [`MAX_DURATION_MS`] (`what`: `range`, `offset`).
fn bounded_duration(what: &str, d: &Duration) -> Result<i64, QueryError> {
    let ms = millis(d);
    if ms > MAX_DURATION_MS {
        let limit = Duration::from_millis(MAX_DURATION_MS.unsigned_abs());
        return Err(QueryError::BadData(format!(
            "{what} {} is longer than {}, the limit",
            promql_parser::util::display_duration(d),
            promql_parser::util::display_duration(&limit)
        )));
    }
    Ok(ms)
}

fn system_time_ms(t: &SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => millis(&d),
        Err(e) => -millis(&e.duration()),
    }
}

impl Planner {
    fn selector(
        &mut self,
        vs: &promql_parser::parser::VectorSelector,
        range: Option<&Duration>,
    ) -> Result<usize, QueryError> {
        let offset_ms = match &vs.offset {
            None => 0,
            Some(Offset::Pos(d)) => bounded_duration("offset", d)?,
            Some(Offset::Neg(d)) => -bounded_duration("offset", d)?,
        };
        let at = match &vs.at {
            None => None,
            Some(AtModifier::Start) => Some(At::Start),
            Some(AtModifier::End) => Some(At::End),
            Some(AtModifier::At(t)) => {
                let ms = system_time_ms(t);
                let what = format!("@ time {}", ms as f64 / 1000.0);
                Some(At::Time(bounded_time(ms, &what).map_err(QueryError::BadData)?))
            }
        };
        let range_ms = match range {
            Some(d) if d.is_zero() => {
                return Err(QueryError::BadData("range selector duration must be positive".into()));
            }
            Some(d) => Some(bounded_duration("range", d)?),
            None => None,
        };
        self.selectors.push(Selector {
            name: vs.name.clone(),
            matchers: vs.matchers.clone(),
            offset_ms,
            at,
            range_ms,
            needs_previous: false,
            all_samples: false,
        });
        Ok(self.selectors.len() - 1)
    }

    fn node(&mut self, expr: &Expr) -> Result<Node, QueryError> {
        Ok(match expr {
            Expr::NumberLiteral(n) => Node::Number(n.val),
            Expr::StringLiteral(s) => Node::Str(s.val.clone()),
            Expr::Paren(p) => self.node(&p.expr)?,
            Expr::Unary(u) => Node::Neg(Box::new(self.node(&u.expr)?)),
            Expr::VectorSelector(vs) => Node::Selector(self.selector(vs, None)?),
            Expr::MatrixSelector(ms) => Node::Matrix(self.selector(&ms.vs, Some(&ms.range))?),
            Expr::Subquery(_) => return Err(unsupported("subquery")),
            Expr::Extension(_) => return Err(unsupported("extension expression")),
            Expr::Aggregate(a) => {
                let op = match a.op.id() {
                    T_SUM => AggOp::Sum,
                    T_AVG => AggOp::Avg,
                    T_MIN => AggOp::Min,
                    T_MAX => AggOp::Max,
                    T_COUNT => AggOp::Count,
                    T_GROUP => AggOp::Group,
                    T_STDDEV => AggOp::Stddev,
                    T_STDVAR => AggOp::Stdvar,
                    _ => return Err(unsupported(format!("aggregation {}", a.op))),
                };
                if a.param.is_some() {
                    return Err(unsupported(format!("aggregation {} with a parameter", a.op)));
                }
                let grouping = match &a.modifier {
                    None => Grouping::By(Vec::new()),
                    Some(LabelModifier::Include(l)) => Grouping::By(l.labels.clone()),
                    Some(LabelModifier::Exclude(l)) => Grouping::Without(l.labels.clone()),
                };
                Node::Aggregate { op, expr: Box::new(self.node(&a.expr)?), grouping }
            }
            Expr::Binary(b) => {
                let op = match b.op.id() {
                    T_ADD => BinOp::Add,
                    T_SUB => BinOp::Sub,
                    T_MUL => BinOp::Mul,
                    T_DIV => BinOp::Div,
                    T_MOD => BinOp::Mod,
                    T_POW => BinOp::Pow,
                    T_ATAN2 => BinOp::Atan2,
                    T_EQLC => BinOp::Eq,
                    T_NEQ => BinOp::Ne,
                    T_GTR => BinOp::Gt,
                    T_LSS => BinOp::Lt,
                    T_GTE => BinOp::Ge,
                    T_LTE => BinOp::Le,
                    T_LAND => BinOp::And,
                    T_LOR => BinOp::Or,
                    T_LUNLESS => BinOp::Unless,
                    _ => return Err(unsupported(format!("binary operator {}", b.op))),
                };
                let mut matching = None;
                let mut return_bool = false;
                if let Some(modifier) = &b.modifier {
                    match &modifier.card {
                        VectorMatchCardinality::ManyToOne(_) => return Err(unsupported("group_left")),
                        VectorMatchCardinality::OneToMany(_) => return Err(unsupported("group_right")),
                        VectorMatchCardinality::OneToOne | VectorMatchCardinality::ManyToMany => {}
                    }
                    if modifier.fill_values.lhs.is_some() || modifier.fill_values.rhs.is_some() {
                        return Err(unsupported("fill modifier"));
                    }
                    return_bool = modifier.return_bool;
                    matching = match &modifier.matching {
                        None => None,
                        Some(LabelModifier::Include(l)) => Some(Matching::On(l.labels.clone())),
                        Some(LabelModifier::Exclude(l)) => Some(Matching::Ignoring(l.labels.clone())),
                    };
                }
                Node::Binary {
                    op,
                    lhs: Box::new(self.node(&b.lhs)?),
                    rhs: Box::new(self.node(&b.rhs)?),
                    return_bool,
                    matching,
                }
            }
            Expr::Call(c) => {
                let name = c.func.name;
                let func = FUNCTIONS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, f)| *f)
                    .ok_or_else(|| unsupported(format!("function {name}")))?;
                let mut args = Vec::with_capacity(c.args.args.len());
                for arg in &c.args.args {
                    args.push(self.node(arg)?);
                }
                for arg in &args {
                    if let Node::Matrix(id) = arg
                        && matches!(func, Func::Irate | Func::Idelta)
                    {
                        self.selectors[*id].needs_previous = true;
                    }
                }
                Node::Call { func, args }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Loaded data

/// The resolution of the synthesized counters: a sample every minute, at whole minutes.
pub const RESOLUTION_MS: i64 = 60_000;

/// A counter synthesized from usage records, sampled every [`RESOLUTION_MS`] from `first` to
/// `last`; its value at a sample time is the cumulative sum of what started before it.
/// `points` are (time, cumulative) at every time where it may be read (see `usage.rs`).
#[derive(Debug, Clone)]
pub struct Counter {
    pub first: i64,
    pub last: i64,
    pub points: Vec<(i64, f64)>,
}

impl Counter {
    /// The value at sample time `t` (0 before anything happened).
    pub fn at(&self, t: i64) -> f64 {
        let i = self.points.partition_point(|p| p.0 <= t);
        if i == 0 { 0.0 } else { self.points[i - 1].1 }
    }

    /// The last sample time at or before `t`.
    fn last_sample(&self, t: i64) -> Option<i64> {
        let l = t.div_euclid(RESOLUTION_MS).saturating_mul(RESOLUTION_MS).min(self.last);
        (l >= self.first).then_some(l)
    }

    /// The first sample time after `t`.
    fn first_sample_after(&self, t: i64) -> i64 {
        (t.div_euclid(RESOLUTION_MS) * RESOLUTION_MS + RESOLUTION_MS).max(self.first)
    }
}

#[derive(Debug, Clone)]
pub enum SeriesData {
    /// Stored samples, in time order.
    Samples(Arc<Vec<(i64, f64)>>),
    Counter(Arc<Counter>),
}

#[derive(Debug, Clone)]
pub struct Series {
    pub labels: Labels,
    pub data: SeriesData,
}

/// The samples of one series in a window `(e - range, e]`, as rate-like functions read them.
#[derive(Debug, Clone, Copy)]
struct Window {
    first: (i64, f64),
    last: (i64, f64),
    previous: Option<(i64, f64)>,
    count: usize,
    /// What counter resets add back (Prometheus: every drop adds the value before it).
    correction: f64,
}

impl SeriesData {
    fn instant(&self, e: i64) -> Option<f64> {
        match self {
            SeriesData::Samples(samples) => {
                let i = samples.partition_point(|s| s.0 <= e);
                let (t, v) = *samples.get(i.checked_sub(1)?)?;
                (t > e - LOOKBACK_MS).then_some(v)
            }
            SeriesData::Counter(c) => {
                let l = c.last_sample(e)?;
                (l > e - LOOKBACK_MS).then(|| c.at(l))
            }
        }
    }

    fn window(&self, e: i64, range: i64) -> Option<Window> {
        match self {
            SeriesData::Samples(samples) => {
                let lo = samples.partition_point(|s| s.0 <= e - range);
                let hi = samples.partition_point(|s| s.0 <= e);
                let slice = samples.get(lo..hi).filter(|s| !s.is_empty())?;
                let mut correction = 0.0;
                let mut last_value = 0.0;
                for s in slice {
                    if s.1 < last_value {
                        correction += last_value;
                    }
                    last_value = s.1;
                }
                Some(Window {
                    first: slice[0],
                    last: slice[slice.len() - 1],
                    previous: (slice.len() >= 2).then(|| slice[slice.len() - 2]),
                    count: slice.len(),
                    correction,
                })
            }
            SeriesData::Counter(c) => {
                let l = c.last_sample(e)?;
                let f = c.first_sample_after(e - range);
                if l < f {
                    return None;
                }
                let count = ((l - f) / RESOLUTION_MS + 1) as usize;
                Some(Window {
                    first: (f, c.at(f)),
                    last: (l, c.at(l)),
                    previous: (count >= 2).then(|| (l - RESOLUTION_MS, c.at(l - RESOLUTION_MS))),
                    count,
                    correction: 0.0,
                })
            }
        }
    }

    fn samples(&self, e: i64, range: i64) -> Vec<(i64, f64)> {
        match self {
            SeriesData::Samples(samples) => {
                let lo = samples.partition_point(|s| s.0 <= e - range);
                let hi = samples.partition_point(|s| s.0 <= e);
                samples[lo..hi].to_vec()
            }
            SeriesData::Counter(c) => {
                let Some(l) = c.last_sample(e) else { return Vec::new() };
                let mut t = c.first_sample_after(e - range);
                let mut out = Vec::new();
                while t <= l {
                    out.push((t, c.at(t)));
                    t += RESOLUTION_MS;
                }
                out
            }
        }
    }
}

/// Most sample times of the synthesized counters one query may read: a year of minutes and
/// more. A range over every minute of `[1000000y]` would otherwise be pushed one by one.
pub const MAX_COUNTER_READS: usize = 1 << 20;

/// Which sample times of the synthesized counters a selector reads at evaluation time `e`
/// (the same arithmetic as [`SeriesData::instant`] and [`SeriesData::window`]), with `last`
/// the counters' last sample time; refused beyond [`MAX_COUNTER_READS`] in all.
pub fn counter_read_times(selector: &Selector, e: i64, last: i64, out: &mut Vec<i64>) -> Result<(), QueryError> {
    let l = e.div_euclid(RESOLUTION_MS).saturating_mul(RESOLUTION_MS).min(last);
    out.push(l);
    if let Some(range) = selector.range_ms {
        let f = e
            .saturating_sub(range)
            .div_euclid(RESOLUTION_MS)
            .saturating_mul(RESOLUTION_MS)
            .saturating_add(RESOLUTION_MS);
        if f <= l {
            out.push(f);
            if selector.needs_previous {
                out.push(l - RESOLUTION_MS);
            }
            if selector.all_samples {
                // Counted before any is pushed: the range may hold billions of minutes.
                let minutes = usize::try_from((l - f) / RESOLUTION_MS).unwrap_or(usize::MAX);
                if minutes > MAX_COUNTER_READS.saturating_sub(out.len()) {
                    return Err(too_many_counter_reads());
                }
                out.extend((0..minutes as i64).map(|i| f + i * RESOLUTION_MS));
            }
        }
    }
    if out.len() > MAX_COUNTER_READS {
        return Err(too_many_counter_reads());
    }
    Ok(())
}

fn too_many_counter_reads() -> QueryError {
    QueryError::Execution(format!(
        "the query reads the usage counters at more than {MAX_COUNTER_READS} minutes: use fewer steps or a shorter range"
    ))
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

    fn call(&self, func: Func, args: &[Node], t: i64) -> Result<Value, QueryError> {
        let map = |samples: Vec<Sample>, f: &dyn Fn(f64) -> f64| -> Result<Value, QueryError> {
            let out: Vec<Sample> =
                samples.into_iter().map(|s| Sample { labels: drop_name(&s.labels), value: f(s.value) }).collect();
            check_unique(&out)?;
            Ok(Value::Vector(out))
        };
        match func {
            Func::Rate | Func::Increase | Func::Delta | Func::Irate | Func::Idelta => {
                let Some(Node::Matrix(id)) = args.first() else {
                    return Err(QueryError::Execution("expected a range vector argument".into()));
                };
                let selector = &self.plan.selectors[*id];
                let e = selector.eval_time(t, self.start, self.end);
                let range = selector.range_ms.unwrap_or(0);
                let mut out = Vec::new();
                for series in &self.data[*id] {
                    let Some(window) = series.data.window(e, range) else { continue };
                    let value = match func {
                        Func::Rate => extrapolated_rate(&window, e - range, e, range, true, true),
                        Func::Increase => extrapolated_rate(&window, e - range, e, range, true, false),
                        Func::Delta => extrapolated_rate(&window, e - range, e, range, false, false),
                        Func::Irate => instant_delta(&window, true),
                        _ => instant_delta(&window, false),
                    };
                    if let Some(value) = value {
                        out.push(Sample { labels: drop_name(&series.labels), value });
                    }
                }
                check_unique(&out)?;
                Ok(Value::Vector(out))
            }
            Func::HistogramQuantile => {
                let q = self.scalar_arg(&args[0], t)?;
                let samples = self.vector_arg(&args[1], t)?;
                Ok(Value::Vector(histogram_quantile(q, samples)))
            }
            Func::Time => Ok(Value::Scalar(t as f64 / 1000.0)),
            Func::Vector => {
                let v = self.scalar_arg(&args[0], t)?;
                Ok(Value::Vector(vec![Sample { labels: Arc::new(Vec::new()), value: v }]))
            }
            Func::Scalar => {
                let samples = self.vector_arg(&args[0], t)?;
                Ok(Value::Scalar(if samples.len() == 1 { samples[0].value } else { f64::NAN }))
            }
            Func::Abs => map(self.vector_arg(&args[0], t)?, &f64::abs),
            Func::Ceil => map(self.vector_arg(&args[0], t)?, &f64::ceil),
            Func::Floor => map(self.vector_arg(&args[0], t)?, &f64::floor),
            Func::Sqrt => map(self.vector_arg(&args[0], t)?, &f64::sqrt),
            Func::Exp => map(self.vector_arg(&args[0], t)?, &f64::exp),
            Func::Ln => map(self.vector_arg(&args[0], t)?, &f64::ln),
            Func::Log2 => map(self.vector_arg(&args[0], t)?, &f64::log2),
            Func::Log10 => map(self.vector_arg(&args[0], t)?, &f64::log10),
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
        }
    }
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

fn grouped_labels(labels: &[(String, String)], grouping: &Grouping) -> Vec<(String, String)> {
    match grouping {
        Grouping::By(names) => labels.iter().filter(|(k, _)| names.iter().any(|n| n == k)).cloned().collect(),
        Grouping::Without(names) => {
            labels.iter().filter(|(k, _)| k != METRIC_NAME && !names.iter().any(|n| n == k)).cloned().collect()
        }
    }
}

fn aggregate(op: AggOp, samples: Vec<Sample>, grouping: &Grouping) -> Vec<Sample> {
    #[derive(Default)]
    struct Acc {
        count: f64,
        sum: f64,
        mean: f64,
        m2: f64,
        value: Option<f64>,
    }
    let mut groups: BTreeMap<Vec<(String, String)>, Acc> = BTreeMap::new();
    for s in samples {
        let acc = groups.entry(grouped_labels(&s.labels, grouping)).or_default();
        acc.count += 1.0;
        acc.sum += s.value;
        let delta = s.value - acc.mean;
        acc.mean += delta / acc.count;
        acc.m2 += delta * (s.value - acc.mean);
        acc.value = Some(match (op, acc.value) {
            (_, None) => s.value,
            (AggOp::Min, Some(v)) => {
                if v.is_nan() || s.value < v {
                    s.value
                } else {
                    v
                }
            }
            (AggOp::Max, Some(v)) => {
                if v.is_nan() || s.value > v {
                    s.value
                } else {
                    v
                }
            }
            (_, Some(v)) => v,
        });
    }
    groups
        .into_iter()
        .map(|(labels, acc)| {
            let value = match op {
                AggOp::Sum => acc.sum,
                AggOp::Avg => acc.mean,
                AggOp::Min | AggOp::Max => acc.value.unwrap_or(f64::NAN),
                AggOp::Count => acc.count,
                AggOp::Group => 1.0,
                AggOp::Stdvar => acc.m2 / acc.count,
                AggOp::Stddev => (acc.m2 / acc.count).sqrt(),
            };
            Sample { labels: Arc::new(labels), value }
        })
        .collect()
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

fn binary(op: BinOp, l: Value, r: Value, return_bool: bool, matching: &Option<Matching>) -> Result<Value, QueryError> {
    match (l, r) {
        (Value::Scalar(a), Value::Scalar(b)) => Ok(Value::Scalar(op.apply(a, b))),
        (Value::Vector(v), Value::Scalar(s)) => vector_scalar(op, v, s, false, return_bool),
        (Value::Scalar(s), Value::Vector(v)) => vector_scalar(op, v, s, true, return_bool),
        (Value::Vector(l), Value::Vector(r)) => vector_vector(op, l, r, return_bool, matching),
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
    let mut right: HashMap<String, &Sample> = HashMap::with_capacity(rhs.len());
    for s in &rhs {
        if let Some(other) = right.insert(signature(&s.labels, matching), s) {
            return Err(QueryError::Execution(format!(
                "found duplicate series for the match group on the right hand-side of the operation: [{}, {}]; \
                 many-to-many matching not allowed: matching labels must be unique on one side",
                format_labels(&other.labels),
                format_labels(&s.labels)
            )));
        }
    }
    let mut matched: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = Vec::new();
    for s in &lhs {
        let sig = signature(&s.labels, matching);
        let Some(r) = right.get(&sig) else { continue };
        if !matched.insert(sig) {
            return Err(QueryError::Execution(format!(
                "multiple matches for labels: many-to-one matching must be explicit (group_left/group_right): {}",
                format_labels(&s.labels)
            )));
        }
        let result = op.apply(s.value, r.value);
        let keep_value = if op.is_comparison() && !return_bool {
            if result != 1.0 {
                continue;
            }
            s.value
        } else {
            result
        };
        let drop = !op.is_comparison() || return_bool;
        let labels: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| {
                if drop && k == METRIC_NAME {
                    return false;
                }
                match matching {
                    Some(Matching::On(names)) => names.iter().any(|n| n == k),
                    Some(Matching::Ignoring(names)) => !names.iter().any(|n| n == k),
                    None => true,
                }
            })
            .cloned()
            .collect();
        out.push(Sample { labels: Arc::new(labels), value: keep_value });
    }
    check_unique(&out)?;
    Ok(Value::Vector(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(samples: &[(i64, f64)], e: i64, range: i64) -> Window {
        SeriesData::Samples(Arc::new(samples.to_vec())).window(e, range).unwrap()
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
    fn quantile_interpolates_inside_the_bucket() {
        let q = bucket_quantile(0.5, vec![(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (f64::INFINITY, 40.0)]);
        assert!((q - 0.3).abs() < 1e-12, "{q}");
        assert!(bucket_quantile(0.5, vec![(0.1, 1.0)]).is_nan());
    }

    #[test]
    fn counter_windows_follow_the_minute_grid() {
        let c = Counter { first: 60_000, last: 600_000, points: vec![(120_000, 1.0), (300_000, 3.0)] };
        let data = SeriesData::Counter(Arc::new(c));
        assert_eq!(data.instant(59_999), None);
        assert_eq!(data.instant(150_000), Some(1.0));
        assert_eq!(data.instant(10_000_000), None, "past the last sample + lookback");
        let w = data.window(300_000, 300_000).unwrap();
        assert_eq!((w.first, w.last, w.count), ((60_000, 0.0), (300_000, 3.0), 5));
    }
}
