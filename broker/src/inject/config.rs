//! The injector's configuration: a TOML file parsed strictly
//! (`deny_unknown_fields`), then validated into a typed [`Config`] whose
//! errors name the file and key. Every key is documented in
//! `examples/inject.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::k8s::{Quantity, is_dns_label};
use super::layout::{Mode, validate_mount_path};
pub use secrets_sidecar::strict_toml::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_exclude")]
    exclude_namespaces: Vec<String>,
    server: RawServer,
    sidecar: RawSidecar,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    ops_listen: Option<String>,
    tls_cert_file: PathBuf,
    tls_key_file: PathBuf,
    #[serde(default = "default_reload", with = "humantime_serde")]
    tls_reload_interval: Duration,
    #[serde(default = "default_grace", with = "humantime_serde")]
    shutdown_grace: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    image: String,
    #[serde(default = "default_pull_policy")]
    image_pull_policy: String,
    broker_url: String,
    broker_ca_file: PathBuf,
    tls_server_name: Option<String>,
    #[serde(default = "default_audience")]
    token_audience: String,
    #[serde(default = "default_token_expiration", with = "humantime_serde")]
    token_expiration: Duration,
    #[serde(default = "default_uid")]
    run_as_user: i64,
    #[serde(default = "default_uid")]
    run_as_group: i64,
    #[serde(default = "default_health_port")]
    health_port: u16,
    #[serde(default = "default_probe_port")]
    probe_port: u16,
    #[serde(default = "default_probes")]
    probes: String,
    #[serde(default)]
    pod_metrics: bool,
    #[serde(default = "default_mount_path")]
    mount_path: String,
    #[serde(default = "default_tmpfs_size")]
    tmpfs_size: String,
    #[serde(default = "default_mode")]
    default_mode: String,
    #[serde(default = "default_once_timeout", with = "humantime_serde")]
    once_timeout: Duration,
    #[serde(default)]
    resources: RawResources,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    #[serde(default = "default_cpu_request")]
    cpu_request: String,
    #[serde(default = "default_cpu_limit")]
    cpu_limit: String,
    #[serde(default = "default_memory_request")]
    memory_request: String,
    #[serde(default = "default_memory_limit")]
    memory_limit: String,
}

impl Default for RawResources {
    fn default() -> Self {
        RawResources {
            cpu_request: default_cpu_request(),
            cpu_limit: default_cpu_limit(),
            memory_request: default_memory_request(),
            memory_limit: default_memory_limit(),
        }
    }
}

fn default_exclude() -> Vec<String> {
    [
        "secrets-broker",
        "kube-system",
        "kube-public",
        "kube-node-lease",
    ]
    .map(String::from)
    .to_vec()
}
fn default_reload() -> Duration {
    Duration::from_secs(30)
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_pull_policy() -> String {
    "IfNotPresent".into()
}
fn default_audience() -> String {
    "secrets-broker".into()
}
fn default_token_expiration() -> Duration {
    Duration::from_secs(600)
}
fn default_uid() -> i64 {
    65532
}
fn default_health_port() -> u16 {
    8099
}
fn default_probe_port() -> u16 {
    8098
}
fn default_probes() -> String {
    "http".into()
}
fn default_mount_path() -> String {
    "/secrets".into()
}
fn default_tmpfs_size() -> String {
    "4Mi".into()
}
fn default_mode() -> String {
    "native".into()
}
fn default_once_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_cpu_request() -> String {
    "5m".into()
}
fn default_cpu_limit() -> String {
    "50m".into()
}
fn default_memory_request() -> String {
    "16Mi".into()
}
fn default_memory_limit() -> String {
    "32Mi".into()
}

/// Validated configuration of the injector.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pods in these namespaces are never mutated (the broker's own, the
    /// control plane's), whatever their annotations say.
    pub exclude_namespaces: Vec<String>,
    pub server: ServerConfig,
    pub sidecar: SidecarConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTPS: `POST /mutate` for the API server, and the probes and metrics.
    pub listen: SocketAddr,
    /// Optional plain-HTTP port for `/healthz`, `/readyz`, `/metrics` only.
    pub ops_listen: Option<SocketAddr>,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// How often the certificate files are checked for a new version
    /// (cert-manager rotates them in the mounted Secret).
    pub tls_reload_interval: Duration,
    /// How long in-flight reviews may take after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// What the injected sidecar looks like.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// A full reference with a tag or digest; used as written (the injector
    /// never asks a registry anything).
    pub image: String,
    pub image_pull_policy: String,
    pub broker_url: String,
    /// Read once at start and embedded in each sidecar's config (`ca_pem`).
    pub broker_ca_file: PathBuf,
    pub tls_server_name: Option<String>,
    /// The audience of the projected service-account token: the broker's.
    pub token_audience: String,
    /// `expirationSeconds` of the projected token (Kubernetes: at least 10 minutes).
    pub token_expiration: Duration,
    pub run_as_user: i64,
    pub run_as_group: i64,
    /// The sidecar's detailed `/healthz`, `/readyz`, `/metrics` port, on
    /// loopback (`127.0.0.1`): for `secrets-sidecar probe`, `kubectl
    /// port-forward` and tools in the pod; never reachable from the pod network.
    pub health_port: u16,
    /// The status-only probe port on the pod's address (`0.0.0.0`), where
    /// the kubelet's `httpGet` probes arrive; also `/metrics` with
    /// `pod_metrics`. Unused (not opened) with `probes = "exec"` and no
    /// `pod_metrics`.
    pub probe_port: u16,
    /// How the kubelet probes the sidecar.
    pub probes: ProbeKind,
    /// Serve `/metrics` on the probe port (declared as `sidecar-http`), for
    /// the sidecars' PodMonitor; secrets labelled by position, no rule or
    /// lease IDs.
    pub pod_metrics: bool,
    pub mount_path: String,
    pub tmpfs_size: Quantity,
    /// The mode of pods that do not choose one (`native`; `fallback` on
    /// clusters without native sidecars).
    pub default_mode: Mode,
    /// `secrets-sidecar once --timeout` in the once and fallback modes.
    pub once_timeout: Duration,
    pub cpu_request: Quantity,
    pub cpu_limit: Quantity,
    pub memory_request: Quantity,
    pub memory_limit: Quantity,
}

/// How the kubelet probes an injected sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `httpGet` on the probe port: the kubelet opens a TCP connection (no
    /// process in the container), the cheaper choice for a probe every second.
    Http,
    /// `exec` of `secrets-sidecar probe`: no port on the pod's address at
    /// all (unless `pod_metrics`), for a process start per probe.
    Exec,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        secrets_sidecar::strict_toml::load(path, Self::parse)
    }

    /// Parses and validates config text; `path` names the source in errors
    /// and anchors relative paths. Reads no file.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = secrets_sidecar::strict_toml::parse(text, path)?;
        let err = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let addr = |key: &str, value: &str| -> Result<SocketAddr, ConfigError> {
            value.parse().map_err(|e| {
                err(
                    key,
                    format!("{value:?} is not an address like 0.0.0.0:8443: {e}"),
                )
            })
        };
        let bounded = |key: &str, value: Duration, min: Duration, max: Duration| {
            if value < min || value > max {
                Err(err(
                    key,
                    format!(
                        "{} is out of range: use {} to {}",
                        humantime::format_duration(value),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ))
            } else {
                Ok(value)
            }
        };

        for (i, ns) in raw.exclude_namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                return Err(err(
                    &format!("exclude_namespaces[{i}]"),
                    format!("{ns:?} is not a namespace name"),
                ));
            }
        }
        let s = raw.server;
        let server = ServerConfig {
            listen: addr("server.listen", &s.listen)?,
            ops_listen: match &s.ops_listen {
                None => None,
                Some(a) => Some(addr("server.ops_listen", a)?),
            },
            tls_cert_file: resolve(s.tls_cert_file),
            tls_key_file: resolve(s.tls_key_file),
            tls_reload_interval: bounded(
                "server.tls_reload_interval",
                s.tls_reload_interval,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?,
            shutdown_grace: bounded(
                "server.shutdown_grace",
                s.shutdown_grace,
                Duration::ZERO,
                Duration::from_secs(300),
            )?,
        };

        let c = raw.sidecar;
        check_image(&c.image).map_err(|m| err("sidecar.image", m))?;
        if !["Always", "IfNotPresent", "Never"].contains(&c.image_pull_policy.as_str()) {
            return Err(err(
                "sidecar.image_pull_policy",
                format!(
                    "{:?}: use Always, IfNotPresent or Never",
                    c.image_pull_policy
                ),
            ));
        }
        if !c.broker_url.starts_with("https://") || c.broker_url.len() <= "https://".len() {
            return Err(err(
                "sidecar.broker_url",
                "must be an https:// URL (the sidecar requires TLS)".into(),
            ));
        }
        if c.token_audience.is_empty() || c.token_audience.len() > 253 {
            return Err(err(
                "sidecar.token_audience",
                "must be 1-253 characters (the broker's identity.audiences)".into(),
            ));
        }
        // The API server refuses expirationSeconds below 10 minutes.
        let token_expiration = bounded(
            "sidecar.token_expiration",
            c.token_expiration,
            Duration::from_secs(600),
            Duration::from_secs(24 * 3600),
        )?;
        for (key, id) in [
            ("sidecar.run_as_user", c.run_as_user),
            ("sidecar.run_as_group", c.run_as_group),
        ] {
            if !(1..=i64::from(u32::MAX)).contains(&id) {
                return Err(err(
                    key,
                    format!("{id}: must be a non-root ID (1 or above)"),
                ));
            }
        }
        for (key, port) in [
            ("sidecar.health_port", c.health_port),
            ("sidecar.probe_port", c.probe_port),
        ] {
            if port < 1024 {
                return Err(err(
                    key,
                    format!("{port}: use a port from 1024 (the sidecar has no capabilities)"),
                ));
            }
        }
        if c.probe_port == c.health_port {
            return Err(err(
                "sidecar.probe_port",
                format!(
                    "{} is also sidecar.health_port: the probe port (pod address) and the detailed port (loopback) need their own numbers",
                    c.probe_port
                ),
            ));
        }
        let probes = match c.probes.as_str() {
            "http" => ProbeKind::Http,
            "exec" => ProbeKind::Exec,
            other => {
                return Err(err(
                    "sidecar.probes",
                    format!(
                        "{other:?}: use \"http\" (httpGet on probe_port) or \"exec\" (secrets-sidecar probe)"
                    ),
                ));
            }
        };
        validate_mount_path(&c.mount_path).map_err(|m| err("sidecar.mount_path", m))?;
        let quantity = |key: &str, text: &str| {
            Quantity::parse(text)
                .map_err(|m| err(key, format!("{text:?} is not a Kubernetes quantity: {m}")))
                .and_then(|q| {
                    if q.value > 0.0 {
                        Ok(q)
                    } else {
                        Err(err(key, "must be above zero".into()))
                    }
                })
        };
        let tmpfs_size = quantity("sidecar.tmpfs_size", &c.tmpfs_size)?;
        let default_mode = Mode::parse(&c.default_mode).ok_or_else(|| {
            err(
                "sidecar.default_mode",
                format!("{:?}: use native or fallback", c.default_mode),
            )
        })?;
        if default_mode == Mode::Once {
            return Err(err(
                "sidecar.default_mode",
                "once keeps nothing fresh: choose it per pod with the mode annotation".into(),
            ));
        }
        if default_mode == Mode::Exec {
            return Err(err(
                "sidecar.default_mode",
                "exec wraps one container's command: choose it per pod with the mode annotation"
                    .into(),
            ));
        }
        let r = c.resources;
        let cpu_request = quantity("sidecar.resources.cpu_request", &r.cpu_request)?;
        let cpu_limit = quantity("sidecar.resources.cpu_limit", &r.cpu_limit)?;
        let memory_request = quantity("sidecar.resources.memory_request", &r.memory_request)?;
        let memory_limit = quantity("sidecar.resources.memory_limit", &r.memory_limit)?;
        if cpu_request.value > cpu_limit.value {
            return Err(err(
                "sidecar.resources.cpu_request",
                "must not be above cpu_limit".into(),
            ));
        }
        if memory_request.value > memory_limit.value {
            return Err(err(
                "sidecar.resources.memory_request",
                "must not be above memory_limit".into(),
            ));
        }
        Ok(Config {
            exclude_namespaces: raw.exclude_namespaces,
            server,
            sidecar: SidecarConfig {
                image: c.image,
                image_pull_policy: c.image_pull_policy,
                broker_url: c.broker_url,
                broker_ca_file: resolve(c.broker_ca_file),
                tls_server_name: c.tls_server_name,
                token_audience: c.token_audience,
                token_expiration,
                run_as_user: c.run_as_user,
                run_as_group: c.run_as_group,
                health_port: c.health_port,
                probe_port: c.probe_port,
                probes,
                pod_metrics: c.pod_metrics,
                mount_path: c.mount_path,
                tmpfs_size,
                default_mode,
                once_timeout: bounded(
                    "sidecar.once_timeout",
                    c.once_timeout,
                    Duration::from_secs(1),
                    Duration::from_secs(3600),
                )?,
                cpu_request,
                cpu_limit,
                memory_request,
                memory_limit,
            },
        })
    }
}

/// Checks an image reference: `[registry/]repository` with a `:tag` or an
/// `@sha256:` digest, never `:latest`, nothing to resolve.
fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() || image.len() > 512 || image.chars().any(|c| c.is_whitespace()) {
        return Err(format!("{image:?} is not an image reference"));
    }
    if let Some((_, digest)) = image.split_once('@') {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{image:?}: a digest must be sha256:<64 hex digits>"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{image:?}: a digest must be sha256:<64 hex digits>"
            ));
        }
        return Ok(());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, tag)) if !tag.is_empty() && tag != "latest" => Ok(()),
        _ => Err(format!(
            "{image:?} has no tag or digest (or is :latest): pin a release, e.g. registry/secrets-sidecar:0.1.0 or @sha256:…"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "0.0.0.0:8443"
tls_cert_file = "tls/tls.crt"
tls_key_file = "tls/tls.key"

[sidecar]
image = "registry.example/secrets-sidecar:0.1.0"
broker_url = "https://secrets-broker.secrets-broker.svc:8443"
broker_ca_file = "ca.crt"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/inj/inject.toml"))
    }

    #[test]
    fn example_file_is_valid() {
        let cfg = parse(include_str!("../../../examples/inject.toml"))
            .expect("examples/inject.toml must stay valid");
        assert!(
            cfg.exclude_namespaces
                .contains(&"secrets-broker".to_owned())
        );
        assert!(cfg.server.ops_listen.is_some());
    }

    #[test]
    fn defaults_and_paths() {
        let cfg = parse(GOOD).unwrap();
        assert_eq!(cfg.sidecar.broker_ca_file, Path::new("/etc/inj/ca.crt"));
        assert_eq!(cfg.server.tls_cert_file, Path::new("/etc/inj/tls/tls.crt"));
        assert_eq!(cfg.sidecar.token_expiration, Duration::from_secs(600));
        assert_eq!(cfg.sidecar.default_mode, Mode::Native);
        assert_eq!(cfg.sidecar.mount_path, "/secrets");
        assert_eq!(cfg.sidecar.memory_limit.text, "32Mi");
        assert_eq!(cfg.exclude_namespaces[0], "secrets-broker");
        assert_eq!(
            (cfg.sidecar.health_port, cfg.sidecar.probe_port),
            (8099, 8098)
        );
        assert_eq!(cfg.sidecar.probes, ProbeKind::Http);
        assert!(!cfg.sidecar.pod_metrics);
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            ("0.0.0.0:8443", "nope", "server.listen"),
            (":0.1.0", "", "sidecar.image"),
            (":0.1.0", ":latest", "sidecar.image"),
            (
                "[sidecar]",
                "[sidecar]\ntoken_expiration = \"5m\"",
                "sidecar.token_expiration",
            ),
            (
                "[sidecar]",
                "[sidecar]\nrun_as_user = 0",
                "sidecar.run_as_user",
            ),
            (
                "[sidecar]",
                "[sidecar]\nmount_path = \"/a/../b\"",
                "sidecar.mount_path",
            ),
            (
                "[sidecar]",
                "[sidecar]\ntmpfs_size = \"4MB\"",
                "sidecar.tmpfs_size",
            ),
            (
                "[sidecar]",
                "[sidecar]\ndefault_mode = \"once\"",
                "sidecar.default_mode",
            ),
            (
                "[sidecar]",
                "[sidecar]\ndefault_mode = \"exec\"",
                "sidecar.default_mode",
            ),
            ("https://secrets", "http://secrets", "sidecar.broker_url"),
            (
                "[sidecar]",
                "[sidecar]\nprobe_port = 8099",
                "sidecar.probe_port",
            ),
            (
                "[sidecar]",
                "[sidecar]\nprobe_port = 80",
                "sidecar.probe_port",
            ),
            ("[sidecar]", "[sidecar]\nprobes = \"tcp\"", "sidecar.probes"),
            (
                "[server]",
                "exclude_namespaces = [\"Bad\"]\n[server]",
                "exclude_namespaces[0]",
            ),
            (
                "broker_ca_file = \"ca.crt\"",
                "broker_ca_file = \"ca.crt\"\n[sidecar.resources]\ncpu_request = \"2\"\ncpu_limit = \"1\"",
                "sidecar.resources.cpu_request",
            ),
        ];
        for (from, to, key) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{from}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{to}: {e}");
            assert!(e.contains("inject.toml"), "{e}");
        }
        let e = parse(&GOOD.replace("[sidecar]", "[sidecar]\nimgae = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("imgae") && e.contains("inject.toml"), "{e}");
    }

    #[test]
    fn images_are_pinned() {
        for ok in [
            "ghcr.io/o/secrets-sidecar:0.1.0",
            "localhost:5000/sidecar:1",
            &format!("ghcr.io/o/s@sha256:{}", "a".repeat(64)),
        ] {
            assert!(check_image(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ghcr.io/o/s",
            "localhost:5000/sidecar",
            "s:latest",
            "s@sha256:abc",
            "a b:1",
        ] {
            assert!(check_image(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(e.to_string().contains("inject.toml"));
            }
        }
    }
}
