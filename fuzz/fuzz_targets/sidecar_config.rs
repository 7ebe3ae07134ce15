#![no_main]
libfuzzer_sys::fuzz_target!(|s: &str| {
    let _ = secrets_sidecar::config::Config::parse(s, std::path::Path::new("fuzz.toml"));
});
