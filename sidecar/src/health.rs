//! The sidecar's local HTTP port: `/healthz` (alive), `/readyz` (every
//! configured secret is on disk; otherwise 503 naming what is missing or
//! revoked, so `kubectl describe pod` says why) and Prometheus `/metrics`.
//! Labels are the configured secret names, never values.

use std::sync::{Arc, Mutex};

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
use tracing::info;

/// One secret as the metrics report it.
#[derive(Debug, Clone, Default)]
pub struct SecretStatus {
    pub name: String,
    pub version: u64,
    /// Unix time this version was first received.
    pub received_at: i64,
    /// Unix time of the last successful fetch or renewal.
    pub refreshed_at: i64,
    /// Unix time the lease ends.
    pub expires_at: i64,
}

/// What the probes and metrics report; the main loop publishes it after
/// every change.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Empty when ready; otherwise one line per problem.
    pub problems: Vec<String>,
    pub secrets: Vec<SecretStatus>,
    pub revoked: usize,
    pub refresh_failures: u64,
    pub generation_swaps: u64,
}

pub type Shared = Arc<Mutex<Status>>;

/// Local API requests by method and result.
#[derive(Debug, Default)]
pub struct LocalApiCounters(Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>);

impl LocalApiCounters {
    pub fn count(&self, method: &'static str, result: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry((method, result)).or_default() += 1;
        }
    }

    fn snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    result: &'static str,
}

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub status: Shared,
    pub local_api: Arc<LocalApiCounters>,
}

fn snapshot(state: &Shared) -> Status {
    state.lock().map(|r| r.clone()).unwrap_or_default()
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    let r = snapshot(&state.status);
    if r.problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", r.problems.join("\n")),
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SecretLabel {
    secret: String,
}

/// Renders the metrics from a status snapshot and the local API counters.
pub fn render(status: &Status, local_api: &LocalApiCounters, now: i64) -> String {
    let mut registry = Registry::with_prefix("secrets_sidecar");
    let gauge =
        |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&SecretStatus) -> i64| {
            let family = Family::<SecretLabel, Gauge>::default();
            for s in &status.secrets {
                family
                    .get_or_create(&SecretLabel {
                        secret: s.name.clone(),
                    })
                    .set(value(s));
            }
            registry.register(name, help, family);
        };
    gauge(
        &mut registry,
        "secret_version",
        "Version of each secret on disk",
        &|s| s.version as i64,
    );
    gauge(
        &mut registry,
        "secret_age_seconds",
        "Seconds since the version on disk was received",
        &|s| now - s.received_at,
    );
    gauge(
        &mut registry,
        "secret_lease_remaining_seconds",
        "Seconds until the lease of each secret ends (the file is removed then unless renewed)",
        &|s| (s.expires_at - now).max(0),
    );
    gauge(
        &mut registry,
        "secret_last_refresh_timestamp_seconds",
        "Unix time of the last successful fetch or renewal of each secret",
        &|s| s.refreshed_at,
    );
    let failures = Counter::<u64>::default();
    failures.inc_by(status.refresh_failures);
    registry.register(
        "refresh_failures",
        "Fetches and renewals that failed",
        failures,
    );
    let swaps = Counter::<u64>::default();
    swaps.inc_by(status.generation_swaps);
    registry.register("generation_swaps", "New generations written to disk", swaps);
    let revoked = Gauge::<i64>::default();
    revoked.set(status.revoked as i64);
    registry.register(
        "revoked_secrets",
        "Configured secrets currently revoked",
        revoked,
    );
    let requests = Family::<RequestLabels, Counter>::default();
    for ((method, result), n) in local_api.snapshot() {
        requests
            .get_or_create(&RequestLabels { method, result })
            .inc_by(n);
    }
    registry.register(
        "local_api_requests",
        "Local Secrets API calls by method and result",
        requests,
    );
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

async fn metrics(State(state): State<HttpState>) -> ([(&'static str, &'static str); 1], String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&snapshot(&state.status), &state.local_api, now),
    )
}

/// Serves the probes and metrics until the task is dropped.
pub async fn serve(listener: TcpListener, state: HttpState) {
    info!(addr = ?listener.local_addr().ok(), "health port listening");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let _ = axum::serve(listener, app).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_secrets_never_values() {
        let status = Status {
            secrets: vec![SecretStatus {
                name: "payments/db".into(),
                version: 3,
                received_at: 100,
                refreshed_at: 150,
                expires_at: 400,
            }],
            refresh_failures: 2,
            generation_swaps: 5,
            ..Status::default()
        };
        let counters = LocalApiCounters::default();
        counters.count("get", "ok");
        let text = render(&status, &counters, 200);
        assert!(
            text.contains(
                r#"secrets_sidecar_local_api_requests_total{method="get",result="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"secrets_sidecar_secret_version{secret="payments/db"} 3"#),
            "{text}"
        );
        assert!(text.contains(
            r#"secrets_sidecar_secret_lease_remaining_seconds{secret="payments/db"} 200"#
        ));
        assert!(text.contains(r#"secrets_sidecar_secret_age_seconds{secret="payments/db"} 100"#));
        assert!(text.contains("secrets_sidecar_refresh_failures_total 2"));
        assert!(text.contains("secrets_sidecar_generation_swaps_total 5"));
    }
}
