//! The rows of queued mail: what an enqueue or a fanout writes, what each row is charged, and
//! the SQL that inserts them and that releases them again. Shared by the group commit
//! ([`super::batch`]) and the one-request path ([`super::ops`]) so both store and charge alike.
//!
//! A payload row is shared by the entries of one fanout and deleted with its last entry; an
//! enqueue's message is kept in its entry (schema version 4). The charges match the redb
//! store's (see [`super::schema`], version 2).

use tokio_postgres::types::ToSql;

use super::{TxError, ops};
use crate::limits;
use crate::store::{IdentityKey, QueueLimits, StoreError, StoredMessage};

/// The CTEs that insert mail: the messages (`$1`–`$5`: body, channel, channel_seq, refs, quota)
/// and the entries (`$7`–`$11`: recipient, seq, the 1-based index of its message in `$1`, bytes,
/// quota), all enqueued at `$6`: the head of [`INSERT_MAIL`] and of the group commit's one
/// write statement ([`super::batch`]). A shared message (a fanout's: the only ones charged a
/// row quota, `shared_row_charge` > 0) gets a payload row its entries point at; any other is
/// written into its one entry.
macro_rules! insert_mail_ctes {
    () => {
        "p_in AS MATERIALIZED (
             SELECT CASE WHEN t.quota <> 0 THEN nextval('qpq_payloads_id_seq') END AS id, t.*
             FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bigint[]) WITH ORDINALITY
                  AS t(body, channel_id, channel_seq, refs, quota, o)
         ), p AS (
             INSERT INTO qpq_payloads (id, channel_id, channel_seq, enqueued_at_ms, body, refs, quota)
             SELECT id, channel_id, channel_seq, $6, body, refs, quota FROM p_in WHERE id IS NOT NULL
         ), e AS (
             INSERT INTO qpq_entries (recipient, seq, payload_id, bytes, quota, enqueued_at_ms,
                                      channel_id, channel_seq, body)
             SELECT e.recipient, e.seq, p_in.id, e.bytes, e.quota, $6,
                    CASE WHEN p_in.id IS NULL THEN p_in.channel_id END,
                    CASE WHEN p_in.id IS NULL THEN p_in.channel_seq END,
                    CASE WHEN p_in.id IS NULL THEN p_in.body END
             FROM unnest($7::bytea[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[])
                  AS e(recipient, seq, payload, bytes, quota)
             JOIN p_in ON p_in.o = e.payload
         )"
    };
}
pub(super) use insert_mail_ctes;

/// Inserts the payloads and entries of [`insert_mail_ctes`]'s parameters.
pub(super) const INSERT_MAIL: &str = concat!("WITH ", insert_mail_ctes!(), " SELECT count(*) FROM p_in");

/// Deletes the payloads whose last entry this transaction deleted; returns the quota they free.
/// Run after the statement that deleted the entries (see `release_payloads!`): a row at 0 refs
/// is always this transaction's own (no committed payload has 0 refs).
pub(super) const DELETE_UNREFERENCED: &str =
    "WITH x AS (DELETE FROM qpq_payloads WHERE refs <= 0 RETURNING quota)
     SELECT coalesce(sum(quota), 0)::bigint FROM x";

/// The tail of a statement whose CTE `d` deleted entries (`RETURNING payload_id, ...`): takes
/// their refs off their payloads. The payload rows are locked in id order first, so two
/// transactions releasing entries of the same fanouts queue instead of deadlocking; the UPDATE
/// then counts from the latest committed `refs`.
macro_rules! release_payloads {
    () => {
        "g AS (SELECT payload_id, count(*) AS n FROM d GROUP BY payload_id),
         l AS (SELECT p.id FROM qpq_payloads p WHERE p.id IN (SELECT payload_id FROM g) ORDER BY p.id FOR UPDATE),
         u AS (UPDATE qpq_payloads p SET refs = p.refs - g.n FROM g JOIN l ON l.id = g.payload_id
               WHERE p.id = g.payload_id)"
    };
}
pub(super) use release_payloads;

/// Like [`release_payloads`], but a payload whose last entries `d` deleted goes in the same
/// statement (CTE `x`, `RETURNING quota`) instead of being left at 0 refs for
/// [`DELETE_UNREFERENCED`]: no new row version, no entry in the partial index, one statement
/// less. Why it is safe: `l` locks the rows and, in READ COMMITTED, `FOR UPDATE` returns their
/// latest committed `refs` (after waiting for a concurrent release), so `u` and `x` decide on
/// that value, not on the statement's snapshot, and each row goes to exactly one of them; a row
/// a concurrent release changed after the snapshot is re-read by `u`/`x` (EvalPlanQual) and
/// still matches `l`'s decision, since `l` holds its lock.
macro_rules! release_or_delete_payloads {
    () => {
        "g AS (SELECT payload_id, count(*) AS n FROM d GROUP BY payload_id),
         l AS (SELECT p.id, p.refs FROM qpq_payloads p WHERE p.id IN (SELECT payload_id FROM g)
               ORDER BY p.id FOR UPDATE),
         u AS (UPDATE qpq_payloads p SET refs = p.refs - g.n FROM g JOIN l ON l.id = g.payload_id
               WHERE p.id = g.payload_id AND l.refs > g.n),
         x AS (DELETE FROM qpq_payloads p USING g JOIN l ON l.id = g.payload_id
               WHERE p.id = g.payload_id AND l.refs <= g.n RETURNING p.quota)"
    };
}
pub(super) use release_or_delete_payloads;

/// Bytes a message is charged on its recipient's queue: the whole message, which it will fetch.
pub(super) fn queue_charge(channel: &[u8], payload: &[u8]) -> i64 {
    ops::big(StoredMessage::accounted_len(17 + channel.len() + payload.len()))
}

/// The refusal of one more message of `add` bytes to a queue that holds `count` messages and
/// `bytes` bytes (after what acks freed), or None when it fits both caps: redb's check, on
/// PostgreSQL's signed counters.
pub(super) fn queue_full(limits: QueueLimits, count: i64, bytes: i64, add: i64) -> Option<StoreError> {
    crate::store::writer::queue_full(limits, ops::unbig(count), ops::unbig(bytes), ops::unbig(add))
}

/// Which recipients of a fanout (`items`, distinct) have room for it, given what each one's
/// queue holds (`held`: messages, bytes); the first refusal when none has, so the fanout is
/// refused only when it would store for nobody, or the refusal of the `required` recipient's
/// queue when it has none (that recipient must not be skipped: see `enqueueFanout`).
pub(super) fn fanout_room(
    limits: QueueLimits,
    channel: &[u8],
    items: &[(&IdentityKey, &[u8])],
    required: Option<&IdentityKey>,
    mut held: impl FnMut(&IdentityKey) -> Result<(i64, i64), TxError>,
) -> Result<Vec<bool>, TxError> {
    let mut room = Vec::with_capacity(items.len());
    let mut first_full = None;
    for (who, payload) in items {
        let (count, bytes) = held(who)?;
        let full = queue_full(limits, count, bytes, queue_charge(channel, payload));
        room.push(full.is_none());
        if let Some(full) = full {
            if required == Some(*who) {
                return Err(TxError::Store(full));
            }
            first_full.get_or_insert(full);
        }
    }
    match first_full {
        Some(full) if !room.contains(&true) => Err(TxError::Store(full)),
        _ => Ok(room),
    }
}

/// The items of a fanout whose `room` is true (the recipients it stores for), in order.
pub(super) fn kept<'i>(
    items: &[(&'i IdentityKey, &'i [u8])],
    room: &[bool],
) -> Vec<(&'i IdentityKey, &'i [u8])> {
    items.iter().zip(room).filter(|(_, fits)| **fits).map(|(item, _)| *item).collect()
}

/// A fanout's answer in request order: the stored recipients' `seqs` where `room` is true, 0
/// (no real seq is 0) for the skipped ones.
pub(super) fn spread_seqs(room: &[bool], seqs: Vec<i64>) -> Vec<i64> {
    let mut stored = seqs.into_iter();
    room.iter().map(|fits| if *fits { stored.next().unwrap_or(0) } else { 0 }).collect()
}

/// What one accepted enqueue or fanout adds to the storage quota.
pub(super) fn quota_charge(shared: bool, channel: &[u8], items: &[(&IdentityKey, &[u8])]) -> i64 {
    match (shared, items.first()) {
        (true, Some((_, payload))) => shared_row_charge(channel, payload)
            .saturating_add(ops::big(limits::FANOUT_ENTRY_BYTES).saturating_mul(items.len() as i64)),
        _ => items.iter().map(|(_, p)| queue_charge(channel, p)).sum(),
    }
}

/// A shared payload row's own charge: its reference count and the message (as in redb).
fn shared_row_charge(channel: &[u8], payload: &[u8]) -> i64 {
    8 + queue_charge(channel, payload)
}

/// New payload and entry rows, as the columns [`INSERT_MAIL`] takes.
#[derive(Default)]
pub(super) struct NewMail<'a> {
    bodies: Vec<&'a [u8]>,
    channels: Vec<&'a [u8]>,
    channel_seqs: Vec<i64>,
    refs: Vec<i64>,
    payload_quotas: Vec<i64>,
    recipients: Vec<&'a [u8]>,
    seqs: Vec<i64>,
    payload_of: Vec<i64>,
    sizes: Vec<i64>,
    entry_quotas: Vec<i64>,
}

impl<'a> NewMail<'a> {
    /// Adds one accepted request's rows: `items[i]` gets `seqs[i]`. Shared (a fanout): one
    /// payload for every item, which then all carry the same body.
    pub(super) fn add(
        &mut self,
        shared: bool,
        channel: &'a [u8],
        channel_seq: i64,
        items: &[(&'a IdentityKey, &'a [u8])],
        seqs: &[i64],
    ) {
        let mut shared_payload = None;
        for (&(who, payload), &seq) in items.iter().zip(seqs) {
            let size = queue_charge(channel, payload);
            let (index, quota) = match shared_payload {
                Some(index) => (index, ops::big(limits::FANOUT_ENTRY_BYTES)),
                None => {
                    self.bodies.push(payload);
                    self.channels.push(channel);
                    self.channel_seqs.push(channel_seq);
                    let index = self.bodies.len() as i64;
                    if shared {
                        self.refs.push(items.len() as i64);
                        self.payload_quotas.push(shared_row_charge(channel, payload));
                        shared_payload = Some(index);
                        (index, ops::big(limits::FANOUT_ENTRY_BYTES))
                    } else {
                        self.refs.push(1);
                        self.payload_quotas.push(0);
                        (index, size)
                    }
                }
            };
            self.recipients.push(&who[..]);
            self.seqs.push(seq);
            self.payload_of.push(index);
            self.sizes.push(size);
            self.entry_quotas.push(quota);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.recipients.is_empty()
    }

    /// The parameters of [`INSERT_MAIL`], enqueued at `now`.
    pub(super) fn params<'b>(&'b self, now: &'b i64) -> [&'b (dyn ToSql + Sync); 11] {
        [
            &self.bodies,
            &self.channels,
            &self.channel_seqs,
            &self.refs,
            &self.payload_quotas,
            now,
            &self.recipients,
            &self.seqs,
            &self.payload_of,
            &self.sizes,
            &self.entry_quotas,
        ]
    }
}
