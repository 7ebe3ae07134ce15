//! TLS server files that are read again while the broker runs.
//!
//! cert-manager renews a certificate into its Secret and kubelet updates the
//! mounted volume by writing a new directory and renaming a `..data` symlink
//! over the old one, so a watch on the file itself (inotify) never fires.
//! Instead [`watch`] polls: every `server.tls_reload_interval` it reads the
//! files of one listener (certificate chain, private key, client CA) and
//! compares SHA-256 digests of their contents with what is being served.
//!
//! A change is applied only as a whole: a new `rustls::ServerConfig` is
//! built from the bytes just read (the chain parses, the private key parses
//! and is the certificate's, the client CA parses) and then swapped in, so a
//! half-written pair is never served. New connections take the current
//! config at their handshake ([`ReloadingTls::acceptor`]); connections
//! already open keep the one they started with.
//!
//! Files that do not load are tried again at the next poll and reported
//! (a WARN naming the file, `tls_reloads_total{result="error"}`) only when
//! they are still the same a poll later, once per content: a pair replaced
//! one file at a time settles without a warning, a broken file is reported
//! once, and the old config stays in use meanwhile. Key bytes are never
//! logged; a certificate appears as its serial, expiry and SHA-256.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::telemetry::metrics::TlsReloadLabels;

/// One file a listener's TLS is built from, and the config key naming it.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub setting: &'static str,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(setting: &'static str, path: &Path) -> ConfigFile {
        ConfigFile {
            setting,
            path: path.to_owned(),
        }
    }
}

/// The files of one listener and what its config must say besides them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `grpc` or `admin`: the metric label and log field.
    pub listener: &'static str,
    /// The PEM certificate chain, leaf first.
    pub cert: ConfigFile,
    /// The PEM private key of the leaf.
    pub key: ConfigFile,
    /// Client certificates are verified against these CAs when presented,
    /// and not required at the handshake (the admin API answers a caller
    /// without one with a 401 that says what to do); `None`: not asked for.
    pub client_ca: Option<ConfigFile>,
    /// ALPN protocols offered, in order of preference.
    pub alpn: Vec<Vec<u8>>,
}

impl TlsFiles {
    fn all(&self) -> impl Iterator<Item = &ConfigFile> {
        [&self.cert, &self.key].into_iter().chain(&self.client_ca)
    }
}

/// Why a listener's TLS files cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file cannot be read: missing, not readable by the broker's user,
    /// or a directory (a Secret volume mounted at the wrong path).
    #[error("key `{setting}`: cannot read TLS file {}: {source}", path.display())]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds nothing usable of what it should: no PEM block of the
    /// expected kind, a damaged block (a truncated write), a certificate or
    /// key in a form rustls does not take.
    #[error("key `{setting}`: {}: {problem}", path.display())]
    Invalid {
        setting: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The private key is not the certificate's: usually the two files were
    /// replaced one at a time and the second is not written yet.
    #[error(
        "key `{setting}`: {}: the private key does not match the certificate in {}",
        path.display(),
        cert.display()
    )]
    Mismatch {
        setting: &'static str,
        path: PathBuf,
        cert: PathBuf,
    },
}

impl TlsFileError {
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            TlsFileError::Read { path, .. }
            | TlsFileError::Invalid { path, .. }
            | TlsFileError::Mismatch { path, .. } => path,
        }
    }

    fn invalid(file: &ConfigFile, problem: impl fmt::Display) -> TlsFileError {
        TlsFileError::Invalid {
            setting: file.setting,
            path: file.path.clone(),
            problem: problem.to_string(),
        }
    }
}

/// What a log line says of the leaf certificate being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The serial number, hex bytes separated by colons.
    pub serial: String,
    /// The end of its validity, RFC 3339 (UTC).
    pub not_after: String,
    /// SHA-256 of its DER encoding, hex: what `openssl x509 -fingerprint
    /// -sha256` prints, without the colons.
    pub sha256: String,
}

/// A reload that was applied: the files whose contents changed and the leaf
/// now served.
#[derive(Debug, Clone)]
pub struct Reload {
    pub changed: Vec<PathBuf>,
    pub leaf: Leaf,
}

/// The result of one [`ReloadingTls::poll`].
#[derive(Debug)]
pub enum Polled {
    /// The files are what is served (or what was already reported broken).
    Unchanged,
    /// The files changed and a new config is served from now on.
    Reloaded(Reload),
    /// The files changed but do not load; they are tried again at the next
    /// poll before this is reported, so a pair still being written is not.
    Settling(TlsFileError),
    /// The files changed, do not load, and stayed so for a poll: reported
    /// once for these contents; the config served before stays.
    Failed(TlsFileError),
}

/// SHA-256 of each file's contents in [`TlsFiles::all`] order; `None` where
/// the file cannot be read.
type Digests = Vec<Option<[u8; 32]>>;

/// The files' contents in [`TlsFiles::all`] order (zeroized on drop: one is
/// a private key), or the first that cannot be read.
type Contents = Result<Vec<Zeroizing<Vec<u8>>>, TlsFileError>;

#[derive(Default)]
struct PollState {
    /// The contents the served config was built from.
    applied: Digests,
    /// Contents that failed to load once, waiting a poll to settle.
    pending: Option<Digests>,
    /// Contents reported broken; not tried or reported again.
    reported: Option<Digests>,
}

/// One listener's TLS config, swapped in whole when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    state: Mutex<PollState>,
}

impl fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Loads the files once; an error names the file and key, and stops the
    /// start as a bad config does.
    pub fn load(files: TlsFiles) -> Result<(ReloadingTls, Leaf), TlsFileError> {
        crate::install_crypto_provider();
        let (digests, contents) = read(&files);
        let (config, leaf) = build(&files, &contents?)?;
        Ok((
            ReloadingTls {
                files,
                current: RwLock::new(Arc::new(config)),
                state: Mutex::new(PollState {
                    applied: digests,
                    ..PollState::default()
                }),
            },
            leaf,
        ))
    }

    /// The listener this serves (`grpc`, `admin`).
    pub fn listener(&self) -> &'static str {
        self.files.listener
    }

    /// The config a handshake starting now uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An acceptor for one new connection, with the current config.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// Reads the files and applies them if they changed and load (see the
    /// module doc). Blocking file I/O: a few small files.
    pub fn poll(&self) -> Polled {
        let (digests, contents) = read(&self.files);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if digests == state.applied {
            // Back to what is served (a broken update undone).
            state.pending = None;
            state.reported = None;
            return Polled::Unchanged;
        }
        if state.reported.as_ref() == Some(&digests) {
            return Polled::Unchanged;
        }
        match contents.and_then(|c| build(&self.files, &c)) {
            Ok((config, leaf)) => {
                let changed = self
                    .files
                    .all()
                    .zip(digests.iter().zip(&state.applied))
                    .filter(|(_, (new, old))| new != old)
                    .map(|(f, _)| f.path.clone())
                    .collect();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                *state = PollState {
                    applied: digests,
                    ..PollState::default()
                };
                Polled::Reloaded(Reload { changed, leaf })
            }
            Err(e) if state.pending.as_ref() == Some(&digests) => {
                state.pending = None;
                state.reported = Some(digests);
                Polled::Failed(e)
            }
            Err(e) => {
                state.pending = Some(digests);
                Polled::Settling(e)
            }
        }
    }
}

/// Each file's digest, and the contents when every file could be read.
fn read(files: &TlsFiles) -> (Digests, Contents) {
    let mut digests = Vec::new();
    let mut contents = Ok(Vec::new());
    for file in files.all() {
        match std::fs::read(&file.path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                digests.push(Some(sha256(&bytes)));
                if let Ok(c) = &mut contents {
                    c.push(bytes);
                }
            }
            Err(source) => {
                digests.push(None);
                if contents.is_ok() {
                    contents = Err(TlsFileError::Read {
                        setting: file.setting,
                        path: file.path.clone(),
                        source,
                    });
                }
            }
        }
    }
    (digests, contents)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A whole server config from the files' contents (in [`TlsFiles::all`]
/// order), or the first problem, naming its file.
fn build(
    files: &TlsFiles,
    contents: &[Zeroizing<Vec<u8>>],
) -> Result<(ServerConfig, Leaf), TlsFileError> {
    let [cert_pem, key_pem, rest @ ..] = contents else {
        return Err(TlsFileError::invalid(&files.cert, "not read"));
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsFileError::invalid(&files.cert, e))?;
    let Some(first) = chain.first() else {
        return Err(TlsFileError::invalid(&files.cert, "no CERTIFICATE block"));
    };
    let leaf = describe(first).map_err(|e| TlsFileError::invalid(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        TlsFileError::invalid(&files.key, format!("no usable PRIVATE KEY block: {e}"))
    })?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsFileError::invalid(&files.key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // A key type that cannot tell its public key is taken, as rustls does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsFileError::Mismatch {
                setting: files.key.setting,
                path: files.key.path.clone(),
                cert: files.cert.path.clone(),
            });
        }
        Err(e) => return Err(TlsFileError::invalid(&files.cert, e)),
    }

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::invalid(&files.cert, e))?;
    let builder = match (&files.client_ca, rest.first()) {
        (None, _) => builder.with_no_client_auth(),
        (Some(ca), pem) => {
            let pem = pem.ok_or_else(|| TlsFileError::invalid(ca, "not read"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| TlsFileError::invalid(ca, e))?;
                roots.add(cert).map_err(|e| TlsFileError::invalid(ca, e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsFileError::invalid(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = files.alpn.clone();
    Ok((config, leaf))
}

/// Serial, expiry and fingerprint of a leaf certificate.
fn describe(cert: &CertificateDer<'_>) -> Result<Leaf, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let not_after = u64::try_from(parsed.validity().not_after.timestamp())
        .map(|s| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        })
        .unwrap_or_else(|_| parsed.validity().not_after.to_string());
    Ok(Leaf {
        serial: parsed.raw_serial_as_string(),
        not_after,
        sha256: hex::encode(sha256(cert.as_ref())),
    })
}

/// Logs the certificate a listener starts with.
pub fn log_loaded(tls: &ReloadingTls, leaf: &Leaf) {
    info!(
        listener = tls.listener(),
        file = %tls.files.cert.path.display(),
        serial = %leaf.serial,
        not_after = %leaf.not_after,
        sha256 = %leaf.sha256,
        "TLS certificate loaded"
    );
}

/// Polls `tls`'s files every `every` until `down` flips, logging and
/// counting each reload and each failure.
pub async fn watch(
    tls: Arc<ReloadingTls>,
    every: Duration,
    reloads: Family<TlsReloadLabels, Counter>,
    mut down: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::until_true(&mut down) => return,
        }
        let polled = {
            let tls = tls.clone();
            match tokio::task::spawn_blocking(move || tls.poll()).await {
                Ok(p) => p,
                Err(_) => continue,
            }
        };
        report(&tls, polled, &reloads);
    }
}

fn report(tls: &ReloadingTls, polled: Polled, reloads: &Family<TlsReloadLabels, Counter>) {
    let listener = tls.listener();
    let count = |result| {
        reloads
            .get_or_create(&TlsReloadLabels { listener, result })
            .inc();
    };
    match polled {
        Polled::Unchanged => {}
        Polled::Reloaded(r) => {
            count("ok");
            let file = r
                .changed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            info!(
                listener,
                file,
                serial = %r.leaf.serial,
                not_after = %r.leaf.not_after,
                sha256 = %r.leaf.sha256,
                "TLS certificate reloaded"
            );
        }
        Polled::Settling(e) => debug!(
            listener,
            file = %e.path().display(),
            error = %e,
            "TLS files changed but do not load yet; trying again at the next poll"
        ),
        Polled::Failed(e) => {
            count("error");
            warn!(
                listener,
                file = %e.path().display(),
                error = %e,
                "cannot reload TLS files; new connections keep the current certificate"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::tls::DevTls;

    struct Dir {
        dir: tempfile::TempDir,
    }

    impl Dir {
        fn new() -> Dir {
            Dir {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        /// Replaces a file the way a tool that is not kubelet may: in place.
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.path(name), text).unwrap();
        }
        /// Replaces the pair (and CA) the way kubelet does: a new directory,
        /// then one rename of the `..data` symlink.
        fn swap(&self, files: &[(&str, &str)]) {
            let generation = format!("..{}", fastrand::u64(..));
            std::fs::create_dir(self.path(&generation)).unwrap();
            for (name, text) in files {
                std::fs::write(self.path(&generation).join(name), text).unwrap();
                let link = self.path(name);
                if std::fs::symlink_metadata(&link).is_err() {
                    std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
                }
            }
            std::os::unix::fs::symlink(&generation, self.path("..data_tmp")).unwrap();
            std::fs::rename(self.path("..data_tmp"), self.path("..data")).unwrap();
        }
        fn files(&self, client_ca: bool) -> TlsFiles {
            TlsFiles {
                listener: "grpc",
                cert: ConfigFile::new("server.tls_cert_file", &self.path("tls.crt")),
                key: ConfigFile::new("server.tls_key_file", &self.path("tls.key")),
                client_ca: client_ca
                    .then(|| ConfigFile::new("admin.client_ca_file", &self.path("ca.crt"))),
                alpn: vec![b"h2".to_vec()],
            }
        }
    }

    fn leaf_der(tls: &DevTls) -> Vec<u8> {
        CertificateDer::from_pem_slice(tls.cert_pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// One handshake against `tls`'s current config: the leaf the server
    /// presented and whether the server accepted the client (its certificate
    /// `client`, if any). `trust` are the CAs the client trusts.
    async fn handshake(
        tls: &ReloadingTls,
        trust: &[&DevTls],
        client: Option<(&DevTls, usize)>,
    ) -> (Vec<u8>, bool) {
        let mut roots = rustls::RootCertStore::empty();
        for t in trust {
            roots
                .add(CertificateDer::from_pem_slice(t.ca_pem.as_bytes()).unwrap())
                .unwrap();
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((t, i)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(t.clients[i].cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(t.clients[i].key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let (c, s) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let acceptor = tls.acceptor();
        let server = async move {
            let s = acceptor.accept(s).await.ok()?;
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            Some(s)
        };
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        // A client the server refuses may see its handshake end or fail,
        // depending on timing (TLS 1.3 checks its certificate last): the
        // server's side decides.
        let client = async move {
            let c = connector.connect(name, c).await.ok()?;
            let leaf = c.get_ref().1.peer_certificates()?[0].to_vec();
            Some((leaf, c))
        };
        let (accepted, connected) = tokio::join!(server, client);
        let leaf = connected.map(|(leaf, _)| leaf).unwrap_or_default();
        (leaf, accepted.is_some())
    }

    #[tokio::test]
    async fn only_a_matching_pair_is_applied_and_a_failure_is_reported_once() {
        let (a, b, c) = (
            DevTls::generate().unwrap(),
            DevTls::generate().unwrap(),
            DevTls::generate().unwrap(),
        );
        let trust = [&a, &b, &c];
        let dir = Dir::new();
        dir.swap(&[("tls.crt", &a.cert_pem), ("tls.key", &a.key_pem)]);
        let (tls, leaf) = ReloadingTls::load(dir.files(false)).unwrap();
        assert!(
            !leaf.serial.is_empty() && leaf.not_after.ends_with('Z'),
            "{leaf:?}"
        );
        assert_eq!(handshake(&tls, &trust, None).await.0, leaf_der(&a));
        assert!(matches!(tls.poll(), Polled::Unchanged));

        // The certificate replaced before the key: not applied, and not
        // reported while it may still be settling.
        dir.write("..data/tls.crt", &b.cert_pem);
        let Polled::Settling(e) = tls.poll() else {
            panic!("a mismatched pair must not apply")
        };
        assert!(matches!(e, TlsFileError::Mismatch { .. }), "{e}");
        assert_eq!(handshake(&tls, &trust, None).await.0, leaf_der(&a));
        // The key follows before the next poll: applied, nothing reported.
        dir.write("..data/tls.key", &b.key_pem);
        let Polled::Reloaded(r) = tls.poll() else {
            panic!("the completed pair applies")
        };
        assert_eq!(r.changed, [dir.path("tls.crt"), dir.path("tls.key")]);
        assert_eq!(r.leaf.sha256, hex::encode(sha256(&leaf_der(&b))));
        assert_eq!(handshake(&tls, &trust, None).await.0, leaf_der(&b));
        assert!(matches!(tls.poll(), Polled::Unchanged));

        // A mismatch that stays: reported once, naming the key file; B stays.
        dir.swap(&[("tls.crt", &c.cert_pem), ("tls.key", &b.key_pem)]);
        assert!(matches!(tls.poll(), Polled::Settling(_)));
        let Polled::Failed(e) = tls.poll() else {
            panic!("a lasting mismatch is reported")
        };
        let text = e.to_string();
        assert_eq!(e.path(), dir.path("tls.key"));
        assert!(
            text.contains("key `server.tls_key_file`")
                && text.contains("does not match the certificate"),
            "{text}"
        );
        assert!(matches!(tls.poll(), Polled::Unchanged), "reported once");
        assert_eq!(handshake(&tls, &trust, None).await.0, leaf_der(&b));

        // A key that does not parse: named, and never echoed.
        let garbage = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n";
        dir.swap(&[("tls.crt", &c.cert_pem), ("tls.key", garbage)]);
        assert!(matches!(tls.poll(), Polled::Settling(_)));
        let Polled::Failed(e) = tls.poll() else {
            panic!("a broken key is reported")
        };
        assert_eq!(e.path(), dir.path("tls.key"));
        assert!(!format!("{e} {e:?}").contains("c2VjcmV0LWJ5dGVz"), "{e:?}");
        // A missing file (a volume unmounted): named too.
        std::fs::remove_file(dir.path("tls.crt")).unwrap();
        assert!(matches!(tls.poll(), Polled::Settling(_)));
        let Polled::Failed(e) = tls.poll() else {
            panic!("a missing file is reported")
        };
        assert!(matches!(e, TlsFileError::Read { .. }) && e.path() == dir.path("tls.crt"));
        assert_eq!(handshake(&tls, &trust, None).await.0, leaf_der(&b));

        // Fixed: C applies.
        std::os::unix::fs::symlink("..data/tls.crt", dir.path("tls.crt")).unwrap();
        dir.swap(&[("tls.crt", &c.cert_pem), ("tls.key", &c.key_pem)]);
        assert!(matches!(tls.poll(), Polled::Reloaded(_)));
        assert_eq!(handshake(&tls, &trust, None).await.0, leaf_der(&c));
    }

    #[tokio::test]
    async fn a_new_client_ca_replaces_the_old_one() {
        let old = DevTls::generate_with_clients(&["viewer"]).unwrap();
        let new = DevTls::generate_with_clients(&["viewer"]).unwrap();
        let dir = Dir::new();
        dir.swap(&[
            ("tls.crt", &old.cert_pem),
            ("tls.key", &old.key_pem),
            ("ca.crt", &old.ca_pem),
        ]);
        let (tls, _) = ReloadingTls::load(dir.files(true)).unwrap();
        let trust = [&old];
        assert!(handshake(&tls, &trust, Some((&old, 0))).await.1);
        assert!(!handshake(&tls, &trust, Some((&new, 0))).await.1);
        assert!(
            handshake(&tls, &trust, None).await.1,
            "a client cert is optional"
        );

        dir.swap(&[
            ("tls.crt", &old.cert_pem),
            ("tls.key", &old.key_pem),
            ("ca.crt", &new.ca_pem),
        ]);
        let Polled::Reloaded(r) = tls.poll() else {
            panic!("a new CA applies")
        };
        assert_eq!(r.changed, [dir.path("ca.crt")]);
        assert!(handshake(&tls, &trust, Some((&new, 0))).await.1);
        assert!(!handshake(&tls, &trust, Some((&old, 0))).await.1);

        // A CA file with no certificate in it is refused, naming it.
        dir.swap(&[
            ("tls.crt", &old.cert_pem),
            ("tls.key", &old.key_pem),
            ("ca.crt", "nothing\n"),
        ]);
        assert!(matches!(tls.poll(), Polled::Settling(_)));
        let Polled::Failed(e) = tls.poll() else {
            panic!("an empty CA is reported")
        };
        assert!(e.to_string().contains("key `admin.client_ca_file`"), "{e}");
        assert!(handshake(&tls, &trust, Some((&new, 0))).await.1);
    }

    #[test]
    fn a_start_with_bad_files_names_the_file_and_key() {
        let a = DevTls::generate().unwrap();
        let dir = Dir::new();
        dir.write("tls.crt", &a.cert_pem);
        let e = ReloadingTls::load(dir.files(false)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("key `server.tls_key_file`: cannot read TLS file"),
            "{e}"
        );
        dir.write("tls.key", &DevTls::generate().unwrap().key_pem);
        let e = ReloadingTls::load(dir.files(false)).unwrap_err();
        assert!(matches!(e, TlsFileError::Mismatch { .. }), "{e}");
        dir.write("tls.crt", "not a certificate\n");
        let e = ReloadingTls::load(dir.files(false)).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
    }
}
