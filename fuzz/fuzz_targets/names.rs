//! Secret names, file names and role patterns.
//! The body is `secrets_broker_fuzz::names`, which `cargo test` also runs on
//! every file in `fuzz/seeds/names/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::names(data);
});
