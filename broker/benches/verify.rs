//! Micro-benchmarks of the broker's per-call work, next to the physical
//! floor (one signature check with `jsonwebtoken` on aws-lc-rs), for RS256
//! tokens (a Kubernetes API server's default) and ES256 ones:
//!
//!   cargo bench -p secrets-broker --bench verify
//!
//! Prints µs per operation (best of 5 rounds) and a JSON summary. The
//! exchange-bench binary measures whole exchanges over TLS.

use std::str::FromStr;
use std::time::{Duration, Instant};

use secrets_broker::dev::issuer::{Issuer, SigningAlgorithm, Workload};
use secrets_broker::identity::algorithm::Algorithm;
use secrets_broker::identity::config::{IdentityConfig, KeySource};
use secrets_broker::identity::verify::Verifier;

/// Best-of-5 time per call of `f`, in µs, over `n` calls a round.
fn per_op(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    }
    best
}

/// Per-operation figures for tokens signed with one algorithm.
struct Figures {
    /// The signature check alone.
    floor: f64,
    /// Our verification with the cache off (signature and claims).
    full: f64,
    /// A cache hit.
    hit: f64,
}

fn measure(rt: &tokio::runtime::Runtime, algorithm: SigningAlgorithm, name: &str) -> Figures {
    let issuer = Issuer::with_algorithm(algorithm).expect("issuer");
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks().to_string()).expect("jwks");
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            let mut w = Workload::new("bench", &format!("sa-{i}"), "secrets-broker");
            w.ttl_seconds = 3600;
            issuer.mint(&w).expect("mint")
        })
        .collect();
    let cfg = |cache: Duration| IdentityConfig {
        cluster: "default".into(),
        mode: secrets_broker::identity::tokenreview::Mode::Jwks,
        kubeconfig: None,
        tokenreview_cache: Duration::ZERO,
        verify_cache: cache,
        tokenreview_timeout: Duration::from_secs(5),
        allow_on_api_error: false,
        issuer: issuer.url(),
        audiences: vec!["secrets-broker".into()],
        keys: KeySource::StaticFile(jwks.clone()),
        algorithms: vec![Algorithm::from_name(name).expect("algorithm")],
        leeway: Duration::from_secs(30),
        jwks_refresh_min_interval: Duration::from_secs(60),
        jwks_max_age: Duration::from_secs(3600),
        max_token_bytes: 16 * 1024,
        max_token_lifetime: std::time::Duration::from_secs(24 * 3600),
        require_pod_binding: true,
        http_timeout: Duration::from_secs(5),
    };
    let uncached = Verifier::new(cfg(Duration::ZERO)).expect("verifier");
    let cached = Verifier::new(cfg(Duration::from_secs(300))).expect("verifier");
    rt.block_on(async {
        uncached.jwks().refresh(true).await.expect("keys");
        cached.jwks().refresh(true).await.expect("keys");
        for t in &tokens {
            cached.verify(t).await.expect("valid token");
        }
    });

    // The floor: the signature check alone.
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(issuer.jwks()["keys"][0].clone()).expect("jwk");
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("key");
    let mut v =
        jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::from_str(name).expect("alg"));
    v.validate_aud = false;
    v.validate_exp = false;
    v.required_spec_claims.clear();
    let n = tokens.len();
    let floor = per_op(2000, |i| {
        jsonwebtoken::decode::<serde_json::Value>(&tokens[i as usize % n], &key, &v)
            .expect("signature");
    });
    let full = per_op(2000, |i| {
        rt.block_on(uncached.verify(&tokens[i as usize % n]))
            .expect("valid token");
    });
    let hit = per_op(20000, |i| {
        rt.block_on(cached.verify(&tokens[i as usize % n]))
            .expect("valid token");
    });
    Figures { floor, full, hit }
}

fn main() {
    secrets_broker::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // RS256 is what a Kubernetes API server signs by default.
    let rs = measure(&rt, SigningAlgorithm::Rs256, "RS256");
    let es = measure(&rt, SigningAlgorithm::Es256, "ES256");
    let names = per_op(200_000, |i| {
        let _ = secrets_broker::backend::validate_secret_name(if i % 2 == 0 {
            "payments/db-password"
        } else {
            "payments/../x"
        });
    });
    println!("broker micro-benchmarks (µs per operation, best of 5 rounds)");
    for (alg, f) in [("RS256", &rs), ("ES256", &es)] {
        println!(
            "  {alg} signature check alone (jsonwebtoken, aws-lc-rs):    {:>8.2}",
            f.floor
        );
        println!(
            "  {alg} verification, cache off (signature + claims):       {:>8.2}  ({:.2}× the floor)",
            f.full,
            f.full / f.floor
        );
        println!(
            "  {alg} verification, cache hit:                            {:>8.2}  ({:.3}× the floor)",
            f.hit,
            f.hit / f.floor
        );
    }
    println!("  secret name validation:                                     {names:>8.3}");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "micro",
            "rs256_signature_us": rs.floor,
            "rs256_verify_uncached_us": rs.full,
            "rs256_verify_cache_hit_us": rs.hit,
            "es256_signature_us": es.floor,
            "verify_uncached_us": es.full,
            "verify_cache_hit_us": es.hit,
            "validate_secret_name_us": names,
        })
    );
}
