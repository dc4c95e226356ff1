//! Consent: invitations from keys that are not contacts wait as message requests; what
//! strangers send stays within the documented bounds. Real server, real binary, real crypto.

mod common;

use common::{ServerProcess, User, cast, qpq_command, untimed};
use qpq::crypto::identity::PublicKey;

/// `qpq ARGS` in `u`'s home with the clock moved by `offset_secs`.
fn run_at(u: &User, offset_secs: i64, args: &[&str]) -> std::process::Output {
    qpq_command(u.home.path())
        .args(args)
        .env(qpq::clock::OFFSET_ENV, offset_secs.to_string())
        .output()
        .expect("qpq runs")
}

/// How a stranger shows: the name they signed (`init --name`), marked as a claim, with the
/// start of their key.
fn short(u: &User) -> String {
    format!("~{} ({})", u.name, &PublicKey::parse_hex(&u.key).unwrap().short()[..9])
}

/// Two people who do not know each other.
fn strangers() -> (tempfile::TempDir, ServerProcess, User, User) {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let alice = User::init(&server, "alice");
    let bob = User::init(&server, "bob");
    (dir, server, alice, bob)
}

#[test]
fn a_strangers_direct_message_waits_as_a_request_and_is_shown_on_accept() {
    let (_dir, _server, alice, bob) = strangers();
    alice.ok(&["send", &bob.key, "hello bob, it is alice"]);
    let r = bob.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "", "nothing is shown before consent");
    assert!(
        r.stderr.contains(&format!("message request from {}", short(&alice)))
            && r.stderr.contains("hello bob, it is alice")
            && r.stderr.contains("qpq requests accept 1 (or decline 1, block 1)"),
        "{}",
        r.stderr
    );
    assert_eq!(bob.ok(&["group", "list"]), "", "no conversation joined");
    let list = bob.ok(&["requests"]);
    assert!(list.starts_with(&format!("#1 {} ~alice wants to start a conversation", alice.key)), "{list}");
    assert!(list.contains("hello bob, it is alice") && list.contains("(1 waiting"), "{list}");
    let json: serde_json::Value = serde_json::from_str(bob.ok(&["requests", "--json"]).trim()).unwrap();
    assert_eq!(json["number"], 1);
    assert_eq!(json["from"], alice.key.as_str());
    assert_eq!(json["kind"], "direct");
    assert_eq!(json["waiting"], 1);
    assert_eq!(json["preview"], "hello bob, it is alice");
    for field in ["received_at", "expires_at"] {
        assert!(humantime::parse_rfc3339(json[field].as_str().unwrap()).is_ok(), "{json}");
    }

    let accepted = untimed(&bob.ok(&["requests", "accept", "#1"]));
    assert_eq!(accepted.trim(), format!("{}: hello bob, it is alice", short(&alice)));
    assert_eq!(bob.ok(&["requests"]).trim(), "no message requests");
    assert!(bob.recv().is_empty(), "shown by accept, not again by recv");
    alice.ok(&["send", &bob.key, "second"]);
    assert_eq!(bob.recv(), vec![format!("{}: second", short(&alice))]);
    bob.ok(&["send", &alice.key, "hi alice"]);
    assert_eq!(alice.recv(), vec![format!("{}: hi alice", short(&bob))]);
    assert_eq!(bob.ok(&["group", "list"]).lines().count(), 1, "one conversation both ways");
}

#[test]
fn a_strangers_group_invitation_waits_and_accept_joins_for_later_messages() {
    let (_dir, _server, alice, bob) = strangers();
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", &bob.key]);
    alice.ok(&["send", "#team", "before you said yes"]);
    let r = bob.run(&["recv"]);
    assert_eq!(r.stdout, "");
    assert!(
        r.stderr.contains(&format!(
            "message request from {} to #team: \u{201c}before you said yes",
            short(&alice)
        )),
        "{}",
        r.stderr
    );
    assert!(bob.fails(&["send", "#team", "x"]).contains("no group named #team"));
    let list = bob.ok(&["requests"]);
    assert!(list.contains("invites you to #team") && list.contains("before you said yes"), "{list}");

    let accepted = untimed(&bob.ok(&["requests", "accept", &alice.key]));
    assert_eq!(accepted.trim(), format!("[#team] {}: before you said yes", short(&alice)));
    alice.ok(&["send", "#team", "after"]);
    assert_eq!(bob.recv(), vec![format!("[#team] {}: after", short(&alice))]);
    bob.ok(&["send", "#team", "thanks"]);
    assert_eq!(alice.recv(), vec![format!("[#team] {}: thanks", short(&bob))]);
}

/// Found by exploratory testing: `requests accept` printed the messages that waited, then
/// every membership change their commits brought, so "carol is here" read as said before
/// carol was added. One terminal now reads them in the order they happened.
#[test]
fn requests_accept_says_the_changes_in_their_places_among_the_messages() {
    let (_dir, server, alice, bob) = strangers();
    let carol = User::init(&server, "carol");
    common::a_strangers_group_with_a_change_between(&alice, &bob, &carol);
    bob.recv();
    let said = untimed(&bob.merged(&["requests", "accept", "#1"]));
    let lines: Vec<&str> = said.lines().collect();
    let at =
        |what: &str| lines.iter().position(|l| l.contains(what)).unwrap_or_else(|| panic!("{what}: {said}"));
    let (joined, hi, added, here) =
        (at("you were added to #team"), at(": hi all"), at("added ~carol"), at(": carol is here"));
    assert!(joined < hi && hi < added && added < here, "{said}");
    assert_eq!(lines.len(), 4, "{said}");
}

/// Found by exploratory testing: after `requests decline` (or a block and an unblock), every
/// later message of the stranger was lost without a word on either side, since their client
/// writes into the conversation we declined. The next one now comes as a new request; and
/// writing to them takes up that conversation rather than opening a second one.
#[test]
fn a_declined_strangers_next_message_comes_as_a_new_request() {
    let (_dir, _server, alice, bob) = strangers();
    alice.ok(&["send", &bob.key, "first try"]);
    bob.recv();
    // A commit of the conversation waits with it too (review: the decline dropped it, and the
    // request that came back could not read anything past it).
    alice.ok(&["name", "set", "Ally"]);
    bob.recv();
    assert_eq!(bob.ok(&["requests", "decline", "#1"]).trim(), "declined 1 request");
    alice.ok(&["send", &bob.key, "second try"]);
    let r = bob.run(&["recv"]);
    assert!(r.ok && r.stdout.is_empty(), "{}", r.stdout);
    assert!(r.stderr.contains("message request from") && r.stderr.contains("second try"), "{}", r.stderr);
    let accepted = untimed(&bob.ok(&["requests", "accept", "#2"]));
    assert_eq!(accepted.lines().count(), 1, "what came before the decline is gone: {accepted}");
    assert!(accepted.trim().ends_with(": second try"), "{accepted}");
    bob.ok(&["send", &alice.key, "ok, hello"]);
    assert_eq!(alice.recv(), vec![format!("{}: ok, hello", short(&bob))]);

    // Blocked, then unblocked: silent while blocked, a request again after.
    bob.ok(&["requests", "block", &alice.key]);
    alice.ok(&["send", &bob.key, "while blocked"]);
    let r = bob.run(&["recv"]);
    assert!(r.ok && r.stdout.is_empty() && !r.stderr.contains("request"), "{}{}", r.stdout, r.stderr);
    bob.ok(&["requests", "unblock", &alice.key]);
    alice.ok(&["send", &bob.key, "after the unblock"]);
    let shown = bob.recv();
    assert!(
        shown.len() == 1 && shown[0].ends_with(": after the unblock"),
        "accepted before: shown: {shown:?}"
    );

    // A declined request answered by writing: one conversation on both sides.
    let carol = User::init(&_server, "carol");
    carol.ok(&["send", &bob.key, "carol here"]);
    bob.recv();
    bob.ok(&["requests", "decline", &carol.key]);
    bob.ok(&["send", &carol.key, "changed my mind"]);
    assert_eq!(carol.recv(), vec![format!("{}: changed my mind", short(&bob))]);
    assert_eq!(carol.ok(&["group", "list"]).lines().count(), 1, "{}", carol.ok(&["group", "list"]));
    carol.ok(&["send", &bob.key, "good"]);
    assert_eq!(bob.recv(), vec![format!("{}: good", short(&carol))]);

    // A request blocked, then its sender unblocked: their next message is a request again.
    let dave = User::init(&_server, "dave");
    dave.ok(&["send", &bob.key, "dave here"]);
    bob.recv();
    bob.ok(&["requests", "block", &dave.key]);
    dave.ok(&["send", &bob.key, "still dave"]);
    let r = bob.run(&["recv"]);
    assert!(r.ok && r.stdout.is_empty() && !r.stderr.contains("request"), "{}{}", r.stdout, r.stderr);
    bob.ok(&["requests", "unblock", &dave.key]);
    dave.ok(&["send", &bob.key, "dave again"]);
    let r = bob.run(&["recv"]);
    assert!(r.stderr.contains("message request from") && r.stderr.contains("dave again"), "{}", r.stderr);
}

/// Found by exploratory testing: `requests block` stopped a key's invitations, but not the
/// conversation accepted before (nor its messages in a group we share), though the README
/// promises it drops "everything that key sends from then on".
#[test]
fn a_block_silences_an_accepted_conversation_and_shared_groups_until_unblocked() {
    let (dir, server, alice, bob) = strangers();
    let carol = User::init(&server, "carol");
    common::introduce(&[&alice, &carol]);
    carol.add_contact(&bob);
    bob.add_contact(&carol);
    alice.ok(&["send", &bob.key, "hello bob"]);
    bob.recv();
    bob.ok(&["requests", "accept", "#1"]);
    carol.ok(&["group", "create", "team"]);
    carol.ok(&["group", "add", "team", "bob", "alice"]);
    bob.recv();
    alice.recv();

    bob.ok(&["requests", "block", &alice.key]);
    alice.ok(&["send", &bob.key, "blocked words"]);
    alice.ok(&["send", "#team", "blocked in the group"]);
    carol.ok(&["send", "#team", "carol still speaks"]);
    let r = bob.run(&["recv"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(untimed(&r.stdout).trim(), "[#team] carol: carol still speaks", "{}", r.stderr);
    assert!(!r.stderr.contains("blocked"), "without a word: {}", r.stderr);
    let history = untimed(&bob.ok(&["history"]));
    assert!(!history.contains("blocked words") && !history.contains("blocked in the group"), "{history}");

    bob.ok(&["requests", "unblock", &alice.key]);
    alice.ok(&["send", &bob.key, "heard again"]);
    assert_eq!(bob.recv(), vec![format!("{}: heard again", short(&alice))]);
    drop((dir, server));
}

#[test]
fn a_blocked_key_is_dropped_silently_and_stays_blocked() {
    let (_dir, _server, alice, bob) = strangers();
    alice.ok(&["send", &bob.key, "let me in"]);
    bob.recv();
    let out = bob.ok(&["requests", "block", "#1"]);
    assert!(out.contains(&format!("blocked {}", alice.key)), "{out}");
    let list = bob.ok(&["requests"]);
    assert!(list.contains("no message requests") && list.contains("1 blocked"), "{list}");
    assert_eq!(bob.ok(&["requests", "blocked"]).trim(), alice.key);

    // Everything after the block, invitations and messages, vanishes without a word.
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", &bob.key]);
    alice.ok(&["send", "#team", "still here"]);
    let r = bob.run(&["recv"]);
    assert!(r.ok && r.stdout.is_empty(), "{}", r.stdout);
    assert!(!r.stderr.contains("request"), "{}", r.stderr);
    assert!(bob.ok(&["requests"]).contains("no message requests"));
    assert_eq!(bob.ok(&["group", "list"]), "");

    // The block persisted across processes; unblocking lets the next invitation through.
    bob.ok(&["requests", "unblock", &alice.key]);
    assert!(bob.fails(&["requests", "unblock", &alice.key]).contains("is not blocked"));
    alice.ok(&["group", "create", "second"]);
    alice.ok(&["group", "add", "second", &bob.key]);
    bob.recv();
    assert!(bob.ok(&["requests"]).contains("invites you to #second"));
}

/// A request keeps the number it was listed with: `block #2` after `block #1` blocks the
/// request listed as #2 (numbers were positions, so it blocked the one listed as #3).
#[test]
fn a_request_keeps_its_number_when_an_earlier_one_goes() {
    let (dir, server, alice, bob) = strangers();
    let carol = User::init(&server, "carol");
    let dave = User::init(&server, "dave");
    for (n, who) in [&alice, &carol, &dave].into_iter().enumerate() {
        who.ok(&["send", &bob.key, "hello from a stranger"]);
        let r = bob.run(&["recv"]);
        assert!(r.stderr.contains(&format!("qpq requests accept {} (or", n + 1)), "{}", r.stderr);
    }
    let list = bob.ok(&["requests"]);
    assert!(list.contains(&format!("#2 {}", carol.key)), "{list}");
    assert!(bob.ok(&["requests", "block", "#1"]).contains(&alice.key));
    let out = bob.ok(&["requests", "block", "#2"]);
    assert!(out.contains(&carol.key), "#2 is still carol's: {out}");
    let list = bob.ok(&["requests"]);
    assert!(list.starts_with(&format!("#3 {}", dave.key)), "dave's request kept its number: {list}");
    assert!(bob.fails(&["requests", "accept", "#1"]).contains("no message request #1"));

    // A number is never given again: the next request is #4, even after the list empties.
    // (A bare number works too, as the notices suggest it: `#3` unquoted is a shell comment.)
    assert!(!bob.ok(&["requests", "accept", "3"]).is_empty());
    assert!(bob.ok(&["requests"]).contains("no message requests"));
    let erin = User::init(&server, "erin");
    erin.ok(&["send", &bob.key, "and me"]);
    let r = bob.run(&["recv"]);
    assert!(r.stderr.contains("qpq requests accept 4 (or"), "{}", r.stderr);
    assert!(bob.fails(&["requests", "accept", "#3"]).contains("no message request #3"));
    assert!(bob.fails(&["requests", "block", "3"]).contains("no message request #3"));
    drop(dir);
}

#[test]
fn a_contacts_invitation_still_joins_at_once() {
    let (_dir, _server, [alice, bob]) = cast(["alice", "bob"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    alice.ok(&["send", "#team", "hi team"]);
    let r = bob.run(&["recv"]);
    assert!(r.stderr.contains("you were added to #team by alice"), "{}", r.stderr);
    assert_eq!(untimed(&r.stdout).trim(), "[#team] alice: hi team");
    assert!(bob.ok(&["requests"]).contains("no message requests"));
}

#[test]
fn an_unanswered_request_expires() {
    let (_dir, _server, alice, bob) = strangers();
    alice.ok(&["send", &bob.key, "anyone there?"]);
    bob.recv();
    let day = 24 * 3600;
    let out = run_at(&bob, 29 * day, &["requests"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("anyone there?"), "still there after 29 days");
    let out = run_at(&bob, 31 * day, &["requests"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no message requests");
    // Gone for good, also at the real time again.
    assert!(bob.ok(&["requests"]).contains("no message requests"));
    assert!(bob.fails(&["requests", "accept", "#1"]).contains("no message request #1"));
}

#[test]
fn replying_to_a_request_accepts_it() {
    let (_dir, _server, alice, bob) = strangers();
    alice.ok(&["send", &bob.key, "hello?"]);
    bob.ok(&["send", &alice.key, "hello yourself"]);
    assert!(bob.ok(&["requests"]).contains("no message requests"));
    assert_eq!(bob.ok(&["group", "list"]).lines().count(), 1, "the request's conversation is reused");
    assert_eq!(alice.recv(), vec![format!("{}: hello yourself", short(&bob))]);
    // What waited with the request is read like any message: replying did not hide it.
    assert_eq!(bob.recv(), vec![format!("{}: hello?", short(&alice))]);
}

#[test]
fn request_commands_refuse_what_does_not_exist() {
    let (_dir, _server, _alice, bob) = strangers();
    assert!(bob.fails(&["requests", "accept", "#1"]).contains("no message request #1"));
    assert!(bob.fails(&["requests", "block", "#0"]).contains("no message request #0"));
    assert!(bob.fails(&["requests", "accept", "nobody"]).contains("unknown contact"));
    assert!(bob.fails(&["requests", "block", &bob.key]).contains("your own key"));
}

// ----- a flood from strangers -----

/// Bytes one attack round enqueues (about 200 MiB); [`ATTACK_ROUNDS`] rounds make ~1 GiB.
const ROUND_BYTES: usize = 200 * 1024 * 1024;
const ATTACK_ROUNDS: usize = 5;
/// Real strangers per round, each with a real Welcome (a direct conversation) and messages.
const STRANGERS_PER_ROUND: usize = 8;
const MESSAGES_PER_STRANGER: usize = 3;
/// Largest payload of the attack (the server's limit is raised to let it through).
const JUNK_PAYLOAD: usize = 1024 * 1024;

/// One round: real strangers open direct conversations with `victim` (real MLS Welcomes, real
/// application messages of nearly the largest text), then sealed frames for groups that do not
/// exist, sealed Welcomes that are not Welcomes, and raw junk, up to [`ROUND_BYTES`]. Returns
/// the bytes the server accepted.
async fn attack_round(server: &ServerProcess, victim: [u8; 32], round: usize) -> usize {
    use qpq::client::frame::{AppMessage, Frame};
    use qpq::client::parcel::Parcel;
    use qpq::client::session::Session;
    use qpq::client::state::GroupKind;
    use qpq::crypto::{hybrid, identity::Identity};
    use qpq::mls::MlsClient;

    let session = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
    let hybrid_key = session.fetch_hybrid_key(&victim).await.unwrap().verify(&victim).unwrap();
    let mut sent = 0;
    let sealed_for_victim =
        |frame: &[u8]| Parcel::Sealed(&hybrid::seal(&victim, &hybrid_key, frame)).encode();
    let enqueue = async |payload: Vec<u8>, channel: &[u8]| {
        session.enqueue(&victim, &payload, channel).await.expect("the raised limits admit it");
        payload.len()
    };
    for s in 0..STRANGERS_PER_ROUND {
        let stranger = Identity::generate();
        let mut mls = MlsClient::new(stranger.seed()).unwrap();
        let group_id = rand::random::<[u8; 16]>().to_vec();
        mls.create_group(&group_id).unwrap();
        let kp = session.fetch_key_package(&victim).await.unwrap().bytes;
        let pending = mls.add_members(&group_id, &[kp]).unwrap();
        mls.merge_pending(&group_id).unwrap();
        let welcome = Frame::Welcome {
            welcome: pending.welcome.unwrap(),
            group_name: String::new(),
            kind: GroupKind::Direct { peer: victim },
            inviter: stranger.public().0,
        };
        sent += enqueue(sealed_for_victim(&welcome.encode()), &[]).await;
        for i in 0..MESSAGES_PER_STRANGER {
            let mut text = format!("stranger {round}-{s} says {i} ");
            text.extend(std::iter::repeat_n('x', 190 * 1024));
            let body = AppMessage { text, sent_at_ms: 0 }.encode();
            let message = mls.encrypt(&group_id, &body).unwrap();
            let frame = Frame::Mls { group_id: group_id.clone(), message }.encode();
            sent += enqueue(Parcel::Group(&frame).encode(), &group_id).await;
        }
    }
    let junk = vec![0x5a_u8; JUNK_PAYLOAD - 4096];
    for i in 0..4 {
        // Well sealed, for a group nobody invited us to (an orphan at best), and sent twice:
        // a replayed envelope opens as well as the first.
        let frame = Frame::Mls {
            group_id: rand::random::<[u8; 16]>().to_vec(),
            message: junk[..512 * 1024].to_vec(),
        };
        let sealed = sealed_for_victim(&frame.encode());
        sent += enqueue(sealed.clone(), &[i]).await;
        sent += enqueue(sealed, &[i]).await;
    }
    for _ in 0..4 {
        let frame = Frame::Welcome {
            welcome: junk[..64 * 1024].to_vec(),
            group_name: "x".repeat(64),
            kind: GroupKind::Group,
            inviter: [7; 32],
        };
        sent += enqueue(sealed_for_victim(&frame.encode()), &[]).await;
    }
    // Raw junk, many calls in flight at once so the server folds them into few transactions.
    let raw = |_| session.enqueue(&victim, &junk, b"junk");
    while sent < ROUND_BYTES {
        for r in futures::future::join_all((0..16).map(raw)).await {
            r.expect("the raised limits admit it");
            sent += junk.len();
        }
    }
    session.close().await;
    sent
}

#[test]
fn a_gigabyte_from_strangers_leaves_the_home_bounded_and_opening() {
    use qpq::limits::{MAX_REQUESTS, MAX_STRANGER_BYTES};

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "max_payload_bytes = {}\nmax_queue_bytes = {}\nmax_queue_messages = 1000000\n",
        JUNK_PAYLOAD,
        4 * ROUND_BYTES
    );
    let server = ServerProcess::start_with_config(dir.path(), &config);
    let bob = User::init(&server, "bob");
    let victim = PublicKey::parse_hex(&bob.key).unwrap().0;
    let before = bob.state_stored_bytes() as usize;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut sent, mut largest) = (0, 0);
    for round in 0..ATTACK_ROUNDS {
        sent += rt.block_on(tokio::task::LocalSet::new().run_until(attack_round(&server, victim, round)));
        let r = bob.run(&["recv"]);
        assert!(r.ok, "recv after round {round}: {}", r.stderr);
        assert_eq!(r.stdout, "", "no stranger's text reaches the screen");
        let size = bob.state_stored_bytes() as usize;
        largest = largest.max(size);
        assert!(
            size <= before + MAX_STRANGER_BYTES,
            "round {round}: home {size} bytes > {before} + {MAX_STRANGER_BYTES} after {sent} bytes sent"
        );
    }
    println!("strangers sent {sent} bytes; the home went from {before} to at most {largest} bytes");
    assert!(sent >= ATTACK_ROUNDS * ROUND_BYTES);

    // The home still opens, the requests are capped, and the first one still joins.
    let list = bob.ok(&["requests", "--json"]);
    assert_eq!(list.lines().count(), MAX_REQUESTS, "{ATTACK_ROUNDS}x{STRANGERS_PER_ROUND} strangers wrote");
    // What a request holds is bounded, and the newest chat is what it keeps.
    let accepted = untimed(&bob.ok(&["requests", "accept", "#1"]));
    let newest = format!("stranger 0-0 says {} ", MESSAGES_PER_STRANGER - 1);
    assert!(accepted.contains(&newest), "{}", &accepted[..accepted.len().min(200)]);
    bob.ok(&["group", "list"]);
}
