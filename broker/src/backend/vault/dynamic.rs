//! Dynamic secrets: database credentials and PKI certificates issued per
//! pod, their Vault leases renewed with the pod's lease and revoked when it
//! ends.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretSlice;
use serde_json::{Value, json};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::config::MappingKind;
use super::{Upstream, Vault, VaultError, wipe_json};
use crate::backend::SecretVersion;
use crate::clock::{unix_now, unix_now_ms};
use crate::identity::Identity;

impl Vault {
    /// Issues a credential of a dynamic mapping for one pod.
    pub async fn issue(
        &self,
        name: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<(SecretVersion, Upstream), VaultError> {
        let m = &self.cfg.secrets[self.by_name[name]];
        let location = m.location();
        let version = unix_now_ms();
        match &m.kind {
            MappingKind::Kv { .. } => unreachable!("issue on a kv mapping"),
            MappingKind::Database { role } => {
                let path = format!("{}/creds/{role}", m.mount);
                let body = self
                    .call(&location, |c| {
                        raw(c, reqwest::Method::GET, path.clone(), None)
                    })
                    .await?;
                let unexpected = |what: &str| VaultError::Unexpected {
                    location: location.clone(),
                    message: format!("no {what} in the answer"),
                };
                let lease_id = body["lease_id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| unexpected("lease_id"))?
                    .to_owned();
                let duration = body["lease_duration"]
                    .as_i64()
                    .ok_or_else(|| unexpected("lease_duration"))?;
                #[derive(serde::Serialize)]
                struct Creds<'a> {
                    username: &'a str,
                    password: &'a str,
                }
                let field = |k: &str| body["data"][k].as_str();
                let creds = match (field("username"), field("password")) {
                    (Some(username), Some(password)) => {
                        serde_json::to_vec(&Creds { username, password }).unwrap_or_default()
                    }
                    _ => return Err(unexpected("data.username and data.password")),
                };
                let data = zeroize::Zeroizing::new(creds);
                let mut body = body;
                wipe_json(&mut body);
                Ok((
                    SecretVersion {
                        name: name.to_owned(),
                        version,
                        value: SecretSlice::from(data.to_vec()),
                    },
                    Upstream {
                        kind: "database",
                        mount: m.mount.clone(),
                        id: lease_id,
                        expires_at: unix_now() + duration,
                    },
                ))
            }
            MappingKind::Pki {
                role,
                common_name,
                alt_names,
                ttl: cert_ttl,
            } => {
                let fill = |t: &str| -> Result<String, VaultError> {
                    let pod = id.pod_name.as_deref();
                    if t.contains("{pod}") && pod.is_none() {
                        return Err(VaultError::Unexpected {
                            location: location.clone(),
                            message: "common_name uses {pod} but the token names no pod".into(),
                        });
                    }
                    Ok(t.replace("{namespace}", &id.namespace)
                        .replace("{service_account}", &id.service_account)
                        .replace("{pod}", pod.unwrap_or_default()))
                };
                let cn = fill(common_name)?;
                let alts = alt_names
                    .iter()
                    .map(|a| fill(a))
                    .collect::<Result<Vec<_>, _>>()?;
                let cert_ttl = cert_ttl.unwrap_or(ttl);
                let resp = self
                    .call(&location, |c| {
                        let (cn, alts) = (cn.clone(), alts.join(","));
                        let mount = m.mount.clone();
                        let role = role.clone();
                        async move {
                            let mut opts =
                                vaultrs::api::pki::requests::GenerateCertificateRequest::builder();
                            opts.common_name(cn).ttl(format!("{}s", cert_ttl.as_secs()));
                            if !alts.is_empty() {
                                opts.alt_names(alts);
                            }
                            vaultrs::pki::cert::generate(&*c, &mount, &role, Some(&mut opts)).await
                        }
                    })
                    .await?;
                let expires_at = resp
                    .expiration
                    .map(|e| e as i64)
                    .unwrap_or_else(|| unix_now() + cert_ttl.as_secs() as i64);
                let value = zeroize::Zeroizing::new(
                    serde_json::to_vec(&json!({
                        "certificate": resp.certificate,
                        "private_key": resp.private_key,
                        "private_key_type": resp.private_key_type,
                        "issuing_ca": resp.issuing_ca,
                        "ca_chain": resp.ca_chain.clone().unwrap_or_default(),
                        "serial_number": resp.serial_number,
                        "expiration": expires_at,
                    }))
                    .unwrap_or_default(),
                );
                let serial = resp.serial_number.clone();
                drop(zeroize::Zeroizing::new(resp.private_key));
                Ok((
                    SecretVersion {
                        name: name.to_owned(),
                        version,
                        value: SecretSlice::from(value.to_vec()),
                    },
                    Upstream {
                        kind: "pki",
                        mount: m.mount.clone(),
                        id: serial,
                        expires_at,
                    },
                ))
            }
        }
    }

    /// Extends an upstream lease by `ttl`; returns when it now ends. PKI
    /// certificates cannot be extended: their expiry is returned as is.
    pub async fn renew_upstream(&self, up: &Upstream, ttl: Duration) -> Result<i64, VaultError> {
        if up.kind != "database" {
            return Ok(up.expires_at);
        }
        let body = json!({ "lease_id": up.id, "increment": ttl.as_secs() });
        let answer = self
            .call("sys/leases/renew", |c| {
                raw(
                    c,
                    reqwest::Method::PUT,
                    "sys/leases/renew".into(),
                    Some(body.clone()),
                )
            })
            .await?;
        let duration = answer["lease_duration"].as_i64().unwrap_or(0);
        Ok(unix_now() + duration)
    }

    /// Ends an upstream credential: revokes the Vault lease, or the certificate.
    pub async fn revoke_upstream(
        &self,
        kind: &str,
        mount: &str,
        id: &str,
    ) -> Result<(), VaultError> {
        match kind {
            "database" => {
                let body = json!({ "lease_id": id });
                let result = self
                    .call("sys/leases/revoke", |c| {
                        raw(
                            c,
                            reqwest::Method::PUT,
                            "sys/leases/revoke".into(),
                            Some(body.clone()),
                        )
                    })
                    .await;
                match result {
                    // Already expired and gone in Vault: nothing left to revoke.
                    Err(VaultError::NotFound { .. }) => Ok(()),
                    Err(VaultError::Api {
                        code: 400, message, ..
                    }) if message.contains("invalid lease") => Ok(()),
                    other => other.map(|_| ()),
                }
            }
            "pki" => {
                let location = format!("{mount}/revoke");
                self.call(&location, |c| {
                    let (mount, id) = (mount.to_owned(), id.to_owned());
                    async move { vaultrs::pki::cert::revoke(&*c, &mount, &id).await }
                })
                .await
                .map(|_| ())
            }
            // AWS STS credentials cannot be revoked: they end at their expiry.
            "sts" => Ok(()),
            other => Err(VaultError::Unexpected {
                location: "revoke".into(),
                message: format!("unknown upstream kind {other:?}"),
            }),
        }
    }
}

/// A request vaultrs has no endpoint for (database credentials keep their
/// `lease_id` here; `sys/leases`), on the same client and token.
async fn raw(
    c: Arc<VaultClient>,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let url = format!("{}/v1/{path}", c.http.base.trim_end_matches('/'));
    let mut req = c
        .http
        .http
        .request(method, url)
        .header("X-Vault-Token", c.middle.token.as_str())
        .header("X-Vault-Request", "true");
    if let Some(ns) = &c.middle.namespace {
        req = req.header("X-Vault-Namespace", ns.as_str());
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| ClientError::RestClientError {
        source: rustify::errors::ClientError::RequestError {
            source: e.into(),
            url: path.clone(),
            method: "request".into(),
        },
    })?;
    let code = resp.status().as_u16();
    let text = resp.bytes().await.unwrap_or_default();
    if !(200..300).contains(&code) {
        let errors = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|v| v["errors"].as_array().cloned())
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        return Err(ClientError::APIError { code, errors });
    }
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&text).map_err(|source| ClientError::JsonParseError { source })
}
