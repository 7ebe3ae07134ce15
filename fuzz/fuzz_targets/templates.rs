//! Templates from operators (and, through the injector, from pod
//! annotations): compiling and rendering arbitrary text must never panic or
//! hang, whatever the secrets hold.
#![no_main]

use std::collections::HashMap;

use secrets_sidecar::config::TemplateSpec;
use secrets_sidecar::render::Templates;

libfuzzer_sys::fuzz_target!(|input: (String, Vec<u8>)| {
    let (source, value) = input;
    let spec = TemplateSpec {
        file: "t".into(),
        source,
        mode: None,
        uid: None,
        gid: None,
    };
    if let Ok(t) = Templates::new(&[spec]) {
        let secrets: HashMap<&str, &[u8]> =
            HashMap::from([("a/b", &value[..]), ("db", &b"{\"u\":1}"[..])]);
        let _ = t.render(&secrets);
    }
});
