//! The dashboard: server-rendered web UI (bills for operators, DAG traces for developers) and
//! the Grafana datasource APIs (Jaeger query API, Prometheus HTTP API).
//!
//! Not built yet (issue 6).
