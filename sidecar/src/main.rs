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
        /// The sidecar config file (TOML; see examples/sidecar.toml). Without
        /// it, the whole config is read from the environment variable
        /// SECRETS_SIDECAR_CONFIG (how the injection webhook configures a
        /// sidecar, with the broker's CA inline as `ca_pem`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print one secret's value from a running sidecar's local API (the
    /// example client; apps can do the same with any gRPC library).
    Get {
        /// The sidecar's `local_api.socket`.
        #[arg(long)]
        socket: PathBuf,
        name: String,
    },
    /// List the secrets a running sidecar serves (names, versions, lease ends).
    List {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Follow a running sidecar's secrets: one line per new version or removal.
    Watch {
        #[arg(long)]
        socket: PathBuf,
        /// Names to watch; all configured ones when none is given.
        names: Vec<String>,
    },
    /// Fetch and write once, then exit (init containers, CI jobs).
    Once {
        /// The config file; without it, the environment variable
        /// SECRETS_SIDECAR_CONFIG holds the whole config (as for `run`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Give up after this long (e.g. `30s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run CMD with secrets as environment variables, restarted or
    /// signalled when they rotate.
    ///
    /// CMD gets the `[[env]]` entries and starts once every secret is held;
    /// the secrets are kept fresh as `run` does, and `on_change` says what a
    /// rotation does to CMD. As PID 1 (an image's ENTRYPOINT) exec forwards
    /// SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to CMD, reaps
    /// zombies, and exits with CMD's status (128 + the signal when one
    /// killed it).
    Exec {
        /// The config file; without it, the environment variable
        /// SECRETS_SIDECAR_CONFIG holds the whole config (as for `run`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long to retry the first login and fetch; then exit 1 with the
        /// reason, without starting CMD.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Copy this binary to DIR/secrets-sidecar (mode 0555): how the
    /// injector's exec mode puts it into the application's container.
    CopyTo { dir: PathBuf },
    /// Ask a running sidecar whether it is alive or ready: exit 0 when it
    /// answers 200, 1 otherwise (an `exec` probe for Kubernetes).
    ///
    /// Asks `health_listen` (on loopback; the detailed body, printed, so a
    /// failing probe's event says which secret is missing or revoked), or
    /// `probe_listen` when health_listen is "off". Exit 2 on a usage or
    /// configuration error.
    Probe {
        /// The config file; without it, the environment variable
        /// SECRETS_SIDECAR_CONFIG holds the whole config (as for `run`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Give up after this long (connect and answer).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// `live` asks /healthz, `ready` asks /readyz.
        #[arg(value_enum, default_value = "ready")]
        check: ProbeCheck,
    },
}

/// What `secrets-sidecar probe` asks.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ProbeCheck {
    /// /healthz: the process answers.
    Live,
    /// /readyz: every configured secret is on disk and none is revoked.
    Ready,
}

fn load_config(
    path: Option<&std::path::Path>,
) -> Result<secrets_sidecar::config::Config, ExitCode> {
    let loaded = match path {
        Some(path) => secrets_sidecar::config::Config::load(path),
        None => secrets_sidecar::config::Config::from_env(secrets_sidecar::config::CONFIG_ENV),
    };
    loaded.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(secrets_sidecar::log_colour())
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
        Command::Run { config } | Command::Once { config, .. } | Command::Exec { config, .. } => {
            config.clone()
        }
        Command::CopyTo { dir } => return copy_to(dir),
        Command::Probe {
            config,
            timeout,
            check,
        } => {
            return match load_config(config.as_deref()) {
                Ok(cfg) => probe(&cfg, *check, *timeout),
                Err(code) => code,
            };
        }
        Command::Get { socket, name } => return client(socket, Call::Get(name.clone())),
        Command::List { socket } => return client(socket, Call::List),
        Command::Watch { socket, names } => return client(socket, Call::Watch(names.clone())),
    };
    let config = match load_config(config_path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !config.exec.env.is_empty() && !matches!(cli.command, Command::Exec { .. }) {
        tracing::warn!(
            "the [[env]] entries are for `secrets-sidecar exec`: run and once ignore them"
        );
    }
    // One thread: exec's reaper (waitpid(-1)) then never runs while a
    // spawn is half done on another thread.
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
    if let Command::Exec {
        timeout, command, ..
    } = cli.command
    {
        let opts = secrets_sidecar::exec::ExecOptions {
            argv: command,
            first_fetch_timeout: timeout,
        };
        return match runtime.block_on(secrets_sidecar::exec::exec(config, opts)) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { .. } => secrets_sidecar::run(config, shutdown_signal()).await,
            Command::Once { timeout, .. } => secrets_sidecar::once(config, timeout).await,
            _ => Ok(()),
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

/// Copies the running binary to `dir/secrets-sidecar` (a temporary file,
/// then one rename, so a reader never runs half a binary).
fn copy_to(dir: &std::path::Path) -> ExitCode {
    use std::os::unix::fs::PermissionsExt;
    let result = (|| -> Result<PathBuf, String> {
        let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
        let dest = dir.join("secrets-sidecar");
        let tmp = dir.join(".secrets-sidecar.tmp");
        // What an interrupted copy left (mode 0555: not writable).
        let _ = std::fs::remove_file(&tmp);
        std::fs::copy(&me, &tmp)
            .map_err(|e| format!("cannot copy {} to {}: {e}", me.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
            .map_err(|e| format!("cannot chmod {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &dest)
            .map_err(|e| format!("cannot rename to {}: {e}", dest.display()))?;
        Ok(dest)
    })();
    match result {
        Ok(dest) => {
            println!("copied secrets-sidecar to {}", dest.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `secrets-sidecar probe`: one GET on the sidecar's own port; exit 0 on
/// 200, 1 on any other answer or none, 2 when there is no port to ask.
fn probe(cfg: &secrets_sidecar::config::Config, check: ProbeCheck, timeout: Duration) -> ExitCode {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    let Some(mut addr) = cfg.health_listen.or(cfg.probe_listen) else {
        eprintln!(
            "error: health_listen is \"off\" and probe_listen is unset: the sidecar has no port to ask"
        );
        return ExitCode::from(2);
    };
    // A port on every address is reached on loopback.
    if addr.ip().is_unspecified() {
        addr = SocketAddr::new(
            match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            },
            addr.port(),
        );
    }
    let path = match check {
        ProbeCheck::Live => "/healthz",
        ProbeCheck::Ready => "/readyz",
    };
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(1))
    };
    let answer = (|| -> std::io::Result<Vec<u8>> {
        let mut conn = TcpStream::connect_timeout(&addr, left())?;
        conn.set_write_timeout(Some(left()))?;
        write!(
            conn,
            "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // At most 64 KiB: a status line and a list of problems.
        while out.len() < 64 * 1024 {
            conn.set_read_timeout(Some(left()))?;
            match conn.read(&mut buf)? {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
        Ok(out)
    })();
    let text = match answer {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            println!("cannot ask the sidecar at {addr}{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code: Option<u16> = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim_end())
        .unwrap_or_default();
    match code {
        Some(200) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Some(c) => {
            println!("HTTP {c} from {addr}{path}: {body}");
            ExitCode::FAILURE
        }
        None => {
            println!("not an HTTP answer from {addr}{path}");
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

enum Call {
    Get(String),
    List,
    Watch(Vec<String>),
}

/// A client of the local API over the Unix socket.
fn client(socket: &std::path::Path, call: Call) -> ExitCode {
    use secrets_broker_proto::v1 as pb;
    use std::io::Write;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = socket.to_owned();
    let result: Result<(), String> = runtime.block_on(async move {
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://local.sidecar")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut api = pb::secrets_client::SecretsClient::new(channel);
        let status = |s: tonic::Status| format!("{}: {}", s.code(), s.message());
        match call {
            Call::Get(name) => {
                let r = api.get(pb::GetRequest { name }).await.map_err(status)?;
                let value =
                    zeroize::Zeroizing::new(r.into_inner().secret.unwrap_or_default().value);
                std::io::stdout()
                    .write_all(&value)
                    .map_err(|e| e.to_string())?;
            }
            Call::List => {
                for s in api
                    .list(pb::ListRequest {})
                    .await
                    .map_err(status)?
                    .into_inner()
                    .secrets
                {
                    println!("{}\t{}\t{}", s.name, s.version, s.expires_at_unix);
                }
            }
            Call::Watch(names) => {
                let mut stream = api
                    .watch(pb::SecretsWatchRequest { names })
                    .await
                    .map_err(status)?
                    .into_inner();
                while let Some(ev) = stream.message().await.map_err(status)? {
                    match ev.event {
                        Some(pb::secrets_watch_event::Event::Updated(s)) => {
                            println!("updated {} {}", s.name, s.version)
                        }
                        Some(pb::secrets_watch_event::Event::Removed(n)) => println!("removed {n}"),
                        None => {}
                    }
                    let _ = std::io::stdout().flush();
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
