#![no_main]
libfuzzer_sys::fuzz_target!(|s: &str| {
    let _ = secrets_broker::identity::verify::parse_header(s);
});
