//! A token as received, before anything in it is trusted: present, within
//! the size limit and three parts; the JOSE header (no key material, `alg`,
//! a short `kid`); header and claims that are one JSON object with distinct
//! keys and bounded nesting; and the signature library's errors in words.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::error::TokenError;

/// Largest JWT header accepted; real headers are under 200 bytes.
const MAX_HEADER_BYTES: usize = 2048;

/// The `iss` claim of a token whose signature is not checked yet: used only
/// to choose which issuer's verifier checks it.
pub(super) fn unverified_issuer(token: &str) -> Result<String, TokenError> {
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
pub(super) fn bounded(token: &str, max: usize) -> Result<&str, TokenError> {
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
pub(super) fn check_json_object(what: &str, part: &str) -> Result<(), TokenError> {
    let raw = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(format!("{what}: not base64url")))?;
    json_object_problem(what, &raw)
}

pub(super) fn signature_error(e: jsonwebtoken::errors::Error, kid: &str) -> TokenError {
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
