//! Replays every committed fuzz seed (`fuzz/seeds/<target>/*`) through the
//! very function its cargo-fuzz target runs (`secrets_broker_fuzz`, the fuzz
//! crate's library, built here without libFuzzer). So the seeds, and every
//! crash input added to them, are regression tests in plain `cargo test`,
//! no nightly toolchain needed.
//!
//! A seed named `valid-*` must be accepted by its target and one named
//! `invalid-*` refused; the config seeds are all real configs and must all
//! parse. Any other seed only has to not panic.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use secrets_broker_fuzz::TARGETS;

/// Targets whose every seed is a valid input (the example configs).
const ALL_SEEDS_VALID: &[&str] = &["broker_config", "sidecar_config"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The seed files of a target, sorted, so failures read the same each run.
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("read a seed directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The `[[bin]]` names of fuzz/Cargo.toml: every cargo-fuzz target.
fn cargo_fuzz_targets() -> BTreeSet<String> {
    let path = fuzz_dir().join("Cargo.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.split("[[bin]]")
        .skip(1)
        .filter_map(|bin| {
            let line = bin.lines().find(|l| l.trim_start().starts_with("name"))?;
            Some(line.split('"').nth(1)?.to_owned())
        })
        .collect()
}

/// A target added to fuzz/Cargo.toml without a body in the library or
/// without seeds would escape the replay below; this says which.
#[test]
fn every_fuzz_target_has_seeds_and_is_replayed() {
    let in_cargo = cargo_fuzz_targets();
    let replayed: BTreeSet<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    assert_eq!(
        in_cargo, replayed,
        "fuzz/Cargo.toml's [[bin]] targets and secrets_broker_fuzz::TARGETS differ: give each target its function in fuzz/src/lib.rs"
    );
    for name in &in_cargo {
        assert!(
            !seeds(name).is_empty(),
            "fuzz/seeds/{name}/ has no seed: commit a few meaningful inputs"
        );
    }
}

#[test]
fn every_fuzz_seed_replays_without_a_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, run) in TARGETS {
        for seed in seeds(target) {
            let data = std::fs::read(&seed).expect("read a seed");
            let name = seed.file_name().unwrap().to_string_lossy().into_owned();
            let shown = format!("fuzz/seeds/{target}/{name}");
            replayed += 1;
            let accepted = match catch_unwind(AssertUnwindSafe(|| run(&data))) {
                Ok(accepted) => accepted,
                Err(_) => {
                    failures.push(format!("{shown}: panicked (see the message above)"));
                    continue;
                }
            };
            let must_accept = ALL_SEEDS_VALID.contains(target) || name.starts_with("valid-");
            if must_accept && !accepted {
                failures.push(format!("{shown}: refused, but it is a valid input"));
            }
            if name.starts_with("invalid-") && accepted {
                failures.push(format!("{shown}: accepted, but it is an invalid input"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} fuzz seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        replayed >= TARGETS.len(),
        "too few seeds replayed: {replayed}"
    );
}
