//! The `Secrets` gRPC service the sidecar serves to its application on a
//! Unix socket: get, list, and a watch stream of new versions and removals,
//! plus gRPC health on the same socket.
//!
//! Every call checks the caller's UID from the socket (`SO_PEERCRED`): only
//! UIDs in `local_api.allowed_uids` (by default, the sidecar's own) get an
//! answer; anyone else gets `PERMISSION_DENIED` naming their UID.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use secrets_broker_proto::v1 as pb;
use secrets_broker_proto::v1::secrets_server::{Secrets, SecretsServer};
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use zeroize::Zeroizing;

/// One secret as the local API serves it.
#[derive(Clone)]
pub struct Entry {
    pub version: u64,
    pub value: Zeroizing<Vec<u8>>,
    pub expires_at: i64,
    pub received_at: i64,
    pub refreshed_at: i64,
}

/// What the keeper publishes and the local API reads.
pub struct Published {
    /// Configured names, so an unknown name is NOT_FOUND, a missing one UNAVAILABLE.
    configured: HashSet<String>,
    current: RwLock<HashMap<String, Entry>>,
    events: broadcast::Sender<pb::SecretsWatchEvent>,
    /// Requests served, by method and result, for the metrics.
    pub requests: Arc<crate::health::LocalApiCounters>,
}

fn to_pb(name: &str, e: &Entry) -> pb::LocalSecret {
    pb::LocalSecret {
        name: name.to_owned(),
        version: e.version,
        value: e.value.to_vec(),
        expires_at_unix: e.expires_at,
        received_at_unix: e.received_at,
        refreshed_at_unix: e.refreshed_at,
    }
}

impl Published {
    pub fn new(configured: impl IntoIterator<Item = String>) -> Published {
        Published {
            configured: configured.into_iter().collect(),
            current: RwLock::new(HashMap::new()),
            events: broadcast::channel(256).0,
            requests: Default::default(),
        }
    }

    /// The value currently served for `name`, if any.
    pub fn value_of(&self, name: &str) -> Option<Zeroizing<Vec<u8>>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.get(name).map(|e| e.value.clone())
    }

    /// Replaces what is served; announces new versions and removals.
    pub fn publish(&self, next: HashMap<String, Entry>) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        for (name, entry) in &next {
            if current
                .get(name)
                .is_none_or(|old| old.version != entry.version)
            {
                let _ = self.events.send(pb::SecretsWatchEvent {
                    event: Some(pb::secrets_watch_event::Event::Updated(to_pb(name, entry))),
                });
            }
        }
        for name in current.keys().filter(|n| !next.contains_key(*n)) {
            let _ = self.events.send(pb::SecretsWatchEvent {
                event: Some(pb::secrets_watch_event::Event::Removed(name.clone())),
            });
        }
        *current = next;
    }
}

/// The service, bound to one socket's allow-list.
pub struct LocalApi {
    state: Arc<Published>,
    allowed: HashSet<u32>,
}

impl LocalApi {
    fn check<T>(&self, req: &Request<T>, method: &'static str) -> Result<(), Status> {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if self.allowed.contains(&uid) => Ok(()),
            other => {
                self.state.requests.count(method, "denied");
                let who = other.map_or_else(|| "unknown".to_owned(), |u| u.to_string());
                warn!(uid = %who, method, "local API call refused");
                Err(Status::permission_denied(format!(
                    "uid {who} may not read secrets from this sidecar (local_api.allowed_uids)"
                )))
            }
        }
    }

    fn lookup(&self, name: &str) -> Result<pb::LocalSecret, Status> {
        if !self.state.configured.contains(name) {
            return Err(Status::not_found(format!(
                "secret {name:?} is not configured in this sidecar"
            )));
        }
        let current = self.state.current.read().unwrap_or_else(|e| e.into_inner());
        current.get(name).map(|e| to_pb(name, e)).ok_or_else(|| {
            Status::unavailable(format!(
                "secret {name:?} is not available now (not fetched yet, or revoked)"
            ))
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SecretsWatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Secrets for LocalApi {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.check(&req, "get")?;
        let result = self.lookup(&req.get_ref().name);
        self.state
            .requests
            .count("get", if result.is_ok() { "ok" } else { "error" });
        Ok(Response::new(pb::GetResponse {
            secret: Some(result?),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.check(&req, "list")?;
        self.state.requests.count("list", "ok");
        let current = self.state.current.read().unwrap_or_else(|e| e.into_inner());
        let mut secrets: Vec<pb::SecretInfo> = current
            .iter()
            .map(|(name, e)| pb::SecretInfo {
                name: name.clone(),
                version: e.version,
                expires_at_unix: e.expires_at,
            })
            .collect();
        secrets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListResponse { secrets }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::SecretsWatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.check(&req, "watch")?;
        let mut names: HashSet<String> = req.into_inner().names.into_iter().collect();
        if let Some(unknown) = names.iter().find(|n| !self.state.configured.contains(*n)) {
            return Err(Status::not_found(format!(
                "secret {unknown:?} is not configured in this sidecar"
            )));
        }
        if names.is_empty() {
            names = self.state.configured.clone();
        }
        self.state.requests.count("watch", "ok");
        // Subscribe before the snapshot, so no version falls in between.
        let mut events = self.state.events.subscribe();
        let snapshot: Vec<pb::SecretsWatchEvent> = {
            let current = self.state.current.read().unwrap_or_else(|e| e.into_inner());
            names
                .iter()
                .filter_map(|n| current.get(n).map(|e| to_pb(n, e)))
                .map(|s| pb::SecretsWatchEvent {
                    event: Some(pb::secrets_watch_event::Event::Updated(s)),
                })
                .collect()
        };
        let mut seen: HashMap<String, u64> = snapshot
            .iter()
            .filter_map(|e| match &e.event {
                Some(pb::secrets_watch_event::Event::Updated(s)) => {
                    Some((s.name.clone(), s.version))
                }
                _ => None,
            })
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        tokio::spawn(async move {
            for ev in snapshot {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(Status::data_loss("watch fell behind; reconnect")))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let (name, version) = match &ev.event {
                    Some(pb::secrets_watch_event::Event::Updated(s)) => {
                        (s.name.clone(), Some(s.version))
                    }
                    Some(pb::secrets_watch_event::Event::Removed(n)) => (n.clone(), None),
                    None => continue,
                };
                if !names.contains(&name) {
                    continue;
                }
                // Each version once, even if it was in the snapshot.
                match version {
                    Some(v) if seen.get(&name) == Some(&v) => continue,
                    Some(v) => {
                        seen.insert(name, v);
                    }
                    None => {
                        seen.remove(&name);
                    }
                }
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Binds the socket (replacing a stale one) and serves until the task is
/// dropped. The socket is 0666: the UID check, not the file mode, decides.
pub async fn serve(
    path: PathBuf,
    allowed: HashSet<u32>,
    state: Arc<Published>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    remove_stale_socket(&path)?;
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    info!(socket = %path.display(), allowed_uids = ?allowed, "local Secrets API listening");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<LocalApi>>().await;
    let api = LocalApi { state, allowed };
    Ok(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(SecretsServer::new(api))
            .serve_with_incoming(incoming)
            .await
        {
            warn!(error = %e, "local Secrets API stopped");
        }
    }))
}

fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::other(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}
