//! Metrics (from the Rust SDK's OTLP metric exporter) and logs (OTLP JSON and gRPC), over HTTP
//! and gRPC, and backpressure.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Backend, backends, start};
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};

/// The Rust SDK's metric exporter over OTLP/HTTP and over gRPC (gzip).
fn metric_exporter(protocol: &str, running: &collector::RunningCollector) -> opentelemetry_otlp::MetricExporter {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    if protocol == "http" {
        return builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("http://{}/v1/metrics", running.otlp_http_addr))
            .with_headers(HashMap::from([("authorization".to_string(), "Bearer acme-token".to_string())]))
            .build()
            .unwrap();
    }
    let mut metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::new();
    metadata.insert("authorization", "Bearer acme-token".parse().unwrap());
    builder
        .with_tonic()
        .with_endpoint(format!("http://{}", running.otlp_grpc_addr))
        .with_metadata(metadata)
        .with_compression(opentelemetry_otlp::Compression::Gzip)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_metrics_and_logs_over_http_and_grpc_are_stored_per_tenant() {
    for backend in backends() {
        let running = start(&backend, |_| {}).await;
        let store = &running.collector.store;
        for protocol in ["http", "grpc"] {
            let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                .with_periodic_exporter(metric_exporter(protocol, &running))
                .with_resource(
                    opentelemetry_sdk::Resource::builder_empty()
                        .with_attributes([
                            KeyValue::new("service.name", "shop"),
                            KeyValue::new("service.namespace", "acme"),
                            KeyValue::new("deployment.environment.name", "prod"),
                        ])
                        .build(),
                )
                .build();
            let meter = provider.meter("collector-test");
            let orders = meter.u64_counter(format!("orders_{protocol}")).build();
            orders.add(3, &[KeyValue::new("region", "eu")]);
            orders.add(4, &[KeyValue::new("region", "eu")]);
            let latency = meter.f64_histogram(format!("latency_{protocol}")).with_boundaries(vec![0.1, 1.0]).build();
            for value in [0.05, 0.5, 2.0] {
                latency.record(value, &[]);
            }
            // OTel's dotted names, units and attributes, as PromQL written for Prometheus
            // selects them.
            let duration = meter.f64_histogram("http.server.duration").with_unit("s").build();
            duration.record(0.25, &[KeyValue::new("http.request.method", protocol)]);
            let fill = meter.f64_gauge("queue.fill").with_unit("1").build();
            fill.record(0.5, &[]);
            tokio::task::spawn_blocking(move || provider.shutdown()).await.unwrap().unwrap();

            let what = format!("{} over {protocol}", backend.name());
            let counter = store.samples("acme", &format!("orders_{protocol}_total")).await.unwrap();
            assert_eq!(counter.len(), 1, "{what}: {counter:?}");
            assert_eq!((counter[0].kind, counter[0].value), ("counter", 7.0), "{what}");
            let labels: serde_json::Value = serde_json::from_str(&counter[0].labels).unwrap();
            assert_eq!(labels, serde_json::json!({"region": "eu", "job": "acme/shop"}), "{what}");
            let duration = store.samples("acme", "http_server_duration_seconds").await.unwrap();
            let labels: Vec<serde_json::Value> =
                duration.iter().map(|s| serde_json::from_str(&s.labels).unwrap()).collect();
            let expected = serde_json::json!({"http_request_method": protocol, "job": "acme/shop"});
            assert!(labels.contains(&expected), "{what}: {labels:?}");
            // The resource's other attributes are on `target_info`, as Prometheus keeps them.
            let info = store.samples("acme", "target_info").await.unwrap();
            let labels: Vec<serde_json::Value> =
                info.iter().map(|s| serde_json::from_str(&s.labels).unwrap()).collect();
            let expected = serde_json::json!({"deployment_environment_name": "prod", "job": "acme/shop"});
            assert!(!info.is_empty() && info.iter().all(|s| s.value == 1.0), "{what}: {info:?}");
            assert!(labels.iter().all(|l| *l == expected), "{what}: {labels:?}");
            let fill = store.samples("acme", "queue_fill_ratio").await.unwrap();
            assert!(fill.iter().any(|s| s.value == 0.5), "{what}: {fill:?}");
            assert!(store.samples("acme", "http.server.duration").await.unwrap().is_empty(), "{what}");
            let histogram = store.samples("acme", &format!("latency_{protocol}")).await.unwrap();
            let detail: serde_json::Value = serde_json::from_str(histogram[0].histogram.as_deref().unwrap()).unwrap();
            assert_eq!(detail["count"], 3, "{what}");
            assert_eq!(detail["buckets"], serde_json::json!([[0.1, 1], [1.0, 2], ["+Inf", 3]]), "{what}");
            assert!(store.samples("globex", &format!("orders_{protocol}")).await.unwrap().is_empty(), "{what}");
        }

        // One log record, as OTLP JSON twice and through the generated gRPC client once.
        let logs = serde_json::json!({"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "shop"}}]},
            "scopeLogs": [{"logRecords": [{"timeUnixNano": "1700000000000000000", "severityNumber": 9, "severityText": "INFO",
            "body": {"stringValue": "order placed"}, "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174"}]}]}]});
        for _ in 0..2 {
            let r = reqwest::Client::new()
                .post(format!("http://{}/v1/logs", running.otlp_http_addr))
                .bearer_auth("acme-token")
                .json(&logs)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        use opentelemetry_proto::tonic::collector::logs::v1::{
            ExportLogsServiceRequest, logs_service_client::LogsServiceClient,
        };
        let request: ExportLogsServiceRequest = serde_json::from_value(logs).unwrap();
        let mut client = LogsServiceClient::connect(format!("http://{}", running.otlp_grpc_addr))
            .await
            .unwrap()
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        let mut with_token = tonic::Request::new(request.clone());
        with_token.metadata_mut().insert("authorization", "Bearer acme-token".parse().unwrap());
        let response = client.export(with_token).await.unwrap().into_inner();
        assert_eq!(response.partial_success, None);
        let refused = client.export(tonic::Request::new(request)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(store.counts("acme").await.unwrap().logs, 1, "the same record three times is stored once");
        assert_eq!(store.counts("globex").await.unwrap().logs, 0);
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite(dir);
    let running = start(&backend, |config| config.pipeline.capacity = 3).await;
    let Backend::Sqlite(dir) = &backend else { unreachable!() };
    // Hold the database's write lock so the first batch cannot commit yet.
    let mut blocker =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", dir.path().join("telemetry.db").display()))
            .await
            .unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut blocker).await.unwrap();
    // Log records: they are committed to the SQL database (spans go to the span log).
    let url = format!("http://{}/v1/logs", running.otlp_http_addr);
    let body = |seed: u8| {
        let record = |i: u8| {
            serde_json::json!({"timeUnixNano": "1700000000000000000", "severityNumber": 9,
            "body": {"stringValue": format!("record {seed}-{i}")}})
        };
        serde_json::json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [record(1), record(2)]}]}]})
    };
    let send = |seed: u8| reqwest::Client::new().post(&url).bearer_auth("acme-token").json(&body(seed)).send();
    let first = tokio::spawn(send(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = send(2).await.unwrap();
    assert_eq!(second.status(), 503, "two records wait; two more would pass the capacity of three");
    assert_eq!(second.headers()["retry-after"], "1");
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(running.collector.store.counts("acme").await.unwrap().logs, 2);
    assert_eq!(send(2).await.unwrap().status(), 200, "accepted again once the queue drained");
    running.shutdown().await;
}

use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_each_tenant_for_its_own_period() {
    use collector::model::{Batch, LogRow, SampleRow, SpanRow};
    const HOUR: i64 = 3600 * 1_000_000_000;
    let now = 1_800_000_000_000_000_000i64; // 2027-01-15T08:00:00Z
    for backend in backends() {
        let running = start(&backend, |config| {
            config.retention = Duration::from_secs(3600);
            config.tenant_retention.insert("globex".into(), Duration::from_secs(10 * 3600));
            // The collector's own passes run a minute apart, the first a minute after start:
            // the one below (as of `now`) is the only one this test sees.
            config.clock = collector::clock::Clock::starting_at(now - 2 * HOUR);
        })
        .await;
        let span = |tenant: &str, id: u8, start_ns: i64| SpanRow {
            tenant: tenant.into(),
            trace_id: format!("{id:032x}"),
            span_id: format!("{id:016x}"),
            parent_span_id: None,
            name: "op".into(),
            kind: 1,
            start_ns,
            end_ns: start_ns.saturating_add(1),
            status_code: 0,
            status_message: String::new(),
            service_name: "s".into(),
            attributes: "{}".into(),
            events: "[]".into(),
            links: "[]".into(),
            resource: "{}".into(),
            scope: "{}".into(),
            metered: false,
        };
        let sample = |tenant: &str, ts_ns: i64| SampleRow {
            tenant: tenant.into(),
            metric: "m".into(),
            labels: "{}".into(),
            kind: "gauge",
            ts_ns,
            value: 1.0,
            histogram: None,
            metered: false,
        };
        let log = |tenant: &str, id: u8, ts_ns: i64| LogRow {
            tenant: tenant.into(),
            record_hash: format!("{id:064x}"),
            ts_ns,
            severity_number: 13,
            severity_text: "WARN".into(),
            body: "a line".into(),
            attributes: r#"{"faas.name":"f"}"#.into(),
            resource: "{}".into(),
            trace_id: None,
            span_id: None,
            metered: true,
        };
        let store = &running.collector.store;
        // Dated in the far future, arrived two hours before `now`: one sealed into a block,
        // one in the head. By date they would be kept for ever; by arrival acme's hour is over.
        let future = i64::MAX - 1;
        store.write(&Batch { spans: vec![span("acme", 5, future)], ..Default::default() }).await.unwrap();
        store.seal_spans().await.unwrap();
        let far = Batch { spans: vec![span("acme", 6, future)], samples: vec![sample("acme", future)], logs: vec![] };
        store.write(&far).await.unwrap();
        // Log lines sealed into blocks (a block a tenant): acme's 3 hours old, globex's 12.
        let sealed =
            vec![log("acme", 7, now - 3 * HOUR), log("acme", 8, now - 3 * HOUR), log("globex", 9, now - 12 * HOUR)];
        store.write(&Batch { logs: sealed, ..Default::default() }).await.unwrap();
        assert_eq!(store.seal_logs(true).await.unwrap(), 3);
        running.collector.store.clock().set(now);
        let ages = [("acme", 1, 0), ("acme", 2, 2), ("globex", 3, 2), ("globex", 4, 11)];
        let batch = Batch {
            spans: ages.iter().map(|&(tenant, id, age)| span(tenant, id, now - age * HOUR)).collect(),
            samples: ages.iter().map(|&(tenant, _, age)| sample(tenant, now - age * HOUR)).collect(),
            logs: ages.iter().map(|&(tenant, id, age)| log(tenant, id, now - age * HOUR)).collect(),
        };
        store.write(&batch).await.unwrap();
        // acme: spans 2, 5, 6, two samples, a log line and its block's two; globex: span 4, a
        // sample, a line and its block's one.
        assert_eq!(collector::retention_pass(&running.collector, now).await.unwrap(), 12, "{}", backend.name());
        let (acme, globex) = (store.counts("acme").await.unwrap(), store.counts("globex").await.unwrap());
        assert_eq!((acme.spans, acme.samples, acme.logs), (1, 1, 1), "acme keeps 1 hour, {}", backend.name());
        assert_eq!((globex.spans, globex.samples, globex.logs), (1, 1, 1), "globex keeps 10 hours, {}", backend.name());
        running.shutdown().await;
    }
}
