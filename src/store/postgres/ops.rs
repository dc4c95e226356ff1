//! Each store operation as SQL inside one transaction (READ COMMITTED). Enqueues, fanouts and
//! acks normally go through the group commit ([`super::batch`]) instead; they come here only
//! when a batch failed with a database error and is run again one request at a time.
//!
//! Locking, so that nodes agree without talking to each other:
//! - An enqueue upserts and so row-locks its channel's `qpq_channels` row first (the counter
//!   that hands out `channelSeq`), then every recipient's `qpq_queues` row in key order, and
//!   holds them to commit: batches on one channel commit one after the other in `channelSeq`
//!   order, and a recipient's `seq` numbers are handed out in commit order, on any node.
//! - A KeyPackage is taken with `FOR UPDATE SKIP LOCKED` + `DELETE`: concurrent takers get
//!   different packages, never the same one.
//! - An upload takes a transaction-scoped advisory lock on its identity ([`identity_lock`])
//!   to check the pool cap.
//! - An ack locks its entries and its recipient's `qpq_queue_freed` row (schema version 3),
//!   never the `qpq_queues` row: acks and enqueues of one recipient do not wait for each other.
//! - The sweep, like an ack, counts what it deletes in the freed rows and locks queue rows
//!   only to delete empty ones (queue rows, then freed rows: the batches' order).
//! - Rare lock cycles (entries two statements delete in different orders) are PostgreSQL
//!   deadlocks; it aborts one side, which the caller runs again.
//!
//! Why the caps stay safe although an enqueue does not lock the freed rows: it locks its queue
//! rows first, then reads their freed rows in a later statement (so after every lock is held,
//! with a snapshot taken then) without locking. A queue holds `count − freed` (see
//! [`super::schema`]). `count` is exact: only lock holders change it. `freed` only grows while
//! the queue row exists, and only by entries `count` already counted; an ack that has not
//! committed yet is missed, so the queue looks fuller than it is: a borderline enqueue may be
//! refused, none is admitted over a cap. The freed row only shrinks when the sweep deletes it
//! together with its queue row (both locked, `count − freed` ≤ 0 rechecked under the locks);
//! an enqueue that then re-creates the queue row reads the freed row after the sweep committed,
//! so it never subtracts a freed count left from the deleted row.

/// Locks (creating when missing) each recipient's queue row of `$1` in the order given, which
/// callers sort by key so that concurrent transactions lock in one order: the enqueue path here
/// and the group commit ([`super::batch`]).
pub(super) const LOCK_QUEUE_ROWS: &str = "INSERT INTO qpq_queues (recipient, next_seq, count, bytes)
     SELECT r, 0, 0, 0 FROM unnest($1::bytea[]) WITH ORDINALITY AS t(r, o) ORDER BY o
     ON CONFLICT (recipient) DO UPDATE SET count = qpq_queues.count
     RETURNING recipient, next_seq, count, bytes";

/// Sets each queue row of the first placeholder to its new `next_seq` (the second), `count`
/// (the third) and `bytes` (the fourth): what an enqueue writes back to the rows it locked
/// with [`LOCK_QUEUE_ROWS`]. A macro so that the group commit's one write statement
/// ([`super::batch`]) says it with its own placeholders.
macro_rules! update_queue_rows {
    ($r:literal, $next:literal, $count:literal, $bytes:literal) => {
        concat!(
            "UPDATE qpq_queues q SET next_seq = u.next, count = u.count, bytes = u.bytes
             FROM unnest(",
            $r,
            "::bytea[], ",
            $next,
            "::bigint[], ",
            $count,
            "::bigint[], ",
            $bytes,
            "::bigint[]) AS u(r, next, count, bytes)
             WHERE q.recipient = u.r"
        )
    };
}
pub(super) use update_queue_rows;

/// [`update_queue_rows`] with `$1`–`$4`.
pub(super) const UPDATE_QUEUE_ROWS: &str = update_queue_rows!("$1", "$2", "$3", "$4");

/// Reads what acks freed from the queues of `$1` (no lock: see the module docs). Run after the
/// statement that locked those queue rows, never in it (its snapshot would predate the locks).
pub(super) const READ_FREED: &str =
    "SELECT recipient, count, bytes FROM qpq_queue_freed WHERE recipient = ANY($1::bytea[])";

/// Adds what acks removed (`$2` messages, `$3` bytes) to the freed rows of `$1`, creating them
/// when missing; callers sort `$1` by key so that concurrent acks lock in one order.
pub(super) const ADD_FREED: &str = "INSERT INTO qpq_queue_freed (recipient, count, bytes)
     SELECT r, n, b FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS t(r, n, b, o)
     ORDER BY o
     ON CONFLICT (recipient) DO UPDATE SET count = qpq_queue_freed.count + excluded.count,
                                           bytes = qpq_queue_freed.bytes + excluded.bytes";

use std::collections::HashMap;

use deadpool_postgres::{Object, Transaction};

use super::{TxError, mail};
use crate::crypto::hybrid::SignedHybridKey;
use crate::limits;
use crate::store::keys::charge;
use crate::store::{
    IdentityKey, KeyPackageEntry, Outcome, QueueLimits, StoreError, WriteOp, decode_hybrid_key,
    encode_hybrid_key,
};

/// Shards of the stored-bytes total (each connection adds to `pg_backend_pid() % SHARDS`).
pub(super) const STORED_BYTES_SHARDS: i32 = 64;

/// A u64 as PostgreSQL's bigint, saturating (numbers past i64::MAX never occur in practice).
pub(super) fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bigint column that holds a count or number as u64 (negative ones read as 0).
pub(super) fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn identity(v: &[u8]) -> Result<IdentityKey, TxError> {
    v.try_into().map_err(|_| TxError::Store(StoreError::Db(format!("corrupt identity of {} bytes", v.len()))))
}

/// Applies `op` at `now_ms` (an enqueue deletes a full queue's expired head by `expiry`). The
/// outer error rolls the transaction back (a refused enqueue or upload, a database error); the
/// inner result is what the caller gets once it commits.
pub(super) async fn apply(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    (now_ms, expiry): (u64, mail::Expiry<'_>),
    op: &WriteOp,
    woken: &mut Vec<IdentityKey>,
) -> Result<Result<Outcome, StoreError>, TxError> {
    match op {
        WriteOp::Enqueue { channel, items } => {
            let items: Vec<(&IdentityKey, &[u8])> = items.iter().map(|(w, p)| (w, &p[..])).collect();
            enqueue(tx, limits, (now_ms, expiry), channel, Stored::Each, &items, woken).await.map(Ok)
        }
        // One payload row shared by every recipient's entry (see `mail`).
        WriteOp::Fanout { channel, payload, recipients, required } => {
            let mut seen = std::collections::HashMap::with_capacity(recipients.len());
            for (i, who) in recipients.iter().enumerate() {
                if let Some(first) = seen.insert(*who, i) {
                    return Ok(Err(StoreError::DuplicateRecipient { first, again: i }));
                }
            }
            let items: Vec<(&IdentityKey, &[u8])> = recipients.iter().map(|w| (w, &payload[..])).collect();
            let stored = Stored::Shared { required: required.as_ref() };
            enqueue(tx, limits, (now_ms, expiry), channel, stored, &items, woken).await.map(Ok)
        }
        WriteOp::Ack { who, up_to } => ack(tx, who, *up_to).await.map(Ok),
        WriteOp::UploadKeyPackages { who, packages, last_resort, now } => {
            upload_key_packages(tx, limits, who, packages, last_resort.as_ref(), *now).await.map(Ok)
        }
        WriteOp::TakeKeyPackage { who, now } => {
            // Deletes what expired by the deletion clock only (see `take_key_package`).
            let ahead_secs = now_ms.saturating_sub(expiry.by) / 1000;
            take_key_package(tx, who, *now, now.saturating_sub(ahead_secs)).await
        }
        WriteOp::ExpireKeyPackages { now } => expire_key_packages(tx, *now).await.map(Ok),
        WriteOp::PutHybridKey { who, signed } => put_hybrid_key(tx, limits, who, signed).await,
        WriteOp::Sweep { now_ms: by, after } => sweep(tx, limits, (*by, now_ms), after).await.map(Ok),
    }
}

async fn meta_value(tx: &Transaction<'_>, name: &str) -> Result<i64, TxError> {
    let row = tx.query_opt("SELECT value FROM qpq_meta WHERE name = $1", &[&name]).await?;
    Ok(row.map(|r| r.get(0)).unwrap_or(0))
}

/// The statement that adds `$2` to this connection's shard (of `$1`) of the sharded total
/// `$table`.
macro_rules! shard_upsert {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " (shard, bytes) VALUES (pg_backend_pid() % $1, $2)
             ON CONFLICT (shard) DO UPDATE SET bytes = ",
            $table,
            ".bytes + excluded.bytes"
        )
    };
}

/// Adds `delta` bytes to this connection's shard of the stored-bytes total.
async fn add_stored_bytes(tx: &Transaction<'_>, delta: i64) -> Result<(), TxError> {
    add_to_shard(tx, shard_upsert!("qpq_stored_bytes"), delta).await
}

/// Adds `delta` to this connection's shard of a sharded total with `upsert`, a statement of
/// (shards, delta); nothing for 0.
async fn add_to_shard(tx: &Transaction<'_>, upsert: &str, delta: i64) -> Result<(), TxError> {
    if delta == 0 {
        return Ok(());
    }
    let stmt = tx.prepare_cached(upsert).await?;
    tx.execute(&stmt, &[&STORED_BYTES_SHARDS, &delta]).await?;
    Ok(())
}

/// How [`enqueue`] stores its items.
#[derive(Clone, Copy)]
enum Stored<'r> {
    /// Each item its own payload, for every recipient or none (`Enqueue`).
    Each,
    /// One payload shared by distinct recipients, skipping full queues other than
    /// `required`'s (`Fanout`).
    Shared { required: Option<&'r IdentityKey> },
}

async fn enqueue(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    (now, expiry): (u64, mail::Expiry<'_>),
    channel: &[u8],
    stored: Stored<'_>,
    items: &[(&IdentityKey, &[u8])],
    woken: &mut Vec<IdentityKey>,
) -> Result<Outcome, TxError> {
    let shared = matches!(stored, Stored::Shared { .. });
    let now_i = big(now);
    // The channel row first (see the module docs for the lock order).
    let channel_seq = if channel.is_empty() {
        0
    } else {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO qpq_channels (id, last_seq, touched_ms) VALUES ($1, 0, $2)
                 ON CONFLICT (id) DO UPDATE SET touched_ms = excluded.touched_ms RETURNING last_seq",
            )
            .await?;
        let last: i64 = tx.query_one(&stmt, &[&channel, &now_i]).await?.get(0);
        // 0: created just now; a new row counts on from the floor (the schema's invariant).
        let base = if last == 0 { meta_value(tx, "channel_seq_floor").await? } else { last };
        let next = base.saturating_add(1);
        let stmt = tx.prepare_cached("UPDATE qpq_channels SET last_seq = $2 WHERE id = $1").await?;
        tx.execute(&stmt, &[&channel, &next]).await?;
        next
    };
    // Lock every recipient's queue row, in key order.
    let mut recipients: Vec<IdentityKey> = items.iter().map(|(w, _)| **w).collect();
    recipients.sort_unstable();
    recipients.dedup();
    let keys: Vec<&[u8]> = recipients.iter().map(|r| &r[..]).collect();
    let stmt = tx.prepare_cached(LOCK_QUEUE_ROWS).await?;
    let rows = tx.query(&stmt, &[&keys]).await?;
    let mut fresh_floor = None;
    // recipient -> (next seq, count, bytes), in key order.
    let mut state: Vec<(IdentityKey, i64, i64, i64)> = Vec::with_capacity(rows.len());
    for row in rows {
        let who = identity(row.get(0))?;
        let mut next: i64 = row.get(1);
        if next == 0 {
            let floor = match fresh_floor {
                Some(f) => f,
                None => {
                    let f = meta_value(tx, "seq_floor").await?.max(1);
                    fresh_floor = Some(f);
                    f
                }
            };
            next = floor;
        }
        state.push((who, next, row.get(2), row.get(3)));
    }
    state.sort_unstable_by_key(|s| s.0);
    // A statement of its own, after the locks (see the module docs).
    let stmt = tx.prepare_cached(READ_FREED).await?;
    let mut freed = read_freed(tx.query(&stmt, &[&keys]).await?)?;
    // The queues this would overflow lose the expired mail at their heads first (as in the
    // group commit: see `mail::EXPIRE_HEADS`).
    let held = |who: &IdentityKey| {
        let i = state.binary_search_by_key(who, |s| s.0).ok()?;
        let (fc, fb) = freed.get(who).copied().unwrap_or((0, 0));
        Some((state[i].2 - fc, state[i].3 - fb))
    };
    let required: Vec<&IdentityKey> = match stored {
        Stored::Shared { required } => required.into_iter().collect(),
        Stored::Each => Vec::new(),
    };
    let wanted = items.iter().map(|(w, p)| (*w, mail::queue_charge(channel, p)));
    let full = mail::overflowing(limits, wanted, &required, held);
    if !full.is_empty() {
        let (cutoff, rows_per_queue) = mail::expire_heads_bounds(limits, expiry.by);
        let stmt = tx.prepare_cached(mail::EXPIRE_HEADS).await?;
        let keys: Vec<&[u8]> = full.iter().map(|k| &k[..]).collect();
        let (expired, quota) =
            mail::expired_heads(tx.query(&stmt, &[&keys, &cutoff, &rows_per_queue]).await?)?;
        for (who, (n, bytes)) in expired {
            let f = freed.entry(who).or_insert((0, 0));
            f.0 += n;
            f.1 += bytes;
        }
        add_stored_bytes(tx, -quota).await?;
    }
    let find = |state: &[(IdentityKey, i64, i64, i64)], who: &IdentityKey| {
        state.binary_search_by_key(who, |s| s.0).map_err(|_| {
            TxError::Store(StoreError::Db("enqueue: a recipient's queue row went missing".to_string()))
        })
    };
    // A fanout (distinct recipients) leaves out those whose queues are full and stores for the
    // others (the schema's `enqueueFanout`); refused only when that leaves nobody or leaves
    // out the required recipient.
    let room = if let Stored::Shared { required } = stored {
        let held = |who: &IdentityKey| {
            // `find` answers an index of `state` (binary search) or an error.
            let (_, _, count, bytes) = state[find(&state, who)?];
            let (freed_count, freed_bytes) = freed.get(who).copied().unwrap_or((0, 0));
            Ok((count - freed_count, bytes - freed_bytes))
        };
        Some(mail::fanout_room(limits, channel, items, required, held)?)
    } else {
        None
    };
    let kept;
    let items = match &room {
        Some(room) => {
            kept = mail::kept(items, room);
            &kept[..]
        }
        None => items,
    };
    // Check every cap before writing anything.
    let adding = mail::quota_charge(shared, channel, items);
    let mut planned = state.clone();
    for (who, payload) in items {
        let i = find(&planned, who)?;
        let add = mail::queue_charge(channel, payload);
        let (_, _, count, bytes) = planned[i];
        let (freed_count, freed_bytes) = freed.get(*who).copied().unwrap_or((0, 0));
        if let Some(full) = mail::queue_full(limits, count - freed_count, bytes - freed_bytes, add) {
            return Err(TxError::Store(full));
        }
        planned[i].2 = count + 1;
        planned[i].3 = bytes + add;
    }
    let used: i64 =
        tx.query_one("SELECT coalesce(sum(bytes), 0)::bigint FROM qpq_stored_bytes", &[]).await?.get(0);
    let used = unbig(used);
    if used.saturating_add(unbig(adding)) > limits.max_stored_bytes {
        return Err(TxError::Store(StoreError::OverQuota {
            used,
            adding: unbig(adding),
            max: limits.max_stored_bytes,
        }));
    }
    add_stored_bytes(tx, adding).await?;
    let mut seqs = Vec::with_capacity(items.len());
    for (who, _) in items {
        let i = find(&planned, who)?;
        let seq = planned[i].1;
        planned[i].1 = seq.saturating_add(1);
        seqs.push(seq);
    }
    let mut rows = mail::NewMail::default();
    rows.add(shared, channel, channel_seq, items, &seqs);
    let stmt = tx.prepare_cached(mail::INSERT_MAIL).await?;
    tx.execute(&stmt, &rows.params(&now_i)).await?;
    let next: Vec<i64> = planned.iter().map(|p| p.1).collect();
    let counts: Vec<i64> = planned.iter().map(|p| p.2).collect();
    let totals: Vec<i64> = planned.iter().map(|p| p.3).collect();
    let stmt = tx.prepare_cached(UPDATE_QUEUE_ROWS).await?;
    tx.execute(&stmt, &[&keys, &next, &counts, &totals]).await?;
    // Waiters are woken by the caller once this commits (here and on other nodes: see `wake`).
    let seqs = match &room {
        // A fanout's items are its stored recipients, each once.
        Some(room) => {
            woken.extend(items.iter().map(|(w, _)| **w));
            mail::spread_seqs(room, seqs)
        }
        None => {
            woken.extend(recipients);
            seqs
        }
    };
    Ok(Outcome::Enqueued { channel_seq: unbig(channel_seq), seqs: seqs.into_iter().map(unbig).collect() })
}

/// The NOTIFY payloads naming `recipients` (see [`super::listen`] for the format).
pub(super) fn notify_payloads(node_id: u64, recipients: &[IdentityKey]) -> Vec<String> {
    recipients
        .chunks(limits::PG_NOTIFY_RECIPIENTS)
        .map(|chunk| {
            let mut payload = format!("{node_id:016x}");
            for r in chunk {
                payload.push(':');
                payload.push_str(&hex::encode(r));
            }
            payload
        })
        .collect()
}

async fn ack(tx: &Transaction<'_>, who: &IdentityKey, up_to: u64) -> Result<Outcome, TxError> {
    let stmt = tx
        .prepare_cached(concat!(
            "WITH d AS (DELETE FROM qpq_entries WHERE recipient = $1 AND seq <= $2
                        RETURNING payload_id, bytes, quota), ",
            mail::release_payloads!(),
            " SELECT count(*)::bigint, coalesce(sum(bytes), 0)::bigint, coalesce(sum(quota), 0)::bigint FROM d"
        ))
        .await?;
    let row = tx.query_one(&stmt, &[&&who[..], &big(up_to)]).await?;
    let (n, bytes, quota): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if n == 0 {
        return Ok(Outcome::Acked { removed: 0 });
    }
    let freed = quota + release_unreferenced(tx).await?;
    let stmt = tx.prepare_cached(ADD_FREED).await?;
    tx.execute(&stmt, &[&vec![&who[..]], &vec![n], &vec![bytes]]).await?;
    add_stored_bytes(tx, -freed).await?;
    Ok(Outcome::Acked { removed: u32::try_from(n).unwrap_or(u32::MAX) })
}

/// The rows of [`READ_FREED`] by recipient: (count, bytes).
pub(super) fn read_freed(
    rows: Vec<tokio_postgres::Row>,
) -> Result<HashMap<IdentityKey, (i64, i64)>, TxError> {
    let mut freed = HashMap::with_capacity(rows.len());
    for row in rows {
        freed.insert(identity(row.get(0))?, (row.get(1), row.get(2)));
    }
    Ok(freed)
}

/// Deletes the payloads this transaction took the last refs of; returns the quota they free.
async fn release_unreferenced(tx: &Transaction<'_>) -> Result<i64, TxError> {
    let stmt = tx.prepare_cached(mail::DELETE_UNREFERENCED).await?;
    Ok(tx.query_one(&stmt, &[]).await?.get(0))
}

/// Deletes the oldest expired entries (one slice), then, once none are left, empty queue rows,
/// then idle channel rows (raising the floors in the same transaction), each a slice per call.
/// The channel rows go in id order from the one `after` names ([`CHANNELS_FROM`] ‖ id): an
/// index walk that resumes where the last slice ended, so a sweep reads each row once however
/// many there are.
///
/// A slice that starts a pass over the entries (`after` empty) records the deletion mark last:
/// only sweeps lock its row, and each takes it as its last lock, so sweeps of several nodes
/// hold it only while they commit and cannot deadlock on it.
async fn sweep(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    (now, wall): (u64, u64),
    after: &[u8],
) -> Result<Outcome, TxError> {
    let outcome = sweep_slice(tx, limits, now, after).await?;
    if after.is_empty() {
        let stmt = tx.prepare_cached(RECORD_DELETION_MARK).await?;
        tx.execute(&stmt, &[&big(now), &big(wall)]).await?;
    }
    Ok(outcome)
}

async fn sweep_slice(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    now: u64,
    after: &[u8],
) -> Result<Outcome, TxError> {
    let slice = big(limits::SWEEP_SLICE_ROWS as u64);
    if let Some(from) = after.strip_prefix(CHANNELS_FROM) {
        return sweep_channels(tx, now, from, slice).await;
    }
    let cutoff = big(now.saturating_sub(limits.ttl_ms));
    let rows = tx
        .query(
            concat!(
                "WITH doomed AS (
                     SELECT recipient, seq FROM qpq_entries WHERE enqueued_at_ms < $1
                     ORDER BY enqueued_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED
                 ), d AS (
                     DELETE FROM qpq_entries e USING doomed
                     WHERE e.recipient = doomed.recipient AND e.seq = doomed.seq
                     RETURNING e.recipient, e.payload_id, e.bytes, e.quota
                 ), ",
                mail::release_payloads!(),
                " SELECT recipient, count(*)::bigint, sum(bytes)::bigint, sum(quota)::bigint
                 FROM d GROUP BY recipient ORDER BY recipient"
            ),
            &[&cutoff, &slice],
        )
        .await?;
    let mut removed = 0i64;
    let mut quota = 0i64;
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(rows.len());
    let mut counts = Vec::with_capacity(rows.len());
    let mut sizes = Vec::with_capacity(rows.len());
    for row in rows {
        keys.push(row.get(0));
        let (n, b, q): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        removed += n;
        quota += q;
        counts.push(n);
        sizes.push(b);
    }
    if !keys.is_empty() {
        // Counted as freed, as an ack's are (`keys` are sorted): the sweep locks no queue row
        // here, so it takes entries, payloads, freed rows and the shard in the order every
        // batch does. It used to lower the queue rows, after it held the entries and payloads a
        // mail batch holding those queue rows may delete to make room (`mail::EXPIRE_HEADS`):
        // a deadlock every time the two met on a full queue whose head had expired.
        let stmt = tx.prepare_cached(ADD_FREED).await?;
        tx.execute(&stmt, &[&keys, &counts, &sizes]).await?;
        let freed = quota + release_unreferenced(tx).await?;
        add_stored_bytes(tx, -freed).await?;
    }
    if removed >= slice || delete_empty_queues(tx, slice).await? >= slice {
        // More may be waiting; the caller comes back for the next slice.
        return Ok(Outcome::Swept { removed: unbig(removed), resume: Some(Vec::new()) });
    }
    match sweep_channels(tx, now, &[], slice).await? {
        // The entries this call deleted before it came to the channels count too.
        Outcome::Swept { resume, .. } => Ok(Outcome::Swept { removed: unbig(removed), resume }),
        other => Ok(other),
    }
}

/// Raises `qpq_meta.deletion_mark` to $1, the time a sweep deletes by (ms), and sets
/// `deletion_mark_wall` to $2, the clock's reading then, when it does: a restarted node's
/// deletion time resumes from them ([`crate::clock::DeletionClock::resuming`]). Never lowered,
/// so neither a node whose clock was set back nor one behind the others undoes it; the pair
/// changes together under the mark row's lock.
pub(super) const RECORD_DELETION_MARK: &str = "WITH m AS (
         INSERT INTO qpq_meta (name, value) VALUES ('deletion_mark', $1)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value WHERE qpq_meta.value < EXCLUDED.value
         RETURNING value
     )
     INSERT INTO qpq_meta (name, value) SELECT 'deletion_mark_wall', $2 FROM m
     ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value";

/// The first byte of a sweep's resume key in its channel phase (see [`sweep`]).
const CHANNELS_FROM: &[u8] = b"c";

/// Deletes up to `slice` channel rows unused for [`limits::CHANNEL_IDLE_MS`] whose id is above
/// `from` (skipping any an enqueue holds: it is using it; the delete rechecks the age of a row
/// an enqueue touched meanwhile) and raises `channel_seq_floor` over their numbers in the same
/// transaction.
async fn sweep_channels(tx: &Transaction<'_>, now: u64, from: &[u8], slice: i64) -> Result<Outcome, TxError> {
    let idle = big(now.saturating_sub(limits::CHANNEL_IDLE_MS));
    let rows = tx
        .query(
            "WITH doomed AS (
                 SELECT id FROM qpq_channels WHERE id > $1 AND touched_ms < $3
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
             ), d AS (
                 DELETE FROM qpq_channels c USING doomed WHERE c.id = doomed.id AND c.touched_ms < $3
                 RETURNING c.last_seq
             ), f AS (
                 UPDATE qpq_meta SET value = GREATEST(value, (SELECT coalesce(max(last_seq), 0) FROM d))
                 WHERE name = 'channel_seq_floor'
             )
             SELECT (SELECT count(*) FROM doomed), (SELECT id FROM doomed ORDER BY id DESC LIMIT 1)",
            &[&from, &slice, &idle],
        )
        .await?;
    let (walked, last): (i64, Option<Vec<u8>>) =
        rows.first().map(|r| (r.get(0), r.get(1))).unwrap_or((0, None));
    let resume = match last {
        Some(last) if walked >= slice => Some([CHANNELS_FROM, &last].concat()),
        _ => None,
    };
    Ok(Outcome::Swept { removed: 0, resume })
}

/// Deletes up to `slice` queue rows left with no message (`count − freed` ≤ 0) and their
/// freed rows, raising `seq_floor` over their numbers; returns how many candidates it locked
/// (`slice` means more may be waiting). Locks the candidates' queue rows, skipping any a batch
/// holds (it is writing to that queue), then their freed rows (the order of every batch), then
/// rechecks in a statement whose snapshot is taken with both held: an ack or enqueue that
/// committed meanwhile is counted. Sliced so that one sweep transaction never locks every
/// drained queue of a large service at once (acks never delete queue rows, so every recipient
/// who emptied their queue since the last sweep is a candidate).
async fn delete_empty_queues(tx: &Transaction<'_>, slice: i64) -> Result<i64, TxError> {
    let rows = tx
        .query(
            "SELECT q.recipient FROM qpq_queues q LEFT JOIN qpq_queue_freed f ON f.recipient = q.recipient
             WHERE q.count - coalesce(f.count, 0) <= 0 ORDER BY q.recipient LIMIT $1 FOR UPDATE OF q SKIP LOCKED",
            &[&slice],
        )
        .await?;
    let locked = rows.len() as i64;
    if rows.is_empty() {
        return Ok(0);
    }
    let keys: Vec<Vec<u8>> = rows.into_iter().map(|r| r.get(0)).collect();
    tx.execute(
        "SELECT 1 FROM qpq_queue_freed WHERE recipient = ANY($1::bytea[]) ORDER BY recipient FOR UPDATE",
        &[&keys],
    )
    .await?;
    tx.execute(
        "WITH d AS (
             DELETE FROM qpq_queues q WHERE q.recipient = ANY($1::bytea[])
             AND q.count - coalesce((SELECT f.count FROM qpq_queue_freed f WHERE f.recipient = q.recipient), 0) <= 0
             RETURNING q.recipient, q.next_seq
         ), df AS (
             DELETE FROM qpq_queue_freed f USING d WHERE f.recipient = d.recipient
         )
         UPDATE qpq_meta SET value = GREATEST(value, (SELECT coalesce(max(next_seq), 0) FROM d))
         WHERE name = 'seq_floor'",
        &[&keys],
    )
    .await?;
    Ok(locked)
}

/// What a key row is charged against the key budget (the redb store's [`charge`]): a
/// package's bytes plus the 8-byte not_after redb keeps beside them, or a hybrid key's value.
fn package_charge(bytes: &[u8]) -> i64 {
    big(charge(8 + bytes.len()))
}

/// Adds `delta` bytes to this connection's shard of the key material total.
async fn add_key_bytes(tx: &Transaction<'_>, delta: i64) -> Result<(), TxError> {
    add_to_shard(tx, shard_upsert!("qpq_key_bytes"), delta).await
}

/// Refuses `adding` more key bytes when, after `freeing`, they would pass the budget. Like the
/// message quota, the total is read without a lock: nodes uploading at the same instant can
/// pass it together by at most their uploads.
async fn check_key_room(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    adding: i64,
    freeing: i64,
) -> Result<(), TxError> {
    if adding <= 0 {
        return Ok(());
    }
    let used: i64 =
        tx.query_one("SELECT coalesce(sum(bytes), 0)::bigint FROM qpq_key_bytes", &[]).await?.get(0);
    let used = unbig(used.saturating_sub(freeing));
    if used.saturating_add(unbig(adding)) > limits.max_key_bytes {
        return Err(TxError::Store(StoreError::KeyStoreFull {
            used,
            adding: unbig(adding),
            max: limits.max_key_bytes,
        }));
    }
    Ok(())
}

/// Deletes `who`'s single-use packages expired at `now`; returns the charge they freed.
async fn prune_key_packages(tx: &Transaction<'_>, key: &[u8], now: i64) -> Result<i64, TxError> {
    let freed: i64 = tx
        .query_one(
            "WITH d AS (DELETE FROM qpq_key_packages WHERE identity = $1 AND not_after <= $2
                        RETURNING length(bytes)::bigint + $3 AS c)
             SELECT coalesce(sum(c), 0)::bigint FROM d",
            &[&key, &now, &package_charge(&[])],
        )
        .await?
        .get(0);
    add_key_bytes(tx, -freed).await?;
    Ok(freed)
}

async fn upload_key_packages(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    who: &IdentityKey,
    packages: &[KeyPackageEntry],
    last_resort: Option<&KeyPackageEntry>,
    now: u64,
) -> Result<Outcome, TxError> {
    let key = &who[..];
    // Uploads of one identity check its cap one after the other, on any node.
    let (space, id) = identity_lock(who);
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&space, &id]).await?;
    // Expired packages must not count against the cap: a returning user could never refill.
    prune_key_packages(tx, key, big(now)).await?;
    let offered: Vec<&[u8]> = packages.iter().map(|p| &p.bytes[..]).collect();
    let stored: std::collections::HashSet<Vec<u8>> = if offered.is_empty() {
        Default::default()
    } else {
        tx.query(
            "SELECT bytes FROM qpq_key_packages WHERE identity = $1 AND bytes = ANY($2::bytea[])",
            &[&key, &offered],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, Vec<u8>>(0))
        .collect()
    };
    let packages = &crate::store::single_copies(packages, &stored);
    let have: i64 = tx
        .query_one("SELECT count(*)::bigint FROM qpq_key_packages WHERE identity = $1", &[&key])
        .await?
        .get(0);
    let (have, adding) = (unbig(have), packages.len() as u64);
    if have + adding > limits::MAX_KEY_PACKAGES_PER_IDENTITY {
        return Err(TxError::Store(StoreError::PoolFull {
            have,
            adding,
            max: limits::MAX_KEY_PACKAGES_PER_IDENTITY,
        }));
    }
    let mut bytes_added: i64 = packages.iter().map(|p| package_charge(&p.bytes)).sum();
    let mut replaced = 0i64;
    if let Some(lr) = last_resort {
        bytes_added += package_charge(&lr.bytes);
        // Locked, so a take deleting it meanwhile waits and the charge freed is this one.
        let old = tx
            .query_opt(
                "SELECT length(bytes)::bigint FROM qpq_last_resort WHERE identity = $1 FOR UPDATE",
                &[&key],
            )
            .await?;
        replaced = old.map(|r| r.get::<_, i64>(0) + package_charge(&[])).unwrap_or(0);
    }
    check_key_room(tx, limits, bytes_added, replaced).await?;
    let not_after: Vec<i64> = packages.iter().map(|p| big(p.not_after)).collect();
    let bytes: Vec<&[u8]> = packages.iter().map(|p| &p.bytes[..]).collect();
    tx.execute(
        "INSERT INTO qpq_key_packages (identity, not_after, bytes)
         SELECT $1, n, b FROM unnest($2::bigint[], $3::bytea[]) WITH ORDINALITY AS t(n, b, o) ORDER BY o",
        &[&key, &not_after, &bytes],
    )
    .await?;
    if let Some(lr) = last_resort {
        tx.execute(
            "INSERT INTO qpq_last_resort (identity, not_after, bytes) VALUES ($1, $2, $3)
             ON CONFLICT (identity) DO UPDATE SET not_after = excluded.not_after, bytes = excluded.bytes",
            &[&key, &big(lr.not_after), &&lr.bytes[..]],
        )
        .await?;
    }
    add_key_bytes(tx, bytes_added - replaced).await?;
    Ok(Outcome::KeyPackagesStored { count: have + adding })
}

/// Takes `who`'s oldest package valid at `now` (unix s), else its last-resort one, and deletes
/// its packages expired at `expire_by`: `now` as the store's [`crate::clock::DeletionClock`]
/// sees it, so a clock stepped ahead deletes nothing early (as on redb, `Keys::take`).
async fn take_key_package(
    tx: &Transaction<'_>,
    who: &IdentityKey,
    now: u64,
    expire_by: u64,
) -> Result<Result<Outcome, StoreError>, TxError> {
    let (key, now, expire_by) = (&who[..], big(now), big(expire_by));
    let stmt = tx
        .prepare_cached(
            "WITH t AS (
                 SELECT id FROM qpq_key_packages WHERE identity = $1 AND not_after > $2
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
             )
             DELETE FROM qpq_key_packages k USING t WHERE k.id = t.id RETURNING k.bytes",
        )
        .await?;
    let taken = tx.query_opt(&stmt, &[&key, &now]).await?;
    prune_key_packages(tx, key, expire_by).await?;
    if let Some(row) = taken {
        let bytes: Vec<u8> = row.get(0);
        add_key_bytes(tx, -package_charge(&bytes)).await?;
        let remaining: i64 = tx
            .query_one("SELECT count(*)::bigint FROM qpq_key_packages WHERE identity = $1", &[&key])
            .await?
            .get(0);
        return Ok(Ok(Outcome::KeyPackage { bytes, remaining: unbig(remaining), last_resort: false }));
    }
    let lr =
        tx.query_opt("SELECT not_after, bytes FROM qpq_last_resort WHERE identity = $1", &[&key]).await?;
    match lr {
        Some(row) if row.get::<_, i64>(0) > now => {
            Ok(Ok(Outcome::KeyPackage { bytes: row.get(1), remaining: 0, last_resort: true }))
        }
        Some(_) => {
            let gone = tx
                .query_opt(
                    "DELETE FROM qpq_last_resort WHERE identity = $1 AND not_after <= $2
                     RETURNING length(bytes)::bigint + $3",
                    &[&key, &expire_by, &package_charge(&[])],
                )
                .await?;
            add_key_bytes(tx, -gone.map(|r| r.get::<_, i64>(0)).unwrap_or(0)).await?;
            Ok(Err(StoreError::NoKeyPackages))
        }
        None => Ok(Err(StoreError::NoKeyPackages)),
    }
}

/// Deletes the oldest packages expired at `now`, and the hybrid keys past their server lifetime,
/// at most one slice of each table, through their expiry indexes; `more` when a table gave a
/// full slice. Nodes expiring at once skip each other's rows.
async fn expire_key_packages(tx: &Transaction<'_>, now: u64) -> Result<Outcome, TxError> {
    // Hybrid keys not replaced for their server lifetime: created before this (see the redb
    // store's `hybrid_expires_at`: expired once created_at_ms / 1000 + lifetime <= now).
    let hybrid_cutoff_ms =
        big((now + 1).saturating_sub(limits::HYBRID_KEY_SERVER_LIFETIME_SECS).saturating_mul(1000));
    let (now, slice, overhead) = (big(now), big(limits::SWEEP_SLICE_ROWS as u64), package_charge(&[]));
    // (table, its key, its time column, the last expired time, its value, a row's overhead)
    let tables = [
        ("qpq_key_packages", "id", "not_after", now, "bytes", overhead),
        ("qpq_last_resort", "identity", "not_after", now, "bytes", overhead),
        (
            "qpq_hybrid_keys",
            "identity",
            "created_at_ms",
            hybrid_cutoff_ms - 1,
            "value",
            big(limits::KEY_ROW_OVERHEAD_BYTES),
        ),
    ];
    let mut removed = 0u64;
    let mut freed = 0i64;
    let mut more = false;
    for (table, key, time, last, value, overhead) in tables {
        let row = tx
            .query_one(
                &format!(
                    "WITH d AS (DELETE FROM {table} WHERE {key} IN (
                         SELECT {key} FROM {table} WHERE {time} <= $1
                         ORDER BY {time} LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING length({value})::bigint + $3 AS c)
                     SELECT count(*)::bigint, coalesce(sum(c), 0)::bigint FROM d"
                ),
                &[&last, &slice, &overhead],
            )
            .await?;
        let (n, c): (i64, i64) = (row.get(0), row.get(1));
        removed += unbig(n);
        freed += c;
        more |= n >= slice;
    }
    add_key_bytes(tx, -freed).await?;
    Ok(Outcome::KeyPackagesExpired { removed, more })
}

/// The advisory lock (two-key form, so it never meets the one-key migration lock) that
/// serialises the uploads of `who`: a constant namespace and the key's first four bytes (an
/// Ed25519 key is uniformly random; two identities sharing them only wait for each other).
/// Indexing cannot fail: an `IdentityKey` is 32 bytes.
fn identity_lock(who: &IdentityKey) -> (i32, i32) {
    const KEY_UPLOADS: i32 = 0x7170_716b;
    (KEY_UPLOADS, i32::from_le_bytes([who[0], who[1], who[2], who[3]]))
}

/// Replaces the hybrid key only with a newer one (see the redb store's `put_hybrid`). Every
/// hybrid key has the same length (the RPC layer checks it), so only a first one is charged.
async fn put_hybrid_key(
    tx: &Transaction<'_>,
    limits: QueueLimits,
    who: &IdentityKey,
    signed: &SignedHybridKey,
) -> Result<Result<Outcome, StoreError>, TxError> {
    let encoded = encode_hybrid_key(signed);
    let created = big(signed.created_at_ms);
    let cost = big(charge(encoded.len()));
    let exists =
        tx.query_opt("SELECT 1 FROM qpq_hybrid_keys WHERE identity = $1", &[&&who[..]]).await?.is_some();
    if !exists {
        check_key_room(tx, limits, cost, 0).await?;
    }
    // `xmax = 0` tells an inserted row from an updated one (a first key from a replacement).
    let written = tx
        .query_opt(
            "INSERT INTO qpq_hybrid_keys (identity, created_at_ms, value) VALUES ($1, $2, $3)
             ON CONFLICT (identity) DO UPDATE SET created_at_ms = excluded.created_at_ms, value = excluded.value
             WHERE qpq_hybrid_keys.created_at_ms < excluded.created_at_ms
             RETURNING (xmax = 0)",
            &[&&who[..], &created, &encoded],
        )
        .await?;
    if let Some(row) = written {
        if row.get::<_, bool>(0) {
            // Inserted although a row was there when read: the sweep deleted it meanwhile
            // (the read takes no lock), so this is a first key after all.
            if exists {
                check_key_room(tx, limits, cost, 0).await?;
            }
            add_key_bytes(tx, cost).await?;
        }
        return Ok(Ok(Outcome::HybridKeyStored));
    }
    let row = tx
        .query_one("SELECT created_at_ms, value FROM qpq_hybrid_keys WHERE identity = $1", &[&&who[..]])
        .await?;
    let stored: Vec<u8> = row.get(1);
    if stored == encoded {
        return Ok(Ok(Outcome::HybridKeyStored));
    }
    Ok(Err(StoreError::StaleHybridKey { stored: unbig(row.get(0)), offered: signed.created_at_ms }))
}

/// What `who`'s queue holds (messages, bytes) as of this one statement, without a lock: its
/// queue row less what acks freed from it, read in one snapshot (the sweep deletes both rows in
/// one transaction). Exact at that snapshot but for acks not yet committed, which make the
/// queue look fuller (as in [`enqueue`]'s caps); (0, 0) for a queue without a row. Also
/// whether its oldest message was enqueued before `cutoff` (has expired), so that an enqueue
/// would delete it to make room (see `mail::EXPIRE_HEADS`).
pub(super) async fn queue_held(
    client: &Object,
    who: &IdentityKey,
    cutoff: i64,
) -> Result<(i64, i64, bool), TxError> {
    let stmt = client
        .prepare_cached(
            "SELECT q.count - coalesce(f.count, 0), q.bytes - coalesce(f.bytes, 0),
                    coalesce((SELECT e.enqueued_at_ms < $2 FROM qpq_entries e
                              WHERE e.recipient = $1 ORDER BY e.seq LIMIT 1), false)
             FROM qpq_queues q LEFT JOIN qpq_queue_freed f ON f.recipient = q.recipient
             WHERE q.recipient = $1",
        )
        .await?;
    let row = client.query_opt(&stmt, &[&&who[..], &cutoff]).await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))).unwrap_or((0, 0, false)))
}

/// Single-use packages of `who` valid at `now`, and whether a valid last-resort one is stored.
pub(super) async fn key_package_count(
    client: &Object,
    who: &IdentityKey,
    now: u64,
) -> Result<(u64, bool), TxError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*)::bigint FROM qpq_key_packages WHERE identity = $1 AND not_after > $2),
                    EXISTS (SELECT 1 FROM qpq_last_resort WHERE identity = $1 AND not_after > $2)",
            &[&&who[..], &big(now)],
        )
        .await?;
    Ok((unbig(row.get(0)), row.get(1)))
}

pub(super) async fn hybrid_key(
    client: &Object,
    who: &IdentityKey,
) -> Result<Option<SignedHybridKey>, TxError> {
    let row = client.query_opt("SELECT value FROM qpq_hybrid_keys WHERE identity = $1", &[&&who[..]]).await?;
    match row {
        Some(r) => Ok(Some(decode_hybrid_key(r.get::<_, &[u8]>(0))?)),
        None => Ok(None),
    }
}
