//! The client database (`qpq.db`) through the binary: a home of the old single-file format
//! migrates once, and a crash at any step of the migration leaves a usable home.

mod common;

use std::path::Path;

use common::{User, cast, qpq_command};
use qpq::client::state::{Home, STATE_FILE};
use qpq::crypto::statefile::{self, StateKey};
use qpq::mls::MlsClient;

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
