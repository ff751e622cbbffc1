//! The plan: the nodes an expression is evaluated as (made by `planner.rs`), its selectors
//! listed once for loading, and the times each selector is read at.

use promql_parser::label::{MatchOp, Matchers};

use super::{METRIC_NAME, QueryError, label};

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
        shifted(self.at, self.offset_ms, t, start, end)
    }
}

/// The time an evaluation at `t` reads at, after `@` and `offset`.
fn shifted(at: Option<At>, offset_ms: i64, t: i64, start: i64, end: i64) -> i64 {
    let base = match at {
        None => t,
        Some(At::Start) => start,
        Some(At::End) => end,
        Some(At::Time(at)) => at,
    };
    // Both are bounded (`MAX_TIME_MS`, `MAX_DURATION_MS`): saturating is only a guard.
    base.saturating_sub(offset_ms)
}

/// Whether label matchers (with `or` groups) accept these labels.
pub fn matchers_match(matchers: &Matchers, labels: &[(String, String)]) -> bool {
    let all = |group: &[promql_parser::label::Matcher]| group.iter().all(|m| m.is_match(label(labels, &m.name)));
    all(&matchers.matchers) && (matchers.or_matchers.is_empty() || matchers.or_matchers.iter().any(|g| all(g)))
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
    Topk,
    Bottomk,
    Quantile,
    CountValues,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Grouping {
    By(Vec<String>),
    Without(Vec<String>),
}

/// How the two sides of a binary operation between vectors match (`group_left`: many on the
/// left to one on the right, with the extra labels to copy from the right).
#[derive(Debug, Clone, PartialEq)]
pub enum Card {
    OneToOne,
    ManyToOne(Vec<String>),
    OneToMany(Vec<String>),
    ManyToMany,
}

/// The functions evaluated here, by kind; `FUNCTIONS` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Func {
    /// Of a range vector, sample by sample (`rate`, `*_over_time`, `deriv`, ...).
    Range(RangeFunc),
    /// Of each sample's value (`abs`, `sin`, `hour`, ...): the name is dropped.
    Math(MathFunc),
    HistogramQuantile,
    /// Native-histogram functions: float samples have no native histogram, so nothing.
    NativeHistogram,
    Time,
    Vector,
    Scalar,
    Pi,
    Round,
    Clamp,
    ClampMin,
    ClampMax,
    Timestamp,
    Absent,
    Sort,
    SortDesc,
    SortByLabel,
    SortByLabelDesc,
    LabelReplace,
    LabelJoin,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeFunc {
    Rate,
    Increase,
    Delta,
    Irate,
    Idelta,
    Deriv,
    PredictLinear,
    Changes,
    Resets,
    HoltWinters,
    AvgOverTime,
    MinOverTime,
    MaxOverTime,
    SumOverTime,
    CountOverTime,
    QuantileOverTime,
    StddevOverTime,
    StdvarOverTime,
    MadOverTime,
    LastOverTime,
    PresentOverTime,
    AbsentOverTime,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MathFunc {
    Abs,
    Ceil,
    Floor,
    Sqrt,
    Exp,
    Ln,
    Log2,
    Log10,
    Sgn,
    Sin,
    Cos,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Asinh,
    Acosh,
    Atanh,
    Deg,
    Rad,
    DayOfMonth,
    DayOfWeek,
    DayOfYear,
    DaysInMonth,
    Hour,
    Minute,
    Month,
    Year,
}

impl MathFunc {
    /// The date functions: of a time in seconds, and of the evaluation time when called
    /// without an argument.
    pub fn is_date(self) -> bool {
        matches!(
            self,
            MathFunc::DayOfMonth
                | MathFunc::DayOfWeek
                | MathFunc::DayOfYear
                | MathFunc::DaysInMonth
                | MathFunc::Hour
                | MathFunc::Minute
                | MathFunc::Month
                | MathFunc::Year
        )
    }
}

/// Every function evaluated here, by its PromQL name (anything else is refused by name).
/// `holt_winters` is Prometheus 2's name of `double_exponential_smoothing`.
pub const FUNCTIONS: &[(&str, Func)] = &[
    ("rate", Func::Range(RangeFunc::Rate)),
    ("increase", Func::Range(RangeFunc::Increase)),
    ("delta", Func::Range(RangeFunc::Delta)),
    ("irate", Func::Range(RangeFunc::Irate)),
    ("idelta", Func::Range(RangeFunc::Idelta)),
    ("deriv", Func::Range(RangeFunc::Deriv)),
    ("predict_linear", Func::Range(RangeFunc::PredictLinear)),
    ("changes", Func::Range(RangeFunc::Changes)),
    ("resets", Func::Range(RangeFunc::Resets)),
    ("holt_winters", Func::Range(RangeFunc::HoltWinters)),
    ("double_exponential_smoothing", Func::Range(RangeFunc::HoltWinters)),
    ("avg_over_time", Func::Range(RangeFunc::AvgOverTime)),
    ("min_over_time", Func::Range(RangeFunc::MinOverTime)),
    ("max_over_time", Func::Range(RangeFunc::MaxOverTime)),
    ("sum_over_time", Func::Range(RangeFunc::SumOverTime)),
    ("count_over_time", Func::Range(RangeFunc::CountOverTime)),
    ("quantile_over_time", Func::Range(RangeFunc::QuantileOverTime)),
    ("stddev_over_time", Func::Range(RangeFunc::StddevOverTime)),
    ("stdvar_over_time", Func::Range(RangeFunc::StdvarOverTime)),
    ("mad_over_time", Func::Range(RangeFunc::MadOverTime)),
    ("last_over_time", Func::Range(RangeFunc::LastOverTime)),
    ("present_over_time", Func::Range(RangeFunc::PresentOverTime)),
    ("absent_over_time", Func::Range(RangeFunc::AbsentOverTime)),
    ("abs", Func::Math(MathFunc::Abs)),
    ("ceil", Func::Math(MathFunc::Ceil)),
    ("floor", Func::Math(MathFunc::Floor)),
    ("sqrt", Func::Math(MathFunc::Sqrt)),
    ("exp", Func::Math(MathFunc::Exp)),
    ("ln", Func::Math(MathFunc::Ln)),
    ("log2", Func::Math(MathFunc::Log2)),
    ("log10", Func::Math(MathFunc::Log10)),
    ("sgn", Func::Math(MathFunc::Sgn)),
    ("sin", Func::Math(MathFunc::Sin)),
    ("cos", Func::Math(MathFunc::Cos)),
    ("tan", Func::Math(MathFunc::Tan)),
    ("asin", Func::Math(MathFunc::Asin)),
    ("acos", Func::Math(MathFunc::Acos)),
    ("atan", Func::Math(MathFunc::Atan)),
    ("sinh", Func::Math(MathFunc::Sinh)),
    ("cosh", Func::Math(MathFunc::Cosh)),
    ("tanh", Func::Math(MathFunc::Tanh)),
    ("asinh", Func::Math(MathFunc::Asinh)),
    ("acosh", Func::Math(MathFunc::Acosh)),
    ("atanh", Func::Math(MathFunc::Atanh)),
    ("deg", Func::Math(MathFunc::Deg)),
    ("rad", Func::Math(MathFunc::Rad)),
    ("day_of_month", Func::Math(MathFunc::DayOfMonth)),
    ("day_of_week", Func::Math(MathFunc::DayOfWeek)),
    ("day_of_year", Func::Math(MathFunc::DayOfYear)),
    ("days_in_month", Func::Math(MathFunc::DaysInMonth)),
    ("hour", Func::Math(MathFunc::Hour)),
    ("minute", Func::Math(MathFunc::Minute)),
    ("month", Func::Math(MathFunc::Month)),
    ("year", Func::Math(MathFunc::Year)),
    ("histogram_quantile", Func::HistogramQuantile),
    ("histogram_avg", Func::NativeHistogram),
    ("histogram_count", Func::NativeHistogram),
    ("histogram_sum", Func::NativeHistogram),
    ("histogram_fraction", Func::NativeHistogram),
    ("histogram_stddev", Func::NativeHistogram),
    ("histogram_stdvar", Func::NativeHistogram),
    ("time", Func::Time),
    ("vector", Func::Vector),
    ("scalar", Func::Scalar),
    ("pi", Func::Pi),
    ("round", Func::Round),
    ("clamp", Func::Clamp),
    ("clamp_min", Func::ClampMin),
    ("clamp_max", Func::ClampMax),
    ("timestamp", Func::Timestamp),
    ("absent", Func::Absent),
    ("sort", Func::Sort),
    ("sort_desc", Func::SortDesc),
    ("sort_by_label", Func::SortByLabel),
    ("sort_by_label_desc", Func::SortByLabelDesc),
    ("label_replace", Func::LabelReplace),
    ("label_join", Func::LabelJoin),
];

/// A subquery `expr[range:step]`: `expr` evaluated every `step_ms` (at multiples of it) in
/// `(e - range, e]`, a range vector.
#[derive(Debug, Clone)]
pub struct Subquery {
    /// Its evaluations are kept by this index while a query runs (see `Evaluator`).
    pub id: usize,
    pub expr: Node,
    pub range_ms: i64,
    pub step_ms: i64,
    pub offset_ms: i64,
    pub at: Option<At>,
}

impl Subquery {
    /// The time an evaluation at `t` reads at, after `@` and `offset`: its window's end.
    pub fn end_time(&self, t: i64, start: i64, end: i64) -> i64 {
        shifted(self.at, self.offset_ms, t, start, end)
    }

    /// The inner evaluation times for an evaluation at `t`.
    pub fn times(&self, t: i64, start: i64, end: i64) -> impl Iterator<Item = i64> + use<> {
        let e = self.end_time(t, start, end);
        let low = e.saturating_sub(self.range_ms);
        let step = self.step_ms;
        let first = low.div_euclid(step).saturating_mul(step).saturating_add(step);
        (0..).map(move |k: i64| first.saturating_add(k.saturating_mul(step))).take_while(move |t| *t <= e)
    }
}

/// The labels an `absent`/`absent_over_time` answer carries: its selector's equality matchers
/// (a label matched twice, or otherwise, is left out), as Prometheus does.
#[derive(Debug, Clone, Default)]
pub struct AbsentLabels(pub Vec<(String, String)>);

/// `label_replace`'s arguments, its regex compiled once.
#[derive(Debug, Clone)]
pub struct Replace {
    pub dst: String,
    pub replacement: String,
    pub src: String,
    pub regex: regex::Regex,
}

#[derive(Debug, Clone)]
pub enum Node {
    Number(f64),
    Str(String),
    /// An instant vector selector (index into [`Plan::selectors`]).
    Selector(usize),
    /// A matrix selector.
    Matrix(usize),
    Subquery(Box<Subquery>),
    Neg(Box<Node>),
    Binary {
        op: BinOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
        return_bool: bool,
        matching: Option<Matching>,
        card: Card,
    },
    Aggregate {
        op: AggOp,
        expr: Box<Node>,
        param: Option<Box<Node>>,
        grouping: Grouping,
    },
    Call {
        func: Func,
        args: Vec<Node>,
        /// What `absent` and `absent_over_time` label their answer with.
        absent: AbsentLabels,
    },
    LabelReplace(Box<Node>, Box<Replace>),
    LabelJoin {
        expr: Box<Node>,
        dst: String,
        separator: String,
        sources: Vec<String>,
    },
}

/// A checked query: what to evaluate and what to load.
#[derive(Debug, Clone)]
pub struct Plan {
    pub root: Node,
    pub selectors: Vec<Selector>,
    /// How many subqueries the plan has (their ids are `0..subqueries`).
    pub subqueries: usize,
}

/// The step of a subquery written without one (Prometheus's default evaluation interval).
pub const DEFAULT_SUBQUERY_STEP_MS: i64 = 60_000;
/// Most evaluation times one query's subqueries may have in all, and most times a selector
/// may be read at through them: `max_over_time(x[1000000y:1s])` would otherwise be counted
/// out one time at a time.
pub const MAX_SUBQUERY_STEPS: usize = 1 << 20;

fn too_many_steps() -> QueryError {
    QueryError::Execution(format!(
        "the query's subqueries would be evaluated at more than {MAX_SUBQUERY_STEPS} times: use a longer subquery step or a shorter range"
    ))
}

impl Plan {
    /// Whether the result is a range vector (only allowed in instant queries).
    pub fn returns_matrix(&self) -> bool {
        matches!(self.root, Node::Matrix(_) | Node::Subquery(_))
    }

    /// Whether the result is a string literal.
    pub fn returns_string(&self) -> bool {
        matches!(self.root, Node::Str(_))
    }

    /// Whether an instant query's answer is in the order the evaluation made (`sort`,
    /// `sort_desc`, `sort_by_label`, `topk`, `bottomk`), not sorted by labels.
    pub fn keeps_order(&self) -> bool {
        matches!(
            self.root,
            Node::Call { func: Func::Sort | Func::SortDesc | Func::SortByLabel | Func::SortByLabelDesc, .. }
                | Node::Aggregate { op: AggOp::Topk | AggOp::Bottomk, .. }
        )
    }

    /// The times (after `@` and `offset`) at which each selector is read when the query is
    /// evaluated at `times` (ascending) of a query over `start..=end`, each list ascending
    /// and without repeats; refused past [`MAX_SUBQUERY_STEPS`] inside subqueries.
    pub fn read_times(&self, times: &[i64], start: i64, end: i64) -> Result<Vec<Vec<i64>>, QueryError> {
        let mut out = vec![Vec::new(); self.selectors.len()];
        self.walk(&self.root, times, start, end, &mut out)?;
        for list in &mut out {
            list.sort_unstable();
            list.dedup();
        }
        Ok(out)
    }

    fn walk(&self, node: &Node, times: &[i64], start: i64, end: i64, out: &mut [Vec<i64>]) -> Result<(), QueryError> {
        match node {
            Node::Number(_) | Node::Str(_) => {}
            Node::Selector(id) | Node::Matrix(id) => {
                let selector = &self.selectors[*id];
                if selector.at.is_some() {
                    out[*id].push(selector.eval_time(start, start, end));
                } else {
                    out[*id].extend(times.iter().map(|t| selector.eval_time(*t, start, end)));
                }
            }
            Node::Subquery(sub) => {
                let outer: &[i64] = if sub.at.is_some() { &times[..times.len().min(1)] } else { times };
                let mut inner: Vec<i64> = Vec::new();
                for t in outer {
                    for ti in sub.times(*t, start, end) {
                        // Consecutive outer times share most inner times: skip what is known.
                        if inner.last().is_some_and(|last| ti <= *last) {
                            continue;
                        }
                        if inner.len() >= MAX_SUBQUERY_STEPS {
                            return Err(too_many_steps());
                        }
                        inner.push(ti);
                    }
                }
                self.walk(&sub.expr, &inner, start, end, out)?;
            }
            Node::Neg(inner) | Node::LabelReplace(inner, _) | Node::LabelJoin { expr: inner, .. } => {
                self.walk(inner, times, start, end, out)?;
            }
            Node::Binary { lhs, rhs, .. } => {
                self.walk(lhs, times, start, end, out)?;
                self.walk(rhs, times, start, end, out)?;
            }
            Node::Aggregate { expr, param, .. } => {
                if let Some(param) = param {
                    self.walk(param, times, start, end, out)?;
                }
                self.walk(expr, times, start, end, out)?;
            }
            Node::Call { args, .. } => {
                for arg in args {
                    self.walk(arg, times, start, end, out)?;
                }
            }
        }
        if out.iter().any(|list| list.len() > MAX_SUBQUERY_STEPS.saturating_mul(2)) {
            return Err(too_many_steps());
        }
        Ok(())
    }
}
