//! `[identity]` (one cluster) or `[[issuers]]` (several) in the broker's
//! config: which token issuers are trusted, where their keys come from, and
//! how tokens are checked. Every key is documented in `examples/broker.toml`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::algorithm::Algorithm;
use super::tokenreview::Mode;
use crate::config_check::{ConfigError, Validator};
use crate::policy::valid_role_name;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    /// Names the cluster in identities, roles and logs; default "default".
    cluster: Option<String>,
    issuer: String,
    audiences: Vec<String>,
    discovery_url: Option<String>,
    jwks_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_algorithms")]
    algorithms: Vec<String>,
    #[serde(default = "default_leeway", with = "humantime_serde")]
    leeway: Duration,
    #[serde(default = "default_jwks_refresh_min", with = "humantime_serde")]
    jwks_refresh_min_interval: Duration,
    #[serde(default = "default_jwks_max_age", with = "humantime_serde")]
    jwks_max_age: Duration,
    #[serde(default = "default_max_token_bytes")]
    max_token_bytes: usize,
    #[serde(default = "default_max_token_lifetime", with = "humantime_serde")]
    max_token_lifetime: Duration,
    #[serde(default = "default_true")]
    require_pod_binding: bool,
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    http_timeout: Duration,
    #[serde(default)]
    mode: Option<String>,
    kubeconfig: Option<PathBuf>,
    #[serde(default = "default_review_cache", with = "humantime_serde")]
    tokenreview_cache: Duration,
    #[serde(default = "default_verify_cache", with = "humantime_serde")]
    verify_cache: Duration,
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    tokenreview_timeout: Duration,
    on_api_error: Option<String>,
}

fn default_verify_cache() -> Duration {
    Duration::from_secs(300)
}

fn default_review_cache() -> Duration {
    Duration::from_secs(5)
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_refresh_min() -> Duration {
    Duration::from_secs(10)
}
fn default_jwks_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_true() -> bool {
    true
}
/// Tokens of this broker's audience come from a projected volume
/// (`expirationSeconds`, 1 h by default, capped by the API server's
/// `--service-account-max-token-expiration`); EKS's IRSA tokens live 24 h.
fn default_max_token_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_token_bytes() -> usize {
    16 * 1024
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Where keys come from: the issuer's discovery document (the default) or a
/// static JWKS file for air-gapped clusters.
#[derive(Debug, Clone)]
pub enum KeySource {
    Discovery {
        url: String,
        ca_file: Option<PathBuf>,
    },
    StaticFile(PathBuf),
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The cluster this issuer stands for: identities are qualified by it.
    pub cluster: String,
    /// Offline keys, the API server's TokenReview, or both.
    pub mode: Mode,
    /// Where the broker's own credentials for TokenReview are; `None`: in-cluster.
    pub kubeconfig: Option<PathBuf>,
    pub tokenreview_cache: Duration,
    /// How long a verified token is remembered (0: never).
    pub verify_cache: Duration,
    pub tokenreview_timeout: Duration,
    /// In `jwks+tokenreview` mode, accept offline-verified tokens while the
    /// API server cannot be asked (default: refuse).
    pub allow_on_api_error: bool,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    /// Unknown `kid`s trigger a JWKS refresh at most this often, so a flood of
    /// bogus kids cannot hammer the issuer.
    pub jwks_refresh_min_interval: Duration,
    /// Keys are refetched in the background this often.
    pub jwks_max_age: Duration,
    pub max_token_bytes: usize,
    /// A token whose `exp - iat` (or, without `iat`, whose remaining life)
    /// is longer than this is refused; zero: no ceiling.
    pub max_token_lifetime: Duration,
    /// A token must name its pod (`kubernetes.io.pod`, or TokenReview's
    /// pod extra), so a revocation by pod UID can cut it off.
    pub require_pod_binding: bool,
    pub http_timeout: Duration,
}

/// Validates the trusted issuers: one `[identity]` table or several
/// `[[issuers]]` (not both), each its own cluster and issuer.
pub(crate) fn issuers(
    v: &Validator<'_>,
    identity: Option<RawIdentity>,
    issuers: Vec<RawIdentity>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Vec<IdentityConfig>, ConfigError> {
    let mut configs: Vec<IdentityConfig> = Vec::new();
    let raw_issuers: Vec<(String, RawIdentity)> = match (identity, issuers) {
        (Some(id), list) if list.is_empty() => vec![("identity".to_owned(), id)],
        (None, list) if !list.is_empty() => list
            .into_iter()
            .enumerate()
            .map(|(i, id)| (format!("issuers[{i}]"), id))
            .collect(),
        (None, _) => {
            return Err(v.err(
                "identity",
                "configure the token issuer: an [identity] table, or [[issuers]] for several clusters",
            ));
        }
        (Some(_), _) => {
            return Err(v.err("issuers", "use either [identity] or [[issuers]], not both"));
        }
    };
    for (prefix, id) in raw_issuers {
        let config = issuer(v, &prefix, id, resolve)?;
        if configs.iter().any(|o| o.cluster == config.cluster) {
            return Err(v.err(
                &format!("{prefix}.cluster"),
                format!("cluster {:?} is named twice", config.cluster),
            ));
        }
        if configs.iter().any(|o| o.issuer == config.issuer) {
            return Err(v.err(
                &format!("{prefix}.issuer"),
                format!("issuer {:?} is listed twice", config.issuer),
            ));
        }
        configs.push(config);
    }
    Ok(configs)
}

/// Validates one issuer's table; `prefix` is its key in the file
/// (`identity` or `issuers[i]`).
fn issuer(
    v: &Validator<'_>,
    prefix: &str,
    id: RawIdentity,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<IdentityConfig, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    if !id.issuer.starts_with("https://") {
        return Err(v.err(&key("issuer"), "must be an https:// URL"));
    }
    if id.audiences.is_empty() || id.audiences.iter().any(|a| a.trim().is_empty()) {
        return Err(v.err(
            &key("audiences"),
            "list at least one non-empty audience (e.g. \"secrets-broker\")",
        ));
    }
    let cluster = id.cluster.unwrap_or_else(|| "default".to_owned());
    if !valid_role_name(&cluster) {
        return Err(v.err(
            &key("cluster"),
            "use 1-63 characters from a-z, 0-9, '-', '_' and '.'",
        ));
    }
    let keys = match (id.jwks_file, id.discovery_url) {
        (Some(_), Some(_)) => {
            return Err(v.err(
                &key("jwks_file"),
                "set either jwks_file or discovery_url, not both",
            ));
        }
        (Some(file), None) => KeySource::StaticFile(resolve(file)),
        (None, url) => {
            let url = url.unwrap_or_else(|| {
                format!(
                    "{}/.well-known/openid-configuration",
                    id.issuer.trim_end_matches('/')
                )
            });
            if !url.starts_with("https://") {
                return Err(v.err(&key("discovery_url"), "must be an https:// URL"));
            }
            KeySource::Discovery {
                url,
                ca_file: id.ca_file.map(resolve),
            }
        }
    };
    let mut algorithms = Vec::new();
    for name in &id.algorithms {
        let alg = Algorithm::from_name(name)
            .map_err(|m| v.err(&key("algorithms"), format!("{name:?}: {m}")))?;
        algorithms.push(alg);
    }
    if algorithms.is_empty() {
        return Err(v.err(&key("algorithms"), "list at least one algorithm"));
    }
    let mode = match &id.mode {
        None => Mode::Jwks,
        Some(m) => Mode::parse(m).map_err(|e| v.err(&key("mode"), e))?,
    };
    let allow_on_api_error = match id.on_api_error.as_deref() {
        None | Some("deny") => false,
        Some("allow") if mode == Mode::JwksAndTokenReview => true,
        Some("allow") => {
            return Err(v.err(
                &key("on_api_error"),
                "\"allow\" applies to mode \"jwks+tokenreview\" only",
            ));
        }
        Some(other) => {
            return Err(v.err(
                &key("on_api_error"),
                format!("{other:?}: use deny or allow"),
            ));
        }
    };
    Ok(IdentityConfig {
        cluster,
        mode,
        kubeconfig: id.kubeconfig.map(resolve),
        verify_cache: v.bounded(
            &key("verify_cache"),
            id.verify_cache,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?,
        tokenreview_cache: v.bounded(
            &key("tokenreview_cache"),
            id.tokenreview_cache,
            Duration::ZERO,
            Duration::from_secs(300),
        )?,
        tokenreview_timeout: v.bounded(
            &key("tokenreview_timeout"),
            id.tokenreview_timeout,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?,
        allow_on_api_error,
        issuer: id.issuer,
        audiences: id.audiences,
        keys,
        algorithms,
        leeway: v.bounded(
            &key("leeway"),
            id.leeway,
            Duration::ZERO,
            Duration::from_secs(300),
        )?,
        jwks_refresh_min_interval: v.bounded(
            &key("jwks_refresh_min_interval"),
            id.jwks_refresh_min_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?,
        jwks_max_age: v.bounded(
            &key("jwks_max_age"),
            id.jwks_max_age,
            Duration::from_secs(10),
            Duration::from_secs(7 * 24 * 3600),
        )?,
        max_token_bytes: if (256..=1 << 20).contains(&id.max_token_bytes) {
            id.max_token_bytes
        } else {
            return Err(v.err(&key("max_token_bytes"), "must be between 256 and 1048576"));
        },
        require_pod_binding: id.require_pod_binding,
        max_token_lifetime: match id.max_token_lifetime {
            Duration::ZERO => Duration::ZERO,
            lifetime => v.bounded(
                &key("max_token_lifetime"),
                lifetime,
                Duration::from_secs(60),
                Duration::from_secs(366 * 24 * 3600),
            )?,
        },
        http_timeout: v.bounded(
            &key("http_timeout"),
            id.http_timeout,
            Duration::from_millis(100),
            Duration::from_secs(120),
        )?,
    })
}
