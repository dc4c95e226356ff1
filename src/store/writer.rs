//! The single writer thread: group commit of every write request.
//!
//! Requests arrive on a channel. The thread takes the first, then every other request already
//! waiting (up to [`limits::MAX_WRITE_BATCH`]), applies them all in one redb write transaction and
//! commits once with `Durability::Immediate`. Only then does each caller get its reply, so an
//! acknowledged write is on disk, and under load many requests share one fsync. A batch that
//! changed nothing (refused enqueues, acks that found nothing) is aborted instead: redb's
//! durable commit fsyncs even then.
//!
//! A request that breaks a limit (queue full, pool full) fails alone: each request checks every
//! limit before it writes anything, so it leaves no partial effect in the shared transaction. A
//! storage error (a damaged row, a failed write) or a panic fails the whole batch, which is then
//! not committed, and runs again one request per transaction, so that only the request that met
//! the error fails (as on PostgreSQL): one recipient's damaged row must not refuse everyone's
//! mail that happened to share its batch.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableTable, WriteTransaction};
use tokio::sync::oneshot;

use super::keys::Keys;
use super::notifier::Committed;
use super::{
    CHANNEL_SEQ_FLOOR, CHANNELS, DELETION_MARK, DELETION_MARK_WALL, IdentityKey, KeyPackageEntry, META,
    NEXT_PAYLOAD_ID, Notifier, PAYLOAD_REFS, PAYLOADS, QUEUE, QUEUE_META, QueueLimits, QueueValue, SEQ_FLOOR,
    STORED_BYTES, StoreError, StoredMessage, queue_key, split_payload_row,
};
use crate::clock::Clock;
use crate::crypto::hybrid::SignedHybridKey;
use crate::limits;

/// One write request.
#[derive(Debug)]
pub enum WriteOp {
    /// Store each payload for its recipient; one shared channel position when `channel` is set.
    Enqueue { channel: Vec<u8>, items: Vec<(IdentityKey, Vec<u8>)> },
    /// Store one payload once for every recipient (distinct keys) whose queue can take it; one
    /// shared channel position when `channel` is set. Answered with [`Outcome::Enqueued`], seqs
    /// in `recipients` order, 0 for a recipient skipped because its queue is full (real seqs
    /// start at 1); refused with [`StoreError::QueueFull`] when every queue is full, or when
    /// the queue of `required` (one of `recipients`, checked by the RPC layer) is: a recipient
    /// that must not be skipped (a committer's own copy, see `enqueueFanout` in the schema).
    Fanout { channel: Vec<u8>, payload: Vec<u8>, recipients: Vec<IdentityKey>, required: Option<IdentityKey> },
    /// Delete `who`'s messages with seq <= `up_to`.
    Ack { who: IdentityKey, up_to: u64 },
    /// Add single-use KeyPackages and optionally replace the last-resort one (already validated
    /// as of `now`, unix seconds); `who`'s expired packages are deleted first.
    UploadKeyPackages {
        who: IdentityKey,
        packages: Vec<KeyPackageEntry>,
        last_resort: Option<KeyPackageEntry>,
        now: u64,
    },
    /// Remove and return one KeyPackage of `who` valid at `now` (unix seconds), or its
    /// last-resort one if that is still valid; expired ones met on the way are deleted.
    TakeKeyPackage { who: IdentityKey, now: u64 },
    /// Delete KeyPackages (single-use or last-resort) expired at `now` (unix seconds), oldest
    /// first, at most [`limits::SWEEP_SLICE_ROWS`] per call (see [`Outcome::KeyPackagesExpired`]).
    ExpireKeyPackages { now: u64 },
    /// Replace `who`'s hybrid key (signature already verified).
    PutHybridKey { who: IdentityKey, signed: SignedHybridKey },
    /// Delete messages that have expired as of `now_ms` (ms since the Unix epoch), and rows too
    /// damaged to deliver, among at most [`limits::SWEEP_SLICE_ROWS`] queue rows after the key
    /// `after` (empty: from the start). One slice keeps the transaction, and so every commit
    /// waiting behind it, short. The PostgreSQL store resumes its entries with an empty `after`
    /// (each slice deletes the oldest expired entries through an index on their age, so what it
    /// deleted is its cursor, and nodes sweeping at once skip each other's rows), and its idle
    /// channel rows, last, after the channel id `after` names.
    Sweep { now_ms: u64, after: Vec<u8> },
}

/// The durable result of one [`WriteOp`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Enqueued {
        channel_seq: u64,
        seqs: Vec<u64>,
    },
    Acked {
        removed: u32,
    },
    KeyPackagesStored {
        count: u64,
    },
    KeyPackage {
        bytes: Vec<u8>,
        remaining: u64,
        last_resort: bool,
    },
    /// `more`: a full slice was deleted; another may find more expired packages.
    KeyPackagesExpired {
        removed: u64,
        more: bool,
    },
    HybridKeyStored,
    /// `resume`: the key to pass as `after` for the next slice; None when the table is done.
    Swept {
        removed: u64,
        resume: Option<Vec<u8>>,
    },
}

type Reply = oneshot::Sender<Result<Outcome, StoreError>>;

/// The submitting side of the writer thread.
pub(super) struct WriterHandle {
    tx: Mutex<Option<mpsc::Sender<(WriteOp, Reply)>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Write transactions committed so far (one fsync each; a batch that changed nothing is
    /// aborted and not counted); read by `qpq bench`.
    commits: Arc<AtomicU64>,
}

impl WriterHandle {
    /// Write transactions committed since the writer started.
    pub(super) fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub(super) async fn submit(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let tx = guard.as_ref().ok_or(StoreError::Closed)?;
            tx.send((op, reply_tx)).map_err(|_| StoreError::Closed)?;
        }
        reply_rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Closes the queue and waits until every request already in it is committed and answered.
    pub(super) fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(super) fn spawn(
    db: Arc<Database>,
    notifier: Arc<Notifier>,
    limits: QueueLimits,
    clock: Clock,
    deletion: Arc<crate::clock::DeletionClock>,
) -> Result<WriterHandle, StoreError> {
    let (tx, rx) = mpsc::channel::<(WriteOp, Reply)>();
    let commits = Arc::new(AtomicU64::new(0));
    let counter = commits.clone();
    let thread = std::thread::Builder::new()
        .name("qpq-store-writer".into())
        .spawn(move || run(&db, &notifier, limits, (&clock, &deletion), &counter, rx))
        .map_err(|e| StoreError::Db(format!("cannot start writer thread: {e}")))?;
    Ok(WriterHandle { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), commits })
}

fn run(
    db: &Database,
    notifier: &Notifier,
    limits: QueueLimits,
    (clock, deletion): (&Clock, &crate::clock::DeletionClock),
    commits: &AtomicU64,
    rx: mpsc::Receiver<(WriteOp, Reply)>,
) {
    // `deletion`: what a full queue's expired head is judged by (see `expire_head`): not a
    // step forward of the clock, even one made while the server was stopped, as for the sweep.
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < limits::MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let now = Now { ms: clock.now_ms(), expire_by: deletion.now().0 };
        let outcomes = match commit(db, notifier, limits, now, commits, &jobs) {
            Ok(outcomes) => outcomes,
            Err(e) if jobs.len() > 1 => {
                tracing::warn!(error = %e, batch = jobs.len(), "write batch failed; running its requests one by one");
                (0..jobs.len())
                    .map(|i| match commit(db, notifier, limits, now, commits, &jobs[i..=i]) {
                        // One outcome per job: `apply_batch` pushes one for each.
                        Ok(mut one) => one.pop().unwrap_or_else(|| Err(StoreError::Db("no outcome".into()))),
                        Err(e) => Err(e),
                    })
                    .collect()
            }
            Err(e) => {
                tracing::error!(error = %e, "write failed, nothing committed");
                jobs.iter().map(|_| Err(StoreError::Db(e.to_string()))).collect()
            }
        };
        for ((_, reply), out) in jobs.into_iter().zip(outcomes) {
            let _ = reply.send(out);
        }
    }
}

/// Applies `jobs` in one transaction, commits it durably (unless it changed nothing) and hands
/// its messages to parked fetchWaits; an error means nothing was committed.
fn commit(
    db: &Database,
    notifier: &Notifier,
    limits: QueueLimits,
    now: Now,
    commits: &AtomicU64,
    jobs: &[(WriteOp, Reply)],
) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
    // The messages this batch commits, handed to parked fetchWaits once it is durable.
    let mut woken: Vec<Committed<'_>> = Vec::new();
    // A panic while applying (a bug meeting data we did not foresee) fails this batch only:
    // the thread lives on and serves the next one. The transaction is dropped uncommitted.
    let (outcomes, committed) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        apply_batch(db, limits, now, jobs, &mut woken)
    }))
    .unwrap_or_else(|_| Err(StoreError::Db("write batch panicked".to_string())))?;
    if committed {
        commits.fetch_add(1, Ordering::Relaxed);
        notifier.hand(&woken);
    }
    Ok(outcomes)
}

/// The delivery tables of one write transaction, opened once per batch: opening a redb table
/// looks its name up in the table tree and allocates, and dropping it stages its root again, so
/// an `ack` that opened each table where it needed it paid that about ten times.
struct Delivery<'txn> {
    queue: redb::Table<'txn, &'static [u8], &'static [u8]>,
    queue_meta: redb::Table<'txn, &'static [u8], (u64, u64, u64)>,
    channels: redb::Table<'txn, &'static [u8], (u64, u64)>,
    payloads: redb::Table<'txn, u64, &'static [u8]>,
    payload_refs: redb::Table<'txn, u64, u64>,
    meta: redb::Table<'txn, &'static str, u64>,
    /// Whether expired mail was deleted to make room ([`expire_head`]): that stands even when
    /// the request that did it is refused, so the batch must commit.
    purged: bool,
    /// The time [`expire_head`] judges age by ([`Now::expire_by`]).
    expire_by: u64,
}

/// A write batch's times (ms since the epoch): `ms` stamps and ages what it writes; `expire_by`
/// is what deleting expired mail to make room goes by, the store's
/// [`crate::clock::DeletionClock`]: `ms`, but not a step forward of the clock.
#[derive(Clone, Copy)]
struct Now {
    ms: u64,
    expire_by: u64,
}

impl Now {
    /// Whole seconds the clock is ahead of the deletion clock: what a time to delete keys by,
    /// judged by this clock, is moved back by.
    fn ahead_secs(self) -> u64 {
        self.ms.saturating_sub(self.expire_by) / 1000
    }
}

impl<'txn> Delivery<'txn> {
    fn open(txn: &'txn WriteTransaction, expire_by: u64) -> Result<Delivery<'txn>, StoreError> {
        Ok(Delivery {
            queue: txn.open_table(QUEUE)?,
            queue_meta: txn.open_table(QUEUE_META)?,
            channels: txn.open_table(CHANNELS)?,
            payloads: txn.open_table(PAYLOADS)?,
            payload_refs: txn.open_table(PAYLOAD_REFS)?,
            meta: txn.open_table(META)?,
            purged: false,
            expire_by,
        })
    }

    /// A `meta` counter (0 when absent).
    fn counter(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.meta.get(name)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Raises a `meta` floor to at least `value`.
    fn raise_floor(&mut self, name: &str, value: u64) -> Result<(), StoreError> {
        if value > self.counter(name)? {
            self.meta.insert(name, value)?;
        }
        Ok(())
    }

    /// `who`'s queue as (next seq, messages, bytes); a queue without a row starts at
    /// `seq_floor` (see the store's invariant).
    fn queue_state(&self, who: &IdentityKey, seq_floor: u64) -> Result<(u64, u64, u64), StoreError> {
        Ok(self.queue_meta.get(&who[..])?.map(|g| g.value()).unwrap_or((seq_floor, 0, 0)))
    }

    /// The next position on `channel` (0 for none), which `added` new queue entries share.
    fn next_channel_seq(&mut self, channel: &[u8], added: u64) -> Result<u64, StoreError> {
        if channel.is_empty() {
            return Ok(0);
        }
        let floor = self.counter(CHANNEL_SEQ_FLOOR)?;
        let (last, queued) = self.channels.get(channel)?.map(|g| g.value()).unwrap_or((floor, 0));
        let next = last + 1;
        self.channels.insert(channel, (next, queued + added))?;
        Ok(next)
    }
}

/// Applies every job in one transaction and commits it durably, unless no job changed
/// anything: then it is aborted, and the flag returned with the outcomes is false. The outer
/// error aborts all.
fn apply_batch<'a>(
    db: &Database,
    limits: QueueLimits,
    now: Now,
    jobs: &'a [(WriteOp, Reply)],
    woken: &mut Vec<Committed<'a>>,
) -> Result<(Vec<Result<Outcome, StoreError>>, bool), StoreError> {
    let now_ms = now.ms;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut changed = false;
    {
        let mut d = Delivery::open(&txn, now.expire_by)?;
        for (op, _) in jobs {
            let out = match op {
                WriteOp::Enqueue { channel, items } => enqueue(&mut d, limits, now_ms, channel, items, woken),
                WriteOp::Fanout { channel, payload, recipients, required } => {
                    let to = Recipients { all: recipients, required: required.as_ref() };
                    fanout(&mut d, limits, now_ms, channel, payload, to, woken)
                }
                WriteOp::Ack { who, up_to } => ack(&mut d, who, *up_to),
                WriteOp::UploadKeyPackages { who, packages, last_resort, now } => {
                    Keys::open(&txn, &mut d.meta)
                        .and_then(|mut k| k.upload(limits, who, packages, last_resort.as_ref(), *now))
                }
                WriteOp::TakeKeyPackage { who, now: at } => {
                    let expire_by = at.saturating_sub(now.ahead_secs());
                    Keys::open(&txn, &mut d.meta).and_then(|mut k| k.take(who, *at, expire_by))
                }
                WriteOp::ExpireKeyPackages { now } => {
                    Keys::open(&txn, &mut d.meta).and_then(|mut k| k.expire(*now))
                }
                WriteOp::PutHybridKey { who, signed } => {
                    Keys::open(&txn, &mut d.meta).and_then(|mut k| k.put_hybrid(limits, who, signed))
                }
                WriteOp::Sweep { now_ms, after } => sweep(&mut d, limits, (*now_ms, now.ms), after),
            };
            changed |= !left_unchanged(op, &out);
            match out {
                Err(StoreError::Db(e)) => return Err(StoreError::Db(e)),
                other => outcomes.push(other),
            }
        }
        changed |= d.purged;
    }
    if !changed {
        // Nothing to make durable: a redb commit fsyncs even when nothing changed, and every
        // write waiting behind this batch would wait for that fsync too.
        txn.abort()?;
        return Ok((outcomes, false));
    }
    txn.commit()?;
    Ok((outcomes, true))
}

/// Whether `op`, answered `out`, certainly wrote nothing: an enqueue or fanout checks every
/// limit before it writes, so a refused one wrote nothing (but for expired mail it deleted,
/// which [`Delivery::purged`] tells); an ack that removed nothing wrote
/// nothing. Anything else may have written (a refused KeyPackage take still deletes the
/// expired packages it met).
fn left_unchanged(op: &WriteOp, out: &Result<Outcome, StoreError>) -> bool {
    matches!(
        (op, out),
        (WriteOp::Enqueue { .. } | WriteOp::Fanout { .. }, Err(_))
            | (WriteOp::Ack { .. }, Ok(Outcome::Acked { removed: 0 }))
    )
}

fn enqueue<'a>(
    d: &mut Delivery<'_>,
    limits: QueueLimits,
    now: u64,
    channel: &'a [u8],
    items: &'a [(IdentityKey, Vec<u8>)],
    woken: &mut Vec<Committed<'a>>,
) -> Result<Outcome, StoreError> {
    // A queue without a row starts above every seq it may have had (see the store's invariant).
    let mut seq_floor = d.counter(SEQ_FLOOR)?.max(1);
    // Check every recipient's cap first (several items may share a recipient), write after.
    let mut planned: HashMap<IdentityKey, (u64, u64, u64)> = HashMap::new();
    let mut adding = 0u64;
    let mut purges = limits::EXPIRED_HEAD_QUEUES;
    for (who, payload) in items {
        let add = StoredMessage::accounted_len(17 + channel.len() + payload.len());
        let entry = match planned.get(who) {
            Some(e) => *e,
            None => {
                let state = d.queue_state(who, seq_floor)?;
                match queue_full(limits, state.1, state.2, add) {
                    Some(_) => match expire_head(d, limits, who, &mut purges)? {
                        Some(fresh) => {
                            seq_floor = fresh.floor;
                            fresh.state
                        }
                        None => state,
                    },
                    None => state,
                }
            }
        };
        let (next, count, bytes) = entry;
        if let Some(full) = queue_full(limits, count, bytes, add) {
            return Err(full);
        }
        planned.insert(*who, (next, count + 1, bytes + add));
        adding += add;
    }
    let used = d.counter(STORED_BYTES)?;
    if used.saturating_add(adding) > limits.max_stored_bytes {
        return Err(StoreError::OverQuota { used, adding, max: limits.max_stored_bytes });
    }
    d.meta.insert(STORED_BYTES, used.saturating_add(adding))?;
    let channel_seq = d.next_channel_seq(channel, items.len() as u64)?;
    let mut seqs = Vec::with_capacity(items.len());
    let mut next_seq: HashMap<IdentityKey, u64> = HashMap::new();
    for (who, payload) in items {
        let seq = match next_seq.get(who) {
            Some(s) => *s,
            None => planned.get(who).map(|p| p.0).unwrap_or(seq_floor),
        };
        let value = StoredMessage::encode_value(now, channel_seq, channel, payload);
        d.queue.insert(&queue_key(who, seq)[..], &value[..])?;
        next_seq.insert(*who, seq + 1);
        seqs.push(seq);
        woken.push(Committed { to: *who, seq, enqueued_at_ms: now, channel_seq, channel, payload });
    }
    for (who, (_, count, bytes)) in planned {
        let next = next_seq.get(&who).copied().unwrap_or(seq_floor);
        d.queue_meta.insert(&who[..], (next, count, bytes))?;
    }
    Ok(Outcome::Enqueued { channel_seq, seqs })
}

/// Whom a fanout is for: `all` (distinct keys, in request order), and the one of them whose
/// full queue refuses the whole fanout instead of being skipped.
struct Recipients<'r> {
    all: &'r [IdentityKey],
    required: Option<&'r IdentityKey>,
}

/// One payload stored once in `payloads`, with a shared `queue` entry per recipient. Each
/// recipient's caps are charged the whole entry (what it will fetch); the storage quota is
/// charged the row once plus [`limits::FANOUT_ENTRY_BYTES`] per stored entry (what the file
/// holds). A recipient whose queue cannot take the entry is skipped (seq 0) and the others still
/// get it: one full queue must not refuse a whole group's mail (see `enqueueFanout` in the
/// schema). Only when every recipient is skipped, or the required one would be, is the fanout
/// refused, storing nothing.
fn fanout<'a>(
    d: &mut Delivery<'_>,
    limits: QueueLimits,
    now: u64,
    channel: &'a [u8],
    payload: &'a [u8],
    to: Recipients<'_>,
    woken: &mut Vec<Committed<'a>>,
) -> Result<Outcome, StoreError> {
    let recipients = to.all;
    if recipients.is_empty() {
        // Nothing to store (the RPC layer refuses this); a row without refs would never go.
        return Ok(Outcome::Enqueued { channel_seq: 0, seqs: Vec::new() });
    }
    // The inline encoding's length: what each recipient will fetch, and the row's body.
    let entry_len = 17 + channel.len() + payload.len();
    let charge = StoredMessage::accounted_len(entry_len);
    let mut seq_floor = d.counter(SEQ_FLOOR)?.max(1);
    let mut purges = limits::EXPIRED_HEAD_QUEUES;
    // `who`'s queue, with the expired mail at its head deleted first when it has no room.
    let mut room_in = |d: &mut Delivery<'_>, who: &IdentityKey| -> Result<(u64, u64, u64), StoreError> {
        let state = d.queue_state(who, seq_floor)?;
        if queue_full(limits, state.1, state.2, charge).is_none() {
            return Ok(state);
        }
        Ok(match expire_head(d, limits, who, &mut purges)? {
            Some(fresh) => {
                seq_floor = fresh.floor;
                fresh.state
            }
            None => state,
        })
    };
    // The required recipient first: when its queue is full the fanout is refused, so the other
    // queues need not be looked at. Checked in the loop below instead, a stranger naming
    // 9,999 fresh keys and then a queue it had filled cost the writer 10,000 lookups a call.
    if let Some(required) = to.required {
        let (_, count, bytes) = room_in(d, required)?;
        if let Some(full) = queue_full(limits, count, bytes, charge) {
            return Err(full);
        }
    }
    let mut seen: HashMap<IdentityKey, usize> = HashMap::with_capacity(recipients.len());
    // Per recipient: its queue's new (next_seq, count, bytes), or None when it is skipped.
    let mut planned = Vec::with_capacity(recipients.len());
    let mut first_full = None;
    for (i, who) in recipients.iter().enumerate() {
        if let Some(first) = seen.insert(*who, i) {
            return Err(StoreError::DuplicateRecipient { first, again: i });
        }
        // The required one has room (checked above; recipients are distinct, so nothing
        // before it in this loop changed its queue).
        let (next, count, bytes) = room_in(d, who)?;
        match queue_full(limits, count, bytes, charge) {
            Some(full) => {
                first_full.get_or_insert(full);
                planned.push(None);
            }
            None => planned.push(Some((next, count + 1, bytes + charge))),
        }
    }
    let n = planned.iter().flatten().count() as u64;
    if n == 0 {
        // Every queue is full (recipients is not empty, so one refusal was kept).
        return Err(first_full.unwrap_or(StoreError::Db("fanout: no recipient checked".to_string())));
    }
    let row_len = 8 + entry_len as u64;
    let adding = row_len.saturating_add(n.saturating_mul(limits::FANOUT_ENTRY_BYTES));
    let used = d.counter(STORED_BYTES)?;
    if used.saturating_add(adding) > limits.max_stored_bytes {
        return Err(StoreError::OverQuota { used, adding, max: limits.max_stored_bytes });
    }
    d.meta.insert(STORED_BYTES, used.saturating_add(adding))?;
    let channel_seq = d.next_channel_seq(channel, n)?;
    let id = d.counter(NEXT_PAYLOAD_ID)?.max(1);
    d.meta.insert(NEXT_PAYLOAD_ID, id + 1)?;
    // The row carries the channel position every entry shares, and refs for the stored ones.
    let mut row = Vec::with_capacity(8 + entry_len);
    row.extend_from_slice(&n.to_be_bytes());
    row.extend_from_slice(&StoredMessage::encode_value(now, channel_seq, channel, payload));
    d.payloads.insert(id, &row[..])?;
    let mut seqs = Vec::with_capacity(recipients.len());
    for (who, planned) in recipients.iter().zip(planned) {
        let Some((next, count, bytes)) = planned else {
            seqs.push(0);
            continue;
        };
        d.queue.insert(&queue_key(who, next)[..], &id.to_be_bytes()[..])?;
        d.queue_meta.insert(&who[..], (next + 1, count, bytes))?;
        seqs.push(next);
        woken.push(Committed { to: *who, seq: next, enqueued_at_ms: now, channel_seq, channel, payload });
    }
    Ok(Outcome::Enqueued { channel_seq, seqs })
}

/// The refusal of one more message of `add` bytes to a queue holding `count` messages and
/// `bytes` bytes, or None when it fits both caps (both stores' check).
pub(super) fn queue_full(limits: QueueLimits, count: u64, bytes: u64, add: u64) -> Option<StoreError> {
    if count.saturating_add(1) > limits.max_messages || bytes.saturating_add(add) > limits.max_bytes {
        return Some(StoreError::QueueFull {
            count,
            bytes,
            max_count: limits.max_messages,
            max_bytes: limits.max_bytes,
        });
    }
    None
}

/// What deleting queue rows takes off the metadata: per recipient (messages, bytes), per
/// channel messages, and bytes in all.
#[derive(Default)]
struct Released {
    recipients: HashMap<IdentityKey, (u64, u64)>,
    channels: HashMap<Vec<u8>, u64>,
    /// Refs dropped per `payloads` row.
    payloads: HashMap<u64, u64>,
    bytes: u64,
}

impl Released {
    /// Notes one deleted `queue` row; `shared` is the head of the entry a shared value points to
    /// (None when its payload row is missing). A value too damaged to name its channel counts
    /// for none.
    fn note(&mut self, who: Option<IdentityKey>, value: &[u8], shared: Option<&SharedHead>) {
        let (head, len) = match QueueValue::of(value) {
            QueueValue::Inline(v) => {
                self.bytes += StoredMessage::accounted_len(v.len());
                (v, v.len())
            }
            QueueValue::Shared(id) => {
                self.bytes += limits::FANOUT_ENTRY_BYTES;
                *self.payloads.entry(id).or_default() += 1;
                shared.map(|s| (&s.head[..], s.len)).unwrap_or_default()
            }
        };
        if let Some(who) = who {
            let e = self.recipients.entry(who).or_default();
            *e = (e.0 + 1, e.1 + StoredMessage::accounted_len(len));
        }
        if let Ok((_, _, channel, _)) = StoredMessage::parts(0, head)
            && !channel.is_empty()
        {
            *self.channels.entry(channel.to_vec()).or_default() += 1;
        }
    }

    /// Updates the counts; a queue or channel left with nothing is deleted and its number kept
    /// in the floor (the store's invariant).
    fn apply(self, d: &mut Delivery<'_>) -> Result<(), StoreError> {
        let mut seq_floor = 0;
        for (who, (n, bytes)) in self.recipients {
            let current = d.queue_meta.get(&who[..])?.map(|g| g.value());
            let Some((next, count, have)) = current else { continue };
            if count <= n {
                d.queue_meta.remove(&who[..])?;
                seq_floor = seq_floor.max(next);
            } else {
                d.queue_meta.insert(&who[..], (next, count - n, have.saturating_sub(bytes)))?;
            }
        }
        let mut channel_floor = 0;
        for (id, n) in self.channels {
            let current = d.channels.get(&id[..])?.map(|g| g.value());
            let Some((last, queued)) = current else { continue };
            if queued <= n {
                d.channels.remove(&id[..])?;
                channel_floor = channel_floor.max(last);
            } else {
                d.channels.insert(&id[..], (last, queued - n))?;
            }
        }
        let mut freed = self.bytes;
        // A payload goes with its last entry. Its row is read in place and never rewritten:
        // the count lives in `payload_refs` (absent: the row's own refs).
        for (id, n) in self.payloads {
            let stored = d.payloads.get(id)?.map(|g| {
                let row = g.value();
                (row.len() as u64, split_payload_row(row).map(|(refs, _)| refs))
            });
            let Some((row_len, own_refs)) = stored else { continue };
            let refs = match (d.payload_refs.get(id)?.map(|g| g.value()), own_refs) {
                (Some(refs), _) => refs,
                (None, Ok(refs)) => refs,
                // A row too short to hold its count (a damaged file): nothing can be read from
                // it, so it goes now. An error here failed every ack and sweep that met it, so
                // the sweep never passed it again and expired mail kept its quota for ever.
                (None, Err(e)) => {
                    tracing::warn!(error = %e, id, "deleting a damaged payload row");
                    0
                }
            };
            if refs <= n {
                d.payloads.remove(id)?;
                d.payload_refs.remove(id)?;
                freed += row_len;
            } else {
                d.payload_refs.insert(id, refs - n)?;
            }
        }
        d.raise_floor(SEQ_FLOOR, seq_floor)?;
        d.raise_floor(CHANNEL_SEQ_FLOOR, channel_floor)?;
        let stored = d.counter(STORED_BYTES)?;
        d.meta.insert(STORED_BYTES, stored.saturating_sub(freed))?;
        Ok(())
    }
}

/// A queue after [`expire_head`] made room in it, and the seq floor then (raised when its
/// queue row went with its last message).
struct Expired {
    state: (u64, u64, u64),
    floor: u64,
}

/// Deletes the expired messages at the head of `who`'s queue (at most
/// [`limits::EXPIRED_HEAD_ROWS`]; its oldest, since seqs are handed out in arrival order), so
/// that a queue full of mail past its TTL, hidden from `fetch` already, takes new mail before
/// the sweep comes round. Age is judged by [`Delivery::expire_by`] (the clock, but not a step
/// forward of it). `budget` counts the queues one request may still do this to. None when
/// nothing was deleted. Mirrors the sweep's test of age: a row stamped in the future, or
/// damaged, stops the walk (the sweep deals with it).
fn expire_head(
    d: &mut Delivery<'_>,
    limits: QueueLimits,
    who: &IdentityKey,
    budget: &mut usize,
) -> Result<Option<Expired>, StoreError> {
    if *budget == 0 {
        return Ok(None);
    }
    *budget -= 1;
    let now = d.expire_by;
    let start = queue_key(who, 0);
    let end = queue_key(who, u64::MAX);
    let mut doomed = Vec::new();
    let mut released = Released::default();
    let mut heads = HashMap::new();
    for entry in d.queue.range(&start[..]..=&end[..])?.take(limits::EXPIRED_HEAD_ROWS) {
        let (k, v) = entry?;
        let shared = shared_head(&d.payloads, &mut heads, v.value())?;
        match entry_enqueued_at(v.value(), shared) {
            Ok(at) if past_ttl(limits, at, now) => {}
            _ => break,
        }
        doomed.push(k.value().to_vec());
        released.note(Some(*who), v.value(), shared);
    }
    if doomed.is_empty() {
        return Ok(None);
    }
    for k in &doomed {
        d.queue.remove(&k[..])?;
    }
    released.apply(d)?;
    d.purged = true;
    let floor = d.counter(SEQ_FLOOR)?.max(1);
    Ok(Some(Expired { state: d.queue_state(who, floor)?, floor }))
}

fn ack(d: &mut Delivery<'_>, who: &IdentityKey, up_to: u64) -> Result<Outcome, StoreError> {
    let start = queue_key(who, 0);
    let end = queue_key(who, up_to);
    let mut doomed = Vec::new();
    let mut released = Released::default();
    let mut heads = HashMap::new();
    for entry in d.queue.range(&start[..]..=&end[..])? {
        let (k, v) = entry?;
        doomed.push(k.value().to_vec());
        let shared = shared_head(&d.payloads, &mut heads, v.value())?;
        released.note(Some(*who), v.value(), shared);
    }
    if doomed.is_empty() {
        return Ok(Outcome::Acked { removed: 0 });
    }
    for k in &doomed {
        d.queue.remove(&k[..])?;
    }
    released.apply(d)?;
    Ok(Outcome::Acked { removed: u32::try_from(doomed.len()).unwrap_or(u32::MAX) })
}

/// What deleting or aging a shared `queue` entry needs of the entry it points to: its start up
/// to the end of the channel id (time, channel position, channel) and its whole length.
/// Never the payload: a fanout's row can be MiBs with thousands of entries pointing at it, and
/// copying it per entry made one large fanout cost its size times its recipients on every
/// sweep pass.
struct SharedHead {
    head: Vec<u8>,
    len: usize,
}

/// The [`SharedHead`] a `queue` value points to, looked up once per payload row in `cache`
/// (None for an inline value or a missing row).
fn shared_head<'c>(
    payloads: &redb::Table<u64, &[u8]>,
    cache: &'c mut HashMap<u64, Option<SharedHead>>,
    value: &[u8],
) -> Result<Option<&'c SharedHead>, StoreError> {
    let QueueValue::Shared(id) = QueueValue::of(value) else { return Ok(None) };
    if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(id) {
        let head = payloads.get(id)?.and_then(|row| {
            let (_, entry) = split_payload_row(row.value()).ok()?;
            // time 8 ‖ channel_seq 8 ‖ channel length 1 ‖ channel: the longest head is 272.
            let channel_len = usize::from(*entry.get(16).unwrap_or(&0));
            let head_len = entry.len().min(17 + channel_len);
            Some(SharedHead { head: entry.get(..head_len).unwrap_or_default().to_vec(), len: entry.len() })
        });
        slot.insert(head);
    }
    Ok(cache.get(&id).and_then(Option::as_ref))
}

/// When the message of a `queue` value was enqueued: an inline value carries it, a shared one
/// ages with its payload row (`shared`, its head); one whose row is missing is damaged.
fn entry_enqueued_at(value: &[u8], shared: Option<&SharedHead>) -> Result<u64, StoreError> {
    match (QueueValue::of(value), shared) {
        (QueueValue::Inline(v), _) => StoredMessage::enqueued_at(v),
        (QueueValue::Shared(_), Some(s)) => StoredMessage::enqueued_at(&s.head),
        (QueueValue::Shared(id), None) => {
            Err(StoreError::Db(format!("shared entry of missing payload {id}")))
        }
    }
}

/// Raises `meta.deletion_mark` to `now` (ms), the time a sweep deletes by, and records the
/// clock's reading `wall` with it: a restarted server's deletion time resumes from them
/// ([`crate::clock::DeletionClock::resuming`]). Never lowered, so a sweep by a clock set back
/// does not undo it.
fn record_deletion_mark(
    meta: &mut redb::Table<'_, &'static str, u64>,
    now: u64,
    wall: u64,
) -> Result<(), StoreError> {
    let old = meta.get(DELETION_MARK)?.map(|g| g.value());
    if old.is_none_or(|old| old < now) {
        meta.insert(DELETION_MARK, now)?;
        meta.insert(DELETION_MARK_WALL, wall)?;
    }
    Ok(())
}

/// Whether a message enqueued at `at` has expired at `now` (and was not stamped in the future).
fn past_ttl(limits: QueueLimits, at: u64, now: u64) -> bool {
    at < now && now - at > limits.ttl_ms
}

/// One slice of the sweep by the deletion time `now` (the clock read `wall` then).
fn sweep(
    d: &mut Delivery<'_>,
    limits: QueueLimits,
    (now, wall): (u64, u64),
    after: &[u8],
) -> Result<Outcome, StoreError> {
    if after.is_empty() {
        record_deletion_mark(&mut d.meta, now, wall)?;
    }
    let mut doomed: Vec<Vec<u8>> = Vec::new();
    let mut released = Released::default();
    let mut heads = HashMap::new();
    let mut last: Option<Vec<u8>> = None;
    let mut scanned = 0usize;
    // Where the walk goes on from: after `after`, then past each queue found still young.
    let mut from: Option<Vec<u8>> = (!after.is_empty()).then(|| after.to_vec());
    'walk: loop {
        let range = match &from {
            None => d.queue.range::<&[u8]>(..)?,
            Some(k) => d.queue.range::<&[u8]>((Bound::Excluded(&k[..]), Bound::Unbounded))?,
        };
        for entry in range {
            let (k, v) = entry?;
            let (key, value) = (k.value(), v.value());
            scanned += 1;
            last = Some(key.to_vec());
            let shared = shared_head(&d.payloads, &mut heads, value)?;
            let enqueued_at = entry_enqueued_at(value, shared);
            // Some(who): young, so the rest of `who`'s queue is too (see the skip below).
            // Not stamped in the future either: after a clock that ran fast was set right,
            // such a row is kept but does not skip, or it would hold the walk off the expired
            // rows behind it (still counted in the caps and the quota) for as long as the clock
            // had been ahead.
            let (doomed_row, young_queue) = match (super::split_queue_key(key), enqueued_at) {
                (Ok((who, _)), Ok(at)) if at <= now && now - at <= limits.ttl_ms => (false, Some(who)),
                (Ok(_), Ok(at)) => (past_ttl(limits, at, now), None),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "sweep removes a damaged queue row");
                    (true, None)
                }
            };
            if doomed_row {
                doomed.push(key.to_vec());
                // A damaged key names no recipient whose counts we could trust; leave them alone.
                released.note(super::split_queue_key(key).ok().map(|(who, _)| who), value, shared);
            }
            if scanned >= limits::SWEEP_SLICE_ROWS {
                break 'walk;
            }
            if let Some(who) = young_queue {
                // A queue's seqs are handed out in the order its messages came, so the rest of
                // this queue came later and is younger still: go on at the next queue. Without
                // this skip every pass read every row (and, for a fanout's entry, its payload
                // row): all the mail stored, every ten minutes, in the writer. (After the clock
                // stepped back, a later message may carry an earlier time; it is swept once the
                // ones before it are gone, and fetches hide it from the moment it expires.)
                from = Some(super::queue_key(&who, u64::MAX).to_vec());
                continue 'walk;
            }
        }
        break;
    }
    let resume = if scanned >= limits::SWEEP_SLICE_ROWS { last } else { None };
    for k in &doomed {
        d.queue.remove(&k[..])?;
    }
    released.apply(d)?;
    Ok(Outcome::Swept { removed: doomed.len() as u64, resume })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::limits;
    use crate::store::{KEY_PACKAGES, Store};
    use redb::ReadableDatabase;

    /// Runs `ops` through the writer loop as one batch (all are waiting when it starts) and
    /// returns their answers in order.
    fn run_as_one_batch(db: &Database, ops: Vec<WriteOp>) -> Vec<Result<Outcome, StoreError>> {
        let (tx, rx) = mpsc::channel();
        let mut answers = Vec::new();
        for op in ops {
            let (reply, answer) = oneshot::channel();
            tx.send((op, reply)).unwrap();
            answers.push(answer);
        }
        drop(tx);
        let commits = AtomicU64::new(0);
        let deletion = crate::clock::DeletionClock::new(Clock::system());
        run(db, &Notifier::default(), limits(), (&Clock::system(), &deletion), &commits, rx);
        answers.into_iter().map(|mut a| a.try_recv().expect("every request is answered")).collect()
    }

    #[test]
    fn a_request_meeting_a_damaged_row_fails_alone_not_with_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        Store::open(&path, limits()).unwrap().close().unwrap();
        let (damaged, other) = ([5u8; 32], [6u8; 32]);
        let db = Database::open(&path).unwrap();
        {
            // A single-use KeyPackage row too short to hold its not_after.
            let txn = db.begin_write().unwrap();
            txn.open_table(KEY_PACKAGES)
                .unwrap()
                .insert(&queue_key(&damaged, 0)[..], &[1u8, 2, 3][..])
                .unwrap();
            txn.commit().unwrap();
        }
        let answers = run_as_one_batch(
            &db,
            vec![
                WriteOp::Enqueue { channel: Vec::new(), items: vec![(other, b"before".to_vec())] },
                WriteOp::TakeKeyPackage { who: damaged, now: 1 },
                WriteOp::Enqueue { channel: Vec::new(), items: vec![(other, b"after".to_vec())] },
            ],
        );
        assert!(matches!(answers[1], Err(StoreError::Db(_))), "{:?}", answers[1]);
        assert_eq!(answers[0].as_ref().ok(), Some(&Outcome::Enqueued { channel_seq: 0, seqs: vec![1] }));
        assert_eq!(answers[2].as_ref().ok(), Some(&Outcome::Enqueued { channel_seq: 0, seqs: vec![2] }));
        // Both are durable, in order.
        let txn = db.begin_read().unwrap();
        let queue = txn.open_table(QUEUE).unwrap();
        let start = queue_key(&other, 0);
        let end = queue_key(&other, u64::MAX);
        assert_eq!(queue.range(&start[..]..=&end[..]).unwrap().count(), 2);
    }
}
