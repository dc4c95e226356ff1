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
/// here"). A follower now keeps its place in the home. Here nobody reads the follower's output:
/// it stalls writing to the full pipe (seen in /proc), then more than the inbox keeps of read
/// entries arrives and a one-shot `recv` reads them all past it; drained, it prints every one.
/// (Its clock runs an hour ahead, so however slow the machine, its place cannot lapse here.)
#[test]
fn a_follower_stalled_by_its_pipe_through_a_burst_another_reader_read_prints_every_message() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    let mut f = common::qpq_command(bob.home.path())
        .args(["recv", "--follow"])
        .env("QPQ_TEST_CLOCK_OFFSET_SECS", "3600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recv --follow");
    let mut err = Lines::of(f.stderr.take().expect("piped stderr"));
    assert_eq!(err.next_line().as_deref(), Some(FOLLOWING));
    let stdout = f.stdout.take().expect("piped stdout");

    // 70 lines of 1 KiB fill the pipe (64 KiB): the follower stalls in a write.
    let pad = "x".repeat(1000);
    let first: Vec<String> = (1..=70).map(|i| format!("a{i} {pad}")).collect();
    let send_all = |texts: &[String]| {
        let script: String = texts.iter().map(|t| format!("@bob {t}\n")).collect();
        // A script's shell sends for a bounded time at its end and leaves the rest queued
        // (75); alice's next command sends it.
        let r = common::qpq_in(alice.home.path(), &["shell"], Some(&script));
        assert!(r.ok || r.code == Some(75), "{}", r.stderr);
        alice.ok(&["recv"]);
    };
    send_all(&first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !writing_to_a_full_pipe(f.id()) && !pipe_full(&stdout, 1024 + 16) {
        assert!(std::time::Instant::now() < deadline, "the follower never stalled on its pipe");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let burst: Vec<String> = (1..=qpq::limits::MAX_INBOX_READ_KEPT + 40).map(|i| format!("b{i}")).collect();
    send_all(&burst);
    let want: Vec<String> = burst.iter().map(|t| format!("alice: {t}")).collect();
    // (with the last few of the first lines, if they came after the follower's last read)
    let shown = bob.recv();
    assert!(
        shown.ends_with(&want),
        "the one-shot reader shows the burst, past the stalled follower: {shown:?}"
    );

    let mut f_out = Lines::of(stdout);
    let got: Vec<String> =
        (0..first.len() + burst.len()).map(|_| untimed(&f_out.next_line().expect("a line"))).collect();
    let all: Vec<String> = first.iter().chain(&burst).map(|t| format!("alice: {t}")).collect();
    assert_eq!(got, all);
    stop(f);
    drop(err);
}

/// True when the pipe behind `reader` has less than `room` bytes free, so a writer of a line
/// that long waits (`FIONREAD` against `F_GETPIPE_SZ`, pipe(7)): the same as a writer seen in
/// `pipe_write`, on kernels that hide `wchan`.
#[allow(unsafe_code)]
fn pipe_full(reader: &std::process::ChildStdout, room: usize) -> bool {
    use std::os::fd::AsRawFd;
    let fd = reader.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: `fd` is an open pipe for the life of `reader`; FIONREAD writes one c_int, and
    // F_GETPIPE_SZ takes no argument.
    let (r, size) =
        unsafe { (libc::ioctl(fd, libc::FIONREAD, &mut queued), libc::fcntl(fd, libc::F_GETPIPE_SZ)) };
    r == 0 && size > 0 && (size as usize).saturating_sub(queued as usize) < room
}

/// True when a thread of process `pid` sleeps in a pipe write (Linux: its `wchan`).
fn writing_to_a_full_pipe(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write")))
}
