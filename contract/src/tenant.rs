//! Tenant (namespace) and function names: DNS labels, as in Kubernetes and OpenFaaS.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest tenant or function name (a Kubernetes DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Why a tenant or function name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than {MAX_NAME_LEN} characters")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name {name:?} is invalid: use lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    Invalid { kind: &'static str, name: String },
}

/// Checks a DNS-label name (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters).
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { kind, name: name.to_string() });
    }
    let bytes = name.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.iter().all(allowed) || !edge_ok(bytes[0]) || !edge_ok(bytes[bytes.len() - 1]) {
        return Err(NameError::Invalid { kind, name: name.to_string() });
    }
    Ok(())
}

/// A tenant: a namespace in the OpenFaaS / Kubernetes sense.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    /// Validates and wraps a tenant name.
    pub fn new(name: &str) -> Result<Self, NameError> {
        validate_name("tenant", name)?;
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(&value)
    }
}

impl From<TenantId> for String {
    fn from(value: TenantId) -> Self {
        value.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_labels() {
        assert!(validate_name("tenant", "acme").is_ok());
        assert!(validate_name("tenant", "a-1").is_ok());
        assert!(validate_name("tenant", "0").is_ok());
        assert_eq!(validate_name("tenant", ""), Err(NameError::Empty { kind: "tenant" }));
        assert!(matches!(validate_name("tenant", "-a"), Err(NameError::Invalid { .. })));
        assert!(matches!(validate_name("tenant", "a-"), Err(NameError::Invalid { .. })));
        assert!(matches!(validate_name("tenant", "Acme"), Err(NameError::Invalid { .. })));
        assert!(matches!(validate_name("tenant", "a.b"), Err(NameError::Invalid { .. })));
        assert!(matches!(validate_name("tenant", &"a".repeat(64)), Err(NameError::TooLong { .. })));
        assert!(validate_name("tenant", &"a".repeat(63)).is_ok());
    }
}
