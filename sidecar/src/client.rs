//! The connection to the broker: TLS pinned to the configured CA, the pod's
//! token re-read from its file for every call and sent as bearer credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use secrets_broker_proto::v1 as pb;
use secrets_broker_proto::v1::broker_client::BrokerClient;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::Config;

/// The broker takes at most this many names per call: longer lists are
/// split over several calls (and several watch streams).
pub const NAMES_PER_CALL: usize = 256;

/// Largest token file accepted.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token file could not be read; usually the projected volume is missing.
    #[error("cannot read token file {path}: {message}")]
    Token { path: PathBuf, message: String },
    /// The CA file or broker URL is unusable.
    #[error("broker connection setup: {0}")]
    Setup(String),
    /// The broker answered with an error status. The request ID is in the
    /// broker's log line for the same call.
    #[error("broker: {} ({}, request id {request_id})", .status.message(), code_name(.status.code()))]
    Status {
        status: tonic::Status,
        request_id: String,
    },
}

impl ClientError {
    /// The broker refused the caller (revoked, not granted, token not
    /// accepted), as opposed to failing to answer.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Status { status, .. }
            if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Unauthenticated => "UNAUTHENTICATED",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::NotFound => "NOT_FOUND",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::Unavailable => "UNAVAILABLE",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        _ => "error",
    }
}

/// A client of the broker's gRPC service.
#[derive(Clone)]
pub struct Client {
    inner: BrokerClient<Channel>,
    token_file: PathBuf,
    role: String,
    ttl_seconds: u32,
}

/// Reads the token file afresh (kubelet rotates it).
pub fn read_token(path: &Path) -> Result<SecretString, ClientError> {
    let fail = |message: String| ClientError::Token {
        path: path.to_owned(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.len() > MAX_TOKEN_BYTES {
        return Err(fail(format!("larger than {MAX_TOKEN_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let token = SecretString::from(text.trim().to_owned());
    drop(zeroize::Zeroizing::new(text));
    if token.expose_secret().is_empty() {
        return Err(fail("the file is empty".into()));
    }
    Ok(token)
}

impl Client {
    /// Builds a client; connects lazily and reconnects as needed.
    pub fn new(cfg: &Config) -> Result<Client, ClientError> {
        let ca = cfg.ca.read().map_err(ClientError::Setup)?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(name) = &cfg.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Endpoint::from_shared(cfg.broker_url.clone())
            .map_err(|e| ClientError::Setup(format!("broker_url: {e}")))?
            .tls_config(tls)
            .map_err(|e| ClientError::Setup(format!("TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(cfg.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(Client {
            inner: BrokerClient::new(endpoint.connect_lazy()),
            token_file: cfg.token_file.clone(),
            role: cfg.role.clone(),
            ttl_seconds: cfg
                .ttl
                .map(|t| t.as_secs().min(u64::from(u32::MAX)) as u32)
                .unwrap_or(0),
        })
    }

    fn request<T>(&self, msg: T) -> Result<(Request<T>, String), ClientError> {
        let token = read_token(&self.token_file)?;
        let mut value: MetadataValue<_> = format!("Bearer {}", token.expose_secret())
            .parse()
            .map_err(|_| ClientError::Token {
                path: self.token_file.clone(),
                message: "the token has characters not allowed in a header".into(),
            })?;
        value.set_sensitive(true);
        let mut req = Request::new(msg);
        req.metadata_mut().insert("authorization", value);
        let mut id = [0u8; 8];
        for b in &mut id {
            *b = fastrand::u8(..);
        }
        let request_id = hex::encode(id);
        if let Ok(v) = request_id.parse() {
            req.metadata_mut().insert("x-request-id", v);
        }
        Ok((req, request_id))
    }

    pub async fn login(&self) -> Result<pb::LoginResponse, ClientError> {
        let (req, request_id) = self.request(pb::LoginRequest {
            role: self.role.clone(),
        })?;
        let r = self.inner.clone().login(req).await;
        Ok(
            r.map_err(|status| ClientError::Status { status, request_id })?
                .into_inner(),
        )
    }

    /// Fetches `names`, at most [`NAMES_PER_CALL`] per call: the secrets
    /// the broker serves, and those it withholds by a revocation rule. All or
    /// nothing otherwise: when a later call fails, the leases of the earlier
    /// ones are released (best effort; they end at their TTL otherwise).
    pub async fn fetch(&self, names: Vec<String>) -> Result<pb::FetchResponse, ClientError> {
        let mut all = pb::FetchResponse::default();
        for chunk in names.chunks(NAMES_PER_CALL) {
            match self.fetch_call(chunk.to_vec()).await {
                Ok(got) => {
                    all.secrets.extend(got.secrets);
                    all.withheld.extend(got.withheld);
                }
                Err(e) => {
                    if !all.secrets.is_empty() {
                        let held = all.secrets.iter().filter_map(lease_ref).collect();
                        let _ = self.release(held).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(all)
    }

    async fn fetch_call(&self, names: Vec<String>) -> Result<pb::FetchResponse, ClientError> {
        let (req, request_id) = self.request(pb::FetchRequest {
            role: self.role.clone(),
            names,
            ttl_seconds: self.ttl_seconds,
        })?;
        let r = self.inner.clone().fetch(req).await;
        Ok(
            r.map_err(|status| ClientError::Status { status, request_id })?
                .into_inner(),
        )
    }

    /// Renews `leases`, at most [`NAMES_PER_CALL`] per call.
    pub async fn renew(
        &self,
        leases: Vec<pb::LeaseRef>,
    ) -> Result<Vec<pb::RenewedLease>, ClientError> {
        let mut renewed = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(NAMES_PER_CALL) {
            let (req, request_id) = self.request(pb::RenewRequest {
                role: self.role.clone(),
                leases: chunk.to_vec(),
                ttl_seconds: self.ttl_seconds,
            })?;
            let r = self.inner.clone().renew(req).await;
            renewed.extend(
                r.map_err(|status| ClientError::Status { status, request_id })?
                    .into_inner()
                    .leases,
            );
        }
        Ok(renewed)
    }

    /// Ends these leases now (at most [`NAMES_PER_CALL`] per call); returns
    /// how many the broker released.
    pub async fn release(&self, leases: Vec<pb::LeaseRef>) -> Result<u32, ClientError> {
        let mut released = 0;
        for chunk in leases.chunks(NAMES_PER_CALL) {
            let (req, request_id) = self.request(pb::ReleaseRequest {
                role: self.role.clone(),
                leases: chunk.to_vec(),
            })?;
            let r = self.inner.clone().release(req).await;
            released += r
                .map_err(|status| ClientError::Status { status, request_id })?
                .into_inner()
                .released;
        }
        Ok(released)
    }

    /// Opens a watch stream on at most [`NAMES_PER_CALL`] names; it
    /// outlives the per-request timeout.
    pub async fn watch(
        &self,
        names: Vec<String>,
    ) -> Result<tonic::Streaming<pb::WatchEvent>, ClientError> {
        let (req, request_id) = self.request(pb::WatchRequest {
            role: self.role.clone(),
            names,
        })?;
        let r = self.inner.clone().watch(req).await;
        Ok(
            r.map_err(|status| ClientError::Status { status, request_id })?
                .into_inner(),
        )
    }
}

fn lease_ref(s: &pb::Secret) -> Option<pb::LeaseRef> {
    s.lease.as_ref().map(|l| pb::LeaseRef {
        name: s.name.clone(),
        version: s.version,
        lease_id: l.lease_id.clone(),
    })
}
