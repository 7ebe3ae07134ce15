//! The body of every fuzz target, one function per target, so the same code
//! runs under libFuzzer (`fuzz_targets/<target>.rs` is a one-line call) and
//! in `cargo test`, where `tests/tests/fuzz_seeds.rs` replays every file
//! under `fuzz/seeds/<target>/` through it. A crash input dropped into that
//! directory is a regression test from then on.
//!
//! Each function takes the raw bytes libFuzzer hands over and returns
//! whether the input was accepted (parsed, verified, rendered), so the replay
//! can also check that the seeds meant to be valid still are. Typed inputs
//! are decoded here with `arbitrary`, exactly as `fuzz_target!` would.
//!
//! Layout: [`TARGETS`] lists every target by its `[[bin]]` name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message;

/// A target's body: the raw input in, whether it was accepted out.
pub type Body = fn(&[u8]) -> bool;

/// Every target: its name in `Cargo.toml` and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("token_header", token_header),
    ("token_verify", token_verify),
    ("broker_config", broker_config),
    ("sidecar_config", sidecar_config),
    ("names", names),
    ("inject_annotations", inject_annotations),
    ("inject_review", inject_review),
    ("templates", templates),
    ("proto_messages", proto_messages),
];

/// Decodes a typed input the way `libfuzzer_sys::fuzz_target!` does.
fn typed<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(data)).ok()
}

/// The JOSE header of a token, read before anything is trusted.
pub fn token_header(data: &[u8]) -> bool {
    std::str::from_utf8(data)
        .is_ok_and(|s| secrets_broker::identity::token::parse_header(s).is_ok())
}

/// The issuers [`token_verify`] trusts: both take the one key of [`SIGNER`],
/// so a token is routed by its unverified `iss` first, as a login is.
const ISSUERS: [&str; 2] = ["https://issuer-a.test", "https://issuer-b.test"];
/// The `kid` of [`SIGNER`]'s key in the issuers' key set.
const KID: &str = "fuzz-1";

/// The key [`token_verify`] signs fuzzed tokens with, made once per process:
/// a fuzzed header and claims then reach every check after the signature.
static SIGNER: LazyLock<aws_lc_rs::signature::Ed25519KeyPair> = LazyLock::new(|| {
    aws_lc_rs::signature::Ed25519KeyPair::generate().expect("generate an Ed25519 key")
});

/// The broker's verifiers, built from config as the broker builds them (key
/// set in a file, no network), with their keys loaded, and the runtime that
/// drives them.
struct Verifying {
    runtime: tokio::runtime::Runtime,
    verifiers: secrets_broker::identity::verify::Verifiers,
}

static VERIFYING: LazyLock<Verifying> = LazyLock::new(|| {
    use aws_lc_rs::signature::KeyPair as _;
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let jwks = dir.path().join("jwks.json");
    let x = URL_SAFE_NO_PAD.encode(SIGNER.public_key().as_ref());
    std::fs::write(
        &jwks,
        format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","use":"sig","kid":"{KID}","x":"{x}"}}]}}"#
        ),
    )
    .expect("write the key set");
    // `verify_cache = "0s"`: every input is verified in full, never answered
    // from a cache filled by an earlier input. `max_token_lifetime = "0s"`:
    // the valid seeds expire far ahead (in 2100), so they stay valid; some
    // name no pod (`require_pod_binding = false`).
    let issuer = |cluster: &str, iss: &str| {
        format!(
            "[[issuers]]\ncluster = \"{cluster}\"\nissuer = \"{iss}\"\naudiences = [\"secrets-broker\"]\njwks_file = \"{}\"\nalgorithms = [\"EdDSA\", \"ES256\", \"RS256\"]\nverify_cache = \"0s\"\nmax_token_lifetime = \"0s\"\nrequire_pod_binding = false\n",
            jwks.display()
        )
    };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:8443\"\ntls_cert_file = \"t.crt\"\ntls_key_file = \"t.key\"\n\n{}\n{}\n[database]\nurl = \"sqlite://store.db\"\n\n[store]\nkey_file = \"store.key\"\n\n[[roles]]\nname = \"api\"\nnamespaces = [\"payments\"]\nservice_accounts = [\"api\"]\nsecrets = [\"payments/*\"]\nttl = \"5m\"\n",
        issuer("a", ISSUERS[0]),
        issuer("b", ISSUERS[1]),
    );
    let cfg = secrets_broker::config::Config::parse(&text, Path::new("/fuzz/broker.toml"))
        .expect("the fuzz broker config is valid");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let verifiers = runtime.block_on(async {
        let verifiers =
            secrets_broker::identity::verify::Verifiers::new(&cfg.issuers, &Default::default())
                .await
                .expect("build the verifiers");
        for v in verifiers.all() {
            v.jwks().refresh(true).await.expect("load the key set");
        }
        verifiers
    });
    // The keys are loaded; a refresh for an unknown `kid` now fails to read
    // the file and keeps them, as when an issuer is unreachable.
    drop(dir);
    Verifying { runtime, verifiers }
});

/// A login's token through the broker's verification
/// (`Verifiers::verify`), twice: as given (the signature check refuses
/// nearly everything), and with its header and claims signed by the
/// issuers' key, so the claims decoding and the issuer, audience, time and
/// subject checks see the fuzzed values. An input starting with `{` is taken
/// as the claims alone, under a valid header. Returns whether the signed
/// token was accepted.
pub fn token_verify(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let v = &*VERIFYING;
    let verify = |token: &str| v.runtime.block_on(v.verifiers.verify(token)).is_ok();
    let signing_input = if text.starts_with('{') {
        let header = format!(r#"{{"alg":"EdDSA","kid":"{KID}","typ":"JWT"}}"#);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(text)
        )
    } else {
        verify(text);
        let mut parts = text.splitn(3, '.');
        match (parts.next(), parts.next()) {
            (Some(header), Some(claims)) => format!("{header}.{claims}"),
            _ => return false,
        }
    };
    let signature = SIGNER.sign(signing_input.as_bytes());
    verify(&format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

pub fn broker_config(data: &[u8]) -> bool {
    std::str::from_utf8(data)
        .is_ok_and(|s| secrets_broker::config::Config::parse(s, Path::new("fuzz.toml")).is_ok())
}

pub fn sidecar_config(data: &[u8]) -> bool {
    std::str::from_utf8(data)
        .is_ok_and(|s| secrets_sidecar::config::Config::parse(s, Path::new("fuzz.toml")).is_ok())
}

/// Secret names, file names and role patterns; accepted when the name is a
/// valid secret name.
pub fn names(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    let _ = secrets_sidecar::writer::validate_file_name(s);
    if let Ok(p) = secrets_broker::policy::Pattern::new(s) {
        let _ = p.matches(s);
    }
    secrets_broker::backend::validate_secret_name(s).is_ok()
}

/// A pod's `secrets-broker.io/` annotations, as (key suffix, value) pairs.
pub fn inject_annotations(data: &[u8]) -> bool {
    let Some(pairs) = typed::<Vec<(String, String)>>(data) else {
        return false;
    };
    let annotations: BTreeMap<String, String> = pairs
        .into_iter()
        .map(|(k, v)| {
            (
                format!("{}{k}", secrets_broker::inject::annotations::PREFIX),
                v,
            )
        })
        .collect();
    secrets_broker::inject::annotations::parse(&annotations).is_ok()
}

/// The injector the webhook builds from its config.
static INJECTOR: LazyLock<secrets_broker::inject::Injector> = LazyLock::new(|| {
    use secrets_broker::inject::{Config, Injector};
    let path = Path::new("fuzz-inject.toml");
    let cfg = Config::parse(
        "[server]\nlisten = \"127.0.0.1:8443\"\ntls_cert_file = \"t.crt\"\ntls_key_file = \"t.key\"\n[sidecar]\nimage = \"r.example/s:1\"\nbroker_url = \"https://b:8443\"\nbroker_ca_file = \"ca.crt\"\n",
        path,
    )
    .expect("the fuzz injector config is valid");
    Injector::with_ca_pem(
        cfg,
        include_str!("../../broker/src/inject/testdata/broker-ca.crt").to_owned(),
    )
    .expect("build the injector")
});

/// A whole AdmissionReview body, as the API server would send it; accepted
/// when it is a usable review (whatever the answer).
pub fn inject_review(data: &[u8]) -> bool {
    secrets_broker::inject::review(&INJECTOR, data)
        .response
        .is_ok()
}

/// A template from an operator (or, through the injector, a pod annotation)
/// and a secret value: compiling and rendering must never panic or hang.
/// Accepted when it compiles and renders.
pub fn templates(data: &[u8]) -> bool {
    use secrets_sidecar::config::TemplateSpec;
    use secrets_sidecar::render::Templates;
    let Some((source, value)) = typed::<(String, Vec<u8>)>(data) else {
        return false;
    };
    let spec = TemplateSpec {
        file: "t".into(),
        source,
        mode: None,
        uid: None,
        gid: None,
    };
    let Ok(t) = Templates::new(&[spec]) else {
        return false;
    };
    let secrets: HashMap<&str, &[u8]> =
        HashMap::from([("a/b", &value[..]), ("db", &b"{\"u\":1}"[..])]);
    t.render(&secrets)
        .iter()
        .all(|(_, rendered)| rendered.is_ok())
}

/// Protobuf messages from the network (the broker decodes requests, the
/// sidecar decodes responses and watch events). Accepted when any decodes.
pub fn proto_messages(data: &[u8]) -> bool {
    use secrets_broker_proto::v1 as pb;
    [
        pb::LoginRequest::decode(data).is_ok(),
        pb::FetchRequest::decode(data).is_ok(),
        pb::RenewRequest::decode(data).is_ok(),
        pb::ReleaseRequest::decode(data).is_ok(),
        pb::WatchRequest::decode(data).is_ok(),
        pb::FetchResponse::decode(data).is_ok(),
        pb::WatchEvent::decode(data).is_ok(),
    ]
    .contains(&true)
}
