//! Faults survived with nothing lost: the issuer's JWKS endpoint down,
//! hanging, answering garbage or rotating keys mid-run; a full tmpfs.

use std::process::Command;
use std::time::Duration;

use secrets_broker::dev::issuer::{Fault, Workload};
use secrets_broker_e2e::{AUDIENCE, Proc, Tmpfs, World, bin, http_get, status_kib, wait_for};
use secrets_broker_proto::v1 as pb;

const LONG: Duration = Duration::from_secs(60);

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["demo"]
service_accounts = ["*"]
secrets = ["app/*"]
ttl = "30s"
"#;

fn pod(name: &str) -> Workload {
    let mut w = Workload::new("demo", "app", AUDIENCE);
    w.pod = Some(name.into());
    w
}

/// One fetch of `app/key` with `token`, on a fresh connection.
fn fetch(world: &World, token: &str) -> Result<Vec<u8>, tonic::Status> {
    world.runtime.block_on(async {
        let ca = std::fs::read(&world.tls.ca).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "https://127.0.0.1:{}",
            world.broker_port
        ))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
        let mut c = pb::broker_client::BrokerClient::new(channel);
        let mut req = tonic::Request::new(pb::FetchRequest {
            role: String::new(),
            names: vec!["app/key".into()],
            ttl_seconds: 0,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let r = tokio::time::timeout(Duration::from_secs(30), c.fetch(req))
            .await
            .expect("a call must never hang on the issuer");
        r.map(|r| r.into_inner().secrets[0].value.clone())
    })
}

#[test]
fn jwks_outages_keep_known_keys_working_and_unknown_keys_fail_clearly() {
    let world = World::new(ROLES).unwrap();
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "leeway = \"5s\"",
        "leeway = \"5s\"\nhttp_timeout = \"1s\"",
        1,
    );
    std::fs::write(&path, text).unwrap();
    world.put("app/key", "jwks-fault-secret").unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let pid = broker.child.id();

    // Tokens signed with the key the broker knows (distinct pods: distinct
    // tokens, so none is served from the verification cache).
    let known: Vec<String> = (0..8)
        .map(|i| world.issuer.mint(&pod(&format!("known-{i}"))).unwrap())
        .collect();
    assert_eq!(fetch(&world, &known[0]).unwrap(), b"jwks-fault-secret");
    let threads_before = status_kib(pid, "Threads:");

    // The issuer goes down and rotates its key meanwhile.
    world.issuer.set_fault(Fault::Unavailable);
    let new_kid = world.issuer.rotate_key().unwrap();
    let rotated = |i: usize| world.issuer.mint(&pod(&format!("rotated-{i}"))).unwrap();
    for (k, fault) in [Fault::Unavailable, Fault::Hang, Fault::Garbage]
        .into_iter()
        .enumerate()
    {
        world.issuer.set_fault(fault);
        // Past the refresh rate limit, so the broker does try the issuer.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(
            fetch(&world, &known[k + 1]).unwrap(),
            b"jwks-fault-secret",
            "{fault:?}: a known key keeps working"
        );
        // Many calls with the unknown key at once: each fails clearly and
        // promptly (one refresh at a time, bounded by http_timeout).
        let tokens: Vec<String> = (0..20).map(rotated).collect();
        let calls: Vec<_> = std::thread::scope(|s| {
            let world = &world;
            let handles: Vec<_> = tokens
                .iter()
                .map(|t| s.spawn(move || fetch(world, t)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in calls {
            let e = r.expect_err("a token signed with a key the broker cannot load");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{fault:?}: {e:?}");
            assert!(e.message().contains(&new_kid), "{fault:?}: {e:?}");
        }
        let (code, body) = http_get(world.ops_port, "/readyz").unwrap();
        assert_eq!(
            code, 200,
            "{fault:?}: cached keys keep the broker ready: {body}"
        );
    }
    let threads_after = status_kib(pid, "Threads:");
    assert!(
        threads_after <= threads_before + 4,
        "threads piled up: {threads_before} -> {threads_after}"
    );

    // The issuer recovers: the new key loads and its tokens are accepted.
    world.issuer.set_fault(Fault::None);
    wait_for("the rotated key accepted", LONG, || {
        fetch(&world, &rotated(99)).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    assert!(!broker.log_text().contains("jwks-fault-secret"));
}

#[test]
fn a_full_tmpfs_keeps_the_previous_generation_and_recovers() {
    let world = World::new(ROLES).unwrap();
    world.put("app/key", "small-v1").unwrap();
    let _broker = world.start_broker("broker.log").unwrap();
    let fs = Tmpfs::with_size("256k").unwrap();
    let token = world.token_file("sc.token", &pod("full-0")).unwrap();
    let cfg = world
        .sidecar_config("sc.toml", &token, &fs.path, "", &[("app/key", "key")])
        .unwrap();
    let sidecar = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "debug"),
        world.path("sc.log"),
    )
    .unwrap();
    let file = fs.path.join("key");
    let read = || std::fs::read_to_string(&file).ok();
    wait_for("first generation", LONG, || {
        (read().as_deref() == Some("small-v1")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));

    // A version larger than the tmpfs: the write fails with ENOSPC, the
    // error is reported, and the app still reads the whole previous value.
    world.put("app/key", &"x".repeat(300 * 1024)).unwrap();
    wait_for("the write failure reported", LONG, || {
        sidecar
            .log_text()
            .contains("No space left on device")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
    for _ in 0..20 {
        assert_eq!(read().as_deref(), Some("small-v1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // No half-written generation is left taking the space.
    let generations = std::fs::read_dir(&fs.path)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("..") && n != "..data" && e.path().is_dir()
        })
        .count();
    assert_eq!(
        generations, 1,
        "only the current generation is on the tmpfs"
    );

    // A version that fits: the sidecar recovers by itself.
    world.put("app/key", "small-v3").unwrap();
    wait_for("recovered", LONG, || {
        (read().as_deref() == Some("small-v3")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));
}

/// A TCP proxy standing in for the Kubernetes Service in front of the
/// broker replicas: each connection goes to the next replica that accepts it.
fn service_proxy(world: &World, backends: Vec<u16>) -> u16 {
    let listener = world
        .runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    world.runtime.spawn(async move {
        let mut next = 0usize;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let start = next;
            next += 1;
            let backends = backends.clone();
            tokio::spawn(async move {
                for k in 0..backends.len() {
                    let port = backends[(start + k) % backends.len()];
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_replica_killed_under_load_loses_no_file_and_no_lease() {
    use secrets_broker_e2e::free_port;
    use secrets_broker_e2e::pg::Database;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let db = Database::create().unwrap();
    let roles = ROLES.replace("ttl = \"30s\"", "ttl = \"6s\"");
    let world = World::with_database(&roles, &db.url).unwrap();
    world.put("app/key", "replica-v1").unwrap();
    let (port_b, admin_b) = (free_port(), free_port());
    let cfg_b = world.path("broker-b.toml");
    world
        .write_broker_config(&cfg_b, port_b, admin_b, &roles)
        .unwrap();
    let a = world.start_broker("broker-a.log").unwrap();
    let b = world.start_broker_with(&cfg_b, "broker-b.log").unwrap();
    let proxy = service_proxy(&world, vec![world.broker_port, port_b]);

    let sidecars: Vec<_> = (0..6)
        .map(|i| {
            world
                .start_sidecar(
                    &format!("sc{i}"),
                    &pod(&format!("ha-{i}")),
                    proxy,
                    &[("app/key", "key")],
                )
                .unwrap()
        })
        .collect();
    for (proc, fs, _) in &sidecars {
        let f = fs.path.join("key");
        wait_for("files", LONG, || {
            (std::fs::read_to_string(&f).ok().as_deref() == Some("replica-v1")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_text()));
    }

    // Readers play the applications: any read that is not a whole known
    // value (missing, empty, partial) is a failure.
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = sidecars
        .iter()
        .map(|(_, fs, _)| {
            let (f, stop, bad, reads) = (
                fs.path.join("key"),
                stop.clone(),
                bad.clone(),
                reads.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match std::fs::read_to_string(&f).as_deref() {
                        Ok("replica-v1" | "replica-v2") => {}
                        other => {
                            eprintln!("bad read: {other:?}");
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    // Load through the Service while the replica dies.
    let load = {
        let stop = stop.clone();
        let token = world.issuer.mint(&pod("load-0")).unwrap();
        let ca = std::fs::read(&world.tls.ca).unwrap();
        world.runtime.spawn(async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost");
            while !stop.load(Ordering::Relaxed) {
                let Ok(ep) =
                    tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{proxy}"))
                        .and_then(|e| e.tls_config(tls.clone()))
                else {
                    return;
                };
                if let Ok(ch) = ep.connect().await {
                    let mut c = pb::broker_client::BrokerClient::new(ch);
                    for _ in 0..50 {
                        let mut req = tonic::Request::new(pb::FetchRequest {
                            role: String::new(),
                            names: vec!["app/key".into()],
                            ttl_seconds: 0,
                        });
                        req.metadata_mut()
                            .insert("authorization", format!("Bearer {token}").parse().unwrap());
                        let _ = c.fetch(req).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
    };

    std::thread::sleep(Duration::from_secs(1));
    a.signal("KILL");
    // Past two lease periods: every sidecar has renewed through replica B.
    std::thread::sleep(Duration::from_secs(14));
    // A rotation still reaches every sidecar (their watches moved to B).
    world.put("app/key", "replica-v2").unwrap();
    for (proc, fs, _) in &sidecars {
        let f = fs.path.join("key");
        wait_for("rotation after the kill", LONG, || {
            (std::fs::read_to_string(&f).ok().as_deref() == Some("replica-v2")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", proc.log_text(), b.log_text()));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    load.abort();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "an application saw a missing or partial secret"
    );
    assert!(reads.load(Ordering::Relaxed) > 1000);

    // No lease lost: every pod holds a running lease, renewed through B.
    let out = world
        .brokerctl_at(
            admin_b,
            Some("viewer"),
            &["--output", "json", "leases", "list", "--namespace", "demo"],
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let leases = v["leases"].as_array().unwrap();
    for i in 0..6 {
        let pod_name = format!("ha-{i}");
        assert!(
            leases.iter().any(|l| l["pod_name"] == pod_name.as_str()),
            "{pod_name} has no running lease: {v}"
        );
    }
}
