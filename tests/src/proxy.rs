//! Proxies on loopback that stand in for a backend's outage without
//! touching the backend itself:
//! - [`SlowProxy`] (TCP) holds back what the server answers: requests pass
//!   at once; every chunk of the answer waits the current delay first, on
//!   connections already open and new ones alike.
//! - [`FaultProxy`] (HTTP/1.1) sees every call (tests count them) and can
//!   drop connections, hold answers back, or answer every call with the
//!   backend's own error ([`Fault`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
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

/// What a [`FaultProxy`] does with the calls it takes (it sees them either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every call goes to the backend and its answer comes back.
    None,
    /// Every connection is closed without an answer, as by an endpoint
    /// that went away (clients see a dispatch failure).
    Down,
    /// Every answer is held back this long first.
    Slow(Duration),
    /// Every call is answered with the proxy's failure answer, without
    /// reaching the backend.
    Failing,
}

/// A backend's answer to a call it failed on its side, in its own error
/// shape (so clients parse it as they would the real one).
pub type Failure = fn() -> hyper::Response<Full<Bytes>>;

/// A running HTTP proxy (it runs on the runtime it was started on).
pub struct FaultProxy {
    /// Where clients connect.
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
}

impl FaultProxy {
    /// Forwards HTTP/1.1 calls to `http://127.0.0.1:{target}`, without a
    /// fault at first. `observe` sees every call's head and body before the
    /// fault applies (to count them); `failure` answers under
    /// [`Fault::Failing`].
    pub fn start(
        rt: &tokio::runtime::Runtime,
        target: u16,
        observe: impl Fn(&hyper::http::request::Parts, &Bytes) + Send + Sync + 'static,
        failure: Failure,
    ) -> Result<FaultProxy> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let observe = Arc::new(observe);
        let shared = fault.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if *shared.lock().unwrap() == Fault::Down {
                    drop(stream);
                    continue;
                }
                let (http, observe, fault) = (http.clone(), observe.clone(), shared.clone());
                let service = hyper::service::service_fn(move |req| {
                    let (http, observe, fault) = (http.clone(), observe.clone(), fault.clone());
                    async move { forward(req, target, &http, &*observe, &fault, failure).await }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FaultProxy { port, fault })
    }

    /// What the proxy does from now on, to calls on connections already
    /// open and new ones alike.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }
}

/// One call through a [`FaultProxy`].
async fn forward(
    req: hyper::Request<hyper::body::Incoming>,
    target: u16,
    http: &reqwest::Client,
    observe: &(dyn Fn(&hyper::http::request::Parts, &Bytes) + Send + Sync),
    fault: &Mutex<Fault>,
    failure: Failure,
) -> Result<hyper::Response<Full<Bytes>>, String> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    observe(&parts, &body);
    let now = *fault.lock().unwrap();
    match now {
        Fault::None => {}
        // An error from the service makes hyper close the connection
        // without writing an answer.
        Fault::Down => return Err("endpoint down".to_owned()),
        Fault::Slow(delay) => tokio::time::sleep(delay).await,
        Fault::Failing => return Ok(failure()),
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut fwd = http.request(
        parts.method.clone(),
        format!("http://127.0.0.1:{target}{path}"),
    );
    for (k, v) in &parts.headers {
        if k != hyper::header::CONTENT_LENGTH {
            fwd = fwd.header(k, v);
        }
    }
    let resp = match fwd.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(hyper::Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(e.to_string())))
                .unwrap());
        }
    };
    let mut out = hyper::Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if k != hyper::header::CONTENT_LENGTH && k != hyper::header::TRANSFER_ENCODING {
            out = out.header(k, v);
        }
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    Ok(out.body(Full::new(bytes)).unwrap())
}
