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

/// The world's broker config with two [[issuers]] instead of its one
/// [identity]: the world's issuer as cluster `a`, `b` as cluster `b`.
fn two_clusters(world: &World, b: &secrets_broker::dev::issuer::Issuer) -> String {
    let single = std::fs::read_to_string(world.broker_config()).unwrap();
    let block_b = format!(
        "[[issuers]]\ncluster = \"b\"\nissuer = \"{}\"\naudiences = [\"{AUDIENCE}\"]\nca_file = \"tls/ca.crt\"\n\n[database]",
        b.url()
    );
    single
        .replace("[identity]\n", "[[issuers]]\ncluster = \"a\"\n")
        .replacen("[database]", &block_b, 1)
}

#[test]
fn identities_are_qualified_by_cluster() {
    let world = World::new(ROLES).unwrap();
    let issuer_b = world.add_issuer().unwrap();
    let stranger = world.add_issuer().unwrap();
    let two = two_clusters(&world, &issuer_b);
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

/// The same namespace, service account and pod name in another cluster is
/// another workload: it cannot renew or release a lease of the first by ID.
#[test]
fn a_lease_is_renewed_and_released_only_by_its_own_cluster() {
    use secrets_broker_proto::v1 as pb;
    const BOTH: &str = r#"
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
secrets = ["payments/*"]
"#;
    let world = World::new(BOTH).unwrap();
    let issuer_b = world.add_issuer().unwrap();
    let two = two_clusters(&world, &issuer_b);
    // The world's own config, so `put` reads it too.
    std::fs::write(world.broker_config(), &two).unwrap();
    world.put("payments/db", "db-value-42aa").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let api = Workload::new("payments", "api", AUDIENCE);
    let (token_a, token_b) = (
        world.issuer.mint(&api).unwrap(),
        issuer_b.mint(&api).unwrap(),
    );
    fn request<T>(token: &str, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    }
    world.runtime.block_on(async {
        let mut c =
            pb::broker_client::BrokerClient::new(world.grpc_channel(world.broker_port).await);
        let fetched = c
            .fetch(request(
                &token_a,
                pb::FetchRequest {
                    role: String::new(),
                    names: vec!["payments/db".into()],
                    ttl_seconds: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let s = &fetched.secrets[0];
        let held = pb::LeaseRef {
            name: s.name.clone(),
            version: s.version,
            lease_id: s.lease.as_ref().unwrap().lease_id.clone(),
        };
        let renew = |token: &str| {
            request(
                token,
                pb::RenewRequest {
                    role: String::new(),
                    leases: vec![held.clone()],
                    ttl_seconds: 0,
                },
            )
        };
        let status = c.renew(renew(&token_b)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(
            status.message().contains("is unknown or not yours"),
            "{status:?}"
        );
        let released = c
            .release(request(
                &token_b,
                pb::ReleaseRequest {
                    role: String::new(),
                    leases: vec![held.clone()],
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .released;
        assert_eq!(released, 0, "cluster b released cluster a's lease");
        // Its own cluster still renews it.
        assert!(c.renew(renew(&token_a)).await.is_ok());
    });
}
