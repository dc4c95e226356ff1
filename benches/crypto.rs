//! Micro-benchmarks (divan) of the hot pure functions: the hybrid envelope, the server's
//! KeyPackage validation and the state-file encryption. `cargo bench --bench crypto`.
//!
//! These time one function in isolation; `qpq bench` measures whole operations against references
//! from the same run. Neither asserts anything about time.

use divan::counter::BytesCount;
use divan::{Bencher, black_box};
use qpq::crypto::hybrid::{self, HybridSecretKey};
use qpq::crypto::statefile::{self, KdfParams, StateKey};
use qpq::mls::{self, MlsClient};

/// Envelope payloads: a short text, a typical MLS message, a large Welcome.
const ENVELOPE_SIZES: [usize; 3] = [64, 1024, 64 * 1024];
/// State files: a fresh client, one with a few groups and history.
const STATE_SIZES: [usize; 2] = [4 * 1024, 256 * 1024];
/// Argon2id at its default cost takes tens of milliseconds: fewer samples keep the run short.
const PASSPHRASE_SAMPLES: u32 = 10;

fn main() {
    divan::main();
}

#[divan::bench(args = ENVELOPE_SIZES)]
fn envelope_seal(bencher: Bencher, len: usize) {
    let identity = [7u8; 32];
    let public = HybridSecretKey::generate().public_key();
    let plaintext = vec![0x42u8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| hybrid::seal(black_box(&identity), &public, black_box(&plaintext)));
}

#[divan::bench(args = ENVELOPE_SIZES)]
fn envelope_open(bencher: Bencher, len: usize) {
    let identity = [7u8; 32];
    let secret = HybridSecretKey::generate();
    let sealed = hybrid::seal(&identity, &secret.public_key(), &vec![0x42u8; len]);
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| hybrid::open(black_box(&identity), &secret, black_box(&sealed)));
}

#[divan::bench]
fn key_package_validation(bencher: Bencher) {
    let client = MlsClient::new(&[9u8; 32]).expect("mls client");
    let key_package = client.key_packages(1).expect("key package").remove(0).bytes;
    let now = client.now_secs();
    bencher.bench_local(|| mls::validate_key_package(black_box(&key_package), now));
}

#[divan::bench(args = STATE_SIZES)]
fn state_seal_unprotected(bencher: Bencher, len: usize) {
    let key = StateKey::unprotected();
    let plaintext = vec![0x5au8; len];
    bencher.counter(BytesCount::new(len)).bench_local(|| statefile::seal(&key, black_box(&plaintext)));
}

#[divan::bench(args = STATE_SIZES)]
fn state_open_unprotected(bencher: Bencher, len: usize) {
    let sealed = statefile::seal(&StateKey::unprotected(), &vec![0x5au8; len]);
    bencher.counter(BytesCount::new(len)).bench_local(|| statefile::open(black_box(&sealed), None));
}

/// Sealing with an already derived passphrase key: what the shell pays per save.
#[divan::bench(args = STATE_SIZES)]
fn state_seal_passphrase(bencher: Bencher, len: usize) {
    let key =
        StateKey::from_passphrase(b"correct horse battery staple", KdfParams::DEFAULT).expect("argon2id");
    let plaintext = vec![0x5au8; len];
    bencher.counter(BytesCount::new(len)).bench_local(|| statefile::seal(&key, black_box(&plaintext)));
}

/// Opening runs Argon2id with the file's parameters: what every one-shot command pays.
#[divan::bench(args = STATE_SIZES, sample_count = PASSPHRASE_SAMPLES, sample_size = 1)]
fn state_open_passphrase(bencher: Bencher, len: usize) {
    let passphrase = b"correct horse battery staple";
    let key = StateKey::from_passphrase(passphrase, KdfParams::DEFAULT).expect("argon2id");
    let sealed = statefile::seal(&key, &vec![0x5au8; len]);
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| statefile::open(black_box(&sealed), Some(black_box(&passphrase[..]))));
}
