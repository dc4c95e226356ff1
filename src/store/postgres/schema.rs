//! The PostgreSQL schema and its versioned migrations, run at every node's start-up.
//!
//! `qpq_schema_version` lists the migrations applied. A starting node takes a transaction-level
//! advisory lock (so two nodes starting together migrate once), applies the migrations above
//! the highest listed version in that one transaction, and refuses a database whose version is
//! newer than it knows.
//!
//! # Tables (version 1)
//! | table | key | columns |
//! |---|---|---|
//! | `qpq_meta` | name | value bigint: `instance_id`, `seq_floor`, `channel_seq_floor` (see below) |
//! | `qpq_queues` | recipient | next_seq, count, bytes: one row per recipient with a queue; the row is the per-recipient lock that orders its `seq` numbers across nodes |
//! | `qpq_channels` | id | last_seq, touched_ms: the per-channel counter row for `channelSeq` |
//! | `qpq_payloads` | id (bigserial) | channel_id, channel_seq, enqueued_at_ms, body: a message body, stored once |
//! | `qpq_entries` | (recipient, seq) | payload_id, bytes, enqueued_at_ms: one recipient's queue entry pointing at a payload |
//! | `qpq_stored_bytes` | shard | bytes: the storage quota's total, split in shards so concurrent enqueues on different connections do not queue on one row |
//! | `qpq_key_packages` | id (bigserial) | identity, not_after, bytes: single-use KeyPackages, taken in id order |
//! | `qpq_key_package_owners` | identity | none: the row an upload locks to check the per-identity cap |
//! | `qpq_last_resort` | identity | not_after, bytes |
//! | `qpq_hybrid_keys` | identity | created_at_ms, value (signature ‖ created_at_ms ‖ key, as in redb) |
//!
//! # Version 2: fan-out stores its payload once
//! `qpq_payloads` gains `refs` (entries pointing at it) and `quota` (what the row is charged
//! against the storage quota); `qpq_entries` gains `quota` (what the entry is charged), next to
//! `bytes` (what its recipient's queue is charged: the whole message, which it will fetch).
//! - An enqueue stores a payload per entry: `refs` 1, row `quota` 0, entry `quota` = `bytes`
//!   (what version 1 charged; its rows migrate to exactly this).
//! - A fanout stores one payload for all its recipients: `refs` = recipients, row `quota` =
//!   8 + the message, each entry `quota` = [`crate::limits::FANOUT_ENTRY_BYTES`]: the redb
//!   store's charges, so a quota means the same on both backends.
//!
//! Whatever deletes entries (ack, sweep) decrements the `refs` of their payloads in the same
//! statement (an UPDATE waits for a concurrent one on the row and counts from its result), then
//! deletes the payloads left at 0 (`qpq_payloads_unreferenced`, a partial index, finds them) and
//! frees the quota of both. No committed payload has `refs` 0.
//!
//! A `qpq_queues` row left with count 0 and a `qpq_channels` row untouched for a TTL are
//! deleted by the sweep, which raises `seq_floor`/`channel_seq_floor` to cover their numbers
//! in the same transaction; a re-created row starts from the floor, so numbers never go back.
//!
//! # Version 3: acks do not lock the queue row
//! `qpq_queue_freed` (recipient → count, bytes) holds what acks removed from a queue; the
//! `qpq_queues` row keeps what enqueues added (less what the sweep expired). A queue holds
//! `count − freed.count` messages of `bytes − freed.bytes`. Why: an ack used to lock the same
//! row as an enqueue to the same recipient, so a node acking and a node enqueueing took turns,
//! each waiting for the other's WAL flush (issue 13). Now an ack locks only the freed row (and
//! its entries), an enqueue only the queue row. See [`super::ops`] for why the caps stay safe.
//! A version 2 database starts with no freed rows (a missing row reads as 0).
//!
//! # Version 4: an enqueue batch in one round trip
//! No table changes: the function `qpq_enqueue_batch` takes a batch of enqueues and fanouts as
//! arrays and does in the database what the node did between two round trips: lock the
//! channel and queue rows (in the order given, sorted by the caller), read the floors, the
//! stored-bytes total and the freed rows, decide each request's numbers or refusal against the
//! state the requests before it left, and write the accepted ones. Its caller and the argument
//! for its contracts: [`super::enqueue`]. A function in a migration is frozen like a table: a
//! change is `CREATE OR REPLACE` in a later version.

use deadpool_postgres::Transaction;

use super::TxError;
use crate::store::StoreError;

/// The newest schema this qpq knows.
pub const SCHEMA_VERSION: i32 = 4;

/// Any constant: the advisory lock key that serialises migrations of one database.
const MIGRATION_LOCK: i64 = 0x0071_7071_5f6d_6967;

/// (version, SQL) in order; never edit one that has shipped, add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
    "CREATE TABLE qpq_meta (name text PRIMARY KEY, value bigint NOT NULL);
     INSERT INTO qpq_meta (name, value) VALUES ('seq_floor', 0), ('channel_seq_floor', 0);
     CREATE TABLE qpq_queues (
         recipient bytea PRIMARY KEY,
         next_seq bigint NOT NULL,
         count bigint NOT NULL,
         bytes bigint NOT NULL);
     CREATE TABLE qpq_channels (
         id bytea PRIMARY KEY,
         last_seq bigint NOT NULL,
         touched_ms bigint NOT NULL);
     CREATE TABLE qpq_payloads (
         id bigserial PRIMARY KEY,
         channel_id bytea NOT NULL,
         channel_seq bigint NOT NULL,
         enqueued_at_ms bigint NOT NULL,
         body bytea NOT NULL);
     CREATE TABLE qpq_entries (
         recipient bytea NOT NULL,
         seq bigint NOT NULL,
         payload_id bigint NOT NULL,
         bytes bigint NOT NULL,
         enqueued_at_ms bigint NOT NULL,
         PRIMARY KEY (recipient, seq));
     CREATE INDEX qpq_entries_by_age ON qpq_entries (enqueued_at_ms);
     CREATE TABLE qpq_stored_bytes (shard integer PRIMARY KEY, bytes bigint NOT NULL);
     CREATE TABLE qpq_key_packages (
         id bigserial PRIMARY KEY,
         identity bytea NOT NULL,
         not_after bigint NOT NULL,
         bytes bytea NOT NULL);
     CREATE INDEX qpq_key_packages_by_identity ON qpq_key_packages (identity, id);
     CREATE INDEX qpq_key_packages_by_expiry ON qpq_key_packages (not_after);
     CREATE TABLE qpq_key_package_owners (identity bytea PRIMARY KEY);
     CREATE TABLE qpq_last_resort (identity bytea PRIMARY KEY, not_after bigint NOT NULL, bytes bytea NOT NULL);
     CREATE TABLE qpq_hybrid_keys (identity bytea PRIMARY KEY, created_at_ms bigint NOT NULL, value bytea NOT NULL);",
    ),
    (
        2,
        "ALTER TABLE qpq_payloads ADD COLUMN refs bigint NOT NULL DEFAULT 1,
                                 ADD COLUMN quota bigint NOT NULL DEFAULT 0;
         ALTER TABLE qpq_entries ADD COLUMN quota bigint;
         UPDATE qpq_entries SET quota = bytes;
         ALTER TABLE qpq_entries ALTER COLUMN quota SET NOT NULL;
         CREATE INDEX qpq_payloads_unreferenced ON qpq_payloads (id) WHERE refs <= 0;",
    ),
    (
        3,
        "CREATE TABLE qpq_queue_freed (
             recipient bytea PRIMARY KEY,
             count bigint NOT NULL,
             bytes bigint NOT NULL);",
    ),
    (4, BATCH_FUNCTIONS_V4),
];

/// Version 4's `qpq_enqueue_batch` and `qpq_ack_batch` (see the module docs and [`super::enqueue`]). Parameters:
/// the time, the caps (`p_max_messages`, `p_max_bytes` per queue, `p_max_stored` in all), the
/// stored-bytes shards; the channels and recipients to lock, each sorted and distinct; per
/// request its channel (1-based index, 0 for none), the index of its last item and its quota
/// charge; per item its queue, its payload, its queue and quota charges; per payload its body,
/// request, refs and quota. Answers per request a status (0 accepted, 1 a queue cap, 2 the
/// storage quota), its `channelSeq`, what refused it (held messages and bytes, or the stored
/// total), and per item its `seq`.
const BATCH_FUNCTIONS_V4: &str = r#"CREATE FUNCTION qpq_enqueue_batch(
    p_now_ms bigint, p_max_messages bigint, p_max_bytes bigint, p_max_stored bigint, p_shards integer,
    p_ch_keys bytea[], p_q_keys bytea[],
    p_req_ch integer[], p_req_end integer[], p_req_charge bigint[],
    p_item_q integer[], p_item_payload integer[], p_item_bytes bigint[], p_item_quota bigint[],
    p_pay_body bytea[], p_pay_req integer[], p_pay_refs bigint[], p_pay_quota bigint[],
    OUT o_status integer[], OUT o_channel_seq bigint[], OUT o_held bigint[], OUT o_held_bytes bigint[],
    OUT o_seqs bigint[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_n integer := coalesce(array_length(p_req_end, 1), 0);
    v_ch_last bigint[];
    v_q_next bigint[];
    v_q_count bigint[];
    v_q_bytes bigint[];
    v_f_count bigint[];
    v_f_bytes bigint[];
    v_seq_floor bigint;
    v_ch_floor bigint;
    v_used bigint;
    v_added bigint := 0;
    v_first integer := 1;
    v_k integer;
    v_q integer;
    v_c integer;
    v_held bigint;
    v_held_bytes bigint;
BEGIN
    o_status := array_fill(0, ARRAY[v_n]);
    o_channel_seq := array_fill(0::bigint, ARRAY[v_n]);
    o_held := array_fill(0::bigint, ARRAY[v_n]);
    o_held_bytes := array_fill(0::bigint, ARRAY[v_n]);
    o_seqs := array_fill(0::bigint, ARRAY[coalesce(array_length(p_item_q, 1), 0)]);
    -- 1. Lock: the channel rows, then the queue rows, each in the order given (sorted by key).
    WITH l AS (
        INSERT INTO qpq_channels (id, last_seq, touched_ms)
        SELECT c, 0, p_now_ms FROM unnest(p_ch_keys) WITH ORDINALITY AS t(c, o) ORDER BY o
        ON CONFLICT (id) DO UPDATE SET touched_ms = excluded.touched_ms
        RETURNING id, last_seq)
    SELECT coalesce(array_agg(l.last_seq ORDER BY t.o), '{}') INTO v_ch_last
    FROM unnest(p_ch_keys) WITH ORDINALITY AS t(c, o) JOIN l ON l.id = t.c;
    WITH l AS (
        INSERT INTO qpq_queues (recipient, next_seq, count, bytes)
        SELECT r, 0, 0, 0 FROM unnest(p_q_keys) WITH ORDINALITY AS t(r, o) ORDER BY o
        ON CONFLICT (recipient) DO UPDATE SET count = qpq_queues.count
        RETURNING recipient, next_seq, count, bytes)
    SELECT coalesce(array_agg(l.next_seq ORDER BY t.o), '{}'), coalesce(array_agg(l.count ORDER BY t.o), '{}'),
           coalesce(array_agg(l.bytes ORDER BY t.o), '{}')
    INTO v_q_next, v_q_count, v_q_bytes
    FROM unnest(p_q_keys) WITH ORDINALITY AS t(r, o) JOIN l ON l.recipient = t.r;
    IF coalesce(array_length(v_ch_last, 1), 0) <> coalesce(array_length(p_ch_keys, 1), 0)
       OR coalesce(array_length(v_q_next, 1), 0) <> coalesce(array_length(p_q_keys, 1), 0) THEN
        RAISE EXCEPTION 'qpq_enqueue_batch: duplicate channel or recipient keys';
    END IF;
    -- 2. Read, with every lock held (each statement of this function takes a new snapshot):
    -- the floors, the stored-bytes total and what acks freed from the locked queues (unlocked).
    SELECT coalesce((SELECT value FROM qpq_meta WHERE name = 'seq_floor'), 0),
           coalesce((SELECT value FROM qpq_meta WHERE name = 'channel_seq_floor'), 0),
           (SELECT coalesce(sum(bytes), 0)::bigint FROM qpq_stored_bytes)
    INTO v_seq_floor, v_ch_floor, v_used;
    SELECT coalesce(array_agg(coalesce(f.count, 0) ORDER BY t.o), '{}'),
           coalesce(array_agg(coalesce(f.bytes, 0) ORDER BY t.o), '{}')
    INTO v_f_count, v_f_bytes
    FROM unnest(p_q_keys) WITH ORDINALITY AS t(r, o) LEFT JOIN qpq_queue_freed f ON f.recipient = t.r;
    -- A new row (0) counts on from its floor.
    FOR v_c IN 1..coalesce(array_length(v_ch_last, 1), 0) LOOP
        IF v_ch_last[v_c] = 0 THEN v_ch_last[v_c] := v_ch_floor; END IF;
    END LOOP;
    FOR v_q IN 1..coalesce(array_length(v_q_next, 1), 0) LOOP
        IF v_q_next[v_q] = 0 THEN v_q_next[v_q] := greatest(v_seq_floor, 1); END IF;
    END LOOP;
    -- 3. The requests in order, each against the state the ones before it left.
    FOR v_i IN 1..v_n LOOP
        v_k := v_first;
        WHILE v_k <= p_req_end[v_i] LOOP
            v_q := p_item_q[v_k];
            v_held := greatest(v_q_count[v_q] - v_f_count[v_q], 0);
            v_held_bytes := greatest(v_q_bytes[v_q] - v_f_bytes[v_q], 0);
            IF v_held + 1 > p_max_messages OR v_held_bytes + p_item_bytes[v_k] > p_max_bytes THEN
                o_status[v_i] := 1;
                o_held[v_i] := v_held;
                o_held_bytes[v_i] := v_held_bytes;
                EXIT;
            END IF;
            v_q_count[v_q] := v_q_count[v_q] + 1;
            v_q_bytes[v_q] := v_q_bytes[v_q] + p_item_bytes[v_k];
            v_k := v_k + 1;
        END LOOP;
        IF o_status[v_i] = 0 AND greatest(v_used, 0) + p_req_charge[v_i] > p_max_stored THEN
            o_status[v_i] := 2;
            o_held[v_i] := greatest(v_used, 0);
        END IF;
        IF o_status[v_i] <> 0 THEN
            -- Refused: take back what its items added.
            FOR v_j IN v_first..v_k - 1 LOOP
                v_q := p_item_q[v_j];
                v_q_count[v_q] := v_q_count[v_q] - 1;
                v_q_bytes[v_q] := v_q_bytes[v_q] - p_item_bytes[v_j];
            END LOOP;
        ELSE
            v_c := p_req_ch[v_i];
            IF v_c > 0 THEN
                v_ch_last[v_c] := v_ch_last[v_c] + 1;
                o_channel_seq[v_i] := v_ch_last[v_c];
            END IF;
            FOR v_j IN v_first..p_req_end[v_i] LOOP
                v_q := p_item_q[v_j];
                o_seqs[v_j] := v_q_next[v_q];
                v_q_next[v_q] := v_q_next[v_q] + 1;
            END LOOP;
            v_used := v_used + p_req_charge[v_i];
            v_added := v_added + p_req_charge[v_i];
        END IF;
        v_first := p_req_end[v_i] + 1;
    END LOOP;
    -- 4. Write: the accepted requests' payloads and entries, the queue and channel rows (locked
    -- above), and this connection's stored-bytes shard last.
    WITH p_in AS MATERIALIZED (
        SELECT nextval('qpq_payloads_id_seq') AS id, t.*
        FROM unnest(p_pay_body, p_pay_req, p_pay_refs, p_pay_quota) WITH ORDINALITY AS t(body, req, refs, quota, o)
        WHERE o_status[t.req] = 0
    ), p AS (
        INSERT INTO qpq_payloads (id, channel_id, channel_seq, enqueued_at_ms, body, refs, quota)
        SELECT p_in.id, coalesce(p_ch_keys[p_req_ch[p_in.req]], ''::bytea), o_channel_seq[p_in.req], p_now_ms,
               p_in.body, p_in.refs, p_in.quota
        FROM p_in
    ), e AS (
        INSERT INTO qpq_entries (recipient, seq, payload_id, bytes, quota, enqueued_at_ms)
        SELECT p_q_keys[e.q], e.seq, p_in.id, e.bytes, e.quota, p_now_ms
        FROM unnest(p_item_q, o_seqs, p_item_payload, p_item_bytes, p_item_quota) AS e(q, seq, payload, bytes, quota)
        JOIN p_in ON p_in.o = e.payload
    ), q AS (
        UPDATE qpq_queues q SET next_seq = u.next, count = u.count, bytes = u.bytes
        FROM unnest(p_q_keys, v_q_next, v_q_count, v_q_bytes) AS u(r, next, count, bytes)
        WHERE q.recipient = u.r
    ), c AS (
        UPDATE qpq_channels c SET last_seq = u.last
        FROM unnest(p_ch_keys, v_ch_last) AS u(id, last) WHERE c.id = u.id
    )
    INSERT INTO qpq_stored_bytes (shard, bytes)
    SELECT pg_backend_pid() % p_shards, v_added WHERE v_added <> 0
    ON CONFLICT (shard) DO UPDATE SET bytes = qpq_stored_bytes.bytes + excluded.bytes;
END
$fn$;
CREATE FUNCTION qpq_ack_batch(p_keys bytea[], p_up_to bigint[], p_shards integer)
RETURNS TABLE (o_recipient bytea, o_seq bigint, o_bytes bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_r bytea[];
    v_s bigint[];
    v_b bigint[];
    v_freed bigint;
BEGIN
    -- 1. The entries, then the payloads they were the last entries of (locked in id order).
    WITH a AS (SELECT r, up_to FROM unnest(p_keys, p_up_to) AS a(r, up_to)),
         d AS (DELETE FROM qpq_entries e USING a WHERE e.recipient = a.r AND e.seq <= a.up_to
               RETURNING e.recipient, e.seq, e.payload_id, e.bytes, e.quota),
         g AS (SELECT payload_id, count(*) AS n FROM d GROUP BY payload_id),
         l AS (SELECT p.id, p.refs FROM qpq_payloads p WHERE p.id IN (SELECT payload_id FROM g)
               ORDER BY p.id FOR UPDATE),
         u AS (UPDATE qpq_payloads p SET refs = p.refs - g.n FROM g JOIN l ON l.id = g.payload_id
               WHERE p.id = g.payload_id AND l.refs > g.n),
         x AS (DELETE FROM qpq_payloads p USING g JOIN l ON l.id = g.payload_id
               WHERE p.id = g.payload_id AND l.refs <= g.n RETURNING p.quota)
    SELECT coalesce(array_agg(d.recipient ORDER BY d.recipient, d.seq), '{}'),
           coalesce(array_agg(d.seq ORDER BY d.recipient, d.seq), '{}'),
           coalesce(array_agg(d.bytes ORDER BY d.recipient, d.seq), '{}'),
           coalesce(sum(d.quota), 0)::bigint + (SELECT coalesce(sum(x.quota), 0)::bigint FROM x)
    INTO v_r, v_s, v_b, v_freed
    FROM d;
    -- 2. The freed rows, in key order.
    INSERT INTO qpq_queue_freed (recipient, count, bytes)
    SELECT t.r, count(*), sum(t.b) FROM unnest(v_r, v_b) AS t(r, b) GROUP BY t.r ORDER BY t.r
    ON CONFLICT (recipient) DO UPDATE SET count = qpq_queue_freed.count + excluded.count,
                                          bytes = qpq_queue_freed.bytes + excluded.bytes;
    -- 3. This connection's stored-bytes shard, last.
    IF v_freed <> 0 THEN
        INSERT INTO qpq_stored_bytes (shard, bytes) VALUES (pg_backend_pid() % p_shards, -v_freed)
        ON CONFLICT (shard) DO UPDATE SET bytes = qpq_stored_bytes.bytes + excluded.bytes;
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_r, v_s, v_b);
END
$fn$;"#;

/// Brings the database to [`SCHEMA_VERSION`] and returns its instance id (created on first use).
pub(super) async fn migrate(tx: &Transaction<'_>) -> Result<u64, TxError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS qpq_schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let found: i32 =
        tx.query_one("SELECT coalesce(max(version), 0) FROM qpq_schema_version", &[]).await?.get(0);
    if found > SCHEMA_VERSION {
        return Err(TxError::Store(StoreError::SchemaVersion {
            path: "postgresql database".to_string(),
            found: u64::try_from(found).unwrap_or(0),
        }));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tracing::info!(version, "migrating the postgresql schema");
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO qpq_schema_version (version) VALUES ($1)", &[version]).await?;
    }
    // Random and nonzero; stored as the bigint with the same bits.
    let mut id = 0u64;
    while id == 0 {
        id = rand::random::<u64>();
    }
    tx.execute(
        "INSERT INTO qpq_meta (name, value) VALUES ('instance_id', $1) ON CONFLICT (name) DO NOTHING",
        &[&(id as i64)],
    )
    .await?;
    let stored: i64 =
        tx.query_one("SELECT value FROM qpq_meta WHERE name = 'instance_id'", &[]).await?.get(0);
    Ok(stored as u64)
}
