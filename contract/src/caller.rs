//! Who a request comes from: the token it carries, and who may read what.

use base64::Engine;

/// What an `Authorization` header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub token: String,
    /// The user of `Basic` auth, which receivers whose clients can send nothing else (Jaeger
    /// exporters, Prometheus remote_write) read as the tenant, like `X-Scope-OrgID`.
    pub basic_user: Option<String>,
}

/// Parses an `Authorization` header's value: `Bearer TOKEN`, or `Basic` with the token as the
/// password.
pub fn credentials(authorization: &str) -> Option<Credentials> {
    let (scheme, value) = authorization.trim().split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(Credentials { token: value.trim().to_string(), basic_user: None }),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, password) = text.split_once(':')?;
            Some(Credentials { token: password.to_string(), basic_user: Some(user.to_string()) })
        }
        _ => None,
    }
}

/// The token of an `Authorization` header's value (see [`credentials`]): a token alone names
/// its tenant.
pub fn token(authorization: &str) -> Option<String> {
    credentials(authorization).map(|credentials| credentials.token)
}

/// Who reads telemetry, usage and bills (the dashboard's and the query APIs' callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    Admin,
    /// A tenant's read token: that tenant's data only.
    Tenant(String),
}

impl Viewer {
    /// Whether this viewer may see `tenant`'s data.
    pub fn may_see(&self, tenant: &str) -> bool {
        match self {
            Viewer::Admin => true,
            Viewer::Tenant(own) => own == tenant,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_carry_the_token_and_nothing_else_does() {
        assert_eq!(token("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(token("  bearer   abc  ").as_deref(), Some("abc"));
        // `acme:secret`, as Prometheus sends it.
        assert_eq!(token("Basic YWNtZTpzZWNyZXQ=").as_deref(), Some("secret"));
        assert_eq!(credentials("Basic YWNtZTpzZWNyZXQ=").unwrap().basic_user.as_deref(), Some("acme"));
        assert_eq!(credentials("Bearer abc").unwrap().basic_user, None);
        for refused in ["", "abc", "Bearer", "Digest x", "Token abc", "Basic !!!", "Basic YWNtZQ=="] {
            assert_eq!(token(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn a_tenant_sees_its_own_data_and_the_admin_everyones() {
        assert!(Viewer::Tenant("acme".into()).may_see("acme"));
        assert!(!Viewer::Tenant("acme".into()).may_see("globex"));
        assert!(Viewer::Admin.may_see("globex"));
    }
}
