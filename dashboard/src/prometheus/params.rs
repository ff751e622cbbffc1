//! Request parameters: the form body's and the query string's, times and durations as
//! Prometheus takes them.

use axum::http::{HeaderMap, Uri, header};

use super::eval;
use super::response::ApiError;

/// Request parameters: the form body's, then the query string's (Go's `ParseForm` order).
pub(crate) struct Params(Vec<(String, String)>);

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(text: &str, out: &mut Vec<(String, String)>) {
    for part in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k), percent_decode(v)));
    }
}

impl Params {
    pub(crate) fn new(headers: &HeaderMap, uri: &Uri, body: &[u8]) -> Self {
        let mut pairs = Vec::new();
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let form = content_type.is_empty() || content_type.starts_with("application/x-www-form-urlencoded");
        if !body.is_empty() && form {
            parse_form(&String::from_utf8_lossy(body), &mut pairs);
        }
        if let Some(query) = uri.query() {
            parse_form(query, &mut pairs);
        }
        Self(pairs)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    pub(super) fn time(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| parse_time(v).map_err(|e| ApiError::param(name, e)))
            .transpose()
    }

    pub(super) fn limit(&self) -> Result<Option<usize>, ApiError> {
        match self.get("limit").filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => {
                let n: i64 =
                    v.parse().map_err(|_| ApiError::param("limit", format!("cannot parse {v:?} to an integer")))?;
                Ok((n > 0).then_some(n as usize))
            }
        }
    }
}

/// A time as Prometheus takes it: float seconds or RFC 3339, in ms, within the times a query
/// may name ([`eval::bounded_time`]: a time beyond them would overflow the arithmetic on it).
fn parse_time(text: &str) -> Result<i64, String> {
    let ms = if let Ok(seconds) = text.parse::<f64>()
        && seconds.is_finite()
    {
        // Saturates: a time past an i64 of ms is refused below like any out of bounds.
        (seconds * 1000.0).round() as i64
    } else {
        match text {
            // Prometheus clients' "min time" and "max time" (Go's extremes).
            "-292273086-05-16T16:47:06Z" => eval::MIN_TIME_MS,
            "292277025-08-17T07:12:55.807Z" => eval::MAX_TIME_MS,
            _ => chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.timestamp_millis())
                .map_err(|_| format!("cannot parse {text:?} to a valid timestamp"))?,
        }
    };
    eval::bounded_time(ms, &format!("cannot parse {text:?} to a valid timestamp: it"))
}

/// A duration as Prometheus takes it: float seconds or a PromQL duration (`1h30m`).
pub(super) fn parse_duration(text: &str) -> Result<i64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if !seconds.is_finite() || seconds.abs() * 1000.0 > i64::MAX as f64 {
            return Err(format!("cannot parse {text:?} to a valid duration. It overflows int64"));
        }
        return Ok((seconds * 1000.0).round() as i64);
    }
    promql_parser::util::parse_duration(text)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .map_err(|_| format!("cannot parse {text:?} to a valid duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_times_and_durations() {
        let mut pairs = Vec::new();
        parse_form("query=1%2B1&time=4&match%5B%5D=a+b&x", &mut pairs);
        assert_eq!(pairs[0], ("query".into(), "1+1".into()));
        assert_eq!(pairs[2], ("match[]".into(), "a b".into()));
        assert_eq!(pairs[3], ("x".into(), "".into()));
        assert_eq!(parse_time("1435781451.781"), Ok(1435781451781));
        assert_eq!(parse_time("2015-07-01T20:10:51.781Z"), Ok(1435781451781));
        assert!(parse_time("yesterday").is_err());
        // Prometheus clients' extremes are the bounds; past them (an i64 of ns) is refused.
        assert_eq!(parse_time("-292273086-05-16T16:47:06Z"), Ok(eval::MIN_TIME_MS));
        assert_eq!(parse_time("292277025-08-17T07:12:55.807Z"), Ok(eval::MAX_TIME_MS));
        assert_eq!(parse_time("9223372036.854"), Ok(eval::MAX_TIME_MS));
        assert_eq!(
            parse_time("1e300"),
            Err("cannot parse \"1e300\" to a valid timestamp: it is outside the times a query may name, \
                 1677-09-21T00:12:43.146Z to 2262-04-11T23:47:16.854Z"
                .into())
        );
        assert!(parse_time("9999-12-31T23:59:59Z").is_err());
        assert_eq!(parse_duration("3600"), Ok(3_600_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("15.5"), Ok(15_500));
    }
}
