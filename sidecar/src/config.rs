//! Sidecar configuration: TOML, strict, validated at start. Every key is
//! documented in `examples/sidecar.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::writer::validate_file_name;

pub use crate::spec::{SecretSpec, TemplateSpec};

/// The environment variable that holds the whole config (TOML) when
/// `--config` is not given: how the injection webhook configures a sidecar
/// without a ConfigMap or any API call.
pub const CONFIG_ENV: &str = "SECRETS_SIDECAR_CONFIG";

/// A configuration problem; the message names the file and key.
pub use crate::strict_toml::ConfigError;

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
    probe_listen: Option<String>,
    #[serde(default)]
    probe_metrics: bool,
    #[serde(default)]
    metrics_secret_names: bool,
    local_api: Option<RawLocalApi>,
    aws_credentials: Option<crate::aws_endpoint::RawAwsCredentials>,
    notify: Option<RawNotify>,
    #[serde(default)]
    secrets: Vec<RawSecret>,
    #[serde(default)]
    templates: Vec<RawTemplate>,
    // `secrets-sidecar exec` (see [`ExecConfig`]).
    #[serde(default)]
    env: Vec<RawEnv>,
    #[serde(default)]
    env_clean: bool,
    on_change: Option<String>,
    restart_signal: Option<String>,
    #[serde(default, with = "humantime_serde")]
    restart_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    on_change_debounce: Option<Duration>,
    on_revoke: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    name: String,
    secret: Option<String>,
    template: Option<String>,
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

/// `health_listen` when the file does not set it: loopback only, so the
/// detail it shows (secret names, revocation rule IDs, lease times) never
/// reaches the pod network.
pub const DEFAULT_HEALTH_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8099),
);

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
    /// The detailed `/healthz`, `/readyz` (what is missing or revoked, by
    /// name and rule ID) and `/metrics`; [`DEFAULT_HEALTH_LISTEN`] unless
    /// the file says otherwise, `None` for `health_listen = "off"`. On an
    /// address that is not loopback it shows only what [`probe_listen`]
    /// shows (see [`crate::health::View`]).
    ///
    /// [`probe_listen`]: Config::probe_listen
    pub health_listen: Option<std::net::SocketAddr>,
    /// `health_listen` was not in the file: a port already taken is then
    /// logged (INFO), not a reason to stop (two sidecars on one machine).
    pub health_listen_default: bool,
    /// The probe port for the pod network (the kubelet's `httpGet` comes to
    /// the pod IP): `/healthz` and `/readyz` as a status code and a fixed
    /// word, 404 for anything else; off when unset.
    pub probe_listen: Option<std::net::SocketAddr>,
    /// Also serve `/metrics` on `probe_listen` (for a PodMonitor), without
    /// secret names unless `metrics_secret_names`.
    pub probe_metrics: bool,
    /// Label metrics served on a non-loopback address with the secrets'
    /// names; otherwise with their position in `[[secrets]]` (`"0"`, `"1"`…).
    pub metrics_secret_names: bool,
    /// The local `Secrets` gRPC API on a Unix socket; off when unset.
    pub local_api: Option<LocalApiConfig>,
    /// The AWS container credentials endpoint on loopback; off when unset.
    pub aws_credentials: Option<crate::aws_endpoint::AwsCredentialsConfig>,
    /// What to tell the application after each new generation.
    pub notify: crate::notify::NotifyConfig,
    pub secrets: Vec<SecretSpec>,
    pub templates: Vec<TemplateSpec>,
    /// What `secrets-sidecar exec` gives its command and does on a change;
    /// unused by `run` and `once`.
    pub exec: ExecConfig,
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

/// The local API's socket and who may use it.
#[derive(Debug, Clone)]
pub struct LocalApiConfig {
    pub socket: PathBuf,
    /// UIDs allowed to call (checked with SO_PEERCRED); empty means the
    /// sidecar's own UID only.
    pub allowed_uids: Vec<u32>,
}

/// `secrets-sidecar exec`: the environment of the command and what a new
/// generation or a revocation does to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Added to the command's environment, in this order (`[[env]]`).
    pub env: Vec<EnvSpec>,
    /// The command gets only `env`, not the sidecar's own environment.
    pub env_clean: bool,
    pub on_change: OnChange,
    /// Sent to stop the command before a restart (then SIGKILL after `restart_grace`).
    pub restart_signal: rustix::process::Signal,
    pub restart_grace: Duration,
    /// Generations within this of each other cause one restart or signal.
    pub debounce: Duration,
    pub on_revoke: OnRevoke,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            env: Vec::new(),
            env_clean: false,
            on_change: OnChange::Restart,
            restart_signal: rustix::process::Signal::TERM,
            restart_grace: DEFAULT_RESTART_GRACE,
            debounce: DEFAULT_ON_CHANGE_DEBOUNCE,
            on_revoke: OnRevoke::Stop,
        }
    }
}

/// `restart_grace` when unset.
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(10);
/// `on_change_debounce` when unset.
pub const DEFAULT_ON_CHANGE_DEBOUNCE: Duration = Duration::from_secs(1);

/// One environment variable of the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSpec {
    /// A POSIX name: letters, digits and `_`, not starting with a digit.
    pub name: String,
    pub source: EnvSource,
}

/// Where an environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// A secret's value as it is.
    Secret(String),
    /// A minijinja template over `secrets["name"]`, like `[[templates]]`.
    Template(String),
}

/// What `exec` does when a new generation changes what its command was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChange {
    /// Stop the command (`restart_signal`, `restart_grace`, SIGKILL) and
    /// start it again with the new environment.
    Restart,
    /// Send this signal; the command keeps its environment and re-reads files.
    Signal(rustix::process::Signal),
    /// Nothing: the command keeps what it was started with.
    None,
}

/// What `exec` does when a revocation removes secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRevoke {
    /// Stop the command and exit non-zero (Kubernetes restarts the
    /// container, which waits in login until the rule is lifted).
    Stop,
    /// Leave the command running with the environment it has.
    Keep,
}

/// Whether `name` is a POSIX environment variable name (letters, digits and
/// `_`, not starting with a digit), at most 256 bytes.
pub fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        crate::strict_toml::load(path, Self::parse)
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
        let raw: RawConfig = crate::strict_toml::parse(text, path)?;
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
        if raw.secrets.is_empty() && raw.env.is_empty() {
            return Err(err(
                "secrets",
                "list at least one [[secrets]] (or, for exec, [[env]]) entry".into(),
            ));
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
        let exec = exec_config(
            ExecRaw {
                env: raw.env,
                env_clean: raw.env_clean,
                on_change: raw.on_change,
                restart_signal: raw.restart_signal,
                restart_grace: raw.restart_grace,
                debounce: raw.on_change_debounce,
                on_revoke: raw.on_revoke,
            },
            &mut secrets,
        )
        .map_err(|(key, m)| err(&key, m))?;
        let listen = |key: &str, value: &str| -> Result<std::net::SocketAddr, ConfigError> {
            value.parse().map_err(|e| {
                err(
                    key,
                    format!("{value:?} is not an address like 127.0.0.1:8099: {e}"),
                )
            })
        };
        let health_listen_default = raw.health_listen.is_none();
        let health_listen = match raw.health_listen.as_deref() {
            None => Some(DEFAULT_HEALTH_LISTEN),
            Some("off") => None,
            Some(a) => Some(listen("health_listen", a)?),
        };
        let probe_listen = match raw.probe_listen.as_deref() {
            None => None,
            Some(a) => Some(listen("probe_listen", a)?),
        };
        if raw.probe_metrics && probe_listen.is_none() {
            return Err(err(
                "probe_metrics",
                "serves /metrics on probe_listen: set probe_listen too".into(),
            ));
        }
        if let (Some(h), Some(p)) = (health_listen, probe_listen)
            && h.port() == p.port()
            && (h.ip().is_unspecified() || p.ip().is_unspecified() || h.ip() == p.ip())
        {
            return Err(err(
                "probe_listen",
                format!("{p} overlaps health_listen {h}: give the probe port its own number"),
            ));
        }
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
            health_listen_default,
            probe_listen,
            probe_metrics: raw.probe_metrics,
            metrics_secret_names: raw.metrics_secret_names,
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
            exec,
        })
    }
}

/// The exec keys of the file, taken out of [`RawConfig`].
struct ExecRaw {
    env: Vec<RawEnv>,
    env_clean: bool,
    on_change: Option<String>,
    restart_signal: Option<String>,
    restart_grace: Option<Duration>,
    debounce: Option<Duration>,
    on_revoke: Option<String>,
}

/// Checks the exec keys; a secret that only `[[env]]` names is added to
/// `secrets` without a file (as `template_only`). Errors are (key, message).
fn exec_config(
    raw: ExecRaw,
    secrets: &mut Vec<SecretSpec>,
) -> Result<ExecConfig, (String, String)> {
    let fail = |key: &str, m: String| (key.to_owned(), m);
    let mut env: Vec<EnvSpec> = Vec::with_capacity(raw.env.len());
    for (i, e) in raw.env.into_iter().enumerate() {
        let key = |f: &str| format!("env[{i}].{f}");
        if !is_env_name(&e.name) {
            return Err(fail(
                &key("name"),
                format!(
                    "{:?} is not an environment variable name: use letters, digits and '_', not starting with a digit (at most 256)",
                    e.name
                ),
            ));
        }
        if e.name == CONFIG_ENV {
            return Err(fail(
                &key("name"),
                format!(
                    "{CONFIG_ENV} is the sidecar's own config; exec removes it from the command's environment"
                ),
            ));
        }
        if env.iter().any(|o| o.name == e.name) {
            return Err(fail(&key("name"), format!("{:?} is listed twice", e.name)));
        }
        let source = match (e.secret, e.template) {
            (Some(secret), None) => {
                if secret.is_empty() || secret.len() > 253 {
                    return Err(fail(&key("secret"), "must be 1-253 bytes".into()));
                }
                if !secrets.iter().any(|s| s.name == secret) {
                    secrets.push(SecretSpec {
                        name: secret.clone(),
                        file: None,
                    });
                }
                EnvSource::Secret(secret)
            }
            (None, Some(template)) => {
                let spec = TemplateSpec {
                    file: e.name.clone(),
                    source: template.clone(),
                    mode: None,
                    uid: None,
                    gid: None,
                };
                crate::render::Templates::new(&[spec])
                    .map_err(|t| fail(&key("template"), t.to_string()))?;
                EnvSource::Template(template)
            }
            _ => {
                return Err(fail(
                    &key("secret"),
                    "set exactly one of secret and template".into(),
                ));
            }
        };
        env.push(EnvSpec {
            name: e.name,
            source,
        });
    }
    if secrets.len() > MAX_SECRETS {
        return Err(fail(
            "env",
            format!(
                "{} secrets with those [[env]] entries; one sidecar holds at most {MAX_SECRETS}",
                secrets.len()
            ),
        ));
    }
    let signal =
        |key: &str, name: &str| crate::notify::parse_signal(name).map_err(|m| fail(key, m));
    let on_change = match raw.on_change.as_deref() {
        None | Some("restart") => OnChange::Restart,
        Some("none") => OnChange::None,
        Some(other) => match other.strip_prefix("signal:") {
            Some(name) => OnChange::Signal(signal("on_change", name)?),
            None => {
                return Err(fail(
                    "on_change",
                    format!(
                        "{other:?}: use \"restart\", \"signal:HUP\" (or another signal) or \"none\""
                    ),
                ));
            }
        },
    };
    let restart_signal = match raw.restart_signal.as_deref() {
        None => rustix::process::Signal::TERM,
        Some(name) => signal("restart_signal", name)?,
    };
    let restart_grace = raw.restart_grace.unwrap_or(DEFAULT_RESTART_GRACE);
    if restart_grace > Duration::from_secs(3600) {
        return Err(fail("restart_grace", "at most 1h".into()));
    }
    let debounce = raw.debounce.unwrap_or(DEFAULT_ON_CHANGE_DEBOUNCE);
    if debounce > Duration::from_secs(300) {
        return Err(fail("on_change_debounce", "at most 5m".into()));
    }
    let on_revoke = match raw.on_revoke.as_deref() {
        None | Some("stop") => OnRevoke::Stop,
        Some("keep") => OnRevoke::Keep,
        Some(other) => {
            return Err(fail(
                "on_revoke",
                format!("{other:?}: use \"stop\" (stop the command, exit non-zero) or \"keep\""),
            ));
        }
    };
    Ok(ExecConfig {
        env,
        env_clean: raw.env_clean,
        on_change,
        restart_signal,
        restart_grace,
        debounce,
        on_revoke,
    })
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

    #[test]
    fn health_listen_defaults_to_loopback_and_the_probe_port_is_off() {
        let cfg = Config::parse(GOOD, Path::new("s.toml")).unwrap();
        assert_eq!(cfg.health_listen, Some("127.0.0.1:8099".parse().unwrap()));
        assert!(cfg.health_listen.unwrap().ip().is_loopback());
        assert!(cfg.health_listen_default);
        assert_eq!(cfg.probe_listen, None);
        assert!(!cfg.probe_metrics && !cfg.metrics_secret_names);
        let with = |keys: &str| {
            Config::parse(
                &GOOD.replace("[[secrets]]", &format!("{keys}\n[[secrets]]")),
                Path::new("s.toml"),
            )
        };
        let cfg = with("health_listen = \"off\"").unwrap();
        assert_eq!(cfg.health_listen, None);
        assert!(!cfg.health_listen_default);
        let cfg = with(
            "health_listen = \"127.0.0.1:9000\"\nprobe_listen = \"0.0.0.0:8098\"\nprobe_metrics = true\nmetrics_secret_names = true",
        )
        .unwrap();
        assert_eq!(cfg.health_listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert!(!cfg.health_listen_default);
        assert_eq!(cfg.probe_listen, Some("0.0.0.0:8098".parse().unwrap()));
        assert!(cfg.probe_metrics && cfg.metrics_secret_names);
        for (keys, key, words) in [
            (
                "probe_metrics = true",
                "`probe_metrics`",
                "set probe_listen",
            ),
            (
                "probe_listen = \"0.0.0.0:8099\"",
                "`probe_listen`",
                "overlaps",
            ),
            (
                "probe_listen = \"8098\"",
                "`probe_listen`",
                "not an address",
            ),
            (
                "health_listen = \"localhost\"",
                "`health_listen`",
                "not an address",
            ),
        ] {
            let e = with(keys).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(words), "{keys}: {e}");
        }
    }

    #[test]
    fn exec_keys_parse_with_defaults() {
        let cfg = Config::parse(GOOD, Path::new("s.toml")).unwrap();
        assert_eq!(cfg.exec, ExecConfig::default());
        let text = GOOD.replace(
            "[[secrets]]",
            "env_clean = true\non_change = \"signal:HUP\"\nrestart_signal = \"INT\"\nrestart_grace = \"3s\"\non_change_debounce = \"0s\"\non_revoke = \"keep\"\n[[secrets]]",
        ) + "[[env]]\nname = \"DB_PASSWORD\"\nsecret = \"payments/db-password\"\n\
               [[env]]\nname = \"API_KEY\"\nsecret = \"payments/api-key\"\n\
               [[env]]\nname = \"DB_URL\"\ntemplate = \"postgres://app:{{ secrets['payments/db-password'] }}@db/app\"\n";
        let cfg = Config::parse(&text, Path::new("s.toml")).unwrap();
        let e = &cfg.exec;
        assert!(e.env_clean);
        assert_eq!(e.on_change, OnChange::Signal(rustix::process::Signal::HUP));
        assert_eq!(e.restart_signal, rustix::process::Signal::INT);
        assert_eq!(e.restart_grace, Duration::from_secs(3));
        assert_eq!(e.debounce, Duration::ZERO);
        assert_eq!(e.on_revoke, OnRevoke::Keep);
        assert_eq!(e.env.len(), 3);
        assert_eq!(
            e.env[0].source,
            EnvSource::Secret("payments/db-password".into())
        );
        // A secret only [[env]] names is fetched, without a file of its own.
        assert_eq!(
            cfg.secrets,
            vec![
                SecretSpec {
                    name: "payments/db-password".into(),
                    file: Some("db-password".into())
                },
                SecretSpec {
                    name: "payments/api-key".into(),
                    file: None
                },
            ]
        );
        // [[env]] alone is a whole config (for exec).
        let only_env = GOOD.replace("[[secrets]]\nname = \"payments/db-password\"\n", "")
            + "[[env]]\nname = \"X\"\nsecret = \"a/b\"\n";
        let cfg = Config::parse(&only_env, Path::new("s.toml")).unwrap();
        assert_eq!(cfg.secrets[0].file, None);
    }

    #[test]
    fn exec_key_errors_name_the_key() {
        let bad = |extra_top: &str, env: &str| {
            let text = GOOD.replace("[[secrets]]", &format!("{extra_top}\n[[secrets]]")) + env;
            Config::parse(&text, Path::new("s.toml"))
                .unwrap_err()
                .to_string()
        };
        let cases = [
            (
                "",
                "[[env]]\nname = \"1X\"\nsecret = \"a/b\"\n",
                "`env[0].name`",
                "not an environment variable name",
            ),
            (
                "",
                "[[env]]\nname = \"A-B\"\nsecret = \"a/b\"\n",
                "`env[0].name`",
                "letters, digits",
            ),
            (
                "",
                "[[env]]\nname = \"\"\nsecret = \"a/b\"\n",
                "`env[0].name`",
                "not an environment",
            ),
            (
                "",
                "[[env]]\nname = \"A\"\nsecret = \"a/b\"\n[[env]]\nname = \"A\"\nsecret = \"c/d\"\n",
                "`env[1].name`",
                "listed twice",
            ),
            (
                "",
                "[[env]]\nname = \"SECRETS_SIDECAR_CONFIG\"\nsecret = \"a/b\"\n",
                "`env[0].name`",
                "own config",
            ),
            (
                "",
                "[[env]]\nname = \"A\"\n",
                "`env[0].secret`",
                "exactly one of secret and template",
            ),
            (
                "",
                "[[env]]\nname = \"A\"\nsecret = \"a\"\ntemplate = \"b\"\n",
                "`env[0].secret`",
                "exactly one",
            ),
            (
                "",
                "[[env]]\nname = \"A\"\ntemplate = \"{{ secrets[\"\n",
                "`env[0].template`",
                "syntax error",
            ),
            (
                "",
                "[[env]]\nname = \"A\"\nsecret = \"a/b\"\nfile = \"x\"\n",
                "`env[0].file`",
                "unknown key",
            ),
            ("on_change = \"reload\"", "", "`on_change`", "signal:HUP"),
            ("on_change = \"signal:KILL\"", "", "`on_change`", "use HUP"),
            (
                "restart_signal = \"STOP\"",
                "",
                "`restart_signal`",
                "use HUP",
            ),
            (
                "restart_grace = \"2h\"",
                "",
                "`restart_grace`",
                "at most 1h",
            ),
            ("restart_grace = \"soon\"", "", "restart_grace", ""),
            (
                "on_change_debounce = \"10m\"",
                "",
                "`on_change_debounce`",
                "at most 5m",
            ),
            ("on_revoke = \"ignore\"", "", "`on_revoke`", "\"stop\""),
            ("env_clean = \"yes\"", "", "env_clean", ""),
        ];
        for (top, env, key, words) in cases {
            let e = bad(top, env);
            assert!(e.contains(key) && e.contains(words), "{top} {env}: {e}");
        }
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
