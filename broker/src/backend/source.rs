//! The one interface every source of secrets implements ([`SecretSource`]),
//! its one error type ([`SourceError`]), and the registry from a secret's
//! name to the source that serves it ([`Sources`]), built once at start.
//!
//! A source serves names of its own (a Vault or AWS mapping lists them) or,
//! for the embedded store, every name no other source claims. The API and
//! readiness go through the registry and never name a backend; a new backend
//! is a folder under `backend/` with an `impl SecretSource` and one
//! [`Sources::register`] in `lib.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::SecretVersion;
use super::rotation::Rotation;
use crate::identity::Identity;
use crate::state::LeaseRecord;

/// A credential issued for one pod, with its handle upstream (a Vault lease
/// ID, a certificate serial, an AWS access key ID).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `database` (a Vault lease ID), `pki` (a certificate serial number) or
    /// `sts` (an AWS access key ID; nothing to revoke upstream).
    pub kind: &'static str,
    pub mount: String,
    pub id: String,
    /// When the credential stops working.
    pub expires_at: i64,
}

/// What a read is for.
pub struct ReadFor<'a> {
    pub name: &'a str,
    pub id: &'a Identity,
    /// The lease the caller asked for (a per-pod credential's TTL).
    pub ttl: Duration,
    /// The caller's verified bearer token, passed on only to STS web
    /// identity; never logged or kept.
    pub token: &'a str,
}

/// A value read for a caller: the secret's current version, shared by every
/// caller, or a credential issued for this caller alone (`upstream` set).
pub struct Issued {
    pub secret: Arc<SecretVersion>,
    pub upstream: Option<Upstream>,
}

/// What a lease's holder should hold now, as a Renew answers it.
pub struct Current {
    /// The version to hold; 0 asks the holder to fetch again (its credential
    /// is gone or ends too soon).
    pub version: u64,
    /// When the lease's credential really ends, if the source knows.
    pub ends: Option<i64>,
}

/// How a source failed, as the caller is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The secret does not exist there.
    NotFound,
    /// The source refused this caller (access denied, a token it cannot use).
    Refused,
    /// The source cannot answer now; retry later.
    Unavailable,
    /// The broker's state database failed (looking up a credential's handle).
    StateDatabase,
}

/// A source's failure: its kind, the secret, and a message that names what
/// went wrong upstream, never a token, a credential or a value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub source_kind: &'static str,
    pub failure: Failure,
    message: String,
}

impl SourceError {
    /// A failure of `name` at `kind`, with what the source said.
    pub fn new(
        kind: &'static str,
        name: &str,
        failure: Failure,
        said: &dyn std::fmt::Display,
    ) -> SourceError {
        SourceError {
            source_kind: kind,
            failure,
            message: format!("secret {name:?}: {said}"),
        }
    }

    /// `name` does not exist (the embedded store's own words).
    pub fn not_found(kind: &'static str, name: &str) -> SourceError {
        SourceError {
            source_kind: kind,
            failure: Failure::NotFound,
            message: format!("secret {name:?} does not exist"),
        }
    }

    /// The source failed in a way the caller is told only as "unavailable";
    /// the details went to the broker's log.
    pub fn unavailable(kind: &'static str) -> SourceError {
        SourceError {
            source_kind: kind,
            failure: Failure::Unavailable,
            message: "the secrets store is unavailable; retry later".into(),
        }
    }

    /// The state database failed; the details stay in the broker's log.
    pub fn state(kind: &'static str, e: &sqlx::Error) -> SourceError {
        SourceError {
            source_kind: kind,
            failure: Failure::StateDatabase,
            message: format!("state database: {e}"),
        }
    }
}

/// What a source's background work (pollers, upstream revocation) is given
/// when the broker starts.
pub struct Start {
    /// Where a poller announces a new version.
    pub rotations: broadcast::Sender<Rotation>,
    /// Flips to true on shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// A source of secrets.
#[tonic::async_trait]
pub trait SecretSource: Send + Sync {
    /// Starts the source's background work, if it has any.
    fn start(&self, _start: &Start) {}

    /// A short, fixed name for logs, metrics and errors (`embedded`, `vault`, `aws`).
    fn kind(&self) -> &'static str;

    /// The names this source serves, read from its configuration; empty for
    /// the fallback source (every name no other source claims).
    fn names(&self) -> Vec<String>;

    /// The current value for a caller, or a credential issued for it alone.
    async fn read(&self, what: &ReadFor<'_>) -> Result<Issued, SourceError>;

    /// What the holder of `lease` should hold now. For a per-pod credential
    /// this also extends it upstream where it can be (by `ttl`).
    async fn current(&self, lease: &LeaseRecord, ttl: Duration) -> Result<Current, SourceError>;

    /// Ends a credential issued for a call that failed before handing it out.
    async fn revoke(&self, _upstream: &Upstream) -> Result<(), SourceError> {
        Ok(())
    }

    /// What the source cannot serve now, each with the reason (readiness).
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Every source of the broker, and which one serves each name.
pub struct Sources {
    all: Vec<Arc<dyn SecretSource>>,
    by_name: HashMap<String, usize>,
    /// Serves every name no other source claims (the embedded store).
    fallback: usize,
}

impl Sources {
    /// A registry whose every name goes to `fallback` until sources are added.
    pub fn new(fallback: Arc<dyn SecretSource>) -> Sources {
        Sources {
            all: vec![fallback],
            by_name: HashMap::new(),
            fallback: 0,
        }
    }

    /// Adds a source of the names it lists; a name already served by another
    /// added source is refused, naming both (the config refuses it first).
    pub fn register(mut self, source: Arc<dyn SecretSource>) -> Result<Sources, String> {
        let i = self.all.len();
        for name in source.names() {
            if let Some(j) = self.by_name.insert(name.clone(), i) {
                return Err(format!(
                    "secret {name:?} is mapped to both {} and {}",
                    self.all[j].kind(),
                    source.kind()
                ));
            }
        }
        self.all.push(source);
        Ok(self)
    }

    /// The source that serves `name`.
    pub fn for_name(&self, name: &str) -> &dyn SecretSource {
        let i = self.by_name.get(name).copied().unwrap_or(self.fallback);
        &*self.all[i]
    }

    /// Starts every source's background work.
    pub fn start(&self, start: &Start) {
        for source in &self.all {
            source.start(start);
        }
    }

    /// Every source, the fallback first.
    pub fn all(&self) -> &[Arc<dyn SecretSource>] {
        &self.all
    }

    /// What every source cannot serve now, each prefixed by the source's kind.
    pub fn problems(&self) -> Vec<String> {
        self.all
            .iter()
            .flat_map(|s| {
                let kind = s.kind();
                s.problems()
                    .into_iter()
                    .map(move |p| format!("{kind}: {p}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str, Vec<&'static str>);

    #[tonic::async_trait]
    impl SecretSource for Named {
        fn kind(&self) -> &'static str {
            self.0
        }
        fn names(&self) -> Vec<String> {
            self.1.iter().map(|s| (*s).to_owned()).collect()
        }
        async fn read(&self, what: &ReadFor<'_>) -> Result<Issued, SourceError> {
            Err(SourceError::not_found(self.0, what.name))
        }
        async fn current(&self, _: &LeaseRecord, _: Duration) -> Result<Current, SourceError> {
            Ok(Current {
                version: 1,
                ends: None,
            })
        }
        fn problems(&self) -> Vec<String> {
            vec![format!("{} is down", self.0)]
        }
    }

    #[test]
    fn each_name_goes_to_the_source_that_lists_it_and_the_rest_to_the_fallback() {
        let sources = Sources::new(Arc::new(Named("embedded", vec![])))
            .register(Arc::new(Named("vault", vec!["v/a", "v/b"])))
            .unwrap()
            .register(Arc::new(Named("aws", vec!["aws/x"])))
            .unwrap();
        assert_eq!(sources.for_name("v/b").kind(), "vault");
        assert_eq!(sources.for_name("aws/x").kind(), "aws");
        assert_eq!(sources.for_name("anything/else").kind(), "embedded");
        assert_eq!(
            sources.problems(),
            [
                "embedded: embedded is down",
                "vault: vault is down",
                "aws: aws is down"
            ]
        );
        let twice = Sources::new(Arc::new(Named("embedded", vec![])))
            .register(Arc::new(Named("vault", vec!["same"])))
            .unwrap()
            .register(Arc::new(Named("aws", vec!["same"])));
        assert_eq!(
            twice.err().unwrap(),
            "secret \"same\" is mapped to both vault and aws"
        );
    }

    #[test]
    fn errors_name_the_secret_and_what_the_source_said() {
        let e = SourceError::new(
            "vault",
            "db/x",
            Failure::Unavailable,
            &"vault kv/x: unreachable",
        );
        assert_eq!(e.to_string(), "secret \"db/x\": vault kv/x: unreachable");
        assert_eq!(
            SourceError::not_found("embedded", "a").to_string(),
            "secret \"a\" does not exist"
        );
    }
}
