//! Prometheus remote_write: Debian's real Prometheus server scrapes a target and remote-writes
//! to the collector with Basic auth (tenant as user, token as password); and bad bodies.

use crate::common;

use std::time::Duration;

use common::{Backend, backends, start};
use prost::Message;

fn prometheus() -> Option<std::path::PathBuf> {
    testkit::require_program("prometheus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_remote_writes_under_its_tenant() {
    let Some(prometheus) = prometheus() else { return };
    for backend in backends() {
        let running = start(&backend, |_| {}).await;
        let dir = tempfile::tempdir().unwrap();
        let web_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Prometheus scrapes itself and the collector's own /metrics, and remote-writes both.
        let config = format!(
            "global: {{scrape_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: prometheus\n  static_configs: [{{targets: ['127.0.0.1:{web_port}']}}]\n\
             - job_name: collector\n  static_configs: [{{targets: ['{collector}']}}]\n\
             remote_write:\n\
             - url: http://{collector}/api/v1/write\n  basic_auth: {{username: acme, password: acme-token}}\n  \
               queue_config: {{batch_send_deadline: 1s}}\n",
            collector = running.otlp_http_addr
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let mut server = std::process::Command::new(&prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let store = running.collector.store.clone();
        let mut up = Vec::new();
        for _ in 0..300 {
            up = store.samples("acme", "up").await.unwrap();
            let jobs: std::collections::BTreeSet<String> = up
                .iter()
                .map(|s| {
                    serde_json::from_str::<serde_json::Value>(&s.labels).unwrap()["job"].as_str().unwrap().to_string()
                })
                .collect();
            if jobs.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.kill().unwrap();
        server.wait().unwrap();
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        assert!(
            !up.is_empty(),
            "{}: no `up` samples arrived from Prometheus; its log ends with:\n{}",
            backend.name(),
            tail.join("\n")
        );
        let labels: serde_json::Value = serde_json::from_str(&up[0].labels).unwrap();
        assert!(labels["instance"].is_string() && labels["job"].is_string(), "{labels}");
        assert!(up.iter().all(|s| s.value == 1.0 && !s.metered && s.ts_ns > 1_600_000_000_000_000_000));
        assert_eq!(store.counts("globex").await.unwrap().samples, 0);
        let counters = store.samples("acme", "sfaas_collector_accepted_total").await.unwrap();
        assert!(counters.iter().all(|s| s.kind == "counter"));
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remote_write_bodies_and_credentials_are_refused_clearly() {
    use collector::receivers::remote_write::{Label, Sample, TimeSeries, WriteRequest};
    let backend = Backend::Sqlite(tempfile::tempdir().unwrap());
    let running = start(&backend, |_| {}).await;
    let url = format!("http://{}/api/v1/write", running.otlp_http_addr);
    let request = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: vec![
                Label { name: "__name__".into(), value: "jobs_total".into() },
                Label { name: "queue".into(), value: "a".into() },
            ],
            samples: vec![Sample { value: 5.0, timestamp: 1_700_000_000_000 }],
        }],
    };
    let body = snap::raw::Encoder::new().compress_vec(&request.encode_to_vec()).unwrap();
    let send = |auth: Option<(&str, &str)>, body: Vec<u8>| {
        let mut r = reqwest::Client::new().post(&url).header("content-encoding", "snappy").body(body);
        if let Some((user, password)) = auth {
            r = r.basic_auth(user, Some(password));
        }
        r.send()
    };
    assert_eq!(send(None, body.clone()).await.unwrap().status(), 401);
    assert_eq!(send(Some(("acme", "nope")), body.clone()).await.unwrap().status(), 401);
    let mismatch = send(Some(("globex", "acme-token")), body.clone()).await.unwrap();
    assert_eq!(mismatch.status(), 403, "the Basic user names the tenant and must agree with the token");
    let r = send(Some(("acme", "acme-token")), b"not snappy at all".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid snappy"));
    let truncated = snap::raw::Encoder::new().compress_vec(&request.encode_to_vec()[..5]).unwrap();
    let r = send(Some(("acme", "acme-token")), truncated).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid WriteRequest"));
    assert_eq!(send(Some(("acme", "acme-token")), body.clone()).await.unwrap().status(), 204);
    assert_eq!(send(Some(("acme", "acme-token")), body).await.unwrap().status(), 204);
    let samples = running.collector.store.samples("acme", "jobs_total").await.unwrap();
    assert_eq!(samples.len(), 1, "the same sample twice is stored once");
    assert_eq!((samples[0].kind, samples[0].value, samples[0].labels.as_str()), ("counter", 5.0, r#"{"queue":"a"}"#));
    running.shutdown().await;
}
