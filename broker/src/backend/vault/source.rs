//! Vault as a [`SecretSource`]: KV mappings from the poller's memory,
//! database credentials and PKI certificates issued per pod.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tracing::warn;

use super::{Vault, VaultError};
use crate::backend::source::{
    Current, Failure, Issued, ReadFor, SecretSource, SourceError, Start, Upstream,
};
use crate::backend::upstream::UpstreamLeases;
use crate::clock::unix_now;
use crate::state::LeaseRecord;

const KIND: &str = "vault";

/// The Vault backend with the upstream handles of the credentials it issued.
pub struct VaultSource {
    vault: Arc<Vault>,
    upstream: UpstreamLeases,
    /// How often ended pod leases are looked for, to revoke their credentials.
    revoke_every: Duration,
    /// Counts credentials revoked upstream.
    revoked: Counter,
}

impl VaultSource {
    pub fn new(
        vault: Arc<Vault>,
        upstream: UpstreamLeases,
        revoke_every: Duration,
        revoked: Counter,
    ) -> VaultSource {
        VaultSource {
            vault,
            upstream,
            revoke_every,
            revoked,
        }
    }

    fn dynamic(&self, name: &str) -> bool {
        self.vault.mapping(name).is_some_and(|m| m.is_dynamic())
    }
}

fn failed(name: &str, e: VaultError) -> SourceError {
    let failure = match e {
        VaultError::NotFound { .. } => Failure::NotFound,
        _ => Failure::Unavailable,
    };
    SourceError::new(KIND, name, failure, &e)
}

#[tonic::async_trait]
impl SecretSource for VaultSource {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// The session keeper, one poller per KV mapping, and the revocation of
    /// credentials whose pod lease ended.
    fn start(&self, start: &Start) {
        self.vault
            .start(start.rotations.clone(), start.shutdown.clone());
        tokio::spawn(super::keep_upstream_revoked(
            self.vault.clone(),
            self.upstream.clone(),
            self.revoke_every,
            self.revoked.clone(),
            start.shutdown.clone(),
        ));
    }

    fn names(&self) -> Vec<String> {
        self.vault
            .config()
            .secrets
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    async fn read(&self, what: &ReadFor<'_>) -> Result<Issued, SourceError> {
        let name = what.name;
        if !self.dynamic(name) {
            let secret = self.vault.kv_get(name).await.map_err(|e| failed(name, e))?;
            return Ok(Issued {
                secret,
                upstream: None,
            });
        }
        let (secret, up) = self
            .vault
            .issue(name, what.id, what.ttl)
            .await
            .map_err(|e| failed(name, e))?;
        Ok(Issued {
            secret: Arc::new(secret),
            upstream: Some(up),
        })
    }

    /// A KV mapping's latest version. A per-pod credential is extended
    /// upstream; it is fetched again (version 0) when it is gone or ends
    /// within half a lease, so the pod gets a new one in time.
    async fn current(&self, lease: &LeaseRecord, ttl: Duration) -> Result<Current, SourceError> {
        let name = &lease.secret;
        if !self.dynamic(name) {
            let version = match self.vault.kv_version(name) {
                Some(v) => v,
                None => {
                    self.vault
                        .kv_get(name)
                        .await
                        .map_err(|e| failed(name, e))?
                        .version
                }
            };
            return Ok(Current {
                version,
                ends: None,
            });
        }
        let state = |e: sqlx::Error| SourceError::state(KIND, &e);
        let Some(up) = self.upstream.get(&lease.lease_id).await.map_err(state)? else {
            return Ok(Current {
                version: 0,
                ends: None,
            });
        };
        let ends = match self.vault.renew_upstream(&up, ttl).await {
            Ok(ends) => ends,
            Err(e) => {
                warn!(secret = %name, lease_id = %lease.lease_id, error = %e, "upstream renewal failed; the lease keeps the credential's expiry");
                up.expires_at
            }
        };
        if ends != up.expires_at {
            self.upstream
                .set_expiry(&lease.lease_id, ends)
                .await
                .map_err(state)?;
        }
        let version = if ends - unix_now() < (ttl.as_secs() / 2) as i64 {
            0
        } else {
            lease.version
        };
        Ok(Current {
            version,
            ends: Some(ends),
        })
    }

    async fn revoke(&self, up: &Upstream) -> Result<(), SourceError> {
        self.vault
            .revoke_upstream(up.kind, &up.mount, &up.id)
            .await
            .map_err(|e| SourceError::new(KIND, &up.mount, Failure::Unavailable, &e))
    }

    fn problems(&self) -> Vec<String> {
        self.vault.problems()
    }
}
