//! Vault backend benchmark against a real OpenBao dev server.
//!
//! 1. Backend load: `--fetches` (default 1,000) fetches of one KV path by as
//!    many distinct pods, 50 at a time; the reads of that path are counted in
//!    OpenBao's own audit log.
//! 2. Rotation propagation: `--sidecars` (default 20) sidecars hold the path;
//!    each of `--rounds` (default 30) rounds writes a new KV version and times
//!    until every sidecar's file shows it, with the broker polling every
//!    `--poll-ms` (default 500).
//!
//!   cargo build --release --workspace --bins
//!   target/release/vault-bench [--sidecars 20] [--rounds 30] [--fetches 1000] [--poll-ms 500]
//!
//! Needs OpenBao (`bash scripts/test.sh` installs it). Prints tables and a JSON
//! summary.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::bao::{Bao, ROOT_TOKEN};
use secrets_broker_e2e::{AUDIENCE, World, flag, percentile, wait_for};
use secrets_broker_proto::v1 as pb;
use serde_json::json;

const ROLES: &str = r#"
[[roles]]
name = "bench"
namespaces = ["bench"]
service_accounts = ["*"]
secrets = ["bench/*"]
ttl = "10m"
max_ttl = "1h"
"#;

fn summary(samples: &mut [f64]) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "min": samples[0],
        "p50": percentile(samples, 0.50),
        "p90": percentile(samples, 0.90),
        "p99": percentile(samples, 0.99),
        "max": samples[samples.len() - 1],
        "mean": samples.iter().sum::<f64>() / samples.len() as f64,
    })
}

fn main() -> Result<()> {
    let sidecars = flag("--sidecars", 20) as usize;
    let rounds = flag("--rounds", 30) as usize;
    let fetches = flag("--fetches", 1000) as usize;
    let poll_ms = flag("--poll-ms", 500);
    let mut world = World::new(ROLES)?;
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
    let ca = std::fs::read(&world.tls.ca)?;
    let port = world.broker_port;
    let before = bao.reads_of(path);
    let start = Instant::now();
    let served = world.runtime.block_on(async move {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        let client = pb::broker_client::BrokerClient::new(channel);
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
        let mut tasks = Vec::new();
        for t in tokens {
            let mut c = client.clone();
            let permit = sem.clone().acquire_owned().await?;
            tasks.push(tokio::spawn(async move {
                let mut req = tonic::Request::new(pb::FetchRequest {
                    role: String::new(),
                    names: vec!["bench/value".into()],
                    ttl_seconds: 0,
                });
                req.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {t}").parse().expect("ascii"),
                );
                let r = c.fetch(req).await;
                drop(permit);
                r.is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await?);
        }
        anyhow::Ok(ok)
    })?;
    let elapsed = start.elapsed();
    let reads = bao.reads_of(path) - before;
    let polls = elapsed.as_secs_f64() / (poll_ms as f64 / 1000.0);
    println!(
        "backend load: {served}/{fetches} fetches of one KV path in {:.2}s -> {reads} OpenBao reads ({:.2} per 1,000 fetches; {:.1} poll intervals elapsed)",
        elapsed.as_secs_f64(),
        reads as f64 * 1000.0 / fetches as f64,
        polls
    );

    // 2. Rotation propagation.
    eprintln!("starting {sidecars} sidecars…");
    let mut fleet = Vec::new();
    for i in 0..sidecars {
        let mut w = Workload::new("bench", &format!("sa-{i}"), AUDIENCE);
        w.pod = Some(format!("sc-{i}"));
        let (proc, fs, _) = world.start_sidecar(
            &format!("sc{i}"),
            &w,
            world.broker_port,
            &[("bench/value", "value")],
        )?;
        fleet.push((proc, fs));
    }
    for (proc, fs) in &fleet {
        let f = fs.path.join("value");
        wait_for("sidecar files", Duration::from_secs(120), || {
            f.exists().then_some(())
        })
        .with_context(|| proc.log_text())?;
    }
    let mut samples = Vec::with_capacity(rounds * sidecars);
    for round in 1..=rounds {
        let value = format!("v-{round}");
        let start = Instant::now();
        put(&value)?;
        let mut pending: Vec<usize> = (0..sidecars).collect();
        while !pending.is_empty() {
            if start.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("round {round}: not every sidecar saw the new version after 30s");
            }
            pending.retain(|&k| {
                let seen = std::fs::read_to_string(fleet[k].1.path.join("value"))
                    .is_ok_and(|v| v == value);
                if seen {
                    samples.push(start.elapsed().as_secs_f64() * 1000.0);
                }
                !seen
            });
            std::thread::sleep(Duration::from_micros(500));
        }
        // Start the next write at a random point of the poll cycle.
        std::thread::sleep(Duration::from_millis(fastrand_ms(poll_ms)));
        if round % 10 == 0 {
            eprintln!("  {round}/{rounds} rounds");
        }
    }
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
                "openbao_reads": reads, "reads_per_1000_fetches": reads as f64 * 1000.0 / fetches as f64,
                "poll_intervals_elapsed": polls,
            },
            "rotation_propagation_ms": s,
            "poll_ms": poll_ms, "sidecars": sidecars, "rounds": rounds,
        })
    );
    drop(broker);
    Ok(())
}

/// A pseudo-random pause below one poll interval (from the clock; no RNG
/// dependency needed for this).
fn fastrand_ms(poll_ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    nanos % poll_ms.max(1)
}
