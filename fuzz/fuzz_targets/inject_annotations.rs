//! A pod's injector annotations.
//! The body is `secrets_broker_fuzz::inject_annotations`, which `cargo test` also runs on
//! every file in `fuzz/seeds/inject_annotations/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::inject_annotations(data);
});
