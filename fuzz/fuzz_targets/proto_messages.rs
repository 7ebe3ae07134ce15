//! Protobuf messages from the network.
//! The body is `secrets_broker_fuzz::proto_messages`, which `cargo test` also runs on
//! every file in `fuzz/seeds/proto_messages/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::proto_messages(data);
});
