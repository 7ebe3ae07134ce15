//! The sidecar's HTTP ports.
//!
//! - `health_listen` (loopback by default): `/healthz` (alive), `/readyz`
//!   (every configured secret is on disk; otherwise 503 naming what is
//!   missing or revoked, with the rule ID) and Prometheus `/metrics`, labelled
//!   with the configured secret names (never values).
//! - `probe_listen` (for the pod network, where the kubelet's `httpGet`
//!   probes arrive): `/healthz` and `/readyz` answer a status code and a fixed
//!   word, nothing about which secret or rule; `/metrics` only with
//!   `probe_metrics`; every other path 404. A small hand-written HTTP/1.x
//!   responder with fixed bounds ([`PROBE_MAX_CONNECTIONS`],
//!   [`PROBE_MAX_HEAD`], [`PROBE_TIMEOUT`]): one request per connection,
//!   no body read, no keep-alive.
//!
//! What a listener shows is set by its address ([`View::for_addr`]): the
//! detail only on loopback; anywhere else (`health_listen = "0.0.0.0:8099"`
//! in an older config) the same as the probe port. No metric has a lease ID
//! or a rule ID in a label or a value: those are unbounded, and they say who
//! revoked what.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info};

/// One secret as the metrics report it.
#[derive(Debug, Clone, Default)]
pub struct SecretStatus {
    pub name: String,
    /// Its position in the config's `[[secrets]]` (from 0): the `secret`
    /// label where names are not shown.
    pub position: usize,
    pub version: u64,
    /// Unix time this version was first received.
    pub received_at: i64,
    /// Unix time of the last successful fetch or renewal.
    pub refreshed_at: i64,
    /// Unix time the lease ends.
    pub expires_at: i64,
}

/// What the probes and metrics report; the main loop publishes it after
/// every change.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Empty when ready; otherwise one line per problem.
    pub problems: Vec<String>,
    pub secrets: Vec<SecretStatus>,
    pub revoked: usize,
    pub refresh_failures: u64,
    pub generation_swaps: u64,
}

pub type Shared = Arc<Mutex<Status>>;

/// Local API requests by method and result.
#[derive(Debug, Default)]
pub struct LocalApiCounters(Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>);

impl LocalApiCounters {
    pub fn count(&self, method: &'static str, result: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry((method, result)).or_default() += 1;
        }
    }

    fn snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    result: &'static str,
}

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub status: Shared,
    pub local_api: Arc<LocalApiCounters>,
    /// What this listener shows ([`View::for_addr`] of its address).
    pub view: View,
}

fn snapshot(state: &Shared) -> Status {
    state.lock().map(|r| r.clone()).unwrap_or_default()
}

/// How much a listener tells whoever can reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Loopback: `/readyz` names what is missing or revoked (and the rule
    /// ID); metrics are labelled with secret names.
    Detailed,
    /// Reachable from the pod network: `/readyz` is `ok` or `not ready`;
    /// metrics are labelled with secret positions unless `secret_names`.
    PodNetwork { secret_names: bool },
}

impl View {
    /// [`View::Detailed`] on a loopback address, [`View::PodNetwork`] on
    /// any other (the unspecified address `0.0.0.0` included).
    pub fn for_addr(addr: std::net::SocketAddr, metrics_secret_names: bool) -> View {
        if addr.ip().is_loopback() {
            View::Detailed
        } else {
            View::PodNetwork {
                secret_names: metrics_secret_names,
            }
        }
    }

    fn labels(self) -> SecretLabels {
        match self {
            View::Detailed | View::PodNetwork { secret_names: true } => SecretLabels::Names,
            View::PodNetwork {
                secret_names: false,
            } => SecretLabels::Positions,
        }
    }
}

/// What the `secret` label of the per-secret metrics holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretLabels {
    /// The configured name (`payments/db-password`).
    Names,
    /// The position in `[[secrets]]` (`"0"`): bounded, and says nothing
    /// about the secret to whoever scrapes it.
    Positions,
}

/// The fixed `/readyz` body of the pod-network view.
pub const READY_BODY: &str = "ok\n";
/// The fixed `/readyz` body of the pod-network view when not ready.
pub const NOT_READY_BODY: &str = "not ready\n";

fn readyz_answer(status: &Status, view: View) -> (StatusCode, String) {
    match (status.problems.is_empty(), view) {
        (true, View::Detailed) => (StatusCode::OK, "ready\n".into()),
        (false, View::Detailed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", status.problems.join("\n")),
        ),
        (true, View::PodNetwork { .. }) => (StatusCode::OK, READY_BODY.into()),
        (false, View::PodNetwork { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, NOT_READY_BODY.into())
        }
    }
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    readyz_answer(&snapshot(&state.status), state.view)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SecretLabel {
    secret: String,
}

/// Renders the metrics from a status snapshot and the local API counters.
/// Labels are secret names or positions (`labels`), methods and results:
/// never a value, a lease ID, a rule ID or a problem's text.
pub fn render(
    status: &Status,
    local_api: &LocalApiCounters,
    now: i64,
    labels: SecretLabels,
) -> String {
    let mut registry = Registry::with_prefix("secrets_sidecar");
    let gauge =
        |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&SecretStatus) -> i64| {
            let family = Family::<SecretLabel, Gauge>::default();
            for s in &status.secrets {
                let secret = match labels {
                    SecretLabels::Names => s.name.clone(),
                    SecretLabels::Positions => s.position.to_string(),
                };
                family.get_or_create(&SecretLabel { secret }).set(value(s));
            }
            registry.register(name, help, family);
        };
    gauge(
        &mut registry,
        "secret_version",
        "Version of each secret on disk",
        &|s| s.version as i64,
    );
    gauge(
        &mut registry,
        "secret_age_seconds",
        "Seconds since the version on disk was received",
        &|s| now - s.received_at,
    );
    gauge(
        &mut registry,
        "secret_lease_remaining_seconds",
        "Seconds until the lease of each secret ends (the file is removed then unless renewed)",
        &|s| (s.expires_at - now).max(0),
    );
    gauge(
        &mut registry,
        "secret_last_refresh_timestamp_seconds",
        "Unix time of the last successful fetch or renewal of each secret",
        &|s| s.refreshed_at,
    );
    let failures = Counter::<u64>::default();
    failures.inc_by(status.refresh_failures);
    registry.register(
        "refresh_failures",
        "Fetches and renewals that failed",
        failures,
    );
    let swaps = Counter::<u64>::default();
    swaps.inc_by(status.generation_swaps);
    registry.register("generation_swaps", "New generations written to disk", swaps);
    let revoked = Gauge::<i64>::default();
    revoked.set(status.revoked as i64);
    registry.register(
        "revoked_secrets",
        "Configured secrets currently revoked",
        revoked,
    );
    let requests = Family::<RequestLabels, Counter>::default();
    for ((method, result), n) in local_api.snapshot() {
        requests
            .get_or_create(&RequestLabels { method, result })
            .inc_by(n);
    }
    registry.register(
        "local_api_requests",
        "Local Secrets API calls by method and result",
        requests,
    );
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(state): State<HttpState>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", METRICS_CONTENT_TYPE)],
        render(
            &snapshot(&state.status),
            &state.local_api,
            crate::unix_now(),
            state.view.labels(),
        ),
    )
}

/// Serves `/healthz`, `/readyz` and `/metrics` (as `state.view` says) until
/// the task is dropped.
pub async fn serve(listener: TcpListener, state: HttpState) {
    info!(addr = ?listener.local_addr().ok(), view = ?state.view, "health port listening");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let _ = axum::serve(listener, app).await;
}

/// Connections the probe port serves at once; one more is closed at accept.
pub const PROBE_MAX_CONNECTIONS: usize = 32;
/// The most a request head (request line and headers) may be on the probe
/// port; a longer one is answered 431 and closed.
pub const PROBE_MAX_HEAD: usize = 4096;
/// How long a client may take to send its request head, and then to take
/// the answer, on the probe port.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the probe port serves besides `/healthz` and `/readyz`.
#[derive(Clone)]
pub struct ProbeState {
    pub status: Shared,
    pub local_api: Arc<LocalApiCounters>,
    /// `/metrics` (with `probe_metrics`), labelled so; `None`: 404.
    pub metrics: Option<SecretLabels>,
}

/// Serves the probe port until the task is dropped: one request per
/// connection, bounded in number, size and time.
pub async fn serve_probes(listener: TcpListener, state: ProbeState) {
    info!(addr = ?listener.local_addr().ok(), metrics = state.metrics.is_some(), "probe port listening");
    let permits = Arc::new(tokio::sync::Semaphore::new(PROBE_MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                debug!(error = %e, "probe port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("probe port: too many connections; one closed");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            probe_connection(stream, &state).await;
            drop(permit);
        });
    }
}

async fn probe_connection(mut stream: tokio::net::TcpStream, state: &ProbeState) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(end + 4 <= PROBE_MAX_HEAD);
            }
            if head.len() >= PROBE_MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answer = match read {
        Ok(Ok(true)) => probe_answer(&head, state),
        Ok(Ok(false)) => ProbeAnswer::text(431, "Request Header Fields Too Large", "too large\n"),
        // Timed out, closed early or failed: nothing worth answering.
        Ok(Err::<bool, std::io::Error>(_)) | Err(_) => return,
    };
    let _ = tokio::time::timeout(PROBE_TIMEOUT, async {
        stream.write_all(&answer.bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

struct ProbeAnswer {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: the headers only.
    head_only: bool,
}

impl ProbeAnswer {
    fn text(code: u16, reason: &'static str, body: &str) -> ProbeAnswer {
        ProbeAnswer {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
            self.code,
            self.reason,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// The answer to one request head on the probe port.
fn probe_answer(head: &[u8], state: &ProbeState) -> ProbeAnswer {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or_default().trim_end();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ProbeAnswer::text(400, "Bad Request", "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return ProbeAnswer::text(400, "Bad Request", "bad request\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return ProbeAnswer::text(405, "Method Not Allowed", "method not allowed\n");
        }
    };
    // The kubelet sends the path as configured; a query string changes nothing.
    let path = target.split('?').next().unwrap_or_default();
    let mut answer = match path {
        "/healthz" => ProbeAnswer::text(200, "OK", READY_BODY),
        "/readyz" => {
            if snapshot(&state.status).problems.is_empty() {
                ProbeAnswer::text(200, "OK", READY_BODY)
            } else {
                ProbeAnswer::text(503, "Service Unavailable", NOT_READY_BODY)
            }
        }
        "/metrics" if state.metrics.is_some() => ProbeAnswer {
            code: 200,
            reason: "OK",
            content_type: METRICS_CONTENT_TYPE,
            body: render(
                &snapshot(&state.status),
                &state.local_api,
                crate::unix_now(),
                state.metrics.unwrap_or(SecretLabels::Positions),
            ),
            head_only: false,
        },
        _ => ProbeAnswer::text(404, "Not Found", "not found\n"),
    };
    answer.head_only = head_only;
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_secrets_never_values() {
        let status = Status {
            secrets: vec![SecretStatus {
                name: "payments/db".into(),
                position: 0,
                version: 3,
                received_at: 100,
                refreshed_at: 150,
                expires_at: 400,
            }],
            refresh_failures: 2,
            generation_swaps: 5,
            ..Status::default()
        };
        let counters = LocalApiCounters::default();
        counters.count("get", "ok");
        let text = render(&status, &counters, 200, SecretLabels::Names);
        assert!(
            text.contains(
                r#"secrets_sidecar_local_api_requests_total{method="get",result="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"secrets_sidecar_secret_version{secret="payments/db"} 3"#),
            "{text}"
        );
        assert!(text.contains(
            r#"secrets_sidecar_secret_lease_remaining_seconds{secret="payments/db"} 200"#
        ));
        assert!(text.contains(r#"secrets_sidecar_secret_age_seconds{secret="payments/db"} 100"#));
        assert!(text.contains("secrets_sidecar_refresh_failures_total 2"));
        assert!(text.contains("secrets_sidecar_generation_swaps_total 5"));
    }
    fn revoked_status() -> Status {
        Status {
            problems: vec![
                "payments/db-password: revoked (rule id rv-7f3a9c)".into(),
                "payments/api-key: not fetched yet".into(),
            ],
            secrets: vec![SecretStatus {
                name: "payments/db-user".into(),
                position: 2,
                version: 4,
                received_at: 100,
                refreshed_at: 150,
                expires_at: 400,
            }],
            revoked: 1,
            ..Status::default()
        }
    }

    #[test]
    fn metrics_never_carry_rule_ids_lease_ids_or_problems() {
        let status = revoked_status();
        let counters = LocalApiCounters::default();
        for labels in [SecretLabels::Names, SecretLabels::Positions] {
            let text = render(&status, &counters, 200, labels);
            for word in ["rv-7f3a9c", "rule", "lease_id", "revoked (", "not fetched"] {
                assert!(!text.contains(word), "{labels:?}: {word:?} in\n{text}");
            }
            assert!(text.contains("secrets_sidecar_revoked_secrets 1"), "{text}");
        }
        let positions = render(&status, &counters, 200, SecretLabels::Positions);
        assert!(
            positions.contains(r#"secrets_sidecar_secret_version{secret="2"} 4"#),
            "{positions}"
        );
        assert!(!positions.contains("payments"), "{positions}");
    }

    #[test]
    fn only_loopback_listeners_show_the_detail() {
        for (addr, want) in [
            ("127.0.0.1:8099", View::Detailed),
            ("127.0.0.2:8099", View::Detailed),
            ("[::1]:8099", View::Detailed),
            (
                "0.0.0.0:8099",
                View::PodNetwork {
                    secret_names: false,
                },
            ),
            (
                "[::]:8099",
                View::PodNetwork {
                    secret_names: false,
                },
            ),
            (
                "10.1.2.3:8099",
                View::PodNetwork {
                    secret_names: false,
                },
            ),
        ] {
            assert_eq!(View::for_addr(addr.parse().unwrap(), false), want, "{addr}");
        }
        assert_eq!(
            View::for_addr("0.0.0.0:8099".parse().unwrap(), true).labels(),
            SecretLabels::Names
        );
        let status = revoked_status();
        let (code, body) = readyz_answer(&status, View::Detailed);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("payments/db-password: revoked (rule id rv-7f3a9c)"),
            "{body}"
        );
        let pod = View::PodNetwork { secret_names: true };
        assert_eq!(
            readyz_answer(&status, pod),
            (StatusCode::SERVICE_UNAVAILABLE, NOT_READY_BODY.to_owned())
        );
        assert_eq!(
            readyz_answer(&Status::default(), pod),
            (StatusCode::OK, READY_BODY.to_owned())
        );
    }

    async fn probe_port(metrics: Option<SecretLabels>) -> (std::net::SocketAddr, Shared) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status: Shared = Arc::new(Mutex::new(revoked_status()));
        tokio::spawn(serve_probes(
            listener,
            ProbeState {
                status: status.clone(),
                local_api: Arc::new(LocalApiCounters::default()),
                metrics,
            },
        ));
        (addr, status)
    }

    /// Sends `request` as it is and reads the whole answer (the port closes).
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A connection closed unanswered may refuse the write, too.
        let _ = conn.write_all(request).await;
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out).await;
        String::from_utf8(out).unwrap()
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: 10.0.0.7:8098\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n\r\n").into_bytes()
    }

    fn split(answer: &str) -> (&str, &str) {
        let (head, body) = answer.split_once("\r\n\r\n").expect(answer);
        (head.lines().next().unwrap(), body)
    }

    #[tokio::test]
    async fn probe_port_answers_a_status_and_a_word_and_404_for_anything_else() {
        let (addr, status) = probe_port(None).await;
        let answer = exchange(addr, &get("/readyz")).await;
        assert_eq!(
            split(&answer),
            ("HTTP/1.1 503 Service Unavailable", "not ready\n")
        );
        for word in ["payments", "rv-", "rule", "revoked", "fetched"] {
            assert!(!answer.contains(word), "{word:?} in {answer}");
        }
        // The headers are fixed: nothing else about the sidecar.
        let head: Vec<&str> = answer
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .lines()
            .skip(1)
            .collect();
        assert_eq!(
            head,
            [
                "content-type: text/plain; charset=utf-8",
                "content-length: 10",
                "cache-control: no-store",
                "connection: close"
            ]
        );
        assert_eq!(
            split(&exchange(addr, &get("/healthz")).await),
            ("HTTP/1.1 200 OK", "ok\n")
        );
        status.lock().unwrap().problems.clear();
        assert_eq!(
            split(&exchange(addr, &get("/readyz?verbose")).await),
            ("HTTP/1.1 200 OK", "ok\n")
        );
        for path in [
            "/metrics",
            "/",
            "/readyz/",
            "/healthz/../metrics",
            "/livez",
            "*",
        ] {
            assert_eq!(
                split(&exchange(addr, &get(path)).await),
                ("HTTP/1.1 404 Not Found", "not found\n"),
                "{path}"
            );
        }
        let head_only = exchange(addr, b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(split(&head_only), ("HTTP/1.1 200 OK", ""));
        assert!(head_only.contains("content-length: 3"), "{head_only}");
        let post = exchange(
            addr,
            b"POST /readyz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        assert_eq!(split(&post).0, "HTTP/1.1 405 Method Not Allowed");
        for junk in [
            &b"hello\r\n\r\n"[..],
            b"GET /readyz\r\n\r\n",
            b"GET /readyz SPDY/3\r\n\r\n",
        ] {
            assert_eq!(
                split(&exchange(addr, junk).await).0,
                "HTTP/1.1 400 Bad Request"
            );
        }
        let mut big = b"GET /readyz HTTP/1.1\r\nX-Pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', PROBE_MAX_HEAD + 10));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            split(&exchange(addr, &big).await).0,
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
    }

    #[tokio::test]
    async fn probe_port_metrics_only_when_asked_and_without_names() {
        let (addr, _) = probe_port(Some(SecretLabels::Positions)).await;
        let answer = exchange(addr, &get("/metrics")).await;
        let (line, body) = split(&answer);
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert!(
            body.contains(r#"secrets_sidecar_secret_version{secret="2"} 4"#),
            "{body}"
        );
        for word in ["payments", "rv-7f3a9c", "rule"] {
            assert!(!body.contains(word), "{word:?} in {body}");
        }
        let (addr, _) = probe_port(Some(SecretLabels::Names)).await;
        let answer = exchange(addr, &get("/metrics")).await;
        assert!(
            answer.contains(r#"{secret="payments/db-user"}"#),
            "{answer}"
        );
        assert!(!answer.contains("rv-7f3a9c"), "{answer}");
    }

    #[tokio::test]
    async fn probe_port_bounds_slow_and_surplus_connections() {
        use tokio::io::AsyncReadExt;
        let (addr, _) = probe_port(None).await;
        // Clients that send nothing hold every connection slot...
        let mut silent = Vec::new();
        for _ in 0..PROBE_MAX_CONNECTIONS {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // ...so the next one is closed at once, unanswered. (Connections
        // are counted as they are accepted: wait until all are.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let answer = exchange(addr, &get("/healthz")).await;
            if answer.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never refused: {answer}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Each silent client is dropped after PROBE_TIMEOUT, unanswered.
        for mut conn in silent {
            let mut out = Vec::new();
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                conn.read_to_end(&mut out),
            )
            .await
            .expect("closed by the sidecar");
            assert!(n.is_err() || out.is_empty(), "{out:?}");
        }
        assert_eq!(
            split(&exchange(addr, &get("/healthz")).await),
            ("HTTP/1.1 200 OK", "ok\n")
        );
    }
}
