//! The outbox (issue 10, item 7): a message typed while the server is away is queued in the
//! home, `send` exits with 75 and says so, and the next command that connects sends it; a
//! message whose first copy may have reached the server goes again with the same bytes and is
//! shown once. Real `qpq serve` (stopped and restarted on its port), real homes.

mod common;

use std::process::Stdio;

use common::{Run, ServerProcess, User, cast, qpq_command, qpq_in, untimed};

/// `send`'s exit status when the message waits in the outbox (EX_TEMPFAIL).
const EXIT_QUEUED: i32 = 75;
/// Exit status of a process stopped at a failpoint (see src/failpoint.rs).
const FAILPOINT_EXIT: i32 = 86;

/// `qpq ARGS` as `u`, stopped at failpoint `point`.
fn run_until(u: &User, point: &str, args: &[&str]) -> Run {
    let out = qpq_command(u.home.path())
        .args(args)
        .env("QPQ_FAILPOINT", point)
        .stdin(Stdio::null())
        .output()
        .expect("qpq runs");
    Run::from(out)
}

#[test]
fn a_send_while_the_server_is_down_is_queued_and_delivered_once_when_it_is_back() {
    let (dir, server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let addr = server.addr;
    server.kill9();

    for (to, text) in [("bob", "while down"), ("bob", "still down"), ("carol", "hello carol")] {
        let r = alice.run(&["send", to, text]);
        assert_eq!(r.code, Some(EXIT_QUEUED), "{to} {text}: {}", r.stderr);
        assert!(r.stderr.starts_with("qpq: queued, will send when the server is back ("), "{}", r.stderr);
    }

    let server = ServerProcess::start_on(dir.path(), addr);
    // alice's next command that connects sends the outbox first, in order, then its own.
    let r = alice.run(&["send", "bob", "back"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("qpq: sent 2 queued messages to bob"), "{}", r.stderr);
    // carol had no conversation with alice yet: it was opened when her message went out.
    assert!(r.stderr.contains("qpq: sent a queued message to carol"), "{}", r.stderr);
    assert_eq!(bob.recv(), ["alice: while down", "alice: still down", "alice: back"]);
    assert_eq!(carol.recv(), ["alice: hello carol"]);
    assert!(bob.recv().is_empty(), "nothing twice");
    // Nothing is left to send: a further command says nothing about queued messages.
    let r = alice.run(&["recv"]);
    assert!(r.ok && r.stderr.is_empty(), "{}", r.stderr);
    drop(server);
}

#[test]
fn recv_sends_what_waits_in_the_outbox() {
    let (dir, server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let addr = server.addr;
    server.kill9();
    assert_eq!(alice.run(&["send", "bob", "queued"]).code, Some(EXIT_QUEUED));
    let _server = ServerProcess::start_on(dir.path(), addr);
    let r = alice.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(bob.recv(), ["alice: queued"]);
}

/// Found by exploratory testing: a message queued while the server was away and refused
/// when it went (carol's key has no KeyPackages there) was told by the `recv` that sent it,
/// which exited 0: a script that saw `send` exit 75 had no status to learn it by.
#[test]
fn a_recv_that_finds_a_queued_message_refused_exits_1() {
    let (dir, server, [alice]) = cast(["alice"]);
    let nobody = qpq::crypto::identity::Identity::generate().public().to_hex();
    alice.ok(&["contact", "add", "carol", &nobody]);
    let addr = server.addr;
    server.kill9();
    assert_eq!(alice.run(&["send", "carol", "hello?"]).code, Some(EXIT_QUEUED));
    let _server = ServerProcess::start_on(dir.path(), addr);
    let r = alice.run(&["recv"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("qpq: a queued message to carol (\u{201c}hello?\u{201d}) was not sent: "),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let r = alice.run(&["recv"]);
    assert!(r.ok && r.stderr.is_empty(), "told once: {}", r.stderr);
}

/// Issue 10 item 7's third case: the request left and the answer never came. The copy that
/// goes again is the same ciphertext, which bob drops quietly.
#[test]
fn a_message_that_reached_the_server_before_a_crash_goes_again_and_is_shown_once() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);

    // alice dies right after the server took the message, before she could take it out of
    // her outbox.
    let r = run_until(&alice, "send-enqueued", &["send", "bob", "once"]);
    assert_eq!(r.code, Some(FAILPOINT_EXIT), "{}", r.stderr);
    let r = alice.run(&["send", "bob", "twice?"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("qpq: sent a queued message to bob"), "{}", r.stderr);

    let r = bob.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(untimed(&r.stdout).lines().collect::<Vec<_>>(), ["alice: once", "alice: twice?"]);
    assert!(r.stderr.is_empty(), "the duplicate is dropped quietly: {}", r.stderr);
}

/// The shell never waits for the network to take a message: typed while the server is down
/// (and before the shell noticed), it is queued, the prompt comes back at once, and the
/// message goes out when the server is back.
#[test]
fn pty_a_message_typed_while_the_server_is_down_returns_the_prompt_and_goes_out_later() {
    let (dir, server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let addr = server.addr;
    let mut cmd = qpq_command(alice.home.path());
    cmd.arg("shell").env("TERM", "xterm");
    let opts = rexpect::reader::Options::new().timeout_ms(Some(90_000)).strip_ansi_escape_codes(true);
    let mut p = rexpect::session::spawn_with_options(cmd, opts).expect("spawn qpq shell on a pty");
    p.exp_string("qpq> ").unwrap();
    server.kill9();
    p.send_line("@bob typed while down").unwrap();
    p.exp_string("@bob typed while down").unwrap();
    p.exp_string("qpq> ").unwrap();
    // A blocking send would report the dead server before this command ran.
    p.send_line("whoami").unwrap();
    let before = p.exp_string(&alice.key).unwrap();
    assert!(
        !before.contains("error:") && !before.contains("lost the connection"),
        "the prompt waited for the network: {before}"
    );
    p.exp_string("1 message queued, will send when the server is back").unwrap();
    let _server = ServerProcess::start_on(dir.path(), addr);
    p.exp_string("sent a queued message to bob").unwrap();
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(bob.recv(), ["alice: typed while down"]);
}

/// A crash between encrypting a message and sending it loses nothing, even when the group's
/// epoch moves on before the retry (the text is encrypted again for the new epoch, since no
/// copy ever left).
#[test]
fn a_message_encrypted_before_a_crash_goes_out_after_a_commit_changed_the_epoch() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    bob.recv();
    let r = run_until(&alice, "send-sealed", &["send", "#team", "sealed then crashed"]);
    assert_eq!(r.code, Some(FAILPOINT_EXIT), "{}", r.stderr);
    bob.ok(&["group", "update", "team"]);
    let r = alice.run(&["send", "#team", "after the commit"]);
    assert!(r.ok, "{}", r.stderr);
    let r = bob.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        untimed(&r.stdout).lines().collect::<Vec<_>>(),
        ["[#team] alice: sealed then crashed", "[#team] alice: after the commit"]
    );
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let history = qpq_in(alice.home.path(), &["shell"], Some("/chat #team\n/history 10\n")).stdout;
    assert_eq!(history.matches("sealed then crashed").count(), 1, "once in alice's history: {history}");
}

/// The third case of issue 10 item 7: the request left and its answer never came. `send` says
/// "may have been sent; retrying", never "failed", and every copy that goes again is the same
/// ciphertext, which bob shows once.
#[test]
fn a_send_whose_answer_was_lost_may_have_been_sent_and_is_retried_with_the_same_bytes() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);

    // Every answer is lost in this process: the first attempt and its retry.
    let r = run_until(&alice, "send-answer-lost", &["send", "bob", "did it arrive?"]);
    assert_eq!(r.code, Some(EXIT_QUEUED), "{}", r.stderr);
    assert!(r.stderr.contains("qpq: may have been sent; retrying\n"), "{}", r.stderr);
    assert!(r.stderr.contains("qpq: may have been sent; it stays queued"), "{}", r.stderr);
    assert!(!r.stderr.contains("fail"), "never \"failed\": {}", r.stderr);
    // Two copies reached the server; a third goes with alice's next command.
    let r = alice.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("qpq: sent a queued message to bob"), "{}", r.stderr);

    let r = bob.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(untimed(&r.stdout).lines().collect::<Vec<_>>(), ["alice: did it arrive?"]);
    assert!(r.stderr.is_empty(), "the copies are dropped quietly: {}", r.stderr);
}

/// `qpq history` left out what waits in the outbox, which the shell's `/history` shows (one
/// grammar, one answer): a script that sent while the server was down saw its message nowhere.
/// Now it ends the newest page, marked queued in JSON, and once sent it is in the history
/// proper, once.
#[test]
fn history_shows_a_queued_message_at_the_end_of_the_newest_page() {
    let (dir, server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let addr = server.addr;
    server.kill9();
    assert_eq!(alice.run(&["send", "bob", "queued"]).code, Some(EXIT_QUEUED));

    let shown = untimed(&alice.ok(&["history", "bob"]));
    assert_eq!(shown.lines().collect::<Vec<_>>(), ["me: opening", "me: queued"], "{shown}");
    let json = alice.ok(&["history", "bob", "--json"]);
    let texts: Vec<(String, bool)> = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .map(|v| (v["text"].as_str().unwrap_or_default().to_string(), v["queued"].as_bool().unwrap_or(false)))
        .collect();
    assert_eq!(texts, [("opening".to_string(), false), ("queued".to_string(), true)], "{json}");
    // Not on an older page, nor among search results.
    let found = alice.ok(&["history", "bob", "--grep", "queued"]);
    assert!(found.is_empty(), "{found}");

    let _server = ServerProcess::start_on(dir.path(), addr);
    assert!(alice.run(&["recv"]).ok);
    let shown = untimed(&alice.ok(&["history", "bob"]));
    assert_eq!(shown.lines().collect::<Vec<_>>(), ["me: opening", "me: queued"], "once: {shown}");
    let json = alice.ok(&["history", "bob", "--json"]);
    assert!(!json.contains("\"queued\":true"), "{json}");
    assert_eq!(bob.recv(), ["alice: queued"]);
}

/// A message queued to a person we had no conversation with yet showed in no history: not in
/// theirs (there was none) and not in the list of all conversations, which left out every
/// queued message. Both now end with it; JSON names the person, with no group id yet.
#[test]
fn a_message_queued_to_a_new_contact_shows_in_their_history_and_in_all() {
    let (dir, server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let addr = server.addr;
    server.kill9();
    assert_eq!(alice.run(&["send", "carol", "first words"]).code, Some(EXIT_QUEUED));
    assert_eq!(alice.run(&["send", "bob", "to bob"]).code, Some(EXIT_QUEUED));

    let shown = untimed(&alice.ok(&["history", "carol"]));
    assert_eq!(shown.lines().collect::<Vec<_>>(), ["me: first words"], "{shown}");
    let json = alice.ok(&["history", "carol", "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!((v["text"].as_str(), v["queued"].as_bool()), (Some("first words"), Some(true)), "{json}");
    assert!(v["group_id"].is_null(), "{json}");
    assert_eq!(v["to_name"].as_str(), Some("carol"), "{json}");
    assert_eq!(v["to"].as_str().map(str::len), Some(64), "{json}");
    let all = untimed(&alice.ok(&["history"]));
    assert_eq!(
        all.lines().collect::<Vec<_>>(),
        ["[bob] me: opening", "[carol] me: first words", "[bob] me: to bob"],
        "{all}"
    );
    // Not on an older page, nor among search results, as for any conversation.
    for filter in [&["--grep", "first"][..], &["--before", "1h"]] {
        let found = alice.ok(&[&["history", "carol"][..], filter].concat());
        assert!(found.is_empty(), "{filter:?}: {found}");
    }
    let shell = qpq_in(alice.home.path(), &["shell"], Some("/history carol\n")).stdout;
    assert!(shell.contains("me: first words"), "{shell}");
    assert!(!shell.contains("no messages with carol yet"), "{shell}");

    let _server = ServerProcess::start_on(dir.path(), addr);
    assert!(alice.run(&["recv"]).ok);
    let shown = untimed(&alice.ok(&["history", "carol"]));
    assert_eq!(shown.lines().collect::<Vec<_>>(), ["me: first words"], "once: {shown}");
    assert_eq!(carol.recv(), ["alice: first words"]);
}

/// A follower that sends a message a one-shot `send` queued a moment before, while that `send`
/// still runs, says nothing of it: the `send` says what became of it (here: nothing, it went).
/// The follower said "sent a queued message to bob" about a message nobody was told waited.
/// Once the `send` is gone, a queued message is announced again (the tests above).
#[test]
fn a_follower_leaves_a_running_sends_message_to_it() {
    use common::Lines;
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "hello"]);
    assert_eq!(bob.recv(), ["alice: hello"]);
    let mut follow = alice.spawn(&["recv", "--follow"]);
    let mut follow_err = Lines::of(follow.stderr.take().unwrap());
    assert_eq!(follow_err.next_line().as_deref(), Some("qpq: following new messages (Ctrl-C to stop)"));
    let mut follow_out = Lines::of(follow.stdout.take().unwrap());

    let (mut send, mut send_err) =
        common::paused_at(alice.home.path(), &["send", "bob", "raced"], "send-queued");
    // The follower sees the home change and sends the outbox.
    let r = bob.run(&["recv", "--wait", "60"]);
    assert_eq!(untimed(&r.stdout).trim(), "alice: raced", "{}", r.stderr);
    common::resume(&mut send);
    assert_eq!(send.wait().unwrap().code(), Some(0));
    assert_eq!(send_err.next_line(), None, "the send says nothing: its message went");

    // Whatever the follower said of that round is out before what it prints next.
    bob.ok(&["send", "alice", "after"]);
    assert_eq!(follow_out.next_line().map(|l| untimed(&l).trim().to_string()).as_deref(), Some("bob: after"));
    follow.kill().unwrap();
    follow.wait().unwrap();
    let said: Vec<String> = std::iter::from_fn(|| follow_err.next_line()).collect();
    assert!(!said.iter().any(|l| l.contains("sent a queued message")), "{said:?}");
    assert!(bob.recv().is_empty(), "sent once");
}
