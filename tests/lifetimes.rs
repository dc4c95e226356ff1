//! KeyPackage lifetimes end to end (issue 9, point 1): the real `qpq serve` binary and real
//! clients, with time moved through `QPQ_TEST_CLOCK_OFFSET_SECS` (each process reads its own
//! offset at start). A year passing while the server runs is a server stopped at one offset
//! and started again at another on the same data dir. To the server that is a step made while
//! it was stopped: once a sweep has recorded a deletion mark, a restart takes in at most a day
//! of it at once (`qpq::clock::DeletionClock::resuming`). These tests pass because none of
//! their servers runs long enough for a sweep (its first comes after 10 minutes); one that
//! needs deletion by age after such a restart must let the time pass instead.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{Lines, Run, ServerProcess, User, qpq_command, untimed};
use qpq::clock::OFFSET_ENV;
use qpq::transport::Fingerprint;
use redb::{ReadableDatabase, ReadableTable};

const DAY: i64 = 24 * 3600;
const YEAR: i64 = 365 * DAY;

/// `qpq serve` on 127.0.0.1:0 over `data_dir`, its clock `offset` seconds from the real one.
fn serve_at(data_dir: &Path, offset: i64) -> ServerProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qpq"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("QPQ_CONFIG")
        .env("QPQ_LOG", "warn")
        .env(OFFSET_ENV, offset.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qpq serve");
    let mut lines = Lines::of(child.stdout.take().expect("piped stdout"));
    let mut fingerprint = None;
    let addr = loop {
        let line = lines.next_line().expect("qpq serve says where it listens");
        if let Some(f) = line.strip_prefix("certificate fingerprint ") {
            fingerprint = Some(Fingerprint::parse(f).expect("fingerprint"));
        }
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.parse().expect("socket address");
        }
    };
    // `lines`' thread keeps draining stdout, so the server never blocks on a full pipe.
    ServerProcess {
        child,
        addr,
        fingerprint: fingerprint.expect("fingerprint line"),
        data_dir: data_dir.to_path_buf(),
    }
}

/// Stops the server cleanly (SIGTERM), so its database closes and the next one opens it.
fn stop(server: ServerProcess) {
    let status = server.terminate();
    assert!(status.success(), "qpq serve exits cleanly on SIGTERM: {status:?}");
}

/// `qpq ARGS` as `u` against `server`, the client's clock `offset` seconds from the real one.
fn run_at(u: &User, server: &ServerProcess, offset: i64, args: &[&str]) -> Run {
    let out = qpq_command(u.home.path())
        .arg("--server")
        .arg(server.addr.to_string())
        .args(args)
        .env(OFFSET_ENV, offset.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("qpq runs");
    Run::from(out)
}

fn ok_at(u: &User, server: &ServerProcess, offset: i64, args: &[&str]) -> String {
    let r = run_at(u, server, offset, args);
    assert!(r.ok, "{} {args:?} at {offset:+}s failed ({:?}): {}", u.name, r.code, r.stderr);
    r.stdout
}

fn fails_at(u: &User, server: &ServerProcess, offset: i64, args: &[&str]) -> String {
    let r = run_at(u, server, offset, args);
    assert!(!r.ok, "{} {args:?} at {offset:+}s should fail but printed {:?}", u.name, r.stdout);
    // The error is the last line; notices (a certificate pinned for a new address) come first.
    r.stderr.lines().last().unwrap_or_default().to_string()
}

/// `qpq init` at `offset` (which uploads the user's keys), no passphrase.
fn init_at(server: &ServerProcess, offset: i64, name: &str) -> User {
    let home = tempfile::tempdir().expect("temp home");
    let addr = server.addr.to_string();
    let out = qpq_command(home.path())
        .args(["init", "--server", &addr, "--name", name, "--no-passphrase"])
        .env(OFFSET_ENV, offset.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("qpq init runs");
    assert!(out.status.success(), "init {name} at {offset:+}s: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(key.len(), 64, "init prints the key: {key:?}");
    User { home, key, name: name.to_string() }
}

/// What `qpq health` reports of `u`'s KeyPackages, counted by the server's clock (`health` only
/// connects: it uploads nothing).
fn key_packages_line(u: &User, server: &ServerProcess, offset: i64) -> String {
    let out = ok_at(u, server, offset, &["health"]);
    out.lines().find(|l| l.starts_with("key packages: ")).unwrap_or_else(|| panic!("{out}")).to_string()
}

fn count_line(single_use: u32, last_resort: bool) -> String {
    format!(
        "key packages: {single_use} on the server, last resort: {}",
        if last_resort { "yes" } else { "no" }
    )
}

fn contacts(a: &User, b: &User) {
    for (x, y) in [(a, b), (b, a)] {
        let r = common::qpq_in(x.home.path(), &["contact", "add", &y.name, &y.key], None);
        assert!(r.ok, "{}", r.stderr);
    }
}

/// Rows the server's database holds for `who` (hex key): single-use KeyPackages and whether a
/// last-resort one is stored. The server must be stopped.
fn stored_rows(data_dir: &Path, who: &str) -> (usize, bool) {
    let who = hex::decode(who).expect("hex key");
    let db = redb::Database::open(data_dir.join("qpq.db")).expect("open the server's database");
    let txn = db.begin_read().unwrap();
    let kps: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("key_packages");
    let single = txn
        .open_table(kps)
        .unwrap()
        .iter()
        .unwrap()
        .filter(|e| e.as_ref().unwrap().0.value().starts_with(&who))
        .count();
    let lr: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("last_resort");
    let last_resort = txn.open_table(lr).unwrap().get(&who[..]).unwrap().is_some();
    (single, last_resort)
}

/// The stored last-resort package of `who` (hex key), as the server's database holds it. The
/// server must be stopped.
fn last_resort_row(data_dir: &Path, who: &str) -> Option<Vec<u8>> {
    let who = hex::decode(who).expect("hex key");
    let db = redb::Database::open(data_dir.join("qpq.db")).expect("open the server's database");
    let txn = db.begin_read().unwrap();
    let lr: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("last_resort");
    txn.open_table(lr).unwrap().get(&who[..]).unwrap().map(|v| v.value().to_vec())
}

/// Strangers can keep a server's key storage full. A refused refill used to leave the
/// last-resort package unreplaced too, until it expired and nobody could invite its owner. The
/// client now replaces it alone, which fits: a replacement frees what it takes.
#[test]
fn a_full_key_storage_still_takes_a_last_resort_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -15 * DAY);
    let bob = init_at(&server, -15 * DAY, "bob");
    stop(server);
    let before = last_resort_row(dir.path(), &bob.key).expect("published at init");

    // No room at all: what the storage holds is in the refusal.
    let config = dir.path().join("qpq-server.toml");
    std::fs::write(&config, "max_key_bytes = 1\n").unwrap();
    let server = serve_at(dir.path(), 0);
    let r = run_at(&bob, &server, 0, &["recv"]);
    assert!(r.ok, "{}", r.stderr);
    let used: u64 = r
        .stderr
        .split("server key storage full: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", r.stderr));
    stop(server);
    assert!(last_resort_row(dir.path(), &bob.key) == Some(before.clone()), "no room: the old one stays");

    // Full but for a few KB: no room for a pool, room for a last-resort package in place of the
    // old one (a minute later: the refusal above makes bob wait that long before trying again).
    std::fs::write(&config, format!("max_key_bytes = {}\n", used + 4000)).unwrap();
    let server = serve_at(dir.path(), 61);
    let r = run_at(&bob, &server, 61, &["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("could not publish new key packages yet"), "{}", r.stderr);
    assert_eq!(key_packages_line(&bob, &server, 61), count_line(20, true), "the old pool stays");
    stop(server);
    let after = last_resort_row(dir.path(), &bob.key).expect("still there");
    assert!(after != before, "the last-resort package was replaced");
}

/// Issue 9: with packages 90 days old, `send` failed with "does not belong to bob", burned one
/// package per try and nothing refilled them. Bob and alice set up a year ago (the server's
/// clock then agreed, or their uploads would have been refused as expired); a year later the
/// server runs at the real time.
#[test]
fn a_user_idle_for_a_year_is_reachable_again_once_they_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -YEAR);
    let alice = init_at(&server, -YEAR, "alice");
    let bob = init_at(&server, -YEAR, "bob");
    contacts(&alice, &bob);
    assert_eq!(key_packages_line(&bob, &server, -YEAR), count_line(20, true));
    stop(server);

    // A year later.
    let server = serve_at(dir.path(), 0);
    assert_eq!(key_packages_line(&bob, &server, 0), count_line(0, false), "all of bob's expired");
    for _ in 0..2 {
        let err = fails_at(&alice, &server, 0, &["send", "bob", "hi"]);
        assert_eq!(
            err.trim(),
            format!(
                "qpq: {} has no valid key packages on the server: they must come online once (or run `qpq init` there)",
                bob.name
            )
        );
    }
    assert!(
        ok_at(&alice, &server, 0, &["group", "list"]).lines().all(|l| !l.contains("direct")),
        "no half-made conversation"
    );

    // Bob comes back: one receive round replaces his year-old packages.
    assert_eq!(ok_at(&bob, &server, 0, &["recv"]), "");
    assert_eq!(key_packages_line(&bob, &server, 0), count_line(20, true), "a full fresh pool");
    ok_at(&alice, &server, 0, &["send", "bob", "hi"]);
    assert_eq!(untimed(&ok_at(&bob, &server, 0, &["recv"])).lines().collect::<Vec<_>>(), vec!["alice: hi"]);
    assert_eq!(key_packages_line(&bob, &server, 0), count_line(19, true), "exactly one was used");
    stop(server);
}

/// The server never hands out a package that could expire before the commit adding its owner
/// reaches every member: one valid for less than the message TTL and a day more (63 - 31 = 32
/// days after it was made, at the default TTL) is deleted instead and the adder is told, while a
/// younger one is handed out as before.
#[test]
fn nobody_is_handed_a_dead_key_package() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), 0);
    let alice = init_at(&server, 0, "alice");
    let bob = init_at(&server, 0, "bob");
    let carol = init_at(&server, 0, "carol");
    contacts(&alice, &bob);
    contacts(&alice, &carol);
    stop(server);

    // 31 days on, the packages are old but handed out.
    let server = serve_at(dir.path(), 31 * DAY);
    assert_eq!(key_packages_line(&bob, &server, 0), count_line(20, true));
    ok_at(&alice, &server, 0, &["send", "bob", "still valid"]);
    assert_eq!(
        untimed(&ok_at(&bob, &server, 0, &["recv"])).lines().collect::<Vec<_>>(),
        vec!["alice: still valid"]
    );
    stop(server);

    // 33 days on, every package carol uploaded has less than 31 days left: none goes out.
    let server = serve_at(dir.path(), 33 * DAY);
    let err = fails_at(&alice, &server, 0, &["send", "carol", "hi"]);
    assert_eq!(
        err.trim(),
        "qpq: carol has no valid key packages on the server: they must come online once (or run `qpq init` there)"
    );
    assert_eq!(key_packages_line(&carol, &server, 0), count_line(0, false));
    stop(server);
    assert_eq!(stored_rows(dir.path(), &carol.key), (0, false), "deleted, not just hidden");
}

/// The age rule: a client that comes online every two weeks replaces its packages before they
/// expire, so it stays reachable through a period in which it never comes back (the server
/// alone would have only dead packages of it by then). Every clock agrees with the server's,
/// and the story ends at the real time: openmls checks leaf lifetimes against the system clock
/// when a member is added, so a package made by a clock ahead of the real one is "not valid yet"
/// to it (src/clock.rs).
#[test]
fn a_user_who_checks_in_every_two_weeks_stays_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -34 * DAY);
    let alice = init_at(&server, -34 * DAY, "alice");
    let bob = init_at(&server, -34 * DAY, "bob");
    contacts(&alice, &bob);
    stop(server);

    // 15 days later bob receives once; his pool is over two weeks old, so he publishes a new one.
    let server = serve_at(dir.path(), -19 * DAY);
    assert_eq!(ok_at(&bob, &server, -19 * DAY, &["recv"]), "");
    assert_eq!(
        key_packages_line(&bob, &server, -19 * DAY),
        count_line(40, true),
        "the old pool stays while it is handed out"
    );
    stop(server);

    // 34 days after init the first pool is no longer handed out; the second reaches him.
    let server = serve_at(dir.path(), 0);
    ok_at(&alice, &server, 0, &["send", "bob", "hi"]);
    assert_eq!(untimed(&ok_at(&bob, &server, 0, &["recv"])).lines().collect::<Vec<_>>(), vec!["alice: hi"]);
    stop(server);
}

/// A replacement the server refused (here: its key material budget is full) was recorded as
/// published all the same, so bob's next rounds took the pool for fresh and would have tried
/// again only 14 days later, while his last-resort reference named a package the server never
/// had. The round after the refusal publishes the new pool.
///
/// And the refusal failed the whole round: while strangers kept the server's key storage full,
/// nobody whose packages were due could send (alice's `send` failed) or receive (bob's `recv`
/// failed). Now it is a notice, and the messages go.
#[test]
fn a_refused_key_package_upload_is_retried_at_the_next_round() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -15 * DAY);
    let bob = init_at(&server, -15 * DAY, "bob");
    let alice = init_at(&server, -15 * DAY, "alice");
    contacts(&alice, &bob);
    stop(server);

    // Their pools are over two weeks old, and the server has no room for new key material.
    let config = dir.path().join("qpq-server.toml");
    std::fs::write(&config, "max_key_bytes = 1\n").unwrap();
    let server = serve_at(dir.path(), 0);
    let sent = run_at(&alice, &server, 0, &["send", "bob", "full of strangers"]);
    assert!(sent.ok, "{}", sent.stderr);
    assert!(sent.stderr.contains("could not publish new key packages yet"), "{}", sent.stderr);
    let got = run_at(&bob, &server, 0, &["recv"]);
    assert!(got.ok, "{}", got.stderr);
    assert!(got.stderr.contains("server key storage full"), "{}", got.stderr);
    assert_eq!(untimed(&got.stdout).lines().collect::<Vec<_>>(), vec!["alice: full of strangers"]);
    assert_eq!(key_packages_line(&bob, &server, 0), count_line(19, true), "alice took one");
    stop(server);

    // Room again. The rounds of the next minute do not upload (a stranger-filled server is not
    // asked again at every round); the first round after it publishes the new pool and
    // last-resort package.
    std::fs::remove_file(&config).unwrap();
    let server = serve_at(dir.path(), 0);
    assert_eq!(ok_at(&bob, &server, 0, &["recv"]), "");
    assert_eq!(key_packages_line(&bob, &server, 0), count_line(19, true), "bob waits a minute");
    assert_eq!(ok_at(&bob, &server, 61, &["recv"]), "");
    assert_eq!(key_packages_line(&bob, &server, 61), count_line(39, true));
    stop(server);
}

/// A refusal of the server for itself (its key storage full) made every round upload a new pool
/// again, and `recv --follow` or the shell has a round per message received: for as long as
/// strangers kept the server full, each message cost a pool's key generation, a save and a
/// refused upload charged to our network's budget (and the envelope key's upload as well). Now
/// the next try of either waits a minute, then two, doubling to an hour; `qpq keys rotate` does
/// not wait.
#[test]
fn uploads_refused_by_a_full_server_are_tried_again_after_a_growing_wait() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -15 * DAY);
    let bob = init_at(&server, -15 * DAY, "bob");
    stop(server);

    let config = dir.path().join("qpq-server.toml");
    std::fs::write(&config, "max_key_bytes = 1\n").unwrap();
    let server = serve_at(dir.path(), 0);
    let refused = |r: &Run| {
        r.ok && r.stderr.contains("could not publish new key packages yet")
            && !r.stderr.contains("could not replace the envelope key")
    };
    let quiet = |r: &Run| r.ok && !r.stderr.contains("could not");
    let got = run_at(&bob, &server, 0, &["recv"]);
    assert!(refused(&got), "{}", got.stderr);
    // Within the minute: no upload, so no refusal to report. (The clock is offset from the real
    // one, which moves a few seconds between these commands: hence the margins.)
    let got = run_at(&bob, &server, 30, &["recv"]);
    assert!(quiet(&got), "{}", got.stderr);
    let got = run_at(&bob, &server, 61, &["recv"]);
    assert!(refused(&got), "tried again after a minute: {}", got.stderr);
    // Two refusals in a row: two minutes.
    let got = run_at(&bob, &server, 61 + 90, &["recv"]);
    assert!(quiet(&got), "{}", got.stderr);
    let got = run_at(&bob, &server, 61 + 121, &["recv"]);
    assert!(refused(&got), "{}", got.stderr);
    stop(server);

    // Room again, but the round within the four-minute wait does not look; `keys rotate` is
    // the person asking, and does not wait.
    std::fs::remove_file(&config).unwrap();
    let at = 61 + 122;
    let server = serve_at(dir.path(), at);
    let got = run_at(&bob, &server, at, &["recv"]);
    assert!(quiet(&got), "{}", got.stderr);
    assert_eq!(key_packages_line(&bob, &server, at), count_line(20, true));
    ok_at(&bob, &server, at, &["keys", "rotate"]);
    assert_eq!(key_packages_line(&bob, &server, at), count_line(40, true));
    stop(server);
}

/// The envelope (hybrid) key's lifetime read the system clock while everything else with a
/// lifetime reads the clock it is given, so no test could move it: a home made 8 days ago by
/// its clock showed a key made today, and a receive round did not replace it. Now it follows
/// the given clock: 8 days on, the key is 8 days old and the next round replaces it (keeping
/// the old one for mail sealed to it).
#[test]
fn the_envelope_key_ages_and_is_replaced_by_the_clock_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -8 * DAY);
    let alice = init_at(&server, -8 * DAY, "alice");
    let shown = ok_at(&alice, &server, -8 * DAY, &["keys", "show"]);
    assert!(shown.contains("created 0 days ago") && shown.contains("replaced keys kept: 0"), "{shown}");
    stop(server);

    let server = serve_at(dir.path(), 0);
    let shown = ok_at(&alice, &server, 0, &["keys", "show"]);
    assert!(shown.contains("created 8 days ago"), "{shown}");
    ok_at(&alice, &server, 0, &["recv"]);
    let shown = ok_at(&alice, &server, 0, &["keys", "show"]);
    assert!(shown.contains("created 0 days ago") && shown.contains("replaced keys kept: 1"), "{shown}");
    stop(server);
}

/// A wait started by the old database's refusals held back the republish after the server's
/// database was replaced (review finding): the new database got our envelope key but no
/// KeyPackages, and nobody could invite us for up to an hour. A new database has refused
/// nothing: the republish does not wait.
#[test]
fn a_replaced_server_database_gets_our_key_packages_at_once_despite_an_earlier_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_at(dir.path(), -15 * DAY);
    let bob = init_at(&server, -15 * DAY, "bob");
    stop(server);
    std::fs::write(dir.path().join("qpq-server.toml"), "max_key_bytes = 1\n").unwrap();
    let server = serve_at(dir.path(), 0);
    let got = run_at(&bob, &server, 0, &["recv"]);
    assert!(got.ok && got.stderr.contains("could not publish new key packages yet"), "{}", got.stderr);
    stop(server);

    // A new database (every start here is on a new port, its certificate pinned on first use).
    let fresh = tempfile::tempdir().unwrap();
    let server = serve_at(fresh.path(), 1);
    let got = run_at(&bob, &server, 1, &["recv"]);
    assert!(got.ok && got.stderr.contains("the server's database was replaced"), "{}", got.stderr);
    assert_eq!(key_packages_line(&bob, &server, 1), count_line(20, true));
    stop(server);
}
