//! Sidecar footprint and local-API benchmark, against the real binaries on
//! loopback (SQLite broker, sidecar writing into a real tmpfs):
//!
//! - time from sidecar start to all files written (broker already up);
//! - RSS idle, at its peak (VmHWM) and after 1,000 rotations, with 10, 100 and 1,000 secrets, and
//!   the sidecar's CPU seconds for those rotations;
//! - CPU seconds per hour idle with 10, 100 and 1,000 secrets (measured over
//!   `--idle-seconds`, all three at once);
//! - local `Get` over the Unix socket: p50/p99 latency and the sidecar's CPU
//!   per call; an application's open+read+close of a secret file.
//!
//!   cargo build --release --workspace --bins
//!   target/release/sidecar-bench [--idle-seconds 30] [--gets 20000]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::{
    AUDIENCE, Proc, World, cpu_seconds, flag, percentile, status_kib, wait_for,
};
use secrets_broker_proto::v1 as pb;

const ROLES: &str = r#"
[[roles]]
name = "bench"
namespaces = ["bench"]
service_accounts = ["*"]
secrets = ["bench/*"]
ttl = "1h"
max_ttl = "1h"
"#;

/// (RSS in KiB, CPU seconds) of a process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    (status_kib(pid, "VmRSS:"), cpu_seconds(pid))
}

struct Run {
    secrets: usize,
    start_ms: f64,
    rss_idle_kib: u64,
    rss_after_kib: u64,
    /// The highest RSS the kernel saw (VmHWM), start and rotations included.
    rss_peak_kib: u64,
    /// Private (anonymous) memory after the rotations; the rest of RSS is the
    /// binary's own file pages, shared through the page cache.
    anon_after_kib: u64,
    /// The sidecar's CPU seconds from the first rotation to the last on disk.
    rotation_cpu_s: f64,
    swaps: usize,
}

fn scenario(
    world: &World,
    n: usize,
    client: &reqwest::Client,
    rt: &tokio::runtime::Runtime,
) -> Result<(Run, Proc, secrets_broker_e2e::Tmpfs, std::path::PathBuf)> {
    let names: Vec<String> = (0..n).map(|i| format!("bench/s{n}-{i}")).collect();
    for name in &names {
        world.put(name, &format!("{name}-v1-{}", "x".repeat(64)))?;
    }
    let sock_dir = world.path(&format!("sock{n}"));
    std::fs::create_dir_all(&sock_dir)?;
    let socket = sock_dir.join("sidecar.sock");
    let files: Vec<(String, String)> = names
        .iter()
        .map(|n| (n.clone(), n.replace('/', "_")))
        .collect();
    let specs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, f)| (n.as_str(), f.as_str()))
        .collect();
    let tmpfs = secrets_broker_e2e::Tmpfs::new()?;
    let token = world.token_file(
        &format!("t{n}"),
        &Workload::new("bench", &format!("sa{n}"), AUDIENCE),
    )?;
    let extra = format!("[local_api]\nsocket = \"{}\"\n", socket.display());
    let cfg = world.sidecar_config(&format!("s{n}.toml"), &token, &tmpfs.path, "", &specs)?;
    let text =
        std::fs::read_to_string(&cfg)?.replacen("[[secrets]]", &format!("{extra}\n[[secrets]]"), 1);
    std::fs::write(&cfg, text)?;

    let started = Instant::now();
    let sidecar = Proc::spawn(
        std::process::Command::new(secrets_broker_e2e::bin("secrets-sidecar"))
            .args(["run", "--config"])
            .arg(&cfg),
        world.path(&format!("sidecar{n}.log")),
    )?;
    wait_for("all files", Duration::from_secs(60), || {
        files
            .iter()
            .all(|(_, f)| tmpfs.path.join(f).exists())
            .then_some(())
    })
    .with_context(|| sidecar.log_text())?;
    let start_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_secs(2));
    let (rss_idle_kib, cpu_before) = usage(sidecar.child.id());

    // 1,000 rotations through the admin API, spread over the secrets.
    eprintln!("  {n} secrets: 1,000 rotations…");
    for i in 0..1000 {
        let name = &names[i % n];
        let body = serde_json::json!({ "value_base64": base64_encode(format!("{name}-v{}-{}", i + 2, "y".repeat(64)).as_bytes()) });
        rt.block_on(
            client
                .put(format!(
                    "https://localhost:{}/v1/secrets/{name}",
                    world.admin_port
                ))
                .json(&body)
                .send(),
        )?
        .error_for_status()?;
    }
    let final_prefix = format!("{}-v{}", names[999 % n], 1001);
    let last_rotated = tmpfs.path.join(&files[999 % n].1);
    wait_for("last rotation on disk", Duration::from_secs(120), || {
        std::fs::read_to_string(&last_rotated)
            .ok()
            .filter(|v| v.starts_with(&final_prefix))
            .map(|_| ())
    })?;
    let (_, cpu_after) = usage(sidecar.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let (rss_after_kib, _) = usage(sidecar.child.id());
    let anon_after_kib = status_kib(sidecar.child.id(), "RssAnon:");
    let rss_peak_kib = status_kib(sidecar.child.id(), "VmHWM:");
    let swaps = sidecar.log_text().matches("wrote new generation").count();
    Ok((
        Run {
            secrets: n,
            start_ms,
            rss_idle_kib,
            rss_after_kib,
            rss_peak_kib,
            anon_after_kib,
            rotation_cpu_s: cpu_after - cpu_before,
            swaps,
        },
        sidecar,
        tmpfs,
        socket,
    ))
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn main() -> Result<()> {
    let idle_secs = flag("--idle-seconds", 30);
    let gets = flag("--gets", 20_000) as usize;
    let mut world = World::new(ROLES)?;
    world.log_level = "info";
    world.put("bench/warmup", "w")?;
    let _broker = world.start_broker("broker.log")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let tls = world.path("tls");
    let mut pem = std::fs::read(tls.join("admin.crt"))?;
    pem.extend(std::fs::read(tls.join("admin.key"))?);
    let client = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(
            tls.join("ca.crt"),
        )?)?)
        .identity(reqwest::Identity::from_pem(&pem)?)
        .build()?;

    let mut runs = Vec::new();
    let mut keep = Vec::new();
    for n in [10usize, 100, 1000] {
        let (run, proc, tmpfs, socket) = scenario(&world, n, &client, &rt)?;
        runs.push(run);
        keep.push((proc, tmpfs, socket, n));
    }

    // Idle CPU of every sidecar (10, 100 and 1,000 secrets), over one window.
    eprintln!("  idle for {idle_secs}s…");
    let before: Vec<f64> = keep.iter().map(|k| usage(k.0.child.id()).1).collect();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_cpu_per_hour: Vec<(usize, f64)> = keep
        .iter()
        .zip(&before)
        .map(|(k, cpu0)| {
            (
                k.3,
                (usage(k.0.child.id()).1 - cpu0) * 3600.0 / idle_secs as f64,
            )
        })
        .collect();
    let (sidecar10, fs10, socket10, _) = &keep[0];
    let pid = sidecar10.child.id();

    // Local Get over the socket: latency and the sidecar's CPU per call.
    let name = "bench/s10-0".to_owned();
    let socket = socket10.clone();
    let (lat, cpu_per_get_us) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_static("http://local.sidecar")
            .connect_with_connector(tower_fn(socket))
            .await?;
        let mut api = pb::secrets_client::SecretsClient::new(channel);
        for _ in 0..200 {
            api.get(pb::GetRequest { name: name.clone() }).await?;
        }
        let (_, c0) = usage(pid);
        let mut lat = Vec::with_capacity(gets);
        for _ in 0..gets {
            let t = Instant::now();
            api.get(pb::GetRequest { name: name.clone() }).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let (_, c1) = usage(pid);
        anyhow::Ok((lat, (c1 - c0) * 1e6 / gets as f64))
    })?;
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);

    // An application's read of a secret file.
    let file = fs10.path.join("bench_s10-0");
    let reads = 100_000;
    let t = Instant::now();
    for _ in 0..reads {
        let v = std::fs::read(&file)?;
        std::hint::black_box(v);
    }
    let read_us = t.elapsed().as_secs_f64() * 1e6 / reads as f64;

    println!("sidecar footprint (release build, real tmpfs, broker on loopback)");
    println!(
        "{:>8} {:>16} {:>14} {:>22} {:>12} {:>20} {:>14} {:>8}",
        "secrets",
        "start→files",
        "RSS idle",
        "RSS after 1,000 rot.",
        "RSS peak",
        "of which private",
        "rotation CPU",
        "swaps"
    );
    for r in &runs {
        println!(
            "{:>8} {:>13.1} ms {:>10.1} MiB {:>18.1} MiB {:>8.1} MiB {:>16.1} MiB {:>12.2} s {:>8}",
            r.secrets,
            r.start_ms,
            r.rss_idle_kib as f64 / 1024.0,
            r.rss_after_kib as f64 / 1024.0,
            r.rss_peak_kib as f64 / 1024.0,
            r.anon_after_kib as f64 / 1024.0,
            r.rotation_cpu_s,
            r.swaps
        );
    }
    for (n, per_hour) in &idle_cpu_per_hour {
        println!(
            "idle CPU ({n} secrets): {per_hour:.2} CPU-seconds per hour (measured over {idle_secs}s)"
        );
    }
    println!(
        "local Get over the Unix socket ({gets} calls): p50 {:.1} µs, p99 {:.1} µs, sidecar CPU {cpu_per_get_us:.1} µs per call",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!("application file read (open+read+close, {reads} reads): {read_us:.2} µs");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "sidecar_footprint",
            "runs": runs.iter().map(|r| serde_json::json!({
                "secrets": r.secrets, "start_to_files_ms": r.start_ms,
                "rss_idle_mib": r.rss_idle_kib as f64 / 1024.0, "rss_after_1000_rotations_mib": r.rss_after_kib as f64 / 1024.0,
                "rss_peak_mib": r.rss_peak_kib as f64 / 1024.0,
                "private_after_1000_rotations_mib": r.anon_after_kib as f64 / 1024.0,
                "cpu_seconds_for_1000_rotations": r.rotation_cpu_s,
                "generation_swaps": r.swaps,
            })).collect::<Vec<_>>(),
            "idle_cpu_seconds_per_hour": idle_cpu_per_hour.iter().map(|(n, h)| serde_json::json!({ "secrets": n, "cpu_seconds": h })).collect::<Vec<_>>(),
            "local_get_us": { "p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99), "sidecar_cpu_per_call": cpu_per_get_us, "cdf": secrets_broker_e2e::bench::cdf(&lat) },
            "file_read_us": read_us,
        })
    );
    Ok(())
}

fn tower_fn(
    socket: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_| {
        let socket = socket.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(socket).await?,
            ))
        }
    })
}
