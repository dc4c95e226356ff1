//! The fuzz targets of `qpq::fuzzing` on the stable toolchain: every checked-in corpus input
//! (seeds and past crashes) in the normal test run, and a bounded run of seeded random mutations
//! per target in the ignored `smoke_*` tests that `.ci/run` starts. `cargo fuzz` (see
//! fuzz/README.md) is the coverage-guided tool; this keeps its findings fixed on every machine.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use qpq::fuzzing::{self, Target, mutate::Mutator};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn target(name: &str) -> Target {
    fuzzing::TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).expect("known target")
}

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_root().join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).expect("corpus file"))).collect()
}

/// Saves an input that panicked where CI keeps it, and says how to replay it.
fn save_failure(name: &str, seed: u64, i: usize, data: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke-failures");
    std::fs::create_dir_all(&dir).expect("failure dir");
    let path = dir.join(format!("{name}-seed{seed}-{i}"));
    std::fs::write(&path, data).expect("write failing input");
    path
}

#[test]
fn every_target_survives_its_checked_in_corpus() {
    for (name, run) in fuzzing::TARGETS {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "fuzz/corpus/{name} is empty");
        for (path, data) in inputs {
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                panic!("fuzz target {name} panicked on {}", path.display());
            }
        }
    }
}

#[test]
fn every_target_has_a_cargo_fuzz_wrapper() {
    for (name, _) in fuzzing::TARGETS {
        let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&wrapper).unwrap_or_else(|e| panic!("{}: {e}", wrapper.display()));
        assert!(
            text.contains(&format!("fuzzing::{name}(")),
            "{} does not call fuzzing::{name}",
            wrapper.display()
        );
    }
}

/// Mutations per smoke test: `QPQ_FUZZ_SMOKE_ITERS`, else `default`.
fn iterations(default: usize) -> usize {
    std::env::var("QPQ_FUZZ_SMOKE_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The RNG seed: `QPQ_FUZZ_SEED` to replay a run, else a fresh one (printed either way).
/// The mutation seed: `QPQ_FUZZ_SEED` (a number, or `random`), else a fixed one, so that CI's
/// bounded smoke run is reproducible; open-ended exploration is `cargo fuzz`'s job.
fn rng_seed() -> u64 {
    match std::env::var("QPQ_FUZZ_SEED").ok().as_deref() {
        Some("random") => rand::random(),
        Some(v) => v.parse().unwrap_or(1),
        None => 1,
    }
}

fn smoke(name: &str, default_iterations: usize) {
    let run = target(name);
    let seeds: Vec<Vec<u8>> = corpus(name).into_iter().map(|(_, d)| d).collect();
    let seed = rng_seed();
    let n = iterations(default_iterations);
    eprintln!("fuzz smoke {name}: {n} mutations, QPQ_FUZZ_SEED={seed}");
    let mut mutator = Mutator::new(seed);
    for i in 0..n {
        let data = mutator.next_input(&seeds);
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            let saved = save_failure(name, seed, i, &data);
            panic!(
                "fuzz target {name} panicked on mutation {i} (QPQ_FUZZ_SEED={seed}); input saved to {}",
                saved.display()
            );
        }
    }
}

// Iteration counts keep each smoke test around 10-20 s in a debug build on a slow machine: the
// MLS targets verify signatures and decrypt per input, the others are cheap.
#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_rpc_entry() {
    smoke("rpc_entry", 3000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_hybrid_open() {
    smoke("hybrid_open", 3000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_frame_decode() {
    smoke("frame_decode", 20000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_state_file() {
    smoke("state_file", 20000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_mls_storage() {
    smoke("mls_storage", 3000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_key_package() {
    smoke("key_package", 3000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_welcome() {
    smoke("welcome", 1000);
}

#[test]
#[ignore = "smoke run, started by .ci/run"]
fn smoke_shell_line() {
    smoke("shell_line", 5000);
}

/// Rewrites the seed corpus from the real code paths (and the `welcome` target's joiner
/// storage, which must match its Welcomes). Run after a wire or format change:
/// `cargo test --test fuzz_smoke regenerate_seed_corpus -- --ignored`.
#[test]
#[ignore = "writes into the source tree"]
fn regenerate_seed_corpus() {
    let joiner = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fuzzing/welcome_joiner.mls");
    fuzzing::seeds::write_corpus(&corpus_root(), &joiner).expect("corpus written");
}
