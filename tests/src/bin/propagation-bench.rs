//! Revocation propagation benchmark: admin call → file gone on disk.
//!
//! Two broker replicas share one PostgreSQL database; N sidecars (default
//! 50) are spread over both. Each round revokes one sidecar's pod through the
//! admin API of the *other* replica, times until its file disappears from its
//! tmpfs, then lifts the rule and waits for the file to return.
//!
//!   cargo build --release --workspace --bins
//!   target/release/revocation-bench [--sidecars 50] [--rounds 100]
//!
//! Needs PostgreSQL at 127.0.0.1:5432 (or SECRETS_BROKER_TEST_PG), as the
//! test command sets up. Prints a table and a JSON summary.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::pg::Database;
use secrets_broker_e2e::{AUDIENCE, World, flag, free_port, percentile, wait_for};

const ROLES: &str = r#"
[[roles]]
name = "bench"
namespaces = ["bench"]
service_accounts = ["*"]
secrets = ["bench/*"]
ttl = "10m"
max_ttl = "1h"
"#;

fn main() -> Result<()> {
    let sidecars = flag("--sidecars", 50) as usize;
    let rounds = flag("--rounds", 100) as usize;
    let db = Database::create().context("PostgreSQL")?;
    let mut world = World::with_database(ROLES, &db.url)?;
    world.log_level = "info";
    world.put("bench/secret", "bench-value")?;
    let port_b = free_port();
    let admin_b = free_port();
    let cfg_b = world.path("broker-b.toml");
    let _ops_b = world.write_broker_config(&cfg_b, port_b, admin_b, ROLES)?;
    let _a = world.start_broker("broker-a.log")?;
    let _b = world.start_broker_with(&cfg_b, "broker-b.log")?;
    let ports = [world.broker_port, port_b];
    let admins = [world.admin_port, admin_b];

    eprintln!("starting {sidecars} sidecars over 2 replicas…");
    let mut fleet = Vec::new();
    for i in 0..sidecars {
        let mut w = Workload::new("bench", &format!("sa-{i}"), AUDIENCE);
        w.pod = Some(format!("pod-{i}"));
        let (proc, fs, _) = world.start_sidecar(
            &format!("sc{i}"),
            &w,
            ports[i % 2],
            &[("bench/secret", "secret")],
        )?;
        let uid = world.issuer.claims(&w)["kubernetes.io"]["pod"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        fleet.push((proc, fs, uid));
    }
    for (proc, fs, _) in &fleet {
        let f = fs.path.join("secret");
        wait_for("sidecar files", Duration::from_secs(120), || {
            f.exists().then_some(())
        })
        .with_context(|| proc.log_text())?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tls = world.path("tls");
    let identity = {
        let mut pem = std::fs::read(tls.join("revoker.crt"))?;
        pem.extend(std::fs::read(tls.join("revoker.key"))?);
        reqwest::Identity::from_pem(&pem)?
    };
    let client = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(
            tls.join("ca.crt"),
        )?)?)
        .identity(identity)
        .build()?;
    // Warm the connections to both admin APIs.
    for port in admins {
        rt.block_on(
            client
                .get(format!("https://localhost:{port}/v1/revocations"))
                .send(),
        )?;
    }

    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let k = round % sidecars;
        let (_, fs, uid) = &fleet[k];
        let file = fs.path.join("secret");
        // Revoke through the replica the sidecar is NOT connected to.
        let admin = admins[(k + 1) % 2];
        let start = Instant::now();
        let resp = rt.block_on(
            client
                .post(format!("https://localhost:{admin}/v1/revocations"))
                .json(&serde_json::json!({ "pod_uid": uid, "reason": format!("bench round {round}") }))
                .send(),
        )?;
        let rule: serde_json::Value = rt.block_on(resp.json())?;
        while file.exists() {
            if start.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("round {round}: file still there after 30s");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        let id = rule["rule"]["id"].as_str().unwrap_or_default().to_owned();
        rt.block_on(
            client
                .delete(format!("https://localhost:{admin}/v1/revocations/{id}"))
                .send(),
        )?;
        wait_for("file back", Duration::from_secs(60), || {
            file.exists().then_some(())
        })?;
        if (round + 1) % 10 == 0 {
            eprintln!("  {}/{rounds} rounds", round + 1);
        }
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
    let (p50, p90, p99, max, min) = (
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.90),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1],
        sorted[0],
    );
    println!(
        "revocation propagation (admin call -> file gone), 2 replicas on PostgreSQL, {sidecars} sidecars, {rounds} revocations"
    );
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "min", "p50", "p90", "p99", "max", "mean"
    );
    println!("{min:>6.1}ms {p50:>6.1}ms {p90:>6.1}ms {p99:>6.1}ms {max:>6.1}ms {mean:>6.1}ms");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "revocation_propagation",
            "replicas": 2, "sidecars": sidecars, "rounds": rounds,
            "ms": { "min": min, "p50": p50, "p90": p90, "p99": p99, "max": max, "mean": mean },
        })
    );
    Ok(())
}
