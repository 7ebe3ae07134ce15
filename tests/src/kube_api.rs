//! A test double for the one Kubernetes API the broker calls: TokenReview
//! (`POST /apis/authentication.k8s.io/v1/tokenreviews`), over HTTPS, reached
//! through a real kubeconfig. No Kubernetes API server can run on these
//! machines; this one speaks the same JSON (requests, `status.user.extra`
//! pod name/UID, `audiences`, error `Status` objects), and the test drives
//! its behaviour: a pod deleted, the API server down.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

/// What the fake API server knows and how it behaves.
#[derive(Default)]
struct State {
    deleted_pods: Mutex<HashSet<String>>,
    down: AtomicBool,
    /// Milliseconds to wait before answering (a slow API server).
    delay_ms: AtomicU64,
    reviews: AtomicU64,
}

/// A running fake API server.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<State>,
    pub port: u16,
    /// The broker's own credential for this API server.
    pub broker_token: String,
}

impl FakeApiServer {
    /// Starts it on loopback with the given TLS identity.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        tls: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<FakeApiServer> {
        let state = Arc::new(State::default());
        let broker_token = "broker-sa-token-for-tests".to_owned();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (st, expected) = (state.clone(), broker_token.clone());
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st, expected) = (acceptor.clone(), st.clone(), expected.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (st, expected) = (st.clone(), expected.clone());
                        async move { Ok::<_, Infallible>(handle(req, &st, &expected).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeApiServer {
            state,
            port,
            broker_token,
        })
    }

    /// The pod is gone: its tokens no longer authenticate.
    pub fn delete_pod(&self, name: &str) {
        self.state
            .deleted_pods
            .lock()
            .unwrap()
            .insert(name.to_owned());
    }

    /// The API server answers 503 to everything while down.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::Relaxed);
    }

    /// Answers only after `delay` from now on.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// TokenReviews served so far.
    pub fn reviews(&self) -> u64 {
        self.state.reviews.load(Ordering::Relaxed)
    }

    /// Writes a kubeconfig for the broker: this server, the CA, the token.
    pub fn write_kubeconfig(&self, path: &Path, ca: &Path) -> std::io::Result<PathBuf> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: broker\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: broker\ncurrent-context: test\n",
                port = self.port,
                ca = ca.display(),
                token = self.broker_token
            ),
        )?;
        Ok(path.to_owned())
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

async fn handle(req: Request<Incoming>, st: &State, expected: &str) -> Response<Full<Bytes>> {
    let delay = st.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    if st.down.load(Ordering::Relaxed) {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {expected}"));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if req.method() != hyper::Method::POST
        || req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(review): Result<Value, _> = serde_json::from_slice(&body.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a TokenReview",
        );
    };
    st.reviews.fetch_add(1, Ordering::Relaxed);
    let spec = &review["spec"];
    let token = spec["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let claims: Value = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let k8s = &claims["kubernetes.io"];
    let pod = k8s["pod"]["name"].as_str().unwrap_or_default().to_owned();
    let aud: Vec<String> = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let error = if claims.is_null() {
        Some("[invalid bearer token, token lookup failed]")
    } else if claims["exp"].as_i64().unwrap_or(0) < now {
        Some("[invalid bearer token, service account token has expired]")
    } else if !wanted.is_empty() && !aud.iter().any(|a| wanted.contains(a)) {
        Some("[invalid bearer token, token audiences don't match]")
    } else if st.deleted_pods.lock().unwrap().contains(&pod) {
        Some("[invalid bearer token, service account token has been invalidated]")
    } else {
        None
    };
    let mut answer = review.clone();
    answer["kind"] = json!("TokenReview");
    answer["apiVersion"] = json!("authentication.k8s.io/v1");
    answer["metadata"] = json!({ "creationTimestamp": null });
    answer["status"] = match error {
        Some(e) => json!({ "user": {}, "error": e }),
        None => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", k8s["namespace"].as_str().unwrap_or_default(), k8s["serviceaccount"]["name"].as_str().unwrap_or_default()),
                "uid": k8s["serviceaccount"]["uid"],
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", k8s["namespace"].as_str().unwrap_or_default()), "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [pod],
                    "authentication.kubernetes.io/pod-uid": [k8s["pod"]["uid"]],
                }
            },
            "audiences": aud.into_iter().filter(|a| wanted.is_empty() || wanted.contains(a)).collect::<Vec<_>>(),
        }),
    };
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap_or_default()
}
