//! `[aws]` in the broker's config: the region (and, for tests or VPC
//! endpoints, an endpoint override), and which broker secrets come from AWS.
//! The broker's own AWS credentials come from the default AWS chain
//! (environment, web identity, ECS/EKS container endpoint, instance profile).
//! Every key is documented in `examples/aws.toml`.

use std::time::Duration;

use serde::Deserialize;

use crate::backend::validate_secret_name;
use crate::config_check::{ConfigError, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAws {
    region: String,
    endpoint_url: Option<String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_poll", with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(default = "default_max_stale", with = "humantime_serde")]
    max_stale: Duration,
    #[serde(default)]
    secrets: Vec<RawMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    name: String,
    kind: String,
    role_arn: Option<String>,
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    audience: Option<String>,
    session_tags: Option<bool>,
    secret_id: Option<String>,
    version_stage: Option<String>,
    json_key: Option<String>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_max_stale() -> Duration {
    Duration::from_secs(3600)
}

/// The audience an IRSA token carries, which STS checks.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// Validated `[aws]`.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub region: String,
    /// Where STS and Secrets Manager are reached instead of AWS's public
    /// endpoints (a VPC endpoint, or an emulator in tests).
    pub endpoint_url: Option<String>,
    /// Per-attempt timeout of an AWS call.
    pub timeout: Duration,
    /// How often each Secrets Manager secret is read (±10% jitter), however
    /// many pods read it.
    pub poll_interval: Duration,
    /// How long a Secrets Manager value is served after the last good read
    /// while AWS fails.
    pub max_stale: Duration,
    pub secrets: Vec<Mapping>,
}

/// One broker secret served from AWS.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The broker secret name (granted by roles like any other).
    pub name: String,
    pub kind: MappingKind,
}

#[derive(Debug, Clone)]
pub enum MappingKind {
    /// `AssumeRoleWithWebIdentity` with the pod's own (IRSA) token.
    StsWebIdentity {
        role_arn: String,
        duration: Duration,
        /// The audience the pod's token must carry (STS checks it too).
        audience: String,
    },
    /// `AssumeRole` with the broker's own credentials, tagged with the pod.
    StsAssumeRole {
        role_arn: String,
        duration: Duration,
        session_tags: bool,
    },
    /// A Secrets Manager secret, polled and served from memory.
    SecretsManager {
        secret_id: String,
        version_stage: String,
        json_key: Option<String>,
        poll_interval: Duration,
    },
}

impl Mapping {
    /// Where the secret lives in AWS, for errors and logs.
    pub fn location(&self) -> String {
        match &self.kind {
            MappingKind::StsWebIdentity { role_arn, .. } => {
                format!("sts AssumeRoleWithWebIdentity {role_arn}")
            }
            MappingKind::StsAssumeRole { role_arn, .. } => format!("sts AssumeRole {role_arn}"),
            MappingKind::SecretsManager {
                secret_id,
                version_stage,
                json_key,
                ..
            } => match json_key {
                Some(k) => format!("secretsmanager {secret_id} ({version_stage}) key {k:?}"),
                None => format!("secretsmanager {secret_id} ({version_stage})"),
            },
        }
    }

    /// Whether every pod gets its own credential.
    pub fn is_dynamic(&self) -> bool {
        !matches!(self.kind, MappingKind::SecretsManager { .. })
    }

    /// How long the STS credentials of this mapping live.
    pub fn duration(&self) -> Option<Duration> {
        match &self.kind {
            MappingKind::StsWebIdentity { duration, .. }
            | MappingKind::StsAssumeRole { duration, .. } => Some(*duration),
            MappingKind::SecretsManager { .. } => None,
        }
    }
}

/// `arn:<partition>:iam::<12 digits>:role/<path/name>`.
fn check_role_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].starts_with("role/")
        && parts[5].len() > "role/".len()
        && parts[5].bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'/' | b'+' | b'=' | b',' | b'.' | b'@' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{arn:?} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)"
        ))
    }
}

/// A Secrets Manager name or ARN: 1-2048 of `A-Z a-z 0-9 /_+=.@-` (and `:` in an ARN).
fn check_secret_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 2048 {
        return Err("must be 1-2048 characters".into());
    }
    let arn = id.starts_with("arn:");
    if let Some(c) = id.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(c, '/' | '_' | '+' | '=' | '.' | '@' | '-')
            || (arn && *c == ':'))
    }) {
        return Err(format!(
            "{id:?} contains {c:?}; a secret name uses A-Z, a-z, 0-9 and /_+=.@-"
        ));
    }
    Ok(())
}

pub(crate) fn validate(v: &Validator<'_>, raw: RawAws) -> Result<AwsConfig, ConfigError> {
    let region = raw.region.trim().to_owned();
    if region.is_empty()
        || region.len() > 32
        || !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(v.err(
            "aws.region",
            format!("{region:?} is not a region name (e.g. \"eu-west-1\")"),
        ));
    }
    let endpoint_url = match raw.endpoint_url {
        None => None,
        Some(u) => {
            let u = u.trim_end_matches('/').to_owned();
            let host = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"));
            if host.is_none_or(str::is_empty) {
                return Err(v.err(
                    "aws.endpoint_url",
                    "must be an https:// (or http:// for a local emulator) URL with a host",
                ));
            }
            Some(u)
        }
    };
    let timeout = v.bounded(
        "aws.timeout",
        raw.timeout,
        Duration::from_millis(100),
        Duration::from_secs(300),
    )?;
    let poll_interval = v.bounded(
        "aws.poll_interval",
        raw.poll_interval,
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
    )?;
    let max_stale = v.bounded(
        "aws.max_stale",
        raw.max_stale,
        Duration::ZERO,
        Duration::from_secs(7 * 24 * 3600),
    )?;
    // STS accepts 15 minutes to 12 hours. An emulator (endpoint_url) may be
    // asked for less, so tests can watch credentials being replaced.
    let min_duration = if endpoint_url.is_some() {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(900)
    };

    let mut secrets: Vec<Mapping> = Vec::new();
    for (i, m) in raw.secrets.into_iter().enumerate() {
        let key = |f: &str| format!("aws.secrets[{i}].{f}");
        validate_secret_name(&m.name).map_err(|e| v.err(&key("name"), e))?;
        if secrets.iter().any(|o| o.name == m.name) {
            return Err(v.err(&key("name"), format!("{:?} is mapped twice", m.name)));
        }
        let unused = |present: bool, f: &str| {
            if present {
                Err(v.err(&key(f), format!("not used by kind {:?}", m.kind)))
            } else {
                Ok(())
            }
        };
        let role_arn = || -> Result<String, ConfigError> {
            let arn = m.role_arn.clone().ok_or_else(|| {
                v.err(
                    &key("role_arn"),
                    format!("kind {:?} needs role_arn", m.kind),
                )
            })?;
            check_role_arn(&arn).map_err(|e| v.err(&key("role_arn"), e))?;
            Ok(arn)
        };
        let duration = || {
            v.bounded(
                &key("duration"),
                m.duration.unwrap_or(Duration::from_secs(3600)),
                min_duration,
                Duration::from_secs(12 * 3600),
            )
        };
        let sm_keys_unused = || -> Result<(), ConfigError> {
            unused(m.secret_id.is_some(), "secret_id")?;
            unused(m.version_stage.is_some(), "version_stage")?;
            unused(m.json_key.is_some(), "json_key")?;
            unused(m.poll_interval.is_some(), "poll_interval")
        };
        let kind = match m.kind.as_str() {
            "sts-web-identity" => {
                sm_keys_unused()?;
                unused(m.session_tags.is_some(), "session_tags")?;
                let audience = m.audience.clone().unwrap_or_else(|| STS_AUDIENCE.into());
                if audience.trim().is_empty() {
                    return Err(v.err(&key("audience"), "must not be empty"));
                }
                MappingKind::StsWebIdentity {
                    role_arn: role_arn()?,
                    duration: duration()?,
                    audience,
                }
            }
            "sts-assume-role" => {
                sm_keys_unused()?;
                unused(m.audience.is_some(), "audience")?;
                MappingKind::StsAssumeRole {
                    role_arn: role_arn()?,
                    duration: duration()?,
                    session_tags: m.session_tags.unwrap_or(true),
                }
            }
            "secretsmanager" => {
                unused(m.role_arn.is_some(), "role_arn")?;
                unused(m.duration.is_some(), "duration")?;
                unused(m.audience.is_some(), "audience")?;
                unused(m.session_tags.is_some(), "session_tags")?;
                let secret_id = m.secret_id.clone().ok_or_else(|| {
                    v.err(&key("secret_id"), "kind \"secretsmanager\" needs secret_id")
                })?;
                check_secret_id(&secret_id).map_err(|e| v.err(&key("secret_id"), e))?;
                let version_stage = m
                    .version_stage
                    .clone()
                    .unwrap_or_else(|| "AWSCURRENT".into());
                if version_stage.is_empty()
                    || version_stage.len() > 256
                    || version_stage.chars().any(char::is_whitespace)
                {
                    return Err(v.err(
                        &key("version_stage"),
                        "must be 1-256 characters without spaces",
                    ));
                }
                if m.json_key.as_ref().is_some_and(|k| k.is_empty()) {
                    return Err(v.err(&key("json_key"), "must not be empty"));
                }
                let poll_interval = match m.poll_interval {
                    None => poll_interval,
                    Some(p) => v.bounded(
                        &key("poll_interval"),
                        p,
                        Duration::from_millis(100),
                        Duration::from_secs(24 * 3600),
                    )?,
                };
                MappingKind::SecretsManager {
                    secret_id,
                    version_stage,
                    json_key: m.json_key.clone(),
                    poll_interval,
                }
            }
            other => {
                return Err(v.err(
                    &key("kind"),
                    format!("{other:?}: use sts-web-identity, sts-assume-role or secretsmanager"),
                ));
            }
        };
        secrets.push(Mapping { name: m.name, kind });
    }
    Ok(AwsConfig {
        region,
        endpoint_url,
        timeout,
        poll_interval,
        max_stale,
        secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(aws: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "{}\n{aws}",
            include_str!("../../../../examples/broker.toml")
        );
        Config::parse(&text, std::path::Path::new("/etc/sb/broker.toml"))
    }

    #[test]
    fn example_is_valid() {
        let cfg = parse(include_str!("../../../../examples/aws.toml"))
            .expect("examples/aws.toml must stay valid");
        let aws = cfg.aws.expect("an [aws] table");
        assert_eq!(aws.region, "eu-west-1");
        assert_eq!(aws.secrets.len(), 3);
        assert!(matches!(
            &aws.secrets[0].kind,
            MappingKind::StsWebIdentity { audience, duration, .. }
                if audience == STS_AUDIENCE && duration.as_secs() == 3600
        ));
        assert!(matches!(
            &aws.secrets[1].kind,
            MappingKind::StsAssumeRole {
                session_tags: true,
                ..
            }
        ));
        match &aws.secrets[2].kind {
            MappingKind::SecretsManager {
                secret_id,
                version_stage,
                json_key,
                poll_interval,
            } => {
                assert_eq!(secret_id, "prod/payments/db");
                assert_eq!(version_stage, "AWSCURRENT");
                assert_eq!(json_key.as_deref(), Some("password"));
                assert_eq!(poll_interval.as_secs(), 60);
            }
            other => panic!("{other:?}"),
        }
        assert!(aws.secrets[0].is_dynamic() && !aws.secrets[2].is_dynamic());
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = "[aws]\nregion = \"us-east-1\"\n";
        let sts = "[[aws.secrets]]\nname = \"aws/a\"\nkind = \"sts-assume-role\"\nrole_arn = \"arn:aws:iam::123456789012:role/a\"\n";
        let sm =
            "[[aws.secrets]]\nname = \"aws/s\"\nkind = \"secretsmanager\"\nsecret_id = \"a/b\"\n";
        let cases = [
            (base.replace("us-east-1", "US East"), "aws.region"),
            (
                format!("{base}endpoint_url = \"moto:5000\"\n"),
                "aws.endpoint_url",
            ),
            (format!("{base}timeout = \"1ms\"\n"), "aws.timeout"),
            (
                format!("{base}{}", sts.replace("sts-assume-role", "iam-user")),
                "aws.secrets[0].kind",
            ),
            (
                format!("{base}{}", sts.replace("role/a", "user/a")),
                "aws.secrets[0].role_arn",
            ),
            (
                format!("{base}{sts}duration = \"10s\"\n"),
                "aws.secrets[0].duration",
            ),
            (
                format!("{base}{sts}duration = \"13h\"\n"),
                "aws.secrets[0].duration",
            ),
            (
                format!("{base}{sts}secret_id = \"x\"\n"),
                "aws.secrets[0].secret_id",
            ),
            (
                format!("{base}{sts}audience = \"x\"\n"),
                "aws.secrets[0].audience",
            ),
            (format!("{base}{sts}{sts}"), "aws.secrets[1].name"),
            (
                format!("{base}{}", sm.replace("secret_id = \"a/b\"\n", "")),
                "aws.secrets[0].secret_id",
            ),
            (
                format!("{base}{sm}role_arn = \"arn:aws:iam::123456789012:role/a\"\n"),
                "aws.secrets[0].role_arn",
            ),
            (
                format!("{base}{sm}json_key = \"\"\n"),
                "aws.secrets[0].json_key",
            ),
            (
                format!("{base}{}", sm.replace("a/b", "a b")),
                "aws.secrets[0].secret_id",
            ),
            (
                format!("{base}{}", sm.replace("aws/s", "../s")),
                "aws.secrets[0].name",
            ),
        ];
        for (aws, key) in cases {
            let err = parse(&aws).unwrap_err().to_string();
            assert!(err.contains(key), "{aws}\n=> {err}");
        }
        // An emulator may be asked for short credentials (tests); AWS may not.
        let short =
            format!("{base}endpoint_url = \"http://127.0.0.1:5000\"\n{sts}duration = \"30s\"\n");
        assert!(parse(&short).is_ok());
        assert!(parse(&format!("{base}{sts}duration = \"1h\"\n")).is_ok());
    }

    #[test]
    fn role_arns() {
        for ok in [
            "arn:aws:iam::123456789012:role/payments",
            "arn:aws-us-gov:iam::123456789012:role/path/to/app-1",
        ] {
            assert!(check_role_arn(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "payments",
            "arn:aws:iam::12345:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
        ] {
            assert!(check_role_arn(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secret_ids() {
        for ok in [
            "prod/payments/db",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf",
        ] {
            assert!(check_secret_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a:b", "a?b"] {
            assert!(check_secret_id(bad).is_err(), "{bad:?}");
        }
    }
}
