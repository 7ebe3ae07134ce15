//! Propagation benchmark with two broker replicas sharing one PostgreSQL
//! database, N sidecars (default 50) spread over both, and the broker's
//! default poll and refresh intervals (`store.poll_interval` 2 s,
//! `revocation.refresh_interval` 1 s): what is timed is the push, not a poll.
//!
//! - rotation: a new version stored through replica A's admin API → the new
//!   value in every sidecar's file (half of them behind replica B);
//! - revocation: one sidecar's pod revoked through the admin API of the
//!   replica it is *not* connected to → its file gone; then the rule is
//!   lifted and the file comes back before the next round.
//!
//!   cargo build --release --workspace --bins
//!   target/release/propagation-bench [--sidecars 50] [--rotations 20] [--revocations 100]
//!
//! Needs PostgreSQL at 127.0.0.1:5432 (or SECRETS_BROKER_TEST_PG), as the
//! test command sets up. Prints a table and a JSON summary.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use secrets_broker_e2e::bench::{
    BENCH_ROLES, cdf, fleet_workload, start_fleet, summary, time_rotations,
};
use secrets_broker_e2e::pg::Database;
use secrets_broker_e2e::{World, flag, free_port, wait_for};

/// The broker's defaults instead of the tests' short intervals.
fn with_defaults(path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path)?
        .replacen("poll_interval = \"200ms\"", "poll_interval = \"2s\"", 1)
        .replacen(
            "refresh_interval = \"500ms\"",
            "refresh_interval = \"1s\"",
            1,
        )
        .replacen("max_staleness = \"3s\"", "max_staleness = \"10s\"", 1);
    std::fs::write(path, text)?;
    Ok(())
}

fn main() -> Result<()> {
    let sidecars = flag("--sidecars", 50) as usize;
    let rotations = flag("--rotations", 20) as usize;
    let revocations = flag("--revocations", 100) as usize;
    let db = Database::create().context("PostgreSQL")?;
    let mut world = World::with_database(BENCH_ROLES, &db.url)?;
    world.log_level = "info";
    world.put("bench/secret", "v-0")?;
    let port_b = free_port();
    let admin_b = free_port();
    let cfg_b = world.path("broker-b.toml");
    let _ops_b = world.write_broker_config(&cfg_b, port_b, admin_b, BENCH_ROLES)?;
    with_defaults(&world.broker_config())?;
    with_defaults(&cfg_b)?;
    let _a = world.start_broker("broker-a.log")?;
    let _b = world.start_broker_with(&cfg_b, "broker-b.log")?;
    let admins = [world.admin_port, admin_b];
    let fleet = start_fleet(
        &world,
        sidecars,
        "bench/secret",
        "secret",
        &[world.broker_port, port_b],
    )?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tls = world.path("tls");
    let identity = |name: &str| -> Result<reqwest::Identity> {
        let mut pem = std::fs::read(tls.join(format!("{name}.crt")))?;
        pem.extend(std::fs::read(tls.join(format!("{name}.key")))?);
        Ok(reqwest::Identity::from_pem(&pem)?)
    };
    let client = |name: &str| -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(
                tls.join("ca.crt"),
            )?)?)
            .identity(identity(name)?)
            .build()?)
    };
    let (admin, revoker) = (client("admin")?, client("revoker")?);
    // Warm the connections to both admin APIs.
    for port in admins {
        rt.block_on(
            revoker
                .get(format!("https://localhost:{port}/v1/revocations"))
                .send(),
        )?;
    }

    eprintln!("{rotations} rotations through replica A…");
    let mut rotation = time_rotations(
        &fleet,
        "secret",
        rotations,
        Duration::from_secs(2),
        |value| {
            use base64::Engine;
            let body = serde_json::json!({ "value_base64": base64::engine::general_purpose::STANDARD.encode(value) });
            rt.block_on(
                admin
                    .put(format!(
                        "https://localhost:{}/v1/secrets/bench/secret",
                        admins[0]
                    ))
                    .json(&body)
                    .send(),
            )?
            .error_for_status()?;
            Ok(())
        },
    )?;

    eprintln!("{revocations} revocations…");
    let mut revocation = Vec::with_capacity(revocations);
    for round in 0..revocations {
        let k = round % sidecars;
        let file = fleet[k].1.path.join("secret");
        let uid = world.issuer.claims(&fleet_workload(k))["kubernetes.io"]["pod"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // Revoke through the replica the sidecar is NOT connected to.
        let admin = admins[(k + 1) % 2];
        let start = Instant::now();
        let resp = rt.block_on(
            revoker
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
        revocation.push(start.elapsed().as_secs_f64() * 1000.0);
        let id = rule["rule"]["id"].as_str().unwrap_or_default().to_owned();
        rt.block_on(
            revoker
                .delete(format!("https://localhost:{admin}/v1/revocations/{id}"))
                .send(),
        )?;
        wait_for("file back", Duration::from_secs(60), || {
            file.exists().then_some(())
        })?;
        if (round + 1) % 10 == 0 {
            eprintln!("  {}/{revocations} rounds", round + 1);
        }
    }

    let rot = summary(&mut rotation);
    let rev = summary(&mut revocation);
    println!(
        "propagation, 2 replicas on PostgreSQL, {sidecars} sidecars (ms; rotation: every sidecar of {rotations} writes; revocation: {revocations} pods)"
    );
    println!(
        "{:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "min", "p50", "p90", "p99", "max", "mean"
    );
    for (label, s) in [("rotation", &rot), ("revocation", &rev)] {
        println!(
            "{label:>11} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            s["min"].as_f64().unwrap_or(0.0),
            s["p50"].as_f64().unwrap_or(0.0),
            s["p90"].as_f64().unwrap_or(0.0),
            s["p99"].as_f64().unwrap_or(0.0),
            s["max"].as_f64().unwrap_or(0.0),
            s["mean"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "propagation",
            "replicas": 2, "sidecars": sidecars,
            "rotation": { "writes": rotations, "samples": rotation.len(), "ms": rot, "cdf_ms": cdf(&rotation) },
            "revocation": { "rounds": revocations, "ms": rev, "cdf_ms": cdf(&revocation) },
        })
    );
    Ok(())
}
