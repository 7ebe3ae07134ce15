//! `secrets-broker check-token` refuses exactly what a login refuses, with a
//! message naming the problem: bytes that are not text, and names that
//! Kubernetes could not have issued.

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, World, out_text};

const ROLES: &str = r#"
[[roles]]
name = "team-a"
namespaces = ["team-a"]
service_accounts = ["app*"]
secrets = ["team-a/*"]
ttl = "20s"
"#;

fn check_token(world: &World, token_file: &std::path::Path) -> std::process::Output {
    world
        .run(
            "secrets-broker",
            &[
                "check-token",
                "--config",
                world.broker_config().to_str().unwrap(),
                "--token-file",
                token_file.to_str().unwrap(),
            ],
        )
        .unwrap()
}

#[test]
fn a_token_file_that_is_not_text_is_a_rejection() {
    let world = World::new(ROLES).unwrap();
    let file = world.path("binary.token");
    std::fs::write(&file, b"eyJ\xff\xfe.\x00\x01.\x80").unwrap();
    let o = check_token(&world, &file);
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("rejected: ") && out.contains("not UTF-8"),
        "{out}"
    );
    // Garbage text is refused the same way (exit 1), as a login would.
    let file = world.write_token("garbage.token", "not-a-jwt").unwrap();
    assert_eq!(check_token(&world, &file).status.code(), Some(1));
    // A missing file is still a usage error.
    assert_eq!(
        check_token(&world, &world.path("missing.token"))
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn a_service_account_name_kubernetes_cannot_issue_is_refused() {
    let world = World::new(ROLES).unwrap();
    let good = world
        .token_file("good.token", &Workload::new("team-a", "app", AUDIENCE))
        .unwrap();
    let o = check_token(&world, &good);
    assert_eq!(o.status.code(), Some(0), "{}", out_text(&o));
    let bad = world
        .token_file("bad.token", &Workload::new("team-a", "app:extra", AUDIENCE))
        .unwrap();
    let o = check_token(&world, &bad);
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("`kubernetes.io.serviceaccount.name`") && out.contains("DNS-1123"),
        "{out}"
    );
}
