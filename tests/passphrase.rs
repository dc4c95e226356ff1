//! `qpq passphrase` through the binary: setting, changing and removing a home's passphrase
//! keeps every record and the conversations going; a process already running on the home goes
//! on after a change, and stops by name after `--new-key`; a crash before the commit leaves the
//! old passphrase and every record. Real `qpq serve` on 127.0.0.1:0, real homes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{Lines, User, cast, qpq_command, untimed};

/// A private file holding `passphrase` (a passphrase file must be mode 0600).
fn pass_file(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{passphrase}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// One private passphrase file per passphrase, in order.
fn pass_files<const N: usize>(dir: &Path, passphrases: [&str; N]) -> [PathBuf; N] {
    let mut i = 0;
    passphrases.map(|p| {
        i += 1;
        pass_file(dir, &format!("pass-{i}"), p)
    })
}

/// `u`'s command with `--passphrase-file file` (None: none given).
fn with(file: Option<&Path>, args: &[&str]) -> Vec<String> {
    let mut all = Vec::new();
    if let Some(f) = file {
        all.extend(["--passphrase-file".to_string(), f.to_str().unwrap().to_string()]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

fn run(u: &User, file: Option<&Path>, args: &[&str]) -> common::Run {
    let all = with(file, args);
    u.run(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn ok(u: &User, file: Option<&Path>, args: &[&str]) -> common::Run {
    let r = run(u, file, args);
    assert!(r.ok, "{:?} failed: {}", args, r.stderr);
    r
}

#[test]
fn a_passphrase_is_set_changed_and_removed_and_the_home_keeps_everything() {
    let (dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    let [one, two, wrong] = pass_files(dir.path(), ["first one", "second one", "not it"]);
    alice.ok(&["send", "bob", "before any passphrase"]);
    assert_eq!(bob.recv(), ["alice: before any passphrase"]);
    let home = alice.home.path().display().to_string();

    // Set on a home made with --no-passphrase: every record is re-sealed too, since any copy
    // of the home from before holds the keys it had.
    let r = ok(&alice, None, &["passphrase", "--new-passphrase-file", one.to_str().unwrap()]);
    let said: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(said[0], format!("qpq: passphrase set for {home}"), "{}", r.stderr);
    assert!(
        said[1].contains("records re-sealed under a new key (any copy of the home from while"),
        "{said:?}"
    );
    assert_eq!(said.len(), 2, "{said:?}");
    let err = alice.fails(&["whoami"]);
    assert!(err.contains("is encrypted with a passphrase"), "{err}");
    assert!(ok(&alice, Some(&one), &["whoami"]).stdout.starts_with(&alice.key));

    // A new passphrase file that will not do is refused before the current one is asked for.
    let loose = pass_file(dir.path(), "loose", "loose one");
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let r = run(&alice, None, &["passphrase", "--new-passphrase-file", loose.to_str().unwrap()]);
    assert!(!r.ok && r.stderr.contains("is readable by others (mode 644)"), "{}", r.stderr);

    // Changed: the current one is asked for first, and a wrong one changes nothing.
    let r = run(&alice, Some(&wrong), &["passphrase", "--new-passphrase-file", two.to_str().unwrap()]);
    assert_eq!(r.stderr.trim(), "qpq: wrong passphrase or corrupted state file", "{}", r.stderr);
    assert!(!r.ok);
    let r = ok(&alice, Some(&one), &["passphrase", "--new-passphrase-file", two.to_str().unwrap()]);
    // Only the passphrase changes: nothing is re-sealed.
    assert_eq!(r.stderr.trim(), format!("qpq: passphrase changed for {home}"), "{}", r.stderr);
    let r = run(&alice, Some(&one), &["whoami"]);
    assert!(!r.ok && r.stderr.contains("wrong passphrase"), "the old one no longer opens it: {}", r.stderr);

    // The conversation goes on under the new one, both ways, and the history is all there.
    ok(&alice, Some(&two), &["send", "bob", "after the change"]);
    assert_eq!(bob.recv(), ["alice: after the change"]);
    bob.ok(&["send", "alice", "and back"]);
    assert_eq!(untimed(&ok(&alice, Some(&two), &["recv"]).stdout).trim(), "bob: and back");
    let history = untimed(&ok(&alice, Some(&two), &["history", "bob"]).stdout);
    for text in ["before any passphrase", "after the change", "and back"] {
        assert!(history.contains(text), "{text:?} kept: {history}");
    }

    // Removed: nothing is asked any more; removing again changes nothing and says so.
    let r = ok(&alice, Some(&two), &["passphrase", "--remove"]);
    assert!(r.stderr.contains("passphrase removed"), "{}", r.stderr);
    assert!(alice.ok(&["whoami"]).starts_with(&alice.key));
    let r = ok(&alice, None, &["passphrase", "--remove"]);
    assert_eq!(r.stderr.trim(), format!("qpq: {home} has no passphrase; nothing changed"));
    // Without a terminal or a file there is no new passphrase to take.
    let r = run(&alice, None, &["passphrase"]);
    assert!(
        !r.ok && r.stderr.contains("pass --new-passphrase-file FILE, run on a terminal, or pass --remove"),
        "{}",
        r.stderr
    );
    assert_eq!(untimed(&alice.ok(&["history", "bob", "-n", "1"])).trim(), "bob: and back");
}

/// `recv --follow` on `u`'s home with `file`: its stderr and stdout lines, once it follows.
fn follower(u: &User, file: &Path) -> (std::process::Child, Lines, Lines) {
    let mut child =
        u.spawn(&with(Some(file), &["recv", "--follow"]).iter().map(String::as_str).collect::<Vec<_>>());
    let mut err = Lines::of(child.stderr.take().unwrap());
    assert_eq!(err.next_line().as_deref(), Some("qpq: following new messages (Ctrl-C to stop)"));
    let out = Lines::of(child.stdout.take().unwrap());
    (child, err, out)
}

/// Fails without the record check (a follower holding the old record key after `--new-key`
/// reads every record as damaged) and without that error among those that stop a follower (it
/// retries for ever).
#[test]
fn a_running_follower_outlives_a_change_and_stops_by_name_after_a_new_key() {
    let (dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    let [one, two, three] = pass_files(dir.path(), ["first one", "second one", "third one"]);
    alice.ok(&["send", "bob", "opening"]);
    assert_eq!(bob.recv(), ["alice: opening"]);
    ok(&alice, None, &["passphrase", "--new-passphrase-file", one.to_str().unwrap()]);
    let (mut child, mut err, mut out) = follower(&alice, &one);
    // A shell (a script that has not ended) on the same home.
    let mut shell = qpq_command(alice.home.path())
        .args(with(Some(&one), &["shell"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut shell_in = shell.stdin.take().unwrap();
    let mut shell_out = Lines::of(shell.stdout.take().unwrap());
    let mut shell_err = Lines::of(shell.stderr.take().unwrap());
    writeln!(shell_in, "whoami").unwrap();
    shell_in.flush().unwrap();
    assert_eq!(shell_out.next_line().as_deref(), Some(alice.key.as_str()), "the shell runs");

    ok(&alice, Some(&one), &["passphrase", "--new-passphrase-file", two.to_str().unwrap()]);
    bob.ok(&["send", "alice", "while it follows"]);
    assert_eq!(untimed(&out.next_line().unwrap()).trim(), "bob: while it follows", "it goes on");
    let line = std::iter::from_fn(|| shell_out.next_line()).find(|l| l.contains("while it follows"));
    assert!(line.is_some(), "the shell goes on too");

    let r = ok(
        &alice,
        Some(&two),
        &["passphrase", "--new-key", "--new-passphrase-file", three.to_str().unwrap()],
    );
    assert!(r.stderr.contains("records re-sealed under a new key"), "{}", r.stderr);
    bob.ok(&["send", "alice", "after the new key"]);
    let said = err.next_line().unwrap();
    assert!(said.contains("is sealed under another key since this command opened it"), "{said}");
    assert!(said.contains("start the command again") && !said.contains("retrying"), "{said}");
    assert_eq!(err.next_line(), None, "it stops: no retry can open the home");
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert_eq!(out.rest(), Vec::<String>::new(), "it printed nothing it could not save");
    // The shell ends too, saying why, instead of "reconnecting in the background" for ever.
    // (Whichever of its steps meets the new key first may say so too: reading the inbox.)
    let mut said = Vec::new();
    while let Some(line) = shell_err.next_line() {
        assert!(!line.contains("reconnecting"), "{line}");
        said.push(line);
        assert!(said.len() <= 2, "{said:?}");
    }
    assert_eq!(
        said.last().map(String::as_str),
        Some(
            "error: this shell's home was re-sealed under another key since it started (`qpq passphrase`): \
             start qpq shell again"
        ),
        "{said:?}"
    );
    assert_eq!(shell.wait().unwrap().code(), Some(1));
    drop(shell_in);

    // Nothing was lost: the message waited on the server for the next reader.
    assert_eq!(untimed(&ok(&alice, Some(&three), &["recv"]).stdout).trim(), "bob: after the new key");
    let history = untimed(&ok(&alice, Some(&three), &["history", "bob"]).stdout);
    assert!(history.contains("while it follows") && history.contains("after the new key"), "{history}");
}

/// The re-sealed copy replaces the file in one rename: a crash before it leaves the old file,
/// whole, and the copy is removed by the next open.
#[test]
fn a_crash_before_the_new_key_commits_leaves_the_old_passphrase_and_every_record() {
    let (dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    let [one, two] = pass_files(dir.path(), ["first one", "second one"]);
    ok(&alice, None, &["passphrase", "--new-passphrase-file", one.to_str().unwrap()]);
    for i in 0..3 {
        bob.ok(&["send", "alice", &format!("message {i}")]);
    }
    let messages = |text: &str| text.lines().filter(|l| l.starts_with("bob: message")).count();
    assert_eq!(messages(&untimed(&ok(&alice, Some(&one), &["recv"]).stdout)), 3);
    let out = qpq_command(alice.home.path())
        .args(with(Some(&one), &["passphrase", "--new-key", "--new-passphrase-file", two.to_str().unwrap()]))
        .env("QPQ_FAILPOINT", "clientdb-change-key-before-publish")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(qpq::failpoint::FAILPOINT_EXIT_CODE), "stopped at the point");
    assert!(alice.home.path().join("qpq.db.partial").exists(), "the crash left the copy aside");
    assert!(!run(&alice, Some(&two), &["whoami"]).ok, "the new passphrase was never put in place");
    assert!(!alice.home.path().join("qpq.db.partial").exists(), "the next open removes it");
    let history = untimed(&ok(&alice, Some(&one), &["history", "bob"]).stdout);
    assert_eq!(messages(&history), 3, "{history}");
    // And the change goes through when run again.
    ok(&alice, Some(&one), &["passphrase", "--new-key", "--new-passphrase-file", two.to_str().unwrap()]);
    let history = untimed(&ok(&alice, Some(&two), &["history", "bob"]).stdout);
    assert_eq!(messages(&history), 3, "{history}");
    ok(&alice, Some(&two), &["send", "bob", "still talking"]);
    assert_eq!(bob.recv(), ["alice: still talking"]);
}

/// A one-shot `send` whose home is re-sealed between queueing its message and sending it says
/// that the message waits for the next command (exit 75), and the next command sends it once.
/// It said "start the command again" (exit 1), and doing that sent the message twice.
#[test]
fn a_send_that_meets_a_new_key_leaves_its_message_for_the_next_command() {
    let (dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    let [one, two] = pass_files(dir.path(), ["first one", "second one"]);
    ok(&alice, None, &["passphrase", "--new-passphrase-file", one.to_str().unwrap()]);
    ok(&alice, Some(&one), &["send", "bob", "hello"]);
    assert_eq!(bob.recv(), ["alice: hello"]);

    // Queued, and held.
    let (mut send, mut err) = common::paused_at(
        alice.home.path(),
        &with(Some(&one), &["send", "bob", "across the re-seal"]),
        "send-queued",
    );
    ok(&alice, Some(&one), &["passphrase", "--new-key", "--new-passphrase-file", two.to_str().unwrap()]);
    common::resume(&mut send);
    let said: Vec<String> = std::iter::from_fn(|| err.next_line()).collect();
    assert_eq!(send.wait().unwrap().code(), Some(75), "{said:?}");
    assert_eq!(
        said,
        ["qpq: queued; the next qpq command sends it (`qpq passphrase --new-key` re-sealed the home \
             while this one ran, and it cannot open the home again)"]
    );
    assert!(bob.recv().is_empty(), "not sent by the command that queued it");

    let r = ok(&alice, Some(&two), &["recv"]);
    assert!(r.stderr.contains("sent a queued message to bob"), "{}", r.stderr);
    assert_eq!(bob.recv(), ["alice: across the re-seal"], "sent once");
}

/// A new passphrase of spaces alone is refused; the current one again changes nothing and says
/// so; an empty QPQ_PASSPHRASE is named (it read as a wrong passphrase); and a passphrase is
/// the same whichever Unicode form it is typed in.
#[test]
fn spaces_the_same_passphrase_an_empty_variable_and_unicode_forms_are_named() {
    let (dir, server, [alice]) = cast(["alice"]);
    let [spaces, one, composed, decomposed] =
        pass_files(dir.path(), ["   ", "first one", "caf\u{e9} cr\u{e8}me", "cafe\u{301} cre\u{300}me"]);
    let home = alice.home.path().display().to_string();
    let path = |p: &Path| p.to_str().unwrap().to_string();

    let r = run(&alice, None, &["passphrase", "--new-passphrase-file", &path(&spaces)]);
    assert!(!r.ok);
    assert_eq!(
        r.stderr.trim(),
        "qpq: a passphrase of spaces alone protects next to nothing: choose another (or pass --remove); nothing changed"
    );
    let fresh = tempfile::tempdir().unwrap();
    let out = qpq_command(fresh.path())
        .args(["init", "--server", &server.addr.to_string()])
        .env("QPQ_PASSPHRASE", "   ")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("spaces alone protects next to nothing: choose another or pass --no-passphrase"),
        "{err}"
    );

    ok(&alice, None, &["passphrase", "--new-passphrase-file", &path(&one)]);
    let r = ok(&alice, Some(&one), &["passphrase", "--new-passphrase-file", &path(&one)]);
    assert_eq!(r.stderr.trim(), format!("qpq: that is the passphrase of {home} already; nothing changed"));
    let out = qpq_command(alice.home.path()).arg("whoami").env("QPQ_PASSPHRASE", "").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.starts_with(&format!("qpq: QPQ_PASSPHRASE is set but empty: set it to the passphrase of {home}")),
        "{err}"
    );

    // Set composed, opened decomposed; the same again in the other form changes nothing.
    ok(&alice, Some(&one), &["passphrase", "--new-passphrase-file", &path(&composed)]);
    assert!(ok(&alice, Some(&decomposed), &["whoami"]).stdout.starts_with(&alice.key));
    let r = ok(&alice, Some(&decomposed), &["passphrase", "--new-passphrase-file", &path(&composed)]);
    assert!(r.stderr.contains("already; nothing changed"), "{}", r.stderr);
}
