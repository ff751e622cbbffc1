"""Sends a parent and a child span with the OpenTelemetry Python SDK over OTLP (http or grpc).

usage: otlp_sdk.py http|grpc ENDPOINT TOKEN NAMESPACE
prints: TRACE_ID PARENT_ID CHILD_ID (hex)
"""
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

protocol, endpoint, token, namespace = sys.argv[1:5]
headers = {"authorization": f"Bearer {token}"}
if protocol == "http":
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers)
else:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers, insecure=True)
provider = TracerProvider(resource=Resource.create({"service.name": "py-api", "service.namespace": namespace}))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("otlp-test")
with tracer.start_as_current_span("POST /orders", kind=trace.SpanKind.SERVER) as parent:
    with tracer.start_as_current_span("INSERT orders", kind=trace.SpanKind.CLIENT) as child:
        child.set_attribute("db.rows", 1)
provider.shutdown()
print(
    format(parent.get_span_context().trace_id, "032x"),
    format(parent.get_span_context().span_id, "016x"),
    format(child.get_span_context().span_id, "016x"),
)
