//! The config each injected sidecar gets in `SECRETS_SIDECAR_CONFIG`: the
//! keys of `examples/sidecar.toml`, from the injector's `[sidecar]` and the
//! pod's annotations, checked by parsing it the way the sidecar will.

use serde::Serialize;

use super::annotations::{Annotations, Notify};
use super::config::SidecarConfig;
use super::layout::{TOKEN_DIR, TOKEN_FILE};

/// What one pod's sidecar config is made of.
pub(super) struct SidecarFile<'a> {
    pub(super) sidecar: &'a SidecarConfig,
    /// The broker CA, embedded as `ca_pem`.
    pub(super) ca_pem: &'a str,
    pub(super) annotations: &'a Annotations,
    pub(super) mount_path: &'a str,
    /// The pod's fsGroup, the group that may read the files.
    pub(super) group: Option<i64>,
    /// The probe port on the pod's address, when one is opened.
    pub(super) probe_port: Option<u16>,
}

impl SidecarFile<'_> {
    /// The TOML text; `with_health` for a sidecar that keeps running (the
    /// health and probe ports), not for `once` or `exec`.
    pub(super) fn render(&self, with_health: bool) -> Result<String, String> {
        let doc = SidecarToml {
            broker_url: &self.sidecar.broker_url,
            ca_pem: self.ca_pem,
            tls_server_name: self.sidecar.tls_server_name.as_deref(),
            token_file: format!("{TOKEN_DIR}/{TOKEN_FILE}"),
            role: self.annotations.role.as_deref(),
            dir: self.mount_path,
            group: self.group,
            ttl: self
                .annotations
                .ttl
                .map(|t| humantime::format_duration(t).to_string()),
            // Detail on loopback only; once and exec serve no port.
            health_listen: if with_health {
                format!("127.0.0.1:{}", self.sidecar.health_port)
            } else {
                "off".to_owned()
            },
            probe_listen: self
                .probe_port
                .filter(|_| with_health)
                .map(|p| format!("0.0.0.0:{p}")),
            probe_metrics: (with_health && self.sidecar.pod_metrics).then_some(true),
            notify: self.annotations.notify.as_ref().map(|n| match n {
                Notify::HttpPost(url) => NotifyToml {
                    http_post: Some(url),
                    signal: None,
                    process_name: None,
                },
                Notify::Signal { signal, process } => NotifyToml {
                    http_post: None,
                    signal: Some(signal),
                    process_name: Some(process),
                },
            }),
            secrets: self
                .annotations
                .secrets
                .iter()
                .map(|s| SecretToml {
                    name: &s.secret,
                    file: Some(&s.file),
                    template_only: None,
                })
                .chain(
                    self.annotations
                        .template_secrets
                        .iter()
                        .map(|s| SecretToml {
                            name: s,
                            file: None,
                            template_only: Some(true),
                        }),
                )
                .collect(),
            templates: self
                .annotations
                .templates
                .iter()
                .map(|t| TemplateToml {
                    file: &t.file,
                    source: &t.source,
                })
                .collect(),
            on_change: self.annotations.on_change.as_deref(),
            on_revoke: self.annotations.on_revoke.as_deref(),
            env: self
                .annotations
                .env
                .iter()
                .map(|e| EnvToml {
                    name: &e.name,
                    secret: &e.secret,
                })
                .collect(),
        };
        let text = toml::to_string(&doc).map_err(|e| format!("internal error: {e}"))?;
        // The sidecar must accept what it is given: parse it as it will.
        secrets_sidecar::config::Config::parse(&text, std::path::Path::new("injected"))
            .map_err(|e| format!("the annotations make an invalid sidecar config: {e}"))?;
        Ok(text)
    }
}

/// The sidecar's config as TOML, the keys of `examples/sidecar.toml`
/// (plain values first, then tables: TOML's order).
#[derive(Serialize)]
struct SidecarToml<'a> {
    broker_url: &'a str,
    ca_pem: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_server_name: Option<&'a str>,
    token_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    dir: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    health_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe_metrics: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_change: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_revoke: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify: Option<NotifyToml<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<SecretToml<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    templates: Vec<TemplateToml<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<EnvToml<'a>>,
}

#[derive(Serialize)]
struct EnvToml<'a> {
    name: &'a str,
    secret: &'a str,
}

#[derive(Serialize)]
struct NotifyToml<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    http_post: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process_name: Option<&'a str>,
}

#[derive(Serialize)]
struct SecretToml<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template_only: Option<bool>,
}

#[derive(Serialize)]
struct TemplateToml<'a> {
    file: &'a str,
    source: &'a str,
}
