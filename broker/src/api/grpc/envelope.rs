//! The one path every `Broker` call takes, in this order:
//!
//! 1. **shape**: the names a call carries (at most 256, each a valid name,
//!    each once), its role name and lease IDs, before any other work;
//! 2. **admit**: a place among the calls in flight (or the watch streams);
//! 3. **token**: present, `Bearer`, within `identity.max_token_bytes`, with
//!    a JOSE header that parses;
//! 4. **verify**: signature, issuer, audience, lifetime (or TokenReview);
//! 5. **rate**: the workload's rate, then the global one;
//! 6. **revocation**: the view is fresh and no rule refuses the call;
//! 7. **authorize**: the role binds the workload and grants every name;
//! 8. the **handler**;
//! 9. **one audit record**, bounded in size;
//! 10. **metrics**: the call counted by action and result class.
//!
//! The rate limit is keyed on the verified workload and so comes after the
//! signature check: before it, the workload is only a claim anyone can
//! write, and a limit keyed on a claim would let one caller spend another's
//! budget. Before verification a call is bounded by the calls in flight,
//! and a refused token is audited a few times a second per peer at most
//! (`api::refusals`); a call refused by a rate limit is counted, never
//! audited. Nothing is audited or written for a call before its rate check.

use std::future::Future;

use serde::Serialize;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Status};
use tracing::{Instrument, debug, info_span, warn};

use super::error::ApiError;
use super::service::{BrokerService, Scope};
use crate::backend::validate_secret_name;
use crate::clock::unix_now;
use crate::identity::error::TokenError;
use crate::identity::{Identity, fingerprint};
use crate::policy;
use crate::policy::RoleConfig;
use crate::state::audit::Entry;

/// Most names (secrets or leases) one request may carry.
pub const MAX_NAMES_PER_REQUEST: usize = 256;
/// How many names or lease IDs a record lists beside their count, when it
/// lists a sample rather than all.
pub const AUDIT_SAMPLE: usize = 16;
/// The largest audit detail one call writes; a larger one is replaced by its
/// size (a Fetch of 256 leases with the longest names is about 80 KiB).
const MAX_AUDIT_DETAIL: usize = 128 * 1024;
/// The longest lease ID a call may name (the broker's are 32 hex digits).
const MAX_LEASE_ID: usize = 64;

/// What a call asks for, read from its request before anything else.
pub(super) struct Ask {
    role: String,
    names: Vec<String>,
    gate: Gate,
    /// A watch stream (a stream place, held for the stream's life) rather
    /// than a unary call (a place in flight, held for the call).
    stream: bool,
}

/// How far past the verified identity a call is checked.
enum Gate {
    /// Revocation (with this scope), then the role grants each name as a
    /// `what` ("secret" or "lease"; `None` for Login, which names none).
    Authorize(Scope, Option<&'static str>),
    /// The identity only: Release gives up access, which a revoked or stale
    /// workload may always do.
    Identity,
}

impl Ask {
    fn new(role: &str, names: Vec<String>, gate: Gate) -> Result<Ask, ApiError> {
        if !role.is_empty() && !policy::valid_role_name(role) {
            return Err(ApiError::BadRequest("role name is not valid".into()));
        }
        Ok(Ask {
            role: role.to_owned(),
            names,
            gate,
            stream: false,
        })
    }

    /// Login: a role, no names.
    pub(super) fn login(role: &str) -> Result<Ask, ApiError> {
        Ask::new(role, Vec::new(), Gate::Authorize(Scope::Whole, None))
    }

    /// Fetch: secrets, each once; a secret withheld by a rule is left out.
    pub(super) fn fetch(role: &str, names: &[String]) -> Result<Ask, ApiError> {
        let names = unique_names(names, "secret")?;
        Ask::new(role, names, Gate::Authorize(Scope::Partial, Some("secret")))
    }

    /// Watch: as Fetch, held open as a stream.
    pub(super) fn watch(role: &str, names: &[String]) -> Result<Ask, ApiError> {
        let mut ask = Ask::fetch(role, names)?;
        ask.stream = true;
        Ok(ask)
    }

    /// Renew: leases of granted secrets; any revocation refuses the call.
    pub(super) fn renew(
        role: &str,
        leases: &[secrets_broker_proto::v1::LeaseRef],
    ) -> Result<Ask, ApiError> {
        let names = lease_names(leases)?;
        Ask::new(role, names, Gate::Authorize(Scope::Whole, Some("lease")))
    }

    /// Release: leases of the caller's own; no role, no revocation check.
    pub(super) fn release(leases: &[secrets_broker_proto::v1::LeaseRef]) -> Result<Ask, ApiError> {
        let names = lease_names(leases)?;
        Ask::new("", names, Gate::Identity)
    }
}

/// A call that passed every check before its handler.
pub(super) struct Admitted<'a> {
    pub id: Identity,
    /// The role the call acts in; `None` only for Release.
    pub role: Option<&'a RoleConfig>,
    /// The names the call carries, checked, each once (Fetch, Watch) or as
    /// sent (Renew, Release: one per lease).
    pub names: Vec<String>,
    /// The verified bearer token, passed on only to STS web identity; never
    /// logged or kept.
    pub token: &'a str,
    /// A watch stream's place, to be held by the stream.
    pub stream: Option<OwnedSemaphorePermit>,
}

impl<'a> Admitted<'a> {
    /// The role of a call gated by one (every call but Release).
    pub(super) fn role(&self) -> Result<&'a RoleConfig, ApiError> {
        self.role
            .ok_or_else(|| ApiError::BadRequest("this call acts in no role".into()))
    }
}

/// What a handler answers, and the detail of the call's one audit record.
pub(super) struct Handled<T, D> {
    pub reply: T,
    pub detail: D,
}

/// An audit detail with the workload's issuer and pod beside the call's own
/// fields.
#[derive(Serialize)]
struct Audited<'a, D: Serialize> {
    issuer: &'a str,
    pod: Option<&'a str>,
    pod_uid: Option<&'a str>,
    #[serde(flatten)]
    detail: D,
}

/// The caller's request ID (`x-request-id`, as the sidecar sends it) or a new
/// one, so a sidecar's failure can be found in the broker's logs.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            let _ = aws_lc_rs::rand::fill(&mut b);
            hex::encode(b)
        })
}

/// The bearer token of a request, not yet verified.
fn bearer<T>(req: &Request<T>) -> Result<&str, TokenError> {
    let value = req
        .metadata()
        .get("authorization")
        .ok_or(TokenError::Missing)?;
    let value = value
        .to_str()
        .map_err(|_| TokenError::Malformed("authorization header is not ASCII".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| TokenError::Malformed("authorization is not `Bearer <jwt>`".into()))?;
    Ok(token)
}

/// Checks the names a call carries; `what` is what the call lists
/// ("secret" for Fetch and Watch, "lease" for Renew and Release).
pub(super) fn check_names(names: &[String], what: &str) -> Result<(), ApiError> {
    if names.is_empty() {
        return Err(ApiError::BadRequest(format!("name at least one {what}")));
    }
    if names.len() > MAX_NAMES_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "{} {what}s in one call, at most {MAX_NAMES_PER_REQUEST}",
            names.len()
        )));
    }
    for n in names {
        validate_secret_name(n).map_err(ApiError::BadRequest)?;
    }
    Ok(())
}

/// The names of a call, each once, in the order first asked for: 256 copies
/// of one large secret must not make one answer 256 times its size.
fn unique_names(names: &[String], what: &str) -> Result<Vec<String>, ApiError> {
    // The count is checked on what was sent, before any copy is made.
    check_names(names, what)?;
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    Ok(names
        .iter()
        .filter(|n| seen.insert(n.as_str()))
        .cloned()
        .collect())
}

/// The secret names of a call's leases, after checking the leases' shape.
fn lease_names(leases: &[secrets_broker_proto::v1::LeaseRef]) -> Result<Vec<String>, ApiError> {
    if leases.len() > MAX_NAMES_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "{} leases in one call, at most {MAX_NAMES_PER_REQUEST}",
            leases.len()
        )));
    }
    for l in leases {
        let id = &l.lease_id;
        if id.is_empty()
            || id.len() > MAX_LEASE_ID
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ApiError::BadRequest(format!(
                "the lease of {:?} has no valid lease ID (1-{MAX_LEASE_ID} letters, digits or '-')",
                l.name.escape_debug().to_string()
            )));
        }
    }
    let names: Vec<String> = leases.iter().map(|l| l.name.clone()).collect();
    check_names(&names, "lease")?;
    Ok(names)
}

/// A workload as an audit record's actor.
pub(super) fn actor(id: &Identity) -> String {
    format!("{}/{}", id.namespace, id.service_account)
}

/// A count and the first few of `names`: what a refusal's record lists.
fn sample(names: &[String]) -> serde_json::Value {
    json!({ "count": names.len(), "sample": &names[..names.len().min(AUDIT_SAMPLE)] })
}

impl BrokerService {
    /// Runs one call through every step (see the module's documentation):
    /// `ask` reads what the request asks for, `handler` does the call's own
    /// work once everything before it passed.
    pub(super) async fn call<'a, Req, T, D, F, Fut>(
        &'a self,
        action: &'static str,
        req: &'a Request<Req>,
        ask: impl FnOnce(&Req) -> Result<Ask, ApiError>,
        handler: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(Admitted<'a>) -> Fut,
        Fut: Future<Output = Result<Handled<T, D>, ApiError>>,
        D: Serialize,
    {
        let start = std::time::Instant::now();
        let rid = request_id(req);
        let span = match action {
            "login" => info_span!("login", request_id = %rid),
            "fetch" => info_span!("fetch", request_id = %rid),
            "renew" => info_span!("renew", request_id = %rid),
            "release" => info_span!("release", request_id = %rid),
            _ => info_span!("watch", request_id = %rid),
        };
        let result = async {
            let ask = ask(req.get_ref())?;
            let (_call, stream) = if ask.stream {
                (None, Some(self.limits.admit_stream()?))
            } else {
                (Some(self.limits.admit()?), None)
            };
            let token = bearer(req)?;
            let id = self.verify(req, token, action).await?;
            // Counted and refused, never audited: a flood must not flood the
            // audit log.
            if let Err(e) = self.limits.check(&id) {
                debug!(identity = %id, action, "rate limited");
                return Err(e.into());
            }
            let role = match self.gate(&id, &ask) {
                Ok(role) => role,
                Err(e) => {
                    warn!(identity = %id, action, reason = %e, "call refused");
                    self.audit(
                        &id,
                        action,
                        e.class(),
                        json!({
                            "reason": e.to_string(),
                            "names": sample(&ask.names),
                        }),
                    );
                    return Err(e);
                }
            };
            let admitted = Admitted {
                id: id.clone(),
                role,
                names: ask.names,
                token,
                stream,
            };
            let Handled { reply, detail } = handler(admitted).await?;
            self.audit(&id, action, "ok", detail);
            Ok(reply)
        }
        .instrument(span)
        .await;
        self.observe(action, start, &result);
        result.map_err(Into::into)
    }

    /// The token's shape, then its verification. A token the API server says
    /// belongs to a pod that is gone ends that pod's leases.
    async fn verify<Req>(
        &self,
        req: &Request<Req>,
        token: &str,
        action: &'static str,
    ) -> Result<Identity, ApiError> {
        let verified = match self.verifier.check_shape(token) {
            Ok(token) => self.verifier.verify(token).await,
            Err(e) => Err(e),
        };
        match verified {
            Ok(id) => Ok(id),
            Err(TokenError::PodGone { identity, reason }) => {
                let ended = match &identity.pod_uid {
                    Some(uid) => self.leases.end_for_pod(uid, unix_now()).await.unwrap_or(0),
                    None => 0,
                };
                warn!(identity = %identity, reason = %reason, leases_ended = ended, "token no longer accepted by the API server; pod leases ended");
                self.audit(
                    &identity,
                    action,
                    "pod_gone",
                    json!({ "reason": reason, "leases_ended": ended }),
                );
                Err(TokenError::PodGone { identity, reason }.into())
            }
            Err(e) => {
                let fp = fingerprint(token);
                warn!(token.fp = %fp, reason = %e, "token refused");
                let e = ApiError::from(e);
                // There is no workload yet: a few refusals a second per peer
                // are audited in full, the rest in a summary record.
                let peer = req.remote_addr().map(|a| a.ip());
                if self.refusals.admit(peer, action, e.class()) {
                    self.auditor.record(Entry::new(
                        format!("token:{fp}"),
                        action,
                        e.class(),
                        json!({ "reason": e.to_string() }),
                    ));
                }
                Err(e)
            }
        }
    }

    /// Revocation, then authorization, as the call's gate asks.
    fn gate(&self, id: &Identity, ask: &Ask) -> Result<Option<&RoleConfig>, ApiError> {
        let Gate::Authorize(scope, what) = ask.gate else {
            return Ok(None);
        };
        let role = self.policy.resolve(id, &ask.role)?;
        self.view.ensure_fresh()?;
        match scope {
            Scope::Whole => self.view.check(id, &ask.names)?,
            Scope::Partial => self.view.check_partial(id, &ask.names)?,
        }
        if what.is_some() {
            for n in &ask.names {
                policy::grants(role, n)?;
            }
        }
        Ok(Some(role))
    }

    /// Writes one audit record of `id`, with its issuer and pod; a detail
    /// over [`MAX_AUDIT_DETAIL`] is replaced by its size.
    pub(super) fn audit(&self, id: &Identity, action: &str, result: &str, detail: impl Serialize) {
        let audited = Audited {
            issuer: &id.issuer,
            pod: id.pod_name.as_deref(),
            pod_uid: id.pod_uid.as_deref(),
            detail,
        };
        let mut entry = Entry::new(actor(id), action, result, &audited);
        if entry.detail.len() > MAX_AUDIT_DETAIL {
            warn!(identity = %id, action, bytes = entry.detail.len(), "audit detail too large; its size is recorded instead");
            entry.detail = json!({
                "issuer": audited.issuer,
                "pod": audited.pod,
                "pod_uid": audited.pod_uid,
                "detail_bytes": entry.detail.len(),
            })
            .to_string();
        }
        self.auditor.record(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrets_broker_proto::v1::LeaseRef;

    fn lease(name: &str, id: &str) -> LeaseRef {
        LeaseRef {
            name: name.into(),
            lease_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn name_checks_say_what_the_call_lists() {
        let e = check_names(&[], "lease").unwrap_err().to_string();
        assert!(e.contains("at least one lease"), "{e}");
        let many = vec!["a".to_owned(); MAX_NAMES_PER_REQUEST + 1];
        let e = check_names(&many, "secret").unwrap_err().to_string();
        assert!(e.contains("257 secrets in one call, at most 256"), "{e}");
    }

    #[test]
    fn a_fetch_names_each_secret_once_and_refuses_too_many_before_copying() {
        let names: Vec<String> = ["b", "a", "b", "a", "c"].map(String::from).to_vec();
        let ask = Ask::fetch("", &names).unwrap();
        assert_eq!(ask.names, ["b", "a", "c"]);
        let dup = vec!["x".to_owned(); MAX_NAMES_PER_REQUEST + 1];
        assert!(
            Ask::fetch("", &dup).is_err(),
            "257 copies of one name are still 257 names"
        );
        assert!(Ask::watch("", &["ok/name".into(), "bad name".into()]).is_err());
    }

    #[test]
    fn lease_calls_check_lease_ids_and_count_before_any_lookup() {
        assert!(Ask::renew("", &[lease("a", "0123abcd")]).is_ok());
        for bad in ["", "x".repeat(65).as_str(), "a b", "../x", "a\nb"] {
            let e = Ask::release(&[lease("a", bad)]).err().unwrap().to_string();
            assert!(e.contains("no valid lease ID"), "{bad:?}: {e}");
            assert!(!e.contains('\n'));
        }
        let many: Vec<LeaseRef> = (0..=MAX_NAMES_PER_REQUEST)
            .map(|_| lease("a", "1"))
            .collect();
        let e = Ask::release(&many).err().unwrap().to_string();
        assert!(e.contains("257 leases in one call, at most 256"), "{e}");
        assert!(Ask::release(&[lease("bad name", "1")]).is_err());
        assert!(Ask::login("no spaces please").is_err());
    }

    #[test]
    fn an_audit_detail_sits_beside_the_workloads_issuer_and_pod() {
        let d = Audited {
            issuer: "https://i",
            pod: Some("p"),
            pod_uid: None,
            detail: json!({ "role": "r" }),
        };
        let v: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(
            v,
            json!({ "issuer": "https://i", "pod": "p", "pod_uid": null, "role": "r" })
        );
    }
}
