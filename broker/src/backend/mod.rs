//! Sources of secrets, each behind one interface ([`source::SecretSource`]):
//! the embedded encrypted store (the default), Vault and AWS, and what they
//! share: the registry from names to sources, upstream credentials of pod
//! leases, the rotation broadcast.

pub mod aws;
pub mod embedded;
pub mod polled;
pub mod registry;
pub mod rotation;
pub mod source;
pub mod upstream;
pub mod vault;

use secrecy::{ExposeSecret, SecretSlice};

/// One version of a secret. The value zeroizes on drop and prints redacted.
#[derive(Clone)]
pub struct SecretVersion {
    pub name: String,
    pub version: u64,
    pub value: SecretSlice<u8>,
}

impl std::fmt::Debug for SecretVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("value", &"[redacted]")
            .finish()
    }
}

impl SecretVersion {
    pub fn value(&self) -> &[u8] {
        self.value.expose_secret()
    }
}

/// Largest secret value accepted (the gRPC message limit is 4 MiB).
pub const MAX_SECRET_BYTES: usize = 1 << 20;

/// Checks a secret name: 1-253 bytes of `a-z A-Z 0-9 . _ -` in `/`-separated
/// segments, none empty and none starting with a dot, so a name is always safe
/// as a path, a label and a log field.
pub fn validate_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!(
            "secret name must be 1-253 bytes, got {}",
            name.len()
        ));
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err(format!("secret name {name:?} has an empty path segment"));
        }
        if segment.starts_with('.') {
            return Err(format!(
                "secret name {name:?} has a segment starting with '.'"
            ));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "secret name {:?} contains {c:?}; use a-z, A-Z, 0-9, '.', '_', '-' and '/'",
                name.escape_debug().to_string()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["demo/greeting", "a", "payments/db.password", "x_y-z/1"] {
            assert!(validate_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../x",
            "a/.hidden",
            "a b",
            "a\0b",
            "ä",
            &"a".repeat(254),
        ] {
            assert!(validate_secret_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let v = SecretVersion {
            name: "n".into(),
            version: 1,
            value: SecretSlice::from(b"hunter2-value".to_vec()),
        };
        let shown = format!("{v:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
