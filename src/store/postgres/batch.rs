//! Group commit on PostgreSQL: the enqueues, or the acks, waiting at one moment run as one
//! transaction, in one round trip whatever their number.
//!
//! Why: one transaction per request cost about ten statements (each a loopback round trip and a
//! backend wake-up) and one WAL flush per message, and held the recipient's queue row locked
//! across all of them; on a small machine that, not the disk, capped throughput (issue 13).
//!
//! How, like the redb writer: a worker task per lane and node ([`limits::PG_BATCH_WORKERS`])
//! takes every request waiting (up to [`limits::PG_BATCH_OPS`]), so what arrives during one
//! transaction's WAL flush forms the next batch, and sends it as BEGIN, one call of a function
//! of the schema (version 4) and COMMIT, pipelined: an enqueue batch to `qpq_enqueue_batch`
//! ([`super::enqueue`], where the argument for its contracts is), an ack batch to
//! `qpq_ack_batch` ([`super::ack`]). The function decides everything that needs the rows
//! (numbers, caps, what an ack freed), so PostgreSQL holds the batch's locks for the time of
//! one statement and one WAL flush, not across a second round trip to this node. One WAL flush
//! acknowledges the whole batch. No NOTIFY here: it would hold a cluster-wide lock across the
//! flush; the other nodes are told after the commit ([`super::wake`]). A statement that fails
//! aborts the transaction, so the COMMIT behind it only rolls back; the batch answers with that
//! statement's error, never success. On any error the worker sends ROLLBACK before the
//! connection goes back to the pool.
//!
//! Acks lock no queue row (schema version 3): a node whose batches are acks does not wait for
//! the WAL flush of a node enqueueing to the same recipients, nor the other way round. So acks
//! have a lane of their own on each node (their own queue and worker): an ack batch and an
//! enqueue batch run side by side and PostgreSQL shares one WAL flush between them, where one
//! lane made a recipient's ack wait for the flush of the enqueue before it (a single sender on
//! one node lost 40% of its rate that way). An enqueue then does not see the room an ack in
//! flight is making, which only makes its caps conservative (see [`super::ops`]).
//!
//! Every batch locks rows in the same order (channels by key, then queues by key, then freed
//! rows by key, then one shard), on every node, so batches queue behind each other instead of
//! deadlocking. A request the batch cannot explain (a database error, not a refusal) makes the
//! batch run again one request per transaction, so only the guilty request fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Inner, TxError, ack, enqueue, unavailable};
use crate::limits;
use crate::store::{IdentityKey, Outcome, StoreError, WriteOp};

/// One queued request and where its answer goes.
pub(super) type Request = (WriteOp, oneshot::Sender<Result<Outcome, StoreError>>);

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
        // A lane holds one kind (see `PgStore::write`); anything else runs one by one.
        let one_kind = ack::all_acks(&ops) || enqueue::all_enqueues(&ops);
        let committed = if one_kind { inner.commit_batch(&ops).await } else { Err(mixed()) };
        match committed {
            Ok(Applied { outcomes, woken }) => {
                inner.notifier.notify(woken.iter());
                inner.wakeups.push(woken.iter());
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // The caller may have gone (its connection closed): nothing to tell.
                    let _ = reply.send(outcome);
                }
            }
            Err(StoreError::Db(m)) if ops.len() > 1 || !one_kind => {
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

fn mixed() -> StoreError {
    StoreError::Db("a batch mixing acks and enqueues".to_string())
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
    pub(super) outcomes: Vec<Result<Outcome, StoreError>>,
    pub(super) woken: Vec<IdentityKey>,
}

impl Inner {
    /// Runs `ops` as one transaction, again after a deadlock or serialization failure.
    async fn commit_batch(&self, ops: &[WriteOp]) -> Result<Applied, StoreError> {
        let now_ms = self.clock.now_ms();
        let mut last = String::new();
        for _ in 0..limits::PG_TX_ATTEMPTS {
            let client = self.pool.get().await.map_err(|e| unavailable(e.into()))?;
            let applied = if ack::all_acks(ops) {
                ack::apply(&client, ops, &self.batch_round_trips).await
            } else {
                enqueue::apply(&client, self.limits, now_ms, ops, &self.batch_round_trips).await
            };
            if applied.is_err() {
                // Ends the transaction if the failure left one open (a warning, not an error,
                // when the pipelined COMMIT already ended it); a dead connection is dropped by
                // the pool.
                let _ = client.batch_execute("ROLLBACK").await;
            }
            match applied {
                Ok(applied) => {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    return Ok(applied);
                }
                Err(TxError::Conflict(m)) => last = m,
                Err(TxError::Store(e)) => return Err(e),
            }
            tracing::debug!(error = %last, "postgresql batch conflicted, running it again");
        }
        Err(StoreError::Unavailable(format!("transaction kept conflicting: {last}")))
    }
}

/// The recipient and body of each item of an enqueue or fanout (a fanout's items all share its
/// one stored payload: see [`mail`]).
pub(super) fn items_of(op: &WriteOp) -> Result<Vec<(&IdentityKey, &[u8])>, StoreError> {
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
