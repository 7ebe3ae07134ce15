//! The webhook's HTTPS server: `POST /mutate` for the API server, and
//! `/healthz`, `/readyz`, `/metrics` (also on the optional plain-HTTP
//! `ops_listen`). The serving certificate is re-read when its files change
//! (cert-manager renews it in the mounted Secret), without a restart.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::patch::Injector;

/// AdmissionReview bodies carry a whole pod (and, on updates, the old one);
/// etcd keeps objects under 1.5 MiB.
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The injector's metrics (prefix `secrets_broker_injector_`). Labels come
/// from fixed sets: never a pod, namespace or annotation value.
pub struct Metrics {
    registry: Registry,
    reviews: Family<ResultLabels, Counter>,
    review_duration: Histogram,
    tls_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("secrets_broker_injector");
        let reviews = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reviews",
            "Admission reviews by result (injected, not_requested, already_injected, excluded, denied, ignored, bad_request)",
            reviews.clone(),
        );
        let review_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        registry.register(
            "review_duration_seconds",
            "Time to answer an admission review",
            review_duration.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Reloads of the serving certificate after its files changed, by result (ok, error)",
            tls_reloads.clone(),
        );
        Metrics {
            registry,
            reviews,
            review_duration,
            tls_reloads,
        }
    }

    fn review(&self, result: &'static str, elapsed: Duration) {
        self.reviews.get_or_create(&ResultLabels { result }).inc();
        self.review_duration.observe(elapsed.as_secs_f64());
    }

    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

/// The serving certificate, swapped in place when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the two files as last loaded: a change means reload.
    digest: Vec<u8>,
}

impl ReloadingCert {
    /// Loads the certificate and key; an error names the file.
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<ReloadingCert, String> {
        let loaded = Self::read(&cert_file, &key_file)?;
        Ok(ReloadingCert {
            cert_file,
            key_file,
            current: RwLock::new(loaded),
        })
    }

    fn read(cert_file: &std::path::Path, key_file: &std::path::Path) -> Result<Loaded, String> {
        crate::install_crypto_provider();
        let digest = Self::digest(cert_file, key_file)?;
        let (certs, key) = crate::api::admin::load_cert_and_key(cert_file, key_file)?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| format!("{}: {e}", key_file.display()))?;
        Ok(Loaded {
            key: Arc::new(key),
            digest,
        })
    }

    fn digest(cert_file: &std::path::Path, key_file: &std::path::Path) -> Result<Vec<u8>, String> {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for p in [cert_file, key_file] {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
            );
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(&bytes);
        }
        Ok(ctx.finish().as_ref().to_vec())
    }

    /// Re-reads the files if they changed: `Ok(true)` after a reload,
    /// `Ok(false)` when unchanged; on error the old certificate stays.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let digest = Self::digest(&self.cert_file, &self.key_file)?;
        let unchanged = self
            .current
            .read()
            .map(|c| c.digest == digest)
            .unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let loaded = Self::read(&self.cert_file, &self.key_file)?;
        if let Ok(mut c) = self.current.write() {
            *c = loaded;
        }
        Ok(true)
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    injector: Arc<Injector>,
    metrics: Arc<Metrics>,
    draining: watch::Receiver<bool>,
}

fn router(state: AppState, with_mutate: bool) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if with_mutate {
        r = r
            .route("/mutate", post(mutate))
            .layer(DefaultBodyLimit::max(MAX_BODY));
    }
    r.with_state(state)
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if *s.draining.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn mutate(State(s): State<AppState>, body: Bytes) -> Response {
    let start = Instant::now();
    let outcome = super::review(&s.injector, &body);
    s.metrics.review(outcome.result, start.elapsed());
    match outcome.response {
        Ok(json) => (StatusCode::OK, [("content-type", "application/json")], json).into_response(),
        Err(message) => {
            warn!(error = %message, "malformed admission review");
            (
                StatusCode::BAD_REQUEST,
                [("content-type", "application/json")],
                serde_json::json!({ "error": message }).to_string(),
            )
                .into_response()
        }
    }
}

/// Listeners and TLS, bound and loaded before anything is served, so that
/// their errors stop the start.
pub struct Bound {
    pub listener: TcpListener,
    pub ops: Option<TcpListener>,
    pub cert: Arc<ReloadingCert>,
}

/// Serves until `shutdown` completes, then drains in-flight reviews for at
/// most `grace`.
pub async fn serve(
    injector: Injector,
    bound: Bound,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let grace = injector.config().server.shutdown_grace;
    let reload_every = injector.config().server.tls_reload_interval;
    let metrics = Arc::new(Metrics::new());
    let (down_tx, down_rx) = watch::channel(false);
    let state = AppState {
        injector: Arc::new(injector),
        metrics: metrics.clone(),
        draining: down_rx.clone(),
    };

    // Watch the certificate files.
    tokio::spawn({
        let cert = bound.cert.clone();
        let metrics = metrics.clone();
        let mut down = down_rx.clone();
        async move {
            let mut tick = tokio::time::interval(reload_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = crate::shutdown::until_true(&mut down) => return,
                }
                match cert.reload_if_changed() {
                    Ok(false) => {}
                    Ok(true) => {
                        metrics
                            .tls_reloads
                            .get_or_create(&ResultLabels { result: "ok" })
                            .inc();
                        info!("serving certificate reloaded (its files changed)");
                    }
                    Err(e) => {
                        metrics
                            .tls_reloads
                            .get_or_create(&ResultLabels { result: "error" })
                            .inc();
                        warn!(error = %e, "cannot reload the serving certificate; keeping the current one");
                    }
                }
            }
        }
    });

    if let Some(ops) = bound.ops {
        let app = router(state.clone(), false);
        let mut down = down_rx.clone();
        info!(addr = ?ops.local_addr().ok(), "operations port listening (metrics, health)");
        tokio::spawn(async move {
            let _ = axum::serve(ops, app)
                .with_graceful_shutdown(async move { crate::shutdown::until_true(&mut down).await })
                .await;
        });
    }

    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(bound.cert.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = router(state, true);
    let listener = bound.listener;
    info!(addr = ?listener.local_addr().ok(), "injection webhook listening (HTTPS, POST /mutate)");

    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested: draining");
        let _ = down_tx.send(true);
    });
    let mut connections = tokio::task::JoinSet::new();
    let mut down = down_rx.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = crate::shutdown::until_true(&mut down) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let mut down = down_rx.clone();
        connections.spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = crate::shutdown::until_true(&mut down) => {
                    // Finish the requests in flight, accept no new ones.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(grace = ?grace, "drain deadline passed; closing remaining connections");
        connections.abort_all();
    }
    info!("injection webhook stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::tls::DevTls;

    #[test]
    fn certificate_reloads_on_change_and_keeps_the_old_one_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let files = DevTls::generate().unwrap().write(dir.path()).unwrap();
        let cert = ReloadingCert::load(files.cert.clone(), files.key.clone()).unwrap();
        let first = cert.current().unwrap();
        assert!(!cert.reload_if_changed().unwrap(), "unchanged files");

        // A half-renewed pair (a key that is no key): an error, old one kept.
        std::fs::write(
            &files.key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = cert.reload_if_changed().unwrap_err();
        assert!(e.contains("tls.key"), "{e}");
        assert!(Arc::ptr_eq(&first, &cert.current().unwrap()));

        // The renewed pair is taken.
        let renewed = DevTls::generate().unwrap().write(dir.path()).unwrap();
        assert!(cert.reload_if_changed().unwrap());
        let now = cert.current().unwrap();
        assert!(!Arc::ptr_eq(&first, &now));
        assert_ne!(first.cert[0], now.cert[0]);
        assert_eq!(renewed.cert, files.cert);
    }

    #[test]
    fn missing_files_are_named() {
        let e = ReloadingCert::load("/nonexistent/tls.crt".into(), "/nonexistent/tls.key".into())
            .unwrap_err();
        assert!(e.contains("/nonexistent/tls.crt"), "{e}");
    }
}
