//! The core's integration tests, in one binary: one test file a module, so that the
//! workspace links one test program a crate instead of one a file (less link time, a
//! tenth of the disk). `cargo test -p <crate> --test integration <file>::` runs one file.

mod async_calls;
mod cancelled_invocations;
mod common;
mod flow_journal;
mod flow_limits;
mod flows;
mod functions;
mod invocation_buffers;
mod layers;
mod metrics;
mod sandbox;
mod state_attacks;
mod state_http;
mod state_redis;
mod telemetry;
mod tenancy;
