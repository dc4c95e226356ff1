//! Every limit qpq enforces, in one place, each with the reason for its value.
//!
//! Server limits that an operator may change live in [`crate::server::config`] with these as
//! defaults; the rest are protocol constants both ends rely on.

use crate::server::ratelimit::Rate;

/// Default largest payload one enqueue may carry: room for the Welcome of a 1000-member group
/// (issue 11). With the hybrid MLS suite every leaf and every parent node of the ratchet tree
/// carries a 1216-byte X-Wing key, so a Welcome (which carries the tree) grows by about 1.5 kB
/// per member while parents are blank and 2.7 kB once the tree has filled: 190 kB at 128
/// members, about 2.7 MB at 1000 with a full tree; a commit on a fresh tree seals to every
/// other member (1.2 kB each). The old 256 KiB stopped joins at about 170 members. 4 MiB covers
/// about 1500 members with a full tree; an operator may set up to [`MAX_BATCH_BYTES`]. It stays
/// at most half of [`MAX_FETCH_BYTES`], so one message always fits a fetch with room to spare;
/// queues and the storage quota still bound what a sender can pile up.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 * 1024 * 1024;
const _: () = assert!(DEFAULT_MAX_PAYLOAD <= MAX_FETCH_BYTES / 2);

/// Default cap on messages waiting in one recipient's queue, so one flooded key cannot fill the
/// disk; the sender gets a clear "queue full" error instead.
pub const DEFAULT_MAX_QUEUE_MESSAGES: u64 = 10_000;

/// Default cap on bytes waiting in one recipient's queue.
pub const DEFAULT_MAX_QUEUE_BYTES: u64 = 256 * 1024 * 1024;

/// Default cap on bytes of queued messages in all queues together: a global storage quota, so
/// many fresh recipient keys (each under its own cap) cannot fill the disk. Config:
/// `max_stored_bytes`.
pub const DEFAULT_MAX_STORED_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// Retry hint sent with `overQuota`: space comes back as recipients ack, not in milliseconds.
pub const OVER_QUOTA_RETRY_AFTER_MS: u64 = 5_000;

/// Default time a message waits for its recipient before the server drops it (30 days).
pub const DEFAULT_MESSAGE_TTL_SECS: u64 = 30 * 24 * 3600;

/// Most single-use KeyPackages the AS keeps per identity: enough for a burst of invitations,
/// bounded so one identity cannot use the server as free storage.
pub const MAX_KEY_PACKAGES_PER_IDENTITY: u64 = 200;

/// Default cap on bytes of key material of all identities together (KeyPackages, last-resort
/// ones and hybrid keys, each row charged its value plus [`KEY_ROW_OVERHEAD_BYTES`]): identities
/// are free, so without it a stranger could fill the disk through uploads under fresh ones.
/// Separate from [`DEFAULT_MAX_STORED_BYTES`], so neither kind of flood starves the other.
/// Config: `max_key_bytes`.
pub const DEFAULT_MAX_KEY_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// What a stored key row is charged beyond its value: its key, its expiry index row and the
/// table's own overhead.
pub const KEY_ROW_OVERHEAD_BYTES: u64 = 128;

/// A hybrid key not replaced within this many seconds of its signed creation is deleted by the
/// sweep (and its charge freed): clients replace theirs weekly and on their return, so its
/// owner has been gone for over a year, far longer than any message waits for them. Without it,
/// every identity ever registered, free as they are, would keep its 1.4 KB row for ever.
pub const HYBRID_KEY_SERVER_LIFETIME_SECS: u64 = 400 * 24 * 3600;

/// Largest KeyPackage accepted: real ones are well under 1 KiB with our single ciphersuite.
pub const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;

/// Most KeyPackages in one upload call.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;

/// Length of an Ed25519 public key, the identity that routes everything.
pub const IDENTITY_KEY_LEN: usize = 32;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Furthest in the future (by the server's clock) a hybrid key's signed creation time may lie: a
/// day. The server keeps a key [`HYBRID_KEY_SERVER_LIFETIME_SECS`] from its signed creation, so a
/// key dated a year ahead (the bound was a year) stayed about 730 days, and a stranger could keep
/// key storage full by renewing such keys for the price of their bytes (a review). A client whose
/// clock is over an hour fast cannot upload KeyPackages anyway
/// ([`KEY_PACKAGE_NOT_BEFORE_MARGIN_SECS`]); a key dated u64::MAX would refuse every later
/// rotation.
pub const MAX_HYBRID_KEY_FUTURE_MS: u64 = 24 * 3600 * 1000;

/// Length of a hybrid (X-Wing: ML-KEM-768 + X25519) public key.
pub const HYBRID_KEY_LEN: usize = 1216;

/// Longest channel id: clients use 16- or 32-byte group ids; 64 leaves room without letting a
/// channel id become a second payload.
pub const MAX_CHANNEL_ID_LEN: usize = 64;

/// Bytes a queue entry adds to its payload and channel id in the queue's byte count:
/// enqueued_at (8) ‖ channel_seq (8) ‖ channel length (1).
pub const QUEUE_ENTRY_HEADER_BYTES: usize = 17;

/// Most recipients in one multi-recipient enqueue: a large group's fan-out in one transaction.
pub const MAX_BATCH_RECIPIENTS: usize = 4096;

/// Most payload bytes in one multi-recipient enqueue (one capnp message must hold it all): 64
/// full-size payloads, a Welcome plus commit fan-out for a large group.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Most recipients of one `enqueueFanout`: a 10,000-member group's message in one call. The
/// call then holds at most 10,000 x 32-byte keys (~400 KB with capnp framing) plus one payload,
/// far under [`RPC_TRAVERSAL_LIMIT_WORDS`].
pub const MAX_FANOUT_RECIPIENTS: usize = 10_000;

/// What the storage quota charges per recipient of a fanned-out payload: its index entry in
/// `queue` (40-byte key + 8-byte payload id). The payload itself is charged once, so one fanout
/// costs the server at most payload + 48 bytes x recipients.
pub const FANOUT_ENTRY_BYTES: u64 = 48;

/// What a refused enqueue, batch or fanout costs its network's mail budget per recipient it
/// names (in place of its payloads, which are given back): what storing an entry for that
/// recipient would have cost the storage quota, so refusals cost the sender about what the
/// store's per-recipient checks cost the server. See `write_enqueue` in `server::rpc`.
pub const REFUSED_RECIPIENT_BYTES: u64 = FANOUT_ENTRY_BYTES;

/// Bytes of capnp structure around each batch item (list element, two pointers, a 32-byte key).
const BATCH_ITEM_OVERHEAD: usize = 64;

/// Most recipient entries one call can carry: an `enqueueFanout` lists more keys than a batch.
const MAX_CALL_RECIPIENTS: usize =
    if MAX_FANOUT_RECIPIENTS > MAX_BATCH_RECIPIENTS { MAX_FANOUT_RECIPIENTS } else { MAX_BATCH_RECIPIENTS };

/// Largest Cap'n Proto message either end reads, in 8-byte words: the largest legal call (a
/// full batch, or a fanout of the largest payload an operator may allow to the most recipients)
/// plus 64 KiB of framing, and no more. capnp counts every
/// word a handler reads against this limit, so handlers read a message's data once. A peer that
/// sends more loses its connection (an unread call cannot be answered) instead of making us
/// allocate; anything up to it is answered, "batch too large" included.
pub const RPC_TRAVERSAL_LIMIT_WORDS: usize =
    (MAX_BATCH_BYTES + MAX_CALL_RECIPIENTS * BATCH_ITEM_OVERHEAD + 64 * 1024) / 8;

/// Most messages one fetch returns; a client with more pending fetches again (`more` is set).
pub const MAX_FETCH_MESSAGES: u32 = 256;

/// What a fetch's loaded page is charged per message beyond its payload and channel id (its
/// struct and vectors), against the memory budget.
pub const FETCH_MESSAGE_OVERHEAD_BYTES: usize = 64;

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

/// Most queue rows one sweep transaction scans: a slice takes milliseconds, so commits waiting
/// behind the sweep are never stalled for long, however big the queue table is.
pub const SWEEP_SLICE_ROWS: usize = 4096;

/// Most expired messages an enqueue or fanout deletes from the head of one full queue to make
/// room (both stores), and most full queues one request (PostgreSQL: one batch) looks at that
/// way. Mail past its TTL is hidden at once but kept, and counted in the caps, until the sweep
/// deletes it (every [`SWEEP_INTERVAL_SECS`]); without this a queue full of it refused new
/// mail for up to that long. Bounded so that a stranger sending to queues full of young mail
/// makes each refusal cost a few index reads, no more.
pub const EXPIRED_HEAD_ROWS: usize = 16;
pub const EXPIRED_HEAD_QUEUES: usize = 64;

/// How long a PostgreSQL node leaves a full queue whose head it found young before looking at
/// its head again (see `YoungHeads` in `store::postgres::mail`): a member who stopped reading
/// keeps a full queue of young mail, and each look is a round trip in the group commit. Expired
/// mail may refuse new mail this much longer. At most [`YOUNG_HEADS_MAX`] queues are remembered.
pub const EXPIRED_HEAD_RECHECK_MS: u64 = 60_000;
pub const YOUNG_HEADS_MAX: usize = 100_000;

/// How long a PostgreSQL `qpq_channels` row (a channel's `channelSeq` counter) is kept unused
/// before the sweep deletes it, raising `channel_seq_floor` over its numbers. Any length keeps
/// the numbers rising; it bounds what a stranger's enqueues to fresh channel ids leave behind
/// (one row each, uncharged) to what they can send in this time. redb deletes its row as soon
/// as no message of the channel is queued.
pub const CHANNEL_IDLE_MS: u64 = 3600 * 1000;

/// Most request bytes one connection may have in calls the server has not answered yet. Bounds
/// the memory a client can pin by pipelining big enqueues (capnp-rpc has no flow control).
pub const MAX_INFLIGHT_BYTES_PER_CONNECTION: usize = 64 * 1024 * 1024;

/// Retry hint sent with `busy` (a connection's in-flight budget is full): about the time a
/// batch of durable writes takes to commit and free it.
pub const BUSY_RETRY_AFTER_MS: u64 = 50;

/// Default cap on the bytes the whole server buffers for peers (`server::memory`): replies not
/// yet written to their streams plus large frames being read. Beyond it, fetches are refused
/// `busy` and large frames wait, so RSS stays bounded however many clients stall. Room for a
/// few full fetch replies and full batches at once. Config: `max_buffered_bytes`.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;

/// Default time a connection may leave its replies unread (it is paused meanwhile), or take
/// over one large frame, before the server closes it. Config: `stall_timeout_ms`.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 30_000;

/// QUIC receive window of a server connection (its one stream and the connection): what a peer
/// may send beyond what the server has read (see `transport::server_transport_config`).
pub const SERVER_RECEIVE_WINDOW_BYTES: u32 = 256 * 1024;

/// QUIC send window of a server connection: bytes written and not yet acknowledged by the peer.
pub const SERVER_SEND_WINDOW_BYTES: u64 = 1024 * 1024;

/// Frames up to this size are read without waiting for room in the memory budget: every call
/// but big enqueues, so a budget filled by stalled peers never delays ordinary traffic.
pub const UNBUDGETED_FRAME_BYTES: usize = 64 * 1024;

/// A connection with this many reply bytes not yet written gets no new call read until its
/// peer reads: a client that stops reading stops costing memory after a reply or two.
pub const READ_PAUSE_UNSENT_BYTES: usize = 256 * 1024;

/// Most reply bytes one connection may have unwritten when a fetch reply is added: two full
/// fetch replies, so one connection never takes the whole memory budget.
pub const MAX_UNSENT_BYTES_PER_CONNECTION: usize = 2 * MAX_FETCH_BYTES + 64 * 1024;

/// Most `fetchWait` calls parked at once on one connection: a client needs one; each holds a
/// subscription and may wake with a full reply.
pub const MAX_PARKED_WAITS_PER_CONNECTION: usize = 4;

/// Most calls one connection may have open on the server: received and not yet answered, or
/// answered and waiting for the peer's `Finish` (capnp-rpc keeps each such answer until then).
/// More is a peer that never finishes its calls, and the connection is ended: our clients keep
/// a handful open.
pub const MAX_OPEN_CALLS_PER_CONNECTION: usize = 4096;

/// Most identities one connection may authenticate as (our clients use one): each keeps an
/// account capability for the connection's life.
pub const MAX_IDENTITIES_PER_CONNECTION: usize = 8;

/// Most failed `authenticate` calls one connection may make; later ones are refused without a
/// signature check (a client that fails once has a bug or the wrong key, not a reason to try
/// thousands of times).
pub const MAX_AUTH_FAILURES_PER_CONNECTION: usize = 8;

/// Default cap on open client connections: well above a small community's needs, and at ~50 KiB
/// of server memory each (BENCHMARKS.md) bounded to about half a GiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on open connections from one IP address: a client holds two (an authenticated
/// one and an anonymous one for sending), so this admits a NAT with ~100 people in a chat shell
/// while no single host can take more than a small share of [`DEFAULT_MAX_CONNECTIONS`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;

/// Connections one IPv6 /48 may hold, as a multiple of `max_connections_per_ip`: 1024 by
/// default, so a site with a /48 of addresses cannot take every slot of the server.
pub const CONNECTIONS_PER_NETWORK_FACTOR: usize = 4;
/// A connection nothing has arrived on for this long (and with no reply waiting to be written)
/// may be evicted when a proven new connection from its address finds the address at its cap:
/// longer than any call takes, shorter than the keep-alive a client uses to hold it open.
pub const EVICT_IDLE_AFTER_MS: u64 = 10_000;
/// At a full server, a search of every connection for an idle one to evict that found none is
/// not repeated for this long (new connections cannot turn idle sooner than
/// [`EVICT_IDLE_AFTER_MS`] anyway), so a flood of proven connections costs one scan a second.
pub const EVICTION_RESCAN_AFTER_MS: u64 = 1_000;
/// At most one "connection refused" log line per this interval (the next one counts the
/// refusals in between), so a connection flood cannot flood the log.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 1_000;
/// At most one log line per this interval about a failing shared database: a call answered
/// `unavailable` (every client's retry fails one during an outage: one line each was about
/// 1 GB of log an hour with 10,000 clients), and each of the node's two dedicated connections
/// failing to reconnect (they retry every [`PG_LISTEN_RETRY_MS`]). The first of a flood is
/// logged at once; the next line counts the ones in between (see [`crate::logthrottle`]).
pub const STORE_OUTAGE_LOG_INTERVAL_MS: u64 = 10_000;
/// A QUIC handshake that has not finished by then gives its connection slot back (a forged or
/// stalled client must not hold it for the whole idle timeout).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Most characters of a server's close reason a client shows: a sentence, not a stranger's
/// screenful.
pub const MAX_CLOSE_REASON_CHARS: usize = 200;

/// Most characters of a server's error text a client keeps (our own server's longest is a
/// sentence with numbers): what reaches a terminal from a stranger stays a line, not a page.
pub const MAX_SERVER_ERROR_CHARS: usize = 1000;

/// Longest a server talks to a client of an outdated protocol version: long enough for it to
/// make its first call and read the upgrade message, short enough that it holds no slot.
pub const OUTDATED_CLIENT_SECS: u64 = 10;

/// Most bytes a server reads from a client of an outdated protocol version: a few calls.
pub const OUTDATED_CLIENT_MAX_READ_BYTES: u64 = 64 * 1024;

/// Largest RPC message (in 8-byte words) read from such a client; its calls carry nothing the
/// server reads.
pub const OUTDATED_CLIENT_MAX_MESSAGE_WORDS: usize = 8 * 1024;

/// Default enqueue rate of one connection (`enqueue` and `enqueueBatch`, one token per call):
/// far above a person typing or a client flushing its outbox, low enough that one connection
/// cannot keep the writer busy alone. Config: `rate_limits.enqueue_per_connection`.
pub const DEFAULT_ENQUEUE_RATE_PER_CONNECTION: Rate = Rate { per_sec: 200.0, burst: 400 };

/// Default enqueue rate of one source address (IPv4, or IPv6 /64): room for a NAT with many
/// clients. Config: `rate_limits.enqueue_per_address`.
pub const DEFAULT_ENQUEUE_RATE_PER_ADDRESS: Rate = Rate { per_sec: 1000.0, burst: 2000 };

/// Default `fetchKeyPackage` rate of one connection: creating a group of 50 in one go.
/// Config: `rate_limits.key_package_per_connection`.
pub const DEFAULT_KEY_PACKAGE_RATE_PER_CONNECTION: Rate = Rate { per_sec: 10.0, burst: 50 };

/// Default `fetchKeyPackage` rate of one source address. Config:
/// `rate_limits.key_package_per_address`.
pub const DEFAULT_KEY_PACKAGE_RATE_PER_ADDRESS: Rate = Rate { per_sec: 50.0, burst: 200 };

/// Default `fetchHybridKey` rate of one connection: it needs no account, and on PostgreSQL each
/// lookup holds a pooled connection the write batches also need. Config:
/// `rate_limits.lookup_per_connection`.
pub const DEFAULT_LOOKUP_RATE_PER_CONNECTION: Rate = Rate { per_sec: 20.0, burst: 100 };

/// Default `fetchHybridKey` rate of one source address. Config: `rate_limits.lookup_per_address`.
pub const DEFAULT_LOOKUP_RATE_PER_ADDRESS: Rate = Rate { per_sec: 100.0, burst: 400 };

/// Default key upload rate of one connection, for all identities on it: a token per
/// `uploadKeyPackages` or `uploadHybridKey` call, taken before anything in it is read, plus one
/// per package it carries (spent once counted, before any is verified; the bucket may go into
/// debt). A client registering spends about 23 (two calls, 20 packages and a last-resort one),
/// a largest upload 102; each package costs two signature checks and up to 16 KiB of the key
/// budget. Config: `rate_limits.key_upload_per_connection`.
pub const DEFAULT_KEY_UPLOAD_RATE_PER_CONNECTION: Rate = Rate { per_sec: 5.0, burst: 250 };

/// Default key upload rate of one source address, counted as per connection: a burst of 5000
/// lets about 200 people behind one NAT register at once; identities are free, so this and
/// the key budget are what bound a stranger's uploads (50 packages a second: at most ~800 KiB/s
/// of key material from one address). Config: `rate_limits.key_upload_per_address`.
pub const DEFAULT_KEY_UPLOAD_RATE_PER_ADDRESS: Rate = Rate { per_sec: 50.0, burst: 5000 };

/// Default key material one network may add, in bytes: 64 MiB at once, refilled at 777 B/s
/// (in a day). A network is an IPv4 address or an IPv6 /48 ([`crate::server::admission::network_key`]).
/// Charged as the key budget charges ([`DEFAULT_MAX_KEY_BYTES`]): each package or hybrid key's bytes plus
/// [`KEY_ROW_OVERHEAD_BYTES`], once counted, before any is verified.
///
/// Why: identities are free, so at the per-address upload rate one address filled the whole key
/// budget in about 90 minutes, and a /48 (65,536 /64s, each rated on its own) in seconds; then
/// nobody could register until packages expired (weeks). A registration uploads ~21 packages
/// (~40 KB with X-Wing keys), so this still lets ~1600 people a day register from one network,
/// and a client replacing what it hands out never comes near it; filling the 4 GiB default
/// budget now takes 64 network-days. Config: `rate_limits.key_bytes_per_network`.
pub const DEFAULT_KEY_BYTES_RATE_PER_NETWORK: Rate = Rate { per_sec: 777.0, burst: 67_108_864 };

/// Default budget of mail bytes one network (an IPv4 address or an IPv6 /48) may enqueue: 1 GiB
/// at once, refilled at 1 GiB a day (~12.4 KB/s). Each enqueue is charged what the storage quota
/// charges: every copy's payload, header ([`QUEUE_ENTRY_HEADER_BYTES`]) and channel id, a fanout
/// its row once plus [`FANOUT_ENTRY_BYTES`] per recipient,
/// all or nothing, before the store is asked. A write the store refuses costs
/// [`REFUSED_RECIPIENT_BYTES`] per recipient instead.
///
/// Why: the enqueue rates count calls, and one call carries up to 16 MiB to recipients that
/// cost nothing to name. One address filled the default 16 GiB storage quota in about 1,000
/// calls (minutes of upload), and nobody's mail was taken for the 30 days until it expired (a
/// review of the server). Now one network fills at most a sixteenth of it a day; many networks
/// still can, more slowly (see the README's known limits). Config:
/// `rate_limits.enqueue_bytes_per_network`.
pub const DEFAULT_ENQUEUE_BYTES_RATE_PER_NETWORK: Rate = Rate { per_sec: 12_428.0, burst: 1_073_741_824 };

/// Default `fetchKeyPackage` rate per target key: 32 at once, then one every 5 s, so a burst
/// takes a sixth of a full pool ([`MAX_KEY_PACKAGES_PER_IDENTITY`]) and ordinary invitations
/// never empty a pool a client tops up hourly. Not a defence against a determined fetcher:
/// 720 an hour is more than a pool holds, so one connection can keep a person's pool empty
/// (from full in about 14 minutes). That is accepted: an empty pool hands out the person's
/// last-resort package, so they can still be added to groups; what it costs is that package's
/// reuse (its init key serves several Welcomes) until the client rotates it after being joined
/// through it. A rate below the pool's size per hour would only slow the draining, and would
/// cap how often a popular person can be invited. Config: `rate_limits.key_package_per_target`.
pub const DEFAULT_KEY_PACKAGE_RATE_PER_TARGET: Rate = Rate { per_sec: 0.2, burst: 32 };

/// Most keys (addresses, target identities) one rate limiter tracks at once: ~64 B each, so a
/// few MiB; past it, only keys whose bucket has refilled make room.
pub const MAX_RATE_LIMITED_KEYS: usize = 65_536;

/// How often a full rate limiter may scan for refilled buckets, so a flood of new keys does not
/// cost a scan per call; also the retry hint when no room could be made.
pub const RATE_LIMIT_PRUNE_EVERY_MS: u64 = 1_000;

/// Lifetime qpq gives each KeyPackage (RFC 9420 §7.2 `Lifetime.not_after - now`): 63 days,
/// three quarters of openmls's default of 84, so a package (and the init key a leak would
/// expose) is usable for a bounded time. It is that long because the package must outlive the
/// commit that adds it to a group: every member checks the added package's lifetime against
/// its own clock when it processes the commit (openmls does, RFC 9420 §7.2), and a member back
/// after weeks away processes it from its queue then; a package already expired by then makes
/// that member refuse the commit and fall out of the group for good. So the server hands out
/// only packages valid for [`key_package_margin_secs`] more (its message TTL and a day), and
/// a package stays usable 63 − 31 = 32 days at the default TTL, replaced every 14.
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 63 * 24 * 3600;

/// How long a KeyPackage the server hands out must stay valid: as long as the commit adding
/// it may wait in a member's queue (`message_ttl_secs`, capped so that a package replaced on
/// time is still handed out), plus a day for members whose clocks run ahead. Packages valid
/// for less are neither handed out nor counted, and are deleted like expired ones.
pub fn key_package_margin_secs(message_ttl_secs: u64) -> u64 {
    const DAY: u64 = 24 * 3600;
    let cap = KEY_PACKAGE_LIFETIME_SECS - KEY_PACKAGE_REPLACE_AFTER_SECS - 2 * DAY;
    message_ttl_secs.min(cap) + DAY
}

/// How far before its creation a KeyPackage's `not_before` lies, so a verifier whose clock runs
/// up to an hour behind the creator's still accepts it (openmls uses the same margin).
pub const KEY_PACKAGE_NOT_BEFORE_MARGIN_SECS: u64 = 3600;

/// Longest lifetime range (`not_after - not_before`) the server accepts, as RFC 9420 §7.2 asks
/// applications to bound it: what qpq clients make plus a day of slack for other clients.
pub const MAX_KEY_PACKAGE_LIFETIME_RANGE_SECS: u64 =
    KEY_PACKAGE_LIFETIME_SECS + KEY_PACKAGE_NOT_BEFORE_MARGIN_SECS + 24 * 3600;

/// Age at which a client replaces its published KeyPackages (single-use and last-resort): 14
/// days, so the server always holds packages it will hand out from anyone who comes online
/// every two weeks (they stay handed out for 32 days, see [`KEY_PACKAGE_LIFETIME_SECS`]), and a
/// client back from a longer absence republishes in its first receive round.
pub const KEY_PACKAGE_REPLACE_AFTER_SECS: u64 = 14 * 24 * 3600;

/// First wait before a client uploads KeyPackages again after the server refused them for
/// itself (its key storage full, a rate limit, busy): doubled at each refusal in a row up to
/// [`KEY_UPLOAD_RETRY_MAX_SECS`], or the server's own hint when it asks for longer. Without it a
/// `recv --follow` or a shell made, stored and uploaded a pool at every message it received,
/// for as long as strangers kept the server full (see [`crate::client::keypool`]).
pub const KEY_UPLOAD_RETRY_MIN_SECS: u64 = 60;
/// Longest wait between two KeyPackage uploads after refusals: the last-resort package still
/// keeps us invitable meanwhile.
pub const KEY_UPLOAD_RETRY_MAX_SECS: u64 = 3600;

/// Most leave proposals a client keeps per group to pass on before committing them (see
/// `Messenger::commit_leave_requests`): each came from a member, so a group's members bound
/// them; this bounds what a group's worth of leavers at once can make a home hold.
pub const MAX_KEPT_LEAVE_PROPOSALS: usize = 64;

/// Most KeyPackages whose private keys a client holds (see [`crate::client::keypool`]): five
/// times what the server holds for one identity ([`MAX_KEY_PACKAGES_PER_IDENTITY`]), far above
/// what replacing a pool every two weeks and refilling after each Welcome hold over the 93 days
/// each is kept, a few MB at most.
pub const MAX_HELD_KEY_PACKAGES: usize = 5 * MAX_KEY_PACKAGES_PER_IDENTITY as usize;

/// How long after its `not_after` a client keeps a KeyPackage's private keys: a Welcome made
/// just before expiry may wait in the adder's outbox and then in our queue for up to the
/// server's message TTL, so the keys stay that long (default TTL) and are then deleted.
pub const KEY_PACKAGE_KEY_RETENTION_SECS: u64 = DEFAULT_MESSAGE_TTL_SECS;
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
/// Most declined (or blocked) direct-conversation requests kept, without what waited with
/// them, so that the stranger's next message, which their client sends into the same
/// conversation, comes as a new request rather than vanishing (see `client::requests`); the
/// oldest go first, and each goes when its request would have expired.
pub const MAX_DECLINED_REQUESTS: usize = 8;
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

/// Entries per `history` page unless `-n` says otherwise: a screenful.
pub const DEFAULT_HISTORY_PAGE: usize = 20;
/// Largest `history -n`: a page is built in memory, so it stays bounded whatever is typed.
pub const MAX_HISTORY_PAGE: usize = 100_000;

/// Most bytes of message text kept per conversation for `history` (there is no count limit,
/// issue 12): the oldest go first. Kept while the whole state is one file every save rewrites
/// and that must stay readable (under its 512 MiB bound); a database makes it unnecessary.
pub const MAX_HISTORY_BYTES_PER_CONVERSATION: usize = 2 * 1024 * 1024;
/// Most bytes of unread text kept for `recv`; past it the oldest unread entries leave the
/// inbox (they stay in history).
pub const MAX_INBOX_BYTES: usize = 8 * 1024 * 1024;
/// Most unread entries kept for `recv` (many tiny messages cost more than their text).
pub const MAX_INBOX_ENTRIES: usize = 10_000;
/// Entries some reader already showed that the inbox keeps anyway, so another reader of the
/// home that is a moment behind (it was printing, or waiting for the lock) still sees them.
pub const MAX_INBOX_READ_KEPT: usize = 256;
/// How long a live reader of the inbox (`recv --follow`, a shell) holds its place without
/// reading: it reads at least every [`LIVE_READER_WAIT_MS`], so one that stopped for longer
/// (killed, suspended) no longer keeps read entries from leaving.
pub const LIVE_READER_LEASE_MS: u64 = 120_000;
/// Longest a live reader waits for mail before it reads the inbox again (and renews its place).
pub const LIVE_READER_WAIT_MS: u32 = 30_000;
/// Most live readers a home keeps places for; past it the one seen longest ago is dropped.
pub const MAX_LIVE_READERS: usize = 16;
/// Most pages one receive round fetches before it returns, so that a round's memory and time
/// are bounded even when a server always says more is waiting. Pages that add to the inbox end
/// a round sooner (see [`crate::client::delivery`]); this bounds the others (commits, junk).
pub const MAX_PAGES_PER_ROUND: usize = 64;
/// Most receive rounds an operation that sends or commits runs to catch up first: more than a
/// full queue ([`DEFAULT_MAX_QUEUE_MESSAGES`] at [`MAX_FETCH_MESSAGES`] a page).
pub const MAX_CATCH_UP_ROUNDS: usize = 64;
const _: () = assert!(MAX_CATCH_UP_ROUNDS as u64 * MAX_FETCH_MESSAGES as u64 > DEFAULT_MAX_QUEUE_MESSAGES);
/// How often a reader waiting on the server also looks whether another process of the home
/// saved (say, fetched messages this reader must show too): one `stat` per period.
pub const HOME_WATCH_MS: u64 = 200;
/// Most messages waiting in the outbox; past it `send` refuses rather than grow the state.
pub const MAX_QUEUED_SENDS: usize = 1000;
/// Most bytes of text waiting in the outbox: the whole state is rewritten on every save.
pub const MAX_QUEUED_SEND_BYTES: usize = 16 * 1024 * 1024;

/// What strangers (keys we never accepted) can add to a home at most: requests (pending and
/// declined), orphans and the block list, plus each request's bookkeeping (a KeyPackage private key of a few KiB kept
/// for the later join, names, times). Whatever a stranger sends, a home grows by no more.
pub const MAX_STRANGER_BYTES: usize = MAX_REQUEST_BYTES
    + MAX_ORPHAN_BYTES
    + MAX_BLOCKED * 32
    + MAX_REQUESTS * 8 * 1024
    + MAX_DECLINED_REQUESTS * (MAX_BYTES_PER_REQUEST + 8 * 1024);

/// Largest shell history file read for cleaning: 1000 commands fit in a few tens of KiB, so a
/// bigger file is not one qpq wrote and is emptied instead of parsed.
pub const MAX_HISTORY_FILE_BYTES: u64 = 1024 * 1024;

/// Longest display name (UTF-8 bytes) one signs into one's MLS leaf and accepts from others:
/// room for a full name in any script, too short to pose as a message.
pub const MAX_DISPLAY_NAME_BYTES: usize = 64;
/// Passphrase attempts a person gets at a terminal prompt (unlocking, or repeating a new one at
/// `init`): enough for typos, few enough that a guesser must start the command again.
pub const PASSPHRASE_TRIES: u32 = 3;

/// Largest `--passphrase-file` read: a passphrase, not a key file.
pub const MAX_PASSPHRASE_FILE_BYTES: u64 = 4096;

/// Cores per RPC worker thread: on a small machine one thread runs quinn and every connection,
/// so a message crosses threads only to the store writer and back (issue 14).
pub const RPC_CORES_PER_WORKER: usize = 4;
/// Most RPC worker threads.
pub const MAX_RPC_WORKERS: usize = 8;
/// Connections each node keeps to a PostgreSQL store: enough for every RPC worker's concurrent
/// transactions to overlap their commits (PostgreSQL then shares WAL flushes between them).
pub const PG_POOL_SIZE: usize = 16;

/// Requests one PostgreSQL group commit takes at most: enough that 64 senders' enqueues share a
/// WAL flush, few enough that one transaction's rows and arrays stay small.
pub const PG_BATCH_OPS: usize = 64;
/// Group-commit workers per node and lane (enqueues, acks; each one transaction at a time, on
/// its own pooled connection).
/// One, like the redb writer: every batch locks the queue rows of its enqueues' recipients
/// until its WAL flush (acks lock freed rows instead: schema version 3), so a second worker's batch mostly waits on those locks, having taken only what was
/// waiting when the first one started; one worker takes everything that waited during the
/// flush. Measured (issue 13, delivery bench, 2 nodes, 16 senders): 1.2-1.3 messages per commit
/// with 4 workers, 2.3 with 2, 3.7-4.0 with 1, and the most msg/s with 1 at 16 and 64 senders.
pub const PG_BATCH_WORKERS: usize = 1;
/// Enqueues and acks waiting for a group-commit worker before callers wait to queue.
pub const PG_BATCH_QUEUE: usize = 1024;
/// Fetches one PostgreSQL read statement takes at most: every recipient one enqueue commit
/// wakes, with room; the answer is bounded by each request's own limits.
pub const PG_FETCH_OPS: usize = 64;
/// Read workers per node, each one statement at a time on its own pooled connection: two, so a
/// fetch arriving during a read waits for at most one statement, not for a queue of them.
pub const PG_FETCH_WORKERS: usize = 2;

/// Longest a PostgreSQL transaction waits for a pooled connection, or a new one to open, before
/// the call fails with `unavailable`: a database that is down gives clients an answer, not a hang.
pub const PG_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Longest one statement waits for a row lock (PostgreSQL's `lock_timeout`) before PostgreSQL
/// fails it (55P03, answered `unavailable`): a node that stalls inside a transaction (a paused
/// VM, a lost link) keeps its row locks until PostgreSQL notices, and the other nodes' writes
/// to the same recipients give up after this instead of hanging their workers.
pub const PG_LOCK_TIMEOUT_MS: u64 = 15_000;

/// Longest PostgreSQL runs one statement (`statement_timeout`) before it cancels it (57014,
/// answered `unavailable`) and frees its locks. Ours take milliseconds; this ends one whose
/// node stopped waiting for it ([`PG_REPLY_TIMEOUT_MS`]). Above [`PG_LOCK_TIMEOUT_MS`], so a
/// statement held up by a lock is reported as such.
pub const PG_STATEMENT_TIMEOUT_MS: u64 = 20_000;

/// Longest a session may sit idle inside a transaction (`idle_in_transaction_session_timeout`)
/// before PostgreSQL ends it: a stalled node's transaction then does not keep its locks for the
/// minutes or hours TCP would take to notice it is gone. (Our transactions send their
/// statements back to back; only a stalled node is ever idle in one.)
pub const PG_IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

/// Longest a node waits for PostgreSQL to answer one transaction (from its first statement to
/// the COMMIT's reply) or one read, before it drops the connection and the call fails with
/// `unavailable`. PostgreSQL's own timeouts end a slow statement sooner
/// ([`PG_LOCK_TIMEOUT_MS`], [`PG_STATEMENT_TIMEOUT_MS`]) and answer; this is for a connection
/// that stopped answering at all (a network partition mid-call, a frozen host), on which a
/// query waited for TCP retransmission (15 minutes on Linux) while the node's one batch worker
/// ([`PG_BATCH_WORKERS`]) made every enqueue wait behind it.
pub const PG_REPLY_TIMEOUT_MS: u64 = 25_000;
const _: () =
    assert!(PG_LOCK_TIMEOUT_MS < PG_STATEMENT_TIMEOUT_MS && PG_STATEMENT_TIMEOUT_MS < PG_REPLY_TIMEOUT_MS);

/// TCP keepalive of every PostgreSQL connection: first probe after this much silence, then
/// [`PG_KEEPALIVE_INTERVAL_SECS`] apart, [`PG_KEEPALIVE_RETRIES`] unanswered ones close it. An
/// idle pooled or listen connection to a host that vanished (no RST) is then noticed in about a
/// minute, not after the system default of two hours.
pub const PG_KEEPALIVE_IDLE_SECS: u64 = 30;
/// See [`PG_KEEPALIVE_IDLE_SECS`].
pub const PG_KEEPALIVE_INTERVAL_SECS: u64 = 10;
/// See [`PG_KEEPALIVE_IDLE_SECS`].
pub const PG_KEEPALIVE_RETRIES: u32 = 3;

/// Longest bytes sent to PostgreSQL may stay unacknowledged before the kernel closes the
/// connection (`TCP_USER_TIMEOUT`, Linux): keepalives only probe an idle connection, and one
/// with a query in flight to a vanished host retransmitted for about 15 minutes. This also
/// bounds, with the keepalives, the listen and wake-up connections, which have no
/// [`PG_REPLY_TIMEOUT_MS`], and a connection a node dropped with a query still unanswered.
pub const PG_TCP_USER_TIMEOUT_MS: u64 = 30_000;

/// Times a PostgreSQL transaction is retried after a deadlock or serialization failure (rare
/// races between a sweep and enqueues; PostgreSQL aborts one side, which then runs again).
pub const PG_TX_ATTEMPTS: usize = 5;

/// How long a `fetchWait` parked on a PostgreSQL node trusts LISTEN/NOTIFY before reading its
/// queue again: a notification lost with a dropped listen connection delays mail by at most this.
pub const PG_FALLBACK_POLL_MS: u64 = 2_000;

/// Longest the listen connection waits before reconnecting after it lost PostgreSQL.
pub const PG_LISTEN_RETRY_MS: u64 = 1_000;

/// Most recipients a node keeps waiting for its wake-up sender (`store::postgres::wake`): past
/// it the set is emptied. While the sender could not reach the database, every recipient of
/// committed mail was added without bound; at about 12 million keys the one `pg_notify` array
/// it sends passed PostgreSQL's 1 GB limit, and it never recovered. Emptying it loses nothing:
/// every parked `fetchWait` reads again after [`PG_FALLBACK_POLL_MS`], and only a sender that
/// cannot send lets the set grow this large (it takes all of it at each statement). 100,000 keys are a few MB here and a 7 MB array (1,000
/// NOTIFYs) once the sender is back.
pub const PG_MAX_PENDING_WAKEUPS: usize = 100_000;

/// Recipients named in one NOTIFY payload: 64 hex digits each, under PostgreSQL's 8000-byte
/// payload limit with room for the sending node's id.
pub const PG_NOTIFY_RECIPIENTS: usize = 100;

/// Retry hint sent with `unavailable` when the shared database cannot be reached.
pub const STORE_UNAVAILABLE_RETRY_AFTER_MS: u64 = 1_000;
/// Longest a qpq process waits for another to release its home's lock. Operations hold it for
/// one save, or across round trips to the server (a commit's confirmation, a backlog on a slow
/// link: minutes at worst); a hold this long is a process stopped (ctrl-z) or stuck, and the
/// waiter gives up with an error naming it.
pub const HOME_LOCK_WAIT_MS: u64 = 300_000;

/// Page cache of the server's redb file (read cache and write buffer together; redb spills
/// a larger transaction to the file). redb's default, 1 GiB, sits outside every budget: one
/// network's daily mail (fetched once) filled it within minutes, and a 1 GiB VPS ran out of
/// memory. 64 MiB holds the hot pages of the queues being fetched many times over.
pub const SERVER_DB_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Page cache of the client database (`qpq.db`): the records of one operation (a group's MLS
/// state, a few messenger records) fit many times over; redb's 1 GiB default is for servers.
pub const CLIENT_DB_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Longest the shell waits at exit for queued messages to go out; whatever does not go out
/// stays in the outbox for the next command.
pub const SHELL_QUIT_FLUSH_SECS: u64 = 10;
