//! A real AWS API emulator for the AWS tests: `moto_server` (PyPI's
//! `moto[server]`) on a free loopback port, in memory, behind a small
//! counting proxy, so tests count what reached "AWS" (STS and Secrets
//! Manager calls by action) from outside the broker.
//!
//! moto does not verify web-identity tokens: what the tests prove about
//! tokens is the broker's own verification (a refused token never reaches
//! the proxy).
//!
//! The proxy (a [`FaultProxy`]) can also stand in for an AWS outage
//! ([`Fault`]): an endpoint that drops connections, answers too slowly, or
//! answers every call with AWS's own 500 error, while moto itself keeps its
//! state.
//!
//! The server comes from `~/.cache/secrets-broker-test/moto-venv` (the test
//! command installs it there and exports `SECRETS_BROKER_MOTO`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;

pub use crate::proxy::Fault;
use crate::proxy::FaultProxy;
use crate::{Proc, free_port, wait_for};

/// The account moto answers for.
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

/// The `moto_server` program: `SECRETS_BROKER_MOTO`, else the test
/// command's venv.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SECRETS_BROKER_MOTO") {
        return Ok(PathBuf::from(p));
    }
    let p = venv().join("bin/moto_server");
    if p.exists() {
        return Ok(p);
    }
    anyhow::bail!(
        "moto is not installed: run `bash scripts/test.sh` (it installs pip's moto[server] into {}) or set SECRETS_BROKER_MOTO",
        venv().display()
    )
}

/// The venv moto lives in; its `bin/python` has boto3 (an unmodified AWS SDK).
pub fn venv() -> PathBuf {
    if let Some(p) = std::env::var_os("SECRETS_BROKER_MOTO") {
        let p = PathBuf::from(p);
        if let Some(v) = p.parent().and_then(|b| b.parent()) {
            return v.to_owned();
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cache = std::env::var_os("SECRETS_BROKER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/secrets-broker-test"));
    cache.join("moto-venv")
}

/// Calls that reached moto, by action (`AssumeRole`, `GetSecretValue`, ...).
pub type Counts = Arc<Mutex<HashMap<String, u64>>>;

/// A running moto server and its counting proxy.
pub struct Moto {
    /// moto itself (for the tests' own setup calls, not counted).
    pub moto_port: u16,
    /// The counting proxy in front of it: what the broker is pointed at.
    pub port: u16,
    counts: Counts,
    proxy: FaultProxy,
    _proc: Proc,
    pub rt: tokio::runtime::Runtime,
}

impl Moto {
    pub fn start(log: PathBuf) -> Result<Moto> {
        let moto_port = free_port();
        let proc = Proc::spawn(
            Command::new(binary()?).args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]),
            log,
        )?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        wait_for("moto answering", Duration::from_secs(60), || {
            rt.block_on(async {
                http.get(format!("http://127.0.0.1:{moto_port}/moto-api/"))
                    .send()
                    .await
            })
            .ok()
            .map(|_| ())
        })
        .with_context(|| format!("moto log:\n{}", proc.log_text()))?;
        let counts = Counts::default();
        let counted = counts.clone();
        let proxy = FaultProxy::start(
            &rt,
            moto_port,
            move |parts, body| count(&counted, parts, body),
            internal_failure,
        )?;
        Ok(Moto {
            moto_port,
            port: proxy.port,
            counts,
            proxy,
            _proc: proc,
            rt,
        })
    }

    /// What the proxy does from now on, to calls on connections already
    /// open and new ones alike.
    pub fn set_fault(&self, fault: Fault) {
        self.proxy.set_fault(fault);
    }

    /// The endpoint the broker uses (through the counting proxy).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// moto's own endpoint (setup calls that must not be counted).
    pub fn direct(&self) -> String {
        format!("http://127.0.0.1:{}", self.moto_port)
    }

    /// How many `action` calls reached moto through the proxy; `Action:SecretId`
    /// counts the calls on one secret.
    pub fn calls(&self, action: &str) -> u64 {
        self.counts
            .lock()
            .unwrap()
            .get(action)
            .copied()
            .unwrap_or_default()
    }

    /// Every STS call that reached moto through the proxy.
    pub fn sts_calls(&self) -> u64 {
        [
            "AssumeRole",
            "AssumeRoleWithWebIdentity",
            "GetCallerIdentity",
            "GetSessionToken",
        ]
        .iter()
        .map(|a| self.calls(a))
        .sum()
    }

    /// A Secrets Manager client on moto directly (static test credentials).
    pub fn secretsmanager(&self) -> aws_sdk_secretsmanager::Client {
        let conf = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
            .region(aws_sdk_secretsmanager::config::Region::new(REGION))
            .endpoint_url(self.direct())
            .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .build();
        aws_sdk_secretsmanager::Client::from_conf(conf)
    }

    /// An STS client on moto directly with the given credentials.
    pub fn sts_with(&self, key: &str, secret: &str, token: Option<&str>) -> aws_sdk_sts::Client {
        let conf = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(REGION))
            .endpoint_url(self.direct())
            .credentials_provider(aws_sdk_sts::config::Credentials::new(
                key,
                secret,
                token.map(str::to_owned),
                None,
                "test",
            ))
            .build();
        aws_sdk_sts::Client::from_conf(conf)
    }

    /// Creates a secret with a string value.
    pub fn create_secret(&self, name: &str, value: &str) -> Result<()> {
        let c = self.secretsmanager();
        self.rt.block_on(async {
            c.create_secret()
                .name(name)
                .secret_string(value)
                .send()
                .await
        })?;
        Ok(())
    }

    /// Puts a new `AWSCURRENT` version (the way to rotate without a Lambda).
    pub fn put_secret(&self, name: &str, value: &str) -> Result<String> {
        let c = self.secretsmanager();
        let out = self.rt.block_on(async {
            c.put_secret_value()
                .secret_id(name)
                .secret_string(value)
                .send()
                .await
        })?;
        Ok(out.version_id().unwrap_or_default().to_owned())
    }

    /// The ARN `GetCallerIdentity` returns for these credentials.
    pub fn caller_arn(&self, key: &str, secret: &str, token: &str) -> Result<String> {
        let c = self.sts_with(key, secret, Some(token));
        let out = self
            .rt
            .block_on(async { c.get_caller_identity().send().await })?;
        Ok(out.arn().unwrap_or_default().to_owned())
    }
}

/// The action of an AWS request: `X-Amz-Target: service.Action` (JSON
/// protocols) or `Action=` in the query or form body (query protocols).
fn action(headers: &hyper::HeaderMap, query: &str, body: &[u8]) -> String {
    if let Some(t) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return t.rsplit('.').next().unwrap_or(t).to_owned();
    }
    let form = String::from_utf8_lossy(body);
    for part in query.split('&').chain(form.split('&')) {
        if let Some(a) = part.strip_prefix("Action=") {
            return a.to_owned();
        }
    }
    "other".into()
}

/// Counts a call that reached the proxy by action and, for the JSON
/// protocols (which name their target), by action and secret too.
fn count(counts: &Counts, parts: &hyper::http::request::Parts, body: &Bytes) {
    let query = parts.uri.query().unwrap_or_default();
    let act = action(&parts.headers, query, body);
    let mut c = counts.lock().unwrap();
    if let Some(id) = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["SecretId"].as_str().map(str::to_owned))
    {
        *c.entry(format!("{act}:{id}")).or_default() += 1;
    }
    *c.entry(act).or_default() += 1;
}

/// AWS's answer to a call it failed on its side (`500 InternalFailure`), in
/// the JSON protocols' error shape: `x-amzn-ErrorType` and `__type` name
/// the error; SDKs retry it. (Secrets Manager's shape; STS, a query
/// protocol, would not parse it.)
fn internal_failure() -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(500)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-errortype", "InternalFailure")
        .body(Full::new(Bytes::from_static(
            br#"{"__type":"InternalFailure","message":"We encountered an internal error. Please try again."}"#,
        )))
        .unwrap()
}
