//! The `Broker` gRPC service. Every call goes through one envelope
//! ([`envelope`]: shape, admit, token, verify, rate, revocation, authorize,
//! then the call's own handler, one audit record, metrics); each handler
//! ([`login`], [`fetch`], [`renew`], [`release`], [`watch`]) does only its
//! call's own work. Errors become `tonic::Status` in exactly one place
//! ([`ApiError`] → `Status`).

mod envelope;
mod error;
mod fetch;
mod login;
mod release;
mod renew;
mod service;
mod watch;

use secrets_broker_proto::v1 as pb;
use secrets_broker_proto::v1::broker_server::Broker;
use tonic::{Request, Response, Status};

pub use self::envelope::{AUDIT_SAMPLE, MAX_NAMES_PER_REQUEST};
pub use self::error::ApiError;
pub use self::service::{BrokerService, to_pb};
pub use crate::backend::rotation::{Rotation, Rotations, Versions, poll_rotations};

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        login::login(self, req).await
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        fetch::fetch(self, req).await
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        renew::renew(self, req).await
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        release::release(self, req).await
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        watch::watch(self, req).await
    }
}
