//! A login token through the broker's whole verification.
//! The body is `secrets_broker_fuzz::token_verify`, which `cargo test` also runs on
//! every file in `fuzz/seeds/token_verify/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::token_verify(data);
});
