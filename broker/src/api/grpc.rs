//! The `Broker` gRPC service. Every call goes through one envelope
//! ([`super::envelope`]: shape, admit, token, verify, rate, revocation,
//! authorize, then the handler here, one audit record, metrics); the
//! handlers below do only their call's own work. Errors become
//! `tonic::Status` in exactly one place ([`ApiError`] → `Status`).

use std::collections::{HashMap, HashSet};
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

use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::cache::{ReadError, SecretCache};
use crate::config::RoleConfig;
use crate::db::unix_now;
use crate::identity::Identity;
use crate::identity::verify::{TokenError, Verifiers};
use crate::policy::{self, Denied, Policy};
use crate::state::audit::Auditor;
use crate::state::revocation::{Revoked, Stale, View};
use crate::state::{LeaseRecord, Leases};
use serde_json::json;

/// Latest version per secret name, as the rotation poller last saw it.
pub type Versions = Arc<std::sync::RwLock<HashMap<String, u64>>>;

/// Counts an open watch stream for as long as it lives.
struct StreamGuard(Arc<crate::api::http::Metrics>);

impl StreamGuard {
    fn new(m: Arc<crate::api::http::Metrics>) -> StreamGuard {
        m.watch_streams.inc();
        StreamGuard(m)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.watch_streams.dec();
    }
}

/// A new version of a secret, broadcast to watch streams.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub name: String,
    pub version: u64,
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
    #[error("secret {0:?} does not exist")]
    NotFound(String),
    #[error("lease {0:?} is unknown or not yours; fetch the secret again")]
    UnknownLease(String),
    #[error("state database: {0}")]
    Database(#[from] sqlx::Error),
    /// The leases of a call could not be recorded.
    #[error("state database: {0}")]
    LeaseRecord(#[from] crate::state::RecordError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// Vault failed; the message names the secret, the path and what Vault
    /// said (never the broker's token).
    #[error("secret {name:?}: {error}")]
    Vault {
        name: String,
        error: crate::backend::vault::VaultError,
    },
    /// AWS failed or refused; the message names the secret, the call and
    /// what AWS said (never a token or a credential).
    #[error("secret {name:?}: {error}")]
    Aws {
        name: String,
        error: crate::backend::aws::AwsError,
    },
    /// A backend read failed (details in the broker's log).
    #[error("the secrets store is unavailable; retry later")]
    Backend,
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
            ApiError::NotFound(_) => "not_found",
            ApiError::UnknownLease(_) => "unknown_lease",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::ResponseTooLarge { .. } => "too_large",
            ApiError::Overloaded(e) => e.class(),
            ApiError::Aws { error, .. } if error.is_refusal() => "backend_refused",
            ApiError::Database(_)
            | ApiError::LeaseRecord(_)
            | ApiError::Backend
            | ApiError::Vault { .. }
            | ApiError::Aws { .. } => "backend_error",
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
            ApiError::NotFound(_) | ApiError::UnknownLease(_) => Status::not_found(msg),
            ApiError::Database(_) | ApiError::LeaseRecord(_) => {
                Status::unavailable("the state database is unavailable; retry later")
            }
            ApiError::BadRequest(_) => Status::invalid_argument(msg),
            ApiError::Overloaded(_) | ApiError::ResponseTooLarge { .. } => {
                Status::resource_exhausted(msg)
            }
            ApiError::Vault {
                error: crate::backend::vault::VaultError::NotFound { .. },
                ..
            } => Status::not_found(msg),
            ApiError::Vault { .. } => Status::unavailable(msg),
            ApiError::Aws {
                error: crate::backend::aws::AwsError::NotFound { .. },
                ..
            } => Status::not_found(msg),
            ApiError::Aws { error, .. } if error.is_refusal() => Status::permission_denied(msg),
            ApiError::Aws { .. } => Status::unavailable(msg),
            // Store internals (paths, SQL) stay in the broker's log.
            ApiError::Backend => {
                Status::unavailable("the secrets store is unavailable; retry later")
            }
        }
    }
}

/// The state a `Broker` service works with.
pub struct BrokerService {
    pub verifier: Arc<Verifiers>,
    pub policy: Arc<Policy>,
    /// Reads go through the cache: one backend read serves many pods.
    pub cache: SecretCache,
    /// Latest version of every secret, kept by the rotation poller.
    pub versions: Versions,
    /// Vault, for the secrets mapped to it.
    pub vault: Option<Arc<crate::backend::vault::Vault>>,
    /// AWS (STS credentials, Secrets Manager), for the secrets mapped to it.
    pub aws: Option<Arc<crate::backend::aws::Aws>>,
    /// Upstream credentials of pod leases (Vault leases, certificates).
    pub upstream: crate::backend::vault::UpstreamLeases,
    pub leases: Leases,
    pub view: Arc<View>,
    pub auditor: Auditor,
    pub metrics: Arc<crate::api::http::Metrics>,
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

    /// The Vault mapping of `name`, if Vault serves it.
    fn vault_for(&self, name: &str) -> Option<(&Arc<crate::backend::vault::Vault>, bool)> {
        let v = self.vault.as_ref()?;
        v.mapping(name).map(|m| (v, m.is_dynamic()))
    }

    /// The AWS mapping of `name`, if AWS serves it (true: STS credentials).
    fn aws_for(&self, name: &str) -> Option<(&Arc<crate::backend::aws::Aws>, bool)> {
        let a = self.aws.as_ref()?;
        a.mapping(name).map(|m| (a, m.is_dynamic()))
    }

    /// A secret for `id`: from Vault or AWS when mapped there (a credential
    /// of its own for a dynamic mapping, with its upstream handle), else from
    /// the embedded store through the cache. `token` is the caller's verified
    /// bearer token, passed on only to STS web identity; never logged or kept.
    async fn read_for(
        &self,
        name: &str,
        id: &Identity,
        ttl: Duration,
        token: &str,
    ) -> Result<
        (
            Arc<crate::backend::SecretVersion>,
            Option<crate::backend::vault::Upstream>,
        ),
        ApiError,
    > {
        let vault_err = |error| ApiError::Vault {
            name: name.to_owned(),
            error,
        };
        let aws_err = |error| ApiError::Aws {
            name: name.to_owned(),
            error,
        };
        if let Some((a, dynamic)) = self.aws_for(name) {
            if !dynamic {
                return Ok((a.sm_get(name).await.map_err(aws_err)?, None));
            }
            let (secret, up) = a.issue(name, id, token).await.map_err(aws_err)?;
            return Ok((Arc::new(secret), Some(up)));
        }
        match self.vault_for(name) {
            None => Ok((self.read(name).await?, None)),
            Some((v, false)) => Ok((v.kv_get(name).await.map_err(vault_err)?, None)),
            Some((v, true)) => {
                let (secret, up) = v.issue(name, id, ttl).await.map_err(vault_err)?;
                Ok((Arc::new(secret), Some(up)))
            }
        }
    }

    async fn read(&self, name: &str) -> Result<Arc<crate::backend::SecretVersion>, ApiError> {
        match self.cache.get(name).await {
            Ok(v) => Ok(v),
            Err(ReadError::NotFound) => Err(ApiError::NotFound(name.to_owned())),
            Err(ReadError::Backend(e)) => {
                warn!(secret = name, error = %e, "store read failed");
                Err(ApiError::Backend)
            }
        }
    }

    /// Renews the upstream credential behind a pod lease and bounds the
    /// lease by it. Returns the version the sidecar should hold: the
    /// lease's own, or 0 ("fetch again") when the credential is gone or
    /// ends within half a lease, so the pod gets a new one in time.
    async fn renew_dynamic(
        &self,
        vault: &crate::backend::vault::Vault,
        record: &LeaseRecord,
        lease: &mut pb::Lease,
        ttl: Duration,
    ) -> Result<u64, ApiError> {
        let Some(up) = self.upstream.get(&record.lease_id).await? else {
            return Ok(0);
        };
        let ends = match vault.renew_upstream(&up, ttl).await {
            Ok(ends) => ends,
            Err(e) => {
                warn!(secret = %record.secret, lease_id = %record.lease_id, error = %e, "upstream renewal failed; the lease keeps the credential's expiry");
                up.expires_at
            }
        };
        if ends != up.expires_at {
            self.upstream.set_expiry(&record.lease_id, ends).await?;
        }
        bound_lease(lease, ends);
        if ends - unix_now() < (ttl.as_secs() / 2) as i64 {
            return Ok(0);
        }
        Ok(record.version)
    }

    /// Bounds a lease by the STS credentials behind it. Returns the version
    /// the sidecar should hold: the lease's own, or 0 ("fetch again") from
    /// two thirds of the credentials' life on, or when they cannot cover half
    /// a lease (STS credentials cannot be extended, only replaced).
    async fn renew_sts(
        &self,
        aws: &crate::backend::aws::Aws,
        record: &LeaseRecord,
        lease: &mut pb::Lease,
        ttl: Duration,
    ) -> Result<u64, ApiError> {
        let Some(up) = self.upstream.get(&record.lease_id).await? else {
            return Ok(0);
        };
        bound_lease(lease, up.expires_at);
        let life = aws
            .mapping(&record.secret)
            .and_then(|m| m.duration())
            .unwrap_or(Duration::ZERO);
        if crate::backend::aws::sts_refresh_due(up.expires_at, life, ttl, unix_now()) {
            return Ok(0);
        }
        Ok(record.version)
    }

    /// Revokes credentials issued for a call that failed before handing them out.
    async fn abandon(&self, upstreams: &[(String, crate::backend::vault::Upstream)]) {
        let Some(v) = &self.vault else { return };
        for (_, up) in upstreams {
            if let Err(e) = v.revoke_upstream(up.kind, &up.mount, &up.id).await {
                warn!(kind = up.kind, error = %e, "cannot revoke a credential of a failed call; it ends at its own expiry");
            }
        }
    }

    /// The latest version of `name`, from the poller's map (or the store for
    /// a secret created since the last poll); Vault KV versions from Vault's poller.
    async fn current_version(&self, name: &str) -> Result<u64, ApiError> {
        if let Some((a, false)) = self.aws_for(name) {
            return match a.sm_version(name) {
                Some(version) => Ok(version),
                None => Ok(a
                    .sm_get(name)
                    .await
                    .map_err(|error| ApiError::Aws {
                        name: name.to_owned(),
                        error,
                    })?
                    .version),
            };
        }
        if let Some((v, false)) = self.vault_for(name) {
            return match v.kv_version(name) {
                Some(version) => Ok(version),
                None => Ok(v
                    .kv_get(name)
                    .await
                    .map_err(|error| ApiError::Vault {
                        name: name.to_owned(),
                        error,
                    })?
                    .version),
            };
        }
        let known = self
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied();
        match known {
            Some(v) => Ok(v),
            None => Ok(self.read(name).await?.version),
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
                let current = match (self.vault_for(&held.name), self.aws_for(&held.name)) {
                    (_, Some((aws, true))) => self.renew_sts(aws, &record, &mut lease, ttl).await?,
                    (Some((v, true)), _) => self.renew_dynamic(v, &record, &mut lease, ttl).await?,
                    _ => self.current_version(&held.name).await?,
                };
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
            let (v, up) = match self.read_for(name, id, ttl, a.token).await {
                Ok(x) => x,
                Err(e) => {
                    // Credentials issued for the earlier names are not handed out.
                    self.abandon(&upstreams).await;
                    match &e {
                        ApiError::Vault { .. } => {
                            warn!(identity = %id, secret = %name, error = %e, "vault read failed");
                        }
                        ApiError::Aws { .. } => {
                            warn!(identity = %id, secret = %name, error = %e, "aws read failed");
                        }
                        _ => {}
                    }
                    return Err(e);
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
                upstreams.push((lease.lease_id.clone(), up));
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
        for (lease_id, up) in &upstreams {
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
            _ = crate::until_true(&mut self.shutdown) => {
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

/// This replica's record of the store's latest versions. One step reads
/// them, updates the shared version map, drops changed secrets from the
/// cache and tells the watch streams; the poller runs it on a timer and
/// after every announced write, and the admin API after its own writes, so
/// that a write is served here when the call that made it returns.
pub struct Rotations {
    store: EmbeddedStore,
    versions: Versions,
    cache: SecretCache,
    tx: broadcast::Sender<Rotation>,
    /// Held for a whole step, so that two steps never announce one change
    /// twice; `false` until the first step, which only learns the versions.
    primed: tokio::sync::Mutex<bool>,
}

impl Rotations {
    pub fn new(
        store: EmbeddedStore,
        versions: Versions,
        cache: SecretCache,
        tx: broadcast::Sender<Rotation>,
    ) -> Rotations {
        Rotations {
            store,
            versions,
            cache,
            tx,
            primed: tokio::sync::Mutex::new(false),
        }
    }

    /// Re-reads the latest versions and acts on every change since the last step.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let mut primed = self.primed.lock().await;
        let current = self.store.latest_versions().await?;
        let known = self
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (name, version) in &current {
            if *primed && known.get(name) != Some(version) {
                info!(secret = %name, version, "new secret version");
                self.cache.invalidate(name).await;
                let _ = self.tx.send(Rotation {
                    name: name.clone(),
                    version: *version,
                });
            }
        }
        for name in known.keys().filter(|n| !current.contains_key(*n)) {
            self.cache.invalidate(name).await; // deleted
        }
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) = current;
        *primed = true;
        Ok(())
    }
}

/// Runs a [`Rotations`] step every `interval`, and at once after a write
/// announced by the store.
pub async fn poll_rotations(
    rotations: Arc<Rotations>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let store = &rotations.store;
    let mut notes =
        crate::db::Notifications::new(store.db(), crate::backend::embedded::VERSIONS_CHANNEL);
    let mut first = true;
    loop {
        if !first {
            // A write through this replica, or (PostgreSQL) any other, is
            // pushed at once; the timer catches the rest (e.g. `store put`
            // on SQLite, or a lost notification).
            tokio::select! {
                _ = tick.tick() => {}
                _ = store.changed() => {}
                _ = notes.recv() => {}
                _ = crate::until_true(&mut shutdown) => return,
            }
        }
        first = false;
        notes.connect().await;
        if let Err(e) = rotations.refresh().await {
            warn!(error = %e, "cannot read secret versions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refresh_after_a_write_serves_the_new_version_and_announces_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        crate::backend::embedded::generate_key_file(&key, "k1").unwrap();
        let store = EmbeddedStore::new(crate::db::Db::sqlite_in(dir.path()).await, &key).unwrap();
        let metrics = Arc::new(crate::api::http::Metrics::new(Default::default()));
        let cache = SecretCache::new(store.clone(), Duration::from_secs(600), metrics);
        let versions = Versions::default();
        let (tx, mut rx) = broadcast::channel(16);
        let rotations = Rotations::new(store.clone(), versions.clone(), cache.clone(), tx);
        store.put("a", b"one").await.unwrap();
        rotations.refresh().await.unwrap();
        assert!(
            rx.try_recv().is_err(),
            "the first step only learns versions"
        );
        assert_eq!(cache.get("a").await.unwrap().value(), b"one"); // now cached

        store.put("a", b"two").await.unwrap();
        assert_eq!(
            cache.get("a").await.unwrap().value(),
            b"one",
            "stale until a step"
        );
        rotations.refresh().await.unwrap();
        assert_eq!(cache.get("a").await.unwrap().value(), b"two");
        assert_eq!(versions.read().unwrap().get("a"), Some(&2));
        let r = rx.try_recv().unwrap();
        assert_eq!((r.name.as_str(), r.version), ("a", 2));
        rotations.refresh().await.unwrap();
        assert!(rx.try_recv().is_err(), "one change, one announcement");

        store.delete("a").await.unwrap();
        rotations.refresh().await.unwrap();
        assert!(matches!(cache.get("a").await, Err(ReadError::NotFound)));
        assert_eq!(versions.read().unwrap().get("a"), None);
    }

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
