//! Every way a call can fail, and the one place each becomes a gRPC status.

use tonic::Status;

use crate::backend::source::{Failure, SourceError};
use crate::identity::error::TokenError;
use crate::policy::Denied;
use crate::state::revocation::{Revoked, Stale};

/// Every way a call can fail, converted to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Revoked(#[from] Revoked),
    #[error(transparent)]
    Stale(#[from] Stale),
    #[error("lease {0:?} is unknown or not yours; fetch the secret again")]
    UnknownLease(String),
    #[error("state database: {0}")]
    Database(#[from] sqlx::Error),
    /// The leases of a call could not be recorded.
    #[error("state database: {0}")]
    LeaseRecord(#[from] crate::state::RecordError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A source of secrets failed or refused; the message names the secret
    /// and what the source said (never a token, a credential or a value).
    #[error(transparent)]
    Backend(#[from] SourceError),
    /// Over a load limit: refused at once, to be retried with backoff.
    #[error(transparent)]
    Overloaded(#[from] crate::api::limits::Overloaded),
    /// One answer would carry more secret bytes than the broker sends at once.
    #[error(
        "the secrets asked for come to more than {limit} bytes (server.max_response_bytes); fetch them in smaller sets"
    )]
    ResponseTooLarge { limit: usize },
}

impl ApiError {
    /// A short, bounded class for audit records and (later) metric labels.
    pub fn class(&self) -> &'static str {
        match self {
            ApiError::Token(TokenError::KeysUnavailable(_) | TokenError::ReviewUnavailable(_)) => {
                "keys_unavailable"
            }
            ApiError::Token(TokenError::Expired { .. }) => "token_expired",
            ApiError::Token(_) => "token_invalid",
            ApiError::Denied(_) => "denied",
            ApiError::Revoked(_) => "revoked",
            ApiError::Stale(_) => "stale_view",
            ApiError::UnknownLease(_) => "unknown_lease",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::ResponseTooLarge { .. } => "too_large",
            ApiError::Overloaded(e) => e.class(),
            ApiError::Backend(e) => match e.failure {
                Failure::NotFound => "not_found",
                Failure::Refused => "backend_refused",
                Failure::Unavailable | Failure::StateDatabase => "backend_error",
            },
            ApiError::Database(_) | ApiError::LeaseRecord(_) => "backend_error",
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Token(TokenError::KeysUnavailable(_) | TokenError::ReviewUnavailable(_)) => {
                Status::unavailable(msg)
            }
            ApiError::Token(_) => Status::unauthenticated(msg),
            ApiError::Denied(_) | ApiError::Revoked(_) => Status::permission_denied(msg),
            ApiError::Stale(_) => Status::unavailable(msg),
            ApiError::UnknownLease(_) => Status::not_found(msg),
            ApiError::Database(_)
            | ApiError::LeaseRecord(_)
            | ApiError::Backend(SourceError {
                failure: Failure::StateDatabase,
                ..
            }) => Status::unavailable("the state database is unavailable; retry later"),
            ApiError::BadRequest(_) => Status::invalid_argument(msg),
            ApiError::Overloaded(_) | ApiError::ResponseTooLarge { .. } => {
                Status::resource_exhausted(msg)
            }
            ApiError::Backend(e) => match e.failure {
                Failure::NotFound => Status::not_found(msg),
                Failure::Refused => Status::permission_denied(msg),
                Failure::Unavailable | Failure::StateDatabase => Status::unavailable(msg),
            },
        }
    }
}
