//! The kill switch end to end: `brokerctl` → admin API → revocation rule →
//! every affected sidecar removes its files; on one SQLite replica and on two
//! replicas sharing PostgreSQL; with the database stopped, replicas fail closed.

use std::path::Path;
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::pg::{Cluster, Database};
use secrets_broker_e2e::{AUDIENCE, Tmpfs, World, free_port, http_get, out_text, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api", "worker-*"]
secrets = ["payments/*"]
ttl = "20s"
max_ttl = "1h"
"#;

const LONG: Duration = Duration::from_secs(60);
const BOTH: [(&str, &str); 2] = [
    ("payments/db-password", "db-password"),
    ("payments/api-key", "api-key"),
];

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", out_text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out_text(o)))
}

/// `secrets-sidecar once` with a fresh token: Ok(()) or the error text.
fn try_once(world: &World, w: &Workload, port: u16, name: &str) -> Result<(), String> {
    let tmpfs = Tmpfs::new().unwrap();
    let token = world.token_file(&format!("{name}.token"), w).unwrap();
    let cfg = world
        .sidecar_config(&format!("{name}.toml"), &token, &tmpfs.path, "", &BOTH[..1])
        .unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("localhost:{}", world.broker_port),
        &format!("localhost:{port}"),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = world
        .run(
            "secrets-sidecar",
            &["once", "--config", cfg.to_str().unwrap(), "--timeout", "1s"],
        )
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn kill_switch_on_a_single_replica() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", "db-value-1c9e").unwrap();
    world.put("payments/api-key", "api-value-77aa").unwrap();
    let mut broker = world.start_broker("broker.log").unwrap();
    let api = Workload::new("payments", "api", AUDIENCE);
    let worker = Workload::new("payments", "worker-1", AUDIENCE);
    let (sc_api, fs_api, health_api) = world
        .start_sidecar("api", &api, world.broker_port, &BOTH)
        .unwrap();
    let (sc_worker, fs_worker, _) = world
        .start_sidecar("worker", &worker, world.broker_port, &BOTH)
        .unwrap();
    for fs in [&fs_api, &fs_worker] {
        wait_for("first generation", LONG, || {
            exists(&fs.path.join("api-key")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", sc_api.log_text()));
    }

    // Authentication and roles on the admin API.
    let o = world.brokerctl(None, &["revocations", "list"]).unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("401 Unauthorized: client certificate required"),
        "{}",
        out_text(&o)
    );
    let o = world
        .brokerctl(Some("stranger"), &["revocations", "list"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not mapped to a role"),
        "{}",
        out_text(&o)
    );
    let o = world
        .brokerctl(
            Some("viewer"),
            &["revoke", "--namespace", "payments", "--reason", "x"],
        )
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("403 Forbidden: role viewer may not revoke; it needs revoker"),
        "{}",
        out_text(&o)
    );
    assert!(
        exists(&fs_api.path.join("api-key")),
        "a refused revoke changes nothing"
    );
    let o = world
        .brokerctl(Some("revoker"), &["revoke", "--reason", "nothing named"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("name what to revoke"),
        "{}",
        out_text(&o)
    );

    // Revoke one service account: its sidecar loses the files, the other keeps them.
    let v = json(
        &world
            .brokerctl(
                Some("revoker"),
                &[
                    "--output",
                    "json",
                    "revoke",
                    "--namespace",
                    "payments",
                    "--service-account",
                    "api",
                    "--reason",
                    "compromised",
                ],
            )
            .unwrap(),
    );
    let rule_id = v["rule"]["id"].as_str().unwrap().to_owned();
    assert!(v["leases_ended"].as_u64().unwrap() >= 2, "{v}");
    wait_for("revoked files removed", LONG, || {
        (!exists(&fs_api.path.join("db-password"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc_api.log_text()));
    assert!(!exists(&fs_api.path.join("api-key")));
    // One swap to an empty generation: `..data` never goes missing.
    assert_eq!(
        std::fs::read_dir(fs_api.path.join("..data"))
            .unwrap()
            .count(),
        0,
        "the current generation is empty"
    );
    assert!(
        exists(&fs_worker.path.join("db-password")),
        "other workloads keep their secrets"
    );
    assert!(
        sc_api
            .log_text()
            .contains("access revoked; secrets removed")
    );
    let (status, body) = http_get(health_api, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("payments/db-password: revoked (rule id rv-"),
        "{body}"
    );

    // A fresh token does not undo it, and neither does a broker restart.
    let err = try_once(&world, &api, world.broker_port, "fresh").unwrap_err();
    assert!(
        err.contains(&format!(
            "revoked (rule id {rule_id}, reason \"compromised\")"
        )),
        "{err}"
    );
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    let (status, metrics) = http_get(world.ops_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("secrets_broker_revocation_rules 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("secrets_broker_revocation_view_age_seconds "),
        "{metrics}"
    );
    // The revoked sidecar's own retry (on a backoff) is refused too.
    wait_for("a refused fetch counted", LONG, || {
        let (_, metrics) = http_get(world.ops_port, "/metrics").ok()?;
        metrics
            .contains(r#"secrets_broker_calls_total{action="fetch",result="revoked"}"#)
            .then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            sc_api.log_text()
        )
    });
    assert_eq!(http_get(world.ops_port, "/readyz").unwrap().0, 200);
    broker.signal("KILL");
    broker.wait_exit(LONG).unwrap();
    let _broker2 = world.start_broker("broker2.log").unwrap();
    let err = try_once(&world, &api, world.broker_port, "after-restart").unwrap_err();
    assert!(err.contains(&rule_id), "{err}");
    assert!(try_once(&world, &worker, world.broker_port, "worker-ok").is_ok());

    // One secret withheld from a namespace: only that file goes.
    json(
        &world
            .brokerctl(
                Some("revoker"),
                &[
                    "--output",
                    "json",
                    "revoke",
                    "--secret",
                    "payments/api-key",
                    "--namespace",
                    "payments",
                    "--reason",
                    "rotate vendor key",
                ],
            )
            .unwrap(),
    );
    wait_for("api-key removed at the worker", LONG, || {
        (!exists(&fs_worker.path.join("api-key"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc_worker.log_text()));
    assert_eq!(
        std::fs::read_to_string(fs_worker.path.join("db-password")).unwrap(),
        "db-value-1c9e"
    );

    let v = json(
        &world
            .brokerctl(Some("viewer"), &["--output", "json", "revocations", "list"])
            .unwrap(),
    );
    assert_eq!(v["revocations"].as_array().unwrap().len(), 2);
    let v = json(
        &world
            .brokerctl(
                Some("viewer"),
                &[
                    "--output",
                    "json",
                    "leases",
                    "list",
                    "--namespace",
                    "payments",
                ],
            )
            .unwrap(),
    );
    let leases = v["leases"].as_array().unwrap();
    assert!(
        leases.iter().all(|l| l["service_account"] == "worker-1"),
        "the api's leases were ended: {v}"
    );
    let o = world
        .brokerctl(Some("viewer"), &["leases", "list"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("LEASE"),
        "{}",
        out_text(&o)
    );

    // Lifting the rules brings the secrets back without restarting anything.
    for rule in world
        .brokerctl(Some("viewer"), &["--output", "json", "revocations", "list"])
        .map(|o| json(&o))
        .unwrap()["revocations"]
        .as_array()
        .unwrap()
    {
        let id = rule["id"].as_str().unwrap();
        let o = world
            .brokerctl(Some("revoker"), &["revocations", "delete", id])
            .unwrap();
        assert!(o.status.success(), "{}", out_text(&o));
    }
    for (fs, log) in [(&fs_api, &sc_api), (&fs_worker, &sc_worker)] {
        wait_for("secrets back after the rules are lifted", LONG, || {
            exists(&fs.path.join("api-key")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", log.log_text()));
    }
    assert_eq!(
        http_get(health_api, "/readyz").unwrap(),
        (200, "ready\n".to_owned())
    );

    // A rule with --for lapses by itself.
    let pod_uid = world.issuer.claims(&worker)["kubernetes.io"]["pod"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    json(
        &world
            .brokerctl(
                Some("revoker"),
                &[
                    "--output",
                    "json",
                    "revoke",
                    "--pod-uid",
                    &pod_uid,
                    "--reason",
                    "brief",
                    "--for",
                    "3s",
                ],
            )
            .unwrap(),
    );
    wait_for("pod revoked", LONG, || {
        (!exists(&fs_worker.path.join("db-password"))).then_some(())
    })
    .unwrap();
    wait_for("rule lapsed, secrets back", LONG, || {
        exists(&fs_worker.path.join("db-password")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc_worker.log_text()));

    // The embedded store through brokerctl: admin only for values.
    let put = |value: &str| {
        let mut child = std::process::Command::new(secrets_broker_e2e::bin("brokerctl"))
            .args([
                "--server",
                &format!("https://localhost:{}", world.admin_port),
                "--ca",
            ])
            .arg(world.path("tls/ca.crt"))
            .arg("--cert")
            .arg(world.path("tls/admin.crt"))
            .arg("--key")
            .arg(world.path("tls/admin.key"))
            .args(["secrets", "put", "payments/new"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(value.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let o = put("brand-new-value-5f1d");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("payments/new version 1"),
        "{}",
        out_text(&o)
    );
    let o = world
        .brokerctl(Some("admin"), &["secrets", "get", "payments/new"])
        .unwrap();
    assert_eq!(o.stdout, b"brand-new-value-5f1d");
    let o = world
        .brokerctl(Some("viewer"), &["secrets", "get", "payments/new"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs admin"),
        "{}",
        out_text(&o)
    );
    let o = world
        .brokerctl(Some("viewer"), &["secrets", "list"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("payments/new"),
        "{}",
        out_text(&o)
    );
    let o = world
        .brokerctl(Some("admin"), &["secrets", "delete", "payments/new"])
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));

    // The audit log: every kind of call is there, the chain verifies, and no
    // secret value or token appears in it.
    let o = world
        .brokerctl(Some("viewer"), &["audit", "verify"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("audit log intact"),
        "{}",
        out_text(&o)
    );
    let v = json(
        &world
            .brokerctl(
                Some("viewer"),
                &["--output", "json", "audit", "tail", "-n", "10000"],
            )
            .unwrap(),
    );
    let text = v.to_string();
    for action in [
        "\"login\"",
        "\"fetch\"",
        "\"watch\"",
        "\"revoke\"",
        "\"admin.revoke\"",
        "\"admin.secrets.get\"",
    ] {
        assert!(text.contains(action), "audit lacks {action}");
    }
    assert!(
        text.contains("\"result\":\"revoked\""),
        "refusals are audited"
    );
    assert!(
        text.contains("\"result\":\"forbidden\""),
        "refused admin calls are audited"
    );
    let token = std::fs::read_to_string(world.path("api.token")).unwrap();
    for leak in [
        "db-value-1c9e",
        "api-value-77aa",
        "brand-new-value-5f1d",
        token.rsplit('.').next().unwrap(),
    ] {
        assert!(!text.contains(leak), "audit log leaks {leak}");
    }
}

fn two_replicas(world: &World) -> (std::path::PathBuf, u16, u16) {
    let (port_b, admin_b) = (free_port(), free_port());
    let cfg_b = world.path("broker-b.toml");
    world
        .write_broker_config(&cfg_b, port_b, admin_b, ROLES)
        .unwrap();
    (cfg_b, port_b, admin_b)
}

#[test]
fn revocation_reaches_a_sidecar_on_another_replica() {
    let db = Database::create().unwrap();
    let world = World::with_database(ROLES, &db.url).unwrap();
    world.put("payments/db-password", "shared-value").unwrap();
    let (cfg_b, port_b, _admin_b) = two_replicas(&world);
    let _a = world.start_broker("broker-a.log").unwrap();
    let mut b = world.start_broker_with(&cfg_b, "broker-b.log").unwrap();
    let api = Workload::new("payments", "api", AUDIENCE);
    let (sc, fs, _) = world
        .start_sidecar("api", &api, port_b, &BOTH[..1])
        .unwrap();
    // More sidecars, on both replicas, that the rule does not cover.
    let others: Vec<_> = (0..3)
        .map(|i| {
            let w = Workload::new("payments", &format!("worker-{i}"), AUDIENCE);
            let port = if i % 2 == 0 {
                world.broker_port
            } else {
                port_b
            };
            world
                .start_sidecar(&format!("worker{i}"), &w, port, &BOTH[..1])
                .unwrap()
        })
        .collect();
    for fs in std::iter::once(&fs).chain(others.iter().map(|(_, f, _)| f)) {
        wait_for("secret on every sidecar", LONG, || {
            exists(&fs.path.join("db-password")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", sc.log_text()));
    }

    // Revoke through replica A; the sidecar is connected to B.
    let v = json(
        &world
            .brokerctl(
                Some("revoker"),
                &[
                    "--output",
                    "json",
                    "revoke",
                    "--namespace",
                    "payments",
                    "--service-account",
                    "api",
                    "--reason",
                    "incident-42",
                ],
            )
            .unwrap(),
    );
    let rule_id = v["rule"]["id"].as_str().unwrap().to_owned();
    wait_for("file gone at the sidecar on B", LONG, || {
        (!exists(&fs.path.join("db-password"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nsidecar:\n{}\nB:\n{}", sc.log_text(), b.log_text()));
    for (_, f, _) in &others {
        assert!(
            exists(&f.path.join("db-password")),
            "workloads the rule does not name keep their secrets"
        );
    }

    // Replica B restarted: the rule still holds there.
    b.signal("KILL");
    b.wait_exit(LONG).unwrap();
    let _b2 = world.start_broker_with(&cfg_b, "broker-b2.log").unwrap();
    let err = try_once(&world, &api, port_b, "via-b").unwrap_err();
    assert!(err.contains(&rule_id), "{err}");

    // One hash chain across both replicas.
    let o = world
        .brokerctl(Some("viewer"), &["audit", "verify"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("audit log intact"),
        "{}",
        out_text(&o)
    );
}

#[test]
fn replicas_fail_closed_while_the_database_is_down() {
    let cluster = Cluster::start().unwrap();
    let db = Database::create_on(&cluster.server_url()).unwrap();
    let world = World::with_database(ROLES, &db.url).unwrap();
    world.put("payments/db-password", "v").unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let api = Workload::new("payments", "api", AUDIENCE);
    try_once(&world, &api, world.broker_port, "before").unwrap();

    cluster.stop().unwrap();
    // Within the staleness bound (3s here) plus a re-read, new issuance stops.
    let mut last = String::new();
    wait_for("fail closed", LONG, || {
        match try_once(&world, &api, world.broker_port, "down") {
            Ok(()) => None,
            Err(e) => {
                last = e;
                last.contains("revocation view is stale").then_some(())
            }
        }
    })
    .unwrap_or_else(|e| panic!("{e}: last error {last}\nbroker:\n{}", broker.log_text()));
    assert!(last.contains("UNAVAILABLE"), "{last}");
    let (status, body) = http_get(world.ops_port, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("revocation: revocation view is stale") && body.contains("database:"),
        "{body}"
    );

    cluster.resume().unwrap();
    wait_for("serving again", LONG, || {
        try_once(&world, &api, world.broker_port, "back").ok()
    })
    .unwrap_or_else(|e| panic!("{e}\nbroker:\n{}", broker.log_text()));
    drop(db);
}
