//! `secrets-broker dev`: a complete local system in one process.
//!
//! It generates throwaway TLS material, a store key and an issuer key under
//! the dev directory, mints a service-account token as kubelet would, and
//! starts a broker on the embedded store with a demo secret and a sidecar
//! that writes into `DIR/secrets` (a link to a fresh directory on a tmpfs
//! when one can be had). The demo secret rotates on a short period so a new
//! generation can be watched appearing. The broker and sidecar read the same
//! kind of config files an operator writes (`DIR/broker.toml`,
//! `DIR/sidecar.toml`), so dev mode doubles as a worked example, and
//! `secrets-broker serve --config DIR/broker.toml` runs the same broker
//! without dev: the issuer's public keys are a static JWKS file.

pub mod issuer;
pub mod tls;

use std::io::Write;
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
/// The file the sidecar writes the demo secret to, in `DIR/secrets`.
pub const DEMO_FILE: &str = "greeting";
const AUDIENCE: &str = "secrets-broker";
/// The `iss` of dev tokens: nothing serves it, the broker reads the issuer's
/// keys from `DIR/issuer-jwks.json` (a cluster's issuer publishes them by
/// OIDC discovery instead).
const ISSUER: &str = "https://dev.secrets-broker.invalid";
/// Names the tmpfs directories dev makes, so a later run can tell its own.
const TMPFS_PREFIX: &str = "secrets-broker-dev-";
/// How long dev waits for the sidecar's first file before it prints the
/// banner anyway.
const FIRST_FILE_WAIT: Duration = Duration::from_secs(30);

fn demo_value(n: u64) -> String {
    let mut r = [0u8; 12];
    let _ = aws_lc_rs::rand::fill(&mut r);
    let token = hex::encode(r);
    format!("hello from secrets-broker dev, version {n}: {token}\n")
}

/// Runs the dev system until `shutdown` completes. Everything it writes lives
/// under `opts.dir` (the secrets on a tmpfs it links there); the secrets are
/// removed on the way out.
pub async fn run(
    opts: DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    crate::install_crypto_provider();
    let dir = absolute(&opts.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Paths are printed as the user wrote the directory (`./dev/secrets`).
    let show = |name: &str| opts.dir.join(name).display().to_string();
    let secrets_dir = dir.join("secrets");
    let tmpfs = place_secrets(&secrets_dir)?;

    // Fresh TLS material and issuer key each run; the store and its key persist.
    let tls =
        tls::DevTls::generate_with_clients(&["dev-admin"]).context("generate TLS certificates")?;
    tls.write(&dir.join("tls")).context("write TLS files")?;
    let key_file = dir.join("store.key");
    if !key_file.exists() {
        generate_key_file(&key_file, "dev-1").context("generate store key")?;
    }
    // The audit chain's key, beside the store key: dev runs with a
    // tamper-evident audit log and signed checkpoints.
    let audit_key = dir.join("audit.key");
    if !audit_key.exists() {
        crate::state::audit_key::generate_key_file(&audit_key, "dev-audit-1")
            .context("generate audit key")?;
    }

    let issuer = Issuer::new().context("generate issuer key")?;
    issuer.set_url(ISSUER);
    std::fs::write(
        dir.join("issuer-jwks.json"),
        serde_json::to_vec_pretty(&issuer.jwks())?,
    )
    .context("write the issuer's JWKS")?;
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
# `secrets-broker serve --config broker.toml` runs this broker without dev.
[server]
listen = "{broker_addr}"
tls_cert_file = "tls/tls.crt"
tls_key_file = "tls/tls.key"
shutdown_grace = "2s"

[identity]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
# The dev issuer's public keys, new at each dev run. A cluster's issuer
# publishes them by OIDC discovery instead: leave jwks_file out and set ca_file.
jwks_file = "issuer-jwks.json"

[database]
url = "sqlite://store.db"

[store]
key_file = "store.key"
poll_interval = "500ms"

[audit]
key_file = "audit.key"
# `brokerctl audit verify --checkpoints audit-checkpoints.jsonl`
checkpoint_file = "audit-checkpoints.jsonl"
checkpoint_interval = "1s"

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
            ttl = humantime::format_duration(opts.lease_ttl),
            admin_ip = broker_addr.ip(),
        ),
    )?;
    let on_disk = match &tmpfs {
        Some(target) => format!("# `secrets` links to {}, on a tmpfs.", target.display()),
        None => "# No tmpfs here ($XDG_RUNTIME_DIR, /dev/shm): the files are on disk.\n\
                 # In a pod, mount an emptyDir with medium: Memory and leave this out.\n\
                 allow_non_tmpfs = true"
            .to_owned(),
    };
    let sidecar_toml = dir.join("sidecar.toml");
    std::fs::write(
        &sidecar_toml,
        format!(
            r#"# Written by `secrets-broker dev`; see examples/sidecar.toml for every key.
broker_url = "https://localhost:{port}"
ca_file = "tls/ca.crt"
token_file = "token"
dir = "secrets"
{on_disk}
retry_initial = "200ms"
retry_max = "5s"

[[secrets]]
name = "{DEMO_SECRET}"
file = "{DEMO_FILE}"
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
    let mut broker = tokio::spawn(crate::run(
        broker_cfg,
        broker_listener,
        wait_down(down_rx.clone()),
    ));
    let mut sidecar = tokio::spawn(secrets_sidecar::run(
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

    // The banner once the first secret is on disk and the first checkpoint
    // of the audit log is out (a second later at most), so what it says to
    // try works, and in one write, so no log line lands inside it.
    let first_file = secrets_dir.join(DEMO_FILE);
    let first_checkpoint = opts.dir.join("audit-checkpoints.jsonl");
    let written = async {
        while !first_file.exists() || !first_checkpoint.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::pin!(shutdown);
    let mut outcome: Option<anyhow::Result<()>> = tokio::select! {
        _ = &mut shutdown => Some(Ok(())),
        r = &mut broker => Some(Err(anyhow::anyhow!("broker stopped: {}", joined(r)))),
        r = &mut sidecar => Some(Err(anyhow::anyhow!("sidecar stopped: {}", joined(r)))),
        _ = tokio::time::timeout(FIRST_FILE_WAIT, written) => None,
    };
    if outcome.is_none() {
        let where_ = match &tmpfs {
            Some(target) => format!("a link to {}, on tmpfs", target.display()),
            None => "on disk: no tmpfs at $XDG_RUNTIME_DIR or /dev/shm".to_owned(),
        };
        let first = if first_file.exists() {
            "wrote"
        } else {
            "has not yet written (see the log)"
        };
        let secrets = show("secrets");
        let tls = show("tls");
        let banner = format!(
            "secrets-broker dev is running (Ctrl-C to stop)\n\
             \x20 broker        https://{broker_addr} (gRPC over TLS, embedded store {store_db})\n\
             \x20 token         {token} for default/demo, audience {AUDIENCE}, re-minted every {remint}; keys in {jwks}\n\
             \x20 sidecar       {first} {DEMO_SECRET} to {secrets}/ ({where_})\n\
             \x20 rotation      a new version of {DEMO_SECRET} every {rotate}\n\
             \x20 configs       {broker_toml}, {sidecar_toml}\n\
             \x20 admin API     https://localhost:{admin_port}   try: {brokerctl} --server https://localhost:{admin_port} --ca {tls}/ca.crt --cert {tls}/dev-admin.crt --key {tls}/dev-admin.key leases list\n\
             \x20 audit log     HMAC-chained with {audit_key}, checkpoints in {checkpoints}   try: {brokerctl} --server https://localhost:{admin_port} --ca {tls}/ca.crt --cert {tls}/dev-admin.crt --key {tls}/dev-admin.key audit verify --checkpoints {checkpoints}\n\
             \x20 read it       cat {secrets}/{DEMO_FILE}   (ls -la {secrets}/ shows the ..data layout)\n",
            audit_key = show("audit.key"),
            checkpoints = show("audit-checkpoints.jsonl"),
            store_db = show("store.db"),
            token = show("token"),
            remint =
                humantime::format_duration(Duration::from_secs(workload_remint_seconds(&opts))),
            jwks = show("issuer-jwks.json"),
            rotate = humantime::format_duration(opts.rotate_every),
            broker_toml = show("broker.toml"),
            sidecar_toml = show("sidecar.toml"),
            brokerctl = brokerctl_command(),
        );
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
        drop(out);
        outcome = Some(tokio::select! {
            _ = &mut shutdown => Ok(()),
            r = &mut broker => Err(anyhow::anyhow!("broker stopped: {}", joined(r))),
            r = &mut sidecar => Err(anyhow::anyhow!("sidecar stopped: {}", joined(r))),
        });
    }
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
    db.close().await;
    let _ = std::fs::remove_file(&token_file);
    if tmpfs.is_some() {
        remove_secrets_link(&secrets_dir);
    } else if let Ok(mut entries) = std::fs::read_dir(&secrets_dir)
        && entries.next().is_none()
    {
        let _ = std::fs::remove_dir(&secrets_dir);
    }
    println!("stopped; secrets removed from {}", show("secrets"));
    outcome.unwrap_or(Ok(()))
}

/// The dev token is re-minted at each rotation tick past half its lifetime.
fn workload_remint_seconds(opts: &DevOptions) -> u64 {
    let half = Workload::new("default", "demo", AUDIENCE).ttl_seconds as u64 / 2;
    let every = opts.rotate_every.as_secs().max(1);
    half.div_ceil(every) * every
}

/// Makes `link` (`DIR/secrets`) a link to a new directory on a tmpfs
/// (`$XDG_RUNTIME_DIR`, else `/dev/shm`) and returns that directory; `None`
/// when neither is a tmpfs here, and `link` stays a plain directory. A link
/// left by an earlier run that was killed goes first, with its directory.
fn place_secrets(link: &Path) -> anyhow::Result<Option<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => remove_secrets_link(link),
        Ok(m) if m.is_dir() => std::fs::remove_dir(link).with_context(|| {
            format!(
                "{} holds files of an earlier run; remove it and start again",
                link.display()
            )
        })?,
        Ok(_) => anyhow::bail!("{} is not a directory; remove it", link.display()),
        Err(_) => {}
    }
    let bases = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/dev/shm")]);
    for base in bases {
        if !secrets_sidecar::writer::is_memory_fs(&base).unwrap_or(false) {
            continue;
        }
        let mut r = [0u8; 6];
        let _ = aws_lc_rs::rand::fill(&mut r);
        let target = base.join(format!("{TMPFS_PREFIX}{}", hex::encode(r)));
        // mkdir, not create_dir_all: a name someone else made is not ours.
        if std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .is_ok()
        {
            std::os::unix::fs::symlink(&target, link)
                .with_context(|| format!("link {} to {}", link.display(), target.display()))?;
            return Ok(Some(target));
        }
    }
    Ok(None)
}

/// Removes the link `DIR/secrets`, and the tmpfs directory it points to when
/// dev made it.
fn remove_secrets_link(link: &Path) {
    if let Ok(target) = std::fs::read_link(link)
        && target
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TMPFS_PREFIX))
    {
        let _ = std::fs::remove_dir_all(&target);
    }
    let _ = std::fs::remove_file(link);
}

/// How to run `brokerctl` from here, as printed in the banner: the binary
/// next to this one when it is built, else the `cargo run` that builds it
/// (when cargo started this one), else by name.
fn brokerctl_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "brokerctl".to_owned();
    };
    let Some(bin_dir) = exe.parent() else {
        return "brokerctl".to_owned();
    };
    let ctl = bin_dir.join("brokerctl");
    if ctl.is_file() {
        let cwd = std::env::current_dir().unwrap_or_default();
        return match ctl.strip_prefix(&cwd) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => ctl.display().to_string(),
        };
    }
    if std::env::var_os("CARGO").is_none() {
        return "brokerctl".to_owned();
    }
    let profile = match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => String::new(),
        Some("release") => " --release".to_owned(),
        Some(other) => format!(" --profile {other}"),
    };
    format!("cargo run -q{profile} --bin brokerctl --")
}

fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn write_token(issuer: &Issuer, w: &Workload, path: &Path) -> anyhow::Result<()> {
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
