//! A bound on the gRPC port's open connections.
//!
//! Every accepted TCP connection holds a permit until it closes; one accepted
//! past `server.max_connections` is closed at once, before its TLS handshake,
//! so connections that never send a ClientHello (or sit idle) cannot take
//! every descriptor. With the TLS handshake timeout and HTTP/2 keepalive
//! (set on the server), a connection that says nothing ends in seconds.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::debug;

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
