//! PromQL from a request, parsed within the shape limits that keep the parser, the planner and
//! the evaluator from recursing too deep.

use promql_parser::parser::Expr;

use super::eval;
use super::response::ApiError;

/// Functions promql-parser does not know but that queries written for Prometheus 2 use:
/// `holt_winters`, evaluated as `double_exponential_smoothing`.
fn register_legacy_functions() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use promql_parser::parser::Function;
        use promql_parser::parser::value::ValueType;
        let holt_winters = Function::new(
            "holt_winters",
            vec![ValueType::Matrix, ValueType::Scalar, ValueType::Scalar],
            0,
            ValueType::Vector,
            false,
        );
        if let Err(error) = promql_parser::parser::register_extra_functions(vec![holt_winters]) {
            tracing::debug!(%error, "holt_winters is known to promql-parser");
        }
    });
}

pub(super) fn parse_query(text: Option<&str>) -> Result<Expr, ApiError> {
    let text = text.unwrap_or("");
    if text.trim().is_empty() {
        return Err(ApiError::param("query", "query is empty"));
    }
    parse_bounded("query", text)
}

/// Parses PromQL given as `param`, within the shape limits (checked first: the parser
/// recurses once per level), as every route that takes PromQL must.
pub(super) fn parse_bounded(param: &str, text: &str) -> Result<Expr, ApiError> {
    register_legacy_functions();
    check_shape(text).map_err(|e| ApiError::param(param, e))?;
    promql_parser::parser::parse(text).map_err(|e| ApiError::param(param, e.trim()))
}

/// Longest query accepted, in bytes.
const MAX_QUERY_BYTES: usize = 16 << 10;
/// Deepest nesting of brackets, and most operators, a query may have: the parser, the planner
/// and the evaluator recurse once per level (a query of 1 000 nested parentheses overflowed a
/// 2 MiB thread stack and aborted the process), so the depth a query can reach is bounded
/// before any of them runs. Dashboards written for Prometheus stay far below.
const MAX_NESTING: usize = 64;
const MAX_OPERATORS: usize = 256;

/// Checks, without parsing, that a query is within the limits above: brackets and operators
/// are counted outside string literals (an over-count only makes the check stricter).
fn check_shape(text: &str) -> Result<(), String> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(format!("query is {} bytes long, more than the limit of {MAX_QUERY_BYTES}", text.len()));
    }
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut word = String::new();
    // Inside `[…]` (ranges, subqueries) and after `offset`, a plain number is a duration.
    let (mut ranges, mut after_offset) = (0usize, false);
    for c in text.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q != '`' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c.to_ascii_lowercase());
            continue;
        }
        operators += usize::from(matches!(word.as_str(), "and" | "or" | "unless" | "atan2"));
        if ranges > 0 || after_offset {
            check_duration_number(&word)?;
        }
        if !word.is_empty() {
            after_offset = word == "offset";
        }
        word.clear();
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
                ranges += usize::from(c == '[');
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                ranges = ranges.saturating_sub(usize::from(c == ']'));
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '=' | '!' | '<' | '>' => operators += 1,
            _ => {}
        }
    }
    operators += usize::from(matches!(word.as_str(), "and" | "or" | "unless" | "atan2"));
    if ranges > 0 || after_offset {
        check_duration_number(&word)?;
    }
    if deepest > MAX_NESTING {
        return Err(format!("query nests {deepest} brackets deep, more than the limit of {MAX_NESTING}"));
    }
    if operators > MAX_OPERATORS {
        return Err(format!("query has {operators} operators, more than the limit of {MAX_OPERATORS}"));
    }
    Ok(())
}

/// Longest duration a query may write as a plain number of seconds (about 31 700 years): the
/// longest range or offset evaluated.
const MAX_DURATION_SECONDS: f64 = (eval::MAX_DURATION_MS / 1000) as f64;

/// A plain number where PromQL reads a duration (`x[300]`, `x offset 60`) must be a finite
/// number of seconds that a duration holds: the parser panics on `NaN`, `Inf` or 1e30 there.
fn check_duration_number(word: &str) -> Result<(), String> {
    let number = match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok().map(|n| n as f64),
        None => word.parse::<f64>().ok(),
    };
    match number {
        Some(seconds) if !(0.0..=MAX_DURATION_SECONDS).contains(&seconds) => {
            Err(format!("duration {word:?} is not a number of seconds from 0 to {MAX_DURATION_SECONDS}"))
        }
        _ => Ok(()),
    }
}
