//! The condition language of `when`, and the paths of `foreach`.
//!
//! ```text
//! condition  := or
//! or         := and ("||" and)*
//! and        := unary ("&&" unary)*
//! unary      := "!" unary | "(" condition ")" | comparison
//! comparison := operand (("==" | "!=" | "<" | "<=" | ">" | ">=") operand)?
//! operand    := path | number | "string" | 'string' | true | false | null
//! path       := "$" ("." name | "[" index "]" | "[" "string" "]")*
//! ```
//!
//! A path is evaluated on the node's input (JSON); a missing path is `null`. A lone operand is
//! true unless it is `null`, `false`, `0`, `""` or an empty array or object. `<`, `>`, `<=`,
//! `>=` compare numbers with numbers and strings with strings; anything else compares false.

use serde_json::Value;

/// A parse error, with the column (1-based) where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at column {column}")]
pub struct ExprError {
    pub message: String,
    pub column: usize,
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
}

/// A JSON path such as `$.items[0].name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Path(Vec<Step>);

impl Path {
    /// Parses a whole string as a path.
    pub fn parse(text: &str) -> Result<Path, ExprError> {
        let mut parser = Parser::new(text);
        let path = parser.path()?;
        parser.skip_spaces();
        if parser.position < parser.chars.len() {
            return Err(parser.error("unexpected text after the path"));
        }
        Ok(path)
    }

    /// The value at this path, if any.
    pub fn select<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(value, |current, step| match step {
            Step::Field(name) => current.get(name),
            Step::Index(index) => current.get(index),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Path(Path),
    Literal(Value),
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Or(Box<Condition>, Box<Condition>),
    And(Box<Condition>, Box<Condition>),
    Not(Box<Condition>),
    Compare(Operand, Op, Operand),
    Truthy(Operand),
}

impl Condition {
    pub fn parse(text: &str) -> Result<Condition, ExprError> {
        let mut parser = Parser::new(text);
        let condition = parser.or()?;
        parser.skip_spaces();
        if parser.position < parser.chars.len() {
            return Err(parser.error("unexpected text"));
        }
        Ok(condition)
    }

    /// Evaluates the condition on a node's input.
    pub fn eval(&self, input: &Value) -> bool {
        match self {
            Condition::Or(a, b) => a.eval(input) || b.eval(input),
            Condition::And(a, b) => a.eval(input) && b.eval(input),
            Condition::Not(a) => !a.eval(input),
            Condition::Truthy(operand) => truthy(&resolve(operand, input)),
            Condition::Compare(left, op, right) => compare(&resolve(left, input), *op, &resolve(right, input)),
        }
    }
}

fn resolve(operand: &Operand, input: &Value) -> Value {
    match operand {
        Operand::Literal(value) => value.clone(),
        Operand::Path(path) => path.select(input).cloned().unwrap_or(Value::Null),
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn compare(left: &Value, op: Op, right: &Value) -> bool {
    let ordering = match (left, right) {
        (Value::Number(a), Value::Number(b)) => a.as_f64().zip(b.as_f64()).and_then(|(a, b)| a.partial_cmp(&b)),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    };
    match op {
        Op::Eq => ordering.map_or(left == right, |o| o.is_eq()),
        Op::Ne => ordering.map_or(left != right, |o| o.is_ne()),
        Op::Lt => ordering.is_some_and(|o| o.is_lt()),
        Op::Le => ordering.is_some_and(|o| o.is_le()),
        Op::Gt => ordering.is_some_and(|o| o.is_gt()),
        Op::Ge => ordering.is_some_and(|o| o.is_ge()),
    }
}

/// Deepest nesting of `!` and parentheses: the parser and the evaluator recurse once a level.
pub const MAX_NESTING: usize = 64;

struct Parser {
    chars: Vec<char>,
    position: usize,
    depth: usize,
}

impl Parser {
    fn new(text: &str) -> Self {
        Self { chars: text.chars().collect(), position: 0, depth: 0 }
    }

    fn error(&self, message: &str) -> ExprError {
        let found = self.chars.get(self.position).map_or("the end".to_string(), |c| format!("{c:?}"));
        ExprError { message: format!("{message} (found {found})"), column: self.position + 1 }
    }

    fn skip_spaces(&mut self) {
        while self.chars.get(self.position).is_some_and(|c| c.is_whitespace()) {
            self.position += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_spaces();
        let token: Vec<char> = token.chars().collect();
        if self.chars[self.position..].starts_with(&token) {
            self.position += token.len();
            return true;
        }
        false
    }

    fn or(&mut self) -> Result<Condition, ExprError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Condition::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Condition, ExprError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Condition::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Condition, ExprError> {
        self.skip_spaces();
        if self.chars.get(self.position) == Some(&'!') && self.chars.get(self.position + 1) != Some(&'=') {
            self.position += 1;
            self.nest()?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Condition::Not(Box::new(inner)));
        }
        if self.eat("(") {
            self.nest()?;
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err(self.error("expected ')'"));
            }
            return Ok(inner);
        }
        let left = self.operand()?;
        let op = [("==", Op::Eq), ("!=", Op::Ne), ("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)]
            .into_iter()
            .find(|(token, _)| self.eat(token))
            .map(|(_, op)| op);
        match op {
            Some(op) => Ok(Condition::Compare(left, op, self.operand()?)),
            None => Ok(Condition::Truthy(left)),
        }
    }

    /// One level deeper, refused past [`MAX_NESTING`] (the caller steps back out).
    fn nest(&mut self) -> Result<(), ExprError> {
        if self.depth >= MAX_NESTING {
            return Err(self.error(&format!("nested deeper than {MAX_NESTING} levels of '!' and '('")));
        }
        self.depth += 1;
        Ok(())
    }

    fn operand(&mut self) -> Result<Operand, ExprError> {
        self.skip_spaces();
        match self.chars.get(self.position) {
            Some('$') => Ok(Operand::Path(self.path()?)),
            Some('"') | Some('\'') => Ok(Operand::Literal(Value::String(self.string()?))),
            Some(c) if c.is_ascii_digit() || *c == '-' => self.number().map(Operand::Literal),
            _ => {
                for (word, value) in [("true", Value::Bool(true)), ("false", Value::Bool(false)), ("null", Value::Null)]
                {
                    if self.eat(word) {
                        return Ok(Operand::Literal(value));
                    }
                }
                Err(self.error("expected a path ($...), a number, a string, true, false or null"))
            }
        }
    }

    fn path(&mut self) -> Result<Path, ExprError> {
        self.skip_spaces();
        if self.chars.get(self.position) != Some(&'$') {
            return Err(self.error("a path starts with '$'"));
        }
        self.position += 1;
        let mut steps = Vec::new();
        loop {
            match self.chars.get(self.position) {
                Some('.') => {
                    self.position += 1;
                    let start = self.position;
                    while self.chars.get(self.position).is_some_and(|c| c.is_alphanumeric() || *c == '_' || *c == '-') {
                        self.position += 1;
                    }
                    if start == self.position {
                        return Err(self.error("expected a field name after '.'"));
                    }
                    steps.push(Step::Field(self.chars[start..self.position].iter().collect()));
                }
                Some('[') => {
                    self.position += 1;
                    let step = match self.chars.get(self.position) {
                        Some('"') | Some('\'') => Step::Field(self.string()?),
                        _ => {
                            let start = self.position;
                            while self.chars.get(self.position).is_some_and(|c| c.is_ascii_digit()) {
                                self.position += 1;
                            }
                            let digits: String = self.chars[start..self.position].iter().collect();
                            Step::Index(digits.parse().map_err(|_| self.error("expected an index or a quoted name"))?)
                        }
                    };
                    if self.chars.get(self.position) != Some(&']') {
                        return Err(self.error("expected ']'"));
                    }
                    self.position += 1;
                    steps.push(step);
                }
                _ => return Ok(Path(steps)),
            }
        }
    }

    fn string(&mut self) -> Result<String, ExprError> {
        let quote = self.chars[self.position];
        let start = self.position;
        self.position += 1;
        let mut text = String::new();
        while let Some(&c) = self.chars.get(self.position) {
            self.position += 1;
            if c == quote {
                return Ok(text);
            }
            text.push(c);
        }
        self.position = start;
        Err(self.error("unterminated string"))
    }

    fn number(&mut self) -> Result<Value, ExprError> {
        let start = self.position;
        while self
            .chars
            .get(self.position)
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | 'e' | 'E' | '+'))
        {
            self.position += 1;
        }
        let text: String = self.chars[start..self.position].iter().collect();
        let number: f64 = text.parse().map_err(|_| {
            self.position = start;
            self.error("bad number")
        })?;
        Ok(serde_json::Number::from_f64(number).map_or(Value::Null, Value::Number))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_evaluate_on_json() {
        let input = json!({"count": 3, "kind": "trip", "items": [1, 2], "flag": false, "nested": {"a-b": 1}});
        let eval = |text: &str| Condition::parse(text).unwrap().eval(&input);
        assert!(eval("$.count > 2"));
        assert!(eval("$.count == 3 && $.kind == 'trip'"));
        assert!(eval("$.missing == null"));
        assert!(eval("!$.flag"));
        assert!(eval("$.items"));
        assert!(eval("$.items[1] >= 2"));
        assert!(eval("$.nested['a-b'] == 1 && $.nested.a-b == 1"));
        assert!(eval("($.count < 1 || $.kind != \"log\") && true"));
        assert!(!eval("$.kind > 3"), "no ordering between a string and a number");
        assert!(!eval("$.missing"));
        assert!(eval("$.count != 4"));
    }

    #[test]
    fn errors_name_the_column() {
        let error = Condition::parse("$.count >").unwrap_err();
        assert_eq!(error.column, 10);
        assert!(error.message.contains("expected a path"));
        assert_eq!(Condition::parse("$.a == 1 )").unwrap_err().column, 10);
        assert_eq!(Condition::parse("count > 1").unwrap_err().column, 1);
        assert!(Condition::parse("$.a == 'open").unwrap_err().message.contains("unterminated"));
        assert!(Path::parse("$.items").is_ok());
        assert!(Path::parse("$.items x").is_err());
        assert!(Path::parse("items").is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |levels: usize| format!("{}$.a{}", "(!".repeat(levels / 2), ")".repeat(levels / 2));
        assert!(Condition::parse(&deep(MAX_NESTING)).is_ok());
        let error = Condition::parse(&deep(MAX_NESTING + 2)).unwrap_err();
        assert!(error.message.contains("nested deeper than 64"), "{error}");
        assert!(Condition::parse(&"!".repeat(100_000)).unwrap_err().message.contains("nested deeper"));
    }

    #[test]
    fn paths_select_values() {
        let input = json!({"a": [{"b": "x"}]});
        assert_eq!(Path::parse("$.a[0].b").unwrap().select(&input), Some(&json!("x")));
        assert_eq!(Path::parse("$").unwrap().select(&input), Some(&input));
        assert_eq!(Path::parse("$.a[3]").unwrap().select(&input), None);
    }
}
