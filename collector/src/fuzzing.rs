//! Entry points for the fuzz targets in `fuzz/` (built by `cargo fuzz`, which sets
//! `--cfg fuzzing`; nothing here is in a normal build). Each runs one decoder on arbitrary bytes
//! and the conversion behind it, as a request would: an `Err` is fine, a panic is a bug.

use crate::auth::{Credential, Sender};
use crate::receivers::{jaeger_thrift, otlp, otlp_http, remote_write, scrape};
use opentelemetry_proto::tonic::collector::{
    logs::v1::ExportLogsServiceRequest, metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest,
};

/// A tenant's ingest token and the platform's meter token, the two kinds of sender.
fn senders() -> [Sender; 2] {
    [
        Sender { credential: Credential::Ingest { tenant: "acme".into() }, org_id: None },
        Sender { credential: Credential::Meter, org_id: None },
    ]
}

/// OTLP traces, metrics and logs (the first byte picks the signal and protobuf or JSON).
pub fn otlp(data: &[u8]) {
    let Some((&choice, data)) = data.split_first() else { return };
    let encoding = if choice & 1 == 0 { otlp_http::Encoding::Protobuf } else { otlp_http::Encoding::Json };
    for sender in senders() {
        match choice >> 1 & 3 {
            0 => {
                if let Ok(request) = otlp_http::decode::<ExportTraceServiceRequest>(encoding, data) {
                    let _ = otlp::traces(request, &sender);
                }
            }
            1 => {
                if let Ok(request) = otlp_http::decode::<ExportMetricsServiceRequest>(encoding, data) {
                    let _ = otlp::metrics(request, &sender, Default::default());
                }
            }
            _ => {
                if let Ok(request) = otlp_http::decode::<ExportLogsServiceRequest>(encoding, data) {
                    let _ = otlp::logs(request, &sender);
                }
            }
        }
    }
}

/// An OTLP trace request's protobuf body, read by the receiver's own decoder and by prost: they
/// must agree (both refuse it, or both give the same rows).
pub fn otlp_wire(data: &[u8]) {
    for sender in senders() {
        if let Some(difference) = crate::receivers::otlp_wire::differs_from_prost(data, &sender) {
            panic!("{difference}");
        }
    }
}

/// A Jaeger thrift `Batch` (binary protocol), as `POST /api/traces` takes it.
pub fn jaeger(data: &[u8]) {
    for sender in senders() {
        if let Ok(batch) = jaeger_thrift::batch(data) {
            let _ = jaeger_thrift::rows(batch, &sender);
        }
    }
}

/// A remote_write body: a snappy block holding a `WriteRequest`.
pub fn remote_write(data: &[u8]) {
    if let Ok(request) = remote_write::decode(data, 16 << 20) {
        let _ = remote_write::samples(request, "acme", false);
    }
}

/// The Prometheus text format and OpenMetrics, as a scrape reads them.
pub fn exposition(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let target = scrape::platform_target("http://127.0.0.1:1/metrics".into(), "token".into());
    for openmetrics in [false, true] {
        let _ = scrape::parse(&text, openmetrics, 1_700_000_000_000_000_000);
        scrape::exposition(&target, &text, openmetrics, 1_700_000_000_000_000_000);
    }
}
