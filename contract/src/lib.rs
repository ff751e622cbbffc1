//! What every crate of stateful-faas agrees on, at the bottom of the dependency graph: the
//! telemetry contract's names ([`semconv`]), tenant names ([`tenant`]), and who a request comes
//! from ([`caller`]). The contracts themselves are written in docs/contracts.md.

pub mod caller;
pub mod semconv;
pub mod tenant;

pub use caller::{Credentials, Viewer, credentials, token};
pub use tenant::{NameError, TenantId, validate_name};
