//! What the broker serves: the `Broker` gRPC service (and gRPC health), the
//! HTTPS admin API, and the plain-HTTP operations port (metrics, health).

pub mod admin;
pub mod connections;
pub mod decode_errors;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod refusals;
pub mod tls_reload;
