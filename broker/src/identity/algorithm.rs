//! The signature algorithms the broker can be configured to accept, by
//! name as `identity.algorithms` and a token's `alg` spell them.

/// Signature algorithms the broker can be configured to accept: asymmetric
/// only. `none` and HMAC are not in this list and can never be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithm(pub(super) jsonwebtoken::Algorithm);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_cannot_allow_none_or_hmac() {
        assert!(Algorithm::from_name("none").is_err());
        assert!(Algorithm::from_name("HS512").unwrap_err().contains("HMAC"));
        assert!(Algorithm::from_name("RS256").is_ok());
    }
}
