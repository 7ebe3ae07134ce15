//! `Login`: the workload's identity and role, as the envelope verified them.

use secrets_broker_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::envelope::{Ask, Handled};
use super::service::{BrokerService, to_pb};

pub(super) async fn login(
    svc: &BrokerService,
    req: Request<pb::LoginRequest>,
) -> Result<Response<pb::LoginResponse>, Status> {
    let ask = |r: &pb::LoginRequest| Ask::login(&r.role);
    svc.call("login", &req, ask, |a| async move {
        let role = a.role()?;
        debug!(identity = %a.id, role = %role.name, result = "accepted", "login");
        Ok(Handled {
            reply: Response::new(pb::LoginResponse {
                identity: Some(to_pb(&a.id)),
                role: role.name.clone(),
                allowed_secrets: role.secrets.iter().map(|p| p.as_str().to_owned()).collect(),
                lease_ttl_seconds: role.ttl.as_secs() as u32,
            }),
            detail: json!({ "role": role.name }),
        })
    })
    .await
}
