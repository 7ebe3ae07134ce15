//! End-to-end: the real binaries, a real HTTPS OIDC issuer on loopback, a
//! real tmpfs. No timing assertions: every wait polls with a generous deadline.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, Proc, Tmpfs, World, bin, wait_for};
use secrets_broker_proto::v1 as pb;
use serde_json::json;

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api", "worker-*"]
secrets = ["payments/*"]
ttl = "20s"
max_ttl = "1h"

[[roles]]
name = "short"
namespaces = ["short"]
service_accounts = ["*"]
secrets = ["short/*"]
ttl = "3s"
max_ttl = "1m"
"#;

const LONG: Duration = Duration::from_secs(60);

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn assert_no_leak(log: &str, what: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !log.contains(s),
            "{what} log contains a secret or token fragment {s:?}"
        );
    }
}

/// The whole life of a sidecar: first write on tmpfs in the `..data` layout,
/// rotation pushed through the watch stream, the broker killed (the sidecar
/// keeps the last good set until the lease ends, then removes it), the broker
/// back (the sidecar recovers), and SIGTERM (the files go away).
#[test]
fn sidecar_keeps_secrets_fresh_through_rotation_and_outage() {
    let world = World::new(ROLES).unwrap();
    world
        .put("payments/db-password", "first-value-7f3a")
        .unwrap();
    world.put("payments/api-key", "api-key-value-91c2").unwrap();
    let mut broker = world.start_broker("broker.log").unwrap();

    let tmpfs = Tmpfs::new().unwrap();
    let token = world
        .token_file("api.token", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let cfg = world
        .sidecar_config(
            "sidecar.toml",
            &token,
            &tmpfs.path,
            "",
            &[
                ("payments/db-password", "db-password"),
                ("payments/api-key", "api-key"),
            ],
        )
        .unwrap();
    let mut sidecar = Proc::spawn(
        std::process::Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path("sidecar.log"),
    )
    .unwrap();

    let file = tmpfs.path.join("db-password");
    wait_for("first generation", LONG, || {
        (read(&file)? == "first-value-7f3a").then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nsidecar:\n{}\nbroker:\n{}",
            sidecar.log_text(),
            broker.log_text()
        )
    });
    assert_eq!(
        read(&tmpfs.path.join("api-key")).unwrap(),
        "api-key-value-91c2"
    );

    // The kubelet AtomicWriter layout, mode 0400.
    let data = std::fs::read_link(tmpfs.path.join("..data")).unwrap();
    let data = data.to_str().unwrap().to_owned();
    assert!(
        data.starts_with("..") && data.len() == "..2026_11_26_10_00_00.123456789".len(),
        "{data}"
    );
    assert_eq!(
        std::fs::read_link(&file).unwrap(),
        Path::new("..data/db-password")
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400);

    // Rotation: a new version in the store becomes a new generation on disk.
    world
        .put("payments/db-password", "second-value-c0de")
        .unwrap();
    wait_for("rotated generation", LONG, || {
        (read(&file)? == "second-value-c0de").then_some(())
    })
    .unwrap();
    let data2 = std::fs::read_link(tmpfs.path.join("..data")).unwrap();
    assert_ne!(
        data2.to_str().unwrap(),
        data,
        "a rotation is a new generation"
    );
    assert!(
        !tmpfs.path.join(&data).exists(),
        "the old generation is cleaned up"
    );

    // Broker down: the sidecar keeps serving what it has...
    broker.signal("KILL");
    broker.wait_exit(LONG).unwrap();
    assert_eq!(read(&file).as_deref(), Some("second-value-c0de"));
    // ...but never past the lease's end (ttl 20s).
    wait_for("removal at lease end", LONG, || {
        std::fs::symlink_metadata(&file).is_err().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nsidecar:\n{}", sidecar.log_text()));
    assert!(std::fs::symlink_metadata(tmpfs.path.join("..data")).is_err());

    // Broker back: the sidecar recovers on its own.
    let broker2 = world.start_broker("broker2.log").unwrap();
    wait_for("recovery", LONG, || {
        (read(&file)? == "second-value-c0de").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nsidecar:\n{}", sidecar.log_text()));

    // SIGTERM: the sidecar removes the secrets and exits cleanly.
    sidecar.signal("TERM");
    let status = sidecar.wait_exit(LONG).unwrap();
    assert!(status.success(), "sidecar exit: {status}");
    assert!(std::fs::symlink_metadata(&file).is_err());

    let token_text = std::fs::read_to_string(&token).unwrap();
    let signature = token_text.rsplit('.').next().unwrap();
    for (name, log) in [
        ("sidecar", sidecar.log_text()),
        ("broker", broker.log_text()),
        ("broker2", broker2.log_text()),
    ] {
        assert_no_leak(
            &log,
            name,
            &[
                "first-value-7f3a",
                "second-value-c0de",
                "api-key-value-91c2",
                signature,
            ],
        );
    }
}

/// A role with a 3s lease: the sidecar renews (at ~2/3) again and again and
/// keeps the same generation while the secret does not change.
#[test]
fn sidecar_renews_short_leases_without_rewriting() {
    let world = World::new(ROLES).unwrap();
    world.put("short/k", "short-lived-value").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let token = world
        .token_file("t", &Workload::new("short", "job", AUDIENCE))
        .unwrap();
    let cfg = world
        .sidecar_config("s.toml", &token, &tmpfs.path, "", &[("short/k", "k")])
        .unwrap();
    let sidecar = Proc::spawn(
        std::process::Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path("sidecar.log"),
    )
    .unwrap();
    let file = tmpfs.path.join("k");
    wait_for("first write", LONG, || read(&file)).unwrap();
    let generation = std::fs::read_link(tmpfs.path.join("..data")).unwrap();
    // Three renewals, each well past the previous lease's end.
    wait_for("three renewals", LONG, || {
        (sidecar.log_text().matches("renewed leases").count() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    assert_eq!(read(&file).as_deref(), Some("short-lived-value"));
    assert_eq!(
        std::fs::read_link(tmpfs.path.join("..data")).unwrap(),
        generation
    );
    assert!(
        !sidecar.log_text().contains("removed secrets"),
        "{}",
        sidecar.log_text()
    );
}

/// More secrets than the broker takes per call (256): the sidecar splits its
/// fetches, renewals and watch streams, and a rotation of a secret in the
/// second share reaches the disk.
#[test]
fn a_sidecar_with_more_secrets_than_one_call_takes_splits_its_calls() {
    let world = World::new(ROLES).unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("short/big-{i}")).collect();
    for n in &names {
        world.put(n, &format!("{n}-v1")).unwrap();
    }
    let broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let token = world
        .token_file("t", &Workload::new("short", "big", AUDIENCE))
        .unwrap();
    let files: Vec<(String, String)> = names
        .iter()
        .map(|n| (n.clone(), n.replace('/', "_")))
        .collect();
    let specs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, f)| (n.as_str(), f.as_str()))
        .collect();
    let cfg = world
        .sidecar_config("s.toml", &token, &tmpfs.path, "", &specs)
        .unwrap();
    let sidecar = Proc::spawn(
        std::process::Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path("sidecar.log"),
    )
    .unwrap();
    let all_written = || {
        files
            .iter()
            .all(|(n, f)| read(&tmpfs.path.join(f)).as_deref() == Some(&format!("{n}-v1")))
            .then_some(())
    };
    wait_for("300 files", LONG, all_written)
        .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    let log = broker.log_text();
    let opened: Vec<&str> = log.lines().filter(|l| l.contains("watch opened")).collect();
    assert!(
        opened.iter().any(|l| l.contains("secrets=256"))
            && opened.iter().any(|l| l.contains("secrets=44")),
        "{log}"
    );
    // The 3 s leases are renewed in two calls, and nothing is removed.
    wait_for("renewals", LONG, || {
        (sidecar.log_text().matches("renewed leases").count() >= 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    let log = broker.log_text();
    assert!(
        log.contains("leases=256") && log.contains("leases=44"),
        "{log}"
    );
    all_written().expect("every file still holds its value after the renewals");
    assert!(
        !sidecar.log_text().contains("removed secrets"),
        "{}",
        sidecar.log_text()
    );
    world.put("short/big-299", "short/big-299-v2").unwrap();
    let last = tmpfs.path.join("short_big-299");
    wait_for("rotation in the second share", LONG, || {
        (read(&last).as_deref() == Some("short/big-299-v2")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
}

#[test]
fn once_mode_writes_one_generation_and_exits() {
    let world = World::new(ROLES).unwrap();
    world.put("payments/db-password", "once-value").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let token = world
        .token_file("t", &Workload::new("payments", "worker-3", AUDIENCE))
        .unwrap();
    let cfg = world
        .sidecar_config(
            "s.toml",
            &token,
            &tmpfs.path,
            "",
            &[("payments/db-password", "pw")],
        )
        .unwrap();
    let out = world
        .run(
            "secrets-sidecar",
            &[
                "once",
                "--config",
                cfg.to_str().unwrap(),
                "--timeout",
                "30s",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(&tmpfs.path.join("pw")).as_deref(), Some("once-value"));
}

#[test]
fn sidecar_refuses_persistent_disks_and_escaping_names() {
    let world = World::new(ROLES).unwrap();
    let token = world
        .token_file("t", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    // The test's temp dir is on the build disk, not tmpfs.
    let disk = world.path("on-disk");
    std::fs::create_dir(&disk).unwrap();
    let on_disk_fs = secrets_sidecar_is_memory_fs(&disk);
    if !on_disk_fs {
        let cfg = world
            .sidecar_config("s.toml", &token, &disk, "", &[("payments/x", "x")])
            .unwrap();
        let out = world
            .run(
                "secrets-sidecar",
                &["once", "--config", cfg.to_str().unwrap(), "--timeout", "5s"],
            )
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not on tmpfs/ramfs"), "{err}");
        assert_eq!(
            std::fs::read_dir(&disk).unwrap().count(),
            0,
            "nothing written to disk"
        );
    }
    for bad in ["../escape", "a/b", ".hidden", "..data"] {
        let cfg = world
            .sidecar_config("bad.toml", &token, &disk, "", &[("payments/x", bad)])
            .unwrap();
        let out = world
            .run(
                "secrets-sidecar",
                &["once", "--config", cfg.to_str().unwrap()],
            )
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("secrets[0].file") && err.contains("invalid secret file name"),
            "{err}"
        );
    }
}

fn secrets_sidecar_is_memory_fs(p: &Path) -> bool {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    t.contains("tmpfs") || t.contains("ramfs")
}

#[test]
fn check_token_reports_identity_role_or_reason() {
    let world = World::new(ROLES).unwrap();
    let cfg = world.broker_config();
    let check = |token: &Path| {
        world
            .run(
                "secrets-broker",
                &[
                    "check-token",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--token-file",
                    token.to_str().unwrap(),
                ],
            )
            .unwrap()
    };

    let good = world
        .token_file("good", &Workload::new("payments", "api", AUDIENCE))
        .unwrap();
    let out = check(&good);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["accepted"], true);
    assert_eq!(line["role"], "payments");
    assert_eq!(line["identity"]["namespace"], "payments");
    assert_eq!(line["identity"]["service_account"], "api");
    assert_eq!(line["identity"]["pod_name"], "api-0");

    let mut expired = world
        .issuer
        .claims(&Workload::new("payments", "api", AUDIENCE));
    expired["exp"] = json!(1_000_000_000);
    let mut other_aud = Workload::new("payments", "api", "https://kubernetes.default.svc");
    other_aud.ttl_seconds = 600;
    let cases = [
        (
            world
                .write_token("expired", &world.issuer.sign(&expired).unwrap())
                .unwrap(),
            "token expired at 2001-09-09",
        ),
        (
            world.token_file("aud", &other_aud).unwrap(),
            "does not include [\"secrets-broker\"]",
        ),
        (
            world
                .token_file("norole", &Workload::new("payments", "admin", AUDIENCE))
                .unwrap(),
            "no role matches identity payments/admin",
        ),
        (
            world.write_token("garbage", "not-a-jwt").unwrap(),
            "malformed token",
        ),
    ];
    for (file, want) in cases {
        let out = check(&file);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(
            stdout.starts_with("rejected: ") && stdout.contains(want),
            "want {want:?}: {stdout}"
        );
        assert_eq!(stdout.trim().lines().count(), 1);
    }

    // Configuration and usage errors: exit 2, naming the key or file.
    std::fs::write(
        world.path("bad.toml"),
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("ttl = \"20s\"", "ttl = \"2h\""),
    )
    .unwrap();
    let out = world
        .run(
            "secrets-broker",
            &[
                "check-token",
                "--config",
                world.path("bad.toml").to_str().unwrap(),
                "--token-file",
                good.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("roles[0].ttl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = world
        .run(
            "secrets-broker",
            &[
                "check-token",
                "--config",
                cfg.to_str().unwrap(),
                "--token-file",
                "/nonexistent/token",
            ],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = world.run("secrets-broker", &["check-token"]).unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

/// Every refusal over real gRPC: the status code and an actionable message
/// that never echoes the token; the broker keeps serving good callers; bogus
/// key IDs do not hammer the issuer; a rotated issuer key is picked up.
#[test]
fn broker_refusals_over_grpc() {
    let world = World::new(ROLES).unwrap();
    world
        .put("payments/db-password", "grpc-secret-value")
        .unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let ca = std::fs::read(&world.tls.ca).unwrap();
    let port = world.broker_port;

    world.runtime.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = pb::broker_client::BrokerClient::new(channel);
        let fetch = |token: Option<String>, names: Vec<&str>, role: &str| {
            let mut client = client.clone();
            let mut req = tonic::Request::new(pb::FetchRequest {
                role: role.into(),
                names: names.into_iter().map(Into::into).collect(),
                ttl_seconds: 0,
            });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            async move { client.fetch(req).await }
        };

        let api = Workload::new("payments", "api", AUDIENCE);
        let good = world.issuer.mint(&api).unwrap();
        let ok = fetch(Some(good.clone()), vec!["payments/db-password"], "")
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.secrets[0].value, b"grpc-secret-value");
        assert_eq!(ok.secrets[0].version, 1);
        let lease = ok.secrets[0].lease.clone().unwrap();
        assert_eq!(lease.ttl_seconds, 20);
        assert_eq!(lease.lease_id.len(), 32);

        let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let claims = world.issuer.claims(&api);
        let body = b64(claims.clone());
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims.clone();
            c[k] = v;
            world.issuer.sign(&c).unwrap()
        };
        use tonic::Code;
        // (token, secrets, role, expected code, expected message fragment)
        type Case<'a> = (Option<String>, Vec<&'a str>, &'a str, Code, &'a str);
        let cases: Vec<Case> = vec![
            (
                None,
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "no bearer token",
            ),
            (
                Some(format!("{}.{body}.", b64(json!({"alg":"none"})))),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                // The algorithm is the problem, not the empty signature.
                "alg \"none\"",
            ),
            (
                Some(format!("{}.{body}.c2ln", b64(json!({"alg":"none"})))),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "\"none\"",
            ),
            (
                Some(format!(
                    "{}.{body}.c2ln",
                    b64(json!({"alg":"HS256","kid":"dev-key-1"}))
                )),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "HMAC",
            ),
            (
                Some(format!(
                    "{}.{body}.c2ln",
                    b64(json!({"alg":"ES256","jwk":{"kty":"EC"}}))
                )),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "own key (`jwk`)",
            ),
            (
                Some(format!(
                    "{}.{body}.c2ln",
                    b64(json!({"alg":"ES256","kid":"dev-key-1"}))
                )),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "signature does not verify",
            ),
            (
                Some(with("exp", json!(1_000_000_000))),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "token expired at",
            ),
            (
                Some(with("iss", json!("https://evil.example"))),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "not the trusted issuer",
            ),
            (
                Some(with("aud", json!(["other"]))),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "does not include",
            ),
            (
                Some(with("nbf", json!(4_000_000_000i64))),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "not valid before",
            ),
            (
                Some(with(
                    "sub",
                    json!("system:serviceaccount:kube-system:admin"),
                )),
                vec!["payments/db-password"],
                "",
                Code::Unauthenticated,
                "does not match its kubernetes.io claims",
            ),
            (
                Some(good.clone()),
                vec!["short/k"],
                "",
                Code::PermissionDenied,
                "role \"payments\" does not grant secret \"short/k\"",
            ),
            (
                Some(good.clone()),
                vec!["payments/db-password"],
                "short",
                Code::PermissionDenied,
                "is not bound to role \"short\"",
            ),
            (
                Some(
                    world
                        .issuer
                        .mint(&Workload::new("payments", "admin", AUDIENCE))
                        .unwrap(),
                ),
                vec!["payments/db-password"],
                "",
                Code::PermissionDenied,
                "no role matches identity payments/admin",
            ),
            (
                Some(good.clone()),
                vec!["payments/missing"],
                "",
                Code::NotFound,
                "does not exist",
            ),
            (
                Some(good.clone()),
                vec!["../etc/passwd"],
                "",
                Code::InvalidArgument,
                "segment starting with '.'",
            ),
            (
                Some(good.clone()),
                vec![],
                "",
                Code::InvalidArgument,
                "at least one secret",
            ),
        ];
        for (token, names, role, code, want) in cases {
            let status = fetch(token.clone(), names, role).await.expect_err(want);
            assert_eq!(status.code(), code, "{want}: {}", status.message());
            assert!(
                status.message().contains(want),
                "want {want:?}, got {:?}",
                status.message()
            );
            if let Some(t) = token {
                assert!(!status.message().contains(&t), "message echoes the token");
            }
        }

        // A flood of unknown key IDs refreshes the JWKS at most once per
        // jwks_refresh_min_interval (2s), and good callers keep being served.
        let before = world.issuer.jwks_served();
        for i in 0..50 {
            let t = format!(
                "{}.{body}.c2ln",
                b64(json!({"alg":"ES256","kid":format!("bogus-{i}")}))
            );
            let status = fetch(Some(t), vec!["payments/db-password"], "")
                .await
                .unwrap_err();
            assert!(
                status.message().contains("does not publish"),
                "{}",
                status.message()
            );
        }
        let refreshes = world.issuer.jwks_served() - before;
        assert!(refreshes <= 3, "{refreshes} JWKS fetches for 50 bogus kids");
        assert!(
            fetch(Some(good.clone()), vec!["payments/db-password"], "")
                .await
                .is_ok()
        );

        // Issuer key rotation: tokens signed with the new key are accepted once
        // the rate limit lets the broker refetch.
        world.issuer.rotate_key().unwrap();
        let rotated = world.issuer.mint(&api).unwrap();
        let mut last = String::new();
        for _ in 0..200 {
            match fetch(Some(rotated.clone()), vec!["payments/db-password"], "").await {
                Ok(_) => {
                    last.clear();
                    break;
                }
                Err(s) => last = s.message().to_owned(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(last.is_empty(), "rotated key never accepted: {last}");
    });

    let log = broker.log_text();
    assert!(log.contains("token refused"), "refusals are logged");
    assert_no_leak(&log, "broker", &["grpc-secret-value"]);
}

/// The sidecar re-reads the token file at every call: a pod whose token was
/// expired recovers as soon as kubelet writes a fresh one, without a restart.
#[test]
fn sidecar_rereads_the_token_file() {
    let world = World::new(ROLES).unwrap();
    world
        .put("payments/db-password", "after-token-refresh")
        .unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let tmpfs = Tmpfs::new().unwrap();
    let api = Workload::new("payments", "api", AUDIENCE);
    let mut expired = world.issuer.claims(&api);
    expired["exp"] = json!(1_000_000_000);
    let token = world
        .write_token("t", &world.issuer.sign(&expired).unwrap())
        .unwrap();
    let cfg = world
        .sidecar_config(
            "s.toml",
            &token,
            &tmpfs.path,
            "",
            &[("payments/db-password", "pw")],
        )
        .unwrap();
    let sidecar = Proc::spawn(
        std::process::Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path("sidecar.log"),
    )
    .unwrap();
    wait_for("the refusal to be logged", LONG, || {
        sidecar
            .log_text()
            .contains("token expired at")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    assert!(read(&tmpfs.path.join("pw")).is_none());
    // kubelet rotates the projected token: write-then-rename, like AtomicWriter.
    let fresh = world.token_file("t.new", &api).unwrap();
    std::fs::rename(fresh, &token).unwrap();
    wait_for("secrets after the token refresh", LONG, || {
        read(&tmpfs.path.join("pw"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
}

/// `secrets-broker dev`: the demo secret appears in the `..data` layout with
/// mode 0400, rotates to a new generation, and Ctrl-C removes it.
#[test]
fn dev_mode_runs_the_whole_system() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Proc::spawn(
        std::process::Command::new(bin("secrets-broker"))
            .args(["dev", "--rotate-every", "1s", "--dir"])
            .arg(dir.path()),
        dir.path().join("dev.log"),
    )
    .unwrap();
    let file = dir.path().join("secrets/greeting");
    let first = wait_for("the demo secret", LONG, || read(&file))
        .unwrap_or_else(|e| panic!("{e}\n{}", dev.log_text()));
    assert!(
        first.starts_with("hello from secrets-broker dev"),
        "{first}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400);
    assert!(std::fs::read_link(dir.path().join("secrets/..data")).is_ok());
    wait_for("a rotation", LONG, || read(&file).filter(|v| *v != first))
        .unwrap_or_else(|e| panic!("{e}\n{}", dev.log_text()));

    dev.signal("INT");
    let status = dev.wait_exit(LONG).unwrap();
    assert!(status.success(), "dev exit {status}: {}", dev.log_text());
    assert!(
        std::fs::symlink_metadata(&file).is_err(),
        "secrets removed on exit"
    );
    assert!(!dir.path().join("token").exists());
}
