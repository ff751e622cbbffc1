//! stateful-faas core: the function runtime, the OpenFaaS-compatible gateway, tenants and
//! the platform's own instrumentation (OpenTelemetry spans and Prometheus metrics).

pub mod async_queue;
#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
pub mod database;
pub mod flow;
pub mod function;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod gateway;
pub mod invoker;
pub mod metrics;
pub mod quota;
pub mod redis;
pub mod room;
pub use contract::semconv;
pub mod stack;
pub mod state;
pub mod telemetry;
pub mod tenant;

pub use config::CoreConfig;
pub use gateway::{Core, RunningCore};
