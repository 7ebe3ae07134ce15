//! A TCP proxy on loopback that can hold back what the server answers: a
//! slow backend (Vault, AWS) without touching the backend itself. Requests
//! pass at once; every chunk of the answer waits the current delay first, on
//! connections already open and new ones alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running proxy (it runs on the runtime it was started on).
pub struct SlowProxy {
    /// Where clients connect.
    pub port: u16,
    delay_ms: Arc<AtomicU64>,
}

impl SlowProxy {
    /// Forwards connections to `127.0.0.1:target`, without delay at first.
    pub fn start(rt: &tokio::runtime::Runtime, target: u16) -> Result<SlowProxy> {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                        let _ = server_tx.shutdown().await;
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let ms = delay.load(Ordering::Relaxed);
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = client_tx.shutdown().await;
                    up.abort();
                });
            }
        });
        Ok(SlowProxy { port, delay_ms })
    }

    /// Holds every chunk of every answer back by `delay` from now on (zero:
    /// answers pass at once again).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}
