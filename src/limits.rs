//! Every limit qpq enforces, in one place, each with the reason for its value.
//!
//! Server limits that an operator may change live in [`crate::server::config`] with these as
//! defaults; the rest are protocol constants both ends rely on.

/// Default largest payload one enqueue may carry: room for a large text or a Welcome for a big
/// group, small enough that a queue cannot be flooded by a handful of calls.
pub const DEFAULT_MAX_PAYLOAD: usize = 256 * 1024;

/// Default cap on messages waiting in one recipient's queue, so one flooded key cannot fill the
/// disk; the sender gets a clear "queue full" error instead.
pub const DEFAULT_MAX_QUEUE_MESSAGES: u64 = 10_000;

/// Default cap on bytes waiting in one recipient's queue.
pub const DEFAULT_MAX_QUEUE_BYTES: u64 = 256 * 1024 * 1024;

/// Default time a message waits for its recipient before the server drops it (30 days).
pub const DEFAULT_MESSAGE_TTL_SECS: u64 = 30 * 24 * 3600;

/// Most single-use KeyPackages the AS keeps per identity: enough for a burst of invitations,
/// bounded so one identity cannot use the server as free storage.
pub const MAX_KEY_PACKAGES_PER_IDENTITY: u64 = 200;

/// Largest KeyPackage accepted: real ones are well under 1 KiB with our single ciphersuite.
pub const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;

/// Most KeyPackages in one upload call.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;

/// Length of an Ed25519 public key, the identity that routes everything.
pub const IDENTITY_KEY_LEN: usize = 32;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Length of a hybrid (X-Wing: ML-KEM-768 + X25519) public key.
pub const HYBRID_KEY_LEN: usize = 1216;

/// Longest channel id: clients use 16- or 32-byte group ids; 64 leaves room without letting a
/// channel id become a second payload.
pub const MAX_CHANNEL_ID_LEN: usize = 64;

/// Most recipients in one multi-recipient enqueue: a large group's fan-out in one transaction.
pub const MAX_BATCH_RECIPIENTS: usize = 4096;

/// Most payload bytes in one multi-recipient enqueue (one capnp message must hold it all).
pub const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Largest Cap'n Proto message either end reads, in 8-byte words: a full batch plus framing.
/// A peer that announces more loses its connection instead of making us allocate.
pub const RPC_TRAVERSAL_LIMIT_WORDS: usize = (MAX_BATCH_BYTES + 4 * 1024 * 1024) / 8;

/// Most messages one fetch returns; a client with more pending fetches again (`more` is set).
pub const MAX_FETCH_MESSAGES: u32 = 256;

/// Most payload bytes one fetch returns, so a reply stays well under the reader limit.
pub const MAX_FETCH_BYTES: usize = 8 * 1024 * 1024;

/// Longest a fetchWait may park on the server before returning empty.
pub const MAX_FETCH_WAIT_MS: u32 = 60_000;

/// Most write requests the store folds into one redb transaction (one fsync).
pub const MAX_WRITE_BATCH: usize = 1024;

/// How long shutdown waits for in-flight calls before closing connections.
pub const SHUTDOWN_GRACE_MS: u64 = 3_000;

/// How often the server deletes expired messages.
pub const SWEEP_INTERVAL_SECS: u64 = 600;

/// Most request bytes one connection may have in calls the server has not answered yet. Bounds
/// the memory a client can pin by pipelining big enqueues (capnp-rpc has no flow control).
pub const MAX_INFLIGHT_BYTES_PER_CONNECTION: usize = 64 * 1024 * 1024;

/// Default cap on open client connections: well above a small community's needs, and at ~50 KiB
/// of server memory each (BENCHMARKS.md) bounded to about half a GiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on open connections from one IP address: a client holds two (an authenticated
/// one and an anonymous one for sending), so this admits a NAT with ~100 people in a chat shell
/// while no single host can take more than a small share of [`DEFAULT_MAX_CONNECTIONS`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// A QUIC handshake that has not finished by then gives its connection slot back (a forged or
/// stalled client must not hold it for the whole idle timeout).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Largest shell history file read for cleaning: 1000 commands fit in a few tens of KiB, so a
/// bigger file is not one qpq wrote and is emptied instead of parsed.
pub const MAX_HISTORY_FILE_BYTES: u64 = 1024 * 1024;
