//! The open client database: the redb file, its journal, and the overlay of journaled writes
//! redb does not hold yet, which every read merges over redb's records (issue 12: a small write
//! goes to the journal, not to a redb commit). Split from [`super`] so the handle's life
//! (open, close, write) and the merged view of the records each read in one sitting.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::journal::{self, JOURNAL_FILE, Journal, JournalId};
use super::seal::RecordKeys;
use super::{
    DbError, META, META_GENERATION, META_JOURNAL, Table, io_err, read_err, read_generation, write_err,
};

/// The open redb file, its journal and the journaled writes redb does not hold yet.
pub(super) struct Store {
    pub(super) db: Database,
    /// None for a database built aside (a migration's): every write is a durable redb commit.
    pub(super) journal: Option<Journal>,
    pub(super) overlay: Overlay,
}

/// The records written through the journal since the last checkpoint, as redb will hold them:
/// every read merges them over redb's. Sealed values only, as in redb.
#[derive(Default)]
pub(super) struct Overlay {
    /// (table, slot) → sealed value, None when deleted.
    pub(super) records: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
    /// The generation of the last journaled write (None: redb's `meta` has it).
    pub(super) generation: Option<u64>,
}

impl Overlay {
    pub(super) fn apply(&mut self, changes: impl IntoIterator<Item = journal::Change>, generation: u64) {
        self.records.extend(changes);
        self.generation = Some(generation);
    }

    /// The overlay's records of `table` with slots in `lo..=hi`.
    pub(super) fn range<'a>(
        &'a self,
        table: Table,
        lo: &[u8],
        hi: &[u8],
    ) -> impl DoubleEndedIterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> {
        self.records.range((table, lo.to_vec())..=(table, hi.to_vec())).map(|((_, k), v)| (k, v))
    }
}

impl Store {
    pub(super) fn generation(&self, path: &Path) -> Result<u64, DbError> {
        if let Some(g) = self.overlay.generation {
            return Ok(g);
        }
        let txn = self.db.begin_read().map_err(read_err)?;
        let meta = txn.open_table(META).map_err(read_err)?;
        read_generation(&meta, path)
    }

    pub(super) fn get_sealed(&self, table: Table, slot: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        if let Some(v) = self.overlay.records.get(&(table, slot.to_vec())) {
            return Ok(v.clone());
        }
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(table.def()).map_err(read_err)?;
        Ok(t.get(slot).map_err(read_err)?.map(|v| v.value().to_vec()))
    }

    /// Every (slot, sealed value) of `table`, ordered by slot.
    pub(super) fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>, DbError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(table.def()).map_err(read_err)?;
        let mut all = BTreeMap::new();
        for item in t.iter().map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            all.insert(k.value().to_vec(), v.value().to_vec());
        }
        let (lo, hi) = ([], [0xff; 64]);
        for (k, v) in self.overlay.range(table, &lo, &hi) {
            match v {
                Some(v) => all.insert(k.clone(), v.clone()),
                None => all.remove(k),
            };
        }
        Ok(all.into_iter().collect())
    }

    /// Up to `n` (key, sealed value) of the `history` table in `lo..=hi`, redb's merged with the
    /// overlay's, in key order or, with `newest_first`, reversed.
    pub(super) fn history_range(
        &self,
        lo: &[u8],
        hi: &[u8],
        n: usize,
        newest_first: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, DbError> {
        let overlay = self.overlay.range(Table::History, lo, hi);
        let mut overlay: Box<dyn Iterator<Item = _>> =
            if newest_first { Box::new(overlay.rev()) } else { Box::new(overlay) };
        let mut next_overlay = overlay.next();
        let comes_first = |a: &[u8], b: &[u8]| if newest_first { a > b } else { a < b };
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(Table::History.def()).map_err(read_err)?;
        let range = t.range(lo..=hi).map_err(read_err)?;
        let items: Box<dyn Iterator<Item = _>> =
            if newest_first { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = Vec::new();
        let push = |out: &mut Vec<(Vec<u8>, Vec<u8>)>, k: &[u8], v: &Option<Vec<u8>>| {
            if let Some(v) = v {
                out.push((k.to_vec(), v.clone()));
            }
        };
        for item in items {
            let (k, v) = item.map_err(read_err)?;
            let k = k.value();
            // The overlay's records before this one, then this one (the overlay's if it has it).
            while let Some((ok, ov)) = next_overlay.filter(|(ok, _)| comes_first(ok, k)) {
                push(&mut out, ok, ov);
                next_overlay = overlay.next();
            }
            if out.len() >= n {
                break;
            }
            match next_overlay {
                Some((ok, ov)) if ok.as_slice() == k => {
                    push(&mut out, ok, ov);
                    next_overlay = overlay.next();
                }
                _ => out.push((k.to_vec(), v.value().to_vec())),
            }
            if out.len() >= n {
                break;
            }
        }
        while let Some((ok, ov)) = next_overlay {
            push(&mut out, ok, ov);
            next_overlay = overlay.next();
        }
        out.truncate(n);
        Ok(out)
    }

    /// Commits the overlay and `changes` to redb durably with `generation`, recording that redb
    /// now covers every journal entry, then empties the journal (in that order: a crash between
    /// leaves entries that the next replay skips).
    pub(super) fn checkpoint(
        &mut self,
        changes: &BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
        generation: u64,
    ) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(write_err)?;
        apply(&txn, self.overlay.records.iter())?;
        apply(&txn, changes.iter())?;
        {
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert(META_GENERATION, generation.to_le_bytes().as_slice()).map_err(write_err)?;
            if let Some(j) = &self.journal {
                meta.insert(META_JOURNAL, journal_record(j.id(), j.last_seq()).as_slice())
                    .map_err(write_err)?;
            }
        }
        crate::failpoint::hit("clientdb-before-commit");
        txn.commit().map_err(|e| io_err("commit")(e.into()))?;
        self.overlay = Overlay::default();
        crate::failpoint::hit("clientdb-checkpoint-before-reset");
        if let Some(j) = &mut self.journal
            && j.needs_reset()
        {
            // The commit is durable: report it so. A reset that failed leaves the journal
            // `failed`, so the next commit is a checkpoint again and resets it then; until
            // then a replay skips its entries, which redb now covers.
            let _ = j.reset();
        }
        Ok(())
    }
}

/// Applies `changes` to the tables of `txn`.
pub(super) fn apply<'a>(
    txn: &redb::WriteTransaction,
    changes: impl Iterator<Item = (&'a (Table, Vec<u8>), &'a Option<Vec<u8>>)>,
) -> Result<(), DbError> {
    let mut tables: BTreeMap<Table, redb::Table<'_, &'static [u8], &'static [u8]>> = BTreeMap::new();
    for ((table, slot), value) in changes {
        let t = match tables.entry(*table) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(txn.open_table(table.def()).map_err(write_err)?)
            }
        };
        match value {
            Some(v) => t.insert(slot.as_slice(), v.as_slice()).map(drop),
            None => t.remove(slot.as_slice()).map(drop),
        }
        .map_err(write_err)?;
    }
    Ok(())
}

pub(super) fn journal_record(id: &JournalId, covered: u64) -> [u8; journal::ID_LEN + 8] {
    let mut r = [0; journal::ID_LEN + 8];
    r[..journal::ID_LEN].copy_from_slice(id);
    r[journal::ID_LEN..].copy_from_slice(&covered.to_le_bytes());
    r
}

/// Attaches the journal of the database `db` at `path` in home `dir`: replays it into a fresh
/// overlay, or first creates it when `meta` names none (a new file, or one upgraded from format
/// 4: no entry can exist). Without `dir` (a database built aside), no journal.
pub(super) fn attach_journal(
    db: Database,
    dir: Option<&Path>,
    keys: &RecordKeys,
    path: &Path,
) -> Result<Store, DbError> {
    let Some(dir) = dir else { return Ok(Store { db, journal: None, overlay: Overlay::default() }) };
    let damaged = |reason: &str| DbError::Damaged { path: path.to_path_buf(), reason: reason.into() };
    let record = {
        let txn = db.begin_read().map_err(read_err)?;
        let meta = txn.open_table(META).map_err(read_err)?;
        meta.get(META_JOURNAL).map_err(read_err)?.map(|v| v.value().to_vec())
    };
    let jpath = dir.join(JOURNAL_FILE);
    let (id, covered) = match record {
        Some(r) => {
            let id: JournalId = r
                .get(..journal::ID_LEN)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| damaged("bad journal record"))?;
            let covered = r
                .get(journal::ID_LEN..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| damaged("bad journal record"))?;
            (id, covered)
        }
        None => {
            let id = Journal::create(&jpath)?;
            let txn = db.begin_write().map_err(write_err)?;
            {
                let mut meta = txn.open_table(META).map_err(write_err)?;
                meta.insert(META_JOURNAL, journal_record(&id, 0).as_slice()).map_err(write_err)?;
            }
            txn.commit().map_err(|e| io_err("commit")(e.into()))?;
            (id, 0)
        }
    };
    let replayed = Journal::replay(&jpath, &id, covered, keys)?;
    let mut overlay = Overlay::default();
    for (generation, changes) in replayed.entries {
        overlay.apply(changes, generation);
    }
    Ok(Store { db, journal: Some(replayed.journal), overlay })
}
