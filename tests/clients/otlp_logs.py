"""Sends two log records with the OpenTelemetry Python SDK's OTLP/HTTP log exporter, through
Python's `logging` as an application does, one of them inside a span.

usage: otlp_logs.py ENDPOINT TOKEN NAMESPACE
prints: TRACE_ID (hex) of the span the second record was written in
"""
import logging
import sys

from opentelemetry import trace
from opentelemetry._logs import set_logger_provider
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

endpoint, token, namespace = sys.argv[1:4]
resource = Resource.create({"service.name": "py-shop", "service.namespace": namespace})
provider = LoggerProvider(resource=resource)
provider.add_log_record_processor(
    SimpleLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, headers={"authorization": f"Bearer {token}"}))
)
set_logger_provider(provider)
log = logging.getLogger("shop")
log.setLevel(logging.INFO)
log.addHandler(LoggingHandler(level=logging.INFO, logger_provider=provider))
tracer = TracerProvider(resource=resource).get_tracer("shop")

log.info("order placed", extra={"order.id": "o-1"})
with tracer.start_as_current_span("POST /pay") as span:
    log.error("payment failed for o-1")
provider.shutdown()
print(format(span.get_span_context().trace_id, "032x"))
