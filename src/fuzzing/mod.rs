//! Fuzz targets: one function per decoder a stranger can feed bytes to, shared by the
//! coverage-guided `cargo fuzz` harness (`fuzz/fuzz_targets/*.rs`, thin wrappers, nightly) and the
//! stable smoke run (`tests/fuzz_smoke.rs`, the checked-in corpus plus seeded random mutations).
//!
//! Every target must return normally on any input: a decoder that panics, hangs or allocates
//! without bound on bytes from the network or from disk is the bug these targets look for.
//! Errors are the expected outcome for almost every input and are ignored.
//!
//! - [`rpc_entry`]: raw bytes on a connection's RPC stream, served by the real RPC system
//!   ([`crate::server::serve_rpc`]) over a real store in a temp dir.
//! - [`hybrid_open`]: an envelope handed to [`crate::crypto::hybrid::open`].
//! - [`frame_decode`]: an envelope's plaintext ([`crate::client::frame`]).
//! - [`state_file`]: a state file ([`crate::crypto::statefile`]) and a decrypted state.
//! - [`mls_storage`]: the MLS storage export kept in the client state.
//! - [`key_package`]: an uploaded KeyPackage ([`crate::mls::validate_key_package`]).
//! - [`welcome`]: a Welcome on the client's join path, for a client holding KeyPackages.
//! - [`shell_line`]: a line typed (or pasted) into the shell ([`crate::shell::grammar`]).
//!
//! Inputs that need secrets to go deep use fixed, public test keys ([`ENVELOPE_IDENTITY_SEED`],
//! [`AUTH_CHALLENGE`], ...), so the seed corpus ([`seeds`]) holds real envelopes, a real
//! authenticated RPC session and real Welcomes that reach past the signature and AEAD checks.

#![doc(hidden)]

pub mod mutate;
pub mod seeds;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use crate::client::frame::{AppMessage, Frame};
use crate::crypto::hybrid::{self, HybridSecretKey};
use crate::crypto::statefile;
use crate::mls::{self, MlsClient};
use crate::server::admission::Admission;
use crate::server::{RpcLimits, Shared};
use crate::store::{QueueLimits, Store};

/// A target: takes any bytes, returns normally.
pub type Target = fn(&[u8]);

/// Every target by the name of its `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("rpc_entry", rpc_entry),
    ("hybrid_open", hybrid_open),
    ("frame_decode", frame_decode),
    ("state_file", state_file),
    ("mls_storage", mls_storage),
    ("key_package", key_package),
    ("welcome", welcome),
    ("shell_line", shell_line),
];

/// Identity seed of the recipient the `hybrid_open` target opens envelopes as (public test key).
pub const ENVELOPE_IDENTITY_SEED: [u8; 32] = [0x11; 32];
/// Hybrid key seed of that recipient (public test key).
pub const ENVELOPE_HYBRID_SEED: [u8; 32] = [0x22; 32];
/// The auth challenge of the fuzzed RPC connection, fixed so a seed can carry a valid
/// `authenticate` call and the fuzzer can explore the Account methods behind it.
pub const AUTH_CHALLENGE: [u8; 32] = [0x33; 32];
/// Identity seed of the client the `welcome` target joins as; its MLS storage, with the
/// KeyPackages the seed Welcomes are encrypted to, is [`WELCOME_JOINER_STORAGE`].
pub const WELCOME_JOINER_SEED: [u8; 32] = [0x44; 32];
/// Identity seed the `mls_storage` target restores storage for (the seeds were exported by it).
pub const STORAGE_OWNER_SEED: [u8; 32] = [0x55; 32];

/// The joiner's MLS storage, written by [`seeds::write_corpus`] together with the Welcomes of
/// `fuzz/corpus/welcome/`. If it ever falls out of step, the target still runs, only shallower.
pub const WELCOME_JOINER_STORAGE: &[u8] = include_bytes!("welcome_joiner.mls");

/// Before each message after the first, and before end-of-stream, rounds of letting the calls
/// made so far run (a few scheduler turns, then waiting for calls in flight): a real client
/// sends `Finish` for a question, and may reuse its id, only after the answer came back, and a
/// replayed session must keep that order to get past its first call.
const RPC_DRAIN_ROUNDS: usize = 2;
/// Scheduler turns per round: enough for queued calls to be dispatched and take their guards.
const RPC_DRAIN_TURNS: usize = 32;
/// Longest one round waits for calls in flight: a long poll (fetchWait) may park for up to a
/// minute; the fuzzer should not.
const RPC_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// Most segments a message header may announce before the stream is no longer split into
/// messages (the rest is delivered at once; the RPC system rejects it).
const RPC_MAX_SEGMENTS: usize = 512;

/// One shared server state for every run in a process: opening redb per input would make the
/// target a benchmark of `fsync`. The store lives in a temp dir that is never deleted while the
/// process runs (the fuzzer's process is short-lived and the dir is in the temp dir).
fn rpc_shared() -> Option<Arc<Shared>> {
    static SHARED: OnceLock<Option<Arc<Shared>>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            // /dev/shm, when present, keeps the store's fsyncs cheap.
            let base = std::path::Path::new("/dev/shm");
            let dir = if base.is_dir() { tempfile::tempdir_in(base) } else { tempfile::tempdir() }.ok()?;
            let store = Store::open(
                &dir.keep().join(crate::server::DB_FILE),
                QueueLimits {
                    max_messages: crate::limits::DEFAULT_MAX_QUEUE_MESSAGES,
                    max_bytes: crate::limits::DEFAULT_MAX_QUEUE_BYTES,
                    ttl_ms: crate::limits::DEFAULT_MESSAGE_TTL_SECS * 1000,
                    max_stored_bytes: crate::limits::DEFAULT_MAX_STORED_BYTES,
                    max_key_bytes: crate::limits::DEFAULT_MAX_KEY_BYTES,
                },
            )
            .ok()?;
            Some(Shared::new(
                store,
                RpcLimits {
                    max_payload: crate::limits::DEFAULT_MAX_PAYLOAD,
                    key_package_margin_secs: crate::limits::key_package_margin_secs(
                        crate::limits::DEFAULT_MESSAGE_TTL_SECS,
                    ),
                },
                Admission::new(1, 1),
                fuzz_clock(),
                crate::server::ratelimit::RateLimits::unlimited(),
            ))
        })
        .clone()
}

/// The client side of a fuzzed connection: the input one Cap'n Proto message at a time, with a
/// [`drain`] before each next message and before end-of-stream.
struct InputStream {
    data: Vec<u8>,
    pos: usize,
    /// End of the message being delivered.
    chunk_end: usize,
    shared: Arc<Shared>,
    drain: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

async fn drain(shared: Arc<Shared>) {
    for _ in 0..RPC_DRAIN_ROUNDS {
        for _ in 0..RPC_DRAIN_TURNS {
            tokio::task::yield_now().await;
        }
        let _ = tokio::time::timeout(RPC_DRAIN_WAIT, shared.calls_finished()).await;
    }
}

/// Length of the framed message (capnp stream framing: segment count - 1, segment sizes in
/// words, padding to 8 bytes, segments) at the start of `data`, if its header is complete and
/// plausible and the whole message is there.
fn framed_len(data: &[u8]) -> Option<usize> {
    let word = |i: usize| -> Option<usize> {
        let b = data.get(i * 4..i * 4 + 4)?;
        usize::try_from(u32::from_le_bytes(b.try_into().ok()?)).ok()
    };
    let segments = word(0)?.checked_add(1)?;
    if segments > RPC_MAX_SEGMENTS {
        return None;
    }
    let header = (4 + 4 * segments + 7) & !7;
    let mut total = header;
    for i in 0..segments {
        total = total.checked_add(word(i + 1)?.checked_mul(8)?)?;
    }
    (total <= data.len()).then_some(total)
}

impl futures::AsyncRead for InputStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(drain) = self.drain.as_mut() {
            if drain.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.drain = None;
        }
        if self.pos >= self.data.len() {
            return Poll::Ready(Ok(0));
        }
        if self.pos >= self.chunk_end {
            let rest = self.data.get(self.pos..).unwrap_or_default();
            self.chunk_end = self.pos + framed_len(rest).unwrap_or(rest.len());
        }
        let chunk = self.data.get(self.pos..self.chunk_end).unwrap_or_default();
        let n = chunk.len().min(buf.len());
        // Invariant: n is at most the length of both slices.
        buf[..n].copy_from_slice(&chunk[..n]);
        self.pos += n;
        if self.pos >= self.chunk_end {
            self.drain = Some(Box::pin(drain(self.shared.clone())));
        }
        Poll::Ready(Ok(n))
    }
}

/// Raw bytes on a connection's RPC stream, served by the real RPC system and store.
pub fn rpc_entry(data: &[u8]) {
    let Some(shared) = rpc_shared() else { return };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let input =
        InputStream { data: data.to_vec(), pos: 0, chunk_end: 0, shared: shared.clone(), drain: None };
    let local = tokio::task::LocalSet::new();
    let _ = local.block_on(
        &rt,
        crate::server::serve_rpc(input, futures::io::sink(), shared, AUTH_CHALLENGE, LOOPBACK),
    );
}

/// An envelope opened by the fixed recipient.
pub fn hybrid_open(data: &[u8]) {
    static KEY: OnceLock<HybridSecretKey> = OnceLock::new();
    let key = KEY.get_or_init(|| HybridSecretKey::from_seed(ENVELOPE_HYBRID_SEED));
    let identity = crate::crypto::identity::Identity::from_seed(&ENVELOPE_IDENTITY_SEED).public().0;
    let _ = hybrid::envelope_key_id(data);
    let _ = hybrid::open(&identity, key, data);
    // The same input as a payload sealed once for many (`crypto::sealmany`), ours among them.
    static KEY_ID: OnceLock<[u8; hybrid::KEY_ID_LEN]> = OnceLock::new();
    let own = *KEY_ID.get_or_init(|| key.public_key().key_id());
    let _ = crate::crypto::sealmany::open(data, &[own], |s| hybrid::open(&identity, key, s));
}

/// An envelope's plaintext, an MLS application message's plaintext, and a DS payload's kind
/// ([`crate::client::parcel`]) with the group frame it may carry.
pub fn frame_decode(data: &[u8]) {
    if let Ok(crate::client::parcel::Parcel::Group(body)) = crate::client::parcel::Parcel::parse(data) {
        let _ = Frame::decode(body);
    }
    if let Ok(frame) = Frame::decode(data) {
        // What decodes must encode back to an equal frame.
        let again = Frame::decode(&frame.encode());
        assert_eq!(again.as_ref(), Ok(&frame), "frame does not round-trip");
    }
    let _ = AppMessage::decode(data);
}

/// A state file (header, key choice, decryption) and a decrypted state's layout.
pub fn state_file(data: &[u8]) {
    let _ = statefile::is_passphrase_protected(data);
    // No passphrase: an Argon2 run per input would slow the fuzzer a thousandfold, and the
    // header checks before it are what a damaged file reaches.
    if let Ok((_, plain)) = statefile::open(data, None) {
        let _ = crate::client::state::State::decode(&plain);
    }
    // The plaintext layer directly: the fuzzer cannot forge the AEAD tag around it.
    let _ = crate::client::state::State::decode(data);
}

/// The MLS storage export of the client state, restored and used.
pub fn mls_storage(data: &[u8]) {
    let Ok(client) = MlsClient::from_storage(&STORAGE_OWNER_SEED, data) else { return };
    for group in client.group_ids() {
        let _ = client.members(&group);
        let _ = client.epoch(&group);
    }
    let _ = client.export_storage();
}

/// An uploaded KeyPackage, as the server validates it.
pub fn key_package(data: &[u8]) {
    let _ = mls::validate_key_package(data, FUZZ_NOW_SECS);
}

/// A Welcome on the client's join path.
pub fn welcome(data: &[u8]) {
    let client = MlsClient::from_storage(&WELCOME_JOINER_SEED, WELCOME_JOINER_STORAGE)
        .or_else(|_| MlsClient::new(&WELCOME_JOINER_SEED));
    let Ok(mut client) = client else { return };
    let _ = MlsClient::peek(data);
    if let Ok(joined) = client.join_welcome(data) {
        let _ = client.members(&joined.group_id);
        let _ = client.export_storage();
    }
}

/// A shell line, in the lobby and inside a conversation.
pub fn shell_line(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    let _ = crate::shell::grammar::parse(&line, false);
    let _ = crate::shell::grammar::parse(&line, true);
    let _ = crate::shell::history::entry_for(&line, false);
    let _ = crate::shell::history::entry_for(&line, true);
    let _ = crate::shell::history::keeps(&line);
}

/// The source address fuzzed connections appear to come from.
pub(crate) const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The time every fuzz target and seed lives at (2027-01-01 UTC): KeyPackage lifetimes are judged
/// by qpq's clock, so a fixed one keeps targets and seeds deterministic however old the corpus.
pub(crate) const FUZZ_NOW_SECS: u64 = 1_798_761_600;

/// A clock that reads [`FUZZ_NOW_SECS`] (give or take the run's own duration).
pub(crate) fn fuzz_clock() -> crate::clock::Clock {
    let real = crate::clock::Clock::system().now_ms() as i64;
    crate::clock::Clock::with_offset_ms((FUZZ_NOW_SECS as i64) * 1000 - real)
}

#[cfg(test)]
mod tests {
    //! The seeds must reach past the checks a fuzzer cannot forge (signatures, AEAD tags, the
    //! KeyPackage a Welcome is encrypted to), or the targets only fuzz the front door.
    use super::*;

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let path = format!("{}/fuzz/corpus/{target}/seed-{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn welcome_seeds_join_the_fixed_client() {
        for name in ["pair", "trio"] {
            let mut client = MlsClient::from_storage(&WELCOME_JOINER_SEED, WELCOME_JOINER_STORAGE).unwrap();
            let joined = client.join_welcome(&seed("welcome", name)).unwrap();
            assert!(client.members(&joined.group_id).unwrap().len() >= 2);
        }
    }

    #[test]
    fn envelope_seed_opens_for_the_fixed_recipient() {
        let identity = crate::crypto::identity::Identity::from_seed(&ENVELOPE_IDENTITY_SEED).public().0;
        let key = HybridSecretKey::from_seed(ENVELOPE_HYBRID_SEED);
        let plain = hybrid::open(&identity, &key, &seed("hybrid_open", "frame")).unwrap();
        assert!(Frame::decode(&plain).is_ok());
    }

    #[test]
    fn state_seed_decrypts_and_storage_seed_restores() {
        let (_, plain) = statefile::open(&seed("state_file", "unprotected"), None).unwrap();
        crate::client::state::State::decode(&plain).unwrap();
        let client = MlsClient::from_storage(&STORAGE_OWNER_SEED, &seed("mls_storage", "one-group")).unwrap();
        assert_eq!(client.group_ids().len(), 1);
        mls::validate_key_package(&seed("key_package", "last-resort"), FUZZ_NOW_SECS).unwrap();
    }

    #[test]
    fn account_seed_reaches_the_account_methods() {
        let me = crate::crypto::identity::Identity::from_seed(&[0xaa; 32]).public().0;
        rpc_entry(&seed("rpc_entry", "account"));
        let crate::store::AnyStore::Redb(store) = &rpc_shared().unwrap().store else {
            panic!("the fuzz target runs on redb")
        };
        assert!(store.hybrid_key(&me).unwrap().is_some(), "uploadHybridKey ran");
        assert!(store.key_package_count(&me, FUZZ_NOW_SECS).unwrap().1, "uploadKeyPackages ran");
    }
}
