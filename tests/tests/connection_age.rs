//! `server.max_connection_age` against the real broker and sidecar: the
//! sidecar's connection is replaced again and again (HTTP/2 GOAWAY), no call
//! fails, and an application reading the file never finds it missing.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, World, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "app"
namespaces = ["team-a"]
service_accounts = ["app"]
secrets = ["app/*"]
ttl = "1m"
max_ttl = "1h"
"#;

/// The local ports of established connections to `port` (the sidecar's, in
/// this test: nothing else connects to the broker).
fn connections_to(port: u16) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

#[test]
fn aged_connections_are_replaced_without_a_failed_call_or_a_missing_file() {
    let world = World::new(ROLES).unwrap();
    world.put("app/db", "db-value-a9e1").unwrap();
    let cfg = world.broker_config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "watch_heartbeat = \"5s\"",
        "watch_heartbeat = \"5s\"\nmax_connection_age = \"2s\"\nmax_connection_age_grace = \"1s\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let broker = world.start_broker("broker.log").unwrap();
    assert!(broker.log_text().contains("connections age out"));
    let app = Workload::new("team-a", "app", AUDIENCE);
    let (sidecar, fs, _) = world
        .start_sidecar("sc", &app, world.broker_port, &[("app/db", "db")])
        .unwrap();
    let file = fs.path.join("db");
    wait_for("first generation", Duration::from_secs(60), || {
        file.exists().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.log_text()));

    let stop = Arc::new(AtomicBool::new(false));
    let (bad_reads, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = std::thread::spawn({
        let (stop, bad_reads, reads, file) =
            (stop.clone(), bad_reads.clone(), reads.clone(), file.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                if std::fs::read_to_string(&file).ok().as_deref() != Some("db-value-a9e1") {
                    bad_reads.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    // Watch the sidecar's connections for a while: with a 2 s age (±10 %)
    // and a 1 s grace, several replace each other.
    let mut seen = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < until && seen.len() < 4 {
        seen.extend(connections_to(world.broker_port));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let log = sidecar.log_text();
    assert!(
        seen.len() >= 3,
        "the sidecar's connection was not replaced: {seen:?}\n{log}"
    );
    assert!(reads.load(Ordering::Relaxed) > 100);
    assert_eq!(
        bad_reads.load(Ordering::Relaxed),
        0,
        "a read missed the file"
    );
    for failure in ["fetch failed", "renewal failed", "WARN", "ERROR"] {
        assert!(
            !log.contains(failure),
            "{failure} in the sidecar log:\n{log}"
        );
    }
}
