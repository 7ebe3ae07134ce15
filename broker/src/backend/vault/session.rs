//! The broker's own session with Vault: logging in with the configured
//! method, renewing the token at about two thirds of its TTL, and logging
//! in again on a 403 or when renewal falls short.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tracing::{info, warn};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::config::VaultAuth;
use super::{Session, Vault, VaultError};

impl Vault {
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
    pub(super) async fn call<T, F, Fut>(&self, location: &str, op: F) -> Result<T, VaultError>
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
}
