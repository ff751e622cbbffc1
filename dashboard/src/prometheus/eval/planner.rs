//! The planner: a parsed expression (promql-parser's) checked against what is evaluated here
//! and turned into the plan's [`Node`]s, its selectors listed once for loading.

use std::time::{Duration, SystemTime};

use promql_parser::label::MatchOp;
use promql_parser::parser::token::{
    T_ADD, T_ATAN2, T_AVG, T_BOTTOMK, T_COUNT, T_COUNT_VALUES, T_DIV, T_EQLC, T_GROUP, T_GTE, T_GTR, T_LAND, T_LOR,
    T_LSS, T_LTE, T_LUNLESS, T_MAX, T_MIN, T_MOD, T_MUL, T_NEQ, T_POW, T_QUANTILE, T_STDDEV, T_STDVAR, T_SUB, T_SUM,
    T_TOPK,
};
use promql_parser::parser::{AtModifier, Expr, LabelModifier, Offset, VectorMatchCardinality};

use super::plan::{
    AbsentLabels, AggOp, At, BinOp, Card, DEFAULT_SUBQUERY_STEP_MS, FUNCTIONS, Func, Grouping, Matching, Node, Plan,
    RangeFunc, Replace, Selector, Subquery,
};
use super::{MAX_DURATION_MS, METRIC_NAME, QueryError, bounded_time};

fn unsupported(what: impl Into<String>) -> QueryError {
    QueryError::Unsupported(what.into())
}

/// Checks a parsed expression and plans it; constructs outside the supported subset are
/// refused with [`QueryError::Unsupported`] naming them.
pub fn plan(expr: &Expr) -> Result<Plan, QueryError> {
    let mut planner = Planner { selectors: Vec::new(), subqueries: 0 };
    let root = planner.node(expr)?;
    if let Node::Matrix(id) = root {
        planner.selectors[id].all_samples = true;
    }
    Ok(Plan { root, selectors: planner.selectors, subqueries: planner.subqueries })
}

struct Planner {
    selectors: Vec<Selector>,
    subqueries: usize,
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

fn offset_ms(offset: &Option<Offset>) -> Result<i64, QueryError> {
    Ok(match offset {
        None => 0,
        Some(Offset::Pos(d)) => bounded_duration("offset", d)?,
        Some(Offset::Neg(d)) => -bounded_duration("offset", d)?,
    })
}

fn at(at: &Option<AtModifier>) -> Result<Option<At>, QueryError> {
    Ok(match at {
        None => None,
        Some(AtModifier::Start) => Some(At::Start),
        Some(AtModifier::End) => Some(At::End),
        Some(AtModifier::At(t)) => {
            let ms = system_time_ms(t);
            let what = format!("@ time {}", ms as f64 / 1000.0);
            Some(At::Time(bounded_time(ms, &what).map_err(QueryError::BadData)?))
        }
    })
}

/// Whether `name` is a label name as Prometheus 2 accepts them (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What `absent(x{...})` labels its answer with: the equality matchers, a label matched
/// twice or otherwise left out (Prometheus's historic rule).
fn absent_labels(arg: &Expr) -> AbsentLabels {
    let vs = match arg {
        Expr::VectorSelector(vs) => vs,
        Expr::MatrixSelector(ms) => &ms.vs,
        _ => return AbsentLabels::default(),
    };
    let mut labels: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for m in &vs.matchers.matchers {
        if m.name == METRIC_NAME {
            continue;
        }
        if matches!(m.op, MatchOp::Equal) && !seen.contains(&m.name.as_str()) {
            labels.push((m.name.clone(), m.value.clone()));
            seen.push(&m.name);
        } else {
            labels.retain(|(k, _)| *k != m.name);
        }
    }
    labels.retain(|(_, v)| !v.is_empty());
    labels.sort();
    AbsentLabels(labels)
}

fn string_arg(node: &Node, function: &str) -> Result<String, QueryError> {
    match node {
        Node::Str(s) => Ok(s.clone()),
        _ => Err(QueryError::BadData(format!("expected a string literal argument to {function}()"))),
    }
}

impl Planner {
    fn selector(
        &mut self,
        vs: &promql_parser::parser::VectorSelector,
        range: Option<&Duration>,
    ) -> Result<usize, QueryError> {
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
            offset_ms: offset_ms(&vs.offset)?,
            at: at(&vs.at)?,
            range_ms,
            needs_previous: false,
            all_samples: false,
        });
        Ok(self.selectors.len() - 1)
    }

    /// Plans a node. Each kind of expression is planned by a function of its own, so that
    /// this one, which recurses once per level of the query, keeps a small stack frame.
    fn node(&mut self, expr: &Expr) -> Result<Node, QueryError> {
        Ok(match expr {
            Expr::NumberLiteral(n) => Node::Number(n.val),
            Expr::StringLiteral(s) => Node::Str(s.val.clone()),
            Expr::Paren(p) => self.node(&p.expr)?,
            Expr::Unary(u) => Node::Neg(Box::new(self.node(&u.expr)?)),
            Expr::VectorSelector(vs) => Node::Selector(self.selector(vs, None)?),
            Expr::MatrixSelector(ms) => Node::Matrix(self.selector(&ms.vs, Some(&ms.range))?),
            Expr::Subquery(sq) => self.subquery(sq)?,
            Expr::Extension(_) => return Err(unsupported("extension expression")),
            Expr::Aggregate(a) => self.aggregate(a)?,
            Expr::Binary(b) => self.binary(b)?,
            Expr::Call(c) => self.call(c)?,
        })
    }

    fn subquery(&mut self, sq: &promql_parser::parser::SubqueryExpr) -> Result<Node, QueryError> {
        let range_ms = bounded_duration("range", &sq.range)?;
        if range_ms == 0 {
            return Err(QueryError::BadData("subquery range must be positive".into()));
        }
        let step_ms = match &sq.step {
            Some(step) if !step.is_zero() => bounded_duration("subquery step", step)?,
            _ => DEFAULT_SUBQUERY_STEP_MS,
        };
        // A step of less than a millisecond (`[1m:0.0001]`) would be none.
        if step_ms == 0 {
            return Err(QueryError::BadData("subquery step must be at least 1ms".into()));
        }
        let id = self.subqueries;
        self.subqueries += 1;
        Ok(Node::Subquery(Box::new(Subquery {
            id,
            expr: self.node(&sq.expr)?,
            range_ms,
            step_ms,
            offset_ms: offset_ms(&sq.offset)?,
            at: at(&sq.at)?,
        })))
    }

    fn aggregate(&mut self, a: &promql_parser::parser::AggregateExpr) -> Result<Node, QueryError> {
        let op = match a.op.id() {
            T_SUM => AggOp::Sum,
            T_AVG => AggOp::Avg,
            T_MIN => AggOp::Min,
            T_MAX => AggOp::Max,
            T_COUNT => AggOp::Count,
            T_GROUP => AggOp::Group,
            T_STDDEV => AggOp::Stddev,
            T_STDVAR => AggOp::Stdvar,
            T_TOPK => AggOp::Topk,
            T_BOTTOMK => AggOp::Bottomk,
            T_QUANTILE => AggOp::Quantile,
            T_COUNT_VALUES => AggOp::CountValues,
            _ => return Err(unsupported(format!("aggregation {}", a.op))),
        };
        let param = match &a.param {
            Some(param) => Some(Box::new(self.node(param)?)),
            None => None,
        };
        if let (AggOp::CountValues, Some(param)) = (op, &param) {
            let name = string_arg(param, "count_values")?;
            if !valid_label_name(&name) {
                return Err(QueryError::Execution(format!("invalid label name {name:?}")));
            }
        }
        let grouping = match &a.modifier {
            None => Grouping::By(Vec::new()),
            Some(LabelModifier::Include(l)) => Grouping::By(l.labels.clone()),
            Some(LabelModifier::Exclude(l)) => Grouping::Without(l.labels.clone()),
        };
        Ok(Node::Aggregate { op, expr: Box::new(self.node(&a.expr)?), param, grouping })
    }

    fn binary(&mut self, b: &promql_parser::parser::BinaryExpr) -> Result<Node, QueryError> {
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
        let mut card = Card::OneToOne;
        if let Some(modifier) = &b.modifier {
            card = match &modifier.card {
                VectorMatchCardinality::ManyToOne(l) => Card::ManyToOne(l.labels.clone()),
                VectorMatchCardinality::OneToMany(l) => Card::OneToMany(l.labels.clone()),
                VectorMatchCardinality::OneToOne => Card::OneToOne,
                VectorMatchCardinality::ManyToMany => Card::ManyToMany,
            };
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
        Ok(Node::Binary {
            op,
            lhs: Box::new(self.node(&b.lhs)?),
            rhs: Box::new(self.node(&b.rhs)?),
            return_bool,
            matching,
            card,
        })
    }

    fn call(&mut self, c: &promql_parser::parser::Call) -> Result<Node, QueryError> {
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
            if let (Node::Matrix(id), Func::Range(range)) = (arg, func) {
                match range {
                    RangeFunc::Rate | RangeFunc::Increase | RangeFunc::Delta => {}
                    RangeFunc::Irate | RangeFunc::Idelta => self.selectors[*id].needs_previous = true,
                    _ => self.selectors[*id].all_samples = true,
                }
            }
        }
        match func {
            Func::LabelReplace => self.label_replace(args),
            Func::LabelJoin => {
                let mut args = args.into_iter();
                let expr =
                    Box::new(args.next().ok_or_else(|| QueryError::BadData("label_join needs a vector".into()))?);
                let strings: Vec<String> = args.map(|a| string_arg(&a, "label_join")).collect::<Result<_, _>>()?;
                let [dst, separator, sources @ ..] = strings.as_slice() else {
                    return Err(QueryError::BadData("label_join needs a destination and a separator".into()));
                };
                if !valid_label_name(dst) {
                    return Err(QueryError::Execution(format!(
                        "invalid destination label name in label_join(): {dst}"
                    )));
                }
                if let Some(bad) = sources.iter().find(|s| !valid_label_name(s)) {
                    return Err(QueryError::Execution(format!("invalid source label name in label_join(): {bad}")));
                }
                Ok(Node::LabelJoin { expr, dst: dst.clone(), separator: separator.clone(), sources: sources.to_vec() })
            }
            _ => {
                let absent = match (func, c.args.args.first()) {
                    (Func::Absent | Func::Range(RangeFunc::AbsentOverTime), Some(arg)) => absent_labels(arg),
                    _ => AbsentLabels::default(),
                };
                Ok(Node::Call { func, args, absent })
            }
        }
    }

    fn label_replace(&mut self, args: Vec<Node>) -> Result<Node, QueryError> {
        let mut args = args.into_iter();
        let expr = Box::new(args.next().ok_or_else(|| QueryError::BadData("label_replace needs a vector".into()))?);
        let strings: Vec<String> = args.map(|a| string_arg(&a, "label_replace")).collect::<Result<_, _>>()?;
        let [dst, replacement, src, regex] = strings.as_slice() else {
            return Err(QueryError::BadData("label_replace needs 5 arguments".into()));
        };
        let compiled = regex::Regex::new(&format!("^(?s:{regex})$"))
            .map_err(|_| QueryError::Execution(format!("invalid regular expression in label_replace(): {regex}")))?;
        if !valid_label_name(dst) {
            return Err(QueryError::Execution(format!("invalid destination label name in label_replace(): {dst}")));
        }
        Ok(Node::LabelReplace(
            expr,
            Box::new(Replace { dst: dst.clone(), replacement: replacement.clone(), src: src.clone(), regex: compiled }),
        ))
    }
}
