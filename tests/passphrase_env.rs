//! Issue 9, point 6: `QPQ_PASSPHRASE` stayed in the environment of the running client (and of
//! anything it would start). The binary wipes and removes it before anything else runs.

mod common;

use std::process::Stdio;

use common::{Lines, ServerProcess, User, qpq_command, untimed};

const PASSPHRASE: &str = "correct horse 7f3a battery";

/// The running process's environment as the kernel shows it (`ps e` reads the same file).
fn environ_of(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/environ")).expect("read /proc/<pid>/environ")
}

#[test]
fn a_running_client_no_longer_shows_its_passphrase_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().to_path_buf();
    let with_pass = |args: &[&str]| {
        let mut cmd = qpq_command(&home_path);
        cmd.args(args).env("QPQ_PASSPHRASE", PASSPHRASE);
        cmd
    };
    let out = with_pass(&["init", "--server", &server.addr.to_string(), "--name", "alice"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alice = User {
        home,
        key: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        name: "alice".to_string(),
    };
    let bob = User::init(&server, "bob");
    bob.add_contact(&alice);
    let out = with_pass(&["contact", "add", "bob", &bob.key]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    bob.ok(&["send", "alice", "one"]);

    let mut follow = with_pass(&["recv", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(follow.stdout.take().unwrap());
    // It printed bob's message: it has opened the state with the passphrase and is running.
    assert_eq!(lines.next_line().map(|l| untimed(&l)).as_deref(), Some("bob: one"));
    let environ = environ_of(follow.id());
    let _ = follow.kill();
    let _ = follow.wait();

    let entries: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    assert!(entries.contains(&&b"QPQ_LOG=warn"[..]), "this is the environment block we set up");
    assert!(
        !environ.windows(PASSPHRASE.len()).any(|w| w == PASSPHRASE.as_bytes()),
        "the passphrase is in /proc/<pid>/environ: {:?}",
        entries
            .iter()
            .filter(|e| e.starts_with(b"QPQ_"))
            .map(|e| String::from_utf8_lossy(e))
            .collect::<Vec<_>>()
    );
    // The variable's name stays in the block the kernel made, with its value zeroed.
    for entry in entries.iter().filter(|e| e.starts_with(b"QPQ_PASSPHRASE")) {
        assert_eq!(*entry, b"QPQ_PASSPHRASE=", "{:?}", String::from_utf8_lossy(entry));
    }
}
