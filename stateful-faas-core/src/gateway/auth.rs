//! Who is calling, and which namespace a call may touch (docs/contracts.md, "Tenants, tokens and trust").

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::Core;
use super::error::ApiError;
use crate::semconv;
use crate::tenant::{Principal, Scope, TenantId};

/// An authenticated caller, with the `X-Scope-OrgID` it named.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub org_id: Option<String>,
}

impl FromRequestParts<Arc<Core>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, core: &Arc<Core>) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization header: send `Authorization: Bearer TOKEN`".into())
        })?;
        let token = header.to_str().ok().and_then(contract::token).ok_or_else(|| {
            ApiError::Unauthorized("malformed Authorization header: expected `Bearer TOKEN` or Basic".into())
        })?;
        let principal =
            core.invoker.tenants.authenticate(&token).ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
        let org_id = parts.headers.get(semconv::HEADER_SCOPE_ORG_ID).and_then(|v| v.to_str().ok()).map(str::to_string);
        if let (Principal::Tenant { tenant, .. }, Some(org)) = (&principal, &org_id)
            && org != tenant.as_str()
        {
            return Err(ApiError::Forbidden(format!(
                "X-Scope-OrgID {org:?} does not match the token's tenant {tenant:?}"
            )));
        }
        Ok(Caller { principal, org_id })
    }
}

impl Caller {
    /// The namespace a call acts on: a tenant's own (naming another is refused), or, for the
    /// admin, the one it names through the URL, the body or `X-Scope-OrgID`.
    pub fn namespace(&self, requested: Option<&str>) -> Result<TenantId, ApiError> {
        let requested = requested.filter(|ns| !ns.is_empty());
        match &self.principal {
            Principal::Tenant { tenant, .. } => match requested {
                Some(ns) if ns != tenant.as_str() => {
                    Err(ApiError::Forbidden(format!("a token of tenant {tenant:?} cannot access namespace {ns:?}")))
                }
                _ => Ok(tenant.clone()),
            },
            Principal::Admin => {
                let ns = requested.or(self.org_id.as_deref()).ok_or_else(|| {
                    ApiError::BadRequest(
                        "name the namespace: NAME.NAMESPACE, ?namespace=, a `namespace` field or X-Scope-OrgID".into(),
                    )
                })?;
                Ok(TenantId::new(ns)?)
            }
            Principal::Meter => Err(ApiError::Forbidden("a meter token may only send telemetry".into())),
            Principal::Function { .. } => {
                Err(ApiError::Forbidden("a function's token may only use the state store".into()))
            }
        }
    }

    /// The tenant whose state a call may use, for `job` (`None`: the tenant's job-less objects).
    /// A function's token reaches its own job and the job-less objects; a read token only reads;
    /// `manage_jobs` (register, deregister) needs a tenant's ingest token or the admin's.
    pub fn state_tenant(&self, job: Option<&str>, write: bool, manage_jobs: bool) -> Result<TenantId, ApiError> {
        match &self.principal {
            Principal::Function { tenant, job: own } => {
                if manage_jobs {
                    return Err(ApiError::Forbidden("a function's token cannot register or deregister jobs".into()));
                }
                if job.is_some() && job != own.as_deref() {
                    return Err(ApiError::Forbidden(format!(
                        "this function's token is for job {:?}, not {:?}",
                        own.as_deref().unwrap_or("(none)"),
                        job.unwrap_or_default()
                    )));
                }
                Ok(tenant.clone())
            }
            Principal::Tenant { scope: Scope::Read, .. } if write || manage_jobs => {
                Err(ApiError::Forbidden("a read token cannot change state; use the ingest token".into()))
            }
            _ => self.namespace(None),
        }
    }

    /// The tenant to list for: `None` means every tenant (an admin naming none).
    pub fn list_scope(&self, requested: Option<&str>) -> Result<Option<TenantId>, ApiError> {
        match (&self.principal, requested.filter(|ns| !ns.is_empty()).or(self.org_id.as_deref())) {
            (Principal::Admin, None) => Ok(None),
            _ => self.namespace(requested).map(Some),
        }
    }

    /// Refuses read-only tokens for calls that change or run something.
    pub fn require_write(&self) -> Result<(), ApiError> {
        match &self.principal {
            Principal::Admin | Principal::Tenant { scope: Scope::Ingest, .. } => Ok(()),
            Principal::Tenant { scope, .. } => Err(ApiError::Forbidden(format!(
                "a {} token cannot deploy or invoke functions; use the tenant's ingest token",
                scope.as_str()
            ))),
            Principal::Meter => Err(ApiError::Forbidden("a meter token may only send telemetry".into())),
            Principal::Function { .. } => {
                Err(ApiError::Forbidden("a function's token may only use the state store".into()))
            }
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.principal {
            Principal::Admin => Ok(()),
            _ => Err(ApiError::Forbidden("this needs the admin token".into())),
        }
    }
}
