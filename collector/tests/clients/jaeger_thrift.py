"""Sends a parent and a child span with the OpenTelemetry Python SDK's Jaeger thrift exporter
(opentelemetry-exporter-jaeger-thrift 1.21.0) over HTTP with Basic auth.

usage: jaeger_thrift.py ENDPOINT USER PASSWORD NAMESPACE
prints: TRACE_ID PARENT_ID CHILD_ID (hex)
"""
import sys

from opentelemetry import trace
from opentelemetry.exporter.jaeger.thrift import JaegerExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

endpoint, user, password, namespace = sys.argv[1:5]
exporter = JaegerExporter(collector_endpoint=endpoint, username=user, password=password)
provider = TracerProvider(resource=Resource.create({"service.name": "py-shop", "service.namespace": namespace}))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("jaeger-test")
with tracer.start_as_current_span("GET /basket") as parent:
    with tracer.start_as_current_span("SELECT basket", kind=trace.SpanKind.CLIENT) as child:
        child.set_attribute("db.rows", 3)
provider.shutdown()
print(
    format(parent.get_span_context().trace_id, "032x"),
    format(parent.get_span_context().span_id, "016x"),
    format(child.get_span_context().span_id, "016x"),
)
