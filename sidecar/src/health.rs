//! Probes on a local HTTP port: `/healthz` (the process is alive) and
//! `/readyz` (every configured secret is on disk; otherwise 503 with what is
//! missing or revoked, so `kubectl describe pod` says why).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::info;

/// What `/readyz` reports; the main loop updates it after every change.
#[derive(Debug, Default, Clone)]
pub struct Readiness {
    /// Empty when ready; otherwise one line per problem.
    pub problems: Vec<String>,
}

pub type Shared = Arc<Mutex<Readiness>>;

async fn readyz(State(state): State<Shared>) -> (StatusCode, String) {
    let r = state.lock().map(|r| r.clone()).unwrap_or_default();
    if r.problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", r.problems.join("\n")),
        )
    }
}

/// Serves the probes until the task is dropped.
pub async fn serve(listener: TcpListener, state: Shared) {
    info!(addr = ?listener.local_addr().ok(), "health port listening");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let _ = axum::serve(listener, app).await;
}
