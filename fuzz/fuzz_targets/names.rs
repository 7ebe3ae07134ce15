#![no_main]
libfuzzer_sys::fuzz_target!(|s: &str| {
    let _ = secrets_broker::backend::validate_secret_name(s);
    let _ = secrets_sidecar::writer::validate_file_name(s);
    if let Ok(p) = secrets_broker::policy::Pattern::new(s) {
        let _ = p.matches(s);
    }
});
