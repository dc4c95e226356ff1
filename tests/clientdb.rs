//! The client database (`qpq.db`) through the binary: a home of the old single-file format
//! migrates once, and a crash at any step of the migration leaves a usable home. And what
//! opening a home costs (issue 12): one Argon2id run and a number of records that grows with
//! neither history nor conversations.

mod common;

use std::path::Path;

use common::{User, cast, local, qpq_command, start_server};
use qpq::client::db::seal::records_opened_on_this_thread;
use qpq::client::messenger::{ConnectOptions, Messenger, Target};
use qpq::client::outbox::Fate;
use qpq::client::state::{Entry, Home, STATE_FILE, Unlock};
use qpq::crypto::statefile::{self, StateKey, argon2id_runs_on_this_thread};
use qpq::mls::MlsClient;
use redb::{ReadableDatabase, ReadableTableMetadata};
use zeroize::Zeroizing;

/// Turns a (`--no-passphrase`) home back into what qpq wrote before the database: one sealed
/// `qpq-state.bin` holding the state and openmls's storage export.
fn make_state_file_home(home: &Path) {
    let mut opened = Home::open(home, None).unwrap();
    let seed = opened.state.secrets.identity_seed;
    let mls = MlsClient::from_store(&seed, opened.take_mls().unwrap()).unwrap();
    opened.state.mls_storage = mls.export_storage().unwrap();
    let sealed = statefile::seal(&StateKey::unprotected(), &opened.state.encode().unwrap());
    drop(opened);
    std::fs::remove_file(home.join("qpq.db")).unwrap();
    std::fs::write(home.join(STATE_FILE), sealed).unwrap();
}

fn crash_at(user: &User, point: &str) {
    let out = qpq_command(user.home.path()).arg("whoami").env("QPQ_FAILPOINT", point).output().unwrap();
    assert_eq!(out.status.code(), Some(qpq::failpoint::FAILPOINT_EXIT_CODE), "stopped at {point}");
}

#[test]
fn a_state_file_home_migrates_once_and_a_crash_mid_migration_leaves_a_usable_home() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "before"]);
    assert_eq!(bob.recv(), vec!["alice: before"]);
    make_state_file_home(alice.home.path());
    let (db, old) = (alice.home.path().join("qpq.db"), alice.home.path().join(STATE_FILE));

    // Killed with the database built but not in place: the old home is all there is.
    crash_at(&alice, "migrate-before-publish");
    assert!(old.exists() && !db.exists(), "the old home stays");
    // Killed with the database in place but the old file not yet removed: both are there,
    // and the database (durable) wins.
    crash_at(&alice, "migrate-before-remove");
    assert!(old.exists() && db.exists());
    let key = alice.ok(&["whoami"]);
    assert!(key.starts_with(&alice.key), "{key}");
    assert!(!old.exists(), "the old file goes once the database is durable");
    assert!(!alice.home.path().join("qpq.db.partial").exists());

    // The MLS state came along: the conversation goes on in both directions.
    alice.ok(&["send", "bob", "after"]);
    assert_eq!(bob.recv(), vec!["alice: after"]);
    bob.ok(&["send", "alice", "and back"]);
    assert_eq!(alice.recv(), vec!["bob: and back"]);
}

#[test]
fn a_crash_before_publishing_restarts_the_migration_from_the_old_file() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    make_state_file_home(alice.home.path());
    crash_at(&alice, "migrate-before-publish");
    assert!(alice.home.path().join("qpq.db.partial").exists(), "the crash left a partial database");
    alice.ok(&["send", "bob", "migrated"]);
    assert_eq!(bob.recv(), vec!["alice: migrated"]);
    assert!(!alice.home.path().join(STATE_FILE).exists());
}

#[test]
fn a_commit_killed_before_it_is_durable_leaves_the_home_as_it_was() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "one"]);
    assert_eq!(bob.recv(), vec!["alice: one"]);
    let before = alice.state_generation();
    // `contact remove` writes once; killed just before redb commits, nothing changes.
    let out = qpq_command(alice.home.path())
        .args(["contact", "remove", "bob"])
        .env("QPQ_FAILPOINT", "clientdb-before-commit")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(qpq::failpoint::FAILPOINT_EXIT_CODE));
    assert_eq!(alice.state_generation(), before);
    assert!(alice.ok(&["contact", "list"]).contains("bob"), "the contact is still there");
    alice.ok(&["send", "bob", "two"]);
    assert_eq!(bob.recv(), vec!["alice: two"]);
}

const PASSPHRASE: &str = "opening costs one derivation";

/// (sealed records opened, Argon2id runs) while opening the home in `dir` as every command
/// does, before any work: [`Messenger::open`] is synchronous, so all of it runs on this thread.
fn open_cost(dir: &Path, opts: &ConnectOptions) -> (u64, u64) {
    let (records, kdf) = (records_opened_on_this_thread(), argon2id_runs_on_this_thread());
    let m = Messenger::open(dir, Some(PASSPHRASE.as_bytes()), opts.clone()).expect("the home opens");
    let cost = (records_opened_on_this_thread() - records, argon2id_runs_on_this_thread() - kdf);
    drop(m);
    cost
}

/// Rows of table `name` of the client database in `dir` (sealed, so only counted).
fn rows(dir: &Path, name: &str) -> u64 {
    let db = redb::Database::open(dir.join("qpq.db")).expect("client database");
    let txn = db.begin_read().unwrap();
    txn.open_table(redb::TableDefinition::<&[u8], &[u8]>::new(name)).unwrap().len().unwrap()
}

/// Adds `n` groups (each a real MLS group with its own records, named `g<first + i>`) and
/// `entries` history entries spread over every conversation of the home in `dir`.
fn grow(dir: &Path, opts: &ConnectOptions, first: usize, n: usize, entries: usize) {
    let mut m = Messenger::open(dir, Some(PASSPHRASE.as_bytes()), opts.clone()).unwrap();
    for i in first..first + n {
        m.group_create(&format!("g{i}")).unwrap();
    }
    let conversations: Vec<Vec<u8>> = m.state().groups.keys().map(|k| hex::decode(k).unwrap()).collect();
    let (now, me) = (m.now_ms(), m.public_key().0);
    let history = (0..entries)
        .map(|i| {
            let at = now - (entries - i) as u64;
            Entry {
                group_id: conversations[i % conversations.len()].clone(),
                from: me,
                text: format!("entry {i} of a long history, about a line of chat"),
                sent_at_ms: at,
                received_at_ms: at,
                outgoing: true,
            }
        })
        .collect();
    // Appended through the messenger's own save path (the bench fills its large home so too).
    m.inject_history_for_bench(history).unwrap();
}

/// Issue 12's goal: opening a home costs one Argon2id derivation plus records that do not
/// grow with its history, its conversations or its MLS state. A home with a real direct
/// conversation through a real server, local groups and injected history is opened, then
/// grown tenfold in history, then tenfold in groups: each open reads the same fixed set of
/// state records (every conversation's name and kind are in one of them; see
/// src/client/db/records.rs) and no MLS or history record. Fails if open loaded every group's
/// MLS records (checked: `MlsClient::from_store` instead of `from_store_lazy` in
/// `Messenger::open` reads 11 records more per group here, 468 instead of 108), the history, or
/// a record per conversation (format 2 did: 31 records with 4 conversations, 67 with 40;
/// now 27 with either).
#[tokio::test]
async fn opening_a_home_runs_argon2id_once_and_reads_no_history_or_mls_record() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = start_server(server_dir.path()).await;
    let opts = ConnectOptions {
        server: Some(server.local_addr().to_string()),
        fingerprint: Some(server.fingerprint()),
    };
    let (alice_home, bob_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let alice_dir = alice_home.path();
    local(async {
        let unlock = Unlock::Passphrase(Zeroizing::new(PASSPHRASE.to_string()));
        let (mut alice, _) =
            Messenger::init(alice_dir, Some("alice".into()), unlock, opts.clone()).await.unwrap();
        let (mut bob, _) =
            Messenger::init(bob_home.path(), Some("bob".into()), Unlock::None, opts.clone()).await.unwrap();
        let (a, b) = (alice.public_key().0, bob.public_key().0);
        alice.contact_add("bob", &hex::encode(b)).unwrap();
        bob.contact_add("alice", &hex::encode(a)).unwrap();
        // A real conversation through the server, both ways.
        for text in ["one", "two", "three"] {
            let (fate, _) = alice.send(&Target::Person(b), text).await.unwrap();
            assert!(matches!(fate, Fate::Sent { .. }), "{fate:?}");
        }
        bob.receive(0).await.unwrap();
        let (fate, _) = bob.send(&Target::Person(a), "and back").await.unwrap();
        assert!(matches!(fate, Fate::Sent { .. }), "{fate:?}");
        assert!(!alice.receive(0).await.unwrap().is_empty(), "bob's answer arrives");
        alice.disconnect().await;
        bob.disconnect().await;
    })
    .await;

    const GROUPS: usize = 3;
    const ENTRIES: usize = 200;
    grow(alice_dir, &opts, 0, GROUPS, ENTRIES);
    let (history_small, mls_small) = (rows(alice_dir, "history"), rows(alice_dir, "mls"));
    let (small, kdf) = open_cost(alice_dir, &opts);
    assert_eq!(kdf, 1, "one Argon2id derivation per open");

    // Ten times the history: not one record more.
    grow(alice_dir, &opts, GROUPS, 0, 9 * ENTRIES);
    let history_big = rows(alice_dir, "history");
    assert!(history_big >= 10 * ENTRIES as u64, "{history_big} history entries");
    let (long_history, kdf) = open_cost(alice_dir, &opts);
    assert_eq!(kdf, 1);
    assert_eq!(long_history, small, "history is not read at open ({history_small} -> {history_big} entries)");

    // Ten times the conversations: not one record more, none of their MLS records.
    let added = 10 * (GROUPS + 1) - (GROUPS + 1);
    grow(alice_dir, &opts, GROUPS, added, 0);
    let mls_big = rows(alice_dir, "mls");
    assert!(mls_big >= mls_small + added as u64, "the new groups have MLS records: {mls_small} -> {mls_big}");
    let (many_groups, kdf) = open_cost(alice_dir, &opts);
    assert_eq!(kdf, 1);
    assert_eq!(
        many_groups,
        small,
        "no record per conversation and no MLS record ({} -> {} conversations, {mls_small} -> {mls_big} MLS records)",
        GROUPS + 1,
        10 * (GROUPS + 1)
    );
    eprintln!(
        "open reads {small} records with {} conversations, {history_small} history entries and {mls_small} mls \
         records; {long_history} with {history_big} entries; {many_groups} with {} conversations and {mls_big} mls records",
        GROUPS + 1,
        10 * (GROUPS + 1)
    );
    drop(server);
}
