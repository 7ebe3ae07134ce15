//! A secret read from an upstream (Vault KV, AWS Secrets Manager) on a
//! schedule and served from memory: one upstream read per interval per
//! replica, however many pods read it.
//!
//! - [`Polled::get`] serves the value while it is young enough
//!   (`interval + max_stale` since the last good read); otherwise one read,
//!   shared by every caller that arrives meanwhile: its value, or its error,
//!   so a slow upstream costs a caller at most about two timeouts (the read
//!   in progress when it came, then its own), never one per caller queued.
//! - [`Polled::poll`] reads it every interval (±10%), broadcasts a new
//!   version as a rotation, keeps the last value through failures (backing
//!   off up to 8 intervals, with full jitter when the upstream throttles),
//!   and stops serving a secret the upstream says is gone.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::SecretVersion;
use crate::backend::rotation::Rotation;

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

/// One polled secret; `E` is its upstream's error.
pub struct Polled<E> {
    name: String,
    /// Where it lives upstream, for logs.
    location: String,
    interval: Duration,
    max_stale: Duration,
    value: RwLock<Option<Held>>,
    /// The last failed read, and when it ended.
    last_error: RwLock<Option<(Instant, E)>>,
    /// Serialises reads, so concurrent first fetches and the poller share one.
    load: tokio::sync::Mutex<()>,
}

impl<E: PollError + Clone> Polled<E> {
    pub fn new(name: &str, location: String, interval: Duration, max_stale: Duration) -> Polled<E> {
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

    fn failed(&self, e: &E) {
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), e.clone()));
    }

    /// The error of a read that failed after `since`, if one did.
    fn failed_since(&self, since: Instant) -> Option<E> {
        self.last_error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.clone())
    }

    /// The value: from memory when young enough, else one read (given the
    /// version and tag held, if any) shared by every caller.
    pub async fn get<F, Fut>(&self, read: F) -> Result<Arc<SecretVersion>, E>
    where
        F: FnOnce(Option<(u64, String)>) -> Fut,
        Fut: Future<Output = Result<(SecretVersion, String), E>>,
    {
        if let Some(v) = self.fresh() {
            return Ok(v);
        }
        let arrived = Instant::now();
        let _guard = self.load.lock().await;
        if let Some(v) = self.fresh() {
            return Ok(v);
        }
        // A read that failed while this caller waited for its turn (the
        // poller's, or another caller's) answers it too: reading again at
        // once would only make the callers behind it wait one more timeout.
        if let Some(e) = self.failed_since(arrived) {
            return Err(e);
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
    pub async fn poll<F, Fut>(
        &self,
        read: F,
        tx: broadcast::Sender<Rotation>,
        mut shutdown: watch::Receiver<bool>,
    ) where
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
                    _ = crate::shutdown::until_true(&mut shutdown) => return,
                }
            }
            // The outcome is recorded before the lock is released: a caller
            // that waited for this read gets its value or its error, instead
            // of reading again.
            let _guard = self.load.lock().await;
            let prev = self.current();
            match read(prev.clone()).await {
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
            .as_ref()
            .map_or_else(|| "not read yet".into(), |(_, e)| e.to_string());
        Some(format!("{}: {why}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Clone)]
    struct Slow;

    impl std::fmt::Display for Slow {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("timed out")
        }
    }

    impl PollError for Slow {
        fn is_gone(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn callers_queued_behind_a_failed_read_share_its_error() {
        let slot: Polled<Slow> = Polled::new(
            "app/x",
            "upstream app/x".into(),
            Duration::from_secs(1),
            Duration::ZERO,
        );
        let reads = AtomicUsize::new(0);
        let read = |_| async {
            reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<(SecretVersion, String), _>(Slow)
        };
        // Every caller arrives while the first read is in progress.
        let results = futures_util::future::join_all((0..8).map(|_| slot.get(read))).await;
        assert!(results.iter().all(Result::is_err));
        assert_eq!(reads.load(Ordering::SeqCst), 1, "one read for all of them");
        assert_eq!(slot.problem().as_deref(), Some("app/x: timed out"));
        // A caller that comes later reads again.
        assert!(slot.get(read).await.is_err());
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }
}
