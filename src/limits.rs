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

// ----- what strangers can make a client home hold (consent, `client::requests`) -----

/// Most message requests (invitations from keys that are not contacts) kept at once: a list a
/// person can still review; more are dropped until some are accepted, blocked or expire.
pub const MAX_REQUESTS: usize = 32;
/// Most requests from one key, so a single stranger cannot take every slot.
pub const MAX_REQUESTS_PER_SENDER: usize = 3;
/// Most bytes one request keeps (its Welcome and the messages held with it): room for a
/// Welcome and a first message of the largest size; later ones wait on the server's side of
/// the conversation until the request is accepted, or are dropped.
pub const MAX_BYTES_PER_REQUEST: usize = 256 * 1024;
/// Most bytes all requests together keep. A product of the two bounds above, so a full byte
/// budget can never lock out a request that fits its own.
pub const MAX_REQUEST_BYTES: usize = MAX_REQUESTS * MAX_BYTES_PER_REQUEST;
/// Most messages held for one request until it is accepted: the start of a conversation.
pub const MAX_HELD_PER_REQUEST: usize = 20;
/// A request not answered within this time is dropped (30 days, the server's message TTL).
pub const REQUEST_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most blocked keys remembered (32 bytes each): far more than a person blocks by hand.
pub const MAX_BLOCKED: usize = 10_000;
/// Characters of a request's first message shown as its preview.
pub const REQUEST_PREVIEW_CHARS: usize = 80;

/// Most messages kept for groups we know nothing of yet (a Welcome that comes late).
pub const MAX_ORPHANS: usize = 100;
/// Most bytes such messages keep together.
pub const MAX_ORPHAN_BYTES: usize = 1024 * 1024;
/// How long such messages are kept before each receive round drops them.
pub const ORPHAN_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Most bytes of message text kept per conversation for `history` (besides the entry count
/// limit): the oldest go first.
pub const MAX_HISTORY_BYTES_PER_CONVERSATION: usize = 2 * 1024 * 1024;
/// Most bytes of unread text kept for `recv`; past it the oldest unread entries leave the
/// inbox (they stay in history).
pub const MAX_INBOX_BYTES: usize = 8 * 1024 * 1024;
/// Most unread entries kept for `recv` (many tiny messages cost more than their text).
pub const MAX_INBOX_ENTRIES: usize = 10_000;

/// What strangers (keys we never accepted) can add to a home at most: requests, orphans and
/// the block list, plus each request's bookkeeping (a KeyPackage private key of a few KiB kept
/// for the later join, names, times). Whatever a stranger sends, a home grows by no more.
pub const MAX_STRANGER_BYTES: usize =
    MAX_REQUEST_BYTES + MAX_ORPHAN_BYTES + MAX_BLOCKED * 32 + MAX_REQUESTS * 8 * 1024;
