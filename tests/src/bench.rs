//! Pieces the benchmark binaries share: a fleet of sidecars, rotation
//! propagation rounds, and latency summaries.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use secrets_broker::dev::issuer::Workload;

use secrets_broker_proto::v1 as pb;

use crate::{AUDIENCE, Proc, Tmpfs, World, percentile, wait_for};

/// The benchmarks' one role: every service account of namespace `bench`
/// may read `bench/*`, with 10-minute leases.
pub const BENCH_ROLES: &str = r#"
[[roles]]
name = "bench"
namespaces = ["bench"]
service_accounts = ["*"]
secrets = ["bench/*"]
ttl = "10m"
max_ttl = "1h"
"#;

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

/// The empirical CDF of `samples` in at most 201 points `[value, fraction]`
/// (every 0.5 percent, plus the maximum), for plots.
pub fn cdf(samples: &[f64]) -> serde_json::Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return serde_json::json!([]);
    }
    let points: Vec<[f64; 2]> = (0..=200)
        .map(|i| {
            let p = f64::from(i) / 200.0;
            [percentile(&sorted, p), p]
        })
        .collect();
    serde_json::json!(points)
}

/// The workload of fleet member `i`: pod `sc-<i>` of service account
/// `sa-<i>` in namespace `bench`.
pub fn fleet_workload(i: usize) -> Workload {
    let mut w = Workload::new("bench", &format!("sa-{i}"), AUDIENCE);
    w.pod = Some(format!("sc-{i}"));
    w
}

/// Starts `n` sidecars (see [`fleet_workload`]) holding `secret` as `file`,
/// spread round-robin over the brokers on `ports`, and waits for their files.
pub fn start_fleet(
    world: &World,
    n: usize,
    secret: &str,
    file: &str,
    ports: &[u16],
) -> Result<Vec<(Proc, Tmpfs)>> {
    eprintln!("starting {n} sidecars…");
    let mut fleet = Vec::with_capacity(n);
    for i in 0..n {
        let (proc, fs, _) = world.start_sidecar(
            &format!("sc{i}"),
            &fleet_workload(i),
            ports[i % ports.len()],
            &[(secret, file)],
        )?;
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

/// `n` TLS connections to the broker on loopback `port` (certificate for
/// `localhost`, signed by `ca`), with Nagle off as a sidecar has it.
pub async fn broker_channels(
    port: u16,
    ca: &[u8],
    n: usize,
) -> Result<Vec<tonic::transport::Channel>> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
                .tls_config(tls.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

/// Backend load: 50 workers fetch `name` over one TLS connection to the
/// broker on `port` for `seconds`, cycling through `tokens` (one per pod), so
/// many poll intervals pass under load. Returns the fetches served.
pub fn fetch_load(
    world: &World,
    port: u16,
    tokens: Vec<String>,
    name: &str,
    seconds: u64,
) -> Result<usize> {
    let ca = std::fs::read(&world.tls.ca)?;
    let name = name.to_owned();
    world.runtime.block_on(async move {
        let channel = broker_channels(port, &ca, 1).await?.remove(0);
        let client = pb::broker_client::BrokerClient::new(channel);
        let tokens = std::sync::Arc::new(tokens);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for w in 0..50 {
            let (mut c, tokens, name) = (client.clone(), tokens.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut i) = (0usize, w);
                while Instant::now() < deadline {
                    let mut req = tonic::Request::new(pb::FetchRequest {
                        role: String::new(),
                        names: vec![name.clone()],
                        ttl_seconds: 0,
                    });
                    let t = &tokens[i % tokens.len()];
                    req.metadata_mut().insert(
                        "authorization",
                        format!("Bearer {t}").parse().expect("ascii"),
                    );
                    ok += usize::from(c.fetch(req).await.is_ok());
                    i += 50;
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await?;
        }
        anyhow::Ok(ok)
    })
}
