//! OTLP/gRPC: the Trace, Metrics and Logs `Export` services (tonic), gzip accepted. The trace
//! service takes the request's bytes undecoded: the sender is authenticated and checked against
//! its quota first, then the bytes are read straight into span rows (`otlp_wire`).
//!
//! Codes as the OTLP specification gives them: UNAUTHENTICATED without a valid token,
//! INVALID_ARGUMENT for bad data, UNAVAILABLE (retryable) when the ingest queue is full, OK with
//! `partial_success` when some items were refused.

use std::sync::Arc;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use tonic::codec::CompressionEncoding;
use tonic::codegen::{BoxFuture, StdError, http};
use tonic::{Request, Response, Status};

use super::otlp::{self, Converted};
use crate::Collector;
use crate::auth::{Sender, authenticate};
use crate::metrics::{RejectLabels, SignalLabels};
use crate::pipeline::SubmitError;

/// The three services, sharing one collector.
#[derive(Clone)]
pub struct Services(pub Arc<Collector>);

impl Services {
    fn sender<T>(&self, request: &Request<T>, signal: &'static str) -> Result<Sender, Status> {
        let metadata = request.metadata();
        let get = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok());
        authenticate(self.0.resolver.as_ref(), get("authorization"), get("x-scope-orgid")).map_err(|e| {
            self.0.metrics.rejected.get_or_create(&RejectLabels { signal, reason: "unauthenticated" }).inc();
            match e {
                crate::auth::AuthError::OrgMismatch { .. } => Status::permission_denied(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            }
        })
    }

    async fn store(
        &self,
        signal: &'static str,
        sender: &Sender,
        mut converted: Converted,
    ) -> Result<Converted, Status> {
        if converted.rejected > 0 {
            self.0
                .metrics
                .rejected
                .get_or_create(&RejectLabels { signal, reason: "tenant_or_data" })
                .inc_by(converted.rejected);
        }
        let items = converted.batch.len() as u64;
        match self.0.pipeline.submit(std::mem::take(&mut converted.batch), sender.source()).await {
            Ok(_) => {
                self.0.metrics.accepted.get_or_create(&SignalLabels { signal, protocol: "otlp_grpc" }).inc_by(items);
                Ok(converted)
            }
            Err(error) => Err(self.refused(signal, error)),
        }
    }

    /// The status of a request the pipeline refused, counted.
    fn refused(&self, signal: &'static str, error: SubmitError) -> Status {
        self.0.metrics.rejected.get_or_create(&RejectLabels { signal, reason: error.reason() }).inc();
        // Over a quota is not retried (RESOURCE_EXHAUSTED without RetryInfo): the exporter
        // drops the batch, as a retry within the quota's period would be refused.
        match error {
            SubmitError::Quota { message, .. } => Status::resource_exhausted(message),
            other => Status::unavailable(other.to_string()),
        }
    }

    /// The services as tonic servers, accepting gzip and bounded in message size.
    pub fn servers(
        self,
        max_bytes: usize,
    ) -> (TraceServer, MetricsServiceServer<Services>, LogsServiceServer<Services>) {
        (
            TraceServer { services: self.clone(), max_bytes },
            MetricsServiceServer::new(self.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_bytes),
            LogsServiceServer::new(self)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_bytes),
        )
    }
}

impl Services {
    /// A trace export: authenticated and checked against the tenant's quota before its body is
    /// read, then read straight into span rows ([`super::otlp_wire`]).
    async fn export_traces(&self, request: Request<Bytes>) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let sender = self.sender(&request, "traces")?;
        if let Err(error) = self.0.pipeline.precheck(sender.source(), false) {
            return Err(self.refused("traces", error));
        }
        let converted = match otlp::traces_from_protobuf(request.get_ref(), &sender) {
            Ok(converted) => converted,
            Err(error) => {
                self.0.metrics.rejected.get_or_create(&RejectLabels { signal: "traces", reason: "invalid" }).inc();
                return Err(Status::invalid_argument(error.to_string()));
            }
        };
        let converted = self.store("traces", &sender, converted).await?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: (converted.rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: converted.rejected as i64,
                error_message: converted.message(),
            }),
        }))
    }
}

/// The trace service: OTLP's `TraceService/Export`, as tonic's generated server serves it, but
/// with the request's bytes handed over undecoded (prost's structs are not built).
#[derive(Clone)]
pub struct TraceServer {
    services: Services,
    max_bytes: usize,
}

impl tonic::server::NamedService for TraceServer {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

/// Requests as their bytes; responses encoded by prost.
#[derive(Default)]
struct RawRequests;

impl tonic::codec::Codec for RawRequests {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = tonic_prost::ProstEncoder<ExportTraceServiceResponse>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

impl tonic::server::UnaryService<Bytes> for Services {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<Response<ExportTraceServiceResponse>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let services = self.clone();
        Box::pin(async move { services.export_traces(request).await })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for TraceServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (services, max_bytes) = (self.services.clone(), self.max_bytes);
        if request.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
            return Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) });
        }
        Box::pin(async move {
            let mut accept = tonic::codec::EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            let mut grpc = tonic::server::Grpc::new(RawRequests)
                .apply_compression_config(accept, Default::default())
                .apply_max_message_size_config(Some(max_bytes), None);
            Ok(grpc.unary(services, request).await)
        })
    }
}

#[tonic::async_trait]
impl MetricsService for Services {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let sender = self.sender(&request, "metrics")?;
        let converted = self.store("metrics", &sender, otlp::metrics(request.into_inner(), &sender)).await?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: (converted.rejected > 0).then(|| ExportMetricsPartialSuccess {
                rejected_data_points: converted.rejected as i64,
                error_message: converted.message(),
            }),
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Services {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let sender = self.sender(&request, "logs")?;
        let converted = self.store("logs", &sender, otlp::logs(request.into_inner(), &sender)).await?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: (converted.rejected > 0).then(|| ExportLogsPartialSuccess {
                rejected_log_records: converted.rejected as i64,
                error_message: converted.message(),
            }),
        }))
    }
}
