//! What the broker serves: the `Broker` gRPC service (and gRPC health), and
//! the HTTPS admin API.

pub mod admin;
pub mod grpc;
