//! Token → [`Identity`], in the order a forged token is cheapest to refuse:
//! size and shape → header (algorithm allow-list, no key material in the
//! header, `kid`) → signature with the issuer's key → registered claims →
//! Kubernetes claims. [`Verifier`] does it for one issuer and [`Verifiers`]
//! picks the issuer; the steps before the signature are in
//! [`super::token`], the claims in
//! [`super::claims`].

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;

use super::Identity;
use super::algorithm::Algorithm;
use super::claims::{UNBOUND, check_claims, check_names};
use super::config::IdentityConfig;
use super::error::TokenError;
use super::jwks::{Jwks, JwksError};
use super::token::{bounded, check_json_object, parse_header, signature_error, unverified_issuer};

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
            let now = crate::clock::unix_now();
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
        check_claims(&self.cfg, claims, now)
    }
}

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::config::KeySource;
    use jsonwebtoken::{EncodingKey, Header as JwtHeader, encode};
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    const ISS: &str = "https://issuer.test";

    pub(crate) struct Fixture {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) verifier: Verifier,
        pub(crate) key: EncodingKey,
        pub(crate) other_key: EncodingKey,
    }

    pub(crate) fn ec_key() -> (EncodingKey, serde_json::Value) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        });
        (EncodingKey::from_ec_der(&kp.serialize_der()), jwk)
    }

    pub(crate) fn fixture() -> Fixture {
        fixture_with(|_| {})
    }

    pub(crate) fn fixture_with(adjust: impl FnOnce(&mut IdentityConfig)) -> Fixture {
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

    pub(crate) fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    pub(crate) fn claims() -> serde_json::Value {
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

    pub(crate) fn sign(key: &EncodingKey, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let mut h = JwtHeader::new(jsonwebtoken::Algorithm::ES256);
        h.kid = kid.map(Into::into);
        encode(&h, claims, key).unwrap()
    }

    pub(crate) fn raw_token(header: serde_json::Value, claims: &serde_json::Value) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(b"not-a-signature")
        )
    }

    pub(crate) async fn reject(f: &Fixture, token: &str) -> TokenError {
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
