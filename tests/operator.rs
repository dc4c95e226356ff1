//! Issue 10, items 8–11 through the real binary: the server from the operator's side, the pinned
//! server, passphrase prompts (on a pseudo-terminal) and contact checks.

mod common;

use std::process::{Command, Stdio};

use common::{Lines, ServerProcess, User, qpq_command, qpq_in};

const QPQ: &str = env!("CARGO_BIN_EXE_qpq");

/// A child process killed when the test ends, even by a failed assertion.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qpq serve` with stdout and stderr on one pipe (a shell's `2>&1`), so lines keep their order.
fn serve_merged(data_dir: &std::path::Path, listen: &str) -> (Reaped, Lines) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" serve --listen \"$1\" --data-dir \"$2\" 2>&1")
        .arg(QPQ)
        .arg(listen)
        .arg(data_dir)
        .env_remove("QPQ_CONFIG")
        .env("QPQ_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qpq serve");
    let lines = Lines::of(child.stdout.take().expect("piped stdout"));
    (Reaped(child), lines)
}

/// `qpq serve` on 127.0.0.1:0 logging at info, with stdout and stderr piped apart.
fn serve_piped(data_dir: &std::path::Path) -> std::process::Child {
    Command::new(QPQ)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("QPQ_CONFIG")
        .env("QPQ_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qpq serve")
}

fn terminate(child: &mut Reaped) {
    Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill -TERM");
}

// ----- item 8: the server from the operator's side -----

/// Found by exploratory testing: once the reader of its log went away (`serve 2>&1 | tee` and
/// tee killed), the log writer's failure panicked the task that handles SIGTERM, so the server
/// could be stopped only by SIGKILL. A log line that cannot be written is now dropped.
#[test]
fn serve_stops_on_sigterm_after_its_log_pipe_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_piped(dir.path());
    let mut lines = Lines::of(child.stdout.take().expect("piped stdout"));
    while !lines.next_line().expect("the ready lines").starts_with("listening on ") {}
    drop(child.stderr.take());
    let mut child = Reaped(child);
    terminate(&mut child);
    let pid = child.0.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.0.wait();
        let _ = tx.send(status.map(|s| s.success()));
        child
    });
    let exited = rx.recv_timeout(std::time::Duration::from_secs(60));
    if exited.is_err() {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    drop(waiter.join());
    assert!(matches!(exited, Ok(Ok(true))), "serve did not stop cleanly on SIGTERM: {exited:?}");
}

#[test]
fn health_without_a_home_shows_fingerprint_version_uptime_and_key_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let nohome = tempfile::tempdir().unwrap();
    let addr = server.addr.to_string();
    let r = qpq_in(nohome.path(), &["health", "--server", &addr], None);
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].starts_with("ok version 0.1.0 uptime "), "{lines:?}");
    assert!(lines.contains(&format!("certificate fingerprint {}", server.fingerprint).as_str()), "{lines:?}");
    assert!(lines.contains(&"protocol qpq/2"), "{lines:?}");
    assert!(lines.contains(&"tls 1.3 key exchange X25519MLKEM768"), "{lines:?}");
    // An operator's check leaves nothing behind: no identity, no pin.
    assert_eq!(std::fs::read_dir(nohome.path()).unwrap().count(), 0);
    // A given fingerprint is checked.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let r = qpq_in(nohome.path(), &["health", "--server", &addr, "--server-fingerprint", &wrong], None);
    // Nothing was pinned, so nothing "changed": the one given is not the server's.
    let mismatch = format!(
        "the server's certificate is not the one given: --server-fingerprint {wrong}, the server presented {}",
        server.fingerprint
    );
    assert!(!r.ok && r.stderr.contains(&mismatch), "{}", r.stderr);
    let r = qpq_in(
        nohome.path(),
        &["init", "--name", "x", "--no-passphrase", "--server", &addr, "--server-fingerprint", &wrong],
        None,
    );
    assert!(!r.ok && r.stderr.contains(&format!("{mismatch}; nothing was created")), "{}", r.stderr);
    assert_eq!(std::fs::read_dir(nohome.path()).unwrap().count(), 0, "nothing was created");
    // An address without a port says so, rather than "cannot resolve".
    for no_port in ["127.0.0.1", "::1", "localhost"] {
        let r = qpq_in(nohome.path(), &["health", "--server", no_port], None);
        let want = format!("server address {no_port:?} has no port: write it as HOST:PORT");
        assert!(!r.ok && r.stderr.contains(&want), "{}", r.stderr);
    }
    // Without a home there is nothing to remember a server: it must be given.
    let r = qpq_in(nohome.path(), &["health"], None);
    assert!(!r.ok && r.stderr.contains("no server: pass --server"), "{}", r.stderr);
}

#[test]
fn health_with_a_home_also_shows_the_key_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let out = alice.ok(&["health"]);
    assert!(out.starts_with("ok version"), "{out}");
    assert!(out.contains("tls 1.3 key exchange X25519MLKEM768"), "{out}");
    assert!(out.contains("key packages: "), "{out}");
}

#[test]
fn serve_resolves_a_host_name_and_its_ready_line_is_the_last_line_of_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = serve_merged(dir.path(), "localhost:0");
    let mut seen = Vec::new();
    let addr = loop {
        let line = lines.next_line().expect("serve prints its ready line");
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.parse::<std::net::SocketAddr>().expect("socket address");
        }
        seen.push(line);
    };
    assert!(addr.ip().is_loopback(), "{addr}");
    assert!(
        seen.iter().any(|l| l.contains("serving") && l.contains("key_exchange=X25519MLKEM768")),
        "{seen:?}"
    );
    // Nothing is printed after the ready line until something happens: the next line is the
    // reaction to SIGTERM.
    terminate(&mut child);
    let next = lines.next_line().expect("a line after SIGTERM");
    assert!(next.contains("shutdown requested"), "{next:?} came after the ready line");
    assert!(child.0.wait().unwrap().success());
    // No colour codes in logs that do not go to a terminal.
    let all = seen.join("\n") + &next;
    assert!(!all.contains('\x1b'), "{all:?}");
}

#[test]
fn serve_refuses_a_host_name_that_does_not_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(QPQ)
        .args(["serve", "--listen", "no-such-host.invalid:7000", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot resolve listen address \"no-such-host.invalid:7000\""), "{err}");
}

#[test]
fn a_second_serve_on_a_data_dir_in_use_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ServerProcess::start(dir.path());
    let out = Command::new(QPQ)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("QPQ_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "qpq: data dir {} is in use by another qpq serve (one that is shutting down holds it until it exits)",
        dir.path().display()
    );
    assert!(err.lines().any(|l| l == want), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "no ready line");
}

#[test]
fn serve_help_lists_only_server_options_and_refuses_client_ones() {
    let out = Command::new(QPQ).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--listen") && help.contains("--data-dir"), "{help}");
    for client_only in ["--home", "--server ", "--server-fingerprint", "QPQ_HOME", "QPQ_SERVER"] {
        assert!(!help.contains(client_only), "{client_only} in serve --help:\n{help}");
    }
    let send = Command::new(QPQ).args(["send", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&send.stdout).contains("--home"), "client verbs keep them");
    let out = Command::new(QPQ).args(["serve", "--home", "/tmp/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("this is a client option"));
}

// ----- item 11: contacts -----

#[test]
fn contact_add_refuses_your_own_key_the_all_zero_key_and_a_key_named_twice() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let (alice, bob) = (User::init(&server, "alice"), User::init(&server, "bob"));
    let err = alice.fails(&["contact", "add", "myself", &alice.key]);
    assert!(err.contains("that is your own key: contacts are other people"), "{err}");
    let zero = "0".repeat(64);
    let err = alice.fails(&["contact", "add", "nobody", &zero]);
    assert!(err.contains("is not anyone's identity key"), "{err}");
    alice.ok(&["contact", "add", "bob", &bob.key]);
    let err = alice.fails(&["contact", "add", "robert", &bob.key]);
    assert!(err.contains("that key is already your contact \"bob\""), "{err}");
    assert_eq!(alice.ok(&["contact", "list"]), format!("bob {}\n", bob.key));
}

#[test]
fn an_empty_contact_list_prints_nothing_for_scripts_and_words_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    assert_eq!(alice.ok(&["contact", "list"]), "");
    assert_eq!(alice.ok(&["contact", "list", "--json"]), "");
    let mut cmd = qpq_command(alice.home.path());
    cmd.args(["contact", "list"]);
    let mut p = rexpect::session::spawn_with_options(cmd, pty_options()).expect("spawn on a pty");
    p.exp_string("no contacts yet").unwrap();
    p.exp_eof().unwrap();
    let bob = User::init(&server, "bob");
    alice.ok(&["contact", "add", "bob", &bob.key]);
    let json = alice.ok(&["contact", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one json object");
    assert_eq!(v["name"], "bob");
    assert_eq!(v["key"], bob.key.as_str());
}

fn pty_options() -> rexpect::reader::Options {
    rexpect::reader::Options::new().timeout_ms(Some(60_000)).strip_ansi_escape_codes(true)
}

// ----- item 9: the pinned server -----

#[test]
fn server_show_pin_and_forget_manage_the_pin_explicitly() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let (addr, fp) = (server.addr.to_string(), server.fingerprint.to_string());
    assert_eq!(alice.ok(&["server", "show"]), format!("server {addr}\npinned {fp}\n"));
    // A flag never re-pins silently.
    let other = format!("sha256:{}", "cd".repeat(32));
    let err = alice.fails(&["--server-fingerprint", &other, "health"]);
    assert!(err.contains(&format!("re-pin with `qpq server pin {other}`")), "{err}");
    assert!(alice.ok(&["server", "show"]).contains(&fp), "the pin stayed");
    // The same fingerprint as the pin is fine.
    alice.ok(&["--server-fingerprint", &fp, "health"]);
    // Without a fingerprint and without a terminal, pin names what the server presents.
    let err = alice.fails(&["server", "pin"]);
    assert!(err.contains(&format!("the server presents {fp}")), "{err}");
    // An explicit re-pin to a wrong certificate makes connections fail loudly...
    assert_eq!(alice.ok(&["server", "pin", &other]), format!("pinned {addr} {other} (was {fp})\n"));
    let err = alice.fails(&["health"]);
    assert!(err.contains("server certificate changed"), "{err}");
    // ...until it is forgotten: not on a terminal, the next connection trusts on first use.
    assert_eq!(alice.ok(&["server", "forget"]), format!("forgot the certificate pinned for {addr}\n"));
    assert!(alice.ok(&["server", "show"]).contains("pinned nothing"));
    let r = alice.run(&["health"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("pinned certificate of {addr}: {fp}")), "{}", r.stderr);
    assert!(alice.ok(&["server", "show"]).contains(&format!("pinned {fp}")));
    alice.ok(&["server", "forget"]);
    let err = alice.fails(&["server", "forget"]);
    assert!(err.contains("nothing pinned"), "{err}");
}

/// `qpq ARGS` for a fresh home on a pseudo-terminal (QPQ_PASSPHRASE set, so only the server
/// question is asked).
fn pty_init(home: &std::path::Path, addr: &str) -> rexpect::session::PtySession {
    let mut cmd = qpq_command(home);
    cmd.args(["init", "--server", addr]).env("QPQ_PASSPHRASE", "correct horse");
    rexpect::session::spawn_with_options(cmd, pty_options()).expect("spawn on a pty")
}

#[test]
fn first_use_on_a_terminal_asks_before_pinning_and_no_means_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let (addr, fp) = (server.addr.to_string(), server.fingerprint.to_string());
    let home = tempfile::tempdir().unwrap();
    let mut p = pty_init(home.path(), &addr);
    p.exp_string(&format!("its certificate fingerprint is {fp}")).unwrap();
    p.exp_string("(yes/no)? ").unwrap();
    p.send_line("no").unwrap();
    p.exp_string("server certificate not trusted").unwrap();
    p.exp_eof().unwrap();
    assert!(!home.path().join("qpq.db").exists(), "nothing created");

    let mut p = pty_init(home.path(), &addr);
    p.exp_string("(yes/no)? ").unwrap();
    // A stray answer asks again instead of counting as a no.
    p.send_line("yse").unwrap();
    p.exp_string("please type yes or no: ").unwrap();
    p.send_line("yes").unwrap();
    p.exp_string("identity created").unwrap();
    p.exp_eof().unwrap();
    let show = qpq_command(home.path())
        .args(["server", "show"])
        .env("QPQ_PASSPHRASE", "correct horse")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains(&format!("pinned {fp}")));
}

// ----- item 10: passphrases -----

/// A fresh home with a passphrase, made without prompts.
fn init_with_passphrase(server: &ServerProcess, passphrase: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let out = qpq_command(home.path())
        .args(["init", "--server", &server.addr.to_string()])
        .env("QPQ_PASSPHRASE", passphrase)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    home
}

#[test]
fn init_on_a_terminal_asks_again_after_a_mismatched_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = tempfile::tempdir().unwrap();
    let mut cmd = qpq_command(home.path());
    let fp = server.fingerprint.to_string();
    cmd.args(["init", "--server", &server.addr.to_string(), "--server-fingerprint", &fp]);
    let mut p = rexpect::session::spawn_with_options(cmd, pty_options()).expect("spawn on a pty");
    p.exp_string(&format!("new qpq passphrase for {}: ", home.path().display())).unwrap();
    // An empty one asks again instead of ending init.
    p.send_line("").unwrap();
    p.exp_string("an empty passphrase protects nothing: type one (or pass --no-passphrase)").unwrap();
    p.exp_string(&format!("new qpq passphrase for {}: ", home.path().display())).unwrap();
    p.send_line("first try").unwrap();
    p.exp_string("repeat passphrase: ").unwrap();
    p.send_line("first tyr").unwrap();
    p.exp_string("passphrases do not match, try again").unwrap();
    p.exp_string("new qpq passphrase for ").unwrap();
    p.send_line("second try").unwrap();
    p.exp_string("repeat passphrase: ").unwrap();
    p.send_line("second try").unwrap();
    p.exp_string("identity created").unwrap();
    p.exp_eof().unwrap();
    // The second passphrase is the one that opens the home.
    let out = qpq_command(home.path()).arg("whoami").env("QPQ_PASSPHRASE", "second try").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn passphrase_on_a_terminal_asks_for_the_current_one_then_twice_for_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = init_with_passphrase(&server, "old one");
    let mut cmd = qpq_command(home.path());
    cmd.arg("passphrase");
    let mut p = rexpect::session::spawn_with_options(cmd, pty_options()).expect("spawn on a pty");
    p.exp_string(&format!("qpq passphrase for {}: ", home.path().display())).unwrap();
    p.send_line("old one").unwrap();
    p.exp_string(&format!("new qpq passphrase for {}: ", home.path().display())).unwrap();
    p.send_line("new one").unwrap();
    p.exp_string("repeat passphrase: ").unwrap();
    p.send_line("new one").unwrap();
    p.exp_string(&format!("passphrase changed for {}", home.path().display())).unwrap();
    p.exp_eof().unwrap();
    let whoami =
        |pass: &str| qpq_command(home.path()).arg("whoami").env("QPQ_PASSPHRASE", pass).output().unwrap();
    assert!(whoami("new one").status.success());
    assert!(!whoami("old one").status.success());
}

#[test]
fn a_wrong_passphrase_gets_three_tries_at_a_prompt_naming_the_home() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = init_with_passphrase(&server, "right one");
    let prompt = format!("qpq passphrase for {}: ", home.path().display());
    let whoami = || {
        let mut cmd = qpq_command(home.path());
        cmd.arg("whoami");
        rexpect::session::spawn_with_options(cmd, pty_options()).expect("spawn on a pty")
    };
    let mut p = whoami();
    for wrong in ["wrong one", "wrong two"] {
        p.exp_string(&prompt).unwrap();
        p.send_line(wrong).unwrap();
        p.exp_string("wrong passphrase, try again").unwrap();
    }
    p.exp_string(&prompt).unwrap();
    p.send_line("right one").unwrap();
    p.exp_string("fingerprint: ").unwrap();
    p.exp_eof().unwrap();

    let mut p = whoami();
    for wrong in ["a", "b", "c"] {
        p.exp_string(&prompt).unwrap();
        p.send_line(wrong).unwrap();
    }
    p.exp_string("qpq: wrong passphrase or corrupted state file").unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn a_passphrase_file_unlocks_the_home_and_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = init_with_passphrase(&server, "from a file");
    let file = dir.path().join("pass");
    std::fs::write(&file, "from a file\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file_s = file.to_str().unwrap();
    let r = qpq_in(home.path(), &["--passphrase-file", file_s, "whoami"], None);
    assert!(r.ok, "{}", r.stderr);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = qpq_in(home.path(), &["whoami", "--passphrase-file", file_s], None);
    assert!(!r.ok && r.stderr.contains("is readable by others (mode 644): chmod 600 it"), "{}", r.stderr);
    // A directory is not taken for a file with a bad mode.
    let r = qpq_in(home.path(), &["whoami", "--passphrase-file", dir.path().to_str().unwrap()], None);
    assert_eq!(r.stderr.trim(), format!("qpq: passphrase file {} is not a file", dir.path().display()));
    // A file that is not there is said in words, without the operating system's errno.
    let missing = dir.path().join("no-such-file");
    let r = qpq_in(home.path(), &["whoami", "--passphrase-file", missing.to_str().unwrap()], None);
    assert_eq!(
        r.stderr.trim(),
        format!("qpq: cannot read {}: no such file or directory", missing.display()),
        "{}",
        r.stderr
    );
    // Without one, a script is told every way to give it.
    let r = qpq_in(home.path(), &["whoami"], None);
    assert!(
        r.stderr.contains("set QPQ_PASSPHRASE, pass --passphrase-file or run on a terminal"),
        "{}",
        r.stderr
    );
}

// ----- item 12: dynamic completion -----

/// What qpq offers for the last word of `line` (the fish protocol: one candidate per line).
fn complete(home: &std::path::Path, line: &[&str], passphrase: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(QPQ);
    cmd.arg("--").args(line).env("COMPLETE", "fish").env("QPQ_HOME", home).env_remove("QPQ_PASSPHRASE");
    if let Some(p) = passphrase {
        cmd.env("QPQ_PASSPHRASE", p);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn completion_offers_contacts_and_groups_from_the_home_without_prompting() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let (alice, bob) = (User::init(&server, "alice"), User::init(&server, "bob"));
    alice.add_contact(&bob);
    alice.ok(&["group", "create", "team"]);
    let home = alice.home.path();
    assert_eq!(complete(home, &["qpq", "send", "b"], None), vec!["bob"]);
    assert_eq!(complete(home, &["qpq", "send", "#"], None), vec!["#team"]);
    assert_eq!(complete(home, &["qpq", "group", "add", "t"], None), vec!["team"]);
    assert_eq!(complete(home, &["qpq", "group", "add", "team", "b"], None), vec!["bob"]);

    // An encrypted home: names only with QPQ_PASSPHRASE, never a prompt (stdin is closed, and a
    // prompt on the terminal would hang this test).
    let secret = init_with_passphrase(&server, "pw");
    qpq_command(secret.path())
        .args(["contact", "add", "bob", &bob.key])
        .env("QPQ_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(complete(secret.path(), &["qpq", "send", "b"], None).is_empty());
    assert_eq!(complete(secret.path(), &["qpq", "send", "b"], Some("pw")), vec!["bob"]);
}

#[test]
fn bash_completes_a_contact_name_through_the_registered_script() {
    if Command::new("bash").arg("--version").output().is_err() {
        eprintln!("no bash here: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let (alice, bob) = (User::init(&server, "alice"), User::init(&server, "bob"));
    alice.add_contact(&bob);
    let bin_dir = std::path::Path::new(QPQ).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg("-c")
        .arg(
            "source <(qpq completions bash) && COMP_WORDS=(qpq send b) && COMP_CWORD=2 && \
             _clap_complete_qpq qpq b qpq && printf '%s\\n' \"${COMPREPLY[@]}\"",
        )
        .env("PATH", path)
        .env("QPQ_HOME", alice.home.path())
        .env_remove("QPQ_PASSPHRASE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(got.lines().any(|l| l.trim() == "bob"), "{got:?} {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_keeps_serving_and_stops_on_sigterm_when_its_stdout_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_piped(dir.path());
    // Nobody reads stdout: its start-up lines meet a closed pipe (as under `| head -1`).
    drop(child.stdout.take());
    let mut log = Lines::of(child.stderr.take().expect("piped stderr"));
    let mut child = Reaped(child);
    let addr = loop {
        let line = log.next_line().expect("serve logs its address");
        if let Some(rest) = line.split("serving addr=").nth(1) {
            break rest.split(' ').next().unwrap().to_string();
        }
    };
    let nohome = tempfile::tempdir().unwrap();
    let r = qpq_in(nohome.path(), &["health", "--server", &addr], None);
    assert!(r.ok, "{}", r.stderr);
    terminate(&mut child);
    let rest = log.rest();
    assert!(rest.iter().any(|l| l.contains("stopped cleanly")), "{rest:?}");
    assert!(child.0.wait().unwrap().success());
}

/// Found by exploratory testing: a usage error quoted the refused argument raw, so `qpq name
/// $'Mallory\e[31m'` (a missing `set`) turned the terminal red, and a bidi override reordered
/// the line. It is escaped like every other text qpq prints; help still prints as it is.
#[test]
fn a_usage_error_escapes_the_argument_it_quotes() {
    let home = tempfile::tempdir().unwrap();
    for arg in ["Mallory\x1b[31m", "evil\u{202e}txt", "bell\x07"] {
        // As on a colour terminal: clap's stream passes escape sequences through.
        let out = qpq_command(home.path()).args(["name", arg]).env("CLICOLOR_FORCE", "1").output().unwrap();
        let r = common::Run::from(out);
        assert_eq!(r.code, Some(2), "{}", r.stderr);
        assert!(r.stderr.contains("unrecognized subcommand"), "{}", r.stderr);
        let raw = |c: char| (c.is_control() && c != '\n') || c == '\u{202e}';
        assert!(!r.stderr.chars().any(raw), "{:?}", r.stderr);
    }
    let r = qpq_in(home.path(), &["name", "--help"], None);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("Usage: qpq name"), "{}", r.stdout);
}

/// Found by exploratory testing: a data dir that is a file said "cannot create data dir ...:
/// file exists".
#[test]
fn serve_names_a_data_dir_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(QPQ)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .env("QPQ_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("qpq: cannot use data dir {}: not a directory", file.display()));
}
