//! From a pod and its annotations to a JSON Patch that only adds: the
//! sidecar, its volumes, the read-only mounts, and the status annotation.
//!
//! The patch is a pure function of (config, broker CA, namespace, pod): the
//! same input gives byte-identical output, so a retried admission call or a
//! reinvocation yields the same pod. A pod that was injected already (the
//! status annotation, or a container named [`SIDECAR_NAME`]) is left alone.
//!
//! Order of operations (JSON Patch applies them in turn): the status
//! annotation, the two volumes, the mounts into the selected containers and
//! init containers (at their original indices), and last the sidecar at
//! `/spec/initContainers/0`, so it starts before every other init container
//! (which may then read the secrets).
//!
//! Mode exec is the one exception to "only adds": the app container's
//! `command` is replaced by `[/secrets-bin/secrets-sidecar, exec, --,
//! <that command>]` (its `args` stay, and follow), after an init container
//! has copied the sidecar binary into the `/secrets-bin` volume; the app
//! container also gets the token, the files volume (writable: exec writes
//! the files) and the sidecar config in its environment. A container without
//! an explicit `command` is denied: its image's entrypoint is not known at
//! admission.

use std::collections::BTreeMap;

use json_patch::Patch;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction,
    HTTPGetAction, Pod, PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as KubeQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::annotations::{self, AnnotationError, Annotations, Notify, full};
use super::config::{Config, ConfigError, ProbeKind};
use super::exec_check::check_exec;
use super::k8s::Quantity;
use super::layout::{
    BIN_DIR, BIN_SIZE, BIN_VOLUME, FILES_VOLUME, INIT_NAME, METRICS_PORT_NAME, Mode,
    PROBE_PORT_NAME, SIDECAR_BIN, SIDECAR_NAME, TOKEN_DIR, TOKEN_FILE, TOKEN_VOLUME,
};
use super::ops::{Ops, to_value};
use super::sidecar_file::SidecarFile;

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The namespace is in `exclude_namespaces`: never touched.
    Excluded,
    /// No `inject: "true"` annotation.
    NotRequested,
    /// Injected before (status annotation or a `secrets-sidecar` container).
    AlreadyInjected,
    /// Refused, with a message naming the annotation and the problem.
    Denied(String),
    /// Allowed with this patch.
    Inject {
        patch: Patch,
        mode: Mode,
        /// Shown by kubectl to whoever created the pod.
        warnings: Vec<String>,
    },
}

/// The injector: its config and the broker CA it embeds in every sidecar.
#[derive(Debug, Clone)]
pub struct Injector {
    cfg: Config,
    ca_pem: String,
}

impl Injector {
    /// Reads and checks the broker CA named by `sidecar.broker_ca_file`.
    pub fn new(cfg: Config, config_path: &std::path::Path) -> Result<Injector, ConfigError> {
        let path = cfg.sidecar.broker_ca_file.clone();
        let err = |message: String| ConfigError::Invalid {
            path: config_path.to_owned(),
            key: "sidecar.broker_ca_file".into(),
            message,
        };
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        Self::with_ca_pem(cfg, pem).map_err(|m| err(format!("{}: {m}", path.display())))
    }

    /// An injector with the CA given as PEM text (tests).
    pub fn with_ca_pem(cfg: Config, pem: String) -> Result<Injector, String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("no CERTIFICATE block found".into());
        }
        for cert in &certs {
            x509_parser::parse_x509_certificate(cert.as_ref())
                .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        }
        Ok(Injector { cfg, ca_pem: pem })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Decides about a pod being created in `namespace`.
    pub fn decide(&self, namespace: &str, pod: &Pod) -> Decision {
        if self.cfg.exclude_namespaces.iter().any(|n| n == namespace) {
            return Decision::Excluded;
        }
        let empty = BTreeMap::new();
        let map = pod.metadata.annotations.as_ref().unwrap_or(&empty);
        let spec = pod.spec.clone().unwrap_or_default();
        let has_sidecar = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME);
        if has_sidecar
            || map.get(&full("status")).map(String::as_str) == Some(annotations::STATUS_INJECTED)
        {
            return Decision::AlreadyInjected;
        }
        let ann = match annotations::parse(map) {
            Ok(a) => a,
            Err(e) => return Decision::Denied(e.to_string()),
        };
        if !ann.inject {
            return Decision::NotRequested;
        }
        match self.plan(&ann, &spec) {
            Ok(d) => d,
            Err(message) => Decision::Denied(message),
        }
    }

    fn plan(&self, ann: &Annotations, spec: &PodSpec) -> Result<Decision, String> {
        let c = &self.cfg.sidecar;
        let mode = ann.mode.unwrap_or(c.default_mode);
        let mount_path = ann.mount_path.as_deref().unwrap_or(&c.mount_path);
        let mount_key = if ann.mount_path.is_some() {
            format!("annotation {}", full("mount-path"))
        } else {
            format!(
                "the default mount path (set another with the annotation {})",
                full("mount-path")
            )
        };
        let mut warnings = Vec::new();

        // Which containers get the files.
        let inits = spec.init_containers.as_deref().unwrap_or_default();
        let selected = |name: &str| match &ann.containers {
            None => false,
            Some(list) => list.iter().any(|n| n == name),
        };
        if let Some(list) = &ann.containers {
            for name in list {
                let known = spec.containers.iter().chain(inits).any(|c| &c.name == name);
                if !known {
                    return Err(AnnotationError::invalid(
                        "containers",
                        format!("the pod has no container or init container named {name:?}"),
                    )
                    .to_string());
                }
            }
        }
        let app: Vec<usize> = (0..spec.containers.len())
            .filter(|&i| ann.containers.is_none() || selected(&spec.containers[i].name))
            .collect();
        let app_inits: Vec<usize> = (0..inits.len())
            .filter(|&i| selected(&inits[i].name))
            .collect();
        if mode == Mode::Exec {
            check_exec(spec, &app, &app_inits, mount_path)?;
        }
        let targets = app
            .iter()
            .map(|&i| (&spec.containers[i], "container"))
            .chain(app_inits.iter().map(|&i| (&inits[i], "init container")));
        for (container, kind) in targets {
            if container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == mount_path)
            {
                return Err(format!(
                    "{kind} {:?} already mounts a volume at {mount_path}, the directory of the secrets ({mount_key}): choose another directory",
                    container.name
                ));
            }
        }

        // Names and ports the injection needs must be free.
        for v in spec.volumes.iter().flatten() {
            if v.name == FILES_VOLUME || v.name == TOKEN_VOLUME || v.name == BIN_VOLUME {
                return Err(format!(
                    "the pod already has a volume named {:?}, which the injector adds; rename it",
                    v.name
                ));
            }
        }
        if let Some(c) = spec
            .containers
            .iter()
            .chain(inits)
            .find(|c| c.name == INIT_NAME)
        {
            return Err(format!(
                "the pod already has a container named {:?}, which the injector adds; rename it",
                c.name
            ));
        }
        // The runner's probe port on the pod's address: for httpGet probes
        // and for the PodMonitor's scrapes; none when neither is wanted.
        let probe_port = (c.probes == ProbeKind::Http || c.pod_metrics).then_some(c.probe_port);
        if matches!(mode, Mode::Native | Mode::Fallback) {
            let taken = [
                Some((
                    c.health_port,
                    "the sidecar's loopback health port (the injector's sidecar.health_port)",
                )),
                probe_port.map(|p| {
                    (
                        p,
                        "the sidecar's probe port (the injector's sidecar.probe_port)",
                    )
                }),
            ];
            for (port, what) in taken.into_iter().flatten() {
                let port = i32::from(port);
                if let Some(other) = spec
                    .containers
                    .iter()
                    .chain(inits)
                    .find(|x| x.ports.iter().flatten().any(|p| p.container_port == port))
                {
                    return Err(format!(
                        "container {:?} declares port {port}, {what}: the two would collide in the pod's network namespace",
                        other.name
                    ));
                }
            }
        }
        if mode == Mode::Fallback && spec.restart_policy.as_deref().unwrap_or("Always") != "Always"
        {
            let how = if ann.mode.is_some() {
                format!("annotation {}", full("mode"))
            } else {
                "the injector's default mode".to_owned()
            };
            return Err(format!(
                "mode fallback ({how}) adds a regular sidecar container, which would keep a pod with restartPolicy {} from ever completing: set {} to \"once\" (or \"native\" on Kubernetes 1.29+)",
                spec.restart_policy.as_deref().unwrap_or_default(),
                full("mode")
            ));
        }
        if let Some(Notify::Signal { .. }) = &ann.notify
            && spec.share_process_namespace != Some(true)
        {
            return Err(AnnotationError::invalid(
                "notify",
                "a signal reaches another container's process only with spec.shareProcessNamespace: true (and the same UID); set it, or notify over http://127.0.0.1:PORT/path",
            )
            .to_string());
        }

        // Resources: annotations over the injector's defaults.
        let r = &ann.resources;
        let pick = |a: &Option<Quantity>, d: &Quantity| a.clone().unwrap_or_else(|| d.clone());
        let cpu_request = pick(&r.cpu_request, &c.cpu_request);
        let cpu_limit = pick(&r.cpu_limit, &c.cpu_limit);
        let memory_request = pick(&r.memory_request, &c.memory_request);
        let memory_limit = pick(&r.memory_limit, &c.memory_limit);
        for (what, req, lim, req_set) in [
            ("cpu", &cpu_request, &cpu_limit, r.cpu_request.is_some()),
            (
                "memory",
                &memory_request,
                &memory_limit,
                r.memory_request.is_some(),
            ),
        ] {
            if req.value > lim.value {
                let (key, msg) = if req_set {
                    (
                        format!("{what}-request"),
                        format!(
                            "{} is above the {what} limit {} (set {} too)",
                            req.text,
                            lim.text,
                            full(&format!("{what}-limit"))
                        ),
                    )
                } else {
                    (
                        format!("{what}-limit"),
                        format!(
                            "{} is below the default {what} request {} (set {} too)",
                            lim.text,
                            req.text,
                            full(&format!("{what}-request"))
                        ),
                    )
                };
                return Err(AnnotationError::invalid(&key, msg).to_string());
            }
        }
        let tmpfs_size = ann
            .tmpfs_size
            .clone()
            .unwrap_or_else(|| c.tmpfs_size.clone());
        if matches!(mode, Mode::Native | Mode::Fallback) && tmpfs_size.value >= memory_limit.value {
            warnings.push(format!(
                "secrets-broker: the tmpfs ({}) is charged to the sidecar's memory, whose limit is {}: raise {}",
                tmpfs_size.text,
                memory_limit.text,
                full("memory-limit")
            ));
        }
        let fs_group = spec
            .security_context
            .as_ref()
            .and_then(|s| s.fs_group)
            .filter(|g| (1..=i64::from(u32::MAX)).contains(g));
        // In mode exec the app's own UID writes (and reads) the files.
        if fs_group.is_none() && mode != Mode::Exec {
            warnings.push(format!(
                "secrets-broker: the pod sets no spec.securityContext.fsGroup, so the secret files are readable by UID {} only; set fsGroup to let the application read them",
                c.run_as_user
            ));
        }

        let sidecar_file = SidecarFile {
            sidecar: c,
            ca_pem: &self.ca_pem,
            annotations: ann,
            mount_path,
            group: fs_group,
            probe_port,
        };
        let sidecar_config = |with_health: bool| sidecar_file.render(with_health);

        let resources = ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), KubeQuantity(cpu_request.text)),
                ("memory".to_owned(), KubeQuantity(memory_request.text)),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_owned(), KubeQuantity(cpu_limit.text)),
                ("memory".to_owned(), KubeQuantity(memory_limit.text)),
            ])),
            ..Default::default()
        };
        let sidecar_mounts = vec![
            VolumeMount {
                name: FILES_VOLUME.into(),
                mount_path: mount_path.to_owned(),
                ..Default::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ];
        let base = |name: &str, args: Vec<String>, config: String| Container {
            name: name.to_owned(),
            image: Some(c.image.clone()),
            image_pull_policy: Some(c.image_pull_policy.clone()),
            args: Some(args),
            env: Some(vec![
                EnvVar {
                    name: secrets_sidecar::config::CONFIG_ENV.into(),
                    value: Some(config),
                    ..Default::default()
                },
                EnvVar {
                    name: "SECRETS_SIDECAR_LOG_FORMAT".into(),
                    value: Some("json".into()),
                    ..Default::default()
                },
            ]),
            resources: Some(resources.clone()),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(c.run_as_user),
                run_as_group: Some(c.run_as_group),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                privileged: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volume_mounts: Some(sidecar_mounts.clone()),
            ..Default::default()
        };
        let probe = |check: &str, period: i32, failures: i32| match c.probes {
            ProbeKind::Http => Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(
                        if check == "live" {
                            "/healthz"
                        } else {
                            "/readyz"
                        }
                        .into(),
                    ),
                    port: IntOrString::Int(i32::from(c.probe_port)),
                    ..Default::default()
                }),
                period_seconds: Some(period),
                failure_threshold: Some(failures),
                ..Default::default()
            },
            // Asks the loopback port; its answer (which secret, which rule)
            // goes to the pod's events, not to the pod network.
            ProbeKind::Exec => Probe {
                exec: Some(ExecAction {
                    command: Some(
                        [SIDECAR_BIN, "probe", check, "--timeout", "1s"]
                            .map(String::from)
                            .to_vec(),
                    ),
                }),
                period_seconds: Some(period),
                failure_threshold: Some(failures),
                timeout_seconds: Some(2),
                ..Default::default()
            },
        };
        let runner = |name: &str, native: bool| -> Result<Container, String> {
            Ok(Container {
                restart_policy: native.then(|| "Always".to_owned()),
                // Only what the pod network can reach: the loopback port is
                // not declared.
                ports: probe_port.map(|p| {
                    vec![ContainerPort {
                        name: Some(
                            if c.pod_metrics {
                                METRICS_PORT_NAME
                            } else {
                                PROBE_PORT_NAME
                            }
                            .into(),
                        ),
                        container_port: i32::from(p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }]
                }),
                // Up to 2 minutes to log in and write every secret; the app
                // (and later init containers) start only once it passes.
                startup_probe: Some(probe("ready", 1, 120)),
                // Not ready while a secret is missing or revoked.
                readiness_probe: Some(probe("ready", 5, 2)),
                liveness_probe: Some(probe("live", 10, 3)),
                ..base(name, vec!["run".into()], sidecar_config(true)?)
            })
        };
        let once = |name: &str| -> Result<Container, String> {
            let timeout = format!("{}s", c.once_timeout.as_secs());
            Ok(base(
                name,
                vec!["once".into(), "--timeout".into(), timeout],
                sidecar_config(false)?,
            ))
        };
        // Mode exec: the init container only copies the binary.
        let copier = || Container {
            env: None,
            volume_mounts: Some(vec![VolumeMount {
                name: BIN_VOLUME.into(),
                mount_path: BIN_DIR.into(),
                ..Default::default()
            }]),
            ..base(
                SIDECAR_NAME,
                vec!["copy-to".into(), BIN_DIR.into()],
                String::new(),
            )
        };
        let (init, regular) = match mode {
            Mode::Native => (runner(SIDECAR_NAME, true)?, None),
            Mode::Once => (once(SIDECAR_NAME)?, None),
            Mode::Fallback => (once(INIT_NAME)?, Some(runner(SIDECAR_NAME, false)?)),
            Mode::Exec => (copier(), None),
        };

        let mut volumes = vec![
            Volume {
                name: FILES_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(KubeQuantity(tmpfs_size.text.clone())),
                }),
                ..Default::default()
            },
            Volume {
                name: TOKEN_VOLUME.into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(c.token_audience.clone()),
                            expiration_seconds: Some(c.token_expiration.as_secs() as i64),
                            path: TOKEN_FILE.into(),
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        if mode == Mode::Exec {
            volumes.push(Volume {
                name: BIN_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: None,
                    size_limit: Some(KubeQuantity(BIN_SIZE.into())),
                }),
                ..Default::default()
            });
        }
        let app_mount = VolumeMount {
            name: FILES_VOLUME.into(),
            mount_path: mount_path.to_owned(),
            read_only: Some(true),
            ..Default::default()
        };

        let mut ops = Ops::default();
        ops.add(
            &["metadata", "annotations", &full("status")],
            Value::String(annotations::STATUS_INJECTED.into()),
        );
        ops.append_all(&["spec", "volumes"], spec.volumes.is_some(), &volumes)?;
        if mode == Mode::Exec {
            // The one app container (check_exec): its command wrapped, the
            // config in its environment, the files writable, the token.
            let i = app[0];
            let container = &spec.containers[i];
            let at = i.to_string();
            let mut command = vec![
                format!("{BIN_DIR}/secrets-sidecar"),
                "exec".to_owned(),
                "--".to_owned(),
            ];
            command.extend(container.command.iter().flatten().cloned());
            ops.add(&["spec", "containers", &at, "command"], to_value(&command)?);
            ops.append_all(
                &["spec", "containers", &at, "env"],
                container.env.is_some(),
                &[
                    EnvVar {
                        name: secrets_sidecar::config::CONFIG_ENV.into(),
                        value: Some(sidecar_config(false)?),
                        ..Default::default()
                    },
                    EnvVar {
                        name: "SECRETS_SIDECAR_LOG_FORMAT".into(),
                        value: Some("json".into()),
                        ..Default::default()
                    },
                ],
            )?;
            let mut mounts = sidecar_mounts.clone();
            mounts.push(VolumeMount {
                name: BIN_VOLUME.into(),
                mount_path: BIN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
            ops.append_all(
                &["spec", "containers", &at, "volumeMounts"],
                container.volume_mounts.is_some(),
                &mounts,
            )?;
        }
        let app = if mode == Mode::Exec { Vec::new() } else { app };
        for &i in &app {
            let has = spec.containers[i].volume_mounts.is_some();
            ops.append_all(
                &["spec", "containers", &i.to_string(), "volumeMounts"],
                has,
                std::slice::from_ref(&app_mount),
            )?;
        }
        for &i in &app_inits {
            let has = inits[i].volume_mounts.is_some();
            ops.append_all(
                &["spec", "initContainers", &i.to_string(), "volumeMounts"],
                has,
                std::slice::from_ref(&app_mount),
            )?;
        }
        if spec.init_containers.is_some() {
            ops.add(&["spec", "initContainers", "0"], to_value(&init)?);
        } else {
            ops.add(&["spec", "initContainers"], to_value(&[init])?);
        }
        if let Some(regular) = regular {
            ops.add(&["spec", "containers", "-"], to_value(&regular)?);
        }
        Ok(Decision::Inject {
            patch: Patch(ops.0),
            mode,
            warnings,
        })
    }
}
