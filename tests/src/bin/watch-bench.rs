//! Watch scale benchmark: the broker's memory and CPU with many idle watch
//! streams, and the time to push one rotation to all of them.
//!
//! The sidecars are simulated in this process: `--streams` (default 1,000,
//! then 10,000 with `--streams 10000`) watch streams of as many distinct pods,
//! spread over `--connections` (default 100) TLS connections. Then one new
//! version of the watched secret is written (`secrets-broker store put`) and
//! every stream's `Rotated` event is timed.
//!
//!   cargo build --release --workspace --bins
//!   target/release/watch-bench [--streams 1000] [--connections 100] [--idle-seconds 65]
//!
//! Prints a table and a JSON summary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use secrets_broker::dev::issuer::Workload;
use secrets_broker_e2e::bench::{BENCH_ROLES, broker_channels};
use secrets_broker_e2e::{AUDIENCE, World, cpu_seconds, flag, percentile, status_kib};
use secrets_broker_proto::v1 as pb;

fn main() -> Result<()> {
    let streams = flag("--streams", 1000) as usize;
    let connections = flag("--connections", 100) as usize;
    // Two heartbeat periods and a little: the idle figure includes the
    // heartbeats every stream gets (10 s, the earlier default, saw none).
    let idle = flag("--idle-seconds", 65);
    let mut world = World::new(BENCH_ROLES)?;
    world.log_level = "info";
    // Production heartbeat (30 s) and no per-workload limit on stream opens.
    let text = std::fs::read_to_string(world.broker_config())?.replacen(
        "watch_heartbeat = \"5s\"",
        "watch_heartbeat = \"30s\"\nrate_per_identity = 0",
        1,
    );
    std::fs::write(world.broker_config(), text)?;
    world.put("bench/s", "v1")?;
    let broker = world.start_broker("broker.log")?;
    let pid = broker.child.id();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = status_kib(pid, "VmRSS");

    eprintln!("minting {streams} pod tokens…");
    let tokens: Vec<String> = (0..streams)
        .map(|i| {
            let mut w = Workload::new("bench", &format!("sa-{}", i % 100), AUDIENCE);
            w.pod = Some(format!("pod-{i}"));
            w.ttl_seconds = 3600;
            world.issuer.mint(&w)
        })
        .collect::<Result<_, _>>()?;
    let ca = std::fs::read(&world.tls.ca)?;
    let port = world.broker_port;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let open_start = Instant::now();
    rt.block_on(async {
        let channels = broker_channels(port, &ca, connections).await?;
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        for (i, t) in tokens.iter().enumerate() {
            let mut c = pb::broker_client::BrokerClient::new(channels[i % connections].clone());
            let mut req = tonic::Request::new(pb::WatchRequest {
                role: String::new(),
                names: vec!["bench/s".into()],
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse()?);
            let (tx, opened) = (tx.clone(), opened.clone());
            let permit = sem.clone().acquire_owned().await?;
            tokio::spawn(async move {
                let Ok(resp) = c.watch(req).await else {
                    return;
                };
                drop(permit);
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut s = resp.into_inner();
                while let Ok(Some(ev)) = s.message().await {
                    if let Some(pb::watch_event::Event::Rotated(_)) = ev.event {
                        let _ = tx.send(Instant::now());
                    }
                }
            });
        }
        anyhow::Ok(())
    })?;
    // Wait until every stream is open.
    while opened.load(std::sync::atomic::Ordering::Relaxed) < streams {
        if open_start.elapsed() > Duration::from_secs(300) {
            anyhow::bail!(
                "only {} of {streams} streams opened",
                opened.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_secs = open_start.elapsed().as_secs_f64();
    eprintln!("{streams} streams open in {open_secs:.1}s; idling {idle}s…");
    std::thread::sleep(Duration::from_secs(2));
    let rss_open = status_kib(pid, "VmRSS");
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(idle));
    let idle_cpu_per_s = (cpu_seconds(pid) - cpu0) / idle as f64;

    // One rotation, pushed to every stream.
    let put_start = Instant::now();
    world.put("bench/s", "v2")?;
    let put_done = Instant::now();
    let mut arrivals = Vec::with_capacity(streams);
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.len() < streams && Instant::now() < deadline {
        match rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), rx.recv()).await }) {
            Ok(Some(t)) => arrivals.push(t),
            _ => continue,
        }
    }
    let received = arrivals.len();
    arrivals.sort();
    let first = arrivals.first().copied().unwrap_or(put_done);
    let last = arrivals.last().copied().unwrap_or(put_done);
    let mut from_first: Vec<f64> = arrivals
        .iter()
        .map(|t| (*t - first).as_secs_f64() * 1000.0)
        .collect();
    from_first.sort_by(f64::total_cmp);
    let rss_after = status_kib(pid, "VmRSS");
    let fanout_ms = (last - first).as_secs_f64() * 1000.0;
    let put_to_all_ms = (last - put_done).as_secs_f64() * 1000.0;
    let per_stream_kib = (rss_open as f64 - rss_before as f64) / streams as f64;

    println!(
        "watch scale: {streams} idle watch streams over {connections} TLS connections (release broker, 30 s heartbeat)"
    );
    println!(
        "  broker RSS: {:.1} MiB before, {:.1} MiB with the streams open ({per_stream_kib:.1} KiB per stream), {:.1} MiB after the rotation",
        rss_before as f64 / 1024.0,
        rss_open as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "  streams opened in {open_secs:.1}s; idle broker CPU {:.2} ms per second",
        idle_cpu_per_s * 1000.0
    );
    println!(
        "  one rotation: {received}/{streams} streams told; first to last {fanout_ms:.1} ms (p50 {:.1} ms, p99 {:.1} ms after the first); store put done -> last {put_to_all_ms:.1} ms (includes the 200 ms version poll); put took {:.0} ms",
        percentile(&from_first, 0.5),
        percentile(&from_first, 0.99),
        (put_done - put_start).as_secs_f64() * 1000.0
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "watch_scale",
            "streams": streams, "connections": connections,
            "rss_kib": { "before": rss_before, "open": rss_open, "after_rotation": rss_after },
            "kib_per_stream": per_stream_kib,
            "open_seconds": open_secs,
            "idle_cpu_ms_per_s": idle_cpu_per_s * 1000.0,
            "rotation": {
                "received": received,
                "first_to_last_ms": fanout_ms,
                "p50_after_first_ms": percentile(&from_first, 0.5),
                "p99_after_first_ms": percentile(&from_first, 0.99),
                "put_done_to_last_ms": put_to_all_ms,
            },
        })
    );
    drop(broker);
    Ok(())
}
