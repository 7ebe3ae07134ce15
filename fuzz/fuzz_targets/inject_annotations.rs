#![no_main]
libfuzzer_sys::fuzz_target!(|pairs: Vec<(String, String)>| {
    let _ = secrets_broker::inject::annotations::parse(
        &pairs
            .into_iter()
            .map(|(k, v)| {
                (
                    format!("{}{k}", secrets_broker::inject::annotations::PREFIX),
                    v,
                )
            })
            .collect(),
    );
});
