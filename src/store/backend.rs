//! The storage interface the server runs on, and the two stores behind it.
//!
//! [`DeliveryStore`] is everything `server::rpc`, `server::mod` and the sweeper need from the
//! AS/DS state. Two stores implement it: the embedded redb [`Store`] (the default: one
//! process, one file) and [`PgStore`] (several `qpq serve` nodes sharing one PostgreSQL
//! database). [`AnyStore`] picks one at start-up and delegates; there is no `dyn` and no
//! boxing on the hot path.
//!
//! # Semantics every implementation keeps
//! - **Durable before acknowledged.** A `write` returns `Ok` only after its effect is
//!   committed durably (redb `Durability::Immediate`; PostgreSQL `synchronous_commit = on`,
//!   that is after the WAL flush). An `Err` means no effect, except a lost connection during a
//!   PostgreSQL commit ([`StoreError::Unavailable`]), where the outcome is unknown, as on any
//!   network database; clients retry, and MLS tolerates a duplicate.
//! - **Single-use KeyPackages.** `TakeKeyPackage` removes one valid package atomically: two
//!   concurrent takes (on any node) never get the same one. With none left, the valid
//!   last-resort package is returned and kept. Expired packages are never handed out.
//! - **All-or-nothing enqueue.** `Enqueue` stores every item or none (a queue cap or the
//!   storage quota refuses the whole batch). A non-empty channel id gets one `channelSeq` for
//!   the batch, strictly increasing per channel; every recipient sees the batches of one
//!   channel in `channelSeq` order.
//! - **Fanout skips full queues.** `Fanout` stores its payload, in one transaction and with
//!   one `channelSeq`, for every recipient whose queue has room for it under its message and
//!   byte caps, and skips the others, whose seq in the answer is 0 (real seqs start at 1). It
//!   is refused with [`StoreError::QueueFull`] only when every recipient is skipped, or when
//!   the queue of its `required` recipient (one of them; a committer's own key) has no room;
//!   a refused fanout stores nothing for anyone and takes no `channelSeq`. A `required` key
//!   that is not a recipient requires nothing (the RPC layer refuses it before it gets here).
//!   The storage quota is charged for what is stored (the payload once,
//!   [`crate::limits::FANOUT_ENTRY_BYTES`] per stored recipient); a duplicate recipient or the
//!   quota refuses the whole fanout.
//! - **Per-recipient seq.** Each recipient's messages get strictly increasing `seq` numbers,
//!   from 1, dense while its queue exists, never reused (also across deletion of empty queues,
//!   restarts and, for PostgreSQL, nodes).
//! - **Fetch from a cursor.** `fetch(who, after, ..)` returns unexpired messages with
//!   `seq > after` in seq order without removing them; `more` says a limit cut the page.
//! - **Ack deletes.** `Ack { up_to }` deletes `who`'s messages with `seq <= up_to`.
//! - **TTL sweep.** Messages older than the TTL are invisible at once and deleted by `Sweep`
//!   slices; `ExpireKeyPackages` deletes expired packages. An enqueue or fanout that finds a
//!   queue full first deletes the expired messages at its head (at most
//!   [`crate::limits::EXPIRED_HEAD_ROWS`]), so expired mail does not refuse new mail.
//! - **Quotas.** Per-recipient message and byte caps, per-identity KeyPackage cap, and a
//!   server-wide cap on queued bytes (on PostgreSQL checked against the committed total, so
//!   concurrent enqueues on several nodes may overshoot it by what they add together).
//! - **Instance id.** Random, fixed when the database was created, stored in it: every node of
//!   a PostgreSQL service reports the same one.
//! - **Wake-ups.** After a commit that queued mail, the `notifier` of every node wakes the
//!   recipients' `fetchWait`s; a store whose notifications can be lost (PostgreSQL
//!   LISTEN/NOTIFY across a dropped connection) names a [`DeliveryStore::fallback_poll`]
//!   interval after which a waiter reads again anyway.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::postgres::PgStore;
use super::{IdentityKey, Notifier, Outcome, Store, StoreError, StoredMessage, WriteOp};
use crate::crypto::hybrid::SignedHybridKey;

/// The AS/DS state as the server uses it; see the module docs for the semantics.
pub trait DeliveryStore {
    /// Applies one write and returns its durable outcome.
    fn write(&self, op: WriteOp) -> impl Future<Output = Result<Outcome, StoreError>>;

    /// Unexpired messages of `who` with seq > `after`, in order; and whether more are waiting.
    /// `room` is asked for each message's payload and channel bytes before it is taken; the
    /// page stops (with `more`) at the first it refuses. On redb nothing refused is ever
    /// copied; PostgreSQL has sent the rows by then, so there it bounds what the page keeps.
    fn fetch(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
        room: &mut dyn FnMut(usize) -> bool,
    ) -> impl Future<Output = Result<(Vec<StoredMessage>, bool), StoreError>>;

    /// Valid single-use KeyPackages of `who` at `now` (unix s), and whether a valid
    /// last-resort one exists.
    fn key_package_count(
        &self,
        who: &IdentityKey,
        now: u64,
    ) -> impl Future<Output = Result<(u64, bool), StoreError>>;

    /// The signed hybrid key of `who`.
    fn hybrid_key(
        &self,
        who: &IdentityKey,
    ) -> impl Future<Output = Result<Option<SignedHybridKey>, StoreError>>;

    /// The database's instance id.
    fn instance_id(&self) -> u64;

    /// The time to delete by age by (messages, keys): the store's clock, but not a step forward
    /// of it, resumed at open from what the store's sweeps recorded
    /// ([`crate::clock::DeletionClock::resuming`]). The server's sweeps, the expired-head
    /// deletion and fetches all read this one.
    fn deletion_clock(&self) -> &crate::clock::DeletionClock;

    /// This node's wake-ups for parked `fetchWait`s.
    fn notifier(&self) -> &Arc<Notifier>;

    /// Durable write transactions this node has committed (for `qpq bench`).
    fn commit_count(&self) -> u64;

    /// How long a parked `fetchWait` may trust its wake-up before reading again; None when
    /// wake-ups cannot be lost.
    fn fallback_poll(&self) -> Option<Duration>;
}

/// The store a server was started with.
pub enum AnyStore {
    Redb(Store),
    Postgres(PgStore),
}

impl From<Store> for AnyStore {
    fn from(s: Store) -> AnyStore {
        AnyStore::Redb(s)
    }
}

impl From<PgStore> for AnyStore {
    fn from(s: PgStore) -> AnyStore {
        AnyStore::Postgres(s)
    }
}

impl AnyStore {
    /// Bytes of queued messages as the storage quota counts them (redb only: PostgreSQL keeps
    /// the total in shards, read by its own queries).
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Redb(s) => s.stored_bytes(),
            AnyStore::Postgres(_) => {
                Err(StoreError::Unavailable("stored bytes are only counted here for redb".into()))
            }
        }
    }

    /// Finishes every write already submitted, then closes the store.
    pub fn close(self) -> Result<(), StoreError> {
        match self {
            AnyStore::Redb(s) => s.close(),
            AnyStore::Postgres(s) => {
                s.close();
                Ok(())
            }
        }
    }
}

impl DeliveryStore for AnyStore {
    async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        match self {
            AnyStore::Redb(s) => s.write(op).await,
            AnyStore::Postgres(s) => s.write(op).await,
        }
    }

    async fn fetch(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
        room: &mut dyn FnMut(usize) -> bool,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        match self {
            AnyStore::Redb(s) => DeliveryStore::fetch(s, who, after, limit, max_bytes, room).await,
            AnyStore::Postgres(s) => DeliveryStore::fetch(s, who, after, limit, max_bytes, room).await,
        }
    }

    async fn key_package_count(&self, who: &IdentityKey, now: u64) -> Result<(u64, bool), StoreError> {
        match self {
            AnyStore::Redb(s) => DeliveryStore::key_package_count(s, who, now).await,
            AnyStore::Postgres(s) => DeliveryStore::key_package_count(s, who, now).await,
        }
    }

    async fn hybrid_key(&self, who: &IdentityKey) -> Result<Option<SignedHybridKey>, StoreError> {
        match self {
            AnyStore::Redb(s) => DeliveryStore::hybrid_key(s, who).await,
            AnyStore::Postgres(s) => DeliveryStore::hybrid_key(s, who).await,
        }
    }

    fn instance_id(&self) -> u64 {
        match self {
            AnyStore::Redb(s) => s.instance_id(),
            AnyStore::Postgres(s) => s.instance_id(),
        }
    }

    fn deletion_clock(&self) -> &crate::clock::DeletionClock {
        match self {
            AnyStore::Redb(s) => s.deletion_clock(),
            AnyStore::Postgres(s) => s.deletion_clock(),
        }
    }

    fn notifier(&self) -> &Arc<Notifier> {
        match self {
            AnyStore::Redb(s) => s.notifier(),
            AnyStore::Postgres(s) => s.notifier(),
        }
    }

    fn commit_count(&self) -> u64 {
        match self {
            AnyStore::Redb(s) => s.commit_count(),
            AnyStore::Postgres(s) => s.commit_count(),
        }
    }

    fn fallback_poll(&self) -> Option<Duration> {
        match self {
            AnyStore::Redb(s) => s.fallback_poll(),
            AnyStore::Postgres(s) => s.fallback_poll(),
        }
    }
}

/// The redb store: reads run on the caller's thread (a redb read transaction takes
/// microseconds), writes go to its group-commit writer thread.
impl DeliveryStore for Store {
    async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        Store::write(self, op).await
    }

    async fn fetch(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
        room: &mut dyn FnMut(usize) -> bool,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        self.fetch_within_at(who, after, limit, max_bytes, self.expired_by(), room)
    }

    async fn key_package_count(&self, who: &IdentityKey, now: u64) -> Result<(u64, bool), StoreError> {
        Store::key_package_count(self, who, now)
    }

    async fn hybrid_key(&self, who: &IdentityKey) -> Result<Option<SignedHybridKey>, StoreError> {
        Store::hybrid_key(self, who)
    }

    fn instance_id(&self) -> u64 {
        Store::instance_id(self)
    }

    fn deletion_clock(&self) -> &crate::clock::DeletionClock {
        Store::deletion_clock(self)
    }

    fn notifier(&self) -> &Arc<Notifier> {
        Store::notifier(self)
    }

    fn commit_count(&self) -> u64 {
        Store::commit_count(self)
    }

    fn fallback_poll(&self) -> Option<Duration> {
        // The writer wakes waiters in this process after every commit; nothing is lost.
        None
    }
}
