//! `secrets-broker`: thin main over the library (flags, config, logging, runtime).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrets_broker::config::Config;

/// mimalloc instead of glibc's malloc: the exchange path allocates many small
/// short-lived buffers (h2 frames, protobuf, JSON), and glibc's free lists
/// were a sixth of the broker's CPU per exchange (`perf`, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exchanges Kubernetes workload identity for short-lived secrets.
#[derive(Parser)]
#[command(name = "secrets-broker", version, about)]
struct Cli {
    /// Log format: `text` (default) or `json`.
    #[arg(long, global = true, env = "SECRETS_BROKER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// The broker config file (TOML; see examples/broker.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a complete local system: token issuer, broker on the embedded
    /// store with a demo secret, and a sidecar writing into DIR/secrets.
    Dev {
        /// Where dev mode keeps its files.
        #[arg(long, default_value = "./dev")]
        dir: PathBuf,
        /// Broker gRPC address; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// How often the demo secret gets a new version.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        rotate_every: Duration,
        /// Lease TTL of the demo role.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
    },
    /// Verify a workload token exactly as a login would. Exit 0 and a JSON
    /// line when accepted; 1 and the reason when refused; 2 on usage or
    /// configuration errors.
    CheckToken {
        /// The broker config file whose identity and roles decide (TOML).
        #[arg(long)]
        config: PathBuf,
        /// File holding the token (e.g. a projected service-account token).
        #[arg(long)]
        token_file: PathBuf,
        /// Role to check the token against; without it, the only role that
        /// matches the token's identity.
        #[arg(long)]
        role: Option<String>,
    },
    /// Run the sidecar injection webhook: an HTTPS server for the API
    /// server's AdmissionReviews (POST /mutate) that adds the secrets sidecar
    /// to pods annotated secrets-broker.io/inject: "true".
    Inject {
        /// The injector config file (TOML; see examples/inject.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage the embedded store directly (offline, on the broker's host).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Create a new store key file (mode 0600) with one random AES-256 key.
    Keygen {
        /// Path of the key file to create; it must not exist.
        #[arg(long)]
        out: PathBuf,
        /// ID of the new key, recorded with every value it seals.
        #[arg(long, default_value = "k1")]
        key_id: String,
    },
    /// Store a new version of a secret, read from a file or standard input.
    Put {
        /// The broker config file (its database and store key).
        #[arg(long)]
        config: PathBuf,
        /// Secret name, e.g. payments/db-password.
        name: String,
        /// File holding the value; `-` (the default) reads standard input.
        #[arg(long, default_value = "-")]
        value_file: PathBuf,
    },
    /// List secrets and their latest versions (names only, never values).
    List {
        /// The broker config file (its database and store key).
        #[arg(long)]
        config: PathBuf,
    },
}

impl Command {
    /// Levels when `RUST_LOG` is unset: a server logs at INFO; `dev` shows
    /// its own lines (one per rotation) and warnings; `check-token` and
    /// `store` print only their result, and warnings.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Serve { .. } | Command::Inject { .. } => "info",
            Command::Dev { .. } => "warn,secrets_broker::dev=info",
            Command::CheckToken { .. } | Command::Store { .. } => "warn",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter (when built in) needs it.
    let telemetry = runtime.block_on(async {
        secrets_broker::telemetry::init(
            cli.log_format == "json",
            cli.command.default_log_level(),
            "secrets-broker",
        )
    });
    if let Err(e) = secrets_sidecar::hardening::disable_core_dumps() {
        tracing::warn!(error = %e, "cannot disable core dumps");
    }
    let code = runtime.block_on(run(cli.command));
    drop(telemetry);
    code
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let listener = match tokio::net::TcpListener::bind(cfg.server.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: cannot listen on {}: {e}", cfg.server.listen);
                    return ExitCode::FAILURE;
                }
            };
            report(secrets_broker::run(cfg, listener, shutdown_signal()).await)
        }
        Command::Dev {
            dir,
            listen,
            rotate_every,
            lease_ttl,
        } => {
            let opts = secrets_broker::dev::DevOptions {
                dir,
                listen,
                rotate_every,
                lease_ttl,
            };
            report(secrets_broker::dev::run(opts, shutdown_signal()).await)
        }
        Command::CheckToken {
            config,
            token_file,
            role,
        } => check_token(&config, &token_file, role.as_deref().unwrap_or_default()).await,
        Command::Store { command } => store(command).await,
        Command::Inject { config } => inject(&config).await,
    }
}

async fn inject(path: &std::path::Path) -> ExitCode {
    use secrets_broker::inject::{Config, Injector};
    let injector = match Config::load(path).and_then(|c| Injector::new(c, path)) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = injector.config().server.listen;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    report(secrets_broker::inject::run(injector, listener, shutdown_signal()).await)
}

fn report<E: std::fmt::Display>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn check_token(
    config: &std::path::Path,
    token_file: &std::path::Path,
    role: &str,
) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let token = match std::fs::read(token_file) {
        // A login refuses bytes that are not text as a bad token: so does this.
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => zeroize::Zeroizing::new(t),
            Err(e) => {
                zeroize::Zeroize::zeroize(&mut e.into_bytes());
                println!(
                    "rejected: malformed token: {} is not UTF-8 text (a JWT is base64url and dots)",
                    token_file.display()
                );
                return ExitCode::from(1);
            }
        },
        Err(e) => {
            eprintln!(
                "error: cannot read token file {}: {e}",
                token_file.display()
            );
            return ExitCode::from(2);
        }
    };
    match secrets_broker::check_token(&cfg, token.trim(), role).await {
        Ok(accepted) => {
            println!("{accepted}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            println!("rejected: {reason}");
            ExitCode::from(1)
        }
    }
}

async fn store(command: StoreCommand) -> ExitCode {
    use secrets_broker::backend::embedded::{EmbeddedStore, generate_key_file};
    let open = |cfg: Config| async move {
        let db = secrets_broker::db::Db::connect(&cfg.database)
            .await
            .map_err(secrets_broker::backend::embedded::StoreError::from)?;
        EmbeddedStore::new(db, &cfg.store.key_file)
    };
    match command {
        StoreCommand::Keygen { out, key_id } => match generate_key_file(&out, &key_id) {
            Ok(()) => {
                println!("wrote {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot create {}: {e}", out.display());
                ExitCode::FAILURE
            }
        },
        StoreCommand::Put {
            config,
            name,
            value_file,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let value = if value_file.as_os_str() == "-" {
                use std::io::Read;
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).map(|_| buf)
            } else {
                std::fs::read(&value_file)
            };
            let value = match value {
                Ok(v) => zeroize::Zeroizing::new(v),
                Err(e) => {
                    eprintln!("error: cannot read the value: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = match open(cfg).await {
                Ok(s) => s.put(&name, &value).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(version) => {
                    println!("{name} version {version}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        StoreCommand::List { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let result = match open(cfg).await {
                Ok(s) => s.latest_versions().await,
                Err(e) => Err(e),
            };
            match result {
                Ok(versions) => {
                    let mut names: Vec<_> = versions.into_iter().collect();
                    names.sort();
                    for (name, version) in names {
                        println!("{name}\t{version}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
