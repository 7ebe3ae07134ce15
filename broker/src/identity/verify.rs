//! Token → [`Identity`], in the order a forged token is cheapest to refuse:
//! size and shape → header (algorithm allow-list, no key material in the
//! header, `kid`) → signature with the issuer's key → registered claims →
//! Kubernetes claims.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use serde::Deserialize;

use super::Identity;
use super::jwks::{Jwks, JwksError};
use crate::config::IdentityConfig;

/// Largest JWT header accepted; real headers are under 200 bytes.
const MAX_HEADER_BYTES: usize = 2048;

/// Signature algorithms the broker can be configured to accept: asymmetric
/// only. `none` and HMAC are not in this list and can never be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithm(jsonwebtoken::Algorithm);

impl Algorithm {
    /// Parses an algorithm name from config or a token header.
    pub fn from_name(name: &str) -> Result<Algorithm, String> {
        use jsonwebtoken::Algorithm as A;
        let alg = match name {
            "RS256" => A::RS256,
            "RS384" => A::RS384,
            "RS512" => A::RS512,
            "PS256" => A::PS256,
            "PS384" => A::PS384,
            "PS512" => A::PS512,
            "ES256" => A::ES256,
            "ES384" => A::ES384,
            "EdDSA" => A::EdDSA,
            "none" | "None" | "NONE" => {
                return Err("alg \"none\" (unsigned tokens) is never accepted".into());
            }
            n if n.starts_with("HS") => {
                return Err(format!(
                    "HMAC algorithm {n} is never accepted: a shared secret cannot prove a workload's identity"
                ));
            }
            n => return Err(format!("unsupported algorithm {n:?}")),
        };
        Ok(Algorithm(alg))
    }

    pub fn name(&self) -> String {
        format!("{:?}", self.0)
    }
}

/// Why a token is refused. Each message names the problem and, where it helps,
/// the offending claim value; never the token itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// No `authorization: Bearer` credentials were sent.
    #[error(
        "no bearer token: send the pod's service-account token as `authorization: Bearer <jwt>`"
    )]
    Missing,
    /// The token is larger than `identity.max_token_bytes`.
    #[error("token is {len} bytes, larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// Not a JWS in compact form, or a part is not base64url JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header's `alg` is `none`, HMAC, unknown or not in the allow-list.
    #[error("token algorithm refused: {0}")]
    Algorithm(String),
    /// The header carries key material or a key URL (`jwk`, `jku`, `x5u`,
    /// `x5c`): keys come only from the configured issuer.
    #[error(
        "token header carries its own key (`{0}`): refused, keys come only from the issuer's JWKS"
    )]
    HeaderKey(&'static str),
    /// The header names a key the issuer does not publish (even after a refresh).
    #[error("token is signed with key id {kid:?}, which the issuer does not publish")]
    UnknownKey { kid: String },
    /// No header `kid` and no key without one is published.
    #[error("token header has no `kid` and the issuer publishes no key without one")]
    NoKeyId,
    /// The issuer publishes the token's key as an RSA key under
    /// [`super::jwks::MIN_RSA_BITS`] bits, which the broker refuses.
    #[error(
        "token is signed with key id {kid:?}, a {bits}-bit RSA key: keys under {min} bits are refused; the issuer must sign with a larger key",
        min = super::jwks::MIN_RSA_BITS
    )]
    WeakKey { kid: String, bits: usize },
    /// The signature does not verify with the issuer's key.
    #[error("token signature does not verify with the issuer's key {kid:?}")]
    BadSignature { kid: String },
    /// The issuer's keys could not be obtained (network, TLS, bad document).
    #[error("cannot verify tokens now: {0}")]
    KeysUnavailable(JwksError),
    /// `iss` is not the configured issuer.
    #[error("token issuer {got:?} is not the trusted issuer {want:?}")]
    Issuer { got: String, want: String },
    /// `aud` does not contain any configured audience.
    #[error("token audience {got:?} does not include {want:?}")]
    Audience { got: Vec<String>, want: Vec<String> },
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired at {} (now {})", rfc3339(*exp), rfc3339(*now))]
    Expired { exp: i64, now: i64 },
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not valid before {} (now {})", rfc3339(*nbf), rfc3339(*now))]
    NotYetValid { nbf: i64, now: i64 },
    /// The token lives longer than `identity.max_token_lifetime`.
    #[error(
        "token lives {} (exp - iat), longer than identity.max_token_lifetime ({}): request a shorter-lived projected token",
        humantime::format_duration(std::time::Duration::from_secs(*lifetime)),
        humantime::format_duration(std::time::Duration::from_secs(*max))
    )]
    TooLong { lifetime: u64, max: u64 },
    /// `iat` is in the future (beyond the leeway): a clock problem or a forgery.
    #[error("token issued in the future at {} (now {})", rfc3339(*iat), rfc3339(*now))]
    IssuedInFuture { iat: i64, now: i64 },
    /// A legacy, secret-based service-account token: it never expires.
    #[error(
        "legacy secret-based service-account token (no expiry) refused: mount a projected service-account token with this broker's audience"
    )]
    Legacy,
    /// A required claim is missing or has the wrong type.
    #[error("token claim `{0}` is missing or invalid")]
    Claim(&'static str),
    /// A claim is present with a value of the wrong type or shape.
    #[error("token claim `{claim}` is invalid: {problem}")]
    ClaimInvalid {
        claim: &'static str,
        problem: String,
    },
    /// A namespace, service-account or pod name that Kubernetes could not
    /// have issued (`app:extra`): refused so a name pattern cannot bind it.
    #[error("token claim `{claim}` {value:?} is not a Kubernetes {want}")]
    Name {
        claim: &'static str,
        value: String,
        want: &'static str,
    },
    /// The API server's TokenReview refused the token.
    #[error("the Kubernetes API server refused the token: {0}")]
    Rejected(String),
    /// The token verifies offline, but the API server no longer accepts it:
    /// usually its pod was deleted.
    #[error("the Kubernetes API server no longer accepts this token (pod deleted?): {reason}")]
    PodGone {
        identity: Box<Identity>,
        reason: String,
    },
    /// TokenReview could not be done (API server down, slow, or refusing the broker).
    #[error("cannot confirm the token with the Kubernetes API server: {0}")]
    ReviewUnavailable(String),
    /// `sub` does not agree with the `kubernetes.io` claims.
    #[error("token subject {sub:?} does not match its kubernetes.io claims ({expected:?})")]
    SubjectMismatch { sub: String, expected: String },
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// `aud` may be one string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims read from the verified payload; each is type-checked by
/// name below, so a wrong type names its claim.
#[derive(Deserialize)]
struct Claims {
    iss: Option<serde_json::Value>,
    sub: Option<serde_json::Value>,
    aud: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<serde_json::Value>,
    #[serde(rename = "kubernetes.io/serviceaccount/namespace")]
    legacy_namespace: Option<serde_json::Value>,
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A string claim, or an error naming it.
fn string_claim(
    claim: &'static str,
    v: Option<serde_json::Value>,
) -> Result<Option<String>, TokenError> {
    match v {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(TokenError::ClaimInvalid {
            claim,
            problem: format!("must be a string, found {}", json_type(&other)),
        }),
    }
}

/// A NumericDate claim (seconds since the epoch), or an error naming it.
fn time_claim(
    claim: &'static str,
    v: Option<serde_json::Value>,
) -> Result<Option<i64>, TokenError> {
    match v {
        None => Ok(None),
        Some(serde_json::Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => {
            Ok(n.as_f64().map(|f| f as i64))
        }
        Some(other) => Err(TokenError::ClaimInvalid {
            claim,
            problem: format!(
                "must be a number of seconds since 1970 (a NumericDate), found {}",
                json_type(&other)
            ),
        }),
    }
}

/// A DNS-1123 label (a namespace): 1-63 of `a-z 0-9 -`, starting and ending
/// with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A DNS-1123 subdomain (a service-account or pod name): at most 253
/// bytes of `.`-separated parts, each of `a-z 0-9 -` starting and ending
/// with a letter or digit.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        })
}

/// Checks the names an identity is made of, naming the claim that is wrong.
fn check_names(
    namespace: (&'static str, &str),
    service_account: (&'static str, &str),
    pod: Option<(&'static str, &str)>,
) -> Result<(), TokenError> {
    let bad = |claim: &'static str, value: &str, want: &'static str| TokenError::Name {
        claim,
        value: value.chars().take(64).collect(),
        want,
    };
    if !is_dns1123_label(namespace.1) {
        return Err(bad(
            namespace.0,
            namespace.1,
            "namespace name (a DNS-1123 label: a-z, 0-9, '-', at most 63)",
        ));
    }
    for (claim, value) in std::iter::once(service_account).chain(pod) {
        if !is_dns1123_subdomain(value) {
            return Err(bad(
                claim,
                value,
                "object name (a DNS-1123 subdomain: a-z, 0-9, '-', '.', at most 253)",
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: NamedObject,
    pod: Option<NamedObject>,
}

#[derive(Deserialize)]
struct NamedObject {
    name: String,
    uid: String,
}

/// A token verified before: what it proved, and the key that proved it.
struct Verified {
    identity: Identity,
    kid: Option<String>,
}

/// Verifies tokens of one issuer.
pub struct Verifier {
    cfg: IdentityConfig,
    jwks: Jwks,
    /// Set in the TokenReview modes.
    reviewer: Option<super::tokenreview::Reviewer>,
    /// Tokens verified offline, by SHA-256, for `verify_cache`.
    verified: Option<moka::future::Cache<[u8; 32], std::sync::Arc<Verified>>>,
}

impl Verifier {
    pub fn new(cfg: IdentityConfig) -> Result<Verifier, JwksError> {
        let jwks = Jwks::new(&cfg)?;
        let verified = (!cfg.verify_cache.is_zero()).then(|| {
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.verify_cache)
                .build()
        });
        Ok(Verifier {
            cfg,
            jwks,
            reviewer: None,
            verified,
        })
    }

    pub fn jwks(&self) -> &Jwks {
        &self.jwks
    }

    /// Counts this verifier's key refreshes in a shared counter family.
    pub fn with_refresh_counter(
        mut self,
        family: prometheus_client::metrics::family::Family<
            crate::telemetry::metrics::ResultLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> Verifier {
        self.jwks.refreshes = family;
        self
    }

    /// The TokenReview client, in the modes that use one.
    pub fn reviewer(&self) -> Option<&super::tokenreview::Reviewer> {
        self.reviewer.as_ref()
    }

    /// Verifies a token now, as the issuer's mode says.
    pub async fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        use super::tokenreview::{Mode, Review};
        let Some(reviewer) = &self.reviewer else {
            return self.verify_offline(token).await;
        };
        match self.cfg.mode {
            Mode::Jwks => self.verify_offline(token).await,
            Mode::TokenReview => {
                let token = bounded(token, self.cfg.max_token_bytes)?;
                parse_header(token)?;
                match reviewer
                    .review(token)
                    .await
                    .map_err(TokenError::ReviewUnavailable)?
                {
                    Review::Rejected(reason) => Err(TokenError::Rejected(reason)),
                    Review::Authenticated {
                        username,
                        uid,
                        pod_name,
                        pod_uid,
                        audiences,
                    } => self
                        .identity_from_review(token, username, uid, pod_name, pod_uid, audiences),
                }
            }
            Mode::JwksAndTokenReview => {
                let identity = self.verify_offline(token).await?;
                match reviewer.review(token.trim()).await {
                    Ok(Review::Authenticated { .. }) => Ok(identity),
                    Ok(Review::Rejected(reason)) => Err(TokenError::PodGone {
                        identity: Box::new(identity),
                        reason,
                    }),
                    Err(e) if self.cfg.allow_on_api_error => {
                        tracing::warn!(error = %e, identity = %identity, "TokenReview unavailable; accepting the offline-verified token (on_api_error = allow)");
                        Ok(identity)
                    }
                    Err(e) => Err(TokenError::ReviewUnavailable(e)),
                }
            }
        }
    }

    /// The identity the API server vouched for (TokenReview mode): the
    /// username must be a service account's, and an audience must be ours.
    fn identity_from_review(
        &self,
        token: &str,
        username: String,
        uid: String,
        pod_name: Option<String>,
        pod_uid: Option<String>,
        audiences: Vec<String>,
    ) -> Result<Identity, TokenError> {
        let mut parts = username
            .strip_prefix("system:serviceaccount:")
            .unwrap_or_default()
            .splitn(2, ':');
        let (Some(namespace), Some(service_account)) = (parts.next(), parts.next()) else {
            return Err(TokenError::Rejected(format!(
                "{username:?} is not a service account"
            )));
        };
        check_names(
            ("username (namespace)", namespace),
            ("username (service account)", service_account),
            pod_name.as_deref().map(|p| ("extra pod-name", p)),
        )?;
        if !audiences.iter().any(|a| self.cfg.audiences.contains(a)) {
            return Err(TokenError::Audience {
                got: audiences,
                want: self.cfg.audiences.clone(),
            });
        }
        if self.cfg.require_pod_binding && pod_uid.is_none() {
            return Err(TokenError::ClaimInvalid {
                claim: "extra authentication.kubernetes.io/pod-uid",
                problem: UNBOUND.into(),
            });
        }
        // Expiry for stream deadlines only; the API server checked it.
        let exp = token
            .split('.')
            .nth(1)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|c| c.get("exp").and_then(|e| e.as_f64()))
            .map_or(i64::MAX, |e| e as i64);
        Ok(Identity {
            cluster: self.cfg.cluster.clone(),
            issuer: self.cfg.issuer.clone(),
            subject: username.clone(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            service_account_uid: uid,
            pod_name,
            pod_uid,
            audiences,
            expires_at: exp,
        })
    }

    /// Verifies a token as of `now`.
    /// Verifies a token with the issuer's keys, remembering the result for
    /// `verify_cache`: a token seen before costs a hash and a lookup. A hit
    /// is used only while the token is unexpired and the key that signed it
    /// is still published; anything else is verified again in full, so the
    /// error is the precise one.
    async fn verify_offline(&self, token: &str) -> Result<Identity, TokenError> {
        let Some(cache) = &self.verified else {
            return self.verify_at(token, SystemTime::now()).await;
        };
        let token = bounded(token, self.cfg.max_token_bytes)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        if let Some(hit) = cache.get(&key).await {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs() as i64;
            let leeway = self.cfg.leeway.as_secs() as i64;
            if now <= hit.identity.expires_at.saturating_add(leeway)
                && self.jwks.has_key(hit.kid.as_deref())
            {
                return Ok(hit.identity.clone());
            }
            cache.invalidate(&key).await;
        }
        let identity = self.verify_at(token, SystemTime::now()).await?;
        let kid = parse_header(token).ok().and_then(|h| h.kid);
        cache
            .insert(
                key,
                std::sync::Arc::new(Verified {
                    identity: identity.clone(),
                    kid,
                }),
            )
            .await;
        Ok(identity)
    }

    pub async fn verify_at(&self, token: &str, now: SystemTime) -> Result<Identity, TokenError> {
        let token = bounded(token, self.cfg.max_token_bytes)?;
        let header = parse_header(token)?;
        let alg = Algorithm::from_name(&header.alg).map_err(TokenError::Algorithm)?;
        if !self.cfg.algorithms.contains(&alg) {
            return Err(TokenError::Algorithm(format!(
                "{} is not in identity.algorithms ({})",
                header.alg,
                self.cfg
                    .algorithms
                    .iter()
                    .map(Algorithm::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }

        let keys = self
            .jwks
            .keys_for(header.kid.as_deref())
            .await
            .map_err(TokenError::KeysUnavailable)?;
        let kid = header.kid.clone().unwrap_or_default();
        if keys.is_empty() {
            if let Some(bits) = self.jwks.weak_key(header.kid.as_deref()) {
                return Err(TokenError::WeakKey { kid, bits });
            }
            return Err(match header.kid {
                Some(kid) => TokenError::UnknownKey { kid },
                None => TokenError::NoKeyId,
            });
        }
        check_json_object("claims", token.split('.').nth(1).unwrap_or_default())?;

        // Signature only; the claims are checked below with precise messages.
        let mut validation = Validation::new(alg.0);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut claims = None;
        let mut last_err = None;
        for key in &keys {
            if key.alg.as_deref().is_some_and(|a| a != header.alg) {
                last_err = Some(TokenError::Algorithm(format!(
                    "key {kid:?} is published for {}, the token uses {}",
                    key.alg.as_deref().unwrap_or_default(),
                    header.alg
                )));
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => last_err = Some(signature_error(e, &kid)),
            }
        }
        let Some(claims) = claims else {
            return Err(last_err.unwrap_or(TokenError::BadSignature { kid }));
        };
        self.check_claims(claims, now)
    }

    fn check_claims(
        &self,
        value: serde_json::Value,
        now: SystemTime,
    ) -> Result<Identity, TokenError> {
        if !value.is_object() {
            return Err(TokenError::Malformed("claims are not a JSON object".into()));
        }
        let claims: Claims = serde_json::from_value(value)
            .map_err(|_| TokenError::Malformed("claims are not a JSON object".into()))?;
        if claims.legacy_namespace.is_some() {
            return Err(TokenError::Legacy);
        }
        let (exp, nbf, iat) = (
            time_claim("exp", claims.exp)?,
            time_claim("nbf", claims.nbf)?,
            time_claim("iat", claims.iat)?,
        );
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs() as i64;
        let leeway = self.cfg.leeway.as_secs() as i64;

        let iss = string_claim("iss", claims.iss)?.ok_or(TokenError::Claim("iss"))?;
        if iss != self.cfg.issuer {
            return Err(TokenError::Issuer {
                got: iss,
                want: self.cfg.issuer.clone(),
            });
        }
        let audiences = match claims.aud.map(serde_json::from_value::<Audience>) {
            Some(Ok(Audience::One(a))) => vec![a],
            Some(Ok(Audience::Many(a))) => a,
            Some(Err(_)) => {
                return Err(TokenError::ClaimInvalid {
                    claim: "aud",
                    problem: "must be a string or an array of strings".into(),
                });
            }
            None => Vec::new(),
        };
        if !audiences.iter().any(|a| self.cfg.audiences.contains(a)) {
            return Err(TokenError::Audience {
                got: audiences,
                want: self.cfg.audiences.clone(),
            });
        }
        // A token with the `kubernetes.io` claims is a projected token: one
        // without `exp` is broken, not a legacy token (those are caught above).
        let exp = match exp {
            Some(exp) => exp,
            None if claims.kubernetes.is_some() => {
                return Err(TokenError::ClaimInvalid {
                    claim: "exp",
                    problem: "missing: a projected service-account token always expires".into(),
                });
            }
            None => return Err(TokenError::Claim("exp")),
        };
        if now > exp.saturating_add(leeway) {
            return Err(TokenError::Expired { exp, now });
        }
        if let Some(nbf) = nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(TokenError::NotYetValid { nbf, now });
        }
        if let Some(iat) = iat
            && iat > now.saturating_add(leeway)
        {
            return Err(TokenError::IssuedInFuture { iat, now });
        }
        // No ceiling would make a stolen long-lived token good for its whole
        // (forged or misconfigured) life.
        let lifetime = exp.saturating_sub(iat.unwrap_or(now)).max(0) as u64;
        let max = self.cfg.max_token_lifetime.as_secs();
        if max > 0 && lifetime > max.saturating_add(leeway as u64) {
            return Err(TokenError::TooLong { lifetime, max });
        }

        let k8s: KubernetesClaims = serde_json::from_value(
            claims
                .kubernetes
                .ok_or(TokenError::Claim("kubernetes.io"))?,
        )
        .map_err(|e| TokenError::ClaimInvalid {
            claim: "kubernetes.io",
            problem: format!(
                "needs `namespace`, `serviceaccount.name` and `serviceaccount.uid` as strings ({})",
                e.to_string().chars().take(120).collect::<String>()
            ),
        })?;
        let sub = string_claim("sub", claims.sub)?.ok_or(TokenError::Claim("sub"))?;
        check_names(
            ("kubernetes.io.namespace", &k8s.namespace),
            (
                "kubernetes.io.serviceaccount.name",
                &k8s.serviceaccount.name,
            ),
            k8s.pod
                .as_ref()
                .map(|p| ("kubernetes.io.pod.name", p.name.as_str())),
        )?;
        let expected = format!(
            "system:serviceaccount:{}:{}",
            k8s.namespace, k8s.serviceaccount.name
        );
        if sub != expected {
            return Err(TokenError::SubjectMismatch { sub, expected });
        }
        if k8s.namespace.is_empty() || k8s.serviceaccount.name.is_empty() {
            return Err(TokenError::Claim("kubernetes.io.namespace"));
        }
        if self.cfg.require_pod_binding && k8s.pod.is_none() {
            return Err(TokenError::ClaimInvalid {
                claim: "kubernetes.io.pod",
                problem: UNBOUND.into(),
            });
        }
        Ok(Identity {
            cluster: self.cfg.cluster.clone(),
            issuer: iss,
            subject: sub,
            namespace: k8s.namespace,
            service_account: k8s.serviceaccount.name,
            service_account_uid: k8s.serviceaccount.uid,
            pod_name: k8s.pod.as_ref().map(|p| p.name.clone()),
            pod_uid: k8s.pod.map(|p| p.uid),
            audiences,
            expires_at: exp,
        })
    }
}

/// Why a token without a pod is refused (`identity.require_pod_binding`).
const UNBOUND: &str = "missing: the token is bound to no pod, so a revocation by pod UID could not cut it off; mount a projected service-account token (or set identity.require_pod_binding = false)";

/// The verifiers of every trusted issuer (one per cluster). A token goes to
/// the verifier of its (not yet trusted) `iss`; that verifier then checks
/// everything, `iss` included, so a token can only ever be verified with its
/// own issuer's keys.
pub struct Verifiers {
    all: Vec<std::sync::Arc<Verifier>>,
    max_token_bytes: usize,
}

impl Verifiers {
    /// Builds a verifier per issuer (and its TokenReview client, in the modes
    /// that use one).
    pub async fn new(
        cfgs: &[IdentityConfig],
        refreshes: &prometheus_client::metrics::family::Family<
            crate::telemetry::metrics::ResultLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> Result<Verifiers, String> {
        let mut all = Vec::with_capacity(cfgs.len());
        for cfg in cfgs {
            let mut v = Verifier::new(cfg.clone())
                .map_err(|e| e.to_string())?
                .with_refresh_counter(refreshes.clone());
            if cfg.mode.reviews() {
                v.reviewer = Some(
                    super::tokenreview::Reviewer::new(
                        cfg.kubeconfig.as_deref(),
                        cfg.audiences.clone(),
                        cfg.tokenreview_cache,
                        cfg.tokenreview_timeout,
                    )
                    .await
                    .map_err(|e| format!("cluster {}: {e}", cfg.cluster))?,
                );
            }
            all.push(std::sync::Arc::new(v));
        }
        Ok(Verifiers {
            max_token_bytes: cfgs
                .iter()
                .map(|c| c.max_token_bytes)
                .max()
                .unwrap_or(16 * 1024),
            all,
        })
    }

    pub fn all(&self) -> &[std::sync::Arc<Verifier>] {
        &self.all
    }

    /// Whether every issuer's keys have loaded (TokenReview-only issuers need none).
    pub fn is_loaded(&self) -> bool {
        self.all
            .iter()
            .all(|v| !Self::uses_keys(v) || v.jwks().is_loaded())
    }

    /// Whether an issuer verifies offline (so its keys must be kept fresh).
    pub fn uses_keys(v: &Verifier) -> bool {
        v.cfg.mode != super::tokenreview::Mode::TokenReview
    }

    /// The checks of a token's size and form that need no parsing: present,
    /// within the largest `identity.max_token_bytes`, three dot-separated
    /// parts. Cheap enough for every call, a verification cache hit included;
    /// [`Verifiers::verify`] checks the rest.
    pub fn check_shape<'t>(&self, token: &'t str) -> Result<&'t str, TokenError> {
        let token = bounded(token, self.max_token_bytes)?;
        let parts = token.split('.').count();
        if parts != 3 {
            return Err(TokenError::Malformed(format!(
                "expected 3 dot-separated parts (a signed JWT), found {parts}"
            )));
        }
        Ok(token)
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if let [only] = self.all.as_slice() {
            return only.verify(token).await;
        }
        let token = bounded(token, self.max_token_bytes)?;
        parse_header(token)?;
        let iss = unverified_issuer(token)?;
        match self.all.iter().find(|v| v.cfg.issuer == iss) {
            Some(v) => v.verify(token).await,
            None => Err(TokenError::Issuer {
                got: iss,
                want: self
                    .all
                    .iter()
                    .map(|v| v.cfg.issuer.as_str())
                    .collect::<Vec<_>>()
                    .join(" or "),
            }),
        }
    }
}

/// The `iss` claim of a token whose signature is not checked yet: used only
/// to choose which issuer's verifier checks it.
fn unverified_issuer(token: &str) -> Result<String, TokenError> {
    let payload = token.split('.').nth(1).unwrap_or_default();
    let raw = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed("claims are not base64url".into()))?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&raw)
        .map_err(|_| TokenError::Malformed("claims are not a JSON object".into()))?;
    claims
        .get("iss")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or(TokenError::Claim("iss"))
}

/// The trimmed token, if it is present and within the size limit: the first
/// check of every mode, before anything parses it.
fn bounded(token: &str, max: usize) -> Result<&str, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if token.len() > max {
        return Err(TokenError::TooLarge {
            len: token.len(),
            max,
        });
    }
    Ok(token)
}

/// A JOSE header as read before any verification: nothing in it is trusted.
#[derive(Debug)]
pub struct UnverifiedHeader {
    pub alg: String,
    pub kid: Option<String>,
}

/// Reads the JOSE header without trusting anything in it yet: shape, size,
/// no key material, `alg` present, `kid` a short string.
pub fn parse_header(token: &str) -> Result<UnverifiedHeader, TokenError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(TokenError::Malformed(format!(
            "expected 3 dot-separated parts (a signed JWT), found {}",
            parts.len()
        )));
    }
    if parts[0].is_empty() {
        return Err(TokenError::Malformed("the header part is empty".into()));
    }
    if parts[0].len() > MAX_HEADER_BYTES {
        return Err(TokenError::Malformed("header too large".into()));
    }
    let raw = URL_SAFE_NO_PAD
        .decode(parts[0])
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    json_object_problem("header", &raw)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&raw)
        .map_err(|_| TokenError::Malformed("header is not a JSON object".into()))?;
    for field in ["jwk", "jku", "x5u", "x5c"] {
        if header.contains_key(field) {
            return Err(TokenError::HeaderKey(field));
        }
    }
    if header.contains_key("crit") {
        return Err(TokenError::Malformed(
            "header has `crit` extensions, which are not supported".into(),
        ));
    }
    let alg = header
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or_else(|| TokenError::Malformed("header has no `alg`".into()))?
        .to_owned();
    // An unsigned token (`alg: none`) has an empty signature: say what it
    // is before looking at the shape of the signature.
    if alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::Algorithm(
            "alg \"none\" (unsigned tokens) is never accepted".into(),
        ));
    }
    if parts[1].is_empty() {
        return Err(TokenError::Malformed("the claims part is empty".into()));
    }
    if parts[2].is_empty() {
        return Err(TokenError::Malformed(
            "the signature part is empty (an unsigned token)".into(),
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) if k.len() <= 256 => Some(k.clone()),
        Some(_) => {
            return Err(TokenError::Malformed(
                "header `kid` is not a short string".into(),
            ));
        }
    };
    Ok(UnverifiedHeader { alg, kid })
}

/// Deepest nesting of JSON accepted in a header or claims; real tokens nest 3.
const MAX_JSON_DEPTH: usize = 16;

/// What is wrong with a JSON text that does not parse, in words that name
/// the problem (not "not a JSON object" for a repeated or deep claim).
fn json_problem(what: &str, e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.contains("recursion limit") {
        format!("{what}: nested too deeply")
    } else if let Some(field) = text
        .strip_prefix("duplicate field `")
        .and_then(|t| t.split('`').next())
    {
        format!(
            "{what}: key `{}` appears twice",
            field.chars().take(64).collect::<String>()
        )
    } else {
        match e.classify() {
            serde_json::error::Category::Data => format!("{what}: not a JSON object"),
            _ => format!("{what}: not valid JSON"),
        }
    }
}

/// Refuses a header or claims text that is not one JSON object with
/// distinct keys and bounded nesting (serde_json would keep the last of two
/// equal keys; the issuer and we might read different values).
fn json_object_problem(what: &str, raw: &[u8]) -> Result<(), TokenError> {
    use serde::de::{IgnoredAny, MapAccess, Visitor};
    /// The first repeated key of an object.
    struct Keys(Option<String>);
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Keys;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut repeated = None;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if repeated.is_none() && !seen.insert(key.clone()) {
                    repeated = Some(key);
                }
            }
            Ok(Keys(repeated))
        }
    }
    impl<'de> Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
            d.deserialize_map(V)
        }
    }
    let fail = |m: String| Err(TokenError::Malformed(m));
    match serde_json::from_slice::<Keys>(raw) {
        Err(e) => return fail(json_problem(what, &e)),
        Ok(Keys(Some(key))) => {
            return fail(format!(
                "{what}: key `{}` appears twice",
                key.chars().take(64).collect::<String>()
            ));
        }
        Ok(Keys(None)) => {}
    }
    // Depth, counted over the bytes outside strings.
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in raw {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if max > MAX_JSON_DEPTH {
        return fail(format!(
            "{what}: nested {max} levels deep, more than {MAX_JSON_DEPTH}"
        ));
    }
    Ok(())
}

/// [`json_object_problem`] for a base64url part of the token.
fn check_json_object(what: &str, part: &str) -> Result<(), TokenError> {
    let raw = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(format!("{what}: not base64url")))?;
    json_object_problem(what, &raw)
}

fn signature_error(e: jsonwebtoken::errors::Error, kid: &str) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenError::BadSignature {
            kid: kid.to_owned(),
        },
        K::InvalidAlgorithm | K::InvalidAlgorithmName => TokenError::Algorithm(format!(
            "key {kid:?} is of a different type than the token's alg"
        )),
        K::Base64(_) => TokenError::Malformed("a part is not base64url".into()),
        K::Json(e) => TokenError::Malformed(json_problem("the header or claims", e)),
        K::Utf8(_) => TokenError::Malformed("the header or claims are not UTF-8".into()),
        other => TokenError::Malformed(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;
    use jsonwebtoken::{EncodingKey, Header as JwtHeader, encode};
    use serde_json::json;

    const ISS: &str = "https://issuer.test";

    struct Fixture {
        _dir: tempfile::TempDir,
        verifier: Verifier,
        key: EncodingKey,
        other_key: EncodingKey,
    }

    fn ec_key() -> (EncodingKey, serde_json::Value) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        });
        (EncodingKey::from_ec_der(&kp.serialize_der()), jwk)
    }

    fn fixture() -> Fixture {
        fixture_with(|_| {})
    }

    fn fixture_with(adjust: impl FnOnce(&mut IdentityConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (key, mut jwk) = ec_key();
        jwk["kid"] = json!("k1");
        let (other_key, _) = ec_key();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({ "keys": [jwk] }).to_string()).unwrap();
        let cfg = IdentityConfig {
            cluster: "default".into(),
            mode: crate::identity::tokenreview::Mode::Jwks,
            kubeconfig: None,
            tokenreview_cache: Duration::from_secs(5),
            verify_cache: Duration::ZERO,
            tokenreview_timeout: Duration::from_secs(5),
            allow_on_api_error: false,
            issuer: ISS.into(),
            audiences: vec!["secrets-broker".into()],
            keys: KeySource::StaticFile(path),
            algorithms: vec![
                Algorithm::from_name("ES256").unwrap(),
                Algorithm::from_name("RS256").unwrap(),
            ],
            leeway: Duration::from_secs(5),
            jwks_refresh_min_interval: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(3600),
            max_token_bytes: 8192,
            max_token_lifetime: Duration::from_secs(24 * 3600),
            require_pod_binding: true,
            http_timeout: Duration::from_secs(5),
        };
        let mut cfg = cfg;
        adjust(&mut cfg);
        Fixture {
            _dir: dir,
            verifier: Verifier::new(cfg).unwrap(),
            key,
            other_key,
        }
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": ISS, "aud": ["secrets-broker"], "sub": "system:serviceaccount:payments:api",
            "exp": now() + 600, "iat": now(), "nbf": now(),
            "kubernetes.io": {
                "namespace": "payments",
                "serviceaccount": {"name": "api", "uid": "sa-uid"},
                "pod": {"name": "api-1", "uid": "pod-uid"}
            }
        })
    }

    fn sign(key: &EncodingKey, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let mut h = JwtHeader::new(jsonwebtoken::Algorithm::ES256);
        h.kid = kid.map(Into::into);
        encode(&h, claims, key).unwrap()
    }

    fn raw_token(header: serde_json::Value, claims: &serde_json::Value) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(b"not-a-signature")
        )
    }

    async fn reject(f: &Fixture, token: &str) -> TokenError {
        f.verifier
            .verify(token)
            .await
            .expect_err("token must be refused")
    }

    #[tokio::test]
    async fn verification_cache_rechecks_expiry_and_withdrawn_keys() {
        let f = fixture_with(|c| {
            c.verify_cache = Duration::from_secs(300);
            c.leeway = Duration::ZERO;
        });
        f.verifier.jwks().refresh(true).await.unwrap();
        let good = sign(&f.key, Some("k1"), &claims());
        let id = f.verifier.verify(&good).await.unwrap();
        // A hit returns the same identity.
        assert_eq!(f.verifier.verify(&good).await.unwrap(), id);
        // A forged token is never a hit (another hash), and is refused.
        let forged = sign(&f.other_key, Some("k1"), &claims());
        assert!(matches!(
            reject(&f, &forged).await,
            TokenError::BadSignature { .. }
        ));

        // Expiry is checked on every call, cached or not.
        let mut short = claims();
        short["exp"] = json!(now() + 1);
        let short = sign(&f.key, Some("k1"), &short);
        f.verifier.verify(&short).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(matches!(
            reject(&f, &short).await,
            TokenError::Expired { .. }
        ));

        // The issuer withdraws key k1: the cached verification is not used.
        let (_, mut other) = ec_key();
        other["kid"] = json!("k2");
        std::fs::write(
            f._dir.path().join("jwks.json"),
            json!({ "keys": [other] }).to_string(),
        )
        .unwrap();
        f.verifier.jwks().refresh(true).await.unwrap();
        assert!(matches!(
            reject(&f, &good).await,
            TokenError::UnknownKey { .. }
        ));
    }

    #[tokio::test]
    async fn accepts_a_good_token() {
        let f = fixture();
        let id = f
            .verifier
            .verify(&sign(&f.key, Some("k1"), &claims()))
            .await
            .unwrap();
        assert_eq!(id.namespace, "payments");
        assert_eq!(id.service_account, "api");
        assert_eq!(id.pod_uid.as_deref(), Some("pod-uid"));
        assert_eq!(id.issuer, ISS);
    }

    /// An IRSA issuer is an ordinary issuer whose audience is STS's: the
    /// EKS token carries the same `kubernetes.io` claims as any projected
    /// token. Accepted with its audience, refused without it.
    #[tokio::test]
    async fn irsa_tokens_verify_like_any_projected_token() {
        let mut f = fixture();
        let mut cfg = f.verifier.cfg.clone();
        cfg.audiences = vec!["sts.amazonaws.com".into()];
        f.verifier = Verifier::new(cfg).unwrap();
        let mut irsa = claims();
        irsa["aud"] = json!(["sts.amazonaws.com"]);
        let id = f
            .verifier
            .verify(&sign(&f.key, Some("k1"), &irsa))
            .await
            .unwrap();
        assert_eq!(id.audiences, ["sts.amazonaws.com"]);
        assert_eq!(id.namespace, "payments");
        assert_eq!(id.pod_name.as_deref(), Some("api-1"));
        // An ordinary broker token is not an IRSA token, and the other way round.
        let err = reject(&f, &sign(&f.key, Some("k1"), &claims())).await;
        assert!(matches!(err, TokenError::Audience { .. }), "{err}");
        assert!(err.to_string().contains("sts.amazonaws.com"), "{err}");
        let g = fixture();
        let mut irsa_for_g = irsa.clone();
        irsa_for_g["aud"] = json!(["sts.amazonaws.com"]);
        let err = reject(&g, &sign(&g.key, Some("k1"), &irsa_for_g)).await;
        assert!(matches!(err, TokenError::Audience { .. }), "{err}");
        // A forged IRSA token (another key) fails on its signature.
        let err = reject(&f, &sign(&f.other_key, Some("k1"), &irsa)).await;
        assert!(matches!(err, TokenError::BadSignature { .. }), "{err}");
    }

    #[tokio::test]
    async fn refuses_every_bad_token_with_its_reason() {
        let f = fixture();
        let mut cases: Vec<(String, &str)> = Vec::new();
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        cases.push((String::new(), "no bearer token"));
        cases.push(("a".repeat(9000), "larger than"));
        cases.push(("abc.def".into(), "3 dot-separated parts"));
        cases.push(("!!!.e30.e30".into(), "not base64url"));
        cases.push((raw_token(json!({"alg":"none"}), &claims()), "\"none\""));
        cases.push((
            raw_token(json!({"alg":"HS256","kid":"k1"}), &claims()),
            "HMAC",
        ));
        cases.push((
            raw_token(json!({"alg":"ES384","kid":"k1"}), &claims()),
            "not in identity.algorithms",
        ));
        cases.push((
            raw_token(json!({"alg":"ES256","jwk":{"kty":"EC"}}), &claims()),
            "own key (`jwk`)",
        ));
        cases.push((
            raw_token(json!({"alg":"ES256","jku":"https://evil"}), &claims()),
            "own key (`jku`)",
        ));
        cases.push((sign(&f.key, Some("nope"), &claims()), "does not publish"));
        cases.push((sign(&f.key, None, &claims()), "no `kid`"));
        cases.push((
            sign(&f.other_key, Some("k1"), &claims()),
            "signature does not verify",
        ));
        cases.push((
            raw_token(json!({"alg":"ES256","kid":"k1"}), &claims()),
            "signature does not verify",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &with("iss", json!("https://evil"))),
            "not the trusted issuer",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &with("aud", json!("other"))),
            "does not include",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &without("aud")),
            "does not include",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &with("exp", json!(now() - 60))),
            "token expired at",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &with("nbf", json!(now() + 600))),
            "not valid before",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &with("iat", json!(now() + 600))),
            "issued in the future",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &without("exp")),
            "`exp` is invalid: missing",
        ));
        // A token bound to no pod.
        let mut unbound = claims();
        unbound["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("pod");
        cases.push((
            sign(&f.key, Some("k1"), &unbound),
            "`kubernetes.io.pod` is invalid: missing: the token is bound to no pod",
        ));
        // A token good for 100 years (iat now): over the 24 h ceiling.
        cases.push((
            sign(
                &f.key,
                Some("k1"),
                &with("exp", json!(now() + 100 * 365 * 24 * 3600)),
            ),
            "longer than identity.max_token_lifetime (1day)",
        ));
        cases.push((
            sign(
                &f.key,
                Some("k1"),
                &with("kubernetes.io/serviceaccount/namespace", json!("payments")),
            ),
            "legacy",
        ));
        cases.push((
            sign(
                &f.key,
                Some("k1"),
                &with("sub", json!("system:serviceaccount:payments:admin")),
            ),
            "does not match its kubernetes.io claims",
        ));
        cases.push((
            sign(&f.key, Some("k1"), &without("kubernetes.io")),
            "`kubernetes.io`",
        ));
        for (token, want) in cases {
            let err = reject(&f, &token).await.to_string();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
            if token.len() > 20 {
                assert!(!err.contains(&token), "error echoes the token: {err}");
            }
        }
    }

    /// A token signed over exactly these payload bytes (for claims JSON
    /// that `serde_json` cannot produce: repeated keys).
    fn sign_raw(key: &EncodingKey, payload: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg":"ES256","kid":"k1"}).to_string());
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
        let sig =
            jsonwebtoken::crypto::sign(message.as_bytes(), key, jsonwebtoken::Algorithm::ES256)
                .unwrap();
        format!("{message}.{sig}")
    }

    /// Names Kubernetes could not have issued are refused by the claim that
    /// carries them, even when `sub` agrees (`team-a/app:extra` must not
    /// match a pattern like `app*`).
    #[tokio::test]
    async fn names_must_be_kubernetes_names() {
        let f = fixture();
        let token = |ns: &str, sa: &str, pod: &str| {
            let mut c = claims();
            c["sub"] = json!(format!("system:serviceaccount:{ns}:{sa}"));
            c["kubernetes.io"]["namespace"] = json!(ns);
            c["kubernetes.io"]["serviceaccount"]["name"] = json!(sa);
            c["kubernetes.io"]["pod"]["name"] = json!(pod);
            sign(&f.key, Some("k1"), &c)
        };
        for (ns, sa, pod, claim) in [
            (
                "team-a",
                "app:extra",
                "p",
                "kubernetes.io.serviceaccount.name",
            ),
            ("team-a", "App", "p", "kubernetes.io.serviceaccount.name"),
            ("team-a", "app.", "p", "kubernetes.io.serviceaccount.name"),
            ("team-a", "app", "p/1", "kubernetes.io.pod.name"),
            ("Team_A", "app", "p", "kubernetes.io.namespace"),
            ("team.a", "app", "p", "kubernetes.io.namespace"),
            ("-team", "app", "p", "kubernetes.io.namespace"),
            (&"a".repeat(64), "app", "p", "kubernetes.io.namespace"),
        ] {
            let err = reject(&f, &token(ns, sa, pod)).await;
            assert!(
                matches!(err, TokenError::Name { claim: c, .. } if c == claim),
                "{ns}/{sa} pod {pod}: {err}"
            );
            assert!(err.to_string().contains(claim), "{err}");
        }
        let id = f
            .verifier
            .verify(&token("team-a", "app.worker-1", "app-7d9f.x"))
            .await
            .unwrap();
        assert_eq!(id.service_account, "app.worker-1");
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }

    /// Each refusal names the problem it is about, not a neighbouring one.
    #[tokio::test]
    async fn refusals_name_the_right_problem() {
        let f = fixture();
        // `alg: none` with its empty signature: the algorithm, not the shape.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg":"none"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        let err = reject(&f, &none).await;
        assert!(matches!(err, TokenError::Algorithm(_)), "{err}");
        assert!(err.to_string().contains("\"none\""), "{err}");
        // A projected-shaped token without `exp` is not a legacy token.
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        let err = reject(&f, &sign(&f.key, Some("k1"), &c)).await.to_string();
        assert!(err.contains("`exp`") && !err.contains("legacy"), "{err}");
        // `exp` (and the others) of the wrong type name their claim.
        for claim in ["exp", "nbf", "iat"] {
            let mut c = claims();
            c[claim] = json!("tomorrow");
            let err = reject(&f, &sign(&f.key, Some("k1"), &c)).await.to_string();
            assert!(err.contains(&format!("`{claim}`")), "{claim}: {err}");
        }
        let mut c = claims();
        c["iss"] = json!(42);
        let err = reject(&f, &sign(&f.key, Some("k1"), &c)).await.to_string();
        assert!(err.contains("`iss`") && err.contains("string"), "{err}");
        // Repeated claims, registered or not.
        let body = claims().to_string();
        let inner = body.trim_start_matches('{');
        for dup in ["exp", "kubernetes.io"] {
            let payload = format!("{{\"{dup}\":1,{inner}");
            let err = reject(&f, &sign_raw(&f.key, &payload)).await.to_string();
            assert!(
                err.contains(&format!("`{dup}` appears twice")),
                "{dup}: {err}"
            );
        }
        // Deep nesting.
        let mut c = claims();
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        c["x"] = deep;
        let err = reject(&f, &sign(&f.key, Some("k1"), &c)).await.to_string();
        assert!(err.contains("nested"), "{err}");
        let payload = format!("{{\"x\":{}{}}}", "[".repeat(300), "]".repeat(300));
        let err = reject(&f, &sign_raw(&f.key, &payload)).await.to_string();
        assert!(err.contains("nested"), "{err}");
    }

    /// A token whose `kid` names an RSA key under 2048 bits is refused by
    /// saying so, not as a bad signature.
    #[tokio::test]
    async fn tokens_of_small_rsa_keys_name_the_key_size() {
        let f = fixture();
        let (_, mut ec) = ec_key();
        ec["kid"] = json!("k1");
        std::fs::write(
            f._dir.path().join("jwks.json"),
            json!({ "keys": [ec, crate::identity::jwks::tests::rsa_jwk("old", 1024)] }).to_string(),
        )
        .unwrap();
        f.verifier.jwks().refresh(true).await.unwrap();
        let token = raw_token(json!({"alg":"RS256","kid":"old"}), &claims());
        let err = reject(&f, &token).await;
        assert!(
            matches!(err, TokenError::WeakKey { bits: 1024, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("1024-bit RSA key"), "{err}");
    }

    #[tokio::test]
    async fn leeway_applies() {
        let f = fixture();
        let c = {
            let mut c = claims();
            c["exp"] = json!(now() - 2);
            c
        };
        assert!(
            f.verifier
                .verify(&sign(&f.key, Some("k1"), &c))
                .await
                .is_ok()
        );
    }

    /// The issuer's clock ahead of or behind the broker's: within the
    /// leeway (5 s here) tokens are accepted, beyond it refused by name.
    #[tokio::test]
    async fn clock_skew_within_and_beyond_the_leeway() {
        let f = fixture();
        let skewed = |shift: i64| {
            let mut c = claims();
            c["iat"] = json!(now() + shift);
            c["nbf"] = json!(now() + shift);
            c["exp"] = json!(now() + shift + 600);
            sign(&f.key, Some("k1"), &c)
        };
        // Issuer ahead by 3 s: fine. Ahead by 30 s: not yet valid.
        assert!(f.verifier.verify(&skewed(3)).await.is_ok());
        assert!(matches!(
            reject(&f, &skewed(30)).await,
            TokenError::NotYetValid { .. } | TokenError::IssuedInFuture { .. }
        ));
        // Issuer behind: a token that expired 3 s ago by the broker's clock
        // is still within the leeway; 30 s ago it is expired.
        let mut c = claims();
        c["iat"] = json!(now() - 900);
        c["nbf"] = json!(now() - 900);
        c["exp"] = json!(now() - 30);
        assert!(matches!(
            reject(&f, &sign(&f.key, Some("k1"), &c)).await,
            TokenError::Expired { .. }
        ));
    }

    #[test]
    fn config_cannot_allow_none_or_hmac() {
        assert!(Algorithm::from_name("none").is_err());
        assert!(Algorithm::from_name("HS512").unwrap_err().contains("HMAC"));
        assert!(Algorithm::from_name("RS256").is_ok());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn runtime() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Arbitrary input is refused without a panic and without echoing it.
            #[test]
            fn arbitrary_tokens_are_refused_cleanly(token in "\\PC{0,400}") {
                let f = fixture();
                let err = runtime().block_on(f.verifier.verify(&token)).unwrap_err().to_string();
                if token.trim().len() >= 24 {
                    prop_assert!(!err.contains(token.trim()));
                }
            }

            /// Tokens shaped like JWTs, with random header and claims JSON.
            #[test]
            fn jwt_shaped_garbage_is_refused(
                header in proptest::collection::btree_map("[a-z]{1,5}", "[A-Za-z0-9]{0,12}", 0..6),
                claims in proptest::collection::btree_map("[a-z.]{1,14}", "[A-Za-z0-9:]{0,12}", 0..8),
                sig in "[A-Za-z0-9_-]{0,90}",
            ) {
                let f = fixture();
                let token = format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode(serde_json::to_string(&header).unwrap()),
                    URL_SAFE_NO_PAD.encode(serde_json::to_string(&claims).unwrap()),
                    sig
                );
                prop_assert!(runtime().block_on(f.verifier.verify(&token)).is_err());
            }
        }
    }
}
