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

pub mod config;

mod source;
pub use source::VaultSource;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use self::config::{Mapping, MappingKind, VaultAuth, VaultConfig};
use super::SecretVersion;
use super::polled::{PollError, Polled};
use crate::backend::rotation::Rotation;
pub use crate::backend::source::Upstream;
pub use crate::backend::upstream::UpstreamLeases;
use crate::clock::{unix_now, unix_now_ms};
use crate::error_chain::error_chain;
use crate::identity::Identity;

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

    /// A client sharing the base client's connection pool, with `token`.
    fn client_with(&self, token: &str) -> VaultClient {
        let mut middle = self.base.middle.clone();
        middle.token = token.to_owned();
        let mut settings = self.base.settings.clone();
        settings.token = token.to_owned();
        VaultClient {
            http: rustify::clients::reqwest::Client::new(
                &self.base.http.base,
                self.base.http.http.clone(),
            ),
            middle,
            settings,
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Logs in with the configured method and keeps the new session.
    /// Concurrent callers share one login: a caller that waited finds the
    /// session its predecessor made (newer than `stale`).
    pub async fn login(&self, stale: Option<Instant>) -> Result<Arc<VaultClient>, VaultError> {
        let _guard = self.login_lock.lock().await;
        // A session newer than the one that failed (another caller logged
        // in meanwhile), or only seconds old (a 403 from a missing policy
        // must not become a login per request), is used as it is.
        if let Some(s) = self.current()
            && stale
                .is_none_or(|t| s.logged_in > t || s.logged_in.elapsed() < Duration::from_secs(5))
        {
            return Ok(s.client.clone());
        }
        let method = self.cfg.auth.method();
        let login_err = |message: String| VaultError::Login { method, message };
        let read_file = |path: &std::path::Path, what: &str| {
            std::fs::read_to_string(path)
                .map(|t| SecretString::from(t.trim().to_owned()))
                .map_err(|e| login_err(format!("cannot read {what} {}: {e}", path.display())))
        };
        let describe = |e: ClientError| match VaultError::from_client("login", e) {
            VaultError::Api { code, message, .. } => format!("HTTP {code}: {message}"),
            VaultError::NotFound { .. } => "the auth mount does not exist (HTTP 404)".into(),
            other => other.to_string(),
        };
        let anonymous = self.client_with("");
        let (client, ttl, renewable) = match &self.cfg.auth {
            VaultAuth::Token { token_file } => {
                let token = read_file(token_file, "token_file")?;
                if token.expose_secret().is_empty() {
                    return Err(login_err(format!("{} is empty", token_file.display())));
                }
                let client = self.client_with(token.expose_secret());
                let me = vaultrs::token::lookup_self(&client)
                    .await
                    .map_err(|e| login_err(format!("token lookup failed: {}", describe(e))))?;
                (client, me.ttl, me.renewable.unwrap_or(false))
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_file(secret_id_file, "secret_id_file")?;
                let auth = vaultrs::auth::approle::login(
                    &anonymous,
                    mount,
                    role_id,
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| login_err(describe(e)))?;
                (
                    self.client_with(&auth.client_token),
                    auth.lease_duration,
                    auth.renewable,
                )
            }
            VaultAuth::Jwt {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_file(jwt_file, "jwt_file")?;
                let auth = vaultrs::auth::oidc::login(
                    &anonymous,
                    mount,
                    jwt.expose_secret(),
                    Some(role.clone()),
                )
                .await
                .map_err(|e| login_err(describe(e)))?;
                (
                    self.client_with(&auth.client_token),
                    auth.lease_duration,
                    auth.renewable,
                )
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_file(jwt_file, "jwt_file")?;
                let auth =
                    vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.expose_secret())
                        .await
                        .map_err(|e| login_err(describe(e)))?;
                (
                    self.client_with(&auth.client_token),
                    auth.lease_duration,
                    auth.renewable,
                )
            }
        };
        info!(
            method,
            ttl_s = ttl,
            renewable,
            address = %self.cfg.address,
            "logged in to vault"
        );
        let session = Arc::new(Session {
            client: Arc::new(client),
            ttl: Duration::from_secs(ttl),
            renewable,
            logged_in: Instant::now(),
            renewed: Instant::now(),
        });
        *self.session.write().unwrap_or_else(|e| e.into_inner()) = Some(session.clone());
        Ok(session.client.clone())
    }

    /// Runs `op` with a logged-in client; on a 403 (token unknown, e.g.
    /// after a Vault restart) logs in again once and retries.
    async fn call<T, F, Fut>(&self, location: &str, op: F) -> Result<T, VaultError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let (client, since) = match self.current() {
            Some(s) => (s.client.clone(), s.logged_in),
            None => (self.login(None).await?, Instant::now()),
        };
        self.reads.inc();
        match op(client)
            .await
            .map_err(|e| VaultError::from_client(location, e))
        {
            Err(e) if e.is_auth() => {
                warn!(location, error = %e, "vault refused the broker's token: logging in again");
                let client = self.login(Some(since)).await?;
                op(client)
                    .await
                    .map_err(|e| VaultError::from_client(location, e))
            }
            other => other,
        }
    }

    /// Keeps the broker's token alive: renews it at about two thirds of its
    /// TTL, logs in again when it cannot be renewed or renewal falls short.
    pub async fn keep_token_fresh(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.current() {
                None => Duration::ZERO,
                Some(s) if s.ttl.is_zero() => Duration::from_secs(300),
                Some(s) => (s.ttl * 2 / 3).saturating_sub(s.renewed.elapsed()),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::shutdown::until_true(&mut shutdown) => return,
            }
            let result = match self.current() {
                Some(s) if s.renewable && !s.ttl.is_zero() => self.renew_token(&s).await,
                Some(s) if s.ttl.is_zero() => Ok(()),
                Some(s) => self.login(Some(s.logged_in)).await.map(|_| ()),
                None => self.login(None).await.map(|_| ()),
            };
            match result {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "vault session not refreshed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = crate::shutdown::until_true(&mut shutdown) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    async fn renew_token(&self, s: &Session) -> Result<(), VaultError> {
        let increment = format!("{}s", s.ttl.as_secs());
        match vaultrs::token::renew_self(&*s.client, Some(&increment)).await {
            Ok(auth) if auth.lease_duration * 3 >= s.ttl.as_secs() * 2 => {
                let renewed = Arc::new(Session {
                    client: s.client.clone(),
                    ttl: Duration::from_secs(auth.lease_duration),
                    renewable: auth.renewable,
                    logged_in: s.logged_in,
                    renewed: Instant::now(),
                });
                *self.session.write().unwrap_or_else(|e| e.into_inner()) = Some(renewed);
                tracing::debug!(ttl_s = auth.lease_duration, "vault token renewed");
                Ok(())
            }
            Ok(auth) => {
                info!(
                    ttl_s = auth.lease_duration,
                    "vault token is near its max TTL: logging in again"
                );
                self.login(Some(s.logged_in)).await.map(|_| ())
            }
            Err(e) => {
                let e = VaultError::from_client("auth/token/renew-self", e);
                warn!(error = %e, "vault token renewal failed: logging in again");
                self.login(Some(s.logged_in)).await.map(|_| ())
            }
        }
    }

    /// Reads a KV v2 mapping from Vault (one request: data and version).
    async fn read_kv(&self, m: &Mapping) -> Result<SecretVersion, VaultError> {
        let MappingKind::Kv { path, key, .. } = &m.kind else {
            unreachable!("read_kv on a dynamic mapping")
        };
        let location = m.location();
        let resp = self
            .call(&location, |c| {
                let req = ReadSecretRequest::builder()
                    .mount(m.mount.clone())
                    .path(path.clone())
                    .build()
                    .expect("all fields set");
                async move { vaultrs::api::exec_with_result(&*c, req).await }
            })
            .await?;
        if resp.metadata.destroyed || !resp.metadata.deletion_time.is_empty() {
            return Err(VaultError::NotFound { location });
        }
        let mut data = resp.data;
        let value = kv_value(&data, key.as_deref());
        wipe_json(&mut data);
        let value: Vec<u8> = match value {
            Some(v) => v,
            None => {
                return Err(VaultError::NotFound {
                    location: format!(
                        "{location} (no such key in version {})",
                        resp.metadata.version
                    ),
                });
            }
        };
        Ok(SecretVersion {
            name: m.name.clone(),
            version: resp.metadata.version,
            value: SecretSlice::from(value),
        })
    }

    /// The KV mapping `name` and its polled value.
    fn kv_slot(&self, name: &str) -> Option<(&Mapping, &Polled<VaultError>)> {
        let i = *self.by_name.get(name)?;
        Some((&self.cfg.secrets[i], self.kv[i].as_ref()?))
    }

    /// The value of a KV mapping: from memory when the poller has it (and it
    /// is not older than `max_stale`), else one read shared by every caller.
    pub async fn kv_get(&self, name: &str) -> Result<Arc<SecretVersion>, VaultError> {
        let (m, slot) = self.kv_slot(name).expect("kv_get on a KV mapping");
        slot.get(|_| async { self.read_kv(m).await.map(|v| (v, String::new())) })
            .await
    }

    /// The version of a KV mapping as last read, if any.
    pub fn kv_version(&self, name: &str) -> Option<u64> {
        self.kv_slot(name)?.1.version()
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

    /// KV mappings that cannot be served now, with the reason (Vault's
    /// answer, or the login's failure).
    pub fn problems(&self) -> Vec<String> {
        self.kv
            .iter()
            .flatten()
            .filter_map(Polled::problem)
            .collect()
    }

    /// Issues a credential of a dynamic mapping for one pod.
    pub async fn issue(
        &self,
        name: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<(SecretVersion, Upstream), VaultError> {
        let m = &self.cfg.secrets[self.by_name[name]];
        let location = m.location();
        let version = unix_now_ms();
        match &m.kind {
            MappingKind::Kv { .. } => unreachable!("issue on a kv mapping"),
            MappingKind::Database { role } => {
                let path = format!("{}/creds/{role}", m.mount);
                let body = self
                    .call(&location, |c| {
                        raw(c, reqwest::Method::GET, path.clone(), None)
                    })
                    .await?;
                let unexpected = |what: &str| VaultError::Unexpected {
                    location: location.clone(),
                    message: format!("no {what} in the answer"),
                };
                let lease_id = body["lease_id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| unexpected("lease_id"))?
                    .to_owned();
                let duration = body["lease_duration"]
                    .as_i64()
                    .ok_or_else(|| unexpected("lease_duration"))?;
                #[derive(serde::Serialize)]
                struct Creds<'a> {
                    username: &'a str,
                    password: &'a str,
                }
                let field = |k: &str| body["data"][k].as_str();
                let creds = match (field("username"), field("password")) {
                    (Some(username), Some(password)) => {
                        serde_json::to_vec(&Creds { username, password }).unwrap_or_default()
                    }
                    _ => return Err(unexpected("data.username and data.password")),
                };
                let data = zeroize::Zeroizing::new(creds);
                let mut body = body;
                wipe_json(&mut body);
                Ok((
                    SecretVersion {
                        name: name.to_owned(),
                        version,
                        value: SecretSlice::from(data.to_vec()),
                    },
                    Upstream {
                        kind: "database",
                        mount: m.mount.clone(),
                        id: lease_id,
                        expires_at: unix_now() + duration,
                    },
                ))
            }
            MappingKind::Pki {
                role,
                common_name,
                alt_names,
                ttl: cert_ttl,
            } => {
                let fill = |t: &str| -> Result<String, VaultError> {
                    let pod = id.pod_name.as_deref();
                    if t.contains("{pod}") && pod.is_none() {
                        return Err(VaultError::Unexpected {
                            location: location.clone(),
                            message: "common_name uses {pod} but the token names no pod".into(),
                        });
                    }
                    Ok(t.replace("{namespace}", &id.namespace)
                        .replace("{service_account}", &id.service_account)
                        .replace("{pod}", pod.unwrap_or_default()))
                };
                let cn = fill(common_name)?;
                let alts = alt_names
                    .iter()
                    .map(|a| fill(a))
                    .collect::<Result<Vec<_>, _>>()?;
                let cert_ttl = cert_ttl.unwrap_or(ttl);
                let resp = self
                    .call(&location, |c| {
                        let (cn, alts) = (cn.clone(), alts.join(","));
                        let mount = m.mount.clone();
                        let role = role.clone();
                        async move {
                            let mut opts =
                                vaultrs::api::pki::requests::GenerateCertificateRequest::builder();
                            opts.common_name(cn).ttl(format!("{}s", cert_ttl.as_secs()));
                            if !alts.is_empty() {
                                opts.alt_names(alts);
                            }
                            vaultrs::pki::cert::generate(&*c, &mount, &role, Some(&mut opts)).await
                        }
                    })
                    .await?;
                let expires_at = resp
                    .expiration
                    .map(|e| e as i64)
                    .unwrap_or_else(|| unix_now() + cert_ttl.as_secs() as i64);
                let value = zeroize::Zeroizing::new(
                    serde_json::to_vec(&json!({
                        "certificate": resp.certificate,
                        "private_key": resp.private_key,
                        "private_key_type": resp.private_key_type,
                        "issuing_ca": resp.issuing_ca,
                        "ca_chain": resp.ca_chain.clone().unwrap_or_default(),
                        "serial_number": resp.serial_number,
                        "expiration": expires_at,
                    }))
                    .unwrap_or_default(),
                );
                let serial = resp.serial_number.clone();
                drop(zeroize::Zeroizing::new(resp.private_key));
                Ok((
                    SecretVersion {
                        name: name.to_owned(),
                        version,
                        value: SecretSlice::from(value.to_vec()),
                    },
                    Upstream {
                        kind: "pki",
                        mount: m.mount.clone(),
                        id: serial,
                        expires_at,
                    },
                ))
            }
        }
    }

    /// Extends an upstream lease by `ttl`; returns when it now ends. PKI
    /// certificates cannot be extended: their expiry is returned as is.
    pub async fn renew_upstream(&self, up: &Upstream, ttl: Duration) -> Result<i64, VaultError> {
        if up.kind != "database" {
            return Ok(up.expires_at);
        }
        let body = json!({ "lease_id": up.id, "increment": ttl.as_secs() });
        let answer = self
            .call("sys/leases/renew", |c| {
                raw(
                    c,
                    reqwest::Method::PUT,
                    "sys/leases/renew".into(),
                    Some(body.clone()),
                )
            })
            .await?;
        let duration = answer["lease_duration"].as_i64().unwrap_or(0);
        Ok(unix_now() + duration)
    }

    /// Ends an upstream credential: revokes the Vault lease, or the certificate.
    pub async fn revoke_upstream(
        &self,
        kind: &str,
        mount: &str,
        id: &str,
    ) -> Result<(), VaultError> {
        match kind {
            "database" => {
                let body = json!({ "lease_id": id });
                let result = self
                    .call("sys/leases/revoke", |c| {
                        raw(
                            c,
                            reqwest::Method::PUT,
                            "sys/leases/revoke".into(),
                            Some(body.clone()),
                        )
                    })
                    .await;
                match result {
                    // Already expired and gone in Vault: nothing left to revoke.
                    Err(VaultError::NotFound { .. }) => Ok(()),
                    Err(VaultError::Api {
                        code: 400, message, ..
                    }) if message.contains("invalid lease") => Ok(()),
                    other => other.map(|_| ()),
                }
            }
            "pki" => {
                let location = format!("{mount}/revoke");
                self.call(&location, |c| {
                    let (mount, id) = (mount.to_owned(), id.to_owned());
                    async move { vaultrs::pki::cert::revoke(&*c, &mount, &id).await }
                })
                .await
                .map(|_| ())
            }
            // AWS STS credentials cannot be revoked: they end at their expiry.
            "sts" => Ok(()),
            other => Err(VaultError::Unexpected {
                location: "revoke".into(),
                message: format!("unknown upstream kind {other:?}"),
            }),
        }
    }

    /// The upstream kind of a mapping, for metrics.
    pub fn kind_of(&self, name: &str) -> Option<&'static str> {
        self.mapping(name).map(upstream_kind)
    }
}

/// The bytes served for a KV map: one key's value (text as is, anything
/// else as JSON), or the whole map as JSON. `None`: the key is missing.
fn kv_value(data: &Value, key: Option<&str>) -> Option<Vec<u8>> {
    match key {
        None => Some(serde_json::to_vec(data).unwrap_or_default()),
        Some(k) => match data.get(k)? {
            Value::String(s) => Some(s.as_bytes().to_vec()),
            other => Some(serde_json::to_vec(other).unwrap_or_default()),
        },
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

/// A request vaultrs has no endpoint for (database credentials keep their
/// `lease_id` here; `sys/leases`), on the same client and token.
async fn raw(
    c: Arc<VaultClient>,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let url = format!("{}/v1/{path}", c.http.base.trim_end_matches('/'));
    let mut req = c
        .http
        .http
        .request(method, url)
        .header("X-Vault-Token", c.middle.token.as_str())
        .header("X-Vault-Request", "true");
    if let Some(ns) = &c.middle.namespace {
        req = req.header("X-Vault-Namespace", ns.as_str());
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| ClientError::RestClientError {
        source: rustify::errors::ClientError::RequestError {
            source: e.into(),
            url: path.clone(),
            method: "request".into(),
        },
    })?;
    let code = resp.status().as_u16();
    let text = resp.bytes().await.unwrap_or_default();
    if !(200..300).contains(&code) {
        let errors = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|v| v["errors"].as_array().cloned())
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        return Err(ClientError::APIError { code, errors });
    }
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&text).map_err(|source| ClientError::JsonParseError { source })
}

/// Revokes upstream credentials as soon as their pod lease ends (expiry,
/// release, kill switch), checking every `interval`. A failed revocation is
/// retried on the next pass.
pub async fn keep_upstream_revoked(
    vault: Arc<Vault>,
    leases: UpstreamLeases,
    interval: Duration,
    revoked: prometheus_client::metrics::counter::Counter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::until_true(&mut shutdown) => return,
        }
        let now = unix_now();
        let due = match leases.due(now).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot list upstream credentials to revoke");
                continue;
            }
        };
        for (lease_id, kind, mount, upstream_id) in due {
            match leases.claim(&lease_id, now).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(error = %e, "cannot claim an upstream credential");
                    continue;
                }
            }
            match vault.revoke_upstream(&kind, &mount, &upstream_id).await {
                Ok(()) => {
                    revoked.inc();
                    info!(lease_id = %lease_id, kind = %kind, "upstream credential revoked");
                }
                Err(e) => {
                    warn!(lease_id = %lease_id, kind = %kind, error = %e, "upstream revocation failed; retrying");
                    let _ = leases.unclaim(&lease_id).await;
                }
            }
        }
        if now % 600 == 0 {
            let _ = leases.prune(now, 24 * 3600).await;
        }
    }
}
