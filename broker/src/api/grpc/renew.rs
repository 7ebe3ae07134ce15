//! `Renew`: extends the caller's own leases and says which version each
//! should hold now (0: fetch again).

use secrets_broker_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::envelope::{Ask, Handled};
use super::error::ApiError;
use super::service::{BrokerService, bound_lease, new_lease};
use crate::policy;

pub(super) async fn renew(
    svc: &BrokerService,
    req: Request<pb::RenewRequest>,
) -> Result<Response<pb::RenewResponse>, Status> {
    let ask = |r: &pb::RenewRequest| Ask::renew(&r.role, &r.leases);
    let r = req.get_ref();
    svc.call("renew", &req, ask, |a| async move {
        let role = a.role()?;
        let ttl = policy::lease_ttl(role, r.ttl_seconds);
        let mut leases = Vec::with_capacity(r.leases.len());
        for held in &r.leases {
            let Some(record) = svc.owned(&a.id, held).await? else {
                return Err(ApiError::UnknownLease(held.lease_id.clone()));
            };
            let mut lease = new_lease(ttl)?;
            lease.lease_id.clone_from(&held.lease_id);
            let now = svc.sources.for_name(&held.name).current(&record, ttl).await?;
            if let Some(ends) = now.ends {
                // The credential's real end bounds the lease.
                bound_lease(&mut lease, ends);
            }
            let current = now.version;
            svc.leases.extend(&lease.lease_id, lease.expires_at_unix).await?;
            leases.push(pb::RenewedLease {
                name: held.name.clone(),
                current_version: current,
                lease: Some(lease),
            });
        }
        debug!(identity = %a.id, role = %role.name, leases = leases.len(), "renew");
        let detail = json!({
            "role": role.name,
            "leases": leases.iter().map(|l| json!({"name": l.name, "lease_id": l.lease.as_ref().map(|x| x.lease_id.clone())})).collect::<Vec<_>>(),
        });
        Ok(Handled {
            reply: Response::new(pb::RenewResponse { leases }),
            detail,
        })
    })
    .await
}
