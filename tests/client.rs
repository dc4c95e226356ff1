//! Client scenarios through the real binary against a real `qpq serve` on 127.0.0.1:0, each
//! user with their own home.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use common::{
    Lines, ServerProcess, TERMINAL_ATTACK, TERMINAL_ATTACK_SHOWN, User, assert_inert, cast, introduce,
    qpq_command, qpq_in, untimed,
};
use redb::ReadableTable;

fn members_of(u: &User, group: &str) -> Vec<String> {
    let mut v: Vec<String> = u
        .ok(&["group", "members", group])
        .lines()
        .map(|l| l.split(' ').next().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

fn epoch_of(u: &User, group: &str) -> String {
    let list = u.ok(&["group", "list"]);
    let line = list.lines().find(|l| l.starts_with(&format!("#{group} "))).expect("group listed").to_string();
    line.rsplit("epoch ").next().unwrap_or("").trim_end_matches(')').to_string()
}

#[test]
fn two_users_dm_both_ways_in_one_conversation() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);

    alice.ok(&["send", "bob", "hello", "bob"]);
    assert_eq!(bob.recv(), vec!["alice: hello bob"]);
    // A reply by key finds the same conversation.
    bob.ok(&["send", &alice.key, "hi alice"]);
    assert_eq!(alice.recv(), vec!["bob: hi alice"]);
    // Text from stdin, with a trailing newline stripped.
    let r = qpq_in(alice.home.path(), &["send", "bob"], Some("from stdin\n"));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(bob.recv(), vec!["alice: from stdin"]);
    assert!(bob.recv().is_empty(), "nothing twice");
    // `-` is stdin too, as for other tools.
    let r = qpq_in(alice.home.path(), &["send", "bob", "-"], Some("dash means stdin\n"));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(bob.recv(), vec!["alice: dash means stdin"]);

    for u in [&alice, &bob] {
        let convs: Vec<String> = u.ok(&["group", "list"]).lines().map(str::to_string).collect();
        assert_eq!(convs.len(), 1, "{} has exactly one conversation: {convs:?}", u.name);
        assert!(convs[0].contains("direct, 2 members"), "{convs:?}");
    }
    // whoami shows the key and the name.
    let who = alice.ok(&["whoami"]);
    assert_eq!(who.lines().next(), Some(alice.key.as_str()));
    assert!(who.contains("name: alice"));
}

/// Runs `qpq ARGS` as `u` and returns its stdout bytes exactly (the run must succeed).
fn stdout_bytes(u: &User, args: &[&str]) -> Vec<u8> {
    let out = qpq_command(u.home.path()).args(args).stdin(Stdio::null()).output().expect("qpq runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Issue 9: peer text reached the terminal raw (title change, screen clear, NUL, a forged
/// second line from bob).
#[test]
fn recv_shows_terminal_attacks_inert_and_json_keeps_the_exact_text() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    let send = || {
        let r = qpq_in(bob.home.path(), &["send", "alice"], Some(TERMINAL_ATTACK));
        assert!(r.ok, "{}", r.stderr);
    };
    send();
    let out = stdout_bytes(&alice, &["recv"]);
    assert_inert(&out);
    let text = untimed(&String::from_utf8(out).unwrap());
    assert_eq!(text.lines().collect::<Vec<_>>(), TERMINAL_ATTACK_SHOWN, "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("bob: ")).count(), 1, "only the real header: {text}");

    send();
    let out = stdout_bytes(&alice, &["recv", "--json"]);
    assert_inert(&out);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1, "one message, one line: {text}");
    let msg: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json line");
    assert_eq!(msg["text"], TERMINAL_ATTACK, "the exact text round-trips");
    assert!(text.contains("\\u202e"), "bidi controls are \\u escapes: {text}");
}

#[test]
fn recv_json_has_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    alice.add_contact(&bob);
    // Bob knows alice (a stranger's invitation would wait as a message request), under a name
    // of his own.
    bob.ok(&["contact", "add", "ally", &alice.key]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    alice.ok(&["send", "#team", "json please"]);
    alice.ok(&["send", "bob", "direct one"]);
    let out = bob.ok(&["recv", "--json"]);
    let (lines, events): (Vec<serde_json::Value>, Vec<serde_json::Value>) = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .partition(|v: &serde_json::Value| v["type"] == "message");
    assert_eq!(lines.len(), 2, "{out}");
    // The joins are events (tests/groups.rs checks their fields).
    assert!(events.iter().all(|e| e["type"] == "event" && e["event"] == "joined"), "{out}");
    let group_msg = &lines[0];
    assert_eq!(group_msg["from"], alice.key.as_str());
    assert_eq!(group_msg["from_name"], "ally", "bob's name for alice");
    assert_eq!(group_msg["group"], "team");
    assert_eq!(group_msg["text"], "json please");
    for field in ["sent_at", "received_at"] {
        let t = group_msg[field].as_str().expect("timestamp string");
        assert!(humantime::parse_rfc3339(t).is_ok(), "{field} is rfc 3339: {t}");
    }
    assert_eq!(lines[1]["group"], serde_json::Value::Null);
    assert_eq!(lines[1]["text"], "direct one");
}

#[test]
fn three_users_in_a_group_and_a_removed_member_cannot_read_on() {
    let (_dir, _server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);

    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob", "carol"]);
    alice.ok(&["send", "#team", "welcome all"]);
    assert_eq!(bob.recv(), vec!["[#team] alice: welcome all"], "bob learned the group's name");
    assert_eq!(carol.recv(), vec!["[#team] alice: welcome all"]);
    carol.ok(&["send", "#team", "carol here"]);
    assert_eq!(bob.recv(), vec!["[#team] carol: carol here"]);
    assert_eq!(alice.recv(), vec!["[#team] carol: carol here"]);
    let all = members_of(&alice, "team");
    assert_eq!(all.len(), 3);
    assert_eq!(members_of(&bob, "team"), all);
    assert_eq!(members_of(&carol, "team"), all);

    alice.ok(&["group", "remove", "team", "carol"]);
    alice.ok(&["send", "#team", "after carol left"]);
    assert!(carol.recv().is_empty(), "carol reads nothing new");
    let err = carol.fails(&["send", "#team", "still here?"]);
    assert!(err.contains("no longer a member of #team"), "{err}");
    assert_eq!(bob.recv(), vec!["[#team] alice: after carol left"]);
    assert_eq!(members_of(&bob, "team").len(), 2);
}

#[test]
fn an_offline_member_catches_up_after_several_commits() {
    let (_dir, _server, [alice, bob, carol, dave]) = cast(["alice", "bob", "carol", "dave"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    assert!(bob.recv().is_empty());
    // bob goes offline; several commits happen.
    alice.ok(&["group", "add", "team", "carol"]);
    alice.ok(&["group", "update", "team"]);
    carol.recv();
    carol.ok(&["group", "update", "team"]);
    alice.ok(&["group", "add", "team", "dave"]);
    alice.ok(&["group", "remove", "team", "carol"]);
    alice.ok(&["send", "#team", "did you keep up?"]);
    assert_eq!(bob.recv(), vec!["[#team] alice: did you keep up?"]);
    assert_eq!(epoch_of(&bob, "team"), epoch_of(&alice, "team"));
    assert_eq!(members_of(&bob, "team"), members_of(&alice, "team"));
    bob.ok(&["send", "#team", "yes"]);
    assert_eq!(dave.recv(), vec!["[#team] alice: did you keep up?", "[#team] bob: yes"]);
}

#[test]
fn two_members_adding_people_at_the_same_moment_do_not_fork_the_group() {
    let (_dir, _server, [alice, bob, carol, dave]) = cast(["alice", "bob", "carol", "dave"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    bob.recv();

    for round in 0..2 {
        // Both commit in the same epoch: start both processes, then wait for both.
        let (a_args, b_args) = if round == 0 {
            (["group", "add", "team", "carol"], ["group", "add", "team", "dave"])
        } else {
            (["group", "update", "team", ""], ["group", "update", "team", ""])
        };
        let spawn = |u: &User, args: &[&str]| {
            let args: Vec<&str> = args.iter().copied().filter(|a| !a.is_empty()).collect();
            u.spawn(&args)
        };
        let a = spawn(&alice, &a_args);
        let b = spawn(&bob, &b_args);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert!(a.status.success(), "alice: {}", String::from_utf8_lossy(&a.stderr));
        assert!(b.status.success(), "bob: {}", String::from_utf8_lossy(&b.stderr));
    }
    for u in [&alice, &bob, &carol, &dave] {
        u.recv();
    }
    let epoch = epoch_of(&alice, "team");
    let members = members_of(&alice, "team");
    assert_eq!(members.len(), 4, "both additions landed: {members:?}");
    for u in [&bob, &carol, &dave] {
        assert_eq!(epoch_of(u, "team"), epoch, "{} is in the same epoch", u.name);
        assert_eq!(members_of(u, "team"), members, "{} sees the same members", u.name);
    }
    // Messages flow between everyone.
    for u in [&alice, &bob, &carol, &dave] {
        u.ok(&["send", "#team", &format!("from {}", u.name)]);
    }
    for u in [&alice, &bob, &carol, &dave] {
        let got = u.recv();
        assert_eq!(got.len(), 3, "{} got {got:?}", u.name);
        assert!(got.iter().all(|l| !l.contains(&format!("from {}", u.name))));
    }
}

/// A server that can be stopped and started again on its port, and alice and bob, contacts.
fn restartable_pair() -> (tempfile::TempDir, ServerProcess, std::net::SocketAddr, User, User) {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_restartable(dir.path());
    let addr = server.addr;
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    introduce(&[&alice, &bob]);
    (dir, server, addr, alice, bob)
}

#[test]
fn server_restart_mid_conversation_loses_nothing() {
    let (dir, server, addr, alice, bob) = restartable_pair();
    alice.ok(&["send", "bob", "before restart"]);
    assert_eq!(server.terminate().code(), Some(0));
    let server = ServerProcess::start_on(dir.path(), addr);
    alice.ok(&["send", "bob", "after restart"]);
    assert_eq!(bob.recv(), vec!["alice: before restart", "alice: after restart"]);
    drop(server);
}

/// Exploratory testing: a follower that rode out a restart said "retrying in 10s" as its last
/// word, though it was connected again; the shell says so.
#[test]
fn a_follower_says_when_it_is_connected_again() {
    let (dir, server, addr, alice, bob) = restartable_pair();
    let mut follow = alice.spawn(&["recv", "--follow"]);
    let mut err = Lines::of(follow.stderr.take().unwrap());
    let mut out = Lines::of(follow.stdout.take().unwrap());
    assert_eq!(err.next_line().as_deref(), Some("qpq: following new messages (Ctrl-C to stop)"));
    assert_eq!(server.terminate().code(), Some(0));
    let retrying = err.next_line().expect("a line");
    assert!(retrying.contains("; retrying in "), "{retrying}");
    let _server = ServerProcess::start_on(dir.path(), addr);
    let again = (0..20).filter_map(|_| err.next_line()).find(|l| !l.contains("; retrying in "));
    assert_eq!(again, Some(format!("qpq: connected to {addr} again")));
    bob.ok(&["send", "alice", "after the restart"]);
    assert_eq!(untimed(&out.next_line().expect("a line")), "bob: after the restart");
    follow.kill().unwrap();
    follow.wait().unwrap();
}

#[test]
fn killing_recv_midway_loses_and_doubles_nothing() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    bob.ok(&["send", "alice", "m0"]);
    let n = 30;
    let mut child = alice.spawn(&["recv", "--follow"]);
    let mut lines = Lines::of(child.stdout.take().unwrap());
    let mut seen: Vec<String> = vec![untimed(&lines.next_line().expect("a line"))];
    // bob keeps sending while alice's recv is killed in the middle of the stream.
    std::thread::scope(|scope| {
        let bob = &bob;
        let sender = scope.spawn(move || {
            for i in 1..n {
                bob.ok(&["send", "alice", &format!("m{i}")]);
            }
        });
        for _ in 0..n / 3 {
            seen.push(untimed(&lines.next_line().expect("a line")));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        sender.join().unwrap();
    });
    seen.extend(lines.rest().iter().map(|l| untimed(l)));
    seen.extend(alice.recv());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in &seen {
        *counts.entry(l.clone()).or_default() += 1;
    }
    // `recv` takes messages from the inbox durably, then prints them: a kill between the two
    // loses that printout (documented), never the message, which stays in the history.
    let history = qpq_in(alice.home.path(), &["shell"], Some("/chat bob\n/history 100\n")).stdout;
    for i in 0..n {
        let line = format!("bob: m{i}");
        let printed = counts.get(&line).copied().unwrap_or(0);
        assert!(history.lines().any(|l| l.ends_with(&line)), "{line} is in the history:\n{history}");
        assert!(printed <= 1, "{line} printed {printed} times; all: {seen:?}");
    }
    assert!(seen.len() <= n, "nothing printed twice: {seen:?}");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    alice.add_contact(&bob);
    alice.ok(&["group", "create", "team"]);
    let before = alice.state_generation();
    let (zs, a63, ab32) = ("z".repeat(64), "a".repeat(63), "ab".repeat(32));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["send", "nobody", "hi"], "unknown contact \"nobody\""),
        (vec!["send", "abcd", "hi"], "unknown contact \"abcd\""),
        (vec!["send", &zs, "hi"], "unknown contact"),
        (vec!["send", &a63, "hi"], "invalid key"),
        (vec!["send", "#nope", "hi"], "no group named #nope"),
        (vec!["send", "#team", "hi"], "#team has no other members"),
        (vec!["send", "bob", " \n\t "], "nothing to send: the message is empty"),
        (vec!["contact", "add", "eve", "1234"], "invalid key \"1234\": expected 64 hex digits"),
        (vec!["contact", "add", "bob", &bob.key], "a contact named \"bob\" already exists"),
        (vec!["contact", "add", "bad name", &bob.key], "invalid name"),
        // Names are ASCII (no look-alike letters from other scripts): the error says so.
        (vec!["contact", "add", "zo\u{eb}", &bob.key], "use 1-32 ASCII letters, digits"),
        (vec!["group", "create", "team"], "a group named #team already exists"),
        (vec!["group", "add", "team", &ab32], "invalid key: not an ed25519 public key"),
        (vec!["group", "members", "ghost"], "no group named #ghost"),
        (vec!["contact", "remove", "ghost"], "unknown contact \"ghost\""),
        // As typed (it said `""`).
        (vec!["name", "set", "   "], "invalid display name \"   \""),
    ];
    for (args, want) in cases {
        let err = alice.fails(&args);
        assert!(err.starts_with("qpq: "), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert_eq!(alice.state_generation(), before, "{args:?} wrote to the home");
    }
    // Found by exploratory testing: a long mistyped name came back whole in the error (3 KB
    // of `x` for 3 KB typed). What is quoted back is cut, and says it was.
    let long = "x".repeat(3000);
    let long_cases: [&[&str]; 16] = [
        &["send", &long, "hi"],
        &["contact", "add", "eve", &long],
        &["history", "--before", &long],
        &["server", "pin", &long],
        &["--server", &long, "health"],
        &["group", "remove", "team", &long],
        &["send", &format!("#{long}"), "hi"],
        &["group", "create", &long],
        &["group", "add", "team", &long],
        &["group", "info", &long],
        &["contact", "add", &long, &bob.key],
        &["contact", "remove", &long],
        &["history", &long],
        &["requests", "accept", &long],
        &["requests", "unblock", &long],
        &["name", "set", &long],
    ];
    for args in long_cases {
        let err = alice.fails(args);
        assert!(err.len() < 300 && err.contains("xxx\u{2026}"), "{:?}: {err}", &args[..2]);
        assert_eq!(alice.state_generation(), before, "{:?} wrote to the home", &args[..2]);
    }
    // A valid key that never ran init has no key packages.
    let stranger = qpq::crypto::identity::Identity::generate().public().to_hex();
    let err = alice.fails(&["group", "add", "team", &stranger]);
    assert!(err.contains("has no valid key packages on the server"), "{err}");
    let err = alice.fails(&["send", &stranger, "hi"]);
    assert!(err.contains("has no valid key packages on the server"), "{err}");
    assert_eq!(members_of(&alice, "team").len(), 1);
    assert!(alice.ok(&["group", "list"]).lines().all(|l| !l.contains("direct")), "no half-made conversation");
    // Usage errors exit 2 with clap's message.
    let r = alice.run(&["send"]);
    assert_eq!(r.code, Some(2));
}

#[test]
fn passphrase_protects_the_state_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str], pass: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qpq"));
        cmd.arg("--home").arg(home.path()).args(args).env("QPQ_LOG", "warn").env_remove("QPQ_PASSPHRASE");
        if let Some(p) = pass {
            cmd.env("QPQ_PASSPHRASE", p);
        }
        cmd.stdin(Stdio::null()).output().unwrap()
    };
    let addr = server.addr.to_string();
    let out = run(&["init", "--server", &addr], Some("correct horse"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let state = std::fs::read(home.path().join("qpq.db")).unwrap();
    assert!(!state.windows(16).any(|w| hex::encode(w) == key[..32]), "the key is not stored in the clear");
    let out = run(&["whoami"], Some("wrong horse"));
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "qpq: wrong passphrase or corrupted state file");
    let out = run(&["whoami"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("set QPQ_PASSPHRASE"));
    let out = run(&["whoami"], Some("correct horse"));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().next(), Some(key.as_str()));
    use std::os::unix::fs::PermissionsExt;
    // Every file of the home is private, the write-counter hint `qpq.db.gen` too (it was 0644),
    // which a save writes; one an older qpq left with 0644 is made private.
    let hint = home.path().join("qpq.db.gen");
    std::fs::write(&hint, "1").unwrap();
    std::fs::set_permissions(&hint, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["history", "--retention", "90d"], Some("correct horse"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(home.path()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(mode & 0o777, 0o600, "{name}: {:o}", mode & 0o777);
        names.push(name);
    }
    names.sort();
    assert!(names.iter().any(|n| n == "qpq.db") && names.iter().any(|n| n == "qpq.db.gen"), "{names:?}");
}

#[test]
fn a_tampered_state_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    // Flip one bit in every sealed record of the state table: redb's pages stay valid, so
    // what notices is each record's AEAD tag.
    {
        let db = redb::Database::open(alice.home.path().join("qpq.db")).unwrap();
        let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("state");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            let all: Vec<(Vec<u8>, Vec<u8>)> = t
                .iter()
                .unwrap()
                .map(|r| r.map(|(k, v)| (k.value().to_vec(), v.value().to_vec())).unwrap())
                .collect();
            assert!(all.len() > 10, "the state is split into records");
            for (k, mut v) in all {
                let mid = v.len() / 2;
                v[mid] ^= 1;
                t.insert(&k[..], &v[..]).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let err = alice.fails(&["whoami"]);
    assert_eq!(err.trim(), "qpq: a record of the client database is damaged or was moved");
}

#[test]
fn a_swapped_hybrid_key_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_restartable(dir.path());
    let addr = server.addr;
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    introduce(&[&alice, &bob]);
    assert_eq!(server.terminate().code(), Some(0));
    // Play a malicious server: replace bob's hybrid key, keep bob's signature.
    {
        let db = redb::Database::open(dir.path().join("qpq.db")).unwrap();
        let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("hybrid_keys");
        let bob_key = hex::decode(&bob.key).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            let old = t.get(&bob_key[..]).unwrap().unwrap().value().to_vec();
            // signature (64) || signed creation time (8) || key: keep the first two.
            let mut swapped = old[..72].to_vec();
            swapped
                .extend_from_slice(qpq::crypto::hybrid::HybridSecretKey::generate().public_key().as_bytes());
            t.insert(&bob_key[..], &swapped[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let server = ServerProcess::start_on(dir.path(), addr);
    let err = alice.fails(&["send", "bob", "hi"]);
    assert!(err.contains("hybrid key of bob rejected: hybrid key signature does not verify"), "{err}");
    drop(server);
}

#[test]
fn a_rotated_envelope_key_still_opens_what_was_sealed_to_the_old_one() {
    let (_dir, _server, [alice, bob, carol]) = common::cast(["alice", "bob", "carol"]);
    alice.ok(&["send", "bob", "before"]);
    // The one-shot saved the key it looked up, with the creation time bob signed, so a later
    // process can tell an older key served again from a newer one.
    let bob_id: [u8; 32] = hex::decode(&bob.key).unwrap().try_into().unwrap();
    let remembered = |u: &User| {
        let home = qpq::client::state::Home::open(u.home.path(), None).unwrap();
        home.state.hybrid_keys.get(&bob_id).map(|k| k.created_at_ms)
    };
    let bobs_own = qpq::client::state::Home::open(bob.home.path(), None).unwrap().state.hybrid_created_at_ms;
    assert_eq!(remembered(&alice), Some(bobs_own));
    let show = bob.ok(&["keys", "show"]);
    let old_fp = show.split_whitespace().nth(2).expect("fingerprint").to_string();
    assert!(show.starts_with(&format!("envelope key: {old_fp} created 0 days ago")), "{show}");
    assert!(show.contains("on the server: yes; replaced keys kept: 0"), "{show}");

    let rotated = bob.ok(&["keys", "rotate"]);
    let new_fp = rotated.trim().strip_prefix("new envelope key: ").expect("new fingerprint").to_string();
    assert_ne!(new_fp, old_fp);
    assert!(bob.ok(&["keys", "show"]).contains("replaced keys kept: 1"));

    // alice looked bob's key up a moment ago, so she still seals to the old one; carol never
    // did, so she gets the new one from the server (signed by bob, or she would refuse it).
    alice.ok(&["send", "bob", "after, to the old key"]);
    carol.ok(&["send", "bob", "to the new key"]);
    assert!(remembered(&carol) > Some(bobs_own), "carol holds bob's newer key");
    let mut got = bob.recv();
    got.sort();
    assert_eq!(got, vec!["alice: after, to the old key", "alice: before", "carol: to the new key"]);
    // And bob's replies go out as usual.
    bob.ok(&["send", "carol", "got it"]);
    assert_eq!(carol.recv(), vec!["bob: got it"]);
}

/// Ctrl-C ends `recv --follow` cleanly (status 0), through the one interrupt listener the
/// loop keeps (a listener made afresh at each wait missed a Ctrl-C sent between two waits).
#[test]
fn recv_follow_ends_on_ctrl_c_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let mut follow = alice.spawn(&["recv", "--follow"]);
    let mut err = common::Lines::of(follow.stderr.take().unwrap());
    assert_eq!(err.next_line().as_deref(), Some("qpq: following new messages (Ctrl-C to stop)"));
    let sent = std::process::Command::new("kill").args(["-INT", &follow.id().to_string()]).status().unwrap();
    assert!(sent.success());
    assert_eq!(err.next_line(), None, "nothing more on stderr");
    assert_eq!(follow.wait().unwrap().code(), Some(0));
}

/// alice, pinned to a server that was stopped and replaced on its address by one with another
/// certificate (returned, with the data dirs to keep alive).
fn alice_behind_a_replaced_certificate() -> ([tempfile::TempDir; 2], User, ServerProcess) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let server = ServerProcess::start_restartable(dirs[0].path());
    let addr = server.addr;
    let alice = User::init(&server, "alice");
    assert_eq!(server.terminate().code(), Some(0));
    let replaced = ServerProcess::start_on(dirs[1].path(), addr);
    (dirs, alice, replaced)
}

/// Review: `recv --follow` retried every error for ever, a replaced certificate included, so
/// a supervisor saw a process still running while nothing could ever arrive. An error only the
/// user can end now ends it, with status 1. Fails without the fix (it retries).
#[test]
fn recv_follow_stops_on_a_changed_certificate_instead_of_retrying_for_ever() {
    let (_dirs, alice, _impostor) = alice_behind_a_replaced_certificate();
    let mut follow = alice.spawn(&["recv", "--follow"]);
    let mut err = common::Lines::of(follow.stderr.take().unwrap());
    assert_eq!(err.next_line().as_deref(), Some("qpq: following new messages (Ctrl-C to stop)"));
    let line = err.next_line().unwrap_or_default();
    let stopped = line.contains("server certificate changed") && !line.contains("retrying");
    if !stopped {
        let _ = follow.kill();
    }
    assert!(stopped, "{line}");
    assert_eq!(err.next_line(), None, "nothing after the error");
    assert_eq!(follow.wait().unwrap().code(), Some(1));
}

/// Review: a long-lived process (the shell) reconnected with the pin it had loaded, so after
/// a replaced certificate and `qpq server pin NEW` in another terminal it kept failing until
/// restarted. The next connect reads the home's pin. Fails without the fix.
#[test]
fn a_pin_set_by_another_process_is_used_by_the_next_connect() {
    use qpq::client::messenger::{ClientError, ConnectOptions, Messenger};
    use qpq::client::session::SessionError;
    let (_dirs, alice, replaced) = alice_behind_a_replaced_certificate();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(tokio::task::LocalSet::new().run_until(async {
        let mut m = Messenger::open(alice.home.path(), None, ConnectOptions::default()).unwrap();
        let e = m.connect().await.err().expect("the old pin refuses the new certificate");
        assert!(matches!(e, ClientError::Session(SessionError::CertificateChanged { .. })), "{e}");
        alice.ok(&["server", "pin", &replaced.fingerprint.to_string()]);
        m.disconnect().await;
        m.connect().await.expect("the pin set meanwhile is used");
        m.disconnect().await;
    }));
}

#[test]
fn a_changed_server_certificate_is_a_hard_error_naming_both_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_restartable(dir.path());
    let addr = server.addr;
    let old_fp = server.fingerprint.to_string();
    let alice = User::init(&server, "alice");
    assert_eq!(server.terminate().code(), Some(0));
    // Another server (new certificate) on the same address.
    let other_dir = tempfile::tempdir().unwrap();
    let impostor = ServerProcess::start_on(other_dir.path(), addr);
    let err = alice.fails(&["health"]);
    assert!(err.contains("server certificate changed"), "{err}");
    assert!(err.contains(&old_fp), "{err}");
    assert!(err.contains(&impostor.fingerprint.to_string()), "{err}");
    assert!(err.contains("qpq server pin"), "{err}");
    // Only an explicit re-pin moves the pin (issue 10, item 9).
    let fp = impostor.fingerprint.to_string();
    let err = alice.fails(&["--server-fingerprint", &fp, "health"]);
    assert!(err.contains("is not the certificate pinned for"), "{err}");
    alice.ok(&["server", "pin", &fp]);
    let out = alice.ok(&["health"]);
    assert!(out.starts_with("ok version"), "{out}");
}

#[test]
fn health_fails_when_the_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    alice.add_contact(&bob);
    assert!(alice.ok(&["health"]).starts_with("ok version"));
    server.kill9();
    let err = alice.fails(&["health"]);
    assert!(err.contains("cannot reach server"), "{err}");
    // A message is queued instead (tests/outbox.rs follows it to its delivery).
    let r = alice.run(&["send", "bob", "anyone?"]);
    assert_eq!(r.code, Some(75), "{}", r.stderr);
    assert!(
        r.stderr.contains("queued, will send when the server is back (cannot reach server"),
        "{}",
        r.stderr
    );
}

fn key_packages_on_server(u: &User) -> u32 {
    let out = u.ok(&["health"]);
    let line = out.lines().find(|l| l.starts_with("key packages: ")).expect("key package line");
    line["key packages: ".len()..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn key_packages_are_refilled_after_welcomes_use_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    introduce(&[&alice, &bob]);
    assert_eq!(key_packages_on_server(&bob), 20);
    for i in 0..17 {
        let g = format!("g{i}");
        alice.ok(&["group", "create", &g]);
        alice.ok(&["group", "add", &g, "bob"]);
    }
    assert_eq!(key_packages_on_server(&bob), 3);
    bob.recv();
    assert_eq!(key_packages_on_server(&bob), 20, "refilled after processing the welcomes");
    assert_eq!(bob.ok(&["group", "list"]).lines().count(), 17);
}

#[test]
fn a_member_who_leaves_is_removed_by_the_others() {
    let (_dir, _server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob", "carol"]);
    bob.recv();
    carol.recv();
    bob.ok(&["group", "leave", "team"]);
    let err = bob.fails(&["send", "#team", "hello?"]);
    assert!(err.contains("no longer a member of #team"), "{err}");
    // The next member to process the leave commits bob's removal.
    alice.recv();
    assert_eq!(members_of(&alice, "team").len(), 2);
    carol.recv();
    assert_eq!(members_of(&carol, "team"), members_of(&alice, "team"));
    alice.ok(&["send", "#team", "just us"]);
    assert_eq!(carol.recv(), vec!["[#team] alice: just us"]);
    assert!(bob.recv().is_empty());
}

#[test]
fn two_one_shot_saves_while_recv_follows_are_not_overwritten() {
    // Regression: the follower compared the state file's inode to decide whether another
    // process had saved. Two saves (two renames) brought the file back to the inode it had
    // seen, since ext4 reuses a freed inode number at once, so it kept its stale state and its
    // next save dropped both contacts.
    let (_dir, _server, [alice, bob, carol, dave]) = cast(["alice", "bob", "carol", "dave"]);
    for u in [&carol, &dave] {
        alice.ok(&["contact", "remove", &u.name]);
    }
    bob.ok(&["send", "alice", "one"]);
    let mut follow = alice.spawn(&["recv", "--follow"]);
    let mut lines = Lines::of(follow.stdout.take().unwrap());
    assert_eq!(untimed(&lines.next_line().unwrap()), "bob: one", "the follower has loaded and saved");
    alice.add_contact(&carol);
    alice.add_contact(&dave);
    bob.ok(&["send", "alice", "two"]);
    assert_eq!(untimed(&lines.next_line().unwrap()), "bob: two", "the follower saved again");
    follow.kill().unwrap();
    follow.wait().unwrap();
    let contacts = alice.ok(&["contact", "list"]);
    for name in ["bob", "carol", "dave"] {
        assert!(contacts.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{contacts}");
    }
}

#[test]
fn recv_follow_and_one_shot_sends_share_a_home() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    let mut follow = alice.spawn(&["recv", "--follow"]);
    let mut lines = Lines::of(follow.stdout.take().unwrap());
    for i in 0..3 {
        // alice sends from the same home while her recv --follow runs.
        alice.ok(&["send", "bob", &format!("a{i}")]);
        bob.ok(&["send", "alice", &format!("b{i}")]);
        assert_eq!(untimed(&lines.next_line().unwrap()), format!("bob: b{i}"));
    }
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert_eq!(bob.recv(), vec!["alice: opening", "alice: a0", "alice: a1", "alice: a2"]);
}

/// The committer dies before its commit left, right after the server took it, or right after
/// merging it (before its Welcome went out): later commands finish the job and nobody is left
/// behind.
#[test]
fn a_committer_killed_mid_commit_recovers_on_the_next_command() {
    for point in ["commit-staged", "commit-sent", "commit-merged"] {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(dir.path());
        let alice = User::init(&server, "alice");
        let bob = User::init(&server, "bob");
        let carol = User::init(&server, "carol");
        introduce(&[&alice, &bob, &carol]);
        alice.ok(&["group", "create", "team"]);
        alice.ok(&["group", "add", "team", "carol"]);
        let crashed = Command::new(env!("CARGO_BIN_EXE_qpq"))
            .arg("--home")
            .arg(alice.home.path())
            .args(["group", "add", "team", "bob"])
            .env("QPQ_FAILPOINT", point)
            .env("QPQ_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(crashed.status.code(), Some(qpq::failpoint::FAILPOINT_EXIT_CODE), "stopped at {point}");
        // Later commands resume: a staged commit that never left is sent again by the first
        // recv, and applied when its echo comes back (by the second at the latest).
        alice.recv();
        alice.recv();
        assert_eq!(members_of(&alice, "team").len(), 3, "{point}: the commit was applied");
        assert!(bob.recv().is_empty());
        assert_eq!(members_of(&bob, "team").len(), 3, "{point}: bob got his welcome");
        alice.ok(&["send", "#team", "all here"]);
        assert_eq!(bob.recv(), vec!["[#team] alice: all here"], "{point}");
        assert_eq!(carol.recv(), vec!["[#team] alice: all here"], "{point}");
        assert_eq!(epoch_of(&carol, "team"), epoch_of(&alice, "team"));
    }
}

#[test]
fn recv_wait_returns_when_the_first_message_arrives() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "hello"]);
    bob.recv();
    // Any number of seconds is a wait, the largest too (it once overflowed the deadline).
    let waiting = bob.spawn(&["recv", "--wait", &u64::MAX.to_string()]);
    alice.ok(&["send", "bob", "worth the wait"]);
    // Only the arrival can end this run with output: the timeout path prints nothing.
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(untimed(&String::from_utf8_lossy(&out.stdout)), "alice: worth the wait\n");
    // With nothing pending, a short wait ends empty and successfully.
    let r = bob.run(&["recv", "--wait", "1"]);
    assert!(r.ok && r.stdout.is_empty());
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    // With the read end closed, the first write already fails with EPIPE. (`server show`
    // printed with println!, which panics on it.)
    alice.add_contact(&bob);
    for args in [&["contact", "list"][..], &["server", "show"]] {
        let mut child = alice.spawn(args);
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: exit {:?}: {stderr}", out.status.code());
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// `recv` marked messages read before it printed them, so a pipe whose reader had gone (or a
/// full disk) lost them for every later `recv`. They are unread again when the write fails.
#[test]
fn messages_recv_could_not_write_are_printed_by_the_next_recv() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "hello through a broken pipe"]);
    let mut child = bob.spawn(&["recv"]);
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(bob.recv(), vec!["alice: hello through a broken pipe".to_string()]);
}

/// Review: a write that failed marked the whole read unread again, so a reader taking one
/// line and leaving (`recv --json | head -n1`) got the same first message for ever when more
/// than a pipe's buffer waited. What was written stays read; the rest is printed next time.
/// Fails without the fix (the next recv starts with message 0 again).
#[test]
fn a_reader_that_takes_one_line_and_leaves_moves_the_next_recv_on() {
    use std::io::BufRead;
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    // Five messages of 30,000 bytes: more than a pipe holds.
    for i in 0..5 {
        alice.ok(&["send", "bob", &format!("message {i} {}", "x".repeat(30_000))]);
    }
    let mut child = bob.spawn(&["recv", "--json"]);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    // Events first (the direct conversation bob joined), then the first message.
    let mut first = String::new();
    while !first.contains("\"type\":\"message\"") {
        first.clear();
        assert!(out.read_line(&mut first).unwrap() > 0, "a message line");
    }
    assert!(first.contains("message 0 "), "{}", first.replace(&"x".repeat(30_000), "X"));
    drop(out);
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "exit {:?}: {}",
        done.status.code(),
        String::from_utf8_lossy(&done.stderr)
    );
    let next = bob.recv();
    assert!(!next.is_empty(), "what was not written comes next");
    assert!(next.iter().all(|m| !m.contains("message 0 ")), "the line read is not printed again");
    assert!(next.last().is_some_and(|m| m.contains("message 4 ")), "and the last one comes");
}

#[test]
fn a_used_last_resort_key_package_is_replaced() {
    let (_dir, server, [alice, bob]) = cast(["alice", "bob"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Takes every single-use package of bob's, as strangers could; returns the last resort.
    let drain = || -> Vec<u8> {
        rt.block_on(tokio::task::LocalSet::new().run_until(async {
            let s =
                qpq::client::session::Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
            let key = hex::decode(&bob.key).unwrap();
            loop {
                let kp = s.fetch_key_package(&key).await.unwrap();
                if kp.last_resort {
                    s.close().await;
                    return kp.bytes;
                }
            }
        }))
    };
    let before = drain();
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    bob.recv();
    assert_eq!(members_of(&bob, "team").len(), 2, "bob joined with his last-resort package");
    let after = drain();
    assert_ne!(before, after, "the used last-resort package was replaced");
    assert_eq!(after, drain(), "and the new one is kept, not consumed");
}

/// The operator starts over with an empty database (same certificate, same address): clients
/// notice, restart their delivery cursor and publish their keys again.
#[test]
fn a_replaced_server_database_loses_no_new_message() {
    let (dir, server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);
    let addr = server.addr;
    alice.ok(&["send", "bob", "before"]);
    assert_eq!(bob.recv(), vec!["alice: before"]);
    assert_eq!(server.terminate().code(), Some(0));
    std::fs::remove_file(dir.path().join("qpq.db")).unwrap();
    let _server = ServerProcess::start_on(dir.path(), addr);
    // Both reconnect; alice's message is seq 1 in bob's new queue, below bob's old cursor.
    let r = bob.run(&["recv"]);
    assert!(r.stderr.contains("database was replaced"), "{}", r.stderr);
    alice.ok(&["send", "bob", "after"]);
    assert_eq!(bob.recv(), vec!["alice: after"]);
    // Their keys are back on the server: carol can start a conversation with bob.
    carol.ok(&["send", "bob", "hi from carol"]);
    assert_eq!(bob.recv(), vec!["carol: hi from carol"]);
}
