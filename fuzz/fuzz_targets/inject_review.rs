#![no_main]
use secrets_broker::inject::{Config, Injector};
use std::sync::LazyLock;
// A whole AdmissionReview body through the webhook's review, as the API server would send it.
static INJECTOR: LazyLock<Injector> = LazyLock::new(|| {
    let path = std::path::Path::new("fuzz-inject.toml");
    let cfg = Config::parse("[server]\nlisten = \"127.0.0.1:8443\"\ntls_cert_file = \"t.crt\"\ntls_key_file = \"t.key\"\n[sidecar]\nimage = \"r.example/s:1\"\nbroker_url = \"https://b:8443\"\nbroker_ca_file = \"ca.crt\"\n", path).unwrap();
    Injector::with_ca_pem(
        cfg,
        include_str!("../../broker/src/inject/testdata/broker-ca.crt").to_owned(),
    )
    .unwrap()
});
libfuzzer_sys::fuzz_target!(|body: &[u8]| {
    let _ = secrets_broker::inject::review(&INJECTOR, body);
});
