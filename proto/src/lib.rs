//! The wire contract of secrets-broker: `secretbroker.v1`.
//!
//! Layout:
//! - `secretbroker/v1/broker.proto`: the `Broker` service between sidecar and
//!   broker (login, fetch, renew, watch). The pod's token travels as
//!   `authorization: Bearer <jwt>` metadata on every call, never in a message.
//! - `secretbroker/v1/secrets.proto`: the `Secrets` service a sidecar serves to
//!   its application on a Unix socket.

#![allow(unreachable_pub, clippy::all)]

/// `secretbroker.v1`: generated messages, clients and servers. The code is
/// checked in (`src/gen/`); `tests/generated.rs` fails when it is not what
/// the `.proto` files make today, and
/// `SECRETS_BROKER_REGENERATE=1 cargo test -p secrets-broker-proto` rewrites it.
pub mod v1 {
    include!("gen/secretbroker.v1.rs");
}
