//! Broker exchange benchmark: token → secret (one `Fetch`: verify, authorize,
//! read through the cache, record the lease, audit) over TLS, against the real
//! release broker on loopback (embedded SQLite store), at several
//! concurrencies and with 1 or 1,000 distinct identities, with the broker's
//! verification cache on (the default) and off (`verify_cache = "0s"`: every
//! call verifies the signature). The signature check alone is measured in the
//! same run for the ratio, and so is the cost of the cheapest call there is
//! (a gRPC health check over the same TLS connections: no token, no
//! database), the floor of the transport, closed loop and paced like the
//! paced rows (their latency floor).
//!
//!   cargo build --release --workspace --bins
//!   target/release/exchange-bench [--seconds 5] [--cache-only 0|1|2] [--es256] [--login] [--paced-only]
//!   target/release/exchange-bench --pairs N [--rate R | --sweep]
//!
//! Tokens are RS256, as a Kubernetes API server signs them by default;
//! `--es256` signs them with ECDSA P-256 instead.
//!
//! `--login` makes each exchange a `Login` and then a `Fetch` with the same
//! token, as a sidecar does when it starts: the rows count these pairs.
//!
//! `--cache-only 1` runs only with the cache on, `2` only with it off.
//! `--paced-only` runs, of the closed-loop rows, only concurrency 64 with one
//! identity (the rate the paced rows offer a share of), then the paced rows.
//!
//! `--pairs N` (cache on) measures the paced tail against its floor with the
//! VM's drift taken out: after the closed-loop row it alternates, N times,
//! 64 paced callers sending `Fetch`es and the same callers sending health
//! checks, `--seconds` each, at `--rate` calls/s (default a quarter of the
//! closed-loop rate), and prints each pair and the median, least and most of
//! each figure and of the exchange's p99 over its pair's floor.
//!
//! `--sweep` does the same at several rates, a sixteenth to a half of the
//! closed-loop rate ([`SWEEP_SHARES`]), `--pairs` rounds (default 3), each
//! round going through every rate once so the VM's drift falls on all of
//! them alike: the p99 at concurrency 64 as a function of the offered load,
//! and the highest offered rate whose p99 stayed under [`P99_TARGET_US`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use secrets_broker::dev::issuer::{SigningAlgorithm, Workload};
use secrets_broker_e2e::bench::{BENCH_ROLES, broker_channels, cdf};
use secrets_broker_e2e::{AUDIENCE, World, cpu_seconds, flag, percentile};
use secrets_broker_proto::v1 as pb;

/// Shares of the closed-loop rate (concurrency 64) that `--sweep` offers.
const SWEEP_SHARES: [f64; 6] = [0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5];
/// The target for the exchange's p99 at concurrency 64.
const P99_TARGET_US: f64 = 2000.0;

struct Row {
    cache: bool,
    concurrency: usize,
    identities: usize,
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_exchange: f64,
    /// Exchanges per second in the slowest and the fastest whole second.
    spread: (f64, f64),
    cdf_us: serde_json::Value,
    /// Calls per second offered by paced callers; `None`: closed loop (each
    /// caller sends its next call when the last one returns).
    offered: Option<f64>,
    /// Every call's latency (µs), sorted.
    lat: Vec<f64>,
}

fn main() -> Result<()> {
    let seconds = flag("--seconds", 5);
    let only = flag("--cache-only", 0);
    let mut world = World::new(BENCH_ROLES)?;
    world.log_level = "info";
    world.put("bench/s", &"v".repeat(64))?;
    // RS256, as a Kubernetes API server signs service-account tokens by
    // default; `--es256` for ECDSA P-256 tokens.
    let es256 = std::env::args().any(|a| a == "--es256");
    let login = std::env::args().any(|a| a == "--login");
    let sweep = std::env::args().any(|a| a == "--sweep");
    let pairs = flag("--pairs", if sweep { 3 } else { 0 }) as usize;
    // A sweep is made of rounds: at least one.
    let pairs = if sweep { pairs.max(1) } else { pairs };
    let paced_only = pairs > 0 || std::env::args().any(|a| a == "--paced-only");
    let (alg, alg_name) = if es256 {
        (jsonwebtoken::Algorithm::ES256, "ES256")
    } else {
        world.issuer.use_algorithm(SigningAlgorithm::Rs256)?;
        (jsonwebtoken::Algorithm::RS256, "RS256")
    };
    // One identity at concurrency 256 is the point here: no per-workload rate limit.
    let config = std::fs::read_to_string(world.broker_config())?.replacen(
        "watch_heartbeat = \"5s\"",
        "watch_heartbeat = \"5s\"\nrate_per_identity = 0",
        1,
    );
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            let mut w = Workload::new("bench", &format!("sa-{i}"), AUDIENCE);
            w.ttl_seconds = 3600;
            world.issuer.mint(&w)
        })
        .collect::<Result<_, _>>()?;
    let ca = std::fs::read(&world.tls.ca)?;
    let port = world.broker_port;

    // The floor: one signature verification, in this process.
    let floor_us = {
        let jwks = world.issuer.jwks();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone())?;
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk)?;
        let mut v = jsonwebtoken::Validation::new(alg);
        v.validate_aud = false;
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let n = 5000;
        let t = Instant::now();
        for i in 0..n {
            jsonwebtoken::decode::<serde_json::Value>(&tokens[i % tokens.len()], &key, &v)?;
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let mut rpc_floor: Option<Row> = None;
    let mut rpc_floor_paced: Option<Row> = None;
    // (exchange, health check) rows, run one after the other, at each rate.
    let mut paired: Vec<(Row, Row)> = Vec::new();
    let mut rates: Vec<f64> = Vec::new();
    // The closed-loop rate at concurrency 64 that the paced rates are shares of.
    let mut closed_loop: Option<f64> = None;
    for cache in [true, false] {
        // `--pairs` runs with the cache on only.
        let wanted = if cache {
            only != 2
        } else {
            only != 1 && pairs == 0
        };
        if !wanted {
            continue;
        }
        let setting = if cache {
            "verify_cache = \"5m\""
        } else {
            "verify_cache = \"0s\""
        };
        std::fs::write(
            world.broker_config(),
            config.replacen("leeway = \"5s\"", &format!("leeway = \"5s\"\n{setting}"), 1),
        )?;
        let broker = world.start_broker(if cache {
            "broker-cache.log"
        } else {
            "broker-nocache.log"
        })?;
        let target = Target {
            port,
            ca: &ca,
            dur: Duration::from_secs(seconds),
            pid: broker.child.id(),
            login,
        };
        let (identities, concurrencies): (&[usize], &[usize]) = if paced_only {
            (&[1], &[64])
        } else {
            (&[1, 1000], &[1, 16, 64, 256])
        };
        for &identities in identities {
            for &concurrency in concurrencies {
                eprintln!("  cache {cache}, concurrency {concurrency}, {identities} identities…");
                let row =
                    rt.block_on(target.run(&tokens[..identities], concurrency, None, false))?;
                rows.push(Row {
                    cache,
                    concurrency,
                    identities,
                    ..row
                });
            }
        }
        // 64 paced callers offering a quarter and a half of the closed-loop
        // throughput: latency with headroom (a call behind schedule counts
        // its wait; see `run`).
        let saturated = rows
            .iter()
            .find(|r| r.cache == cache && r.concurrency == 64 && r.identities == 1)
            .map_or(1000.0, |r| r.per_second);
        if pairs > 0 {
            closed_loop = Some(saturated);
            rates = if sweep {
                SWEEP_SHARES
                    .iter()
                    .map(|s| (saturated * s).round())
                    .collect()
            } else {
                vec![flag("--rate", (saturated * 0.25).round() as u64) as f64]
            };
            for i in 1..=pairs {
                for &rate in &rates {
                    eprintln!(
                        "  round {i}/{pairs}: 64 paced callers, {rate}/s, Fetch then health check…"
                    );
                    let exchange = rt.block_on(target.run(&tokens[..1], 64, Some(rate), false))?;
                    let floor = rt.block_on(target.run(&tokens[..1], 64, Some(rate), true))?;
                    paired.push((exchange, floor));
                }
            }
            drop(broker);
            continue;
        }
        for share in [0.25, 0.5] {
            let rate = (saturated * share).round();
            eprintln!("  cache {cache}, 64 paced callers offering {rate}/s…");
            let row = rt.block_on(target.run(&tokens[..1], 64, Some(rate), false))?;
            rows.push(Row {
                cache,
                concurrency: 64,
                identities: 1,
                ..row
            });
        }
        // The floor of any call: a gRPC health check (no token, no
        // database) over the same TLS connections, 64 callers.
        if cache {
            eprintln!("  the floor: grpc.health.v1 Check, concurrency 64…");
            let row = rt.block_on(target.run(&tokens[..1], 64, None, true))?;
            rpc_floor = Some(row);
            // The latency floor of the paced rows: the same 64 paced
            // callers at the quarter rate, sending health checks. What the
            // transport, the two processes' wake-ups on two vCPUs and the
            // load generator's timers add to any call.
            let rate = (saturated * 0.25).round();
            eprintln!("  the floor: 64 paced callers sending health checks, {rate}/s…");
            let row = rt.block_on(target.run(&tokens[..1], 64, Some(rate), true))?;
            rpc_floor_paced = Some(row);
        }
        drop(broker);
    }

    println!(
        "broker exchange ({} over TLS, {alg_name} tokens; release build, 2 vCPU incl. load generator, {seconds}s per row)",
        if login { "Login + Fetch" } else { "Fetch" }
    );
    println!(
        "{:>12} {:>11} {:>10} {:>12} {:>15} {:>10} {:>10} {:>20}",
        "verify cache",
        "concurrency",
        "identities",
        "exchanges/s",
        "per-second min–max",
        "p50",
        "p99",
        "broker CPU/exchange"
    );
    for r in rows.iter().filter(|r| r.offered.is_none()) {
        println!(
            "{:>12} {:>11} {:>10} {:>12.0} {:>15} {:>7.0} µs {:>7.0} µs {:>16.0} µs",
            if r.cache { "on" } else { "off" },
            r.concurrency,
            r.identities,
            r.per_second,
            format!("{:.0}–{:.0}", r.spread.0, r.spread.1),
            r.p50_us,
            r.p99_us,
            r.cpu_us_per_exchange
        );
    }
    let paced: Vec<&Row> = rows.iter().filter(|r| r.offered.is_some()).collect();
    if !paced.is_empty() {
        println!(
            "64 paced callers (latency from the scheduled time when behind it, else from the timer firing):"
        );
        println!(
            "{:>12} {:>12} {:>12} {:>10} {:>10} {:>20}",
            "verify cache", "offered/s", "served/s", "p50", "p99", "broker CPU/exchange"
        );
    }
    for r in paced {
        println!(
            "{:>12} {:>12.0} {:>12.0} {:>7.0} µs {:>7.0} µs {:>16.0} µs",
            if r.cache { "on" } else { "off" },
            r.offered.unwrap_or_default(),
            r.per_second,
            r.p50_us,
            r.p99_us,
            r.cpu_us_per_exchange
        );
    }
    if !sweep {
        for &rate in &rates {
            print_pairs(&at_rate(&paired, rate));
        }
    }
    let sweep_rows: Vec<SweepRow> = rates
        .iter()
        .map(|&rate| SweepRow::of(&at_rate(&paired, rate)))
        .collect();
    if sweep {
        print_sweep(&sweep_rows, closed_loop);
    }
    println!(
        "{alg_name} verification alone (jsonwebtoken, aws-lc-rs, this process): {floor_us:.1} µs"
    );
    let rpc_floor_us = rpc_floor.as_ref().map(|r| r.cpu_us_per_exchange);
    if let Some(r) = &rpc_floor {
        println!(
            "gRPC health check over TLS at concurrency 64 (no token, no database): {:.0} calls/s, broker CPU {:.1} µs per call",
            r.per_second, r.cpu_us_per_exchange
        );
    }
    if let Some(r) = &rpc_floor_paced {
        println!(
            "the same, 64 paced callers offering {:.0}/s: p50 {:.0} µs, p99 {:.0} µs",
            r.offered.unwrap_or_default(),
            r.p50_us,
            r.p99_us
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "broker_exchange",
            "algorithm": alg_name,
            "exchange": if login { "login+fetch" } else { "fetch" },
            "verify_us": floor_us,
            "rpc_floor_us": rpc_floor_us,
            "rpc_floor_per_second": rpc_floor.as_ref().map(|r| r.per_second),
            "rpc_floor_paced": rpc_floor_paced.as_ref().map(|r| serde_json::json!({
                "offered_per_second": r.offered, "p50_us": r.p50_us, "p99_us": r.p99_us,
            })),
            "sweep": sweep.then(|| serde_json::json!({
                "rounds": pairs,
                "closed_loop_per_second": closed_loop,
                "target_p99_us": P99_TARGET_US,
                "max_rate_under_target_every_round": SweepRow::highest(&sweep_rows, |r| r.fetch_p99.2),
                "max_rate_under_target_median": SweepRow::highest(&sweep_rows, |r| r.fetch_p99.0),
                "max_rate_under_target_all_rounds": SweepRow::highest(&sweep_rows, |r| r.pooled_p99),
                "rates": sweep_rows.iter().map(SweepRow::json).collect::<Vec<_>>(),
            })),
            "pairs": paired.iter().map(|(e, f)| serde_json::json!({
                "offered_per_second": e.offered,
                "exchange": { "per_second": e.per_second, "p50_us": e.p50_us, "p99_us": e.p99_us,
                              "broker_cpu_us_per_exchange": e.cpu_us_per_exchange },
                "health_check": { "per_second": f.per_second, "p50_us": f.p50_us, "p99_us": f.p99_us },
                "p99_over_floor_us": e.p99_us - f.p99_us,
            })).collect::<Vec<_>>(),
            "rows": rows.iter().map(|r| serde_json::json!({
                "verify_cache": r.cache, "offered_per_second": r.offered,
                "concurrency": r.concurrency, "identities": r.identities, "per_second": r.per_second,
                "per_second_min": r.spread.0, "per_second_max": r.spread.1,
                "p50_us": r.p50_us, "p99_us": r.p99_us, "broker_cpu_us_per_exchange": r.cpu_us_per_exchange,
                "cdf_us": r.cdf_us,
                "cpu_per_10000_exchanges_s": r.cpu_us_per_exchange * 10_000.0 / 1e6,
                "ratio_to_verify_floor": r.cpu_us_per_exchange / floor_us,
                "ratio_to_rpc_floor": rpc_floor_us.map(|f| r.cpu_us_per_exchange / f),
            })).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

/// The pairs run at `rate`.
fn at_rate(paired: &[(Row, Row)], rate: f64) -> Vec<&(Row, Row)> {
    paired
        .iter()
        .filter(|(e, _)| e.offered == Some(rate))
        .collect()
}

/// (median, least, most) of `values`.
fn spread_of(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    (
        percentile(&v, 0.5),
        percentile(&v, 0.0),
        percentile(&v, 1.0),
    )
}

/// One offered rate of `--sweep`, over its rounds.
struct SweepRow {
    offered: f64,
    served: f64,
    fetch_p50: f64,
    /// (median, least, most) over the rounds.
    fetch_p99: (f64, f64, f64),
    /// Over every round's calls together.
    pooled_p99: f64,
    health_p99: (f64, f64, f64),
    cpu_us: f64,
    under_target: usize,
    rounds: usize,
}

impl SweepRow {
    fn of(pairs: &[&(Row, Row)]) -> SweepRow {
        let median = |f: fn(&Row) -> f64, health: bool| {
            spread_of(pairs.iter().map(|(e, h)| if health { f(h) } else { f(e) }))
        };
        SweepRow {
            offered: pairs[0].0.offered.unwrap_or_default(),
            served: median(|r| r.per_second, false).0,
            fetch_p50: median(|r| r.p50_us, false).0,
            fetch_p99: median(|r| r.p99_us, false),
            pooled_p99: {
                let mut all: Vec<f64> = pairs
                    .iter()
                    .flat_map(|(e, _)| e.lat.iter().copied())
                    .collect();
                all.sort_by(f64::total_cmp);
                percentile(&all, 0.99)
            },
            health_p99: median(|r| r.p99_us, true),
            cpu_us: median(|r| r.cpu_us_per_exchange, false).0,
            under_target: pairs
                .iter()
                .filter(|(e, _)| e.p99_us < P99_TARGET_US)
                .count(),
            rounds: pairs.len(),
        }
    }

    /// The highest offered rate at which `p99` (a figure of the row) and
    /// that of every lower rate were under the target.
    fn highest(rows: &[SweepRow], p99: fn(&SweepRow) -> f64) -> Option<f64> {
        rows.iter()
            .take_while(|r| p99(r) < P99_TARGET_US)
            .last()
            .map(|r| r.offered)
    }

    fn json(&self) -> serde_json::Value {
        let s = |(median, least, most): (f64, f64, f64)| serde_json::json!({ "median": median, "least": least, "most": most });
        serde_json::json!({
            "offered_per_second": self.offered,
            "served_per_second": self.served,
            "fetch_p50_us": self.fetch_p50,
            "fetch_p99_us": s(self.fetch_p99),
            "fetch_p99_all_rounds_us": self.pooled_p99,
            "health_p99_us": s(self.health_p99),
            "broker_cpu_us_per_exchange": self.cpu_us,
            "rounds_under_target": self.under_target,
            "rounds": self.rounds,
        })
    }
}

/// The p99 by offered rate, and the highest rate that met the target.
fn print_sweep(rows: &[SweepRow], saturated: Option<f64>) {
    let share =
        |rate: f64| saturated.map_or(String::new(), |s| format!("{:.0} %", rate / s * 100.0));
    println!(
        "p99 at concurrency 64 by offered rate (64 paced callers, cache on; median of the rounds, least–most):"
    );
    println!(
        "{:>10} {:>9} {:>10} {:>10} {:>22} {:>14} {:>20} {:>16} {:>11}",
        "offered/s",
        "share",
        "served/s",
        "Fetch p50",
        "Fetch p99",
        "p99 all rounds",
        "health p99",
        "broker CPU/call",
        "under 2 ms"
    );
    let ms =
        |(m, l, h): (f64, f64, f64)| format!("{:.2} ({:.2}–{:.2}) ms", m / 1e3, l / 1e3, h / 1e3);
    for r in rows {
        println!(
            "{:>10.0} {:>9} {:>10.0} {:>7.0} µs {:>22} {:>11.2} ms {:>20} {:>13.0} µs {:>11}",
            r.offered,
            share(r.offered),
            r.served,
            r.fetch_p50,
            ms(r.fetch_p99),
            r.pooled_p99 / 1e3,
            ms(r.health_p99),
            r.cpu_us,
            format!("{} of {}", r.under_target, r.rounds)
        );
    }
    for (label, p99) in [
        (
            "in every round",
            (|r: &SweepRow| r.fetch_p99.2) as fn(&SweepRow) -> f64,
        ),
        ("in the median round", |r: &SweepRow| r.fetch_p99.0),
        ("over all rounds' calls", |r: &SweepRow| r.pooled_p99),
    ] {
        match SweepRow::highest(rows, p99) {
            Some(rate) => println!(
                "highest offered rate with the Fetch p99 under 2 ms {label} (and at every lower rate): {rate:.0}/s ({})",
                share(rate)
            ),
            None => println!("the Fetch p99 was over 2 ms {label} at the lowest rate offered"),
        }
    }
}

/// Each pair's figures, then the median, least and most of each column.
fn print_pairs(paired: &[&(Row, Row)]) {
    println!(
        "paired, 64 paced callers offering {:.0}/s: Fetch, then health checks, in turn (cache on):",
        paired[0].0.offered.unwrap_or_default()
    );
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>14} {:>14} {:>14} {:>18}",
        "pair",
        "served/s",
        "Fetch p50",
        "Fetch p99",
        "broker CPU/call",
        "health p50",
        "health p99",
        "Fetch p99 − health"
    );
    let cols = |e: &Row, f: &Row| {
        [
            e.per_second,
            e.p50_us,
            e.p99_us,
            e.cpu_us_per_exchange,
            f.p50_us,
            f.p99_us,
            e.p99_us - f.p99_us,
        ]
    };
    let line = |label: &str, c: [f64; 7]| {
        println!(
            "{label:>6} {:>12.0} {:>9.0} µs {:>9.0} µs {:>11.0} µs {:>11.0} µs {:>11.0} µs {:>15.0} µs",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6]
        );
    };
    let all: Vec<[f64; 7]> = paired.iter().map(|(e, f)| cols(e, f)).collect();
    for (i, c) in all.iter().enumerate() {
        line(&(i + 1).to_string(), *c);
    }
    let column = |k: usize| {
        let mut v: Vec<f64> = all.iter().map(|c| c[k]).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    for (label, p) in [("median", 0.5), ("least", 0.0), ("most", 1.0)] {
        line(label, std::array::from_fn(|k| percentile(&column(k), p)));
    }
}

/// The broker under test: where it listens, its CA, how long a row runs,
/// the process whose CPU is counted, and whether an exchange logs in first.
struct Target<'a> {
    port: u16,
    ca: &'a [u8],
    dur: Duration,
    pid: u32,
    login: bool,
}

impl Target<'_> {
    /// One row: `concurrency` callers for `dur`, closed loop or paced at `rate`,
    /// sending `Fetch`es, or health checks when `floor`.
    async fn run(
        &self,
        tokens: &[String],
        concurrency: usize,
        rate: Option<f64>,
        floor: bool,
    ) -> Result<Row> {
        let Target {
            port,
            ca,
            dur,
            pid,
            login,
        } = *self;
        let channels = broker_channels(port, ca, concurrency.clamp(1, 4)).await?;
        let tokens: Arc<Vec<String>> = Arc::new(tokens.to_vec());
        // Warm up: TLS, keys, cache.
        for (i, t) in tokens.iter().take(50).enumerate() {
            exchange(&channels[i % channels.len()], t, login).await?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        // Completions per whole second of the run, for its spread.
        let seconds: Arc<Vec<AtomicU64>> =
            Arc::new((0..dur.as_secs() + 2).map(|_| AtomicU64::new(0)).collect());
        let cpu0 = cpu_seconds(pid);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..concurrency {
            let (ch, tokens, stop, seconds) = (
                channels[c % channels.len()].clone(),
                tokens.clone(),
                stop.clone(),
                seconds.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = c;
                // Paced: this caller's k-th call is due at start + (k + c/n) * n/rate.
                let period = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
                let mut due = period.map(|p| start + p.mul_f64(c as f64 / concurrency as f64));
                while !stop.load(Ordering::Relaxed) {
                    // A paced call's latency runs from its scheduled time when
                    // the caller is behind schedule (the last call came back
                    // late: that wait is the broker's), else from when the
                    // caller's timer fired (tokio's timer fires up to ~2 ms after
                    // the deadline, the load generator's slack, not the broker's).
                    let t = match (due.as_mut(), period) {
                        (Some(at), Some(p)) => {
                            let scheduled = *at;
                            *at += p;
                            if Instant::now() >= scheduled {
                                scheduled
                            } else {
                                tokio::time::sleep_until(tokio::time::Instant::from_std(scheduled))
                                    .await;
                                Instant::now()
                            }
                        }
                        _ => Instant::now(),
                    };
                    let done = if floor {
                        health_check(&ch).await
                    } else {
                        exchange(&ch, &tokens[i % tokens.len()], login).await
                    };
                    if done.is_ok() {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                        let second = start.elapsed().as_secs() as usize;
                        if let Some(n) = seconds.get(second) {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += concurrency;
                }
                lat
            }));
        }
        tokio::time::sleep(dur).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_used = cpu_seconds(pid) - cpu0;
        lat.sort_by(f64::total_cmp);
        let n = lat.len().max(1);
        let whole: Vec<f64> = seconds[..dur.as_secs() as usize]
            .iter()
            .map(|c| c.load(Ordering::Relaxed) as f64)
            .collect();
        let spread = (
            whole.iter().copied().fold(f64::INFINITY, f64::min),
            whole.iter().copied().fold(0.0, f64::max),
        );
        Ok(Row {
            cache: true,
            concurrency,
            identities: tokens.len(),
            per_second: n as f64 / elapsed,
            p50_us: percentile(&lat, 0.5),
            p99_us: percentile(&lat, 0.99),
            cpu_us_per_exchange: cpu_used * 1e6 / n as f64,
            spread,
            cdf_us: cdf(&lat),
            offered: rate,
            lat,
        })
    }
}

async fn health_check(ch: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// `msg` with `token` as its bearer.
fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    req
}

/// One exchange: a `Fetch`, after a `Login` with the same token when `login`.
async fn exchange(
    ch: &tonic::transport::Channel,
    token: &str,
    login: bool,
) -> Result<(), tonic::Status> {
    let mut client = pb::broker_client::BrokerClient::new(ch.clone());
    if login {
        client
            .login(bearer(
                pb::LoginRequest {
                    role: String::new(),
                },
                token,
            ))
            .await?;
    }
    client
        .fetch(bearer(
            pb::FetchRequest {
                role: String::new(),
                names: vec!["bench/s".into()],
                ttl_seconds: 0,
            },
            token,
        ))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(offered: f64, median: f64, most: f64) -> SweepRow {
        SweepRow {
            offered,
            served: offered,
            fetch_p50: 500.0,
            fetch_p99: (median, median, most),
            pooled_p99: median,
            health_p99: (800.0, 800.0, 800.0),
            cpu_us: 100.0,
            under_target: 0,
            rounds: 1,
        }
    }

    #[test]
    fn the_highest_rate_under_target_stops_at_the_first_rate_over_it() {
        let rows = [
            row(1000.0, 1200.0, 1500.0),
            row(2000.0, 1600.0, 2100.0),
            row(3000.0, 2500.0, 2600.0),
            // Under again at a higher rate: noise, not headroom.
            row(4000.0, 1900.0, 1950.0),
        ];
        assert_eq!(SweepRow::highest(&rows, |r| r.fetch_p99.2), Some(1000.0));
        assert_eq!(SweepRow::highest(&rows, |r| r.fetch_p99.0), Some(2000.0));
        assert_eq!(SweepRow::highest(&rows[2..], |r| r.fetch_p99.0), None);
    }
}
