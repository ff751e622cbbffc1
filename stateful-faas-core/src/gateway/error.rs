//! The one place where errors become HTTP status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::function::FunctionError;
use crate::function::registry::RegistryError;
use crate::state::StateError;
use crate::tenant::{NameError, TenantError};

/// An error answered to an API caller, as plain text (as OpenFaaS does).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
    /// What the request needs is not served here (503).
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(message) = &self {
            tracing::error!(%message, "internal error");
        }
        let mut response = (self.status(), format!("{self}\n")).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response
                .headers_mut()
                .insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer realm=\"sfaas\""));
        }
        if matches!(self, ApiError::TooManyRequests(_)) {
            response.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            RegistryError::Exists { .. } => ApiError::Conflict(error.to_string()),
            RegistryError::Quota { .. } => ApiError::TooManyRequests(error.to_string()),
            RegistryError::Invalid(_) => ApiError::BadRequest(error.to_string()),
            RegistryError::Scale(_, FunctionError::Busy { .. }) => ApiError::TooManyRequests(error.to_string()),
            RegistryError::Scale(..) => ApiError::Internal(error.to_string()),
            RegistryError::Database(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<TenantError> for ApiError {
    fn from(error: TenantError) -> Self {
        match error {
            TenantError::Name(_) => ApiError::BadRequest(error.to_string()),
            TenantError::Exists(_) => ApiError::Conflict(error.to_string()),
            TenantError::Database(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(error: StateError) -> Self {
        let message = error.to_string();
        match error {
            StateError::JobNotRegistered(_) | StateError::NotFound { .. } => ApiError::NotFound(message),
            StateError::JobExists(_) => ApiError::Conflict(message),
            StateError::ValueTooLarge { .. } => ApiError::PayloadTooLarge(message),
            StateError::QuotaExceeded { .. } | StateError::BudgetExceeded { .. } => {
                ApiError::InsufficientStorage(message)
            }
            StateError::InvalidName { .. } => ApiError::BadRequest(message),
            StateError::TooManyJobs { .. } | StateError::JobsTooFast { .. } => ApiError::TooManyRequests(message),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(error: NameError) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

impl From<crate::async_queue::EnqueueError> for ApiError {
    fn from(error: crate::async_queue::EnqueueError) -> Self {
        match error {
            crate::async_queue::EnqueueError::Database(error) => error.into(),
            crate::async_queue::EnqueueError::Quota(message) => ApiError::TooManyRequests(message),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::Internal(format!("database: {error}"))
    }
}

/// Answers 500 in the gateway's error JSON when a handler panics ([`contract::panic`]).
pub async fn catch_panic(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    contract::panic::catch_panic(request, next, || {
        ApiError::Internal("internal error: this request failed (it is in the gateway's log)".into()).into_response()
    })
    .await
}
