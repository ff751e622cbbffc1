//! OTLP/gRPC: the Trace, Metrics and Logs `Export` services, gzip accepted, served as tonic's
//! generated servers would serve them but with each request's bytes handed over undecoded: the
//! sender is authenticated and checked against its quota first, and only then is the body
//! decoded (traces straight into span rows by `otlp_wire`; metrics and logs through prost).
//!
//! Codes as the OTLP specification gives them: UNAUTHENTICATED without a valid token,
//! INVALID_ARGUMENT for bad data, UNAVAILABLE (retryable) when the ingest queue is full, OK with
//! `partial_success` when some items were refused.

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use prost::Message;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{BoxFuture, StdError, http};
use tonic::{Request, Response, Status};

use super::prometheus_names::MetricNames;

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
        authenticate(self.0.resolver.as_ref(), get("authorization"), get(contract::semconv::HEADER_SCOPE_ORG_ID))
            .map_err(|e| {
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

    /// The three services as gRPC servers, accepting gzip and bounded in message size.
    pub fn servers(self, max_bytes: usize) -> (ExportServer<Traces>, ExportServer<Metrics>, ExportServer<Logs>) {
        (
            ExportServer::new(self.clone(), max_bytes),
            ExportServer::new(self.clone(), max_bytes),
            ExportServer::new(self, max_bytes),
        )
    }

    /// An export of signal `S`: the sender authenticated and checked against its quota before
    /// the body is decoded; the response encoded.
    async fn export<S: Signal>(&self, request: Request<Bytes>) -> Result<Vec<u8>, Status> {
        let sender = self.sender(&request, S::NAME)?;
        if let Err(error) = self.0.pipeline.precheck(sender.source(), S::SAMPLES) {
            return Err(self.refused(S::NAME, error));
        }
        let converted = S::decode(request.get_ref(), &sender, self.0.config.metric_names).map_err(|error| {
            self.0.metrics.rejected.get_or_create(&RejectLabels { signal: S::NAME, reason: "invalid" }).inc();
            Status::invalid_argument(error)
        })?;
        let converted = self.store(S::NAME, &sender, converted).await?;
        let rejected = converted.rejected as i64;
        Ok(S::response((rejected > 0).then(|| (rejected, converted.message()))))
    }
}

/// One of OTLP's three export services.
pub trait Signal: Send + Sync + 'static {
    /// The gRPC service's name.
    const SERVICE: &'static str;
    /// Its `Export` method's path.
    const PATH: &'static str;
    /// The signal, as the collector's own metrics label it.
    const NAME: &'static str;
    /// Whether it carries metric samples (their own quota) rather than spans or log records.
    const SAMPLES: bool;
    /// The request's body as rows of the sender's tenant, or why it cannot be read.
    fn decode(body: &[u8], sender: &Sender, names: MetricNames) -> Result<Converted, String>;
    /// The encoded response, with its partial success (items refused, why) if any.
    fn response(partial: Option<(i64, String)>) -> Vec<u8>;
}

pub struct Traces;
pub struct Metrics;
pub struct Logs;

impl Signal for Traces {
    const SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const PATH: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    const NAME: &'static str = "traces";
    const SAMPLES: bool = false;

    fn decode(body: &[u8], sender: &Sender, _: MetricNames) -> Result<Converted, String> {
        otlp::traces_from_protobuf(body, sender).map_err(|e| e.to_string())
    }

    fn response(partial: Option<(i64, String)>) -> Vec<u8> {
        let partial_success =
            partial.map(|(rejected_spans, error_message)| ExportTracePartialSuccess { rejected_spans, error_message });
        ExportTraceServiceResponse { partial_success }.encode_to_vec()
    }
}

impl Signal for Metrics {
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const PATH: &'static str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    const NAME: &'static str = "metrics";
    const SAMPLES: bool = true;

    fn decode(body: &[u8], sender: &Sender, names: MetricNames) -> Result<Converted, String> {
        let request = ExportMetricsServiceRequest::decode(body).map_err(|e| e.to_string())?;
        otlp::metrics(request, sender, names).map_err(|e| e.to_string())
    }

    fn response(partial: Option<(i64, String)>) -> Vec<u8> {
        let partial_success = partial.map(|(rejected_data_points, error_message)| ExportMetricsPartialSuccess {
            rejected_data_points,
            error_message,
        });
        ExportMetricsServiceResponse { partial_success }.encode_to_vec()
    }
}

impl Signal for Logs {
    const SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const PATH: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    const NAME: &'static str = "logs";
    const SAMPLES: bool = false;

    fn decode(body: &[u8], sender: &Sender, _: MetricNames) -> Result<Converted, String> {
        let request = ExportLogsServiceRequest::decode(body).map_err(|e| e.to_string())?;
        otlp::logs(request, sender).map_err(|e| e.to_string())
    }

    fn response(partial: Option<(i64, String)>) -> Vec<u8> {
        let partial_success = partial.map(|(rejected_log_records, error_message)| ExportLogsPartialSuccess {
            rejected_log_records,
            error_message,
        });
        ExportLogsServiceResponse { partial_success }.encode_to_vec()
    }
}

/// The gRPC server of one export service.
pub struct ExportServer<S> {
    services: Services,
    max_bytes: usize,
    signal: PhantomData<fn() -> S>,
}

impl<S> ExportServer<S> {
    fn new(services: Services, max_bytes: usize) -> Self {
        Self { services, max_bytes, signal: PhantomData }
    }
}

impl<S> Clone for ExportServer<S> {
    fn clone(&self) -> Self {
        Self::new(self.services.clone(), self.max_bytes)
    }
}

impl<S: Signal> tonic::server::NamedService for ExportServer<S> {
    const NAME: &'static str = S::SERVICE;
}

/// Messages as their bytes, both ways (requests are decoded, and responses encoded, by the
/// handler).
#[derive(Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

/// The handler of one request of signal `S`.
struct Handler<S>(Services, PhantomData<fn() -> S>);

impl<S: Signal> tonic::server::UnaryService<Bytes> for Handler<S> {
    type Response = Vec<u8>;
    type Future = BoxFuture<Response<Vec<u8>>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let services = self.0.clone();
        Box::pin(async move { services.export::<S>(request).await.map(Response::new) })
    }
}

impl<S: Signal, B> tonic::codegen::Service<http::Request<B>> for ExportServer<S>
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
        let (handler, max_bytes) = (Handler::<S>(self.services.clone(), PhantomData), self.max_bytes);
        if request.uri().path() != S::PATH {
            return Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) });
        }
        Box::pin(async move {
            let mut accept = tonic::codec::EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            let mut grpc = tonic::server::Grpc::new(Raw)
                .apply_compression_config(accept, Default::default())
                .apply_max_message_size_config(Some(max_bytes), None);
            Ok(grpc.unary(handler, request).await)
        })
    }
}
