//! Throwaway TLS material for `secrets-broker dev` and tests: a CA and a
//! P-256 server certificate for `localhost` and `127.0.0.1` signed by it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use zeroize::Zeroizing;

/// A CA plus one server certificate and any client certificates, PEM-encoded.
pub struct DevTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    /// Client certificates (for the admin API) by common name.
    pub clients: Vec<ClientCert>,
}

/// A client certificate whose subject CN is `name`.
pub struct ClientCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

/// Paths of the files [`DevTls::write`] created.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevTls {
    /// Generates a fresh CA and a server certificate for local names.
    pub fn generate() -> Result<DevTls, rcgen::Error> {
        Self::generate_with_clients(&[])
    }

    /// Like [`DevTls::generate`], plus one client certificate per common name.
    pub fn generate_with_clients(client_names: &[&str]) -> Result<DevTls, rcgen::Error> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "secrets-broker dev CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "secrets-broker dev");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let mut clients = Vec::new();
        for name in client_names {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, *name);
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            clients.push(ClientCert {
                name: (*name).to_owned(),
                cert_pem: cert.pem(),
                key_pem: Zeroizing::new(key.serialize_pem()),
            });
        }
        Ok(DevTls {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            clients,
        })
    }

    /// Writes `ca.crt`, `tls.crt`, `tls.key` (0600), and `<name>.crt` /
    /// `<name>.key` for each client into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<TlsFiles> {
        std::fs::create_dir_all(dir)?;
        let files = TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&files.ca, &self.ca_pem)?;
        std::fs::write(&files.cert, &self.cert_pem)?;
        write_private(&files.key, &self.key_pem)?;
        for c in &self.clients {
            std::fs::write(dir.join(format!("{}.crt", c.name)), &c.cert_pem)?;
            write_private(&dir.join(format!("{}.key", c.name)), &c.key_pem)?;
        }
        Ok(files)
    }

    /// A rustls server config presenting the server certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        crate::install_crypto_provider();
        let certs = vec![
            CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
                .map_err(|e| rustls::Error::General(e.to_string()))?,
        ];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?
        .write_all(pem.as_bytes())
}
