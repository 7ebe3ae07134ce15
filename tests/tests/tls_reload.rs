//! TLS files replaced while the real broker runs, the way kubelet updates a
//! Secret volume that cert-manager renewed (a new directory, then one rename
//! of the `..data` symlink): new connections get the new certificate on the
//! gRPC and admin ports, a connection already open goes on, a broken key is
//! reported and the old certificate kept, and a new admin client CA admits
//! its clients and no longer the old CA's.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use secrets_broker::dev::tls::DevTls;
use secrets_broker_e2e::{World, bin, http_get, out_text, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["team-a"]
service_accounts = ["app"]
secrets = ["app/*"]
ttl = "1m"
max_ttl = "1h"
"#;

/// Writes `files` into a new generation directory under `dir` and swaps the
/// `..data` symlink to it with one rename, as kubelet's AtomicWriter does;
/// `dir/<name>` are symlinks into `..data`.
fn kubelet_swap(dir: &Path, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    let generation = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::fs::create_dir(dir.join(&generation)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&generation).join(name), text).unwrap();
    }
    let _ = std::fs::remove_file(dir.join("..data_tmp"));
    symlink(&generation, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// The DER of a PEM certificate.
fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// A TLS client offering h2 that trusts the CAs `trust` (PEM).
fn client_config(trust: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in trust {
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A new TLS connection to `port`, verified against `trust`.
async fn connect(port: u16, trust: &[&str]) -> Tls {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(client_config(trust))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// The leaf certificate a new connection to `port` is served (DER), after
/// checking that the connection speaks h2.
fn served(world: &World, port: u16, trust: &[&str]) -> Vec<u8> {
    world.runtime.block_on(async {
        let tls = connect(port, trust).await;
        let (_, session) = tls.get_ref();
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
        session.peer_certificates().unwrap()[0].as_ref().to_vec()
    })
}

/// A gRPC channel over exactly one TLS connection: when that connection
/// closes, calls fail instead of reconnecting.
fn pinned_channel(world: &World, trust: &[&str]) -> (tonic::transport::Channel, Vec<u8>) {
    world.runtime.block_on(async {
        let tls = connect(world.broker_port, trust).await;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec();
        let slot = Arc::new(Mutex::new(Some(hyper_util::rt::TokioIo::new(tls))));
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let io = slot.lock().unwrap().take();
            async move { io.ok_or_else(|| std::io::Error::other("the pinned connection is gone")) }
        });
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .unwrap();
        (channel, leaf)
    })
}

fn health_check(world: &World, channel: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    world.runtime.block_on(async {
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
    })
}

/// `secrets_broker_tls_reloads_total` for a listener and result (0 when
/// absent).
fn reloads(world: &World, listener: &str, result: &str) -> u64 {
    let (_, body) = http_get(world.ops_port, "/metrics").unwrap();
    let series =
        format!("secrets_broker_tls_reloads_total{{listener=\"{listener}\",result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

fn wait_reloads(
    world: &World,
    broker: &secrets_broker_e2e::Proc,
    listener: &str,
    result: &str,
    n: u64,
) {
    wait_for(
        &format!("tls_reloads_total{{listener={listener},result={result}}} = {n}"),
        Duration::from_secs(60),
        || (reloads(world, listener, result) >= n).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    assert_eq!(reloads(world, listener, result), n, "{}", broker.log_text());
}

/// Points the broker's config at `certs/` (gRPC and, by default, admin) and
/// `admin-ca/ca.crt`, read again every second.
fn rewrite_config(world: &World) {
    let cfg = world.broker_config();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "tls_cert_file = \"tls/tls.crt\"",
            "tls_cert_file = \"certs/tls.crt\"",
        )
        .replace(
            "tls_key_file = \"tls/tls.key\"",
            "tls_key_file = \"certs/tls.key\"",
        )
        .replace(
            "watch_heartbeat = \"5s\"",
            "watch_heartbeat = \"5s\"\ntls_reload_interval = \"1s\"",
        )
        .replace(
            "client_ca_file = \"tls/ca.crt\"",
            "client_ca_file = \"admin-ca/ca.crt\"",
        );
    std::fs::write(&cfg, text).unwrap();
    let tls = world.path("tls");
    let read = |name: &str| std::fs::read_to_string(tls.join(name)).unwrap();
    kubelet_swap(
        &world.path("certs"),
        &[("tls.crt", &read("tls.crt")), ("tls.key", &read("tls.key"))],
    );
    kubelet_swap(&world.path("admin-ca"), &[("ca.crt", &read("ca.crt"))]);
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let world = World::new(ROLES).unwrap();
    rewrite_config(&world);
    let broker = world.start_broker("broker.log").unwrap();
    let ca_a = std::fs::read_to_string(&world.tls.ca).unwrap();
    let cert_a = std::fs::read_to_string(&world.tls.cert).unwrap();
    let b = DevTls::generate().unwrap();
    let c = DevTls::generate().unwrap();
    let trust = [ca_a.as_str(), b.ca_pem.as_str(), c.ca_pem.as_str()];
    let log = broker.log_text();
    assert_eq!(log.matches("TLS certificate loaded").count(), 2, "{log}");

    assert_eq!(served(&world, world.broker_port, &trust), der(&cert_a));
    assert_eq!(served(&world, world.admin_port, &trust), der(&cert_a));
    let (pinned, leaf) = pinned_channel(&world, &trust);
    assert_eq!(leaf, der(&cert_a));
    health_check(&world, &pinned).unwrap();

    // cert-manager renews: B, swapped in as kubelet does.
    kubelet_swap(
        &world.path("certs"),
        &[("tls.crt", &b.cert_pem), ("tls.key", &b.key_pem)],
    );
    wait_reloads(&world, &broker, "grpc", "ok", 1);
    wait_reloads(&world, &broker, "admin", "ok", 1);
    assert_eq!(served(&world, world.broker_port, &trust), der(&b.cert_pem));
    assert_eq!(served(&world, world.admin_port, &trust), der(&b.cert_pem));
    // The connection opened with A goes on.
    health_check(&world, &pinned).unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    let log = broker.log_text();
    let reloaded: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS certificate reloaded"))
        .collect();
    assert_eq!(reloaded.len(), 2, "{log}");
    for listener in ["grpc", "admin"] {
        assert!(
            reloaded.iter().any(|l| l.contains("INFO")
                && l.contains(&format!("listener=\"{listener}\""))
                && l.contains("certs/tls.crt")
                && l.contains("not_after=")
                && l.contains("serial=")),
            "{listener}: {reloaded:#?}"
        );
    }

    // A key that does not parse: reported once per listener, naming the
    // file; B is still served.
    let garbage =
        "-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZS1rZXktYnl0ZXMtOTE3\n-----END PRIVATE KEY-----\n";
    kubelet_swap(
        &world.path("certs"),
        &[("tls.crt", &c.cert_pem), ("tls.key", garbage)],
    );
    wait_reloads(&world, &broker, "grpc", "error", 1);
    wait_reloads(&world, &broker, "admin", "error", 1);
    assert_eq!(served(&world, world.broker_port, &trust), der(&b.cert_pem));
    assert_eq!(served(&world, world.admin_port, &trust), der(&b.cert_pem));
    health_check(&world, &pinned).unwrap();
    let log = broker.log_text();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot reload TLS files"))
        .collect();
    assert_eq!(warned.len(), 2, "{log}");
    assert!(
        warned
            .iter()
            .all(|l| l.contains("certs/tls.key") && l.contains("tls_key_file")),
        "{warned:#?}"
    );
    // Never a key's bytes in the log: not the broken one's, not B's.
    let b_key_line = b.key_pem.lines().nth(1).unwrap();
    for secret in ["Z2FyYmFnZS1rZXktYnl0ZXMtOTE3", b_key_line] {
        assert!(!log.contains(secret), "key material in the log");
    }
    assert_eq!(reloads(&world, "grpc", "ok"), 1);

    // Fixed: C is served.
    kubelet_swap(
        &world.path("certs"),
        &[("tls.crt", &c.cert_pem), ("tls.key", &c.key_pem)],
    );
    wait_reloads(&world, &broker, "grpc", "ok", 2);
    assert_eq!(served(&world, world.broker_port, &trust), der(&c.cert_pem));
    assert_eq!(reloads(&world, "grpc", "error"), 1);
    health_check(&world, &pinned).unwrap();
}

fn brokerctl(world: &World, cert: Option<(&Path, &Path)>) -> Output {
    let mut cmd = Command::new(bin("brokerctl"));
    cmd.arg("--server")
        .arg(format!("https://localhost:{}", world.admin_port))
        .arg("--ca")
        .arg(&world.tls.ca);
    if let Some((cert, key)) = cert {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.args(["revocations", "list"]).output().unwrap()
}

#[test]
fn a_new_admin_client_ca_admits_its_clients_and_not_the_old_ones() {
    let world = World::new(ROLES).unwrap();
    rewrite_config(&world);
    let broker = world.start_broker("broker.log").unwrap();
    let tls = world.path("tls");
    let old = (tls.join("viewer.crt"), tls.join("viewer.key"));
    let fresh = DevTls::generate_with_clients(&["viewer"]).unwrap();
    let new_dir = world.path("new-ca");
    fresh.write(&new_dir).unwrap();
    let new = (new_dir.join("viewer.crt"), new_dir.join("viewer.key"));
    let call_as =
        |c: &(std::path::PathBuf, std::path::PathBuf)| brokerctl(&world, Some((&c.0, &c.1)));

    let o = call_as(&old);
    assert!(o.status.success(), "{}", out_text(&o));
    let o = call_as(&new);
    assert!(!o.status.success(), "{}", out_text(&o));

    kubelet_swap(&world.path("admin-ca"), &[("ca.crt", &fresh.ca_pem)]);
    wait_reloads(&world, &broker, "admin", "ok", 1);
    let o = call_as(&new);
    assert!(
        o.status.success(),
        "{}\n{}",
        out_text(&o),
        broker.log_text()
    );
    let o = call_as(&old);
    assert!(!o.status.success(), "{}", out_text(&o));
    // Without a certificate: still the API's 401, not a TLS alert.
    let o = brokerctl(&world, None);
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        out_text(&o)
    );
    // Only the admin listener watches the client CA.
    assert_eq!(reloads(&world, "grpc", "ok"), 0);
    let log = broker.log_text();
    assert!(
        log.lines().any(|l| l.contains("TLS certificate reloaded")
            && l.contains("listener=\"admin\"")
            && l.contains("admin-ca/ca.crt")),
        "{log}"
    );
}
