//! The admin API as brokerctl calls it: one HTTPS client with the caller's
//! certificate, and what a failure means for the exit code.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::Cli;

pub(crate) struct Api {
    client: reqwest::Client,
    base: reqwest::Url,
}

pub(crate) enum Failure {
    /// Local problem (files, usage): exit 2.
    Local(String),
    /// The API answered with an error or could not be reached: exit 1.
    Remote(String),
}

impl Api {
    pub(crate) fn new(cli: &Cli) -> Result<Api, Failure> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| Failure::Local(format!("cannot read {}: {e}", p.display())))
        };
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .https_only(true);
        if let Some(ca) = &cli.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
                .map_err(|e| Failure::Local(format!("--ca {}: {e}", ca.display())))?;
            builder = builder.tls_certs_only(certs);
        }
        match (&cli.cert, &cli.key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend_from_slice(&zeroize::Zeroizing::new(read(key)?));
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| Failure::Local(format!("--cert/--key: {e}")))?;
                zeroize::Zeroize::zeroize(&mut pem);
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err(Failure::Local("give both --cert and --key".into())),
        }
        let client = builder
            .build()
            .map_err(|e| Failure::Local(format!("HTTPS client: {e}")))?;
        let base = reqwest::Url::parse(cli.server.trim_end_matches('/'))
            .ok()
            .filter(|u| u.scheme() == "https" && !u.cannot_be_a_base())
            .ok_or_else(|| {
                Failure::Local(format!("--server {:?} is not an https:// URL", cli.server))
            })?;
        Ok(Api { client, base })
    }

    /// The URL of an API path given as segments; each segment is
    /// percent-encoded, so a name can never add a query, a fragment or
    /// another path (`a?b=1`, `x/../../revocations/…`).
    pub(crate) fn url(&self, segments: &[&str]) -> Result<reqwest::Url, Failure> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Failure::Local(format!("--server {} cannot take a path", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req = self.client.request(method, self.url(path)?).query(query);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| {
            Failure::Remote(format!(
                "cannot reach {}: {}",
                self.base.as_str().trim_end_matches('/'),
                secrets_broker::error_chain::error_chain(&e)
            ))
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            return Err(Failure::Remote(format!("{status}: {message}")));
        }
        Ok(value)
    }
}
