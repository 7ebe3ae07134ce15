//! The embedded store as a [`SecretSource`]: reads through the coalescing
//! cache, versions from the rotation poller's map.

use std::time::Duration;

use tracing::warn;

use crate::backend::rotation::Versions;
use crate::backend::source::{Current, Issued, ReadFor, SecretSource, SourceError};
use crate::cache::{ReadError, SecretCache};
use crate::state::LeaseRecord;

const KIND: &str = "embedded";

/// The embedded store, serving every name no other source claims.
pub struct EmbeddedSource {
    cache: SecretCache,
    versions: Versions,
}

impl EmbeddedSource {
    pub fn new(cache: SecretCache, versions: Versions) -> EmbeddedSource {
        EmbeddedSource { cache, versions }
    }

    async fn get(
        &self,
        name: &str,
    ) -> Result<std::sync::Arc<crate::backend::SecretVersion>, SourceError> {
        match self.cache.get(name).await {
            Ok(v) => Ok(v),
            Err(ReadError::NotFound) => Err(SourceError::not_found(KIND, name)),
            Err(ReadError::Backend(e)) => {
                // Store internals (paths, SQL) stay in the broker's log.
                warn!(secret = name, error = %e, "store read failed");
                Err(SourceError::unavailable(KIND))
            }
        }
    }
}

#[tonic::async_trait]
impl SecretSource for EmbeddedSource {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn names(&self) -> Vec<String> {
        Vec::new()
    }

    async fn read(&self, what: &ReadFor<'_>) -> Result<Issued, SourceError> {
        Ok(Issued {
            secret: self.get(what.name).await?,
            upstream: None,
        })
    }

    /// The latest version from the poller's map, or from the store for a
    /// secret created since the last poll.
    async fn current(&self, lease: &LeaseRecord, _ttl: Duration) -> Result<Current, SourceError> {
        let known = self
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lease.secret)
            .copied();
        let version = match known {
            Some(v) => v,
            None => self.get(&lease.secret).await?.version,
        };
        Ok(Current {
            version,
            ends: None,
        })
    }
}
