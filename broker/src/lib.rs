//! secrets-broker: verifies workload identity tokens (Kubernetes
//! service-account JWTs) and exchanges them for short-lived secrets.
//!
//! Layout:
//! - [`config`]: the TOML file → a validated [`config::Config`]; a section's
//!   types sit beside what it configures (`identity::config`, `policy`,
//!   `backend::*::config`), all checked alike (`config_check`).
//! - [`identity`]: JWKS (discovery or static file) and token verification.
//! - [`policy`]: identity → role → decision, deny by default.
//! - [`backend`]: sources of secrets; [`backend::embedded`] is the default store.
//! - [`cache`]: the read cache with coalesced loads (one backend read, many pods).
//! - [`db`]: SQLite (one replica) or PostgreSQL (several), one schema.
//! - [`state`]: revocation rules and their in-memory view, leases, the audit log.
//! - [`api::grpc`]: the `Broker` service, where a call reads top to bottom.
//! - [`dev`]: `secrets-broker dev`, a complete local system in one process.
//! - [`inject`]: `secrets-broker inject`, the sidecar injection webhook.
//!
//! [`run`] wires them: the caller passes the listener and the shutdown signal,
//! so tests bind port 0 and stop the broker with a oneshot.

pub mod api;
pub mod backend;
pub mod cache;
pub mod clock;
pub mod config;
mod config_check;
pub mod db;
pub mod dev;
pub mod error_chain;
pub mod identity;
pub mod inject;
pub mod key_file;
pub mod policy;
pub mod shutdown;
pub mod state;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use secrets_broker_proto::v1::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::api::grpc::{BrokerService, Rotations, poll_rotations};
use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::config::Config;
use crate::db::Db;
use crate::identity::jwks::JwksError;
use crate::identity::verify::Verifiers;
use crate::policy::Policy;
use crate::shutdown::until_true;
use crate::state::audit::Audit;
use crate::state::revocation::{Revocations, View};

/// The largest request message the broker decodes (256 names of 253
/// bytes and their framing fit many times over); more is RESOURCE_EXHAUSTED.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The gRPC server's TLS certificate or key cannot be used (unreadable,
    /// not PEM, a key that is not the certificate's).
    #[error("{0}")]
    Tls(#[from] api::tls_reload::TlsFileError),
    /// The identity configuration cannot be used (e.g. an unreadable CA file).
    #[error("identity: {0}")]
    Identity(#[from] JwksError),
    /// A TokenReview client could not be set up (kubeconfig, in-cluster config).
    #[error("identity: {0}")]
    Kubernetes(String),
    /// The embedded store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The database could not be reached or migrated.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The admin API or the operations port could not start (TLS files,
    /// client CA, listener).
    #[error("admin API: {0}")]
    Admin(String),
    /// A backend's settings cannot be used (e.g. Vault's address or CA
    /// file), or two backends map one secret name.
    #[error("{0}")]
    Backend(String),
    /// The gRPC server failed (TLS setup, listener).
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The audit key file (`audit.key_file`) cannot be used.
    #[error("{0}")]
    AuditKey(#[from] state::audit_key::AuditKeyError),
}

/// Installs aws-lc-rs as the process's rustls crypto provider; idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Runs a broker on `listener` until `shutdown` completes, then drains
/// in-flight calls for at most `server.shutdown_grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    install_crypto_provider();
    // Read again when the files change (`api::tls_reload`); each new
    // connection's handshake takes the config current at its start.
    let (tls, leaf) = api::tls_reload::ReloadingTls::load(api::tls_reload::TlsFiles {
        listener: "grpc",
        cert: api::tls_reload::ConfigFile::new(
            "server.tls_cert_file",
            &config.server.tls_cert_file,
        ),
        key: api::tls_reload::ConfigFile::new("server.tls_key_file", &config.server.tls_key_file),
        client_ca: None,
        alpn: vec![b"h2".to_vec()],
    })?;
    api::tls_reload::log_loaded(&tls, &leaf);
    let tls = Arc::new(tls);

    let audit_keys = match &config.audit.key_file {
        Some(path) => Some(Arc::new(state::audit_key::AuditKeys::load(path)?)),
        None => {
            warn!(
                "audit: no audit.key_file: the audit log is chained with plain SHA-256, which anyone who can write the database can recompute; set [audit] key_file to make it tamper-evident"
            );
            None
        }
    };
    let db = Db::connect(&config.database).await?;
    let store = EmbeddedStore::new(db.clone(), &config.store.key_file)?;
    // Rows written before the version was bound into their associated data.
    match store.reseal_legacy().await {
        Ok(0) => {}
        Ok(n) => info!(
            rows = n,
            "embedded store: older rows sealed again with their version bound"
        ),
        Err(e) => {
            warn!(error = %e, "embedded store: cannot seal older rows again; they are still served")
        }
    }
    let revocations = Revocations::new(db.clone());
    let view = Arc::new(View::new(config.revocation.max_staleness));
    let refreshes = prometheus_client::metrics::family::Family::default();
    let verifier = Arc::new(
        Verifiers::new(&config.issuers, &refreshes)
            .await
            .map_err(RunError::Kubernetes)?,
    );
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new(refreshes));
    let cache = cache::SecretCache::new(store.clone(), config.store.cache_ttl, metrics.clone());
    let upstream = backend::upstream::UpstreamLeases::new(db.clone());
    let versions = backend::rotation::Versions::default();
    // Every source, built once: each name goes to the source that maps it,
    // the rest to the embedded store.
    let embedded = backend::embedded::EmbeddedSource::new(cache.clone(), versions.clone());
    let sources = backend::registry::build(&config, &db, &metrics, embedded, &upstream)
        .await
        .map_err(RunError::Backend)?;
    let sources = Arc::new(sources);
    let ops = match config.server.ops_listen {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            RunError::Admin(format!("cannot listen on server.ops_listen {addr}: {e}"))
        })?),
    };
    let audit = Audit::keyed(db.clone(), audit_keys, metrics.audit.clone());
    // One task writes the exchange path's rows: leases, then audit records.
    let (leases, auditor, writer) = state::writer::start_with(audit.clone());
    // The admin API binds before anything is served, so its errors stop the start.
    let admin = match &config.admin {
        None => None,
        Some(admin) => {
            let tls = api::admin::tls_config(admin).map_err(RunError::Admin)?;
            let listener = TcpListener::bind(admin.listen)
                .await
                .map_err(|e| RunError::Admin(format!("cannot listen on {}: {e}", admin.listen)))?;
            Some((listener, tls, Arc::new(admin.clients.clone())))
        }
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<BrokerServer<BrokerService>>()
        .await;

    let (down_tx, down_rx) = watch::channel(false);
    // Signed checkpoints of the audit chain, outside the database.
    let checkpoints = state::checkpoint::start(
        &config.audit,
        audit.clone(),
        auditor.clone(),
        down_rx.clone(),
    );
    let (rot_tx, _) = broadcast::channel(1024);
    sources.start(&backend::source::Start {
        rotations: rot_tx.clone(),
        shutdown: down_rx.clone(),
    });

    // Load every issuer's keys in the background and keep them fresh; until
    // they load, calls answer UNAVAILABLE and health says NOT_SERVING.
    for one in verifier.all().iter().filter(|v| Verifiers::uses_keys(v)) {
        let one = one.clone();
        let all = verifier.clone();
        let health = health.clone();
        let mut down = down_rx.clone();
        tokio::spawn(async move {
            let fresh = one.jwks().keep_fresh(async || {
                if all.is_loaded() {
                    health.set_serving::<BrokerServer<BrokerService>>().await;
                }
            });
            tokio::select! {
                _ = fresh => {}
                _ = until_true(&mut down) => {}
            }
        });
    }
    // Ended leases are kept a day for `leases list` and audits, then pruned.
    tokio::spawn({
        let leases = leases.clone();
        let mut down = down_rx.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
            loop {
                tokio::select! {
                    _ = tick.tick() => match leases.prune(clock::unix_now(), 24 * 3600).await {
                        Ok(0) => {}
                        Ok(n) => info!(leases = n, "pruned ended leases"),
                        Err(e) => warn!(error = %e, "cannot prune ended leases"),
                    },
                    _ = until_true(&mut down) => return,
                }
            }
        }
    });
    tokio::spawn(state::revocation::keep_fresh(
        view.clone(),
        revocations.clone(),
        db.clone(),
        config.revocation.refresh_interval,
        down_rx.clone(),
    ));
    let rotations = Arc::new(Rotations::new(
        store.clone(),
        versions.clone(),
        cache.clone(),
        rot_tx.clone(),
    ));
    tokio::spawn(api::tls_reload::watch(
        tls.clone(),
        config.server.tls_reload_interval,
        metrics.tls_reloads.clone(),
        down_rx.clone(),
    ));
    if let Some((listener, tls, clients)) = admin {
        tokio::spawn(api::tls_reload::watch(
            tls.clone(),
            config.server.tls_reload_interval,
            metrics.tls_reloads.clone(),
            down_rx.clone(),
        ));
        let state = api::admin::AdminState {
            revocations: revocations.clone(),
            leases: leases.clone(),
            audit,
            auditor: auditor.clone(),
            store: store.clone(),
            view: view.clone(),
            rotations: rotations.clone(),
        };
        tokio::spawn(api::admin::serve(
            listener,
            tls,
            clients,
            state,
            down_rx.clone(),
        ));
    }
    tokio::spawn(poll_rotations(
        rotations.clone(),
        config.store.poll_interval,
        down_rx.clone(),
    ));

    if let Some(listener) = ops {
        let state = api::http::OpsState {
            metrics: metrics.clone(),
            view: view.clone(),
            verifier: verifier.clone(),
            db: db.clone(),
            sources: sources.clone(),
        };
        tokio::spawn(api::http::serve(listener, state, down_rx.clone()));
    }
    let limits = Arc::new(
        api::limits::Limits::new(
            config.server.max_in_flight,
            config.server.max_watch_streams,
            api::limits::Rate {
                per_second: config.server.rate_per_identity,
                burst: config.server.burst_per_identity,
            },
            api::limits::Rate {
                per_second: config.server.rate_global,
                burst: config.server.burst_global,
            },
        )
        .with_workload_streams(config.server.max_watch_streams_per_workload),
    );
    tokio::spawn({
        let limits = limits.clone();
        let mut down = down_rx.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => limits.forget_idle(),
                    _ = until_true(&mut down) => return,
                }
            }
        }
    });
    // Refused calls beyond what is audited in full: one summary record per
    // peer, call and kind at each interval.
    let refusals = Arc::new(api::refusals::RefusalAudit::default());
    tokio::spawn({
        let (refusals, auditor, mut down) = (refusals.clone(), auditor.clone(), down_rx.clone());
        async move {
            let mut tick = tokio::time::interval(api::refusals::SUMMARY_INTERVAL);
            loop {
                let last = tokio::select! {
                    _ = tick.tick() => false,
                    _ = until_true(&mut down) => true,
                };
                for s in refusals.drain() {
                    auditor.record(state::audit::Entry::new(
                        format!("peer:{}", s.peer),
                        s.action,
                        "refusals_summarized",
                        serde_json::json!({
                            "kind": s.kind,
                            "refusals": s.count,
                            "interval_seconds": api::refusals::SUMMARY_INTERVAL.as_secs(),
                        }),
                    ));
                }
                if last {
                    return;
                }
            }
        }
    });
    let service = BrokerService {
        verifier,
        policy: Arc::new(Policy::new(config.roles.clone())),
        sources: sources.clone(),
        upstream,
        leases,
        view,
        auditor,
        metrics,
        rotations: rot_tx,
        heartbeat: config.server.watch_heartbeat,
        limits,
        max_response_bytes: config.server.max_response_bytes,
        refusals,
        shutdown: down_rx.clone(),
    };
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, "broker listening (gRPC over TLS)");
    // The bound applies before the handshake; a connection that does not
    // finish its handshake within server.tls_handshake_timeout is closed.
    let incoming = api::connections::handshaken(
        api::connections::bounded(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            config.server.max_connections,
        ),
        tls,
        config.server.tls_handshake_timeout,
    );
    let mut signal_rx = down_rx.clone();
    let max_token_bytes = config
        .issuers
        .iter()
        .map(|i| i.max_token_bytes)
        .max()
        .unwrap_or_default();
    // tonic leaves HTTP/2 streams per connection unbounded: a client that
    // multiplexes a flood on few connections would park every call it sends
    // in the broker's memory (and h2 would end up closing the connection,
    // failing every call on it). Bounded, the excess waits on the client.
    let mut builder = Server::builder();
    if let Some(age) = config.server.max_connection_age {
        // Each sidecar holds one connection for as long as it runs, so the
        // replicas an autoscaler adds would see only new pods: an aged
        // connection gets GOAWAY (calls in flight finish, new calls go to a
        // new connection, which the Service may send to another replica).
        // The ±10 % is drawn per replica, so replicas started together do
        // not age their connections out together.
        let age = age.mul_f64(0.9 + 0.2 * fastrand::f64());
        info!(max_connection_age = ?age, grace = ?config.server.max_connection_age_grace, "connections age out");
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(config.server.max_connection_age_grace);
    }
    let serve = builder
        .max_concurrent_streams(config.server.max_streams_per_connection)
        // A peer that stops answering (its node gone, a half-open TCP
        // connection) is noticed within a minute, with or without a stream.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // Room for a token larger than `identity.max_token_bytes`, so that
        // its refusal names the size (see `api::limits::header_list_limit`).
        .http2_max_header_list_size(api::limits::header_list_limit(max_token_bytes))
        // Requests tonic refuses before a handler runs, with the codes of
        // the contract (see `api::decode_errors`).
        .layer(api::decode_errors::DecodeErrorsLayer)
        .add_service(health_service)
        // Set, not left to tonic's defaults: requests are small (a token
        // travels in a header), answers at most max_response_bytes of
        // values plus their framing.
        .add_service(
            BrokerServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(config.server.max_response_bytes + 64 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            until_true(&mut signal_rx).await;
        });
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested: draining");
        health
            .set_not_serving::<BrokerServer<BrokerService>>()
            .await;
        let _ = down_tx.send(true);
    });
    let grace = config.server.shutdown_grace;
    let mut deadline_rx = down_rx;
    tokio::select! {
        r = serve => r?,
        _ = async move {
            until_true(&mut deadline_rx).await;
            tokio::time::sleep(grace).await;
        } => warn!(grace = ?grace, "drain deadline passed; closing remaining calls"),
    }
    // The service (and its handles on the writer) is gone: let the writer
    // drain its queues (the audit records).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    // The last checkpoint covers the last records written.
    if let Some(c) = checkpoints {
        c.finish().await;
    }
    db.close().await;
    info!("broker stopped");
    Ok(())
}

/// Verifies `token` as a login would and resolves its role. On success, a
/// JSON line with the identity and role; on refusal, the reason.
pub async fn check_token(config: &Config, token: &str, role: &str) -> Result<String, String> {
    install_crypto_provider();
    let verifier = Verifiers::new(&config.issuers, &Default::default()).await?;
    let identity = verifier.verify(token).await.map_err(|e| e.to_string())?;
    let policy = Policy::new(config.roles.clone());
    let role = policy.resolve(&identity, role).map_err(|e| e.to_string())?;
    // Revocation, as a login would see it.
    let db = Db::connect(&config.database)
        .await
        .map_err(|e| format!("cannot read revocation rules: {e}"))?;
    let rules = Revocations::new(db.clone()).list().await;
    db.close().await;
    let view = View::new(config.revocation.max_staleness);
    view.replace(rules.map_err(|e| format!("cannot read revocation rules: {e}"))?);
    view.check(&identity, &[]).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "accepted": true,
        "identity": identity,
        "role": role.name,
        "secrets": role.secrets.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "lease_ttl_seconds": role.ttl.as_secs(),
    })
    .to_string())
}
