//! The claims of a token whose signature verified → [`Identity`]: `iss`,
//! `aud`, `exp`, `nbf`, `iat` and the lifetime, with the issuer's leeway;
//! then the `kubernetes.io` claims, which must agree with `sub` and be
//! names Kubernetes could have issued.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::Identity;
use super::config::IdentityConfig;
use super::error::TokenError;

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
pub(super) fn check_names(
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

/// Why a token without a pod is refused (`identity.require_pod_binding`).
pub(super) const UNBOUND: &str = "missing: the token is bound to no pod, so a revocation by pod UID could not cut it off; mount a projected service-account token (or set identity.require_pod_binding = false)";

/// The identity the claims of a token whose signature verified prove, as
/// `cfg` (its issuer's table) says: registered claims with the leeway, the
/// lifetime ceiling, then the `kubernetes.io` claims.
pub(super) fn check_claims(
    cfg: &IdentityConfig,
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
    let leeway = cfg.leeway.as_secs() as i64;

    let iss = string_claim("iss", claims.iss)?.ok_or(TokenError::Claim("iss"))?;
    if iss != cfg.issuer {
        return Err(TokenError::Issuer {
            got: iss,
            want: cfg.issuer.clone(),
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
    if !audiences.iter().any(|a| cfg.audiences.contains(a)) {
        return Err(TokenError::Audience {
            got: audiences,
            want: cfg.audiences.clone(),
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
    let max = cfg.max_token_lifetime.as_secs();
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
    if cfg.require_pod_binding && k8s.pod.is_none() {
        return Err(TokenError::ClaimInvalid {
            claim: "kubernetes.io.pod",
            problem: UNBOUND.into(),
        });
    }
    Ok(Identity {
        cluster: cfg.cluster.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::verify::tests::{claims, fixture, now, reject, sign};
    use serde_json::json;

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
}
