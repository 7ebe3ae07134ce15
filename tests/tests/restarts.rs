//! The sidecar across restarts and revocations, end to end with the real
//! binaries: what a killed sidecar left on the tmpfs never outlives its
//! lease, a revocation, or a refusal; one withheld secret does not withhold
//! the rest; a full revocation is one generation swap; a broker restart
//! costs each sidecar one Fetch.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{AUDIENCE, Proc, Tmpfs, World, bin, free_port, http_get, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "team"
namespaces = ["team-a"]
service_accounts = ["app"]
secrets = ["app/*"]
ttl = "30s"
max_ttl = "1h"
"#;

const LONG: Duration = Duration::from_secs(60);
const SECRETS: [(&str, &str); 3] = [("app/db", "db"), ("app/s3", "s3"), ("app/api", "api")];

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn app() -> Workload {
    Workload::new("team-a", "app", AUDIENCE)
}

fn world() -> World {
    let world = World::new(ROLES).unwrap();
    for (name, _) in SECRETS {
        world.put(name, &format!("{name}-value-5e1f")).unwrap();
    }
    world
}

/// `secrets-sidecar run` for the app into `dir` (kept across restarts);
/// returns the process and its health port.
fn sidecar(world: &World, name: &str, dir: &Path) -> (Proc, u16) {
    let health = free_port();
    let token = world.token_file(&format!("{name}.token"), &app()).unwrap();
    let cfg = world
        .sidecar_config(
            &format!("{name}.toml"),
            &token,
            dir,
            &format!("health_listen = \"127.0.0.1:{health}\""),
            &SECRETS,
        )
        .unwrap();
    let proc = Proc::spawn(
        Command::new(bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path(&format!("{name}.log")),
    )
    .unwrap();
    (proc, health)
}

fn all_written(proc: &Proc, dir: &Path) {
    wait_for("every secret written", LONG, || {
        SECRETS
            .iter()
            .all(|(_, f)| exists(&dir.join(f)))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_text()));
}

fn kill(mut proc: Proc) {
    proc.signal("KILL");
    proc.wait_exit(LONG).unwrap();
}

fn brokerctl_ok(world: &World, args: &[&str]) {
    let o = world.brokerctl(Some("revoker"), args).unwrap();
    assert!(o.status.success(), "{}", secrets_broker_e2e::out_text(&o));
}

/// A sidecar killed with SIGKILL leaves its files; a new one started while
/// the pod is revoked removes them at once, when its first fetch is refused.
#[test]
fn a_restart_while_revoked_removes_what_the_killed_sidecar_left() {
    let world = world();
    let _broker = world.start_broker("broker.log").unwrap();
    let fs = Tmpfs::new().unwrap();
    let (first, _) = sidecar(&world, "first", &fs.path);
    all_written(&first, &fs.path);
    kill(first);
    assert!(exists(&fs.path.join("db")), "SIGKILL leaves the files");
    brokerctl_ok(
        &world,
        &[
            "revoke",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
            "--reason",
            "compromised",
        ],
    );
    let (second, health) = sidecar(&world, "second", &fs.path);
    // Well before the 30 s lease the killed sidecar recorded.
    wait_for("the files gone", Duration::from_secs(20), || {
        (!exists(&fs.path.join("db"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log_text()));
    assert!(
        second
            .log_text()
            .contains("the broker refused the first fetch"),
        "{}",
        second.log_text()
    );
    let (status, body) = http_get(health, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
}

/// With the broker down, a restarted sidecar keeps what its predecessor
/// left exactly until the recorded lease end, then removes it; a generation
/// that cannot say when its lease ends goes at once.
#[test]
fn a_restart_while_the_broker_is_down_keeps_the_files_only_to_their_lease_end() {
    let world = world();
    let mut broker = world.start_broker("broker.log").unwrap();
    let fs = Tmpfs::new().unwrap();
    let (first, _) = sidecar(&world, "first", &fs.path);
    all_written(&first, &fs.path);
    let lease_end: i64 = std::fs::read_to_string(fs.path.join("..data/..lease-end"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(first);
    broker.signal("KILL");
    broker.wait_exit(LONG).unwrap();

    let (second, _) = sidecar(&world, "second", &fs.path);
    wait_for("the predecessor's files adopted", LONG, || {
        second
            .log_text()
            .contains("found the secrets a previous sidecar wrote")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log_text()));
    assert!(exists(&fs.path.join("db")), "kept while the lease runs");
    wait_for("the files gone at the lease end", LONG, || {
        (!exists(&fs.path.join("db"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log_text()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now >= lease_end - 1,
        "removed at the lease end ({lease_end}), not before (now {now})"
    );
    kill(second);

    // A generation without its lease end (an older sidecar's): at once.
    let mut broker2 = world.start_broker("broker2.log").unwrap();
    let (third, _) = sidecar(&world, "third", &fs.path);
    all_written(&third, &fs.path);
    kill(third);
    broker2.signal("KILL");
    broker2.wait_exit(LONG).unwrap();
    std::fs::remove_file(fs.path.join("..data/..lease-end")).unwrap();
    let (fourth, _) = sidecar(&world, "fourth", &fs.path);
    wait_for(
        "unknown lease end: removed at once",
        Duration::from_secs(20),
        || (!exists(&fs.path.join("db"))).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", fourth.log_text()));
    assert!(
        fourth
            .log_text()
            .contains("they do not say when their lease ends"),
        "{}",
        fourth.log_text()
    );
}

/// A rule with a secret withholds just that secret from a sidecar that
/// (re)starts: the others are written and /readyz names the one.
#[test]
fn a_restart_under_a_one_secret_rule_writes_the_others() {
    let world = world();
    let _broker = world.start_broker("broker.log").unwrap();
    let fs = Tmpfs::new().unwrap();
    let (first, _) = sidecar(&world, "first", &fs.path);
    all_written(&first, &fs.path);
    kill(first);
    brokerctl_ok(
        &world,
        &[
            "revoke",
            "--secret",
            "app/s3",
            "--namespace",
            "team-a",
            "--reason",
            "rotate the key",
        ],
    );
    let (second, health) = sidecar(&world, "second", &fs.path);
    wait_for("the others written, the withheld one gone", LONG, || {
        let gen_swapped = second.log_text().contains("wrote new generation");
        (gen_swapped && !exists(&fs.path.join("s3"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log_text()));
    for f in ["db", "api"] {
        assert_eq!(
            std::fs::read_to_string(fs.path.join(f)).unwrap(),
            format!("app/{f}-value-5e1f")
        );
    }
    let (status, body) = http_get(health, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("app/s3: revoked (rule id rv-"), "{body}");
    assert!(!body.contains("app/db"), "{body}");
}

/// Revoking everything a sidecar holds publishes an empty generation with
/// the same one rename: a reader polling `..data` never finds it missing.
#[test]
fn a_full_revocation_is_one_generation_swap() {
    let world = world();
    let _broker = world.start_broker("broker.log").unwrap();
    let fs = Tmpfs::new().unwrap();
    let (sc, _) = sidecar(&world, "sc", &fs.path);
    all_written(&sc, &fs.path);
    let stop = Arc::new(AtomicBool::new(false));
    let (missing, polls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = std::thread::spawn({
        let (stop, missing, polls) = (stop.clone(), missing.clone(), polls.clone());
        let data = fs.path.join("..data");
        move || {
            while !stop.load(Ordering::Relaxed) {
                if std::fs::symlink_metadata(&data).is_err() {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
                polls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    brokerctl_ok(
        &world,
        &["revoke", "--namespace", "team-a", "--reason", "incident"],
    );
    wait_for("every file gone", LONG, || {
        SECRETS
            .iter()
            .all(|(_, f)| !exists(&fs.path.join(f)))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.log_text()));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(polls.load(Ordering::Relaxed) > 100);
    assert_eq!(missing.load(Ordering::Relaxed), 0, "..data went missing");
    let generation = fs.path.join("..data");
    assert_eq!(
        std::fs::read_dir(&generation).unwrap().count(),
        0,
        "the current generation is empty"
    );
}

/// After a broker restart, each sidecar's watch streams reconnect and it
/// checks its whole set with one Fetch (not one per secret).
#[test]
fn a_broker_restart_costs_each_sidecar_one_fetch() {
    let world = world();
    let mut broker = world.start_broker("broker.log").unwrap();
    let fs = Tmpfs::new().unwrap();
    let (sc, _) = sidecar(&world, "sc", &fs.path);
    all_written(&sc, &fs.path);
    broker.signal("KILL");
    broker.wait_exit(LONG).unwrap();
    let _broker2 = world.start_broker("broker2.log").unwrap();
    let fetches = || {
        let (_, metrics) = http_get(world.ops_port, "/metrics").unwrap_or_default();
        metrics
            .lines()
            .find(|l| l.starts_with(r#"secrets_broker_calls_total{action="fetch",result="ok"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_for("the sidecar's fetch after the restart", LONG, || {
        (fetches() >= 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.log_text()));
    // Give any further fetches time to arrive: the old code made one per secret.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fetches(), 1, "{}", sc.log_text());
}
