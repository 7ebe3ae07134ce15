//! The broker's plain-HTTP operations port: Prometheus metrics at
//! `/metrics`, liveness at `/healthz`, readiness at `/readyz` (with the
//! failing condition named in the body). Label values come from small fixed
//! sets: never a secret, a token, a pod UID or a secret value.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::db::Db;
use crate::identity::verify::Verifiers;
use crate::state::revocation::View;
use crate::telemetry::metrics::Metrics;

/// What the operations port reads.
#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    pub view: Arc<View>,
    pub verifier: Arc<Verifiers>,
    pub db: Db,
    /// Every source of secrets, for what each cannot serve now.
    pub sources: Arc<crate::backend::source::Sources>,
}

async fn metrics(
    State(s): State<OpsState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    s.metrics.view_age.set(
        s.view
            .age()
            .map(|a| a.as_secs_f64())
            .unwrap_or(f64::INFINITY),
    );
    s.metrics.rules.set(s.view.rules().len() as i64);
    for source in s.sources.all() {
        let labels = crate::telemetry::metrics::BackendLabels {
            backend: source.kind(),
        };
        s.metrics
            .unservable
            .get_or_create(&labels)
            .set(source.problems().len() as i64);
    }
    let mut body = String::new();
    let status = match prometheus_client::encoding::text::encode(&mut body, &s.metrics.registry) {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn readyz(State(s): State<OpsState>) -> (StatusCode, String) {
    let mut failing = Vec::new();
    if !s.verifier.is_loaded() {
        failing.push("identity: the issuer's signing keys have not loaded".to_owned());
    }
    if let Err(e) = s.view.ensure_fresh() {
        failing.push(format!("revocation: {e}"));
    }
    if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(2), s.db.ping())
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        failing.push(format!("database: {e}"));
    }
    // Secrets a source cannot serve degrade the replica without taking it
    // out of service: every replica shares the same Vault or AWS, and the
    // other secrets still work. They are named here and counted in the
    // metrics.
    let mut degraded = s.sources.problems();
    // Audit records dropped in the last minute take the replica out of
    // service (it cannot keep up auditing); older drops and checkpoints
    // that cannot be written only degrade it.
    let (audit_failing, audit_degraded) = s.metrics.audit.readiness();
    failing.extend(audit_failing);
    degraded.extend(audit_degraded);
    if failing.is_empty() && !degraded.is_empty() {
        (
            StatusCode::OK,
            format!("ready, degraded:\n{}\n", degraded.join("\n")),
        )
    } else if failing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", failing.join("\n")),
        )
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` flips.
pub async fn serve(listener: TcpListener, state: OpsState, mut shutdown: watch::Receiver<bool>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    info!(addr = ?listener.local_addr().ok(), "operations port listening (metrics, health)");
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { crate::shutdown::until_true(&mut shutdown).await })
        .await;
}
