//! The client's encrypted embedded database, `qpq.db` in the home: every record sealed on its
//! own, so an operation reads and writes only the records it touches instead of rewriting the
//! whole state (issue 12).
//!
//! # Layout (format version [`DB_FORMAT_VERSION`])
//! A redb file (redb is the server's engine too) with these tables:
//!
//! | table     | redb key                        | redb value                              |
//! |-----------|---------------------------------|-----------------------------------------|
//! | `meta`    | `"format"`                      | u32 LE format version, in clear         |
//! |           | `"key"`                         | a [`crate::crypto::statefile`] blob (magic, KDF id, Argon2id parameters, salt) sealing the records' keys ([`seal::DbKey`]), or [`KEY_CHECK`] in a home from before format 6 |
//! |           | `"records"`                     | record check: [`KEY_CHECK`] sealed under the records' keys |
//! |           | `"generation"`                  | u64 LE, +1 per committed write          |
//! |           | `"journal"`                     | the journal's id (16 B) ‖ u64 LE sequence number of the last journal entry redb holds |
//! | `mls`     | slot of the openmls storage key | sealed openmls value ([`mls`]; a group's message secrets in two parts: [`past_leaves`], the past epochs' members shared between epochs: [`past_members`]; its ratchet tree one record per node: [`tree_nodes`]) |
//! | `state`   | slot of the logical record name | sealed messenger record                 |
//! | `history` | slot of the conversation ‖ u64 BE receive time (ms) ‖ u64 BE message index | sealed history entry |
//!
//! # The journal
//! Next to the file, `qpq.db.journal` ([`journal`], layout there): a commit whose write set is
//! small and fits goes there as one sealed entry (one `pwrite` and one `fdatasync`, no file
//! metadata change: the cost of a durable write and nothing more), and its records go into an
//! in-memory overlay that every read (`get`, `scan`, history ranges, a write's own reads)
//! merges over redb. A redb commit costs ~229k instructions, 7 pages and an `fdatasync` even
//! for one record (BENCHMARKS.md, 2026-12-01), which an app message should not pay.
//!
//! A *checkpoint* folds the overlay into redb in one durable commit that also records, in
//! `meta`, the last journal entry it holds, then resets the journal (in that order: a crash
//! between leaves entries the next replay skips). It happens when a write set is over
//! [`journal::ENTRY_MAX`] or would take the journal past half full (that write is part of the
//! checkpoint), and when a handle closes with more than [`journal::CLOSE_CHECKPOINT_AT`] in the
//! journal. Opening a home replays the journal: bounded by its size (half of 256 KiB), so an
//! open stays O(1) records plus at most ~80 entries.
//!
//! Why not redb's own `Durability::None` commits for visibility: redb 4.6 still runs the table
//! tree's flush and the system tree's updates on them and writes their pages, and closing a
//! handle with one pending makes it durable with a full commit, which every lock release would
//! then pay (`close_database` in redb's `db.rs`). The overlay costs a map insertion.
//!
//! # Keys
//! Opening runs Argon2id once on the passphrase with the salt and parameters of the `key`
//! record (or takes the public unprotected key of `init --no-passphrase`), exactly as the old
//! state file did; opening the `key` blob proves the passphrase and yields the records' two keys
//! ([`seal::DbKey`]), drawn at random when the home was made (a home from before format 6
//! derives them from that state key by HKDF-SHA256, RFC 5869). A slot is `HMAC-SHA256(slot key,
//! table label ‖ 0 ‖ logical key)`, a value is XChaCha20-Poly1305 with a random nonce and the
//! table label and slot as associated data. A process that holds the records' keys checks them
//! against the record check at every open, with no Argon2id run.
//!
//! `qpq passphrase` ([`ClientDb::change_key`], [`rekey`]) seals the same keys under a new
//! passphrase (or the unprotected key) in a copy of the file renamed into place: other processes
//! of the home go on. With `--new-key`, and always when a passphrase is set on a home that had
//! none, the copy also re-seals every value under a new random record key; other processes then
//! fail their next open with [`DbError::KeyChanged`]. The slot key never changes (see
//! [`seal::DbKey`]).
//!
//! # What is visible on disk
//! The format version, the KDF parameters and salt, the generation counter, and per table the
//! number and sizes of records; for `history`, which records share a conversation (not which
//! conversation), their receive times and their indices in the conversation, so that a page of
//! history (ordered by time, then index: [`crate::client::history::Position`]) is one range scan
//! per conversation and expiring old entries is one range deletion. No names, keys, group ids or
//! texts. The old state file showed only its total size; the record sizes and
//! history counts are the price of not rewriting everything per message.
//!
//! # Processes
//! redb lets one handle at a time own the file. Every qpq process keeps the home's
//! [`crate::fsutil::HomeLock`] discipline and keeps the file open only while it holds that lock
//! ([`ClientDb::close`] when it releases it; a read on a closed handle, outside any operation,
//! takes the lock and opens the file for that read), so the handle is never contended; the generation counter tells a process whether another one
//! wrote since it last looked (and so whether its cached records are stale). A process waiting
//! on the server watches `qpq.db.gen`, an unsynced copy of the generation rewritten after each
//! commit, since redb rewrites its header whenever any process opens the file. The journal is
//! shared the same way: whoever opens the home next replays the entries another process left
//! and appends after them, so no process's acknowledged write is lost or overwritten.
//!
//! Opening per lock hold costs, measured on a 10 MB database with
//! `cargo test --lib measure_open_cost -- --ignored --nocapture` (debug build, 2 shared cores):
//! open + generation read 16 ms; a durable one-record commit 0.6 ms.

pub mod journal;
pub mod migrate;
pub mod mls;
pub mod past_leaves;
pub mod past_members;
pub mod records;
mod rekey;
pub mod seal;
mod store;
pub mod tree_nodes;

use std::collections::BTreeMap;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use zeroize::Zeroizing;

use crate::client::state::StateError;
use crate::crypto::statefile::{self, StateFileError, StateKey};
use crate::fsutil::HomeLock;
use crate::limits::CLIENT_DB_CACHE_BYTES;
pub use rekey::KeyChange;
pub use seal::DbKey;
use seal::{RecordDamaged, RecordKeys};
use store::{Store, apply, attach_journal};

/// File name of the database in the home.
pub const DB_FILE: &str = "qpq.db";

/// Version of the layout above. A file of another version is refused by name, except the
/// older ones from [`UPGRADED_FORMAT`] on. 2: history entries are keyed by time and index and live only in
/// `history` (format 1 kept them inside the group records of `state` too, so opening a home
/// decoded its whole history). 3: a group's message secrets may be stored in two parts, the
/// past epochs' member lists in records of their own ([`past_leaves`]), which a format-2 binary
/// cannot read; and the `state` record `groups` holds every conversation's metadata, where format
/// 2 kept one `group/<hex id>` record per conversation, so opening read one record per
/// conversation ([`records`]). 4: the `state` record `timelines` is two records, the message
/// counters and the membership events, so a message no longer rewrites every conversation's
/// events ([`records::split_timelines`]); and a group's ratchet tree may be stored one record
/// per node ([`tree_nodes`]), so a commit rewrites only the nodes it changed. A format-3 binary
/// reads neither. 5: small writes go to the journal ([`journal`]) and reach redb only at a
/// checkpoint, so the newest records may be in `qpq.db.journal` alone, which a format-4 binary
/// would ignore (losing them); and a past epoch's member list may be a list of references to
/// member records shared between epochs ([`past_members`]), so a commit writes the members
/// that changed, not the ended epoch's whole list, which a format-4 binary cannot read. 6: the
/// `key` record may seal the records' keys ([`seal::DbKey`]) instead of a key check, so that a
/// passphrase can change without re-sealing every record, and `meta` holds a record check
/// sealed under those keys, which a format-5 binary would take for a wrong passphrase.
pub const DB_FORMAT_VERSION: u32 = 6;

/// The oldest format this one upgrades in place when opening, once the key is proven, in one
/// redb transaction, step by step: from 2, the per-conversation records move into the `groups`
/// record and are deleted ([`records::merge_group_records`]); from 3 (and 2), the `timelines`
/// record is split in two ([`records::split_timelines`]); then the format record is rewritten.
/// Everything else of formats 2 to 5 reads the same in format 6 (message secrets and ratchet
/// trees stored whole are still read, and split when next written; from 4, nothing moves: a
/// past epoch's members stored inline are still read, and dropped with their epoch; from 5, the
/// record check is added and the `key` record stays a key check until the passphrase changes).
pub const UPGRADED_FORMAT: u32 = 2;

/// What the `key` record of a home from before format 6 seals, and what the record check seals:
/// proves a key before any record is read.
pub const KEY_CHECK: &[u8] = b"qpq.db key check v1";

/// The record check's label and slot ([`RecordKeys::seal`]), apart from every table's.
const RECORD_CHECK_LABEL: &[u8] = b"meta";
const RECORD_CHECK_SLOT: &[u8] = b"records";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
const META_KEY: &str = "key";
const META_GENERATION: &str = "generation";
const META_JOURNAL: &str = "journal";
const META_RECORD_CHECK: &str = "records";

/// The sealed tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// openmls's storage ([`mls::MlsStore`]).
    Mls,
    /// The messenger's own records (identity, contacts, groups, cursors, outbox...).
    State,
    /// History entries, paged by conversation and sequence number.
    History,
}

impl Table {
    fn label(self) -> &'static [u8] {
        match self {
            Table::Mls => b"mls",
            Table::State => b"state",
            Table::History => b"history",
        }
    }

    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        match self {
            Table::Mls => TableDefinition::new("mls"),
            Table::State => TableDefinition::new("state"),
            Table::History => TableDefinition::new("history"),
        }
    }
}

/// Errors of the client database, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no client database in {0}")]
    Missing(PathBuf),
    #[error("{path} is not a qpq client database or is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("{path} has client database format {found}, newer than this qpq reads ({DB_FORMAT_VERSION})")]
    Newer { path: PathBuf, found: u32 },
    #[error("{path} has client database format {found}, older than this qpq reads ({DB_FORMAT_VERSION})")]
    Older { path: PathBuf, found: u32 },
    #[error("{0}")]
    Key(#[from] StateFileError),
    #[error(
        "{0} is sealed under another key since this command opened it (`qpq passphrase` re-sealed \
         it, or the file was replaced): start the command again"
    )]
    KeyChanged(PathBuf),
    #[error(
        "the passphrase of {0} was changed by another qpq process since this one asked for it: \
         run `qpq passphrase` again"
    )]
    PassphraseChanged(PathBuf),
    #[error("{0} is open in another handle of this process")]
    InUse(PathBuf),
    #[error("{0} was closed: writes happen under the home's lock")]
    Closed(PathBuf),
    #[error("{0}")]
    Lock(String),
    #[error("{0}")]
    Record(#[from] RecordDamaged),
    #[error("cannot {op} the client database: {reason}")]
    Io { op: &'static str, reason: String },
}

fn io_err(op: &'static str) -> impl Fn(redb::Error) -> DbError {
    move |e| DbError::Io { op, reason: e.to_string() }
}

/// Where a history entry sits in its conversation: the order of the `history` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistoryKey {
    /// Receive time, ms since the Unix epoch.
    pub at_ms: u64,
    /// Index among all messages the conversation ever had.
    pub index: u64,
}

impl HistoryKey {
    pub const MIN: HistoryKey = HistoryKey { at_ms: 0, index: 0 };
    pub const MAX: HistoryKey = HistoryKey { at_ms: u64::MAX, index: u64::MAX };

    /// The greatest key strictly below this one (None below [`HistoryKey::MIN`]).
    pub fn below(self) -> Option<HistoryKey> {
        match (self.at_ms, self.index) {
            (0, 0) => None,
            (at_ms, 0) => Some(HistoryKey { at_ms: at_ms - 1, index: u64::MAX }),
            (at_ms, index) => Some(HistoryKey { at_ms, index: index - 1 }),
        }
    }
}

/// A history entry's place and plaintext.
pub type HistoryRecord = (HistoryKey, Zeroizing<Vec<u8>>);

/// An open client database and the keys of its records.
///
/// [`ClientDb::close`] releases the file (the home's lock is about to be released) while
/// others still hold this handle: openmls's store reads through it on demand
/// ([`mls::MlsStore::attach`]). A read on a closed handle takes the home's lock, opens the file
/// for that one read and closes it again (a read outside any operation, such as listing a
/// group's members); a write on a closed handle is refused.
pub struct ClientDb {
    /// None once closed (taken in `close` or `Drop` to close it shielded).
    db: RwLock<Option<Store>>,
    /// Held by a [`DbWrite`] from start to commit: one write at a time, as redb's own writes.
    writer: Mutex<()>,
    keys: RecordKeys,
    path: PathBuf,
    /// The home directory, for reads after `close` (None: a database being built aside).
    home: Option<PathBuf>,
    /// Raised when a read after `close` finds the home re-sealed under another key
    /// ([`ClientDb::watch_key_change`]).
    key_watch: Option<Arc<AtomicBool>>,
}

fn read_err(e: impl Into<redb::Error>) -> DbError {
    io_err("read")(e.into())
}

fn write_err(e: impl Into<redb::Error>) -> DbError {
    io_err("write")(e.into())
}

impl Drop for ClientDb {
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for ClientDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientDb").field("path", &self.path).finish_non_exhaustive()
    }
}

/// True when `dir` holds a client database.
pub fn exists(dir: &Path) -> bool {
    dir.join(DB_FILE).is_file()
}

impl ClientDb {
    /// Creates `dir/qpq.db` with records sealed under `data`, itself sealed under `unlock`
    /// (fails if it exists), with its journal. The caller holds the home lock.
    pub fn create(dir: &Path, unlock: &StateKey, data: &DbKey) -> Result<ClientDb, DbError> {
        ClientDb::create_in(dir.join(DB_FILE), Some(dir), unlock, data)
    }

    /// Creates a database at `path` without a journal (a migration builds it under another name
    /// first; the first open in the home creates the journal).
    pub fn create_at(path: PathBuf, unlock: &StateKey, data: &DbKey) -> Result<ClientDb, DbError> {
        ClientDb::create_in(path, None, unlock, data)
    }

    fn create_in(
        path: PathBuf,
        dir: Option<&Path>,
        unlock: &StateKey,
        data: &DbKey,
    ) -> Result<ClientDb, DbError> {
        let db = create_redb(&path)?;
        let keys = RecordKeys::derive(data);
        let txn = db.begin_write().map_err(|e| io_err("create")(e.into()))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| io_err("create")(e.into()))?;
            let put = |m: &mut redb::Table<&str, &[u8]>, k: &str, v: &[u8]| {
                m.insert(k, v).map(drop).map_err(|e| io_err("create")(e.into()))
            };
            put(&mut meta, META_FORMAT, &DB_FORMAT_VERSION.to_le_bytes())?;
            put(&mut meta, META_KEY, &statefile::seal(unlock, &data.wrapped()))?;
            put(&mut meta, META_RECORD_CHECK, &record_check(&keys))?;
            put(&mut meta, META_GENERATION, &0u64.to_le_bytes())?;
            for t in [Table::Mls, Table::State, Table::History] {
                txn.open_table(t.def()).map_err(|e| io_err("create")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| io_err("create")(e.into()))?;
        let store = attach_journal(db, dir, &keys, &path)?;
        Ok(ClientDb::new(store, keys, path, None))
    }

    /// A handle on `store`, open (and, with `home`, able to read again after `close`).
    fn new(store: Store, keys: RecordKeys, path: PathBuf, home: Option<PathBuf>) -> ClientDb {
        ClientDb { db: RwLock::new(Some(store)), writer: Mutex::new(()), keys, path, home, key_watch: None }
    }

    /// Opens the database with a passphrase (one Argon2id run), returning the records' keys for
    /// the next opens of this process.
    pub fn unlock(dir: &Path, passphrase: Option<&[u8]>) -> Result<(DbKey, ClientDb), DbError> {
        let (db, path, format) = open_file(dir)?;
        let check = shielded(&path, || key_check(&db, &path))?;
        let (key, plain) = statefile::open(&check, passphrase)?;
        let data = if plain.as_slice() == KEY_CHECK {
            DbKey::of(&key)
        } else if let Some(data) = DbKey::unwrap_from(&plain) {
            data
        } else {
            return Err(DbError::Damaged { path, reason: "the key check does not match".into() });
        };
        let keys = RecordKeys::derive(&data);
        let store = open_store(db, format, dir, &keys, &path, true)?;
        Ok((data, ClientDb::new(store, keys, path, Some(dir.to_path_buf()))))
    }

    /// Opens the database with the keys this process unlocked before (no Argon2id run), which
    /// still open it after another process changed the passphrase, but not after `--new-key`.
    pub fn open(dir: &Path, key: &DbKey) -> Result<ClientDb, DbError> {
        let (db, path, format) = open_file(dir)?;
        let keys = RecordKeys::derive(key);
        let store = open_store(db, format, dir, &keys, &path, false)?;
        Ok(ClientDb::new(store, keys, path, Some(dir.to_path_buf())))
    }

    /// True when the database at `dir` needs a passphrase (header only, no Argon2id).
    pub fn is_passphrase_protected(dir: &Path) -> Result<bool, DbError> {
        // The header only: a format-2 file is upgraded by the open that proves the key.
        let (db, path, _) = open_file(dir)?;
        let check = shielded(&path, || key_check(&db, &path));
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db)));
        Ok(statefile::is_passphrase_protected(&check?)?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raises `flag` when a read of this handle after `close` finds the home re-sealed under
    /// another key (a process learns it however it meets it: see `Home::key_changed`).
    pub fn watch_key_change(&mut self, flag: Arc<AtomicBool>) {
        self.key_watch = Some(flag);
    }

    /// The `key` record as it is now: which passphrase (or none) unlocks the home.
    pub fn key_record(&self) -> Result<Vec<u8>, DbError> {
        self.with_redb(|store| key_check(&store.db, &self.path))
    }

    /// Releases the file (idempotent), first folding the journal into redb if it holds more
    /// than [`journal::CLOSE_CHECKPOINT_AT`]; see the type's header for what works afterwards.
    pub fn close(&self) {
        let store = self.db.write().unwrap_or_else(PoisonError::into_inner).take();
        // Closing writes redb's state back and may meet the same damage as a read.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            if let Some(mut store) = store
                && store.journal.as_ref().is_some_and(|j| j.used() > journal::CLOSE_CHECKPOINT_AT)
                && let Ok(generation) = store.generation(&self.path)
            {
                // A failure leaves the journal as it is: the next open replays it.
                let _ = store.checkpoint(&BTreeMap::new(), generation);
            }
        }));
    }

    /// Folds the journal into redb now (one durable redb commit, generation unchanged).
    pub fn checkpoint(&self) -> Result<(), DbError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        shielded(&self.path, || {
            let mut open = self.db.write().unwrap_or_else(PoisonError::into_inner);
            let store = open.as_mut().ok_or_else(|| DbError::Closed(self.path.clone()))?;
            let generation = store.generation(&self.path)?;
            store.checkpoint(&BTreeMap::new(), generation)
        })
    }

    /// Runs `f` on the open file, or, once closed, on the file opened for this one read under
    /// the home's lock.
    fn with_redb<T>(&self, f: impl FnOnce(&Store) -> Result<T, DbError>) -> Result<T, DbError> {
        {
            let open = self.db.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(store) = open.as_ref() {
                return f(store);
            }
        }
        let Some(home) = &self.home else { return Err(DbError::Closed(self.path.clone())) };
        let _lock = HomeLock::acquire(home, true).map_err(|e| DbError::Lock(e.to_string()))?;
        let (db, path, format) = open_file(home)?;
        // Re-sealed under a new key, or replaced by an older copy, since this handle proved
        // the key: `open_store` says so before anything is read.
        let store = match open_store(db, format, home, &self.keys, &path, false) {
            Err(DbError::KeyChanged(p)) => {
                if let Some(watch) = &self.key_watch {
                    watch.store(true, Ordering::Relaxed);
                }
                return Err(DbError::KeyChanged(p));
            }
            r => r?,
        };
        let out = f(&store);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(store)));
        out
    }

    /// Runs `f` on the open file; refused once closed.
    fn with_open<T>(&self, f: impl FnOnce(&Store) -> Result<T, DbError>) -> Result<T, DbError> {
        let open = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match open.as_ref() {
            Some(store) => f(store),
            None => Err(DbError::Closed(self.path.clone())),
        }
    }

    /// The redb file as tests look into it: with the journal folded in first.
    #[cfg(test)]
    fn raw(&self) -> RawGuard<'_> {
        self.checkpoint().expect("checkpoint");
        RawGuard(self.db.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The number of writes committed so far: changes whenever anyone wrote.
    pub fn generation(&self) -> Result<u64, DbError> {
        shielded(&self.path, || self.with_redb(|s| s.generation(&self.path)))
    }

    /// The plaintext of record `logical` of `table`, if present.
    pub fn get(&self, table: Table, logical: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, DbError> {
        shielded(&self.path, || self.get_unshielded(table, logical))
    }

    fn get_unshielded(&self, table: Table, logical: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, DbError> {
        let slot = self.keys.slot(table.label(), logical);
        let Some(sealed) = self.with_redb(|s| s.get_sealed(table, &slot))? else { return Ok(None) };
        Ok(Some(self.keys.open(table.label(), &slot, &sealed)?))
    }

    /// Up to `n` history entries of `conversation` with keys in `keys`, newest first: one
    /// range scan, whatever the history's length.
    pub fn history_page(
        &self,
        conversation: &[u8],
        keys: RangeInclusive<HistoryKey>,
        n: usize,
    ) -> Result<Vec<HistoryRecord>, DbError> {
        shielded(&self.path, || self.history_range(conversation, keys.clone(), n, true))
    }

    /// The key of the oldest history entry of `conversation`, if any.
    pub fn history_oldest(&self, conversation: &[u8]) -> Result<Option<HistoryKey>, DbError> {
        let all = HistoryKey::MIN..=HistoryKey::MAX;
        shielded(&self.path, || Ok(self.history_range(conversation, all, 1, false)?.pop().map(|(k, _)| k)))
    }

    /// The key of the newest history entry of `conversation`, if any.
    pub fn history_newest(&self, conversation: &[u8]) -> Result<Option<HistoryKey>, DbError> {
        let all = HistoryKey::MIN..=HistoryKey::MAX;
        shielded(&self.path, || Ok(self.history_range(conversation, all, 1, true)?.pop().map(|(k, _)| k)))
    }

    fn history_range(
        &self,
        conversation: &[u8],
        keys: RangeInclusive<HistoryKey>,
        n: usize,
        newest_first: bool,
    ) -> Result<Vec<HistoryRecord>, DbError> {
        let label = Table::History.label();
        let conv = self.keys.slot(label, conversation);
        let lo = history_key(&conv, *keys.start());
        let hi = history_key(&conv, *keys.end());
        let sealed = self.with_open(|s| s.history_range(&lo, &hi, n, newest_first))?;
        let mut out = Vec::with_capacity(sealed.len());
        for (k, v) in sealed {
            let key = parse_history_key(&conv, &k).ok_or(RecordDamaged)?;
            out.push((key, self.keys.open(label, &k, &v)?));
        }
        Ok(out)
    }

    /// The plaintext of every record of `table` (for loading a whole table at once).
    pub fn scan(&self, table: Table) -> Result<Vec<Zeroizing<Vec<u8>>>, DbError> {
        shielded(&self.path, || {
            let all = self.with_open(|s| s.scan(table))?;
            let mut out = Vec::with_capacity(all.len());
            for (k, v) in all {
                out.push(self.keys.open(table.label(), &k, &v)?);
            }
            Ok(out)
        })
    }

    /// Starts a write: everything put or deleted lands together, or not at all.
    pub fn write(&self) -> Result<DbWrite<'_>, DbError> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.with_open(|_| Ok(()))?;
        Ok(DbWrite {
            keys: &self.keys,
            path: &self.path,
            target: Target::Handle { db: self, _writer: writer },
            changes: BTreeMap::new(),
        })
    }
}

/// The test's view of the open redb file.
#[cfg(test)]
struct RawGuard<'a>(std::sync::RwLockReadGuard<'a, Option<Store>>);

#[cfg(test)]
impl RawGuard<'_> {
    fn as_ref(&self) -> Option<&Database> {
        self.0.as_ref().map(|s| &s.db)
    }
}

/// Opens the journal of a file whose key was proven, after upgrading an older format.
/// A new, empty redb file at `path` (fails if it exists), private to its owner.
fn create_redb(path: &Path) -> Result<Database, DbError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Created private: records are sealed, but their sizes and the KDF salt are not.
        options.mode(0o600);
    }
    let file = options.open(path).map_err(|e| DbError::Io { op: "create", reason: e.to_string() })?;
    let backend = redb::backends::FileBackend::new(file)
        .map_err(|e| DbError::Io { op: "create", reason: e.to_string() })?;
    Database::builder()
        .set_cache_size(CLIENT_DB_CACHE_BYTES)
        .create_with_backend(backend)
        .map_err(|e| io_err("create")(e.into()))
}

/// Checks `keys` against the file (format 6: its record check; an older format only when
/// `key_proven`, its `key` record having just opened: the upgrade writes the record check),
/// upgrades it if need be and attaches its journal.
fn open_store(
    db: Database,
    format: u32,
    dir: &Path,
    keys: &RecordKeys,
    path: &Path,
    key_proven: bool,
) -> Result<Store, DbError> {
    // The file is dropped inside the shield when anything fails: closing may meet damage too.
    shielded(path, move || {
        if format == DB_FORMAT_VERSION {
            match check_records_key(&db, keys, path) {
                // The keys the passphrase just unlocked do not open their own check.
                Err(DbError::KeyChanged(_)) if key_proven => {
                    return Err(DbError::Damaged {
                        path: path.to_path_buf(),
                        reason: "the record check does not open under the unlocked keys".into(),
                    });
                }
                r => r?,
            }
        } else if !key_proven {
            // Replaced by an older qpq's copy since this process proved the key.
            return Err(DbError::KeyChanged(path.to_path_buf()));
        }
        upgrade_if_needed(&db, format, keys, path)?;
        attach_journal(db, Some(dir), keys, path)
    })
}

/// Where a write's changes go when it commits.
enum Target<'a> {
    /// The database handle: through the journal, or a durable redb commit (a checkpoint).
    Handle { db: &'a ClientDb, _writer: MutexGuard<'a, ()> },
    /// An upgrade's redb transaction on a file being opened.
    Txn(redb::WriteTransaction),
}

/// A write on the client database: its changes are kept (sealed) until it commits.
pub struct DbWrite<'a> {
    keys: &'a RecordKeys,
    path: &'a Path,
    target: Target<'a>,
    /// (table, slot) → sealed value, None when deleted.
    changes: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
}

impl DbWrite<'_> {
    /// Seals and stores `plaintext` as record `logical` of `table`.
    pub fn put(&mut self, table: Table, logical: &[u8], plaintext: &[u8]) -> Result<(), DbError> {
        let slot = self.keys.slot(table.label(), logical);
        self.put_at(table, &slot, plaintext)
    }

    /// The plaintext of record `logical` of `table` as this write sees it, if present.
    pub fn get(&self, table: Table, logical: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, DbError> {
        shielded(self.path, || self.get_unshielded(table, logical))
    }

    fn get_unshielded(&self, table: Table, logical: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, DbError> {
        let slot = self.keys.slot(table.label(), logical);
        let sealed = match self.changes.get(&(table, slot.to_vec())) {
            Some(v) => v.clone(),
            None => match &self.target {
                Target::Handle { db, .. } => db.with_open(|s| s.get_sealed(table, &slot))?,
                Target::Txn(txn) => {
                    let t = txn.open_table(table.def()).map_err(read_err)?;
                    t.get(slot.as_slice()).map_err(read_err)?.map(|v| v.value().to_vec())
                }
            },
        };
        let Some(sealed) = sealed else { return Ok(None) };
        Ok(Some(self.keys.open(table.label(), &slot, &sealed)?))
    }

    /// Deletes record `logical` of `table` (nothing if absent).
    pub fn delete(&mut self, table: Table, logical: &[u8]) -> Result<(), DbError> {
        let slot = self.keys.slot(table.label(), logical);
        self.changes.insert((table, slot.to_vec()), None);
        Ok(())
    }

    /// Stores history entry `key` of `conversation`.
    pub fn put_history(
        &mut self,
        conversation: &[u8],
        key: HistoryKey,
        plaintext: &[u8],
    ) -> Result<(), DbError> {
        let conv = self.keys.slot(Table::History.label(), conversation);
        self.put_at(Table::History, &history_key(&conv, key), plaintext)
    }

    /// Deletes the history entries of `conversation` received before `cutoff_ms` (all of them
    /// with `u64::MAX`): one range read, then a deletion per entry; returns how many.
    pub fn delete_history_before(&mut self, conversation: &[u8], cutoff_ms: u64) -> Result<usize, DbError> {
        let path = self.path;
        shielded(path, || self.delete_history_before_unshielded(conversation, cutoff_ms))
    }

    fn delete_history_before_unshielded(
        &mut self,
        conversation: &[u8],
        cutoff_ms: u64,
    ) -> Result<usize, DbError> {
        let conv = self.keys.slot(Table::History.label(), conversation);
        let lo = history_key(&conv, HistoryKey::MIN);
        let Some(last) = (HistoryKey { at_ms: cutoff_ms, index: 0 }).below() else { return Ok(0) };
        let hi = history_key(&conv, last);
        let mut doomed: std::collections::BTreeSet<Vec<u8>> = match &self.target {
            Target::Handle { db, .. } => db
                .with_open(|s| s.history_range(&lo, &hi, usize::MAX, false))?
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            Target::Txn(txn) => {
                let t = txn.open_table(Table::History.def()).map_err(read_err)?;
                let mut keys = std::collections::BTreeSet::new();
                for item in t.range(lo.as_slice()..=hi.as_slice()).map_err(read_err)? {
                    keys.insert(item.map_err(read_err)?.0.value().to_vec());
                }
                keys
            }
        };
        for ((_, k), v) in self.changes.range((Table::History, lo.clone())..=(Table::History, hi.clone())) {
            match v {
                Some(_) => doomed.insert(k.clone()),
                None => doomed.remove(k),
            };
        }
        let deleted = doomed.len();
        for k in doomed {
            self.changes.insert((Table::History, k), None);
        }
        Ok(deleted)
    }

    fn put_at(&mut self, table: Table, slot: &[u8], plaintext: &[u8]) -> Result<(), DbError> {
        let sealed = self.keys.seal(table.label(), slot, plaintext);
        self.changes.insert((table, slot.to_vec()), Some(sealed));
        Ok(())
    }

    /// Bumps the generation and makes the write durable, returning the new generation: one
    /// journal entry (a write and an `fdatasync`) when it is small and the journal has room, or
    /// else one durable redb commit that also folds the journal in (a checkpoint).
    pub fn commit(self) -> Result<u64, DbError> {
        let path = self.path;
        shielded(path, move || self.commit_unshielded())
    }

    fn commit_unshielded(self) -> Result<u64, DbError> {
        let DbWrite { keys, path, target, changes } = self;
        match target {
            Target::Txn(txn) => {
                apply(&txn, changes.iter())?;
                let generation = {
                    let mut meta = txn.open_table(META).map_err(write_err)?;
                    let next = read_generation(&meta, path)?.wrapping_add(1);
                    meta.insert(META_GENERATION, next.to_le_bytes().as_slice()).map_err(write_err)?;
                    next
                };
                crate::failpoint::hit("clientdb-before-commit");
                txn.commit().map_err(|e| io_err("commit")(e.into()))?;
                Ok(generation)
            }
            Target::Handle { db, _writer } => {
                let mut open = db.db.write().unwrap_or_else(PoisonError::into_inner);
                let store = open.as_mut().ok_or_else(|| DbError::Closed(path.to_path_buf()))?;
                let generation = store.generation(path)?.wrapping_add(1);
                if let Some(j) = &mut store.journal
                    && let Some(body) = journal::encode_entry(generation, changes.iter())
                    && j.fits(body.len())
                {
                    crate::failpoint::hit("clientdb-before-commit");
                    j.append(keys, &body)?;
                    // Tests stop here: the entry is durable, nothing else happened.
                    crate::failpoint::hit("clientdb-journal-after-sync");
                    store.overlay.apply(changes, generation);
                    return Ok(generation);
                }
                store.checkpoint(&changes, generation)?;
                Ok(generation)
            }
        }
    }
}

/// Runs `f`, turning a panic inside redb into an error. redb trusts the pages it reads: a
/// damaged file (a bad disk, a careless edit) can make it index out of bounds rather than
/// report corruption, and a damaged home must give an error, not abort the command.
fn shielded<T>(path: &Path, f: impl FnOnce() -> Result<T, DbError>) -> Result<T, DbError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(DbError::Damaged { path: path.to_path_buf(), reason: "the storage engine rejected it".into() })
    })
}

fn history_key(conversation_slot: &[u8], key: HistoryKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(conversation_slot.len() + 16);
    k.extend_from_slice(conversation_slot);
    k.extend_from_slice(&key.at_ms.to_be_bytes());
    k.extend_from_slice(&key.index.to_be_bytes());
    k
}

fn parse_history_key(conversation_slot: &[u8], k: &[u8]) -> Option<HistoryKey> {
    let rest = k.strip_prefix(conversation_slot)?;
    let at_ms = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let index = u64::from_be_bytes(rest.get(8..)?.try_into().ok()?);
    Some(HistoryKey { at_ms, index })
}

/// Opens the redb file and checks its format version: [`DB_FORMAT_VERSION`] or one from
/// [`UPGRADED_FORMAT`] on, returned (the upgrade needs the key: [`upgrade_if_needed`]). redb checks
/// some invariants with debug assertions, so a damaged file could panic a debug build: that is
/// caught and reported too.
fn open_file(dir: &Path) -> Result<(Database, PathBuf, u32), DbError> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        return Err(DbError::Missing(dir.to_path_buf()));
    }
    let damaged = |reason: String| DbError::Damaged { path: path.clone(), reason };
    let opened = shielded(&path, || -> Result<(Database, u32), DbError> {
        let db =
            Database::builder().set_cache_size(CLIENT_DB_CACHE_BYTES).open(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => DbError::InUse(path.clone()),
                redb::DatabaseError::Storage(redb::StorageError::Io(io))
                    if io.kind() != io::ErrorKind::InvalidData =>
                {
                    DbError::Io { op: "open", reason: io.to_string() }
                }
                other => damaged(other.to_string().to_lowercase()),
            })?;
        let version = {
            let txn = db.begin_read().map_err(|e| damaged(e.to_string().to_lowercase()))?;
            let meta = txn.open_table(META).map_err(|e| damaged(e.to_string().to_lowercase()))?;
            let v = meta
                .get(META_FORMAT)
                .map_err(|e| damaged(e.to_string().to_lowercase()))?
                .ok_or_else(|| damaged("no format record".into()))?;
            let bytes = <[u8; 4]>::try_from(v.value()).map_err(|_| damaged("bad format record".into()))?;
            u32::from_le_bytes(bytes)
        };
        Ok((db, version))
    });
    let (db, version) = opened?;
    if version > DB_FORMAT_VERSION {
        return Err(DbError::Newer { path, found: version });
    }
    if version < UPGRADED_FORMAT {
        return Err(DbError::Older { path, found: version });
    }
    Ok((db, path, version))
}

/// Moves a file of a format from [`UPGRADED_FORMAT`] on to [`DB_FORMAT_VERSION`] with the records' keys
/// (durable when it returns; a crash before leaves it at the old format, which the next open
/// upgrades). Nothing for a file of the current format.
fn upgrade_if_needed(db: &Database, format: u32, keys: &RecordKeys, path: &Path) -> Result<(), DbError> {
    if format == DB_FORMAT_VERSION {
        return Ok(());
    }
    shielded(path, || {
        let txn = db.begin_write().map_err(|e| io_err("upgrade")(e.into()))?;
        let mut w = DbWrite { keys, path, target: Target::Txn(txn), changes: BTreeMap::new() };
        let step_err = |e| match e {
            StateError::Db(e) => e,
            other => DbError::Damaged { path: path.to_path_buf(), reason: other.to_string() },
        };
        let mut moved = 0;
        if format < 3 {
            moved += records::merge_group_records(&mut w).map_err(step_err)?;
        }
        moved += records::split_timelines(&mut w).map_err(step_err)?;
        let Target::Txn(txn) = &w.target else {
            return Err(DbError::Closed(path.to_path_buf()));
        };
        {
            let mut meta = txn.open_table(META).map_err(|e| io_err("upgrade")(e.into()))?;
            meta.insert(META_FORMAT, DB_FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(|e| io_err("upgrade")(e.into()))?;
            meta.insert(META_RECORD_CHECK, record_check(keys).as_slice())
                .map_err(|e| io_err("upgrade")(e.into()))?;
        }
        // Tests stop here: a crash before the commit leaves the old format, whole.
        crate::failpoint::hit("clientdb-upgrade-before-commit");
        if moved > 0 {
            // Records changed: a write like any other, so it counts as a generation.
            w.commit().map(drop)
        } else {
            let Target::Txn(txn) = w.target else { return Err(DbError::Closed(path.to_path_buf())) };
            txn.commit().map_err(|e| io_err("upgrade")(e.into()))
        }
    })
}

/// The record check: [`KEY_CHECK`] sealed under the records' keys.
fn record_check(keys: &RecordKeys) -> Vec<u8> {
    keys.seal(RECORD_CHECK_LABEL, RECORD_CHECK_SLOT, KEY_CHECK)
}

/// Fails with [`DbError::KeyChanged`] unless the record check opens under `keys`.
fn check_records_key(db: &Database, keys: &RecordKeys, path: &Path) -> Result<(), DbError> {
    let check = meta_record(db, path, META_RECORD_CHECK, "no record check")?;
    let plain = keys
        .open_uncounted(RECORD_CHECK_LABEL, RECORD_CHECK_SLOT, &check)
        .map_err(|_| DbError::KeyChanged(path.to_path_buf()))?;
    if plain.as_slice() != KEY_CHECK {
        return Err(DbError::Damaged {
            path: path.to_path_buf(),
            reason: "the record check does not match".into(),
        });
    }
    Ok(())
}

/// The `key` record: what unlocks the home.
fn key_check(db: &Database, path: &Path) -> Result<Vec<u8>, DbError> {
    meta_record(db, path, META_KEY, "no key record")
}

/// The `meta` record `name`; `missing` says its absence.
fn meta_record(db: &Database, path: &Path, name: &str, missing: &str) -> Result<Vec<u8>, DbError> {
    let damaged = |reason: String| DbError::Damaged { path: path.to_path_buf(), reason };
    let txn = db.begin_read().map_err(|e| damaged(e.to_string()))?;
    let meta = txn.open_table(META).map_err(|e| damaged(e.to_string()))?;
    let v = meta.get(name).map_err(|e| damaged(e.to_string()))?.ok_or_else(|| damaged(missing.into()))?;
    Ok(v.value().to_vec())
}

fn read_generation<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
    path: &Path,
) -> Result<u64, DbError> {
    let damaged = |reason: &str| DbError::Damaged { path: path.to_path_buf(), reason: reason.into() };
    let v = meta.get(META_GENERATION).map_err(|e| DbError::Io { op: "read", reason: e.to_string() })?;
    let v = v.ok_or_else(|| damaged("no generation record"))?;
    let bytes = <[u8; 8]>::try_from(v.value()).map_err(|_| damaged("bad generation record"))?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod journal_tests;
#[cfg(test)]
mod tests;
