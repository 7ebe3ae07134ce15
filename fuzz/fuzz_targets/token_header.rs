//! The JOSE header of a login token.
//! The body is `secrets_broker_fuzz::token_header`, which `cargo test` also runs on
//! every file in `fuzz/seeds/token_header/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::token_header(data);
});
