//! What a request asks for: its query-string parameters, a trace id, and a search's
//! conditions (Go durations, tags as JSON or logfmt), checked against the limits in `mod.rs`.

use axum::extract::Query;
use collector::store::TraceSearch;
use serde_json::{Map, Value};

use super::{
    DEFAULT_LIMIT, DEFAULT_SEARCH_LOOKBACK_NS, MAX_LIMIT, MAX_TAG_BYTES, MAX_TAGS, MAX_WINDOW_NS, Params, Result,
    bad_request,
};

/// Refuses a window longer than [`MAX_WINDOW_NS`] (400, naming the limit).
pub(super) fn check_window(what: &str, start_ns: i64, end_ns: i64) -> Result<()> {
    if end_ns.saturating_sub(start_ns) > MAX_WINDOW_NS {
        return Err(bad_request(format!(
            "the {what} window is longer than 31 days, the limit: narrow it (start/end or lookback)"
        )));
    }
    Ok(())
}

/// The query string as (name, value) pairs, repeats kept.
pub(super) fn params(query: Params) -> Result<Vec<(String, String)>> {
    query.map(|Query(pairs)| pairs).map_err(|rejection| bad_request(rejection.body_text()))
}

/// The first non-empty value of `name` (Go's `FormValue`, with empty meaning absent).
pub(super) fn first<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.as_str())
}

pub(super) fn int_param(params: &[(String, String)], name: &str) -> Result<Option<i64>> {
    first(params, name)
        .map(|v| v.trim().parse::<i64>().map_err(|e| bad_request(format!("unable to parse param '{name}': {e}"))))
        .transpose()
}

/// A trace id as stored: 32 lowercase hex digits, from 1..=32 hex digits (jaeger-query's
/// `TraceIDFromString` accepts as many).
pub(super) fn parse_trace_id(raw: &str) -> Result<String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 32 || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_request(format!("cannot parse traceID {raw:?}: want 1 to 32 hexadecimal digits")));
    }
    Ok(format!("{:0>32}", raw.to_ascii_lowercase()))
}

/// Go's `time.ParseDuration` (what jaeger-query uses for `minDuration`/`maxDuration`), in ns.
fn parse_go_duration(text: &str) -> Option<i64> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (whole, after) = rest.split_at(digits);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => {
                let digits = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
                after.split_at(digits)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: f64 = match unit {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let value: f64 = format!("{}.{}", if whole.is_empty() { "0" } else { whole }, fraction).parse().ok()?;
        total += value * scale;
        rest = after;
    }
    if total > i64::MAX as f64 {
        return None;
    }
    let total = total.round() as i64;
    Some(if negative { -total } else { total })
}

/// logfmt (`key=value key2="quoted value" flag`), as Grafana's search form takes tags.
fn parse_logfmt(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i == chars.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        if key.is_empty() {
            return Err(format!(
                "malformed 'tags' parameter: expected a key at {:?}",
                chars[i..].iter().collect::<String>()
            ));
        }
        if i < chars.len() && chars[i] == '=' {
            i += 1;
            let mut value = String::new();
            if i < chars.len() && chars[i] == '"' {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(format!("malformed 'tags' parameter: unterminated quote after {key}=")),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some('n') => value.push('\n'),
                                Some('t') => value.push('\t'),
                                Some('r') => value.push('\r'),
                                Some(&c) => value.push(c),
                                None => {
                                    return Err(format!("malformed 'tags' parameter: unterminated quote after {key}="));
                                }
                            }
                            i += 2;
                        }
                        Some(&c) => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                while i < chars.len() && !chars[i].is_whitespace() {
                    value.push(chars[i]);
                    i += 1;
                }
            }
            pairs.push((key, value));
        } else {
            pairs.push((key, "true".into()));
        }
    }
}

/// `tags` as Grafana sends it (a JSON object of strings), or logfmt.
fn parse_tags(text: &str) -> Result<Vec<(String, String)>> {
    let text = text.trim();
    if text.starts_with('{') {
        let object: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| bad_request(format!("malformed 'tags' parameter, cannot unmarshal JSON: {e}")))?;
        Ok(object
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (key, value)
            })
            .collect())
    } else {
        parse_logfmt(text).map_err(bad_request)
    }
}

/// The search a request asks for; its window ends at `now_ns` unless it says otherwise.
pub(super) fn parse_search(params: &[(String, String)], now_ns: i64) -> Result<TraceSearch> {
    let service = first(params, "service").map(|s| s.trim().to_string());
    let operation = first(params, "operation").map(str::to_string);
    let mut tags = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "tag" if !value.is_empty() => match value.split_once(':') {
                Some((k, v)) => tags.push((k.to_string(), v.to_string())),
                None => {
                    return Err(bad_request(format!(
                        "malformed 'tag' parameter, expecting key:value, received: {value}"
                    )));
                }
            },
            "tags" if !value.is_empty() => tags.extend(parse_tags(value)?),
            _ => {}
        }
    }
    let duration = |name: &str| -> Result<i64> {
        first(params, name)
            .map(|v| {
                parse_go_duration(v.trim()).ok_or_else(|| {
                    bad_request(format!(
                        "unable to parse param '{name}': invalid duration {v:?} (use e.g. 1.2s, 100ms, 500us)"
                    ))
                })
            })
            .transpose()
            .map(|d| d.unwrap_or(0))
    };
    let min_ns = duration("minDuration")?;
    let max_ns = duration("maxDuration")?;
    if min_ns != 0 && max_ns != 0 && max_ns < min_ns {
        return Err(bad_request("'maxDuration' should be greater than 'minDuration'"));
    }
    let limit = match int_param(params, "limit")? {
        Some(limit) if limit > 0 => (limit as usize).min(MAX_LIMIT),
        _ => DEFAULT_LIMIT,
    };
    let end_ns = int_param(params, "end")?.map_or(now_ns, |us| us.saturating_mul(1000));
    let start_ns = int_param(params, "start")?
        .map_or_else(|| end_ns.saturating_sub(DEFAULT_SEARCH_LOOKBACK_NS), |us| us.saturating_mul(1000));
    let service = service.ok_or_else(|| bad_request("parameter 'service' is required"))?;
    check_window("search", start_ns, end_ns)?;
    if tags.len() > MAX_TAGS {
        return Err(bad_request(format!("{} tag conditions, more than the limit of {MAX_TAGS}", tags.len())));
    }
    if let Some((key, _)) = tags.iter().find(|(k, v)| k.len().max(v.len()) > MAX_TAG_BYTES) {
        let key: String = key.chars().take(40).collect();
        return Err(bad_request(format!(
            "tag {key:?}: a key or value is longer than {MAX_TAG_BYTES} bytes, the limit"
        )));
    }
    Ok(TraceSearch { service, operation, tags, min_ns, max_ns, limit, start_ns, end_ns })
}
