//! Scraping: the collector pulls configured targets, per tenant, like Prometheus does —
//! text format 0.0.4 and OpenMetrics, with `up`, `scrape_duration_seconds` and
//! `scrape_samples_scraped` series of its own for every scrape.
//!
//! ```yaml
//! targets:
//!   - tenant: acme
//!     url: http://127.0.0.1:9100/metrics
//!     job: node          # default: the target's host:port
//!     interval: 15s      # default 15s
//!     timeout: 5s        # default 10s, at most the interval
//!     bearer_token: ...  # optional
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

use crate::Collector;
use crate::model::{Batch, SampleRow};

/// One configured target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScrapeTarget {
    pub tenant: String,
    pub url: String,
    #[serde(default)]
    pub job: Option<String>,
    #[serde(default, with = "duration_text")]
    pub interval: Option<Duration>,
    #[serde(default, with = "duration_text")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Attribute each sample to the tenant its label of this name holds (samples without it
    /// are dropped), instead of to `tenant`: for a target that serves many tenants' series.
    #[serde(default)]
    pub tenant_label: Option<String>,
    /// The platform's own target (billable data); never set from a file.
    #[serde(skip)]
    pub metered: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScrapeFile {
    targets: Vec<ScrapeTarget>,
}

mod duration_text {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else { return Ok(None) };
        let (number, unit) =
            text.trim().split_at(text.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(text.trim().len()));
        let number: u64 = number.parse().map_err(|_| serde::de::Error::custom(format!("bad duration {text:?}")))?;
        let seconds = match unit {
            "ms" => return Ok(Some(Duration::from_millis(number))),
            "s" | "" => number,
            "m" => number * 60,
            "h" => number * 3600,
            _ => return Err(serde::de::Error::custom(format!("bad duration {text:?} (use ms, s, m or h)"))),
        };
        Ok(Some(Duration::from_secs(seconds)))
    }
}

/// The platform's own target for `sfaas up`: the gateway's `/metrics`, read with the meter
/// token, every series attributed to the tenant its `namespace` label names, billable.
pub fn platform_target(gateway_metrics_url: String, meter_token: String) -> ScrapeTarget {
    ScrapeTarget {
        tenant: String::new(),
        url: gateway_metrics_url,
        job: Some("sfaas-gateway".into()),
        interval: Some(Duration::from_secs(15)),
        timeout: Some(Duration::from_secs(5)),
        bearer_token: Some(meter_token),
        tenant_label: Some("namespace".into()),
        metered: true,
    }
}

/// Reads a scrape configuration file, checking every target.
pub fn load(path: &std::path::Path) -> Result<Vec<ScrapeTarget>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: ScrapeFile = serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for target in &file.targets {
        if !crate::auth::valid_tenant(&target.tenant) {
            return Err(format!("{}: tenant {:?} is not a valid tenant name", path.display(), target.tenant));
        }
        let url =
            reqwest::Url::parse(&target.url).map_err(|e| format!("{}: url {:?}: {e}", path.display(), target.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{}: url {:?} is not http(s)", path.display(), target.url));
        }
    }
    Ok(file.targets)
}

/// Starts one scrape loop per target.
pub fn spawn(
    collector: Arc<Collector>,
    targets: Vec<ScrapeTarget>,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    targets
        .into_iter()
        .map(|target| {
            let (collector, mut stop) = (collector.clone(), stop.clone());
            crate::background::spawn(async move {
                let client = reqwest::Client::builder().no_proxy().build().expect("a plain HTTP client builds");
                let interval = target.interval.unwrap_or(Duration::from_secs(15));
                let mut series = Series::default();
                loop {
                    let now_ns = collector.store.clock().now_ns();
                    let mut batch = scrape_once(&client, &target, now_ns).await;
                    if !target.metered {
                        series.mark_stale(&mut batch, now_ns);
                    }
                    if let Err(error) = collector.pipeline.submit(batch, crate::pipeline::Source::Meter).await {
                        tracing::warn!(url = %target.url, %error, "scraped samples not stored");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            })
        })
        .collect()
}

/// The series a target's last scrape gave, to mark those that are gone (as Prometheus does:
/// a series missing from a scrape, or every series of a target that failed, ends there).
#[derive(Default)]
struct Series {
    last: std::collections::HashMap<(String, String, String), &'static str>,
}

impl Series {
    /// Adds a staleness marker at `now_ns` to `batch` for every series of the last scrape that
    /// this one lacks, and remembers this one's. Samples with a time of their own (not
    /// `now_ns`) are not tracked, as in Prometheus.
    fn mark_stale(&mut self, batch: &mut Batch, now_ns: i64) {
        let mut current = std::collections::HashMap::with_capacity(self.last.len());
        for row in batch.samples.iter().filter(|row| row.ts_ns == now_ns) {
            current.insert((row.tenant.clone(), row.metric.clone(), row.labels.clone()), row.kind);
        }
        for (key, kind) in self.last.drain() {
            if !current.contains_key(&key) {
                let (tenant, metric, labels) = key;
                batch.samples.push(SampleRow::stale(tenant, metric, labels, kind, now_ns, false));
            }
        }
        self.last = current;
    }
}

/// Scrapes a target once: its samples, plus `up`, `scrape_duration_seconds` and
/// `scrape_samples_scraped`, stamped `now_ns` where the target gives no time.
pub async fn scrape_once(client: &reqwest::Client, target: &ScrapeTarget, now_ns: i64) -> Batch {
    let interval = target.interval.unwrap_or(Duration::from_secs(15));
    let timeout = target.timeout.unwrap_or(Duration::from_secs(10)).min(interval);
    let started = Instant::now();
    let mut request = client
        .get(&target.url)
        .timeout(timeout)
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
    if let Some(token) = &target.bearer_token {
        request = request.bearer_auth(token);
    }
    let scraped = match request.send().await {
        Ok(response) if response.status().is_success() => {
            let openmetrics = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("application/openmetrics-text"));
            match response.text().await {
                Ok(text) => parse(&text, openmetrics, now_ns).map_err(|e| format!("unparsable exposition: {e}")),
                Err(e) => Err(e.to_string()),
            }
        }
        Ok(response) => Err(format!("status {}", response.status())),
        Err(e) => Err(e.to_string()),
    };
    samples_of(target, scraped, started.elapsed().as_secs_f64(), now_ns)
}

/// An exposition already in hand, as a scrape of `target` would store it: the gateway's own
/// counters, read in process when it stops, so that its last counts are not missed.
pub fn exposition(target: &ScrapeTarget, text: &str, openmetrics: bool, now_ns: i64) -> Batch {
    let parsed = parse(text, openmetrics, now_ns).map_err(|e| format!("unparsable exposition: {e}"));
    samples_of(target, parsed, 0.0, now_ns)
}

/// The rows of one scrape: its samples, and `up`, `scrape_duration_seconds`,
/// `scrape_samples_scraped`.
fn samples_of(target: &ScrapeTarget, scraped: Result<Vec<Parsed>, String>, duration: f64, now_ns: i64) -> Batch {
    let instance = reqwest::Url::parse(&target.url)
        .ok()
        .map(|u| format!("{}:{}", u.host_str().unwrap_or(""), u.port_or_known_default().unwrap_or(80)))
        .unwrap_or_default();
    let job = target.job.clone().unwrap_or_else(|| instance.clone());
    let mut batch = Batch::default();
    let mut row = |metric: &str, kind: &'static str, mut labels: BTreeMap<String, String>, ts_ns: i64, value: f64| {
        let tenant = match &target.tenant_label {
            None => target.tenant.clone(),
            Some(label) => match labels.get(label) {
                Some(tenant) if crate::auth::valid_tenant(tenant) => tenant.clone(),
                // The scrape's own series (`up`, `scrape_*`) belong to `tenant`; others of no
                // tenant are dropped.
                _ if metric == "up" || metric.starts_with("scrape_") => target.tenant.clone(),
                _ => return,
            },
        };
        if tenant.is_empty() {
            return;
        }
        labels.insert("job".into(), job.clone());
        labels.insert("instance".into(), instance.clone());
        batch.samples.push(SampleRow {
            tenant,
            metric: metric.to_string(),
            labels: serde_json::to_string(&labels).expect("json"),
            kind,
            ts_ns,
            value,
            histogram: None,
            metered: target.metered,
        });
    };
    let up = match scraped {
        Ok(samples) => {
            let count = samples.len();
            for sample in samples {
                row(&sample.name, sample.kind, sample.labels, sample.ts_ns, sample.value);
            }
            row("scrape_samples_scraped", "gauge", BTreeMap::new(), now_ns, count as f64);
            1.0
        }
        Err(error) => {
            tracing::debug!(url = %target.url, %error, "scrape failed");
            0.0
        }
    };
    row("up", "gauge", BTreeMap::new(), now_ns, up);
    row("scrape_duration_seconds", "gauge", BTreeMap::new(), now_ns, duration);
    batch
}

/// One parsed sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    pub ts_ns: i64,
    pub kind: &'static str,
}

/// Parses the Prometheus text format 0.0.4 (timestamps in ms) or OpenMetrics (timestamps in s).
pub fn parse(text: &str, openmetrics: bool, default_ts_ns: i64) -> Result<Vec<Parsed>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE")
                && let (Some(name), Some(kind)) = (words.next(), words.next())
            {
                types.insert(name.to_string(), kind.to_string());
            }
            if comment.trim() == "EOF" {
                break;
            }
            continue;
        }
        let parsed =
            sample(line, openmetrics, default_ts_ns, &types).map_err(|e| format!("line {}: {e}", number + 1))?;
        out.push(parsed);
    }
    Ok(out)
}

fn sample(
    line: &str,
    openmetrics: bool,
    default_ts_ns: i64,
    types: &BTreeMap<String, String>,
) -> Result<Parsed, String> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err("label value must be quoted".into());
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(other) => value.push(other),
                                None => return Err("unterminated label value".into()),
                            },
                            Some('"') => break,
                            Some(c) => value.push(c),
                            None => return Err("unterminated label value".into()),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
        let end = end.ok_or("unterminated label set")?;
        rest = &after[end..];
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next().ok_or("no value")? {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        text => text.parse().map_err(|_| format!("bad value {text:?}"))?,
    };
    let ts_ns = match fields.next() {
        None => default_ts_ns,
        Some(text) if openmetrics => (text.parse::<f64>().map_err(|_| format!("bad timestamp {text:?}"))? * 1e9) as i64,
        Some(text) => text.parse::<i64>().map_err(|_| format!("bad timestamp {text:?}"))?.saturating_mul(1_000_000),
    };
    let family = ["_total", "_bucket", "_count", "_sum", "_created"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix).filter(|base| types.contains_key(*base)))
        .unwrap_or(name);
    let kind = match types.get(family).map(String::as_str) {
        Some("counter") => "counter",
        Some("histogram") => "histogram",
        Some("summary") => "summary",
        _ => "gauge",
    };
    Ok(Parsed { name: name.to_string(), labels, value, ts_ns, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_gone_from_a_scrape_are_marked_stale() {
        let target = ScrapeTarget {
            tenant: "acme".into(),
            url: "http://127.0.0.1:9/metrics".into(),
            job: Some("app".into()),
            interval: None,
            timeout: None,
            bearer_token: None,
            tenant_label: None,
            metered: false,
        };
        let mut series = Series::default();
        let mut first = exposition(&target, "a 1\nb{x=\"1\"} 2\nc 3 1000\n", false, 10);
        series.mark_stale(&mut first, 10);
        assert!(first.samples.iter().all(|s| !s.is_stale()));
        let mut second = exposition(&target, "a 1\n", false, 20);
        series.mark_stale(&mut second, 20);
        let stale: Vec<(&str, i64)> =
            second.samples.iter().filter(|s| s.is_stale()).map(|s| (s.metric.as_str(), s.ts_ns)).collect();
        // b is gone; c had a time of its own, so it is not tracked.
        assert_eq!(stale, vec![("b", 20)]);
        let mut third = samples_of(&target, Err("refused".into()), 0.0, 30);
        series.mark_stale(&mut third, 30);
        let mut stale: Vec<&str> = third.samples.iter().filter(|s| s.is_stale()).map(|s| s.metric.as_str()).collect();
        stale.sort();
        assert_eq!(stale, vec!["a", "scrape_samples_scraped"]);
    }

    #[test]
    fn both_exposition_formats_parse() {
        let text = "# HELP http_requests_total Requests.\n# TYPE http_requests_total counter\n\
                    http_requests_total{method=\"post\",code=\"200\"} 1027 1395066363000\n\
                    http_requests_total{method=\"get\",path=\"/a \\\"b\\\"\"} 3\n\
                    # TYPE temp gauge\ntemp -1.5\nlatency_bucket{le=\"+Inf\"} +Inf\n";
        let samples = parse(text, false, 42).unwrap();
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].labels["code"], "200");
        assert_eq!(
            (samples[0].value, samples[0].ts_ns, samples[0].kind),
            (1027.0, 1_395_066_363_000_000_000, "counter")
        );
        assert_eq!(samples[1].labels["path"], "/a \"b\"");
        assert_eq!((samples[1].ts_ns, samples[2].kind, samples[2].value), (42, "gauge", -1.5));
        assert!(samples[3].value.is_infinite());

        let open = "# TYPE jobs counter\njobs_total 5 1700000000.5\njobs_created 1700000000\n# EOF\nignored 1\n";
        let samples = parse(open, true, 0).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!((samples[0].kind, samples[0].ts_ns), ("counter", 1_700_000_000_500_000_000));
        assert!(parse("bad-name 1", false, 0).unwrap_err().contains("line 1"));
        assert!(parse("x{a=\"1} 2", false, 0).is_err());
        assert!(parse("x one", false, 0).unwrap_err().contains("bad value"));
    }
}
