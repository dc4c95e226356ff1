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
//! | `qpq_meta` | name | value bigint: `instance_id`, `seq_floor`, `channel_seq_floor` (see below); `deletion_mark`, `deletion_mark_wall` (added by the first sweep, no migration: the latest time a sweep deleted by and the clock's reading then, see [`crate::clock::DeletionClock`]) |
//! | `qpq_queues` | recipient | next_seq, count, bytes: one row per recipient with a queue; the row is the per-recipient lock that orders its `seq` numbers across nodes |
//! | `qpq_channels` | id | last_seq, touched_ms: the per-channel counter row for `channelSeq` |
//! | `qpq_payloads` | id (bigserial) | channel_id, channel_seq, enqueued_at_ms, body: a message body, stored once |
//! | `qpq_entries` | (recipient, seq) | payload_id, bytes, enqueued_at_ms: one recipient's queue entry pointing at a payload |
//! | `qpq_stored_bytes` | shard | bytes: the storage quota's total, split in shards so concurrent enqueues on different connections do not queue on one row |
//! | `qpq_key_packages` | id (bigserial) | identity, not_after, bytes: single-use KeyPackages, taken in id order |
//! | `qpq_key_package_owners` | identity | none: the row an upload locked to check the per-identity cap (until version 6) |
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
//! A `qpq_queues` row left with count 0 and a `qpq_channels` row untouched for
//! [`crate::limits::CHANNEL_IDLE_MS`] (an hour) are deleted by the sweep, which raises `seq_floor`/`channel_seq_floor` to cover their numbers
//! in the same transaction; a re-created row starts from the floor, so numbers never go back.
//!
//! # Version 3: acks do not lock the queue row
//! `qpq_queue_freed` (recipient → count, bytes) holds what acks removed from a queue; the
//! `qpq_queues` row keeps what enqueues added. (The sweep, and an enqueue deleting a full
//! queue's expired head, count what they delete as freed too; before that the sweep lowered the
//! queue row, and rows it lowered so stay right: both ways subtract.) A queue holds
//! `count − freed.count` messages of `bytes − freed.bytes`. Why: an ack used to lock the same
//! row as an enqueue to the same recipient, so a node acking and a node enqueueing took turns,
//! each waiting for the other's WAL flush (issue 13). Now an ack locks only the freed row (and
//! its entries), an enqueue only the queue row. See [`super::ops`] for why the caps stay safe.
//! A version 2 database starts with no freed rows (a missing row reads as 0).
//!
//! # Upgrading while older nodes run
//! A node's connections are named `qpq schema N` (`application_name`, unless its URL names
//! them), N the version it reads and writes; nodes before version 4 named them `qpq`. A node
//! about to migrate an existing database refuses to start while connections of older nodes are
//! open in it: an older node would keep serving with the new schema, and, from version 4 on,
//! would not see the mail newer nodes write into entries, so its client's next ack would
//! delete messages it never got. Stop every node, then start the new version.
//!
//! # Version 4: a single recipient's mail is kept in its entry
//! `qpq_entries` gains `channel_id`, `channel_seq` and `body`, and `payload_id` may be null.
//! An enqueue's entry now carries its message itself, as redb's queue entry does; only a
//! fanout stores a `qpq_payloads` row, shared by its entries. A CHECK keeps exactly one of the
//! two: an entry has a `payload_id` or a `body`, never both or neither. It is added `NOT VALID`
//! (checked on every new row, no scan of the existing ones under the table's lock): every row
//! of an older version has a `payload_id` and no body, so it holds for them by construction.
//! Why: a payload row per enqueued message was a heap row and an index entry to write, and a
//! row to lock and delete at ack time, for every message; on the delivery bench, dropping it
//! cut the WAL records per delivered message from ~10 to ~6 (issue 13). The releasing
//! statements need no change: a null `payload_id` matches no payload row. Rows of older
//! versions keep their payload rows and read as before.
//!
//! # Version 5: a byte budget for key material
//! `qpq_key_bytes` (shard → bytes, like `qpq_stored_bytes`) totals what the key rows are
//! charged: a package's bytes + 8 + [`crate::limits::KEY_ROW_OVERHEAD_BYTES`], a hybrid key's
//! value + that overhead, the redb store's charges. Uploads and new hybrid keys that would pass
//! `max_key_bytes` are refused. The migration counts the existing rows once, and indexes
//! `qpq_last_resort` by expiry and `qpq_hybrid_keys` by creation time, so the sweep's slices
//! find expired ones without a scan (a hybrid key is deleted
//! [`crate::limits::HYBRID_KEY_SERVER_LIFETIME_SECS`] after its signed creation).
//!
//! # Version 6: no owner rows
//! `qpq_key_package_owners` is dropped. An upload serialises with the other uploads of its
//! identity through a transaction-scoped advisory lock on the identity instead
//! ([`super::ops`]): a row had to be deleted when the identity's last package went, and some
//! paths (an upload of a last-resort package alone, a take that found every package expired,
//! a refused upload) left it for ever, one row per free identity.

use deadpool_postgres::Transaction;

use super::TxError;
use crate::store::StoreError;

/// The newest schema this qpq knows.
pub const SCHEMA_VERSION: i32 = 6;

/// The `application_name` of a node's connections (see the module docs).
pub(super) fn application_name() -> String {
    format!("qpq schema {SCHEMA_VERSION}")
}

/// Other connections to this database from nodes that speak a schema older than `$1`.
const OLDER_NODES: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND (application_name = 'qpq'
            OR (application_name ~ '^qpq schema [0-9]{1,9}$'
                AND substring(application_name from 12)::integer < $1))";

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
    (
        4,
        "ALTER TABLE qpq_entries ALTER COLUMN payload_id DROP NOT NULL,
                                ADD COLUMN channel_id bytea,
                                ADD COLUMN channel_seq bigint,
                                ADD COLUMN body bytea,
                                ADD CONSTRAINT qpq_entries_one_body CHECK (
                                    (payload_id IS NULL) = (body IS NOT NULL)
                                    AND (body IS NULL) = (channel_id IS NULL)
                                    AND (body IS NULL) = (channel_seq IS NULL)) NOT VALID;",
    ),
    (
        5,
        // 136 = 8 (the not_after redb keeps in the value) + KEY_ROW_OVERHEAD_BYTES (asserted below).
        "CREATE TABLE qpq_key_bytes (shard integer PRIMARY KEY, bytes bigint NOT NULL);
         INSERT INTO qpq_key_bytes (shard, bytes) SELECT 0,
             (SELECT coalesce(sum(length(bytes) + 136), 0) FROM qpq_key_packages)
             + (SELECT coalesce(sum(length(bytes) + 136), 0) FROM qpq_last_resort)
             + (SELECT coalesce(sum(length(value) + 128), 0) FROM qpq_hybrid_keys);
         CREATE INDEX qpq_last_resort_by_expiry ON qpq_last_resort (not_after);
         CREATE INDEX qpq_hybrid_keys_by_age ON qpq_hybrid_keys (created_at_ms);",
    ),
    (6, "DROP TABLE qpq_key_package_owners;"),
];

// Migration 5 counts existing rows with this overhead written out; it must not drift from it.
const _: () = assert!(crate::limits::KEY_ROW_OVERHEAD_BYTES == 128);

/// Brings the database to [`SCHEMA_VERSION`] and returns its instance id (created on first use).
pub(super) async fn migrate(tx: &Transaction<'_>) -> Result<u64, TxError> {
    // A node starting while another migrates waits for it however long it takes, and a
    // migration rewriting a big table runs however long that takes (the session's lock and
    // statement timeouts are for the hot path).
    tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0").await?;
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
    if found > 0 && found < SCHEMA_VERSION {
        let older: i64 = tx.query_one(OLDER_NODES, &[&SCHEMA_VERSION]).await?.get(0);
        if older > 0 {
            return Err(TxError::Store(StoreError::Unavailable(format!(
                "the database is at schema version {found} and {older} connection(s) of older qpq \
                 nodes are open in it: stop every node, then start this version, which migrates \
                 it to version {SCHEMA_VERSION} (older nodes cannot read what it writes)"
            ))));
        }
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
