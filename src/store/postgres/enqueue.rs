//! An enqueue batch in one round trip: the database decides the numbers and the caps.
//!
//! Why (issue 13): the group commit ([`super::batch`]) ran an enqueue batch in two pipelined
//! round trips (lock the rows and read the floors and caps; then write and COMMIT), deciding in
//! this process in between, and PostgreSQL held the batch's row locks while it waited for the
//! second. With one serial enqueue lane per node and batches of about four messages, that
//! second round trip was the node's limit.
//!
//! How: the function `qpq_enqueue_batch` (schema version 4, see [`super::schema`]) does what
//! this process did between the two round trips. The batch goes as arrays, pipelined with
//! BEGIN before and COMMIT after: one round trip, whose COMMIT answers only once the WAL is
//! flushed (`synchronous_commit = on`); nothing is answered before it.
//!
//! What each request gets, and why the contracts hold:
//! - All or nothing per request: the function applies a request's items to its in-memory copy
//!   of the queue rows one by one, and takes them all back when one hits a cap or the request
//!   passes the storage quota; a refused request writes no row and takes no number, so it does
//!   not disturb the others. Refusals are computed, not raised: no SAVEPOINT is needed.
//! - One `channelSeq` per request, and per-recipient `seq`s that only grow, across nodes: the
//!   function locks the batch's channel rows, then its queue rows, each sorted by key here
//!   (the order of every batch and of the one-request path in [`super::ops`], so nodes queue
//!   behind each other instead of deadlocking), and holds them to COMMIT; the numbers are taken
//!   under those locks, a new row counting on from its floor.
//! - Caps: each request is checked against the state the requests before it left (the same
//!   in-memory copy). The floors, the stored-bytes total and the freed rows are read by
//!   statements after the ones that take the locks; in a volatile PL/pgSQL function each
//!   statement takes a new snapshot in READ COMMITTED, so they see everything committed before
//!   the locks were held: the caps are as conservative as before (see [`super::ops`]).
//! - A database error (not a refusal) aborts the transaction, the pipelined COMMIT only rolls
//!   back, and the caller runs the batch again one request per transaction.
//!
//! What stays here: the arrays (which request owns which items and payloads, and the charges,
//! all fixed by the requests themselves), a fanout's duplicate recipients (refused before the
//! batch goes), and turning the answer into outcomes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

use super::batch::{Applied, items_of};
use super::{TxError, mail, ops};
use crate::limits;
use crate::store::{IdentityKey, Outcome, QueueLimits, StoreError, WriteOp};

/// The call; its parameters are the function's, in order (see [`Call`]).
const CALL: &str = "SELECT o_status, o_channel_seq, o_held, o_held_bytes, o_seqs FROM qpq_enqueue_batch(
     $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";

/// What `qpq_enqueue_batch` answers per request: accepted, over a queue cap, over the quota.
const ACCEPTED: i32 = 0;
const QUEUE_FULL: i32 = 1;
const OVER_QUOTA: i32 = 2;

/// The batch as the function's array parameters (1-based indexes, as SQL arrays are).
#[derive(Default)]
struct Call<'a> {
    /// Distinct channels, sorted: the lock order.
    channels: Vec<&'a [u8]>,
    /// Distinct recipients, sorted: the lock order.
    queues: Vec<&'a [u8]>,
    /// Per request sent: its channel's index in `channels` (0: none).
    req_channel: Vec<i32>,
    /// Per request sent: the index of its last item (its items follow the previous request's).
    req_end: Vec<i32>,
    /// Per request sent: its storage-quota charge.
    req_charge: Vec<i64>,
    item_queue: Vec<i32>,
    item_payload: Vec<i32>,
    item_bytes: Vec<i64>,
    item_quota: Vec<i64>,
    pay_body: Vec<&'a [u8]>,
    pay_req: Vec<i32>,
    pay_refs: Vec<i64>,
    pay_quota: Vec<i64>,
}

/// An index as the function takes it. Batches are bounded far below i32::MAX
/// ([`limits::PG_BATCH_OPS`] requests of bounded size), so this never saturates in practice.
fn index(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

/// Whether `ops` can go to the function: enqueues and fanouts only (acks keep their lane's
/// two round trips, see [`super::batch`]).
pub(super) fn all_enqueues(ops: &[WriteOp]) -> bool {
    ops.iter().all(|op| matches!(op, WriteOp::Enqueue { .. } | WriteOp::Fanout { .. }))
}

/// Runs `ops` (enqueues and fanouts) as one transaction in one round trip: BEGIN, the call,
/// COMMIT. Ok means committed; after an error the caller rolls back. `trips` counts the round
/// trips.
pub(super) async fn apply(
    tx: &Object,
    limits: QueueLimits,
    now: u64,
    ops: &[WriteOp],
    trips: &AtomicU64,
) -> Result<Applied, TxError> {
    // Per op: its items, or its refusal (a fanout naming someone twice), decided here.
    let planned: Vec<Result<Vec<(&IdentityKey, &[u8])>, StoreError>> = ops.iter().map(items_of).collect();
    let mut channels: Vec<&[u8]> = ops.iter().map(channel_of).filter(|c| !c.is_empty()).collect();
    channels.sort_unstable();
    channels.dedup();
    let mut queues: Vec<&[u8]> =
        planned.iter().flat_map(|p| p.iter().flatten()).map(|(w, _)| &w[..]).collect();
    queues.sort_unstable();
    queues.dedup();
    let queue_index: HashMap<&[u8], i32> = queues.iter().enumerate().map(|(i, k)| (*k, index(i + 1))).collect();
    let mut call = Call { channels, queues, ..Call::default() };
    // sent[i]: the index among the requests sent of op i (None: refused here).
    let mut sent = Vec::with_capacity(ops.len());
    for (op, items) in ops.iter().zip(&planned) {
        let Ok(items) = items else {
            sent.push(None);
            continue;
        };
        sent.push(Some(call.req_end.len()));
        call.add(op, items, &queue_index);
    }

    let stmt = tx.prepare_cached(CALL).await?;
    let now_i = ops::big(now);
    let (max_messages, max_bytes) = (ops::big(limits.max_messages), ops::big(limits.max_bytes));
    let max_stored = ops::big(limits.max_stored_bytes);
    let c = &call;
    trips.fetch_add(1, Ordering::Relaxed);
    let params: [&(dyn ToSql + Sync); 18] = [
        &now_i,
        &max_messages,
        &max_bytes,
        &max_stored,
        &ops::STORED_BYTES_SHARDS,
        &c.channels,
        &c.queues,
        &c.req_channel,
        &c.req_end,
        &c.req_charge,
        &c.item_queue,
        &c.item_payload,
        &c.item_bytes,
        &c.item_quota,
        &c.pay_body,
        &c.pay_req,
        &c.pay_refs,
        &c.pay_quota,
    ];
    let ((), row, ()) = tokio::try_join!(
        tx.batch_execute("BEGIN"),
        tx.query_one(&stmt, &params),
        tx.batch_execute("COMMIT"),
    )?;
    let status: Vec<i32> = row.try_get(0)?;
    let channel_seq: Vec<i64> = row.try_get(1)?;
    let held: Vec<i64> = row.try_get(2)?;
    let held_bytes: Vec<i64> = row.try_get(3)?;
    let seqs: Vec<i64> = row.try_get(4)?;
    let damaged = || TxError::Store(StoreError::Db("enqueue batch: an answer of the wrong shape".to_string()));
    let n = call.req_end.len();
    if [status.len(), channel_seq.len(), held.len(), held_bytes.len()] != [n; 4]
        || seqs.len() != call.item_queue.len()
    {
        return Err(damaged());
    }

    let mut outcomes = Vec::with_capacity(ops.len());
    let mut woken: Vec<IdentityKey> = Vec::new();
    let mut first_item = 0usize;
    for (items, sent) in planned.into_iter().zip(sent) {
        let (items, r) = match (items, sent) {
            (Ok(items), Some(r)) => (items, r),
            (Err(refused), _) => {
                outcomes.push(Err(refused));
                continue;
            }
            (Ok(_), None) => return Err(damaged()),
        };
        let end = first_item + items.len();
        let outcome = match status[r] {
            ACCEPTED => {
                woken.extend(items.iter().map(|(w, _)| **w));
                let seqs = seqs.get(first_item..end).ok_or_else(damaged)?;
                Ok(Outcome::Enqueued {
                    channel_seq: ops::unbig(channel_seq[r]),
                    seqs: seqs.iter().map(|s| ops::unbig(*s)).collect(),
                })
            }
            QUEUE_FULL => Err(StoreError::QueueFull {
                count: ops::unbig(held[r]),
                bytes: ops::unbig(held_bytes[r]),
                max_count: limits.max_messages,
                max_bytes: limits.max_bytes,
            }),
            OVER_QUOTA => Err(StoreError::OverQuota {
                used: ops::unbig(held[r]),
                adding: ops::unbig(call.req_charge[r]),
                max: limits.max_stored_bytes,
            }),
            _ => return Err(damaged()),
        };
        outcomes.push(outcome);
        first_item = end;
    }
    woken.sort_unstable();
    woken.dedup();
    Ok(Applied { outcomes, woken })
}

fn channel_of(op: &WriteOp) -> &[u8] {
    match op {
        WriteOp::Enqueue { channel, .. } | WriteOp::Fanout { channel, .. } => channel,
        _ => &[],
    }
}

impl<'a> Call<'a> {
    /// Adds one request and its items; a fanout's items share one payload (see [`mail`]).
    fn add(&mut self, op: &'a WriteOp, items: &[(&'a IdentityKey, &'a [u8])], queue_index: &HashMap<&[u8], i32>) {
        let channel = channel_of(op);
        let shared = matches!(op, WriteOp::Fanout { .. });
        let req = index(self.req_end.len() + 1);
        let channel_index = match self.channels.binary_search(&channel) {
            Ok(i) if !channel.is_empty() => index(i + 1),
            _ => 0,
        };
        self.req_channel.push(channel_index);
        self.req_charge.push(mail::quota_charge(shared, channel, items));
        let mut shared_payload = None;
        for &(who, payload) in items {
            let size = mail::queue_charge(channel, payload);
            let (payload_index, quota) = match shared_payload {
                Some(p) => (p, ops::big(limits::FANOUT_ENTRY_BYTES)),
                None => {
                    self.pay_body.push(payload);
                    self.pay_req.push(req);
                    let p = index(self.pay_body.len());
                    if shared {
                        self.pay_refs.push(items.len() as i64);
                        self.pay_quota.push(mail::shared_row_charge(channel, payload));
                        shared_payload = Some(p);
                        (p, ops::big(limits::FANOUT_ENTRY_BYTES))
                    } else {
                        self.pay_refs.push(1);
                        self.pay_quota.push(0);
                        (p, size)
                    }
                }
            };
            // Every item's recipient is in `queues` (built from these very items).
            self.item_queue.push(queue_index.get(&who[..]).copied().unwrap_or(0));
            self.item_payload.push(payload_index);
            self.item_bytes.push(size);
            self.item_quota.push(quota);
        }
        self.req_end.push(index(self.item_queue.len()));
    }
}
