//! Why a token is refused: [`TokenError`], one variant per reason, each
//! message one a person can act on and none quoting the token.

use super::Identity;
use super::jwks::JwksError;

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
