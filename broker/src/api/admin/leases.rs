//! `/v1/leases`: the leases still running.

use axum::Json;
use axum::extract::{Extension, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::bounds::summary;
use super::config::AdminRole;
use super::handler::{AdminState, ApiError, Caller, authorize};
use crate::clock::unix_now;

#[derive(Deserialize)]
pub(super) struct LeaseQuery {
    namespace: Option<String>,
    limit: Option<i64>,
}

pub(super) async fn list(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<LeaseQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Viewer,
        "leases.list",
        &json!({ "namespace": q.namespace.as_deref().map(summary) }),
    )?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let leases = s
        .leases
        .list_active(q.namespace.as_deref(), unix_now(), limit)
        .await?;
    Ok(Json(json!({ "leases": leases })))
}
