//! `/v1/secrets`: the embedded store's secrets (names and versions for a
//! viewer, values for an admin).

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::bounds::{MAX_SECRET_BODY_BYTES, read_json, summary};
use super::config::AdminRole;
use super::handler::{AdminState, ApiError, Caller, authorize};
use crate::state::audit::Entry;

/// Puts a secret write in force on this replica before the call returns.
async fn serve_here(s: &AdminState) {
    if let Err(e) = s.rotations.refresh().await {
        warn!(error = %e, "cannot re-read secret versions after a write; the next poll will");
    }
}

pub(super) async fn list(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &c, AdminRole::Viewer, "secrets.list", &json!({}))?;
    let mut names: Vec<(String, u64)> = s.store.latest_versions().await?.into_iter().collect();
    names.sort();
    let list: Vec<Value> = names
        .into_iter()
        .map(|(n, v)| json!({ "name": n, "version": v }))
        .collect();
    Ok(Json(json!({ "secrets": list })))
}

pub(super) async fn get(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Admin,
        "secrets.get",
        &json!({ "secret": summary(&name) }),
    )?;
    let v = s.store.get(&name).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("secret {:?} does not exist", summary(&name)),
        )
    })?;
    Ok(Json(
        json!({ "name": v.name, "version": v.version, "value_base64": STANDARD.encode(v.value()) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSecret {
    value_base64: String,
}

pub(super) async fn put(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Admin,
        "secrets.put",
        &json!({ "secret": summary(&name) }),
    )?;
    let body: PutSecret = read_json(body, MAX_SECRET_BODY_BYTES).await?;
    let value =
        zeroize::Zeroizing::new(STANDARD.decode(body.value_base64.as_bytes()).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "value_base64 is not valid base64".into(),
            )
        })?);
    drop(zeroize::Zeroizing::new(body.value_base64));
    let version = s.store.put(&name, &value).await?;
    serve_here(&s).await;
    s.auditor.record(Entry::new(
        c.actor(),
        "secrets.version",
        "ok",
        json!({ "secret": name, "version": version }),
    ));
    Ok(Json(json!({ "name": name, "version": version })))
}

pub(super) async fn delete(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &c,
        AdminRole::Admin,
        "secrets.delete",
        &json!({ "secret": summary(&name) }),
    )?;
    let n = s.store.delete(&name).await?;
    serve_here(&s).await;
    if n == 0 {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("secret {:?} does not exist", summary(&name)),
        ));
    }
    Ok(Json(json!({ "name": name, "versions_deleted": n })))
}
