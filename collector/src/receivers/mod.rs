//! The receivers: each decodes its protocol, checks the sender, attributes every item to a
//! tenant, and hands rows to the pipeline.

pub mod jaeger_thrift;
pub mod otlp;
pub mod otlp_grpc;
pub mod otlp_http;
pub mod remote_write;
pub mod scrape;
