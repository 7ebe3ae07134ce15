//! The AWS backend against a real AWS API emulator (pip's `moto[server]`),
//! behind a counting proxy: what reached "AWS" is counted outside the broker.
//! Real binaries, a real HTTPS issuer, a real tmpfs; the application side is
//! an unmodified AWS SDK (boto3) reading the sidecar's container endpoint or
//! a credentials file.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::moto::{self, Moto};
use secrets_broker_e2e::{AUDIENCE, Proc, Tmpfs, World, bin, free_port, out_text, wait_for};
use secrets_broker_proto::v1 as pb;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);
const STS_AUD: &str = "sts.amazonaws.com";

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["demo"]
service_accounts = ["app"]
secrets = ["aws/*", "app/*"]
ttl = "6s"
max_ttl = "1h"
"#;

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A world whose issuer also accepts IRSA tokens (audience sts.amazonaws.com,
/// the same cluster issuer, as on EKS), with `aws_toml` appended.
fn world_with_aws(aws_toml: &str) -> World {
    let world = World::new(ROLES).unwrap();
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("audiences = [\"{AUDIENCE}\"]"),
        &format!("audiences = [\"{AUDIENCE}\", \"{STS_AUD}\"]"),
    );
    std::fs::write(&path, format!("{text}\n{aws_toml}")).unwrap();
    world
}

/// `secrets-broker serve` with static AWS credentials for its own calls (the
/// default AWS chain reads them from the environment).
fn start_broker(world: &World) -> Proc {
    world
        .start_broker_env(
            &world.broker_config(),
            "broker.log",
            &[
                ("AWS_ACCESS_KEY_ID", "broker-key-id"),
                ("AWS_SECRET_ACCESS_KEY", "broker-secret-key"),
                ("AWS_CONFIG_FILE", "/nonexistent"),
                ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:?}"))
}

fn pod(name: &str, audience: &str) -> Workload {
    let mut w = Workload::new("demo", "app", audience);
    w.pod = Some(name.into());
    w
}

/// A gRPC client for the world's broker, on the world's runtime.
async fn client(world: &World) -> pb::broker_client::BrokerClient<tonic::transport::Channel> {
    let ca = std::fs::read(&world.tls.ca).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", world.broker_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
    pb::broker_client::BrokerClient::new(channel)
}

fn fetch(world: &World, token: &str, names: &[&str]) -> Result<Vec<pb::Secret>, tonic::Status> {
    world.runtime.block_on(async {
        let mut c = client(world).await;
        let mut req = tonic::Request::new(pb::FetchRequest {
            role: String::new(),
            names: names.iter().map(|n| n.to_string()).collect(),
            ttl_seconds: 0,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        c.fetch(req).await.map(|r| r.into_inner().secrets)
    })
}

/// Starts a sidecar for `w` with `extra` config (tables) and `secrets`.
fn start_sidecar(
    world: &World,
    name: &str,
    w: &Workload,
    extra: &str,
    secrets: &[(&str, &str)],
) -> (Proc, Tmpfs) {
    let fs = Tmpfs::new().unwrap();
    let token = world.token_file(&format!("{name}.token"), w).unwrap();
    // Top-level keys first, then `extra`'s tables, then the secrets.
    let cfg = world
        .sidecar_config(&format!("{name}.toml"), &token, &fs.path, extra, secrets)
        .unwrap();
    let proc = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", world.log_level),
        world.path(&format!("{name}.log")),
    )
    .unwrap();
    (proc, fs)
}

fn creds_of(path: &Path) -> Option<Value> {
    let v: Value = serde_json::from_str(&read(path)?).ok()?;
    v["AccessKeyId"].as_str()?;
    Some(v)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

/// Unix time of an RFC 3339 `...Z` timestamp, through Python (no date crate here).
fn unix_of(rfc3339: &str) -> f64 {
    let out = Command::new(moto::venv().join("bin/python"))
        .args([
            "-c",
            "import sys,datetime;print(datetime.datetime.fromisoformat(sys.argv[1].replace('Z','+00:00')).timestamp())",
            rfc3339,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// boto3, unmodified, in a clean environment plus `env`: prints the caller ARN.
fn boto3_caller_arn(moto: &Moto, env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(moto::venv().join("bin/python"));
    cmd.args([
        "-c",
        "import boto3,sys;print(boto3.client('sts',endpoint_url=sys.argv[1],region_name='us-east-1').get_caller_identity()['Arn'])",
        &moto.direct(),
    ])
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("HOME", "/nonexistent")
    .env("AWS_CONFIG_FILE", "/nonexistent")
    .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn irsa_credentials_reach_an_unmodified_sdk_and_are_replaced_before_they_expire() {
    let moto =
        Moto::start(std::env::temp_dir().join(format!("moto-{}.log", std::process::id()))).unwrap();
    let world = world_with_aws(&format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[[aws.secrets]]
name = "aws/web"
kind = "sts-web-identity"
role_arn = "arn:aws:iam::{account}:role/web-app"
duration = "45s"
"#,
        endpoint = moto.endpoint(),
        account = moto::ACCOUNT,
    ));
    let broker = start_broker(&world);
    let port = free_port();
    let token_dir = world.path("aws-token");
    std::fs::create_dir_all(&token_dir).unwrap();
    let token_file = token_dir.join("token");
    let extra = format!(
        r#"
[aws_credentials]
listen = "127.0.0.1:{port}"
secret = "aws/web"
token_file = "{token}"

[[templates]]
file = "aws-credentials"
source = """
[default]
aws_access_key_id = {{{{ (secrets["aws/web"] | fromjson).AccessKeyId }}}}
aws_secret_access_key = {{{{ (secrets["aws/web"] | fromjson).SecretAccessKey }}}}
aws_session_token = {{{{ (secrets["aws/web"] | fromjson).SessionToken }}}}
"""
"#,
        token = token_file.display()
    );
    // The sidecar presents the pod's IRSA token (audience sts.amazonaws.com).
    let (sidecar, fs) = start_sidecar(
        &world,
        "web",
        &pod("web-0", STS_AUD),
        &extra,
        &[("aws/web", "aws.json")],
    );
    let file = fs.path.join("aws.json");
    let first = wait_for("STS credentials on disk", LONG, || creds_of(&file))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));
    assert_eq!(first["Version"], 1);
    assert_eq!(moto.calls("AssumeRoleWithWebIdentity"), 1);

    // The credentials work: AWS says who they are (the configured role, the
    // session named after the pod).
    let want_arn = format!(
        "arn:aws:sts::{}:assumed-role/web-app/demo.app.web-0",
        moto::ACCOUNT
    );
    let arn = moto
        .caller_arn(
            s(&first, "AccessKeyId"),
            s(&first, "SecretAccessKey"),
            s(&first, "SessionToken"),
        )
        .unwrap();
    assert_eq!(arn, want_arn);

    // An unmodified SDK through the container credentials endpoint.
    wait_for("endpoint token file", LONG, || read(&token_file)).unwrap();
    let out = boto3_caller_arn(
        &moto,
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://127.0.0.1:{port}/creds"),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ],
    );
    assert!(out.status.success(), "{}", out_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want_arn);
    // Without the token file's token: refused.
    let (code, _) = http_get_auth(port, None);
    assert_eq!(code, 401);
    let (code, _) = http_get_auth(port, Some("0123"));
    assert_eq!(code, 403);

    // And through the rendered shared credentials file.
    let cred_file = fs.path.join("aws-credentials");
    wait_for("credentials file", LONG, || read(&cred_file)).unwrap();
    let out = boto3_caller_arn(
        &moto,
        &[(
            "AWS_SHARED_CREDENTIALS_FILE",
            cred_file.display().to_string(),
        )],
    );
    assert!(out.status.success(), "{}", out_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want_arn);

    // The credentials are replaced before they expire: at about two thirds
    // of their 45 s life, through the lease renewal.
    let old_expiry = unix_of(s(&first, "Expiration"));
    let (second, seen_at) = wait_for("new STS credentials on disk", LONG, || {
        creds_of(&file)
            .filter(|c| c["AccessKeyId"] != first["AccessKeyId"])
            .map(|c| (c, now_unix()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));
    assert!(
        seen_at < old_expiry,
        "new credentials appeared {:.1}s after the old ones expired",
        seen_at - old_expiry
    );
    assert!(unix_of(s(&second, "Expiration")) > old_expiry);
    eprintln!(
        "refresh margin: new credentials on disk {:.1}s before the old ones expired",
        old_expiry - seen_at
    );
    // The endpoint serves the new ones too.
    let (code, body) = http_get_auth(port, Some(read(&token_file).unwrap().trim()));
    assert_eq!(code, 200);
    let served: Value = serde_json::from_str(&body).unwrap();
    assert!(served["Token"].is_string());
    assert_ne!(served["AccessKeyId"], first["AccessKeyId"]);

    let logs = format!("{}{}", broker.log_text(), sidecar.log_text());
    for c in [&first, &second] {
        for k in ["SecretAccessKey", "SessionToken"] {
            assert!(!logs.contains(s(c, k)), "{k} leaked into a log");
        }
    }
    let irsa_token = read(&world.path("web.token")).unwrap();
    assert!(
        !logs.contains(irsa_token.trim()),
        "the pod's token leaked into a log"
    );
}

/// A GET on the container endpoint with an optional Authorization header.
fn http_get_auth(port: u16, auth: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(conn, "GET /creds HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn refused_tokens_never_reach_sts_and_assume_role_tags_the_pod() {
    let moto =
        Moto::start(std::env::temp_dir().join(format!("moto-refused-{}.log", std::process::id())))
            .unwrap();
    let world = world_with_aws(&format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[[aws.secrets]]
name = "aws/web"
kind = "sts-web-identity"
role_arn = "arn:aws:iam::{account}:role/web-app"
duration = "15m"
[[aws.secrets]]
name = "aws/assumed"
kind = "sts-assume-role"
role_arn = "arn:aws:iam::{account}:role/reports"
duration = "15m"
"#,
        endpoint = moto.endpoint(),
        account = moto::ACCOUNT,
    ));
    let broker = start_broker(&world);

    let irsa = world.issuer.mint(&pod("p-1", STS_AUD)).unwrap();
    // Wrong audience, bad signature, and a broker token (not IRSA) for a
    // web-identity secret: refused by the broker, nothing sent to STS.
    let wrong_aud = world.issuer.mint(&pod("p-1", "some-other-api")).unwrap();
    let err = fetch(&world, &wrong_aud, &["aws/web"]).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("audience"), "{err:?}");

    // One signature character changed (not the last, whose low bits are slack).
    let (head, sig) = irsa.rsplit_once('.').unwrap();
    let mut sig: Vec<char> = sig.chars().collect();
    sig[5] = if sig[5] == 'A' { 'B' } else { 'A' };
    let forged = format!("{head}.{}", sig.iter().collect::<String>());
    let other_sig = format!("{head}.{}", "A".repeat(sig.len()));
    for bad in [forged, other_sig] {
        let err = fetch(&world, &bad, &["aws/web"]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }

    let broker_token = world.issuer.mint(&pod("p-1", AUDIENCE)).unwrap();
    let err = fetch(&world, &broker_token, &["aws/web"]).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(STS_AUD), "{err:?}");
    assert_eq!(moto.sts_calls(), 0, "a refused token reached STS");

    // The control: the same pod's IRSA token gets credentials (one call).
    let got = fetch(&world, &irsa, &["aws/web"]).unwrap();
    let creds: Value = serde_json::from_slice(&got[0].value).unwrap();
    assert_eq!(moto.calls("AssumeRoleWithWebIdentity"), 1);
    let lease = got[0].lease.as_ref().unwrap();
    let expiry = unix_of(s(&creds, "Expiration"));
    assert!(
        (lease.expires_at_unix as f64) <= expiry,
        "the lease must end no later than the credentials"
    );

    // Broker-assumed role for a cluster without IRSA: the ordinary token;
    // the session is named and tagged after the pod.
    let got = fetch(&world, &broker_token, &["aws/assumed"]).unwrap();
    assert_eq!(moto.calls("AssumeRole"), 1);
    let c: Value = serde_json::from_slice(&got[0].value).unwrap();
    let arn = moto
        .caller_arn(
            s(&c, "AccessKeyId"),
            s(&c, "SecretAccessKey"),
            s(&c, "SessionToken"),
        )
        .unwrap();
    assert_eq!(
        arn,
        format!(
            "arn:aws:sts::{}:assumed-role/reports/demo.app.p-1",
            moto::ACCOUNT
        )
    );

    // A revoked identity: refused, and STS sees nothing more.
    let before = moto.sts_calls();
    let o = world
        .brokerctl(
            Some("revoker"),
            &[
                "revoke",
                "--namespace",
                "demo",
                "--service-account",
                "app",
                "--reason",
                "aws test",
            ],
        )
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    // In force on this replica when the call returns: the very next call is
    // refused, so nothing slips through to STS in between.
    for t in [&irsa, &broker_token] {
        for name in ["aws/web", "aws/assumed"] {
            let err = fetch(&world, t, &[name]).unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        }
    }
    assert_eq!(moto.sts_calls(), before, "a revoked identity reached STS");
    let logs = broker.log_text();
    assert!(!logs.contains(&irsa), "the pod's token leaked into the log");
    assert!(!logs.contains(s(&creds, "SecretAccessKey")));
}

#[test]
fn secrets_manager_rotation_reaches_disk_and_one_read_serves_every_pod() {
    let moto =
        Moto::start(std::env::temp_dir().join(format!("moto-sm-{}.log", std::process::id())))
            .unwrap();
    moto.create_secret("prod/app/db", r#"{"user":"app","password":"sm-pw-one"}"#)
        .unwrap();
    moto.create_secret("prod/app/shared", "shared-value-1")
        .unwrap();
    let world = world_with_aws(&format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
poll_interval = "500ms"
[[aws.secrets]]
name = "app/password"
kind = "secretsmanager"
secret_id = "prod/app/db"
json_key = "password"
[[aws.secrets]]
name = "app/shared"
kind = "secretsmanager"
secret_id = "prod/app/shared"
poll_interval = "1h"
"#,
        endpoint = moto.endpoint(),
    ));
    let broker = start_broker(&world);
    let (sidecar, fs) = start_sidecar(
        &world,
        "app",
        &pod("app-0", AUDIENCE),
        "",
        &[("app/password", "password")],
    );
    let password = fs.path.join("password");
    wait_for("first version on disk", LONG, || {
        (read(&password).as_deref() == Some("sm-pw-one")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));

    // PutSecretValue makes a new AWSCURRENT version: a new generation on disk.
    moto.put_secret("prod/app/db", r#"{"user":"app","password":"sm-pw-two"}"#)
        .unwrap();
    wait_for("second version on disk", LONG, || {
        (read(&password).as_deref() == Some("sm-pw-two")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", sidecar.log_text(), broker.log_text()));
    assert!(
        sidecar.log_text().contains("wrote new generation"),
        "{}",
        sidecar.log_text()
    );

    // 100 pods read one secret: Secrets Manager sees the poller's first read
    // only (its next is an hour away).
    let before = moto.calls("GetSecretValue");
    let before_db = moto.calls("GetSecretValue:prod/app/db");
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            world
                .issuer
                .mint(&pod(&format!("many-{i}"), AUDIENCE))
                .unwrap()
        })
        .collect();
    let shared_reads = |m: &Moto| m.calls("GetSecretValue");
    world.runtime.block_on(async {
        let c = client(&world).await;
        let mut tasks = Vec::new();
        for t in &tokens {
            let mut c = c.clone();
            let mut req = tonic::Request::new(pb::FetchRequest {
                role: String::new(),
                names: vec!["app/shared".into()],
                ttl_seconds: 0,
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            tasks.push(tokio::spawn(async move { c.fetch(req).await }));
        }
        for t in tasks {
            let s = t.await.unwrap().unwrap().into_inner().secrets.remove(0);
            assert_eq!(s.value, b"shared-value-1");
        }
    });
    assert_eq!(
        moto.calls("GetSecretValue:prod/app/shared"),
        1,
        "moto counts the reads of prod/app/shared"
    );
    // Every other read in that window is a poll of prod/app/db.
    let during = shared_reads(&moto) - before;
    assert_eq!(during, moto.calls("GetSecretValue:prod/app/db") - before_db);
    let metrics = secrets_broker_e2e::http_get(world.ops_port, "/metrics")
        .unwrap()
        .1;
    assert!(metrics.contains("backend=\"aws\""), "{metrics}");

    let logs = format!("{}{}", broker.log_text(), sidecar.log_text());
    for leak in ["sm-pw-one", "sm-pw-two", "shared-value-1"] {
        assert!(!logs.contains(leak), "{leak} leaked into a log");
    }
}

/// Secrets Manager down (connections dropped), slow (answers held past the
/// timeout) and failing (AWS's 500): each time the broker refuses the secret
/// with a reason a person can act on, within its timeout, while the embedded
/// store is served; the sidecar, asked to fetch by a rotation meanwhile,
/// keeps its last good generation whole; when AWS is back, both secrets'
/// new values are served and written again by themselves.
#[test]
fn secrets_manager_down_slow_or_failing_is_refused_clearly_and_recovers() {
    use moto::Fault;
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(1);
    let moto =
        Moto::start(std::env::temp_dir().join(format!("moto-faults-{}.log", std::process::id())))
            .unwrap();
    moto.create_secret("prod/app/db", "sm-fault-pw-0").unwrap();
    // A value is served for poll_interval + max_stale after its last good
    // read (1.5 s here); then a fetch reads Secrets Manager itself.
    let world = world_with_aws(&format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
timeout = "{timeout}s"
poll_interval = "500ms"
max_stale = "1s"
[[aws.secrets]]
name = "app/password"
kind = "secretsmanager"
secret_id = "prod/app/db"
"#,
        endpoint = moto.endpoint(),
        timeout = TIMEOUT.as_secs(),
    ));
    // Leases long enough that no renewal falls inside the test: the sidecar
    // fetches when a rotation tells it to.
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("ttl = \"6s\"", "ttl = \"10m\"")).unwrap();
    world.put("app/key", "emb-fault-val-0").unwrap();
    let broker = start_broker(&world);
    let (sidecar, fs) = start_sidecar(
        &world,
        "app",
        &pod("app-0", AUDIENCE),
        "",
        &[("app/password", "password"), ("app/key", "key")],
    );
    let (password, key) = (fs.path.join("password"), fs.path.join("key"));
    let logs = || format!("{}\n{}", broker.log_text(), sidecar.log_text());
    wait_for("both files written", LONG, || {
        (read(&password).as_deref() == Some("sm-fault-pw-0")
            && read(&key).as_deref() == Some("emb-fault-val-0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let token = world.issuer.mint(&pod("probe", AUDIENCE)).unwrap();
    let mut generation = 0;
    for (fault, reason) in [
        (Fault::Down, "unreachable"),
        (Fault::Slow(TIMEOUT * 30), "unreachable"),
        (Fault::Failing, "InternalFailure"),
    ] {
        moto.set_fault(fault);
        let (err, took) = wait_for(
            &format!("{fault:?}: the held value goes stale"),
            LONG,
            || {
                let start = Instant::now();
                let r = fetch(&world, &token, &["app/password"]);
                r.err().map(|e| (e, start.elapsed()))
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        eprintln!("{fault:?}: refused after {took:?}: {}", err.message());
        assert_eq!(err.code(), tonic::Code::Unavailable, "{fault:?}: {err:?}");
        assert!(
            err.message().contains("app/password")
                && err.message().contains("aws")
                && err.message().contains(reason),
            "{fault:?}: names the secret, the backend and {reason:?}: {err:?}"
        );
        // A liveness bound, not a speed claim: a slow AWS costs a caller a
        // few timeouts (two attempts, perhaps behind the poller's read), not
        // the 30 s AWS takes to answer.
        assert!(
            took < TIMEOUT * 10,
            "{fault:?}: a call waited {took:?} with a {TIMEOUT:?} timeout\n{}",
            logs()
        );
        let embedded = fetch(&world, &token, &["app/key"])
            .unwrap_or_else(|e| panic!("{fault:?}: the embedded store is served: {e:?}"));
        assert_eq!(
            embedded[0].value,
            format!("emb-fault-val-{generation}").as_bytes()
        );
        let (code, body) = secrets_broker_e2e::http_get(world.ops_port, "/readyz").unwrap();
        assert_eq!(
            code, 200,
            "one failing backend does not take the replica out: {body}"
        );

        // A rotation of the embedded secret sends the sidecar to fetch both:
        // the fetch fails, and the last good generation stays whole.
        generation += 1;
        sidecar
            .fetch_fails_after(LONG, || {
                world
                    .put("app/key", &format!("emb-fault-val-{generation}"))
                    .unwrap()
            })
            .unwrap_or_else(|e| panic!("{fault:?}: {e}\n{}", logs()));
        assert_eq!(
            read(&password).as_deref(),
            Some(format!("sm-fault-pw-{}", generation - 1).as_str()),
            "{fault:?}: the last good password stays"
        );
        assert_eq!(
            read(&key).as_deref(),
            Some(format!("emb-fault-val-{}", generation - 1).as_str()),
            "{fault:?}: the files change together or not at all"
        );

        // AWS is back, with a version put meanwhile: the sidecar's retries
        // (and the rotation the poller then announces) bring both new
        // values to disk by themselves.
        moto.set_fault(Fault::None);
        moto.put_secret("prod/app/db", &format!("sm-fault-pw-{generation}"))
            .unwrap();
        wait_for(&format!("{fault:?}: recovered on disk"), LONG, || {
            (read(&password) == Some(format!("sm-fault-pw-{generation}"))
                && read(&key) == Some(format!("emb-fault-val-{generation}")))
            .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        let served = fetch(&world, &token, &["app/password"])
            .unwrap_or_else(|e| panic!("{fault:?}: served again: {e:?}\n{}", logs()));
        assert_eq!(
            served[0].value,
            format!("sm-fault-pw-{generation}").as_bytes()
        );
    }
    let (code, body) = secrets_broker_e2e::http_get(world.ops_port, "/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("degraded"), "recovered: {body}");
    let logs = logs();
    for leak in ["sm-fault-pw-", "emb-fault-val-"] {
        assert!(!logs.contains(leak), "{leak} leaked into a log");
    }
}
