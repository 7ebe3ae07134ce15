//! The admin API and `brokerctl` against hostile input: the role is checked
//! before a body is read, bodies are bounded, the audit log keeps a bounded
//! summary, names are percent-encoded (and refused before sending when the
//! broker would refuse them), and a revocation reason is one line.

use secrets_broker_e2e::{World, out_text};
use serde_json::Value;

const ROLES: &str = r#"
[[roles]]
name = "payments"
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]
ttl = "20s"
"#;

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", out_text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out_text(o)))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Callers without the role are refused before their body is read, a body
/// over the limit is refused by size, and no audit record holds the body.
#[test]
fn refused_calls_cost_no_body_and_audit_a_bounded_summary() {
    let world = World::new(ROLES).unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let reason = "x".repeat(100_000);
    let revoke = ["revoke", "--namespace", "payments", "--reason", &reason];

    let o = world.brokerctl(None, &revoke).unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    let o = world.brokerctl(Some("viewer"), &revoke).unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));
    let o = world.brokerctl(Some("revoker"), &revoke).unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(
        stderr(&o).contains("413") && stderr(&o).contains("65536-byte limit"),
        "{}",
        stderr(&o)
    );
    let rules = json(
        &world
            .brokerctl(Some("viewer"), &["--output", "json", "revocations", "list"])
            .unwrap(),
    );
    assert_eq!(rules["revocations"].as_array().map(Vec::len), Some(0));

    let audit = json(
        &world
            .brokerctl(
                Some("viewer"),
                &["--output", "json", "audit", "tail", "-n", "100"],
            )
            .unwrap(),
    );
    let records = audit["records"].as_array().unwrap();
    let revokes: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "admin.revoke")
        .collect();
    assert_eq!(revokes.len(), 3, "{audit:#}");
    for r in records {
        let detail = r["detail"].to_string();
        assert!(detail.len() < 1024, "audit record too large: {detail:.200}");
        assert!(!detail.contains("xxxxxxxxxxxxxxxx"), "{detail:.200}");
    }
    let verify = world
        .brokerctl(Some("viewer"), &["audit", "verify"])
        .unwrap();
    assert!(verify.status.success(), "{}", out_text(&verify));
}

/// Names and IDs are path segments: `brokerctl` refuses what the broker
/// would refuse before sending anything, and encodes the rest, so a name
/// can never reach another endpoint or another secret.
#[test]
fn brokerctl_cannot_be_steered_to_another_endpoint() {
    let world = World::new(ROLES).unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let value = world.path("value");
    let value = value.to_str().unwrap();
    std::fs::write(value, "original-a-3b1c").unwrap();
    let o = world
        .brokerctl(
            Some("admin"),
            &["secrets", "put", "a", "--value-file", value],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));

    std::fs::write(value, "overwritten-9f2e").unwrap();
    let o = world
        .brokerctl(
            Some("admin"),
            &["secrets", "put", "a?b=1", "--value-file", value],
        )
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", out_text(&o));
    assert!(stderr(&o).contains("contains '?'"), "{}", stderr(&o));
    let o = world
        .brokerctl(Some("admin"), &["secrets", "get", "a"])
        .unwrap();
    assert_eq!(o.stdout, b"original-a-3b1c", "{}", out_text(&o));

    let created = json(
        &world
            .brokerctl(
                Some("revoker"),
                &[
                    "--output",
                    "json",
                    "revoke",
                    "--namespace",
                    "payments",
                    "--reason",
                    "INC-7",
                ],
            )
            .unwrap(),
    );
    let id = created["rule"]["id"].as_str().unwrap().to_owned();
    for args in [
        vec!["secrets", "delete", &*format!("x/../../revocations/{id}")],
        vec![
            "secrets",
            "delete",
            &*format!("x/%2e%2e/%2e%2e/revocations/{id}"),
        ],
        vec!["secrets", "get", "a#fragment"],
        vec!["revocations", "delete", &*format!("{id}/../{id}")],
        vec!["revocations", "delete", &*format!("{id}?x=1")],
    ] {
        let o = world.brokerctl(Some("admin"), &args).unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", out_text(&o));
    }
    let rules = json(
        &world
            .brokerctl(Some("viewer"), &["--output", "json", "revocations", "list"])
            .unwrap(),
    );
    assert_eq!(rules["revocations"][0]["id"], id.as_str(), "{rules:#}");

    // What is valid still works, a name with '/' included.
    std::fs::write(value, "nested-5e7a").unwrap();
    let o = world
        .brokerctl(
            Some("admin"),
            &["secrets", "put", "team/db.password", "--value-file", value],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let o = world
        .brokerctl(Some("admin"), &["secrets", "get", "team/db.password"])
        .unwrap();
    assert_eq!(o.stdout, b"nested-5e7a", "{}", out_text(&o));
    // A secret's body may hold its largest value, base64-encoded.
    let big = vec![b'v'; 1 << 20];
    std::fs::write(value, &big).unwrap();
    let o = world
        .brokerctl(
            Some("admin"),
            &["secrets", "put", "team/big", "--value-file", value],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let o = world
        .brokerctl(Some("admin"), &["secrets", "get", "team/big"])
        .unwrap();
    assert!(o.stdout == big, "{}", stderr(&o));
    let o = world
        .brokerctl(Some("revoker"), &["revocations", "delete", &id])
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
}

/// A reason with a newline would forge a log line: refused, naming why.
#[test]
fn a_revocation_reason_is_one_line() {
    let world = World::new(ROLES).unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let o = world
        .brokerctl(
            Some("revoker"),
            &[
                "revoke",
                "--namespace",
                "payments",
                "--reason",
                "INC-1\n2026-12-08T00:00:00Z INFO revocation rule deleted",
            ],
        )
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(stderr(&o).contains("control character"), "{}", stderr(&o));
    assert!(
        !broker.log_text().contains("INFO revocation rule deleted"),
        "the forged line reached the log"
    );
}
