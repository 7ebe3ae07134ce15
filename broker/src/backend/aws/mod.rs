//! AWS as a source of secrets: STS credentials per pod and Secrets Manager.
//!
//! - **STS web identity** (`sts-web-identity`): the broker has already
//!   verified the pod's token (IRSA: audience `sts.amazonaws.com`, the EKS
//!   issuer); it calls `AssumeRoleWithWebIdentity` with that token and the
//!   role ARN of the broker's config, never one the pod names. The session
//!   name is derived from namespace, service account and pod.
//! - **STS assume-role** (`sts-assume-role`): for clusters without IRSA, the
//!   broker calls `AssumeRole` with its own credentials and session tags
//!   carrying the pod's namespace, service account, pod name and UID (the
//!   tag keys EKS Pod Identity uses), so any cluster gets per-pod AWS
//!   credentials.
//!
//!   Both serve `{"Version":1,"AccessKeyId","SecretAccessKey","SessionToken",
//!   "Expiration"}` (the `credential_process` shape). STS credentials cannot
//!   be revoked: the pod's lease ends no later than they do, and a renewal at
//!   two thirds of their life answers "fetch again" (version 0), so a
//!   sidecar holds fresh ones well before expiry.
//! - **Secrets Manager** (`secretsmanager`): one task per mapped secret calls
//!   `GetSecretValue` every `poll_interval` (±10%), however many pods read
//!   it; the value is served from memory, a new `VersionId` in the stage
//!   becomes a rotation pushed to the watch streams. Throttling and other
//!   failures back off (up to 8 intervals, with jitter) and the last value is
//!   served for at most `max_stale`.

pub mod config;

mod source;
pub use source::AwsSource;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sts::error::SdkError;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata};
use secrecy::SecretSlice;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use self::config::{AwsConfig, Mapping, MappingKind};
use super::SecretVersion;
use super::polled::{PollError, Polled};
use crate::backend::rotation::Rotation;
use crate::backend::vault::Upstream;
use crate::clock::{unix_now, unix_now_ms};
use crate::db::{Db, on_db};
use crate::identity::Identity;

/// What can go wrong talking to AWS. Messages name the call and what AWS
/// said, never a token or a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AwsError {
    /// AWS answered with an error (access denied, validation, throttling).
    #[error("aws {location}: {code}: {message}")]
    Api {
        location: String,
        code: String,
        message: String,
    },
    /// AWS could not be reached (connection refused, timeout, TLS).
    #[error("aws {location}: unreachable: {message}")]
    Unreachable { location: String, message: String },
    /// The secret (or its version stage) does not exist.
    #[error("aws {location}: not found")]
    NotFound { location: String },
    /// The pod's token cannot be used for this mapping (e.g. a web-identity
    /// mapping and a token without the STS audience): nothing was sent to AWS.
    #[error("aws {location}: {message}")]
    Refused { location: String, message: String },
    /// AWS answered something this broker does not understand.
    #[error("aws {location}: unexpected answer: {message}")]
    Unexpected { location: String, message: String },
}

impl PollError for AwsError {
    fn is_gone(&self) -> bool {
        matches!(self, AwsError::NotFound { .. })
    }
    fn is_throttling(&self) -> bool {
        AwsError::is_throttling(self)
    }
}

impl AwsError {
    fn from_sdk<E, R>(location: &str, e: SdkError<E, R>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let location = location.to_owned();
        match &e {
            SdkError::ServiceError(_) => {
                let code = e.code().unwrap_or("Unknown").to_owned();
                if code == "ResourceNotFoundException" {
                    return AwsError::NotFound { location };
                }
                AwsError::Api {
                    location,
                    message: e.message().unwrap_or("no details").to_owned(),
                    code,
                }
            }
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => AwsError::Unreachable {
                location,
                message: DisplayErrorContext(&e).to_string(),
            },
            _ => AwsError::Unexpected {
                location,
                message: DisplayErrorContext(&e).to_string(),
            },
        }
    }

    /// Whether AWS asked us to slow down.
    pub fn is_throttling(&self) -> bool {
        matches!(self, AwsError::Api { code, .. } if matches!(code.as_str(),
            "ThrottlingException" | "Throttling" | "TooManyRequestsException" | "RequestLimitExceeded"))
    }

    /// Whether the failure is the caller's (not an outage): access denied,
    /// a refused token, a missing secret.
    pub fn is_refusal(&self) -> bool {
        match self {
            AwsError::Refused { .. } | AwsError::NotFound { .. } => true,
            AwsError::Api { code, .. } => matches!(
                code.as_str(),
                "AccessDenied"
                    | "AccessDeniedException"
                    | "InvalidIdentityToken"
                    | "ExpiredTokenException"
                    | "IDPRejectedClaim"
                    | "ValidationError"
                    | "MalformedPolicyDocument"
                    | "PackedPolicyTooLarge"
                    | "RegionDisabledException"
            ),
            _ => false,
        }
    }
}

/// The AWS backend. Cheap to share behind an `Arc`.
pub struct Aws {
    cfg: AwsConfig,
    sts: aws_sdk_sts::Client,
    sm: aws_sdk_secretsmanager::Client,
    by_name: HashMap<String, usize>,
    /// The polled value of each Secrets Manager mapping (by mapping index;
    /// `None` for STS ones).
    sm_slots: Vec<Option<Polled<AwsError>>>,
    /// Requests sent to AWS, counted as `backend_reads{backend="aws"}`.
    reads: prometheus_client::metrics::counter::Counter,
}

impl Aws {
    /// A backend for `cfg`: loads the broker's AWS settings (default
    /// credential chain) without calling AWS.
    pub async fn new(cfg: AwsConfig, reads: prometheus_client::metrics::counter::Counter) -> Aws {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(cfg.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(cfg.timeout)
                    .operation_attempt_timeout(cfg.timeout)
                    .build(),
            )
            // One retry inside a call; the pollers and sidecars retry on their own schedule.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2));
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let sdk = loader.load().await;
        let by_name = cfg
            .secrets
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let sm_slots = cfg
            .secrets
            .iter()
            .map(|m| match m.kind {
                MappingKind::SecretsManager { poll_interval, .. } => Some(Polled::new(
                    &m.name,
                    m.location(),
                    poll_interval,
                    cfg.max_stale,
                )),
                _ => None,
            })
            .collect();
        Aws {
            sts: aws_sdk_sts::Client::new(&sdk),
            sm: aws_sdk_secretsmanager::Client::new(&sdk),
            cfg,
            by_name,
            sm_slots,
            reads,
        }
    }

    pub fn config(&self) -> &AwsConfig {
        &self.cfg
    }

    /// The mapping that serves `name`, if AWS serves it.
    pub fn mapping(&self, name: &str) -> Option<&Mapping> {
        self.by_name.get(name).map(|i| &self.cfg.secrets[*i])
    }

    /// Issues STS credentials of a dynamic mapping for one pod. `token` is
    /// the pod's verified bearer token, sent to STS for web identity only.
    pub async fn issue(
        &self,
        name: &str,
        id: &Identity,
        token: &str,
    ) -> Result<(SecretVersion, Upstream), AwsError> {
        let m = &self.cfg.secrets[self.by_name[name]];
        let location = m.location();
        let session = session_name(id);
        let (creds, role_arn) = match &m.kind {
            MappingKind::SecretsManager { .. } => unreachable!("issue on a secretsmanager mapping"),
            MappingKind::StsWebIdentity {
                role_arn,
                duration,
                audience,
            } => {
                if !id.audiences.iter().any(|a| a == audience) {
                    return Err(AwsError::Refused {
                        location,
                        message: format!(
                            "the pod's token has audiences {:?}; this secret needs a token with audience {audience:?} (an IRSA token: mount a projected token with that audience and point the sidecar's token_file at it)",
                            id.audiences
                        ),
                    });
                }
                self.reads.inc();
                let out = self
                    .sts
                    .assume_role_with_web_identity()
                    .role_arn(role_arn)
                    .role_session_name(&session)
                    .web_identity_token(token)
                    .duration_seconds(duration.as_secs() as i32)
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk(&location, e))?;
                (out.credentials().cloned(), role_arn)
            }
            MappingKind::StsAssumeRole {
                role_arn,
                duration,
                session_tags,
            } => {
                let mut req = self
                    .sts
                    .assume_role()
                    .role_arn(role_arn)
                    .role_session_name(&session)
                    .duration_seconds(duration.as_secs() as i32);
                if *session_tags {
                    for (k, v) in session_tag_pairs(id) {
                        let tag = aws_sdk_sts::types::Tag::builder()
                            .key(k)
                            .value(v)
                            .build()
                            .map_err(|e| AwsError::Unexpected {
                                location: location.clone(),
                                message: e.to_string(),
                            })?;
                        req = req.tags(tag);
                    }
                }
                self.reads.inc();
                let out = req
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk(&location, e))?;
                (out.credentials().cloned(), role_arn)
            }
        };
        let Some(creds) = creds else {
            return Err(AwsError::Unexpected {
                location,
                message: "no Credentials in the answer".into(),
            });
        };
        let expiration = creds
            .expiration()
            .fmt(aws_sdk_sts::primitives::DateTimeFormat::DateTime)
            .map_err(|e| AwsError::Unexpected {
                location: location.clone(),
                message: format!("Expiration: {e}"),
            })?;
        let expires_at = creds.expiration().secs();
        let value = credentials_json(
            creds.access_key_id(),
            creds.secret_access_key(),
            creds.session_token(),
            &expiration,
        );
        let key_id = creds.access_key_id().to_owned();
        // The SDK's strings are plain `String`s: overwrite the secret parts.
        let mut parts = (
            creds.secret_access_key().to_owned(),
            creds.session_token().to_owned(),
        );
        drop(creds);
        zeroize::Zeroize::zeroize(&mut parts.0);
        zeroize::Zeroize::zeroize(&mut parts.1);
        info!(secret = %name, identity = %id, session = %session, access_key_id = %key_id, expires_at, "issued aws sts credentials");
        Ok((
            SecretVersion {
                name: name.to_owned(),
                version: unix_now_ms(),
                value: SecretSlice::from(value.to_vec()),
            },
            Upstream {
                kind: "sts",
                mount: role_arn.clone(),
                id: key_id,
                expires_at,
            },
        ))
    }

    /// Reads a Secrets Manager mapping (one `GetSecretValue`).
    async fn read_sm(
        &self,
        m: &Mapping,
        previous: Option<(u64, &str)>,
    ) -> Result<(SecretVersion, String), AwsError> {
        let MappingKind::SecretsManager {
            secret_id,
            version_stage,
            json_key,
            ..
        } = &m.kind
        else {
            unreachable!("read_sm on an sts mapping")
        };
        let location = m.location();
        self.reads.inc();
        let out = self
            .sm
            .get_secret_value()
            .secret_id(secret_id)
            .version_stage(version_stage)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk(&location, e))?;
        let version_id = out.version_id().unwrap_or_default().to_owned();
        let created = out
            .created_date()
            .and_then(|d| d.to_millis().ok())
            .and_then(|ms| u64::try_from(ms).ok())
            .unwrap_or_else(unix_now_ms);
        let raw: zeroize::Zeroizing<Vec<u8>> = match (out.secret_string(), out.secret_binary()) {
            (Some(s), _) => zeroize::Zeroizing::new(s.as_bytes().to_vec()),
            (None, Some(b)) => zeroize::Zeroizing::new(b.as_ref().to_vec()),
            (None, None) => {
                return Err(AwsError::Unexpected {
                    location,
                    message: "neither SecretString nor SecretBinary in the answer".into(),
                });
            }
        };
        drop(out);
        let value = match json_key {
            None => raw.to_vec(),
            Some(k) => match json_field(&raw, k) {
                Some(v) => v,
                None => {
                    return Err(AwsError::NotFound {
                        location: format!(
                            "{location} (not a JSON object with that key in version {version_id})"
                        ),
                    });
                }
            },
        };
        if value.len() > super::MAX_SECRET_BYTES {
            return Err(AwsError::Unexpected {
                location,
                message: format!("value is {} bytes, more than the limit", value.len()),
            });
        }
        // The broker version: the same on every replica for the same AWS
        // version (the version's creation time), and always increasing.
        let version = match previous {
            Some((v, vid)) if vid == version_id => v,
            Some((v, _)) => created.max(v + 1),
            None => created,
        };
        Ok((
            SecretVersion {
                name: m.name.clone(),
                version,
                value: SecretSlice::from(value),
            },
            version_id,
        ))
    }

    /// The Secrets Manager mapping `name` and its polled value.
    fn sm_slot(&self, name: &str) -> Option<(&Mapping, &Polled<AwsError>)> {
        let i = *self.by_name.get(name)?;
        Some((&self.cfg.secrets[i], self.sm_slots[i].as_ref()?))
    }

    /// The value of a Secrets Manager mapping: from memory when the poller
    /// has it (not older than `max_stale`), else one read shared by every caller.
    pub async fn sm_get(&self, name: &str) -> Result<Arc<SecretVersion>, AwsError> {
        let (m, slot) = self
            .sm_slot(name)
            .expect("sm_get on a Secrets Manager mapping");
        slot.get(|prev| async move {
            self.read_sm(m, prev.as_ref().map(|(v, id)| (*v, id.as_str())))
                .await
        })
        .await
    }

    /// The version of a Secrets Manager mapping as last read, if any.
    pub fn sm_version(&self, name: &str) -> Option<u64> {
        self.sm_slot(name)?.1.version()
    }

    /// Starts one poller per Secrets Manager mapping: one read per interval
    /// (±10%); throttling backs off with full jitter so replicas spread out.
    pub fn start(
        self: &Arc<Self>,
        tx: broadcast::Sender<Rotation>,
        shutdown: watch::Receiver<bool>,
    ) {
        for (i, m) in self.cfg.secrets.iter().enumerate() {
            if m.is_dynamic() {
                continue;
            }
            let (aws, m, tx, shutdown) = (self.clone(), m.clone(), tx.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Some(slot) = &aws.sm_slots[i] {
                    let read = |prev: Option<(u64, String)>| {
                        let (aws, m) = (&aws, &m);
                        async move {
                            aws.read_sm(m, prev.as_ref().map(|(v, id)| (*v, id.as_str())))
                                .await
                        }
                    };
                    slot.poll(read, tx, shutdown).await;
                }
            });
        }
    }

    /// Secrets Manager mappings that cannot be served now, with the reason.
    pub fn problems(&self) -> Vec<String> {
        self.sm_slots
            .iter()
            .flatten()
            .filter_map(Polled::problem)
            .collect()
    }
}

/// One JSON field of a secret value: text as is, anything else as JSON.
fn json_field(raw: &[u8], key: &str) -> Option<Vec<u8>> {
    let mut parsed: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let out = match parsed.get(key)? {
        serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
        other => Some(serde_json::to_vec(other).unwrap_or_default()),
    };
    crate::backend::vault::wipe_json(&mut parsed);
    out
}

/// STS credentials as served: the `credential_process` JSON shape, which
/// the sidecar's container endpoint turns into the ECS/EKS shape.
fn credentials_json(
    access_key_id: &str,
    secret_access_key: &str,
    session_token: &str,
    expiration: &str,
) -> zeroize::Zeroizing<Vec<u8>> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Creds<'a> {
        version: u8,
        access_key_id: &'a str,
        secret_access_key: &'a str,
        session_token: &'a str,
        expiration: &'a str,
    }
    zeroize::Zeroizing::new(
        serde_json::to_vec(&Creds {
            version: 1,
            access_key_id,
            secret_access_key,
            session_token,
            expiration,
        })
        .unwrap_or_default(),
    )
}

/// Replaces what STS does not accept with `-`: session names allow
/// `A-Z a-z 0-9 _ + = , . @ -`.
fn sanitize(s: &str, extra: &[char]) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric()
                || matches!(c, '_' | '+' | '=' | '.' | '@' | '-')
                || extra.contains(&c)
            {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The STS session name of a pod: `namespace.service-account.pod` (the pod
/// UID when the token names no pod), at most 64 characters: a longer one
/// keeps its first 55 and a hash of the whole.
pub fn session_name(id: &Identity) -> String {
    let pod = id
        .pod_name
        .as_deref()
        .or(id.pod_uid.as_deref())
        .unwrap_or("no-pod");
    let full = sanitize(
        &format!("{}.{}.{}", id.namespace, id.service_account, pod),
        &[','],
    );
    if full.len() <= 64 {
        return full;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, full.as_bytes());
    let hash = hex::encode(&digest.as_ref()[..4]);
    format!("{}-{hash}", &full[..55])
}

/// The session tags of a pod (the keys EKS Pod Identity uses). Values keep
/// only what STS accepts in a tag value and at most 256 characters.
pub fn session_tag_pairs(id: &Identity) -> Vec<(&'static str, String)> {
    let tag = |v: &str| {
        let mut s = sanitize(v, &[':', '/']);
        s.truncate(256);
        s
    };
    let mut tags = vec![
        ("kubernetes-namespace", tag(&id.namespace)),
        ("kubernetes-service-account", tag(&id.service_account)),
    ];
    if let Some(p) = &id.pod_name {
        tags.push(("kubernetes-pod-name", tag(p)));
    }
    if let Some(u) = &id.pod_uid {
        tags.push(("kubernetes-pod-uid", tag(u)));
    }
    tags
}

/// Whether the STS credentials behind a lease should be replaced now: at two
/// thirds of their life, or when they end within half a lease.
pub fn sts_refresh_due(expires_at: i64, life: Duration, lease_ttl: Duration, now: i64) -> bool {
    let refresh_at = expires_at - (life.as_secs() / 3) as i64;
    now >= refresh_at || expires_at - now < (lease_ttl.as_secs() / 2) as i64
}

/// Forgets STS rows of `upstream_leases` whose credentials have expired:
/// there is nothing to revoke upstream, and renewing them is pointless.
pub async fn prune_expired_sts(db: &Db, now: i64) -> Result<u64, sqlx::Error> {
    const PRUNE: &str = "DELETE FROM upstream_leases WHERE kind = 'sts' AND expires_at < $1";
    on_db!(db, pool => sqlx::query(PRUNE).bind(now).execute(pool).await.map(|r| r.rows_affected()))
}

/// Prunes expired STS rows every 10 minutes until shutdown.
pub async fn keep_sts_rows_pruned(db: Db, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::until_true(&mut shutdown) => return,
        }
        match prune_expired_sts(&db, unix_now() - 3600).await {
            Ok(0) => {}
            Ok(n) => info!(rows = n, "pruned expired sts credential records"),
            Err(e) => warn!(error = %e, "cannot prune sts credential records"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str, pod: Option<&str>) -> Identity {
        let mut id = Identity::for_test(ns, sa);
        id.pod_name = pod.map(str::to_owned);
        id.pod_uid = Some("0f3c6a1e-5b7d-4c2a-9e8f-1a2b3c4d5e6f".into());
        id
    }

    #[test]
    fn session_names_fit_sts() {
        let ok = |s: &str| {
            (2..=64).contains(&s.len())
                && s.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
                })
        };
        let short = session_name(&id("payments", "api", Some("api-7d9f")));
        assert_eq!(short, "payments.api.api-7d9f");
        let long = session_name(&id(
            &"n".repeat(63),
            &"s".repeat(253),
            Some(&"p".repeat(253)),
        ));
        assert!(ok(&long) && long.len() == 64, "{long}");
        // Two long names that differ only at the end stay distinct.
        let other = session_name(&id(
            &"n".repeat(63),
            &"s".repeat(253),
            Some(&"q".repeat(253)),
        ));
        assert_ne!(long, other);
        let odd = session_name(&id("ns", "sa", Some("p/o d:x")));
        assert!(ok(&odd), "{odd}");
        let nopod = session_name(&id("ns", "sa", None));
        assert!(
            nopod.ends_with("0f3c6a1e-5b7d-4c2a-9e8f-1a2b3c4d5e6f"),
            "{nopod}"
        );
    }

    #[test]
    fn tags_carry_the_pod() {
        let tags = session_tag_pairs(&id("payments", "api", Some("api-1")));
        let keys: Vec<_> = tags.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "kubernetes-namespace",
                "kubernetes-service-account",
                "kubernetes-pod-name",
                "kubernetes-pod-uid"
            ]
        );
        assert_eq!(tags[0].1, "payments");
        let weird = session_tag_pairs(&id("a\u{7f}b", &"x".repeat(300), None));
        assert_eq!(weird[0].1, "a-b");
        assert_eq!(weird[1].1.len(), 256);
    }

    #[test]
    fn refresh_at_two_thirds_of_life() {
        let life = Duration::from_secs(3600);
        let ttl = Duration::from_secs(300);
        let issued = 1_000_000;
        let exp = issued + 3600;
        assert!(!sts_refresh_due(exp, life, ttl, issued));
        assert!(!sts_refresh_due(exp, life, ttl, issued + 2399));
        assert!(sts_refresh_due(exp, life, ttl, issued + 2400));
        // A lease longer than a third of the life: refreshed when the rest
        // cannot cover half a lease.
        let long = Duration::from_secs(7200);
        assert!(sts_refresh_due(exp, life, long, issued + 100));
        assert!(sts_refresh_due(exp, life, ttl, exp + 1));
    }

    #[test]
    fn credentials_json_shape() {
        let v = credentials_json("AKIA1", "secret", "token", "2030-01-01T00:00:00Z");
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["Version"], 1);
        assert_eq!(parsed["AccessKeyId"], "AKIA1");
        assert_eq!(parsed["SecretAccessKey"], "secret");
        assert_eq!(parsed["SessionToken"], "token");
        assert_eq!(parsed["Expiration"], "2030-01-01T00:00:00Z");
    }

    #[test]
    fn json_keys() {
        let raw = br#"{"user":"app","password":"p4ss","port":5432}"#;
        assert_eq!(json_field(raw, "password").unwrap(), b"p4ss");
        assert_eq!(json_field(raw, "port").unwrap(), b"5432");
        assert!(json_field(raw, "missing").is_none());
        assert!(json_field(b"not json", "password").is_none());
    }

    #[test]
    fn error_text_has_no_secrets_and_classifies() {
        let e = AwsError::Api {
            location: "sts AssumeRole arn:aws:iam::123456789012:role/x".into(),
            code: "ThrottlingException".into(),
            message: "Rate exceeded".into(),
        };
        assert!(e.is_throttling());
        assert!(!e.is_refusal());
        let denied = AwsError::Api {
            location: "x".into(),
            code: "AccessDenied".into(),
            message: "not authorized".into(),
        };
        assert!(denied.is_refusal());
    }
}
