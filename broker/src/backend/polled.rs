//! A secret read from an upstream (Vault KV, AWS Secrets Manager) on a
//! schedule and served from memory: one upstream read per interval per
//! replica, however many pods read it.
//!
//! - [`Polled::get`] serves the value while it is young enough
//!   (`interval + max_stale` since the last good read); otherwise one read,
//!   shared by every caller that arrives meanwhile.
//! - [`Polled::poll`] reads it every interval (±10%), broadcasts a new
//!   version as a rotation, keeps the last value through failures (backing
//!   off up to 8 intervals, with full jitter when the upstream throttles),
//!   and stops serving a secret the upstream says is gone.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::SecretVersion;
use crate::api::grpc::Rotation;

/// What a poller needs to know of an upstream's errors.
pub trait PollError: std::fmt::Display {
    /// The secret is gone (deleted, or the key is missing): an operator's
    /// decision, not an outage, so the old value is no longer served.
    fn is_gone(&self) -> bool;
    /// The upstream asks for fewer calls.
    fn is_throttling(&self) -> bool {
        false
    }
}

/// The last good read: the value, when it was read, and the upstream's own
/// tag for that version (e.g. a Secrets Manager `VersionId`; may be empty).
type Held = (Arc<SecretVersion>, Instant, String);

/// One polled secret.
pub struct Polled {
    name: String,
    /// Where it lives upstream, for logs.
    location: String,
    interval: Duration,
    max_stale: Duration,
    value: RwLock<Option<Held>>,
    last_error: RwLock<Option<String>>,
    /// Serialises reads, so concurrent first fetches and the poller share one.
    load: tokio::sync::Mutex<()>,
}

impl Polled {
    pub fn new(name: &str, location: String, interval: Duration, max_stale: Duration) -> Polled {
        Polled {
            name: name.to_owned(),
            location,
            interval,
            max_stale,
            value: RwLock::new(None),
            last_error: RwLock::new(None),
            load: tokio::sync::Mutex::new(()),
        }
    }

    /// The version and upstream tag last read, if any.
    pub fn current(&self) -> Option<(u64, String)> {
        self.value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(v, _, tag)| (v.version, tag.clone()))
    }

    pub fn version(&self) -> Option<u64> {
        self.current().map(|(v, _)| v)
    }

    /// The value, if it was read recently enough to be served.
    fn fresh(&self) -> Option<Arc<SecretVersion>> {
        let limit = self.interval + self.max_stale;
        self.value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(_, at, _)| at.elapsed() <= limit)
            .map(|(v, _, _)| v.clone())
    }

    fn store(&self, v: Arc<SecretVersion>, tag: String) {
        *self.value.write().unwrap_or_else(|e| e.into_inner()) = Some((v, Instant::now(), tag));
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn failed(&self, e: &impl PollError) {
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }

    /// The value: from memory when young enough, else one read (given the
    /// version and tag held, if any) shared by every caller.
    pub async fn get<E, F, Fut>(&self, read: F) -> Result<Arc<SecretVersion>, E>
    where
        E: PollError,
        F: FnOnce(Option<(u64, String)>) -> Fut,
        Fut: Future<Output = Result<(SecretVersion, String), E>>,
    {
        if let Some(v) = self.fresh() {
            return Ok(v);
        }
        let _guard = self.load.lock().await;
        if let Some(v) = self.fresh() {
            return Ok(v);
        }
        match read(self.current()).await {
            Ok((v, tag)) => {
                let v = Arc::new(v);
                self.store(v.clone(), tag);
                Ok(v)
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    /// Reads the secret for ever (the first read at once): see the module.
    pub async fn poll<E, F, Fut>(
        &self,
        read: F,
        tx: broadcast::Sender<Rotation>,
        mut shutdown: watch::Receiver<bool>,
    ) where
        E: PollError,
        F: Fn(Option<(u64, String)>) -> Fut,
        Fut: Future<Output = Result<(SecretVersion, String), E>>,
    {
        let (mut failures, mut throttled) = (0u32, false);
        loop {
            let base = self.interval * (1u32 << failures.min(3));
            let wait = if throttled {
                base.mul_f64(0.5 + fastrand::f64())
            } else {
                base.mul_f64(0.9 + 0.2 * fastrand::f64())
            };
            if self.current().is_some() || failures > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::until_true(&mut shutdown) => return,
                }
            }
            let (prev, result) = {
                let _guard = self.load.lock().await;
                let prev = self.current();
                (prev.clone(), read(prev).await)
            };
            match result {
                Ok((v, tag)) => {
                    if failures > 0 {
                        info!(secret = %self.name, location = %self.location, "upstream read works again");
                    }
                    (failures, throttled) = (0, false);
                    let version = v.version;
                    self.store(Arc::new(v), tag);
                    if prev.is_some_and(|(old, _)| old != version) {
                        info!(secret = %self.name, location = %self.location, version, "new upstream version");
                        let _ = tx.send(Rotation {
                            name: self.name.clone(),
                            version,
                        });
                    }
                }
                Err(e) if e.is_gone() => {
                    if self
                        .value
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .is_some()
                    {
                        warn!(secret = %self.name, error = %e, "upstream secret is gone; no longer served");
                    }
                    self.failed(&e);
                }
                Err(e) => {
                    failures += 1;
                    throttled = e.is_throttling();
                    warn!(secret = %self.name, error = %e, failures, throttled, "upstream poll failed; serving the last value");
                    self.failed(&e);
                }
            }
        }
    }

    /// Why it cannot be served now (`"<name>: <reason>"`), if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.fresh().is_some() {
            return None;
        }
        let why = self
            .last_error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "not read yet".into());
        Some(format!("{}: {why}", self.name))
    }
}
