//! TokenReview modes against a fake API server that speaks the real JSON
//! (reached through a real kubeconfig and TLS): a deleted pod's token stops
//! renewing within one renewal cycle in `jwks+tokenreview` mode; with the API
//! server down, `tokenreview` mode fails closed for new logins and the
//! combined mode does what `on_api_error` says.

use std::path::Path;
use std::time::{Duration, Instant};

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, World, out_text, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
ttl = "3s"
max_ttl = "1m"
"#;

const LONG: Duration = Duration::from_secs(60);

/// Rewrites the world's broker config for `mode` against the fake API server.
fn configure(
    world: &World,
    api: &secrets_broker_e2e::kube_api::FakeApiServer,
    mode: &str,
    extra: &str,
) {
    let kubeconfig = api
        .write_kubeconfig(&world.path("kubeconfig.yaml"), &world.path("tls/ca.crt"))
        .unwrap();
    // Always patch the config as the world wrote it.
    let original = world.path("broker.orig.toml");
    if !original.exists() {
        std::fs::copy(world.broker_config(), &original).unwrap();
    }
    let base = std::fs::read_to_string(&original).unwrap();
    let patched = base.replacen(
        "[identity]\n",
        &format!(
            "[identity]\nmode = \"{mode}\"\nkubeconfig = \"{}\"\ntokenreview_cache = \"1s\"\ntokenreview_timeout = \"2s\"\n{extra}\n",
            kubeconfig.display()
        ),
        1,
    );
    std::fs::write(world.broker_config(), patched).unwrap();
}

fn check(world: &World, token: &Path) -> std::process::Output {
    world
        .run(
            "secrets-broker",
            &[
                "check-token",
                "--config",
                world.broker_config().to_str().unwrap(),
                "--token-file",
                token.to_str().unwrap(),
            ],
        )
        .unwrap()
}

#[test]
fn a_deleted_pods_token_stops_renewing_within_one_cycle() {
    let world = World::new(ROLES).unwrap();
    let api = world.start_api_server().unwrap();
    configure(&world, &api, "jwks+tokenreview", "");
    world.put("payments/db", "v1").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let pod = Workload::new("payments", "api", AUDIENCE);
    let (sidecar, fs, _) = world
        .start_sidecar("api", &pod, world.broker_port, &[("payments/db", "db")])
        .unwrap();
    let file = fs.path.join("db");
    wait_for("secret", LONG, || file.exists().then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    // Renewals keep going while the pod exists (3 s leases, renewed at ~2 s).
    let before = api.reviews();
    wait_for("renewals", LONG, || {
        (sidecar.log_text().matches("renewed leases").count() >= 3).then_some(())
    })
    .unwrap();
    let renewals = sidecar.log_text().matches("renewed leases").count();
    println!(
        "TokenReview calls: {} for {renewals} renewals (cache 1s)",
        api.reviews() - before
    );

    api.delete_pod("api-0");
    let deleted = Instant::now();
    wait_for("file removed after the pod is deleted", LONG, || {
        (!file.exists()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    let gone = deleted.elapsed();
    println!("pod deletion -> secret removed: {gone:?} (lease 3s)");
    assert!(gone < Duration::from_secs(30), "{gone:?}");
    assert!(
        sidecar
            .log_text()
            .contains("no longer accepts this token (pod deleted?)"),
        "{}",
        sidecar.log_text()
    );
    // The broker ended the pod's leases at once.
    let o = world
        .brokerctl(Some("viewer"), &["--output", "json", "leases", "list"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["leases"].as_array().unwrap().len(), 0, "{v}");
    let o = world
        .brokerctl(
            Some("viewer"),
            &["--output", "json", "audit", "tail", "-n", "1000"],
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("pod_gone"),
        "{}",
        out_text(&o)
    );
}

#[test]
fn api_server_down_fails_closed_unless_told_otherwise() {
    let world = World::new(ROLES).unwrap();
    let api = world.start_api_server().unwrap();
    let token = world
        .token_file("t.jwt", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();

    configure(&world, &api, "tokenreview", "");
    let out = check(&world, &token);
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["identity"]["pod_name"], "api-0",
        "pod binding comes from status.user.extra"
    );
    let reviews = api.reviews();
    assert!(reviews >= 1);

    api.set_down(true);
    let out = check(&world, &token);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("cannot confirm the token with the Kubernetes API server"),
        "{}",
        out_text(&out)
    );

    configure(&world, &api, "jwks+tokenreview", "");
    let out = check(&world, &token);
    assert_eq!(
        out.status.code(),
        Some(1),
        "combined mode denies by default: {}",
        out_text(&out)
    );

    configure(&world, &api, "jwks+tokenreview", "on_api_error = \"allow\"");
    let out = check(&world, &token);
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));

    // A slow API server: the timeout is respected, and the login refused.
    api.set_down(false);
    api.set_delay(Duration::from_secs(30));
    configure(&world, &api, "tokenreview", "");
    let started = Instant::now();
    let out = check(&world, &token);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("did not answer within 2s"),
        "{}",
        out_text(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the 2s timeout bounds the wait, not the server"
    );
    api.set_delay(Duration::ZERO);

    // A token the API server rejects is refused in tokenreview mode.
    api.delete_pod("api-0");
    configure(&world, &api, "tokenreview", "");
    let out = check(&world, &token);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("the Kubernetes API server refused the token"),
        "{}",
        out_text(&out)
    );
}
