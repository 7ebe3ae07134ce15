//! The `Broker` gRPC service. Every call goes through one envelope
//! ([`super::envelope`]: shape, admit, token, verify, rate, revocation,
//! authorize, then the handler here, one audit record, metrics); the
//! handlers below do only their call's own work. Errors become
//! `tonic::Status` in exactly one place ([`ApiError`] → `Status`).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use secrets_broker_proto::v1 as pb;
use secrets_broker_proto::v1::broker_server::Broker;
use tokio::sync::{broadcast, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::envelope::{AUDIT_SAMPLE, Admitted, Ask, Handled};
pub use crate::backend::rotation::{Rotation, Rotations, Versions, poll_rotations};

use crate::backend::source::{
    Failure, Issued, ReadFor, SecretSource, SourceError, Sources, Upstream,
};
use crate::backend::upstream::UpstreamLeases;
use crate::clock::unix_now;
use crate::config::RoleConfig;
use crate::identity::Identity;
use crate::identity::verify::{TokenError, Verifiers};
use crate::policy::{self, Denied, Policy};
use crate::state::audit::Auditor;
use crate::state::revocation::{Revoked, Stale, View};
use crate::state::{LeaseRecord, Leases};
use serde_json::json;

/// Counts an open watch stream for as long as it lives.
struct StreamGuard(Arc<crate::telemetry::metrics::Metrics>);

impl StreamGuard {
    fn new(m: Arc<crate::telemetry::metrics::Metrics>) -> StreamGuard {
        m.watch_streams.inc();
        StreamGuard(m)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.watch_streams.dec();
    }
}

/// Every way a call can fail, converted to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Revoked(#[from] Revoked),
    #[error(transparent)]
    Stale(#[from] Stale),
    #[error("lease {0:?} is unknown or not yours; fetch the secret again")]
    UnknownLease(String),
    #[error("state database: {0}")]
    Database(#[from] sqlx::Error),
    /// The leases of a call could not be recorded.
    #[error("state database: {0}")]
    LeaseRecord(#[from] crate::state::RecordError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A source of secrets failed or refused; the message names the secret
    /// and what the source said (never a token, a credential or a value).
    #[error(transparent)]
    Backend(#[from] SourceError),
    /// Over a load limit: refused at once, to be retried with backoff.
    #[error(transparent)]
    Overloaded(#[from] crate::api::limits::Overloaded),
    /// One answer would carry more secret bytes than the broker sends at once.
    #[error(
        "the secrets asked for come to more than {limit} bytes (server.max_response_bytes); fetch them in smaller sets"
    )]
    ResponseTooLarge { limit: usize },
}

impl ApiError {
    /// A short, bounded class for audit records and (later) metric labels.
    pub fn class(&self) -> &'static str {
        match self {
            ApiError::Token(TokenError::KeysUnavailable(_) | TokenError::ReviewUnavailable(_)) => {
                "keys_unavailable"
            }
            ApiError::Token(TokenError::Expired { .. }) => "token_expired",
            ApiError::Token(_) => "token_invalid",
            ApiError::Denied(_) => "denied",
            ApiError::Revoked(_) => "revoked",
            ApiError::Stale(_) => "stale_view",
            ApiError::UnknownLease(_) => "unknown_lease",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::ResponseTooLarge { .. } => "too_large",
            ApiError::Overloaded(e) => e.class(),
            ApiError::Backend(e) => match e.failure {
                Failure::NotFound => "not_found",
                Failure::Refused => "backend_refused",
                Failure::Unavailable | Failure::StateDatabase => "backend_error",
            },
            ApiError::Database(_) | ApiError::LeaseRecord(_) => "backend_error",
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Token(TokenError::KeysUnavailable(_) | TokenError::ReviewUnavailable(_)) => {
                Status::unavailable(msg)
            }
            ApiError::Token(_) => Status::unauthenticated(msg),
            ApiError::Denied(_) | ApiError::Revoked(_) => Status::permission_denied(msg),
            ApiError::Stale(_) => Status::unavailable(msg),
            ApiError::UnknownLease(_) => Status::not_found(msg),
            ApiError::Database(_)
            | ApiError::LeaseRecord(_)
            | ApiError::Backend(SourceError {
                failure: Failure::StateDatabase,
                ..
            }) => Status::unavailable("the state database is unavailable; retry later"),
            ApiError::BadRequest(_) => Status::invalid_argument(msg),
            ApiError::Overloaded(_) | ApiError::ResponseTooLarge { .. } => {
                Status::resource_exhausted(msg)
            }
            ApiError::Backend(e) => match e.failure {
                Failure::NotFound => Status::not_found(msg),
                Failure::Refused => Status::permission_denied(msg),
                Failure::Unavailable | Failure::StateDatabase => Status::unavailable(msg),
            },
        }
    }
}

/// The state a `Broker` service works with.
pub struct BrokerService {
    pub verifier: Arc<Verifiers>,
    pub policy: Arc<Policy>,
    /// Which source serves each secret (the embedded store, Vault, AWS).
    pub sources: Arc<Sources>,
    /// Upstream credentials of pod leases (Vault leases, certificates).
    pub upstream: UpstreamLeases,
    pub leases: Leases,
    pub view: Arc<View>,
    pub auditor: Auditor,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    pub rotations: broadcast::Sender<Rotation>,
    pub heartbeat: Duration,
    /// Load limits: calls in flight, watch streams, rate per workload.
    pub limits: Arc<crate::api::limits::Limits>,
    /// The most secret bytes one Fetch answers.
    pub max_response_bytes: usize,
    /// Which refused calls are audited in full, per peer; the rest are
    /// summarized (see `api::refusals`).
    pub refusals: Arc<crate::api::refusals::RefusalAudit>,
    /// Flips to true on shutdown, ending watch streams so the server can drain.
    pub shutdown: watch::Receiver<bool>,
}

/// A `Fetch`'s audit detail (the envelope adds the workload's issuer and
/// pod). The keys are in the order a `json!` object has them (sorted), so
/// the records read as the other calls' do.
#[derive(serde::Serialize)]
struct FetchAudit<'a> {
    role: &'a str,
    secrets: Vec<LeaseAudit>,
    /// Asked for but withheld by a rule with a secret (not handed out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    withheld: Vec<WithheldAudit>,
    ttl_seconds: u64,
}

/// One secret withheld by a rule, in a [`FetchAudit`].
#[derive(serde::Serialize)]
struct WithheldAudit {
    name: String,
    rule_id: String,
}

/// How revocation rules with a secret apply to a call that names secrets.
#[derive(Clone, Copy)]
pub(super) enum Scope {
    /// Any withheld name refuses the whole call (Login, Renew).
    Whole,
    /// Withheld names are left out; the call is refused only when nothing
    /// would be left (Fetch, Watch).
    Partial,
}

/// One secret handed out, in a [`FetchAudit`].
#[derive(serde::Serialize)]
struct LeaseAudit {
    lease_id: String,
    name: String,
    version: u64,
}

/// A new lease: 128 bits, the first 48 the issue time in milliseconds and
/// the other 80 random. Time-ordered IDs land at the end of the leases
/// table's primary-key index, so a batch of new leases writes a few index
/// pages instead of one random page per lease.
fn new_lease(ttl: Duration) -> Result<pb::Lease, ApiError> {
    let mut id = [0u8; 16];
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    aws_lc_rs::rand::fill(&mut id[6..])
        .map_err(|_| ApiError::BadRequest("no randomness".into()))?;
    Ok(pb::Lease {
        lease_id: hex::encode(id),
        ttl_seconds: ttl.as_secs() as u32,
        expires_at_unix: unix_now() + ttl.as_secs() as i64,
    })
}

impl BrokerService {
    /// Counts a finished call by action and result class.
    pub(super) fn observe<T>(
        &self,
        action: &'static str,
        start: std::time::Instant,
        result: &Result<T, ApiError>,
    ) {
        let class = result.as_ref().map_or_else(ApiError::class, |_| "ok");
        self.metrics.call(action, class, start.elapsed());
        // The caller is told only that the state database is unavailable;
        // the operator needs the cause (unreachable, disk full, ...).
        if let Err(e @ (ApiError::Database(_) | ApiError::LeaseRecord(_))) = result {
            warn!(action, error = %e, "call answered UNAVAILABLE");
        }
    }

    /// Whether `held` is a running lease of this workload: only the holder
    /// may extend or release it.
    async fn owns(&self, id: &Identity, held: &pb::LeaseRef) -> Result<bool, ApiError> {
        Ok(self.owned(id, held).await?.is_some())
    }

    /// The lease record of `held` when it is a running lease of this workload.
    async fn owned(
        &self,
        id: &Identity,
        held: &pb::LeaseRef,
    ) -> Result<Option<LeaseRecord>, ApiError> {
        let record = self.leases.get(&held.lease_id).await?;
        // The same namespace and service account of another cluster (another
        // issuer) is another workload: it may not act on this lease.
        Ok(record.filter(|l| {
            l.secret == held.name
                && l.issuer == id.issuer
                && l.cluster.as_deref().is_none_or(|c| c == id.cluster)
                && l.namespace == id.namespace
                && l.service_account == id.service_account
                && l.pod_uid == id.pod_uid
                && l.expires_at > unix_now()
        }))
    }

    /// Revokes credentials issued for a call that failed before handing them out.
    async fn abandon(&self, issued: &[(String, Upstream, &dyn SecretSource)]) {
        for (_, up, source) in issued {
            if let Err(e) = source.revoke(up).await {
                warn!(kind = up.kind, error = %e, "cannot revoke a credential of a failed call; it ends at its own expiry");
            }
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let ask = |r: &pb::LoginRequest| Ask::login(&r.role);
        self.call("login", &req, ask, |a| async move {
            let role = a.role()?;
            debug!(identity = %a.id, role = %role.name, result = "accepted", "login");
            Ok(Handled {
                reply: Response::new(pb::LoginResponse {
                    identity: Some(to_pb(&a.id)),
                    role: role.name.clone(),
                    allowed_secrets: role.secrets.iter().map(|p| p.as_str().to_owned()).collect(),
                    lease_ttl_seconds: role.ttl.as_secs() as u32,
                }),
                detail: json!({ "role": role.name }),
            })
        })
        .await
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let ask = |r: &pb::FetchRequest| Ask::fetch(&r.role, &r.names);
        self.call("fetch", &req, ask, |a| {
            self.fetch_granted(a, req.get_ref().ttl_seconds)
        })
        .await
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let ask = |r: &pb::RenewRequest| Ask::renew(&r.role, &r.leases);
        let r = req.get_ref();
        self.call("renew", &req, ask, |a| async move {
            let role = a.role()?;
            let ttl = policy::lease_ttl(role, r.ttl_seconds);
            let mut leases = Vec::with_capacity(r.leases.len());
            for held in &r.leases {
                let Some(record) = self.owned(&a.id, held).await? else {
                    return Err(ApiError::UnknownLease(held.lease_id.clone()));
                };
                let mut lease = new_lease(ttl)?;
                lease.lease_id.clone_from(&held.lease_id);
                let now = self.sources.for_name(&held.name).current(&record, ttl).await?;
                if let Some(ends) = now.ends {
                    // The credential's real end bounds the lease.
                    bound_lease(&mut lease, ends);
                }
                let current = now.version;
                self.leases.extend(&lease.lease_id, lease.expires_at_unix).await?;
                leases.push(pb::RenewedLease {
                    name: held.name.clone(),
                    current_version: current,
                    lease: Some(lease),
                });
            }
            debug!(identity = %a.id, role = %role.name, leases = leases.len(), "renew");
            let detail = json!({
                "role": role.name,
                "leases": leases.iter().map(|l| json!({"name": l.name, "lease_id": l.lease.as_ref().map(|x| x.lease_id.clone())})).collect::<Vec<_>>(),
            });
            Ok(Handled {
                reply: Response::new(pb::RenewResponse { leases }),
                detail,
            })
        })
        .await
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ask = |r: &pb::ReleaseRequest| Ask::release(&r.leases);
        let r = req.get_ref();
        self.call("release", &req, ask, |a| async move {
            let mut released = 0u32;
            for held in &r.leases {
                if self.owns(&a.id, held).await?
                    && self.leases.extend(&held.lease_id, unix_now()).await?
                {
                    released += 1;
                }
            }
            info!(identity = %a.id, released, "leases released");
            // A count and a bounded sample: one record stays small whatever
            // the call carried.
            let detail = json!({
                "leases": r.leases.len(),
                "sample": r.leases.iter().take(AUDIT_SAMPLE).map(|l| l.lease_id.as_str()).collect::<Vec<_>>(),
                "released": released,
            });
            Ok(Handled {
                reply: Response::new(pb::ReleaseResponse { released }),
                detail,
            })
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let ask = |r: &pb::WatchRequest| Ask::watch(&r.role, &r.names);
        self.call("watch", &req, ask, |a| async move {
            let role = a.role()?;
            // A workload's streams are bounded too: one pod must not hold a
            // replica's share of streams.
            let workload_stream = self.limits.admit_workload_stream(&a.id)?;
            let Some(stream_permit) = a.stream else {
                return Err(ApiError::BadRequest(
                    "a watch holds a stream's place".into(),
                ));
            };
            info!(identity = %a.id, role = %role.name, secrets = a.names.len(), "watch opened");
            let detail = json!({ "role": role.name, "secrets": a.names });
            // The stream ends when the token that opened it expires: a client
            // must come back with a fresh token to keep watching.
            let token_left = Duration::from_secs((a.id.expires_at - unix_now()).max(0) as u64);
            let state = WatchState {
                watched: a.names.into_iter().collect(),
                rotations: self.rotations.subscribe(),
                revocations: self.view.subscribe(),
                view: self.view.clone(),
                shutdown: self.shutdown.clone(),
                tick: tokio::time::interval(self.heartbeat),
                deadline: Box::pin(tokio::time::sleep(token_left)),
                pending: std::collections::VecDeque::new(),
                done: false,
                _guard: StreamGuard::new(self.metrics.clone()),
                _permit: stream_permit,
                _workload: workload_stream,
                id: a.id,
            };
            // No task and no channel per stream: the stream is polled by the
            // connection that carries it (a few hundred bytes of state each).
            let stream = futures_util::stream::unfold(state, |mut st| async move {
                let item = st.next_event().await?;
                Some((item, st))
            });
            let stream: WatchStream = Box::pin(stream);
            Ok(Handled {
                reply: Response::new(stream),
                detail,
            })
        })
        .await
    }
}

impl BrokerService {
    /// A Fetch's own work, after the envelope's checks: read each granted
    /// secret that no rule withholds, record a lease for each, answer them
    /// within `server.max_response_bytes`.
    async fn fetch_granted(
        &self,
        a: Admitted<'_>,
        ttl_seconds: u32,
    ) -> Result<Handled<Response<pb::FetchResponse>, impl serde::Serialize>, ApiError> {
        let role = a.role()?;
        let id = &a.id;
        // A rule with a secret withholds just that secret: the others are
        // served, and the answer names what it withholds.
        let withheld = self.view.withheld(id, &a.names);
        let names: Vec<&String> = a
            .names
            .iter()
            .filter(|n| !withheld.iter().any(|(w, _)| w == n))
            .collect();
        let ttl = policy::lease_ttl(role, ttl_seconds);
        let mut secrets = Vec::with_capacity(names.len());
        let mut records = Vec::with_capacity(names.len());
        let mut answer_bytes = 0usize;
        let mut upstreams = Vec::new();
        for name in names {
            let source = self.sources.for_name(name);
            let what = ReadFor {
                name,
                id,
                ttl,
                token: a.token,
            };
            let Issued {
                secret: v,
                upstream: up,
            } = match source.read(&what).await {
                Ok(x) => x,
                Err(e) => {
                    // Credentials issued for the earlier names are not handed out.
                    self.abandon(&upstreams).await;
                    if e.failure != Failure::NotFound {
                        warn!(identity = %id, secret = %name, source = e.source_kind, error = %e, "backend read failed");
                    }
                    return Err(e.into());
                }
            };
            answer_bytes += v.value().len();
            if answer_bytes > self.max_response_bytes {
                self.abandon(&upstreams).await;
                warn!(identity = %id, secrets = a.names.len(), limit = self.max_response_bytes, "fetch answer too large");
                return Err(ApiError::ResponseTooLarge {
                    limit: self.max_response_bytes,
                });
            }
            let mut lease = new_lease(ttl)?;
            if let Some(up) = up {
                // The credential's real expiry bounds the lease.
                bound_lease(&mut lease, up.expires_at);
                upstreams.push((lease.lease_id.clone(), up, source));
            }
            records.push(lease_record(id, role, name, v.version, &lease));
            secrets.push(pb::Secret {
                name: v.name.clone(),
                version: v.version,
                value: v.value().to_vec(),
                lease: Some(lease),
            });
        }
        let detail = FetchAudit {
            role: &role.name,
            secrets: records
                .iter()
                .map(|l| LeaseAudit {
                    lease_id: l.lease_id.clone(),
                    name: l.secret.clone(),
                    version: l.version,
                })
                .collect(),
            withheld: withheld
                .iter()
                .map(|(name, rule)| WithheldAudit {
                    name: (*name).to_owned(),
                    rule_id: rule.rule_id.clone(),
                })
                .collect(),
            ttl_seconds: ttl.as_secs(),
        };
        let leases = records.len() as u64;
        // A lease that cannot be recorded cannot be revoked: fail instead.
        if let Err(e) = self.leases.record(records).await {
            self.abandon(&upstreams).await;
            return Err(e.into());
        }
        for (lease_id, up, _) in &upstreams {
            if let Err(e) = self.upstream.record(lease_id, up).await {
                self.abandon(&upstreams).await;
                return Err(e.into());
            }
        }
        self.metrics.leases_issued.inc_by(leases);
        self.metrics.secrets_served.inc_by(secrets.len() as u64);
        debug!(identity = %id, role = %role.name, secrets = secrets.len(), ttl_s = ttl.as_secs(), "fetch");
        let withheld = withheld
            .iter()
            .map(|(name, rule)| pb::Withheld {
                name: (*name).to_owned(),
                rule_id: rule.rule_id.clone(),
                reason: rule.reason.clone(),
            })
            .collect();
        Ok(Handled {
            reply: Response::new(pb::FetchResponse { secrets, withheld }),
            detail,
        })
    }
}

/// One watch stream: what it watches and what it waits on.
struct WatchState {
    id: Identity,
    /// Counts against the workload's streams while the stream lives.
    _workload: crate::api::limits::WorkloadStream,
    watched: HashSet<String>,
    rotations: broadcast::Receiver<Rotation>,
    revocations: broadcast::Receiver<crate::state::revocation::Rule>,
    view: Arc<View>,
    shutdown: watch::Receiver<bool>,
    tick: tokio::time::Interval,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Events decided but not yet sent, in order.
    pending: std::collections::VecDeque<Result<pb::WatchEvent, Status>>,
    /// Set once the stream must end (after `pending` is sent).
    done: bool,
    _guard: StreamGuard,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

fn event(e: pb::watch_event::Event) -> Result<pb::WatchEvent, Status> {
    Ok(pb::WatchEvent { event: Some(e) })
}

impl WatchState {
    /// The next item of the stream; `None` ends it.
    async fn next_event(&mut self) -> Option<Result<pb::WatchEvent, Status>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            self.step().await;
        }
    }

    /// Waits for the next thing that happens and queues what the client
    /// must be told.
    async fn step(&mut self) {
        tokio::select! {
            _ = &mut self.deadline => {
                self.end(Status::unauthenticated("token expired; reconnect with a fresh token"));
            }
            _ = crate::shutdown::until_true(&mut self.shutdown) => {
                self.end(Status::unavailable("broker is shutting down; reconnect"));
            }
            _ = self.tick.tick() => {
                self.pending.push_back(event(pb::watch_event::Event::Heartbeat(pb::Heartbeat { unix_time: unix_now() })));
            }
            r = self.revocations.recv() => match r {
                Ok(rule) => {
                    let names: Vec<String> = self.watched.iter().cloned().collect();
                    let affected: Vec<String> = rule.affected(&self.id, &names).into_iter().map(str::to_owned).collect();
                    if affected.is_empty() || !rule.active(unix_now()) {
                        return;
                    }
                    self.pending.push_back(event(pb::watch_event::Event::Revoked(pb::Revoked {
                        rule_id: rule.id.clone(),
                        reason: rule.reason.clone(),
                        names: affected.clone(),
                    })));
                    for n in &affected {
                        self.watched.remove(n);
                    }
                    if self.watched.is_empty() || rule.blocks_identity(&self.id) {
                        let denied = Revoked { rule_id: rule.id, reason: rule.reason };
                        self.end(Status::permission_denied(denied.to_string()));
                    }
                }
                // Missed rules: check the whole view for this stream instead.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let names: Vec<String> = self.watched.iter().cloned().collect();
                    if let Err(denied) = self.view.check(&self.id, &names) {
                        self.pending.push_back(event(pb::watch_event::Event::Revoked(pb::Revoked {
                            rule_id: denied.rule_id.clone(),
                            reason: denied.reason.clone(),
                            names,
                        })));
                        self.end(Status::permission_denied(denied.to_string()));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            },
            r = self.rotations.recv() => match r {
                Ok(rot) if self.watched.contains(&rot.name) => {
                    self.pending.push_back(event(pb::watch_event::Event::Rotated(pb::Rotated { name: rot.name, version: rot.version })));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed events: tell the client to refetch everything it watches.
                    for name in &self.watched {
                        self.pending.push_back(event(pb::watch_event::Event::Rotated(pb::Rotated { name: name.clone(), version: 0 })));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            },
        }
    }

    /// Ends the stream with `status` after what is queued.
    fn end(&mut self, status: Status) {
        self.pending.push_back(Err(status));
        self.done = true;
    }
}

/// Ends `lease` no later than `ends` (unix seconds), at least a second from now.
fn bound_lease(lease: &mut pb::Lease, ends: i64) {
    let now = unix_now();
    if ends < lease.expires_at_unix {
        lease.expires_at_unix = ends.max(now + 1);
        lease.ttl_seconds = (lease.expires_at_unix - now) as u32;
    }
}

fn lease_record(
    id: &Identity,
    role: &RoleConfig,
    secret: &str,
    version: u64,
    lease: &pb::Lease,
) -> LeaseRecord {
    LeaseRecord {
        lease_id: lease.lease_id.clone(),
        cluster: Some(id.cluster.clone()),
        issuer: id.issuer.clone(),
        namespace: id.namespace.clone(),
        service_account: id.service_account.clone(),
        pod_name: id.pod_name.clone(),
        pod_uid: id.pod_uid.clone(),
        role: role.name.clone(),
        secret: secret.to_owned(),
        version,
        issued_at: unix_now(),
        expires_at: lease.expires_at_unix,
    }
}

pub fn to_pb(id: &Identity) -> pb::Identity {
    pb::Identity {
        issuer: id.issuer.clone(),
        subject: id.subject.clone(),
        namespace: id.namespace.clone(),
        service_account: id.service_account.clone(),
        service_account_uid: id.service_account_uid.clone(),
        pod_name: id.pod_name.clone().unwrap_or_default(),
        pod_uid: id.pod_uid.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_are_128_bits_and_ordered_by_issue_time() {
        let a = new_lease(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_lease(Duration::from_secs(60)).unwrap();
        assert_eq!(a.lease_id.len(), 32);
        assert!(a.lease_id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.lease_id < b.lease_id, "{} !< {}", a.lease_id, b.lease_id);
        // Same millisecond: still distinct (80 random bits).
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| new_lease(Duration::from_secs(60)).unwrap().lease_id)
            .collect();
        assert_eq!(ids.len(), 1000);
    }
}
