//! A whole AdmissionReview body, as the API server would send it.
//! The body is `secrets_broker_fuzz::inject_review`, which `cargo test` also runs on
//! every file in `fuzz/seeds/inject_review/` (tests/tests/fuzz_seeds.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    secrets_broker_fuzz::inject_review(data);
});
