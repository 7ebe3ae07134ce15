//! Identity → role → decision. Deny by default: an identity gets nothing
//! unless exactly one role binds it (or it names a role that binds it), and a
//! role grants only the secrets it lists.
//!
//! The roles themselves are `[[roles]]` in the broker's config: [`RoleConfig`]
//! and its checks live here, beside the patterns they are made of.

use std::time::Duration;

use serde::Deserialize;

use crate::config_check::{ConfigError, Validator};
use crate::identity::Identity;

/// A name pattern from the config: exact text, or `*` wildcards that match any
/// run of characters (`api-*`, `payments/*`, `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Parses a pattern; only `*` is special, other glob syntax is refused so a
    /// pattern never means something other than what it looks like.
    pub fn new(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        if let Some(c) = text
            .chars()
            .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}' | '\\'))
        {
            return Err(format!("{c:?} is not supported; only '*' is a wildcard"));
        }
        if text.chars().any(char::is_control) {
            return Err("control characters are not allowed".into());
        }
        Ok(Pattern(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches; `*` matches any run of characters, including none.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let mut parts: Vec<&str> = parts.collect();
        let Some(last) = parts.pop() else {
            return rest.is_empty(); // no '*' at all: exact match
        };
        for part in parts {
            match rest.find(part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// Role names appear in configs, requests and logs: keep them plain.
pub fn valid_role_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// A role from `[[roles]]`: whom it binds and what it grants.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    pub name: String,
    /// Clusters whose identities the role binds; empty: any cluster.
    pub clusters: Vec<String>,
    pub namespaces: Vec<Pattern>,
    pub service_accounts: Vec<Pattern>,
    /// When set, the token's `aud` must contain it (on top of the broker's audiences).
    pub audience: Option<String>,
    pub secrets: Vec<Pattern>,
    pub ttl: Duration,
    pub max_ttl: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRole {
    name: String,
    #[serde(default)]
    clusters: Vec<String>,
    namespaces: Vec<String>,
    service_accounts: Vec<String>,
    audience: Option<String>,
    secrets: Vec<String>,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    ttl: Duration,
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    max_ttl: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(3600)
}

/// Validates the `[[roles]]`: names unique, patterns valid, TTLs within
/// bounds, and at least one role (no role would refuse every login).
pub(crate) fn roles(v: &Validator<'_>, raw: Vec<RawRole>) -> Result<Vec<RoleConfig>, ConfigError> {
    let mut roles: Vec<RoleConfig> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("roles[{i}].{field}");
        if !valid_role_name(&r.name) {
            return Err(v.err(
                &key("name"),
                "use 1-63 characters from a-z, 0-9, '-', '_' and '.'",
            ));
        }
        if roles.iter().any(|o| o.name == r.name) {
            return Err(v.err(&key("name"), format!("duplicate role name {:?}", r.name)));
        }
        let patterns = |field: &str, list: Vec<String>| -> Result<Vec<Pattern>, ConfigError> {
            if list.is_empty() {
                return Err(v.err(&key(field), "list at least one entry"));
            }
            list.iter()
                .map(|p| Pattern::new(p).map_err(|m| v.err(&key(field), format!("{p:?}: {m}"))))
                .collect()
        };
        if r.ttl.is_zero() || r.ttl > r.max_ttl {
            return Err(v.err(
                &key("ttl"),
                format!(
                    "must be above zero and at most max_ttl ({})",
                    humantime::format_duration(r.max_ttl)
                ),
            ));
        }
        let max_ttl = v.bounded(
            &key("max_ttl"),
            r.max_ttl,
            Duration::from_secs(10),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        roles.push(RoleConfig {
            namespaces: patterns("namespaces", r.namespaces)?,
            service_accounts: patterns("service_accounts", r.service_accounts)?,
            secrets: patterns("secrets", r.secrets)?,
            audience: r.audience,
            ttl: r.ttl.max(Duration::from_secs(1)),
            max_ttl,
            clusters: r.clusters,
            name: r.name,
        });
    }
    if roles.is_empty() {
        return Err(v.err(
            "roles",
            "no [[roles]] defined: every login would be refused (deny by default)",
        ));
    }
    Ok(roles)
}

/// Why a request is refused by policy. The messages name the identity and
/// the role, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No configured role binds this namespace/service account/audience.
    #[error("no role matches identity {identity}")]
    NoRole { identity: String },
    /// Several roles bind the identity and the request named none.
    #[error("identity {identity} matches several roles ({roles}); name one with `role`")]
    Ambiguous { identity: String, roles: String },
    /// The request named a role that does not exist.
    #[error("role {role:?} does not exist")]
    UnknownRole { role: String },
    /// The request named a role that does not bind this identity.
    #[error("identity {identity} is not bound to role {role:?}")]
    NotBound { identity: String, role: String },
    /// The role does not list the secret.
    #[error("role {role:?} does not grant secret {secret:?}")]
    SecretNotGranted { role: String, secret: String },
}

/// The roles of a broker, in config order.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: Vec<RoleConfig>,
}

impl Policy {
    pub fn new(roles: Vec<RoleConfig>) -> Policy {
        Policy { roles }
    }

    fn binds(role: &RoleConfig, id: &Identity) -> bool {
        (role.clusters.is_empty() || role.clusters.contains(&id.cluster))
            && role.namespaces.iter().any(|p| p.matches(&id.namespace))
            && role
                .service_accounts
                .iter()
                .any(|p| p.matches(&id.service_account))
            && role
                .audience
                .as_ref()
                .is_none_or(|aud| id.audiences.iter().any(|a| a == aud))
    }

    /// Resolves the role an identity acts as. `requested` is the role named by
    /// the caller, empty for "the only one that matches".
    pub fn resolve(&self, id: &Identity, requested: &str) -> Result<&RoleConfig, Denied> {
        if !requested.is_empty() {
            let role = self
                .roles
                .iter()
                .find(|r| r.name == requested)
                .ok_or_else(|| Denied::UnknownRole {
                    role: requested.to_owned(),
                })?;
            return if Self::binds(role, id) {
                Ok(role)
            } else {
                Err(Denied::NotBound {
                    identity: id.to_string(),
                    role: requested.to_owned(),
                })
            };
        }
        let matching: Vec<&RoleConfig> = self.roles.iter().filter(|r| Self::binds(r, id)).collect();
        match matching.as_slice() {
            [] => Err(Denied::NoRole {
                identity: id.to_string(),
            }),
            [one] => Ok(one),
            many => Err(Denied::Ambiguous {
                identity: id.to_string(),
                roles: many
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// Whether a role grants a secret.
pub fn grants(role: &RoleConfig, secret: &str) -> Result<(), Denied> {
    if role.secrets.iter().any(|p| p.matches(secret)) {
        Ok(())
    } else {
        Err(Denied::SecretNotGranted {
            role: role.name.clone(),
            secret: secret.to_owned(),
        })
    }
}

/// The lease TTL for a request: the role's default when none is asked for,
/// never above the role's maximum.
pub fn lease_ttl(role: &RoleConfig, requested_seconds: u32) -> Duration {
    if requested_seconds == 0 {
        role.ttl
    } else {
        Duration::from_secs(u64::from(requested_seconds))
            .clamp(Duration::from_secs(1), role.max_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn patterns() {
        assert!(p("api").matches("api"));
        assert!(!p("api").matches("api2"));
        assert!(p("api-*").matches("api-"));
        assert!(p("api-*").matches("api-worker"));
        assert!(!p("api-*").matches("ap"));
        assert!(p("*").matches(""));
        assert!(p("a*b*c").matches("abc"));
        assert!(p("a*b*c").matches("a-b-b-c"));
        assert!(!p("a*b*c").matches("a-c"));
        assert!(
            !p("ab*ba").matches("aba"),
            "prefix and suffix must not overlap"
        );
        assert!(p("payments/*").matches("payments/db/password"));
        assert!(Pattern::new("a?").is_err());
        assert!(Pattern::new("").is_err());
    }

    fn role(name: &str, ns: &str, sa: &str, aud: Option<&str>) -> RoleConfig {
        RoleConfig {
            name: name.into(),
            clusters: Vec::new(),
            namespaces: vec![p(ns)],
            service_accounts: vec![p(sa)],
            audience: aud.map(Into::into),
            secrets: vec![p("demo/*")],
            ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(600),
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::for_test(ns, sa)
    }

    #[test]
    fn deny_by_default_and_ambiguity() {
        let policy = Policy::new(vec![
            role("a", "payments", "api", None),
            role("b", "payments", "*", None),
            role("c", "other", "*", Some("special")),
        ]);
        assert!(matches!(
            policy.resolve(&id("x", "y"), ""),
            Err(Denied::NoRole { .. })
        ));
        assert_eq!(
            policy.resolve(&id("payments", "worker"), "").unwrap().name,
            "b"
        );
        let err = policy.resolve(&id("payments", "api"), "").unwrap_err();
        assert!(err.to_string().contains("several roles (a, b)"), "{err}");
        assert_eq!(
            policy.resolve(&id("payments", "api"), "a").unwrap().name,
            "a"
        );
        assert!(matches!(
            policy.resolve(&id("payments", "api"), "c"),
            Err(Denied::NotBound { .. })
        ));
        assert!(matches!(
            policy.resolve(&id("payments", "api"), "zzz"),
            Err(Denied::UnknownRole { .. })
        ));
        // audience binding: the role needs "special" in aud
        assert!(policy.resolve(&id("other", "x"), "").is_err());
    }

    #[test]
    fn ttl_is_capped() {
        let r = role("a", "n", "s", None);
        assert_eq!(lease_ttl(&r, 0), Duration::from_secs(60));
        assert_eq!(lease_ttl(&r, 30), Duration::from_secs(30));
        assert_eq!(lease_ttl(&r, 100_000), Duration::from_secs(600));
        assert!(grants(&r, "demo/x").is_ok());
        assert!(grants(&r, "prod/x").is_err());
    }

    proptest::proptest! {
        /// A pattern without `*` matches exactly itself; `prefix*` matches every
        /// extension of the prefix; `*suffix` every string ending in it.
        #[test]
        fn pattern_semantics(a in "[a-z/.-]{1,12}", b in "[a-z/.-]{0,12}") {
            let (prefix, suffix) = (p(&format!("{a}*")), p(&format!("*{a}")));
            let (ab, ba) = (format!("{a}{b}"), format!("{b}{a}"));
            proptest::prop_assert!(p(&a).matches(&a));
            proptest::prop_assert_eq!(p(&a).matches(&b), a == b);
            proptest::prop_assert!(prefix.matches(&ab));
            proptest::prop_assert!(suffix.matches(&ba));
            proptest::prop_assert_eq!(prefix.matches(&b), b.starts_with(&a));
        }
    }
}
