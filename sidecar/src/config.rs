//! Sidecar configuration: TOML, strict, validated at start. Every key is
//! documented in `examples/sidecar.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::writer::validate_file_name;

/// A configuration problem; the message names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    broker_url: String,
    ca_file: PathBuf,
    tls_server_name: Option<String>,
    token_file: PathBuf,
    #[serde(default)]
    role: String,
    dir: PathBuf,
    #[serde(default)]
    allow_non_tmpfs: bool,
    group: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default = "yes")]
    remove_on_exit: bool,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    retry_max: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    health_listen: Option<String>,
    secrets: Vec<RawSecret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
    file: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Validated sidecar configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port` of the broker.
    pub broker_url: String,
    /// The CA that signed the broker's certificate; the only one trusted.
    pub ca_file: PathBuf,
    /// Name to verify in the broker's certificate when it differs from the URL's host.
    pub tls_server_name: Option<String>,
    /// The projected service-account token; re-read at every call (kubelet rotates it).
    pub token_file: PathBuf,
    /// Role to log in as; empty lets the broker pick the only matching one.
    pub role: String,
    pub dir: PathBuf,
    pub allow_non_tmpfs: bool,
    /// Group that may read the files (mode 0440); usually the pod's fsGroup.
    pub group: Option<u32>,
    /// Lease TTL to ask for; `None` takes the role's default.
    pub ttl: Option<Duration>,
    /// Remove the files when the sidecar stops (not in `once` mode).
    pub remove_on_exit: bool,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub request_timeout: Duration,
    /// Local HTTP port for `/healthz` and `/readyz` (probes); off when unset.
    pub health_listen: Option<std::net::SocketAddr>,
    pub secrets: Vec<SecretSpec>,
}

/// One secret to keep fresh and the file it lands in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    pub file: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let err = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        if !raw.broker_url.starts_with("https://") {
            return Err(err(
                "broker_url",
                "must be an https:// URL (TLS is required)".into(),
            ));
        }
        if raw.secrets.is_empty() {
            return Err(err("secrets", "list at least one [[secrets]] entry".into()));
        }
        if raw.retry_initial.is_zero() || raw.retry_initial > raw.retry_max {
            return Err(err(
                "retry_initial",
                "must be above zero and at most retry_max".into(),
            ));
        }
        if raw.ttl.is_some_and(|t| t < Duration::from_secs(1)) {
            return Err(err("ttl", "must be at least 1s".into()));
        }
        let mut secrets: Vec<SecretSpec> = Vec::new();
        for (i, s) in raw.secrets.into_iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 253 {
                return Err(err(
                    &format!("secrets[{i}].name"),
                    "must be 1-253 bytes".into(),
                ));
            }
            let file = s
                .file
                .unwrap_or_else(|| s.name.rsplit('/').next().unwrap_or_default().to_owned());
            validate_file_name(&file)
                .map_err(|e| err(&format!("secrets[{i}].file"), e.to_string()))?;
            if secrets.iter().any(|o| o.file == file) {
                return Err(err(
                    &format!("secrets[{i}].file"),
                    format!("file {file:?} is used by two secrets"),
                ));
            }
            if secrets.iter().any(|o| o.name == s.name) {
                return Err(err(
                    &format!("secrets[{i}].name"),
                    format!("{:?} is listed twice", s.name),
                ));
            }
            secrets.push(SecretSpec { name: s.name, file });
        }
        let health_listen = match raw.health_listen {
            None => None,
            Some(a) => Some(a.parse().map_err(|e| {
                err(
                    "health_listen",
                    format!("not an address like 127.0.0.1:8099: {e}"),
                )
            })?),
        };
        Ok(Config {
            health_listen,
            broker_url: raw.broker_url,
            ca_file: resolve(raw.ca_file),
            tls_server_name: raw.tls_server_name,
            token_file: resolve(raw.token_file),
            role: raw.role,
            dir: resolve(raw.dir),
            allow_non_tmpfs: raw.allow_non_tmpfs,
            group: raw.group,
            ttl: raw.ttl,
            remove_on_exit: raw.remove_on_exit,
            retry_initial: raw.retry_initial,
            retry_max: raw.retry_max,
            request_timeout: raw.request_timeout,
            secrets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_valid() {
        let cfg = Config::parse(
            include_str!("../../examples/sidecar.toml"),
            Path::new("/x/sidecar.toml"),
        )
        .unwrap();
        assert!(!cfg.secrets.is_empty());
    }

    const GOOD: &str = r#"
broker_url = "https://broker:8443"
ca_file = "ca.crt"
token_file = "/var/run/token"
dir = "/secrets"
[[secrets]]
name = "payments/db-password"
"#;

    #[test]
    fn defaults_and_errors() {
        let cfg = Config::parse(GOOD, Path::new("/etc/sc/s.toml")).unwrap();
        assert_eq!(cfg.secrets[0].file, "db-password");
        assert_eq!(cfg.ca_file, Path::new("/etc/sc/ca.crt"));
        let bad = |from: &str, to: &str| {
            Config::parse(&GOOD.replace(from, to), Path::new("s.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("https://broker", "http://broker").contains("`broker_url`"));
        assert!(
            bad(
                "name = \"payments/db-password\"",
                "name = \"x\"\nfile = \"../x\""
            )
            .contains("`secrets[0].file`")
        );
        assert!(bad("dir =", "dri =").contains("dri"));
    }
}
