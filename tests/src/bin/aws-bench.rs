//! AWS backend benchmark against a real AWS API emulator (moto), counted by
//! the test proxy in front of it (outside the broker).
//!
//! 1. Backend load: 50 workers fetch for `--load-seconds` (default 5) as
//!    `--fetches` (default 1,000) distinct pods, first one Secrets Manager
//!    secret, then one `sts-assume-role` secret; the calls that reached moto
//!    are counted (per 1,000 fetches, and per poll interval).
//! 2. Rotation propagation: `--sidecars` (default 10) sidecars hold the
//!    Secrets Manager secret; each of `--rounds` (default 20) rounds puts a new
//!    `AWSCURRENT` version (`PutSecretValue`) and times until every sidecar's
//!    file shows it, with the broker polling every `--poll-ms` (default 500).
//! 3. Credential refresh margin: one sidecar holds `sts-web-identity`
//!    credentials of `--sts-secs` (default 30) life with a 6 s lease; for
//!    `--refreshes` (default 3) replacements, how long before the old
//!    credentials' `Expiration` the new ones were on disk.
//!
//!   cargo build --release --workspace --bins
//!   target/release/aws-bench [--fetches 1000] [--load-seconds 5] [--sidecars 10] [--rounds 20] [--poll-ms 500]
//!
//! Needs moto (`bash scripts/test.sh` installs it). Prints lines and a JSON summary.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::bench::{cdf, fetch_load, start_fleet, summary, time_rotations};
use secrets_broker_e2e::moto::{self, Moto};
use secrets_broker_e2e::{AUDIENCE, Proc, World, bin, flag, wait_for};
use serde_json::{Value, json};

const ROLES: &str = r#"
[[roles]]
name = "bench"
namespaces = ["bench"]
service_accounts = ["*"]
secrets = ["bench/*"]
ttl = "6s"
max_ttl = "1h"
"#;

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn unix_of(rfc3339: &str) -> f64 {
    let out = Command::new(moto::venv().join("bin/python"))
        .args([
            "-c",
            "import sys,datetime;print(datetime.datetime.fromisoformat(sys.argv[1].replace('Z','+00:00')).timestamp())",
            rfc3339,
        ])
        .output()
        .expect("python");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let fetches = flag("--fetches", 1000) as usize;
    let load_seconds = flag("--load-seconds", 5);
    let sidecars = flag("--sidecars", 10) as usize;
    let rounds = flag("--rounds", 20) as usize;
    let poll_ms = flag("--poll-ms", 500);
    let sts_secs = flag("--sts-secs", 30);
    let refreshes = flag("--refreshes", 3) as usize;
    let mut world = World::new(ROLES)?;
    world.log_level = "info";
    let moto = Moto::start(world.path("moto.log"))?;
    moto.create_secret("bench/value", "v-0")?;
    let mut cfg = std::fs::read_to_string(world.broker_config())?.replace(
        &format!("audiences = [\"{AUDIENCE}\"]"),
        &format!("audiences = [\"{AUDIENCE}\", \"sts.amazonaws.com\"]"),
    );
    cfg.push_str(&format!(
        r#"
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
poll_interval = "{poll_ms}ms"
[[aws.secrets]]
name = "bench/value"
kind = "secretsmanager"
secret_id = "bench/value"
[[aws.secrets]]
name = "bench/assumed"
kind = "sts-assume-role"
role_arn = "arn:aws:iam::{account}:role/bench"
duration = "15m"
[[aws.secrets]]
name = "bench/web"
kind = "sts-web-identity"
role_arn = "arn:aws:iam::{account}:role/bench-web"
duration = "{sts_secs}s"
"#,
        endpoint = moto.endpoint(),
        account = moto::ACCOUNT,
    ));
    std::fs::write(world.broker_config(), cfg)?;
    let broker = Proc::spawn(
        Command::new(bin("secrets-broker"))
            .args(["serve", "--config"])
            .arg(world.broker_config())
            .env("RUST_LOG", "info")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        world.path("broker.log"),
    )?;
    wait_for("broker ready", Duration::from_secs(30), || {
        broker
            .log_text()
            .contains("signing keys loaded")
            .then_some(())
    })?;

    // 1. Backend load.
    let mut load = serde_json::Map::new();
    for (name, action) in [
        ("bench/value", "GetSecretValue"),
        ("bench/assumed", "AssumeRole"),
    ] {
        let tokens: Vec<String> = (0..fetches)
            .map(|i| {
                let mut w = Workload::new("bench", "app", AUDIENCE);
                w.pod = Some(format!("pod-{i}"));
                world.issuer.mint(&w)
            })
            .collect::<Result<_, _>>()?;
        let before = moto.calls(action);
        let start = Instant::now();
        let served = fetch_load(&world, world.broker_port, tokens, name, load_seconds)?;
        let elapsed = start.elapsed().as_secs_f64();
        let calls = moto.calls(action) - before;
        println!(
            "backend load: {served} fetches of {name} by {fetches} pods in {elapsed:.2}s -> {calls} {action} calls ({:.1} per 1,000 fetches, {:.2} per poll interval)",
            calls as f64 * 1000.0 / served.max(1) as f64,
            calls as f64 / (elapsed / (poll_ms as f64 / 1000.0))
        );
        load.insert(
            name.into(),
            json!({"fetches": fetches, "served": served, "seconds": elapsed, "action": action,
                   "calls": calls, "calls_per_1000_fetches": calls as f64 * 1000.0 / served.max(1) as f64,
                   "calls_per_poll_interval": calls as f64 / (elapsed / (poll_ms as f64 / 1000.0)),
                   "poll_intervals_elapsed": elapsed / (poll_ms as f64 / 1000.0)}),
        );
    }

    // 2. Rotation propagation.
    let fleet = start_fleet(
        &world,
        sidecars,
        "bench/value",
        "value",
        &[world.broker_port],
    )?;
    let mut samples = time_rotations(
        &fleet,
        "value",
        rounds,
        Duration::from_millis(poll_ms),
        |v| moto.put_secret("bench/value", v).map(|_| ()),
    )?;
    drop(fleet);
    let rotation = summary(&mut samples);
    let f = |k: &str| rotation[k].as_f64().unwrap_or_default();
    println!(
        "rotation propagation (PutSecretValue -> new file on disk), poll {poll_ms} ms, {sidecars} sidecars, {rounds} puts: min {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        f("min"),
        f("p50"),
        f("p90"),
        f("max")
    );

    // 3. Credential refresh margin.
    let mut w = Workload::new("bench", "web", "sts.amazonaws.com");
    w.pod = Some("web-0".into());
    let (proc, fs, _) =
        world.start_sidecar("web", &w, world.broker_port, &[("bench/web", "aws.json")])?;
    let file = fs.path.join("aws.json");
    let read =
        || -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok() };
    let mut current = wait_for("sts credentials", Duration::from_secs(60), read)
        .with_context(|| proc.log_text())?;
    let mut margins = Vec::new();
    for _ in 0..refreshes {
        let expiry = unix_of(current["Expiration"].as_str().unwrap_or_default());
        let (next, at) = wait_for(
            "refreshed credentials",
            Duration::from_secs(sts_secs * 3),
            || {
                read()
                    .filter(|c| c["AccessKeyId"] != current["AccessKeyId"])
                    .map(|c| (c, now_unix()))
            },
        )
        .with_context(|| proc.log_text())?;
        margins.push(expiry - at);
        current = next;
    }
    let margin = summary(&mut margins);
    println!(
        "credential refresh margin ({sts_secs}s credentials, 6s lease): new credentials on disk {:.1}-{:.1}s (mean {:.1}s) before the old ones expired",
        margin["min"].as_f64().unwrap_or_default(),
        margin["max"].as_f64().unwrap_or_default(),
        margin["mean"].as_f64().unwrap_or_default()
    );
    println!(
        "{}",
        json!({
            "scenario": "aws",
            "backend_load": load,
            "rotation_propagation_ms": rotation,
            "rotation_cdf_ms": cdf(&samples),
            "refresh_margin_s": margin,
            "sts_seconds": sts_secs,
            "poll_ms": poll_ms, "sidecars": sidecars, "rounds": rounds,
            "sts_calls_total": moto.sts_calls(),
        })
    );
    drop(proc);
    drop(broker);
    Ok(())
}
