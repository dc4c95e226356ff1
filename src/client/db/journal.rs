//! The client database's journal, `qpq.db.journal` in the home: a small durable write is one
//! `pwrite` at the journal's tail and one `fdatasync`, instead of a durable redb commit (issue 12:
//! a redb commit costs ~229k instructions, 7 pages and an `fdatasync` for a one-record message).
//!
//! # Layout
//! A file of [`JOURNAL_BYTES`], created zero-filled (real zeros, not a hole: a write into it then
//! changes no file metadata, so `fdatasync` flushes the data alone), 0600, synced with its
//! directory once. It starts with a header block of [`HEADER_BYTES`]:
//!
//! | bytes | content                                                                  |
//! |-------|--------------------------------------------------------------------------|
//! | 16    | [`MAGIC`]                                                                |
//! | 16    | the journal id, random, also in the database's `meta` record `journal`   |
//! | 8     | u64 LE: the sequence number of the first entry (the *base*)              |
//!
//! then entries back to back: u32 LE length of the sealed body, u64 LE sequence number, and the
//! sealed body: [`super::seal::RecordKeys::seal`] with the label `journal` and, as its slot,
//! the journal id ‖ u64 BE sequence number, so an entry of another journal, another database or
//! another position does not open. The body is the whole write set of one commit
//! ([`encode_entry`]): the generation it produces, then each record put (its sealed value, as
//! the tables store it) or deleted. Nothing is in clear beyond the lengths and sequence numbers.
//!
//! # Replay
//! Opening reads the entries from the base while each has the next sequence number and opens
//! under the keys; the first that does not (a torn write, zeros, an entry left from before the
//! last reset) ends the journal, and the next entry is written there. Entries with a sequence
//! number up to the one the database's `meta` record says it covers are already in redb and
//! skipped. A reset (after a checkpoint, see [`super`]) rewrites the header with the next
//! sequence number as base; the sequence numbers never restart, so an old entry never looks
//! like the next one.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use super::Table;
use super::seal::{RecordDamaged, RecordKeys};
use crate::fsutil;

/// File name of the journal in the home.
pub const JOURNAL_FILE: &str = "qpq.db.journal";
/// Size of the journal file: room for ~80 app messages (an entry is ~1.5 KiB for a group of
/// 128) before a checkpoint, and a bounded replay when a home opens.
pub const JOURNAL_BYTES: u64 = 256 * 1024;
/// The header block (one filesystem block, so entries never share it).
pub const HEADER_BYTES: u64 = 4096;
/// A write set with a larger body takes the durable redb path: the journal is for small writes.
pub const ENTRY_MAX: usize = 64 * 1024;
/// Once the journal's entries would pass this offset, the commit folds them into redb instead
/// (a checkpoint), so the journal is never more than half full and replay stays small.
pub const CHECKPOINT_AT: u64 = JOURNAL_BYTES / 2;
/// A close folds the journal into redb (a checkpoint) when it holds more than this.
pub const CLOSE_CHECKPOINT_AT: u64 = HEADER_BYTES + 32 * 1024;
/// Identifies the file.
pub const MAGIC: &[u8; 16] = b"qpq.db journal 1";
/// Length of a journal id.
pub const ID_LEN: usize = 16;
/// Label of the journal's sealed entries.
const LABEL: &[u8] = b"journal";
/// Length of an entry's frame before its sealed body.
const FRAME_LEN: usize = 12;

/// A journal id.
pub type JournalId = [u8; ID_LEN];

/// One change of a write set: a table, a slot, and the sealed value (None: deleted).
pub type Change = ((Table, Vec<u8>), Option<Vec<u8>>);

/// The open journal of a database.
pub struct Journal {
    file: File,
    path: PathBuf,
    id: JournalId,
    /// Where the next entry goes.
    end: u64,
    /// The sequence number of the next entry.
    next_seq: u64,
    /// A write or sync failed since the last reset, so what the file holds past `end` (or in
    /// its header) is unknown: no entry is appended until a checkpoint has reset it.
    failed: bool,
}

/// What a replay found.
pub struct Replayed {
    pub journal: Journal,
    /// The entries redb does not cover yet, oldest first: (generation, changes).
    pub entries: Vec<(u64, Vec<Change>)>,
}

fn io_err(op: &'static str, path: &Path) -> impl Fn(io::Error) -> super::DbError {
    let path = path.display().to_string();
    move |e| super::DbError::Io { op, reason: format!("{path}: {e}") }
}

impl Journal {
    /// Creates (or replaces: no entry of it was ever acknowledged) the journal at `path` with a
    /// new random id, zero-filled, durable with its directory when this returns.
    pub fn create(path: &Path) -> Result<JournalId, super::DbError> {
        let mut id = [0; ID_LEN];
        OsRng.fill_bytes(&mut id);
        let partial = path.with_extension("journal.partial");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&partial).map_err(io_err("create", &partial))?;
        let mut block = vec![0u8; JOURNAL_BYTES as usize];
        // Invariant: the block is JOURNAL_BYTES long, far more than the 40-byte header.
        block[..16].copy_from_slice(MAGIC);
        block[16..32].copy_from_slice(&id);
        block[32..40].copy_from_slice(&1u64.to_le_bytes());
        write_all_at(&file, &block, 0).map_err(io_err("create", &partial))?;
        file.sync_all().map_err(io_err("sync", &partial))?;
        std::fs::rename(&partial, path).map_err(io_err("rename", &partial))?;
        if let Some(dir) = path.parent() {
            fsutil::sync_dir(dir).map_err(io_err("sync", dir))?;
        }
        Ok(id)
    }

    /// Opens the journal at `path`, which must carry `id`, and reads its entries after
    /// `covered` (the last sequence number redb holds).
    pub fn replay(
        path: &Path,
        id: &JournalId,
        covered: u64,
        keys: &RecordKeys,
    ) -> Result<Replayed, super::DbError> {
        let damaged =
            |reason: &str| super::DbError::Damaged { path: path.to_path_buf(), reason: reason.into() };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                damaged("the journal is missing; it holds the newest writes and goes with qpq.db: restore both from the same copy")
            } else {
                io_err("open", path)(e)
            }
        })?;
        let len = file.metadata().map_err(io_err("open", path))?.len();
        if len != JOURNAL_BYTES {
            return Err(damaged("the journal has the wrong size"));
        }
        let mut bytes = Zeroizing::new(vec![0u8; JOURNAL_BYTES as usize]);
        read_exact_at(&file, &mut bytes, 0).map_err(io_err("read", path))?;
        // Invariant: `bytes` is JOURNAL_BYTES long (checked size), so the header slices exist.
        if &bytes[..16] != MAGIC {
            return Err(damaged("the journal has no journal header"));
        }
        if &bytes[16..32] != id {
            return Err(damaged("the journal belongs to another database"));
        }
        let mut seq = u64_le(&bytes[32..40]);
        // The header is not sealed: its base must continue what redb covers (the base is
        // covered + 1 after a reset, lower when a reset did not happen). A base past it means
        // entries in between are missing (a qpq.db and a journal of different copies).
        if seq == 0 || seq > covered.saturating_add(1) {
            return Err(damaged("the journal does not continue qpq.db: restore both from the same copy"));
        }
        let mut at = HEADER_BYTES as usize;
        let mut entries = Vec::new();
        while let Some((body_len, entry_seq)) = frame(&bytes, at) {
            if entry_seq != seq {
                break;
            }
            let start = at + FRAME_LEN;
            let Some(sealed) = bytes.get(start..start + body_len) else { break };
            let Ok(plain) = keys.open_uncounted(LABEL, &entry_slot(id, seq), sealed) else { break };
            let Ok(entry) = decode_entry(&plain) else { break };
            if seq > covered {
                entries.push(entry);
            }
            at = start + body_len;
            seq += 1;
        }
        // A journal that ends at or before what redb covers holds nothing redb lacks: a failed
        // append's burnt number that a checkpoint covered before its reset got through, or an
        // older copy of the journal. Its entries must not be continued (new ones would get
        // numbers the next opening skips as covered: acknowledged, then lost), so numbering goes
        // on after `covered` and appends wait for the first checkpoint to reset it.
        let stale = seq <= covered;
        if stale {
            seq = covered.saturating_add(1);
        }
        Ok(Replayed {
            journal: Journal {
                file,
                path: path.to_path_buf(),
                id: *id,
                end: at as u64,
                next_seq: seq,
                failed: stale,
            },
            entries,
        })
    }

    pub fn id(&self) -> &JournalId {
        &self.id
    }

    /// The sequence number of the last entry written (or the base's predecessor).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Bytes in use, header included.
    pub fn used(&self) -> u64 {
        self.end
    }

    /// True when an entry of `body_len` plaintext bytes may go here rather than into redb.
    pub fn fits(&self, body_len: usize) -> bool {
        !self.failed
            && body_len <= ENTRY_MAX
            && self.end + (FRAME_LEN + body_len + 40) as u64 <= CHECKPOINT_AT
    }

    /// True when the next checkpoint must reset the journal: it holds entries, or a failed
    /// write left it in an unknown state.
    pub fn needs_reset(&self) -> bool {
        self.failed || self.end > HEADER_BYTES
    }

    /// Appends an entry holding `body` and makes it durable: one write and one `fdatasync`.
    pub fn append(&mut self, keys: &RecordKeys, body: &[u8]) -> Result<(), super::DbError> {
        let sealed = keys.seal(LABEL, &entry_slot(&self.id, self.next_seq), body);
        let mut buf = Zeroizing::new(Vec::with_capacity(FRAME_LEN + sealed.len()));
        let len = u32::try_from(sealed.len()).map_err(|_| super::DbError::Io {
            op: "journal",
            reason: format!("entry too large: {} bytes", sealed.len()),
        })?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&self.next_seq.to_le_bytes());
        buf.extend_from_slice(&sealed);
        if self.end + buf.len() as u64 > JOURNAL_BYTES {
            return Err(super::DbError::Io { op: "journal", reason: "the journal is full".into() });
        }
        let written =
            write_all_at(&self.file, &buf, self.end).map_err(io_err("write", &self.path)).and_then(|()| {
                if crate::failpoint::active("clientdb-journal-sync-fails") {
                    return Err(super::DbError::Io { op: "sync", reason: "failpoint".into() });
                }
                self.file.sync_data().map_err(io_err("sync", &self.path))
            });
        if let Err(e) = written {
            // The entry may be on disk anyway (a failed fdatasync says nothing either way), and
            // the caller was told it failed. Its number is burnt: the checkpoint that must come
            // before any other append records redb as covering it and resets the base past it,
            // so it is never replayed over what was written after it.
            self.next_seq += 1;
            self.failed = true;
            return Err(e);
        }
        self.end += buf.len() as u64;
        self.next_seq += 1;
        Ok(())
    }

    /// Empties the journal once redb covers every entry: the header's base becomes the next
    /// sequence number, and the entries' bytes are overwritten with zeros (one write and one
    /// `fdatasync`). Zeros, not just a new base: the entries are sealed under the record key,
    /// which lives as long as the home, so superseded ratchet secrets and history that
    /// retention deleted must not stay readable in the file until later entries happen to
    /// overwrite them. Crash-safe in any order: zeros without the new header end the replay
    /// at the old base, whose entries redb already covers.
    pub fn reset(&mut self) -> Result<(), super::DbError> {
        // The header, then zeros over the whole file: entries may lie past `end` (a failed
        // write, an earlier cycle that went further, a crash between a reset's header and its
        // zeros), and a reset comes once per half a journal of writes, so this at most doubles
        // what the journal writes.
        // Invariant: JOURNAL_BYTES (256 KiB) fits a usize.
        let mut block = vec![0u8; JOURNAL_BYTES as usize];
        block[..16].copy_from_slice(MAGIC);
        block[16..32].copy_from_slice(&self.id);
        block[32..40].copy_from_slice(&self.next_seq.to_le_bytes());
        // A failure leaves the header unknown: `failed` keeps appends off until a reset passes.
        self.failed = true;
        if crate::failpoint::active("clientdb-journal-reset-fails") {
            return Err(super::DbError::Io { op: "write", reason: "failpoint".into() });
        }
        write_all_at(&self.file, &block, 0).map_err(io_err("write", &self.path))?;
        self.file.sync_data().map_err(io_err("sync", &self.path))?;
        self.end = HEADER_BYTES;
        self.failed = false;
        Ok(())
    }
}

/// The length and sequence number of the entry frame at `at`, if one fits.
fn frame(bytes: &[u8], at: usize) -> Option<(usize, u64)> {
    let head = bytes.get(at..at + FRAME_LEN)?;
    // Invariant: `head` is FRAME_LEN (12) bytes: a u32 then a u64.
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    if len == 0 || len > ENTRY_MAX + 64 {
        return None;
    }
    Some((len, u64_le(&head[4..])))
}

/// Invariant: callers pass at least 8 bytes (fixed header and frame fields).
fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn entry_slot(id: &JournalId, seq: u64) -> [u8; ID_LEN + 8] {
    let mut slot = [0u8; ID_LEN + 8];
    slot[..ID_LEN].copy_from_slice(id);
    slot[ID_LEN..].copy_from_slice(&seq.to_be_bytes());
    slot
}

fn table_byte(t: Table) -> u8 {
    match t {
        Table::Mls => 0,
        Table::State => 1,
        Table::History => 2,
    }
}

fn byte_table(b: u8) -> Option<Table> {
    match b {
        0 => Some(Table::Mls),
        1 => Some(Table::State),
        2 => Some(Table::History),
        _ => None,
    }
}

/// The body of an entry: u64 LE generation, u32 LE number of changes, then per change the table
/// (u8), u8 slot length, the slot, and either 0 (deleted) or 1 and a u32 LE length and the
/// sealed value.
pub fn encode_entry<'a>(
    generation: u64,
    changes: impl ExactSizeIterator<Item = (&'a (Table, Vec<u8>), &'a Option<Vec<u8>>)>,
) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(4096));
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&u32::try_from(changes.len()).ok()?.to_le_bytes());
    for ((table, slot), value) in changes {
        out.push(table_byte(*table));
        out.push(u8::try_from(slot.len()).ok()?);
        out.extend_from_slice(slot);
        match value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&u32::try_from(v.len()).ok()?.to_le_bytes());
                out.extend_from_slice(v);
            }
        }
        if out.len() > ENTRY_MAX {
            return None;
        }
    }
    Some(out)
}

/// Parses [`encode_entry`]'s output.
fn decode_entry(mut b: &[u8]) -> Result<(u64, Vec<Change>), RecordDamaged> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], RecordDamaged> {
        let (head, rest) = b.split_at_checked(n).ok_or(RecordDamaged)?;
        *b = rest;
        Ok(head)
    }
    let generation = u64_le(take(&mut b, 8)?);
    let n = u32::from_le_bytes(take(&mut b, 4)?.try_into().map_err(|_| RecordDamaged)?) as usize;
    let mut changes = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let table = byte_table(take(&mut b, 1)?[0]).ok_or(RecordDamaged)?;
        let slot_len = take(&mut b, 1)?[0] as usize;
        let slot = take(&mut b, slot_len)?.to_vec();
        let value = match take(&mut b, 1)?[0] {
            0 => None,
            1 => {
                let len = u32::from_le_bytes(take(&mut b, 4)?.try_into().map_err(|_| RecordDamaged)?);
                Some(take(&mut b, len as usize)?.to_vec())
            }
            _ => return Err(RecordDamaged),
        };
        changes.push(((table, slot), value));
    }
    if !b.is_empty() {
        return Err(RecordDamaged);
    }
    Ok((generation, changes))
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, at)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut at: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, at)?;
        buf = buf.get(n..).unwrap_or_default();
        at += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, at)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = std::mem::take(&mut buf).get_mut(n..).unwrap_or_default();
        at += n as u64;
    }
    Ok(())
}
