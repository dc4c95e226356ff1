//! Group commit on PostgreSQL: the enqueues (or the acks) waiting at one moment run as one
//! transaction, in a fixed number of round trips whatever their number.
//!
//! Why: one transaction per request cost about ten statements (each a loopback round trip and a
//! backend wake-up) and one WAL flush per message, and held the recipient's queue row locked
//! across all of them; on a small machine that, not the disk, capped throughput (issue 13).
//!
//! How, like the redb writer: a worker task per node ([`limits::PG_BATCH_WORKERS`]) takes every
//! request waiting (up to [`limits::PG_BATCH_OPS`]), so what arrives during one transaction's
//! WAL flush forms the next batch. A batch of enqueues and fanouts (the mail lane) runs as:
//! 1. one pipelined round trip, in this order: BEGIN, upsert and so lock the batch's channel
//!    rows (sorted), then its queue rows (sorted), read the floors, the stored-bytes total and
//!    those queues' freed rows (unlocked: see [`super::ops`] for why the caps stay safe);
//!    When the batch would overflow a queue, one more round trip first deletes the expired
//!    mail at that queue's head ([`mail::EXPIRE_HEADS`]; counted as freed, as an ack's is);
//! 2. in memory, the requests one after the other in arrival order: each takes its `channelSeq`
//!    and `seq`s and checks every cap against the state left by the requests before it; a
//!    refused request changes nothing and does not disturb the others (the caps are decided
//!    here, so no SAVEPOINT is needed); a fanout leaves out the recipients whose queues are
//!    full and is refused only when that leaves nobody or leaves out its required recipient;
//! 3. one pipelined round trip: one statement that inserts every payload and entry, updates
//!    the accepted requests' queue and channel rows and this connection's stored-bytes shard,
//!    and deletes the rows step 1 created for refused requests only ([`WRITE_MAIL`]), and
//!    COMMIT: one WAL flush acknowledges the whole batch. No NOTIFY here: it would hold a
//!    cluster-wide lock across the flush; the other nodes are told after the commit
//!    ([`super::wake`]). A statement that fails aborts the transaction, so the COMMIT behind it
//!    only rolls back; the batch answers with that statement's error, never success.
//!
//! An ack batch (the ack lane) is one round trip: BEGIN, [`ACK_BATCH`], COMMIT. The lanes never
//! mix the two kinds; a mixed batch would fail as a whole and run one request at a time.
//!
//! On any error the worker sends ROLLBACK before the connection goes back to the pool.
//!
//! Acks lock no queue row (schema version 3): a node whose batches are acks does not wait for
//! the WAL flush of a node enqueueing to the same recipients, nor the other way round. So acks
//! have a lane of their own on each node (their own queue and worker): an ack batch and an
//! enqueue batch run side by side and PostgreSQL shares one WAL flush between them, where one
//! lane made a recipient's ack wait for the flush of the enqueue before it (a single sender on
//! one node lost 40% of its rate that way). An enqueue then does not see the room an ack in
//! flight is making, which only makes its caps conservative (see [`super::ops`]).
//!
//! Every batch locks rows in one order (a mail batch: channels by key, queues by key, then one
//! shard; an ack batch: entries, payloads by id, freed rows by key, then one shard), on every
//! node, so batches queue behind each other instead of deadlocking. A request the batch cannot
//! explain (a database error, not a refusal) makes the batch run again one request per
//! transaction, so only the guilty request fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadpool_postgres::Object;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::types::ToSql;

use super::{Inner, TxError, mail, ops, unavailable};
use crate::limits;
use crate::store::{IdentityKey, Outcome, QueueLimits, StoreError, WriteOp};

/// One queued request and where its answer goes.
pub(super) type Request = (WriteOp, oneshot::Sender<Result<Outcome, StoreError>>);

/// A batch's mail ([`mail::insert_mail_ctes`], `$1`–`$11`), its queue rows' new `next_seq`,
/// `count` and `bytes` (`$12`–`$15`, [`ops::update_queue_rows`]), its channel rows' new
/// `last_seq` (`$16`, `$17`), `$19` bytes added to this connection's stored-bytes shard (of
/// `$18`), and the deletion of the queue rows (`$20`) and channel rows (`$21`) step 1 created
/// for refused requests only, in one statement. Its only new lock is the shard's: the queue
/// and channel rows were locked in step 1, and the entries' keys are new (their seqs were
/// taken under those locks).
const WRITE_MAIL: &str = concat!(
    "WITH ",
    mail::insert_mail_ctes!(),
    ", q AS (",
    ops::update_queue_rows!("$12", "$13", "$14", "$15"),
    "), c AS (UPDATE qpq_channels c SET last_seq = u.last
             FROM unnest($16::bytea[], $17::bigint[]) AS u(id, last) WHERE c.id = u.id),
       dq AS (DELETE FROM qpq_queues WHERE recipient = ANY($20::bytea[])),
       dc AS (DELETE FROM qpq_channels WHERE id = ANY($21::bytea[]))
     INSERT INTO qpq_stored_bytes (shard, bytes) SELECT pg_backend_pid() % $18::integer, $19::bigint WHERE $19::bigint <> 0
     ON CONFLICT (shard) DO UPDATE SET bytes = qpq_stored_bytes.bytes + excluded.bytes"
);

/// An ack-only batch (the ack lane) in one statement: deletes the acked entries of `$1` up to
/// `$2`, releases or deletes their payloads, adds what went to the recipients' freed rows
/// (sorted, [`ops::ADD_FREED`]'s upsert) and takes the quota it frees off this connection's
/// stored-bytes shard (of `$3`); returns each deleted entry (recipient, seq) for the
/// requests' counts. Sent as BEGIN, this, COMMIT in one round trip: before, the freed rows and
/// the shard were a second round trip of two more statements, which on a small machine cost
/// PostgreSQL CPU per batch (issue 13). Locks in the order every batch takes them: entries,
/// payloads (by id, in `l`), then freed rows (`f`, by key), then the shard: `s`'s one-time
/// filter reads the quota sums (so `d` and `x` have run) before `f`, and only then inserts
/// (checked with `EXPLAIN (VERBOSE)` of the generic plan).
const ACK_BATCH: &str = concat!(
    "WITH a AS (SELECT r, up_to FROM unnest($1::bytea[], $2::bigint[]) AS a(r, up_to)),
          d AS (DELETE FROM qpq_entries e USING a WHERE e.recipient = a.r AND e.seq <= a.up_to
                RETURNING e.recipient, e.seq, e.payload_id, e.bytes, e.quota), ",
    mail::release_or_delete_payloads!(),
    ", f AS (INSERT INTO qpq_queue_freed (recipient, count, bytes)
             SELECT recipient, count(*), sum(bytes)::bigint FROM d GROUP BY recipient ORDER BY recipient
             ON CONFLICT (recipient) DO UPDATE SET count = qpq_queue_freed.count + excluded.count,
                                                   bytes = qpq_queue_freed.bytes + excluded.bytes
             RETURNING 1),
       t AS (SELECT ((SELECT coalesce(sum(quota), 0) FROM d) + (SELECT coalesce(sum(quota), 0) FROM x))::bigint AS q),
       s AS (INSERT INTO qpq_stored_bytes (shard, bytes)
             SELECT pg_backend_pid() % $3::integer, -t.q FROM t WHERE t.q <> 0 AND (SELECT count(*) FROM f) >= 0
             ON CONFLICT (shard) DO UPDATE SET bytes = qpq_stored_bytes.bytes + excluded.bytes
             RETURNING 1)
     SELECT recipient, seq, (SELECT count(*) FROM s) FROM d"
);

/// Whether `op` goes through the batch (the frequent writes); the rest keep a transaction each.
pub(super) fn batched(op: &WriteOp) -> bool {
    matches!(op, WriteOp::Enqueue { .. } | WriteOp::Fanout { .. } | WriteOp::Ack { .. })
}

/// Waits for one request on `queue`, then takes whatever else is already waiting, up to `max` in
/// all (the batch and read workers' intake); `None` once the queue is closed.
pub(super) async fn take_waiting<T>(queue: &Mutex<mpsc::Receiver<T>>, max: usize) -> Option<Vec<T>> {
    let mut rx = queue.lock().await;
    let first = rx.recv().await?;
    let mut requests = vec![first];
    while requests.len() < max {
        match rx.try_recv() {
            Ok(r) => requests.push(r),
            Err(_) => break,
        }
    }
    Some(requests)
}

/// One worker: takes what is waiting, commits it, answers, until the queue closes.
pub(super) async fn run_worker(inner: Arc<Inner>, queue: Arc<Mutex<mpsc::Receiver<Request>>>) {
    loop {
        let Some(requests) = take_waiting(&queue, limits::PG_BATCH_OPS).await else { return };
        let (ops, replies): (Vec<WriteOp>, Vec<_>) = requests.into_iter().unzip();
        match inner.commit_batch(&ops).await {
            Ok(Applied { outcomes, woken, .. }) => {
                inner.notifier.notify(woken.iter());
                inner.wakeups.push(woken.iter());
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // The caller may have gone (its connection closed): nothing to tell.
                    let _ = reply.send(outcome);
                }
            }
            Err(StoreError::Db(m)) if ops.len() > 1 => {
                tracing::warn!(error = %m, n = ops.len(), "postgresql batch failed; running its requests one by one");
                for (op, reply) in ops.into_iter().zip(replies) {
                    let _ = reply.send(inner.write(op).await);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(same_error(&e)));
                }
            }
        }
    }
}

/// A batch-wide error, once per request (StoreError is not Clone: it wraps driver errors' text).
pub(super) fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Db(m) => StoreError::Db(m.clone()),
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Db(other.to_string()),
    }
}

/// What a committed batch answers, request by request, and whose waiters to wake.
pub(super) struct Applied {
    outcomes: Vec<Result<Outcome, StoreError>>,
    woken: Vec<IdentityKey>,
    /// Whether the batch wrote anything. One that did not (acks that found nothing, refused
    /// enqueues) ends without a WAL flush (no transaction id was assigned, or it rolled back)
    /// and is not counted in the node's commits.
    wrote: bool,
}

impl Inner {
    /// Runs `ops` as one transaction, again after a deadlock or serialization failure, or on a
    /// new connection after meeting a read-only server.
    async fn commit_batch(&self, ops: &[WriteOp]) -> Result<Applied, StoreError> {
        let now_ms = self.clock.now_ms();
        let mut last = String::new();
        for _ in 0..limits::PG_TX_ATTEMPTS {
            let client = self.pool.get().await.map_err(|e| unavailable(e.into()))?;
            let attempt = async {
                let expiry = mail::Expiry { by: self.deletion.now().0, young: Some(&self.young_heads) };
                let applied = apply(&client, self.limits, now_ms, ops, expiry).await;
                if applied.is_err() {
                    // Ends the transaction if the failure left one open (a warning, not an
                    // error, when the pipelined COMMIT already ended it); a dead connection is
                    // dropped by the pool.
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                applied
            };
            match self.answered(attempt).await {
                Ok(applied) => {
                    if applied.wrote {
                        self.commits.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(applied);
                }
                Err(TxError::Conflict(m)) => last = m,
                Err(TxError::ReadOnly(m)) => {
                    last = m;
                    self.discard(client);
                }
                // Its COMMIT may have been sent and may yet run: every request of the batch is
                // answered `unavailable` (the worker never runs them again one by one).
                Err(e @ TxError::Silent(_)) => {
                    self.abandon(client);
                    return Err(unavailable(e));
                }
                Err(TxError::Store(e)) => return Err(e),
            }
            tracing::debug!(error = %last, "postgresql batch conflicted, running it again");
        }
        Err(StoreError::Unavailable(format!("transaction kept conflicting: {last}")))
    }
}

/// A locked queue row as the batch changes it, and what acks freed from it (not written back:
/// the caps check `count − freed`).
#[derive(Clone, Copy)]
struct Queue {
    next: i64,
    count: i64,
    bytes: i64,
    freed_count: i64,
    freed_bytes: i64,
}

/// The recipient and body of each item of an enqueue or fanout (a fanout's items all share its
/// one stored payload: see [`mail`]).
fn items(op: &WriteOp) -> Result<Vec<(&IdentityKey, &[u8])>, StoreError> {
    match op {
        WriteOp::Enqueue { items, .. } => Ok(items.iter().map(|(w, p)| (w, &p[..])).collect()),
        WriteOp::Fanout { payload, recipients, .. } => {
            let mut seen = HashMap::with_capacity(recipients.len());
            for (i, who) in recipients.iter().enumerate() {
                if let Some(first) = seen.insert(*who, i) {
                    return Err(StoreError::DuplicateRecipient { first, again: i });
                }
            }
            Ok(recipients.iter().map(|w| (w, &payload[..])).collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// The recipient of a fanout that must not be skipped, if it names one.
fn required_of(op: &WriteOp) -> Option<&IdentityKey> {
    match op {
        WriteOp::Fanout { required, .. } => required.as_ref(),
        _ => None,
    }
}

fn channel_of(op: &WriteOp) -> &[u8] {
    match op {
        WriteOp::Enqueue { channel, .. } | WriteOp::Fanout { channel, .. } => channel,
        _ => &[],
    }
}

/// Runs `ops` as one transaction on `tx`, from BEGIN to COMMIT (see the module docs for the
/// steps). Ok means committed; after an error the caller rolls back. Refusals are per request,
/// inside [`Applied`].
async fn apply(
    tx: &Object,
    limits: QueueLimits,
    now: u64,
    ops: &[WriteOp],
    expiry: mail::Expiry<'_>,
) -> Result<Applied, TxError> {
    let acks = ops.iter().filter(|op| matches!(op, WriteOp::Ack { .. })).count();
    if acks == ops.len() {
        return apply_acks(tx, ops).await;
    }
    if acks > 0 {
        // The lanes never build such a batch (acks have their own); should one come, this error
        // makes the worker run its requests one by one, each in the transaction of its kind.
        return Err(TxError::Store(StoreError::Db("batch: acks mixed with mail".to_string())));
    }
    apply_mail(tx, limits, now, ops, expiry).await
}

/// A batch of enqueues and fanouts (the mail lane), steps 1 to 3 of the module docs.
async fn apply_mail(
    tx: &Object,
    limits: QueueLimits,
    now: u64,
    ops: &[WriteOp],
    expiry: mail::Expiry<'_>,
) -> Result<Applied, TxError> {
    let now_i = ops::big(now);
    // Step 1: the keys to lock, sorted.
    let mut channel_keys: Vec<&[u8]> = ops.iter().map(channel_of).filter(|c| !c.is_empty()).collect();
    channel_keys.sort_unstable();
    channel_keys.dedup();
    let mut queue_keys: Vec<&[u8]> =
        ops.iter().flat_map(|op| items(op).unwrap_or_default().into_iter().map(|(w, _)| &w[..])).collect();
    queue_keys.sort_unstable();
    queue_keys.dedup();

    let lock_channels = tx
        .prepare_cached(
            "INSERT INTO qpq_channels (id, last_seq, touched_ms)
             SELECT c, 0, $2 FROM unnest($1::bytea[]) WITH ORDINALITY AS t(c, o) ORDER BY o
             ON CONFLICT (id) DO UPDATE SET touched_ms = excluded.touched_ms
             RETURNING id, last_seq",
        )
        .await?;
    let lock_queues = tx.prepare_cached(super::ops::LOCK_QUEUE_ROWS).await?;
    let totals = tx
        .prepare_cached(
            "SELECT coalesce((SELECT value FROM qpq_meta WHERE name = 'seq_floor'), 0),
                    coalesce((SELECT value FROM qpq_meta WHERE name = 'channel_seq_floor'), 0),
                    (SELECT coalesce(sum(bytes), 0)::bigint FROM qpq_stored_bytes)",
        )
        .await?;
    let read_freed = tx.prepare_cached(ops::READ_FREED).await?;
    // Sent in this order on one connection, so locks are taken in this order; the freed rows
    // are read by a statement after the one that locks their queue rows (see `ops::READ_FREED`).
    // Every answer is awaited, then the first error in statement order is the one returned:
    // when a statement fails, every later one fails with "current transaction is aborted", and
    // the error that counts is the first (a deadlock or serialization failure, run again), not
    // one of those (a plain error). `try_join!` returned whichever it happened to poll first.
    let (begun, channel_rows, queue_rows, totals, freed_rows) = tokio::join!(
        tx.batch_execute("BEGIN"),
        async {
            if channel_keys.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&lock_channels, &[&channel_keys, &now_i]).await
        },
        async {
            if queue_keys.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&lock_queues, &[&queue_keys]).await
        },
        async {
            // A batch none of whose requests has an item to store takes no number.
            if queue_keys.is_empty() {
                return Ok(None);
            }
            tx.query_one(&totals, &[]).await.map(Some)
        },
        async {
            if queue_keys.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&read_freed, &[&queue_keys]).await
        },
    );
    begun?;
    let (channel_rows, queue_rows, totals, freed_rows) = (channel_rows?, queue_rows?, totals?, freed_rows?);
    let (seq_floor, channel_floor, mut used): (i64, i64, i64) = match totals {
        Some(t) => (t.get(0), t.get(1), t.get(2)),
        None => (0, 0, 0),
    };

    // Step 2, in memory. A new row (0) counts on from its floor (the schema's invariant). The
    // rows step 1 created are remembered: those no accepted request uses are deleted in step 3.
    // (A channel row committed at 0 was left by a refused request before this: it handed out no
    // number, so deleting it is as safe.)
    let mut channels: HashMap<Vec<u8>, i64> = HashMap::with_capacity(channel_rows.len());
    let mut new_channels: HashSet<Vec<u8>> = HashSet::new();
    for row in channel_rows {
        let id: Vec<u8> = row.get(0);
        let last: i64 = row.get(1);
        if last == 0 {
            new_channels.insert(id.clone());
        }
        channels.insert(id, if last == 0 { channel_floor } else { last });
    }
    let freed_before = ops::read_freed(freed_rows)?;
    let mut queues: HashMap<IdentityKey, Queue> = HashMap::with_capacity(queue_rows.len());
    let mut new_queues: HashSet<IdentityKey> = HashSet::new();
    for row in queue_rows {
        let who = ops::identity(row.get(0))?;
        let next: i64 = row.get(1);
        if next == 0 {
            new_queues.insert(who);
        }
        let next = if next == 0 { seq_floor.max(1) } else { next };
        let (freed_count, freed_bytes) = freed_before.get(&who).copied().unwrap_or((0, 0));
        queues.insert(who, Queue { next, count: row.get(2), bytes: row.get(3), freed_count, freed_bytes });
    }
    // The queues this batch would overflow lose the expired mail at their heads first (see
    // `mail::EXPIRE_HEADS`): one more round trip, only when some queue is full.
    let wanted = ops.iter().flat_map(|op| {
        let channel = channel_of(op);
        items(op).unwrap_or_default().into_iter().map(move |(who, p)| (who, mail::queue_charge(channel, p)))
    });
    let held = |who: &IdentityKey| {
        if expiry.young.is_some_and(|young| young.fresh(who, now)) {
            return None;
        }
        queues.get(who).map(|q| (q.count - q.freed_count, q.bytes - q.freed_bytes))
    };
    let required: Vec<&IdentityKey> = ops.iter().filter_map(required_of).collect();
    let full = mail::overflowing(limits, wanted, &required, held);
    let (mut purged_quota, mut purged) = (0i64, false);
    if !full.is_empty() {
        let (cutoff, rows_per_queue) = mail::expire_heads_bounds(limits, expiry.by);
        let stmt = tx.prepare_cached(mail::EXPIRE_HEADS).await?;
        let keys: Vec<&[u8]> = full.iter().map(|k| &k[..]).collect();
        let (freed, quota) = mail::expired_heads(tx.query(&stmt, &[&keys, &cutoff, &rows_per_queue]).await?)?;
        // (Noted before the commit: should it fail, the next look is only a little late.)
        if let Some(young) = expiry.young {
            young.note(&full, &freed, now);
        }
        purged = !freed.is_empty();
        for (who, (n, bytes)) in freed {
            if let Some(q) = queues.get_mut(&who) {
                q.freed_count += n;
                q.freed_bytes += bytes;
            }
        }
        purged_quota = quota;
        used -= quota;
    }
    let mut rows = mail::NewMail::default();
    let mut adding_total = 0i64;
    let mut woken: Vec<IdentityKey> = Vec::new();
    let mut used_channels: HashSet<&[u8]> = HashSet::new();
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        let items = match items(op) {
            Ok(items) => items,
            Err(refused) => {
                outcomes.push(Err(refused));
                continue;
            }
        };
        let channel = channel_of(op);
        let shared = matches!(op, WriteOp::Fanout { .. });
        // A fanout skips the recipients whose queues are full and stores for the others (the
        // schema's `enqueueFanout`); refused only when it would store for nobody.
        let room = if shared {
            // Against the state the requests before it left.
            let held = |who: &IdentityKey| {
                let q = queues.get(who).ok_or_else(missing_row)?;
                Ok((q.count - q.freed_count, q.bytes - q.freed_bytes))
            };
            match mail::fanout_room(limits, channel, &items, required_of(op), held) {
                Ok(room) => Some(room),
                Err(TxError::Store(refused @ StoreError::QueueFull { .. })) => {
                    outcomes.push(Err(refused));
                    continue;
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let items = match &room {
            Some(room) => mail::kept(&items, room),
            None => items,
        };
        let charge = mail::quota_charge(shared, channel, &items);
        let refused = plan_enqueue(limits, channel, &items, &queues, used, charge);
        if let Err(refused) = refused {
            outcomes.push(Err(refused));
            continue;
        }
        // Accepted: take the numbers.
        let channel_seq = match channels.get_mut(channel) {
            Some(last) => {
                *last = last.saturating_add(1);
                used_channels.insert(channel);
                *last
            }
            None => 0,
        };
        let mut seqs = Vec::with_capacity(items.len());
        for &(who, payload) in &items {
            let q = queues.get_mut(who).ok_or_else(missing_row)?;
            let seq = q.next;
            q.next = seq.saturating_add(1);
            q.count += 1;
            q.bytes += mail::queue_charge(channel, payload);
            woken.push(*who);
            seqs.push(seq);
        }
        used += charge;
        adding_total += charge;
        rows.add(shared, channel, channel_seq, &items, &seqs);
        let seqs = match &room {
            Some(room) => mail::spread_seqs(room, seqs),
            None => seqs,
        };
        outcomes.push(Ok(Outcome::Enqueued {
            channel_seq: ops::unbig(channel_seq),
            seqs: seqs.into_iter().map(ops::unbig).collect(),
        }));
    }
    woken.sort_unstable();
    woken.dedup();

    // Step 3: write it all. Only the rows of accepted requests (`woken` is their recipients)
    // are written back; the rows step 1 created for refused requests alone are deleted: a
    // refused fanout naming 10,000 fresh keys, in a batch with an accepted enqueue, left 10,000
    // empty queue rows (and its channel's row) for the sweep.
    let write_mail = tx.prepare_cached(WRITE_MAIL).await?;
    let mut queue_state: Vec<(&IdentityKey, &Queue)> =
        queues.iter().filter(|(k, _)| woken.binary_search(k).is_ok()).collect();
    queue_state.sort_unstable_by_key(|(k, _)| **k);
    let q_keys: Vec<&[u8]> = queue_state.iter().map(|(k, _)| &k[..]).collect();
    let q_next: Vec<i64> = queue_state.iter().map(|(_, q)| q.next).collect();
    let q_count: Vec<i64> = queue_state.iter().map(|(_, q)| q.count).collect();
    let q_bytes: Vec<i64> = queue_state.iter().map(|(_, q)| q.bytes).collect();
    let mut channel_state: Vec<(&Vec<u8>, &i64)> =
        channels.iter().filter(|(k, _)| used_channels.contains(&k[..])).collect();
    channel_state.sort_unstable();
    let c_keys: Vec<&[u8]> = channel_state.iter().map(|(k, _)| &k[..]).collect();
    let c_last: Vec<i64> = channel_state.iter().map(|(_, l)| **l).collect();
    let drop_queues: Vec<&[u8]> =
        new_queues.iter().filter(|k| woken.binary_search(k).is_err()).map(|k| &k[..]).collect();
    let drop_channels: Vec<&[u8]> =
        new_channels.iter().filter(|c| !used_channels.contains(&c[..])).map(|c| &c[..]).collect();
    // The mail, its queue and channel rows (locked in step 1) and the shard (the last lock of
    // every batch) in one statement. A batch whose every request was refused stored nothing
    // and is rolled back: step 1 created the channel and queue rows it named, and a stranger
    // repeating refused enqueues to fresh keys and channel ids left rows nothing charged.
    let mail_params = rows.params(&now_i);
    let mut write_params: Vec<&(dyn ToSql + Sync)> = mail_params.to_vec();
    write_params.extend_from_slice(&[&q_keys, &q_next, &q_count, &q_bytes, &c_keys, &c_last]);
    // What the expired heads freed comes off the shard with what this batch adds.
    let shard_delta = adding_total - purged_quota;
    write_params.extend_from_slice(&[&ops::STORED_BYTES_SHARDS, &shard_delta, &drop_queues, &drop_channels]);
    // The write's error before the COMMIT's (see step 1).
    // Expired mail deleted to make room stays deleted even when every request was refused.
    let wrote = !rows.is_empty() || purged;
    let (written, committed) = tokio::join!(
        async {
            if !wrote {
                return Ok(0);
            }
            tx.execute(&write_mail, &write_params).await
        },
        tx.batch_execute(if wrote { "COMMIT" } else { "ROLLBACK" }),
    );
    written?;
    committed?;
    Ok(Applied { outcomes, woken, wrote })
}

/// An ack-only batch: [`ACK_BATCH`] between BEGIN and COMMIT, one round trip.
async fn apply_acks(tx: &Object, ops: &[WriteOp]) -> Result<Applied, TxError> {
    let mut acks: HashMap<&IdentityKey, i64> = HashMap::new();
    for op in ops {
        if let WriteOp::Ack { who, up_to } = op {
            let up_to = ops::big(*up_to);
            acks.entry(who).and_modify(|u| *u = (*u).max(up_to)).or_insert(up_to);
        }
    }
    let (keys, up_to): (Vec<&[u8]>, Vec<i64>) = acks.iter().map(|(w, u)| (&w[..], *u)).unzip();
    let stmt = tx.prepare_cached(ACK_BATCH).await?;
    let params: [&(dyn ToSql + Sync); 3] = [&keys, &up_to, &ops::STORED_BYTES_SHARDS];
    // Errors in statement order (see `apply_mail`).
    let (begun, acked, committed) =
        tokio::join!(tx.batch_execute("BEGIN"), tx.query(&stmt, &params), tx.batch_execute("COMMIT"));
    begun?;
    let acked = acked?;
    committed?;
    let mut removed = vec![0u32; ops.len()];
    // No entry deleted: nothing else was written either (every other CTE works on `d`'s rows).
    let wrote = !acked.is_empty();
    for row in acked {
        let who = ops::identity(row.get(0))?;
        count_removed(ops, &mut removed, &who, row.get(1));
    }
    let outcomes = removed.into_iter().map(|removed| Ok(Outcome::Acked { removed })).collect();
    Ok(Applied { outcomes, woken: Vec::new(), wrote })
}

/// Counts the deleted entry `seq` of `who` to the ack request that removed it: the one with the
/// smallest `up_to` at or above it, earliest first, as if the batch's acks ran one after the
/// other (a smaller ack earlier in the batch took it first).
fn count_removed(ops: &[WriteOp], removed: &mut [u32], who: &IdentityKey, seq: i64) {
    let mut first_ack: Option<(usize, i64)> = None;
    for (i, op) in ops.iter().enumerate() {
        if let WriteOp::Ack { who: w, up_to } = op {
            let up_to = ops::big(*up_to);
            if w == who && seq <= up_to && first_ack.is_none_or(|(_, u)| up_to < u) {
                first_ack = Some((i, up_to));
            }
        }
    }
    if let Some((i, _)) = first_ack {
        removed[i] = removed[i].saturating_add(1);
    }
}

/// Checks every cap an enqueue would pass, against the state the requests before it left;
/// `adding` is its storage-quota charge.
fn plan_enqueue(
    limits: QueueLimits,
    channel: &[u8],
    items: &[(&IdentityKey, &[u8])],
    queues: &HashMap<IdentityKey, Queue>,
    used: i64,
    adding: i64,
) -> Result<(), StoreError> {
    let mut planned: HashMap<&IdentityKey, (i64, i64)> = HashMap::new();
    for (who, payload) in items {
        let (count, bytes) = match planned.get(*who) {
            Some(p) => *p,
            None => {
                let q = queues.get(*who).ok_or_else(|| unavailable(missing_row()))?;
                (q.count - q.freed_count, q.bytes - q.freed_bytes)
            }
        };
        let add = mail::queue_charge(channel, payload);
        if let Some(full) = mail::queue_full(limits, count, bytes, add) {
            return Err(full);
        }
        planned.insert(*who, (count + 1, bytes + add));
    }
    let used = ops::unbig(used);
    if used.saturating_add(ops::unbig(adding)) > limits.max_stored_bytes {
        return Err(StoreError::OverQuota { used, adding: ops::unbig(adding), max: limits.max_stored_bytes });
    }
    Ok(())
}

fn missing_row() -> TxError {
    TxError::Store(StoreError::Db("batch: a recipient's queue row went missing".to_string()))
}
