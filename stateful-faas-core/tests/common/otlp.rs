//! A real OTLP trace receiver for the tests, and readers of the spans it received.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Default, Clone)]
pub struct Received {
    pub requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    pub authorization: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(auth) = request.metadata().get("authorization") {
            self.authorization.lock().unwrap().push(auth.to_str().unwrap().to_string());
        }
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Sends the core's spans to `endpoint` over OTLP/gRPC (a [`grpc_receiver`]).
pub fn export_to(config: &mut stateful_faas_core::CoreConfig, endpoint: String) {
    config.telemetry.endpoint = Some(endpoint);
    config.telemetry.protocol = stateful_faas_core::telemetry::OtlpProtocol::Grpc;
}

/// An OTLP/gRPC trace receiver (the generated service) on loopback: its endpoint, and what it
/// received.
pub async fn grpc_receiver() -> (String, Received) {
    grpc_receiver_at("127.0.0.1:0".parse().unwrap()).await
}

/// [`grpc_receiver`] on a given address.
pub async fn grpc_receiver_at(addr: std::net::SocketAddr) -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), received)
}

/// Spans with their resource's namespace.
pub fn spans(requests: &[ExportTraceServiceRequest]) -> Vec<(String, String, Span)> {
    let mut out = Vec::new();
    for request in requests {
        for resource_spans in &request.resource_spans {
            let resource = resource_spans.resource.clone().unwrap_or_default();
            let namespace = string_attr(&resource.attributes, "service.namespace").unwrap_or_default();
            let service = string_attr(&resource.attributes, "service.name").unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    out.push((service.clone(), namespace.clone(), span.clone()));
                }
            }
        }
    }
    out
}

pub fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

pub fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attr(attributes, key)? {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

pub fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key)? {
        AnyValue::IntValue(v) => Some(*v),
        _ => None,
    }
}

pub fn bool_attr(attributes: &[KeyValue], key: &str) -> Option<bool> {
    match attr(attributes, key)? {
        AnyValue::BoolValue(v) => Some(*v),
        _ => None,
    }
}
