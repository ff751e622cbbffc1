//! OTLP/gRPC: the Trace, Metrics and Logs `Export` services (tonic), gzip accepted.
//!
//! Codes as the OTLP specification gives them: UNAUTHENTICATED without a valid token,
//! INVALID_ARGUMENT for bad data, UNAVAILABLE (retryable) when the ingest queue is full, OK with
//! `partial_success` when some items were refused.

use std::sync::Arc;

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
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::codec::CompressionEncoding;
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
            Err(error) => {
                self.0.metrics.rejected.get_or_create(&RejectLabels { signal, reason: error.reason() }).inc();
                // Over a quota is not retried (RESOURCE_EXHAUSTED without RetryInfo): the
                // exporter drops the batch, as a retry within the quota's period would be refused.
                Err(match error {
                    SubmitError::Quota { message, .. } => Status::resource_exhausted(message),
                    other => Status::unavailable(other.to_string()),
                })
            }
        }
    }

    /// The services as tonic servers, accepting gzip and bounded in message size.
    pub fn servers(
        self,
        max_bytes: usize,
    ) -> (TraceServiceServer<Services>, MetricsServiceServer<Services>, LogsServiceServer<Services>) {
        (
            TraceServiceServer::new(self.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_bytes),
            MetricsServiceServer::new(self.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_bytes),
            LogsServiceServer::new(self)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_bytes),
        )
    }
}

#[tonic::async_trait]
impl TraceService for Services {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let sender = self.sender(&request, "traces")?;
        let converted = self.store("traces", &sender, otlp::traces(request.into_inner(), &sender)).await?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: (converted.rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: converted.rejected as i64,
                error_message: converted.message(),
            }),
        }))
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
