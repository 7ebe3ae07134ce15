//! secrets-sidecar: logs in to the broker with the pod's token and keeps the
//! pod's secrets fresh on a memory-only filesystem.
//!
//! Layout:
//! - [`config`]: the TOML file → a validated [`config::Config`].
//! - [`spec`]: the secrets and templates a config asks for (a leaf).
//! - [`client`]: the broker connection (TLS pinned to a CA, token re-read per call).
//! - [`writer`]: the kubelet-style `..data` generation swap, tmpfs check, name checks.
//! - [`schedule`]: renew at about 2/3 of the lease with jitter; capped backoff.
//! - [`hardening`]: no core dumps, not dumpable (shared with the broker).
//! - [`health`]: `/healthz`, `/readyz` and `/metrics` on loopback, and the
//!   status-only probe port for the pod network.
//! - [`render`]: templates → files, in the same generation as the secrets.
//! - [`local_api`]: the `Secrets` gRPC service on a Unix socket (peer-UID check).
//! - [`notify`]: signal / command / HTTP POST after a new generation, debounced.
//! - [`aws_endpoint`]: the AWS container credentials endpoint on loopback.
//! - [`exec`]: `secrets-sidecar exec -- CMD`, secrets as environment
//!   variables of a supervised command, restarted or signalled on rotation.
//!
//! [`run`] keeps secrets fresh until a shutdown signal; [`once`] fetches and
//! writes one generation and returns (init containers, CI jobs);
//! [`run_observed`] is `run` that also shows its [`State`] to an embedder.

pub mod aws_endpoint;
pub mod client;
pub mod config;
pub mod exec;
pub mod hardening;
pub mod health;
pub mod local_api;
pub mod notify;
pub mod render;
pub mod schedule;
pub mod spec;
pub mod strict_toml;
pub mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrets_broker_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::schedule::{Backoff, renew_after};
use crate::writer::{AtomicWriter, Found, OutFile, WriteError};

/// Whether log lines on stderr get ANSI colours: only on a terminal, and
/// never when `NO_COLOR` is set to anything (<https://no-color.org>). Shared
/// by every binary, so log files and pipes get plain text.
pub fn log_colour() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Why the sidecar stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A template does not compile.
    #[error(transparent)]
    Template(render::RenderError),
    /// The broker's answer lacked a secret that was asked for.
    #[error("broker answered without secret {0:?}")]
    Incomplete(String),
    /// The health port could not be opened.
    #[error("{0}")]
    Health(String),
    /// `once` mode gave up.
    #[error("gave up after {0:?}: {1}")]
    Timeout(Duration, String),
}

/// One secret as the sidecar holds it. The value zeroizes on drop.
#[derive(Clone)]
struct Held {
    version: u64,
    value: Zeroizing<Vec<u8>>,
    lease_id: String,
    /// When the lease ends, as a monotonic instant.
    expires: Instant,
    /// When to renew: about 2/3 into the lease, jittered.
    renew_at: Instant,
    /// Unix times, for the metrics: version received, last refresh, lease end.
    received_at: i64,
    refreshed_at: i64,
    expires_unix: i64,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// (lease end, renewal time) of a lease, as monotonic instants.
fn lease_times(lease: &pb::Lease) -> (Instant, Instant) {
    let now_unix = unix_now();
    // Trust the shorter of the two views, so clock skew never extends a lease.
    let left = Duration::from_secs(
        (lease.expires_at_unix - now_unix).clamp(0, i64::from(lease.ttl_seconds)) as u64,
    );
    let now = Instant::now();
    (now + left, now + renew_after(left, fastrand::f64()))
}

/// What [`run_observed`] shows an embedder (the [`exec`] supervisor): the
/// secrets of the generation on disk, the revoked ones, and why the last
/// refresh failed. Replaced only when one of those changes, and a new
/// generation only once it is complete on disk. No `Debug`: it holds values.
#[derive(Default)]
pub struct State {
    /// Name → the secret as held now (what the current generation holds).
    pub secrets: HashMap<String, StateSecret>,
    /// Name → rule ID of secrets an operator revoked (not held).
    pub revoked: HashMap<String, String>,
    /// Generations with secrets written so far: one more means new files.
    pub generations: u64,
    /// Why the last fetch or renewal failed, until one succeeds.
    pub last_error: Option<String>,
}

/// One secret in a [`State`].
pub struct StateSecret {
    pub version: u64,
    pub value: Zeroizing<Vec<u8>>,
}

/// The sidecar's working state: what it holds and where it writes.
struct Keeper {
    cfg: Config,
    client: Client,
    writer: AtomicWriter,
    held: HashMap<String, Held>,
    /// Secrets an operator revoked: not on disk, not renewed, retried with
    /// backoff in case the rule is lifted. Name → rule ID.
    revoked: HashMap<String, String>,
    /// What a predecessor left on disk may stay until then (the lease end it
    /// recorded), unless a fetch replaces or the broker refuses it first.
    adopted_until: Option<Instant>,
    /// A fetched set whose generation could not be written (a full tmpfs):
    /// written on the next attempt instead of fetching it again.
    unwritten: Option<HashMap<String, Held>>,
    /// Whether a login has succeeded (done once, to report who we are).
    logged_in: bool,
    /// What the probes and metrics report.
    readiness: health::Shared,
    templates: render::Templates,
    /// What the local API serves.
    published: Arc<local_api::Published>,
    /// Set in `run` mode when the config asks for notifications.
    notifier: Option<notify::Notifier>,
    refresh_failures: u64,
    generation_swaps: u64,
    /// Set by [`run_observed`]: where the [`State`] goes.
    observer: Option<watch::Sender<Arc<State>>>,
    /// Why the last fetch or renewal failed (for the observer).
    last_error: Option<String>,
}

/// What the watch stream tells the main loop.
#[derive(Debug)]
enum BrokerEvent {
    Rotated(pb::Rotated),
    Revoked(pb::Revoked),
    /// A stream reconnected: rotations may have been missed meanwhile.
    Resync,
}

impl Keeper {
    fn new(cfg: Config) -> Result<Keeper, SidecarError> {
        let writer = AtomicWriter::new(&cfg.dir, cfg.allow_non_tmpfs, cfg.group)?;
        if cfg.allow_non_tmpfs && !writer::is_memory_fs(&cfg.dir).unwrap_or(false) {
            warn!(dir = %cfg.dir.display(), "writing secrets to a directory that is not tmpfs (allow_non_tmpfs)");
        }
        let adopted_until = adopt(&writer)?;
        let client = Client::new(&cfg)?;
        let templates = render::Templates::new(&cfg.templates).map_err(SidecarError::Template)?;
        let published = Arc::new(local_api::Published::new(
            cfg.secrets.iter().map(|s| s.name.clone()),
        ));
        Ok(Keeper {
            cfg,
            client,
            writer,
            held: HashMap::new(),
            revoked: HashMap::new(),
            adopted_until,
            unwritten: None,
            logged_in: false,
            readiness: health::Shared::default(),
            templates,
            published,
            notifier: None,
            refresh_failures: 0,
            generation_swaps: 0,
            observer: None,
            last_error: None,
        })
    }

    fn names(&self) -> Vec<String> {
        self.cfg.secrets.iter().map(|s| s.name.clone()).collect()
    }

    /// Configured secrets that are not revoked.
    fn wanted(&self) -> Vec<String> {
        self.cfg
            .secrets
            .iter()
            .filter(|s| !self.revoked.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect()
    }

    /// Fetches `names`, and writes a new generation if anything changed.
    async fn fetch_and_write(&mut self, names: Vec<String>) -> Result<(), SidecarError> {
        if names.is_empty() {
            return Ok(());
        }
        if !self.logged_in {
            let login = self.client.login().await?;
            let id = login.identity.unwrap_or_default();
            info!(
                namespace = %id.namespace,
                service_account = %id.service_account,
                pod = %id.pod_name,
                role = %login.role,
                lease_ttl_s = login.lease_ttl_seconds,
                "logged in"
            );
            self.logged_in = true;
        }
        let fetched = self.client.fetch(names.clone()).await?;
        let mut changed = false;
        // Withheld by a rule with a secret: off the disk, retried later; the
        // rest of the set is served all the same.
        let mut withheld = Vec::new();
        for w in fetched.withheld {
            if names.contains(&w.name) {
                changed |= self.held.contains_key(&w.name);
                withheld.push(w.name.clone());
                self.revoked.insert(w.name, w.rule_id);
            }
        }
        if !withheld.is_empty() {
            warn!(secrets = ?withheld, "secrets withheld by a revocation rule; writing the others");
        }
        let mut fresh = HashMap::with_capacity(fetched.secrets.len());
        for s in fetched.secrets {
            let lease = s.lease.unwrap_or_default();
            // A lease ID is no credential (every call that uses one carries
            // the pod's token too); logged so a lost lease can be traced.
            debug!(secret = %s.name, version = s.version, lease_id = %lease.lease_id, "lease received");
            changed |= self
                .held
                .get(&s.name)
                .is_none_or(|h| h.version != s.version);
            let (expires, renew_at) = lease_times(&lease);
            let received_at = match self.held.get(&s.name) {
                Some(h) if h.version == s.version => h.received_at,
                _ => unix_now(),
            };
            fresh.insert(
                s.name,
                Held {
                    version: s.version,
                    value: Zeroizing::new(s.value),
                    lease_id: lease.lease_id,
                    expires,
                    renew_at,
                    received_at,
                    refreshed_at: unix_now(),
                    expires_unix: lease.expires_at_unix,
                },
            );
        }
        if let Some(missing) = names
            .iter()
            .find(|n| !fresh.contains_key(*n) && !withheld.contains(n))
        {
            return Err(SidecarError::Incomplete(missing.clone()));
        }
        for name in fresh.keys() {
            self.revoked.remove(name);
        }
        // What a predecessor left is replaced by what the broker says now.
        changed |= self.adopted_until.is_some();
        if changed {
            let mut next = self.held.clone();
            for name in &withheld {
                next.remove(name);
            }
            next.extend(fresh);
            self.write_pending(next)
        } else {
            self.update(|k| {
                k.held.extend(fresh);
                debug!("secrets unchanged; leases extended");
                k.record_lease_end();
            });
            Ok(())
        }
    }

    /// Writes `next` as the new generation and holds it; commits only what
    /// reached the disk. When the write fails, `next` waits in `unwritten`
    /// for the next attempt, so a full tmpfs costs no new fetch (and no new
    /// leases) per retry.
    fn write_pending(&mut self, next: HashMap<String, Held>) -> Result<(), SidecarError> {
        match self.write_set(&next) {
            Ok(()) => {
                self.update(|k| k.held = next);
                Ok(())
            }
            Err(e) => {
                self.unwritten = Some(next);
                Err(e)
            }
        }
    }

    /// Writes the set a failed write left, if its leases still run; `None`
    /// when there is none (then fetch).
    fn retry_unwritten(&mut self) -> Option<Result<(), SidecarError>> {
        let next = self.unwritten.take()?;
        let now = Instant::now();
        if next.values().any(|h| h.expires <= now) {
            return None;
        }
        Some(self.write_pending(next))
    }

    /// Keeps the lease end recorded in the current generation up to date
    /// (after a renewal or a fetch that changed nothing on disk).
    fn record_lease_end(&self) {
        if let Some(end) = self.held.values().map(|h| h.expires_unix).min()
            && let Err(e) = self.writer.set_lease_end(end)
        {
            warn!(error = %e, "cannot record the lease end beside the secrets");
        }
    }

    /// Writes what is held as one generation (or removes everything when
    /// nothing is held).
    fn write(&mut self) -> Result<(), SidecarError> {
        let held = std::mem::take(&mut self.held);
        let result = self.write_set(&held);
        self.update(|k| k.held = held);
        result
    }

    /// Writes `held` as one generation: each secret's file, then the
    /// templates rendered from the same values.
    fn write_set(&mut self, held: &HashMap<String, Held>) -> Result<(), SidecarError> {
        if held.is_empty() {
            // An empty generation, swapped in like any other: a reader never
            // finds `..data` missing.
            self.writer.write_files(&[], None)?;
            self.adopted_until = None;
            if let Some(n) = &self.notifier {
                n.generation_written();
            }
            return Ok(());
        }
        let mut files: Vec<OutFile<'_>> = self
            .cfg
            .secrets
            .iter()
            .filter_map(|s| {
                Some(OutFile::new(
                    s.file.as_deref()?,
                    held.get(&s.name)?.value.as_slice(),
                ))
            })
            .collect();
        let values: HashMap<&str, &[u8]> = held
            .iter()
            .map(|(k, h)| (k.as_str(), h.value.as_slice()))
            .collect();
        let rendered = self.templates.render(&values);
        for (spec, result) in &rendered {
            match result {
                Ok(content) => files.push(OutFile {
                    name: &spec.file,
                    content,
                    mode: spec.mode,
                    uid: spec.uid,
                    gid: spec.gid,
                }),
                Err(e) => warn!(error = %e, "template left out of this generation"),
            }
        }
        let lease_end = held.values().map(|h| h.expires_unix).min();
        let generation = self.writer.write_files(&files, lease_end)?;
        self.adopted_until = None;
        self.generation_swaps += 1;
        if let Some(n) = &self.notifier {
            n.generation_written();
        }
        let versions: Vec<String> = self
            .cfg
            .secrets
            .iter()
            .filter_map(|s| {
                held.get(&s.name)
                    .map(|h| format!("{}@{}", s.name, h.version))
            })
            .collect();
        info!(generation = %generation.display(), secrets = ?versions, files = files.len(), "wrote new generation");
        Ok(())
    }

    /// Makes `change` to what the sidecar holds, revoked or counted, then
    /// publishes the result: the one way such a change reaches the probes,
    /// the metrics, the local API and the observer, so none is left unshown.
    fn update<R>(&mut self, change: impl FnOnce(&mut Keeper) -> R) -> R {
        let result = change(self);
        self.publish_status();
        result
    }

    /// A fetch or renewal failed: counted, and shown until one succeeds.
    fn failed(&mut self, e: &SidecarError) {
        self.update(|k| {
            k.refresh_failures += 1;
            k.last_error = Some(e.to_string());
        });
    }

    /// A fetch succeeded after failures. Only the observer shows the last
    /// error, so only the observer is told it is over.
    fn recovered(&mut self) {
        if self.last_error.take().is_some() {
            self.observe();
        }
    }

    /// Recomputes what the readiness probe, the metrics, the local API and
    /// the observer show; called by [`Keeper::update`] only.
    fn publish_status(&self) {
        let problems = self
            .cfg
            .secrets
            .iter()
            .filter_map(
                |s| match (self.held.contains_key(&s.name), self.revoked.get(&s.name)) {
                    (_, Some(rule)) => Some(format!("{}: revoked (rule id {rule})", s.name)),
                    (false, None) => Some(format!("{}: not fetched yet", s.name)),
                    (true, None) => None,
                },
            )
            .collect();
        let secrets = self
            .cfg
            .secrets
            .iter()
            .enumerate()
            .filter_map(|(position, s)| {
                self.held.get(&s.name).map(|h| health::SecretStatus {
                    name: s.name.clone(),
                    position,
                    version: h.version,
                    received_at: h.received_at,
                    refreshed_at: h.refreshed_at,
                    expires_at: h.expires_unix,
                })
            })
            .collect();
        self.published.publish(
            self.held
                .iter()
                .map(|(name, h)| {
                    let entry = local_api::Entry {
                        version: h.version,
                        value: h.value.clone(),
                        expires_at: h.expires_unix,
                        received_at: h.received_at,
                        refreshed_at: h.refreshed_at,
                    };
                    (name.clone(), entry)
                })
                .collect(),
        );
        if let Ok(mut r) = self.readiness.lock() {
            r.problems = problems;
            r.secrets = secrets;
            r.revoked = self.revoked.len();
            r.refresh_failures = self.refresh_failures;
            r.generation_swaps = self.generation_swaps;
        }
        self.observe();
    }

    /// Shows the observer (if any) what is held now, when it changed.
    fn observe(&self) {
        let Some(tx) = &self.observer else { return };
        tx.send_if_modified(|current| {
            let same = current.generations == self.generation_swaps
                && current.last_error == self.last_error
                && current.revoked == self.revoked
                && current.secrets.len() == self.held.len()
                && self.held.iter().all(|(name, h)| {
                    current
                        .secrets
                        .get(name)
                        .is_some_and(|s| s.version == h.version)
                });
            if same {
                return false;
            }
            *current = Arc::new(State {
                secrets: self
                    .held
                    .iter()
                    .map(|(name, h)| {
                        let secret = StateSecret {
                            version: h.version,
                            value: h.value.clone(),
                        };
                        (name.clone(), secret)
                    })
                    .collect(),
                revoked: self.revoked.clone(),
                generations: self.generation_swaps,
                last_error: self.last_error.clone(),
            });
            true
        });
    }

    /// An operator revoked `names`: take them off the disk now, in one swap.
    fn revoke(&mut self, r: &pb::Revoked) -> Result<(), SidecarError> {
        let mut removed = Vec::new();
        for name in &r.names {
            if self.cfg.secrets.iter().any(|s| s.name == *name) {
                self.revoked.insert(name.clone(), r.rule_id.clone());
                if self.held.remove(name).is_some() {
                    removed.push(name.as_str());
                }
            }
        }
        warn!(rule = %r.rule_id, reason = %r.reason, secrets = ?removed, "access revoked; secrets removed");
        self.write()
    }

    /// The leases held now, as the broker knows them.
    fn lease_refs(&self) -> Vec<pb::LeaseRef> {
        self.held
            .iter()
            .map(|(name, h)| pb::LeaseRef {
                name: name.clone(),
                version: h.version,
                lease_id: h.lease_id.clone(),
            })
            .collect()
    }

    /// Extends leases; returns true when a secret has rotated and must be fetched.
    async fn renew(&mut self) -> Result<bool, SidecarError> {
        if self.held.is_empty() {
            return Ok(false);
        }
        let refs = self.lease_refs();
        let renewed = self.client.renew(refs).await?;
        debug!(leases = renewed.len(), "renewed leases");
        let rotated = self.update(|k| {
            let mut rotated = false;
            for r in renewed {
                let Some(h) = k.held.get_mut(&r.name) else {
                    continue;
                };
                if r.current_version != h.version {
                    rotated = true;
                }
                if let Some(lease) = r.lease {
                    (h.expires, h.renew_at) = lease_times(&lease);
                    h.refreshed_at = unix_now();
                    h.expires_unix = lease.expires_at_unix;
                }
            }
            k.record_lease_end();
            rotated
        });
        Ok(rotated)
    }

    /// When the next renewal is due: ~2/3 into the shortest lease.
    fn next_renewal(&self) -> Option<Instant> {
        self.held.values().map(|h| h.renew_at).min()
    }

    /// When the first lease ends (or what a predecessor left runs out); the
    /// files must be gone by then.
    fn lease_end(&self) -> Option<Instant> {
        self.held
            .values()
            .map(|h| h.expires)
            .chain(self.adopted_until)
            .min()
    }

    fn remove(&mut self, why: &str) {
        self.update(|k| {
            k.held.clear();
            k.adopted_until = None;
            k.unwritten = None;
        });
        match self.writer.remove_all() {
            Ok(()) => info!(dir = %self.cfg.dir.display(), reason = why, "removed secrets"),
            Err(e) => warn!(error = %e, "failed to remove secrets"),
        }
    }
}

/// What a predecessor left in the directory (a sidecar that crashed or was
/// killed): it may stay until the lease end it recorded, and goes at once
/// when that has passed or cannot be told. Returns until when it may stay.
fn adopt(writer: &AtomicWriter) -> Result<Option<Instant>, SidecarError> {
    let now = unix_now();
    let why = match writer.found() {
        Found::Nothing => return Ok(None),
        Found::Until(end) if end > now => {
            info!(
                seconds_left = end - now,
                "found the secrets a previous sidecar wrote: they stay until their lease ends, unless the broker replaces or refuses them first"
            );
            return Ok(Some(
                Instant::now() + Duration::from_secs((end - now) as u64),
            ));
        }
        Found::Until(_) => "their lease has ended",
        Found::Unknown => "they do not say when their lease ends",
    };
    writer.remove_all()?;
    warn!(reason = why, "removed the secrets a previous sidecar left");
    Ok(None)
}

/// Fetches and writes once, retrying with backoff for at most `timeout`.
pub async fn once(cfg: Config, timeout: Duration) -> Result<(), SidecarError> {
    let mut keeper = Keeper::new(cfg)?;
    let mut backoff = Backoff::new(keeper.cfg.retry_initial, keeper.cfg.retry_max);
    let deadline = Instant::now() + timeout;
    loop {
        match keeper.fetch_and_write(keeper.names()).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline || !retryable(&e) => {
                // Nothing stays behind to remove what a predecessor left.
                if keeper.adopted_until.is_some() {
                    keeper.remove("no fresh secrets to replace them");
                }
                return Err(SidecarError::Timeout(timeout, e.to_string()));
            }
            Err(e) => {
                if keeper.adopted_until.is_some() && e.is_refusal() {
                    keeper.remove("the broker refused the first fetch");
                }
                let delay = backoff.next_delay(fastrand::f64());
                warn!(error = %e, retry_in = ?delay, "fetch failed");
                tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
    }
}

impl SidecarError {
    /// The broker refused the call (revoked, not granted, token refused).
    fn is_refusal(&self) -> bool {
        matches!(self, SidecarError::Client(c) if c.is_refusal())
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
    run_observed(cfg, shutdown, None).await
}

/// [`run`], showing `observer` the [`State`] after every change that matters
/// (a new generation on disk, a revocation, a failure or its end).
pub async fn run_observed(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    observer: Option<watch::Sender<Arc<State>>>,
) -> Result<(), SidecarError> {
    let mut keeper = Keeper::new(cfg)?;
    if !keeper.cfg.notify.is_empty() {
        keeper.notifier = Some(notify::Notifier::start(keeper.cfg.notify.clone()));
    }
    keeper.update(|k| k.observer = observer);
    let health = match keeper.cfg.health_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(tokio::spawn(health::serve(
                listener,
                health::HttpState {
                    status: keeper.readiness.clone(),
                    local_api: keeper.published.requests.clone(),
                    view: health::View::for_addr(addr, keeper.cfg.metrics_secret_names),
                },
            ))),
            // The default address, taken: another sidecar on this machine
            // (never in a pod, where the injector sets it). Expected there,
            // so not a warning; the sidecar runs on without it.
            Err(e) if keeper.cfg.health_listen_default => {
                info!(error = %e, addr = %addr, "the default health_listen is taken; running without it (set health_listen, or \"off\")");
                None
            }
            Err(e) => {
                return Err(SidecarError::Health(format!(
                    "cannot listen on health_listen {addr}: {e}"
                )));
            }
        },
        None => None,
    };
    let probes = match keeper.cfg.probe_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                SidecarError::Health(format!("cannot listen on probe_listen {addr}: {e}"))
            })?;
            let labels = if keeper.cfg.metrics_secret_names {
                health::SecretLabels::Names
            } else {
                health::SecretLabels::Positions
            };
            Some(tokio::spawn(health::serve_probes(
                listener,
                health::ProbeState {
                    status: keeper.readiness.clone(),
                    local_api: keeper.published.requests.clone(),
                    metrics: keeper.cfg.probe_metrics.then_some(labels),
                },
            )))
        }
        None => None,
    };
    let local = match keeper.cfg.local_api.clone() {
        Some(api) => {
            let mut allowed: std::collections::HashSet<u32> =
                api.allowed_uids.iter().copied().collect();
            if allowed.is_empty() {
                allowed.insert(rustix::process::getuid().as_raw());
            }
            let task = local_api::serve(api.socket.clone(), allowed, keeper.published.clone())
                .await
                .map_err(|e| {
                    SidecarError::Health(format!(
                        "cannot listen on local_api.socket {}: {e}",
                        api.socket.display()
                    ))
                })?;
            Some((task, api.socket))
        }
        None => None,
    };
    let aws_endpoint = match keeper.cfg.aws_credentials.clone() {
        Some(a) => {
            let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| {
                SidecarError::Health(format!(
                    "cannot listen on aws_credentials.listen {}: {e}",
                    a.listen
                ))
            })?;
            let token_file = a.token_file.clone();
            let task = aws_endpoint::serve(listener, a, keeper.cfg.group, keeper.published.clone())
                .await
                .map_err(|e| {
                    SidecarError::Health(format!(
                        "cannot write aws_credentials.token_file {}: {e}",
                        token_file.display()
                    ))
                })?;
            Some(task)
        }
        None => None,
    };
    tokio::pin!(shutdown);
    let (events_tx, mut events) = mpsc::channel::<BrokerEvent>(64);
    // One stream per call-sized share of the names.
    let watchers: Vec<_> = keeper
        .names()
        .chunks(client::NAMES_PER_CALL)
        .map(|names| {
            tokio::spawn(watch_loop(
                keeper.client.clone(),
                names.to_vec(),
                events_tx.clone(),
                keeper.cfg.clone(),
            ))
        })
        .collect();
    drop(events_tx);
    let mut backoff = Backoff::new(keeper.cfg.retry_initial, keeper.cfg.retry_max);
    let mut need_fetch = true;
    let mut retry_at: Option<Instant> = None;
    // Revoked secrets are retried on their own schedule, in case the rule is lifted.
    let mut revoked_backoff = Backoff::new(keeper.cfg.retry_initial, keeper.cfg.retry_max);
    let mut revoked_retry_at: Option<Instant> = None;
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
            let attempt = match keeper.retry_unwritten() {
                Some(written) => written,
                None => keeper.fetch_and_write(keeper.wanted()).await,
            };
            match attempt {
                Ok(()) => {
                    need_fetch = false;
                    backoff.reset();
                    keeper.recovered();
                    if !keeper.revoked.is_empty() && revoked_retry_at.is_none() {
                        revoked_backoff.reset();
                        revoked_retry_at =
                            Some(Instant::now() + revoked_backoff.next_delay(fastrand::f64()));
                    }
                }
                Err(e) if !retryable(&e) => break Err(e),
                Err(e) => {
                    if keeper.adopted_until.is_some() && e.is_refusal() {
                        keeper.remove("the broker refused the first fetch");
                    }
                    let delay = backoff.next_delay(fastrand::f64());
                    if matches!(e, SidecarError::Write(_)) {
                        warn!(error = %e, retry_in = ?delay, "cannot write the new generation; keeping the last one, and writing the fetched secrets again without a new fetch");
                    } else {
                        warn!(error = %e, retry_in = ?delay, "fetch failed; keeping the last good secrets until their lease ends");
                    }
                    keeper.failed(&e);
                    retry_at = Some(Instant::now() + delay);
                    continue;
                }
            }
        }
        let renew_at = keeper.next_renewal();
        let lease_end = keeper.lease_end();
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = sleep_until_opt(revoked_retry_at) => {
                let names: Vec<String> = keeper.revoked.keys().cloned().collect();
                match keeper.fetch_and_write(names).await {
                    Ok(()) => {
                        info!("revoked secrets are served again: the rule was lifted");
                        revoked_backoff.reset();
                        revoked_retry_at = None;
                    }
                    Err(e) => {
                        let delay = revoked_backoff.next_delay(fastrand::f64());
                        debug!(error = %e, retry_in = ?delay, "revoked secrets still refused");
                        revoked_retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            _ = sleep_until_opt(renew_at) => {
                match keeper.renew().await {
                    Ok(rotated) => {
                        backoff.reset();
                        need_fetch = rotated;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay(fastrand::f64());
                        warn!(error = %e, retry_in = ?delay, "renewal failed; keeping the last good secrets until their lease ends");
                        keeper.failed(&e);
                        need_fetch = true;
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            _ = sleep_until_opt(lease_end) => {
                keeper.remove("lease ended");
                need_fetch = true;
            }
            Some(first) = events.recv() => {
                // Every event already queued is taken at once, so a burst (a
                // reconnect of every watch stream, many rotations) costs one fetch.
                let mut next = Some(first);
                while let Some(ev) = next.take().or_else(|| events.try_recv().ok()) {
                    match ev {
                        BrokerEvent::Rotated(ev) => {
                            let stale = !keeper.revoked.contains_key(&ev.name)
                                && keeper.held.get(&ev.name).is_none_or(|h| ev.version == 0 || h.version != ev.version);
                            if stale {
                                info!(secret = %ev.name, version = ev.version, "rotation announced");
                                keeper.unwritten = None;
                                need_fetch = true;
                            }
                        }
                        BrokerEvent::Resync => {
                            debug!("watch stream reconnected; checking every secret once");
                            keeper.unwritten = None;
                            need_fetch = true;
                        }
                        BrokerEvent::Revoked(r) => {
                            if let Err(e) = keeper.revoke(&r) {
                                warn!(error = %e, "cannot remove revoked secrets");
                            }
                            revoked_backoff.reset();
                            revoked_retry_at = Some(Instant::now() + revoked_backoff.next_delay(fastrand::f64()));
                        }
                    }
                }
            }
        }
    };
    for w in &watchers {
        w.abort();
    }
    for h in [health, probes].into_iter().flatten() {
        h.abort();
    }
    if let Some((task, socket)) = local {
        task.abort();
        let _ = std::fs::remove_file(socket);
    }
    if let Some(task) = aws_endpoint {
        task.abort();
    }
    if keeper.cfg.revoke_on_shutdown && !keeper.held.is_empty() {
        let refs = keeper.lease_refs();
        match tokio::time::timeout(Duration::from_secs(3), keeper.client.release(refs)).await {
            Ok(Ok(n)) => info!(released = n, "leases released at the broker"),
            Ok(Err(e)) => warn!(error = %e, "cannot release leases; they run out by themselves"),
            Err(_) => warn!("releasing leases timed out; they run out by themselves"),
        }
    }
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
/// and forwards rotations and revocations to the main loop.
async fn watch_loop(
    client: Client,
    names: Vec<String>,
    tx: mpsc::Sender<BrokerEvent>,
    cfg: Config,
) {
    let mut backoff = Backoff::new(cfg.retry_initial, cfg.retry_max);
    let mut reconnect = false;
    loop {
        match client.watch(names.clone()).await {
            Ok(mut stream) => loop {
                // Rotations may have happened while disconnected: have the
                // main loop check the whole set, once.
                if std::mem::take(&mut reconnect) && tx.send(BrokerEvent::Resync).await.is_err() {
                    return;
                }
                let event = match stream.message().await {
                    Ok(Some(pb::WatchEvent { event: Some(event) })) => event,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(status = %status.message(), "watch stream ended");
                        break;
                    }
                };
                backoff.reset();
                let forward = match event {
                    pb::watch_event::Event::Rotated(r) => BrokerEvent::Rotated(r),
                    pb::watch_event::Event::Revoked(r) => BrokerEvent::Revoked(r),
                    pb::watch_event::Event::Heartbeat(_) => continue,
                };
                if tx.send(forward).await.is_err() {
                    return;
                }
            },
            Err(e) => debug!(error = %e, "cannot open watch stream"),
        }
        reconnect = true;
        tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
    }
}
