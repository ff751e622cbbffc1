//! OTLP metric and attribute names as Prometheus's own OTLP receiver writes them by default
//! (its `otlptranslator`, "underscore escaping with suffixes"), so that PromQL written for
//! Prometheus selects them: `http.server.request.duration` in seconds, a histogram, is
//! `http_server_request_duration_seconds`; a monotonic sum `orders` is `orders_total`.
//!
//! - A name is split into words at every character Prometheus does not allow in a name and at
//!   every `_`, and the words are joined with `_` (so `a..b__c` is `a_b_c`).
//! - The unit's word is appended unless the name has it already (`ms` is `milliseconds`, `By`
//!   is `bytes`, `By/s` is `bytes_per_second`; `{requests}` and other annotations are dropped).
//! - A monotonic sum ends in `total` (moved there if the name has it elsewhere); a gauge whose
//!   unit is `1` ends in `ratio`.
//! - A name that starts with a digit gets a leading `_`.
//!
//! Attribute names: characters a label name does not allow become `_`, runs of `_` one (but a
//! leading `__`), and a name that starts with a digit gets `key_` before it.

/// What kind of metric a name is for (the suffixes depend on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    /// A monotonic sum.
    Counter,
    /// Anything else (non-monotonic sums, histograms, summaries).
    Other,
}

/// How OTLP metric names are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricNames {
    /// As Prometheus's OTLP receiver writes them (the default).
    #[default]
    Prometheus,
    /// As the OTLP sender named them (dots and all), attributes as they are.
    Otlp,
}

impl std::str::FromStr for MetricNames {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "prometheus" => Ok(Self::Prometheus),
            "otlp" => Ok(Self::Otlp),
            other => Err(format!("{other:?}: use prometheus or otlp")),
        }
    }
}

fn main_unit(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "1" => "",
        "%" => "percent",
        _ => return None,
    })
}

fn per_unit(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return None,
    })
}

/// A unit's words: a known unit's name, or the unit itself with what a name does not allow
/// made `_`; nothing for an annotation (`{…}`).
fn unit_word(unit: &str, known: fn(&str) -> Option<&'static str>) -> String {
    let unit = unit.trim();
    if unit.is_empty() || unit.contains('{') || unit.contains('}') {
        return String::new();
    }
    match known(unit) {
        Some(word) => word.to_string(),
        None => words(unit).join("_"),
    }
}

fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == ':')).filter(|w| !w.is_empty()).collect()
}

/// The Prometheus name of an OTLP metric.
pub fn metric_name(name: &str, unit: &str, kind: Kind) -> String {
    let mut tokens: Vec<String> = words(name).into_iter().map(str::to_string).collect();
    let (main, per) = unit.split_once('/').unwrap_or((unit, ""));
    let main = unit_word(main, main_unit);
    if !main.is_empty() && !tokens.contains(&main) {
        tokens.push(main);
    }
    // Prometheus looks for `per_<unit>` among the name's words, which never holds one.
    let per = unit_word(per, per_unit);
    if !per.is_empty() {
        tokens.push("per".into());
        tokens.push(per);
    }
    let mut last = |word: &str| {
        tokens.retain(|t| t != word);
        tokens.push(word.to_string());
    };
    match kind {
        Kind::Counter => last("total"),
        Kind::Gauge if unit.trim() == "1" => last("ratio"),
        _ => {}
    }
    let name = tokens.join("_");
    if name.starts_with(|c: char| c.is_ascii_digit()) { format!("_{name}") } else { name }
}

/// The Prometheus label name of an OTLP attribute.
pub fn label_name(key: &str) -> String {
    let reserved = key.starts_with("__");
    let mut label = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        if c != '_' || !label.ends_with('_') || (reserved && label.len() < 2) {
            label.push(c);
        }
    }
    if label.starts_with(|c: char| c.is_ascii_digit()) { format!("key_{label}") } else { label }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases worked through Prometheus's translator (otlptranslator's `normalizeName` and
    /// `buildUnitSuffixes`, underscore escaping with suffixes).
    #[test]
    fn names_as_prometheus_writes_them() {
        let cases = [
            ("system.filesystem.usage", "By", Kind::Gauge, "system_filesystem_usage_bytes"),
            ("http.server.request.duration", "s", Kind::Other, "http_server_request_duration_seconds"),
            ("orders", "", Kind::Counter, "orders_total"),
            ("requests.total.count", "{request}", Kind::Counter, "requests_count_total"),
            ("network.io", "By/s", Kind::Counter, "network_io_bytes_per_second_total"),
            ("cpu.utilization", "1", Kind::Gauge, "cpu_utilization_ratio"),
            ("cpu.ratio.utilization", "1", Kind::Gauge, "cpu_utilization_ratio"),
            ("latency", "ms", Kind::Other, "latency_milliseconds"),
            ("latency_milliseconds", "ms", Kind::Other, "latency_milliseconds"),
            ("disk.free", "%", Kind::Gauge, "disk_free_percent"),
            ("a..b__c", "", Kind::Gauge, "a_b_c"),
            ("2xx.responses", "", Kind::Counter, "_2xx_responses_total"),
            ("temperature", "Cel", Kind::Gauge, "temperature_celsius"),
            ("speed", "m/h", Kind::Gauge, "speed_meters_per_hour"),
            ("requests.per.second", "1/s", Kind::Gauge, "requests_per_second_per_second"),
            ("odd", "foo bar", Kind::Gauge, "odd_foo_bar"),
            ("namespaced:metric", "", Kind::Gauge, "namespaced:metric"),
        ];
        for (name, unit, kind, expected) in cases {
            assert_eq!(metric_name(name, unit, kind), expected, "{name} in {unit:?}");
        }
    }

    #[test]
    fn labels_as_prometheus_writes_them() {
        assert_eq!(label_name("http.request.method"), "http_request_method");
        assert_eq!(label_name("region"), "region");
        assert_eq!(label_name("0abc"), "key_0abc");
        assert_eq!(label_name("_private"), "_private");
        assert_eq!(label_name("__reserved"), "__reserved");
        assert_eq!(label_name("a..b__c"), "a_b_c");
        assert_eq!(label_name("ünï"), "_n_");
    }
}
