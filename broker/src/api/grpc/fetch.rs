//! `Fetch`: each granted secret no rule withholds, with a lease of its own,
//! within `server.max_response_bytes`.

use secrets_broker_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::envelope::{Admitted, Ask, Handled};
use super::error::ApiError;
use super::service::{BrokerService, bound_lease, lease_record, new_lease};
use crate::backend::source::{Failure, Issued, ReadFor};
use crate::policy;

/// A `Fetch`'s audit detail (the envelope adds the workload's issuer and
/// pod). The keys are in the order a `json!` object has them (sorted), so
/// the records read as the other calls' do.
#[derive(serde::Serialize)]
struct FetchAudit<'a> {
    role: &'a str,
    secrets: Vec<LeaseAudit>,
    /// Asked for but withheld by a rule with a secret (not handed out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    withheld: Vec<WithheldAudit>,
    ttl_seconds: u64,
}

/// One secret withheld by a rule, in a [`FetchAudit`].
#[derive(serde::Serialize)]
struct WithheldAudit {
    name: String,
    rule_id: String,
}

/// One secret handed out, in a [`FetchAudit`].
#[derive(serde::Serialize)]
struct LeaseAudit {
    lease_id: String,
    name: String,
    version: u64,
}

pub(super) async fn fetch(
    svc: &BrokerService,
    req: Request<pb::FetchRequest>,
) -> Result<Response<pb::FetchResponse>, Status> {
    let ask = |r: &pb::FetchRequest| Ask::fetch(&r.role, &r.names);
    svc.call("fetch", &req, ask, |a| {
        svc.fetch_granted(a, req.get_ref().ttl_seconds)
    })
    .await
}

impl BrokerService {
    /// A Fetch's own work, after the envelope's checks: read each granted
    /// secret that no rule withholds, record a lease for each, answer them
    /// within `server.max_response_bytes`.
    async fn fetch_granted(
        &self,
        a: Admitted<'_>,
        ttl_seconds: u32,
    ) -> Result<Handled<Response<pb::FetchResponse>, impl serde::Serialize>, ApiError> {
        let role = a.role()?;
        let id = &a.id;
        // A rule with a secret withholds just that secret: the others are
        // served, and the answer names what it withholds.
        let withheld = self.view.withheld(id, &a.names);
        let names: Vec<&String> = a
            .names
            .iter()
            .filter(|n| !withheld.iter().any(|(w, _)| w == n))
            .collect();
        let ttl = policy::lease_ttl(role, ttl_seconds);
        let mut secrets = Vec::with_capacity(names.len());
        let mut records = Vec::with_capacity(names.len());
        let mut answer_bytes = 0usize;
        let mut upstreams = Vec::new();
        for name in names {
            let source = self.sources.for_name(name);
            let what = ReadFor {
                name,
                id,
                ttl,
                token: a.token,
            };
            let Issued {
                secret: v,
                upstream: up,
            } = match source.read(&what).await {
                Ok(x) => x,
                Err(e) => {
                    // Credentials issued for the earlier names are not handed out.
                    self.abandon(&upstreams).await;
                    if e.failure != Failure::NotFound {
                        warn!(identity = %id, secret = %name, source = e.source_kind, error = %e, "backend read failed");
                    }
                    return Err(e.into());
                }
            };
            answer_bytes += v.value().len();
            if answer_bytes > self.max_response_bytes {
                self.abandon(&upstreams).await;
                warn!(identity = %id, secrets = a.names.len(), limit = self.max_response_bytes, "fetch answer too large");
                return Err(ApiError::ResponseTooLarge {
                    limit: self.max_response_bytes,
                });
            }
            let mut lease = new_lease(ttl)?;
            if let Some(up) = up {
                // The credential's real expiry bounds the lease.
                bound_lease(&mut lease, up.expires_at);
                upstreams.push((lease.lease_id.clone(), up, source));
            }
            records.push(lease_record(id, role, name, v.version, &lease));
            secrets.push(pb::Secret {
                name: v.name.clone(),
                version: v.version,
                value: v.value().to_vec(),
                lease: Some(lease),
            });
        }
        let detail = FetchAudit {
            role: &role.name,
            secrets: records
                .iter()
                .map(|l| LeaseAudit {
                    lease_id: l.lease_id.clone(),
                    name: l.secret.clone(),
                    version: l.version,
                })
                .collect(),
            withheld: withheld
                .iter()
                .map(|(name, rule)| WithheldAudit {
                    name: (*name).to_owned(),
                    rule_id: rule.rule_id.clone(),
                })
                .collect(),
            ttl_seconds: ttl.as_secs(),
        };
        let leases = records.len() as u64;
        // A lease that cannot be recorded cannot be revoked: fail instead.
        if let Err(e) = self.leases.record(records).await {
            self.abandon(&upstreams).await;
            return Err(e.into());
        }
        for (lease_id, up, _) in &upstreams {
            if let Err(e) = self.upstream.record(lease_id, up).await {
                self.abandon(&upstreams).await;
                return Err(e.into());
            }
        }
        self.metrics.leases_issued.inc_by(leases);
        self.metrics.secrets_served.inc_by(secrets.len() as u64);
        debug!(identity = %id, role = %role.name, secrets = secrets.len(), ttl_s = ttl.as_secs(), "fetch");
        let withheld = withheld
            .iter()
            .map(|(name, rule)| pb::Withheld {
                name: (*name).to_owned(),
                rule_id: rule.rule_id.clone(),
                reason: rule.reason.clone(),
            })
            .collect();
        Ok(Handled {
            reply: Response::new(pb::FetchResponse { secrets, withheld }),
            detail,
        })
    }
}
