//! The collector: receivers for OTLP (HTTP and gRPC), Jaeger thrift and Prometheus
//! (remote_write and scrape), tenant resolution and token checks, and the telemetry store
//! (SQLite and PostgreSQL through sqlx). It owns the telemetry schema.
//!
//! Not built yet (issue 4). Until it lands, the core exports its spans to any OTLP endpoint
//! (`--otlp-endpoint`), for example an OpenTelemetry Collector.
