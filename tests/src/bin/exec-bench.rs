//! `secrets-sidecar exec` benchmark, against the real binaries on loopback
//! (SQLite broker, exec writing into a real tmpfs, the command a real
//! process):
//!
//! - start: from spawning `secrets-sidecar exec` (broker up) to the first
//!   instruction of the command's `main`, with 10 secrets as environment
//!   variables; beside it, the same command spawned directly (what a
//!   process start costs here without exec);
//! - restart: from an admin-API write of a new version to the restarted
//!   command's `main` holding it, over `--rotations` rotations, with the
//!   default `on_change_debounce` (1 s) and with 0 s;
//! - beside the start, `secrets-sidecar once` with the same config (start,
//!   login, fetch, exit): what of the start is the sidecar's own;
//! - exec's RSS (VmRSS, VmHWM, private) while supervising, and its CPU for
//!   the rotations.
//!
//! The command is this binary run as `exec-bench --child FILE`: its first
//! step appends `PID UNIX_NANOS VARS VALUE` to FILE, then it sleeps until a
//! signal ends it (or exec is gone).
//!
//!   cargo build --release --workspace --bins
//!   target/release/exec-bench [--starts 20] [--rotations 100] [--sidecar PATH]
//!
//! `--sidecar` measures another `secrets-sidecar` build (say a release one
//! beside debug brokers) than the one next to this binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::bench::summary;
use secrets_broker_e2e::{
    AUDIENCE, Proc, Tmpfs, World, bin, cpu_seconds, flag, status_kib, wait_for,
};

const ROLES: &str = r#"
[[roles]]
name = "bench"
namespaces = ["bench"]
service_accounts = ["*"]
secrets = ["bench/*"]
ttl = "1h"
max_ttl = "1h"
"#;

const VARS: usize = 10;

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// The command's side: one line, then wait for a signal.
fn child(file: &str) -> ! {
    let at = unix_nanos();
    let vars = std::env::vars_os()
        .filter(|(k, _)| k.to_string_lossy().starts_with("BENCH_"))
        .count();
    let value = std::env::var("BENCH_0").unwrap_or_default();
    let line = format!("{} {at} {vars} {value}\n", std::process::id());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = f.write_all(line.as_bytes());
    }
    // Until a signal ends it, or its parent (exec) is gone.
    let parent = std::os::unix::process::parent_id();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
    }
}

/// The lines the commands wrote: (pid, unix nanos, vars, BENCH_0).
fn lines(file: &Path) -> Vec<(u32, u128, usize, String)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.splitn(4, ' ');
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next().unwrap_or("").to_owned(),
            ))
        })
        .collect()
}

fn ms_since(start: u128, at: u128) -> f64 {
    at.saturating_sub(start) as f64 / 1e6
}

fn exec_config(world: &World, tmpfs: &Tmpfs, debounce: &str) -> Result<PathBuf> {
    let token = world.token_file(
        &format!("exec-{debounce}.token"),
        &Workload::new("bench", "exec", AUDIENCE),
    )?;
    let cfg = world.sidecar_config(
        &format!("exec-{debounce}.toml"),
        &token,
        &tmpfs.path,
        &format!("on_change_debounce = \"{debounce}\""),
        &[],
    )?;
    let mut text = std::fs::read_to_string(&cfg)?;
    for i in 0..VARS {
        text.push_str(&format!(
            "[[env]]\nname = \"BENCH_{i}\"\nsecret = \"bench/e{i}\"\n"
        ));
    }
    std::fs::write(&cfg, text)?;
    Ok(cfg)
}

/// The `secrets-sidecar` measured: `--sidecar PATH`, or the one beside this binary.
fn sidecar_bin() -> PathBuf {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--sidecar")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| bin("secrets-sidecar"))
}

fn spawn_exec(world: &World, cfg: &Path, file: &Path, log: &str) -> Result<Proc> {
    Proc::spawn(
        Command::new(sidecar_bin())
            .args(["exec", "--config"])
            .arg(cfg)
            .arg("--")
            .arg(std::env::current_exe()?)
            .arg("--child")
            .arg(file)
            .env("RUST_LOG", "info"),
        world.path(log),
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(args.get(i + 1).map(String::as_str).unwrap_or("/dev/null"));
    }
    let starts = flag("--starts", 20) as usize;
    let rotations = flag("--rotations", 100) as usize;
    let mut world = World::new(ROLES)?;
    world.log_level = "info";
    for i in 0..VARS {
        world.put(
            &format!("bench/e{i}"),
            &format!("v0-{i}-{}", "x".repeat(32)),
        )?;
    }
    let _broker = world.start_broker("broker.log")?;
    let tmpfs = Tmpfs::new()?;

    // Start: spawn → the command's first line, with 10 env secrets.
    eprintln!("{starts} starts…");
    let cfg = exec_config(&world, &tmpfs, "1s")?;
    let mut start_ms = Vec::with_capacity(starts);
    for round in 0..=starts {
        let file = world.path(&format!("start-{round}.lines"));
        let t0 = unix_nanos();
        let mut exec = spawn_exec(&world, &cfg, &file, "exec-start.log")?;
        let (_, at, vars, _) =
            wait_for("the command's first line", Duration::from_secs(60), || {
                lines(&file).pop()
            })
            .with_context(|| exec.log_text())?;
        if vars != VARS {
            bail!("the command saw {vars} BENCH_ variables, not {VARS}");
        }
        // Round 0 warms the page cache and the broker's connections.
        if round > 0 {
            start_ms.push(ms_since(t0, at));
        }
        exec.signal("TERM");
        exec.wait_exit(Duration::from_secs(30))?;
    }
    // The same config under `once`: process start, login, fetch, exit.
    let mut once_ms = Vec::with_capacity(starts);
    for round in 0..=starts {
        let t0 = unix_nanos();
        let out = Command::new(sidecar_bin())
            .args(["once", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .output()?;
        if !out.status.success() {
            bail!("once: {}", String::from_utf8_lossy(&out.stderr));
        }
        if round > 0 {
            once_ms.push(ms_since(t0, unix_nanos()));
        }
    }
    let mut direct_ms = Vec::with_capacity(starts);
    for round in 0..=starts {
        let file = world.path(&format!("direct-{round}.lines"));
        let t0 = unix_nanos();
        let mut c = Command::new(std::env::current_exe()?)
            .arg("--child")
            .arg(&file)
            .spawn()?;
        let (_, at, _, _) = wait_for("the direct command's line", Duration::from_secs(60), || {
            lines(&file).pop()
        })?;
        if round > 0 {
            direct_ms.push(ms_since(t0, at));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    // Restarts: admin write → the new command's first line with the value.
    let tls = world.path("tls");
    let mut pem = std::fs::read(tls.join("admin.crt"))?;
    pem.extend(std::fs::read(tls.join("admin.key"))?);
    let client = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(
            tls.join("ca.crt"),
        )?)?)
        .identity(reqwest::Identity::from_pem(&pem)?)
        .build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut scenarios = Vec::new();
    for debounce in ["1s", "0s"] {
        eprintln!("{rotations} rotations, on_change_debounce = {debounce}…");
        let cfg = exec_config(&world, &tmpfs, debounce)?;
        let file = world.path(&format!("restart-{debounce}.lines"));
        let exec = spawn_exec(&world, &cfg, &file, &format!("exec-{debounce}.log"))?;
        let pid = exec.child.id();
        wait_for("the first command", Duration::from_secs(60), || {
            lines(&file).pop()
        })
        .with_context(|| exec.log_text())?;
        std::thread::sleep(Duration::from_secs(2));
        let rss_idle = status_kib(pid, "VmRSS:");
        let cpu0 = cpu_seconds(pid);
        let mut samples = Vec::with_capacity(rotations);
        for i in 1..=rotations {
            let value = format!("r{i}-{debounce}-{}", "y".repeat(32));
            let body = serde_json::json!({ "value_base64": base64_encode(value.as_bytes()) });
            let t0 = unix_nanos();
            rt.block_on(
                client
                    .put(format!(
                        "https://localhost:{}/v1/secrets/bench/e0",
                        world.admin_port
                    ))
                    .json(&body)
                    .send(),
            )?
            .error_for_status()?;
            let at = wait_for("the restarted command", Duration::from_secs(60), || {
                lines(&file).into_iter().find(|l| l.3 == value).map(|l| l.1)
            })
            .with_context(|| exec.log_text())?;
            samples.push(ms_since(t0, at));
            if i % 20 == 0 {
                eprintln!("  {i}/{rotations}");
            }
        }
        let cpu = cpu_seconds(pid) - cpu0;
        std::thread::sleep(Duration::from_secs(1));
        let rss_after = status_kib(pid, "VmRSS:");
        let rss_peak = status_kib(pid, "VmHWM:");
        let anon_after = status_kib(pid, "RssAnon:");
        let restarts = exec.log_text().matches("started the command").count();
        scenarios.push(serde_json::json!({
            "on_change_debounce": debounce,
            "rotations": rotations,
            "commands_started": restarts,
            "restart_ms": summary(&mut samples),
            "exec_rss_idle_mib": rss_idle as f64 / 1024.0,
            "exec_rss_after_mib": rss_after as f64 / 1024.0,
            "exec_rss_peak_mib": rss_peak as f64 / 1024.0,
            "exec_private_after_mib": anon_after as f64 / 1024.0,
            "exec_cpu_seconds": cpu,
        }));
        let mut exec = exec;
        exec.signal("TERM");
        exec.wait_exit(Duration::from_secs(30))?;
    }

    let start = summary(&mut start_ms);
    let once = summary(&mut once_ms);
    let direct = summary(&mut direct_ms);
    println!("secrets-sidecar exec (real tmpfs, broker on loopback, {VARS} env secrets)");
    println!(
        "start → command's main: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over {starts} starts (`once` with the same config, start → exit: p50 {:.1} ms; a direct spawn of the same command: p50 {:.2} ms)",
        start["p50"].as_f64().unwrap_or_default(),
        start["p90"].as_f64().unwrap_or_default(),
        start["max"].as_f64().unwrap_or_default(),
        once["p50"].as_f64().unwrap_or_default(),
        direct["p50"].as_f64().unwrap_or_default(),
    );
    for s in &scenarios {
        let r = &s["restart_ms"];
        println!(
            "restart, admin write → new command's main (on_change_debounce {}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} rotations ({} starts); exec RSS {:.1} MiB idle, {:.1} MiB after, peak {:.1} MiB, private {:.1} MiB; exec CPU {:.2} s",
            s["on_change_debounce"].as_str().unwrap_or_default(),
            r["p50"].as_f64().unwrap_or_default(),
            r["p99"].as_f64().unwrap_or_default(),
            r["max"].as_f64().unwrap_or_default(),
            s["rotations"],
            s["commands_started"],
            s["exec_rss_idle_mib"].as_f64().unwrap_or_default(),
            s["exec_rss_after_mib"].as_f64().unwrap_or_default(),
            s["exec_rss_peak_mib"].as_f64().unwrap_or_default(),
            s["exec_private_after_mib"].as_f64().unwrap_or_default(),
            s["exec_cpu_seconds"].as_f64().unwrap_or_default(),
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "exec",
            "env_secrets": VARS,
            "start_to_command_ms": start,
            "once_start_to_exit_ms": once,
            "direct_spawn_ms": direct,
            "restarts": scenarios,
        })
    );
    Ok(())
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
