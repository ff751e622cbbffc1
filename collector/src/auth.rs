//! Who sends telemetry, and for which tenant (docs/contracts.md, "Tenants, tokens and trust").
//!
//! The collector does not own tokens: the binary hands it a [`TokenResolver`] backed by the
//! core's tenant store, so both check the same tokens.

use axum::http::HeaderMap;

/// A valid telemetry credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A tenant's ingest token: its telemetry only, never billed.
    Ingest { tenant: String },
    /// The platform's meter token: any tenant's telemetry, named by `service.namespace`; billed.
    Meter,
}

/// Resolves a request's token (see [`contract::token`]) to a credential, if it is one.
pub trait TokenResolver: Send + Sync + 'static {
    fn resolve(&self, token: &str) -> Option<Credential>;
}

/// Why a sender was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header: send `Authorization: Bearer TOKEN` (or Basic with the token as password)")]
    Missing,
    #[error("invalid token: not an ingest or meter token")]
    Invalid,
    #[error("X-Scope-OrgID {org:?} does not match the token's tenant {tenant:?}")]
    OrgMismatch { org: String, tenant: String },
}

/// A checked sender: its credential and the tenant it named in `X-Scope-OrgID`, if any.
#[derive(Debug, Clone)]
pub struct Sender {
    pub credential: Credential,
    pub org_id: Option<String>,
}

/// Checks the credentials of a request.
pub fn authenticate(
    resolver: &dyn TokenResolver,
    authorization: Option<&str>,
    org_id: Option<&str>,
) -> Result<Sender, AuthError> {
    let authorization = authorization.ok_or(AuthError::Missing)?;
    let credential = contract::token(authorization).and_then(|t| resolver.resolve(&t)).ok_or(AuthError::Invalid)?;
    if let (Credential::Ingest { tenant }, Some(org)) = (&credential, org_id)
        && org != tenant
    {
        return Err(AuthError::OrgMismatch { org: org.to_string(), tenant: tenant.clone() });
    }
    Ok(Sender { credential, org_id: org_id.map(str::to_string) })
}

/// [`authenticate`] for HTTP headers.
pub fn authenticate_http(resolver: &dyn TokenResolver, headers: &HeaderMap) -> Result<Sender, AuthError> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    authenticate(resolver, get("authorization"), get(contract::semconv::HEADER_SCOPE_ORG_ID))
}

impl Sender {
    /// Whose data its batches are, for the ingest queue's admission.
    pub fn source(&self) -> crate::pipeline::Source<'_> {
        match &self.credential {
            Credential::Meter => crate::pipeline::Source::Meter,
            Credential::Ingest { tenant } => crate::pipeline::Source::Tenant(tenant),
        }
    }

    /// The tenant of a resource whose `service.namespace` is `namespace`, and whether its data is
    /// metered; or why its items are rejected (never re-attributed).
    pub fn tenant_for(&self, namespace: Option<&str>) -> Result<(String, bool), String> {
        match (&self.credential, namespace) {
            (Credential::Ingest { tenant }, None) => Ok((tenant.clone(), false)),
            (Credential::Ingest { tenant }, Some(ns)) if ns == tenant => Ok((tenant.clone(), false)),
            (Credential::Ingest { tenant }, Some(ns)) => {
                Err(format!("service.namespace {ns:?} does not match the token's tenant {tenant:?}"))
            }
            (Credential::Meter, Some(ns)) if valid_tenant(ns) => Ok((ns.to_string(), true)),
            (Credential::Meter, Some(ns)) => Err(format!("service.namespace {ns:?} is not a valid tenant name")),
            (Credential::Meter, None) => match &self.org_id {
                Some(org) if valid_tenant(org) => Ok((org.clone(), true)),
                _ => Err("metered telemetry must name its tenant in service.namespace (or X-Scope-OrgID)".into()),
            },
        }
    }
}

/// DNS-label tenant names (docs/contracts.md, "Tenants, tokens and trust").
pub fn valid_tenant(name: &str) -> bool {
    contract::validate_name("tenant", name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl TokenResolver for Fixed {
        fn resolve(&self, token: &str) -> Option<Credential> {
            match token {
                "acme" => Some(Credential::Ingest { tenant: "acme".into() }),
                "meter" => Some(Credential::Meter),
                _ => None,
            }
        }
    }

    #[test]
    fn tenants_come_from_tokens_and_namespaces_are_never_reattributed() {
        assert_eq!(authenticate(&Fixed, None, None).unwrap_err(), AuthError::Missing);
        assert_eq!(authenticate(&Fixed, Some("Bearer x"), None).unwrap_err(), AuthError::Invalid);
        assert!(matches!(
            authenticate(&Fixed, Some("Bearer acme"), Some("globex")),
            Err(AuthError::OrgMismatch { .. })
        ));
        let acme = authenticate(&Fixed, Some("Bearer acme"), None).unwrap();
        assert_eq!(acme.tenant_for(None), Ok(("acme".into(), false)));
        assert_eq!(acme.tenant_for(Some("acme")), Ok(("acme".into(), false)));
        assert!(acme.tenant_for(Some("globex")).unwrap_err().contains("does not match"));
        let meter = authenticate(&Fixed, Some("Bearer meter"), None).unwrap();
        assert_eq!(meter.tenant_for(Some("globex")), Ok(("globex".into(), true)));
        assert!(meter.tenant_for(None).is_err());
        assert!(meter.tenant_for(Some("Not_Valid")).is_err());
    }
}
