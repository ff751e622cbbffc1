//! What every crate of stateful-faas agrees on, at the bottom of the dependency graph: the
//! telemetry contract's names ([`semconv`]), tenant names ([`tenant`]), who a request comes
//! from ([`caller`]), and how a server answers a handler's panic ([`panic`]). The contracts themselves are written in docs/contracts.md.

pub mod caller;
pub mod panic;
pub mod semconv;
pub mod tenant;

pub use caller::{Credentials, Viewer, credentials, token};
pub use tenant::{NameError, TenantId, validate_name};
