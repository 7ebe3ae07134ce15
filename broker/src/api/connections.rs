//! The gRPC port's connections: a bound on how many are open, and their TLS
//! handshakes.
//!
//! Every accepted TCP connection holds a permit until it closes; one accepted
//! past `server.max_connections` is closed at once, before its TLS handshake,
//! so connections that never send a ClientHello (or sit idle) cannot take
//! every descriptor. With the TLS handshake timeout ([`handshaken`]) and
//! HTTP/2 keepalive (set on the server), a connection that says nothing ends
//! in seconds.
//!
//! The handshakes are the broker's, not tonic's, so that each new connection
//! takes the TLS config current at its start ([`ReloadingTls`]): a renewed
//! certificate applies without a restart. They run concurrently, each in
//! its own task; one that fails or times out is closed and logged at debug,
//! and the accept loop goes on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::debug;

use crate::api::tls_reload::ReloadingTls;

/// A TCP connection that counts against the bound while it is open.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// `incoming` with at most `max` connections open: each one past it is
/// dropped (closed) as soon as it is accepted.
pub fn bounded(
    incoming: impl Stream<Item = io::Result<TcpStream>>,
    max: usize,
) -> impl Stream<Item = io::Result<Counted>> {
    let permits = Arc::new(Semaphore::new(max));
    incoming.filter_map(move |accepted| match accepted {
        Ok(stream) => match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(Counted {
                stream,
                _permit: permit,
            })),
            Err(_) => {
                debug!(peer = ?stream.peer_addr().ok(), max, "connection refused: server.max_connections open");
                None
            }
        },
        Err(e) => Some(Err(e)),
    })
}

/// `incoming` after TLS: each connection's handshake runs in its own task
/// with the config `tls` holds at its start, bounded by `timeout`; the
/// connections whose handshake completes come out in the order they
/// complete. A failed or timed-out handshake closes its connection (and
/// frees its permit); accept errors pass through unchanged.
pub fn handshaken(
    incoming: impl Stream<Item = io::Result<Counted>> + Send + 'static,
    tls: Arc<ReloadingTls>,
    timeout: Duration,
) -> impl Stream<Item = io::Result<TlsStream<Counted>>> + Send + 'static {
    struct State<S> {
        incoming: Pin<Box<S>>,
        /// Whether `incoming` may yield more.
        open: bool,
        handshakes: JoinSet<Option<TlsStream<Counted>>>,
        tls: Arc<ReloadingTls>,
        timeout: Duration,
    }
    let state = State {
        incoming: Box::pin(incoming),
        open: true,
        handshakes: JoinSet::new(),
        tls,
        timeout,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            tokio::select! {
                next = s.incoming.next(), if s.open => match next {
                    Some(Ok(conn)) => {
                        let acceptor = s.tls.acceptor();
                        s.handshakes.spawn(handshake(acceptor, conn, s.timeout));
                    }
                    Some(Err(e)) => return Some((Err(e), s)),
                    None => s.open = false,
                },
                Some(done) = s.handshakes.join_next() => {
                    if let Ok(Some(stream)) = done {
                        return Some((Ok(stream), s));
                    }
                }
                else => return None,
            }
        }
    })
}

/// One connection's TLS handshake, or `None` (the connection closed).
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    conn: Counted,
    timeout: Duration,
) -> Option<TlsStream<Counted>> {
    let peer = conn.stream.peer_addr().ok();
    match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            debug!(peer = ?peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(peer = ?peer, timeout = ?timeout, "TLS handshake timed out (server.tls_handshake_timeout)");
            None
        }
    }
}
