//! The state every call works with ([`BrokerService`]), and what the calls
//! share: the lease they hand out, its record, the caller as the answer
//! names it.

use std::sync::Arc;
use std::time::Duration;

use secrets_broker_proto::v1 as pb;
use tokio::sync::{broadcast, watch};
use tracing::warn;

use super::error::ApiError;
use crate::backend::rotation::Rotation;
use crate::backend::source::{SecretSource, Sources, Upstream};
use crate::backend::upstream::UpstreamLeases;
use crate::clock::unix_now;
use crate::identity::Identity;
use crate::identity::verify::Verifiers;
use crate::policy::{Policy, RoleConfig};
use crate::state::audit::Auditor;
use crate::state::revocation::View;
use crate::state::{LeaseRecord, Leases};

/// The state a `Broker` service works with.
pub struct BrokerService {
    pub verifier: Arc<Verifiers>,
    pub policy: Arc<Policy>,
    /// Which source serves each secret (the embedded store, Vault, AWS).
    pub sources: Arc<Sources>,
    /// Upstream credentials of pod leases (Vault leases, certificates).
    pub upstream: UpstreamLeases,
    pub leases: Leases,
    pub view: Arc<View>,
    pub auditor: Auditor,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    pub rotations: broadcast::Sender<Rotation>,
    pub heartbeat: Duration,
    /// Load limits: calls in flight, watch streams, rate per workload.
    pub limits: Arc<crate::api::limits::Limits>,
    /// The most secret bytes one Fetch answers.
    pub max_response_bytes: usize,
    /// Which refused calls are audited in full, per peer; the rest are
    /// summarized (see `api::refusals`).
    pub refusals: Arc<crate::api::refusals::RefusalAudit>,
    /// Flips to true on shutdown, ending watch streams so the server can drain.
    pub shutdown: watch::Receiver<bool>,
}

/// How revocation rules with a secret apply to a call that names secrets.
#[derive(Clone, Copy)]
pub(super) enum Scope {
    /// Any withheld name refuses the whole call (Login, Renew).
    Whole,
    /// Withheld names are left out; the call is refused only when nothing
    /// would be left (Fetch, Watch).
    Partial,
}

/// A new lease: 128 bits, the first 48 the issue time in milliseconds and
/// the other 80 random. Time-ordered IDs land at the end of the leases
/// table's primary-key index, so a batch of new leases writes a few index
/// pages instead of one random page per lease.
pub(super) fn new_lease(ttl: Duration) -> Result<pb::Lease, ApiError> {
    let mut id = [0u8; 16];
    let ms = crate::clock::unix_now_ms();
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    aws_lc_rs::rand::fill(&mut id[6..])
        .map_err(|_| ApiError::BadRequest("no randomness".into()))?;
    Ok(pb::Lease {
        lease_id: hex::encode(id),
        ttl_seconds: ttl.as_secs() as u32,
        expires_at_unix: unix_now() + ttl.as_secs() as i64,
    })
}

impl BrokerService {
    /// Counts a finished call by action and result class.
    pub(super) fn observe<T>(
        &self,
        action: &'static str,
        start: std::time::Instant,
        result: &Result<T, ApiError>,
    ) {
        let class = result.as_ref().map_or_else(ApiError::class, |_| "ok");
        self.metrics.call(action, class, start.elapsed());
        // The caller is told only that the state database is unavailable;
        // the operator needs the cause (unreachable, disk full, ...).
        if let Err(e @ (ApiError::Database(_) | ApiError::LeaseRecord(_))) = result {
            warn!(action, error = %e, "call answered UNAVAILABLE");
        }
    }

    /// Whether `held` is a running lease of this workload: only the holder
    /// may extend or release it.
    pub(super) async fn owns(&self, id: &Identity, held: &pb::LeaseRef) -> Result<bool, ApiError> {
        Ok(self.owned(id, held).await?.is_some())
    }

    /// The lease record of `held` when it is a running lease of this workload.
    pub(super) async fn owned(
        &self,
        id: &Identity,
        held: &pb::LeaseRef,
    ) -> Result<Option<LeaseRecord>, ApiError> {
        let record = self.leases.get(&held.lease_id).await?;
        // The same namespace and service account of another cluster (another
        // issuer) is another workload: it may not act on this lease.
        Ok(record.filter(|l| {
            l.secret == held.name
                && l.issuer == id.issuer
                && l.cluster.as_deref().is_none_or(|c| c == id.cluster)
                && l.namespace == id.namespace
                && l.service_account == id.service_account
                && l.pod_uid == id.pod_uid
                && l.expires_at > unix_now()
        }))
    }

    /// Revokes credentials issued for a call that failed before handing them out.
    pub(super) async fn abandon(&self, issued: &[(String, Upstream, &dyn SecretSource)]) {
        for (_, up, source) in issued {
            if let Err(e) = source.revoke(up).await {
                warn!(kind = up.kind, error = %e, "cannot revoke a credential of a failed call; it ends at its own expiry");
            }
        }
    }
}

/// Ends `lease` no later than `ends` (unix seconds), at least a second from now.
pub(super) fn bound_lease(lease: &mut pb::Lease, ends: i64) {
    let now = unix_now();
    if ends < lease.expires_at_unix {
        lease.expires_at_unix = ends.max(now + 1);
        lease.ttl_seconds = (lease.expires_at_unix - now) as u32;
    }
}

pub(super) fn lease_record(
    id: &Identity,
    role: &RoleConfig,
    secret: &str,
    version: u64,
    lease: &pb::Lease,
) -> LeaseRecord {
    LeaseRecord {
        lease_id: lease.lease_id.clone(),
        cluster: Some(id.cluster.clone()),
        issuer: id.issuer.clone(),
        namespace: id.namespace.clone(),
        service_account: id.service_account.clone(),
        pod_name: id.pod_name.clone(),
        pod_uid: id.pod_uid.clone(),
        role: role.name.clone(),
        secret: secret.to_owned(),
        version,
        issued_at: unix_now(),
        expires_at: lease.expires_at_unix,
    }
}

pub fn to_pb(id: &Identity) -> pb::Identity {
    pb::Identity {
        issuer: id.issuer.clone(),
        subject: id.subject.clone(),
        namespace: id.namespace.clone(),
        service_account: id.service_account.clone(),
        service_account_uid: id.service_account_uid.clone(),
        pod_name: id.pod_name.clone().unwrap_or_default(),
        pod_uid: id.pod_uid.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_are_128_bits_and_ordered_by_issue_time() {
        let a = new_lease(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_lease(Duration::from_secs(60)).unwrap();
        assert_eq!(a.lease_id.len(), 32);
        assert!(a.lease_id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.lease_id < b.lease_id, "{} !< {}", a.lease_id, b.lease_id);
        // Same millisecond: still distinct (80 random bits).
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| new_lease(Duration::from_secs(60)).unwrap().lease_id)
            .collect();
        assert_eq!(ids.len(), 1000);
    }
}
