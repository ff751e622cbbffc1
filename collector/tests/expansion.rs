//! A request that names something large once and has many items (a resource, a metric name, a
//! series' labels, shared by a million empty spans or samples) would expand into rows that
//! each hold their own copy: a few megabytes in, terabytes out, and the collector gone. Such a
//! request is refused whole with a clear 400, nothing of it is stored, and the same items
//! with small shared parts are accepted.

use crate::common;

use common::{backends, start};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

const MIB: usize = 1 << 20;

fn string(key: &str, value: &str) -> KeyValue {
    let value = Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) });
    KeyValue { key: key.into(), value, ..Default::default() }
}

/// 100 empty spans under one resource whose service name is `service`.
fn traces(service: &str) -> Vec<u8> {
    let spans = (1..=100u64)
        .map(|id| Span { trace_id: vec![7; 16], span_id: id.to_be_bytes().to_vec(), ..Default::default() })
        .collect();
    let resource = Resource { attributes: vec![string("service.name", service)], ..Default::default() };
    let resource_spans = ResourceSpans {
        resource: Some(resource),
        scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
        ..Default::default()
    };
    ExportTraceServiceRequest { resource_spans: vec![resource_spans] }.encode_to_vec()
}

/// 100 points of one gauge named `name`.
fn metrics(name: &str) -> Vec<u8> {
    let data_points = (1..=100u64)
        .map(|i| NumberDataPoint {
            time_unix_nano: 1_700_000_000_000_000_000 + i,
            value: Some(number_data_point::Value::AsDouble(1.0)),
            ..Default::default()
        })
        .collect();
    let metric =
        Metric { name: name.into(), data: Some(metric::Data::Gauge(Gauge { data_points })), ..Default::default() };
    let resource_metrics = ResourceMetrics {
        scope_metrics: vec![ScopeMetrics { metrics: vec![metric], ..Default::default() }],
        ..Default::default()
    };
    ExportMetricsServiceRequest { resource_metrics: vec![resource_metrics] }.encode_to_vec()
}

/// One remote_write series named `name` with 100 samples, snappy-compressed.
fn remote_write(name: &str) -> Vec<u8> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct WriteRequest {
        #[prost(message, repeated, tag = "1")]
        timeseries: Vec<TimeSeries>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct TimeSeries {
        #[prost(message, repeated, tag = "1")]
        labels: Vec<Label>,
        #[prost(message, repeated, tag = "2")]
        samples: Vec<Sample>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Label {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(string, tag = "2")]
        value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Sample {
        #[prost(double, tag = "1")]
        value: f64,
        #[prost(int64, tag = "2")]
        timestamp: i64,
    }
    let samples = (1..=100).map(|i| Sample { value: 1.0, timestamp: 1_700_000_000_000 + i }).collect();
    let labels = vec![Label { name: "__name__".into(), value: name.into() }];
    let request = WriteRequest { timeseries: vec![TimeSeries { labels, samples }] };
    snap::raw::Encoder::new().compress_vec(&request.encode_to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_would_expand_past_the_bound_is_refused_whole() {
    let backend = backends().into_iter().next().unwrap();
    let running = start(&backend, |_| {}).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{}", running.otlp_http_addr);
    let post = |path: &str, content_type: &str, body: Vec<u8>| {
        let request = http.post(format!("{base}{path}")).header("content-type", content_type).body(body);
        request.bearer_auth("acme-token").header("content-encoding", "identity").send()
    };
    let large = "x".repeat(MIB);
    let store = running.collector.store.clone();
    for (path, content_type, body) in [
        ("/v1/traces", "application/x-protobuf", traces(&large)),
        ("/v1/metrics", "application/x-protobuf", metrics(&large)),
        ("/api/v1/write", "application/x-protobuf", remote_write(&large)),
    ] {
        // About 1 MiB in, 100 MiB of rows out.
        let response = post(path, content_type, body).await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("expands to more than 64 MiB"), "{path}: {text}");
    }
    let counts = store.counts("acme").await.unwrap();
    assert_eq!((counts.spans, counts.samples), (0, 0), "nothing of a refused request is stored");
    for (path, content_type, body) in [
        ("/v1/traces", "application/x-protobuf", traces("cart")),
        ("/v1/metrics", "application/x-protobuf", metrics("cart_items")),
        ("/api/v1/write", "application/x-protobuf", remote_write("cart_total")),
    ] {
        let response = post(path, content_type, body).await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.text().await.unwrap());
    }
    let counts = store.counts("acme").await.unwrap();
    assert_eq!((counts.spans, counts.samples), (100, 200), "the same items with small shared parts");
    running.shutdown().await;
}
