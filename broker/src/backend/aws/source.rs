//! AWS as a [`SecretSource`]: Secrets Manager values from the poller's
//! memory, STS credentials issued per pod.

use std::sync::Arc;
use std::time::Duration;

use super::{Aws, AwsError, sts_refresh_due};
use crate::backend::source::{Current, Failure, Issued, ReadFor, SecretSource, SourceError, Start};
use crate::backend::upstream::UpstreamLeases;
use crate::clock::unix_now;
use crate::state::LeaseRecord;

const KIND: &str = "aws";

/// The AWS backend with the upstream handles of the credentials it issued.
pub struct AwsSource {
    aws: Arc<Aws>,
    upstream: UpstreamLeases,
    db: crate::db::Db,
}

impl AwsSource {
    pub fn new(aws: Arc<Aws>, upstream: UpstreamLeases, db: crate::db::Db) -> AwsSource {
        AwsSource { aws, upstream, db }
    }

    fn dynamic(&self, name: &str) -> bool {
        self.aws.mapping(name).is_some_and(|m| m.is_dynamic())
    }
}

fn failed(name: &str, e: AwsError) -> SourceError {
    let failure = match &e {
        AwsError::NotFound { .. } => Failure::NotFound,
        e if e.is_refusal() => Failure::Refused,
        _ => Failure::Unavailable,
    };
    SourceError::new(KIND, name, failure, &e)
}

#[tonic::async_trait]
impl SecretSource for AwsSource {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// One poller per Secrets Manager mapping, and the pruning of expired
    /// STS credential records.
    fn start(&self, start: &Start) {
        self.aws
            .start(start.rotations.clone(), start.shutdown.clone());
        tokio::spawn(super::keep_sts_rows_pruned(
            self.db.clone(),
            start.shutdown.clone(),
        ));
    }

    fn names(&self) -> Vec<String> {
        self.aws
            .config()
            .secrets
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    async fn read(&self, what: &ReadFor<'_>) -> Result<Issued, SourceError> {
        let name = what.name;
        if !self.dynamic(name) {
            let secret = self.aws.sm_get(name).await.map_err(|e| failed(name, e))?;
            return Ok(Issued {
                secret,
                upstream: None,
            });
        }
        let (secret, up) = self
            .aws
            .issue(name, what.id, what.token)
            .await
            .map_err(|e| failed(name, e))?;
        Ok(Issued {
            secret: Arc::new(secret),
            upstream: Some(up),
        })
    }

    /// A Secrets Manager value's latest version. STS credentials cannot be
    /// extended, only replaced: they are fetched again (version 0) from two
    /// thirds of their life on, or when they cannot cover half a lease.
    async fn current(&self, lease: &LeaseRecord, ttl: Duration) -> Result<Current, SourceError> {
        let name = &lease.secret;
        if !self.dynamic(name) {
            let version = match self.aws.sm_version(name) {
                Some(v) => v,
                None => {
                    self.aws
                        .sm_get(name)
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
        let Some(up) = self
            .upstream
            .get(&lease.lease_id)
            .await
            .map_err(|e| SourceError::state(KIND, &e))?
        else {
            return Ok(Current {
                version: 0,
                ends: None,
            });
        };
        let life = self
            .aws
            .mapping(name)
            .and_then(|m| m.duration())
            .unwrap_or(Duration::ZERO);
        let version = if sts_refresh_due(up.expires_at, life, ttl, unix_now()) {
            0
        } else {
            lease.version
        };
        Ok(Current {
            version,
            ends: Some(up.expires_at),
        })
    }

    fn problems(&self) -> Vec<String> {
        self.aws.problems()
    }
}
