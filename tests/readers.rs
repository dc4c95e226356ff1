//! Several readers on one home (issue 10, bug 4): two `recv --follow`, or a shell and a
//! `recv --follow`, on bob's home each print every message, in order, whichever of them
//! fetched it from the server. Real `qpq serve` on 127.0.0.1:0, real homes; every wait is for
//! an output line.

mod common;

use std::io::Write;
use std::process::{Child, Stdio};

use common::{Lines, User, cast, qpq_command, untimed};

/// The line `recv --follow` prints on stderr once it knows where it starts reading.
const FOLLOWING: &str = "qpq: following new messages (Ctrl-C to stop)";

/// `recv --follow` on `u`'s home, once it is ready: its stdout lines.
fn follower(u: &User) -> (Child, Lines) {
    let mut child = u.spawn(&["recv", "--follow"]);
    let mut err = Lines::of(child.stderr.take().expect("piped stderr"));
    assert_eq!(err.next_line().as_deref(), Some(FOLLOWING));
    let out = Lines::of(child.stdout.take().expect("piped stdout"));
    (child, out)
}

fn stop(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Regression, issue 10 bug 4: two followers on one home printed 1, 2, 4 and 3, 5, 6.
#[test]
fn two_followers_on_one_home_both_print_every_message_in_order() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);

    let (a, mut a_out) = follower(&bob);
    let (b, mut b_out) = follower(&bob);
    let sent: Vec<String> = (1..=6).map(|i| format!("m{i}")).collect();
    for m in &sent {
        alice.ok(&["send", "bob", m]);
    }
    let want: Vec<String> = sent.iter().map(|m| format!("alice: {m}")).collect();
    for out in [&mut a_out, &mut b_out] {
        let got: Vec<String> = (0..6).map(|_| untimed(&out.next_line().expect("a line"))).collect();
        assert_eq!(got, want);
    }
    stop(a);
    stop(b);
    // What the followers showed is read: a one-shot recv has nothing left to print.
    assert!(bob.recv().is_empty());
}

/// A shell and a `recv --follow` on one home split the messages the same way.
#[test]
fn a_shell_and_a_follower_on_one_home_both_print_every_message() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);

    let mut shell = qpq_command(bob.home.path())
        .arg("shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qpq shell");
    let mut stdin = shell.stdin.take().expect("piped stdin");
    let mut shell_out = Lines::of(shell.stdout.take().expect("piped stdout"));
    // Its answer means the shell runs, and so knows where it starts reading.
    writeln!(stdin, "whoami").unwrap();
    stdin.flush().unwrap();
    assert_eq!(shell_out.next_line().as_deref(), Some(bob.key.as_str()));
    let (f, mut f_out) = follower(&bob);

    for i in 1..=6 {
        alice.ok(&["send", "bob", &format!("m{i}")]);
    }
    let mut from_shell = Vec::new();
    while from_shell.len() < 6 {
        let line = untimed(&shell_out.next_line().expect("a line"));
        if line.starts_with("alice: ") {
            from_shell.push(line);
        }
    }
    let from_follower: Vec<String> = (0..6).map(|_| untimed(&f_out.next_line().expect("a line"))).collect();
    let want: Vec<String> = (1..=6).map(|i| format!("alice: m{i}")).collect();
    assert_eq!(from_shell, want);
    assert_eq!(from_follower, want);
    stop(f);
    drop(stdin);
    stop(shell);
}

/// Found by exploratory testing: during a burst, a shell of bob's home read hundreds of
/// messages ahead of a `recv --follow` of the same home that was still printing, and the
/// follower lost what the inbox no longer kept of the read ones ("N earlier messages not shown
/// here"). A follower now keeps its place in the home. Here nobody reads the follower's output
/// until the burst is over, so it stalls printing once the pipe is full, while a one-shot
/// `recv` reads more than the inbox keeps of read entries past it; drained, it prints every one.
#[test]
fn a_follower_stalled_by_its_pipe_through_a_burst_another_reader_read_prints_every_message() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let mut f = bob.spawn(&["recv", "--follow"]);
    let mut err = Lines::of(f.stderr.take().expect("piped stderr"));
    assert_eq!(err.next_line().as_deref(), Some(FOLLOWING));
    let stdout = f.stdout.take().expect("piped stdout");

    // About 1 KiB a line: the pipe (64 KiB) holds a few dozen.
    let pad = "x".repeat(1000);
    let n = qpq::limits::MAX_INBOX_READ_KEPT + 100;
    let script: String = (1..=n).map(|i| format!("@bob m{i} {pad}\n")).collect();
    // A script's shell sends for a bounded time at its end and leaves the rest queued (75);
    // alice's next command sends it.
    let r = common::qpq_in(alice.home.path(), &["shell"], Some(&script));
    assert!(r.ok || r.code == Some(75), "{}", r.stderr);
    alice.ok(&["recv"]);
    let want: Vec<String> = (1..=n).map(|i| format!("alice: m{i} {pad}")).collect();
    // The one-shot reader shows what the follower had not read before it stalled.
    let shown = bob.recv();
    assert!(shown.len() > qpq::limits::MAX_INBOX_READ_KEPT, "{} shown by recv", shown.len());
    assert!(want.ends_with(&shown));

    let mut f_out = Lines::of(stdout);
    let got: Vec<String> = (0..n).map(|_| untimed(&f_out.next_line().expect("a line"))).collect();
    assert_eq!(got, want);
    stop(f);
    drop(err);
}
