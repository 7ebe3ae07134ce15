//! The injection webhook end to end: the real `secrets-broker inject` binary
//! over HTTPS answers AdmissionReviews as the API server sends them (a patch,
//! a denial), serves its probes and metrics, reloads a renewed certificate,
//! drains on SIGTERM; and the sidecar config it injects, given to the real
//! `secrets-sidecar` in its environment variable, fetches from a real broker.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use secrets_broker::dev::issuer::Workload;
use secrets_broker::dev::tls::DevTls;
use secrets_broker_e2e::{
    AUDIENCE, Proc, Tmpfs, World, bin, free_port, http_get, out_text, wait_for,
};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../broker/src/inject/testdata")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn inject_config(dir: &Path, port: u16, ops_port: u16, broker_url: &str, ca: &Path) -> PathBuf {
    let path = dir.join("inject.toml");
    std::fs::write(
        &path,
        format!(
            r#"exclude_namespaces = ["secrets-broker"]

[server]
listen = "127.0.0.1:{port}"
ops_listen = "127.0.0.1:{ops_port}"
tls_cert_file = "tls/tls.crt"
tls_key_file = "tls/tls.key"
tls_reload_interval = "1s"
shutdown_grace = "2s"

[sidecar]
image = "ghcr.io/example-org/secrets-sidecar:0.1.0"
broker_url = "{broker_url}"
broker_ca_file = "{ca}"
"#,
            ca = ca.display()
        ),
    )
    .unwrap();
    path
}

/// An HTTPS client that trusts only `ca`.
fn client(ca: &Path) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn post_review(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    port: u16,
    body: &Value,
) -> (u16, Value) {
    rt.block_on(async {
        let r = client
            .post(format!("https://localhost:{port}/mutate"))
            .json(body)
            .send()
            .await
            .expect("POST /mutate");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
        )
    })
}

fn get(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    port: u16,
    path: &str,
) -> (u16, String) {
    rt.block_on(async {
        let r = client
            .get(format!("https://localhost:{port}{path}"))
            .send()
            .await
            .expect("GET");
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

#[test]
fn webhook_answers_reviews_over_https_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let tls = DevTls::generate().unwrap();
    let files = tls.write(&dir.path().join("tls")).unwrap();
    let (port, ops_port) = (free_port(), free_port());
    let cfg = inject_config(
        dir.path(),
        port,
        ops_port,
        "https://secrets-broker.secrets-broker.svc:8443",
        &files.ca,
    );

    // --help documents the subcommand; a bad config stops it with file and key.
    let help = Command::new(bin("secrets-broker"))
        .args(["inject", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--config") && text.contains("AdmissionReview"),
        "{text}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("secrets-sidecar:0.1.0", "secrets-sidecar:latest"),
    )
    .unwrap();
    let out = Command::new(bin("secrets-broker"))
        .args(["inject", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", out_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("`sidecar.image`"),
        "{err}"
    );

    let mut proc = Proc::spawn(
        Command::new(bin("secrets-broker"))
            .args(["inject", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info"),
        dir.path().join("inject.log"),
    )
    .unwrap();
    wait_for("injector listening", LONG, || {
        proc.log_text()
            .contains("injection webhook listening")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_text()));
    let rt = runtime();
    let https = client(&files.ca);

    // A pod that asks for injection: allowed with a base64 JSON Patch of adds.
    let review = fixture("several-containers");
    let (status, answer) = post_review(&rt, &https, port, &review);
    assert_eq!(status, 200, "{answer}");
    let r = &answer["response"];
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(r["uid"], review["request"]["uid"]);
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().expect("base64 patch"))
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    assert!(!ops.is_empty());
    assert!(ops.iter().all(|op| op["op"] == "add"), "{ops:?}");
    assert!(
        ops.iter().any(|op| op["path"] == "/spec/initContainers"
            && op["value"][0]["name"] == "secrets-sidecar"),
        "{ops:?}"
    );

    // A typo under our prefix: denied, naming the annotation.
    let mut typo = fixture("several-containers");
    typo["request"]["uid"] = json!("d3a1c0de-0000-4000-8000-000000000001");
    typo["request"]["object"]["metadata"]["annotations"]["secrets-broker.io/secret-db-password"] =
        json!("payments/../admin");
    let (status, answer) = post_review(&rt, &https, port, &typo);
    assert_eq!(status, 200);
    let r = &answer["response"];
    assert_eq!(r["uid"], "d3a1c0de-0000-4000-8000-000000000001");
    assert_eq!(r["allowed"], false);
    assert!(r.get("patch").is_none());
    let message = r["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("secrets-broker.io/secret-db-password"),
        "{message}"
    );

    // Not a review at all: 400.
    let (status, _) = post_review(&rt, &https, port, &json!({ "hello": "world" }));
    assert_eq!(status, 400);

    // Probes and metrics, on the HTTPS port and the plain ops port.
    assert_eq!(get(&rt, &https, port, "/healthz").0, 200);
    assert_eq!(get(&rt, &https, port, "/readyz").0, 200);
    let (status, metrics) = get(&rt, &https, port, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "secrets_broker_injector_reviews_total{result=\"injected\"} 1",
        "secrets_broker_injector_reviews_total{result=\"denied\"} 1",
        "secrets_broker_injector_reviews_total{result=\"bad_request\"} 1",
        "secrets_broker_injector_review_duration_seconds_count 3",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let (status, ops_metrics) = http_get(ops_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(ops_metrics.contains("secrets_broker_injector_reviews_total"));
    assert_eq!(http_get(ops_port, "/readyz").unwrap().0, 200);
    assert_eq!(
        http_get(ops_port, "/mutate").unwrap().0,
        404,
        "never on the plain port"
    );

    // The log says what happened, without the pod spec or the sidecar config.
    let log = proc.log_text();
    assert!(
        log.contains("sidecar injected") && log.contains("pod denied"),
        "{log}"
    );
    assert!(
        !log.contains("BEGIN CERTIFICATE") && !log.contains("kube-api-access"),
        "{log}"
    );

    // cert-manager renews the certificate: the new one is served without a restart.
    let renewed = DevTls::generate().unwrap();
    let renewed_dir = dir.path().join("renewed");
    let renewed_files = renewed.write(&renewed_dir).unwrap();
    std::fs::copy(&renewed_files.cert, &files.cert).unwrap();
    std::fs::copy(&renewed_files.key, &files.key).unwrap();
    let new_client = client(&renewed_files.ca);
    wait_for("the renewed certificate", LONG, || {
        rt.block_on(async {
            new_client
                .get(format!("https://localhost:{port}/healthz"))
                .send()
                .await
        })
        .ok()
        .filter(|r| r.status().is_success())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_text()));
    assert!(proc.log_text().contains("serving certificate reloaded"));
    let (_, metrics) = get(&rt, &new_client, port, "/metrics");
    assert!(
        metrics.contains("secrets_broker_injector_tls_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );

    // SIGTERM: drains and exits 0.
    proc.signal("TERM");
    let status = proc.wait_exit(LONG).unwrap();
    assert!(status.success(), "{status:?}\n{}", proc.log_text());
    assert!(proc.log_text().contains("injection webhook stopped"));
}

const ROLES: &str = r#"
[[roles]]
name = "payments-api"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
ttl = "1m"
"#;

/// The config the webhook injects, handed to the real sidecar in
/// SECRETS_SIDECAR_CONFIG (no --config, the broker's CA inline), fetches the
/// annotated secrets from a real broker and renders the template.
#[test]
fn injected_sidecar_config_fetches_from_a_real_broker() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", "hunter2-e2e").unwrap();
    world.put("payments/api-key", "key-e2e").unwrap();
    world.put("payments/db-user", "app-e2e").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();

    // The injector, in-process, configured for this world's broker.
    let cfg_path = inject_config(
        world.dir.path(),
        free_port(),
        free_port(),
        &format!("https://localhost:{}", world.broker_port),
        &world.tls.ca,
    );
    let cfg = secrets_broker::inject::Config::load(&cfg_path).unwrap();
    let injector = secrets_broker::inject::Injector::new(cfg, &cfg_path).unwrap();
    let mut review = fixture("several-containers");
    let ann = &mut review["request"]["object"]["metadata"]["annotations"];
    ann["secrets-broker.io/mount-path"] = json!(tmpfs.path.to_str().unwrap());
    ann["secrets-broker.io/mode"] = json!("once");
    ann.as_object_mut()
        .unwrap()
        .remove("secrets-broker.io/notify");
    // No fsGroup: the files stay owned by this test's user (no chown).
    review["request"]["object"]["spec"]["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("fsGroup");
    let outcome = secrets_broker::inject::review(&injector, &serde_json::to_vec(&review).unwrap());
    let answer: Value = serde_json::from_str(&outcome.response.unwrap()).unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let sidecar = patch
        .iter()
        .find(|op| op["path"] == "/spec/initContainers")
        .map(|op| op["value"][0].clone())
        .expect("the sidecar");
    assert_eq!(sidecar["args"][0], "once");
    let env = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SECRETS_SIDECAR_CONFIG")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        env.contains("ca_pem = ") && !env.contains("ca_file"),
        "{env}"
    );

    // In a pod the kubelet puts the token at this path; here it is a file.
    let token = world
        .token_file("api.token", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let in_pod = "token_file = \"/var/run/secrets/secrets-broker/token\"";
    assert!(env.contains(in_pod), "{env}");
    let env = env.replace(
        in_pod,
        &format!("token_file = {:?}", token.to_str().unwrap()),
    );

    let out = Command::new(bin("secrets-sidecar"))
        .args(["once", "--timeout", "30s"])
        .env("SECRETS_SIDECAR_CONFIG", &env)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    let read = |f: &str| std::fs::read_to_string(tmpfs.path.join(f)).unwrap();
    assert_eq!(read("db-password"), "hunter2-e2e");
    assert_eq!(read("api-key"), "key-e2e");
    assert_eq!(read("db.env"), "DB_USER=app-e2e\nDB_PASSWORD=hunter2-e2e\n");
    assert!(!tmpfs.path.join("db-user").exists(), "template-only secret");

    // Without --config and without the variable: a usage error that says so.
    let out = Command::new(bin("secrets-sidecar"))
        .args(["once"])
        .env_remove("SECRETS_SIDECAR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", out_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SECRETS_SIDECAR_CONFIG") && err.contains("--config"),
        "{err}"
    );
}
