//! Workload identity: who a caller is, proven by a token the broker verifies
//! itself (never by what the caller claims).
//!
//! - [`config`]: the trusted issuers (`[identity]` or `[[issuers]]`), validated;
//!   [`algorithm`]: the signature algorithms they may use.
//! - [`jwks`]: the issuer's signing keys (OIDC discovery + JWKS over HTTPS, or
//!   a static JWKS file), cached, refreshed on unknown `kid` with a rate limit.
//! - [`verify`]: token → [`Identity`]: size and shape, algorithm allow-list,
//!   no header-supplied keys, signature, `iss`/`aud`/`exp`/`nbf`/`iat`, and the
//!   `kubernetes.io` claims agreeing with `sub`; [`verify::Verifiers`] picks
//!   the issuer. Its steps: [`token`] (the token before anything in it is
//!   trusted), [`claims`] (claims → identity); [`error::TokenError`] (why a
//!   token is refused).

pub mod algorithm;
pub mod claims;
pub mod config;
pub mod error;
pub mod jwks;
pub mod token;
pub mod tokenreview;
pub mod verify;

use std::fmt;

use serde::Serialize;

/// A verified Kubernetes workload identity. Always qualified by its issuer, so
/// `ns/sa` of one cluster is never `ns/sa` of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The cluster of the issuer that signed the token (from the config).
    pub cluster: String,
    pub issuer: String,
    pub subject: String,
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    /// Set when the token is bound to a pod (projected tokens are).
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// The token's audiences, for roles bound to one audience.
    pub audiences: Vec<String>,
    /// Unix time the token expires.
    pub expires_at: i64,
}

impl Identity {
    #[cfg(test)]
    pub(crate) fn for_test(namespace: &str, service_account: &str) -> Identity {
        Identity {
            cluster: "default".into(),
            issuer: "https://issuer.test".into(),
            subject: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.into(),
            service_account: service_account.into(),
            service_account_uid: "uid".into(),
            pod_name: None,
            pod_uid: None,
            audiences: vec!["secrets-broker".into()],
            expires_at: i64::MAX,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        if let Some(pod) = &self.pod_name {
            write!(f, " (pod {pod})")?;
        }
        write!(f, " in cluster {} ({})", self.cluster, self.issuer)
    }
}

/// A short, stable fingerprint of a token for logs and errors: the first 8
/// bytes of its SHA-256, so a rejected token can be correlated without
/// revealing it.
pub fn fingerprint(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    hex::encode(&digest.as_ref()[..8])
}
