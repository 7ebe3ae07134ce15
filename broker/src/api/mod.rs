//! What the broker serves: the `Broker` gRPC service (and gRPC health).

pub mod grpc;
