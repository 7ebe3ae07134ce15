//! The `Broker` gRPC service. A call reads top to bottom:
//! bearer token → verify (identity) → resolve role → authorize each secret →
//! read the store → lease → respond. Errors become `tonic::Status` in exactly
//! one place ([`ApiError`] → `Status`).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrets_broker_proto::v1 as pb;
use secrets_broker_proto::v1::broker_server::Broker;
use tokio::sync::{broadcast, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::backend::embedded::{EmbeddedStore, StoreError};
use crate::backend::validate_secret_name;
use crate::config::RoleConfig;
use crate::identity::verify::{TokenError, Verifier};
use crate::identity::{Identity, fingerprint};
use crate::policy::{self, Denied, Policy};

/// Most secrets one request may name.
const MAX_NAMES_PER_REQUEST: usize = 256;

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
    #[error("secret {0:?} does not exist")]
    NotFound(String),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Token(TokenError::KeysUnavailable(_)) => Status::unavailable(msg),
            ApiError::Token(_) => Status::unauthenticated(msg),
            ApiError::Denied(_) => Status::permission_denied(msg),
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::BadRequest(_) => Status::invalid_argument(msg),
            // Store internals (paths, SQL) stay in the broker's log.
            ApiError::Store(StoreError::Invalid(m)) => Status::invalid_argument(m),
            ApiError::Store(_) => {
                Status::unavailable("the secrets store is unavailable; retry later")
            }
        }
    }
}

/// The state a `Broker` service works with.
pub struct BrokerService {
    pub verifier: Arc<Verifier>,
    pub policy: Arc<Policy>,
    pub store: EmbeddedStore,
    pub rotations: broadcast::Sender<Rotation>,
    pub heartbeat: Duration,
    /// Flips to true on shutdown, ending watch streams so the server can drain.
    pub shutdown: watch::Receiver<bool>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

fn bearer<T>(req: &Request<T>) -> Result<&str, TokenError> {
    let value = req
        .metadata()
        .get("authorization")
        .ok_or(TokenError::Missing)?;
    let value = value
        .to_str()
        .map_err(|_| TokenError::Malformed("authorization header is not ASCII".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| TokenError::Malformed("authorization is not `Bearer <jwt>`".into()))?;
    Ok(token)
}

fn check_names(names: &[String]) -> Result<(), ApiError> {
    if names.is_empty() {
        return Err(ApiError::BadRequest("name at least one secret".into()));
    }
    if names.len() > MAX_NAMES_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "{} secrets requested, at most {MAX_NAMES_PER_REQUEST} per call",
            names.len()
        )));
    }
    for n in names {
        validate_secret_name(n).map_err(ApiError::BadRequest)?;
    }
    Ok(())
}

fn new_lease(ttl: Duration) -> Result<pb::Lease, ApiError> {
    let mut id = [0u8; 16];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| ApiError::BadRequest("no randomness".into()))?;
    Ok(pb::Lease {
        lease_id: id.iter().map(|b| format!("{b:02x}")).collect(),
        ttl_seconds: ttl.as_secs() as u32,
        expires_at_unix: unix_now() + ttl.as_secs() as i64,
    })
}

impl BrokerService {
    /// Steps 1-3 of every call: verify the bearer token, then resolve the role.
    async fn authenticate<T>(
        &self,
        req: &Request<T>,
        role: &str,
    ) -> Result<(Identity, &RoleConfig), ApiError> {
        let token = bearer(req)?;
        let identity = match self.verifier.verify(token).await {
            Ok(id) => id,
            Err(e) => {
                warn!(token.fp = %fingerprint(token), reason = %e, "token refused");
                return Err(e.into());
            }
        };
        if !role.is_empty() && !policy::valid_role_name(role) {
            return Err(ApiError::BadRequest("role name is not valid".into()));
        }
        match self.policy.resolve(&identity, role) {
            Ok(role) => Ok((identity, role)),
            Err(e) => {
                warn!(identity = %identity, reason = %e, "login denied");
                Err(e.into())
            }
        }
    }

    fn authorize_all(role: &RoleConfig, names: &[String]) -> Result<(), ApiError> {
        check_names(names)?;
        for n in names {
            policy::grants(role, n)?;
        }
        Ok(())
    }

    async fn read(&self, name: &str) -> Result<crate::backend::SecretVersion, ApiError> {
        match self.store.get(name).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(ApiError::NotFound(name.to_owned())),
            Err(e) => {
                warn!(secret = name, error = %e, "store read failed");
                Err(e.into())
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
        let span = info_span!("login");
        async {
            let (id, role) = self.authenticate(&req, &req.get_ref().role).await?;
            info!(identity = %id, role = %role.name, result = "accepted", "login");
            Ok(Response::new(pb::LoginResponse {
                identity: Some(to_pb(&id)),
                role: role.name.clone(),
                allowed_secrets: role.secrets.iter().map(|p| p.as_str().to_owned()).collect(),
                lease_ttl_seconds: role.ttl.as_secs() as u32,
            }))
        }
        .instrument(span)
        .await
        .map_err(|e: ApiError| e.into())
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let span = info_span!("fetch");
        async {
            let r = req.get_ref();
            let (id, role) = self.authenticate(&req, &r.role).await?;
            Self::authorize_all(role, &r.names)?;
            let ttl = policy::lease_ttl(role, r.ttl_seconds);
            let mut secrets = Vec::with_capacity(r.names.len());
            for name in &r.names {
                let v = self.read(name).await?;
                secrets.push(pb::Secret {
                    name: v.name.clone(),
                    version: v.version,
                    value: v.value().to_vec(),
                    lease: Some(new_lease(ttl)?),
                });
            }
            info!(identity = %id, role = %role.name, secrets = secrets.len(), ttl_s = ttl.as_secs(), "fetch");
            Ok(Response::new(pb::FetchResponse { secrets }))
        }
        .instrument(span)
        .await
        .map_err(|e: ApiError| e.into())
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let span = info_span!("renew");
        async {
            let r = req.get_ref();
            let (id, role) = self.authenticate(&req, &r.role).await?;
            let names: Vec<String> = r.leases.iter().map(|l| l.name.clone()).collect();
            Self::authorize_all(role, &names)?;
            let ttl = policy::lease_ttl(role, r.ttl_seconds);
            let versions = self.store.latest_versions().await?;
            let mut leases = Vec::with_capacity(names.len());
            for held in &r.leases {
                let current = *versions
                    .get(&held.name)
                    .ok_or_else(|| ApiError::NotFound(held.name.clone()))?;
                let mut lease = new_lease(ttl)?;
                if !held.lease_id.is_empty() {
                    lease.lease_id.clone_from(&held.lease_id);
                }
                leases.push(pb::RenewedLease {
                    name: held.name.clone(),
                    current_version: current,
                    lease: Some(lease),
                });
            }
            info!(identity = %id, role = %role.name, leases = leases.len(), "renew");
            Ok(Response::new(pb::RenewResponse { leases }))
        }
        .instrument(span)
        .await
        .map_err(|e: ApiError| e.into())
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let (id, role) = self.authenticate(&req, &req.get_ref().role).await?;
        let names = req.into_inner().names;
        Self::authorize_all(role, &names)?;
        info!(identity = %id, role = %role.name, secrets = names.len(), "watch opened");
        let watched: HashSet<String> = names.into_iter().collect();
        let mut rotations = self.rotations.subscribe();
        let mut shutdown = self.shutdown.clone();
        let heartbeat = self.heartbeat;
        // The stream ends when the token that opened it expires: a client must
        // come back with a fresh token to keep watching.
        let token_left = Duration::from_secs((id.expires_at - unix_now()).max(0) as u64);
        let stream = async_stream(move |tx| async move {
            let deadline = tokio::time::sleep(token_left);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                let event = tokio::select! {
                    _ = &mut deadline => {
                        let _ = tx.send(Err(Status::unauthenticated("token expired; reconnect with a fresh token"))).await;
                        return;
                    }
                    _ = crate::until_true(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("broker is shutting down; reconnect"))).await;
                        return;
                    }
                    _ = tick.tick() => pb::watch_event::Event::Heartbeat(pb::Heartbeat { unix_time: unix_now() }),
                    r = rotations.recv() => match r {
                        Ok(rot) if watched.contains(&rot.name) => {
                            pb::watch_event::Event::Rotated(pb::Rotated { name: rot.name, version: rot.version })
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Missed events: tell the client to refetch everything it watches.
                            for name in &watched {
                                let ev = pb::watch_event::Event::Rotated(pb::Rotated { name: name.clone(), version: 0 });
                                if tx.send(Ok(pb::WatchEvent { event: Some(ev) })).await.is_err() {
                                    return;
                                }
                            }
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx
                    .send(Ok(pb::WatchEvent { event: Some(event) }))
                    .await
                    .is_err()
                {
                    return; // client went away
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Runs `body` as a task feeding a channel-backed stream; the task ends when
/// the client drops the stream.
fn async_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
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

/// Polls the store for new versions and broadcasts them to watch streams.
pub async fn poll_rotations(
    store: EmbeddedStore,
    interval: Duration,
    tx: broadcast::Sender<Rotation>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known = match store.latest_versions().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "cannot read secret versions");
            Default::default()
        }
    };
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::until_true(&mut shutdown) => return,
        }
        let current = match store.latest_versions().await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot read secret versions");
                continue;
            }
        };
        for (name, version) in &current {
            if known.get(name) != Some(version) {
                info!(secret = %name, version, "new secret version");
                let _ = tx.send(Rotation {
                    name: name.clone(),
                    version: *version,
                });
            }
        }
        known = current;
    }
}
