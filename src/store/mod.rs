//! The server's durable state: one redb file `qpq.db`.
//!
//! Reads (fetch, counts, hybrid keys) run on the caller's thread in their own read transaction.
//! Every write goes through one writer thread ([`writer`]) that folds all requests waiting at
//! that moment into a single redb transaction and commits it with `Durability::Immediate`
//! (group commit): a reply means the data is on disk, and N concurrent enqueues cost one fsync,
//! not N. After each commit the writer hands the committed messages to the parked `fetchWait`
//! calls of their recipients, which answer without a read transaction ([`Notifier`]).
//!
//! # Tables (format version [`SCHEMA_VERSION`])
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `&str` name | `u64` (`schema_version`, `instance_id`, `stored_bytes`: bytes of all queued messages, for the storage quota; `key_bytes`: what the key rows are charged, for the key budget; `seq_floor`, `channel_seq_floor`: see below; `next_payload_id`; `deletion_mark`, `deletion_mark_wall`: the latest time a sweep deleted by and the clock's reading then, see [`crate::clock::DeletionClock`]) |
//! | `queue` | recipient (32) ‖ seq (u64 BE) | either an inline entry, the [`StoredMessage`] encoding: enqueued_at_ms u64 BE ‖ channel_seq u64 BE ‖ channel_len u8 ‖ channel ‖ payload (17 bytes or more), or a shared entry: payload id u64 BE (exactly 8 bytes) |
//! | `payloads` | payload id (u64) | a fanned-out payload: refs u64 BE (`queue` entries pointing here when it was stored) ‖ the inline entry encoding above; written once, never rewritten |
//! | `payload_refs` | payload id (u64) | `queue` entries still pointing at that `payloads` row, once some have gone (absent: the row's own refs) |
//! | `queue_meta` | recipient (32) | (next_seq, message count, payload bytes); only while the queue is not empty |
//! | `channels` | channel id | (last channel_seq handed out, messages queued with this channel id); only while that count is not zero |
//! | `key_packages` | identity (32) ‖ id (u64 BE) | [`KeyPackageEntry`]: not_after (unix s, u64 BE) ‖ KeyPackage bytes (TLS encoding) |
//! | `key_package_meta` | identity (32) | (next_id, rows in `key_packages`, expired ones included until deleted); only while that count is not zero |
//! | `last_resort` | identity (32) | [`KeyPackageEntry`]: not_after (unix s, u64 BE) ‖ last-resort KeyPackage bytes |
//! | `hybrid_keys` | identity (32) | signature (64) ‖ created_at_ms (8, BE) ‖ hybrid public key |
//! | `key_package_expiry` | not_after (u64 BE) ‖ identity (32) ‖ id (u64 BE; `u64::MAX` for the last-resort one, `u64::MAX - 1` for the hybrid key) | `()`: one row per `key_packages`, `last_resort` and `hybrid_keys` row (see [`keys`]) |
//!
//! Big-endian sequence numbers make redb's byte order the delivery order, so a fetch is one
//! range scan.
//!
//! A fanned-out payload (`enqueueFanout`) is stored once in `payloads`, with one 8-byte shared
//! entry per recipient in `queue`; its row holds the enqueue time and channel position every
//! entry shares, so all its entries expire together. Deleting an entry (ack, sweep) drops one
//! ref, counted in `payload_refs` so that the row (up to the payload limit, MiBs) is never
//! copied or rewritten for it; the last one deletes both rows. Charges: a recipient's `queue_meta` bytes count what it
//! will fetch (the inline encoding's length, whether inline or shared); `stored_bytes` counts
//! what the file holds: an inline entry's length, and for a fanout the `payloads` row once plus
//! [`limits::FANOUT_ENTRY_BYTES`] per shared entry.
//!
//! Metadata rows live only as long as they describe something queued, so a stream of fresh
//! recipient keys or channel ids leaves nothing behind once its messages are acked or expired.
//! Sequence numbers still never go back. Invariant: every `seq` ever handed out to a recipient
//! is below its `queue_meta` next_seq if it has a row, else below `seq_floor`; every
//! `channel_seq` ever handed out on a channel is at most its `channels` row's last value if it
//! has one, else at most `channel_seq_floor`. Deleting a row raises the floor to cover it (in
//! the same transaction), and a row is created from the floor, so `seq` per recipient and
//! `channelSeq` per channel are strictly increasing across deletion, re-creation and restarts.
//!
//! KeyPackages carry their `not_after` so the server never hands out an expired one: taking or
//! uploading deletes the identity's expired ones it meets, counts leave them out, and
//! [`WriteOp::ExpireKeyPackages`] (run with the sweep) deletes the rest, through the expiry
//! index. Key material has a byte budget of its own ([`keys`]).

pub mod backend;
mod keys;
mod migrate;
mod notifier;
pub mod postgres;
mod writer;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

pub use backend::{AnyStore, DeliveryStore};
pub use notifier::{Notifier, Taken};
pub use postgres::PgStore;
pub use writer::{Outcome, WriteOp};

use crate::clock::Clock;
use crate::crypto::hybrid::SignedHybridKey;
use crate::limits;

/// Version of the table layout above; bumped on any incompatible change. 2: `hybrid_keys`
/// values carry the signed creation time. 3: `key_packages` and `last_resort` values start
/// with the package's not_after. 4: `channels` values count their queued messages and empty
/// metadata rows are deleted (a version 3 file is migrated when opened, see [`migrate`]). 5:
/// the `payloads` table and shared `queue` entries (a version 3 or 4 file is migrated: its
/// inline entries are read as they are, since no inline entry is 8 bytes long). 6: the
/// `payload_refs` table (a version 5 file's rows keep their refs in the row, which is what an
/// absent `payload_refs` row means, so opening it changes nothing but the version; an older qpq
/// refuses a version 6 file, whose rows' own refs may be stale). 7: `key_package_expiry` and
/// `meta.key_bytes` (built from the key tables when an older file is opened; an older qpq
/// refuses a version 7 file, whose index and total it would not keep).
pub const SCHEMA_VERSION: u64 = 7;

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const QUEUE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queue");
pub(crate) const QUEUE_META: TableDefinition<&[u8], (u64, u64, u64)> = TableDefinition::new("queue_meta");
pub(crate) const CHANNELS: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("channels");
pub(crate) const KEY_PACKAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key_packages");
pub(crate) const KEY_PACKAGE_META: TableDefinition<&[u8], (u64, u64)> =
    TableDefinition::new("key_package_meta");
pub(crate) const LAST_RESORT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("last_resort");
pub(crate) const HYBRID_KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hybrid_keys");
pub(crate) const PAYLOADS: TableDefinition<u64, &[u8]> = TableDefinition::new("payloads");
pub(crate) const PAYLOAD_REFS: TableDefinition<u64, u64> = TableDefinition::new("payload_refs");
pub(crate) const KEY_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("key_package_expiry");

/// A raw Ed25519 public key: the identity that routes queues and owns KeyPackages.
pub type IdentityKey = [u8; limits::IDENTITY_KEY_LEN];

/// Errors of the store. Limit errors carry the message the client sees.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "queue full: recipient has {count} messages / {bytes} bytes waiting (limit {max_count} / {max_bytes})"
    )]
    QueueFull { count: u64, bytes: u64, max_count: u64, max_bytes: u64 },
    #[error("key package pool full: {have} + {adding} > {max}")]
    PoolFull { have: u64, adding: u64, max: u64 },
    #[error("server storage full: {used} + {adding} > {max} bytes of queued messages")]
    OverQuota { used: u64, adding: u64, max: u64 },
    #[error("server key storage full: {used} + {adding} > {max} bytes of key packages and hybrid keys")]
    KeyStoreFull { used: u64, adding: u64, max: u64 },
    #[error("hybrid key not newer than the stored one: created {offered} <= {stored} ms")]
    StaleHybridKey { stored: u64, offered: u64 },
    #[error("no key packages for this key")]
    NoKeyPackages,
    /// A fanout names a recipient twice (the RPC layer refuses this first).
    #[error("duplicate recipient: item {again} repeats item {first}")]
    DuplicateRecipient { first: usize, again: usize },
    #[error("database file {path} was written by schema version {found}, this qpq reads {SCHEMA_VERSION}")]
    SchemaVersion { path: String, found: u64 },
    /// Another process (a second `qpq serve`) holds the database file's lock.
    #[error("the database is in use by another process")]
    InUse,
    #[error("database error: {0}")]
    Db(String),
    #[error("the store is shutting down")]
    Closed,
    /// The shared database (PostgreSQL) cannot be reached or refused the transaction.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Queue limits the store enforces on every enqueue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_messages: u64,
    pub max_bytes: u64,
    pub ttl_ms: u64,
    /// Most bytes of queued messages in all recipients' queues together.
    pub max_stored_bytes: u64,
    /// Most bytes of key material (KeyPackages, last-resort ones, hybrid keys) of all
    /// identities together, as [`keys::charge`] counts them.
    pub max_key_bytes: u64,
}

/// The `meta` entry holding the bytes of all queued messages (as [`StoredMessage`] counts them).
pub(crate) const STORED_BYTES: &str = "stored_bytes";
/// The `meta` entry holding what all key rows are charged (see [`keys`]).
pub(crate) const KEY_BYTES: &str = "key_bytes";
/// The `meta` entry a re-created `queue_meta` row takes its next_seq from (see the module docs).
pub(crate) const SEQ_FLOOR: &str = "seq_floor";
/// The `meta` entry a re-created `channels` row counts on from (see the module docs).
pub(crate) const CHANNEL_SEQ_FLOOR: &str = "channel_seq_floor";
/// The `meta` entry holding the id the next fanned-out payload gets.
pub(crate) const NEXT_PAYLOAD_ID: &str = "next_payload_id";
/// The `meta` entry holding the latest time (ms) a sweep deleted by: where a restarted
/// server's deletion time resumes from ([`crate::clock::DeletionClock::resuming`]).
pub(crate) const DELETION_MARK: &str = "deletion_mark";
/// The `meta` entry holding the clock's reading (ms) when [`DELETION_MARK`] was recorded.
pub(crate) const DELETION_MARK_WALL: &str = "deletion_mark_wall";

/// Length of a shared `queue` value: a payload id. Inline values are at least 17 bytes long, so
/// the length alone tells the two apart (and a version 4 file needs no rewrite).
pub(crate) const SHARED_ENTRY_LEN: usize = 8;

/// A `queue` value by kind.
pub(crate) enum QueueValue<'a> {
    /// The [`StoredMessage`] encoding itself.
    Inline(&'a [u8]),
    /// The id of a `payloads` row.
    Shared(u64),
}

impl<'a> QueueValue<'a> {
    pub(crate) fn of(v: &'a [u8]) -> QueueValue<'a> {
        match <[u8; SHARED_ENTRY_LEN]>::try_from(v) {
            Ok(id) => QueueValue::Shared(u64::from_be_bytes(id)),
            Err(_) => QueueValue::Inline(v),
        }
    }
}

/// A `payloads` value split into (refs, inline entry encoding).
pub(crate) fn split_payload_row(row: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    let (refs, entry) =
        row.split_first_chunk::<8>().ok_or_else(|| StoreError::Db("corrupt payload row".to_string()))?;
    Ok((u64::from_be_bytes(*refs), entry))
}

/// The `hybrid_keys` value: signature (64) || created_at_ms (8, big-endian) || key.
pub(crate) fn encode_hybrid_key(signed: &SignedHybridKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(signed.signature.len() + 8 + signed.key.len());
    v.extend_from_slice(&signed.signature);
    v.extend_from_slice(&signed.created_at_ms.to_be_bytes());
    v.extend_from_slice(&signed.key);
    v
}

pub(crate) fn decode_hybrid_key(v: &[u8]) -> Result<SignedHybridKey, StoreError> {
    let corrupt = || StoreError::Db("corrupt hybrid key entry".to_string());
    let (signature, rest) = v.split_at_checked(limits::SIGNATURE_LEN).ok_or_else(corrupt)?;
    let (created, key) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
    Ok(SignedHybridKey {
        key: key.to_vec(),
        signature: signature.to_vec(),
        created_at_ms: u64::from_be_bytes(*created),
    })
}

/// `packages` without the ones `stored` holds and without repeats, in order: a single-use
/// package stored twice (an upload retried after a commit that did take effect, or a list
/// naming one package twice) would be handed to two inviters, and the second Welcome could not
/// be opened (its init key was used). Both backends store an upload through this.
pub(crate) fn single_copies(
    packages: &[KeyPackageEntry],
    stored: &std::collections::HashSet<Vec<u8>>,
) -> Vec<KeyPackageEntry> {
    let mut seen = std::collections::HashSet::new();
    packages.iter().filter(|p| !stored.contains(&p.bytes) && seen.insert(&p.bytes[..])).cloned().collect()
}

/// A `queue` value split in place: (enqueued_at_ms, channel_seq, channel, payload).
type EntryParts<'a> = (u64, u64, &'a [u8], &'a [u8]);
/// A stored KeyPackage: its lifetime's end (unix seconds) and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageEntry {
    pub not_after: u64,
    pub bytes: Vec<u8>,
}

impl KeyPackageEntry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.bytes.len());
        v.extend_from_slice(&self.not_after.to_be_bytes());
        v.extend_from_slice(&self.bytes);
        v
    }

    /// The not_after alone, without copying the package.
    pub(crate) fn decode_not_after(v: &[u8]) -> Result<u64, StoreError> {
        let (head, _) = v
            .split_first_chunk::<8>()
            .ok_or_else(|| StoreError::Db("corrupt key package entry".to_string()))?;
        Ok(u64::from_be_bytes(*head))
    }

    pub(crate) fn decode(v: &[u8]) -> Result<KeyPackageEntry, StoreError> {
        let (head, bytes) = v
            .split_first_chunk::<8>()
            .ok_or_else(|| StoreError::Db("corrupt key package entry".to_string()))?;
        Ok(KeyPackageEntry { not_after: u64::from_be_bytes(*head), bytes: bytes.to_vec() })
    }

    /// Usable at `now` (unix seconds): RFC 9420 §7.2 validity ends at not_after.
    pub(crate) fn is_valid_at(not_after: u64, now: u64) -> bool {
        not_after > now
    }
}

/// One message waiting in a recipient's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub channel_id: Vec<u8>,
    pub channel_seq: u64,
    pub payload: Vec<u8>,
    pub enqueued_at_ms: u64,
}

impl StoredMessage {
    fn encode_value(enqueued_at_ms: u64, channel_seq: u64, channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(17 + channel.len() + payload.len());
        v.extend_from_slice(&enqueued_at_ms.to_be_bytes());
        v.extend_from_slice(&channel_seq.to_be_bytes());
        // Channel ids are capped at MAX_CHANNEL_ID_LEN (64) at the RPC boundary, so this fits.
        v.push(channel.len() as u8);
        v.extend_from_slice(channel);
        v.extend_from_slice(payload);
        v
    }

    /// The enqueue time of an encoded entry, checking that the whole entry is well formed.
    fn enqueued_at(v: &[u8]) -> Result<u64, StoreError> {
        Self::parts(0, v).map(|(at, ..)| at)
    }

    /// (enqueued_at_ms, channel_seq, channel, payload) of an encoded entry, without copying.
    pub(crate) fn parts(seq: u64, v: &[u8]) -> Result<EntryParts<'_>, StoreError> {
        let bad = || StoreError::Db(format!("corrupt queue entry at seq {seq}"));
        let (at, rest) = v.split_first_chunk::<8>().ok_or_else(bad)?;
        let (channel_seq, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let (&clen, rest) = rest.split_first().ok_or_else(bad)?;
        let (channel_id, payload) = rest.split_at_checked(usize::from(clen)).ok_or_else(bad)?;
        Ok((u64::from_be_bytes(*at), u64::from_be_bytes(*channel_seq), channel_id, payload))
    }

    /// Payload bytes this entry counts against its queue's byte cap.
    fn accounted_len(value_len: usize) -> u64 {
        value_len as u64
    }
}

pub(crate) fn queue_key(recipient: &IdentityKey, seq: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(recipient);
    k[32..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The recipient and seq of a `queue` key; a key of another length is corrupt (an error, never
/// a panic: the file may have been damaged or edited while the server was stopped).
pub(crate) fn split_queue_key(key: &[u8]) -> Result<(IdentityKey, u64), StoreError> {
    let corrupt = || StoreError::Db(format!("corrupt queue key of {} bytes", key.len()));
    let (who, seq) = key.split_first_chunk::<32>().ok_or_else(corrupt)?;
    let seq: [u8; 8] = seq.try_into().map_err(|_| corrupt())?;
    Ok((*who, u64::from_be_bytes(seq)))
}

fn queue_key_seq(key: &[u8]) -> Result<u64, StoreError> {
    split_queue_key(key).map(|(_, seq)| seq)
}

/// The open database plus its writer thread.
pub struct Store {
    /// Random id of this database, fixed when the file was created.
    instance_id: u64,
    /// What the server's sweeps and the writer delete by age by, and fetches hide expired mail by:
    /// the clock, but not a step forward of it.
    deletion: Arc<crate::clock::DeletionClock>,
    db: Arc<Database>,
    writer: writer::WriterHandle,
    notifier: Arc<Notifier>,
    limits: QueueLimits,
}

impl Store {
    /// Opens (or creates) the database file and starts the writer thread, on the system clock.
    pub fn open(path: &Path, limits: QueueLimits) -> Result<Store, StoreError> {
        Store::open_with_clock(path, limits, Clock::system())
    }

    /// [`Store::open`] with the clock that stamps and ages messages (the server's clock).
    pub fn open_with_clock(path: &Path, limits: QueueLimits, clock: Clock) -> Result<Store, StoreError> {
        let db =
            Database::builder().set_cache_size(limits::SERVER_DB_CACHE_BYTES).create(path).map_err(|e| {
                match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse,
                    e => e.into(),
                }
            })?;
        let txn = db.begin_write()?;
        let found = txn.open_table(META)?.get("schema_version")?.map(|g| g.value());
        if found == Some(3) {
            migrate::from_3(&txn)?;
        }
        // 4 -> 5 adds the `payloads` table, 5 -> 6 `payload_refs` (both created below, empty:
        // version 4 entries are all inline, version 5 rows hold their own refs).
        {
            let mut meta = txn.open_table(META)?;
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    // Random and nonzero: names this database for clients (see `instance_id`).
                    let mut id = 0;
                    while id == 0 {
                        id = rand::random::<u64>();
                    }
                    meta.insert("instance_id", id)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(3..=6) => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(v) => {
                    return Err(StoreError::SchemaVersion { path: path.display().to_string(), found: v });
                }
            }
            // Create every table up front so read transactions never meet a missing table.
            txn.open_table(QUEUE)?;
            txn.open_table(QUEUE_META)?;
            txn.open_table(CHANNELS)?;
            txn.open_table(KEY_PACKAGES)?;
            txn.open_table(KEY_PACKAGE_META)?;
            txn.open_table(LAST_RESORT)?;
            txn.open_table(HYBRID_KEYS)?;
            txn.open_table(PAYLOADS)?;
            txn.open_table(PAYLOAD_REFS)?;
            txn.open_table(KEY_EXPIRY)?;
        }
        // 6 -> 7: index and charge the key rows an older qpq stored.
        if matches!(found, Some(3..=6)) {
            keys::index_existing(&txn)?;
        }
        let instance_id = txn.open_table(META)?.get("instance_id")?.map(|g| g.value()).unwrap_or(0);
        let deletion_mark = {
            let meta = txn.open_table(META)?;
            let at = meta.get(DELETION_MARK)?.map(|g| g.value());
            let wall = meta.get(DELETION_MARK_WALL)?.map(|g| g.value());
            at.map(|at| crate::clock::DeletionMark { at, wall: wall.unwrap_or(at) })
        };
        {
            // Files written before the quota existed lack the total: count it once.
            let mut meta = txn.open_table(META)?;
            if meta.get(STORED_BYTES)?.is_none() {
                let mut total = 0u64;
                for entry in txn.open_table(QUEUE_META)?.iter()? {
                    total = total.saturating_add(entry?.1.value().2);
                }
                meta.insert(STORED_BYTES, total)?;
            }
        }
        txn.commit()?;
        let db = Arc::new(db);
        let notifier = Arc::new(Notifier::default());
        let deletion = Arc::new(crate::clock::DeletionClock::resuming(clock.clone(), deletion_mark));
        let writer = writer::spawn(db.clone(), notifier.clone(), limits, clock.clone(), deletion.clone())?;
        Ok(Store { db, writer, notifier, limits, instance_id, deletion })
    }

    /// Sends one write to the writer thread and waits for its durable outcome; an ack that
    /// would remove nothing is answered here instead (see [`Store::holds_up_to`]).
    pub async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        if let WriteOp::Ack { who, up_to } = &op
            && !self.holds_up_to(who, *up_to)?
        {
            // Why skipping is safe: this read saw no row of `who` with seq <= `up_to`. Rows
            // committed after it have seqs above every seq the client was ever handed (seqs
            // are handed out in increasing order and never reused), so they are not what it
            // acknowledges; and an ack whose up_to runs ahead of its queue is answered as if
            // it had committed at this read, before them, as it could have been. Through the
            // writer, every such ack was a durable commit (an fsync even with no change) that
            // every other write queued behind, and `ack` has no rate limit: anyone
            // authenticated (identities are free) could keep the disk busy with `ack(0)`.
            return Ok(Outcome::Acked { removed: 0 });
        }
        self.writer.submit(op).await
    }

    /// Whether `who`'s queue holds a row with seq <= `up_to`, expired or not (an ack deletes
    /// expired rows too): one read transaction, a range read that stops at the first row.
    fn holds_up_to(&self, who: &IdentityKey, up_to: u64) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(QUEUE)?;
        let (start, end) = (queue_key(who, 0), queue_key(who, up_to));
        Ok(queue.range(&start[..]..=&end[..])?.next().transpose()?.is_some())
    }

    /// Write transactions the writer has committed since the store was opened: each is one
    /// durable redb commit, so `messages / commit_count` measures how well group commit works.
    pub fn commit_count(&self) -> u64 {
        self.writer.commit_count()
    }

    /// Bytes of queued messages as the storage quota counts them: inline entries whole, a
    /// fanned-out payload once plus [`limits::FANOUT_ENTRY_BYTES`] per recipient.
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(META)?.get(STORED_BYTES)?.map(|g| g.value()).unwrap_or(0))
    }

    /// What the stored key rows are charged against the key budget (see [`keys`]).
    pub fn key_bytes(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(META)?.get(KEY_BYTES)?.map(|g| g.value()).unwrap_or(0))
    }

    /// The random id this database got when it was created.
    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// The time to delete by age by (see [`crate::store::DeliveryStore::deletion_clock`]).
    pub fn deletion_clock(&self) -> &crate::clock::DeletionClock {
        &self.deletion
    }

    /// Wake-ups for one recipient's queue.
    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.notifier
    }

    /// Pending, unexpired messages of `who` with seq > `after`, in seq order, without removing
    /// them. Returns the messages and whether more are waiting beyond `limit`/`max_bytes`.
    pub fn fetch(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        self.fetch_at(who, after, limit, max_bytes, self.expired_by())
    }

    /// The time fetches judge expiry by: the clock, but not a step forward of it, so mail a
    /// stepped clock would call expired stays visible until it is really deleted.
    pub(crate) fn expired_by(&self) -> u64 {
        self.deletion.now().0
    }

    /// [`Store::fetch`] as of the clock reading `now` (ms since the Unix epoch), which decides
    /// what has expired.
    pub fn fetch_at(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
        now: u64,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        self.fetch_within_at(who, after, limit, max_bytes, now, &mut |_| true)
    }

    /// [`Store::fetch_at`] that asks `room` for each message's payload and channel bytes before
    /// copying it out of the file, and stops (answering `more`) at the first it refuses: how the
    /// server holds what fetches load to its memory budget, whatever their pages hold.
    pub fn fetch_within_at(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
        now: u64,
        room: &mut dyn FnMut(usize) -> bool,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        let Some(first) = after.checked_add(1) else { return Ok((Vec::new(), false)) };
        let txn = self.db.begin_read()?;
        let table = txn.open_table(QUEUE)?;
        let payloads = txn.open_table(PAYLOADS)?;
        let start = queue_key(who, first);
        let end = queue_key(who, u64::MAX);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in table.range(&start[..]..=&end[..])? {
            let (k, v) = entry?;
            let seq = queue_key_seq(k.value())?;
            // Read in place (the file's pages): nothing is copied until the message is taken.
            let row;
            let encoded = match QueueValue::of(v.value()) {
                QueueValue::Inline(v) => v,
                QueueValue::Shared(id) => {
                    row = payloads.get(id)?.ok_or_else(|| {
                        StoreError::Db(format!("corrupt queue entry at seq {seq}: payload {id} is missing"))
                    })?;
                    split_payload_row(row.value())?.1
                }
            };
            let (enqueued_at_ms, channel_seq, channel_id, payload) = StoredMessage::parts(seq, encoded)?;
            if now.saturating_sub(enqueued_at_ms) > self.limits.ttl_ms {
                continue; // expired: invisible now, deleted by the next sweep
            }
            if out.len() as u32 >= limit || (!out.is_empty() && bytes + payload.len() > max_bytes) {
                return Ok((out, true));
            }
            if !room(payload.len() + channel_id.len()) {
                return Ok((out, true));
            }
            bytes += payload.len();
            out.push(StoredMessage {
                seq,
                channel_id: channel_id.to_vec(),
                channel_seq,
                payload: payload.to_vec(),
                enqueued_at_ms,
            });
        }
        Ok((out, false))
    }

    /// Single-use KeyPackages of `who` still valid at `now` (unix seconds), and whether it has a
    /// valid last-resort one. Expired ones are left out (and deleted by the next write that
    /// meets them). At most [`limits::MAX_KEY_PACKAGES_PER_IDENTITY`] rows are read.
    pub fn key_package_count(&self, who: &IdentityKey, now: u64) -> Result<(u64, bool), StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KEY_PACKAGES)?;
        let (start, end) = (keys::kp_key(who, 0), keys::kp_key(who, u64::MAX));
        let mut count = 0;
        for entry in table.range(&start[..]..=&end[..])? {
            let (_, v) = entry?;
            if KeyPackageEntry::is_valid_at(KeyPackageEntry::decode_not_after(v.value())?, now) {
                count += 1;
            }
        }
        let lr = match txn.open_table(LAST_RESORT)?.get(&who[..])? {
            Some(v) => KeyPackageEntry::is_valid_at(KeyPackageEntry::decode_not_after(v.value())?, now),
            None => false,
        };
        Ok((count, lr))
    }

    /// The hybrid public key of `who` and the identity's signature over it.
    pub fn hybrid_key(&self, who: &IdentityKey) -> Result<Option<SignedHybridKey>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HYBRID_KEYS)?;
        let Some(v) = table.get(&who[..])? else { return Ok(None) };
        decode_hybrid_key(v.value()).map(Some)
    }

    /// Stops the writer after it has committed everything already submitted, then closes the
    /// database file.
    pub fn close(self) -> Result<(), StoreError> {
        let Store { db, writer, .. } = self;
        writer.shutdown();
        match Arc::try_unwrap(db) {
            Ok(db) => db.close().map_err(StoreError::from),
            // Another holder (a read in flight) still has it; redb closes on the last drop.
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn now_ms() -> u64 {
        Clock::system().now_ms()
    }

    /// Roomy limits with a one-minute TTL.
    pub(crate) fn limits() -> QueueLimits {
        QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            ttl_ms: 60_000,
            max_stored_bytes: u64::MAX,
            max_key_bytes: u64::MAX,
        }
    }

    #[tokio::test]
    async fn commit_count_counts_write_transactions_not_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("qpq.db"), limits()).unwrap();
        assert_eq!(store.commit_count(), 0, "opening the store is not a writer commit");
        let who = [7u8; 32];
        store
            .write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"a".to_vec())] })
            .await
            .unwrap();
        assert_eq!(store.commit_count(), 1);
        // Concurrent requests may share a commit, so the count grows by at most their number.
        let ops = (0..8).map(|_| {
            store.write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"b".to_vec())] })
        });
        for r in futures::future::join_all(ops).await {
            r.unwrap();
        }
        let after = store.commit_count();
        assert!((2..=9).contains(&after), "8 requests took {} commits", after - 1);
        store.close().unwrap();
    }

    /// A redb commit fsyncs even when nothing changed, and every write waiting behind it waits
    /// for that fsync: refused enqueues and fanouts, and acks that find nothing, commit nothing.
    #[tokio::test]
    async fn writes_that_change_nothing_commit_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(&dir.path().join("qpq.db"), QueueLimits { max_messages: 1, ..limits() }).unwrap();
        let who = [7u8; 32];
        let enqueue = || WriteOp::Enqueue { channel: b"c".to_vec(), items: vec![(who, b"a".to_vec())] };
        store.write(enqueue()).await.unwrap();
        let committed = store.commit_count();
        assert!(matches!(store.write(enqueue()).await, Err(StoreError::QueueFull { .. })));
        let fanout = WriteOp::Fanout {
            channel: Vec::new(),
            payload: b"b".to_vec(),
            recipients: vec![who],
            required: None,
        };
        assert!(matches!(store.write(fanout).await, Err(StoreError::QueueFull { .. })));
        let nobody = WriteOp::Ack { who: [8u8; 32], up_to: u64::MAX };
        assert_eq!(store.write(nobody).await.unwrap(), Outcome::Acked { removed: 0 });
        assert_eq!(store.commit_count(), committed, "nothing changed, nothing committed");
        // What was stored is still there, and the ack that finds it commits.
        assert_eq!(store.write(WriteOp::Ack { who, up_to: 1 }).await.unwrap(), Outcome::Acked { removed: 1 });
        assert_eq!(store.commit_count(), committed + 1);
        store.close().unwrap();
    }

    #[test]
    fn a_database_of_another_schema_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let lim = QueueLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
            ttl_ms: 60_000,
            max_stored_bytes: u64::MAX,
            max_key_bytes: u64::MAX,
        };
        Store::open(&path, lim).unwrap().close().unwrap();
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("schema_version", 1).unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(&path, lim).err().expect("an older layout is refused");
        assert!(matches!(err, StoreError::SchemaVersion { found: 1, .. }), "{err}");
        assert!(err.to_string().ends_with("was written by schema version 1, this qpq reads 7"), "{err}");
    }

    #[tokio::test]
    async fn messages_expire_after_the_ttl_and_the_sweep_frees_their_quota() {
        let dir = tempfile::tempdir().unwrap();
        let lim = QueueLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
            ttl_ms: 60_000,
            max_stored_bytes: u64::MAX,
            max_key_bytes: u64::MAX,
        };
        let store = Store::open(&dir.path().join("qpq.db"), lim).unwrap();
        let who = [9u8; 32];
        for p in [b"old1", b"old2"] {
            store
                .write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, p.to_vec())] })
                .await
                .unwrap();
        }
        let now = now_ms();
        let later = now + lim.ttl_ms + 1_000;
        assert_eq!(
            store.fetch_at(&who, 0, 10, 1 << 20, now).unwrap().0.len(),
            2,
            "fresh messages are visible"
        );
        assert!(store.fetch_at(&who, 0, 10, 1 << 20, later).unwrap().0.is_empty(), "expired ones are not");
        let (after_first, _) = store.fetch_at(&who, 1, 10, 1 << 20, now).unwrap();
        assert_eq!(after_first.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2], "only seq > after");
        assert!(store.fetch_at(&who, u64::MAX, 10, 1 << 20, now).unwrap().0.is_empty());
        let full =
            store.write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"new".to_vec())] }).await;
        assert!(matches!(full, Err(StoreError::QueueFull { .. })), "expired messages count until swept");
        let swept = store.write(WriteOp::Sweep { now_ms: now, after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 0, resume: None }, "nothing has expired yet");
        let swept = store.write(WriteOp::Sweep { now_ms: later, after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 2, resume: None });
        store
            .write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"new".to_vec())] })
            .await
            .unwrap();
        let (left, _) = store.fetch_at(&who, 0, 10, 1 << 20, now).unwrap();
        assert_eq!(left.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"new".to_vec()]);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn the_sweep_works_in_bounded_slices_and_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let lim = QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            ttl_ms: 60_000,
            max_stored_bytes: u64::MAX,
            max_key_bytes: u64::MAX,
        };
        let store = Store::open(&dir.path().join("qpq.db"), lim).unwrap();
        let total = limits::SWEEP_SLICE_ROWS + 10;
        let items = (0..total).map(|i| ([(i % 250) as u8; 32], b"x".to_vec())).collect();
        store.write(WriteOp::Enqueue { channel: Vec::new(), items }).await.unwrap();
        let later = now_ms() + lim.ttl_ms + 1_000;
        let first = store.write(WriteOp::Sweep { now_ms: later, after: Vec::new() }).await.unwrap();
        let Outcome::Swept { removed, resume: Some(after) } = first else { panic!("{first:?}") };
        assert_eq!(removed as usize, limits::SWEEP_SLICE_ROWS, "one slice, then it stops");
        let rest = store.write(WriteOp::Sweep { now_ms: later, after }).await.unwrap();
        assert_eq!(rest, Outcome::Swept { removed: 10, resume: None });
        store.close().unwrap();
    }

    /// Review: every sweep pass read every queue row (and each fanout entry's payload row),
    /// expired or not: all the mail stored, every ten minutes, in the writer that every write
    /// waits for. A queue's rows come in age order, so the walk now leaves a queue at its first
    /// young row: a slice reaches the expired row behind a long young queue. Fails without the
    /// skip (the first slice is spent on the young queue's rows).
    #[tokio::test]
    async fn the_sweep_leaves_a_queue_at_its_first_young_message() {
        let dir = tempfile::tempdir().unwrap();
        let lim = QueueLimits { max_messages: 10_000, max_bytes: 1 << 24, ttl_ms: 60_000, ..limits() };
        let clock = Clock::system();
        let store = Store::open_with_clock(&dir.path().join("qpq.db"), lim, clock.clone()).unwrap();
        let (young, old) = ([1u8; 32], [2u8; 32]);
        let one =
            |who: IdentityKey| WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"x".to_vec())] };
        store.write(one(old)).await.unwrap();
        clock.advance(lim.ttl_ms as i64 + 1_000);
        let items = (0..limits::SWEEP_SLICE_ROWS + 10).map(|_| (young, b"y".to_vec())).collect();
        store.write(WriteOp::Enqueue { channel: Vec::new(), items }).await.unwrap();
        let swept = store.write(WriteOp::Sweep { now_ms: clock.now_ms(), after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 1, resume: None }, "two rows read, one swept");
        assert_eq!(store.fetch(&young, 0, 10, 1 << 20).unwrap().0.len(), 10, "the young queue is kept");
        store.close().unwrap();
    }

    /// An enqueue that finds a queue full of expired mail deletes it to make room. When the
    /// request is then refused over another queue, that deletion must still commit: the
    /// writer aborts a batch whose requests were all refused, as one that changed nothing.
    /// Fails without `Delivery::purged` (the sweep then finds alice's two).
    #[tokio::test]
    async fn expired_mail_deleted_to_make_room_stays_deleted_when_the_enqueue_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lim = QueueLimits { max_messages: 2, ttl_ms: 60_000, ..limits() };
        let clock = Clock::system();
        let store = Store::open_with_clock(&dir.path().join("qpq.db"), lim, clock.clone()).unwrap();
        let (alice, carol) = ([1u8; 32], [2u8; 32]);
        let one =
            |who: IdentityKey| WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"x".to_vec())] };
        for _ in 0..2 {
            store.write(one(alice)).await.unwrap();
        }
        clock.advance(lim.ttl_ms as i64 + 1_000);
        for _ in 0..2 {
            store.write(one(carol)).await.unwrap();
        }
        let both = vec![(alice, b"y".to_vec()), (carol, b"y".to_vec())];
        let refused = store.write(WriteOp::Enqueue { channel: Vec::new(), items: both }).await;
        assert!(matches!(refused, Err(StoreError::QueueFull { .. })), "carol's queue is full: {refused:?}");
        let swept = store.write(WriteOp::Sweep { now_ms: clock.now_ms(), after: Vec::new() }).await.unwrap();
        assert_eq!(
            swept,
            Outcome::Swept { removed: 0, resume: None },
            "alice's expired mail is gone already"
        );
        assert_eq!(store.fetch(&carol, 0, 10, 1 << 20).unwrap().0.len(), 2, "carol's young mail is kept");
        store.close().unwrap();
    }

    /// Review of the skip above: a row stamped in the future (the clock ran fast, then was set
    /// right) counted as young and skipped its queue, so the expired rows behind it stayed in
    /// the caps and the quota for as long as the clock had been ahead. It is kept, and the walk
    /// goes on. Fails without the `at <= now` condition.
    #[tokio::test]
    async fn a_row_stamped_in_the_future_does_not_hold_the_sweep_off_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let lim = limits();
        let clock = Clock::system();
        let store = Store::open_with_clock(&dir.path().join("qpq.db"), lim, clock.clone()).unwrap();
        let who = [5u8; 32];
        let one = || WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"x".to_vec())] };
        clock.advance(10 * lim.ttl_ms as i64);
        store.write(one()).await.unwrap();
        clock.set_offset_ms(0);
        store.write(one()).await.unwrap();
        let later = clock.now_ms() + lim.ttl_ms + 1_000;
        let swept = store.write(WriteOp::Sweep { now_ms: later, after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 1, resume: None }, "the expired row behind it went");
        store.close().unwrap();
    }

    /// Writes rows no qpq would write into a closed database file: keys shorter and longer than
    /// recipient ‖ seq, and a value too short to hold its header.
    fn damage(path: &Path, who: &IdentityKey) {
        let db = Database::open(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut queue = txn.open_table(QUEUE).unwrap();
            queue.insert(&[1u8; 10][..], &[0u8; 20][..]).unwrap();
            let mut long = who.to_vec();
            long.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 5]);
            queue.insert(&long[..], &[0u8; 20][..]).unwrap();
            queue.insert(&queue_key(who, 7)[..], &[1u8, 2][..]).unwrap();
        }
        txn.commit().unwrap();
    }

    #[tokio::test]
    async fn damaged_rows_are_errors_and_the_writer_serves_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let who = [3u8; 32];
        Store::open(&path, limits()).unwrap().close().unwrap();
        damage(&path, &who);
        let store = Store::open(&path, limits()).unwrap();
        let err = store.fetch(&who, 0, 10, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("corrupt queue"), "{err}");
        // The sweep meets every damaged row; it removes them instead of dying on them.
        let swept = store.write(WriteOp::Sweep { now_ms: now_ms(), after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 3, resume: None });
        let other = [4u8; 32];
        store
            .write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(other, b"ok".to_vec())] })
            .await
            .unwrap();
        store
            .write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(who, b"ok".to_vec())] })
            .await
            .unwrap();
        let (msgs, _) = store.fetch(&who, 0, 10, 1 << 20).unwrap();
        assert_eq!(msgs.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"ok".to_vec()]);
        store.close().unwrap();
    }

    /// A payload row too short for its count, and a hybrid key too short to decode, made every
    /// sweep (and ack) and every key expiry that met them fail, so they were never passed again:
    /// expired mail kept its quota and no later key expired. Both now go when they come up.
    #[tokio::test]
    async fn the_sweep_and_key_expiry_delete_damaged_rows_instead_of_stopping_at_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        Store::open(&path, limits()).unwrap().close().unwrap();
        let who = [8u8; 32];
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(PAYLOADS).unwrap().insert(5u64, &[1u8, 2, 3][..]).unwrap();
            txn.open_table(QUEUE).unwrap().insert(&queue_key(&who, 1)[..], &5u64.to_be_bytes()[..]).unwrap();
            txn.open_table(QUEUE_META).unwrap().insert(&who[..], (2, 1, 48)).unwrap();
            txn.open_table(HYBRID_KEYS).unwrap().insert(&who[..], &[9u8; 5][..]).unwrap();
            let index = keys::expiry_key(100, &who, keys::HYBRID_SLOT);
            txn.open_table(KEY_EXPIRY).unwrap().insert(&index[..], ()).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path, limits()).unwrap();
        let swept = store.write(WriteOp::Sweep { now_ms: now_ms(), after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 1, resume: None });
        let expired = store.write(WriteOp::ExpireKeyPackages { now: 200 }).await.unwrap();
        assert_eq!(expired, Outcome::KeyPackagesExpired { removed: 1, more: false });
        let txn = store.db.begin_read().unwrap();
        assert_eq!(
            txn.open_table(PAYLOADS).unwrap().iter().unwrap().count(),
            0,
            "the damaged payload row went"
        );
        assert_eq!(txn.open_table(HYBRID_KEYS).unwrap().iter().unwrap().count(), 0, "the damaged key went");
        assert_eq!(txn.open_table(QUEUE_META).unwrap().iter().unwrap().count(), 0, "the queue is empty");
        drop(txn);
        store.close().unwrap();
    }

    fn enqueue_op(who: IdentityKey, channel: &[u8]) -> WriteOp {
        WriteOp::Enqueue { channel: channel.to_vec(), items: vec![(who, b"m".to_vec())] }
    }

    async fn enqueued(store: &Store, op: WriteOp) -> (u64, u64) {
        match store.write(op).await.unwrap() {
            Outcome::Enqueued { channel_seq, seqs } => (seqs[0], channel_seq),
            other => panic!("{other:?}"),
        }
    }

    /// (queue_meta rows, channels rows) in the file.
    fn metadata_rows(store: &Store) -> (u64, u64) {
        let txn = store.db.begin_read().unwrap();
        let qm = txn.open_table(QUEUE_META).unwrap().iter().unwrap().count() as u64;
        (qm, txn.open_table(CHANNELS).unwrap().iter().unwrap().count() as u64)
    }

    #[tokio::test]
    async fn empty_queue_and_channel_rows_are_deleted_and_numbers_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let store = Store::open(&path, limits()).unwrap();
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        assert_eq!(enqueued(&store, enqueue_op(alice, b"chan")).await, (1, 1));
        assert_eq!(enqueued(&store, enqueue_op(alice, b"chan")).await, (2, 2));
        assert_eq!(enqueued(&store, enqueue_op(bob, b"other")).await, (1, 1));
        assert_eq!(metadata_rows(&store), (2, 2));
        // Acking everything deletes alice's row and the channel only she had messages on.
        store.write(WriteOp::Ack { who: alice, up_to: u64::MAX }).await.unwrap();
        assert_eq!(metadata_rows(&store), (1, 1), "alice's queue row and `chan` are gone");
        let (seq, channel_seq) = enqueued(&store, enqueue_op(alice, b"chan")).await;
        assert!(seq > 2, "a re-created queue goes on above its old seqs: {seq}");
        assert!(channel_seq > 2, "a re-created channel goes on above its old numbers: {channel_seq}");
        // The sweep deletes rows too, and the floors survive a restart.
        store.write(WriteOp::Ack { who: alice, up_to: u64::MAX }).await.unwrap();
        let later = now_ms() + limits().ttl_ms + 1_000;
        store.write(WriteOp::Sweep { now_ms: later, after: Vec::new() }).await.unwrap();
        assert_eq!(metadata_rows(&store), (0, 0), "nothing is left for keys with nothing queued");
        store.close().unwrap();
        let store = Store::open(&path, limits()).unwrap();
        let (seq2, channel_seq2) = enqueued(&store, enqueue_op(alice, b"chan")).await;
        assert!(seq2 > seq && channel_seq2 > channel_seq, "{seq2} > {seq}, {channel_seq2} > {channel_seq}");
        let (bob_seq, other_seq) = enqueued(&store, enqueue_op(bob, b"other")).await;
        assert!(
            bob_seq > 1 && other_seq > 1,
            "bob's swept queue and channel also go on: {bob_seq} {other_seq}"
        );
        assert_eq!(store.fetch(&alice, 0, 10, 1 << 20).unwrap().0.len(), 1);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_version_3_file_is_migrated_keeping_its_messages_and_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        {
            // What qpq with schema 3 wrote: `channels` as id -> last seq, rows never deleted.
            let channels_v3: TableDefinition<&[u8], u64> = TableDefinition::new("channels");
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("schema_version", 3).unwrap();
                meta.insert("instance_id", 77).unwrap();
                let mut chans = txn.open_table(channels_v3).unwrap();
                chans.insert(&b"live"[..], 5).unwrap();
                chans.insert(&b"dead"[..], 9).unwrap();
                let value = StoredMessage::encode_value(now_ms(), 5, b"live", b"hi");
                txn.open_table(QUEUE).unwrap().insert(&queue_key(&alice, 3)[..], &value[..]).unwrap();
                let mut qm = txn.open_table(QUEUE_META).unwrap();
                qm.insert(&alice[..], (4, 1, value.len() as u64)).unwrap();
                qm.insert(&bob[..], (8, 0, 0)).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path, limits()).unwrap();
        assert_eq!(store.instance_id(), 77);
        assert_eq!(metadata_rows(&store), (1, 1), "bob's empty row and the unused channel are gone");
        let (msgs, _) = store.fetch(&alice, 0, 10, 1 << 20).unwrap();
        assert_eq!((msgs[0].seq, msgs[0].channel_seq, msgs[0].payload.as_slice()), (3, 5, &b"hi"[..]));
        assert_eq!(enqueued(&store, enqueue_op(alice, b"live")).await, (4, 6));
        let (bob_seq, dead_seq) = enqueued(&store, enqueue_op(bob, b"dead")).await;
        assert!(
            bob_seq >= 8 && dead_seq > 9,
            "numbers of deleted rows never come back: {bob_seq} {dead_seq}"
        );
        // The live channel's count came from the queue: acking both its messages deletes it.
        store.write(WriteOp::Ack { who: alice, up_to: u64::MAX }).await.unwrap();
        assert_eq!(metadata_rows(&store), (1, 1), "only bob's queue and `dead` are left");
        store.close().unwrap();
        let db = Database::open(&path).unwrap();
        let version = db.begin_read().unwrap().open_table(META).unwrap().get("schema_version").unwrap();
        assert_eq!(version.map(|g| g.value()), Some(SCHEMA_VERSION));
    }

    fn fanout_op(channel: &[u8], payload: &[u8], recipients: &[IdentityKey]) -> WriteOp {
        WriteOp::Fanout {
            channel: channel.to_vec(),
            payload: payload.to_vec(),
            recipients: recipients.to_vec(),
            required: None,
        }
    }

    /// (rows in `payloads`, the `stored_bytes` quota count).
    fn payload_rows_and_stored_bytes(store: &Store) -> (u64, u64) {
        let txn = store.db.begin_read().unwrap();
        let rows = txn.open_table(PAYLOADS).unwrap().iter().unwrap().count() as u64;
        let stored = txn.open_table(META).unwrap().get(STORED_BYTES).unwrap().map(|g| g.value()).unwrap_or(0);
        (rows, stored)
    }

    #[tokio::test]
    async fn a_fanned_out_payload_is_stored_once_and_deleted_after_the_last_ack() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("qpq.db"), limits()).unwrap();
        let (alice, bob, carol) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        enqueued(&store, enqueue_op(bob, b"grp")).await; // bob already has mail: seqs differ
        let payload = vec![7u8; 1000];
        let out = store.write(fanout_op(b"grp", &payload, &[alice, bob, carol])).await.unwrap();
        assert_eq!(out, Outcome::Enqueued { channel_seq: 2, seqs: vec![1, 2, 1] });
        let (rows, stored) = payload_rows_and_stored_bytes(&store);
        let row = 8 + 17 + 3 + payload.len() as u64;
        assert_eq!(rows, 1, "one copy for three recipients");
        let inline_m = 17 + 3 + 1;
        assert_eq!(stored, inline_m + row + 3 * limits::FANOUT_ENTRY_BYTES, "the payload is charged once");
        for who in [alice, bob, carol] {
            let (msgs, _) = store.fetch(&who, 0, 10, 1 << 20).unwrap();
            let m = msgs.last().unwrap();
            assert_eq!((m.channel_id.as_slice(), m.channel_seq, &m.payload), (&b"grp"[..], 2, &payload));
        }
        store.write(WriteOp::Ack { who: alice, up_to: u64::MAX }).await.unwrap();
        store.write(WriteOp::Ack { who: bob, up_to: u64::MAX }).await.unwrap();
        assert_eq!(
            payload_rows_and_stored_bytes(&store),
            (1, row + limits::FANOUT_ENTRY_BYTES),
            "carol's copy"
        );
        let (left, _) = store.fetch(&carol, 0, 10, 1 << 20).unwrap();
        assert_eq!(left[0].payload, payload, "still there for the one who has not acked");
        store.write(WriteOp::Ack { who: carol, up_to: u64::MAX }).await.unwrap();
        assert_eq!(payload_rows_and_stored_bytes(&store), (0, 0), "the last ack deletes it");
        assert_eq!(metadata_rows(&store), (0, 0));
        store.close().unwrap();
    }

    /// The `payloads` row's bytes, and its `payload_refs` count (None: absent).
    fn payload_row_and_refs(store: &Store, id: u64) -> (Option<Vec<u8>>, Option<u64>) {
        let txn = store.db.begin_read().unwrap();
        let row = txn.open_table(PAYLOADS).unwrap().get(id).unwrap().map(|g| g.value().to_vec());
        let refs = txn.open_table(PAYLOAD_REFS).unwrap().get(id).unwrap().map(|g| g.value());
        (row, refs)
    }

    #[tokio::test]
    async fn acks_and_sweeps_of_a_large_fanout_never_rewrite_its_payload_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("qpq.db"), limits()).unwrap();
        let who: Vec<IdentityKey> = (1..=4u8).map(|i| [i; 32]).collect();
        store.write(fanout_op(b"grp", &vec![9u8; 256 * 1024], &who)).await.unwrap();
        let (stored, refs) = payload_row_and_refs(&store, 1);
        let stored = stored.expect("the fanout's row");
        assert_eq!(refs, None, "a new row holds its own refs");
        for (i, w) in who.iter().take(3).enumerate() {
            let acked = store.write(WriteOp::Ack { who: *w, up_to: u64::MAX }).await.unwrap();
            assert_eq!(acked, Outcome::Acked { removed: 1 });
            let (row, refs) = payload_row_and_refs(&store, 1);
            assert!(row.as_ref() == Some(&stored), "ack {i} rewrote the payload row");
            assert_eq!(refs, Some(3 - i as u64));
        }
        let swept = store.write(WriteOp::Sweep { now_ms: now_ms(), after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 0, resume: None });
        assert!(payload_row_and_refs(&store, 1).0.as_ref() == Some(&stored), "the sweep rewrote it");
        let (msgs, _) = store.fetch(&who[3], 0, 10, 1 << 20).unwrap();
        assert_eq!((msgs[0].channel_id.as_slice(), msgs[0].payload.len()), (&b"grp"[..], 256 * 1024));
        store.write(WriteOp::Ack { who: who[3], up_to: u64::MAX }).await.unwrap();
        assert_eq!(payload_row_and_refs(&store, 1), (None, None), "the last ack deletes both rows");
        assert_eq!(payload_rows_and_stored_bytes(&store), (0, 0));
        assert_eq!(metadata_rows(&store), (0, 0));
        store.close().unwrap();
    }

    /// What a sweep pass and acks cost with one 4 MiB fanout to 2000 recipients (issue: a
    /// pass copied the payload once per entry). `cargo test --release --lib
    /// measure_sweep_and_acks_of_a_large_fanout -- --ignored --nocapture`
    #[tokio::test]
    #[ignore]
    async fn measure_sweep_and_acks_of_a_large_fanout() {
        let dir = tempfile::tempdir().unwrap();
        let lim = QueueLimits {
            max_messages: 100,
            max_bytes: 8 << 20,
            ttl_ms: 60_000,
            max_stored_bytes: u64::MAX,
            max_key_bytes: u64::MAX,
        };
        let store = Store::open(&dir.path().join("qpq.db"), lim).unwrap();
        let who: Vec<IdentityKey> = (0..2000u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                k
            })
            .collect();
        store.write(fanout_op(b"grp", &vec![9u8; 4 << 20], &who)).await.unwrap();
        let t = std::time::Instant::now();
        let swept = store.write(WriteOp::Sweep { now_ms: now_ms(), after: Vec::new() }).await.unwrap();
        println!("MEASURE sweep pass over 2000 shared entries: {:?} ({swept:?})", t.elapsed());
        let t = std::time::Instant::now();
        for w in &who[..100] {
            store.write(WriteOp::Ack { who: *w, up_to: u64::MAX }).await.unwrap();
        }
        println!("MEASURE 100 acks one after the other: {:?}", t.elapsed());
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_version_5_file_keeps_its_payload_rows_refs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let who: Vec<IdentityKey> = (1..=3u8).map(|i| [i; 32]).collect();
        {
            let store = Store::open(&path, limits()).unwrap();
            store.write(fanout_op(b"c", b"shared", &who)).await.unwrap();
            store.close().unwrap();
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("schema_version", 5).unwrap();
            txn.delete_table(PAYLOAD_REFS).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path, limits()).unwrap();
        for w in &who[..2] {
            store.write(WriteOp::Ack { who: *w, up_to: u64::MAX }).await.unwrap();
            assert_eq!(payload_rows_and_stored_bytes(&store).0, 1, "the row's own 3 refs count");
        }
        assert_eq!(store.fetch(&who[2], 0, 10, 1 << 20).unwrap().0[0].payload, b"shared");
        store.write(WriteOp::Ack { who: who[2], up_to: u64::MAX }).await.unwrap();
        assert_eq!(payload_rows_and_stored_bytes(&store), (0, 0));
        store.close().unwrap();
        let db = Database::open(&path).unwrap();
        let version = db.begin_read().unwrap().open_table(META).unwrap().get("schema_version").unwrap();
        assert_eq!(version.map(|g| g.value()), Some(SCHEMA_VERSION));
    }

    #[tokio::test]
    async fn a_fanned_out_payload_expires_with_all_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("qpq.db"), limits()).unwrap();
        let who: Vec<IdentityKey> = (1..=5u8).map(|i| [i; 32]).collect();
        store.write(fanout_op(b"grp", b"hello", &who)).await.unwrap();
        store.write(WriteOp::Ack { who: who[0], up_to: u64::MAX }).await.unwrap();
        let now = now_ms();
        let later = now + limits().ttl_ms + 1_000;
        assert!(store.fetch_at(&who[1], 0, 10, 1 << 20, later).unwrap().0.is_empty(), "expired for all");
        let swept = store.write(WriteOp::Sweep { now_ms: now, after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 0, resume: None });
        assert_eq!(payload_rows_and_stored_bytes(&store).0, 1);
        let swept = store.write(WriteOp::Sweep { now_ms: later, after: Vec::new() }).await.unwrap();
        assert_eq!(swept, Outcome::Swept { removed: 4, resume: None });
        assert_eq!(payload_rows_and_stored_bytes(&store), (0, 0), "the payload went with its entries");
        assert_eq!(metadata_rows(&store), (0, 0));
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_fanout_charges_each_queue_the_payload_and_the_quota_once() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![1u8; 10_000];
        let entry = 17 + payload.len() as u64;
        let n = 50u64;
        // Room for the payload once and 50 entries, far from room for 50 copies.
        let quota = 8 + entry + n * limits::FANOUT_ENTRY_BYTES;
        let lim = QueueLimits {
            max_messages: 100,
            max_bytes: entry,
            ttl_ms: 60_000,
            max_stored_bytes: quota,
            max_key_bytes: u64::MAX,
        };
        let store = Store::open(&dir.path().join("qpq.db"), lim).unwrap();
        let who: Vec<IdentityKey> = (0..n).map(|i| [i as u8; 32]).collect();
        store.write(fanout_op(b"", &payload, &who)).await.unwrap();
        assert_eq!(payload_rows_and_stored_bytes(&store), (1, quota));
        // The quota is used up now, and so is each queue's byte cap (charged the whole payload).
        let over = store.write(fanout_op(b"", b"x", &[[200u8; 32]])).await;
        assert!(matches!(over, Err(StoreError::OverQuota { .. })), "{over:?}");
        store.write(WriteOp::Ack { who: who[0], up_to: u64::MAX }).await.unwrap();
        // who[1]'s queue is full, so it would be skipped; who[0]'s has room, but the quota has
        // none for a new row: the quota refuses the whole fanout.
        let over = store.write(fanout_op(b"", b"x", &[who[0], who[1]])).await;
        assert!(matches!(over, Err(StoreError::OverQuota { .. })), "{over:?}");
        assert_eq!(store.fetch(&who[0], 0, 10, 1 << 20).unwrap().0.len(), 0, "all or nothing");
        let full = store.write(fanout_op(b"", b"x", &[who[1], who[2]])).await;
        assert!(matches!(full, Err(StoreError::QueueFull { .. })), "every queue full: {full:?}");
        let none = store.write(fanout_op(b"c", b"x", &[])).await.unwrap();
        assert_eq!(none, Outcome::Enqueued { channel_seq: 0, seqs: vec![] }, "nobody: nothing stored");
        let dup = store.write(fanout_op(b"", b"x", &[who[0], who[0]])).await;
        assert!(matches!(dup, Err(StoreError::DuplicateRecipient { first: 0, again: 1 })), "{dup:?}");
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_version_4_file_is_opened_with_its_inline_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let who = [1u8; 32];
        {
            let store = Store::open(&path, limits()).unwrap();
            enqueued(&store, enqueue_op(who, b"c")).await;
            store.close().unwrap();
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("schema_version", 4).unwrap();
            txn.delete_table(PAYLOADS).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path, limits()).unwrap();
        assert_eq!(store.fetch(&who, 0, 10, 1 << 20).unwrap().0[0].payload, b"m");
        store.write(fanout_op(b"c", b"shared", &[who])).await.unwrap();
        assert_eq!(store.fetch(&who, 0, 10, 1 << 20).unwrap().0.len(), 2);
        store.close().unwrap();
    }

    fn kp(not_after: u64, tag: u8) -> KeyPackageEntry {
        KeyPackageEntry { not_after, bytes: vec![tag; 4] }
    }

    async fn take(store: &Store, who: IdentityKey, now: u64) -> Result<Outcome, StoreError> {
        store.write(WriteOp::TakeKeyPackage { who, now }).await
    }

    #[tokio::test]
    async fn nobody_is_handed_an_expired_key_package() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("qpq.db"), limits()).unwrap();
        let who = [3u8; 32];
        let now = 1_000_000;
        let packages = vec![kp(now + 10, 1), kp(now + 100, 2), kp(now + 10, 3)];
        let op = WriteOp::UploadKeyPackages { who, packages, last_resort: Some(kp(now + 50, 9)), now };
        assert_eq!(store.write(op).await.unwrap(), Outcome::KeyPackagesStored { count: 3 });
        assert_eq!(store.key_package_count(&who, now).unwrap(), (3, true));
        // Later: 1 and 3 have expired (not_after is the first second they are invalid).
        let later = now + 10;
        assert_eq!(store.key_package_count(&who, later).unwrap(), (1, true), "only valid ones count");
        assert_eq!(
            take(&store, who, later).await.unwrap(),
            Outcome::KeyPackage { bytes: vec![2; 4], remaining: 1, last_resort: false },
            "the expired first package is skipped (and deleted)"
        );
        assert_eq!(
            take(&store, who, later).await.unwrap(),
            Outcome::KeyPackage { bytes: vec![9; 4], remaining: 0, last_resort: true }
        );
        assert_eq!(store.key_package_count(&who, later).unwrap(), (0, true));
        // Once the last-resort package expires too, there is nothing to hand out.
        assert!(matches!(take(&store, who, now + 50).await, Err(StoreError::NoKeyPackages)));
        assert_eq!(store.key_package_count(&who, now).unwrap(), (0, false), "the expired one was deleted");
        store.close().unwrap();
    }

    #[tokio::test]
    async fn expired_key_packages_are_deleted_and_free_the_pool_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("qpq.db"), limits()).unwrap();
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let now = 1_000_000;
        // Distinct packages: the store keeps one copy of each.
        let full: Vec<_> = (0..limits::MAX_KEY_PACKAGES_PER_IDENTITY)
            .map(|i| KeyPackageEntry { not_after: now + 10, bytes: i.to_be_bytes().to_vec() })
            .collect();
        let op = WriteOp::UploadKeyPackages { who: alice, packages: full.clone(), last_resort: None, now };
        store.write(op).await.unwrap();
        let op = WriteOp::UploadKeyPackages {
            who: alice,
            packages: vec![kp(now + 99, 2)],
            last_resort: None,
            now,
        };
        assert!(matches!(store.write(op).await, Err(StoreError::PoolFull { .. })));
        // After they expired, an upload makes room for itself.
        let later = now + 10;
        let op = WriteOp::UploadKeyPackages {
            who: alice,
            packages: vec![kp(later + 99, 2)],
            last_resort: None,
            now: later,
        };
        assert_eq!(store.write(op).await.unwrap(), Outcome::KeyPackagesStored { count: 1 });
        // The sweep deletes everyone's expired packages and last-resort ones.
        let op = WriteOp::UploadKeyPackages {
            who: bob,
            packages: vec![kp(now + 10, 3), kp(now + 99, 4)],
            last_resort: Some(kp(now + 10, 5)),
            now,
        };
        store.write(op).await.unwrap();
        assert_eq!(
            store.write(WriteOp::ExpireKeyPackages { now: later }).await.unwrap(),
            Outcome::KeyPackagesExpired { removed: 2, more: false }
        );
        assert_eq!(store.key_package_count(&bob, now).unwrap(), (1, false), "deleted, not just hidden");
        assert_eq!(store.key_package_count(&alice, now).unwrap(), (1, false));
        let op = WriteOp::UploadKeyPackages { who: alice, packages: full, last_resort: None, now: later };
        assert!(matches!(store.write(op).await, Err(StoreError::PoolFull { have: 1, .. })));
        store.close().unwrap();
    }
}
