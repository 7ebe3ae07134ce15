//! Telling the application that a new generation is on disk: a signal to a
//! process (by PID file, or by name for pods with `shareProcessNamespace`),
//! a command run with a timeout, or an HTTP POST to a local URL. Debounced:
//! generations that land within `debounce` of each other cause one
//! notification, sent only after the last swap is complete on disk.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

/// What to do after a new generation.
#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    pub debounce: Duration,
    /// Signal name (HUP, USR1, USR2, INT, TERM) and where to find the process.
    pub signal: Option<(String, Target)>,
    /// argv of a command, and how long it may run.
    pub command: Option<(Vec<String>, Duration)>,
    /// `http://127.0.0.1:PORT/path` (loopback only).
    pub http_post: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Target {
    PidFile(PathBuf),
    ProcessName(String),
}

impl NotifyConfig {
    pub fn is_empty(&self) -> bool {
        self.signal.is_none() && self.command.is_none() && self.http_post.is_none()
    }
}

/// Checks a signal name from the config.
pub fn parse_signal(name: &str) -> Result<rustix::process::Signal, String> {
    use rustix::process::Signal as S;
    Ok(match name.trim_start_matches("SIG") {
        "HUP" => S::HUP,
        "USR1" => S::USR1,
        "USR2" => S::USR2,
        "INT" => S::INT,
        "TERM" => S::TERM,
        "QUIT" => S::QUIT,
        other => return Err(format!("{other:?}: use HUP, USR1, USR2, INT, QUIT or TERM")),
    })
}

/// The handle the keeper pokes after each generation.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<()>,
}

impl Notifier {
    /// Starts the debouncing task.
    pub fn start(cfg: NotifyConfig) -> Notifier {
        let (tx, mut rx) = mpsc::channel::<()>(64);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Wait until no new generation arrived for `debounce`.
                loop {
                    match tokio::time::timeout(cfg.debounce, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                fire(&cfg).await;
            }
        });
        Notifier { tx }
    }

    /// A new generation is complete on disk.
    pub fn generation_written(&self) {
        let _ = self.tx.try_send(());
    }
}

async fn fire(cfg: &NotifyConfig) {
    if let Some((name, target)) = &cfg.signal {
        match find_pid(target).and_then(|pid| {
            let sig = parse_signal(name)?;
            let p = rustix::process::Pid::from_raw(pid).ok_or("invalid pid")?;
            rustix::process::kill_process(p, sig).map_err(|e| e.to_string())?;
            Ok(pid)
        }) {
            Ok(pid) => info!(pid, signal = %name, "notified the application"),
            Err(e) => warn!(error = %e, signal = %name, "cannot signal the application"),
        }
    }
    if let Some((argv, timeout)) = &cfg.command {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => match tokio::time::timeout(*timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => {
                    info!(command = %argv[0], "notify command ran")
                }
                Ok(Ok(status)) => warn!(command = %argv[0], %status, "notify command failed"),
                Ok(Err(e)) => warn!(command = %argv[0], error = %e, "notify command failed"),
                Err(_) => {
                    let _ = child.kill().await;
                    warn!(command = %argv[0], timeout = ?timeout, "notify command timed out and was killed");
                }
            },
            Err(e) => warn!(command = %argv[0], error = %e, "cannot run notify command"),
        }
    }
    if let Some(url) = &cfg.http_post {
        match post(url).await {
            Ok(status) if (200..300).contains(&status) => {
                info!(url, status, "notified the application over HTTP")
            }
            Ok(status) => warn!(url, status, "notify POST answered an error"),
            Err(e) => warn!(url, error = %e, "notify POST failed"),
        }
    }
}

fn find_pid(target: &Target) -> Result<i32, String> {
    match target {
        Target::PidFile(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .trim()
            .parse()
            .map_err(|_| format!("{} does not hold a PID", path.display())),
        Target::ProcessName(name) => {
            let me = std::process::id() as i32;
            let entries = std::fs::read_dir("/proc").map_err(|e| e.to_string())?;
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                if std::fs::read_to_string(entry.path().join("comm"))
                    .is_ok_and(|c| c.trim() == name)
                {
                    return Ok(pid);
                }
            }
            Err(format!(
                "no process named {name:?} (does the pod set shareProcessNamespace?)"
            ))
        }
    }
}

/// Checks a notify URL: plain HTTP to a loopback address only.
pub fn check_url(url: &str) -> Result<(std::net::SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("use http://127.0.0.1:PORT/path (loopback only)")?;
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let addr: std::net::SocketAddr = hostport
        .replace("localhost", "127.0.0.1")
        .parse()
        .map_err(|_| format!("{hostport:?} is not HOST:PORT"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", addr.ip()));
    }
    Ok((addr, path))
}

async fn post(url: &str) -> Result<u16, String> {
    use http_body_util::Empty;
    let (addr, path) = check_url(url)?;
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("user-agent", "secrets-sidecar")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_loopback_http() {
        assert!(check_url("http://127.0.0.1:8080/-/reload").is_ok());
        assert_eq!(check_url("http://localhost:9/x").unwrap().1, "/x");
        assert!(check_url("https://127.0.0.1:8080/").is_err());
        assert!(
            check_url("http://10.0.0.1:80/")
                .unwrap_err()
                .contains("not a loopback")
        );
        assert!(parse_signal("SIGHUP").is_ok());
        assert!(parse_signal("KILL").is_err());
    }
}
