//! Faults survived with nothing lost: the issuer's JWKS endpoint down,
//! hanging, answering garbage or rotating keys mid-run; a full tmpfs; a
//! replica killed under load; PostgreSQL restarted under load; the SQLite
//! file on a full disk; a slow Vault; ten times the sustainable call rate.

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
    // No half-written generation is left taking the space. The sidecar
    // retries, and a retry's generation exists for the moment between its
    // failed write and its removal: one left behind would be in every look.
    let generations = || {
        std::fs::read_dir(&fs.path)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("..") && n != "..data" && e.path().is_dir()
            })
            .count()
    };
    let fewest = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(25));
            generations()
        })
        .min();
    assert_eq!(
        fewest,
        Some(1),
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

/// A log without its DEBUG lines (the tests log at debug level), for
/// failure messages.
fn notable(p: &Proc) -> String {
    p.log_text()
        .lines()
        .filter(|l| !l.contains(" DEBUG "))
        .collect::<Vec<_>>()
        .join("\n")
}

type Client = pb::broker_client::BrokerClient<tonic::transport::Channel>;

/// A call of a load loop: the phase it began in, and the lease it got or
/// the status it failed with.
type Outcome = (u8, Result<String, (tonic::Code, String)>);

/// A client of the broker on `port` that connects on first use and again
/// after a broken connection. Call inside a Tokio runtime.
fn lazy_client(world: &World, port: u16) -> Client {
    let ca = std::fs::read(&world.tls.ca).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    Client::new(channel)
}

/// One fetch of `name` with `token`.
async fn fetch_with(
    c: &mut Client,
    token: &str,
    name: &str,
) -> Result<pb::FetchResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::FetchRequest {
        role: String::new(),
        names: vec![name.into()],
        ttl_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    c.fetch(req).await.map(|r| r.into_inner())
}

fn lease_of(r: &pb::FetchResponse) -> String {
    r.secrets[0].lease.as_ref().unwrap().lease_id.clone()
}

/// Application reads of the files `key` in `dirs` until `stop`: any read that
/// is not a whole value from `good` (missing, empty, partial) is counted bad.
fn start_readers(
    dirs: Vec<std::path::PathBuf>,
    good: &'static [&'static str],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let bad = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let handles = dirs
        .into_iter()
        .map(|dir| {
            let (f, stop, bad, reads) = (dir.join("key"), stop.clone(), bad.clone(), reads.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match std::fs::read_to_string(&f) {
                        Ok(v) if good.contains(&v.as_str()) => {}
                        other => {
                            eprintln!("bad read of {}: {other:?}", f.display());
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    (handles, bad, reads)
}

/// Every lease ID in the `leases` table of the database at `url`.
fn recorded_leases(world: &World, url: &str) -> std::collections::HashSet<String> {
    use sqlx::Connection;
    world.runtime.block_on(async {
        if url.starts_with("postgres") {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query_scalar::<_, String>("SELECT lease_id FROM leases")
                .fetch_all(&mut c)
                .await
                .unwrap()
                .into_iter()
                .collect()
        } else {
            let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query_scalar::<_, String>("SELECT lease_id FROM leases")
                .fetch_all(&mut c)
                .await
                .unwrap()
                .into_iter()
                .collect()
        }
    })
}

#[test]
fn postgres_restarted_under_load_fails_calls_clearly_and_loses_no_lease() {
    use secrets_broker_e2e::pg::{Cluster, Database};
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    // A throwaway cluster of our own (initdb + pg_ctl, as the `postgres`
    // user when we are root): it really goes down and comes back (crash
    // recovery included), and nobody else's server is touched.
    let cluster = Cluster::start().unwrap();
    let db = Database::create_on(&cluster.server_url()).unwrap();
    let world = World::with_database(ROLES, &db.url).unwrap();
    world.put("app/key", "pg-v1").unwrap();
    let mut broker = world.start_broker("broker.log").unwrap();

    let sidecars: Vec<_> = (0..4)
        .map(|i| {
            world
                .start_sidecar(
                    &format!("sc{i}"),
                    &pod(&format!("pg-{i}")),
                    world.broker_port,
                    &[("app/key", "key")],
                )
                .unwrap()
        })
        .collect();
    for (proc, fs, _) in &sidecars {
        let f = fs.path.join("key");
        wait_for("files", LONG, || {
            (std::fs::read_to_string(&f).ok().as_deref() == Some("pg-v1")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", notable(proc)));
    }
    let files_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (readers, bad, reads) = start_readers(
        sidecars.iter().map(|(_, fs, _)| fs.path.clone()).collect(),
        &["pg-v1", "pg-v2"],
        stop.clone(),
    );

    // A client fetching in a loop (four workloads, well under their rate),
    // noting each call's outcome and the phase it started in.
    const BEFORE: u8 = 0;
    const DOWN: u8 = 1;
    const BACK: u8 = 2;
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let tokens: Vec<String> = (0..4)
        .map(|i| world.issuer.mint(&pod(&format!("load-{i}"))).unwrap())
        .collect();
    let load = {
        let (stop, phase, outcomes) = (stop.clone(), phase.clone(), outcomes.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut c = rt.block_on(async { lazy_client(&world, world.broker_port) });
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let p = phase.load(Ordering::Relaxed);
                    let token = &tokens[i % tokens.len()];
                    i += 1;
                    // A call must never hang on the database: 30 s is a
                    // liveness bound, far beyond any pool or staleness bound.
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        fetch_with(&mut c, token, "app/key"),
                    )
                    .await;
                    let outcome = match r {
                        Err(_) => Err((tonic::Code::DeadlineExceeded, "hung for 30 s".into())),
                        Ok(Ok(resp)) => Ok(lease_of(&resp)),
                        Ok(Err(s)) => Err((s.code(), s.message().to_owned())),
                    };
                    outcomes.lock().unwrap().push((p, outcome));
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            })
        })
    };
    let count = |want: u8, ok: bool| {
        outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, r)| *p == want && r.is_ok() == ok)
            .count()
    };

    // Restart PostgreSQL when the sidecars' first renewals come due (2/3 of
    // the 30 s lease, ±10%), so some of them renew across the outage.
    std::thread::sleep(Duration::from_secs(16).saturating_sub(files_at.elapsed()));
    assert!(count(BEFORE, true) > 0, "fetches work before the outage");
    cluster.stop().unwrap();
    let down_at = Instant::now();
    phase.store(DOWN, Ordering::Relaxed);
    wait_for("a fetch refused during the outage", LONG, || {
        (count(DOWN, false) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    std::thread::sleep(Duration::from_secs(4).saturating_sub(down_at.elapsed()));
    cluster.resume().unwrap();
    phase.store(BACK, Ordering::Relaxed);

    // Served again by the same broker process, without a restart.
    wait_for("fetches served again", LONG, || {
        (count(BACK, true) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the broker kept running"
    );
    // Its rotation poller and the sidecars' watches came through too.
    world.put("app/key", "pg-v2").unwrap();
    for (proc, fs, _) in &sidecars {
        let f = fs.path.join("key");
        wait_for("rotation after the restart", LONG, || {
            (std::fs::read_to_string(&f).ok().as_deref() == Some("pg-v2")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", notable(proc), notable(&broker)));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    load.join().unwrap();

    // Calls failed while the database was away (those begun just before it
    // went count too) and said why; none hung.
    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<_> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for (_, msg) in &failures {
        let kind: String = msg.chars().filter(|c| !c.is_ascii_digit()).collect();
        *reasons.entry(kind).or_default() += 1;
    }
    eprintln!(
        "fetches: {} served before the outage; of those begun during it {} refused and {} \
         served (PostgreSQL was back before they gave up); {} served after; failures: {reasons:#?}",
        count_of(&outcomes, BEFORE, true),
        count_of(&outcomes, DOWN, false),
        count_of(&outcomes, DOWN, true),
        count_of(&outcomes, BACK, true),
    );
    assert!(count_of(&outcomes, DOWN, false) > 0);
    for (code, msg) in &failures {
        assert_eq!(*code, tonic::Code::Unavailable, "{msg}");
        assert!(msg.contains("database"), "names the store: {msg}");
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "an application saw a missing or partial secret"
    );
    assert!(reads.load(Ordering::Relaxed) > 1000);

    // No lease lost: every lease the broker handed out, before, during or
    // after the outage, is in the database.
    let handed_out: Vec<&String> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let recorded = recorded_leases(&world, &db.url);
    for id in &handed_out {
        assert!(
            recorded.contains(*id),
            "lease {id} was handed out but is not recorded"
        );
    }
    // And every pod still holds a running lease.
    let out = world
        .brokerctl(
            Some("viewer"),
            &["--output", "json", "leases", "list", "--namespace", "demo"],
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    for i in 0..sidecars.len() {
        let pod_name = format!("pg-{i}");
        assert!(
            v["leases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["pod_name"] == pod_name.as_str()),
            "{pod_name} has no running lease: {v}"
        );
    }
    drop(broker);
    drop(db);
}

fn count_of(outcomes: &[Outcome], phase: u8, ok: bool) -> usize {
    outcomes
        .iter()
        .filter(|(p, r)| *p == phase && r.is_ok() == ok)
        .count()
}

/// Writes zeros to `path` until the filesystem is full; returns the bytes written.
fn fill(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut size = chunk.len();
    loop {
        match f.write(&chunk[..size]) {
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => {
                // ENOSPC: take what is left in smaller pieces.
                if size == 1 {
                    return written;
                }
                size /= 2;
            }
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn the_sqlite_file_on_a_full_disk_refuses_writes_clearly_and_recovers() {
    use std::collections::HashSet;

    // The broker's database on a small tmpfs of its own (only the test puts
    // it there); the WAL and every lease and audit row land on it.
    let disk = Tmpfs::with_size("4m").unwrap();
    let db_path = disk.path.join("state.db");
    let url = format!("sqlite://{}", db_path.display());
    let world = World::with_database(ROLES, &url).unwrap();
    world.put("app/key", "disk-v1").unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let tokens: Vec<String> = (0..4)
        .map(|i| world.issuer.mint(&pod(&format!("disk-{i}"))).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt.block_on(async { lazy_client(&world, world.broker_port) });
    let mut handed_out = HashSet::new();
    for t in &tokens {
        let r = rt.block_on(fetch_with(&mut c, t, "app/key")).unwrap();
        handed_out.insert(lease_of(&r));
    }

    // The disk fills up (another writer, a log, a runaway WAL...).
    let filler = disk.path.join("filler");
    assert!(fill(&filler) > 0);

    // A fetch needs a lease row: it is refused, clearly, at once. (SQLite
    // may still fit a few rows in pages it already holds: keep fetching.)
    let mut i = 0;
    let refused = wait_for("a fetch refused for the full disk", LONG, || {
        i += 1;
        match rt.block_on(fetch_with(&mut c, &tokens[i % tokens.len()], "app/key")) {
            Ok(r) => {
                handed_out.insert(lease_of(&r));
                None
            }
            Err(e) => Some(e),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("state database"),
        "names the store: {refused:?}"
    );
    // The operator finds the cause in the broker's log.
    let logged = wait_for("the cause logged", LONG, || {
        broker
            .log_text()
            .lines()
            .find(|l| l.contains("action=\"fetch\"") && l.contains("database or disk is full"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    eprintln!("full disk: refused with {refused:?}; logged: {logged}");

    // What needs no write is still served: a login, the lease list.
    rt.block_on(async {
        let mut req = tonic::Request::new(pb::LoginRequest::default());
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", tokens[0]).parse().unwrap(),
        );
        c.login(req).await
    })
    .unwrap_or_else(|e| panic!("a login needs no write: {e:?}\n{}", notable(&broker)));
    let out = world
        .brokerctl(
            Some("viewer"),
            &["--output", "json", "leases", "list", "--namespace", "demo"],
        )
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        listed["leases"].as_array().unwrap().len() >= tokens.len(),
        "{listed}"
    );
    let (code, body) = http_get(world.ops_port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    // Still full: each fetch is refused as clearly, or served only with its
    // lease recorded (after a checkpoint SQLite writes its log from the
    // start again, into space the file already holds; checked below).
    for t in &tokens {
        match rt.block_on(fetch_with(&mut c, t, "app/key")) {
            Ok(r) => {
                handed_out.insert(lease_of(&r));
            }
            Err(again) => {
                assert_eq!(again.code(), tonic::Code::Unavailable, "{again:?}");
                assert!(again.message().contains("state database"), "{again:?}");
            }
        }
    }

    // Space is freed: fetches are served again by the same process.
    std::fs::remove_file(&filler).unwrap();
    let r = wait_for("fetches served again", LONG, || {
        rt.block_on(fetch_with(&mut c, &tokens[1], "app/key")).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert_eq!(r.secrets[0].value, b"disk-v1");
    handed_out.insert(lease_of(&r));

    // Nothing corrupted: SQLite's own check, the audit chain, every lease
    // handed out is recorded.
    let check: String = world.runtime.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    });
    assert_eq!(check, "ok");
    let recorded = recorded_leases(&world, &url);
    for id in &handed_out {
        assert!(
            recorded.contains(id),
            "lease {id} was handed out but is not recorded"
        );
    }
    // The audit records queued while the disk was full are written, chained.
    wait_for("audit log intact", LONG, || {
        let o = world.brokerctl(Some("viewer"), &["audit", "verify"]).ok()?;
        String::from_utf8_lossy(&o.stdout)
            .contains("audit log intact")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert!(!broker.log_text().contains("disk-v1"));
}

#[test]
fn a_slow_vault_times_out_clearly_while_other_secrets_are_served() {
    use secrets_broker_e2e::bao::{Bao, ROOT_TOKEN};
    use secrets_broker_e2e::proxy::SlowProxy;
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(2);
    let world = World::new(ROLES).unwrap();
    world.put("app/key", "embedded-value").unwrap();
    let bao = Bao::start(world.path("bao.log")).unwrap();
    bao.api(
        "POST",
        "secret/data/app/slow",
        Some(serde_json::json!({ "data": { "value": "vault-value" } })),
    )
    .unwrap();
    // The broker reaches Vault through a proxy that can hold answers back.
    let proxy = SlowProxy::start(&world.runtime, bao.port).unwrap();
    world.write_token("vault.token", ROOT_TOKEN).unwrap();
    let path = world.broker_config();
    let mut text = std::fs::read_to_string(&path).unwrap();
    // A value read more than poll_interval + max_stale ago is not served:
    // fetches go to Vault themselves.
    text.push_str(&format!(
        r#"
[vault]
address = "http://127.0.0.1:{port}"
timeout = "{timeout}s"
poll_interval = "1s"
max_stale = "1s"
[vault.auth]
method = "token"
token_file = "vault.token"
[[vault.secrets]]
name = "app/vaulted"
kind = "kv"
mount = "secret"
path = "app/slow"
key = "value"
"#,
        port = proxy.port,
        timeout = TIMEOUT.as_secs(),
    ));
    std::fs::write(&path, text).unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let tokens: Vec<String> = (0..8)
        .map(|i| world.issuer.mint(&pod(&format!("slow-{i}"))).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = rt.block_on(async { lazy_client(&world, world.broker_port) });
    let fetch = |i: usize, name: &'static str| {
        let mut c = c.clone();
        let token = tokens[i % tokens.len()].clone();
        async move {
            let start = Instant::now();
            // 60 s: only so that a hung call fails the test instead of hanging it.
            let r = tokio::time::timeout(LONG, fetch_with(&mut c, &token, name))
                .await
                .expect("a call must never hang on a slow backend");
            (r, start.elapsed())
        }
    };
    wait_for("the Vault secret served", LONG, || {
        rt.block_on(fetch(0, "app/vaulted")).0.ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));

    // Vault answers ten times slower than the broker waits.
    proxy.set_delay(TIMEOUT * 10);
    let first = wait_for("the held value goes stale", LONG, || {
        let (r, took) = rt.block_on(fetch(1, "app/vaulted"));
        r.err().map(|e| (e, took))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    // Several pods at once, and the embedded store meanwhile.
    let (slow, fast) = rt.block_on(async {
        let slow: Vec<_> = (0..6)
            .map(|i| tokio::spawn(fetch(i, "app/vaulted")))
            .collect();
        let fast: Vec<_> = (0..6).map(|i| tokio::spawn(fetch(i, "app/key"))).collect();
        let mut out = (Vec::new(), Vec::new());
        for t in slow {
            out.0.push(t.await.unwrap());
        }
        for t in fast {
            out.1.push(t.await.unwrap());
        }
        out
    });
    for (r, took) in std::iter::once((Err(first.0), first.1)).chain(slow) {
        let e = r.expect_err("Vault is too slow to answer in time");
        eprintln!("slow Vault: refused after {took:?}: {}", e.message());
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains("app/vaulted")
                && e.message().contains("vault")
                && e.message().contains("timed out"),
            "names the secret, the backend and the timeout: {e:?}"
        );
        // A liveness bound, not a speed claim: the configured timeout is
        // respected (one read at a time, shared by the callers waiting).
        assert!(
            took < TIMEOUT * 3,
            "a call waited {took:?} on a Vault with a {TIMEOUT:?} timeout\n{}",
            notable(&broker)
        );
    }
    for (r, _) in fast {
        let r = r.expect("the embedded store is served while Vault is slow");
        assert_eq!(r.secrets[0].value, b"embedded-value");
    }
    let (code, body) = http_get(world.ops_port, "/readyz").unwrap();
    assert_eq!(
        code, 200,
        "one slow backend does not take the replica out: {body}"
    );
    assert!(body.contains("app/vaulted"), "{body}");

    // Vault is fast again: served again, by itself.
    proxy.set_delay(Duration::ZERO);
    let r = wait_for("the Vault secret served again", LONG, || {
        rt.block_on(fetch(2, "app/vaulted")).0.ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert_eq!(r.secrets[0].value, b"vault-value");
    assert!(!broker.log_text().contains(ROOT_TOKEN));
}

#[test]
fn ten_times_the_sustainable_rate_is_refused_clearly_without_memory_growth() {
    use secrets_broker_e2e::percentile;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    // The default limits (max_in_flight 512, 20 calls per second per
    // workload, bursts of 40): nothing in the world's config changes them.
    let world = World::new(ROLES).unwrap();
    world.put("app/key", "flood-value").unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    let pid = broker.child.id();
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..128)
            .map(|i| world.issuer.mint(&pod(&format!("flood-{i}"))).unwrap())
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Several connections, as many sidecars would open (HTTP/2 caps the
    // streams of each).
    let clients: Arc<Vec<Client>> = Arc::new(rt.block_on(async {
        (0..8)
            .map(|_| lazy_client(&world, world.broker_port))
            .collect()
    }));

    // Warm-up: 16 callers back to back for 5 s. What they get served is the
    // sustainable rate; the RSS after it is the baseline.
    let warm_ok = Arc::new(AtomicUsize::new(0));
    let warm_secs = 5.0;
    rt.block_on(async {
        let start = Instant::now();
        let workers: Vec<_> = (0..16)
            .map(|w| {
                let (clients, tokens, ok) = (clients.clone(), tokens.clone(), warm_ok.clone());
                tokio::spawn(async move {
                    let mut c = clients[w % clients.len()].clone();
                    let mut i = w;
                    while start.elapsed().as_secs_f64() < warm_secs {
                        if fetch_with(&mut c, &tokens[i % tokens.len()], "app/key")
                            .await
                            .is_ok()
                        {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        i += 16;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
    });
    let sustainable = warm_ok.load(Ordering::Relaxed) as f64 / warm_secs;
    assert!(sustainable > 0.0, "{}", notable(&broker));
    let rss_warm = status_kib(pid, "VmRSS:");

    // The flood: calls sent at ten times that rate for 20 s whatever the
    // answers (open loop), over 128 workloads.
    let target = sustainable * 10.0;
    let flood_secs = 20.0;
    let (ok, refused, other, hung) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
        Arc::new(AtomicUsize::new(0)),
    );
    let (by_rate, by_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    // The load generator's own queue is bounded too (calls the broker has
    // not taken yet wait on the client's connections): beyond it, a due
    // call is skipped and counted.
    let outstanding = Arc::new(AtomicUsize::new(0));
    const MAX_OUTSTANDING: usize = 4096;
    let mut rss_peak = 0;
    let (mut sent, mut skipped) = (0usize, 0usize);
    rt.block_on(async {
        let start = Instant::now();
        let mut calls = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while start.elapsed().as_secs_f64() < flood_secs {
            tick.tick().await;
            let due = (start.elapsed().as_secs_f64() * target) as usize;
            while sent + skipped < due {
                if outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                    skipped += 1;
                    continue;
                }
                outstanding.fetch_add(1, Ordering::Relaxed);
                let outstanding = outstanding.clone();
                let (clients, tokens) = (clients.clone(), tokens.clone());
                let (ok, refused, other, hung) =
                    (ok.clone(), refused.clone(), other.clone(), hung.clone());
                let (by_rate, by_in_flight, latencies) =
                    (by_rate.clone(), by_in_flight.clone(), latencies.clone());
                let n = sent;
                calls.push(tokio::spawn(async move {
                    let mut c = clients[n % clients.len()].clone();
                    let began = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        fetch_with(&mut c, &tokens[n % tokens.len()], "app/key"),
                    )
                    .await;
                    match r {
                        Err(_) => {
                            hung.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(_)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            latencies
                                .lock()
                                .unwrap()
                                .push(began.elapsed().as_secs_f64());
                        }
                        Ok(Err(e)) if e.code() == tonic::Code::ResourceExhausted => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            if e.message().contains("calls per second") {
                                by_rate.fetch_add(1, Ordering::Relaxed);
                            } else if e.message().contains("calls in flight") {
                                by_in_flight.fetch_add(1, Ordering::Relaxed);
                            } else {
                                other.lock().unwrap().push(format!("{e:?}"));
                            }
                        }
                        Ok(Err(e)) => other.lock().unwrap().push(format!("{e:?}")),
                    }
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                }));
                sent += 1;
            }
            rss_peak = rss_peak.max(status_kib(pid, "VmRSS:"));
        }
        for c in calls {
            c.await.unwrap();
        }
    });
    let rss_end = status_kib(pid, "VmRSS:");
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    if lat.is_empty() {
        lat.push(0.0);
    }
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    eprintln!(
        "overload: sustainable {sustainable:.0}/s, target {target:.0}/s, sent {:.0}/s \
         ({skipped} skipped: {MAX_OUTSTANDING} calls already waiting); \
         {ok} served ({:.0}/s), {refused} refused ({} rate, {} in flight); \
         admitted latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms; \
         RSS {rss_warm} KiB after warm-up, peak {rss_peak} KiB, {rss_end} KiB at the end",
        sent as f64 / flood_secs,
        ok as f64 / flood_secs,
        by_rate.load(Ordering::Relaxed),
        by_in_flight.load(Ordering::Relaxed),
        percentile(&lat, 0.5) * 1e3,
        percentile(&lat, 0.99) * 1e3,
        lat.last().copied().unwrap_or_default() * 1e3,
    );
    let other = other.lock().unwrap();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for o in other.iter() {
        *kinds.entry(o.chars().take(160).collect()).or_default() += 1;
    }
    assert!(
        other.is_empty(),
        "{} calls failed otherwise than RESOURCE_EXHAUSTED naming a limit: {kinds:#?}",
        other.len(),
    );
    assert_eq!(hung.load(Ordering::Relaxed), 0, "calls hung for 30 s");
    assert!(ok > 0, "admitted calls are served");
    assert!(
        refused > 0,
        "the flood was refused in part: it was an overload"
    );
    assert!(
        rss_end < 2 * rss_warm + 32 * 1024,
        "broker RSS grew from {rss_warm} KiB to {rss_end} KiB under the flood"
    );
    // Served again once it is over.
    wait_for("served after the flood", LONG, || {
        let mut c = clients[0].clone();
        rt.block_on(fetch_with(&mut c, &tokens[0], "app/key")).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert!(!broker.log_text().contains("flood-value"));
}
