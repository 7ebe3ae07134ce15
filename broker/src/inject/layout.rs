//! The fixed shape of what the injector adds to a pod: the names of its
//! containers, volumes and ports, the directories it mounts, the modes the
//! sidecar runs in, and which directories the secrets may not be mounted on.
//! A leaf: the annotation parser, `inject.toml` and the patch all use it.

/// The injected container (the native sidecar, the `once` init container,
/// or the regular container of the fallback mode).
pub const SIDECAR_NAME: &str = "secrets-sidecar";
/// The `once` init container of the fallback mode.
pub const INIT_NAME: &str = "secrets-sidecar-init";
/// The memory-backed volume holding the files.
pub const FILES_VOLUME: &str = "secrets-broker-files";
/// The projected service-account token, mounted into the sidecar only.
pub const TOKEN_VOLUME: &str = "secrets-broker-token";
/// Where the sidecar finds its token.
pub const TOKEN_DIR: &str = "/var/run/secrets/secrets-broker";
pub(super) const TOKEN_FILE: &str = "token";
/// The sidecar binary in its image (deploy/images/sidecar.Dockerfile): what
/// an `exec` probe runs.
pub const SIDECAR_BIN: &str = "/usr/local/bin/secrets-sidecar";
/// The name of the probe port when it serves `/metrics` too (what the
/// sidecars' PodMonitor scrapes).
pub const METRICS_PORT_NAME: &str = "sidecar-http";
/// The name of the probe port when it serves only the probes.
pub const PROBE_PORT_NAME: &str = "sidecar-probe";
/// Mode exec: the volume the sidecar binary is copied into.
pub const BIN_VOLUME: &str = "secrets-broker-bin";
/// Mode exec: where that volume is, in the init container and the app's.
pub const BIN_DIR: &str = "/secrets-bin";

/// Mode exec: the size limit of the volume the binary is copied into.
pub(super) const BIN_SIZE: &str = "32Mi";

/// How the sidecar runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+):
    /// started before every other init container and the app, kept running,
    /// stopped after the app.
    Native,
    /// An init container running `secrets-sidecar once`: one generation,
    /// no renewal (Jobs, batch pods).
    Once,
    /// For clusters without native sidecars: an init container running
    /// `once` (so the files exist before the app starts), then a regular
    /// container running `run` to keep them fresh.
    Fallback,
    /// The app's own container runs `secrets-sidecar exec -- <its command>`
    /// (the binary copied in by an init container): secrets as environment
    /// variables, the app restarted or signalled on rotation.
    Exec,
}

impl Mode {
    pub fn parse(value: &str) -> Option<Mode> {
        match value {
            "native" => Some(Mode::Native),
            "once" => Some(Mode::Once),
            "fallback" => Some(Mode::Fallback),
            "exec" => Some(Mode::Exec),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Once => "once",
            Mode::Fallback => "fallback",
            Mode::Exec => "exec",
        }
    }
}

/// Checks a directory for the secrets volume: absolute, normalised, and not
/// a system directory the container needs.
pub fn validate_mount_path(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(format!("{value:?} is not an absolute path"));
    }
    if value.len() > 255 {
        return Err("longer than 255 bytes".into());
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.')))
    {
        return Err(format!(
            "{:?} contains {c:?}; use a-z, A-Z, 0-9, '-', '_', '.' and '/'",
            value.escape_debug().to_string()
        ));
    }
    let segments: Vec<&str> = value[1..].split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(format!(
            "{value:?} is not a clean path (no empty, '.' or '..' segments, no trailing '/')"
        ));
    }
    const RESERVED: &[&str] = &["proc", "sys", "dev", "etc", "bin", "sbin", "lib", "usr"];
    if segments.len() == 1 && RESERVED.contains(&segments[0]) {
        return Err(format!("{value:?} would hide a system directory"));
    }
    let token_dir = TOKEN_DIR;
    if value == token_dir
        || token_dir.starts_with(&format!("{value}/"))
        || value.starts_with(&format!("{token_dir}/"))
    {
        return Err(format!(
            "{value:?} overlaps the sidecar's token directory {token_dir}"
        ));
    }
    Ok(())
}
