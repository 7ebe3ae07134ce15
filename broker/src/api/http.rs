//! The broker's plain-HTTP operations port: Prometheus metrics at
//! `/metrics`, liveness at `/healthz`, readiness at `/readyz` (with the
//! failing condition named in the body). Label values come from small fixed
//! sets: never a secret, a token, a pod UID or a secret value.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::db::Db;
use crate::identity::verify::Verifier;
use crate::state::revocation::View;

/// Labels of the call counter: the gRPC method and a bounded result class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub action: &'static str,
    pub result: &'static str,
}

/// The broker's metrics.
pub struct Metrics {
    registry: Registry,
    /// Calls by action and result class.
    pub calls: Family<CallLabels, Counter>,
    /// Leases handed out.
    pub leases_issued: Counter,
    view_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    rules: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("secrets_broker");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Broker gRPC calls by action and result class",
            calls.clone(),
        );
        let leases_issued = Counter::default();
        registry.register("leases_issued", "Leases handed out", leases_issued.clone());
        let view_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "revocation_view_age_seconds",
            "Seconds since this replica last read the revocation rules (it fails closed above revocation.max_staleness)",
            view_age.clone(),
        );
        let rules = Gauge::default();
        registry.register(
            "revocation_rules",
            "Revocation rules in force",
            rules.clone(),
        );
        Metrics {
            registry,
            calls,
            leases_issued,
            view_age,
            rules,
        }
    }
}

impl Metrics {
    pub fn call(&self, action: &'static str, result: &'static str) {
        self.calls
            .get_or_create(&CallLabels { action, result })
            .inc();
    }
}

/// What the operations port reads.
#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    pub view: Arc<View>,
    pub verifier: Arc<Verifier>,
    pub db: Db,
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
    if !s.verifier.jwks().is_loaded() {
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
    if failing.is_empty() {
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
        .with_graceful_shutdown(async move { crate::until_true(&mut shutdown).await })
        .await;
}
