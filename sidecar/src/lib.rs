//! secrets-sidecar: logs in to the broker with the pod's token and keeps the
//! pod's secrets fresh on a memory-only filesystem.
//!
//! Layout:
//! - [`config`]: the TOML file → a validated [`config::Config`].
//! - [`client`]: the broker connection (TLS pinned to a CA, token re-read per call).
//! - [`writer`]: the kubelet-style `..data` generation swap, tmpfs check, name checks.
//! - [`schedule`]: renew at about 2/3 of the lease with jitter; capped backoff.
//! - [`hardening`]: no core dumps, not dumpable (shared with the broker).
//!
//! [`run`] keeps secrets fresh until a shutdown signal; [`once`] fetches and
//! writes one generation and returns (init containers, CI jobs).

pub mod client;
pub mod config;
pub mod hardening;
pub mod schedule;
pub mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrets_broker_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::schedule::{Backoff, renew_after};
use crate::writer::{AtomicWriter, WriteError};

/// Why the sidecar stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Write(#[from] WriteError),
    /// `once` mode gave up.
    #[error("gave up after {0:?}: {1}")]
    Timeout(Duration, String),
}

/// One secret as the sidecar holds it. The value zeroizes on drop.
struct Held {
    version: u64,
    value: Zeroizing<Vec<u8>>,
    lease_id: String,
    /// When the lease ends, as a monotonic instant.
    expires: Instant,
    /// When to renew: about 2/3 into the lease, jittered.
    renew_at: Instant,
}

/// (lease end, renewal time) of a lease, as monotonic instants.
fn lease_times(lease: &pb::Lease) -> (Instant, Instant) {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    // Trust the shorter of the two views, so clock skew never extends a lease.
    let left = Duration::from_secs(
        (lease.expires_at_unix - now_unix).clamp(0, i64::from(lease.ttl_seconds)) as u64,
    );
    let now = Instant::now();
    (now + left, now + renew_after(left, fastrand::f64()))
}

/// The sidecar's working state: what it holds and where it writes.
struct Keeper {
    cfg: Config,
    client: Client,
    writer: AtomicWriter,
    held: HashMap<String, Held>,
}

impl Keeper {
    fn new(cfg: Config) -> Result<Keeper, SidecarError> {
        let writer = AtomicWriter::new(&cfg.dir, cfg.allow_non_tmpfs, cfg.group)?;
        if cfg.allow_non_tmpfs && !writer::is_memory_fs(&cfg.dir).unwrap_or(false) {
            warn!(dir = %cfg.dir.display(), "writing secrets to a directory that is not tmpfs (allow_non_tmpfs)");
        }
        let client = Client::new(&cfg)?;
        Ok(Keeper {
            cfg,
            client,
            writer,
            held: HashMap::new(),
        })
    }

    fn names(&self) -> Vec<String> {
        self.cfg.secrets.iter().map(|s| s.name.clone()).collect()
    }

    /// Fetches every secret and writes a new generation if anything changed.
    async fn fetch_and_write(&mut self) -> Result<(), SidecarError> {
        let secrets = self.client.fetch(self.names()).await?;
        let mut changed = self.held.len() != secrets.len();
        let mut fresh = HashMap::with_capacity(secrets.len());
        for s in secrets {
            let lease = s.lease.unwrap_or_default();
            changed |= self
                .held
                .get(&s.name)
                .is_none_or(|h| h.version != s.version);
            let (expires, renew_at) = lease_times(&lease);
            fresh.insert(
                s.name,
                Held {
                    version: s.version,
                    value: Zeroizing::new(s.value),
                    lease_id: lease.lease_id,
                    expires,
                    renew_at,
                },
            );
        }
        if let Some(missing) = self
            .cfg
            .secrets
            .iter()
            .find(|s| !fresh.contains_key(&s.name))
        {
            return Err(ClientError::Status(tonic::Status::internal(format!(
                "broker answered without secret {:?}",
                missing.name
            )))
            .into());
        }
        self.held = fresh;
        if changed {
            let files: Vec<(&str, &[u8])> = self
                .cfg
                .secrets
                .iter()
                .map(|s| (s.file.as_str(), self.held[&s.name].value.as_slice()))
                .collect();
            let generation = self.writer.write(&files)?;
            let versions: Vec<String> = self
                .cfg
                .secrets
                .iter()
                .map(|s| format!("{}@{}", s.name, self.held[&s.name].version))
                .collect();
            info!(generation = %generation.display(), secrets = ?versions, "wrote new generation");
        } else {
            debug!("secrets unchanged; leases extended");
        }
        Ok(())
    }

    /// Extends leases; returns true when a secret has rotated and must be fetched.
    async fn renew(&mut self) -> Result<bool, SidecarError> {
        let refs = self
            .held
            .iter()
            .map(|(name, h)| pb::LeaseRef {
                name: name.clone(),
                version: h.version,
                lease_id: h.lease_id.clone(),
            })
            .collect();
        let renewed = self.client.renew(refs).await?;
        debug!(leases = renewed.len(), "renewed leases");
        let mut rotated = false;
        for r in renewed {
            let Some(h) = self.held.get_mut(&r.name) else {
                continue;
            };
            if r.current_version != h.version {
                rotated = true;
            }
            if let Some(lease) = r.lease {
                (h.expires, h.renew_at) = lease_times(&lease);
            }
        }
        Ok(rotated)
    }

    /// When the next renewal is due: ~2/3 into the shortest lease.
    fn next_renewal(&self) -> Instant {
        self.held
            .values()
            .map(|h| h.renew_at)
            .min()
            .unwrap_or_else(Instant::now)
    }

    /// When the first lease ends; the files must be gone by then.
    fn lease_end(&self) -> Option<Instant> {
        self.held.values().map(|h| h.expires).min()
    }

    fn remove(&mut self, why: &str) {
        self.held.clear();
        match self.writer.remove_all() {
            Ok(()) => info!(dir = %self.cfg.dir.display(), reason = why, "removed secrets"),
            Err(e) => warn!(error = %e, "failed to remove secrets"),
        }
    }
}

/// Fetches and writes once, retrying with backoff for at most `timeout`.
pub async fn once(cfg: Config, timeout: Duration) -> Result<(), SidecarError> {
    let mut keeper = Keeper::new(cfg)?;
    let mut backoff = Backoff::new(keeper.cfg.retry_initial, keeper.cfg.retry_max);
    let deadline = Instant::now() + timeout;
    loop {
        match keeper.fetch_and_write().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline || !retryable(&e) => {
                return Err(SidecarError::Timeout(timeout, e.to_string()));
            }
            Err(e) => {
                let delay = backoff.next_delay(fastrand::f64());
                warn!(error = %e, retry_in = ?delay, "fetch failed");
                tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
    }
}

/// Errors that no retry can fix without an operator (bad config on disk).
fn retryable(e: &SidecarError) -> bool {
    !matches!(
        e,
        SidecarError::Write(WriteError::NotTmpfs(_) | WriteError::BadName(..))
    )
}

/// Keeps secrets fresh until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), SidecarError> {
    let mut keeper = Keeper::new(cfg)?;
    tokio::pin!(shutdown);
    let (events_tx, mut events) = mpsc::channel::<pb::Rotated>(64);
    let watcher = tokio::spawn(watch_loop(
        keeper.client.clone(),
        keeper.names(),
        events_tx,
        keeper.cfg.clone(),
    ));
    let mut backoff = Backoff::new(keeper.cfg.retry_initial, keeper.cfg.retry_max);
    let mut need_fetch = true;
    let mut retry_at: Option<Instant> = None;
    info!(broker = %keeper.cfg.broker_url, dir = %keeper.cfg.dir.display(), secrets = keeper.cfg.secrets.len(), "sidecar started");

    let result = loop {
        if let Some(at) = retry_at.take() {
            // Waiting out a backoff: still honour shutdown and lease end.
            let lease_end = keeper.lease_end();
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = tokio::time::sleep_until(at) => {}
                _ = sleep_until_opt(lease_end) => {
                    keeper.remove("lease ended while the broker was unreachable");
                    retry_at = Some(at);
                    continue;
                }
            }
        }
        if need_fetch {
            match keeper.fetch_and_write().await {
                Ok(()) => {
                    need_fetch = false;
                    backoff.reset();
                }
                Err(e) if !retryable(&e) => break Err(e),
                Err(e) => {
                    let delay = backoff.next_delay(fastrand::f64());
                    warn!(error = %e, retry_in = ?delay, "fetch failed; keeping the last good secrets until their lease ends");
                    retry_at = Some(Instant::now() + delay);
                    continue;
                }
            }
        }
        let renew_at = keeper.next_renewal();
        let lease_end = keeper.lease_end();
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tokio::time::sleep_until(renew_at) => {
                match keeper.renew().await {
                    Ok(rotated) => {
                        backoff.reset();
                        need_fetch = rotated;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay(fastrand::f64());
                        warn!(error = %e, retry_in = ?delay, "renewal failed; keeping the last good secrets until their lease ends");
                        need_fetch = true;
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            _ = sleep_until_opt(lease_end) => {
                keeper.remove("lease ended");
                need_fetch = true;
            }
            Some(ev) = events.recv() => {
                let stale = keeper.held.get(&ev.name).is_none_or(|h| ev.version == 0 || h.version != ev.version);
                if stale {
                    info!(secret = %ev.name, version = ev.version, "rotation announced");
                    need_fetch = true;
                }
            }
        }
    };
    watcher.abort();
    if keeper.cfg.remove_on_exit {
        keeper.remove("sidecar stopping");
    }
    info!("sidecar stopped");
    result
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps a watch stream open (reconnecting with backoff and a fresh token)
/// and forwards rotations to the main loop.
async fn watch_loop(
    client: Client,
    names: Vec<String>,
    tx: mpsc::Sender<pb::Rotated>,
    cfg: Config,
) {
    let mut backoff = Backoff::new(cfg.retry_initial, cfg.retry_max);
    let mut reconnect = false;
    loop {
        match client.watch(names.clone()).await {
            Ok(mut stream) => loop {
                if std::mem::take(&mut reconnect) {
                    // Rotations may have happened while disconnected: have the main loop check.
                    for name in &names {
                        if tx
                            .send(pb::Rotated {
                                name: name.clone(),
                                version: 0,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                match stream.message().await {
                    Ok(Some(pb::WatchEvent {
                        event: Some(pb::watch_event::Event::Rotated(r)),
                    })) => {
                        backoff.reset();
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => backoff.reset(), // heartbeat
                    Ok(None) => break,
                    Err(status) => {
                        debug!(status = %status.message(), "watch stream ended");
                        break;
                    }
                }
            },
            Err(e) => debug!(error = %e, "cannot open watch stream"),
        }
        reconnect = true;
        tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
    }
}
