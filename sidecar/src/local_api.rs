//! The `Secrets` gRPC service the sidecar serves to its application on a
//! Unix socket: get, list, and a watch stream of new versions and removals,
//! plus gRPC health on the same socket.
//!
//! Every call checks the caller's UID from the socket (`SO_PEERCRED`): only
//! UIDs in `local_api.allowed_uids` (by default, the sidecar's own) get an
//! answer; anyone else gets `PERMISSION_DENIED` naming their UID.
//!
//! Bounded, so that no client can grow the sidecar past its pod's memory
//! limit (32 Mi when injected):
//!
//! - at most [`MAX_CONNECTIONS`] connections are served at once; a further
//!   one is answered `RESOURCE_EXHAUSTED` naming the limit on every call for
//!   a few seconds and closed ([`MAX_REFUSING`] such at once; beyond that a
//!   connection is closed at once);
//! - at most [`MAX_STREAMS_PER_CONNECTION`] calls are open on one
//!   connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: a client's further
//!   calls wait on its side);
//! - at most [`MAX_WATCHES_PER_CONNECTION`] watches on one connection (half
//!   its streams, so `Get` and `List` still get through) and [`MAX_WATCHES`]
//!   in all; a further `Watch` is refused with `RESOURCE_EXHAUSTED` naming
//!   the limit. A watch holds no task and no channel of its own: its stream
//!   reads the shared broadcast, and closing it frees all it held.
//!
//! Measured (`tests/tests/local_api.rs`, debug build): 10,000 watch
//! attempts on one connection add under 0.5 MiB to the sidecar's RSS
//! (unbounded, they added 130 MiB); every limit reached at once (32
//! connections with 16 calls each, 64 watches) about 6 MiB, which glibc
//! keeps for reuse after they close.
//!
//! Any `:authority` is accepted ([`authority`]): stock clients send the
//! socket path there, which `h2` would refuse.

mod authority;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use secrets_broker_proto::v1 as pb;
use secrets_broker_proto::v1::secrets_server::{Secrets, SecretsServer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use self::authority::AuthorityFix;

/// Connections served at once; an application needs one channel (a
/// pre-forking server, one per worker).
pub const MAX_CONNECTIONS: usize = 32;
/// Calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Watches open at once on one connection: one watch follows every secret.
pub const MAX_WATCHES_PER_CONNECTION: usize = 8;
/// Watches open at once on the sidecar.
pub const MAX_WATCHES: usize = 64;
/// Connections over [`MAX_CONNECTIONS`] answered with the refusal at once;
/// beyond, a connection is closed without an answer.
pub const MAX_REFUSING: usize = 8;
/// How long a refused connection is kept open to carry its refusals.
const REFUSAL_LINGER: Duration = Duration::from_secs(3);
/// How much of a name an error message repeats: a name can be megabytes,
/// and a status message travels in a header the client bounds (16 KiB).
const NAME_SHOWN: usize = 64;

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
    /// Watch places on the sidecar ([`MAX_WATCHES`]).
    watches: Arc<Semaphore>,
}

impl LocalApi {
    fn check<T>(&self, req: &Request<T>, method: &'static str) -> Result<(), Status> {
        let uid = req
            .extensions()
            .get::<LocalConnInfo>()
            .and_then(|i| i.uds.peer_cred)
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
            return Err(not_configured(name));
        }
        let current = self.state.current.read().unwrap_or_else(|e| e.into_inner());
        current.get(name).map(|e| to_pb(name, e)).ok_or_else(|| {
            Status::unavailable(format!(
                "secret {} is not available now (not fetched yet, or revoked)",
                shown(name)
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
        if let Some(unknown) =
            (req.get_ref().names.iter()).find(|n| !self.state.configured.contains(*n))
        {
            self.state.requests.count("watch", "error");
            return Err(not_configured(unknown));
        }
        let permits = self.admit_watch(&req).inspect_err(|_| {
            self.state.requests.count("watch", "error");
        })?;
        let mut names: HashSet<String> = req.into_inner().names.into_iter().collect();
        if names.is_empty() {
            names = self.state.configured.clone();
        }
        self.state.requests.count("watch", "ok");
        // Subscribe before the snapshot, so no version falls in between.
        let events = self.state.events.subscribe();
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
        let seen: HashMap<String, u64> = snapshot
            .iter()
            .filter_map(|e| match &e.event {
                Some(pb::secrets_watch_event::Event::Updated(s)) => {
                    Some((s.name.clone(), s.version))
                }
                _ => None,
            })
            .collect();
        let watch = Watch {
            snapshot: snapshot.into_iter(),
            events,
            names,
            seen,
            ended: false,
            _permits: permits,
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            watch,
            Watch::next,
        ))))
    }
}

impl LocalApi {
    /// Takes a watch's places: one on its connection, one on the sidecar.
    fn admit_watch<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Status> {
        let conn = req
            .extensions()
            .get::<LocalConnInfo>()
            .ok_or_else(|| Status::internal("no connection information"))?;
        let on_connection = conn.watches.clone().try_acquire_owned().map_err(|_| {
            debug!("local API watch refused: connection at its limit");
            Status::resource_exhausted(format!(
                "this connection has {MAX_WATCHES_PER_CONNECTION} watch streams open, its limit; \
                 one Watch follows every secret (name several, or none for all)"
            ))
        })?;
        let in_all = self.watches.clone().try_acquire_owned().map_err(|_| {
            debug!("local API watch refused: sidecar at its limit");
            Status::resource_exhausted(format!(
                "the sidecar has {MAX_WATCHES} watch streams open, its limit; \
                 close unused ones and retry"
            ))
        })?;
        Ok((on_connection, in_all))
    }
}

/// `NOT_FOUND` for a name this sidecar does not keep.
fn not_configured(name: &str) -> Status {
    Status::not_found(format!(
        "secret {} is not configured in this sidecar",
        shown(name)
    ))
}

/// A name for a message: quoted, and cut to its first [`NAME_SHOWN`]
/// characters (with its length) when it is longer.
fn shown(name: &str) -> String {
    match name.char_indices().nth(NAME_SHOWN) {
        None => format!("{name:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &name[..end], name.len()),
    }
}

/// One open watch: its snapshot, then the broadcast filtered to its names.
/// Dropped with its stream, and with it the places it holds.
struct Watch {
    snapshot: std::vec::IntoIter<pb::SecretsWatchEvent>,
    events: broadcast::Receiver<pb::SecretsWatchEvent>,
    names: HashSet<String>,
    /// The version last sent of each name: each version once, even if it
    /// was in the snapshot.
    seen: HashMap<String, u64>,
    ended: bool,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl Watch {
    async fn next(mut self) -> Option<(Result<pb::SecretsWatchEvent, Status>, Watch)> {
        if self.ended {
            return None;
        }
        if let Some(ev) = self.snapshot.next() {
            return Some((Ok(ev), self));
        }
        loop {
            let ev = match self.events.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.ended = true;
                    return Some((Err(Status::data_loss("watch fell behind; reconnect")), self));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            let (name, version) = match &ev.event {
                Some(pb::secrets_watch_event::Event::Updated(s)) => (&s.name, Some(s.version)),
                Some(pb::secrets_watch_event::Event::Removed(n)) => (n, None),
                None => continue,
            };
            if !self.names.contains(name) {
                continue;
            }
            match version {
                Some(v) if self.seen.get(name) == Some(&v) => continue,
                Some(v) => {
                    self.seen.insert(name.clone(), v);
                }
                None => {
                    self.seen.remove(name);
                }
            }
            return Some((Ok(ev), self));
        }
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
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    info!(socket = %path.display(), allowed_uids = ?allowed, "local Secrets API listening");
    Ok(tokio::spawn(serve_on(listener, allowed, state)))
}

/// Serves the local API on `listener` (see the module's doc for its bounds).
async fn serve_on(listener: UnixListener, allowed: HashSet<u32>, state: Arc<Published>) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<LocalApi>>().await;
    let api = LocalApi {
        state,
        allowed,
        watches: Arc::new(Semaphore::new(MAX_WATCHES)),
    };
    let incoming = Incoming {
        listener,
        connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        last_warned: Mutex::new(None),
    };
    if let Err(e) = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(health_service)
        .add_service(SecretsServer::new(api))
        .serve_with_incoming(incoming)
        .await
    {
        warn!(error = %e, "local Secrets API stopped");
    }
}

/// The accepted connections, each holding a place among [`MAX_CONNECTIONS`];
/// those beyond are refused here and never reach the server.
struct Incoming {
    listener: UnixListener,
    connections: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    last_warned: Mutex<Option<Instant>>,
}

impl Stream for Incoming {
    type Item = std::io::Result<LocalConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let stream = match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => stream,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            match this.connections.clone().try_acquire_owned() {
                Ok(permit) => return Poll::Ready(Some(Ok(LocalConn::new(stream, permit)))),
                Err(_) => this.refuse(stream),
            }
        }
    }
}

impl Incoming {
    /// Answers every call on `stream` with `RESOURCE_EXHAUSTED` naming the
    /// limit, for [`REFUSAL_LINGER`], then closes it.
    fn refuse(&self, stream: UnixStream) {
        {
            let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                *last = Some(Instant::now());
                warn!(
                    limit = MAX_CONNECTIONS,
                    "local API connection refused: too many connections open"
                );
            }
        }
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            return; // dropped: closed at once
        };
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(|_req| async {
                let status = Status::resource_exhausted(format!(
                    "the sidecar's local API has {MAX_CONNECTIONS} connections open, its limit; \
                     close idle channels (one channel carries many calls) and retry"
                ));
                Ok::<_, std::convert::Infallible>(status.into_http::<tonic::body::Body>())
            });
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .max_concurrent_streams(4)
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(AuthorityFix::new(stream)),
                        service,
                    );
            let _ = tokio::time::timeout(REFUSAL_LINGER, conn).await;
        });
    }
}

/// One served connection of the local socket: what the client sent, with
/// its `:authority` made acceptable ([`authority`]), and the connection's
/// place among [`MAX_CONNECTIONS`], given back when it closes.
struct LocalConn {
    io: AuthorityFix<UnixStream>,
    info: LocalConnInfo,
    _permit: OwnedSemaphorePermit,
}

/// What a call learns of its connection (a request extension).
#[derive(Clone)]
struct LocalConnInfo {
    /// The peer's credentials (`SO_PEERCRED`).
    uds: UdsConnectInfo,
    /// The connection's watch places ([`MAX_WATCHES_PER_CONNECTION`]).
    watches: Arc<Semaphore>,
}

impl LocalConn {
    fn new(stream: UnixStream, permit: OwnedSemaphorePermit) -> LocalConn {
        let info = LocalConnInfo {
            uds: stream.connect_info(),
            watches: Arc::new(Semaphore::new(MAX_WATCHES_PER_CONNECTION)),
        };
        LocalConn {
            io: AuthorityFix::new(stream),
            info,
            _permit: permit,
        }
    }
}

impl Connected for LocalConn {
    type ConnectInfo = LocalConnInfo;

    fn connect_info(&self) -> LocalConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for LocalConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LocalConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use secrets_broker_proto::v1::secrets_client::SecretsClient;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::Code;
    use tonic::transport::Channel;

    /// A local API on a socket in a temp dir, with `payments/a` published.
    async fn start() -> (tempfile::TempDir, PathBuf, Arc<Published>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let state = Arc::new(Published::new(["payments/a".to_owned()]));
        state.publish(HashMap::from([(
            "payments/a".to_owned(),
            Entry {
                version: 1,
                value: Zeroizing::new(b"value-1".to_vec()),
                expires_at: 0,
                received_at: 0,
                refreshed_at: 0,
            },
        )]));
        let me = HashSet::from([rustix::process::getuid().as_raw()]);
        let _task = serve(path.clone(), me, state.clone()).await.unwrap();
        (dir, path, state)
    }

    async fn channel(path: &Path) -> Channel {
        let path = path.to_owned();
        tonic::transport::Endpoint::from_static("http://local.sidecar")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .unwrap()
    }

    fn watch_all() -> pb::SecretsWatchRequest {
        pb::SecretsWatchRequest { names: vec![] }
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        assert_eq!(shown("payments/a"), "\"payments/a\"");
        let long = "é".repeat(3_000_000);
        let s = not_configured(&long);
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() < 300, "{}", s.message());
        assert!(
            s.message()
                .contains(&format!("\"{}\"… (6000000 bytes)", "é".repeat(64))),
            "{}",
            s.message()
        );
        assert_eq!(shown(&"x".repeat(64)), format!("{:?}", "x".repeat(64)));
    }

    #[tokio::test]
    async fn an_unknown_huge_name_is_refused_without_echoing_it() {
        let (_dir, path, _) = start().await;
        let mut api = SecretsClient::new(channel(&path).await);
        let huge = "n".repeat(3 << 20);
        let err = api
            .get(pb::GetRequest { name: huge.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(
            err.message().contains("(3145728 bytes)"),
            "{}",
            err.message()
        );
        let err = api
            .watch(pb::SecretsWatchRequest { names: vec![huge] })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().len() < 300);
        // Known names still served on the same connection.
        let got = api
            .get(pb::GetRequest {
                name: "payments/a".into(),
            })
            .await
            .unwrap();
        assert_eq!(got.into_inner().secret.unwrap().value, b"value-1");
    }

    #[tokio::test]
    async fn watches_are_bounded_per_connection_and_their_places_come_back() {
        let (_dir, path, state) = start().await;
        let mut api = SecretsClient::new(channel(&path).await);
        let mut open = Vec::new();
        for _ in 0..MAX_WATCHES_PER_CONNECTION {
            let mut s = api.watch(watch_all()).await.unwrap().into_inner();
            // The snapshot comes first.
            assert!(s.message().await.unwrap().is_some());
            open.push(s);
        }
        let err = api.watch(watch_all()).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("this connection has 8 watch streams open, its limit"),
            "{}",
            err.message()
        );
        // Unary calls still get through on the same connection.
        api.list(pb::ListRequest {}).await.unwrap();
        // Another connection has places of its own.
        let mut other = SecretsClient::new(channel(&path).await);
        let _w = other.watch(watch_all()).await.unwrap();
        // A watch that closes gives its place back.
        open.truncate(MAX_WATCHES_PER_CONNECTION - 1);
        let mut again = None;
        for _ in 0..200 {
            match api.watch(watch_all()).await {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut again = again
            .expect("the closed watch's place was given back")
            .into_inner();
        assert!(again.message().await.unwrap().is_some());
        // Watches still see new versions.
        let mut next = state.current.read().unwrap().clone();
        next.get_mut("payments/a").unwrap().version = 2;
        state.publish(next);
        let ev = again.message().await.unwrap().unwrap();
        assert!(matches!(
            ev.event,
            Some(pb::secrets_watch_event::Event::Updated(s)) if s.version == 2
        ));
    }

    #[tokio::test]
    async fn watches_are_bounded_in_all() {
        let (_dir, path, _) = start().await;
        let mut open = Vec::new();
        let mut refused = None;
        'outer: for _ in 0..MAX_WATCHES / MAX_WATCHES_PER_CONNECTION + 1 {
            let mut api = SecretsClient::new(channel(&path).await);
            for _ in 0..MAX_WATCHES_PER_CONNECTION {
                match api.watch(watch_all()).await {
                    Ok(s) => open.push(s),
                    Err(e) => {
                        refused = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        assert_eq!(open.len(), MAX_WATCHES);
        let err = refused.expect("refused past the limit");
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("the sidecar has 64 watch streams open, its limit"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_refused_naming_it() {
        let (_dir, path, _) = start().await;
        let mut served = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut api = SecretsClient::new(channel(&path).await);
            api.list(pb::ListRequest {}).await.unwrap();
            served.push(api);
        }
        let mut api = SecretsClient::new(channel(&path).await);
        let err = api.list(pb::ListRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message()
                .contains("the sidecar's local API has 32 connections open, its limit"),
            "{}",
            err.message()
        );
        // One closes: a new connection is served again.
        served.pop();
        let mut ok = false;
        for _ in 0..200 {
            let mut api = SecretsClient::new(channel(&path).await);
            if api.list(pb::ListRequest {}).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "a closed connection's place was given back");
    }

    /// An HTTP/2 frame.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A header block of raw literals, each with incremental indexing and a
    /// new name, as Python's grpcio writes `:authority`.
    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in fields {
            b.push(0x40);
            for s in [name, value] {
                assert!(s.len() < 127);
                b.push(s.len() as u8);
                b.extend_from_slice(s.as_bytes());
            }
        }
        b
    }

    /// Sends `List` calls with `authority` over a raw HTTP/2 connection;
    /// returns the frame types and flags the server answers on each stream.
    async fn raw_calls(path: &Path, authority: &str, calls: u32) -> Vec<(u8, u8, u32)> {
        let mut conn = UnixStream::connect(path).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        for n in 0..calls {
            let stream = 1 + 2 * n;
            let headers = if n == 0 {
                block(&[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/secretbroker.v1.Secrets/List"),
                    (":authority", authority),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ])
            } else {
                // The same fields again, from the dynamic table (62 is the
                // newest entry: te, then content-type, :authority, ...).
                vec![0xc3, 0xc2, 0xc1, 0xc0, 0xbf, 0xbe]
            };
            out.extend(frame(0x1, 0x4, stream, &headers));
            out.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
        }
        conn.write_all(&out).await.unwrap();
        // Read frames until every stream has ended (END_STREAM or RST_STREAM).
        let mut seen = Vec::new();
        let mut ended = HashSet::new();
        let mut buf = Vec::new();
        while ended.len() < calls as usize {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut chunk))
                .await
                .expect("the server answers")
                .unwrap();
            assert!(n > 0, "connection closed: {seen:?}");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len =
                    (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                if stream != 0 {
                    seen.push((kind, flags, stream));
                    if kind == 0x3 || flags & 0x1 != 0 {
                        ended.insert(stream);
                    }
                }
                if kind == 0x4 && flags & 0x1 == 0 {
                    conn.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
                }
                buf.drain(..9 + len);
            }
        }
        seen
    }

    #[tokio::test]
    async fn any_authority_is_accepted() {
        let (_dir, path, _) = start().await;
        for authority in [
            "localhost",
            "tmp%2Fapp%2Fsidecar.sock",
            "/secrets/.sidecar.sock",
        ] {
            let frames = raw_calls(&path, authority, 3).await;
            for stream in [1, 3, 5] {
                assert!(
                    !frames.contains(&(0x3, 0, stream)),
                    "{authority}: stream {stream} reset: {frames:?}"
                );
                // Response headers, then the trailers that end the stream.
                assert!(
                    frames.contains(&(0x1, 0x4, stream)),
                    "{authority}: {frames:?}"
                );
                assert!(
                    frames.contains(&(0x1, 0x5, stream)),
                    "{authority}: {frames:?}"
                );
            }
        }
    }
}
