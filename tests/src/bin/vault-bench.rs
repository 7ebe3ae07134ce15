//! Vault backend benchmark against a real OpenBao dev server.
//!
//! 1. Backend load: 50 workers fetch one KV path for `--load-seconds`
//!    (default 5) as `--fetches` (default 1,000) distinct pods; the reads of
//!    that path are counted in OpenBao's own audit log.
//! 2. Rotation propagation: `--sidecars` (default 20) sidecars hold the path;
//!    each of `--rounds` (default 30) rounds writes a new KV version and times
//!    until every sidecar's file shows it, with the broker polling every
//!    `--poll-ms` (default 500).
//!
//!   cargo build --release --workspace --bins
//!   target/release/vault-bench [--sidecars 20] [--rounds 30] [--fetches 1000] [--load-seconds 5] [--poll-ms 500]
//!
//! Needs OpenBao (`bash scripts/test.sh` installs it). Prints tables and a JSON
//! summary.

use std::time::{Duration, Instant};

use anyhow::Result;
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::bao::{Bao, ROOT_TOKEN};
use secrets_broker_e2e::bench::{
    BENCH_ROLES, cdf, fetch_load, start_fleet, summary, time_rotations,
};
use secrets_broker_e2e::{AUDIENCE, World, flag};
use serde_json::json;

fn main() -> Result<()> {
    let sidecars = flag("--sidecars", 20) as usize;
    let rounds = flag("--rounds", 30) as usize;
    let fetches = flag("--fetches", 1000) as usize;
    let poll_ms = flag("--poll-ms", 500);
    let load_seconds = flag("--load-seconds", 5);
    let mut world = World::new(BENCH_ROLES)?;
    world.log_level = "info";
    let bao = Bao::start(world.path("bao.log"))?;
    let put = |value: &str| {
        bao.api(
            "POST",
            "secret/data/bench/config",
            Some(json!({"data": {"value": value}})),
        )
    };
    put("v-0")?;
    world.write_token("vault.token", ROOT_TOKEN)?;
    let mut cfg = std::fs::read_to_string(world.broker_config())?;
    cfg.push_str(&format!(
        r#"
[vault]
address = "{addr}"
poll_interval = "{poll_ms}ms"
[vault.auth]
method = "token"
token_file = "vault.token"
[[vault.secrets]]
name = "bench/value"
kind = "kv"
mount = "secret"
path = "bench/config"
key = "value"
"#,
        addr = bao.addr()
    ));
    std::fs::write(world.broker_config(), cfg)?;
    let broker = world.start_broker("broker.log")?;
    let path = "secret/data/bench/config";

    // 1. Backend load.
    eprintln!("minting {fetches} pod tokens…");
    let tokens: Vec<String> = (0..fetches)
        .map(|i| {
            let mut w = Workload::new("bench", "app", AUDIENCE);
            w.pod = Some(format!("pod-{i}"));
            world.issuer.mint(&w)
        })
        .collect::<Result<_, _>>()?;
    let before = bao.reads_of(path);
    let start = Instant::now();
    let served = fetch_load(
        &world,
        world.broker_port,
        tokens,
        "bench/value",
        load_seconds,
    )?;
    let elapsed = start.elapsed();
    let reads = bao.reads_of(path) - before;
    let polls = elapsed.as_secs_f64() / (poll_ms as f64 / 1000.0);
    println!(
        "backend load: {served} fetches of one KV path by {fetches} pods in {:.1}s ({:.1} poll intervals) -> {reads} OpenBao reads: {:.2} per 1,000 fetches, {:.2} per poll interval",
        elapsed.as_secs_f64(),
        polls,
        reads as f64 * 1000.0 / served.max(1) as f64,
        reads as f64 / polls
    );

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
        |v| put(v).map(|_| ()),
    )?;
    let s = summary(&mut samples);
    println!(
        "rotation propagation (KV v2 write -> new file on disk), poll {poll_ms} ms, {sidecars} sidecars, {rounds} writes"
    );
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "min", "p50", "p90", "p99", "max", "mean"
    );
    let f = |k: &str| s[k].as_f64().unwrap_or_default();
    println!(
        "{:>6.1}ms {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>6.1}ms",
        f("min"),
        f("p50"),
        f("p90"),
        f("p99"),
        f("max"),
        f("mean")
    );
    println!(
        "{}",
        json!({
            "scenario": "vault",
            "backend_load": {
                "fetches": fetches, "served": served, "seconds": elapsed.as_secs_f64(),
                "openbao_reads": reads, "reads_per_1000_fetches": reads as f64 * 1000.0 / served.max(1) as f64,
                "reads_per_poll_interval": reads as f64 / polls,
                "poll_intervals_elapsed": polls,
            },
            "rotation_propagation_ms": s,
            "rotation_cdf_ms": cdf(&samples),
            "poll_ms": poll_ms, "sidecars": sidecars, "rounds": rounds,
        })
    );
    drop(broker);
    Ok(())
}
