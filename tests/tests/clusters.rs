//! Several clusters: one broker trusts two issuers; an identity is always
//! qualified by its issuer's cluster, so payments/api in cluster a is never
//! payments/api in cluster b, for roles and for revocation rules alike.

use std::path::Path;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, World, out_text};

const ROLES: &str = r#"
[[roles]]
name = "a-payments"
clusters = ["a"]
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments/*"]

[[roles]]
name = "b-payments"
clusters = ["b"]
namespaces = ["payments"]
service_accounts = ["api"]
secrets = ["payments-b/*"]
"#;

fn check(world: &World, cfg: &Path, token: &Path, role: &str) -> std::process::Output {
    let mut args = vec![
        "check-token",
        "--config",
        cfg.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    if !role.is_empty() {
        args.extend(["--role", role]);
    }
    world.run("secrets-broker", &args).unwrap()
}

#[test]
fn identities_are_qualified_by_cluster() {
    let world = World::new(ROLES).unwrap();
    let issuer_b = world.add_issuer().unwrap();
    let stranger = world.add_issuer().unwrap();
    // Two [[issuers]] instead of the one [identity].
    let single = std::fs::read_to_string(world.broker_config()).unwrap();
    let block_b = format!(
        "[[issuers]]\ncluster = \"b\"\nissuer = \"{}\"\naudiences = [\"{AUDIENCE}\"]\nca_file = \"tls/ca.crt\"\n\n[database]",
        issuer_b.url()
    );
    let two = single
        .replace("[identity]\n", "[[issuers]]\ncluster = \"a\"\n")
        .replacen("[database]", &block_b, 1);
    let cfg = world.path("clusters.toml");
    std::fs::write(&cfg, &two).unwrap();

    let api = Workload::new("payments", "api", AUDIENCE);
    let token_a = world
        .write_token("a.jwt", &world.issuer.mint(&api).unwrap())
        .unwrap();
    let token_b = world
        .write_token("b.jwt", &issuer_b.mint(&api).unwrap())
        .unwrap();
    let token_c = world
        .write_token("c.jwt", &stranger.mint(&api).unwrap())
        .unwrap();

    let out = check(&world, &cfg, &token_a, "");
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["role"].as_str(), v["identity"]["cluster"].as_str()),
        (Some("a-payments"), Some("a"))
    );

    let out = check(&world, &cfg, &token_b, "");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", out_text(&out)));
    assert_eq!(
        (v["role"].as_str(), v["identity"]["cluster"].as_str()),
        (Some("b-payments"), Some("b"))
    );

    // Cluster b's payments/api cannot use cluster a's role.
    let out = check(&world, &cfg, &token_b, "a-payments");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("payments/api (pod api-0) in cluster b")
            && text.contains("is not bound to role \"a-payments\""),
        "{text}"
    );

    // Without a role for cluster b, its tokens match nothing.
    let only_a = two
        .split("[[roles]]\nname = \"b-payments\"")
        .next()
        .unwrap()
        .to_owned();
    std::fs::write(world.path("only-a.toml"), only_a).unwrap();
    let out = check(&world, &world.path("only-a.toml"), &token_b, "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no role matches identity payments/api (pod api-0) in cluster b"),
        "{text}"
    );

    // An issuer the broker does not trust is named, with the trusted ones.
    let out = check(&world, &cfg, &token_c, "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("is not the trusted issuer") && text.contains(" or "),
        "{text}"
    );

    // A revocation rule for cluster a leaves cluster b alone.
    std::fs::write(world.broker_config(), &two).unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let o = world
        .brokerctl(
            Some("revoker"),
            &[
                "revoke",
                "--cluster",
                "a",
                "--namespace",
                "payments",
                "--reason",
                "cluster a only",
            ],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let out = check(&world, &cfg, &token_a, "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("revoked (rule id"),
        "{}",
        out_text(&out)
    );
    let out = check(&world, &cfg, &token_b, "");
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));

    // Both issuers' keys load on a running broker.
    let (_, metrics) = secrets_broker_e2e::http_get(world.ops_port, "/metrics").unwrap();
    let ok_refreshes: f64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"secrets_broker_jwks_refreshes_total{result="ok"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(ok_refreshes >= 2.0, "{metrics}");
}
