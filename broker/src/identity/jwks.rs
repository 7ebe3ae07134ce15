//! The issuer's signing keys.
//!
//! Keys come from the issuer's OIDC discovery document (`jwks_uri`, HTTPS only,
//! optional custom CA bundle) or from a static JWKS file. They are cached; a
//! token whose `kid` is unknown triggers a refresh, at most once per
//! `jwks_refresh_min_interval`, so key rotation at the issuer works while a
//! flood of bogus `kid`s cannot hammer it. Concurrent refreshes coalesce.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::config::{IdentityConfig, KeySource};
use crate::error_chain::error_chain;
use crate::telemetry::metrics::ResultLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Largest discovery document or JWKS accepted from an issuer.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Smallest RSA modulus kept from a JWKS. Smaller keys can be factored, and
/// the verifier would refuse their signatures anyway.
pub const MIN_RSA_BITS: usize = 2048;

/// Why keys could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    /// The issuer's discovery document or JWKS could not be fetched (network,
    /// TLS trust, HTTP status). Usually a wrong URL or a missing `ca_file`.
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    /// The document was fetched but is not what an OIDC issuer serves.
    #[error("{what} from {source_name} is invalid: {message}")]
    Invalid {
        what: &'static str,
        source_name: String,
        message: String,
    },
    /// A refresh was attempted too recently; keys are not refetched yet.
    #[error("signing keys were refreshed less than {0:?} ago")]
    RateLimited(Duration),
}

/// One usable verification key.
#[derive(Clone)]
pub struct Key {
    pub key: DecodingKey,
    /// The JWK's `alg`, when it names one: the token must then use exactly it.
    pub alg: Option<String>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Vec<Key>>,
    /// Keys published without a `kid`.
    unnamed: Vec<Key>,
    /// RSA keys refused for being under [`MIN_RSA_BITS`], by `kid` (`None`
    /// for a key without one), with their size: a token signed by one is
    /// refused by saying so.
    weak: HashMap<Option<String>, usize>,
    fetched_at: Option<Instant>,
}

/// The key cache of one issuer.
pub struct Jwks {
    source: KeySource,
    issuer: String,
    client: Option<reqwest::Client>,
    min_refresh: Duration,
    max_age: Duration,
    keys: RwLock<Arc<KeySet>>,
    /// Held while refreshing; holds the time of the last attempt.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Refreshes by result, for `secrets_broker_jwks_refreshes_total`.
    pub refreshes: Family<ResultLabels, Counter>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

impl Jwks {
    /// Builds the cache; fetches nothing yet (see [`Jwks::refresh`]).
    pub fn new(cfg: &IdentityConfig) -> Result<Jwks, JwksError> {
        let client = match &cfg.keys {
            KeySource::StaticFile(_) => None,
            KeySource::Discovery { url, ca_file } => {
                let mut builder = reqwest::Client::builder()
                    .timeout(cfg.http_timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .https_only(true);
                if let Some(ca_file) = ca_file {
                    let pem = std::fs::read(ca_file).map_err(|e| JwksError::Fetch {
                        url: url.clone(),
                        message: format!("cannot read identity.ca_file {}: {e}", ca_file.display()),
                    })?;
                    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                        JwksError::Invalid {
                            what: "CA bundle",
                            source_name: ca_file.display().to_string(),
                            message: e.to_string(),
                        }
                    })?;
                    // With a CA bundle, trust only it: the issuer is pinned.
                    builder = builder.tls_certs_only(certs);
                }
                Some(builder.build().map_err(|e| JwksError::Fetch {
                    url: url.clone(),
                    message: format!("cannot build HTTPS client: {e}"),
                })?)
            }
        };
        Ok(Jwks {
            source: cfg.keys.clone(),
            issuer: cfg.issuer.clone(),
            client,
            min_refresh: cfg.jwks_refresh_min_interval,
            max_age: cfg.jwks_max_age,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(None),
            refreshes: Family::default(),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether keys have been loaded at least once (for readiness).
    /// Whether the cached keys still hold one with this `kid` (or, without
    /// a `kid`, any key published without one). Never fetches.
    pub fn has_key(&self, kid: Option<&str>) -> bool {
        let set = self.current();
        match kid {
            Some(kid) => set.by_kid.contains_key(kid),
            None => !set.unnamed.is_empty(),
        }
    }

    /// The size of a published RSA key refused for being too small, when
    /// the token's `kid` names one (or, without a `kid`, one without a `kid`).
    pub fn weak_key(&self, kid: Option<&str>) -> Option<usize> {
        self.current().weak.get(&kid.map(str::to_owned)).copied()
    }

    pub fn is_loaded(&self) -> bool {
        self.current().fetched_at.is_some()
    }

    /// Candidate keys for a token header's `kid` (or, without a `kid`, every
    /// key the issuer published without one). An unknown `kid` refreshes the
    /// cache first, within the rate limit.
    pub async fn keys_for(&self, kid: Option<&str>) -> Result<Vec<Key>, JwksError> {
        let lookup = |set: &KeySet| -> Vec<Key> {
            match kid {
                Some(kid) => set.by_kid.get(kid).cloned().unwrap_or_default(),
                None => set.unnamed.clone(),
            }
        };
        let found = lookup(&self.current());
        if !found.is_empty() {
            return Ok(found);
        }
        match self.refresh(false).await {
            Ok(()) => Ok(lookup(&self.current())),
            Err(JwksError::RateLimited(_)) => Ok(Vec::new()),
            // With keys cached, an unreachable issuer only means this kid is unknown.
            Err(e) if self.is_loaded() => {
                debug!(error = %e, "signing key refresh failed; keeping cached keys");
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps the keys fresh: loads them (retrying with backoff until they
    /// load, then calling `on_loaded`), then refetches every `jwks_max_age`.
    /// A failed periodic refetch keeps the cached keys. Runs until dropped.
    pub async fn keep_fresh(&self, on_loaded: impl AsyncFnOnce()) {
        let mut delay = Duration::from_millis(200);
        while let Err(e) = self.refresh(true).await {
            warn!(error = %e, retry_in = ?delay, "cannot load the issuer's signing keys");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        on_loaded().await;
        loop {
            tokio::time::sleep(self.max_age).await;
            if let Err(e) = self.refresh(true).await {
                warn!(error = %e, "periodic signing key refresh failed; keeping cached keys");
            }
        }
    }

    /// Refetches the keys. Without `force`, at most once per
    /// `jwks_refresh_min_interval`; callers that waited on a concurrent
    /// refresh reuse its result.
    pub async fn refresh(&self, force: bool) -> Result<(), JwksError> {
        let before = self.current().fetched_at;
        let mut last = self.refresh.lock().await;
        if self.current().fetched_at != before {
            return Ok(()); // someone refreshed while we waited
        }
        if let Some(t) = *last
            && !force
            && t.elapsed() < self.min_refresh
        {
            return Err(JwksError::RateLimited(self.min_refresh));
        }
        *last = Some(Instant::now());
        let fetched = self.fetch().await;
        let parsed = fetched.and_then(|(raw, source)| parse_jwks(&raw, &source));
        let result = if parsed.is_ok() { "ok" } else { "error" };
        self.refreshes.get_or_create(&ResultLabels { result }).inc();
        let set = parsed?;
        // Logged once per key: not again on each periodic refetch.
        let before = self.current();
        for (kid, bits) in &set.weak {
            if !before.weak.contains_key(kid) {
                warn!(
                    issuer = %self.issuer,
                    kid = kid.as_deref().unwrap_or("(none)"),
                    bits,
                    min_bits = MIN_RSA_BITS,
                    "refusing the issuer's RSA signing key: smaller than {MIN_RSA_BITS} bits; tokens it signs are refused"
                );
            }
        }
        let count = set.by_kid.values().map(Vec::len).sum::<usize>() + set.unnamed.len();
        info!(issuer = %self.issuer, keys = count, "signing keys loaded");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        Ok(())
    }

    /// The JWKS document and where it came from (the file, or the
    /// discovery document's `jwks_uri`), so errors name what was wrong.
    async fn fetch(&self) -> Result<(Vec<u8>, String), JwksError> {
        match (&self.source, &self.client) {
            (KeySource::StaticFile(path), _) => tokio::fs::read(path)
                .await
                .map(|raw| (raw, path.display().to_string()))
                .map_err(|e| JwksError::Fetch {
                    url: path.display().to_string(),
                    message: e.to_string(),
                }),
            (KeySource::Discovery { url, .. }, Some(client)) => {
                let body = get(client, url).await?;
                let doc: Discovery =
                    serde_json::from_slice(&body).map_err(|e| JwksError::Invalid {
                        what: "discovery document",
                        source_name: url.clone(),
                        message: e.to_string(),
                    })?;
                if doc.issuer != self.issuer {
                    return Err(JwksError::Invalid {
                        what: "discovery document",
                        source_name: url.clone(),
                        message: format!(
                            "its issuer {:?} differs from identity.issuer {:?}",
                            doc.issuer, self.issuer
                        ),
                    });
                }
                if !doc.jwks_uri.starts_with("https://") {
                    return Err(JwksError::Invalid {
                        what: "discovery document",
                        source_name: url.clone(),
                        message: format!("jwks_uri {:?} is not https://", doc.jwks_uri),
                    });
                }
                let raw = get(client, &doc.jwks_uri).await?;
                Ok((raw, doc.jwks_uri))
            }
            (KeySource::Discovery { url, .. }, None) => Err(JwksError::Fetch {
                url: url.clone(),
                message: "no HTTPS client".into(),
            }),
        }
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, JwksError> {
    let fail = |message: String| JwksError::Fetch {
        url: url.to_owned(),
        message,
    };
    let mut resp = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP status {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(fail(format!(
                "response larger than {MAX_DOCUMENT_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses a JWKS document. Keys of unsupported types, encryption keys and
/// malformed entries are skipped with a warning; a document with no usable
/// key is an error.
fn parse_jwks(raw: &[u8], source_name: &str) -> Result<KeySet, JwksError> {
    let invalid = |message: String| JwksError::Invalid {
        what: "JWKS",
        source_name: source_name.to_owned(),
        message,
    };
    let doc: RawJwks = serde_json::from_slice(raw).map_err(|e| invalid(e.to_string()))?;
    let mut set = KeySet {
        fetched_at: Some(Instant::now()),
        ..KeySet::default()
    };
    for (i, value) in doc.keys.into_iter().enumerate() {
        if value.get("use").and_then(|u| u.as_str()) == Some("enc") {
            continue;
        }
        let alg = value.get("alg").and_then(|a| a.as_str()).map(str::to_owned);
        if let Some(bits) = rsa_bits(&value)
            && bits < MIN_RSA_BITS
        {
            let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
            set.weak.insert(kid, bits);
            continue;
        }
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                warn!(source = source_name, index = i, error = %e, "skipping unusable JWKS entry");
                continue;
            }
        };
        let key = match DecodingKey::from_jwk(&jwk) {
            Ok(key) => Key { key, alg },
            Err(e) => {
                warn!(source = source_name, index = i, error = %e, "skipping unusable JWKS key");
                continue;
            }
        };
        match jwk.common.key_id {
            Some(kid) => set.by_kid.entry(kid).or_default().push(key),
            None => set.unnamed.push(key),
        }
    }
    if set.by_kid.is_empty() && set.unnamed.is_empty() {
        return Err(invalid(if set.weak.is_empty() {
            "no usable signing key".into()
        } else {
            format!("no usable signing key (RSA keys under {MIN_RSA_BITS} bits are refused)")
        }));
    }
    Ok(set)
}

/// The modulus size of an RSA JWK, in bits (`None` for other key types or
/// a modulus that is not base64url).
fn rsa_bits(jwk: &serde_json::Value) -> Option<usize> {
    use base64::Engine;
    if jwk.get("kty").and_then(|k| k.as_str()) != Some("RSA") {
        return None;
    }
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(jwk.get("n")?.as_str()?.trim_end_matches('='))
        .ok()?;
    let start = n.iter().position(|b| *b != 0).unwrap_or(n.len());
    let n = &n[start..];
    let first = *n.first()?;
    Some((n.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::json;

    fn config(keys: KeySource) -> IdentityConfig {
        IdentityConfig {
            cluster: "default".into(),
            mode: crate::identity::tokenreview::Mode::Jwks,
            kubeconfig: None,
            tokenreview_cache: Duration::from_secs(5),
            verify_cache: Duration::ZERO,
            tokenreview_timeout: Duration::from_secs(5),
            allow_on_api_error: false,
            issuer: "https://issuer.test".into(),
            audiences: vec!["secrets-broker".into()],
            keys,
            algorithms: Vec::new(),
            leeway: Duration::from_secs(5),
            jwks_refresh_min_interval: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(3600),
            max_token_bytes: 8192,
            max_token_lifetime: Duration::from_secs(24 * 3600),
            require_pod_binding: true,
            http_timeout: Duration::from_secs(5),
        }
    }

    /// An RSA JWK whose modulus has exactly `bits` bits.
    pub(crate) fn rsa_jwk(kid: &str, bits: usize) -> serde_json::Value {
        let mut n = vec![0x5a_u8; bits / 8];
        n[0] = 0x80;
        json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB",
        })
    }

    #[test]
    fn rsa_keys_under_2048_bits_are_refused_at_load() {
        let set = parse_jwks(
            json!({ "keys": [rsa_jwk("weak", 1024), rsa_jwk("ok", 2048)] })
                .to_string()
                .as_bytes(),
            "jwks.json",
        )
        .unwrap();
        assert!(!set.by_kid.contains_key("weak"));
        assert!(set.by_kid.contains_key("ok"));
        assert_eq!(set.weak.get(&Some("weak".to_owned())), Some(&1024));
        let err = parse_jwks(
            json!({ "keys": [rsa_jwk("weak", 1024)] })
                .to_string()
                .as_bytes(),
            "jwks.json",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("under 2048 bits"), "{err}");
    }

    /// A bad JWKS behind discovery is named by the `jwks_uri` that served
    /// it, not by the discovery URL.
    #[tokio::test]
    async fn a_bad_jwks_names_its_jwks_uri() {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        crate::install_crypto_provider();
        let tls = crate::dev::tls::DevTls::generate().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let served = base.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let base = served.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let body = if req.uri().path() == "/.well-known/openid-configuration" {
                                json!({ "issuer": "https://issuer.test", "jwks_uri": format!("{base}/keys/v9") })
                            } else {
                                json!({ "keys": "not a list" })
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(body.to_string())),
                                ))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, &tls.ca_pem).unwrap();
        let discovery = format!("{base}/.well-known/openid-configuration");
        let jwks = Jwks::new(&config(KeySource::Discovery {
            url: discovery.clone(),
            ca_file: Some(ca),
        }))
        .unwrap();
        let err = jwks.refresh(true).await.unwrap_err().to_string();
        assert!(err.contains(&format!("{base}/keys/v9")), "{err}");
        assert!(!err.contains(&discovery), "{err}");
    }
}
