//! `secrets-sidecar`: thin main over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Keeps a pod's short-lived secrets fresh on a memory-only filesystem.
#[derive(Parser)]
#[command(name = "secrets-sidecar", version, about)]
struct Cli {
    /// Log format: `text` (default) or `json`.
    #[arg(long, global = true, env = "SECRETS_SIDECAR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Keep secrets fresh until SIGTERM/SIGINT; removes them on exit.
    Run {
        /// The sidecar config file (TOML; see examples/sidecar.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Fetch and write once, then exit (init containers, CI jobs).
    Once {
        #[arg(long)]
        config: PathBuf,
        /// Give up after this long (e.g. `30s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if cli.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    if let Err(e) = secrets_sidecar::hardening::disable_core_dumps() {
        tracing::warn!(error = %e, "cannot disable core dumps");
    }
    let config_path = match &cli.command {
        Command::Run { config } | Command::Once { config, .. } => config.clone(),
    };
    let config = match secrets_sidecar::config::Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { .. } => secrets_sidecar::run(config, shutdown_signal()).await,
            Command::Once { timeout, .. } => secrets_sidecar::once(config, timeout).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
