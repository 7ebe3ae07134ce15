//! Every benchmark scenario in one command, against the real release
//! binaries on loopback: runs each bench binary in turn (their progress goes
//! to stderr, their tables to stdout), collects the JSON summary each prints
//! last, and writes `<out>/summary.json` (machine, commit, date, command and
//! every scenario's figures) and PNG plots of the latency distributions and
//! propagation CDFs.
//!
//!   bash scripts/bench.sh                 # builds, runs `cargo bench`, then this
//!   target/release/secrets-bench [--quick] [--out bench-results] [--only exchange,propagation]
//!   target/release/secrets-bench --replot bench-results/summary.json --out bench-results
//!
//! Scenarios: exchange, exchange-login (each exchange a `Login` then a
//! `Fetch`, verification cache on), sweep (the exchange's p99 at concurrency 64 by
//! offered rate), watch, sidecar, propagation, vault (needs
//! SECRETS_BROKER_BAO), aws (needs SECRETS_BROKER_MOTO); `bash scripts/test.sh`
//! installs OpenBao and moto and `scripts/bench.sh` exports both. A scenario
//! whose server is missing is reported as skipped. `--quick` shortens every
//! run (for a smoke check, not for figures). Plots need a TrueType font
//! (DejaVu Sans, Debian's fonts-dejavu-core; or SECRETS_BENCH_FONT=path).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::{Value, json};

struct Scenario {
    name: &'static str,
    bin: &'static str,
    args: Vec<&'static str>,
    /// An environment variable that must be set for the scenario to run.
    needs: Option<&'static str>,
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let pick = |full: Vec<&'static str>, short: Vec<&'static str>| if quick { short } else { full };
    vec![
        Scenario {
            name: "exchange",
            bin: "exchange-bench",
            args: pick(vec!["--seconds", "5"], vec!["--seconds", "1"]),
            needs: None,
        },
        Scenario {
            name: "exchange-login",
            bin: "exchange-bench",
            args: pick(
                vec!["--login", "--cache-only", "1", "--seconds", "5"],
                vec!["--login", "--cache-only", "1", "--seconds", "1"],
            ),
            needs: None,
        },
        Scenario {
            name: "sweep",
            bin: "exchange-bench",
            args: pick(
                vec!["--sweep", "--pairs", "3", "--seconds", "4"],
                vec!["--sweep", "--pairs", "1", "--seconds", "1"],
            ),
            needs: None,
        },
        Scenario {
            name: "watch-1000",
            bin: "watch-bench",
            args: pick(
                vec!["--streams", "1000"],
                vec!["--streams", "1000", "--idle-seconds", "5"],
            ),
            needs: None,
        },
        Scenario {
            name: "watch-10000",
            bin: "watch-bench",
            args: pick(
                vec!["--streams", "10000"],
                vec!["--streams", "2000", "--idle-seconds", "5"],
            ),
            needs: None,
        },
        Scenario {
            name: "sidecar",
            bin: "sidecar-bench",
            args: pick(
                vec!["--idle-seconds", "30", "--gets", "20000"],
                vec!["--idle-seconds", "5", "--gets", "2000"],
            ),
            needs: None,
        },
        Scenario {
            name: "exec",
            bin: "exec-bench",
            args: pick(
                vec!["--starts", "20", "--rotations", "100"],
                vec!["--starts", "3", "--rotations", "5"],
            ),
            needs: None,
        },
        Scenario {
            name: "propagation",
            bin: "propagation-bench",
            args: pick(
                vec![
                    "--sidecars",
                    "50",
                    "--rotations",
                    "20",
                    "--revocations",
                    "100",
                ],
                vec![
                    "--sidecars",
                    "50",
                    "--rotations",
                    "3",
                    "--revocations",
                    "10",
                ],
            ),
            needs: None,
        },
        Scenario {
            name: "vault",
            bin: "vault-bench",
            args: pick(
                vec!["--sidecars", "20", "--rounds", "30", "--poll-ms", "500"],
                vec![
                    "--sidecars",
                    "5",
                    "--rounds",
                    "3",
                    "--poll-ms",
                    "500",
                    "--load-seconds",
                    "2",
                ],
            ),
            needs: Some("SECRETS_BROKER_BAO"),
        },
        Scenario {
            name: "aws",
            bin: "aws-bench",
            args: pick(
                vec!["--sidecars", "10", "--rounds", "20", "--poll-ms", "500"],
                vec![
                    "--sidecars",
                    "3",
                    "--rounds",
                    "3",
                    "--poll-ms",
                    "500",
                    "--load-seconds",
                    "2",
                    "--refreshes",
                    "1",
                ],
            ),
            needs: Some("SECRETS_BROKER_MOTO"),
        },
    ]
}

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let out = PathBuf::from(arg_value("--out").unwrap_or_else(|| "bench-results".into()));
    let only: Option<Vec<String>> =
        arg_value("--only").map(|s| s.split(',').map(str::to_owned).collect());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let dir = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_owned();

    // Draws the plots again from a saved summary, running nothing.
    if let Some(saved) = arg_value("--replot") {
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(&saved).with_context(|| format!("reading {saved}"))?,
        )
        .with_context(|| format!("{saved} is not a summary"))?;
        for f in plots(&out, &report)? {
            eprintln!("wrote {}", f.display());
        }
        return Ok(());
    }
    let all = scenarios(quick);
    if let Some(only) = &only
        && let Some(bad) = only
            .iter()
            .find(|o| !all.iter().any(|s| s.name.starts_with(o.as_str())))
    {
        bail!(
            "--only: no scenario {bad:?} (there are: {})",
            all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    }
    let chosen: Vec<&Scenario> = all
        .iter()
        .filter(|s| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|o| s.name.starts_with(o.as_str())))
        })
        .collect();

    let mut results = serde_json::Map::new();
    let total = chosen.len();
    for (i, s) in chosen.into_iter().enumerate() {
        if let Some(var) = s.needs
            && std::env::var_os(var).is_none()
        {
            eprintln!(
                "[{}/{total}] {}: skipped ({var} is not set; `bash scripts/bench.sh` sets it)",
                i + 1,
                s.name
            );
            results.insert(
                s.name.into(),
                json!({ "skipped": format!("{var} not set") }),
            );
            continue;
        }
        eprintln!(
            "[{}/{total}] {}: {} {}",
            i + 1,
            s.name,
            s.bin,
            s.args.join(" ")
        );
        let start = Instant::now();
        let summary =
            run(&dir.join(s.bin), &s.args).with_context(|| format!("scenario {}", s.name))?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!("[{}/{total}] {}: done in {secs:.0}s", i + 1, s.name);
        results.insert(
            s.name.into(),
            json!({ "command": format!("target/release/{} {}", s.bin, s.args.join(" ")),
                    "wall_seconds": secs, "summary": summary }),
        );
    }

    let report = json!({
        "machine": machine(),
        "commit": commit(),
        "date": command_text("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "quick": quick,
        "scenarios": results,
    });
    let path = out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", path.display());
    match plots(&out, &report) {
        Ok(files) => {
            for f in files {
                eprintln!("wrote {}", f.display());
            }
        }
        Err(e) => eprintln!("no plots: {e:#}"),
    }
    Ok(())
}

/// Runs one bench binary; its stdout is shown and its last JSON line returned.
fn run(bin: &Path, args: &[&str]) -> Result<Value> {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (build it: cargo build --release --workspace --bins)",
                bin.display()
            )
        })?;
    let mut last = None;
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        if line.starts_with('{')
            && let Ok(v) = serde_json::from_str::<Value>(&line)
        {
            last = Some(v);
        } else {
            println!("{line}");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", bin.display());
    }
    last.context("the benchmark printed no JSON summary")
}

fn command_text(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok());
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_gib": mem_kib.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "rustc": command_text("rustc", &["-V"]),
    })
}

fn commit() -> Value {
    let dirty = command_text("git", &["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.is_empty());
    json!({ "id": command_text("git", &["rev-parse", "HEAD"]), "dirty": dirty })
}

/// `[[x, fraction], …]` from a bench's `cdf` field.
fn points(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn load_font() -> Result<()> {
    let path = std::env::var("SECRETS_BENCH_FONT")
        .unwrap_or_else(|_| "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    let bytes = std::fs::read(&path).with_context(|| {
        format!("font {path} (install fonts-dejavu-core, or set SECRETS_BENCH_FONT)")
    })?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// A legend entry: a short line in the series' colour and width.
fn legend_line(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// A CDF plot: one line per series, x on a log scale when `log_x`.
fn cdf_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> Result<()> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (mut lo, mut hi) = xs.fold((f64::INFINITY, 0f64), |(l, h), x| (l.min(x), h.max(x)));
    if !lo.is_finite() {
        bail!("no samples for {title}");
    }
    lo = lo.max(1e-3);
    hi = hi.max(lo * 1.01);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc("fraction of samples")
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(legend_line(color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if log_x {
        draw!(builder.build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1f64)?);
    } else {
        draw!(builder.build_cartesian_2d(0f64..hi * 1.05, 0f64..1f64)?);
    }
    root.present()?;
    Ok(())
}

/// Exchanges per second by concurrency, one line per cache × identities.
fn throughput_plot(path: &Path, rows: &[Value]) -> Result<()> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for cache in [true, false] {
        for ids in [1u64, 1000] {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| {
                    r["verify_cache"].as_bool() == Some(cache)
                        && r["identities"].as_u64() == Some(ids)
                        && r["offered_per_second"].is_null()
                })
                .filter_map(|r| Some((r["concurrency"].as_f64()?, r["per_second"].as_f64()?)))
                .collect();
            if !pts.is_empty() {
                series.push((
                    format!(
                        "cache {}, {ids} identities",
                        if cache { "on" } else { "off" }
                    ),
                    pts,
                ));
            }
        }
    }
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0f64, f64::max);
    if top == 0.0 {
        bail!("no exchange rows");
    }
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Broker exchanges per second (Fetch over TLS)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8f64..320f64).log_scale(), 0f64..top * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("concurrent calls")
        .y_desc("exchanges/s")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(legend_line(color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The exchange's p99 at concurrency 64 by offered rate (`exchange-bench
/// --sweep`): the median round with the least and most as a bar, the
/// health checks' p99 at the same rates (the transport's floor), and the
/// 2 ms target.
fn sweep_plot(path: &Path, sweep: &Value) -> Result<()> {
    let rates = sweep["rates"].as_array().context("sweep without rates")?;
    let figure = |r: &Value, key: &str, which: &str| -> Option<(f64, f64)> {
        Some((
            r["offered_per_second"].as_f64()?,
            r[key][which].as_f64()? / 1e3,
        ))
    };
    let fetch: Vec<(f64, f64)> = rates
        .iter()
        .filter_map(|r| figure(r, "fetch_p99_us", "median"))
        .collect();
    let pooled: Vec<(f64, f64)> = rates
        .iter()
        .filter_map(|r| {
            Some((
                r["offered_per_second"].as_f64()?,
                r["fetch_p99_all_rounds_us"].as_f64()? / 1e3,
            ))
        })
        .collect();
    let health: Vec<(f64, f64)> = rates
        .iter()
        .filter_map(|r| figure(r, "health_p99_us", "median"))
        .collect();
    let bars: Vec<(f64, f64, f64)> = rates
        .iter()
        .filter_map(|r| {
            let (x, lo) = figure(r, "fetch_p99_us", "least")?;
            Some((x, lo, figure(r, "fetch_p99_us", "most")?.1))
        })
        .collect();
    let target = sweep["target_p99_us"].as_f64().unwrap_or(2000.0) / 1e3;
    let x_top = fetch.iter().map(|p| p.0).fold(0f64, f64::max);
    let y_top = bars
        .iter()
        .map(|b| b.2)
        .fold(target, f64::max)
        .min(target * 5.0);
    if fetch.is_empty() {
        bail!("an empty sweep");
    }
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Exchange p99 at concurrency 64 by offered rate (64 paced callers)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_top * 1.08, 0f64..y_top * 1.1)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("offered Fetch calls per second")
        .y_desc("p99 latency (ms)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let (blue, grey, red) = (COLORS[0], RGBColor(120, 120, 120), COLORS[3]);
    chart.draw_series(bars.iter().map(|&(x, lo, hi)| {
        PathElement::new(
            vec![(x, lo.min(y_top * 1.1)), (x, hi.min(y_top * 1.1))],
            blue,
        )
    }))?;
    chart
        .draw_series(LineSeries::new(fetch.iter().copied(), blue.stroke_width(2)))?
        .label("Fetch p99 (median round; bar: least–most)")
        .legend(legend_line(blue.stroke_width(2)));
    chart.draw_series(fetch.iter().map(|&p| Circle::new(p, 4, blue.filled())))?;
    let green = COLORS[2];
    chart
        .draw_series(LineSeries::new(
            pooled.iter().copied(),
            green.stroke_width(2),
        ))?
        .label("Fetch p99 over all rounds' calls together")
        .legend(legend_line(green.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            health.iter().copied(),
            grey.stroke_width(2),
        ))?
        .label("gRPC health check p99 at the same rate (floor)")
        .legend(legend_line(grey.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            [(0.0, target), (x_top * 1.08, target)],
            red.stroke_width(1),
        ))?
        .label("target: 2 ms")
        .legend(legend_line(red.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plots(out: &Path, report: &Value) -> Result<Vec<PathBuf>> {
    load_font()?;
    let s = &report["scenarios"];
    let mut written = Vec::new();
    let ex = &s["exchange"]["summary"]["rows"];
    if let Some(rows) = ex.as_array() {
        for c in [1u64, 64] {
            let series: Vec<(String, Vec<(f64, f64)>)> = rows
                .iter()
                .filter(|r| r["concurrency"].as_u64() == Some(c))
                .map(|r| {
                    let cache = if r["verify_cache"].as_bool() == Some(true) {
                        "on"
                    } else {
                        "off"
                    };
                    let label = match r["offered_per_second"].as_f64() {
                        Some(rate) => format!("cache {cache}, paced at {rate:.0}/s"),
                        None => format!("cache {cache}, {} identities", r["identities"]),
                    };
                    (label, points(&r["cdf_us"]))
                })
                .collect();
            let path = out.join(format!("exchange-latency-c{c}.png"));
            cdf_plot(
                &path,
                &format!("Exchange latency at concurrency {c} (Fetch over TLS)"),
                "latency (µs, log scale)",
                &series,
                true,
            )?;
            written.push(path);
        }
        let path = out.join("exchange-throughput.png");
        throughput_plot(&path, rows)?;
        written.push(path);
    }
    let sweep = &s["sweep"]["summary"]["sweep"];
    if sweep.is_object() {
        let path = out.join("exchange-p99-by-rate.png");
        sweep_plot(&path, sweep)?;
        written.push(path);
    }
    let p = &s["propagation"]["summary"];
    if p.is_object() {
        let path = out.join("propagation.png");
        cdf_plot(
            &path,
            &format!(
                "Propagation to {} sidecars over 2 replicas (PostgreSQL)",
                p["sidecars"]
            ),
            "admin call → file on disk changed or gone (ms)",
            &[
                (
                    "rotation (every sidecar)".into(),
                    points(&p["rotation"]["cdf_ms"]),
                ),
                (
                    "revocation (one pod)".into(),
                    points(&p["revocation"]["cdf_ms"]),
                ),
            ],
            false,
        )?;
        written.push(path);
    }
    let backends: Vec<(String, Vec<(f64, f64)>)> = [
        ("vault", "OpenBao KV v2 write"),
        ("aws", "Secrets Manager PutSecretValue"),
    ]
    .iter()
    .filter(|(k, _)| s[*k]["summary"].is_object())
    .map(|(k, label)| {
        (
            (*label).to_owned(),
            points(&s[*k]["summary"]["rotation_cdf_ms"]),
        )
    })
    .collect();
    if !backends.is_empty() {
        let path = out.join("backend-rotation.png");
        cdf_plot(
            &path,
            "Upstream write → new file on disk (broker polls every 500 ms)",
            "ms",
            &backends,
            false,
        )?;
        written.push(path);
    }
    let get = &s["sidecar"]["summary"]["local_get_us"]["cdf"];
    if get.is_array() {
        let path = out.join("sidecar-get.png");
        cdf_plot(
            &path,
            "Local Get over the sidecar's Unix socket",
            "latency (µs, log scale)",
            &[("Get".into(), points(get))],
            true,
        )?;
        written.push(path);
    }
    Ok(written)
}
