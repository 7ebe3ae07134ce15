#![no_main]
libfuzzer_sys::fuzz_target!(|s: &str| {
    let _ = secrets_broker::config::Config::parse(s, std::path::Path::new("fuzz.toml"));
});
