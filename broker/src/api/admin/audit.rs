//! `/v1/audit`: reading the log, and verifying it (against exported
//! checkpoints when the caller brings them).

use axum::Json;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::bounds::{MAX_BODY_BYTES, read_json};
use super::config::AdminRole;
use super::handler::{AdminState, ApiError, Caller, authorize};
use crate::state::audit_key::Checkpoint;

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    after: Option<i64>,
    limit: Option<i64>,
    tail: Option<i64>,
}

pub(super) async fn records(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "audit.read", &json!({}))?;
    // What was audited before this call is in the log, this one's included.
    s.auditor.flush().await;
    let records = match q.tail {
        Some(n) => s.audit.tail(n.clamp(1, 10_000)).await?,
        None => {
            s.audit
                .after(
                    q.after.unwrap_or(0),
                    q.limit.unwrap_or(100).clamp(1, 10_000),
                )
                .await?
        }
    };
    Ok(Json(json!({ "records": records })))
}

pub(super) async fn verify(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "audit.verify", &json!({}))?;
    verify_against(&s, Vec::new()).await
}

/// Most checkpoints one `POST /v1/audit/verify` may bring.
const MAX_CHECKPOINTS: usize = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    #[serde(default)]
    checkpoints: Vec<Checkpoint>,
}

/// `POST /v1/audit/verify`: the chain, and the log against checkpoints the
/// caller read from the sink (`brokerctl audit verify --checkpoints FILE`).
pub(super) async fn verify_with(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "audit.verify", &json!({}))?;
    let body: VerifyBody = read_json(body, MAX_BODY_BYTES).await?;
    if body.checkpoints.len() > MAX_CHECKPOINTS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} checkpoints in one call, at most {MAX_CHECKPOINTS}",
                body.checkpoints.len()
            ),
        ));
    }
    verify_against(&s, body.checkpoints).await
}

/// Verifies after what this replica had queued is written, against the
/// given checkpoints and the last one this replica exported.
async fn verify_against(
    s: &AdminState,
    mut checkpoints: Vec<Checkpoint>,
) -> Result<Json<Value>, ApiError> {
    s.auditor.flush().await;
    if let Some(own) = s.audit.status().last_checkpoint() {
        checkpoints.push(own);
    }
    Ok(Json(
        serde_json::to_value(s.audit.verify_with(&checkpoints).await?).unwrap_or_default(),
    ))
}
