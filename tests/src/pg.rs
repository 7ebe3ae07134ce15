//! PostgreSQL for the tests: a fresh database on the machine's server
//! (127.0.0.1:5432, user `postgres`, trust auth; override with
//! `SECRETS_BROKER_TEST_PG`), and throwaway clusters that a test may stop
//! and start (fault tests) without touching anyone else's server.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::Connection;

use crate::{free_port, wait_for};

/// The server the tests use, as a URL without a database name.
pub fn server_url() -> String {
    std::env::var("SECRETS_BROKER_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn admin_exec(server: &str, sql: &str) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .with_context(|| {
            format!("cannot connect to PostgreSQL at {server} (the test command starts it)")
        })?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// A database created for one test and dropped after it.
pub struct Database {
    pub url: String,
    server: String,
    name: String,
}

impl Database {
    /// Creates a fresh, empty database on `server`.
    pub fn create_on(server: &str) -> Result<Database> {
        let name = format!("sb_test_{:016x}", fastrand_u64());
        block_on(admin_exec(server, &format!("CREATE DATABASE {name}")))?;
        Ok(Database {
            url: format!("{server}/{name}"),
            server: server.to_owned(),
            name,
        })
    }

    /// A fresh database on the machine's server.
    pub fn create() -> Result<Database> {
        Self::create_on(&server_url())
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = block_on(admin_exec(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ));
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn fastrand_u64() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    t ^ (u64::from(std::process::id()) << 32)
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`).
fn bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server programs not found (/usr/lib/postgresql); the test command installs them")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort();
    candidates
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A throwaway PostgreSQL cluster on a free port, owned by the test; stopped
/// and deleted on drop. initdb refuses root, so as root it runs as `postgres`.
pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    _holder: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Result<Cluster> {
        let bindir = bindir()?;
        let holder = tempfile::Builder::new()
            .prefix("sb-pg-")
            .tempdir_in("/tmp")?;
        let dir = holder.path().join("data");
        if is_root() {
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(holder.path())
                .status()?;
        }
        let out = as_owner(
            Command::new(bindir.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&dir),
        )
        .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let cluster = Cluster {
            port: free_port(),
            dir,
            bindir,
            _holder: holder,
        };
        cluster.resume()?;
        Ok(cluster)
    }

    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts (again) and waits until it accepts connections.
    pub fn resume(&self) -> Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.parent().unwrap_or(&self.dir).display()
        );
        let out = as_owner(
            Command::new(self.bindir.join("pg_ctl"))
                .args(["start", "-w", "-t", "60", "-l"])
                .arg(self.dir.join("log"))
                .arg("-D")
                .arg(&self.dir)
                .arg("-o")
                .arg(opts),
        )
        .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
        }
        let url = format!("{}/postgres", self.server_url());
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || block_on(sqlx::PgConnection::connect(&url)).ok().map(|_| ()),
        )
    }

    /// Stops at once, like a crash or a network partition.
    pub fn stop(&self) -> Result<()> {
        let out = as_owner(
            Command::new(self.bindir.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(&self.dir),
        )
        .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn as_owner(cmd: &mut Command) -> Command {
    let mut real = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    } else {
        let mut c = Command::new(cmd.get_program());
        c.args(cmd.get_args());
        c
    };
    real.current_dir("/tmp");
    real
}
