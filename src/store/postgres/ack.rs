//! An ack batch in one round trip, like an enqueue batch ([`super::enqueue`]).
//!
//! Why (issue 13): an ack batch took two pipelined round trips (delete the acked entries and
//! release their payloads; then add to the freed rows and the stored-bytes shard, and COMMIT),
//! holding the entries' and payloads' locks while this process worked out the freed totals
//! from the first answer. Nothing in between needs this process.
//!
//! How: the function `qpq_ack_batch` (schema version 4, see [`super::schema`]) runs the three
//! writes as statements of its own, in the lock order of every ack (entries, payloads in id
//! order, freed rows in key order, this connection's shard last), pipelined between BEGIN and
//! COMMIT; the COMMIT answers once the WAL is flushed. It returns the entries it deleted, from
//! which each request's count is worked out here, as before: each ack removes the entries at
//! or below its `up_to` that no smaller ack of the same recipient in the batch claims.
//!
//! A payload whose last entries the batch deleted goes in the same statement as the entries,
//! instead of being left at 0 refs for a later delete: no new row version, no entry in the
//! partial index. Why that is safe: the statement locks the payload rows `FOR UPDATE` in id
//! order, and in READ COMMITTED that returns their latest committed `refs` (after waiting for
//! a concurrent release), so the decrement and the delete decide on that value, not on the
//! statement's snapshot, and each row goes to exactly one of them; a row a concurrent release
//! changed after the snapshot is re-read (EvalPlanQual) and still matches the decision, since
//! the lock is held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

use super::batch::Applied;
use super::{TxError, ops};
use crate::store::{IdentityKey, Outcome, WriteOp};

const CALL: &str = "SELECT o_recipient, o_seq FROM qpq_ack_batch($1, $2, $3)";

/// Whether every op of `ops` is an ack.
pub(super) fn all_acks(ops: &[WriteOp]) -> bool {
    ops.iter().all(|op| matches!(op, WriteOp::Ack { .. }))
}

/// Runs `ops` (acks) as one transaction in one round trip: BEGIN, the call, COMMIT. Ok means
/// committed; after an error the caller rolls back. `trips` counts the round trips.
pub(super) async fn apply(tx: &Object, ops: &[WriteOp], trips: &AtomicU64) -> Result<Applied, TxError> {
    // One `up_to` per recipient: the highest asked.
    let mut acks: HashMap<&IdentityKey, i64> = HashMap::new();
    for op in ops {
        if let WriteOp::Ack { who, up_to } = op {
            let up_to = ops::big(*up_to);
            acks.entry(who).and_modify(|u| *u = (*u).max(up_to)).or_insert(up_to);
        }
    }
    let (keys, up_to): (Vec<&[u8]>, Vec<i64>) = acks.iter().map(|(w, u)| (&w[..], *u)).unzip();
    let stmt = tx.prepare_cached(CALL).await?;
    let params: [&(dyn ToSql + Sync); 3] = [&keys, &up_to, &ops::STORED_BYTES_SHARDS];
    trips.fetch_add(1, Ordering::Relaxed);
    let ((), rows, ()) = tokio::try_join!(
        tx.batch_execute("BEGIN"),
        tx.query(&stmt, &params),
        tx.batch_execute("COMMIT"),
    )?;
    let mut removed = vec![0u32; ops.len()];
    for row in rows {
        let who = ops::identity(row.try_get(0)?)?;
        let seq: i64 = row.try_get(1)?;
        // The smallest `up_to` of this recipient covering `seq`, the earliest on a tie.
        let mut claimed: Option<(usize, i64)> = None;
        for (i, op) in ops.iter().enumerate() {
            if let WriteOp::Ack { who: w, up_to } = op {
                let up_to = ops::big(*up_to);
                if *w == who && seq <= up_to && claimed.is_none_or(|(_, u)| up_to < u) {
                    claimed = Some((i, up_to));
                }
            }
        }
        if let Some((i, _)) = claimed {
            removed[i] = removed[i].saturating_add(1);
        }
    }
    let outcomes = removed.into_iter().map(|n| Ok(Outcome::Acked { removed: n })).collect();
    Ok(Applied { outcomes, woken: Vec::new() })
}
