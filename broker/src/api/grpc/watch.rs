//! `Watch`: a stream of new versions and revocations of the secrets named,
//! polled by the connection that carries it, ending with the token.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use secrets_broker_proto::v1 as pb;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use super::envelope::{Ask, Handled};
use super::error::ApiError;
use super::service::BrokerService;
use crate::backend::rotation::Rotation;
use crate::clock::unix_now;
use crate::identity::Identity;
use crate::state::revocation::{Revoked, View};

/// Counts an open watch stream for as long as it lives.
struct StreamGuard(Arc<crate::telemetry::metrics::Metrics>);

impl StreamGuard {
    fn new(m: Arc<crate::telemetry::metrics::Metrics>) -> StreamGuard {
        m.watch_streams.inc();
        StreamGuard(m)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.watch_streams.dec();
    }
}

pub(super) type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

pub(super) async fn watch(
    svc: &BrokerService,
    req: Request<pb::WatchRequest>,
) -> Result<Response<WatchStream>, Status> {
    let ask = |r: &pb::WatchRequest| Ask::watch(&r.role, &r.names);
    svc.call("watch", &req, ask, |a| async move {
        let role = a.role()?;
        // A workload's streams are bounded too: one pod must not hold a
        // replica's share of streams.
        let workload_stream = svc.limits.admit_workload_stream(&a.id)?;
        let Some(stream_permit) = a.stream else {
            return Err(ApiError::BadRequest(
                "a watch holds a stream's place".into(),
            ));
        };
        info!(identity = %a.id, role = %role.name, secrets = a.names.len(), "watch opened");
        let detail = json!({ "role": role.name, "secrets": a.names });
        // The stream ends when the token that opened it expires: a client
        // must come back with a fresh token to keep watching.
        let token_left = Duration::from_secs((a.id.expires_at - unix_now()).max(0) as u64);
        let state = WatchState {
            watched: a.names.into_iter().collect(),
            rotations: svc.rotations.subscribe(),
            revocations: svc.view.subscribe(),
            view: svc.view.clone(),
            shutdown: svc.shutdown.clone(),
            tick: tokio::time::interval(svc.heartbeat),
            deadline: Box::pin(tokio::time::sleep(token_left)),
            pending: std::collections::VecDeque::new(),
            done: false,
            _guard: StreamGuard::new(svc.metrics.clone()),
            _permit: stream_permit,
            _workload: workload_stream,
            id: a.id,
        };
        // No task and no channel per stream: the stream is polled by the
        // connection that carries it (a few hundred bytes of state each).
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            let item = st.next_event().await?;
            Some((item, st))
        });
        let stream: WatchStream = Box::pin(stream);
        Ok(Handled {
            reply: Response::new(stream),
            detail,
        })
    })
    .await
}

/// One watch stream: what it watches and what it waits on.
struct WatchState {
    id: Identity,
    /// Counts against the workload's streams while the stream lives.
    _workload: crate::api::limits::WorkloadStream,
    watched: HashSet<String>,
    rotations: broadcast::Receiver<Rotation>,
    revocations: broadcast::Receiver<crate::state::revocation::Rule>,
    view: Arc<View>,
    shutdown: watch::Receiver<bool>,
    tick: tokio::time::Interval,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Events decided but not yet sent, in order.
    pending: std::collections::VecDeque<Result<pb::WatchEvent, Status>>,
    /// Set once the stream must end (after `pending` is sent).
    done: bool,
    _guard: StreamGuard,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

fn event(e: pb::watch_event::Event) -> Result<pb::WatchEvent, Status> {
    Ok(pb::WatchEvent { event: Some(e) })
}

impl WatchState {
    /// The next item of the stream; `None` ends it.
    async fn next_event(&mut self) -> Option<Result<pb::WatchEvent, Status>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            self.step().await;
        }
    }

    /// Waits for the next thing that happens and queues what the client
    /// must be told.
    async fn step(&mut self) {
        tokio::select! {
            _ = &mut self.deadline => {
                self.end(Status::unauthenticated("token expired; reconnect with a fresh token"));
            }
            _ = crate::shutdown::until_true(&mut self.shutdown) => {
                self.end(Status::unavailable("broker is shutting down; reconnect"));
            }
            _ = self.tick.tick() => {
                self.pending.push_back(event(pb::watch_event::Event::Heartbeat(pb::Heartbeat { unix_time: unix_now() })));
            }
            r = self.revocations.recv() => match r {
                Ok(rule) => {
                    let names: Vec<String> = self.watched.iter().cloned().collect();
                    let affected: Vec<String> = rule.affected(&self.id, &names).into_iter().map(str::to_owned).collect();
                    if affected.is_empty() || !rule.active(unix_now()) {
                        return;
                    }
                    self.pending.push_back(event(pb::watch_event::Event::Revoked(pb::Revoked {
                        rule_id: rule.id.clone(),
                        reason: rule.reason.clone(),
                        names: affected.clone(),
                    })));
                    for n in &affected {
                        self.watched.remove(n);
                    }
                    if self.watched.is_empty() || rule.blocks_identity(&self.id) {
                        let denied = Revoked { rule_id: rule.id, reason: rule.reason };
                        self.end(Status::permission_denied(denied.to_string()));
                    }
                }
                // Missed rules: check the whole view for this stream instead.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let names: Vec<String> = self.watched.iter().cloned().collect();
                    if let Err(denied) = self.view.check(&self.id, &names) {
                        self.pending.push_back(event(pb::watch_event::Event::Revoked(pb::Revoked {
                            rule_id: denied.rule_id.clone(),
                            reason: denied.reason.clone(),
                            names,
                        })));
                        self.end(Status::permission_denied(denied.to_string()));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            },
            r = self.rotations.recv() => match r {
                Ok(rot) if self.watched.contains(&rot.name) => {
                    self.pending.push_back(event(pb::watch_event::Event::Rotated(pb::Rotated { name: rot.name, version: rot.version })));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed events: tell the client to refetch everything it watches.
                    for name in &self.watched {
                        self.pending.push_back(event(pb::watch_event::Event::Rotated(pb::Rotated { name: name.clone(), version: 0 })));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            },
        }
    }

    /// Ends the stream with `status` after what is queued.
    fn end(&mut self, status: Status) {
        self.pending.push_back(Err(status));
        self.done = true;
    }
}
