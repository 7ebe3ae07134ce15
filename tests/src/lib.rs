//! Support for the end-to-end tests: the real `secrets-broker` and
//! `secrets-sidecar` binaries run as processes, against a real HTTPS OIDC
//! issuer on loopback (keys minted by the test) and a real tmpfs.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; the
//! README's test command does it).

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use secrets_broker::dev::issuer::{Issuer, Workload};
use secrets_broker::dev::tls::{DevTls, TlsFiles};

pub mod bao;
pub mod bench;
pub mod kube_api;
pub mod moto;
pub mod pg;
pub mod proxy;

pub const AUDIENCE: &str = "secrets-broker";

/// Admin clients every test world's brokers know, by certificate CN and role.
/// `stranger` has a valid certificate that maps to no role.
pub const ADMIN_CLIENTS: [(&str, &str); 3] = [
    ("viewer", "viewer"),
    ("revoker", "revoker"),
    ("admin", "admin"),
];

/// Path of one of the workspace's binaries, next to the test executable's
/// `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago, taken from below the kernel's
/// ephemeral range. A port the kernel hands out for `bind(0)` comes from the
/// range it also uses for outgoing connections, so between this call and the
/// server binding it any client on the machine could take it as its local
/// port (CI saw a broker fail with "Address already in use"). Below that range
/// only a server that binds the very number can, and each test process walks
/// its own stretch of it, two ports a step: the one above each port handed
/// out stays free, for servers that also take it (an OpenBao dev server's
/// cluster listener is its port + 1).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_start.clamp(12_000, 65_535));
    let pairs = (high - low) / 2;
    let base = std::process::id().wrapping_mul(7_919) % pairs;
    let free = |port: u32| StdListener::bind(("127.0.0.1", port as u16)).is_ok();
    for _ in 0..pairs {
        let port = low + 2 * ((base + NEXT.fetch_add(1, Ordering::Relaxed)) % pairs);
        if free(port) && free(port + 1) {
            return port as u16;
        }
    }
    // Nothing free below the ephemeral range: take the kernel's.
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A directory on a memory filesystem: a fresh tmpfs mount when running as
/// root, else a directory under `/dev/shm`. Unmounted/removed on drop.
pub struct Tmpfs {
    pub path: PathBuf,
    mounted: bool,
    _holder: tempfile::TempDir,
}

impl Tmpfs {
    pub fn new() -> Result<Tmpfs> {
        Self::sized("16m", false)
    }

    /// A tmpfs of exactly `size` (e.g. "256k"), for tests that fill it;
    /// needs root to mount.
    pub fn with_size(size: &str) -> Result<Tmpfs> {
        Self::sized(size, true)
    }

    fn sized(size: &str, exact: bool) -> Result<Tmpfs> {
        let holder = tempfile::tempdir()?;
        let path = holder.path().join("secrets");
        std::fs::create_dir(&path)?;
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false);
        if is_root {
            let status = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0750"),
                    "tmpfs",
                ])
                .arg(&path)
                .status();
            if status.is_ok_and(|s| s.success()) {
                return Ok(Tmpfs {
                    path,
                    mounted: true,
                    _holder: holder,
                });
            }
        }
        if exact {
            bail!(
                "a tmpfs of a given size needs root to mount (run the tests as root, as CI does)"
            );
        }
        let shm = tempfile::Builder::new()
            .prefix("sb-e2e-")
            .tempdir_in("/dev/shm")?;
        let path = shm.path().to_owned();
        Ok(Tmpfs {
            path,
            mounted: false,
            _holder: shm,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A running child process whose stderr goes to a log file; killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let file = std::fs::File::create(&log)?;
        // Tests log at debug level (the leak test needs it) unless told otherwise.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "debug");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Proc { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `act` (which sends this sidecar to fetch, e.g. a rotation) and
    /// waits, for at most `timeout`, until the sidecar logs one more
    /// `fetch failed` than it had before.
    pub fn fetch_fails_after(&self, timeout: Duration, act: impl FnOnce()) -> Result<()> {
        let failures = || self.log_text().matches("fetch failed").count();
        let before = failures();
        act();
        wait_for("the sidecar's fetch fails", timeout, || {
            (failures() > before).then_some(())
        })
    }

    /// Sends a signal (`TERM`, `KILL`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_for("process exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: an HTTPS OIDC issuer, TLS files, a store key, and the
/// config files for a broker and sidecars.
pub struct World {
    pub dir: tempfile::TempDir,
    pub issuer: Issuer,
    pub tls: TlsFiles,
    pub broker_port: u16,
    pub admin_port: u16,
    /// The first broker's operations port (metrics, health).
    pub ops_port: u16,
    /// `database.url` of the brokers.
    pub database: String,
    /// Runs the issuer's HTTPS server.
    pub runtime: tokio::runtime::Runtime,
    /// The TLS identity issuers serve with (signed by `tls/ca.crt`).
    issuer_tls: std::sync::Arc<rustls::ServerConfig>,
    /// `RUST_LOG` of the processes this world starts (benchmarks use "info").
    pub log_level: &'static str,
}

impl World {
    /// Starts an issuer and writes a broker config (SQLite) whose roles are `roles_toml`.
    pub fn new(roles_toml: &str) -> Result<World> {
        Self::with_database(roles_toml, "sqlite://store.db")
    }

    /// Like [`World::new`], with the brokers on `database` (e.g. a PostgreSQL URL).
    pub fn with_database(roles_toml: &str, database: &str) -> Result<World> {
        secrets_broker::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let tls = DevTls::generate_with_clients(&["viewer", "revoker", "admin", "stranger"])?;
        let tls_files = tls.write(&dir.path().join("tls"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let issuer_tls = tls.server_config()?;
        let issuer = start_issuer(&runtime, issuer_tls.clone())?;
        let out = Command::new(bin("secrets-broker"))
            .args(["store", "keygen", "--out"])
            .arg(dir.path().join("store.key"))
            .output()?;
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let world = World {
            broker_port: free_port(),
            admin_port: free_port(),
            ops_port: 0,
            database: database.to_owned(),
            dir,
            issuer,
            tls: tls_files,
            runtime,
            issuer_tls,
            log_level: "debug",
        };
        let mut world = world;
        world.ops_port = world.write_broker_config(
            &world.broker_config(),
            world.broker_port,
            world.admin_port,
            roles_toml,
        )?;
        Ok(world)
    }

    /// A fake Kubernetes API server (TokenReview) with this world's TLS.
    pub fn start_api_server(&self) -> Result<kube_api::FakeApiServer> {
        kube_api::FakeApiServer::start(&self.runtime, self.issuer_tls.clone())
    }

    /// Another token issuer (another cluster), served over HTTPS with the
    /// same CA as the first.
    pub fn add_issuer(&self) -> Result<Issuer> {
        start_issuer(&self.runtime, self.issuer_tls.clone())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn broker_config(&self) -> PathBuf {
        self.path("broker.toml")
    }

    /// Writes a broker config listening on `port` (gRPC) and `admin_port` to
    /// `path`; returns the operations port it chose.
    pub fn write_broker_config(
        &self,
        path: &Path,
        port: u16,
        admin_port: u16,
        roles: &str,
    ) -> Result<u16> {
        let ops_port = free_port();
        let mut admin = format!(
            "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nclient_ca_file = \"tls/ca.crt\"\n"
        );
        for (cn, role) in ADMIN_CLIENTS {
            admin.push_str(&format!(
                "[[admin.clients]]\nname = \"{cn}\"\nsubject_cn = \"{cn}\"\nrole = \"{role}\"\n"
            ));
        }
        std::fs::write(
            path,
            format!(
                r#"[server]
listen = "127.0.0.1:{port}"
ops_listen = "127.0.0.1:{ops_port}"
tls_cert_file = "tls/tls.crt"
tls_key_file = "tls/tls.key"
shutdown_grace = "2s"
watch_heartbeat = "5s"

[identity]
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
ca_file = "tls/ca.crt"
leeway = "5s"
jwks_refresh_min_interval = "2s"

[database]
url = "{database}"

[store]
key_file = "store.key"
poll_interval = "200ms"

[revocation]
refresh_interval = "500ms"
max_staleness = "3s"

{admin}
{roles}
"#,
                issuer = self.issuer.url(),
                database = self.database,
            ),
        )?;
        Ok(ops_port)
    }

    /// Stores a secret version with `secrets-broker store put` (value on stdin).
    pub fn put(&self, name: &str, value: &str) -> Result<()> {
        let mut child = Command::new(bin("secrets-broker"))
            .args(["store", "put", "--config"])
            .arg(self.broker_config())
            .arg(name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(value.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("store put failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts `secrets-broker serve` and waits until it has loaded the keys.
    pub fn start_broker(&self, log_name: &str) -> Result<Proc> {
        self.start_broker_with(&self.broker_config(), log_name)
    }

    /// Starts a broker with another config file (a second replica).
    pub fn start_broker_with(&self, config: &Path, log_name: &str) -> Result<Proc> {
        self.start_broker_env(config, log_name, &[])
    }

    /// Starts a broker with these environment variables too (e.g. the AWS
    /// credentials of its own calls), and waits until it is ready.
    pub fn start_broker_env(
        &self,
        config: &Path,
        log_name: &str,
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let mut proc = Proc::spawn(
            Command::new(bin("secrets-broker"))
                .args(["serve", "--config"])
                .arg(config)
                .env("RUST_LOG", self.log_level)
                .envs(env.iter().copied()),
            self.path(log_name),
        )?;
        // A broker that exits (a config it refuses, a port it cannot bind)
        // fails the wait at once instead of after the whole timeout.
        wait_for("broker ready", Duration::from_secs(30), || {
            if proc.log_text().contains("signing keys loaded") {
                return Some(Ok(()));
            }
            let exited = proc.child.try_wait().ok().flatten()?;
            Some(Err(anyhow::anyhow!(
                "the broker exited ({exited}) before it was ready"
            )))
        })
        .and_then(|ready| ready)
        .with_context(|| format!("broker log:\n{}", proc.log_text()))?;
        Ok(proc)
    }

    /// Mints a token for a workload and writes it to `name`.
    pub fn token_file(&self, name: &str, w: &Workload) -> Result<PathBuf> {
        self.write_token(name, &self.issuer.mint(w)?)
    }

    pub fn write_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.path(name);
        std::fs::write(&path, token)?;
        Ok(path)
    }

    /// Writes a sidecar config; `extra` is appended before the secrets list.
    pub fn sidecar_config(
        &self,
        name: &str,
        token: &Path,
        dir: &Path,
        extra: &str,
        secrets: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let mut text = format!(
            r#"broker_url = "https://localhost:{port}"
ca_file = "{ca}"
token_file = "{token}"
dir = "{dir}"
retry_initial = "100ms"
retry_max = "1s"
request_timeout = "5s"
{extra}
"#,
            port = self.broker_port,
            ca = self.tls.ca.display(),
            token = token.display(),
            dir = dir.display(),
        );
        for (name, file) in secrets {
            text.push_str(&format!(
                "[[secrets]]\nname = \"{name}\"\nfile = \"{file}\"\n"
            ));
        }
        let path = self.path(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Runs a binary to completion and returns its output.
    pub fn run(&self, name: &str, args: &[&str]) -> Result<Output> {
        Ok(Command::new(bin(name))
            .args(args)
            .env("NO_COLOR", "1")
            .output()?)
    }

    /// Runs `brokerctl` against the admin API on `admin_port`, as the client
    /// certificate `client` (none for `None`).
    pub fn brokerctl_at(
        &self,
        admin_port: u16,
        client: Option<&str>,
        args: &[&str],
    ) -> Result<Output> {
        let tls = self.path("tls");
        let mut cmd = Command::new(bin("brokerctl"));
        cmd.arg("--server")
            .arg(format!("https://localhost:{admin_port}"))
            .arg("--ca")
            .arg(tls.join("ca.crt"));
        if let Some(c) = client {
            cmd.arg("--cert")
                .arg(tls.join(format!("{c}.crt")))
                .arg("--key")
                .arg(tls.join(format!("{c}.key")));
        }
        Ok(cmd.args(args).output()?)
    }

    /// `brokerctl` against this world's first broker.
    pub fn brokerctl(&self, client: Option<&str>, args: &[&str]) -> Result<Output> {
        self.brokerctl_at(self.admin_port, client, args)
    }

    /// A gRPC channel to the broker on `port`, trusting this world's CA.
    pub async fn grpc_channel(&self, port: u16) -> tonic::transport::Channel {
        let ca = std::fs::read(&self.tls.ca).expect("the world's CA");
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("an https URL")
            .tls_config(tls)
            .expect("a TLS config")
            .connect()
            .await
            .expect("a broker listening")
    }

    /// Starts `secrets-sidecar run` for `workload` into a fresh tmpfs, asking
    /// for `secrets` from the broker on `port`; returns the process, its
    /// directory and its health port.
    pub fn start_sidecar(
        &self,
        name: &str,
        workload: &Workload,
        port: u16,
        secrets: &[(&str, &str)],
    ) -> Result<(Proc, Tmpfs, u16)> {
        let tmpfs = Tmpfs::new()?;
        let health = free_port();
        let token = self.token_file(&format!("{name}.token"), workload)?;
        let extra = format!("health_listen = \"127.0.0.1:{health}\"");
        let cfg = self.sidecar_config(
            &format!("{name}.toml"),
            &token,
            &tmpfs.path,
            &extra,
            secrets,
        )?;
        let text = std::fs::read_to_string(&cfg)?.replace(
            &format!("https://localhost:{}", self.broker_port),
            &format!("https://localhost:{port}"),
        );
        std::fs::write(&cfg, text)?;
        let proc = Proc::spawn(
            Command::new(bin("secrets-sidecar"))
                .args(["run", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", self.log_level),
            self.path(&format!("{name}.log")),
        )?;
        Ok((proc, tmpfs, health))
    }
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn out_text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::Read;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A numeric command-line flag of a bench binary (`--rounds 100`), or `default`.
pub fn flag(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p`-quantile (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn start_issuer(
    runtime: &tokio::runtime::Runtime,
    tls: std::sync::Arc<rustls::ServerConfig>,
) -> Result<Issuer> {
    let issuer = Issuer::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        issuer.serve(listener, "127.0.0.1", tls).await?;
        anyhow::Ok(())
    })?;
    Ok(issuer)
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `RssAnon:`…).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
