//! LogQL, parsed: stream selectors, line filters, the `json` and `logfmt` parsers, label
//! filters, `line_format`, `drop` and `keep`, and the metric queries over them
//! (`count_over_time`, `rate`, `bytes_over_time`, `bytes_rate`, and `sum`/`avg`/`min`/`max`/
//! `count` with `by`/`without`). Errors are Loki's: `parse error at line 1, col N: ...`.

use regex::Regex;

/// The longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 16 * 1024;
/// The most stages, filters and nested aggregations a query may have.
const MAX_PARTS: usize = 256;

#[derive(Debug, Clone)]
pub enum Query {
    Log(LogExpr),
    Metric(MetricExpr),
}

#[derive(Debug, Clone)]
pub struct LogExpr {
    pub selector: Vec<Matcher>,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
    /// For `=~` and `!~`: the value, anchored at both ends.
    regex: Option<Regex>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Eq,
    Ne,
    Re,
    Nre,
}

impl Matcher {
    fn new(name: String, op: MatchOp, value: String) -> Result<Self, String> {
        let regex = match op {
            MatchOp::Re | MatchOp::Nre => Some(
                Regex::new(&format!("^(?s:{value})$"))
                    .map_err(|e| format!("invalid regular expression {value:?}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Self { name, op, value, regex })
    }

    /// Whether a label's value (`""` when the label is absent) matches.
    pub fn matches(&self, value: &str) -> bool {
        match self.op {
            MatchOp::Eq => value == self.value,
            MatchOp::Ne => value != self.value,
            MatchOp::Re => self.regex.as_ref().is_some_and(|r| r.is_match(value)),
            MatchOp::Nre => !self.regex.as_ref().is_some_and(|r| r.is_match(value)),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Stage {
    /// `|= "a"`, `!= "a"`, `|~ "re"`, `!~ "re"`, with `or` alternatives.
    Line(LineFilter),
    Json,
    Logfmt,
    Labels(LabelFilter),
    LineFormat(Vec<TemplatePart>),
    /// `drop a, b="v"` (a label, or a label when it has that value).
    Drop(Vec<(String, Option<String>)>),
    Keep(Vec<(String, Option<String>)>),
}

#[derive(Debug, Clone)]
pub struct LineFilter {
    /// `!=` and `!~`: lines that match none of the patterns.
    pub negate: bool,
    pub patterns: Vec<LinePattern>,
}

#[derive(Debug, Clone)]
pub enum LinePattern {
    Contains(String),
    /// Unanchored, as Loki's line regexes.
    Regex(Regex),
}

impl LineFilter {
    pub fn keeps(&self, line: &str) -> bool {
        let any = self.patterns.iter().any(|p| match p {
            LinePattern::Contains(text) => line.contains(text.as_str()),
            LinePattern::Regex(regex) => regex.is_match(line),
        });
        any != self.negate
    }
}

#[derive(Debug, Clone)]
pub enum LabelFilter {
    And(Box<LabelFilter>, Box<LabelFilter>),
    Or(Box<LabelFilter>, Box<LabelFilter>),
    Text(Matcher),
    /// `label op number` (a duration or a byte size is its number of seconds or bytes).
    Number {
        name: String,
        op: Cmp,
        value: f64,
        unit: Unit,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Cmp {
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
        }
    }
}

/// How a label's value is read as a number for a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Number,
    /// A duration (`250ms`, `1.5s`): seconds.
    Duration,
    /// A byte size (`20MB`, `1KiB`): bytes.
    Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TemplatePart {
    Text(String),
    /// `{{.name}}`
    Label(String),
    /// `{{__line__}}`
    Line,
    /// `{{__timestamp__}}`
    Timestamp,
}

#[derive(Debug, Clone)]
pub enum MetricExpr {
    Range {
        func: RangeFunc,
        log: LogExpr,
        range_ns: i64,
    },
    Aggregate {
        op: AggOp,
        grouping: Option<Grouping>,
        inner: Box<MetricExpr>,
    },
    /// `vector(1)`: one series without labels, at every step.
    Vector(f64),
    Number(f64),
    /// `a + b`, `a - b`, `a * b`, `a / b`, `a % b` (series matched on all their labels).
    Binary {
        op: BinOp,
        lhs: Box<MetricExpr>,
        rhs: Box<MetricExpr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

impl BinOp {
    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Mod => a % b,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeFunc {
    CountOverTime,
    Rate,
    BytesOverTime,
    BytesRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouping {
    pub without: bool,
    pub labels: Vec<String>,
}

impl MetricExpr {
    /// The log queries under the metric query.
    pub fn logs(&self) -> Vec<&LogExpr> {
        match self {
            MetricExpr::Range { log, .. } => vec![log],
            MetricExpr::Aggregate { inner, .. } => inner.logs(),
            MetricExpr::Vector(_) | MetricExpr::Number(_) => Vec::new(),
            MetricExpr::Binary { lhs, rhs, .. } => [lhs.logs(), rhs.logs()].concat(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    /// A number, a duration or a byte size as written.
    Word(String),
    /// `[5m]`'s duration.
    Range(String),
    Sym(&'static str),
}

const SYMBOLS: [&str; 23] = [
    "|=", "|~", "!=", "!~", "=~", "==", ">=", "<=", "{", "}", "(", ")", ",", "|", "=", ">", "<", "!", "+", "-", "*",
    "/", "%",
];

struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl Lexer<'_> {
    fn error(&self, at: usize, message: impl std::fmt::Display) -> String {
        let col = self.text[..at.min(self.text.len())].chars().count() + 1;
        format!("parse error at line 1, col {col}: {message}")
    }

    fn tokens(mut self) -> Result<Vec<(usize, Token)>, String> {
        let mut out = Vec::new();
        let bytes = self.text.as_bytes();
        while self.at < bytes.len() {
            let c = bytes[self.at];
            let start = self.at;
            if c.is_ascii_whitespace() {
                self.at += 1;
                continue;
            }
            if c == b'#' {
                // A comment, to the end of the line.
                while self.at < bytes.len() && bytes[self.at] != b'\n' {
                    self.at += 1;
                }
                continue;
            }
            if c == b'"' || c == b'`' {
                out.push((start, Token::Str(self.string()?)));
                continue;
            }
            if c == b'[' {
                let end = self.text[start..].find(']').ok_or_else(|| self.error(start, "syntax error: unclosed ["))?;
                out.push((start, Token::Range(self.text[start + 1..start + end].trim().to_string())));
                self.at = start + end + 1;
                continue;
            }
            if c.is_ascii_alphabetic() || c == b'_' {
                while self.at < bytes.len() && (bytes[self.at].is_ascii_alphanumeric() || bytes[self.at] == b'_') {
                    self.at += 1;
                }
                out.push((start, Token::Ident(self.text[start..self.at].to_string())));
                continue;
            }
            if c.is_ascii_digit() || c == b'.' {
                self.at += 1;
                while self.at < bytes.len() && (bytes[self.at].is_ascii_alphanumeric() || bytes[self.at] == b'.') {
                    self.at += 1;
                }
                out.push((start, Token::Word(self.text[start..self.at].to_string())));
                continue;
            }
            match SYMBOLS.iter().find(|s| self.text[start..].starts_with(**s)) {
                Some(symbol) => {
                    self.at += symbol.len();
                    out.push((start, Token::Sym(symbol)));
                }
                None => {
                    let ch = self.text[start..].chars().next().unwrap_or(' ');
                    return Err(self.error(start, format!("syntax error: unexpected character {ch:?}")));
                }
            }
        }
        Ok(out)
    }

    /// A `"..."` string (Go's escapes) or a `` `...` `` raw string.
    fn string(&mut self) -> Result<String, String> {
        let start = self.at;
        let quote = self.text.as_bytes()[start];
        let mut out = String::new();
        let mut chars = self.text[start + 1..].char_indices();
        while let Some((i, ch)) = chars.next() {
            if ch as u32 == quote as u32 {
                self.at = start + 1 + i + 1;
                return Ok(out);
            }
            if ch != '\\' || quote == b'`' {
                out.push(ch);
                continue;
            }
            let Some((_, escaped)) = chars.next() else { break };
            out.push(match escaped {
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                '\\' => '\\',
                '"' => '"',
                '\'' => '\'',
                '0' => '\0',
                'u' => {
                    let hex: String = (0..4).filter_map(|_| chars.next().map(|(_, c)| c)).collect();
                    u32::from_str_radix(&hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| self.error(start, "invalid \\u escape"))?
                }
                other => return Err(self.error(start, format!("unknown escape sequence \\{other}"))),
            });
        }
        Err(self.error(start, "syntax error: unterminated string"))
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Parses a LogQL query.
pub fn parse(text: &str) -> Result<Query, String> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(format!("query too long: {} bytes (at most {MAX_QUERY_BYTES})", text.len()));
    }
    let lexer = Lexer { text, at: 0 };
    let tokens = lexer.tokens()?;
    let mut parser = Parser { text, tokens, at: 0, parts: 0 };
    let query = if parser.peek_sym("{") { Query::Log(parser.log_expr()?) } else { Query::Metric(parser.metric()?) };
    if let Some((at, token)) = parser.tokens.get(parser.at) {
        return Err(parser.error_at(*at, format!("syntax error: unexpected {}", describe(token))));
    }
    Ok(query)
}

fn describe(token: &Token) -> String {
    match token {
        Token::Ident(s) | Token::Word(s) => s.clone(),
        Token::Str(s) => format!("{s:?}"),
        Token::Range(s) => format!("[{s}]"),
        Token::Sym(s) => (*s).to_string(),
    }
}

struct Parser<'a> {
    text: &'a str,
    tokens: Vec<(usize, Token)>,
    at: usize,
    parts: usize,
}

impl Parser<'_> {
    fn error_at(&self, at: usize, message: impl std::fmt::Display) -> String {
        Lexer { text: self.text, at }.error(at, message)
    }

    fn error(&self, message: impl std::fmt::Display) -> String {
        match self.tokens.get(self.at) {
            Some((at, token)) => self.error_at(*at, format!("{message}, got {}", describe(token))),
            None => self.error_at(self.text.len(), format!("{message}, got end of query")),
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn peek_sym(&self, symbol: &str) -> bool {
        matches!(self.peek(), Some(Token::Sym(s)) if *s == symbol)
    }

    fn peek_ident(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Ident(s)) if s == word)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).map(|(_, t)| t.clone());
        self.at += 1;
        token
    }

    fn expect_sym(&mut self, symbol: &str) -> Result<(), String> {
        if self.peek_sym(symbol) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.error(format!("syntax error: expected {symbol}")))
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(Token::Ident(name)) => {
                let name = name.clone();
                self.at += 1;
                Ok(name)
            }
            _ => Err(self.error("syntax error: expected a label name")),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(Token::Str(text)) => {
                let text = text.clone();
                self.at += 1;
                Ok(text)
            }
            _ => Err(self.error("syntax error: expected a string")),
        }
    }

    fn count_part(&mut self) -> Result<(), String> {
        self.parts += 1;
        if self.parts > MAX_PARTS {
            return Err(self.error(format!("query too complex: more than {MAX_PARTS} parts")));
        }
        Ok(())
    }

    fn log_expr(&mut self) -> Result<LogExpr, String> {
        let selector = self.selector()?;
        let stages = self.stages()?;
        Ok(LogExpr { selector, stages })
    }

    fn selector(&mut self) -> Result<Vec<Matcher>, String> {
        let open = self.tokens.get(self.at).map_or(self.text.len(), |(at, _)| *at);
        self.expect_sym("{")?;
        let mut matchers = Vec::new();
        while !self.peek_sym("}") {
            if !matchers.is_empty() {
                self.expect_sym(",")?;
            }
            self.count_part()?;
            let name = self.ident()?;
            let op = match self.next() {
                Some(Token::Sym("=")) => MatchOp::Eq,
                Some(Token::Sym("!=")) => MatchOp::Ne,
                Some(Token::Sym("=~")) => MatchOp::Re,
                Some(Token::Sym("!~")) => MatchOp::Nre,
                _ => {
                    self.at -= 1;
                    return Err(self.error("syntax error: expected =, !=, =~ or !~"));
                }
            };
            let value = self.string()?;
            matchers.push(Matcher::new(name, op, value).map_err(|e| self.error_at(open, e))?);
        }
        self.expect_sym("}")?;
        // As Loki: a selector must narrow the streams down.
        if !matchers.iter().any(|m| !m.matches("")) {
            return Err(self.error_at(
                open,
                "queries require at least one regexp or equality matcher that does not have an empty-compatible \
                 value. For instance, app=~\".*\" does not meet this requirement, but app=~\".+\" will",
            ));
        }
        Ok(matchers)
    }

    fn stages(&mut self) -> Result<Vec<Stage>, String> {
        let mut stages = Vec::new();
        loop {
            let negate = match self.peek() {
                Some(Token::Sym("|=" | "|~")) => false,
                Some(Token::Sym("!=" | "!~")) => true,
                Some(Token::Sym("|")) => {
                    self.at += 1;
                    self.count_part()?;
                    stages.push(self.stage()?);
                    continue;
                }
                _ => return Ok(stages),
            };
            self.count_part()?;
            let regex = matches!(self.peek(), Some(Token::Sym("|~" | "!~")));
            self.at += 1;
            let mut patterns = Vec::new();
            loop {
                let at = self.tokens.get(self.at).map_or(0, |(at, _)| *at);
                let text = self.string()?;
                patterns.push(if regex {
                    LinePattern::Regex(Regex::new(&text).map_err(|e| self.error_at(at, format!("invalid regex: {e}")))?)
                } else {
                    LinePattern::Contains(text)
                });
                if !self.peek_ident("or") {
                    break;
                }
                self.at += 1;
            }
            stages.push(Stage::Line(LineFilter { negate, patterns }));
        }
    }

    fn stage(&mut self) -> Result<Stage, String> {
        let Some(Token::Ident(word)) = self.peek().cloned() else {
            return Err(self.error("syntax error: expected a parser, a label filter or a formatting stage"));
        };
        // A label filter starts with a label name and a comparison.
        if matches!(self.tokens.get(self.at + 1).map(|(_, t)| t), Some(Token::Sym(s)) if ["=", "!=", "=~", "!~", "==", ">", ">=", "<", "<="].contains(s))
        {
            return Ok(Stage::Labels(self.label_filter_or()?));
        }
        self.at += 1;
        match word.as_str() {
            "json" if !self.peek_has_params() => Ok(Stage::Json),
            "logfmt" if !self.peek_has_params() => Ok(Stage::Logfmt),
            "line_format" => {
                let at = self.tokens.get(self.at).map_or(0, |(at, _)| *at);
                let template = self.string()?;
                Ok(Stage::LineFormat(parse_template(&template).map_err(|e| self.error_at(at, e))?))
            }
            "drop" => Ok(Stage::Drop(self.label_list()?)),
            "keep" => Ok(Stage::Keep(self.label_list()?)),
            "json" | "logfmt" | "regexp" | "pattern" | "unpack" | "label_format" | "decolorize" | "unwrap" => {
                self.at -= 1;
                Err(self.error(format!("unsupported LogQL: {word} stage (or its parameters)")))
            }
            _ => {
                self.at -= 1;
                Err(self.error("syntax error: unexpected stage"))
            }
        }
    }

    /// Whether a parser is followed by parameters (`json a="b"`, `logfmt --strict`).
    fn peek_has_params(&self) -> bool {
        matches!(self.peek(), Some(Token::Ident(_) | Token::Sym("!")))
            || matches!(self.peek(), Some(Token::Word(w)) if w.starts_with('-'))
    }

    fn label_list(&mut self) -> Result<Vec<(String, Option<String>)>, String> {
        let mut out = Vec::new();
        loop {
            let name = self.ident()?;
            let value = if self.peek_sym("=") {
                self.at += 1;
                Some(self.string()?)
            } else {
                None
            };
            out.push((name, value));
            if !self.peek_sym(",") {
                return Ok(out);
            }
            self.at += 1;
        }
    }

    fn label_filter_or(&mut self) -> Result<LabelFilter, String> {
        let mut left = self.label_filter_and()?;
        while self.peek_ident("or") {
            self.at += 1;
            self.count_part()?;
            left = LabelFilter::Or(Box::new(left), Box::new(self.label_filter_and()?));
        }
        Ok(left)
    }

    fn label_filter_and(&mut self) -> Result<LabelFilter, String> {
        let mut left = self.label_filter_one()?;
        while self.peek_ident("and") || self.peek_sym(",") {
            self.at += 1;
            self.count_part()?;
            left = LabelFilter::And(Box::new(left), Box::new(self.label_filter_one()?));
        }
        Ok(left)
    }

    fn label_filter_one(&mut self) -> Result<LabelFilter, String> {
        if self.peek_sym("(") {
            self.at += 1;
            let inner = self.label_filter_or()?;
            self.expect_sym(")")?;
            return Ok(inner);
        }
        let name = self.ident()?;
        let op = self.next();
        let value_at = self.tokens.get(self.at).map_or(0, |(at, _)| *at);
        let text_op = match op {
            Some(Token::Sym("=")) => Some(MatchOp::Eq),
            Some(Token::Sym("=~")) => Some(MatchOp::Re),
            Some(Token::Sym("!~")) => Some(MatchOp::Nre),
            Some(Token::Sym("!=")) if matches!(self.peek(), Some(Token::Str(_))) => Some(MatchOp::Ne),
            _ => None,
        };
        if let Some(op) = text_op {
            let value = self.string()?;
            return Matcher::new(name, op, value).map(LabelFilter::Text).map_err(|e| self.error_at(value_at, e));
        }
        let cmp = match op {
            Some(Token::Sym("==")) => Cmp::Eq,
            Some(Token::Sym("!=")) => Cmp::Ne,
            Some(Token::Sym(">")) => Cmp::Gt,
            Some(Token::Sym(">=")) => Cmp::Ge,
            Some(Token::Sym("<")) => Cmp::Lt,
            Some(Token::Sym("<=")) => Cmp::Le,
            _ => {
                self.at -= 1;
                return Err(self.error("syntax error: expected a comparison"));
            }
        };
        let negative = self.peek_sym("-");
        if negative {
            self.at += 1;
        }
        let Some(Token::Word(word)) = self.next() else {
            self.at -= 1;
            return Err(self.error("syntax error: expected a number, a duration or a byte size"));
        };
        let (value, unit) =
            number_of(&word).ok_or_else(|| self.error_at(value_at, format!("invalid number {word:?}")))?;
        let value = if negative { -value } else { value };
        Ok(LabelFilter::Number { name, op: cmp, value, unit })
    }

    /// A metric query: terms joined by `+` and `-`, of factors joined by `*`, `/` and `%`.
    fn metric(&mut self) -> Result<MetricExpr, String> {
        let mut lhs = self.product()?;
        loop {
            let op = match self.peek() {
                Some(Token::Sym("+")) => BinOp::Add,
                Some(Token::Sym("-")) => BinOp::Sub,
                _ => return Ok(lhs),
            };
            self.at += 1;
            self.count_part()?;
            lhs = MetricExpr::Binary { op, lhs: Box::new(lhs), rhs: Box::new(self.product()?) };
        }
    }

    fn product(&mut self) -> Result<MetricExpr, String> {
        let mut lhs = self.factor()?;
        loop {
            let op = match self.peek() {
                Some(Token::Sym("*")) => BinOp::Mul,
                Some(Token::Sym("/")) => BinOp::Div,
                Some(Token::Sym("%")) => BinOp::Mod,
                _ => return Ok(lhs),
            };
            self.at += 1;
            self.count_part()?;
            lhs = MetricExpr::Binary { op, lhs: Box::new(lhs), rhs: Box::new(self.factor()?) };
        }
    }

    fn literal(&mut self) -> Result<f64, String> {
        let negative = self.peek_sym("-");
        if negative {
            self.at += 1;
        }
        match self.next() {
            Some(Token::Word(word)) => match word.parse::<f64>() {
                Ok(n) => Ok(if negative { -n } else { n }),
                Err(_) => {
                    self.at -= 1;
                    Err(self.error("syntax error: expected a number"))
                }
            },
            _ => {
                self.at -= 1;
                Err(self.error("syntax error: expected a number"))
            }
        }
    }

    fn factor(&mut self) -> Result<MetricExpr, String> {
        self.count_part()?;
        if matches!(self.peek(), Some(Token::Word(_)) | Some(Token::Sym("-"))) {
            return Ok(MetricExpr::Number(self.literal()?));
        }
        if self.peek_ident("vector") {
            self.at += 1;
            self.expect_sym("(")?;
            let value = self.literal()?;
            self.expect_sym(")")?;
            return Ok(MetricExpr::Vector(value));
        }
        if self.peek_sym("(") {
            self.at += 1;
            let inner = self.metric()?;
            self.expect_sym(")")?;
            return Ok(inner);
        }
        let name =
            self.ident().map_err(|_| self.error("syntax error: expected a stream selector or a metric query"))?;
        let func = match name.as_str() {
            "count_over_time" => Some(RangeFunc::CountOverTime),
            "rate" => Some(RangeFunc::Rate),
            "bytes_over_time" => Some(RangeFunc::BytesOverTime),
            "bytes_rate" => Some(RangeFunc::BytesRate),
            _ => None,
        };
        if let Some(func) = func {
            self.expect_sym("(")?;
            let selector = self.selector()?;
            let mut stages = self.stages()?;
            let Some(Token::Range(range)) = self.next() else {
                self.at -= 1;
                return Err(self.error("syntax error: expected a range [duration]"));
            };
            let range_ns = parse_duration_ns(&range)
                .filter(|ns| *ns > 0)
                .ok_or_else(|| self.error(format!("invalid range [{range}]")))?;
            // Stages may also follow the range: `count_over_time({a="b"}[5m] |= "x")`.
            stages.extend(self.stages()?);
            if self.peek_ident("offset") {
                return Err(self.error("unsupported LogQL: offset"));
            }
            self.expect_sym(")")?;
            return Ok(MetricExpr::Range { func, log: LogExpr { selector, stages }, range_ns });
        }
        let op = match name.as_str() {
            "sum" => AggOp::Sum,
            "avg" => AggOp::Avg,
            "min" => AggOp::Min,
            "max" => AggOp::Max,
            "count" => AggOp::Count,
            "topk" | "bottomk" | "stddev" | "stdvar" | "sort" | "sort_desc" | "absent_over_time" | "avg_over_time"
            | "sum_over_time" | "min_over_time" | "max_over_time" | "quantile_over_time" | "first_over_time"
            | "last_over_time" | "stddev_over_time" | "stdvar_over_time" | "label_replace" => {
                self.at -= 1;
                return Err(self.error(format!("unsupported LogQL: {name}")));
            }
            _ => {
                self.at -= 1;
                return Err(self.error("syntax error: unexpected identifier"));
            }
        };
        let mut grouping = self.grouping()?;
        self.expect_sym("(")?;
        let inner = self.metric()?;
        self.expect_sym(")")?;
        if grouping.is_none() {
            grouping = self.grouping()?;
        }
        Ok(MetricExpr::Aggregate { op, grouping, inner: Box::new(inner) })
    }

    fn grouping(&mut self) -> Result<Option<Grouping>, String> {
        let without = match self.peek() {
            Some(Token::Ident(w)) if w == "by" => false,
            Some(Token::Ident(w)) if w == "without" => true,
            _ => return Ok(None),
        };
        self.at += 1;
        self.expect_sym("(")?;
        let mut labels = Vec::new();
        while !self.peek_sym(")") {
            if !labels.is_empty() {
                self.expect_sym(",")?;
            }
            labels.push(self.ident()?);
        }
        self.expect_sym(")")?;
        Ok(Some(Grouping { without, labels }))
    }
}

/// `line_format`'s template: `{{.label}}`, `{{ .label }}`, `{{__line__}}`,
/// `{{__timestamp__}}` and text; Go template functions and pipelines are refused.
fn parse_template(template: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(TemplatePart::Text(rest[..open].to_string()));
        }
        let close = rest[open..].find("}}").ok_or("template: unclosed action")? + open;
        let action = rest[open + 2..close].trim_matches('-').trim();
        parts.push(match action {
            "__line__" => TemplatePart::Line,
            "__timestamp__" => TemplatePart::Timestamp,
            _ => match action.strip_prefix('.') {
                Some(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                    TemplatePart::Label(name.to_string())
                }
                _ => return Err(format!("unsupported LogQL: line_format action {{{{{action}}}}}")),
            },
        });
        rest = &rest[close + 2..];
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Text(rest.to_string()));
    }
    Ok(parts)
}

/// A Prometheus/Go duration (`5m`, `1h30m`, `250ms`, `1.5s`) in nanoseconds.
pub fn parse_duration_ns(text: &str) -> Option<i64> {
    seconds_of_duration(text).map(|s| (s * 1e9).round()).filter(|ns| ns.abs() < 9.2e18).map(|ns| ns as i64)
}

fn seconds_of_duration(text: &str) -> Option<f64> {
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').filter(|n| *n > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 604_800.0,
            "y" => 31_536_000.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit..];
    }
    Some(if negative { -total } else { total })
}

/// A byte size (`20MB`, `1KiB`, `512B`) in bytes.
fn bytes_of(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let number: f64 = text[..split].parse().ok()?;
    let scale = match text[split..].to_ascii_uppercase().as_str() {
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some(number * scale)
}

/// A label filter's operand: a number, a duration (seconds) or a byte size (bytes).
fn number_of(word: &str) -> Option<(f64, Unit)> {
    if let Ok(n) = word.parse::<f64>() {
        return Some((n, Unit::Number));
    }
    if let Some(seconds) = seconds_of_duration(word) {
        return Some((seconds, Unit::Duration));
    }
    bytes_of(word).map(|b| (b, Unit::Bytes))
}

/// A label's value read as `unit`, for a numeric label filter.
pub fn value_as(text: &str, unit: Unit) -> Option<f64> {
    match unit {
        Unit::Number => text.trim().parse().ok(),
        Unit::Duration => seconds_of_duration(text.trim()),
        Unit::Bytes => bytes_of(text.trim()).or_else(|| text.trim().parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(text: &str) -> LogExpr {
        match parse(text).unwrap() {
            Query::Log(log) => log,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn selectors_filters_and_stages_parse() {
        let q = log(
            r#"{function="resize", level=~"warn|error"} |= "timeout" or "refused" != `debug` |~ "(?i)fail" | json | status >= 500 and path=~"/api/.*" | line_format "{{.status}} {{ .path }}" | drop __error__, x="1""#,
        );
        assert_eq!(q.selector.len(), 2);
        assert!(q.selector[1].matches("warn") && !q.selector[1].matches("warning"));
        assert_eq!(q.stages.len(), 7, "{:?}", q.stages);
        match &q.stages[0] {
            Stage::Line(f) => assert!(f.keeps("a timeout") && f.keeps("refused") && !f.keeps("ok")),
            other => panic!("{other:?}"),
        }
        match &q.stages[1] {
            Stage::Line(f) => assert!(f.negate && !f.keeps("a debug line")),
            other => panic!("{other:?}"),
        }
        match &q.stages[5] {
            Stage::LineFormat(parts) => assert_eq!(
                parts,
                &[
                    TemplatePart::Label("status".into()),
                    TemplatePart::Text(" ".into()),
                    TemplatePart::Label("path".into())
                ]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metric_queries_parse_with_grouping_before_or_after() {
        for text in [
            r#"sum by (level) (count_over_time({source="function"} | drop __error__ [1m]))"#,
            r#"sum(rate({function="a"} |= "x" [5m])) by (function)"#,
            r#"count_over_time({function="a"}[5m] |= "x")"#,
            r#"max without (instance) (bytes_over_time({function="a"} | logfmt | level="error" [1h]))"#,
        ] {
            assert!(matches!(parse(text), Ok(Query::Metric(_))), "{text}: {:?}", parse(text));
        }
        let Ok(Query::Metric(MetricExpr::Aggregate { inner, .. })) = parse(r#"sum by (level) (rate({a="b"}[90s]))"#)
        else {
            panic!()
        };
        assert!(matches!(*inner, MetricExpr::Range { range_ns: 90_000_000_000, .. }));
        let Ok(Query::Metric(MetricExpr::Binary { op: BinOp::Add, rhs, .. })) = parse("vector(1)+vector(1) * 2") else {
            panic!()
        };
        assert!(matches!(*rhs, MetricExpr::Binary { op: BinOp::Mul, .. }));
    }

    #[test]
    fn errors_name_the_place_and_what_is_unsupported() {
        for (text, want) in [
            (r#"{a=~".*"}"#, "empty-compatible"),
            (r#"{a="b"} |= "x"#, "unterminated string"),
            (r#"{a="b"} | regexp "(?P<x>.)""#, "unsupported LogQL: regexp"),
            (r#"topk(2, rate({a="b"}[1m]))"#, "unsupported LogQL: topk"),
            (r#"rate({a="b"})"#, "expected a range"),
            (r#"{a="b"} | line_format "{{ .a | ToUpper }}""#, "unsupported LogQL: line_format"),
            (r#"{a="b"} | json foo="bar""#, "unsupported LogQL: json"),
            (r#"{a="b"} extra"#, "col 9: syntax error: unexpected extra"),
            (r#"{a="b"} |~ "(""#, "invalid regex"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(want), "{text}: {error}");
            assert!(error.starts_with("parse error at line 1, col ") || error.contains("unsupported"), "{error}");
        }
        let deep = format!("{}rate({{a=\"b\"}}[1m]){}", "sum(".repeat(300), ")".repeat(300));
        assert!(parse(&deep).unwrap_err().contains("too complex"));
        let long = format!("{{a=\"{}\"}}", "x".repeat(MAX_QUERY_BYTES));
        assert!(parse(&long).unwrap_err().starts_with("query too long"));
        let filters = format!("{{a=\"b\"}}{}", " |= \"x\"".repeat(300));
        assert!(parse(&filters).unwrap_err().contains("too complex"));
    }

    #[test]
    fn numbers_durations_and_sizes() {
        assert_eq!(parse_duration_ns("1h30m"), Some(5_400_000_000_000));
        assert_eq!(value_as("250ms", Unit::Duration), Some(0.25));
        assert_eq!(value_as("2KiB", Unit::Bytes), Some(2048.0));
        assert_eq!(number_of("1.5s"), Some((1.5, Unit::Duration)));
        assert_eq!(number_of("20MB"), Some((20e6, Unit::Bytes)));
    }
}
