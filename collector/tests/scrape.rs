//! Scraping configured targets, in text format 0.0.4 and OpenMetrics, with `up` and the scrape
//! duration, under the target's tenant.

use crate::common;

use std::time::Duration;

use collector::receivers::scrape::ScrapeTarget;
use common::{Backend, start};

async fn serve(content_type: &'static str, body: &'static str) -> String {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let authorized = headers.get("authorization").is_some_and(|v| v == "Bearer scrape-secret");
            if !authorized {
                return (axum::http::StatusCode::UNAUTHORIZED, [("content-type", "text/plain")], "no");
            }
            (axum::http::StatusCode::OK, [("content-type", content_type)], body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn target(tenant: &str, url: &str, job: &str, token: Option<&str>) -> ScrapeTarget {
    ScrapeTarget {
        tenant: tenant.into(),
        url: url.into(),
        job: Some(job.into()),
        interval: Some(Duration::from_millis(300)),
        timeout: Some(Duration::from_millis(250)),
        bearer_token: token.map(str::to_string),
        tenant_label: None,
        metered: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_scraped_per_tenant_with_up_and_duration() {
    let text = serve(
        "text/plain; version=0.0.4",
        "# TYPE queue_jobs_total counter\nqueue_jobs_total{queue=\"mail\"} 12\n# TYPE temp gauge\ntemp 21.5\n",
    )
    .await;
    let open = serve(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "# TYPE orders counter\norders_total{shop=\"eu\"} 7\n# EOF\n",
    )
    .await;
    let dead = "http://127.0.0.1:9/metrics".to_string();
    let backend = Backend::Sqlite(tempfile::tempdir().unwrap());
    let running = start(&backend, |config| {
        config.scrape = vec![
            target("acme", &text, "text", Some("scrape-secret")),
            target("globex", &open, "open", Some("scrape-secret")),
            target("acme", &dead, "dead", None),
            target("acme", &open, "denied", None),
        ];
    })
    .await;
    // The highest `up` of a job's scrapes so far (a scrape slower than its 250 ms timeout, on a
    // loaded machine, is down once; a reachable target is up in the others).
    let up_of = |samples: &[collector::model::SampleRow], job: &str| -> f64 {
        samples
            .iter()
            .filter(|s| serde_json::from_str::<serde_json::Value>(&s.labels).unwrap()["job"] == job)
            .map(|s| s.value)
            .fold(-1.0, f64::max)
    };
    let store = running.collector.store.clone();
    let mut ready = false;
    for _ in 0..100 {
        let up = store.samples("acme", "up").await.unwrap();
        if up_of(&up, "text") == 1.0
            && up_of(&up, "dead") == 0.0
            && up_of(&up, "denied") == 0.0
            && !store.samples("globex", "orders_total").await.unwrap().is_empty()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "scrapes did not arrive");
    let up = store.samples("acme", "up").await.unwrap();
    assert_eq!(up_of(&up, "text"), 1.0);
    assert_eq!(up_of(&up, "dead"), 0.0, "an unreachable target is down");
    assert_eq!(up_of(&up, "denied"), 0.0, "a target answering 401 is down");
    let jobs = store.samples("acme", "queue_jobs_total").await.unwrap();
    let labels: serde_json::Value = serde_json::from_str(&jobs[0].labels).unwrap();
    assert_eq!((labels["queue"].as_str(), labels["job"].as_str()), (Some("mail"), Some("text")));
    assert!(labels["instance"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!((jobs[0].kind, jobs[0].value), ("counter", 12.0));
    assert_eq!(store.samples("acme", "temp").await.unwrap()[0].value, 21.5);
    assert!(!store.samples("acme", "scrape_duration_seconds").await.unwrap().is_empty());
    let orders = store.samples("globex", "orders_total").await.unwrap();
    assert_eq!((orders[0].kind, orders[0].value), ("counter", 7.0));
    assert!(store.samples("acme", "orders_total").await.unwrap().is_empty(), "globex's target is not acme's");
    running.shutdown().await;
}

#[test]
fn scrape_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scrape.yml");
    std::fs::write(
        &path,
        "targets:\n  - {tenant: acme, url: 'http://127.0.0.1:9100/metrics', interval: 15s, timeout: 5s}\n",
    )
    .unwrap();
    let targets = collector::receivers::scrape::load(&path).unwrap();
    assert_eq!(targets[0].interval, Some(Duration::from_secs(15)));
    std::fs::write(&path, "targets:\n  - {tenant: Bad_Tenant, url: 'http://x/metrics'}\n").unwrap();
    assert!(collector::receivers::scrape::load(&path).unwrap_err().contains("Bad_Tenant"));
    std::fs::write(&path, "targets:\n  - {tenant: acme, url: 'ftp://x/metrics'}\n").unwrap();
    assert!(collector::receivers::scrape::load(&path).unwrap_err().contains("not http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_target_splits_series_by_namespace_and_meters_them() {
    let gateway = serve(
        "text/plain; version=0.0.4",
        "# TYPE gateway_function_invocation counter\n\
         gateway_function_invocation_total{function_name=\"f.acme\",namespace=\"acme\",code=\"200\"} 3\n\
         gateway_function_invocation_total{function_name=\"g.globex\",namespace=\"globex\",code=\"200\"} 5\n\
         sfaas_async_queue_depth 0\n",
    )
    .await;
    let mut target = collector::receivers::scrape::platform_target(gateway, "scrape-secret".into());
    target.interval = Some(Duration::from_millis(300));
    let backend = Backend::Sqlite(tempfile::tempdir().unwrap());
    let mut running = start(&backend, |_| {}).await;
    running.scrape(target);
    let store = running.collector.store.clone();
    let mut acme = Vec::new();
    for _ in 0..50 {
        acme = store.samples("acme", "gateway_function_invocation_total").await.unwrap();
        if !acme.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((acme[0].value, acme[0].metered), (3.0, true), "the platform's series are billable");
    let globex = store.samples("globex", "gateway_function_invocation_total").await.unwrap();
    assert_eq!(globex[0].value, 5.0);
    assert!(
        store.tenants().await.unwrap().iter().all(|t| t == "acme" || t == "globex"),
        "series of no tenant are dropped"
    );
    running.shutdown().await;
}
