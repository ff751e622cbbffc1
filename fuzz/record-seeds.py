"""Records the seed corpora of the fuzz targets from real clients' payloads.

Run from the repository's root, after `cargo test -p collector` has made the Python SDK
virtualenvs under target/test-venvs (the collector's tests install them from PyPI), with
Debian's prometheus on PATH:

    python3 fuzz/record-seeds.py

It serves a capturing HTTP endpoint on loopback, points the clients at it, and writes each
request body to fuzz/seeds/TARGET/NAME:
  - otlp: the OpenTelemetry Python SDK's OTLP/HTTP protobuf traces, metrics and logs (with the
    target's first byte choosing the signal: 0 traces, 2 metrics, 4 logs; +1 for JSON), and the
    OTLP JSON examples of the collector's tests;
  - jaeger_thrift: the Python SDK's Jaeger thrift exporter (opentelemetry-exporter-jaeger-thrift);
  - remote_write: Prometheus's remote_write of its own samples;
  - exposition: Prometheus's /metrics in the text format and in OpenMetrics.
The other targets' seeds are the repository's own examples (flows, stacks) and queries recorded
from Grafana (dashboard/tests/fixtures), copied by hand.
"""
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
captured = []


class Capture(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        captured.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def save(target, name, data):
    os.makedirs(os.path.join(SEEDS, target), exist_ok=True)
    with open(os.path.join(SEEDS, target, name), "wb") as f:
        f.write(data)
    print(f"{target}/{name}: {len(data)} bytes")


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    venvs = os.path.join(ROOT, "target", "test-venvs")

    otlp = os.path.join(venvs, "otlp-python", "bin", "python")
    subprocess.run([otlp, "-c", OTLP_CLIENT, url], check=True)
    for n, (path, _, body) in enumerate(captured):
        signal = {"/v1/traces": 0, "/v1/metrics": 2, "/v1/logs": 4}[path]
        save("otlp", f"python-sdk{path.replace('/', '-')}-{n}", bytes([signal]) + body)
    captured.clear()

    jaeger = os.path.join(venvs, "jaeger-thrift", "bin", "python")
    client = os.path.join(ROOT, "collector", "tests", "clients", "jaeger_thrift.py")
    subprocess.run([jaeger, client, f"{url}/api/traces", "u", "p", "acme"], check=True, capture_output=True)
    for n, (_, _, body) in enumerate(captured):
        save("jaeger_thrift", f"python-sdk-{n}", body)
    captured.clear()

    with tempfile.TemporaryDirectory() as data:
        config = os.path.join(data, "prometheus.yml")
        with open(config, "w") as f:
            f.write(PROMETHEUS_CONFIG.format(url=url))
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}/tsdb",
             "--web.listen-address=127.0.0.1:19391"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while not captured and time.time() < deadline:
                time.sleep(0.5)
            metrics = "http://127.0.0.1:19391/metrics"
            save("exposition", "prometheus-text", urllib.request.urlopen(metrics).read())
            request = urllib.request.Request(metrics, headers={"accept": "application/openmetrics-text; version=1.0.0"})
            save("exposition", "prometheus-openmetrics", urllib.request.urlopen(request).read())
        finally:
            prometheus.terminate()
            prometheus.wait()
    if not captured:
        sys.exit("prometheus sent no remote_write request within a minute")
    save("remote_write", "prometheus", captured[0][2])


OTLP_CLIENT = """
import sys
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
import logging

url = sys.argv[1]
resource = Resource.create({"service.name": "py-api", "service.namespace": "acme"})
traces = TracerProvider(resource=resource)
traces.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url + "/v1/traces")))
tracer = traces.get_tracer("seed")
with tracer.start_as_current_span("POST /orders") as parent:
    with tracer.start_as_current_span("INSERT orders") as child:
        child.set_attribute("db.rows", 1)
traces.shutdown()
reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=url + "/v1/metrics"), export_interval_millis=60000)
meters = MeterProvider(resource=resource, metric_readers=[reader])
meter = meters.get_meter("seed")
meter.create_counter("orders").add(3, {"shop": "north"})
meter.create_histogram("latency", unit="ms").record(12.5, {"route": "/orders"})
meter.create_up_down_counter("queue").add(-2)
meters.shutdown()
logs = LoggerProvider(resource=resource)
logs.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=url + "/v1/logs")))
logger = logging.getLogger("seed")
logger.addHandler(LoggingHandler(logger_provider=logs))
logger.warning("order %s failed", 42)
logs.shutdown()
"""

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:19391"]
remote_write:
  - url: {url}/api/v1/write
    queue_config:
      batch_send_deadline: 1s
"""

if __name__ == "__main__":
    main()
