//! `secrets-broker dev`: a complete local system in one process.
//!
//! It generates throwaway TLS material, a store key and an issuer key under
//! the dev directory, starts a local OIDC token issuer over HTTPS, a broker
//! on the embedded store with a demo secret, and a sidecar that writes into
//! `DIR/secrets`. The demo secret rotates on a short period so a new
//! generation can be watched appearing. The broker and sidecar read the same
//! kind of config files an operator writes (`DIR/broker.toml`,
//! `DIR/sidecar.toml`), so dev mode doubles as a worked example.

pub mod issuer;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backend::embedded::{EmbeddedStore, generate_key_file};
use issuer::{Issuer, Workload};

/// Options of `secrets-broker dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    /// Address for the broker's gRPC port (port 0 picks a free one).
    pub listen: std::net::SocketAddr,
    /// How often the demo secret gets a new version.
    pub rotate_every: Duration,
    /// Lease TTL of the demo role.
    pub lease_ttl: Duration,
}

pub const DEMO_SECRET: &str = "demo/greeting";
const AUDIENCE: &str = "secrets-broker";

fn demo_value(n: u64) -> String {
    let mut r = [0u8; 12];
    let _ = aws_lc_rs::rand::fill(&mut r);
    let token = hex::encode(r);
    format!("hello from secrets-broker dev, version {n}: {token}\n")
}

/// Runs the dev system until `shutdown` completes. Everything it writes lives
/// under `opts.dir`; the secrets are removed on the way out.
pub async fn run(
    opts: DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    crate::install_crypto_provider();
    let dir = absolute(&opts.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let secrets_dir = dir.join("secrets");

    // Fresh TLS material and issuer key each run; the store and its key persist.
    let tls =
        tls::DevTls::generate_with_clients(&["dev-admin"]).context("generate TLS certificates")?;
    tls.write(&dir.join("tls")).context("write TLS files")?;
    let key_file = dir.join("store.key");
    if !key_file.exists() {
        generate_key_file(&key_file, "dev-1").context("generate store key")?;
    }

    let issuer = Issuer::new().context("generate issuer key")?;
    let issuer_listener = TcpListener::bind("127.0.0.1:0").await?;
    let issuer_task = issuer
        .serve(issuer_listener, "127.0.0.1", tls.server_config()?)
        .await?;
    let workload = Workload::new("default", "demo", AUDIENCE);
    let token_file = dir.join("token");
    write_token(&issuer, &workload, &token_file)?;

    let broker_listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("bind broker on {}", opts.listen))?;
    let broker_addr = broker_listener.local_addr()?;
    let admin_port = {
        let l = std::net::TcpListener::bind((broker_addr.ip(), 0))?;
        l.local_addr()?.port()
    };
    let broker_toml = dir.join("broker.toml");
    std::fs::write(
        &broker_toml,
        format!(
            r#"# Written by `secrets-broker dev`; see examples/broker.toml for every key.
[server]
listen = "{broker_addr}"
tls_cert_file = "tls/tls.crt"
tls_key_file = "tls/tls.key"
shutdown_grace = "2s"

[identity]
issuer = "{issuer_url}"
audiences = ["{AUDIENCE}"]
ca_file = "tls/ca.crt"

[database]
url = "sqlite://store.db"

[store]
key_file = "store.key"
poll_interval = "500ms"

[admin]
listen = "{admin_ip}:{admin_port}"
client_ca_file = "tls/ca.crt"

[[admin.clients]]
name = "dev-admin"
subject_cn = "dev-admin"
role = "admin"

[[roles]]
name = "demo"
namespaces = ["default"]
service_accounts = ["demo"]
secrets = ["demo/*"]
ttl = "{ttl}"
max_ttl = "1h"
"#,
            issuer_url = issuer.url(),
            ttl = humantime::format_duration(opts.lease_ttl),
            admin_ip = broker_addr.ip(),
        ),
    )?;
    let sidecar_toml = dir.join("sidecar.toml");
    std::fs::write(
        &sidecar_toml,
        format!(
            r#"# Written by `secrets-broker dev`; see examples/sidecar.toml for every key.
broker_url = "https://localhost:{port}"
ca_file = "tls/ca.crt"
token_file = "token"
dir = "secrets"
# Dev mode may run where no tmpfs is at hand; in a pod, mount an emptyDir with medium: Memory.
allow_non_tmpfs = true
retry_initial = "200ms"
retry_max = "5s"

[[secrets]]
name = "{DEMO_SECRET}"
file = "greeting"
"#,
            port = broker_addr.port()
        ),
    )?;
    let broker_cfg = crate::config::Config::load(&broker_toml)?;
    let sidecar_cfg = secrets_sidecar::config::Config::load(&sidecar_toml)?;

    let db = crate::db::Db::connect(&broker_cfg.database).await?;
    let store = EmbeddedStore::new(db.clone(), &broker_cfg.store.key_file)?;
    let first = store.put(DEMO_SECRET, demo_value(1).as_bytes()).await?;

    let (down_tx, down_rx) = watch::channel(false);
    let wait_down = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|d| *d).await;
    };
    let broker = tokio::spawn(crate::run(
        broker_cfg,
        broker_listener,
        wait_down(down_rx.clone()),
    ));
    let sidecar = tokio::spawn(secrets_sidecar::run(
        sidecar_cfg,
        wait_down(down_rx.clone()),
    ));

    // Rotate the demo secret, and re-mint the token before it expires (as kubelet does).
    let rotator = tokio::spawn({
        let store = store.clone();
        let every = opts.rotate_every;
        let issuer = issuer.clone();
        let token_file = token_file.clone();
        async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut n = first;
            let mut since_mint = Duration::ZERO;
            loop {
                tick.tick().await;
                since_mint += every;
                if since_mint >= Duration::from_secs(workload.ttl_seconds as u64 / 2) {
                    since_mint = Duration::ZERO;
                    if let Err(e) = write_token(&issuer, &workload, &token_file) {
                        warn!(error = %e, "cannot refresh the dev token");
                    }
                }
                match store.put(DEMO_SECRET, demo_value(n + 1).as_bytes()).await {
                    Ok(v) => {
                        n = v;
                        info!(
                            secret = DEMO_SECRET,
                            version = v,
                            "dev: rotated demo secret"
                        );
                    }
                    Err(e) => warn!(error = %e, "dev: cannot rotate demo secret"),
                }
            }
        }
    });

    println!(
        "secrets-broker dev is running (Ctrl-C to stop)\n\
         \x20 token issuer  {issuer_url} (OIDC discovery + JWKS over HTTPS)\n\
         \x20 broker        https://{broker_addr} (gRPC over TLS, embedded store {store_db})\n\
         \x20 sidecar       writing {secret} to {secrets}\n\
         \x20 rotation      a new version of {secret} every {rotate}\n\
         \x20 configs       {broker_toml}, {sidecar_toml}\n\
         \x20 admin API     https://{admin_ip}:{admin_port}   try: {brokerctl} leases list\n\
         \x20 read it       cat {secrets}/greeting   (ls -la {secrets} shows the ..data layout)",
        issuer_url = issuer.url(),
        store_db = dir.join("store.db").display(),
        secret = DEMO_SECRET,
        secrets = secrets_dir.display(),
        rotate = humantime::format_duration(opts.rotate_every),
        broker_toml = broker_toml.display(),
        sidecar_toml = sidecar_toml.display(),
        admin_ip = broker_addr.ip(),
        brokerctl = format_args!(
            "brokerctl --server https://localhost:{admin_port} --ca {t}/ca.crt --cert {t}/dev-admin.crt --key {t}/dev-admin.key",
            t = dir.join("tls").display()
        ),
    );

    tokio::pin!(shutdown);
    let mut broker = broker;
    let mut sidecar = sidecar;
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = &mut shutdown => Ok(()),
        r = &mut broker => Err(anyhow::anyhow!("broker stopped: {}", joined(r))),
        r = &mut sidecar => Err(anyhow::anyhow!("sidecar stopped: {}", joined(r))),
    };
    println!("stopping…");
    let _ = down_tx.send(true);
    rotator.abort();
    // The sidecar first, so it removes the secrets while the broker drains.
    if !sidecar.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), sidecar).await;
    }
    if !broker.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), broker).await;
    }
    issuer_task.abort();
    db.close().await;
    let _ = std::fs::remove_file(&token_file);
    if let Ok(mut entries) = std::fs::read_dir(&secrets_dir)
        && entries.next().is_none()
    {
        let _ = std::fs::remove_dir(&secrets_dir);
    }
    println!("stopped; secrets removed from {}", secrets_dir.display());
    outcome
}

fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn write_token(issuer: &Issuer, w: &Workload, path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = zeroize::Zeroizing::new(issuer.mint(w)?);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn joined<T: std::fmt::Display, E: std::fmt::Display>(r: Result<Result<(), T>, E>) -> String {
    match r {
        Ok(Ok(())) => "exited".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}
