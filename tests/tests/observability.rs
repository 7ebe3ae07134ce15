//! Observability end to end: a full scenario at debug log level (login,
//! fetch, rotation, revocation, bad tokens, a backend error), then every log
//! line, metrics page, audit record, error message and admin API response is
//! searched for every secret value and token used. Also: request IDs link a
//! sidecar's failure to the broker's log line, and the metrics report the
//! scenario.

use std::path::Path;
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, Tmpfs, World, http_get, out_text, wait_for};
use serde_json::json;

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

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[test]
fn nothing_secret_reaches_logs_metrics_audit_errors_or_admin_responses() {
    let world = World::new(ROLES).unwrap();
    let values = [
        "leak-canary-db-9d1e77",
        "leak-canary-api-41b0c3",
        "leak-canary-rotated-5a6f02",
    ];
    world.put("payments/db-password", values[0]).unwrap();
    world.put("payments/api-key", values[1]).unwrap();

    // A secret sealed with a key the broker does not have: reading it is a backend error.
    let other_key = world.path("other.key");
    let out = world
        .run(
            "secrets-broker",
            &[
                "store",
                "keygen",
                "--out",
                other_key.to_str().unwrap(),
                "--key-id",
                "stray",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    let cfg = std::fs::read_to_string(world.broker_config())
        .unwrap()
        .replace("store.key", "other.key");
    std::fs::write(world.path("other.toml"), cfg).unwrap();
    let mut child = std::process::Command::new(secrets_broker_e2e::bin("secrets-broker"))
        .args(["store", "put", "--config"])
        .arg(world.path("other.toml"))
        .arg("payments/sealed-elsewhere")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"leak-canary-stray-77e1aa")
            .unwrap();
    }
    assert!(child.wait().unwrap().success());

    let broker = world.start_broker("broker.log").unwrap();
    let api = Workload::new("payments", "api", AUDIENCE);
    let (sidecar, fs, health) = world
        .start_sidecar(
            "api",
            &api,
            world.broker_port,
            &[("payments/db-password", "db"), ("payments/api-key", "api")],
        )
        .unwrap();
    wait_for("secrets on disk", LONG, || {
        exists(&fs.path.join("api")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    world.put("payments/db-password", values[2]).unwrap();
    wait_for("rotation", LONG, || {
        (std::fs::read_to_string(fs.path.join("db")).ok()? == values[2]).then_some(())
    })
    .unwrap();

    // Bad tokens and a backend error, through `secrets-sidecar once`.
    let mut errors = String::new();
    let mut tokens = vec![std::fs::read_to_string(world.path("api.token")).unwrap()];
    let once = |name: &str, token: &str, secret: &str| {
        let tmp = Tmpfs::new().unwrap();
        let t = world.write_token(&format!("{name}.token"), token).unwrap();
        let cfg = world
            .sidecar_config(&format!("{name}.toml"), &t, &tmp.path, "", &[(secret, "x")])
            .unwrap();
        world
            .run(
                "secrets-sidecar",
                &["once", "--config", cfg.to_str().unwrap(), "--timeout", "1s"],
            )
            .unwrap()
    };
    let mut expired = world.issuer.claims(&api);
    expired["exp"] = json!(1_000_000_000);
    let expired = world.issuer.sign(&expired).unwrap();
    let good = world.issuer.mint(&api).unwrap();
    let forged = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[2] = "AAAA".repeat(20);
        parts.join(".")
    };
    for (name, token, secret, want) in [
        (
            "expired",
            expired.as_str(),
            "payments/db-password",
            "token expired at",
        ),
        (
            "forged",
            forged.as_str(),
            "payments/db-password",
            "signature does not verify",
        ),
        (
            "backend",
            good.as_str(),
            "payments/sealed-elsewhere",
            "the secrets store is unavailable",
        ),
    ] {
        let out = once(name, token, secret);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stderr.contains(want), "{name}: {stderr}");
        // The request ID in the sidecar's error finds the broker's log line.
        let rid = stderr
            .split("request id ")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap()
            .to_owned();
        wait_for("broker log line with the request id", LONG, || {
            broker
                .log_text()
                .contains(&format!("request_id={rid}"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {rid}"));
        errors.push_str(&stderr);
        tokens.push(token.to_owned());
    }

    // Revocation.
    let o = world
        .brokerctl(
            Some("revoker"),
            &[
                "revoke",
                "--namespace",
                "payments",
                "--service-account",
                "api",
                "--reason",
                "leak test",
            ],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    wait_for("revoked", LONG, || {
        (!exists(&fs.path.join("db"))).then_some(())
    })
    .unwrap();

    // Metrics tell the story (the sidecar's retries after the revocation are
    // refused a moment later).
    let broker_metrics = wait_for("a refused retry", LONG, || {
        let (_, m) = http_get(world.ops_port, "/metrics").ok()?;
        m.contains(r#"result="revoked"}"#).then_some(m)
    })
    .unwrap();
    for line in [
        r#"secrets_broker_calls_total{action="fetch",result="ok"}"#,
        r#"secrets_broker_calls_total{action="login",result="token_expired"}"#,
        r#"secrets_broker_calls_total{action="login",result="token_invalid"}"#,
        r#"secrets_broker_calls_total{action="fetch",result="backend_error"}"#,
        r#"secrets_broker_call_duration_seconds_bucket{le="#,
        r#"secrets_broker_backend_reads_total{backend="embedded"}"#,
        r#"secrets_broker_cache_requests_total{result="miss"}"#,
        r#"secrets_broker_jwks_refreshes_total{result="ok"}"#,
        "secrets_broker_secrets_served_total",
        "secrets_broker_watch_streams",
    ] {
        assert!(
            broker_metrics.contains(line),
            "missing {line}\n{broker_metrics}"
        );
    }
    let (_, sidecar_metrics) = http_get(health, "/metrics").unwrap();
    assert!(
        sidecar_metrics.contains("secrets_sidecar_generation_swaps_total"),
        "{sidecar_metrics}"
    );
    assert!(
        sidecar_metrics.contains("secrets_sidecar_revoked_secrets 2"),
        "{sidecar_metrics}"
    );

    // Everything an operator or an attacker with log access could read.
    let mut haystack = vec![
        ("broker log", broker.log_text()),
        ("sidecar log", sidecar.log_text()),
        ("broker metrics", broker_metrics),
        ("sidecar metrics", sidecar_metrics),
        ("errors", errors),
    ];
    for args in [
        vec!["--output", "json", "audit", "tail", "-n", "100000"],
        vec!["--output", "json", "revocations", "list"],
        vec!["--output", "json", "leases", "list"],
        vec!["--output", "json", "secrets", "list"],
        vec!["audit", "tail", "-n", "100000"],
    ] {
        let o = world.brokerctl(Some("viewer"), &args).unwrap();
        assert!(o.status.success(), "{}", out_text(&o));
        haystack.push(("admin API", out_text(&o)));
    }
    let mut needles: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
    needles.push("leak-canary-stray-77e1aa".into());
    for t in &tokens {
        needles.push(t.trim().to_owned());
        needles.push(t.trim().rsplit('.').next().unwrap().to_owned()); // the signature alone
    }
    for (what, text) in &haystack {
        assert!(
            !text.is_empty(),
            "{what} is empty: the test would prove nothing"
        );
        for n in &needles {
            assert!(
                !text.contains(n.as_str()),
                "{what} contains a secret or token: {n}"
            );
        }
    }
    assert!(
        haystack[0].1.contains("DEBUG"),
        "the broker must have logged at debug level for this test to mean anything"
    );
}
