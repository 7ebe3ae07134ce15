//! `Release`: ends the caller's own leases now (allowed when revoked or
//! stale: it only gives up access).

use secrets_broker_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};
use tracing::info;

use super::envelope::{AUDIT_SAMPLE, Ask, Handled};
use super::service::BrokerService;
use crate::clock::unix_now;

pub(super) async fn release(
    svc: &BrokerService,
    req: Request<pb::ReleaseRequest>,
) -> Result<Response<pb::ReleaseResponse>, Status> {
    let ask = |r: &pb::ReleaseRequest| Ask::release(&r.leases);
    let r = req.get_ref();
    svc.call("release", &req, ask, |a| async move {
        let mut released = 0u32;
        for held in &r.leases {
            if svc.owns(&a.id, held).await?
                && svc.leases.extend(&held.lease_id, unix_now()).await?
            {
                released += 1;
            }
        }
        info!(identity = %a.id, released, "leases released");
        // A count and a bounded sample: one record stays small whatever
        // the call carried.
        let detail = json!({
            "leases": r.leases.len(),
            "sample": r.leases.iter().take(AUDIT_SAMPLE).map(|l| l.lease_id.as_str()).collect::<Vec<_>>(),
            "released": released,
        });
        Ok(Handled {
            reply: Response::new(pb::ReleaseResponse { released }),
            detail,
        })
    })
    .await
}
