//! Group messages sealed once and fanned out by the server (issue 11, item 3), end to end:
//! people with their own homes driving the real binary against a real `qpq serve`, and the
//! server's database file read after the server stopped.

mod common;

use std::path::Path;

use common::{ServerProcess, User, cast};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const PAYLOADS: TableDefinition<u64, &[u8]> = TableDefinition::new("payloads");
const QUEUE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queue");

/// (`payloads` rows, `queue` rows) in a stopped server's database file.
fn stored(data_dir: &Path) -> (u64, u64) {
    let db = redb::Database::open(data_dir.join("qpq.db")).expect("open the server's database");
    let txn = db.begin_read().unwrap();
    let payloads = txn.open_table(PAYLOADS).unwrap().len().unwrap();
    (payloads, txn.open_table(QUEUE).unwrap().len().unwrap())
}

/// `queue` values over 1000 bytes: copies a recipient holds of its own (a shared entry is 8).
fn big_queue_entries(txn: &redb::ReadTransaction) -> usize {
    let queue = txn.open_table(QUEUE).unwrap();
    queue.iter().unwrap().filter(|r| r.as_ref().unwrap().1.value().len() > 1000).count()
}

/// Stops the server, runs `check` on its data dir, and starts it again on the same address.
fn with_server_stopped(server: ServerProcess, check: impl FnOnce(&Path)) -> ServerProcess {
    let (dir, addr) = (server.data_dir.clone(), server.addr);
    assert!(server.terminate().success());
    check(&dir);
    ServerProcess::start_on(&dir, addr)
}

fn team_of_three(alice: &User, bob: &User, carol: &User) {
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob", "carol"]);
    bob.ok(&["recv"]);
    carol.ok(&["recv"]);
    alice.ok(&["recv"]);
}

/// The group's MLS messages travel as one stored copy (the server sees no per-recipient
/// envelope) and still read as ever; the copy is deleted once the last member acked it.
#[test]
fn a_group_of_three_chats_through_one_stored_copy_per_message() {
    let (_dir, server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);
    team_of_three(&alice, &bob, &carol);
    let server = with_server_stopped(server, |dir| {
        assert_eq!(stored(dir).0, 0, "everything so far was acked: no payload is left");
    });
    // The MLS ciphertext is opaque; a long text makes its copy easy to recognise by size.
    let text = "x".repeat(20_000);
    alice.ok(&["send", "#team", &text]);
    let server = with_server_stopped(server, |dir| {
        let db = redb::Database::open(dir.join("qpq.db")).unwrap();
        let txn = db.begin_read().unwrap();
        let payloads = txn.open_table(PAYLOADS).unwrap();
        let rows: Vec<Vec<u8>> = payloads.iter().unwrap().map(|r| r.unwrap().1.value().to_vec()).collect();
        assert_eq!(rows.len(), 1, "one stored copy for bob and carol");
        assert!(rows[0].len() > 20_000, "it is the message: {} bytes", rows[0].len());
        let big_entries = big_queue_entries(&txn);
        assert_eq!(big_entries, 0, "no recipient holds a copy of its own");
    });
    assert_eq!(bob.recv(), vec![format!("[#team] alice: {text}")]);
    let server = with_server_stopped(server, |dir| {
        assert_eq!(stored(dir).0, 1, "carol has not read it yet: the copy stays");
    });
    assert_eq!(carol.recv(), vec![format!("[#team] alice: {text}")]);
    bob.ok(&["send", "#team", "hi both"]);
    carol.ok(&["send", "#team", "hi all"]);
    assert_eq!(alice.recv(), vec!["[#team] bob: hi both", "[#team] carol: hi all"]);
    assert_eq!(bob.recv(), vec!["[#team] carol: hi all"]);
    assert_eq!(carol.recv(), vec!["[#team] bob: hi both"]);
    // A commit goes the same way: carol removed, bob and alice go on.
    alice.ok(&["group", "remove", "team", "carol"]);
    bob.ok(&["recv"]);
    carol.ok(&["recv"]);
    alice.ok(&["send", "#team", "just us"]);
    assert_eq!(bob.recv(), vec!["[#team] alice: just us"]);
    let server = with_server_stopped(server, |dir| {
        let (payloads, queue) = stored(dir);
        assert_eq!((payloads, queue), (0, 0), "every copy was acked by its last reader and deleted");
    });
    drop(server);
}

/// A direct conversation is an MLS group of two: its messages are fanned out too.
#[test]
fn direct_messages_go_through_the_fanout_and_read_as_ever() {
    let (_dir, server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "hello bob"]);
    assert_eq!(bob.recv(), vec!["alice: hello bob"]);
    let text = "y".repeat(10_000);
    bob.ok(&["send", "alice", &text]);
    let server = with_server_stopped(server, |dir| {
        let (payloads, _) = stored(dir);
        assert_eq!(payloads, 1, "bob's message waits as one shared payload");
    });
    assert_eq!(alice.recv(), vec![format!("bob: {text}")]);
    drop(server);
}

/// A Welcome is sealed once for all the members it adds (issue 11): the server stores one copy
/// (a parcel of kind 0x12) however many join, no recipient holds a copy of its own, and everyone
/// joins and talks. Sealed per recipient, as before, it was three queue entries of the whole
/// Welcome each and no shared payload.
#[test]
fn a_welcome_to_several_new_members_is_stored_once() {
    let (_dir, server, [alice, bob, carol, dave]) = cast(["alice", "bob", "carol", "dave"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob", "carol", "dave"]);
    let server = with_server_stopped(server, |dir| {
        let db = redb::Database::open(dir.join("qpq.db")).unwrap();
        let txn = db.begin_read().unwrap();
        let rows: Vec<Vec<u8>> = txn
            .open_table(PAYLOADS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| r.unwrap().1.value().to_vec())
            .collect();
        assert_eq!(rows.len(), 1, "one stored copy of the welcome for bob, carol and dave");
        // Three stanzas (the body key sealed to each) travel with the one body.
        assert!(rows[0].len() > 3 * qpq::crypto::sealmany::STANZA_LEN, "{} bytes", rows[0].len());
        let big_entries = big_queue_entries(&txn);
        assert_eq!(big_entries, 0, "no recipient holds a copy of its own");
    });
    for u in [&bob, &carol, &dave] {
        u.ok(&["recv"]);
    }
    alice.ok(&["send", "#team", "welcome all"]);
    for u in [&bob, &carol, &dave] {
        assert_eq!(u.recv(), vec!["[#team] alice: welcome all"], "{}", u.name);
    }
    dave.ok(&["send", "#team", "thanks"]);
    assert_eq!(bob.recv(), vec!["[#team] dave: thanks"]);
    drop(server);
}

/// Security review: one member whose queue is full (offline for long, or flooded by a stranger
/// who knows their key) made every message and commit to the group fail with "queue full", for
/// everyone. The server now skips the full queue: the others still get each message and commit,
/// and the sender is told who did not.
#[test]
fn a_member_with_a_full_queue_does_not_stop_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_config(dir.path(), "max_queue_messages = 3\n");
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| User::init(&server, n));
    common::introduce(&[&alice, &bob, &carol]);
    team_of_three(&alice, &bob, &carol);
    // carol is away: three messages fill her queue.
    for text in ["one", "two", "three"] {
        alice.ok(&["send", "#team", text]);
    }
    assert_eq!(bob.recv().len(), 3);
    let r = alice.run(&["send", "#team", "four"]);
    assert!(r.ok, "sent to bob although carol's queue is full: {}", r.stderr);
    assert!(
        r.stderr.contains("carol did not get your message to #team: their queue on the server is full"),
        "{}",
        r.stderr
    );
    assert_eq!(bob.recv(), vec!["[#team] alice: four"]);
    // A commit goes to bob too; carol missed it and is told to be no longer able to follow.
    let r = alice.run(&["group", "update", "team"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("carol did not get a change to #team"), "{}", r.stderr);
    assert!(r.stderr.contains("can no longer follow it"), "{}", r.stderr);
    bob.ok(&["recv"]);
    alice.ok(&["send", "#team", "after the update"]);
    assert_eq!(bob.recv(), vec!["[#team] alice: after the update"]);
}
