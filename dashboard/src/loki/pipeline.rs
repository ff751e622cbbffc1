//! A log record as LogQL sees it (its line, and its labels: the stream's, structured metadata,
//! and what parsers extract), and the pipeline's stages run over it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use collector::store::{LogRecord, StreamKey};
use contract::semconv;
use serde_json::Value;

use super::logql::{LabelFilter, LogExpr, Stage, TemplatePart, value_as};

/// The label a stage sets on an entry it could not process, as Loki's.
pub const ERROR: &str = "__error__";
const ERROR_DETAILS: &str = "__error_details__";

/// Where a label comes from, as Loki's categorized answers tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The stream's own labels (what a selector selects on).
    Stream,
    /// Per line: trace and span ids, the invocation, an SDK record's attributes.
    Metadata,
    /// What `json` and `logfmt` extracted (and the pipeline's errors).
    Parsed,
}

/// Labels by name (the platform's names are static, what parsers extract is owned).
pub type Labels = BTreeMap<Cow<'static, str>, (String, Kind)>;

/// A line and its labels, as they go through a pipeline.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ts_ns: i64,
    pub line: String,
    pub labels: Labels,
    /// The stored record's hash (what tells two equal lines apart).
    pub hash: String,
}

impl Entry {
    pub fn get(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", |(v, _)| v.as_str())
    }

    fn set(&mut self, name: impl Into<Cow<'static, str>>, value: String, kind: Kind) {
        self.labels.insert(name.into(), (value, kind));
    }

    fn set_error(&mut self, error: &str, details: String) {
        if !self.labels.contains_key(ERROR) {
            self.set(ERROR, error.into(), Kind::Parsed);
            self.set(ERROR_DETAILS, details, Kind::Parsed);
        }
    }

    /// Sets what a parser extracted: a name that is the stream's or metadata's already gets
    /// `_extracted` appended (Loki's rule).
    fn set_parsed(&mut self, name: String, value: String) {
        let name = match self.labels.get(name.as_str()) {
            Some((_, Kind::Stream | Kind::Metadata)) => format!("{name}_extracted"),
            _ => name,
        };
        self.set(name, value, Kind::Parsed);
    }
}

/// The record's entry: its body as the line, and its labels:
/// - a function's line (the platform's record): stream labels `source="function"`,
///   `service_name` and `function` (the function), `instance`, `stream` (stdout/stderr),
///   `level`; metadata `trace_id`, `span_id`, `invocation_id`, `call_id`;
/// - the tenant's own (its SDK's) record: `source="otlp"`, `service_name` (its resource's
///   `service.name`, else `unknown_service`), `service_namespace` and
///   `deployment_environment` when its resource has them, `level`; metadata `trace_id`,
///   `span_id` and the record's attributes.
pub fn entry_of(record: LogRecord) -> Entry {
    let level = level(record.severity_number, &record.severity_text);
    let mut labels = if record.metered {
        let attributes: FunctionAttributes = serde_json::from_str(&record.attributes).unwrap_or_default();
        let mut labels = function_labels(
            attributes.function.map(Cow::into_owned),
            attributes.instance.map(Cow::into_owned),
            attributes.iostream.map(Cow::into_owned),
            level,
        );
        for (name, value) in [("invocation_id", attributes.invocation_id), ("call_id", attributes.call_id)] {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                labels.insert(name.into(), (value.into_owned(), Kind::Metadata));
            }
        }
        labels
    } else {
        let attributes: BTreeMap<String, Value> = serde_json::from_str(&record.attributes).unwrap_or_default();
        let mut labels = sdk_labels(&record.resource, level);
        for (key, value) in &attributes {
            labels.entry(sanitize(key).into()).or_insert_with(|| (value_text(value), Kind::Metadata));
        }
        labels
    };
    for (name, id) in [("trace_id", record.trace_id), ("span_id", record.span_id)] {
        if let Some(id) = id.filter(|id| !id.is_empty()) {
            labels.insert(name.into(), (id, Kind::Metadata));
        }
    }
    Entry { ts_ns: record.ts_ns, line: record.body, labels, hash: record.record_hash }
}

/// What a function line's attributes say (the gateway writes them; others are skipped).
#[derive(Default, serde::Deserialize)]
struct FunctionAttributes<'a> {
    #[serde(rename = "faas.name", borrow)]
    function: Option<Cow<'a, str>>,
    #[serde(rename = "faas.instance", borrow)]
    instance: Option<Cow<'a, str>>,
    #[serde(rename = "log.iostream", borrow)]
    iostream: Option<Cow<'a, str>>,
    #[serde(rename = "faas.invocation_id", borrow)]
    invocation_id: Option<Cow<'a, str>>,
    #[serde(rename = "sfaas.call_id", borrow)]
    call_id: Option<Cow<'a, str>>,
}

/// A stream's labels (see [`entry_of`]).
pub fn stream_labels(stream: &StreamKey) -> Labels {
    let level = level(stream.severity_number, &stream.severity_text);
    if stream.metered {
        function_labels(stream.function.clone(), stream.instance.clone(), stream.iostream.clone(), level)
    } else {
        sdk_labels(&stream.resource, level)
    }
}

fn function_labels(
    function: Option<String>,
    instance: Option<String>,
    iostream: Option<String>,
    level: &str,
) -> Labels {
    let function = function.unwrap_or_default();
    [
        ("source", "function".to_string()),
        ("service_name", function.clone()),
        ("function", function),
        ("instance", instance.unwrap_or_default()),
        ("stream", iostream.unwrap_or_default()),
        ("level", level.to_string()),
    ]
    .into_iter()
    .map(|(name, value)| (name.into(), (value, Kind::Stream)))
    .collect()
}

fn sdk_labels(resource: &str, level: &str) -> Labels {
    let resource: BTreeMap<String, Value> = serde_json::from_str(resource).unwrap_or_default();
    let mut labels = Labels::new();
    let service = resource.get(semconv::ATTR_SERVICE_NAME).map_or_else(|| "unknown_service".into(), value_text);
    for (name, value) in [("source", "otlp".to_string()), ("service_name", service), ("level", level.to_string())] {
        labels.insert(name.into(), (value, Kind::Stream));
    }
    for (key, name) in
        [(semconv::ATTR_SERVICE_NAMESPACE, "service_namespace"), ("deployment.environment", "deployment_environment")]
    {
        if let Some(value) = resource.get(key) {
            labels.insert(name.into(), (value_text(value), Kind::Stream));
        }
    }
    labels
}

/// The `level` label: from OTLP's severity number, else its text, as Loki names levels.
fn level(number: i64, text: &str) -> &'static str {
    match number {
        1..=4 => "trace",
        5..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17..=20 => "error",
        21..=24 => "critical",
        _ => match text.to_ascii_lowercase().as_str() {
            "trace" => "trace",
            "debug" => "debug",
            "info" | "information" => "info",
            "warn" | "warning" => "warn",
            "error" | "err" => "error",
            "fatal" | "critical" | "crit" => "critical",
            _ => "unknown",
        },
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A label name from a key: characters other than ASCII letters, digits and `_` become `_`,
/// and a leading digit gets a `_` before it.
pub fn sanitize(key: &str) -> String {
    let mut out: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A log query's selector and stages, ready to run over records.
pub struct Pipeline<'a> {
    expr: &'a LogExpr,
    /// How many stages, from the first, are line filters that can run on the record's body
    /// before its labels are built (line filters before any `line_format`).
    early: usize,
}

impl<'a> Pipeline<'a> {
    pub fn new(expr: &'a LogExpr) -> Self {
        let early = expr.stages.iter().take_while(|s| !matches!(s, Stage::LineFormat(_))).count();
        Self { expr, early }
    }

    /// Whether the selector selects a line of these labels (by its stream's labels).
    pub fn selects(&self, labels: &Labels) -> bool {
        self.expr.selector.iter().all(|matcher| {
            let value = match labels.get(matcher.name.as_str()) {
                Some((value, Kind::Stream)) => value.as_str(),
                _ => "",
            };
            matcher.matches(value)
        })
    }

    /// The record's entry if the query keeps it.
    pub fn run(&self, record: LogRecord) -> Option<Entry> {
        for stage in &self.expr.stages[..self.early] {
            if let Stage::Line(filter) = stage
                && !filter.keeps(&record.body)
            {
                return None;
            }
        }
        let mut entry = entry_of(record);
        if !self.selects(&entry.labels) {
            return None;
        }
        for (i, stage) in self.expr.stages.iter().enumerate() {
            match stage {
                Stage::Line(filter) => {
                    if i >= self.early && !filter.keeps(&entry.line) {
                        return None;
                    }
                }
                Stage::Json => json(&mut entry),
                Stage::Logfmt => logfmt(&mut entry),
                Stage::Labels(filter) => {
                    if !label_filter(filter, &mut entry) {
                        return None;
                    }
                }
                Stage::LineFormat(template) => {
                    let mut line = String::new();
                    for part in template {
                        match part {
                            TemplatePart::Text(text) => line.push_str(text),
                            TemplatePart::Label(name) => line.push_str(entry.get(name)),
                            TemplatePart::Line => line.push_str(&entry.line),
                            TemplatePart::Timestamp => line.push_str(&rfc3339(entry.ts_ns)),
                        }
                    }
                    entry.line = line;
                }
                Stage::Drop(names) => entry.labels.retain(|name, (value, _)| {
                    !names.iter().any(|(n, v)| n == name && v.as_ref().is_none_or(|v| v == value))
                }),
                Stage::Keep(names) => entry.labels.retain(|name, (value, _)| {
                    names.iter().any(|(n, v)| n == name && v.as_ref().is_none_or(|v| v == value))
                }),
            }
        }
        Some(entry)
    }
}

fn rfc3339(ts_ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ts_ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn label_filter(filter: &LabelFilter, entry: &mut Entry) -> bool {
    match filter {
        LabelFilter::And(a, b) => label_filter(a, entry) && label_filter(b, entry),
        LabelFilter::Or(a, b) => label_filter(a, entry) || label_filter(b, entry),
        LabelFilter::Text(matcher) => matcher.matches(entry.get(&matcher.name)),
        LabelFilter::Number { name, op, value, unit } => {
            // As Loki: after an error only text filters decide; a missing label fails the
            // filter; one that is not a number marks the entry and keeps it.
            if entry.labels.contains_key(ERROR) {
                return true;
            }
            let Some((text, _)) = entry.labels.get(name.as_str()) else { return false };
            match value_as(text, *unit) {
                Some(number) => op.holds(number, *value),
                None => {
                    let details = format!("cannot read {text:?} of label {name} as a number");
                    entry.set_error("LabelFilterErr", details);
                    true
                }
            }
        }
    }
}

/// `| json`: a JSON object line's fields as labels, nested objects' keys joined with `_`
/// (arrays and nulls are skipped); another line gets `__error__="JSONParserErr"`.
fn json(entry: &mut Entry) {
    match serde_json::from_str::<serde_json::Map<String, Value>>(&entry.line) {
        Ok(object) => {
            let mut fields = Vec::new();
            flatten("", &object, &mut fields);
            for (name, value) in fields {
                entry.set_parsed(name, value);
            }
        }
        Err(error) => entry.set_error("JSONParserErr", error.to_string()),
    }
}

fn flatten(prefix: &str, object: &serde_json::Map<String, Value>, out: &mut Vec<(String, String)>) {
    for (key, value) in object {
        let name = if prefix.is_empty() { sanitize(key) } else { format!("{prefix}_{}", sanitize(key)) };
        match value {
            Value::Object(inner) => flatten(&name, inner, out),
            Value::Array(_) | Value::Null => {}
            other => out.push((name, value_text(other))),
        }
    }
}

/// `| logfmt`: `key=value` pairs (values bare or in double quotes) as labels. As Loki's
/// (without `--strict` and `--keep-empty`): what is not a pair is skipped, and so are pairs
/// with an empty value.
fn logfmt(entry: &mut Entry) {
    for (key, value) in parse_logfmt(&entry.line) {
        entry.set_parsed(sanitize(&key), value);
    }
}

fn parse_logfmt(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = line.chars().peekable();
    let space = |c: &char| c.is_whitespace();
    loop {
        while chars.next_if(space).is_some() {}
        if chars.peek().is_none() {
            return pairs;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !space(c) && *c != '=') {
            key.push(c);
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        let mut valid = !key.is_empty() && !key.contains('"');
        if chars.next_if_eq(&'"').is_some() {
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some('t') => value.push('\t'),
                        Some(c) => value.push(c),
                        None => break,
                    },
                    c => value.push(c),
                }
            }
            valid &= closed;
        } else {
            while let Some(c) = chars.next_if(|c| !space(c)) {
                valid &= c != '"' && c != '=';
                value.push(c);
            }
        }
        if valid && !value.is_empty() {
            pairs.push((key, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &str, metered: bool) -> LogRecord {
        LogRecord {
            ts_ns: 1_000,
            severity_number: 13,
            severity_text: "WARN".into(),
            body: body.into(),
            attributes: r#"{"faas.name":"resize","faas.instance":"exec","log.iostream":"stderr","faas.invocation_id":"i-1","code.lineno":12}"#.into(),
            resource: r#"{"service.name":"shop","service.namespace":"acme"}"#.into(),
            trace_id: Some("ab".repeat(16)),
            span_id: None,
            metered,
            record_hash: "h".into(),
        }
    }

    #[test]
    fn a_function_line_and_an_sdk_record_have_their_labels() {
        let e = entry_of(record("x", true));
        let names: Vec<_> = e.labels.iter().map(|(k, (v, kind))| format!("{k}={v}:{kind:?}")).collect();
        let trace = format!("trace_id={}:Metadata", "ab".repeat(16));
        let want = [
            "function=resize:Stream",
            "instance=exec:Stream",
            "invocation_id=i-1:Metadata",
            "level=warn:Stream",
            "service_name=resize:Stream",
            "source=function:Stream",
            "stream=stderr:Stream",
            trace.as_str(),
        ];
        assert_eq!(names, want);
        let e = entry_of(record("x", false));
        assert_eq!(e.get("source"), "otlp");
        assert_eq!(e.get("service_name"), "shop");
        assert_eq!(e.get("service_namespace"), "acme");
        assert_eq!(e.get("faas_name"), "resize", "an SDK record's attributes are metadata");
        assert_eq!(e.labels["faas_name"].1, Kind::Metadata);
        assert_eq!(e.get("function"), "", "an SDK record is no function's line");
        assert_eq!(e.get("code_lineno"), "12");
    }

    #[test]
    fn json_flattens_and_renames_what_conflicts_with_the_stream() {
        let mut e =
            entry_of(record(r#"{"level":"error","http":{"status":503,"ok":false},"tags":[1],"1st":"a"}"#, true));
        json(&mut e);
        assert_eq!(e.get("level"), "warn");
        assert_eq!(e.get("level_extracted"), "error");
        assert_eq!(e.get("http_status"), "503");
        assert_eq!(e.get("http_ok"), "false");
        assert_eq!(e.get("_1st"), "a");
        assert!(!e.labels.contains_key("tags"));
        let mut bad = entry_of(record("not json", true));
        json(&mut bad);
        assert_eq!(bad.get(ERROR), "JSONParserErr");
    }

    #[test]
    fn logfmt_reads_bare_and_quoted_values() {
        assert_eq!(
            parse_logfmt(r#"level=info msg="hello \"you\"" dur=1.5s flag empty= =x a"b=c"#),
            [
                ("level".to_string(), "info".to_string()),
                ("msg".into(), "hello \"you\"".into()),
                ("dur".into(), "1.5s".into()),
            ]
        );
        assert_eq!(parse_logfmt(r#"msg="unterminated ok=1"#), []);
        assert_eq!(parse_logfmt("not logfmt at all"), []);
    }
}
