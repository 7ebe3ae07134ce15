//! `[vault]` in the broker's config: where Vault (or OpenBao) is, how the
//! broker logs in with its own identity, and which broker secrets come from
//! it. Every key is documented in `examples/broker.toml`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::backend::validate_secret_name;
use crate::config_check::{ConfigError, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVault {
    address: String,
    ca_file: Option<PathBuf>,
    namespace: Option<String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_poll", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_max_stale", with = "humantime_serde")]
    max_stale: Duration,
    auth: RawAuth,
    #[serde(default)]
    secrets: Vec<RawMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    method: String,
    mount: Option<String>,
    token_file: Option<PathBuf>,
    role_id: Option<String>,
    secret_id_file: Option<PathBuf>,
    role: Option<String>,
    jwt_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    name: String,
    kind: String,
    mount: String,
    path: Option<String>,
    key: Option<String>,
    role: Option<String>,
    common_name: Option<String>,
    #[serde(default)]
    alt_names: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_max_stale() -> Duration {
    Duration::from_secs(3600)
}

/// Validated `[vault]`.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// `http(s)://host:port`, without `/v1`.
    pub address: String,
    pub ca_file: Option<PathBuf>,
    /// Sent as `X-Vault-Namespace` (Vault Enterprise, OpenBao namespaces).
    pub namespace: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How often each KV path is read (±10% jitter), however many pods read it.
    pub poll_interval: Duration,
    /// How long a KV value is served after the last good read while Vault fails.
    pub max_stale: Duration,
    pub auth: VaultAuth,
    pub secrets: Vec<Mapping>,
}

/// How the broker logs in to Vault with its own identity.
#[derive(Debug, Clone)]
pub enum VaultAuth {
    /// A token read from a file (re-read when it can no longer be renewed).
    Token { token_file: PathBuf },
    /// AppRole: a role ID and a secret ID from a file.
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    /// The `jwt` auth method with the broker's own service-account token.
    Jwt {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
    /// The `kubernetes` auth method with the broker's own service-account token.
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

impl VaultAuth {
    /// The method's name, for logs and errors.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Token { .. } => "token",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Jwt { .. } => "jwt",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// One broker secret served from Vault.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The broker secret name (granted by roles like any other).
    pub name: String,
    /// The secrets engine's mount, e.g. `secret`, `database`, `pki`.
    pub mount: String,
    pub kind: MappingKind,
}

#[derive(Debug, Clone)]
pub enum MappingKind {
    /// A KV v2 secret; its version is the broker version. `key`: serve one
    /// field instead of the whole map (as JSON).
    Kv {
        path: String,
        key: Option<String>,
        /// This path's read interval (default: `vault.poll_interval`).
        poll_interval: Duration,
    },
    /// Database engine credentials, one set per pod, with a Vault lease.
    Database { role: String },
    /// A PKI certificate, key and CA chain per pod.
    Pki {
        role: String,
        common_name: String,
        alt_names: Vec<String>,
        ttl: Option<Duration>,
    },
}

impl Mapping {
    /// Where the secret lives in Vault, for errors and logs.
    pub fn location(&self) -> String {
        match &self.kind {
            MappingKind::Kv { path, key, .. } => match key {
                Some(k) => format!("kv {}/{path} key {k:?}", self.mount),
                None => format!("kv {}/{path}", self.mount),
            },
            MappingKind::Database { role } => format!("{}/creds/{role}", self.mount),
            MappingKind::Pki { role, .. } => format!("{}/issue/{role}", self.mount),
        }
    }

    /// Whether every pod gets its own credential (with an upstream lease).
    pub fn is_dynamic(&self) -> bool {
        !matches!(self.kind, MappingKind::Kv { .. })
    }
}

/// Checks a Vault mount, path or role: it goes into a URL path, so only
/// `A-Z a-z 0-9 . _ -` in `/`-separated segments, none empty, `.` or `..`.
fn vault_path(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 512 {
        return Err("must be 1-512 characters".into());
    }
    for seg in s.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(format!(
                "{s:?} has an empty, '.' or '..' segment (no leading or trailing '/')"
            ));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "{s:?} contains {c:?}; use A-Z, a-z, 0-9, '.', '_', '-' and '/'"
            ));
        }
    }
    Ok(())
}

/// The placeholders a PKI `common_name` or `alt_names` entry may use.
pub const PKI_PLACEHOLDERS: [&str; 3] = ["{namespace}", "{service_account}", "{pod}"];

fn check_placeholders(s: &str) -> Result<(), String> {
    let mut rest = s.to_owned();
    for p in PKI_PLACEHOLDERS {
        rest = rest.replace(p, "x");
    }
    if rest.contains(['{', '}']) {
        return Err(format!(
            "{s:?} has an unknown placeholder; use {}",
            PKI_PLACEHOLDERS.join(", ")
        ));
    }
    if rest.is_empty() || rest.len() > 253 {
        return Err("must be 1-253 characters".into());
    }
    Ok(())
}

pub(crate) fn validate(
    v: &Validator<'_>,
    raw: RawVault,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<VaultConfig, ConfigError> {
    let address = raw.address.trim_end_matches('/').to_owned();
    if !(address.starts_with("https://") || address.starts_with("http://")) {
        return Err(v.err(
            "vault.address",
            "must be an https:// (or http:// for a local dev server) URL",
        ));
    }
    if address
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .is_empty()
    {
        return Err(v.err("vault.address", "has no host"));
    }
    if let Some(ns) = &raw.namespace {
        vault_path(ns).map_err(|m| v.err("vault.namespace", m))?;
    }
    let timeout = v.bounded(
        "vault.timeout",
        raw.timeout,
        Duration::from_millis(100),
        Duration::from_secs(300),
    )?;
    let poll_interval = v.bounded(
        "vault.poll_interval",
        raw.poll_interval,
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
    )?;
    let max_stale = v.bounded(
        "vault.max_stale",
        raw.max_stale,
        Duration::ZERO,
        Duration::from_secs(7 * 24 * 3600),
    )?;

    let a = raw.auth;
    let mount = |default: &str| -> Result<String, ConfigError> {
        let m = a.mount.clone().unwrap_or_else(|| default.to_owned());
        vault_path(&m).map_err(|e| v.err("vault.auth.mount", e))?;
        Ok(m)
    };
    let need = |value: Option<PathBuf>, key: &str, method: &str| {
        value.map(&resolve).ok_or_else(|| {
            v.err(
                &format!("vault.auth.{key}"),
                format!("method {method:?} needs {key}"),
            )
        })
    };
    let unused = |present: bool, key: &str, method: &str| {
        if present {
            Err(v.err(
                &format!("vault.auth.{key}"),
                format!("not used by method {method:?}"),
            ))
        } else {
            Ok(())
        }
    };
    let role = |method: &str| {
        let r = a.role.clone().ok_or_else(|| {
            v.err(
                "vault.auth.role",
                format!("method {method:?} needs role (the Vault auth role)"),
            )
        })?;
        vault_path(&r).map_err(|e| v.err("vault.auth.role", e))?;
        Ok::<_, ConfigError>(r)
    };
    let auth = match a.method.as_str() {
        "token" => {
            unused(a.mount.is_some(), "mount", "token")?;
            unused(a.role.is_some() || a.role_id.is_some(), "role", "token")?;
            unused(
                a.jwt_file.is_some() || a.secret_id_file.is_some(),
                "jwt_file",
                "token",
            )?;
            VaultAuth::Token {
                token_file: need(a.token_file.clone(), "token_file", "token")?,
            }
        }
        "approle" => {
            unused(a.token_file.is_some(), "token_file", "approle")?;
            unused(
                a.jwt_file.is_some() || a.role.is_some(),
                "jwt_file",
                "approle",
            )?;
            let role_id = a
                .role_id
                .clone()
                .filter(|r| !r.trim().is_empty())
                .ok_or_else(|| v.err("vault.auth.role_id", "method \"approle\" needs role_id"))?;
            VaultAuth::AppRole {
                mount: mount("approle")?,
                role_id,
                secret_id_file: need(a.secret_id_file.clone(), "secret_id_file", "approle")?,
            }
        }
        m @ ("jwt" | "kubernetes") => {
            unused(a.token_file.is_some(), "token_file", m)?;
            unused(
                a.role_id.is_some() || a.secret_id_file.is_some(),
                "role_id",
                m,
            )?;
            let jwt_file = a.jwt_file.clone().map(&resolve).unwrap_or_else(|| {
                PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
            });
            let (mount, role) = (mount(m)?, role(m)?);
            if m == "jwt" {
                VaultAuth::Jwt {
                    mount,
                    role,
                    jwt_file,
                }
            } else {
                VaultAuth::Kubernetes {
                    mount,
                    role,
                    jwt_file,
                }
            }
        }
        other => {
            return Err(v.err(
                "vault.auth.method",
                format!("{other:?}: use token, approle, jwt or kubernetes"),
            ));
        }
    };

    let mut secrets: Vec<Mapping> = Vec::new();
    for (i, m) in raw.secrets.into_iter().enumerate() {
        let key = |f: &str| format!("vault.secrets[{i}].{f}");
        validate_secret_name(&m.name).map_err(|e| v.err(&key("name"), e))?;
        if secrets.iter().any(|o| o.name == m.name) {
            return Err(v.err(&key("name"), format!("{:?} is mapped twice", m.name)));
        }
        vault_path(&m.mount).map_err(|e| v.err(&key("mount"), e))?;
        let unused = |present: bool, f: &str| {
            if present {
                Err(v.err(&key(f), format!("not used by kind {:?}", m.kind)))
            } else {
                Ok(())
            }
        };
        let role = || -> Result<String, ConfigError> {
            let r = m
                .role
                .clone()
                .ok_or_else(|| v.err(&key("role"), format!("kind {:?} needs role", m.kind)))?;
            vault_path(&r).map_err(|e| v.err(&key("role"), e))?;
            Ok(r)
        };
        let kind = match m.kind.as_str() {
            "kv" => {
                unused(m.role.is_some(), "role")?;
                unused(
                    m.common_name.is_some() || !m.alt_names.is_empty(),
                    "common_name",
                )?;
                unused(m.ttl.is_some(), "ttl")?;
                let path = m
                    .path
                    .clone()
                    .ok_or_else(|| v.err(&key("path"), "kind \"kv\" needs path"))?;
                vault_path(&path).map_err(|e| v.err(&key("path"), e))?;
                if m.key.as_ref().is_some_and(|k| k.is_empty()) {
                    return Err(v.err(&key("key"), "must not be empty"));
                }
                let poll_interval = match m.poll_interval {
                    None => poll_interval,
                    Some(p) => v.bounded(
                        &key("poll_interval"),
                        p,
                        Duration::from_millis(100),
                        Duration::from_secs(24 * 3600),
                    )?,
                };
                MappingKind::Kv {
                    path,
                    key: m.key.clone(),
                    poll_interval,
                }
            }
            "database" => {
                unused(m.poll_interval.is_some(), "poll_interval")?;
                unused(m.path.is_some(), "path")?;
                unused(m.key.is_some(), "key")?;
                unused(
                    m.common_name.is_some() || !m.alt_names.is_empty(),
                    "common_name",
                )?;
                unused(m.ttl.is_some(), "ttl")?;
                MappingKind::Database { role: role()? }
            }
            "pki" => {
                unused(m.poll_interval.is_some(), "poll_interval")?;
                unused(m.path.is_some(), "path")?;
                unused(m.key.is_some(), "key")?;
                let common_name = m
                    .common_name
                    .clone()
                    .ok_or_else(|| v.err(&key("common_name"), "kind \"pki\" needs common_name"))?;
                check_placeholders(&common_name).map_err(|e| v.err(&key("common_name"), e))?;
                for a in &m.alt_names {
                    check_placeholders(a).map_err(|e| v.err(&key("alt_names"), e))?;
                }
                if let Some(ttl) = m.ttl {
                    v.bounded(
                        &key("ttl"),
                        ttl,
                        Duration::from_secs(10),
                        Duration::from_secs(365 * 24 * 3600),
                    )?;
                }
                MappingKind::Pki {
                    role: role()?,
                    common_name,
                    alt_names: m.alt_names.clone(),
                    ttl: m.ttl,
                }
            }
            other => {
                return Err(v.err(&key("kind"), format!("{other:?}: use kv, database or pki")));
            }
        };
        secrets.push(Mapping {
            name: m.name,
            mount: m.mount,
            kind,
        });
    }
    Ok(VaultConfig {
        address,
        ca_file: raw.ca_file.map(resolve),
        namespace: raw.namespace,
        timeout,
        poll_interval,
        max_stale,
        auth,
        secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_paths() {
        for ok in ["secret", "a/b-c/d_e.f", "database"] {
            assert!(vault_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "..", "a/../b", "a b", "a?x=1", "a#b", "%2e",
        ] {
            assert!(vault_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn placeholders() {
        assert!(check_placeholders("{pod}.{namespace}.pod.cluster.local").is_ok());
        assert!(check_placeholders("{service_account}.svc").is_ok());
        assert!(check_placeholders("{podname}.x").is_err());
        assert!(check_placeholders("{").is_err());
    }
}
