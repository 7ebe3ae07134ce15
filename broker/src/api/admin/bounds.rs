//! Bounds on what a request may bring: body sizes (read only once the
//! caller's role allows the call), and how much of a request's strings an
//! audit record or an error repeats.

use axum::http::StatusCode;

use super::handler::ApiError;

/// Largest request body read, and only once the caller's role allows the call.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest body of `PUT /v1/secrets/{name}`: the largest value the store
/// takes, base64-encoded, and a little JSON around it.
pub const MAX_SECRET_BODY_BYTES: usize = crate::backend::MAX_SECRET_BYTES.div_ceil(3) * 4 + 1024;

/// Longest string from a request kept in an audit record or an error.
const MAX_SUMMARY_CHARS: usize = 128;

/// A string from a request as it may appear in an audit record or an error:
/// at most [`MAX_SUMMARY_CHARS`] characters, and the full length when cut.
pub(super) fn summary(s: &str) -> String {
    match s.char_indices().nth(MAX_SUMMARY_CHARS) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}…({} bytes)", &s[..at], s.len()),
    }
}

/// Reads a JSON request body of at most `limit` bytes; call it only after
/// [`super::handler::authorize`], so that a caller without the role costs no read.
pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than the {limit}-byte limit (or cut off)"),
        )
    })?;
    let bytes = zeroize::Zeroizing::new(bytes.to_vec());
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", summary(&e.to_string())),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_bounded() {
        assert_eq!(summary("INC-1"), "INC-1");
        let long = "é".repeat(100_000);
        let s = summary(&long);
        assert!(s.len() < 400, "{}", s.len());
        assert!(s.ends_with("…(200000 bytes)"), "{s}");
    }
}
