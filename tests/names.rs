//! Names people chose (signed into their MLS leaf, shown marked unless they are a contact's),
//! short keys typed back, and the times of messages. Real server, real binary, real crypto;
//! every time assertion runs with TZ=UTC and a clock offset, never the machine's zone or date.

mod common;

use common::{Lines, ServerProcess, User, qpq_command, time_width, untimed};
use qpq::crypto::identity::PublicKey;

/// `qpq ARGS` in `u`'s home in UTC, with the clock moved by `offset_secs`, optionally with stdin.
fn run(u: &User, offset_secs: i64, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = qpq_command(u.home.path())
        .args(args)
        .env("TZ", "UTC")
        .env(qpq::clock::OFFSET_ENV, offset_secs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qpq");
    let mut sin = child.stdin.take().expect("stdin");
    sin.write_all(stdin.unwrap_or("").as_bytes()).expect("write stdin");
    drop(sin);
    let out = child.wait_with_output().expect("qpq runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn ok(u: &User, args: &[&str]) -> String {
    let (ok, out, err) = run(u, 0, args, None);
    assert!(ok, "{} {args:?} failed: {err}", u.name);
    out
}

/// A server and three people with the names given, the first knowing the other two as
/// contacts (they know no one yet).
fn known_to(names: [&str; 3]) -> (tempfile::TempDir, ServerProcess, [User; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let [a, b, c] = names.map(|n| User::init(&server, n));
    a.add_contact(&b);
    a.add_contact(&c);
    (dir, server, [a, b, c])
}

/// The marked form of `u`'s signed name: `~Alice (304b-9934)`.
fn marked(u: &User) -> String {
    format!("~{} ({})", u.name, &short(u)[..9])
}

fn short(u: &User) -> String {
    PublicKey::parse_hex(&u.key).unwrap().short()
}

/// Alice (signed name "Alice") invites bob, who knows her as contact `al`, and carol, who does
/// not know her: bob sees `al`, carol sees the claim marked, in the request, in messages and in
/// JSON.
#[test]
fn a_signed_name_shows_marked_to_strangers_and_a_contacts_own_name_wins() {
    let (_dir, _server, [alice, bob, carol]) = known_to(["Alice", "bob", "carol"]);
    ok(&bob, &["contact", "add", "al", &alice.key]);
    ok(&alice, &["group", "create", "team"]);
    ok(&alice, &["group", "add", "team", "bob", "carol"]);
    ok(&alice, &["send", "#team", "hi all"]);

    let (_, out, err) = run(&bob, 0, &["recv"], None);
    assert!(err.contains("you were added to #team by al\n"), "{err}");
    assert_eq!(untimed(&out), "[#team] al: hi all\n");

    // Carol's request already names the inviter by the name signed in the Welcome's tree.
    let (_, out, err) = run(&carol, 0, &["recv"], None);
    assert_eq!(out, "", "nothing before consent");
    assert!(
        err.contains(&format!("message request from {} to #team: \u{201c}hi all\u{201d}", marked(&alice))),
        "{err}"
    );
    let list = ok(&carol, &["requests"]);
    assert!(list.starts_with(&format!("#1 {} ~Alice invites you to #team", alice.key)), "{list}");
    let json: serde_json::Value = serde_json::from_str(ok(&carol, &["requests", "--json"]).trim()).unwrap();
    assert_eq!(json["from_claimed_name"], "Alice");
    assert_eq!(json["from_name"], serde_json::Value::Null);
    // The sender of a request is a known key: the start of the key in the marked name accepts.
    let (okay, _, err) = run(&carol, 0, &["requests", "accept", &short(&alice)[..9]], None);
    assert!(okay && err.contains(&format!("you were added to #team by {}", marked(&alice))), "{err}");
    ok(&alice, &["send", "#team", "welcome carol"]);
    // The join, said by `requests accept` on stderr, waits for the readers too (like every
    // membership change a one-shot command fetched), ahead of the message.
    let (_, out, _) = run(&carol, 0, &["recv", "--json"], None);
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("a json line")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        (lines[0]["type"].as_str(), lines[0]["event"].as_str()),
        (Some("event"), Some("joined")),
        "{out}"
    );
    let msg = &lines[1];
    assert_eq!(msg["from"], alice.key.as_str());
    assert_eq!(msg["from_name"], serde_json::Value::Null, "alice is no contact of carol");
    assert_eq!(msg["from_claimed_name"], "Alice");
    ok(&alice, &["send", "#team", "plain again"]);
    assert_eq!(untimed(&ok(&carol, &["recv"])), format!("[#team] {}: plain again\n", marked(&alice)));
    // Bob's JSON: his name for her, and what she claims.
    ok(&alice, &["send", "#team", "json for bob"]);
    let out = ok(&bob, &["recv", "--json"]);
    let msg: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((msg["from_name"].as_str(), msg["from_claimed_name"].as_str()), (Some("al"), Some("Alice")));

    // Member lists: bob's contact name, carol's claim marked, next to the keys.
    let members = ok(&bob, &["group", "members", "team"]);
    assert!(members.contains(&format!("{} al\n", alice.key)), "{members}");
    assert!(members.contains(&format!("{} ~carol\n", carol.key)), "{members}");

    // A new name reaches the group with a signed leaf update; contacts' names still win. The
    // spaces around it are dropped (they showed inside its marks: `~  Alice L.   (...)`).
    let out = ok(&alice, &["name", "set", "  Alice L.  "]);
    assert!(out.contains("name: Alice L. (signed into 1 conversation)"), "{out}");
    assert!(ok(&alice, &["whoami"]).contains("name: Alice L."));
    ok(&alice, &["send", "#team", "renamed"]);
    let shown = format!("~Alice L. ({})", &short(&alice)[..9]);
    // Names are read from the group as it is when printed, so the earlier unread one shows the
    // new name too.
    let got = untimed(&ok(&carol, &["recv"]));
    assert_eq!(got, format!("[#team] {shown}: json for bob\n[#team] {shown}: renamed\n"));
    assert_eq!(untimed(&ok(&bob, &["recv"])), "[#team] al: renamed\n");
    let (okay, _, err) = run(&alice, 0, &["name", "set", "bad\u{202e}name"], None);
    assert!(!okay && err.contains("invalid display name"), "{err}");
}

/// Found by exploratory testing: bob's new name reached the groups he was in, but a group
/// that added him later showed his old one to carol: the server still held KeyPackages signed
/// with it (a pool is added to, not replaced), and the inviter took one of those. A member
/// whose leaf was made before the name was now signs the new one into the group on joining.
#[test]
fn a_name_set_reaches_a_group_that_adds_you_later() {
    let (_dir, server, [alice, bob, carol]) = known_to(["alice", "bob", "carol"]);
    bob.add_contact(&alice);
    carol.add_contact(&alice);
    let out = ok(&bob, &["name", "set", "Robert"]);
    assert!(out.contains("name: Robert"), "{out}");
    ok(&alice, &["group", "create", "team"]);
    ok(&alice, &["group", "add", "team", "bob", "carol"]);
    ok(&bob, &["recv"]);
    ok(&carol, &["recv"]);
    ok(&bob, &["send", "#team", "hello"]);
    let robert = format!("~Robert ({})", &short(&bob)[..9]);
    assert_eq!(untimed(&ok(&carol, &["recv"])), format!("[#team] {robert}: hello\n"));
    let members = ok(&carol, &["group", "members", "team"]);
    assert!(members.contains(&format!("{} ~Robert\n", bob.key)), "{members}");

    // A stranger's invitation joins on `requests accept`, which does not connect: the next
    // command that does signs the name in.
    let eve = User::init(&server, "eve");
    ok(&eve, &["name", "set", "Evelyn"]);
    ok(&alice, &["group", "add", "team", &eve.key]);
    ok(&eve, &["recv"]);
    ok(&eve, &["requests", "accept", "1"]);
    ok(&eve, &["send", "#team", "hi all"]);
    let evelyn = format!("~Evelyn ({})", &short(&eve)[..9]);
    let got = untimed(&ok(&carol, &["recv"]));
    assert!(got.ends_with(&format!("[#team] {evelyn}: hi all\n")), "{got}");
}

#[test]
fn short_keys_work_as_targets_and_contact_keys_when_unique() {
    let (_dir, server, [alice, bob, carol]) = known_to(["alice", "bob", "carol"]);
    carol.add_contact(&alice);
    ok(&alice, &["group", "create", "team"]);
    ok(&alice, &["group", "add", "team", "bob", "carol"]);
    ok(&carol, &["recv"]);
    // Carol knows bob only as a member of #team: his printed short key reaches him, and so does
    // the part of it the marked name shows.
    bob.add_contact(&carol);
    ok(&carol, &["send", &short(&bob), "by short key"]);
    ok(&carol, &["send", &short(&bob)[..9], "by its first half"]);
    let got: Vec<String> = untimed(&ok(&bob, &["recv"])).lines().map(str::to_string).collect();
    assert!(
        got.ends_with(&["carol: by short key".to_string(), "carol: by its first half".to_string()]),
        "{got:?}"
    );
    // ...and names him as a contact, which resolves to his whole key.
    ok(&carol, &["contact", "add", "b", &short(&bob).to_uppercase()]);
    assert!(ok(&carol, &["contact", "list"]).contains(&format!("b {}", bob.key)));

    // A stranger's request is blocked and unblocked by the short key too.
    let dave = User::init(&server, "dave");
    ok(&dave, &["send", &carol.key, "hi carol"]);
    ok(&carol, &["recv"]);
    assert!(ok(&carol, &["requests", "block", &short(&dave)]).starts_with(&format!("blocked {}", dave.key)));
    assert!(
        ok(&carol, &["requests", "unblock", &short(&dave)[..9]])
            .starts_with(&format!("unblocked {}", dave.key))
    );

    // A key nobody here knows is no target; neither is too short a prefix. A short key says
    // so, rather than sending someone who typed `contact add` to `contact add`.
    let (okay, _, err) = run(&carol, 0, &["send", "0000-0000-0000-0000", "x"], None);
    let unknown = "no key this home knows starts with \"0000-0000-0000-0000\": use the whole key";
    assert!(!okay && err.contains(unknown), "{err}");
    let (okay, _, err) = run(&carol, 0, &["contact", "add", "zed", "0000-0000-0000-0000"], None);
    assert!(!okay && err.contains(unknown), "{err}");
    let (okay, _, err) = run(&carol, 0, &["send", &short(&bob)[..4], "x"], None);
    assert!(!okay && err.contains("unknown contact"), "{err}");
}

#[test]
fn an_ambiguous_short_key_is_refused_with_the_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    // Two valid Ed25519 keys that share their first 8 hex digits (about every other 32-byte
    // string is a valid point encoding).
    let mut keys = (1u64..)
        .map(|i| format!("304b9934{i:08x}{}", "0".repeat(48)))
        .filter(|k| PublicKey::parse_hex(k).is_ok());
    let (k1, k2) = (keys.next().unwrap(), keys.next().unwrap());
    let shorts = [&k1, &k2].map(|k| PublicKey::parse_hex(k).unwrap().short());
    ok(&alice, &["contact", "add", "one", &k1]);
    ok(&alice, &["contact", "add", "two", &k2]);
    let (okay, _, err) = run(&alice, 0, &["send", "304b-9934", "x"], None);
    assert!(!okay, "{err}");
    assert!(
        err.contains(&format!(
            "\"304b-9934\" matches several keys: {} (one), {} (two)",
            shorts[0], shorts[1]
        )),
        "{err}"
    );
    for verb in [&["group", "create", "g"][..], &["group", "add", "g", "304b9934"]] {
        let (okay, _, err) = run(&alice, 0, verb, None);
        if verb[1] == "add" {
            assert!(!okay && err.contains("matches several keys"), "{err}");
        } else {
            assert!(okay, "{err}");
        }
    }
    // The whole short key decides.
    let (_, _, err) = run(&alice, 0, &["send", &shorts[0], "x"], None);
    assert!(!err.contains("several keys") && !err.contains("unknown contact"), "resolved to one: {err}");
}

#[test]
fn init_refuses_a_display_name_a_terminal_would_obey() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let home = tempfile::tempdir().unwrap();
    let addr = server.addr.to_string();
    for bad in ["al\x1b[2Jice", &"x".repeat(65), " "] {
        let out = qpq_command(home.path())
            .args(["init", "--server", &addr, "--no-passphrase", "--name", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("invalid display name"), "{bad:?}: {err}");
    }
}

/// Receipt times: `HH:MM` today, with the date on another day; JSON has both times in RFC 3339.
#[test]
fn messages_show_their_time_and_the_date_when_not_today() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    alice.add_contact(&bob);
    bob.add_contact(&alice);
    ok(&alice, &["send", "bob", "first"]);
    let (_, out, _) = run(&bob, 0, &["recv"], None);
    assert_eq!(time_width(&out), Some(6), "today: HH:MM: {out:?}");
    assert!(out.ends_with(" alice: first\n"), "{out:?}");

    // Received now, read two days later: the date is shown, and it is the receipt date.
    ok(&alice, &["send", "bob", "second"]);
    let (_, out, _) = run(&bob, 0, &["recv", "--json"], None);
    let msg: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let received = msg["received_at"].as_str().unwrap().to_string();
    let sent = msg["sent_at"].as_str().unwrap();
    for t in [received.as_str(), sent] {
        assert!(humantime::parse_rfc3339(t).is_ok() && t.ends_with('Z'), "rfc 3339 in UTC: {t}");
    }
    let (okay, out, err) = run(&bob, 2 * 24 * 3600, &["shell"], Some("/chat alice\n/history 2\n"));
    assert!(okay, "{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("alice: ")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in &lines {
        assert_eq!(time_width(l), Some(17), "another day: YYYY-MM-DD HH:MM: {l:?}");
    }
    // TZ=UTC: the shown date and minute are those of received_at.
    let shown = format!("{} {}", &received[..10], &received[11..16]);
    assert!(lines[1].starts_with(&shown), "{} vs {received}", lines[1]);
    assert_eq!(untimed(lines[1]), "alice: second");
}

/// The shell prints a message that arrives while it runs with its time too.
#[test]
fn the_shell_shows_the_time_of_a_message_as_it_arrives() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    alice.add_contact(&bob);
    bob.add_contact(&alice);
    let mut shell = qpq_command(alice.home.path())
        .arg("shell")
        .env("TZ", "UTC")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(shell.stdout.take().unwrap());
    ok(&bob, &["send", "alice", "live one"]);
    let line = std::iter::from_fn(|| lines.next_line()).find(|l| l.contains("live one")).expect("shown");
    assert_eq!(time_width(&line), Some(6), "{line:?}");
    assert_eq!(untimed(&line), "bob: live one");
    drop(shell.stdin.take());
    assert!(shell.wait().unwrap().success());
}
