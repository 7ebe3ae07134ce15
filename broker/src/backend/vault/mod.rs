//! HashiCorp Vault and OpenBao as a source of secrets, through `vaultrs`.
//!
//! - **Login** with the broker's own identity (token, AppRole, JWT or
//!   Kubernetes auth). The token is renewed with `renew-self` at about two
//!   thirds of its TTL; when it cannot be renewed (or Vault answers 403, as
//!   after a restart of a dev server), the broker logs in again. The token
//!   is never logged and never part of an error.
//! - **KV v2**: one task per mapped path reads it every `poll_interval`
//!   (±10%), however many pods read it: the value is served from memory, a
//!   new KV version becomes a rotation pushed to the watch streams. While
//!   Vault fails, the last value is served for at most `max_stale`.
//! - **Dynamic secrets** (database credentials, PKI certificates): every
//!   fetch issues a credential for that pod. Its real expiry bounds the pod's
//!   lease; renewing the pod's lease renews the Vault lease; when the pod's
//!   lease ends (expiry, release, kill switch) the upstream lease is revoked
//!   by [`keep_upstream_revoked`].
//!
//! Layout: `session.rs` (login, token renewal, the retry on a 403), `kv.rs`
//! (KV v2 reads and their pollers' values), `dynamic.rs` (credentials and
//! certificates issued per pod, their upstream leases renewed and revoked),
//! `revoker.rs` ([`keep_upstream_revoked`]), `source.rs` (the broker's
//! `Source` over all of it), `config.rs` (`[vault]`).

pub mod config;

mod dynamic;
mod kv;
mod revoker;
mod session;
mod source;
pub use revoker::keep_upstream_revoked;
pub use source::VaultSource;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{broadcast, watch};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use self::config::{Mapping, MappingKind, VaultConfig};
use super::polled::{PollError, Polled};
use crate::backend::rotation::Rotation;
pub use crate::backend::source::Upstream;
pub use crate::backend::upstream::UpstreamLeases;
use crate::error_chain::error_chain;

/// What can go wrong talking to Vault. Messages name the path and what Vault
/// said, never the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VaultError {
    /// Vault answered with an error status.
    #[error("vault {location}: HTTP {code}: {message}")]
    Api {
        location: String,
        code: u16,
        message: String,
    },
    /// Vault could not be reached (connection refused, timeout, TLS).
    #[error("vault {location}: unreachable: {message}")]
    Unreachable { location: String, message: String },
    /// The broker could not log in to Vault.
    #[error("vault login ({method}): {message}")]
    Login {
        method: &'static str,
        message: String,
    },
    /// Vault answered something this broker does not understand.
    #[error("vault {location}: unexpected answer: {message}")]
    Unexpected { location: String, message: String },
    /// The secret does not exist in Vault.
    #[error("vault {location}: not found")]
    NotFound { location: String },
}

impl VaultError {
    fn from_client(location: &str, e: ClientError) -> VaultError {
        let location = location.to_owned();
        match e {
            ClientError::APIError { code: 404, .. } => VaultError::NotFound { location },
            ClientError::APIError { code, errors } => VaultError::Api {
                location,
                code,
                message: if errors.is_empty() {
                    "no details".into()
                } else {
                    errors.join("; ")
                },
            },
            // A parse error's chain may quote the answer (serde quotes the
            // offending value): never pass it on.
            ClientError::RestClientError {
                source:
                    rustify::errors::ClientError::ResponseParseError { .. }
                    | rustify::errors::ClientError::ResponseConversionError { .. }
                    | rustify::errors::ClientError::ResponseError { .. },
            } => VaultError::Unexpected {
                location,
                message: "the answer could not be parsed".into(),
            },
            ClientError::RestClientError { source } => VaultError::Unreachable {
                location,
                message: error_chain(&source),
            },
            other => VaultError::Unexpected {
                location,
                message: other.to_string(),
            },
        }
    }

    /// Whether logging in again may help (the token is unknown to Vault).
    fn is_auth(&self) -> bool {
        matches!(self, VaultError::Api { code: 403, .. })
    }
}

impl PollError for VaultError {
    fn is_gone(&self) -> bool {
        matches!(self, VaultError::NotFound { .. })
    }
}

/// A logged-in client and what Vault said about its token.
struct Session {
    client: Arc<VaultClient>,
    /// The token's TTL when issued or last renewed; zero: it never expires.
    ttl: Duration,
    renewable: bool,
    /// When this token was obtained by logging in.
    logged_in: Instant,
    /// When its TTL was last set (login or renewal).
    renewed: Instant,
}

/// The Vault backend. Cheap to share behind an `Arc`.
pub struct Vault {
    cfg: VaultConfig,
    base: VaultClient,
    session: RwLock<Option<Arc<Session>>>,
    login_lock: tokio::sync::Mutex<()>,
    by_name: HashMap<String, usize>,
    /// The polled value of each KV mapping (by mapping index; `None` for dynamic ones).
    kv: Vec<Option<Polled<VaultError>>>,
    /// Requests sent to Vault, counted as `backend_reads{backend="vault"}`.
    reads: prometheus_client::metrics::counter::Counter,
}

fn upstream_kind(m: &Mapping) -> &'static str {
    match m.kind {
        MappingKind::Kv { .. } => "kv",
        MappingKind::Database { .. } => "database",
        MappingKind::Pki { .. } => "pki",
    }
}

impl Vault {
    /// A backend for `cfg`. Does not contact Vault: [`Vault::login`] does.
    pub fn new(
        cfg: VaultConfig,
        reads: prometheus_client::metrics::counter::Counter,
    ) -> Result<Vault, String> {
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&cfg.address)
            .timeout(Some(cfg.timeout))
            .token("")
            .verify(true);
        if let Some(ca) = &cfg.ca_file {
            settings.ca_certs(vec![ca.display().to_string()]);
        } else {
            settings.ca_certs(Vec::new());
        }
        if let Some(ns) = &cfg.namespace {
            settings.namespace(Some(ns.clone()));
        }
        let settings = settings
            .build()
            .map_err(|e| format!("vault.address: {e}"))?;
        let base = VaultClient::new(settings).map_err(|e| format!("vault: {}", error_chain(&e)))?;
        let by_name = cfg
            .secrets
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let kv = cfg
            .secrets
            .iter()
            .map(|m| match m.kind {
                MappingKind::Kv { poll_interval, .. } => Some(Polled::new(
                    &m.name,
                    m.location(),
                    poll_interval,
                    cfg.max_stale,
                )),
                _ => None,
            })
            .collect();
        Ok(Vault {
            cfg,
            base,
            session: RwLock::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            by_name,
            kv,
            reads,
        })
    }

    pub fn config(&self) -> &VaultConfig {
        &self.cfg
    }

    /// The mapping that serves `name`, if Vault serves it.
    pub fn mapping(&self, name: &str) -> Option<&Mapping> {
        self.by_name.get(name).map(|i| &self.cfg.secrets[*i])
    }

    /// Starts the session keeper and one poller per KV mapping.
    pub fn start(
        self: &Arc<Self>,
        tx: broadcast::Sender<Rotation>,
        shutdown: watch::Receiver<bool>,
    ) {
        tokio::spawn(self.clone().keep_token_fresh(shutdown.clone()));
        for (i, m) in self.cfg.secrets.iter().enumerate() {
            if m.is_dynamic() {
                continue;
            }
            let (vault, m, tx, shutdown) = (self.clone(), m.clone(), tx.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Some(slot) = &vault.kv[i] {
                    let read = |_| async { vault.read_kv(&m).await.map(|v| (v, String::new())) };
                    slot.poll(read, tx, shutdown).await;
                }
            });
        }
    }

    /// The upstream kind of a mapping, for metrics.
    pub fn kind_of(&self, name: &str) -> Option<&'static str> {
        self.mapping(name).map(upstream_kind)
    }
}

/// Overwrites every string in a parsed answer before it is dropped
/// (serde_json's values are plain `String`s, not zeroizing types).
pub(crate) fn wipe_json(v: &mut Value) {
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe_json),
        Value::Object(o) => o.values_mut().for_each(wipe_json),
        _ => {}
    }
}
