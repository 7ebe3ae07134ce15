//! The sidecar's HTTP ports as the pod network and the kubelet see them,
//! with the real broker and sidecar binaries: the probe port answers a
//! status and a fixed word (never which secret or which rule), 404 for
//! anything else, and `/metrics` without secret names when asked; the
//! detailed `/readyz` is on loopback; no metric anywhere carries a rule ID or
//! a lease ID, before or after a revocation; `secrets-sidecar probe` exits 0
//! when ready, 1 when not (printing why), 2 without a port to ask.

use std::process::Command;
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{
    AUDIENCE, Proc, Tmpfs, World, bin, free_port, http_get, out_text, wait_for,
};

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
ttl = "1m"
"#;

const LONG: Duration = Duration::from_secs(60);
const SECRETS: [(&str, &str); 2] = [
    ("payments/db-password", "db-password"),
    ("payments/api-key", "api-key"),
];

/// The lease IDs the sidecar logged as received (debug lines).
fn leases_received(p: &Proc) -> Vec<String> {
    p.log_text()
        .lines()
        .filter(|l| l.contains("lease received"))
        .filter_map(|l| {
            let rest = &l[l.find("lease_id=")? + "lease_id=".len()..];
            Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
        })
        .collect()
}

/// `secrets-sidecar probe ARGS…`: (exit code, stdout).
fn probe(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin("secrets-sidecar"))
        .arg("probe")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("SECRETS_SIDECAR_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_pod_network_sees_only_status_codes_and_metrics_carry_no_rule_or_lease_ids() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", "db-value-93c1").unwrap();
    world.put("payments/api-key", "key-value-93c1").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let token = world
        .token_file("api.token", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let (health, probes, legacy) = (free_port(), free_port(), free_port());
    // The injected layout: detail on loopback, the probe port (with
    // metrics, as for a PodMonitor) for the pod network.
    let cfg = world
        .sidecar_config(
            "api.toml",
            &token,
            &tmpfs.path,
            &format!(
                "health_listen = \"127.0.0.1:{health}\"\nprobe_listen = \"127.0.0.1:{probes}\"\nprobe_metrics = true"
            ),
            &SECRETS,
        )
        .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    // Before the sidecar runs: nobody answers, so not ready.
    let (code, out) = probe(&["--config", cfg_arg, "--timeout", "1s", "ready"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot ask the sidecar"), "{out}");

    let sidecar = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config", cfg_arg])
            .env("RUST_LOG", world.log_level),
        world.path("api.log"),
    )
    .unwrap();
    // An older config's `health_listen` on every address: shown like the
    // probe port, whatever it is asked.
    let legacy_tmpfs = Tmpfs::new().unwrap();
    let legacy_cfg = world
        .sidecar_config(
            "legacy.toml",
            &token,
            &legacy_tmpfs.path,
            &format!("health_listen = \"0.0.0.0:{legacy}\""),
            &SECRETS,
        )
        .unwrap();
    let legacy_sidecar = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config", legacy_cfg.to_str().unwrap()])
            .env("RUST_LOG", world.log_level),
        world.path("legacy.log"),
    )
    .unwrap();

    wait_for("the probe port ready", LONG, || {
        (http_get(probes, "/readyz").ok()?.0 == 200).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    assert_eq!(http_get(probes, "/readyz").unwrap(), (200, "ok\n".into()));
    assert_eq!(http_get(probes, "/healthz").unwrap(), (200, "ok\n".into()));
    assert_eq!(
        http_get(health, "/readyz").unwrap(),
        (200, "ready\n".into())
    );
    for path in [
        "/",
        "/livez",
        "/readyz/details",
        "/debug/pprof",
        "/secretsmanager/get",
    ] {
        assert_eq!(
            http_get(probes, path).unwrap(),
            (404, "not found\n".into()),
            "{path}"
        );
    }
    let (code, out) = probe(&["--config", cfg_arg, "ready"]);
    assert_eq!((code, out.trim()), (Some(0), "ready"), "{out}");
    let (code, out) = probe(&["--config", cfg_arg, "live"]);
    assert_eq!(code, Some(0), "{out}");

    // One secret withheld by a rule: not ready everywhere; only loopback
    // (and `probe`, which asks loopback) says which and by which rule.
    let o = world
        .brokerctl(
            Some("revoker"),
            &[
                "--output",
                "json",
                "revoke",
                "--secret",
                "payments/db-password",
                "--namespace",
                "payments",
                "--reason",
                "rotate the password",
            ],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rule_id = v["rule"]["id"].as_str().unwrap().to_owned();
    wait_for("the detailed /readyz names the rule", LONG, || {
        let (code, body) = http_get(health, "/readyz").ok()?;
        (code == 503 && body.contains(&rule_id)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    wait_for("the legacy port not ready", LONG, || {
        (http_get(legacy, "/readyz").ok()?.0 == 503).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", legacy_sidecar.log_text()));
    assert_eq!(
        http_get(probes, "/readyz").unwrap(),
        (503, "not ready\n".into())
    );
    assert_eq!(
        http_get(legacy, "/readyz").unwrap(),
        (503, "not ready\n".into())
    );
    assert_eq!(http_get(probes, "/healthz").unwrap(), (200, "ok\n".into()));
    let (code, out) = probe(&["--config", cfg_arg]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("HTTP 503")
            && out.contains(&format!(
                "payments/db-password: revoked (rule id {rule_id})"
            )),
        "{out}"
    );

    // Metrics: loopback labels secrets by name, the pod network by
    // position; neither has a rule ID or a lease ID anywhere.
    let leases: Vec<String> = leases_received(&sidecar)
        .into_iter()
        .chain(leases_received(&legacy_sidecar))
        .collect();
    assert!(
        !leases.is_empty(),
        "no lease IDs logged: the test would prove nothing\n{}",
        sidecar.log_text()
    );
    let (code, loopback) = http_get(health, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        loopback.contains(r#"secrets_sidecar_secret_version{secret="payments/api-key"}"#),
        "{loopback}"
    );
    assert!(
        loopback.contains("secrets_sidecar_revoked_secrets 1"),
        "{loopback}"
    );
    let (code, pod) = http_get(probes, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        pod.contains(r#"secrets_sidecar_secret_version{secret="1"}"#),
        "{pod}"
    );
    assert!(pod.contains("secrets_sidecar_revoked_secrets 1"), "{pod}");
    let (code, legacy_metrics) = http_get(legacy, "/metrics").unwrap();
    assert_eq!(code, 200);
    for (what, text) in [
        ("loopback metrics", &loopback),
        ("probe-port metrics", &pod),
        ("legacy metrics", &legacy_metrics),
    ] {
        assert!(!text.contains(&rule_id), "{what} name the rule: {text}");
        assert!(!text.contains("rv-"), "{what}: {text}");
        for lease in &leases {
            assert!(
                !text.contains(lease.as_str()),
                "{what} carry lease {lease}: {text}"
            );
        }
    }
    for text in [&pod, &legacy_metrics] {
        assert!(!text.contains("payments"), "{text}");
    }

    // Without a port to ask: a configuration error.
    let off = world
        .sidecar_config(
            "off.toml",
            &token,
            &tmpfs.path,
            "health_listen = \"off\"",
            &SECRETS,
        )
        .unwrap();
    let (code, out) = probe(&["--config", off.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no port to ask"), "{out}");
    let (code, out) = probe(&["--config", "/nonexistent/sidecar.toml"]);
    assert_eq!(code, Some(2), "{out}");
    let (code, out) = probe(&["--help"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("live") && out.contains("ready"), "{out}");
}
