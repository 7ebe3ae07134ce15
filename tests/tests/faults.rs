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
