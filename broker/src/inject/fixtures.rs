//! Fixture tests: real `AdmissionReview` documents (`testdata/*.json`) of the
//! shapes the API server sends (defaulted pods, service-account volumes,
//! owner references), answered by [`super::review`]; each patch is applied
//! with `json_patch` and the resulting pod inspected as a `k8s_openapi` Pod.
//!
//! The patched pods are kept in `deploy/tests/fixtures/injected/`: compared
//! here byte for byte, and validated against the Kubernetes schemas by
//! `scripts/check-deploy.sh`. After an intended change, regenerate them with
//! `UPDATE_INJECTED_FIXTURES=1 cargo test -p secrets-broker --lib inject`.

use std::path::PathBuf;

use base64::Engine;
use json_patch::{Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;

use super::annotations::PREFIX;
use super::layout::{
    BIN_DIR, BIN_VOLUME, FILES_VOLUME, INIT_NAME, SIDECAR_BIN, SIDECAR_NAME, TOKEN_DIR,
    TOKEN_VOLUME,
};
use super::{Config, Injector, review};

const INJECTED: &[&str] = &[
    "several-containers",
    "init-containers",
    "job-once",
    "fallback",
    "exec",
];

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/inject/testdata")
        .join(name)
}

fn injector() -> Injector {
    injector_with("")
}

/// The fixtures' injector with `sidecar_keys` added to its `[sidecar]` table.
fn injector_with(sidecar_keys: &str) -> Injector {
    let path = testdata("inject.toml");
    let text = std::fs::read_to_string(&path).expect("testdata/inject.toml");
    let text = text.replace("[sidecar]\n", &format!("[sidecar]\n{sidecar_keys}\n"));
    let cfg = Config::parse(&text, &path).expect("testdata/inject.toml");
    Injector::new(cfg, &path).expect("testdata/broker-ca.crt")
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(testdata(&format!("{name}.json"))).expect(name);
    serde_json::from_str(&text).expect(name)
}

/// The response of a review, taken apart.
#[derive(Debug)]
struct Answer {
    uid: String,
    allowed: bool,
    patch: Option<Patch>,
    /// The patch as sent (base64 of the JSON).
    patch_bytes: Option<Vec<u8>>,
    message: String,
    warnings: Vec<String>,
    result: &'static str,
}

fn ask(doc: &Value) -> Answer {
    ask_with(&injector(), doc)
}

fn ask_with(injector: &Injector, doc: &Value) -> Answer {
    let body = serde_json::to_vec(doc).unwrap();
    let outcome = review(injector, &body);
    let text = outcome.response.expect("a review answer");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    let r = &v["response"];
    let patch_bytes = r["patch"].as_str().map(|b| {
        assert_eq!(r["patchType"], "JSONPatch");
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .expect("patch is base64")
    });
    Answer {
        uid: r["uid"].as_str().unwrap().to_owned(),
        allowed: r["allowed"].as_bool().unwrap(),
        patch: patch_bytes
            .as_ref()
            .map(|b| serde_json::from_slice(b).expect("patch is a JSON Patch")),
        patch_bytes,
        message: r["status"]["message"].as_str().unwrap_or("").to_owned(),
        warnings: r["warnings"]
            .as_array()
            .map(|w| w.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default(),
        result: outcome.result,
    }
}

/// Applies `patch` to the review's object, as the API server does.
fn apply(doc: &Value, patch: &Patch) -> (Value, Pod) {
    let mut object = doc["request"]["object"].clone();
    json_patch::patch(&mut object, patch).expect("the patch applies");
    let pod: Pod = serde_json::from_value(object.clone()).expect("the result is a Pod");
    (object, pod)
}

fn injected(name: &str) -> (Value, Pod, Answer) {
    let doc = fixture(name);
    let answer = ask(&doc);
    assert!(answer.allowed, "{name}: {}", answer.message);
    assert_eq!(answer.result, "injected");
    assert_eq!(answer.uid, doc["request"]["uid"].as_str().unwrap());
    let patch = answer.patch.clone().expect("a patch");
    let (_, pod) = apply(&doc, &patch);
    (doc, pod, answer)
}

fn containers(pod: &Pod) -> &[Container] {
    &pod.spec.as_ref().unwrap().containers
}

fn inits(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_deref()
        .unwrap_or_default()
}

fn env(c: &Container, name: &str) -> String {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("{}: no env {name}", c.name))
}

/// The sidecar config a container carries, parsed as the sidecar parses it.
fn sidecar_config(c: &Container) -> secrets_sidecar::config::Config {
    let text = env(c, secrets_sidecar::config::CONFIG_ENV);
    secrets_sidecar::config::Config::parse(&text, std::path::Path::new("env"))
        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", c.name))
}

fn mount<'a>(
    c: &'a Container,
    volume: &str,
) -> Option<&'a k8s_openapi::api::core::v1::VolumeMount> {
    c.volume_mounts.iter().flatten().find(|m| m.name == volume)
}

/// The hardening of deploy/ (deploy/tests/check_hardening.py) on an
/// injected container, and the token mounted read-only.
fn assert_hardened(c: &Container) {
    assert_secure(c);
    let token = mount(c, TOKEN_VOLUME).expect("token mount");
    assert_eq!(token.mount_path, TOKEN_DIR);
    assert_eq!(token.read_only, Some(true));
}

/// The hardening of deploy/ on an injected container.
fn assert_secure(c: &Container) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.run_as_group, Some(65532));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(caps.add.is_none());
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let res = c.resources.as_ref().unwrap();
    for section in [&res.requests, &res.limits] {
        let section = section.as_ref().unwrap();
        assert!(section.contains_key("cpu") && section.contains_key("memory"));
    }
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/example-org/secrets-sidecar:0.1.0")
    );
}

/// Startup and readiness on `/readyz`, liveness on `/healthz`, all httpGet
/// on `port`.
fn assert_http_probes(c: &Container, port: i32) {
    for (probe, path) in [
        (&c.startup_probe, "/readyz"),
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let probe = probe
            .as_ref()
            .unwrap_or_else(|| panic!("{}: {path}", c.name));
        let get = probe.http_get.as_ref().expect("httpGet");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
        assert!(probe.exec.is_none());
    }
}

/// The container's declared ports, exactly: (name, number).
fn assert_ports(c: &Container, want: &[(&str, i32)]) {
    let got: Vec<(&str, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(got, want, "{}", c.name);
}

fn assert_volumes(pod: &Pod, size: &str) {
    let volumes = pod.spec.as_ref().unwrap().volumes.as_deref().unwrap();
    let files = volumes.iter().find(|v| v.name == FILES_VOLUME).unwrap();
    let ed = files.empty_dir.as_ref().unwrap();
    assert_eq!(ed.medium.as_deref(), Some("Memory"));
    assert_eq!(ed.size_limit.as_ref().unwrap().0, size);
    let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
    let sources = token
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_deref()
        .unwrap();
    let sat = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(sat.audience.as_deref(), Some("secrets-broker"));
    assert_eq!(sat.expiration_seconds, Some(600));
    assert_eq!(sat.path, "token");
}

fn status(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(&format!("{PREFIX}status")))
        .map(String::as_str)
}

#[test]
fn several_containers_get_a_native_sidecar_and_read_only_mounts() {
    let (doc, pod, answer) = injected("several-containers");
    assert!(answer.warnings.is_empty(), "{:?}", answer.warnings);
    assert_eq!(status(&pod), Some("injected"));
    // The sidecar is the first (and here only) init container: native.
    let sidecar = &inits(&pod)[0];
    assert_eq!(sidecar.name, SIDECAR_NAME);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.args.as_deref(), Some(&["run".to_owned()][..]));
    // Probes: httpGet on the status-only probe port; the only port declared.
    assert_http_probes(sidecar, 8098);
    assert_ports(sidecar, &[("sidecar-probe", 8098)]);
    assert_hardened(sidecar);
    let files = mount(sidecar, FILES_VOLUME).unwrap();
    assert_eq!(files.mount_path, "/secrets");
    assert_ne!(files.read_only, Some(true), "the sidecar writes the files");
    // Every app container gets the files read-only; its other mounts stay.
    for c in containers(&pod) {
        let m = mount(c, FILES_VOLUME).unwrap_or_else(|| panic!("{}", c.name));
        assert_eq!(m.mount_path, "/secrets");
        assert_eq!(m.read_only, Some(true));
        assert!(mount(c, "kube-api-access-x7k2p").is_some());
        assert!(
            mount(c, TOKEN_VOLUME).is_none(),
            "the token is the sidecar's"
        );
    }
    // Existing volumes stay, in order, and the two new ones follow.
    let names: Vec<&str> = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "app-config",
            "tmp",
            "kube-api-access-x7k2p",
            FILES_VOLUME,
            TOKEN_VOLUME
        ]
    );
    assert_volumes(&pod, "4Mi");
    // Its config: the annotations, the CA inline, files in the shared volume.
    let cfg = sidecar_config(sidecar);
    assert_eq!(cfg.role, "payments-api");
    assert_eq!(cfg.dir, std::path::Path::new("/secrets"));
    assert_eq!(cfg.group, Some(2000), "the pod's fsGroup");
    assert_eq!(
        cfg.token_file,
        std::path::Path::new("/var/run/secrets/secrets-broker/token")
    );
    // The detail (secret names, rule IDs) on loopback; the pod address gets
    // the probe port, without metrics.
    assert_eq!(cfg.health_listen, Some("127.0.0.1:8099".parse().unwrap()));
    assert!(!cfg.health_listen_default);
    assert_eq!(cfg.probe_listen, Some("0.0.0.0:8098".parse().unwrap()));
    assert!(!cfg.probe_metrics && !cfg.metrics_secret_names);
    let ca = std::fs::read_to_string(testdata("broker-ca.crt")).unwrap();
    assert_eq!(cfg.ca, secrets_sidecar::config::CaSource::Pem(ca));
    let secrets: Vec<(&str, Option<&str>)> = cfg
        .secrets
        .iter()
        .map(|s| (s.name.as_str(), s.file.as_deref()))
        .collect();
    assert_eq!(
        secrets,
        [
            ("payments/api-key", Some("api-key")),
            ("payments/db-password", Some("db-password")),
            ("payments/db-user", None),
        ]
    );
    assert_eq!(cfg.templates[0].file, "db.env");
    assert!(cfg.templates[0].source.contains("DB_PASSWORD={{"));
    assert_eq!(
        cfg.notify.http_post.as_deref(),
        Some("http://127.0.0.1:8080/-/reload")
    );
    // Other annotations and labels are untouched.
    let before = &doc["request"]["object"]["metadata"];
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()["kubectl.kubernetes.io/restartedAt"],
        before["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .as_str()
            .unwrap()
    );
    assert_eq!(
        pod.metadata.generate_name.as_deref(),
        before["generateName"].as_str()
    );
}

#[test]
fn existing_init_containers_run_after_the_sidecar_and_can_be_given_the_files() {
    let (_, pod, answer) = injected("init-containers");
    let names: Vec<&str> = inits(&pod).iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [SIDECAR_NAME, "wait-for-db", "migrate"]);
    // Only the named containers get the files, at the chosen path.
    let get = |list: &[Container], n: &str| list.iter().find(|c| c.name == n).cloned().unwrap();
    let migrate = get(inits(&pod), "migrate");
    let m = mount(&migrate, FILES_VOLUME).expect("migrate gets the files");
    assert_eq!(m.mount_path, "/var/run/app-secrets");
    assert_eq!(m.read_only, Some(true));
    assert!(mount(&get(inits(&pod), "wait-for-db"), FILES_VOLUME).is_none());
    assert!(mount(&get(containers(&pod), "app"), FILES_VOLUME).is_some());
    assert!(mount(&get(containers(&pod), "metrics-exporter"), FILES_VOLUME).is_none());
    let sidecar = &inits(&pod)[0];
    let res = sidecar.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "48Mi");
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "16Mi");
    let cfg = sidecar_config(sidecar);
    assert_eq!(cfg.ttl, Some(std::time::Duration::from_secs(900)));
    assert_eq!(cfg.dir, std::path::Path::new("/var/run/app-secrets"));
    assert!(answer.warnings.is_empty());
}

#[test]
fn job_pod_in_once_mode_gets_an_init_container_and_new_arrays() {
    let (doc, pod, _) = injected("job-once");
    // The pod had no initContainers and no volumes: the patch adds the arrays.
    let object = &doc["request"]["object"]["spec"];
    assert!(object.get("initContainers").is_none() && object.get("volumes").is_none());
    let patch = ask(&doc).patch.unwrap();
    let paths: Vec<String> = patch
        .0
        .iter()
        .map(|op| match op {
            PatchOperation::Add(a) => a.path.to_string(),
            other => panic!("not an add: {other:?}"),
        })
        .collect();
    assert!(
        paths.contains(&"/spec/initContainers".to_owned()),
        "{paths:?}"
    );
    assert!(paths.contains(&"/spec/volumes".to_owned()), "{paths:?}");
    assert!(
        paths.contains(&"/spec/containers/0/volumeMounts".to_owned()),
        "{paths:?}"
    );
    assert_eq!(inits(&pod).len(), 1);
    let once = &inits(&pod)[0];
    assert_eq!(once.name, SIDECAR_NAME);
    assert_eq!(once.restart_policy, None, "a plain init container");
    assert_eq!(once.args.as_deref().unwrap(), ["once", "--timeout", "60s"]);
    assert!(once.startup_probe.is_none() && once.ports.is_none());
    assert_hardened(once);
    assert!(sidecar_config(once).health_listen.is_none());
    assert_eq!(
        containers(&pod).len(),
        1,
        "no long-running sidecar in a Job"
    );
    assert!(mount(&containers(&pod)[0], FILES_VOLUME).is_some());
    assert_eq!(
        pod.spec.as_ref().unwrap().restart_policy.as_deref(),
        Some("Never")
    );
    assert_volumes(&pod, "4Mi");
}

#[test]
fn fallback_mode_adds_a_once_init_container_and_a_regular_sidecar() {
    let (_, pod, answer) = injected("fallback");
    let init = &inits(&pod)[0];
    assert_eq!(init.name, INIT_NAME);
    assert_eq!(init.args.as_deref().unwrap()[0], "once");
    assert_eq!(init.restart_policy, None);
    let sidecar = containers(&pod).last().unwrap();
    assert_eq!(sidecar.name, SIDECAR_NAME);
    assert_eq!(sidecar.restart_policy, None);
    assert_eq!(sidecar.args.as_deref().unwrap(), ["run"]);
    assert_http_probes(sidecar, 8098);
    assert_ports(sidecar, &[("sidecar-probe", 8098)]);
    assert!(init.ports.is_none() && init.startup_probe.is_none());
    assert_hardened(init);
    assert_hardened(sidecar);
    assert_eq!(
        sidecar.resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0,
        "100m"
    );
    assert_volumes(&pod, "1Mi");
    // The app (and not the sidecar) has the read-only mount.
    assert_eq!(
        mount(&containers(&pod)[0], FILES_VOLUME).unwrap().read_only,
        Some(true)
    );
    // No fsGroup: the pod is injected, with a warning saying why it matters.
    assert_eq!(answer.warnings.len(), 1, "{:?}", answer.warnings);
    assert!(
        answer.warnings[0].contains("fsGroup"),
        "{:?}",
        answer.warnings
    );
    assert_eq!(sidecar_config(sidecar).group, None);
}

#[test]
fn exec_mode_wraps_the_command_after_copying_the_binary_in() {
    let (doc, pod, answer) = injected("exec");
    assert!(answer.warnings.is_empty(), "{:?}", answer.warnings);
    assert_eq!(status(&pod), Some("injected"));
    // The init container only copies the binary into the shared volume.
    assert_eq!(inits(&pod).len(), 1);
    let copy = &inits(&pod)[0];
    assert_eq!(copy.name, SIDECAR_NAME);
    assert_eq!(copy.restart_policy, None, "a plain init container");
    assert_eq!(copy.args.as_deref().unwrap(), ["copy-to", BIN_DIR]);
    assert!(copy.env.is_none(), "no config: it only copies");
    assert!(copy.startup_probe.is_none() && copy.ports.is_none());
    assert_secure(copy);
    let bin = mount(copy, BIN_VOLUME).unwrap();
    assert_eq!(bin.mount_path, BIN_DIR);
    assert_ne!(bin.read_only, Some(true));
    assert!(mount(copy, TOKEN_VOLUME).is_none());

    // The named container runs its command under exec; its args follow.
    let before = &doc["request"]["object"]["spec"]["containers"][0];
    let worker = &containers(&pod)[0];
    assert_eq!(worker.name, "worker");
    assert_eq!(
        worker.command.as_deref().unwrap(),
        [
            "/secrets-bin/secrets-sidecar",
            "exec",
            "--",
            "/app/payments-worker"
        ]
    );
    assert_eq!(
        serde_json::to_value(&worker.args).unwrap(),
        before["args"],
        "args unchanged"
    );
    assert_eq!(env(worker, "LOG_LEVEL"), "info", "its own env stays");
    assert_eq!(env(worker, "SECRETS_SIDECAR_LOG_FORMAT"), "json");
    assert_eq!(worker.security_context, None, "its own security context");
    let files = mount(worker, FILES_VOLUME).unwrap();
    assert_eq!(files.mount_path, "/secrets");
    assert_ne!(files.read_only, Some(true), "exec writes the files");
    let token = mount(worker, TOKEN_VOLUME).unwrap();
    assert_eq!(
        (token.mount_path.as_str(), token.read_only),
        (TOKEN_DIR, Some(true))
    );
    let bin = mount(worker, BIN_VOLUME).unwrap();
    assert_eq!(
        (bin.mount_path.as_str(), bin.read_only),
        (BIN_DIR, Some(true))
    );
    assert!(mount(worker, "app-config").is_some(), "its mounts stay");
    // The other container is left as it was.
    let shipper = &containers(&pod)[1];
    assert_eq!(
        serde_json::to_value(shipper).unwrap(),
        doc["request"]["object"]["spec"]["containers"][1]
    );

    // The config exec reads: env entries, on_change, on_revoke, a file.
    let cfg = sidecar_config(worker);
    assert!(cfg.health_listen.is_none());
    assert_eq!(cfg.dir, std::path::Path::new("/secrets"));
    assert_eq!(cfg.group, Some(2000));
    let vars: Vec<(&str, String)> = cfg
        .exec
        .env
        .iter()
        .map(|e| (e.name.as_str(), format!("{:?}", e.source)))
        .collect();
    assert_eq!(
        vars,
        [
            ("API_KEY", "Secret(\"payments/api-key\")".to_owned()),
            ("DB_PASSWORD", "Secret(\"payments/db-password\")".to_owned())
        ]
    );
    assert_eq!(
        cfg.exec.on_change,
        secrets_sidecar::config::OnChange::Restart
    );
    assert_eq!(cfg.exec.on_revoke, secrets_sidecar::config::OnRevoke::Stop);
    let secrets: Vec<(&str, Option<&str>)> = cfg
        .secrets
        .iter()
        .map(|s| (s.name.as_str(), s.file.as_deref()))
        .collect();
    assert_eq!(
        secrets,
        [
            ("payments/ca", Some("ca.crt")),
            ("payments/api-key", None),
            ("payments/db-password", None)
        ]
    );
    let volumes = pod.spec.as_ref().unwrap().volumes.as_deref().unwrap();
    let bin = volumes.iter().find(|v| v.name == BIN_VOLUME).unwrap();
    let ed = bin.empty_dir.as_ref().unwrap();
    assert_eq!(ed.medium, None, "the binary is no secret: not in memory");
    assert_eq!(ed.size_limit.as_ref().unwrap().0, "32Mi");
    assert_volumes(&pod, "4Mi");
}

#[test]
fn exec_mode_is_denied_where_the_command_is_not_known() {
    // Two containers and none named: which command?
    let m = denied(&with_annotation("exec", "containers", None));
    assert!(
        m.contains("mode exec wraps one container's command")
            && m.contains("(worker, log-shipper)")
            && m.contains("secrets-broker.io/containers"),
        "{m}"
    );
    // A container without an explicit command: its entrypoint is the image's.
    let m = denied(&with_annotation("exec", "containers", Some("log-shipper")));
    assert!(
        m.contains("container \"log-shipper\" sets no command")
            && m.contains("entrypoint is not known at admission"),
        "{m}"
    );
    // An empty command is no command.
    let mut doc = fixture("exec");
    doc["request"]["object"]["spec"]["containers"][0]["command"] = serde_json::json!([]);
    assert!(denied(&doc).contains("sets no command"));
    // env-<NAME> needs mode exec.
    let m = denied(&with_annotation("exec", "mode", Some("native")));
    assert!(
        m.contains("secrets-broker.io/env-API_KEY") && m.contains("only with"),
        "{m}"
    );
    // The container sets the config variable itself.
    let mut doc = fixture("exec");
    doc["request"]["object"]["spec"]["containers"][0]["env"] =
        serde_json::json!([{ "name": "SECRETS_SIDECAR_CONFIG", "value": "x" }]);
    assert!(denied(&doc).contains("already sets SECRETS_SIDECAR_CONFIG"));
    // A volume of ours exists already.
    let mut doc = fixture("exec");
    doc["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "name": BIN_VOLUME, "emptyDir": {} }));
    assert!(denied(&doc).contains(BIN_VOLUME));
    // The mount path would hide the binary.
    let m = denied(&with_annotation("exec", "mount-path", Some("/secrets-bin")));
    assert!(m.contains("secrets-broker.io/mount-path"), "{m}");
}

#[test]
fn injected_pods_are_left_alone() {
    let doc = fixture("already-injected");
    let a = ask(&doc);
    assert!(a.allowed && a.patch.is_none(), "{a:?}");
    assert_eq!(a.result, "already_injected");
    assert_eq!(a.uid, doc["request"]["uid"].as_str().unwrap());
    // Every pod the injector produced is left alone when it comes back
    // (reinvocation, or a pod re-created from its own JSON).
    for name in INJECTED {
        let doc = fixture(name);
        let patch = ask(&doc).patch.unwrap();
        let (object, _) = apply(&doc, &patch);
        let mut again = doc.clone();
        again["request"]["object"] = object;
        let a = ask(&again);
        assert!(a.allowed && a.patch.is_none(), "{name}: {a:?}");
        assert_eq!(a.result, "already_injected", "{name}");
    }
    // A container named secrets-sidecar is enough, with or without the status.
    let mut doc = fixture("already-injected");
    let ann = doc["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap();
    ann.remove(&format!("{PREFIX}status"));
    let a = ask(&doc);
    assert!(a.allowed && a.patch.is_none());
}

#[test]
fn pods_without_annotations_and_other_requests_are_allowed_unchanged() {
    for (name, result) in [
        ("not-annotated", "not_requested"),
        ("excluded-namespace", "excluded"),
        ("update", "ignored"),
    ] {
        let doc = fixture(name);
        let a = ask(&doc);
        assert!(a.allowed, "{name}: {a:?}");
        assert!(a.patch.is_none(), "{name}");
        assert_eq!(a.result, result, "{name}");
        assert_eq!(a.uid, doc["request"]["uid"].as_str().unwrap());
    }
    // inject: "false" with valid annotations: nothing happens.
    let mut doc = fixture("several-containers");
    doc["request"]["object"]["metadata"]["annotations"][format!("{PREFIX}inject")] =
        Value::from("false");
    let a = ask(&doc);
    assert!(a.allowed && a.patch.is_none());
    assert_eq!(a.result, "not_requested");
}

fn with_annotation(base: &str, key: &str, value: Option<&str>) -> Value {
    let mut doc = fixture(base);
    let ann = doc["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap();
    match value {
        Some(v) => {
            ann.insert(format!("{PREFIX}{key}"), Value::from(v));
        }
        None => {
            ann.remove(&format!("{PREFIX}{key}"));
        }
    }
    doc
}

fn denied(doc: &Value) -> String {
    let a = ask(doc);
    assert!(!a.allowed, "allowed: {a:?}");
    assert!(a.patch.is_none());
    assert_eq!(a.result, "denied");
    assert_eq!(a.uid, doc["request"]["uid"].as_str().unwrap());
    a.message
}

#[test]
fn bad_annotations_are_denied_naming_the_annotation() {
    let cases = [
        // (annotation, value, words the message must contain)
        ("injcet", "true", "unknown annotation"),
        (
            "secret-db-password",
            "payments/../admin",
            "starting with '.'",
        ),
        ("secret-db-password", "payments/db password", "contains ' '"),
        (
            "secret-..db",
            "payments/x",
            "file name \"..db\" is not allowed",
        ),
        ("template-.env", "A=1", "file name \".env\" is not allowed"),
        ("memory-limit", "32MB", "not a Kubernetes quantity"),
        ("cpu-request", "lots", "not a Kubernetes quantity"),
        ("inject", "yes", "not a boolean"),
        ("mode", "sidecar", "use native, once"),
        ("template-db.env", "{{ secrets[", "syntax error"),
    ];
    for (key, value, words) in cases {
        let doc = with_annotation("several-containers", key, Some(value));
        let message = denied(&doc);
        assert!(
            message.contains(&format!("{PREFIX}{key}")),
            "{key}={value}: {message}"
        );
        assert!(message.contains(words), "{key}={value}: {message}");
    }
}

#[test]
fn pods_the_sidecar_cannot_join_are_denied_with_the_reason() {
    // A container name that does not exist.
    let doc = with_annotation("several-containers", "containers", Some("app,wokrer"));
    let m = denied(&doc);
    assert!(
        m.contains("secrets-broker.io/containers") && m.contains("\"wokrer\""),
        "{m}"
    );
    // The mount path is taken in a selected container.
    let doc = with_annotation("several-containers", "mount-path", Some("/etc/app"));
    let m = denied(&doc);
    assert!(
        m.contains("\"app\" already mounts") && m.contains("secrets-broker.io/mount-path"),
        "{m}"
    );
    // A container declares the sidecar's health port.
    let mut doc = fixture("several-containers");
    doc["request"]["object"]["spec"]["containers"][1]["ports"] =
        serde_json::json!([{ "containerPort": 8099, "protocol": "TCP" }]);
    let m = denied(&doc);
    assert!(
        m.contains("\"log-shipper\" declares port 8099") && m.contains("loopback health port"),
        "{m}"
    );
    // ... or its probe port.
    let mut doc = fixture("several-containers");
    doc["request"]["object"]["spec"]["containers"][1]["ports"] =
        serde_json::json!([{ "containerPort": 8098, "protocol": "TCP" }]);
    let m = denied(&doc);
    assert!(
        m.contains("\"log-shipper\" declares port 8098") && m.contains("sidecar.probe_port"),
        "{m}"
    );
    // Which exec probes do not use: the port is then free for the app.
    let exec = injector_with("probes = \"exec\"");
    assert!(ask_with(&exec, &doc).allowed);
    // Fallback mode in a Job would never complete.
    let doc = with_annotation("job-once", "mode", Some("fallback"));
    let m = denied(&doc);
    assert!(
        m.contains("secrets-broker.io/mode") && m.contains("restartPolicy Never"),
        "{m}"
    );
    // A signal needs a shared process namespace.
    let doc = with_annotation("several-containers", "notify", Some("signal:HUP:api"));
    let m = denied(&doc);
    assert!(
        m.contains("secrets-broker.io/notify") && m.contains("shareProcessNamespace"),
        "{m}"
    );
    let mut doc = doc;
    doc["request"]["object"]["spec"]["shareProcessNamespace"] = Value::from(true);
    assert!(ask(&doc).allowed);
    // A volume of ours already exists (but no sidecar: not injected before).
    let mut doc = fixture("several-containers");
    doc["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "name": FILES_VOLUME, "emptyDir": {} }));
    let m = denied(&doc);
    assert!(m.contains(FILES_VOLUME), "{m}");
    // A resource annotation against the defaults.
    let doc = with_annotation("several-containers", "memory-request", Some("64Mi"));
    let m = denied(&doc);
    assert!(
        m.contains("secrets-broker.io/memory-request") && m.contains("32Mi"),
        "{m}"
    );
}

#[test]
fn pod_metrics_serve_metrics_on_the_probe_port_and_exec_probes_need_no_port() {
    let doc = fixture("several-containers");
    let patched = |inj: &Injector| {
        let answer = ask_with(inj, &doc);
        assert!(answer.allowed, "{}", answer.message);
        apply(&doc, &answer.patch.unwrap()).1
    };
    let sidecar = |pod: &Pod| inits(pod)[0].clone();

    // pod_metrics: /metrics on the probe port, named for the PodMonitor;
    // the detail stays on loopback.
    let pod = patched(&injector_with("pod_metrics = true"));
    let sc = sidecar(&pod);
    assert_ports(&sc, &[("sidecar-http", 8098)]);
    assert_http_probes(&sc, 8098);
    let cfg = sidecar_config(&sc);
    assert_eq!(cfg.health_listen, Some("127.0.0.1:8099".parse().unwrap()));
    assert_eq!(cfg.probe_listen, Some("0.0.0.0:8098".parse().unwrap()));
    assert!(cfg.probe_metrics && !cfg.metrics_secret_names);

    // exec probes: secrets-sidecar probe against loopback; nothing on the
    // pod's address, no port declared.
    let pod = patched(&injector_with("probes = \"exec\""));
    let sc = sidecar(&pod);
    assert!(sc.ports.is_none(), "{:?}", sc.ports);
    for (probe, check) in [
        (&sc.startup_probe, "ready"),
        (&sc.readiness_probe, "ready"),
        (&sc.liveness_probe, "live"),
    ] {
        let probe = probe.as_ref().unwrap();
        assert!(probe.http_get.is_none());
        assert_eq!(
            probe.exec.as_ref().unwrap().command.as_deref().unwrap(),
            [SIDECAR_BIN, "probe", check, "--timeout", "1s"]
        );
    }
    let cfg = sidecar_config(&sc);
    assert_eq!(cfg.health_listen, Some("127.0.0.1:8099".parse().unwrap()));
    assert_eq!(cfg.probe_listen, None);

    // Both: the port for the PodMonitor only.
    let pod = patched(&injector_with("probes = \"exec\"\npod_metrics = true"));
    let sc = sidecar(&pod);
    assert_ports(&sc, &[("sidecar-http", 8098)]);
    assert!(sc.readiness_probe.as_ref().unwrap().exec.is_some());
    assert!(sidecar_config(&sc).probe_metrics);
}

#[test]
fn patches_only_add_and_are_deterministic() {
    for name in INJECTED {
        let doc = fixture(name);
        let first = ask(&doc);
        let second = ask(&doc);
        assert_eq!(first.patch_bytes, second.patch_bytes, "{name}");
        for op in &first.patch.unwrap().0 {
            assert!(matches!(op, PatchOperation::Add(_)), "{name}: {op:?}");
        }
        // The annotations' order in the document does not matter.
        let mut shuffled = doc.clone();
        let ann = shuffled["request"]["object"]["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .clone();
        let mut reversed = serde_json::Map::new();
        for (k, v) in ann.iter().rev() {
            reversed.insert(k.clone(), v.clone());
        }
        shuffled["request"]["object"]["metadata"]["annotations"] = Value::Object(reversed);
        assert_eq!(ask(&shuffled).patch_bytes, second.patch_bytes, "{name}");
    }
}

#[test]
fn injected_pods_match_the_committed_fixtures() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/tests/fixtures/injected");
    let update = std::env::var_os("UPDATE_INJECTED_FIXTURES").is_some();
    let mut stale = Vec::new();
    for name in INJECTED {
        let (_, pod, _) = injected(name);
        let text = serde_json::to_string_pretty(&pod).unwrap() + "\n";
        let path = dir.join(format!("{name}.json"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "injected pods differ from {stale:?}: if the change is intended, run UPDATE_INJECTED_FIXTURES=1 cargo test -p secrets-broker --lib inject"
    );
}

#[test]
fn malformed_reviews_are_bad_requests() {
    let inj = injector();
    for body in [
        &b"not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        let o = review(&inj, body);
        assert!(o.response.is_err(), "{}", String::from_utf8_lossy(body));
        assert_eq!(o.result, "bad_request");
    }
    // A pod the typed model cannot read is denied, not injected blindly.
    let mut doc = fixture("several-containers");
    doc["request"]["object"]["spec"]["containers"] = Value::from("not a list");
    let m = denied(&doc);
    assert!(m.contains("cannot be read"), "{m}");
}
