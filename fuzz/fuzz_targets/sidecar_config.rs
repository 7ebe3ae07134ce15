//! The sidecar's config file.
//! The body is `secrets_broker_fuzz::sidecar_config`, which `cargo test` also runs on
//! every file in `fuzz/seeds/sidecar_config/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::sidecar_config(data);
});
