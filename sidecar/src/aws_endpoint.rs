//! The AWS container credentials endpoint on loopback: the protocol ECS and
//! EKS Pod Identity use, which every AWS SDK's default credential chain
//! reads, so an unmodified SDK in the application gets fresh credentials.
//!
//! The application's container gets
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:PORT/` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=<token_file>`. The sidecar
//! writes a random token to `token_file` (mode 0400, 0440 with `group`) at
//! start; a `GET` whose `Authorization` header equals it (compared in
//! constant time) gets the current STS credentials of `secret` as
//! `{"AccessKeyId","SecretAccessKey","Token","Expiration"}`. Anything else:
//! 401 without the header, 403 with a wrong one, 405 for other methods, 503
//! while the sidecar holds no credentials (not fetched yet, revoked, lease
//! ended). The SDKs refresh before `Expiration`; the sidecar replaces the
//! credentials at about two thirds of their life.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::local_api::Published;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAwsCredentials {
    listen: String,
    secret: String,
    token_file: PathBuf,
}

/// Validated `[aws_credentials]`.
#[derive(Debug, Clone)]
pub struct AwsCredentialsConfig {
    /// A loopback address: the endpoint is for the pod's own containers.
    pub listen: std::net::SocketAddr,
    /// The broker secret holding STS credentials (an `sts-*` AWS mapping).
    pub secret: String,
    /// Where the authorization token is written for the application.
    pub token_file: PathBuf,
}

/// Checks `[aws_credentials]`; errors are `(key, message)`.
pub(crate) fn validate(
    raw: RawAwsCredentials,
    secrets: &[crate::spec::SecretSpec],
    dir: &Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<AwsCredentialsConfig, (&'static str, String)> {
    let listen: std::net::SocketAddr = raw.listen.parse().map_err(|e| {
        (
            "aws_credentials.listen",
            format!("not an address like 127.0.0.1:8098: {e}"),
        )
    })?;
    if !listen.ip().is_loopback() {
        return Err((
            "aws_credentials.listen",
            format!(
                "{listen} is not a loopback address: the endpoint serves credentials to the pod's own containers only (AWS SDKs also accept only loopback for http://)"
            ),
        ));
    }
    if !secrets.iter().any(|s| s.name == raw.secret) {
        return Err((
            "aws_credentials.secret",
            format!(
                "{:?} is not in [[secrets]]: list it there (template_only = true if it needs no file)",
                raw.secret
            ),
        ));
    }
    let token_file = resolve(raw.token_file);
    if token_file.parent() == Some(dir) || token_file.file_name().is_none() {
        return Err((
            "aws_credentials.token_file",
            format!(
                "{} must be a file outside dir (the sidecar owns every entry of dir)",
                token_file.display()
            ),
        ));
    }
    Ok(AwsCredentialsConfig {
        listen,
        secret: raw.secret,
        token_file,
    })
}

/// A new random token, written to `path` (replacing any old one) with mode
/// 0400, or 0440 and group `gid`.
pub fn write_token(path: &Path, gid: Option<u32>) -> std::io::Result<Zeroizing<String>> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom(&mut bytes[..])?;
    let token = Zeroizing::new(hex::encode(bytes));
    let mode = if gid.is_some() { 0o440 } else { 0o400 };
    crate::writer::replace_file(path, token.as_bytes(), mode, gid)?;
    Ok(token)
}

/// Random bytes from the kernel.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[derive(Clone)]
struct EndpointState {
    published: Arc<Published>,
    secret: Arc<str>,
    token: Arc<Zeroizing<String>>,
}

/// The container-credentials JSON for a served credentials value (the
/// broker's `credential_process` shape): `SessionToken` becomes `Token`.
fn container_json(value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct In {
        access_key_id: String,
        secret_access_key: String,
        session_token: String,
        expiration: String,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Out<'a> {
        access_key_id: &'a str,
        secret_access_key: &'a str,
        token: &'a str,
        expiration: &'a str,
    }
    let mut c: In = serde_json::from_slice(value).ok()?;
    let out = serde_json::to_vec(&Out {
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        token: &c.session_token,
        expiration: &c.expiration,
    })
    .ok()?;
    zeroize::Zeroize::zeroize(&mut c.secret_access_key);
    zeroize::Zeroize::zeroize(&mut c.session_token);
    Some(Zeroizing::new(out))
}

async fn credentials(
    State(s): State<EndpointState>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "use GET\n").into_response();
    }
    let Some(given) = headers.get(axum::http::header::AUTHORIZATION) else {
        return (
            StatusCode::UNAUTHORIZED,
            "send the token of AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE as Authorization\n",
        )
            .into_response();
    };
    if !bool::from(given.as_bytes().ct_eq(s.token.as_bytes())) {
        warn!("aws credentials request with a wrong authorization token");
        return (StatusCode::FORBIDDEN, "wrong authorization token\n").into_response();
    }
    let Some(value) = s.published.value_of(&s.secret) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no credentials now (not fetched yet, or revoked); retry\n",
        )
            .into_response();
    };
    match container_json(&value) {
        Some(body) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_vec(),
        )
            .into_response(),
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the secret is not STS credentials (AccessKeyId, SecretAccessKey, SessionToken, Expiration)\n",
        )
            .into_response(),
    }
}

/// Writes the token file and serves the endpoint on `listener` until the
/// task is dropped.
pub async fn serve(
    listener: TcpListener,
    cfg: AwsCredentialsConfig,
    gid: Option<u32>,
    published: Arc<Published>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let token = write_token(&cfg.token_file, gid)?;
    let state = EndpointState {
        published,
        secret: cfg.secret.as_str().into(),
        token: Arc::new(token),
    };
    let app = Router::new().fallback(credentials).with_state(state);
    info!(listen = %cfg.listen, secret = %cfg.secret, token_file = %cfg.token_file.display(), "aws container credentials endpoint listening");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_shape() {
        let v = br#"{"Version":1,"AccessKeyId":"ASIA1","SecretAccessKey":"s3cr3t","SessionToken":"tok","Expiration":"2030-01-01T00:00:00Z"}"#;
        let out: serde_json::Value = serde_json::from_slice(&container_json(v).unwrap()).unwrap();
        assert_eq!(out["AccessKeyId"], "ASIA1");
        assert_eq!(out["SecretAccessKey"], "s3cr3t");
        assert_eq!(out["Token"], "tok");
        assert_eq!(out["Expiration"], "2030-01-01T00:00:00Z");
        assert!(container_json(b"{}").is_none());
        assert!(container_json(b"hunter2").is_none());
    }

    #[test]
    fn token_file_is_private_and_random() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let a = write_token(&p, None).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), a.as_str());
        let b = write_token(&p, None).unwrap();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.len(), 64);
    }

    #[tokio::test]
    async fn answers_only_with_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let published = Arc::new(Published::new(["aws/creds".to_owned()]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = AwsCredentialsConfig {
            listen: addr,
            secret: "aws/creds".into(),
            token_file: dir.path().join("token"),
        };
        let task = serve(listener, cfg.clone(), None, published.clone())
            .await
            .unwrap();
        let token = std::fs::read_to_string(&cfg.token_file).unwrap();
        let get = |auth: Option<String>| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let auth = auth
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            s.write_all(
                format!("GET /creds HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get(None).await.starts_with("HTTP/1.1 401"));
        assert!(get(Some("nope".into())).await.starts_with("HTTP/1.1 403"));
        assert!(get(Some(token.clone())).await.starts_with("HTTP/1.1 503"));
        let value = br#"{"Version":1,"AccessKeyId":"ASIA1","SecretAccessKey":"s3cr3t","SessionToken":"tok","Expiration":"2030-01-01T00:00:00Z"}"#;
        published.publish(
            [(
                "aws/creds".to_owned(),
                crate::local_api::Entry {
                    version: 1,
                    value: Zeroizing::new(value.to_vec()),
                    expires_at: 0,
                    received_at: 0,
                    refreshed_at: 0,
                },
            )]
            .into_iter()
            .collect(),
        );
        let ok = get(Some(token)).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("\"Token\":\"tok\""), "{ok}");
        task.abort();
    }
}
