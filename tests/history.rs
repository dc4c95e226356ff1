//! Issue 12: `qpq history` and the shell's `/history` page through every kept message, search
//! it, print stable JSON, and a retention deletes exactly the older messages. Real server
//! process, real homes, the real binary.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::Value;

/// `qpq history ARGS --json` as parsed lines.
fn history_json(u: &User, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["history", "--json"];
    all.extend_from_slice(args);
    u.ok(&all).lines().map(|l| serde_json::from_str(l).expect("one json object per line")).collect()
}

/// `from` sends each of `texts` to `to`, one `qpq send` each.
fn say(from: &User, to: &str, texts: &[&str]) {
    for t in texts {
        from.ok(&["send", to, t]);
    }
}

fn texts(lines: &[Value]) -> Vec<String> {
    lines.iter().filter(|v| v["type"] == "message").map(|v| v["text"].as_str().unwrap().to_string()).collect()
}

/// Pages back with `--before` from each page's oldest position; returns every message text
/// in the order shown (oldest first overall).
fn all_pages(u: &User, base: &[&str]) -> Vec<String> {
    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut args: Vec<&str> = base.to_vec();
        if let Some(b) = &before {
            args.extend(["--before", b.as_str()]);
        }
        let r = u.run(&[&["history", "--json"], args.as_slice()].concat());
        assert!(r.ok, "{}", r.stderr);
        let lines: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let msgs: Vec<&Value> = lines.iter().filter(|v| v["type"] == "message").collect();
        pages.push(texts(&lines));
        // The hint names the cursor of the page before, which is the oldest position shown.
        match r.stderr.lines().find_map(|l| l.strip_prefix("qpq: older messages: qpq history ")) {
            Some(hint) => {
                let cursor = hint.rsplit_once("--before ").unwrap().1.to_string();
                assert_eq!(msgs[0]["position"].as_str(), Some(cursor.as_str()), "cursor is the oldest shown");
                before = Some(cursor);
            }
            None => break,
        }
        assert!(pages.len() < 100, "paging ends");
    }
    pages.into_iter().rev().flatten().collect()
}

#[test]
fn paging_back_shows_every_message_once_in_order_across_conversations() {
    let (_dir, _server, [alice, bob, carol]) = cast(["alice", "bob", "carol"]);
    // Interleaved: bob, carol, bob, carol, ... and alice answers once in each.
    say(&bob, "alice", &["b1", "b2"]);
    alice.ok(&["recv"]);
    say(&carol, "alice", &["c1", "c2", "c3"]);
    alice.ok(&["recv"]);
    alice.ok(&["send", "bob", "a-to-bob"]);
    alice.ok(&["send", "carol", "a-to-carol"]);
    say(&bob, "alice", &["b3"]);
    alice.ok(&["recv"]);
    let want = ["b1", "b2", "c1", "c2", "c3", "a-to-bob", "a-to-carol", "b3"];

    for n in ["1", "3", "8"] {
        let shown = all_pages(&alice, &["-n", n]);
        assert_eq!(shown, want, "all conversations, -n {n}");
    }
    let shown = all_pages(&alice, &["bob", "-n", "2"]);
    assert_eq!(shown, ["b1", "b2", "a-to-bob", "b3"], "bob's conversation only");
    // A count after the target (or alone) is the page size, as in the shell's `/history`.
    assert_eq!(texts(&history_json(&alice, &["bob", "2"])), ["a-to-bob", "b3"]);
    assert_eq!(texts(&history_json(&alice, &["3"])), ["a-to-bob", "a-to-carol", "b3"]);

    // Every position is distinct and the text form names the conversation of each line.
    let lines = history_json(&alice, &["-n", "100"]);
    let positions: HashSet<&str> = lines.iter().filter_map(|v| v["position"].as_str()).collect();
    assert_eq!(positions.len(), want.len());
    let text = untimed(&alice.ok(&["history"]));
    assert!(text.contains("[bob] bob: b1\n") && text.contains("[carol] me: a-to-carol\n"), "{text}");
}

#[test]
fn grep_and_json_shape() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    say(&bob, "alice", &["Lunch at noon?", "no", "LUNCH it is"]);
    alice.ok(&["recv"]);
    alice.ok(&["send", "bob", "lunch: yes"]);

    let found = history_json(&alice, &["--grep", "lunch"]);
    assert_eq!(texts(&found), ["Lunch at noon?", "LUNCH it is", "lunch: yes"]);
    assert!(history_json(&alice, &["--grep", "dinner"]).is_empty());
    let page = history_json(&alice, &["bob", "--grep", "LUNCH", "-n", "1"]);
    assert_eq!(texts(&page), ["lunch: yes"]);
    // The hint for the page before keeps the search and the page size (it dropped them).
    let r = alice.run(&["history", "--grep", "lunch", "-n", "2"]);
    let hint = r.stderr.lines().find_map(|l| l.strip_prefix("qpq: older messages: qpq history ")).unwrap();
    let (words, cursor) = hint.rsplit_once(" --before ").unwrap();
    assert_eq!(words, "-n 2 --grep lunch", "{}", r.stderr);
    let older = alice.ok(&["history", "-n", "2", "--grep", "lunch", "--before", cursor]);
    assert_eq!(untimed(&older).trim(), "[bob] bob: Lunch at noon?");

    let all = history_json(&alice, &["bob"]);
    // Membership changes come as their own objects, in their place ("joined" first here).
    assert_eq!(all[0]["type"], "event", "{:?}", all[0]);
    assert_eq!((&all[0]["peer"], &all[0]["peer_name"]), (&bob.key.as_str().into(), &"bob".into()));
    let lines: Vec<&Value> = all.iter().filter(|v| v["type"] == "message").collect();
    let v = lines[0];
    let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "from",
            "from_claimed_name",
            "from_name",
            "group",
            "group_id",
            "outgoing",
            "peer",
            "peer_name",
            "position",
            "received_at",
            "sent_at",
            "text",
            "type"
        ]
    );
    assert_eq!(v["type"], "message");
    assert_eq!(v["from"], bob.key.as_str());
    assert_eq!(v["from_name"], "bob");
    assert_eq!(v["group"], Value::Null, "a direct conversation has no group name");
    assert_eq!(v["outgoing"], false);
    assert_eq!(lines[3]["outgoing"], true);
    // Whom a direct message went to or came from, either way.
    for l in [v, lines[3]] {
        assert_eq!((&l["peer"], &l["peer_name"]), (&bob.key.as_str().into(), &"bob".into()), "{l}");
    }
    let position = v["position"].as_str().unwrap();
    let parts: Vec<&str> = position.split('.').collect();
    assert_eq!(parts.len(), 3, "{position}");
    assert_eq!(parts[1], v["group_id"].as_str().unwrap(), "the position names the conversation");
}

#[test]
fn bad_history_input_gets_clear_errors() {
    let (_dir, _server, [alice]) = cast(["alice"]);
    let r = alice.run(&["history", "-n", "0"]);
    assert_eq!(r.code, Some(2), "a usage error");
    assert!(r.stderr.contains("invalid value '0' for '-n <N>': 0 is not in 1..=100000"), "{}", r.stderr);
    let err = alice.fails(&["history", "--before", "soonish"]);
    assert_eq!(
        err.trim(),
        "qpq: cannot read --before \"soonish\": expected a cursor from the previous page, a time like \
         \"2026-11-30 14:00\", \"today\", \"yesterday\", or an age like \"2h\" or \"3d\""
    );
    let err = alice.fails(&["history", "--retention", "forever"]);
    assert!(err.starts_with("qpq: cannot read --retention \"forever\": expected an age"), "{err}");
    // "6m" meant as six months is six minutes: a retention that short deletes nearly all.
    let err = alice.fails(&["history", "--retention", "6m"]);
    assert!(err.contains("under an hour") && err.contains("6months"), "{err}");
    let long = "w".repeat(10_000);
    let r = alice.run(&["history", "--grep", &long]);
    assert_eq!(r.stderr.trim(), format!("qpq: no messages contain \"{}\"\u{2026}", &long[..64]));
    let err = alice.fails(&["history", "0"]);
    assert_eq!(err.trim(), "qpq: history 0: a page holds 1 to 100000 messages");
    let err = alice.fails(&["history", "nobody"]);
    assert!(err.starts_with("qpq: unknown contact \"nobody\""), "{err}");
    // A time before anything is not an error: an empty page.
    assert_eq!(alice.ok(&["history", "--before", "2001-01-01"]), "");
}

/// Three messages received now, two received three days later: a two-day retention set then
/// deletes the three and keeps the two, also for a reader that does not look at the clock.
#[test]
fn retention_deletes_exactly_the_older_messages() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    let later = |args: &[&str]| {
        let out = qpq_command(alice.home.path())
            .args(args)
            .env("QPQ_TEST_CLOCK_OFFSET_SECS", (3 * 24 * 3600).to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    say(&bob, "alice", &["old1", "old2", "old3"]);
    alice.ok(&["recv"]);
    say(&bob, "alice", &["new1", "new2"]);
    later(&["recv"]);
    assert_eq!(
        texts(&history_json(&alice, &[])),
        ["old1", "old2", "old3", "new1", "new2"],
        "kept by default"
    );
    assert!(alice.ok(&["history", "--retention", "show"]).contains("off (every message is kept)"));

    let said = later(&["history", "--retention", "2d"]);
    assert_eq!(said.trim(), "history retention: 2 days (3 older messages deleted)");
    // Deleted from the home, not hidden: read now (before the cutoff moves) they are gone too.
    assert_eq!(texts(&history_json(&alice, &[])), ["new1", "new2"]);
    assert!(alice.ok(&["history", "--retention", "show"]).contains("history retention: 2 days"));
    assert_eq!(
        alice.ok(&["history", "--retention", "off"]).trim(),
        "history retention: off (every message is kept)"
    );
    // Days stay days (it said "273years 9months 16days 12h"); other spans as written.
    assert_eq!(
        alice.ok(&["history", "--retention", "100000d"]).trim(),
        "history retention: 100000 days (no older messages to delete)"
    );
    assert_eq!(
        alice.ok(&["history", "--retention", "1day"]).trim(),
        "history retention: 1 day (no older messages to delete)"
    );
    assert_eq!(
        alice.ok(&["history", "--retention", "36h"]).trim(),
        "history retention: 1day 12h (no older messages to delete)"
    );
}

/// `/history` pages backwards when repeated; another command starts over at the newest page.
#[test]
fn shell_history_pages_back_when_repeated() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    say(&bob, "alice", &["m1", "m2", "m3", "m4", "m5"]);
    alice.ok(&["recv"]);
    let script =
        "/chat bob\n/history 2\n/history 2\n/history 2\n/whoami\n/history 2\n/chat\n/history --grep M3\n";
    let r = qpq_in(alice.home.path(), &["shell"], Some(script));
    assert!(r.ok, "{}", r.stderr);
    let shown: Vec<String> = untimed(&r.stdout)
        .lines()
        .filter(|l| !l.contains(&alice.key) && !l.starts_with("fingerprint") && !l.starts_with("name:"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        shown,
        [
            "bob: m4",
            "bob: m5",
            "bob: m2",
            "bob: m3",
            // The oldest page shows how the conversation began.
            "* bob started a conversation with you",
            "bob: m1",
            // /whoami in between: the newest page again.
            "bob: m4",
            "bob: m5",
            // In the lobby, over all conversations.
            "[bob] bob: m3",
        ]
    );
    let hints = r.stderr.lines().filter(|l| *l == "* older messages: /history -n 2 again").count();
    assert_eq!(hints, 3, "after each page that has older ones: {}", r.stderr);
}

/// Found by exploratory testing: `/history` after `/history 2` showed the newest page again,
/// over what was on the screen, though the README says `/history` again shows the page before.
/// A bare `/history` goes on from the last page of the same conversation (with its own size).
#[test]
fn a_bare_shell_history_goes_on_from_the_last_page() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    say(&bob, "alice", &["m1", "m2", "m3", "m4", "m5"]);
    alice.ok(&["recv"]);
    let script = "/chat bob\n/history 2\n/history\n";
    let r = qpq_in(alice.home.path(), &["shell"], Some(script));
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        untimed(&r.stdout).lines().collect::<Vec<_>>(),
        ["bob: m4", "bob: m5", "* bob started a conversation with you", "bob: m1", "bob: m2", "bob: m3"]
    );
}

/// Found by exploratory testing: an empty page of the one-shot `history` printed nothing at all,
/// where the shell says why. It says so on stderr (stdout stays empty for scripts).
#[test]
fn an_empty_page_says_why_on_stderr() {
    let (_dir, _server, [alice, _bob, _carol]) = cast(["alice", "bob", "carol"]);
    alice.ok(&["send", "bob", "hello"]);
    for (args, said) in [
        (&["history", "bob", "--grep", "zzz"][..], "qpq: no messages contain \"zzz\""),
        (&["history", "--before", "1h"][..], "qpq: no older messages"),
        (&["history", "carol"][..], "qpq: no messages with carol yet"),
    ] {
        let r = alice.run(args);
        assert!(r.ok, "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
        assert_eq!(r.stderr.trim(), said, "{args:?}");
    }
    let r = alice.run(&["history", "bob"]);
    assert!(r.stderr.is_empty(), "a page with messages says nothing more: {}", r.stderr);
}
