//! What every handler shares: the state, who is calling, the role check
//! (audited either way), and the error answer.

use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::warn;

use super::config::AdminRole;
use crate::api::grpc::Rotations;
use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::state::Leases;
use crate::state::audit::{Audit, Auditor, Entry};
use crate::state::revocation::{Revocations, View};

/// Who is calling, from the TLS handshake.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No client certificate was presented.
    Anonymous,
    /// A verified certificate that matches no configured client.
    Unknown {
        subject: String,
    },
    Known {
        name: String,
        role: AdminRole,
    },
}

impl Caller {
    pub(super) fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "admin:anonymous".into(),
            Caller::Unknown { subject } => format!("admin:unknown({subject})"),
            Caller::Known { name, .. } => format!("admin:{name}"),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub revocations: Revocations,
    pub leases: Leases,
    pub audit: Audit,
    pub auditor: Auditor,
    pub store: EmbeddedStore,
    /// This replica's view of the rules, re-read after a change so that the
    /// change is in force here when the call returns.
    pub view: Arc<View>,
    /// This replica's record of secret versions, brought up to date after a
    /// write so that a fetch here serves the new value when the call returns.
    pub rotations: Arc<Rotations>,
}

/// An error answer: a status and a message a person can act on.
pub struct ApiError(pub(super) StatusCode, pub(super) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        warn!(error = %e, "admin API: database error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the state database is unavailable; retry later".into(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            StoreError::Database(e) => e.into(),
            other => {
                warn!(error = %other, "admin API: store error");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

/// Checks the caller's role, and audits the call either way.
pub(super) fn authorize(
    state: &AdminState,
    caller: &Caller,
    need: AdminRole,
    action: &str,
    detail: &Value,
) -> Result<(), ApiError> {
    let refusal = match caller {
        Caller::Anonymous => Some(ApiError(
            StatusCode::UNAUTHORIZED,
            "client certificate required: call with --cert and --key of a certificate signed by the admin client CA".into(),
        )),
        Caller::Unknown { subject } => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!("certificate {subject:?} is not mapped to a role in [[admin.clients]]"),
        )),
        Caller::Known { role, .. } if *role < need => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!("role {} may not {action}; it needs {}", role_name(*role), role_name(need)),
        )),
        Caller::Known { .. } => None,
    };
    let result = if refusal.is_some() { "forbidden" } else { "ok" };
    state.auditor.record(Entry::new(
        caller.actor(),
        &format!("admin.{action}"),
        result,
        detail.clone(),
    ));
    match refusal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn role_name(r: AdminRole) -> &'static str {
    match r {
        AdminRole::Viewer => "viewer",
        AdminRole::Revoker => "revoker",
        AdminRole::Admin => "admin",
    }
}
