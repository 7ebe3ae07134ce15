//! `src/gen/` is what protox and tonic-prost-build make of the `.proto`
//! files today: a change to a `.proto` without regenerating fails here.
//! `SECRETS_BROKER_REGENERATE=1 cargo test -p secrets-broker-proto` rewrites
//! the generated code.

use std::path::Path;

const PROTOS: [&str; 2] = [
    "secretbroker/v1/broker.proto",
    "secretbroker/v1/secrets.proto",
];
const GENERATED: &str = "secretbroker.v1.rs";

#[test]
fn the_checked_in_code_is_what_the_proto_files_generate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let fds = protox::compile(PROTOS, [root]).unwrap();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(out.path())
        .compile_fds(fds)
        .unwrap();
    let fresh = std::fs::read_to_string(out.path().join(GENERATED)).unwrap();
    let checked_in = root.join("src/gen").join(GENERATED);
    if std::env::var_os("SECRETS_BROKER_REGENERATE").is_some() {
        std::fs::write(&checked_in, &fresh).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        current == fresh,
        "{} is not what {PROTOS:?} generate: run SECRETS_BROKER_REGENERATE=1 cargo test -p secrets-broker-proto",
        checked_in.display()
    );
}
