//! Sidecar configuration: TOML, strict, validated at start. Every key is
//! documented in `examples/sidecar.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::writer::validate_file_name;

/// The environment variable that holds the whole config (TOML) when
/// `--config` is not given: how the injection webhook configures a sidecar
/// without a ConfigMap or any API call.
pub const CONFIG_ENV: &str = "SECRETS_SIDECAR_CONFIG";

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

impl ConfigError {
    /// The error for a problem `strict_toml` found in the file at `path`.
    pub fn from_toml(path: &Path, problem: crate::strict_toml::Problem) -> ConfigError {
        let path = path.to_owned();
        match problem.key {
            Some(key) => ConfigError::Invalid {
                path,
                key,
                message: problem.message,
            },
            None => ConfigError::Parse {
                path,
                message: problem.message,
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    broker_url: String,
    ca_file: Option<PathBuf>,
    ca_pem: Option<String>,
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
    #[serde(default)]
    revoke_on_shutdown: bool,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    retry_max: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    health_listen: Option<String>,
    local_api: Option<RawLocalApi>,
    aws_credentials: Option<crate::aws_endpoint::RawAwsCredentials>,
    notify: Option<RawNotify>,
    secrets: Vec<RawSecret>,
    #[serde(default)]
    templates: Vec<RawTemplate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    #[serde(default = "default_debounce", with = "humantime_serde")]
    debounce: Duration,
    signal: Option<String>,
    pid_file: Option<PathBuf>,
    process_name: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    command_timeout: Duration,
    http_post: Option<String>,
}

fn default_debounce() -> Duration {
    Duration::from_secs(1)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalApi {
    socket: PathBuf,
    #[serde(default)]
    allowed_uids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    file: String,
    source: Option<String>,
    template_file: Option<PathBuf>,
    mode: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
    file: Option<String>,
    /// Fetch the secret for templates only, without a file of its own.
    #[serde(default)]
    template_only: bool,
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

/// Most secrets one sidecar holds. The broker takes 256 names per call; the
/// sidecar splits longer lists over several calls and watch streams.
pub const MAX_SECRETS: usize = 4096;

/// Validated sidecar configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port` of the broker.
    pub broker_url: String,
    /// The CA that signed the broker's certificate; the only one trusted.
    pub ca: CaSource,
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
    /// On SIGTERM, end this pod's leases at the broker before removing the files.
    pub revoke_on_shutdown: bool,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub request_timeout: Duration,
    /// Local HTTP port for `/healthz` and `/readyz` (probes); off when unset.
    pub health_listen: Option<std::net::SocketAddr>,
    /// The local `Secrets` gRPC API on a Unix socket; off when unset.
    pub local_api: Option<LocalApiConfig>,
    /// The AWS container credentials endpoint on loopback; off when unset.
    pub aws_credentials: Option<crate::aws_endpoint::AwsCredentialsConfig>,
    /// What to tell the application after each new generation.
    pub notify: crate::notify::NotifyConfig,
    pub secrets: Vec<SecretSpec>,
    pub templates: Vec<TemplateSpec>,
}

/// Where the broker's CA comes from: exactly one of `ca_file` and `ca_pem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// A PEM file, read when the client is built.
    File(PathBuf),
    /// PEM text inline in the config (a config passed in [`CONFIG_ENV`]).
    Pem(String),
}

impl CaSource {
    /// The PEM bytes of the CA.
    pub fn read(&self) -> Result<Vec<u8>, String> {
        match self {
            CaSource::File(path) => std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display())),
            CaSource::Pem(pem) => Ok(pem.as_bytes().to_vec()),
        }
    }
}

/// One secret to keep fresh and the file it lands in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    /// `None` for a secret used by templates only.
    pub file: Option<String>,
}

/// The local API's socket and who may use it.
#[derive(Debug, Clone)]
pub struct LocalApiConfig {
    pub socket: PathBuf,
    /// UIDs allowed to call (checked with SO_PEERCRED); empty means the
    /// sidecar's own UID only.
    pub allowed_uids: Vec<u32>,
}

/// One file rendered from secrets (see [`crate::render`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub file: String,
    /// The template text (from `source`, or read from `template_file` at start).
    pub source: String,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Reads the whole config from the environment variable `var` (usually
    /// [`CONFIG_ENV`]); errors name the variable as the file.
    pub fn from_env(var: &str) -> Result<Config, ConfigError> {
        Self::from_env_value(var, std::env::var(var))
    }

    fn from_env_value(
        var: &str,
        value: Result<String, std::env::VarError>,
    ) -> Result<Config, ConfigError> {
        let name = PathBuf::from(format!("${var}"));
        let text = value.map_err(|e| ConfigError::Read {
            path: name.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{e}: pass --config FILE or set {var} to the config's TOML"),
            ),
        })?;
        Self::parse(&text, &name)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            crate::strict_toml::from_str(text).map_err(|p| ConfigError::from_toml(path, p))?;
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
        let ca = match (raw.ca_file, raw.ca_pem) {
            (Some(f), None) => CaSource::File(resolve(f)),
            (None, Some(pem)) => {
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(err(
                        "ca_pem",
                        "no \"-----BEGIN CERTIFICATE-----\" block: give the CA certificate as PEM text"
                            .into(),
                    ));
                }
                CaSource::Pem(pem)
            }
            _ => {
                return Err(err(
                    "ca_file",
                    "set exactly one of ca_file and ca_pem (the broker's CA)".into(),
                ));
            }
        };
        if raw.secrets.is_empty() {
            return Err(err("secrets", "list at least one [[secrets]] entry".into()));
        }
        if raw.secrets.len() > MAX_SECRETS {
            return Err(err(
                "secrets",
                format!(
                    "{} [[secrets]] entries; one sidecar holds at most {MAX_SECRETS} (split them over several sidecars)",
                    raw.secrets.len()
                ),
            ));
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
        let mut files: Vec<String> = Vec::new();
        for (i, s) in raw.secrets.into_iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 253 {
                return Err(err(
                    &format!("secrets[{i}].name"),
                    "must be 1-253 bytes".into(),
                ));
            }
            if secrets.iter().any(|o| o.name == s.name) {
                return Err(err(
                    &format!("secrets[{i}].name"),
                    format!("{:?} is listed twice", s.name),
                ));
            }
            let file = if s.template_only {
                if s.file.is_some() {
                    return Err(err(
                        &format!("secrets[{i}].file"),
                        "a template_only secret has no file".into(),
                    ));
                }
                None
            } else {
                let file = s
                    .file
                    .unwrap_or_else(|| s.name.rsplit('/').next().unwrap_or_default().to_owned());
                validate_file_name(&file)
                    .map_err(|e| err(&format!("secrets[{i}].file"), e.to_string()))?;
                if files.contains(&file) {
                    return Err(err(
                        &format!("secrets[{i}].file"),
                        format!("file {file:?} is used twice"),
                    ));
                }
                files.push(file.clone());
                Some(file)
            };
            secrets.push(SecretSpec { name: s.name, file });
        }
        let mut templates = Vec::new();
        for (i, t) in raw.templates.into_iter().enumerate() {
            let key = |f: &str| format!("templates[{i}].{f}");
            validate_file_name(&t.file).map_err(|e| err(&key("file"), e.to_string()))?;
            if files.contains(&t.file) {
                return Err(err(
                    &key("file"),
                    format!("file {:?} is used twice", t.file),
                ));
            }
            files.push(t.file.clone());
            let source = match (t.source, t.template_file) {
                (Some(s), None) => s,
                (None, Some(p)) => {
                    let p = resolve(p);
                    std::fs::read_to_string(&p).map_err(|e| {
                        err(
                            &key("template_file"),
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })?
                }
                _ => {
                    return Err(err(
                        &key("source"),
                        "set exactly one of source and template_file".into(),
                    ));
                }
            };
            let mode = match t.mode {
                None => None,
                Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                    Ok(v) if v <= 0o777 && v & 0o022 == 0 => Some(v),
                    _ => {
                        return Err(err(
                            &key("mode"),
                            format!(
                                "{m:?}: an octal mode like \"0440\", never group- or world-writable"
                            ),
                        ));
                    }
                },
            };
            templates.push(TemplateSpec {
                file: t.file,
                source,
                mode,
                uid: t.uid,
                gid: t.gid,
            });
        }
        if let Err(e) = crate::render::Templates::new(&templates) {
            let i = templates
                .iter()
                .position(|t| t.file == e.file)
                .unwrap_or_default();
            return Err(err(&format!("templates[{i}]"), e.to_string()));
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
        let local_api = raw.local_api.map(|l| LocalApiConfig {
            socket: resolve(l.socket),
            allowed_uids: l.allowed_uids,
        });
        let aws_credentials = match raw.aws_credentials {
            None => None,
            Some(a) => Some(
                crate::aws_endpoint::validate(a, &secrets, &resolve(raw.dir.clone()), &resolve)
                    .map_err(|(key, m)| err(key, m))?,
            ),
        };
        let notify = match raw.notify {
            None => crate::notify::NotifyConfig::default(),
            Some(n) => {
                use crate::notify::{NotifyConfig, Target, check_url, parse_signal};
                let signal = match (n.signal, n.pid_file, n.process_name) {
                    (None, None, None) => None,
                    (Some(sig), pid, name) => {
                        parse_signal(&sig).map_err(|m| err("notify.signal", m))?;
                        let target = match (pid, name) {
                            (Some(p), None) => Target::PidFile(resolve(p)),
                            (None, Some(n)) => Target::ProcessName(n),
                            _ => {
                                return Err(err(
                                    "notify.signal",
                                    "set exactly one of pid_file and process_name".into(),
                                ));
                            }
                        };
                        Some((sig, target))
                    }
                    (None, _, _) => {
                        return Err(err(
                            "notify.signal",
                            "pid_file/process_name need a signal".into(),
                        ));
                    }
                };
                let command = match n.command {
                    None => None,
                    Some(argv) if argv.is_empty() || argv[0].is_empty() => {
                        return Err(err(
                            "notify.command",
                            "give the program and its arguments as a list".into(),
                        ));
                    }
                    Some(argv) => Some((argv, n.command_timeout)),
                };
                if let Some(url) = &n.http_post {
                    check_url(url).map_err(|m| err("notify.http_post", m))?;
                }
                if n.debounce > Duration::from_secs(300) {
                    return Err(err("notify.debounce", "at most 5m".into()));
                }
                NotifyConfig {
                    debounce: n.debounce,
                    signal,
                    command,
                    http_post: n.http_post,
                }
            }
        };
        Ok(Config {
            notify,
            health_listen,
            local_api,
            aws_credentials,
            broker_url: raw.broker_url,
            ca,
            tls_server_name: raw.tls_server_name,
            token_file: resolve(raw.token_file),
            role: raw.role,
            dir: resolve(raw.dir),
            allow_non_tmpfs: raw.allow_non_tmpfs,
            group: raw.group,
            ttl: raw.ttl,
            remove_on_exit: raw.remove_on_exit,
            revoke_on_shutdown: raw.revoke_on_shutdown,
            retry_initial: raw.retry_initial,
            retry_max: raw.retry_max,
            request_timeout: raw.request_timeout,
            secrets,
            templates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_secrets_are_refused_at_start() {
        let mut text = GOOD.replace("[[secrets]]\nname = \"payments/db-password\"\n", "");
        for i in 0..=MAX_SECRETS {
            text.push_str(&format!("[[secrets]]\nname = \"s/{i}\"\n"));
        }
        let e = Config::parse(&text, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`secrets`") && e.contains("at most 4096"), "{e}");
    }

    #[test]
    fn example_file_is_valid() {
        let cfg = Config::parse(
            include_str!("../../examples/sidecar.toml"),
            Path::new("/x/sidecar.toml"),
        )
        .unwrap();
        assert!(!cfg.secrets.is_empty());
    }

    #[test]
    fn example_file_states_the_secrets_limit_the_code_enforces() {
        let example = include_str!("../../examples/sidecar.toml");
        assert!(
            example.contains(&format!("at most {MAX_SECRETS} per sidecar")),
            "examples/sidecar.toml must say at most {MAX_SECRETS} secrets"
        );
        let limits: Vec<&str> = example
            .match_indices("at most ")
            .map(|(i, _)| example[i..].split_whitespace().nth(2).unwrap_or_default())
            .collect();
        assert!(
            !limits.contains(&"256"),
            "a stale limit remains: {limits:?}"
        );
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
        assert_eq!(cfg.secrets[0].file.as_deref(), Some("db-password"));
        assert_eq!(cfg.ca, CaSource::File(PathBuf::from("/etc/sc/ca.crt")));
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
        let broken = format!(
            "{GOOD}[[templates]]\nfile = \"db.env\"\nsource = \"A={{{{ secrets[\"\nmode = \"0440\"\n"
        );
        let e = Config::parse(&broken, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`templates[0]`") && e.contains("template \"db.env\" line 1"),
            "{e}"
        );
        let writable =
            format!("{GOOD}[[templates]]\nfile = \"x\"\nsource = \"a\"\nmode = \"0666\"\n");
        let e = Config::parse(&writable, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("templates[0].mode"), "{e}");
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn ca_inline_or_file_exactly_one() {
        let inline = GOOD.replace(
            "ca_file = \"ca.crt\"",
            &format!("ca_pem = \"\"\"\n{PEM}\"\"\""),
        );
        let cfg = Config::parse(&inline, Path::new("s.toml")).unwrap();
        assert_eq!(cfg.ca, CaSource::Pem(PEM.to_owned()));
        assert_eq!(cfg.ca.read().unwrap(), PEM.as_bytes());

        let both = format!("ca_pem = \"\"\"\n{PEM}\"\"\"\n{GOOD}");
        let e = Config::parse(&both, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_file`") && e.contains("exactly one"), "{e}");
        let neither = GOOD.replace("ca_file = \"ca.crt\"\n", "");
        let e = Config::parse(&neither, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one"), "{e}");
        let junk = GOOD.replace("ca_file = \"ca.crt\"", "ca_pem = \"not a certificate\"");
        let e = Config::parse(&junk, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_pem`"), "{e}");
    }

    #[test]
    fn ca_file_missing_is_named() {
        let cfg = Config::parse(GOOD, Path::new("/nonexistent/s.toml")).unwrap();
        let e = cfg.ca.read().unwrap_err();
        assert!(e.contains("/nonexistent/ca.crt"), "{e}");
    }

    #[test]
    fn config_from_environment() {
        let var = CONFIG_ENV;
        let e = Config::from_env_value(var, Err(std::env::VarError::NotPresent))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("$SECRETS_SIDECAR_CONFIG") && e.contains("--config"),
            "{e}"
        );
        let inline = GOOD.replace(
            "ca_file = \"ca.crt\"",
            &format!("ca_pem = \"\"\"\n{PEM}\"\"\""),
        );
        let cfg = Config::from_env_value(var, Ok(inline)).unwrap();
        assert_eq!(cfg.secrets[0].name, "payments/db-password");
        let e = Config::from_env_value(var, Ok("broker_url = 1".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config file $SECRETS_SIDECAR_CONFIG"), "{e}");
    }
}
