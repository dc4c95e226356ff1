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

/// Deletes the expired entries (enqueued before `$2`) among the first `$3` of each queue of
/// `$1` (seq order: a queue's oldest), releases or deletes their payloads and adds what went to
/// the recipients' freed rows, as an ack does; answers per recipient the entries and bytes
/// freed and, on every row, the quota freed in all. So a queue full of mail past its TTL
/// (hidden from fetches already) takes new mail before the sweep comes round (see
/// [`limits::EXPIRED_HEAD_ROWS`]). The caller holds the queue rows; this locks entries
/// (skipping those a sweep or an ack is deleting: it never waits for them), payloads by id,
/// then freed rows by key (`t` reads the quota sums, so `d` and `x` have run, before `f`), the
/// order of the ack batch and of the sweep, neither of which holds a queue row meanwhile.
pub(super) const EXPIRE_HEADS: &str = concat!(
    "WITH h AS (
         SELECT e.recipient, e.seq FROM qpq_entries e
         WHERE (e.recipient, e.seq) IN (
             SELECT x.recipient, x.seq FROM unnest($1::bytea[]) AS r(who)
             CROSS JOIN LATERAL (SELECT recipient, seq, enqueued_at_ms FROM qpq_entries
                                 WHERE recipient = r.who ORDER BY seq LIMIT $3) x
             WHERE x.enqueued_at_ms < $2)
         FOR UPDATE SKIP LOCKED
     ), d AS (
         DELETE FROM qpq_entries e USING h WHERE e.recipient = h.recipient AND e.seq = h.seq
         RETURNING e.recipient, e.payload_id, e.bytes, e.quota
     ), ",
    release_or_delete_payloads!(),
    ", t AS (SELECT ((SELECT coalesce(sum(quota), 0) FROM d) + (SELECT coalesce(sum(quota), 0) FROM x))::bigint AS q),
       f AS (INSERT INTO qpq_queue_freed (recipient, count, bytes)
             SELECT recipient, count(*), sum(bytes)::bigint FROM d WHERE (SELECT q FROM t) IS NOT NULL
             GROUP BY recipient ORDER BY recipient
             ON CONFLICT (recipient) DO UPDATE SET count = qpq_queue_freed.count + excluded.count,
                                                   bytes = qpq_queue_freed.bytes + excluded.bytes
             RETURNING 1)
     SELECT recipient, count(*)::bigint, sum(bytes)::bigint, (SELECT q FROM t), (SELECT count(*) FROM f)
     FROM d GROUP BY recipient"
);

/// The queues that `wanted` (the mail a request or a batch would add: recipient, charge) would
/// overflow, given what each holds (`held`: messages, bytes, after what acks freed; None for a
/// queue not to look at), at most [`limits::EXPIRED_HEAD_QUEUES`], the `required` recipients
/// of fanouts first (a stranger naming 64 full queues must not keep a committer's own from
/// being looked at), in key order: the ones [`EXPIRE_HEADS`] looks at.
pub(super) fn overflowing<'k>(
    limits: QueueLimits,
    wanted: impl Iterator<Item = (&'k IdentityKey, i64)>,
    required: &[&IdentityKey],
    held: impl Fn(&IdentityKey) -> Option<(i64, i64)>,
) -> Vec<&'k IdentityKey> {
    let mut want: std::collections::BTreeMap<&IdentityKey, (i64, i64)> = Default::default();
    for (who, charge) in wanted {
        let w = want.entry(who).or_default();
        w.0 = w.0.saturating_add(1);
        w.1 = w.1.saturating_add(charge);
    }
    let mut full: Vec<&IdentityKey> = want
        .into_iter()
        .filter(|(who, (n, add))| {
            held(who).is_some_and(|(count, bytes)| {
                ops::unbig(count.saturating_add(*n)) > limits.max_messages
                    || ops::unbig(bytes.saturating_add(*add)) > limits.max_bytes
            })
        })
        .map(|(who, _)| who)
        .collect();
    // Stable: key order within each group.
    full.sort_by_key(|who| !required.contains(who));
    full.truncate(limits::EXPIRED_HEAD_QUEUES);
    full.sort_unstable();
    full
}

/// Per recipient, the (entries, bytes) some statement freed from its queue.
pub(super) type FreedPerQueue = std::collections::HashMap<IdentityKey, (i64, i64)>;

/// Full queues whose head a node found young, and until when (ms) its batches need not look
/// again ([`limits::EXPIRED_HEAD_RECHECK_MS`]). A member who stopped reading keeps a full queue
/// of young mail, and without this every batch carrying a message of that member's groups paid
/// [`EXPIRE_HEADS`]'s round trip for nothing (a review of the change).
#[derive(Default)]
pub(super) struct YoungHeads(std::sync::Mutex<std::collections::HashMap<IdentityKey, u64>>);

impl YoungHeads {
    /// Whether `who`'s head was found young less than the recheck time before `now`.
    pub(super) fn fresh(&self, who: &IdentityKey, now: u64) -> bool {
        // A poisoned lock (a panic elsewhere) only costs the round trips this saves.
        self.0.lock().map(|m| m.get(who).is_some_and(|&until| now < until)).unwrap_or(false)
    }

    /// Notes what [`EXPIRE_HEADS`] found in the queues it `looked` at: those it `freed` nothing
    /// from are left alone until the recheck time.
    pub(super) fn note(&self, looked: &[&IdentityKey], freed: &FreedPerQueue, now: u64) {
        let Ok(mut young) = self.0.lock() else { return };
        if young.len() >= limits::YOUNG_HEADS_MAX {
            young.retain(|_, until| now < *until);
            if young.len() >= limits::YOUNG_HEADS_MAX {
                young.clear();
            }
        }
        for who in looked {
            if freed.contains_key(*who) {
                young.remove(*who);
            } else {
                young.insert(**who, now.saturating_add(limits::EXPIRED_HEAD_RECHECK_MS));
            }
        }
    }
}

/// [`EXPIRE_HEADS`]'s answer: per recipient the (entries, bytes) freed, and the quota freed.
pub(super) fn expired_heads(rows: Vec<tokio_postgres::Row>) -> Result<(FreedPerQueue, i64), TxError> {
    let mut quota = 0;
    let mut freed = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        freed.insert(ops::identity(row.get(0))?, (row.get(1), row.get(2)));
        quota = row.get(3);
    }
    Ok((freed, quota))
}

/// What deleting a full queue's expired head goes by: `by`, the store's
/// [`crate::clock::DeletionClock`] (the clock, but not a step forward of it), and the queues a
/// node found young lately (the group commit's; none on the one-request path).
#[derive(Clone, Copy)]
pub(super) struct Expiry<'a> {
    pub(super) by: u64,
    pub(super) young: Option<&'a YoungHeads>,
}

/// [`EXPIRE_HEADS`]'s parameters after `$1`: the cutoff (entries enqueued before it have
/// expired at `now`) and the rows looked at per queue.
pub(super) fn expire_heads_bounds(limits: QueueLimits, now: u64) -> (i64, i64) {
    (ops::big(now.saturating_sub(limits.ttl_ms)), limits::EXPIRED_HEAD_ROWS as i64)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_messages: u64) -> QueueLimits {
        QueueLimits { max_messages, max_bytes: 1 << 20, ttl_ms: 1, max_stored_bytes: 1, max_key_bytes: 1 }
    }

    #[test]
    fn a_queue_found_young_is_left_alone_until_the_recheck_time() {
        let young = YoungHeads::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let freed: FreedPerQueue = [(a, (1, 10))].into_iter().collect();
        young.note(&[&a, &b], &freed, 1_000);
        assert!(!young.fresh(&a, 1_000), "a gave up expired mail: look again when full");
        assert!(young.fresh(&b, 1_000));
        assert!(young.fresh(&b, 1_000 + limits::EXPIRED_HEAD_RECHECK_MS - 1));
        assert!(!young.fresh(&b, 1_000 + limits::EXPIRED_HEAD_RECHECK_MS));
        // Freed later: forgotten at once.
        young.note(&[&b], &[(b, (1, 10))].into_iter().collect(), 2_000);
        assert!(!young.fresh(&b, 2_000));
    }

    /// A stranger naming 64 full queues with lower keys must not keep a fanout's required
    /// recipient (a committer's own queue) from being looked at.
    #[test]
    fn required_recipients_are_looked_at_first() {
        let keys: Vec<IdentityKey> = (0..=limits::EXPIRED_HEAD_QUEUES as u8).map(|i| [i; 32]).collect();
        let required = keys[limits::EXPIRED_HEAD_QUEUES];
        let wanted = keys.iter().map(|k| (k, 10));
        let full = overflowing(limits(1), wanted, &[&required], |_| Some((1, 0)));
        assert_eq!(full.len(), limits::EXPIRED_HEAD_QUEUES);
        assert!(full.contains(&&required), "the required queue is among those looked at");
        assert!(full.windows(2).all(|w| w[0] < w[1]), "in key order");
        // Room in a queue, or a queue not to look at: not named.
        let wanted = keys.iter().take(2).map(|k| (k, 10));
        let full = overflowing(limits(2), wanted, &[], |k| (k[0] == 0).then_some((1, 0)));
        assert!(full.is_empty(), "{full:?}");
    }
}
