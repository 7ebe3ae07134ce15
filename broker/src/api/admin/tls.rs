//! The admin listener's TLS: client certificates mapped to callers, and
//! the server config (reloaded when its files change).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use super::bounds::summary;
use super::config::{AdminClient, AdminConfig};
use super::handler::Caller;
use crate::api::tls_reload::{ConfigFile, ReloadingTls, TlsFiles};

/// A SAN of one type, as a certificate carries it or a rule names it.
#[derive(Debug, PartialEq, Eq)]
enum San<'a> {
    Dns(&'a str),
    Email(&'a str),
    Uri(&'a str),
}

impl<'a> San<'a> {
    /// The SAN an `[[admin.clients]] san` names: typed by its prefix
    /// (`uri:`, `dns:`, `email:`), else by its shape (`://` a URI, `@` an
    /// email address, anything else a DNS name). It matches a SAN of that
    /// type only, so a DNS name never satisfies a rule meant for a URI.
    fn of_rule(rule: &'a str) -> San<'a> {
        if let Some(v) = rule.strip_prefix("uri:") {
            San::Uri(v)
        } else if let Some(v) = rule.strip_prefix("dns:") {
            San::Dns(v)
        } else if let Some(v) = rule.strip_prefix("email:") {
            San::Email(v)
        } else if rule.contains("://") {
            San::Uri(rule)
        } else if rule.contains('@') {
            San::Email(rule)
        } else {
            San::Dns(rule)
        }
    }
}

/// Maps a verified client certificate to a caller. A `subject_cn` rule
/// matches only a subject with exactly one CN (`CN=nobody, CN=admin` is
/// nobody's); a `san` rule matches one SAN of its own type.
pub fn identify(cert: Option<&CertificateDer<'_>>, clients: &[AdminClient]) -> Caller {
    let Some(cert) = cert else {
        return Caller::Anonymous;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Caller::Unknown {
            subject: "unparsable certificate".into(),
        };
    };
    let cns: Vec<Option<&str>> = parsed
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().ok())
        .collect();
    let cn = match cns.as_slice() {
        [Some(one)] => Some(*one),
        _ => None,
    };
    let mut sans: Vec<San<'_>> = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            use x509_parser::extensions::GeneralName as G;
            match name {
                G::DNSName(s) => sans.push(San::Dns(s)),
                G::RFC822Name(s) => sans.push(San::Email(s)),
                G::URI(s) => sans.push(San::Uri(s)),
                _ => {}
            }
        }
    }
    for c in clients {
        let by_cn = c.subject_cn.as_deref().is_some_and(|want| cn == Some(want));
        let by_san = c
            .san
            .as_deref()
            .is_some_and(|want| sans.contains(&San::of_rule(want)));
        if by_cn || by_san {
            return Caller::Known {
                name: c.name.clone(),
                role: c.role,
            };
        }
    }
    Caller::Unknown {
        subject: summary(&parsed.subject().to_string()),
    }
}

/// Loads the TLS config, read again when its files change (see
/// [`crate::api::tls_reload`]): client certificates are verified against
/// the client CA when presented, and not required at the handshake, so that
/// a caller without one gets a clear 401 instead of a TLS alert.
pub fn tls_config(cfg: &AdminConfig) -> Result<Arc<ReloadingTls>, String> {
    let files = TlsFiles {
        listener: "admin",
        cert: ConfigFile::new("admin.tls_cert_file", &cfg.tls_cert_file),
        key: ConfigFile::new("admin.tls_key_file", &cfg.tls_key_file),
        client_ca: Some(ConfigFile::new("admin.client_ca_file", &cfg.client_ca_file)),
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    let (tls, leaf) = ReloadingTls::load(files).map_err(|e| e.to_string())?;
    crate::api::tls_reload::log_loaded(&tls, &leaf);
    Ok(Arc::new(tls))
}

/// Reads a PEM certificate chain and its private key (the key bytes are
/// zeroized after parsing). Errors name the file.
pub fn load_cert_and_key(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&zeroize::Zeroizing::new(read(key_file)?))
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::admin::AdminRole;
    use rcgen::{DnType, DnValue, SanType};

    /// A self-signed certificate with these subject CNs (in order) and SANs.
    fn cert(cns: &[&str], sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (i, cn) in cns.iter().enumerate() {
            // rcgen keeps one value per type: further CNs go in under the
            // CN's OID (2.5.4.3) as a "custom" type.
            let ty = if i == 0 {
                DnType::CommonName
            } else {
                DnType::CustomDnType(vec![2, 5, 4, 3])
            };
            params
                .distinguished_name
                .push(ty, DnValue::Utf8String((*cn).to_owned()));
        }
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn client(name: &str, cn: Option<&str>, san: Option<&str>, role: AdminRole) -> AdminClient {
        AdminClient {
            name: name.into(),
            subject_cn: cn.map(Into::into),
            san: san.map(Into::into),
            role,
        }
    }

    fn role_of(cert: &CertificateDer<'_>, clients: &[AdminClient]) -> Option<String> {
        match identify(Some(cert), clients) {
            Caller::Known { name, .. } => Some(name),
            _ => None,
        }
    }

    #[test]
    fn a_subject_with_two_cns_matches_no_cn_rule() {
        let clients = [
            client("admin", Some("admin"), None, AdminRole::Admin),
            client("nobody", Some("nobody"), None, AdminRole::Viewer),
        ];
        let two = cert(&["nobody", "admin"], vec![]);
        let x509 = x509_parser::parse_x509_certificate(two.as_ref()).unwrap().1;
        assert_eq!(x509.subject().iter_common_name().count(), 2, "fixture");
        assert_eq!(role_of(&two, &clients), None);
        assert_eq!(
            role_of(&cert(&["admin"], vec![]), &clients).as_deref(),
            Some("admin")
        );
    }

    #[test]
    fn a_san_rule_matches_only_a_san_of_its_type() {
        let ia5 = |s: &str| rcgen::string::Ia5String::try_from(s).unwrap();
        let spiffe = "spiffe://cluster.local/ns/ops/sa/oncall";
        let clients = [
            client("by-uri", None, Some(spiffe), AdminRole::Admin),
            client(
                "by-dns",
                None,
                Some("uri:dashboards.svc"),
                AdminRole::Viewer,
            ),
        ];
        // A DNS SAN spelled like the URI does not match the URI rule.
        let dns = cert(&["x"], vec![SanType::DnsName(ia5(spiffe))]);
        assert_eq!(role_of(&dns, &clients), None);
        let uri = cert(&["x"], vec![SanType::URI(ia5(spiffe))]);
        assert_eq!(role_of(&uri, &clients).as_deref(), Some("by-uri"));
        // An explicitly typed rule: `uri:` never matches a DNS SAN.
        let dns = cert(&["x"], vec![SanType::DnsName(ia5("dashboards.svc"))]);
        assert_eq!(role_of(&dns, &clients), None);
        let typed = [client(
            "dash",
            None,
            Some("dns:dashboards.svc"),
            AdminRole::Viewer,
        )];
        assert_eq!(role_of(&dns, &typed).as_deref(), Some("dash"));
        let untyped = [client(
            "dash",
            None,
            Some("dashboards.svc"),
            AdminRole::Viewer,
        )];
        assert_eq!(role_of(&dns, &untyped).as_deref(), Some("dash"));
        assert_eq!(role_of(&uri, &untyped), None);
    }
}
