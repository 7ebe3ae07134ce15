//! The pod annotations that ask for injection, parsed by one pure function,
//! [`parse`]: every annotation under [`PREFIX`] must be known and valid, or
//! the pod is denied with a message naming the annotation and the problem (a
//! typo must never silently inject nothing).
//!
//! | annotation | value |
//! |---|---|
//! | `inject` | `true` or `false` |
//! | `mode` | `native`, `once`, `fallback` or `exec` |
//! | `role` | a broker role name |
//! | `secret-<file>` | a secret name; written to `<mount-path>/<file>` |
//! | `template-<file>` | a minijinja template; rendered to `<mount-path>/<file>` |
//! | `template-secrets` | secrets fetched for templates only (comma-separated) |
//! | `mount-path` | absolute directory of the files in the containers |
//! | `containers` | containers that get the mount (comma-separated) |
//! | `notify` | `http://127.0.0.1:PORT/path` or `signal:HUP:<process name>` |
//! | `env-<NAME>` | mode exec: a secret name, the value of variable `<NAME>` |
//! | `on-change` | mode exec: `restart`, `signal:<SIGNAL>` or `none` |
//! | `on-revoke` | mode exec: `stop` or `keep` |
//! | `ttl` | lease TTL to ask for (`10m`) |
//! | `tmpfs-size` | size limit of the memory volume (`4Mi`) |
//! | `cpu-request`, `cpu-limit`, `memory-request`, `memory-limit` | the sidecar's resources |
//! | `status` | set by the injector (`injected`): the pod is left alone |
//!
//! The fixed keys never start with `secret-` or `template-` except
//! `template-secrets`, which is therefore not a template file name.

use std::collections::BTreeMap;
use std::time::Duration;

use super::k8s::{Quantity, is_dns_label};
use super::layout::{Mode, validate_mount_path};

/// Every annotation the injector reads starts with this.
pub const PREFIX: &str = "secrets-broker.io/";

/// The value of `status` on a pod the injector has mutated.
pub const STATUS_INJECTED: &str = "injected";

/// The fixed annotation names (after the prefix), for error messages.
pub const KNOWN: &[&str] = &[
    "inject",
    "mode",
    "role",
    "secret-<file>",
    "template-<file>",
    "template-secrets",
    "mount-path",
    "containers",
    "notify",
    "env-<NAME>",
    "on-change",
    "on-revoke",
    "ttl",
    "tmpfs-size",
    "cpu-request",
    "cpu-limit",
    "memory-request",
    "memory-limit",
    "status",
];

/// Why the annotations of a pod are refused. Each variant names the
/// annotation (with its prefix), so the API server's denial message tells the
/// pod's author exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// A key under our prefix that the injector does not know: usually a
    /// typo (`injcet`), or an annotation of a newer injector.
    #[error("unknown annotation {annotation}: known are {}", known_list())]
    Unknown { annotation: String },
    /// A yes/no annotation whose value is not exactly `true` or `false`.
    #[error("annotation {annotation}: {value:?} is not a boolean: use \"true\" or \"false\"")]
    NotBool { annotation: String, value: String },
    /// A secret name the broker would never accept (see
    /// `secrets_broker::backend::validate_secret_name`).
    #[error("annotation {annotation}: {reason}")]
    SecretName { annotation: String, reason: String },
    /// A file name that is empty, hidden or could leave the secrets directory.
    #[error("annotation {annotation}: file name {file:?} is not allowed: {reason}")]
    FileName {
        annotation: String,
        file: String,
        reason: String,
    },
    /// A resource quantity that Kubernetes would not parse (`16Mi`, `5m`, `0.5`).
    #[error(
        "annotation {annotation}: {value:?} is not a Kubernetes quantity ({reason}); examples: 16Mi, 1Gi, 5m, 0.5"
    )]
    Quantity {
        annotation: String,
        value: String,
        reason: String,
    },
    /// Any other value the annotation does not accept.
    #[error("annotation {annotation}: {reason}")]
    Invalid { annotation: String, reason: String },
}

fn known_list() -> String {
    KNOWN
        .iter()
        .map(|k| format!("{PREFIX}{k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl AnnotationError {
    /// The annotation the error is about.
    pub fn annotation(&self) -> &str {
        match self {
            AnnotationError::Unknown { annotation }
            | AnnotationError::NotBool { annotation, .. }
            | AnnotationError::SecretName { annotation, .. }
            | AnnotationError::FileName { annotation, .. }
            | AnnotationError::Quantity { annotation, .. }
            | AnnotationError::Invalid { annotation, .. } => annotation,
        }
    }

    pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> AnnotationError {
        AnnotationError::Invalid {
            annotation: full(key),
            reason: reason.into(),
        }
    }
}

/// The annotation's full name from its name after the prefix.
pub fn full(key: &str) -> String {
    format!("{PREFIX}{key}")
}

/// One secret written to its own file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub file: String,
    pub secret: String,
}

/// One file rendered from secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateFile {
    pub file: String,
    pub source: String,
}

/// One environment variable of the app in mode exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSecret {
    pub name: String,
    pub secret: String,
}

/// Where the sidecar tells the application about a new generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    /// POST to a loopback URL (any container of the pod can listen there).
    HttpPost(String),
    /// A signal to a process found by name (needs `shareProcessNamespace`).
    Signal { signal: String, process: String },
}

/// The sidecar's resources as overridden by annotations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub cpu_request: Option<Quantity>,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
}

/// What a pod's annotations ask for. `None` fields take the injector's
/// defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Annotations {
    /// `inject: "true"`.
    pub inject: bool,
    /// `status: injected`: the injector mutated this pod already.
    pub injected: bool,
    pub mode: Option<Mode>,
    /// Empty: the broker picks the only role that matches.
    pub role: Option<String>,
    /// Sorted by file name.
    pub secrets: Vec<SecretFile>,
    /// Sorted by file name.
    pub templates: Vec<TemplateFile>,
    /// Secrets fetched for templates only, in the order given.
    pub template_secrets: Vec<String>,
    pub mount_path: Option<String>,
    /// Container names; `None`: every app container.
    pub containers: Option<Vec<String>>,
    pub notify: Option<Notify>,
    /// Mode exec: the app's environment variables, sorted by name.
    pub env: Vec<EnvSecret>,
    /// Mode exec: `on_change` of the sidecar config, checked.
    pub on_change: Option<String>,
    /// Mode exec: `on_revoke` of the sidecar config, checked.
    pub on_revoke: Option<String>,
    pub ttl: Option<Duration>,
    pub tmpfs_size: Option<Quantity>,
    pub resources: Resources,
}

impl Annotations {
    /// Whether any annotation under our prefix was present at all.
    pub fn is_empty(&self) -> bool {
        *self == Annotations::default()
    }
}

/// Parses every annotation under [`PREFIX`]; others are ignored. Pure: the
/// same map always gives the same result, and nothing but the map is read.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Annotations, AnnotationError> {
    let mut out = Annotations::default();
    let mut seen_secrets: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, value) in annotations {
        let Some(key) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let value = value.as_str();
        match key {
            "inject" => out.inject = parse_bool(key, value)?,
            "status" => {
                if value != STATUS_INJECTED {
                    return Err(AnnotationError::invalid(
                        key,
                        format!(
                            "{value:?}: this annotation is set by the injector (\"{STATUS_INJECTED}\"); remove it"
                        ),
                    ));
                }
                out.injected = true;
            }
            "mode" => {
                out.mode = Some(Mode::parse(value).ok_or_else(|| {
                    AnnotationError::invalid(
                        key,
                        format!("{value:?}: use native, once (Jobs), fallback (clusters without native sidecars) or exec (secrets as environment variables)"),
                    )
                })?)
            }
            "role" => {
                if !crate::policy::valid_role_name(value) {
                    return Err(AnnotationError::invalid(
                        key,
                        format!(
                            "{value:?} is not a role name: use 1-63 characters from a-z, 0-9, '-', '_' and '.'"
                        ),
                    ));
                }
                out.role = Some(value.to_owned());
            }
            "template-secrets" => {
                let list = parse_list(key, value)?;
                for secret in &list {
                    check_secret(key, secret)?;
                }
                out.template_secrets = list;
            }
            "mount-path" => out.mount_path = Some(parse_mount_path(key, value)?),
            "containers" => {
                let list = parse_list(key, value)?;
                for c in &list {
                    if !is_dns_label(c) {
                        return Err(AnnotationError::invalid(
                            key,
                            format!("{c:?} is not a container name (a DNS label: a-z, 0-9, '-')"),
                        ));
                    }
                }
                out.containers = Some(list);
            }
            "notify" => out.notify = Some(parse_notify(key, value)?),
            "on-change" => {
                if let Some(sig) = value.strip_prefix("signal:") {
                    secrets_sidecar::notify::parse_signal(sig)
                        .map_err(|m| AnnotationError::invalid(key, format!("signal {m}")))?;
                } else if value != "restart" && value != "none" {
                    return Err(AnnotationError::invalid(
                        key,
                        format!("{value:?}: use restart, signal:<SIGNAL> (signal:HUP) or none"),
                    ));
                }
                out.on_change = Some(value.to_owned());
            }
            "on-revoke" => {
                if value != "stop" && value != "keep" {
                    return Err(AnnotationError::invalid(
                        key,
                        format!("{value:?}: use stop (the app is stopped, the container restarts) or keep"),
                    ));
                }
                out.on_revoke = Some(value.to_owned());
            }
            "ttl" => out.ttl = Some(parse_ttl(key, value)?),
            "tmpfs-size" => {
                let q = quantity(key, value)?;
                if q.value < 64.0 * 1024.0 || q.value > 1024f64.powi(3) {
                    return Err(AnnotationError::invalid(
                        key,
                        format!("{value:?} is out of range: use 64Ki to 1Gi"),
                    ));
                }
                out.tmpfs_size = Some(q);
            }
            "cpu-request" => out.resources.cpu_request = Some(positive(key, value)?),
            "cpu-limit" => out.resources.cpu_limit = Some(positive(key, value)?),
            "memory-request" => out.resources.memory_request = Some(positive(key, value)?),
            "memory-limit" => out.resources.memory_limit = Some(positive(key, value)?),
            _ => {
                if let Some(file) = key.strip_prefix("secret-") {
                    check_file(key, file)?;
                    check_secret(key, value)?;
                    if let Some(other) = seen_secrets.insert(value, key) {
                        return Err(AnnotationError::invalid(
                            key,
                            format!(
                                "secret {value:?} is already written by {}; list it once",
                                full(other)
                            ),
                        ));
                    }
                    out.secrets.push(SecretFile {
                        file: file.to_owned(),
                        secret: value.to_owned(),
                    });
                } else if let Some(name) = key.strip_prefix("env-") {
                    if !secrets_sidecar::config::is_env_name(name) {
                        return Err(AnnotationError::invalid(
                            key,
                            format!(
                                "{name:?} is not an environment variable name: use letters, digits and '_', not starting with a digit"
                            ),
                        ));
                    }
                    check_secret(key, value)?;
                    out.env.push(EnvSecret {
                        name: name.to_owned(),
                        secret: value.to_owned(),
                    });
                } else if let Some(file) = key.strip_prefix("template-") {
                    check_file(key, file)?;
                    check_template(key, file, value)?;
                    out.templates.push(TemplateFile {
                        file: file.to_owned(),
                        source: value.to_owned(),
                    });
                } else {
                    return Err(AnnotationError::Unknown {
                        annotation: name.clone(),
                    });
                }
            }
        }
    }
    // Cross-annotation rules.
    for t in &out.templates {
        if out.secrets.iter().any(|s| s.file == t.file) {
            return Err(AnnotationError::invalid(
                &format!("template-{}", t.file),
                format!(
                    "file {:?} is also written by {}",
                    t.file,
                    full(&format!("secret-{}", t.file))
                ),
            ));
        }
    }
    for (i, s) in out.template_secrets.iter().enumerate() {
        if out.template_secrets[..i].contains(s) {
            return Err(AnnotationError::invalid(
                "template-secrets",
                format!("{s:?} is listed twice"),
            ));
        }
        if let Some(f) = out.secrets.iter().find(|f| &f.secret == s) {
            return Err(AnnotationError::invalid(
                "template-secrets",
                format!(
                    "{s:?} already has a file ({}); templates can use it as it is",
                    full(&format!("secret-{}", f.file))
                ),
            ));
        }
    }
    if !out.template_secrets.is_empty() && out.templates.is_empty() {
        return Err(AnnotationError::invalid(
            "template-secrets",
            format!(
                "no {} annotation uses these secrets",
                full("template-<file>")
            ),
        ));
    }
    if out.inject
        && !out.injected
        && out.secrets.is_empty()
        && out.templates.is_empty()
        && out.env.is_empty()
    {
        return Err(AnnotationError::invalid(
            "inject",
            format!(
                "nothing to inject: add {} (or {}, or with mode exec {}) annotations",
                full("secret-<file>"),
                full("template-<file>"),
                full("env-<NAME>")
            ),
        ));
    }
    if out.mode != Some(Mode::Exec) {
        let exec_only = out
            .env
            .first()
            .map(|e| format!("env-{}", e.name))
            .or(out.on_change.as_ref().map(|_| "on-change".to_owned()))
            .or(out.on_revoke.as_ref().map(|_| "on-revoke".to_owned()));
        if let Some(key) = exec_only {
            return Err(AnnotationError::invalid(
                &key,
                format!(
                    "only with {}: \"exec\" (the sidecar runs the app's command with secrets in its environment)",
                    full("mode")
                ),
            ));
        }
    }
    if let (Some(Mode::Exec), Some(Notify::Signal { .. })) = (out.mode, &out.notify) {
        return Err(AnnotationError::invalid(
            "notify",
            format!(
                "in mode exec the app is the sidecar's own child: signal it with {}: signal:HUP",
                full("on-change")
            ),
        ));
    }
    if let (Some(Mode::Once), Some(_)) = (out.mode, &out.notify) {
        return Err(AnnotationError::invalid(
            "notify",
            "mode once writes the files once, before the app starts: there is nothing to notify",
        ));
    }
    for (req, lim, what) in [
        (&out.resources.cpu_request, &out.resources.cpu_limit, "cpu"),
        (
            &out.resources.memory_request,
            &out.resources.memory_limit,
            "memory",
        ),
    ] {
        if let (Some(r), Some(l)) = (req, lim)
            && r.value > l.value
        {
            return Err(AnnotationError::invalid(
                &format!("{what}-request"),
                format!(
                    "{} is above {} ({})",
                    r.text,
                    full(&format!("{what}-limit")),
                    l.text
                ),
            ));
        }
    }
    Ok(out)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, AnnotationError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(AnnotationError::NotBool {
            annotation: full(key),
            value: value.to_owned(),
        }),
    }
}

fn parse_list(key: &str, value: &str) -> Result<Vec<String>, AnnotationError> {
    let list: Vec<String> = value.split(',').map(|s| s.trim().to_owned()).collect();
    if list.iter().any(String::is_empty) {
        return Err(AnnotationError::invalid(
            key,
            format!("{value:?}: give a comma-separated list without empty entries"),
        ));
    }
    for (i, item) in list.iter().enumerate() {
        if list[..i].contains(item) {
            return Err(AnnotationError::invalid(
                key,
                format!("{item:?} is listed twice"),
            ));
        }
    }
    Ok(list)
}

fn check_secret(key: &str, name: &str) -> Result<(), AnnotationError> {
    crate::backend::validate_secret_name(name).map_err(|reason| AnnotationError::SecretName {
        annotation: full(key),
        reason,
    })
}

fn check_file(key: &str, file: &str) -> Result<(), AnnotationError> {
    secrets_sidecar::writer::validate_file_name(file).map_err(|e| AnnotationError::FileName {
        annotation: full(key),
        file: file.to_owned(),
        reason: match e {
            secrets_sidecar::writer::WriteError::BadName(_, why) => why.to_owned(),
            other => other.to_string(),
        },
    })
}

fn check_template(key: &str, file: &str, source: &str) -> Result<(), AnnotationError> {
    let spec = secrets_sidecar::config::TemplateSpec {
        file: file.to_owned(),
        source: source.to_owned(),
        mode: None,
        uid: None,
        gid: None,
    };
    secrets_sidecar::render::Templates::new(&[spec])
        .map(|_| ())
        .map_err(|e| AnnotationError::invalid(key, e.to_string()))
}

fn quantity(key: &str, value: &str) -> Result<Quantity, AnnotationError> {
    Quantity::parse(value).map_err(|reason| AnnotationError::Quantity {
        annotation: full(key),
        value: value.to_owned(),
        reason,
    })
}

fn positive(key: &str, value: &str) -> Result<Quantity, AnnotationError> {
    let q = quantity(key, value)?;
    if q.value <= 0.0 {
        return Err(AnnotationError::Quantity {
            annotation: full(key),
            value: value.to_owned(),
            reason: "must be above zero".into(),
        });
    }
    Ok(q)
}

fn parse_mount_path(key: &str, value: &str) -> Result<String, AnnotationError> {
    validate_mount_path(value).map_err(|reason| AnnotationError::invalid(key, reason))?;
    Ok(value.to_owned())
}

fn parse_notify(key: &str, value: &str) -> Result<Notify, AnnotationError> {
    if value.starts_with("http") {
        secrets_sidecar::notify::check_url(value)
            .map_err(|m| AnnotationError::invalid(key, format!("{value:?}: {m}")))?;
        return Ok(Notify::HttpPost(value.to_owned()));
    }
    if let Some(rest) = value.strip_prefix("signal:") {
        let (signal, process) = rest.split_once(':').ok_or_else(|| {
            AnnotationError::invalid(
                key,
                format!("{value:?}: use signal:<SIGNAL>:<process name>"),
            )
        })?;
        secrets_sidecar::notify::parse_signal(signal)
            .map_err(|m| AnnotationError::invalid(key, format!("signal {m}")))?;
        if process.is_empty()
            || process.len() > 64
            || process.chars().any(|c| c.is_control() || c == '/')
        {
            return Err(AnnotationError::invalid(
                key,
                format!("{process:?} is not a process name"),
            ));
        }
        return Ok(Notify::Signal {
            signal: signal.to_owned(),
            process: process.to_owned(),
        });
    }
    Err(AnnotationError::invalid(
        key,
        format!(
            "{value:?}: use http://127.0.0.1:PORT/path (a POST after each change) or signal:<SIGNAL>:<process name>"
        ),
    ))
}

fn parse_ttl(key: &str, value: &str) -> Result<Duration, AnnotationError> {
    let ttl = humantime::parse_duration(value)
        .map_err(|e| AnnotationError::invalid(key, format!("{value:?}: {e} (e.g. 10m, 1h)")))?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(24 * 3600) {
        return Err(AnnotationError::invalid(
            key,
            format!("{value:?} is out of range: use 1s to 24h"),
        ));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
            .collect()
    }

    fn err(pairs: &[(&str, &str)]) -> AnnotationError {
        parse(&map(pairs)).expect_err("must be refused")
    }

    #[test]
    fn full_set_parses() {
        let a = parse(&map(&[
            ("inject", "true"),
            ("mode", "native"),
            ("role", "payments-api"),
            ("secret-db-password", "payments/db-password"),
            ("secret-api-key", "payments/api-key"),
            (
                "template-db.env",
                "USER={{ secrets[\"payments/db-user\"] }}\n",
            ),
            ("template-secrets", "payments/db-user"),
            ("mount-path", "/var/secrets"),
            ("containers", "app, worker"),
            ("notify", "http://127.0.0.1:8080/-/reload"),
            ("ttl", "10m"),
            ("tmpfs-size", "8Mi"),
            ("cpu-request", "10m"),
            ("cpu-limit", "0.1"),
            ("memory-request", "16Mi"),
            ("memory-limit", "64Mi"),
        ]))
        .unwrap();
        assert!(a.inject);
        assert_eq!(a.mode, Some(Mode::Native));
        // Sorted by annotation name, so by file.
        assert_eq!(
            a.secrets,
            vec![
                SecretFile {
                    file: "api-key".into(),
                    secret: "payments/api-key".into()
                },
                SecretFile {
                    file: "db-password".into(),
                    secret: "payments/db-password".into()
                },
            ]
        );
        assert_eq!(a.templates[0].file, "db.env");
        assert_eq!(a.template_secrets, vec!["payments/db-user".to_owned()]);
        assert_eq!(
            a.containers,
            Some(vec!["app".to_owned(), "worker".to_owned()])
        );
        assert_eq!(a.ttl, Some(Duration::from_secs(600)));
        assert_eq!(
            a.resources.memory_limit.unwrap().value,
            64.0 * 1024.0 * 1024.0
        );
    }

    #[test]
    fn exec_mode_takes_env_on_change_and_on_revoke() {
        let a = parse(&map(&[
            ("inject", "true"),
            ("mode", "exec"),
            ("env-DB_PASSWORD", "payments/db-password"),
            ("env-API_KEY", "payments/api-key"),
            ("secret-ca.crt", "payments/ca"),
            ("on-change", "signal:HUP"),
            ("on-revoke", "keep"),
        ]))
        .unwrap();
        assert_eq!(a.mode, Some(Mode::Exec));
        // Sorted by annotation name, so by variable.
        assert_eq!(
            a.env,
            vec![
                EnvSecret {
                    name: "API_KEY".into(),
                    secret: "payments/api-key".into()
                },
                EnvSecret {
                    name: "DB_PASSWORD".into(),
                    secret: "payments/db-password".into()
                },
            ]
        );
        assert_eq!(a.on_change.as_deref(), Some("signal:HUP"));
        assert_eq!(a.on_revoke.as_deref(), Some("keep"));
        // env-<NAME> alone is something to inject.
        assert!(
            parse(&map(&[
                ("inject", "true"),
                ("mode", "exec"),
                ("env-A", "a/b")
            ]))
            .is_ok()
        );
    }

    #[test]
    fn other_annotations_are_ignored() {
        let mut m = map(&[]);
        m.insert("example.com/secret-x".into(), "../../x".into());
        m.insert("inject.secrets-broker.io/anything".into(), "x".into());
        let a = parse(&m).unwrap();
        assert!(a.is_empty());
    }

    #[test]
    fn unknown_keys_are_named() {
        for key in ["injcet", "secrets-x", "", "Secret-x", "mount_path"] {
            let e = err(&[("inject", "true"), ("secret-a", "a/b"), (key, "x")]);
            assert_eq!(e.annotation(), format!("{PREFIX}{key}"), "{e}");
            assert!(e.to_string().contains(&format!("{PREFIX}{key}")), "{e}");
            assert!(e.to_string().contains("unknown annotation"), "{e}");
        }
        // A typo in the opt-in itself is refused too, not ignored.
        let e = err(&[("injection", "true"), ("secret-a", "a/b")]);
        assert_eq!(e.annotation(), "secrets-broker.io/injection");
    }

    #[test]
    fn bad_values_name_annotation_and_problem() {
        // (annotations, the annotation named, words of the problem)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case<'_>] = &[
            (&[("inject", "yes")], "inject", "not a boolean"),
            (&[("inject", "True")], "inject", "not a boolean"),
            (&[("inject", "true")], "inject", "nothing to inject"),
            (
                &[("inject", "true"), ("secret-a", "../x")],
                "secret-a",
                "starting with '.'",
            ),
            (
                &[("inject", "true"), ("secret-a", "a b")],
                "secret-a",
                "contains ' '",
            ),
            (
                &[("inject", "true"), ("secret-.env", "a/b")],
                "secret-.env",
                "file name \".env\"",
            ),
            (
                &[("inject", "true"), ("secret-", "a/b")],
                "secret-",
                "empty",
            ),
            (
                &[("inject", "true"), ("template-x", "{{ oops")],
                "template-x",
                "syntax error",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("template-x", "y")],
                "template-x",
                "also written by",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("secret-y", "a/b")],
                "secret-y",
                "already written by",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("mode", "sidecar")],
                "mode",
                "use native, once",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("role", "Bad Role"),
                ],
                "role",
                "not a role name",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("mount-path", "secrets"),
                ],
                "mount-path",
                "not an absolute path",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("mount-path", "/a/../etc"),
                ],
                "mount-path",
                "not a clean path",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("mount-path", "/etc"),
                ],
                "mount-path",
                "system directory",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("mount-path", "/var/run/secrets"),
                ],
                "mount-path",
                "token directory",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("containers", "app,,b"),
                ],
                "containers",
                "empty entries",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("containers", "App"),
                ],
                "containers",
                "not a container name",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("notify", "http://10.0.0.1:80/"),
                ],
                "notify",
                "not a loopback",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("notify", "signal:KILL:app"),
                ],
                "notify",
                "signal",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("notify", "reload"),
                ],
                "notify",
                "use http://",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("mode", "once"),
                    ("notify", "http://127.0.0.1:1/"),
                ],
                "notify",
                "nothing to notify",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("ttl", "soon")],
                "ttl",
                "10m",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("ttl", "2d")],
                "ttl",
                "out of range",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("memory-limit", "32MB"),
                ],
                "memory-limit",
                "not a Kubernetes quantity",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("cpu-request", "-1"),
                ],
                "cpu-request",
                "not a Kubernetes quantity",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("cpu-limit", "0")],
                "cpu-limit",
                "above zero",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("memory-request", "1Gi"),
                    ("memory-limit", "64Mi"),
                ],
                "memory-request",
                "is above",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("tmpfs-size", "10Gi"),
                ],
                "tmpfs-size",
                "out of range",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("template-secrets", "c/d"),
                ],
                "template-secrets",
                "no secrets-broker.io/template-<file>",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("template-t", "x"),
                    ("template-secrets", "a/b"),
                ],
                "template-secrets",
                "already has a file",
            ),
            (
                &[("inject", "true"), ("secret-x", "a/b"), ("status", "done")],
                "status",
                "set by the injector",
            ),
            (
                &[("inject", "true"), ("mode", "exec"), ("env-1X", "a/b")],
                "env-1X",
                "not an environment variable name",
            ),
            (
                &[("inject", "true"), ("mode", "exec"), ("env-A", "a b")],
                "env-A",
                "contains ' '",
            ),
            (
                &[("inject", "true"), ("env-A", "a/b")],
                "env-A",
                "only with secrets-broker.io/mode: \"exec\"",
            ),
            (
                &[
                    ("inject", "true"),
                    ("secret-x", "a/b"),
                    ("on-change", "restart"),
                ],
                "on-change",
                "only with",
            ),
            (
                &[
                    ("inject", "true"),
                    ("mode", "native"),
                    ("secret-x", "a/b"),
                    ("on-revoke", "keep"),
                ],
                "on-revoke",
                "only with",
            ),
            (
                &[
                    ("inject", "true"),
                    ("mode", "exec"),
                    ("env-A", "a/b"),
                    ("on-change", "reload"),
                ],
                "on-change",
                "use restart, signal:<SIGNAL>",
            ),
            (
                &[
                    ("inject", "true"),
                    ("mode", "exec"),
                    ("env-A", "a/b"),
                    ("on-change", "signal:KILL"),
                ],
                "on-change",
                "signal",
            ),
            (
                &[
                    ("inject", "true"),
                    ("mode", "exec"),
                    ("env-A", "a/b"),
                    ("on-revoke", "ignore"),
                ],
                "on-revoke",
                "use stop",
            ),
            (
                &[
                    ("inject", "true"),
                    ("mode", "exec"),
                    ("env-A", "a/b"),
                    ("notify", "signal:HUP:app"),
                ],
                "notify",
                "secrets-broker.io/on-change: signal:HUP",
            ),
        ];
        for (pairs, annotation, problem) in cases {
            let e = err(pairs);
            let text = e.to_string();
            assert_eq!(e.annotation(), full(annotation), "{pairs:?}: {text}");
            assert!(text.contains(&full(annotation)), "{pairs:?}: {text}");
            assert!(text.contains(problem), "{pairs:?}: {text}");
        }
    }

    #[test]
    fn status_marks_an_injected_pod() {
        let a = parse(&map(&[("inject", "true"), ("status", "injected")])).unwrap();
        assert!(a.injected);
    }

    proptest::proptest! {
        /// Arbitrary annotations never panic the parser, and a refusal always
        /// names an annotation that is in the map.
        #[test]
        fn arbitrary_annotations_never_panic(
            entries in proptest::collection::vec(("[a-z-]{0,12}", "\\PC{0,40}"), 0..6)
        ) {
            let m: BTreeMap<String, String> = entries
                .into_iter()
                .map(|(k, v)| (format!("{PREFIX}{k}"), v))
                .collect();
            if let Err(e) = parse(&m) {
                proptest::prop_assert!(m.contains_key(e.annotation()), "{e}");
            }
        }
    }
}
