//! The plan: a parsed expression checked against the supported subset and turned into
//! [`Node`]s, with its selectors ([`Selector`]) listed once for loading.

use std::time::{Duration, SystemTime};

use promql_parser::label::{MatchOp, Matchers};
use promql_parser::parser::token::{
    T_ADD, T_ATAN2, T_AVG, T_COUNT, T_DIV, T_EQLC, T_GROUP, T_GTE, T_GTR, T_LAND, T_LOR, T_LSS, T_LTE, T_LUNLESS,
    T_MAX, T_MIN, T_MOD, T_MUL, T_NEQ, T_POW, T_STDDEV, T_STDVAR, T_SUB, T_SUM,
};
use promql_parser::parser::{AtModifier, Expr, LabelModifier, Offset, VectorMatchCardinality};

use super::{MAX_DURATION_MS, METRIC_NAME, QueryError, bounded_time, label};

fn unsupported(what: impl Into<String>) -> QueryError {
    QueryError::Unsupported(what.into())
}

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
