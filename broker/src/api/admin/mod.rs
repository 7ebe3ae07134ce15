//! The admin API: HTTPS with client-certificate authentication, JSON bodies,
//! an OpenAPI document at `/v1/openapi.json`. Each certificate maps to a role
//! (`viewer` < `revoker` < `admin`) by one typed field: the subject CN (only
//! when the subject has exactly one), or a SAN of one type (`uri:`, `dns:`,
//! `email:`). Every call is written to the audit log as a bounded summary;
//! the role is checked before a request body is read, and bodies are limited
//! to [`MAX_BODY_BYTES`] (a secret's value to [`MAX_SECRET_BODY_BYTES`]).
//!
//! | method | path | role |
//! |---|---|---|
//! | GET | `/v1/revocations` | viewer |
//! | POST | `/v1/revocations` | revoker |
//! | DELETE | `/v1/revocations/{id}` | revoker |
//! | GET | `/v1/leases?namespace=&limit=` | viewer |
//! | GET | `/v1/audit?after=&limit=` or `?tail=N` | viewer |
//! | GET | `/v1/audit/verify` | viewer |
//! | POST | `/v1/audit/verify` (body: exported checkpoints) | viewer |
//! | GET | `/v1/secrets` | viewer (names and versions only) |
//! | GET, PUT, DELETE | `/v1/secrets/{name}` | admin |
//!
//! Layout: this file (the router and the listener), `handler.rs` (what
//! every handler shares: the state, the caller, the role check, errors),
//! `tls.rs` (certificates to callers, the TLS config), `bounds.rs` (body
//! and summary limits), one file per resource (`revocations.rs`,
//! `leases.rs`, `audit.rs`, `secrets.rs`), `openapi.rs` (the document),
//! `config.rs` (`[admin]`).

use std::sync::Arc;

use axum::Router;
use axum::extract::Extension;
use axum::http::StatusCode;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::tls_reload::ReloadingTls;

mod audit;
mod bounds;
pub mod config;
mod handler;
mod leases;
mod openapi;
mod revocations;
mod secrets;
mod tls;

pub use self::bounds::{MAX_BODY_BYTES, MAX_SECRET_BODY_BYTES};
pub use self::config::{AdminClient, AdminConfig, AdminRole};
pub use self::handler::{AdminState, ApiError, Caller};
pub use self::openapi::openapi_document;
pub use self::tls::{identify, load_cert_and_key, tls_config};

/// The router, without TLS (tests and the server wrap it).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi::openapi))
        .route(
            "/v1/revocations",
            get(revocations::list).post(revocations::create),
        )
        .route(
            "/v1/revocations/{id}",
            axum::routing::delete(revocations::delete),
        )
        .route("/v1/leases", get(leases::list))
        .route("/v1/audit", get(audit::records))
        .route(
            "/v1/audit/verify",
            get(audit::verify).post(audit::verify_with),
        )
        .route("/v1/secrets", get(secrets::list))
        .route(
            "/v1/secrets/{*name}",
            get(secrets::get).put(secrets::put).delete(secrets::delete),
        )
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /v1/openapi.json".into(),
            )
        })
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` flips; each
/// connection's handshake uses the TLS config current at its start.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    clients: Arc<Vec<AdminClient>>,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(state);
    info!(addr = ?listener.local_addr().ok(), "admin API listening (HTTPS, client certificates)");
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = crate::shutdown::until_true(&mut shutdown) => return,
        };
        let acceptor = tls.acceptor();
        let app = app.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(peer = %peer, error = %e, "admin TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let caller = identify(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first()),
                &clients,
            );
            let service = TowerToHyperService::new(app.layer(Extension(caller)));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
