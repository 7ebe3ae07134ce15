//! `/v1/revocations`: the kill switch's rules, listed, created and lifted.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::bounds::{MAX_BODY_BYTES, read_json, summary};
use super::config::AdminRole;
use super::handler::{AdminState, ApiError, Caller, authorize};
use crate::clock::unix_now;
use crate::state::audit::Entry;
use crate::state::revocation::{NewRule, RuleError};

pub(super) async fn list(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "revocations.list", &json!({}))?;
    Ok(Json(json!({ "revocations": s.revocations.list().await? })))
}

pub(super) async fn create(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize(&s, &c, AdminRole::Revoker, "revoke", &json!({}))?;
    let new: NewRule = read_json(body, MAX_BODY_BYTES).await?;
    let rule = s
        .revocations
        .create(new, &c.actor(), &s.leases)
        .await
        .map_err(|e| match e {
            RuleError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            RuleError::UnknownLease(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            RuleError::Database(e) => e.into(),
        })?;
    enforce_here(&s).await;
    let ended = s.leases.end_matching(&rule, unix_now()).await?;
    info!(rule = %rule.id, by = %c.actor(), reason = %rule.reason, leases_ended = ended, "revocation rule created");
    s.auditor.record(Entry::new(
        c.actor(),
        "revoke",
        "ok",
        json!({ "rule": rule, "leases_ended": ended }),
    ));
    Ok((
        StatusCode::CREATED,
        Json(json!({ "rule": rule, "leases_ended": ended })),
    ))
}

/// Re-reads the rules into this replica's view after a change. The change is
/// stored either way; when the read fails the view's own loop catches up.
async fn enforce_here(s: &AdminState) {
    if let Err(e) = s.view.refresh(&s.revocations).await {
        warn!(error = %e, "cannot re-read the revocation rules after a change; the next refresh will");
    }
}

pub(super) async fn delete(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Revoker,
        "revocations.delete",
        &json!({ "rule_id": summary(&id) }),
    )?;
    if !s.revocations.delete(&id).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("revocation rule {:?} does not exist", summary(&id)),
        ));
    }
    enforce_here(&s).await;
    info!(rule = %id, by = %c.actor(), "revocation rule deleted");
    Ok(StatusCode::NO_CONTENT)
}
