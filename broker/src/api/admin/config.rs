//! `[admin]` in the broker's config: the admin listener, its TLS files, and
//! the operators' client certificates mapped to roles. Every key is
//! documented in `examples/broker.toml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config_check::{ConfigError, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    listen: String,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    client_ca_file: PathBuf,
    #[serde(default)]
    clients: Vec<RawAdminClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminClient {
    name: String,
    subject_cn: Option<String>,
    san: Option<String>,
    role: String,
}

/// What an admin client may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// List revocations and leases, read the audit log, list secret names.
    Viewer,
    /// Also create and delete revocation rules.
    Revoker,
    /// Also read and write the embedded store's secrets.
    Admin,
}

/// An operator's client certificate, mapped to a role.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// Recorded as the actor in the audit log.
    pub name: String,
    /// Matches the certificate's subject common name.
    pub subject_cn: Option<String>,
    /// Matches one of the certificate's subject alternative names (DNS, email, URI).
    pub san: Option<String>,
    pub role: AdminRole,
}

/// The admin API: HTTPS, client certificates signed by `client_ca_file`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: std::net::SocketAddr,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub client_ca_file: PathBuf,
    pub clients: Vec<AdminClient>,
}

/// Validates `[admin]`; without its own certificate and key it uses the
/// gRPC listener's (`server_cert`, `server_key`, already resolved).
pub(crate) fn validate(
    v: &Validator<'_>,
    a: RawAdmin,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    server_cert: &Path,
    server_key: &Path,
) -> Result<AdminConfig, ConfigError> {
    let listen = a.listen.parse().map_err(|e| {
        v.err(
            "admin.listen",
            format!("not an address like 0.0.0.0:8444: {e}"),
        )
    })?;
    let mut clients: Vec<AdminClient> = Vec::new();
    for (i, c) in a.clients.into_iter().enumerate() {
        let key = |f: &str| format!("admin.clients[{i}].{f}");
        let role = match c.role.as_str() {
            "viewer" => AdminRole::Viewer,
            "revoker" => AdminRole::Revoker,
            "admin" => AdminRole::Admin,
            other => {
                return Err(v.err(
                    &key("role"),
                    format!("{other:?}: use viewer, revoker or admin"),
                ));
            }
        };
        if c.subject_cn.is_none() == c.san.is_none() {
            return Err(v.err(&key("subject_cn"), "set exactly one of subject_cn and san"));
        }
        if c.name.trim().is_empty() || clients.iter().any(|o| o.name == c.name) {
            return Err(v.err(&key("name"), "give each client a unique, non-empty name"));
        }
        clients.push(AdminClient {
            name: c.name,
            subject_cn: c.subject_cn,
            san: c.san,
            role,
        });
    }
    Ok(AdminConfig {
        listen,
        tls_cert_file: a
            .tls_cert_file
            .map(resolve)
            .unwrap_or_else(|| server_cert.to_owned()),
        tls_key_file: a
            .tls_key_file
            .map(resolve)
            .unwrap_or_else(|| server_key.to_owned()),
        client_ca_file: resolve(a.client_ca_file),
        clients,
    })
}
