//! Templates compiled and rendered over arbitrary secret values.
//! The body is `secrets_broker_fuzz::templates`, which `cargo test` also runs on
//! every file in `fuzz/seeds/templates/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::templates(data);
});
