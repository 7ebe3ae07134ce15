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
    // The broker's bound on each request to the issuer.
    const HTTP_TIMEOUT_S: u64 = 1;
    let world = World::new(ROLES).unwrap();
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "leeway = \"5s\"",
        &format!("leeway = \"5s\"\nhttp_timeout = \"{HTTP_TIMEOUT_S}s\""),
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

    // The issuer rotates while it is up: a new key (new kid) signs from now
    // on, published next to the old one. Its tokens are refused as signed by
    // an unknown key until the broker refetches the keys (at most once per
    // `jwks_refresh_min_interval`, 2 s here), then accepted; the old key's
    // tokens keep working after the refetch.
    let old_kid = jsonwebtoken::decode_header(&known[0]).unwrap().kid.unwrap();
    let up_kid = world.issuer.rotate_key().unwrap();
    let published = world.issuer.jwks().to_string();
    assert!(
        published.contains(&format!("\"{old_kid}\""))
            && published.contains(&format!("\"{up_kid}\"")),
        "both keys are published: {published}"
    );
    let mut n = 0;
    wait_for(
        "the key rotated in while the issuer is up accepted",
        LONG,
        || {
            n += 1;
            let token = world.issuer.mint(&pod(&format!("up-{n}"))).unwrap();
            match fetch(&world, &token) {
                Ok(v) => Some(v),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
                    assert!(e.message().contains(&up_kid), "names the key: {e:?}");
                    None
                }
            }
        },
    )
    .map(|v| assert_eq!(v, b"jwks-fault-secret"))
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_text()));
    assert_eq!(
        fetch(&world, &known[4]).unwrap(),
        b"jwks-fault-secret",
        "a token of the old key, still published, keeps working after the rotation"
    );
    // Tokens of the key learned mid-run, for the outages below.
    let learned: Vec<String> = (0..3)
        .map(|i| world.issuer.mint(&pod(&format!("learned-{i}"))).unwrap())
        .collect();
    let threads_before = status_kib(pid, "Threads:");

    // The issuer goes down and rotates its key again meanwhile.
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
        assert_eq!(
            fetch(&world, &learned[k]).unwrap(),
            b"jwks-fault-secret",
            "{fault:?}: the key learned mid-run keeps working"
        );
        // Many calls with the unknown key at once: each fails clearly and
        // promptly (one refresh at a time, bounded by http_timeout).
        let tokens: Vec<String> = (0..20).map(rotated).collect();
        let calls: Vec<_> = std::thread::scope(|s| {
            let world = &world;
            let handles: Vec<_> = tokens
                .iter()
                .map(|t| {
                    s.spawn(move || {
                        let started = std::time::Instant::now();
                        (fetch(world, t), started.elapsed())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Promptly: a call waits for at most the one refresh in flight, which
        // gives up after `http_timeout` (1 s) on the discovery document, and
        // a second refresh if it arrived past the rate limit: about 1-2 s
        // while the issuer hangs, far less otherwise. 10x the timeout leaves
        // room for 20 TLS handshakes at once on a slow 2-vCPU VM, and still
        // fails a call that waits for the hanging issuer itself.
        let bound = Duration::from_secs(10 * HTTP_TIMEOUT_S);
        let slowest = calls.iter().map(|(_, t)| *t).max().unwrap();
        eprintln!("{fault:?}: the slowest of 20 calls with an unknown key took {slowest:?}");
        for ((r, took), token) in calls.into_iter().zip(&tokens) {
            let e = r.expect_err("a token signed with a key the broker cannot load");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{fault:?}: {e:?}");
            assert!(e.message().contains(&new_kid), "{fault:?}: {e:?}");
            let parts: Vec<&str> = token.split('.').collect();
            assert!(
                !e.message().contains(parts[1]) && !e.message().contains(parts[2]),
                "{fault:?}: the error echoes no token: {e:?}"
            );
            assert!(
                took <= bound,
                "{fault:?}: a call with an unknown key took {took:?} (bound {bound:?}): it waited on the issuer"
            );
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

/// The issuer's clock ahead of or behind the broker's, with the real broker
/// process: tokens are minted with all their times shifted, as an issuer
/// whose clock is off mints them. Within `identity.leeway` they are
/// accepted; beyond it refused with UNAUTHENTICATED naming the problem, and
/// neither the answer nor the broker's log holds the token.
#[test]
fn clock_skew_within_the_leeway_is_accepted_and_beyond_it_refused_by_name() {
    // Wide enough that "within" (a third of it) and "beyond" (three times
    // it) stay on their side however slowly this VM runs between minting a
    // token and the broker checking it.
    const LEEWAY_S: i64 = 60;
    let world = World::new(ROLES).unwrap();
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("leeway = \"5s\""),
        "the world's config changed"
    );
    std::fs::write(
        &path,
        text.replacen("leeway = \"5s\"", &format!("leeway = \"{LEEWAY_S}s\""), 1),
    )
    .unwrap();
    world.put("app/key", "skew-secret").unwrap();
    let broker = world.start_broker("broker.log").unwrap();

    // A token for pod `name` from an issuer whose clock is `shift` seconds
    // ahead of ours (behind when negative); `claims` shifts only those.
    let skewed = |name: &str, shift: i64, claims: &[&str]| {
        let mut c = world.issuer.claims(&pod(name));
        for k in claims {
            c[*k] = (c[*k].as_i64().unwrap() + shift).into();
        }
        world.issuer.sign(&c).unwrap()
    };
    const ALL: &[&str] = &["iat", "nbf", "exp"];
    // The workload's tokens live 600 s (Workload::new).
    let ttl = 600;
    let within = LEEWAY_S / 3;
    let beyond = 3 * LEEWAY_S;
    let mut tokens = Vec::new();

    // Accepted: issued `within` ahead; expired `within` ago.
    for (name, token) in [
        ("ahead-within", skewed("ahead-within", within, ALL)),
        (
            "expired-within",
            skewed("expired-within", -(ttl + within), ALL),
        ),
    ] {
        assert_eq!(
            fetch(&world, &token).unwrap_or_else(|e| panic!("{name}: {e:?}")),
            b"skew-secret",
            "{name}"
        );
        tokens.push(token);
    }

    // Refused, each naming its problem.
    for (name, token, problem) in [
        (
            "ahead-beyond",
            skewed("ahead-beyond", beyond, ALL),
            "not valid before",
        ),
        (
            "issued-ahead-beyond",
            skewed("issued-ahead-beyond", beyond, &["iat"]),
            "issued in the future",
        ),
        (
            "expired-beyond",
            skewed("expired-beyond", -(ttl + beyond), ALL),
            "expired",
        ),
    ] {
        let e = fetch(&world, &token).expect_err(name);
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{name}: {e:?}");
        assert!(
            e.message().contains(problem),
            "{name}: the answer names the problem ({problem:?}): {e:?}"
        );
        let parts: Vec<&str> = token.split('.').collect();
        assert!(
            !e.message().contains(parts[1]) && !e.message().contains(parts[2]),
            "{name}: the answer echoes the token: {e:?}"
        );
        tokens.push(token);
    }

    let log = broker.log_text();
    assert!(
        log.contains("not valid before"),
        "the refusals are logged:\n{log}"
    );
    for token in &tokens {
        let parts: Vec<&str> = token.split('.').collect();
        assert!(
            !log.contains(parts[1]) && !log.contains(parts[2]),
            "the broker's log holds a token"
        );
    }
    assert!(!log.contains("skew-secret"));
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
    // Each retry writes the set it already fetched: no new fetch, no new
    // leases, and the log says it is the write that failed.
    let leases = || sidecar.log_text().matches("lease received").count();
    let retries = || {
        sidecar
            .log_text()
            .matches("cannot write the new generation")
            .count()
    };
    let before = (leases(), retries());
    wait_for("three more write retries", LONG, || {
        (retries() >= before.1 + 3).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            sidecar.log_text()
        )
    });
    assert_eq!(leases(), before.0, "a write retry fetched again");
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

/// The lease IDs a sidecar logged as received (its `lease received` debug
/// lines): every lease it got from any replica, initial fetches and
/// rotations alike.
fn leases_received(p: &Proc) -> Vec<String> {
    p.log_text()
        .lines()
        .filter(|l| l.contains("lease received"))
        .filter_map(|l| {
            let rest = &l[l.find("lease_id=")? + "lease_id=".len()..];
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .collect()
}

/// A status's message and the chain of errors under it: a client-side
/// "transport error" says why only there (connection reset, broken pipe).
fn with_causes(s: &tonic::Status) -> String {
    let mut out = s.message().to_owned();
    let mut cur = std::error::Error::source(s);
    while let Some(e) = cur {
        out.push_str(&format!(": {e}"));
        cur = e.source();
    }
    out
}

/// Fetches `app/key` in a loop over `clients` in turn, one call every
/// 100 ms (10 a second: half the default per-workload rate, so one replica
/// alone serves them all without refusing any), until `stop`, noting each call's outcome and the phase it began
/// in. Runs on a thread of its own; a call must never hang (30 s liveness
/// bound, far beyond any reconnection).
fn fetch_loop(
    mut clients: Vec<Client>,
    rt: tokio::runtime::Runtime,
    token: String,
    phase: std::sync::Arc<std::sync::atomic::AtomicU8>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    outcomes: std::sync::Arc<std::sync::Mutex<Vec<Outcome>>>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        rt.block_on(async {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let p = phase.load(Ordering::Relaxed);
                let n = clients.len();
                let c = &mut clients[i % n];
                i += 1;
                let r =
                    tokio::time::timeout(Duration::from_secs(30), fetch_with(c, &token, "app/key"))
                        .await;
                let outcome = match r {
                    Err(_) => Err((tonic::Code::DeadlineExceeded, "hung for 30 s".into())),
                    Ok(Ok(resp)) => Ok(lease_of(&resp)),
                    Ok(Err(s)) => Err((s.code(), with_causes(&s))),
                };
                outcomes.lock().unwrap().push((p, outcome));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    })
}

#[test]
fn a_replica_killed_under_load_loses_no_file_and_no_lease() {
    use secrets_broker_e2e::free_port;
    use secrets_broker_e2e::pg::Database;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};

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
    let (readers, bad, reads) = start_readers(
        sidecars.iter().map(|(_, fs, _)| fs.path.clone()).collect(),
        &["replica-v1", "replica-v2"],
        stop.clone(),
    );

    // Load through the Service while the replica dies: four connections,
    // which the proxy spreads over both replicas, each reconnecting (through
    // the proxy) after a broken connection.
    const BEFORE: u8 = 0;
    const AROUND_KILL: u8 = 1;
    const AFTER: u8 = 2;
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let load = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let clients = rt.block_on(async { (0..4).map(|_| lazy_client(&world, proxy)).collect() });
        let token = world.issuer.mint(&pod("load-0")).unwrap();
        fetch_loop(
            clients,
            rt,
            token,
            phase.clone(),
            stop.clone(),
            outcomes.clone(),
        )
    };
    let count = |want: u8, ok: bool| count_of(&outcomes.lock().unwrap(), want, ok);

    wait_for("fetches through the Service before the kill", LONG, || {
        (count(BEFORE, true) >= 20).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            outcomes.lock().unwrap().last(),
            notable(&a)
        )
    });
    // The window "around the kill" opens a second before it, so a call in
    // flight when the replica dies counts in it, and closes 10 s after it:
    // reconnecting to the other replica takes a few round trips, so a
    // failure later than that would be a client stuck on the dead replica.
    phase.store(AROUND_KILL, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        a.log_text().contains("(pod load-0)"),
        "the load reaches the replica about to be killed"
    );
    a.signal("KILL");
    let killed_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    phase.store(AFTER, Ordering::Relaxed);
    wait_for("fetches through the Service after the kill", LONG, || {
        (count(AFTER, true) >= 20).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            outcomes.lock().unwrap().last(),
            notable(&b)
        )
    });
    // Past two lease periods (6 s) since the kill: every sidecar has renewed
    // through replica B.
    std::thread::sleep(Duration::from_secs(14).saturating_sub(killed_at.elapsed()));
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
    load.join().unwrap();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "an application saw a missing or partial secret"
    );
    assert!(reads.load(Ordering::Relaxed) > 1000);

    // Calls through the Service failed only around the kill, each because
    // its connection to the dead replica broke: UNAVAILABLE, or (a call in
    // flight when the replica died) the client library's UNKNOWN "transport
    // error" with its cause; never an answer of the broker's. Both mean
    // "retry", as the sidecars do. And they were served again through B.
    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<_> = outcomes
        .iter()
        .filter_map(|(p, r)| r.as_ref().err().map(|e| (p, e)))
        .collect();
    eprintln!(
        "fetches through the Service: {} served before the kill; around it {} served and {} \
         failed; {} served after; failures: {failures:#?}",
        count_of(&outcomes, BEFORE, true),
        count_of(&outcomes, AROUND_KILL, true),
        count_of(&outcomes, AROUND_KILL, false),
        count_of(&outcomes, AFTER, true),
    );
    for (p, (code, msg)) in &failures {
        assert_eq!(
            **p, AROUND_KILL,
            "a call failed away from the kill (phase {p}): {code:?} {msg}"
        );
        assert!(
            *code == tonic::Code::Unavailable
                || (*code == tonic::Code::Unknown && msg.starts_with("transport error")),
            "a failure other than a broken connection: {code:?} {msg}"
        );
    }
    assert_eq!(count_of(&outcomes, AFTER, false), 0);
    assert!(count_of(&outcomes, AFTER, true) >= 20);

    // No lease lost: every lease handed out by either replica, to the load
    // loop and to the sidecars (their first fetches, any refetch after the
    // kill, the rotation), is in the shared database.
    let recorded = recorded_leases(&world, &db.url);
    let mut handed_out: Vec<(String, String)> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .map(|id| ("load loop".to_owned(), id.clone()))
        .collect();
    for (i, (proc, _, _)) in sidecars.iter().enumerate() {
        let got = leases_received(proc);
        // At least the first fetch and the rotation's: proof the log is read.
        assert!(
            got.len() >= 2,
            "sidecar sc{i} logged {} leases received (want its first fetch and the rotation's)",
            got.len()
        );
        handed_out.extend(got.into_iter().map(|id| (format!("sidecar sc{i}"), id)));
    }
    for (who, id) in &handed_out {
        assert!(
            recorded.contains(id),
            "lease {id} handed to the {who} is not in the leases table ({} recorded)",
            recorded.len()
        );
    }
    // And every pod holds a running lease, renewed through B.
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

/// The workload of the flood's `n`-th call: one runaway workload sends an
/// eighth of the calls, the rest are spread over the others. Whatever share
/// of the flood this VM admits past the bound in flight, the runaway one is
/// over its own rate (an eighth of even 200 admitted calls a second is more
/// than its 20), so the per-workload rate fires on every VM; spread evenly,
/// 128 workloads stayed under it whenever the bound in flight refused most.
fn flood_workload(n: usize, workloads: usize) -> usize {
    if n.is_multiple_of(8) {
        0
    } else {
        1 + n % (workloads - 1)
    }
}

#[test]
fn ten_times_the_sustainable_rate_is_refused_clearly_without_memory_growth() {
    use secrets_broker_e2e::percentile;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    // Rate limits such that both fire under the flood, each refusal naming
    // its own. The per-workload rate is the default, 20 calls per second
    // (bursts of 40): the 128 workloads below may pass 2,560 calls per
    // second together, more than the global rate admits. The global rate
    // stands for what an operator sets to the replica's capacity, so the
    // warm-up below measures it as the sustainable rate. The bound on calls
    // in flight (default 512) is checked first; whether the flood reaches
    // it depends on how fast this VM answers (from none to 19,000 refusals
    // a run here), so its refusals are accepted but not required:
    // `overload::*` drives that bound on its own.
    const RATE_GLOBAL: u32 = 1000;
    // Bounds on what admitted calls and the broker's memory may show; why
    // each is generous is said where it is checked.
    const PROBE_P99_BOUND_S: f64 = 8.0;
    const ADMITTED_P99_BOUND_S: f64 = 20.0;
    const RSS_MARGIN_MIB: u64 = 256;
    const RSS_LEVEL_MIB: u64 = 48;
    let world = World::new(ROLES).unwrap();
    let path = world.broker_config();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "watch_heartbeat = \"5s\"",
        &format!("watch_heartbeat = \"5s\"\nrate_global = {RATE_GLOBAL}"),
        1,
    );
    assert!(
        text.contains("rate_global"),
        "the world's config changed: {text}"
    );
    std::fs::write(&path, text).unwrap();
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
    // sustainable rate (the global rate and its burst); the RSS after it is
    // the baseline.
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
    let (by_rate, by_global, by_in_flight) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    // The load generator's own queue is bounded too (calls the broker has
    // not taken yet wait on the client's connections): beyond it, a due
    // call is skipped and counted.
    let outstanding = Arc::new(AtomicUsize::new(0));
    const MAX_OUTSTANDING: usize = 4096;
    // A well-behaved workload meanwhile, on its own connection (nothing of
    // the flood queued before its calls on the client's side), one call at
    // a time and at most 10 a second, as a sidecar would: the latency of its
    // admitted calls is what the broker gives a caller while refusing the
    // flood.
    let probe_token = world.issuer.mint(&pod("probe")).unwrap();
    let mut probe_client = rt.block_on(async { lazy_client(&world, world.broker_port) });
    let probe_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = rt.spawn({
        let stop = probe_stop.clone();
        async move {
            let (mut admitted, mut refused) = (Vec::new(), 0usize);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let began = Instant::now();
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    fetch_with(&mut probe_client, &probe_token, "app/key"),
                )
                .await
                {
                    Ok(Ok(_)) => admitted.push(began.elapsed().as_secs_f64()),
                    Ok(Err(e)) if e.code() == tonic::Code::ResourceExhausted => refused += 1,
                    other => panic!("the probe's call: {other:?}"),
                }
            }
            (admitted, refused)
        }
    });
    let mut rss_peak = 0;
    // The peak of each half of the flood: a leak keeps growing through the
    // second half, buffers filled by the flood do not.
    let mut rss_half_peaks = [0u64; 2];
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
                let (by_rate, by_global, by_in_flight, latencies) = (
                    by_rate.clone(),
                    by_global.clone(),
                    by_in_flight.clone(),
                    latencies.clone(),
                );
                let n = sent;
                calls.push(tokio::spawn(async move {
                    let mut c = clients[n % clients.len()].clone();
                    let began = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        fetch_with(&mut c, &tokens[flood_workload(n, tokens.len())], "app/key"),
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
                            if e.message().contains(&format!(
                                "global limit of {RATE_GLOBAL} calls per second"
                            )) {
                                by_global.fetch_add(1, Ordering::Relaxed);
                            } else if e.message().contains("exceeds 20 calls per second") {
                                by_rate.fetch_add(1, Ordering::Relaxed);
                            } else if e.message().contains("512 calls in flight") {
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
            let rss = status_kib(pid, "VmRSS:");
            rss_peak = rss_peak.max(rss);
            let half = usize::from(start.elapsed().as_secs_f64() >= flood_secs / 2.0);
            rss_half_peaks[half] = rss_half_peaks[half].max(rss);
        }
        probe_stop.store(true, Ordering::Relaxed);
        for c in calls {
            c.await.unwrap();
        }
    });
    let (mut probe_lat, probe_refused) = rt.block_on(probe).unwrap();
    probe_lat.sort_by(f64::total_cmp);
    let probe_ms = |p: f64| match probe_lat.is_empty() {
        true => f64::NAN,
        false => percentile(&probe_lat, p) * 1e3,
    };
    let rss_end = status_kib(pid, "VmRSS:");
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    if lat.is_empty() {
        lat.push(0.0);
    }
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let (by_rate, by_global, by_in_flight) = (
        by_rate.load(Ordering::Relaxed),
        by_global.load(Ordering::Relaxed),
        by_in_flight.load(Ordering::Relaxed),
    );
    eprintln!(
        "overload: sustainable {sustainable:.0}/s, target {target:.0}/s, sent {:.0}/s \
         ({skipped} skipped: {MAX_OUTSTANDING} calls already waiting); \
         {ok} served ({:.0}/s), {refused} refused ({by_rate} workload rate, {by_global} global \
         rate, {by_in_flight} in flight); \
         admitted latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms; \
         probe: {} admitted, p50 {:.1} ms p99 {:.1} ms max {:.1} ms, {probe_refused} refused; \
         RSS {rss_warm} KiB after warm-up, peak {rss_peak} KiB (halves {rss_half_peaks:?}), \
         {rss_end} KiB at the end",
        sent as f64 / flood_secs,
        ok as f64 / flood_secs,
        percentile(&lat, 0.5) * 1e3,
        percentile(&lat, 0.99) * 1e3,
        lat.last().copied().unwrap_or_default() * 1e3,
        probe_lat.len(),
        probe_ms(0.5),
        probe_ms(0.99),
        probe_ms(1.0),
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
    // Both rate limits fired, the per-workload one and the global one, and
    // told the caller which (the messages are matched above).
    assert!(by_rate > 0, "the per-workload rate never refused a call");
    assert!(by_global > 0, "the global rate never refused a call");
    // The metric tells an operator a replica at its global rate from a
    // runaway workload.
    let (_, metrics) = http_get(world.ops_port, "/metrics").unwrap();
    for result in ["overloaded", "overloaded_global_rate"] {
        let label = format!("action=\"fetch\",result=\"{result}\"}}");
        let count: f64 = metrics
            .lines()
            .find(|l| l.starts_with("secrets_broker_calls_total{") && l.contains(&label))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {label} in the metrics:\n{metrics}"));
        assert!(count > 0.0, "{label} {count}");
    }
    // Admitted calls keep a bounded latency. Unloaded a fetch takes a few
    // ms; under the flood every call, admitted or not, first waits for the
    // broker to reach it behind the calls already open on the connections
    // (up to 2,048 streams, answered at 8,000-10,000 a second by a debug
    // build sharing 2 vCPUs with the load generator): the probe's admitted
    // p99 was seen at 0.45-0.8 s. The flood's own calls also wait behind
    // the load generator's queue (MAX_OUTSTANDING): p99 seen at 1.2-2 s.
    // Each bound is 10x that, for the machine's several-fold swings in
    // speed, and below the 30 s after which a call counts as hung above.
    assert!(
        !probe_lat.is_empty(),
        "none of the probe's calls was admitted"
    );
    let probe_p99 = percentile(&probe_lat, 0.99);
    assert!(
        probe_p99 < PROBE_P99_BOUND_S,
        "the probe's admitted calls' p99 latency {:.0} ms under the flood",
        probe_p99 * 1e3
    );
    let p99 = percentile(&lat, 0.99);
    assert!(
        p99 < ADMITTED_P99_BOUND_S,
        "the flood's admitted calls' p99 latency {:.0} ms",
        p99 * 1e3
    );
    // No memory growth. The flood fills buffers at once (HTTP/2 streams,
    // TLS, allocator arenas): RSS rose from ~57 MiB to ~85-90 MiB within
    // its first second, then drifted up to 100-108 MiB by its end (its
    // second half peaked 2-13 MiB over its first). The peak and the end
    // must stay within RSS_MARGIN_MIB of the warm RSS (5x the ~50 MiB seen
    // added), and the second half may add at most RSS_LEVEL_MIB over the
    // first (~4x the drift seen): a leak of 1 KiB a call would add ~80 MiB
    // over the second half's ~80,000 calls.
    let (first_half, second_half) = (rss_half_peaks[0], rss_half_peaks[1]);
    assert!(
        rss_peak < rss_warm + RSS_MARGIN_MIB * 1024 && rss_end < rss_warm + RSS_MARGIN_MIB * 1024,
        "broker RSS grew from {rss_warm} KiB to a peak of {rss_peak} KiB, {rss_end} KiB at the end"
    );
    assert!(
        second_half < first_half + RSS_LEVEL_MIB * 1024,
        "broker RSS kept growing under the flood: peak {first_half} KiB in its first half, \
         {second_half} KiB in its second"
    );
    // Served again once it is over.
    wait_for("served after the flood", LONG, || {
        let mut c = clients[0].clone();
        rt.block_on(fetch_with(&mut c, &tokens[0], "app/key")).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", notable(&broker)));
    assert!(!broker.log_text().contains("flood-value"));
}
