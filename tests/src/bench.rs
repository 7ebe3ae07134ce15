//! Pieces the benchmark binaries share: a fleet of sidecars, rotation
//! propagation rounds, and latency summaries.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use secrets_broker::dev::issuer::Workload;

use crate::{AUDIENCE, Proc, Tmpfs, World, percentile, wait_for};

/// min, p50, p90, p99, max and mean of `samples` (sorted in place).
pub fn summary(samples: &mut [f64]) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return serde_json::json!({});
    }
    serde_json::json!({
        "min": samples[0],
        "p50": percentile(samples, 0.50),
        "p90": percentile(samples, 0.90),
        "p99": percentile(samples, 0.99),
        "max": samples[samples.len() - 1],
        "mean": samples.iter().sum::<f64>() / samples.len() as f64,
    })
}

/// Starts `n` sidecars (pods `sc-<i>` of service accounts `sa-<i>` in
/// namespace `bench`) holding `secret` as `file`, and waits for their files.
pub fn start_fleet(
    world: &World,
    n: usize,
    secret: &str,
    file: &str,
) -> Result<Vec<(Proc, Tmpfs)>> {
    eprintln!("starting {n} sidecars…");
    let mut fleet = Vec::with_capacity(n);
    for i in 0..n {
        let mut w = Workload::new("bench", &format!("sa-{i}"), AUDIENCE);
        w.pod = Some(format!("sc-{i}"));
        let (proc, fs, _) =
            world.start_sidecar(&format!("sc{i}"), &w, world.broker_port, &[(secret, file)])?;
        fleet.push((proc, fs));
    }
    for (proc, fs) in &fleet {
        let f = fs.path.join(file);
        wait_for("sidecar files", Duration::from_secs(120), || {
            f.exists().then_some(())
        })
        .with_context(|| proc.log_text())?;
    }
    Ok(fleet)
}

/// Rotation propagation: each of `rounds` rounds calls `write` with a new
/// value, then times until every sidecar's `file` holds it. Returns one
/// sample (ms) per sidecar and round. Rounds start at a pseudo-random point
/// of a `cycle` (the upstream's poll interval), so the samples cover it.
pub fn time_rotations(
    fleet: &[(Proc, Tmpfs)],
    file: &str,
    rounds: usize,
    cycle: Duration,
    mut write: impl FnMut(&str) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(rounds * fleet.len());
    for round in 1..=rounds {
        let value = format!("v-{round}");
        let start = Instant::now();
        write(&value)?;
        let mut pending: Vec<usize> = (0..fleet.len()).collect();
        while !pending.is_empty() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: not every sidecar saw the new version after 60s");
            }
            pending.retain(|&k| {
                let seen =
                    std::fs::read_to_string(fleet[k].1.path.join(file)).is_ok_and(|v| v == value);
                if seen {
                    samples.push(start.elapsed().as_secs_f64() * 1000.0);
                }
                !seen
            });
            std::thread::sleep(Duration::from_micros(500));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        std::thread::sleep(cycle.mul_f64(f64::from(nanos) / 1e9));
        if round % 10 == 0 {
            eprintln!("  {round}/{rounds} rounds");
        }
    }
    Ok(samples)
}
