//! Changing what unlocks a home (`qpq passphrase`): the records' keys sealed under a new
//! passphrase (or none), and with `--new-key` every record re-sealed under a new record key.
//!
//! Why a copy and not an update in place: redb writes copy-on-write, so an updated `key` record
//! leaves the old one (the records' keys sealed under the old passphrase) in a freed page of
//! the file until something happens to reuse it, and a copy of the file taken after the change
//! would still open with the old passphrase. The whole database is copied aside instead
//! (`qpq.db.partial`, the migration's name, which an open removes when it finds it left over),
//! made durable and renamed over `qpq.db`: a crash leaves the old file or the new one, each
//! whole, and the old file's pages go with it. The journal is folded into redb first, so the copy
//! holds everything and the journal nothing the copy lacks.

use std::collections::BTreeMap;
use std::sync::PoisonError;

use redb::{ReadableDatabase, ReadableTable};

use super::{
    ClientDb, DbError, DbKey, META, META_FORMAT, META_GENERATION, META_JOURNAL, META_KEY, META_RECORD_CHECK,
    Table, check_records_key, create_redb, key_check, migrate, read_err, record_check, shielded, write_err,
};
use crate::client::db::seal::RecordKeys;
use crate::crypto::statefile::{self, StateKey};
use crate::fsutil;

/// What [`ClientDb::change_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// Records re-sealed under a new record key; None when the records were copied as they were.
    pub resealed: Option<u64>,
    /// The generation of the new file (one past the old one's, so waiting processes look).
    pub generation: u64,
    /// The new `key` record.
    pub key_record: Vec<u8>,
}

impl ClientDb {
    /// Replaces the file with a copy whose records' keys (`reseal`, or else `current`, the keys
    /// this handle opened it with) are sealed under `unlock`, every value re-sealed under
    /// `reseal`'s record key if given (its slot key must be `current`'s: slots stay), provided
    /// the `key` record is still `unlocked` (the one whose passphrase the caller proved: a change
    /// another process made since is refused, not overwritten by one proved against the passphrase
    /// before it). The caller holds the home's lock. The handle is closed afterwards: open the home
    /// again with the keys now in use.
    pub fn change_key(
        &self,
        unlock: &StateKey,
        current: &DbKey,
        reseal: Option<&DbKey>,
        unlocked: &[u8],
    ) -> Result<KeyChange, DbError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut open = self.db.write().unwrap_or_else(PoisonError::into_inner);
        let changed = shielded(&self.path, || {
            let store = open.as_mut().ok_or_else(|| DbError::Closed(self.path.clone()))?;
            let dir = self.path.parent().ok_or_else(|| DbError::Closed(self.path.clone()))?;
            if reseal.is_some_and(|new| !new.same_slots(current)) {
                return Err(DbError::Io { op: "re-seal", reason: "a new key must keep the slot key".into() });
            }
            // Everything into redb first: the copy is made from redb alone.
            let generation = store.generation(&self.path)?;
            store.checkpoint(&BTreeMap::new(), generation)?;
            check_records_key(&store.db, &RecordKeys::derive(current), &self.path)?;
            if key_check(&store.db, &self.path)? != unlocked {
                return Err(DbError::PassphraseChanged(self.path.clone()));
            }
            let target = reseal.unwrap_or(current);
            let keys = RecordKeys::derive(target);
            let partial = dir.join(migrate::PARTIAL_FILE);
            remove_if_present(&partial)?;
            let copy = create_redb(&partial)?;
            let to = copy.begin_write().map_err(write_err)?;
            let from = store.db.begin_read().map_err(read_err)?;
            let mut resealed = 0;
            for table in [Table::Mls, Table::State, Table::History] {
                let old = from.open_table(table.def()).map_err(read_err)?;
                let mut new = to.open_table(table.def()).map_err(write_err)?;
                for item in old.iter().map_err(read_err)? {
                    let (slot, value) = item.map_err(read_err)?;
                    let (slot, value) = (slot.value(), value.value());
                    if reseal.is_some() {
                        let plain = self.keys.open_uncounted(table.label(), slot, value)?;
                        let again = keys.seal(table.label(), slot, &plain);
                        new.insert(slot, again.as_slice()).map_err(write_err)?;
                        resealed += 1;
                    } else {
                        new.insert(slot, value).map_err(write_err)?;
                    }
                }
            }
            let next = generation + 1;
            let wrapped;
            {
                let old = from.open_table(META).map_err(read_err)?;
                let journal = old.get(META_JOURNAL).map_err(read_err)?.map(|v| v.value().to_vec());
                let mut meta = to.open_table(META).map_err(write_err)?;
                wrapped = statefile::seal(unlock, &target.wrapped());
                let format = super::DB_FORMAT_VERSION.to_le_bytes();
                let generation = next.to_le_bytes();
                let check = record_check(&keys);
                let mut put = |k: &str, v: &[u8]| meta.insert(k, v).map(drop).map_err(write_err);
                put(META_FORMAT, &format)?;
                put(META_KEY, &wrapped)?;
                put(META_RECORD_CHECK, &check)?;
                put(META_GENERATION, &generation)?;
                if let Some(journal) = &journal {
                    put(META_JOURNAL, journal)?;
                }
            }
            to.commit().map_err(write_err)?;
            drop(from);
            drop(copy);
            // Tests stop here: a crash before the rename leaves the old file, whole.
            crate::failpoint::hit("clientdb-change-key-before-publish");
            std::fs::rename(&partial, &self.path)
                .map_err(|e| DbError::Io { op: "replace", reason: e.to_string() })?;
            fsutil::sync_dir(dir).map_err(|e| DbError::Io { op: "sync", reason: e.to_string() })?;
            Ok(KeyChange { resealed: reseal.map(|_| resealed), generation: next, key_record: wrapped })
        });
        // Whatever happened, this handle is done: its keys or its file may be gone (closing a
        // redb handle writes its header back, so that, too, is shielded).
        let store = open.take();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(store)));
        if changed.is_err()
            && let Some(dir) = self.path.parent()
        {
            // A copy that never replaced the file (an open would remove it too).
            let _ = remove_if_present(&dir.join(migrate::PARTIAL_FILE));
        }
        changed
    }
}

fn remove_if_present(path: &std::path::Path) -> Result<(), DbError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DbError::Io { op: "remove a partial copy of", reason: e.to_string() })
        }
        _ => Ok(()),
    }
}
