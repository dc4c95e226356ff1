//! The journal ([`super::journal`]) with real files and real processes: what survives a kill at
//! each step, what a damaged or foreign journal does, and two processes taking turns.

use std::path::Path;
use std::process::{Command, Stdio};

use redb::ReadableDatabase;

use super::journal::{HEADER_BYTES, JOURNAL_FILE};
use super::*;
use crate::crypto::statefile::StateKey;
use crate::failpoint::FAILPOINT_EXIT_CODE;

fn key() -> StateKey {
    StateKey::unprotected()
}

/// The records' keys of every database here.
fn dk() -> DbKey {
    DbKey::of(&key())
}

fn put(db: &ClientDb, name: &str, value: &[u8]) -> u64 {
    let mut w = db.write().unwrap();
    w.put(Table::State, name.as_bytes(), value).unwrap();
    w.commit().unwrap()
}

fn value(db: &ClientDb, name: &str) -> Option<Vec<u8>> {
    db.get(Table::State, name.as_bytes()).unwrap().map(|v| v.to_vec())
}

/// The generation redb itself holds (what a reader of the file without the journal sees).
fn redb_generation(dir: &Path) -> u64 {
    let db = redb::Database::open(dir.join(DB_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    read_generation(&meta, dir).unwrap()
}

/// Runs [`journal_child`] on `dir` with `step`, and `failpoint` if any; returns its exit code.
fn child(dir: &Path, step: &str, failpoint: Option<&str>) -> Option<i32> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["client::db::journal_tests::journal_child", "--exact", "--ignored", "--nocapture"])
        .env("QPQ_TEST_HOME", dir)
        .env("QPQ_TEST_STEP", step)
        .stdout(Stdio::null());
    match failpoint {
        Some(f) => cmd.env("QPQ_FAILPOINT", f),
        None => cmd.env_remove("QPQ_FAILPOINT"),
    };
    cmd.status().unwrap().code()
}

/// The process the tests below start: one step on the database named by `QPQ_TEST_HOME`.
#[test]
#[ignore = "run by the journal tests"]
fn journal_child() {
    let (Some(dir), Some(step)) = (std::env::var_os("QPQ_TEST_HOME"), std::env::var("QPQ_TEST_STEP").ok())
    else {
        return;
    };
    let dir = Path::new(&dir);
    let db = ClientDb::open(dir, &dk()).unwrap();
    match step.as_str() {
        "put-one" => {
            put(&db, "late", b"acknowledged");
        }
        "fill" => {
            let record = vec![1u8; 1354];
            loop {
                put(&db, "secrets", &record);
                let used = db.db.read().unwrap().as_ref().unwrap().journal.as_ref().unwrap().used();
                if used + 1600 > journal::CHECKPOINT_AT {
                    // Gone without closing, as a killed process.
                    std::process::exit(0);
                }
            }
        }
        "put-three-then-checkpoint" => {
            for i in 0..3 {
                put(&db, &format!("r{i}"), b"kept once");
            }
            // Over the journal's entry bound: a durable redb commit, which checkpoints.
            let mut w = db.write().unwrap();
            w.delete(Table::State, b"r1").unwrap();
            w.put(Table::State, b"big", &vec![3u8; 70_000]).unwrap();
            w.commit().unwrap();
        }
        // Run with the journal's fdatasync failing: a small write fails, a large one (redb,
        // a checkpoint) then passes.
        "sync-fails" => {
            let mut w = db.write().unwrap();
            w.put(Table::State, b"k", b"old, failed").unwrap();
            assert!(w.commit().is_err(), "the journal's sync failed");
            let mut w = db.write().unwrap();
            w.put(Table::State, b"k", &vec![5u8; 300 << 10]).unwrap();
            w.commit().unwrap();
        }
        // Run with the journal's reset failing: writes through redb (checkpoints) are durable
        // and say so; the journal stays unused meanwhile.
        "reset-fails" => {
            put(&db, "first", b"in the journal");
            let mut w = db.write().unwrap();
            w.put(Table::State, b"big", &vec![6u8; 300 << 10]).unwrap();
            w.commit().expect("a durable checkpoint is reported as done");
            put(&db, "small", b"after it");
        }
        // Two processes taking turns: check what the other wrote, then write ours.
        turn => {
            let n: u64 = turn.strip_prefix("turn-").unwrap().parse().unwrap();
            assert_eq!(db.generation().unwrap(), n - 1, "sees every earlier turn");
            for i in 1..n {
                assert_eq!(value(&db, &format!("turn{i}")).as_deref(), Some(format!("{i}").as_bytes()));
            }
            assert_eq!(put(&db, &format!("turn{n}"), format!("{n}").as_bytes()), n);
        }
    }
}

/// A process killed right after its journal entry's `fdatasync` (nothing in redb, no overlay,
/// no close) has acknowledged the write: the next open finds it, with its generation. Fails
/// without the replay (redb alone still says generation 1).
#[test]
fn a_write_killed_after_the_journal_sync_is_there_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    put(&db, "early", b"first");
    drop(db);
    let code = child(dir.path(), "put-one", Some("clientdb-journal-after-sync"));
    assert_eq!(code, Some(FAILPOINT_EXIT_CODE), "the child died at the point");
    assert_eq!(redb_generation(dir.path()), 0, "redb holds neither write: both are in the journal alone");
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "late").as_deref(), Some(&b"acknowledged"[..]));
    assert_eq!(value(&db, "early").as_deref(), Some(&b"first"[..]));
    assert_eq!(db.generation().unwrap(), 2);
    assert_eq!(put(&db, "next", b"x"), 3, "and the next write follows it");
}

/// Killed after a checkpoint's durable redb commit but before the journal reset: redb holds
/// every entry and the write that checkpointed (too large for the journal: it deletes `r1`),
/// the journal still holds the entries. The next open loses nothing and replays nothing twice:
/// replaying the covered entry that wrote `r1` would bring it back. Fails without the skip of
/// covered entries.
#[test]
fn a_checkpoint_killed_before_the_reset_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    drop(ClientDb::create(dir.path(), &key(), &dk()).unwrap());
    let code = child(dir.path(), "put-three-then-checkpoint", Some("clientdb-checkpoint-before-reset"));
    assert_eq!(code, Some(FAILPOINT_EXIT_CODE), "the child died at the point");
    assert_eq!(redb_generation(dir.path()), 4, "the checkpoint's commit is durable");
    assert_eq!(frames(dir.path()).len(), 3, "and the journal still holds the three entries");
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(db.generation().unwrap(), 4);
    assert_eq!(value(&db, "r1"), None, "the covered entry that wrote r1 is not replayed over its deletion");
    for name in ["r0", "r2"] {
        assert_eq!(value(&db, name).as_deref(), Some(&b"kept once"[..]));
    }
    assert_eq!(value(&db, "big").map(|v| v.len()), Some(70_000));
    assert_eq!(put(&db, "r3", b"after"), 5, "and the next write follows");
    drop(db);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "r3").as_deref(), Some(&b"after"[..]));
    assert_eq!(value(&db, "r1"), None);
}

/// Frames (offset, body length) of the journal's entries, read as the layout says.
pub(super) fn frames(dir: &Path) -> Vec<(usize, usize)> {
    let bytes = std::fs::read(dir.join(JOURNAL_FILE)).unwrap();
    let mut at = HEADER_BYTES as usize;
    let mut out = Vec::new();
    loop {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            return out;
        }
        out.push((at, len));
        at += 12 + len;
    }
}

/// A torn last entry (a bit flipped, as a write cut short leaves it) ends the journal: the
/// earlier entries are kept, the torn one is not there, and the next write takes its place.
#[test]
fn a_torn_journal_tail_is_ignored_and_the_earlier_entries_kept() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    for i in 0..3 {
        put(&db, &format!("r{i}"), b"v");
    }
    drop(db);
    let f = frames(dir.path());
    assert_eq!(f.len(), 3, "three entries, nothing in redb");
    let path = dir.path().join(JOURNAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let (at, len) = f[2];
    bytes[at + 12 + len / 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "r1").as_deref(), Some(&b"v"[..]));
    assert_eq!(value(&db, "r2"), None, "the torn entry is not replayed");
    assert_eq!(db.generation().unwrap(), 2);
    assert_eq!(put(&db, "r3", b"w"), 3);
    drop(db);
    assert_eq!(frames(dir.path())[2].0, at, "written where the torn one was");
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "r3").as_deref(), Some(&b"w"[..]));

    // Garbage after the last entry (not a frame of the next sequence number) is ignored too.
    drop(db);
    let mut bytes = std::fs::read(&path).unwrap();
    let end = frames(dir.path()).last().map(|(at, len)| at + 12 + len).unwrap();
    bytes[end..end + 64].fill(0x5a);
    std::fs::write(&path, &bytes).unwrap();
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(db.generation().unwrap(), 3);
    assert_eq!(put(&db, "r4", b"x"), 4);
}

/// Another database's journal (same key even) is refused by name rather than replayed or
/// overwritten. Fails if the journal id is not checked.
#[test]
fn a_journal_from_another_database_is_refused() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    put(&ClientDb::create(a.path(), &key(), &dk()).unwrap(), "mine", b"a");
    put(&ClientDb::create(b.path(), &key(), &dk()).unwrap(), "theirs", b"b");
    std::fs::copy(b.path().join(JOURNAL_FILE), a.path().join(JOURNAL_FILE)).unwrap();
    let err = ClientDb::open(a.path(), &dk()).unwrap_err().to_string();
    assert!(err.contains("the journal belongs to another database"), "{err}");
}

/// Two processes taking turns on one home, each opening it, reading the other's writes (from
/// the journal: nobody checkpointed) and writing its own.
#[test]
fn two_processes_taking_turns_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    drop(ClientDb::create(dir.path(), &key(), &dk()).unwrap());
    for n in 1..=6u64 {
        if n % 2 == 1 {
            assert_eq!(child(dir.path(), &format!("turn-{n}"), None), Some(0), "turn {n}");
        } else {
            let db = ClientDb::open(dir.path(), &dk()).unwrap();
            assert_eq!(db.generation().unwrap(), n - 1);
            assert_eq!(
                value(&db, &format!("turn{}", n - 1)).as_deref(),
                Some(format!("{}", n - 1).as_bytes())
            );
            assert_eq!(put(&db, &format!("turn{n}"), format!("{n}").as_bytes()), n);
        }
    }
    assert_eq!(redb_generation(dir.path()), 0, "every turn went through the journal");
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    for n in 1..=6u64 {
        assert_eq!(value(&db, &format!("turn{n}")).as_deref(), Some(format!("{n}").as_bytes()));
    }
}

/// The journal never passes half its size: the write that would is folded into redb with
/// everything before it (a checkpoint), and reads see every record throughout.
#[test]
fn a_journal_about_to_pass_half_full_is_folded_into_redb() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    let big = vec![7u8; 2000];
    for i in 0..100 {
        put(&db, &format!("r{i}"), &big);
        let used = db.db.read().unwrap().as_ref().unwrap().journal.as_ref().unwrap().used();
        assert!(used <= journal::CHECKPOINT_AT, "write {i}: journal at {used}");
    }
    drop(db);
    assert!(redb_generation(dir.path()) > 50, "checkpoints happened");
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(db.generation().unwrap(), 100);
    assert_eq!(db.scan(Table::State).unwrap().len(), 100);
}

/// History pages merge redb's entries with the journal's, and a range deletion removes both.
#[test]
fn history_pages_merge_redb_and_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    let at = |i: u64| HistoryKey { at_ms: i * 10, index: i };
    let add = |range: std::ops::Range<u64>| {
        let mut w = db.write().unwrap();
        for i in range {
            w.put_history(b"c", at(i), format!("m{i}").as_bytes()).unwrap();
        }
        w.commit().unwrap();
    };
    add(0..4);
    db.checkpoint().unwrap();
    add(4..6);
    let mut w = db.write().unwrap();
    w.put_history(b"c", at(1), b"m1 again").unwrap();
    w.commit().unwrap();
    let page = |n| -> Vec<(u64, Vec<u8>)> {
        db.history_page(b"c", HistoryKey::MIN..=HistoryKey::MAX, n)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.index, v.to_vec()))
            .collect()
    };
    let all = page(10);
    let indices: Vec<u64> = all.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, [5, 4, 3, 2, 1, 0]);
    assert_eq!(all[4].1, b"m1 again");
    assert_eq!(page(3).len(), 3);
    assert_eq!(db.history_oldest(b"c").unwrap(), Some(at(0)));
    assert_eq!(db.history_newest(b"c").unwrap(), Some(at(5)), "in the journal");
    let mut w = db.write().unwrap();
    assert_eq!(w.delete_history_before(b"c", 45).unwrap(), 5, "0..=4: three in redb, two in the journal");
    w.commit().unwrap();
    assert_eq!(page(10).iter().map(|(i, _)| *i).collect::<Vec<_>>(), [5]);
    drop(db);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(db.history_oldest(b"c").unwrap(), Some(at(5)));
}

/// Opening a home whose journal is as full as it gets (just under a checkpoint's worth of
/// ~1.4 KiB entries, as app messages of a group of 128 leave, by a process that died without
/// closing): `cargo test --lib measure_open_with_a_full_journal -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn measure_open_with_a_full_journal() {
    let dir = tempfile::tempdir().unwrap();
    drop(ClientDb::create(dir.path(), &key(), &dk()).unwrap());
    assert_eq!(child(dir.path(), "fill", None), Some(0));
    let n = frames(dir.path()).len();
    let header = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    let id: journal::JournalId = header[16..32].try_into().unwrap();
    let keys = RecordKeys::derive(&dk());
    let start = std::time::Instant::now();
    let replayed = journal::Journal::replay(&dir.path().join(JOURNAL_FILE), &id, 0, &keys).unwrap();
    let replay = start.elapsed();
    assert_eq!(replayed.entries.len(), n);
    drop(replayed);
    let start = std::time::Instant::now();
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    let full = start.elapsed();
    drop(db);
    let start = std::time::Instant::now();
    drop(ClientDb::open(dir.path(), &dk()).unwrap());
    let empty = start.elapsed();
    eprintln!(
        "{n} journal entries: replay alone {replay:?}; open (after a killed process) {full:?}; \
         open after the close's checkpoint {empty:?}"
    );
}

/// A format-4 home (no journal, no `journal` record) opens as the current format: the journal is created
/// then, its records are kept, and the next small write goes to the journal, not to redb.
#[test]
fn a_format_4_home_is_upgraded_and_gets_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    put(&db, "old", b"kept");
    {
        // As format 4 left it.
        let raw = db.raw();
        let txn = raw.as_ref().unwrap().begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_FORMAT, 4u32.to_le_bytes().as_slice()).unwrap();
            meta.remove(META_JOURNAL).unwrap();
        }
        txn.commit().unwrap();
    }
    drop(db);
    std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
    // An older format opens with the passphrase (none here), which proves the key.
    let db = ClientDb::unlock(dir.path(), None).unwrap().1;
    assert!(dir.path().join(JOURNAL_FILE).is_file(), "the journal is created");
    assert_eq!(value(&db, "old").as_deref(), Some(&b"kept"[..]));
    let before = db.generation().unwrap();
    assert_eq!(put(&db, "new", b"journaled"), before + 1);
    assert_eq!(frames(dir.path()).len(), 1, "the write is the journal's first entry");
    drop(db);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "new").as_deref(), Some(&b"journaled"[..]));
    let format = super::tests::stored_format(&db);
    assert_eq!(format, DB_FORMAT_VERSION.to_le_bytes());
}

/// A home whose journal is gone (qpq.db copied alone) is refused, naming the journal and what to
/// do, instead of opening without the journaled writes.
#[test]
fn a_home_without_its_journal_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    put(&db, "newest", b"only in the journal");
    drop(db);
    std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
    let e = ClientDb::open(dir.path(), &dk()).unwrap_err().to_string();
    assert!(e.contains(JOURNAL_FILE), "names the journal: {e}");
    assert!(e.contains("the journal is missing") && e.contains("restore both"), "says what to do: {e}");
}

/// Sets the journal header's base (its first entry's sequence number).
fn set_base(dir: &Path, base: u64) {
    let path = dir.join(JOURNAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[32..40].copy_from_slice(&base.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

/// The journal's header is not sealed, so its base is checked against what redb covers: a base
/// of 0, or one past the first entry redb lacks, is refused by name. Before, a base of 0 made
/// replay stop at once (the journaled writes silently gone) and number new entries at or below
/// what redb covers, so they were skipped at the next opening: acknowledged, then lost.
#[test]
fn a_journal_whose_base_does_not_continue_the_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    put(&db, "a", b"journaled");
    put(&db, "b", b"journaled too");
    drop(db);
    for base in [0, 2, 3, u64::MAX] {
        set_base(dir.path(), base);
        let e = ClientDb::open(dir.path(), &dk()).unwrap_err().to_string();
        assert!(e.contains("does not continue qpq.db") && e.contains("restore both"), "base {base}: {e}");
    }
    set_base(dir.path(), 1);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "b").as_deref(), Some(&b"journaled too"[..]));
}

/// A journal that stops before what redb covers (an older copy restored alone, or a failed
/// append whose burnt number a checkpoint covered before its reset got through) holds nothing
/// redb lacks: the home opens, and its next writes are numbered after redb's. Before, they took
/// numbers at or below redb's and were skipped at the next opening: acknowledged, then lost.
#[test]
fn a_journal_older_than_the_database_is_outrun_not_continued() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    put(&db, "a", b"first");
    let old = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    put(&db, "b", b"second");
    // A write too large for the journal goes to redb with everything journaled before it, and
    // redb then covers entries 1 and 2.
    put(&db, "large", &vec![7u8; 300 << 10]);
    drop(db);
    let header = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    assert_eq!(header[32..40], 3u64.to_le_bytes(), "the checkpoint emptied the journal");
    std::fs::write(dir.path().join(JOURNAL_FILE), &old).unwrap();
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "b").as_deref(), Some(&b"second"[..]));
    put(&db, "c", b"after the old journal");
    put(&db, "d", b"journaled again");
    drop(db);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "c").as_deref(), Some(&b"after the old journal"[..]));
    assert_eq!(value(&db, "d").as_deref(), Some(&b"journaled again"[..]));
}

/// A journal write whose `fdatasync` failed was reported failed, but its bytes may reach the
/// disk all the same. The write after it (here a large one, through redb) must win at the next
/// opening. Before, the failed entry's number was reused as the journal's base, so the next
/// opening replayed the failed write over the newer value: the state went back in time (for
/// openmls, a ratchet's secrets used twice).
#[test]
fn a_journal_write_that_failed_never_comes_back_over_a_later_one() {
    let dir = tempfile::tempdir().unwrap();
    drop(ClientDb::create(dir.path(), &key(), &dk()).unwrap());
    assert_eq!(child(dir.path(), "sync-fails", Some("clientdb-journal-sync-fails")), Some(0));
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "k"), Some(vec![5u8; 300 << 10]), "the later write stands");
    // And the journal takes new entries again.
    put(&db, "after", b"journaled");
    drop(db);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "after").as_deref(), Some(&b"journaled"[..]));
    assert_eq!(value(&db, "k"), Some(vec![5u8; 300 << 10]));
}

/// Review: a checkpoint whose redb commit was durable was reported as failed when only the
/// journal's reset after it failed, so callers treated a saved write as lost (say, dropped a
/// queued message already sealed and saved). Fails without the fix (the child's expect).
#[test]
fn a_checkpoint_whose_journal_reset_fails_is_still_done() {
    let dir = tempfile::tempdir().unwrap();
    drop(ClientDb::create(dir.path(), &key(), &dk()).unwrap());
    assert_eq!(child(dir.path(), "reset-fails", Some("clientdb-journal-reset-fails")), Some(0));
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "first").as_deref(), Some(&b"in the journal"[..]));
    assert_eq!(value(&db, "big"), Some(vec![6u8; 300 << 10]));
    assert_eq!(value(&db, "small").as_deref(), Some(&b"after it"[..]));
}

/// Review: a reset rewrote only the header, so the entries stayed in the file, readable with
/// the home's key (which never changes) until later entries happened to overwrite them:
/// superseded ratchet secrets, history that retention had deleted. A checkpoint now leaves
/// zeros where they were. Fails without the fix.
#[test]
fn a_checkpoint_leaves_no_entry_bytes_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClientDb::create(dir.path(), &key(), &dk()).unwrap();
    for i in 0..3 {
        put(&db, &format!("secret {i}"), &[7u8; 500]);
    }
    assert_eq!(frames(dir.path()).len(), 3);
    db.checkpoint().unwrap();
    let bytes = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    let rest = &bytes[HEADER_BYTES as usize..];
    assert!(rest.iter().all(|b| *b == 0), "{} non-zero bytes left", rest.iter().filter(|b| **b != 0).count());
    drop(db);
    let db = ClientDb::open(dir.path(), &dk()).unwrap();
    assert_eq!(value(&db, "secret 2").as_deref(), Some(&[7u8; 500][..]));
}
