//! The collector's health for operators: its own `/metrics`, sampled every 10 s, and the page.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use collector::receivers::scrape;
use contract::Viewer;
use maud::{PreEscaped, html};

use super::{Ui, error_page, page};
use crate::charts;

/// Samples kept: an hour's at one every 10 s.
const KEPT: usize = 360;

/// The collector's counters at one moment.
#[derive(Debug, Clone, Default)]
pub(super) struct HealthSample {
    at: i64,
    accepted: f64,
    rejected: BTreeMap<String, f64>,
    queue_depth: f64,
    commit_seconds_sum: f64,
    commits: f64,
}

/// Scrapes the collector's counters every 10 s (the last hour is kept), while the UI lives.
pub(super) async fn sample(ui: Weak<Ui>) {
    loop {
        let Some(strong) = ui.upgrade() else { return };
        let url = strong.config.collector_metrics_url.clone().unwrap_or_default();
        let http = strong.http.clone();
        drop(strong);
        if let Some(sample) = read(&http, &url).await {
            let Some(strong) = ui.upgrade() else { return };
            let mut health = strong.health.lock().unwrap();
            health.push_back(sample);
            while health.len() > KEPT {
                health.pop_front();
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// One reading of the collector's `/metrics`, when it answers 200 with metrics that parse.
async fn read(http: &reqwest::Client, url: &str) -> Option<HealthSample> {
    let (status, text) = crate::http_get(http, url, None).await?;
    if status != 200 {
        return None;
    }
    parse_health(&text)
}

/// The counters the page shows, from the collector's exposition (OpenMetrics text).
fn parse_health(text: &str) -> Option<HealthSample> {
    let samples = match scrape::parse(text, true, 0) {
        Ok(samples) => samples,
        Err(error) => {
            tracing::debug!(%error, "the collector's metrics do not parse");
            return None;
        }
    };
    let mut health = HealthSample { at: chrono::Utc::now().timestamp(), ..HealthSample::default() };
    for sample in samples {
        match sample.name.as_str() {
            "sfaas_collector_accepted_total" => health.accepted += sample.value,
            "sfaas_collector_rejected_total" => {
                let reason = sample.labels.get("reason").map_or("?", String::as_str);
                *health.rejected.entry(reason.to_string()).or_default() += sample.value;
            }
            "sfaas_collector_queue_depth" => health.queue_depth = sample.value,
            "sfaas_collector_commit_seconds_sum" => health.commit_seconds_sum = sample.value,
            "sfaas_collector_commit_seconds_count" => health.commits = sample.value,
            _ => {}
        }
    }
    Some(health)
}

/// Operators: the collector's ingest rate, refusals by reason, queue depth, commit latency.
pub(super) async fn health(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    let viewer = match ui.viewer(&headers) {
        Ok(v @ Viewer::Admin) => v,
        Ok(v) => return error_page(StatusCode::FORBIDDEN, Some(&v), "the collector's health is for operators"),
        Err(r) => return r,
    };
    let Some(url) = &ui.config.collector_metrics_url else {
        let body = html! { p { "No collector is known to this dashboard." } };
        return page("Collector", Some(&viewer), body).into_response();
    };
    // A fresh reading now, beside the last hour's.
    let now = read(&ui.http, url).await;
    let samples: Vec<HealthSample> = ui.health.lock().unwrap().iter().cloned().chain(now.clone()).collect();
    let rate: Vec<(i64, f64)> = samples
        .windows(2)
        .filter(|w| w[1].at > w[0].at)
        .map(|w| (w[1].at, ((w[1].accepted - w[0].accepted) / (w[1].at - w[0].at) as f64).max(0.0)))
        .collect();
    let Some(latest) = now.or_else(|| samples.last().cloned()) else {
        let body = html! { p.bad { "The collector does not answer." } };
        return page("Collector", Some(&viewer), body).into_response();
    };
    let latency_ms = if latest.commits > 0.0 { latest.commit_seconds_sum / latest.commits * 1000.0 } else { 0.0 };
    let body = html! {
        .cards {
            .card { "items accepted" b #accepted { (latest.accepted) } }
            .card { "queue depth" b #queue { (latest.queue_depth) } }
            .card { "mean commit" b { (format!("{latency_ms:.1}")) " ms" } }
        }
        // plotters escapes the text it draws.
        (PreEscaped(charts::line("Ingest rate (items/s)", "items/s", &rate)))
        h2 { "Refused, by reason" }
        table #rejected {
            tbody {
                @for (reason, count) in &latest.rejected {
                    tr { td { (reason) } td.n { (count) } }
                }
                @if latest.rejected.is_empty() {
                    tr { td.muted { "nothing refused" } }
                }
            }
        }
    };
    page("Collector", Some(&viewer), body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collectors_counters_are_read_from_its_exposition() {
        let text = "# HELP sfaas_collector_accepted Items stored.\n# TYPE sfaas_collector_accepted counter\n\
                    sfaas_collector_accepted_total{signal=\"traces\",protocol=\"otlp_http\"} 7\n\
                    sfaas_collector_accepted_total{signal=\"metrics\",protocol=\"otlp_grpc\"} 3\n\
                    # TYPE sfaas_collector_rejected counter\n\
                    sfaas_collector_rejected_total{signal=\"traces\",reason=\"quota\"} 2\n\
                    sfaas_collector_rejected_total{signal=\"logs\",reason=\"quota\"} 1\n\
                    # TYPE sfaas_collector_queue_depth gauge\nsfaas_collector_queue_depth 4\n\
                    # TYPE sfaas_collector_commit_seconds histogram\n\
                    sfaas_collector_commit_seconds_sum 0.5\nsfaas_collector_commit_seconds_count 10\n\
                    sfaas_collector_commit_seconds_bucket{le=\"+Inf\"} 10\n# EOF\n";
        let health = parse_health(text).unwrap();
        assert_eq!((health.accepted, health.queue_depth, health.commits), (10.0, 4.0, 10.0));
        assert_eq!(health.commit_seconds_sum, 0.5);
        assert_eq!(health.rejected, BTreeMap::from([("quota".to_string(), 3.0)]));
    }
}
