//! Several `qpq serve` nodes over one PostgreSQL database (issue 13): every node presents the
//! same certificate (node B gets node A's cert.pem and key.pem, as an operator copies them),
//! clients on different nodes talk to each other, a `fetchWait` parked on one node wakes on an
//! enqueue on another, and a node killed with SIGKILL loses nothing it acknowledged.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{Backend, ServerProcess, User, introduce, local, login, start_server_with};
use qpq::client::session::Session;
use qpq::crypto::identity::Identity;
use qpq::transport::{CERT_FILE, KEY_FILE};

/// Gives `to` the certificate and key `from` generated: the operator's copy step.
fn share_certificate(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [CERT_FILE, KEY_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Two real `qpq serve` binaries on one fresh PostgreSQL database, one certificate.
fn two_nodes(root: &Path) -> (ServerProcess, ServerProcess) {
    common::use_backend(Backend::postgres());
    let (dir_a, dir_b) = (root.join("a"), root.join("b"));
    let a = ServerProcess::start(&dir_a);
    share_certificate(&dir_a, &dir_b);
    let b = ServerProcess::start(&dir_b);
    assert_eq!(a.fingerprint, b.fingerprint, "both nodes present one certificate");
    (a, b)
}

fn epoch_of(u: &User, group: &str) -> String {
    let list = u.ok(&["group", "list"]);
    let line = list.lines().find(|l| l.starts_with(&format!("#{group} "))).expect("group listed").to_string();
    line.rsplit("epoch ").next().unwrap_or("").trim_end_matches(')').to_string()
}

fn members_of(u: &User, group: &str) -> Vec<String> {
    let mut v: Vec<String> = u
        .ok(&["group", "members", group])
        .lines()
        .map(|l| l.split(' ').next().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn alice_on_node_a_and_bob_on_node_b_chat_and_form_a_group() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(root.path());
    let alice = User::init(&a, "alice");
    let bob = User::init(&b, "bob");
    let carol = User::init(&a, "carol");
    introduce(&[&alice, &bob, &carol]);

    alice.ok(&["send", "bob", "hello from node a"]);
    assert_eq!(bob.recv(), vec!["alice: hello from node a"]);
    bob.ok(&["send", "alice", "hi from node b"]);
    assert_eq!(alice.recv(), vec!["bob: hi from node b"]);

    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob", "carol"]);
    bob.recv();
    carol.recv();
    bob.ok(&["send", "#team", "bob here"]);
    assert_eq!(alice.recv(), vec!["[#team] bob: bob here"]);
    assert_eq!(carol.recv(), vec!["[#team] bob: bob here"]);
    let epoch = epoch_of(&alice, "team");
    for u in [&bob, &carol] {
        assert_eq!(epoch_of(u, "team"), epoch, "{} is in alice's epoch", u.name);
    }
}

/// Two members on different nodes commit in the same epoch at the same moment: the database
/// orders the two commits on the group's channel, one wins, the other is retried, and all four
/// end in one epoch with the same members.
#[test]
fn a_commit_race_across_nodes_converges() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(root.path());
    let alice = User::init(&a, "alice");
    let bob = User::init(&b, "bob");
    let carol = User::init(&a, "carol");
    let dave = User::init(&b, "dave");
    introduce(&[&alice, &bob, &carol, &dave]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    bob.recv();
    let (ra, rb) =
        (alice.spawn(&["group", "add", "team", "carol"]), bob.spawn(&["group", "add", "team", "dave"]));
    let (ra, rb) = (ra.wait_with_output().unwrap(), rb.wait_with_output().unwrap());
    assert!(ra.status.success(), "alice: {}", String::from_utf8_lossy(&ra.stderr));
    assert!(rb.status.success(), "bob: {}", String::from_utf8_lossy(&rb.stderr));
    for u in [&alice, &bob, &carol, &dave] {
        u.recv();
    }
    let epoch = epoch_of(&alice, "team");
    let members = members_of(&alice, "team");
    assert_eq!(members.len(), 4, "both additions landed: {members:?}");
    for u in [&bob, &carol, &dave] {
        assert_eq!(epoch_of(u, "team"), epoch, "{} is in the same epoch", u.name);
        assert_eq!(members_of(u, "team"), members, "{} sees the same members", u.name);
    }
    for u in [&alice, &bob, &carol, &dave] {
        u.ok(&["send", "#team", &format!("from {}", u.name)]);
    }
    for u in [&alice, &bob, &carol, &dave] {
        let got = u.recv();
        assert_eq!(got.len(), 3, "{} got {got:?}", u.name);
    }
}

/// A `fetchWait` on node B whose timeout is shorter than the fallback poll: only node A's
/// NOTIFY can wake it with the message before it times out empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_wait_on_node_b_wakes_on_an_enqueue_on_node_a() {
    let root = tempfile::tempdir().unwrap();
    common::use_backend(Backend::postgres());
    let a = start_server_with(common::server_config(&root.path().join("a"))).await;
    // Node B takes node A's certificate through the `cert`/`key` settings.
    let mut cfg_b = common::server_config(&root.path().join("b"));
    cfg_b.cert = Some(root.path().join("a").join(CERT_FILE));
    cfg_b.key = Some(root.path().join("a").join(KEY_FILE));
    let b = start_server_with(cfg_b).await;
    assert_eq!(a.fingerprint(), b.fingerprint());
    let timeout_ms = u32::try_from(qpq::limits::PG_FALLBACK_POLL_MS / 2).unwrap();
    local(async {
        let bob = Identity::generate();
        let on_b = login(&b, &bob).await;
        let on_a = common::connect(&a).await;
        assert_eq!(on_b.server_instance(), {
            let mut s = common::connect(&a).await;
            s.authenticate(&bob).await.unwrap();
            s.server_instance()
        });
        for round in 0..3u8 {
            let wait = on_b.fetch_wait(timeout_ms, 0);
            let send = async {
                // Yield once so the wait is sent first; it finds the message either way.
                tokio::task::yield_now().await;
                on_a.enqueue(&bob.public().0, &[round + 1], b"").await.unwrap()
            };
            let ((msgs, _), _) = tokio::join!(async { wait.await.unwrap() }, send);
            assert_eq!(msgs.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![vec![round + 1]]);
            on_b.ack(msgs[0].seq).await.unwrap();
        }
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Node A is killed with SIGKILL while four clients enqueue through it: every enqueue it
/// acknowledged is fetched through node B, and the clients go on through node B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_node_a_mid_load_loses_no_acknowledged_message() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(root.path());
    let (addr_a, addr_b, pin) = (a.addr.to_string(), b.addr.to_string(), a.pin());
    let alice = Identity::generate();
    let acked = local(async {
        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(Session::connect(&addr_a, pin.clone()).await.unwrap());
        }
        let acked = std::cell::RefCell::new(Vec::<Vec<u8>>::new());
        let killed = std::cell::Cell::new(false);
        let active = std::cell::Cell::new(sessions.len());
        let progress = tokio::sync::Notify::new();
        let mut node_a = Some(a);
        let workers = sessions.iter().enumerate().map(|(w, s)| {
            let (acked, killed, active, progress) = (&acked, &killed, &active, &progress);
            let key = alice.public().0;
            async move {
                for i in 0..10_000u32 {
                    let payload = format!("w{w}-m{i}").into_bytes();
                    let call = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        s.enqueue(&key, &payload, b""),
                    );
                    match call.await {
                        Ok(Ok(_)) => acked.borrow_mut().push(payload),
                        Err(_) if !killed.get() => {}
                        _ => break,
                    }
                    progress.notify_one();
                }
                active.set(active.get() - 1);
                progress.notify_one();
            }
        });
        let killer = async {
            while acked.borrow().len() < 200 && active.get() > 0 {
                progress.notified().await;
            }
            killed.set(true);
            if let Some(p) = node_a.take() {
                p.kill9();
            }
        };
        tokio::join!(futures::future::join_all(workers), killer);
        acked.into_inner()
    })
    .await;
    assert!(acked.len() >= 200, "only {} enqueues were acknowledged before the kill", acked.len());
    let stored = local(async {
        // The clients of the dead node reconnect to the other one, which has the same pin.
        let sender = Session::connect(&addr_b, pin.clone()).await.unwrap();
        sender.enqueue(&alice.public().0, b"after the kill", b"").await.unwrap();
        let mut s = Session::connect(&addr_b, pin.clone()).await.unwrap();
        s.authenticate(&alice).await.unwrap();
        let mut all = HashSet::new();
        let mut last = 0;
        loop {
            let (msgs, more) = s.fetch(0).await.unwrap();
            for m in &msgs {
                all.insert(m.payload.clone());
                last = m.seq;
            }
            s.ack(last).await.unwrap();
            if !more {
                break;
            }
        }
        all
    })
    .await;
    let missing: Vec<_> = acked.iter().filter(|p| !stored.contains(*p)).collect();
    assert!(missing.is_empty(), "{} acknowledged enqueues lost, e.g. {:?}", missing.len(), missing.first());
    assert!(stored.contains(&b"after the kill"[..]), "node b serves the dead node's clients");
    drop(b);
}

/// The database refuses the node (connections cut, new ones refused): calls that need it fail
/// with the `unavailable` code, health still answers, nothing acknowledged is lost, and the
/// node serves again as soon as the database is back, without a restart. What the failed
/// enqueues took of the network's mail budget is given back: clients retrying through an
/// outage are not rate limited for it afterwards (this was untested: without the refund the
/// retries below spend the budget twice over and end `rateLimited`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_a_clear_error_and_the_node_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::postgres();
    let Backend::Postgres(url) = &backend else { unreachable!() };
    let db = url.rsplit('/').next().unwrap().to_string();
    common::use_backend(backend.clone());
    let mut config = common::server_config(dir.path());
    // 1000 bytes and (next to) no refill: "before" and "after" fit, the retries' 20 × 117 do not.
    config.rate_limits.enqueue_bytes_per_network =
        qpq::server::ratelimit::Rate { per_sec: 0.001, burst: 1000 };
    let server = start_server_with(config).await;
    let cluster = common::pg::Cluster::get();
    local(async {
        let alice = Identity::generate();
        let sender = common::connect(&server).await;
        sender.enqueue(&alice.public().0, b"before", b"").await.unwrap();
        cluster.psql(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"));
        cluster
            .psql(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"));
        for _ in 0..20 {
            let err = sender.enqueue(&alice.public().0, &[7; 100], b"").await.unwrap_err();
            assert_eq!(err.code(), Some(qpq::proto::wire_error::ErrorCode::Unavailable), "{err}");
            assert!(err.to_string().contains("storage unavailable"), "{err}");
        }
        assert_eq!(sender.health().await.unwrap().status, "ok");
        cluster.psql(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
        sender.enqueue(&alice.public().0, b"after", b"").await.unwrap();
        let a = login(&server, &alice).await;
        let (msgs, _) = a.fetch(0).await.unwrap();
        let got: Vec<_> = msgs.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(got, vec![b"before".to_vec(), b"after".to_vec()]);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Batches on one channel sent at the same time through both nodes: every batch gets its own
/// `channelSeq`, each recipient's `seq` numbers are dense and unique, and both recipients see
/// the batches in the same order, which is channel order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_through_two_nodes_keep_one_order_and_dense_seqs() {
    let root = tempfile::tempdir().unwrap();
    common::use_backend(Backend::postgres());
    let a = start_server_with(common::server_config(&root.path().join("a"))).await;
    let mut cfg_b = common::server_config(&root.path().join("b"));
    cfg_b.cert = Some(root.path().join("a").join(CERT_FILE));
    cfg_b.key = Some(root.path().join("a").join(KEY_FILE));
    let b = start_server_with(cfg_b).await;
    local(async {
        let members: Vec<Identity> = (0..2).map(|_| Identity::generate()).collect();
        let keys: Vec<_> = members.iter().map(|m| m.public()).collect();
        let mut senders = Vec::new();
        for i in 0..6 {
            senders.push(common::connect(if i % 2 == 0 { &a } else { &b }).await);
        }
        let sends = (0..60u8).map(|i| {
            let s = &senders[i as usize % senders.len()];
            let items: Vec<_> = keys.iter().map(|k| (*k, vec![i])).collect();
            async move { s.enqueue_batch(b"team", &items).await.unwrap() }
        });
        let results = futures::future::join_all(sends).await;
        let cseqs: HashSet<u64> = results.iter().map(|r| r.0).collect();
        assert_eq!(cseqs.len(), 60, "every batch got its own channel position");
        let mut orders = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let s = login(if i == 0 { &a } else { &b }, m).await;
            let (msgs, more) = s.fetch(0).await.unwrap();
            assert!(!more);
            let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=60).collect::<Vec<u64>>(), "dense, unique, in order");
            let by_seq: Vec<u64> = msgs.iter().map(|m| m.channel_seq).collect();
            let mut sorted = by_seq.clone();
            sorted.sort();
            assert_eq!(by_seq, sorted, "queue order is channel order");
            orders.push(msgs.iter().map(|m| m.payload[0]).collect::<Vec<_>>());
        }
        assert_eq!(orders[0], orders[1]);
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Fanouts whose recipients all ack at once, half through each node: every ack takes its ref
/// off the shared payload rows while the others do the same, and when the last one is done no
/// payload row, entry or charge is left (a lost decrement would leave a row charged forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_fanout_payloads_go_with_the_last_of_many_concurrent_acks_on_two_nodes() {
    let root = tempfile::tempdir().unwrap();
    let backend = Backend::postgres();
    let Backend::Postgres(url) = backend.clone() else { unreachable!() };
    common::use_backend(backend);
    let a = start_server_with(common::server_config(&root.path().join("a"))).await;
    let mut cfg_b = common::server_config(&root.path().join("b"));
    cfg_b.cert = Some(root.path().join("a").join(CERT_FILE));
    cfg_b.key = Some(root.path().join("a").join(KEY_FILE));
    let b = start_server_with(cfg_b).await;
    let cluster = common::pg::Cluster::get();
    local(async {
        let members: Vec<Identity> = (0..12).map(|_| Identity::generate()).collect();
        let keys: Vec<_> = members.iter().map(|m| m.public()).collect();
        let sender = common::connect(&a).await;
        for i in 0..5u8 {
            sender.enqueue_fanout(b"team", &[i; 300], &keys).await.unwrap();
        }
        assert_eq!(cluster.query(&url, "SELECT count(*) FROM qpq_payloads"), "5", "one row per fanout");
        let mut sessions = Vec::new();
        for (i, m) in members.iter().enumerate() {
            sessions.push(login(if i % 2 == 0 { &a } else { &b }, m).await);
        }
        let acks = sessions.iter().map(|s| async move { s.ack(u64::MAX).await.unwrap() });
        let removed = futures::future::join_all(acks).await;
        assert_eq!(removed, vec![5; 12], "each recipient acked its five entries");
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let left = cluster.query(
        &url,
        "SELECT (SELECT count(*) FROM qpq_payloads) || ' ' || (SELECT count(*) FROM qpq_entries) || ' ' ||
                (SELECT coalesce(sum(bytes), 0) FROM qpq_stored_bytes)",
    );
    assert_eq!(left, "0 0 0", "payload rows, entries, stored bytes");
}

/// Acks count although they no longer lock the queue row (schema version 3, issue 13): a queue
/// filled to its cap through node A and emptied by acks through both nodes at once reads empty
/// (enqueued − freed, in messages and bytes), takes a whole cap-sized burst again through both
/// nodes, and once swept leaves no queue or freed row, while its numbers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_through_two_nodes_make_room_for_a_cap_sized_burst_again() {
    const CAP: u64 = 6;
    let root = tempfile::tempdir().unwrap();
    let backend = Backend::postgres();
    let Backend::Postgres(url) = backend.clone() else { unreachable!() };
    common::use_backend(backend);
    let mut cfg_a = common::server_config(&root.path().join("a"));
    cfg_a.max_queue_messages = CAP;
    let a = start_server_with(cfg_a).await;
    let mut cfg_b = common::server_config(&root.path().join("b"));
    cfg_b.max_queue_messages = CAP;
    cfg_b.cert = Some(root.path().join("a").join(CERT_FILE));
    cfg_b.key = Some(root.path().join("a").join(KEY_FILE));
    let b = start_server_with(cfg_b).await;
    let cluster = common::pg::Cluster::get();
    let bob = Identity::generate();
    let key = hex::encode(bob.public().0);
    let held = format!(
        "SELECT coalesce(sum(q.count - coalesce(f.count, 0)), -1) || ' ' || coalesce(sum(q.bytes - coalesce(f.bytes, 0)), -1)
         FROM qpq_queues q LEFT JOIN qpq_queue_freed f ON f.recipient = q.recipient
         WHERE q.recipient = '\\x{key}'"
    );
    local(async {
        let mut senders = Vec::new();
        for i in 0..CAP {
            senders.push(common::connect(if i % 2 == 0 { &a } else { &b }).await);
        }
        for i in 0..CAP as u8 {
            senders[0].enqueue(&bob.public().0, &[i; 40], b"").await.unwrap();
        }
        let full = senders[1].enqueue(&bob.public().0, b"over", b"").await.unwrap_err();
        assert_eq!(full.code(), Some(qpq::proto::wire_error::ErrorCode::QueueFull), "{full}");
        // Acks through both nodes at once, each removing its share.
        let on_a = login(&a, &bob).await;
        let on_b = login(&b, &bob).await;
        let (x, y, z) = tokio::join!(on_a.ack(2), on_b.ack(4), on_b.ack(CAP));
        assert_eq!(x.unwrap() + y.unwrap() + z.unwrap(), CAP as u32, "each message removed once");
        assert_eq!(cluster.query(&url, &held), "0 0", "the store holds nothing for bob");
        // A whole cap again, at once through both nodes: none may be refused.
        let bob_key = bob.public().0;
        let burst = senders.iter().map(|s| s.enqueue(&bob_key, b"again", b""));
        let seqs: HashSet<u64> =
            futures::future::join_all(burst).await.into_iter().map(|r| r.unwrap().0).collect();
        assert_eq!(seqs, (CAP + 1..=2 * CAP).collect::<HashSet<u64>>(), "numbers go on");
        let full = senders[0].enqueue(&bob.public().0, b"over", b"").await.unwrap_err();
        assert_eq!(full.code(), Some(qpq::proto::wire_error::ErrorCode::QueueFull), "{full}");
        assert_eq!(on_b.ack(u64::MAX).await.unwrap(), CAP as u32);
        a.sweep().await;
        assert_eq!(
            cluster.query(
                &url,
                "SELECT (SELECT count(*) FROM qpq_queues) || ' ' || (SELECT count(*) FROM qpq_queue_freed)"
            ),
            "0 0",
            "the sweep deleted the empty queue row and its freed row"
        );
        let (seq, _) = senders[1].enqueue(&bob.public().0, b"later", b"").await.unwrap();
        assert_eq!(seq, 2 * CAP + 1, "a re-created queue counts on from the floor");
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Issue 13: fetches that wait at one moment share read statements on PostgreSQL (one per fetch
/// was half of a node's round trips), and each still gets exactly its own page: its recipient,
/// after its seq, cut at its limit and byte budget, with `more` set when something was left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_share_read_statements_and_each_gets_its_own_page() {
    use qpq::store::{IdentityKey, Outcome, PgStore, WriteOp};
    let Backend::Postgres(url) = Backend::postgres() else { unreachable!("a postgres backend") };
    let limits = store_limits(1 << 20);
    let store = PgStore::open(&url, limits, qpq::clock::Clock::system()).await.unwrap();
    // Recipient i has i + 1 messages of 100 bytes, the k-th filled with byte 10 * i + k.
    let people: Vec<IdentityKey> = (0..8u8).map(|i| [i + 1; 32]).collect();
    let mut queued: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); people.len()];
    for (i, who) in people.iter().enumerate() {
        for k in 0..=i {
            let body = vec![(10 * i + k) as u8; 100];
            let op = WriteOp::Enqueue { channel: Vec::new(), items: vec![(*who, body.clone())] };
            let Outcome::Enqueued { seqs, .. } = store.write(op).await.unwrap() else {
                panic!("not enqueued")
            };
            queued[i].push((seqs[0], body));
        }
    }
    // Three requests per recipient: everything, after its first message at most two, and
    // everything within 150 bytes (one message, then `more`).
    let mut requests = Vec::new();
    for (i, who) in people.iter().enumerate() {
        let first = queued[i][0].0;
        requests.push((i, *who, 0u64, 100u32, 1usize << 20));
        requests.push((i, *who, first, 2, 1 << 20));
        requests.push((i, *who, 0, 100, 150));
    }
    let before = store.read_statements();
    let pages = futures::future::join_all(
        requests.iter().map(|(_, who, after, limit, max_bytes)| store.fetch(who, *after, *limit, *max_bytes)),
    )
    .await;
    let statements = store.read_statements() - before;
    for ((i, _, after, limit, max_bytes), page) in requests.iter().zip(pages) {
        let (msgs, more) = page.unwrap();
        let after_it: Vec<&(u64, Vec<u8>)> = queued[*i].iter().filter(|(seq, _)| seq > after).collect();
        let fit = if *max_bytes < 200 { 1 } else { *limit as usize };
        let want: Vec<(u64, Vec<u8>)> = after_it.iter().take(fit).map(|m| (*m).clone()).collect();
        let got: Vec<(u64, Vec<u8>)> = msgs.into_iter().map(|m| (m.seq, m.payload)).collect();
        assert_eq!(got, want, "recipient {i}, after {after}, limit {limit}, {max_bytes} bytes");
        assert_eq!(more, after_it.len() > want.len(), "more, recipient {i}, after {after}, limit {limit}");
    }
    assert!(
        statements < requests.len() as u64 / 2,
        "{} concurrent fetches took {statements} read statements",
        requests.len()
    );
    store.close();
}

/// Uploads of one identity through two nodes at once check its pool cap one after the other:
/// eight uploads of 60 packages against a cap of 200 store three, never more. Each upload
/// serialises on an advisory lock of its identity (schema version 6; before, an owner row that
/// some paths left behind for ever); without one, concurrent uploads count the same packages
/// and all pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_identity_through_two_nodes_keep_its_pool_cap() {
    use qpq::store::{KeyPackageEntry, Outcome, PgStore, StoreError, WriteOp};
    let Backend::Postgres(url) = Backend::postgres() else { unreachable!("a postgres backend") };
    let limits = store_limits(1 << 20);
    let clock = qpq::clock::Clock::system();
    let a = PgStore::open(&url, limits, clock.clone()).await.unwrap();
    let b = PgStore::open(&url, limits, clock.clone()).await.unwrap();
    assert_eq!(qpq::limits::MAX_KEY_PACKAGES_PER_IDENTITY, 200);
    let now = clock.now_secs();
    let who = [0x5au8; 32];
    let uploads = (0..8).map(|i| {
        let store = if i % 2 == 0 { &a } else { &b };
        // Distinct packages (the store keeps one copy of a package): upload i, package k.
        let packages = (0..60)
            .map(|k| KeyPackageEntry { not_after: now + 3600, bytes: [vec![i as u8], vec![k; 63]].concat() })
            .collect();
        store.write(WriteOp::UploadKeyPackages { who, packages, last_resort: None, now })
    });
    let results = futures::future::join_all(uploads).await;
    let stored = results.iter().filter(|r| matches!(r, Ok(Outcome::KeyPackagesStored { .. }))).count();
    let full = results.iter().filter(|r| matches!(r, Err(StoreError::PoolFull { .. }))).count();
    assert_eq!((stored, full), (3, 5), "{results:?}");
    assert_eq!(a.key_package_count(&who, now).await.unwrap(), (180, false));
}

/// Coalesced fetches stop loading once one statement holds two pages' worth of payload, and
/// the requests past that point are read again by another statement: twelve fetches of pages
/// of 6 MiB at once load at most ~19 MiB per statement (before, all of them: 72 MiB, and up to
/// ~1 GiB with 64 full queues, before the memory budget was asked for any of it), and every
/// fetch still gets exactly its page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_fetches_bound_what_one_statement_loads() {
    use qpq::store::{IdentityKey, Outcome, PgStore, WriteOp};
    let Backend::Postgres(url) = Backend::postgres() else { unreachable!("a postgres backend") };
    let limits = store_limits(64 << 20);
    let store = PgStore::open(&url, limits, qpq::clock::Clock::system()).await.unwrap();
    const MIB: usize = 1 << 20;
    let people: Vec<IdentityKey> = (0..12u8).map(|i| [0x80 + i; 32]).collect();
    let mut first_seqs = Vec::new();
    for (i, who) in people.iter().enumerate() {
        let mut seqs = Vec::new();
        for k in 0..3u8 {
            let op =
                WriteOp::Enqueue { channel: Vec::new(), items: vec![(*who, vec![i as u8 * 3 + k; 3 * MIB])] };
            let Outcome::Enqueued { seqs: s, .. } = store.write(op).await.unwrap() else {
                panic!("not enqueued")
            };
            seqs.push(s[0]);
        }
        first_seqs.push(seqs);
    }
    // Each page: two 3 MiB messages fit 8 MiB, the third is left (`more`).
    let pages = futures::future::join_all(people.iter().map(|who| store.fetch(who, 0, 100, 8 * MIB))).await;
    for (i, page) in pages.into_iter().enumerate() {
        let (msgs, more) = page.unwrap();
        let got: Vec<(u64, u8, usize)> =
            msgs.iter().map(|m| (m.seq, m.payload[0], m.payload.len())).collect();
        let want: Vec<(u64, u8, usize)> =
            (0..2).map(|k| (first_seqs[i][k], i as u8 * 3 + k as u8, 3 * MIB)).collect();
        assert_eq!((got, more), (want, true), "recipient {i}");
    }
    let largest = store.largest_read_statement_bytes();
    assert!(largest <= 16 * MIB + 3 * MIB, "one statement loaded {} MiB", largest / MIB);
    store.close();
}

/// The sweep deletes drained queue rows a slice at a time: 4097 drained queues take two sweep
/// transactions, the first saying more may be waiting. Before, one transaction locked and
/// deleted every drained queue of the service at once (acks leave their queue rows to the
/// sweep, so that is every recipient who emptied their queue since the last one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_drained_queues_a_slice_at_a_time() {
    use qpq::store::{IdentityKey, Outcome, PgStore, WriteOp};
    let Backend::Postgres(url) = Backend::postgres() else { unreachable!("a postgres backend") };
    let limits = store_limits(1 << 20);
    let clock = qpq::clock::Clock::system();
    let store = PgStore::open(&url, limits, clock.clone()).await.unwrap();
    let slice = qpq::limits::SWEEP_SLICE_ROWS;
    let people: Vec<IdentityKey> = (0..=slice as u32)
        .map(|i| {
            let mut k = [0xc3u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        })
        .collect();
    let items = people.iter().map(|who| (*who, b"m".to_vec())).collect();
    let Outcome::Enqueued { seqs, .. } =
        store.write(WriteOp::Enqueue { channel: Vec::new(), items }).await.unwrap()
    else {
        panic!("not enqueued")
    };
    let acks = people.iter().zip(seqs).map(|(who, seq)| store.write(WriteOp::Ack { who: *who, up_to: seq }));
    for acked in futures::future::join_all(acks).await {
        assert_eq!(acked.unwrap(), Outcome::Acked { removed: 1 });
    }
    let now = clock.now_ms();
    let first = store.write(WriteOp::Sweep { now_ms: now, after: Vec::new() }).await.unwrap();
    assert!(
        matches!(first, Outcome::Swept { resume: Some(_), .. }),
        "a full slice: more may wait: {first:?}"
    );
    let second = store.write(WriteOp::Sweep { now_ms: now, after: Vec::new() }).await.unwrap();
    assert!(matches!(second, Outcome::Swept { resume: None, .. }), "{second:?}");
    store.close();
}

/// Limits of the store-level tests above: roomy, with a queue of `max_bytes`.
/// Sets `default_transaction_read_only` cluster-wide (every session, the open ones at their
/// next command) and waits until a new session sees it.
fn set_read_only(c: &common::pg::Cluster, on: bool) {
    let value = if on { "on" } else { "off" };
    c.psql(&format!("ALTER SYSTEM SET default_transaction_read_only = {value}"));
    c.psql("SELECT pg_reload_conf()");
    for _ in 0..500 {
        if c.query(&c.url("postgres"), "SHOW default_transaction_read_only") == value {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the reload did not take");
}

/// Review: a read-only server (25006: the old primary after a failover, still up, while the
/// database's name now leads to the new one) was reported as unavailable, but the pooled
/// connections to it stayed pooled, so every write failed until the node restarted. Now a
/// node drops them and writes on a new connection, which goes to a host that accepts writes
/// (`target_session_attrs=read-write`). Fails without the fix: the write after the failover
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_a_node_writes_to_the_new_primary_without_a_restart() {
    use qpq::store::{Outcome, PgStore, WriteOp};
    let (old, new) = (common::pg::Cluster::private(), common::pg::Cluster::private());
    for c in [&old, &new] {
        c.psql("CREATE DATABASE qpq_failover");
    }
    let limits = store_limits(1 << 20);
    let clock = qpq::clock::Clock::system();
    // The standby-to-be has the schema, as a replica would, and takes no writes.
    PgStore::open(&new.url("qpq_failover"), limits, clock.clone()).await.unwrap().close();
    set_read_only(&new, true);
    let url = format!("postgres://qpq@127.0.0.1:{},127.0.0.1:{}/qpq_failover", old.port, new.port);
    let store = PgStore::open(&url, limits, clock).await.unwrap();
    let enqueue = || WriteOp::Enqueue { channel: b"c".to_vec(), items: vec![([1u8; 32], b"m".to_vec())] };
    assert!(matches!(store.write(enqueue()).await, Ok(Outcome::Enqueued { .. })), "on the old primary");
    // The failover: the old primary stays up but read-only, the standby takes writes.
    set_read_only(&old, true);
    set_read_only(&new, false);
    let written = store.write(enqueue()).await;
    assert!(matches!(written, Ok(Outcome::Enqueued { .. })), "{written:?}");
    assert_eq!(new.query(&new.url("qpq_failover"), "SELECT count(*) FROM qpq_entries"), "1");
    // And on: later writes find the new primary in the pool.
    assert!(matches!(store.write(enqueue()).await, Ok(Outcome::Enqueued { .. })));
    store.close();
}

/// Review: a query on a connection that stopped answering (a network partition mid-commit)
/// waited for TCP retransmission, minutes, and with one batch worker per lane every enqueue of
/// the node waited behind it. Here every COMMIT waits for a synchronous standby that never
/// comes: the write fails `unavailable` after the store's reply deadline instead of hanging,
/// said to have perhaps taken effect, and it has (once the database stops waiting, it is
/// there, once, in its place); the node then writes again without a restart. Fails without
/// the fix: the write is still waiting when the test gives up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_database_never_answers_fails_unavailable_and_may_have_taken_effect() {
    use qpq::store::{Outcome, PgStore, StoreError, WriteOp};
    use std::time::Duration;
    // Far beyond the reply deadline: a write not answered by then hangs.
    const HUNG: Duration = Duration::from_secs(30);
    let cluster = common::pg::Cluster::private();
    let url = cluster.fresh_database();
    let clock = qpq::clock::Clock::system();
    let deadline = Duration::from_secs(3);
    let store = PgStore::open_with_reply_timeout(&url, store_limits(1 << 20), clock, deadline).await.unwrap();
    let alice = [7u8; 32];
    let enqueue = |body: &str| {
        store.write(WriteOp::Enqueue { channel: Vec::new(), items: vec![(alice, body.as_bytes().to_vec())] })
    };
    let written = tokio::time::timeout(HUNG, enqueue("before")).await.expect("answered");
    assert!(matches!(written, Ok(Outcome::Enqueued { .. })), "{written:?}");
    let mut sent = vec!["before".to_string()];
    // From when the setting reaches PostgreSQL's checkpointer, every commit waits for it; the
    // writes before that commit as usual.
    cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    cluster.psql("SELECT pg_reload_conf()");
    let failed = loop {
        let body = format!("during {}", sent.len());
        sent.push(body.clone());
        match tokio::time::timeout(HUNG, enqueue(&body)).await.expect("the write hung") {
            Ok(_) => assert!(sent.len() < 10_000, "the commits never started waiting"),
            Err(e) => break e,
        }
    };
    assert!(matches!(&failed, StoreError::Unavailable(m) if m.contains("may have taken effect")), "{failed}");
    // The COMMIT the store gave up on is still waiting; the setting's removal lets it finish.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";
    let wait_for = |n: &str| {
        for _ in 0..1000 {
            if cluster.query(&url, waiting) == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("never {n} commit(s) waiting for the standby");
    };
    wait_for("1");
    cluster.psql("ALTER SYSTEM RESET synchronous_standby_names");
    cluster.psql("SELECT pg_reload_conf()");
    wait_for("0");
    let written = tokio::time::timeout(HUNG, enqueue("after")).await.expect("answered");
    assert!(matches!(written, Ok(Outcome::Enqueued { .. })), "{written:?}");
    sent.push("after".to_string());
    let (msgs, _) = store.fetch(&alice, 0, 1000, 1 << 20).await.unwrap();
    let got: Vec<String> = msgs.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    assert_eq!(got, sent, "every write stored once, the one answered unavailable included");
    store.close();
}

/// Review: a mail batch creates (and locks) the queue and channel rows of every request it
/// holds before it decides which it accepts, and committed them all whenever one was accepted:
/// a refused fanout to fresh keys sharing a batch with an accepted enqueue left a queue row per
/// key. Now only the accepted requests' rows stay. The two are put in one batch by holding up
/// the node's batch worker on a row lock while they are queued. Fails without the fix: 102
/// queue rows and the refused fanout's channel row are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fanout_in_a_batch_with_an_accepted_enqueue_leaves_no_rows() {
    use qpq::store::{Outcome, PgStore, StoreError, WriteOp};
    use std::io::Write;
    let cluster = common::pg::Cluster::get();
    let url = cluster.fresh_database();
    // Room for small messages, not for the fanout's 20 kB payload.
    let limits = qpq::store::QueueLimits { max_stored_bytes: 10_000, ..store_limits(1 << 20) };
    let store = PgStore::open(&url, limits, qpq::clock::Clock::system()).await.unwrap();
    let (bob, carol) = ([0xb0u8; 32], [0xc0u8; 32]);
    let enqueue = |who: [u8; 32], channel: &[u8]| WriteOp::Enqueue {
        channel: channel.to_vec(),
        items: vec![(who, b"m".to_vec())],
    };
    assert!(matches!(store.write(enqueue(bob, b"held")).await, Ok(Outcome::Enqueued { .. })));
    let rows = |table: &str| cluster.query(&url, &format!("SELECT count(*) FROM {table}"));
    assert_eq!((rows("qpq_queues"), rows("qpq_channels")), ("1".to_string(), "1".to_string()));
    // Another session locks bob's queue row; the worker's next batch waits for it.
    let mut holder = cluster.idle_connection(&url, "holder");
    let lock =
        format!("BEGIN; SELECT 1 FROM qpq_queues WHERE recipient = '\\x{}' FOR UPDATE;\n", hex::encode(bob));
    holder.stdin.as_mut().unwrap().write_all(lock.as_bytes()).unwrap();
    let wait_for = |sql: &str| {
        for _ in 0..1000 {
            if cluster.query(&url, sql) == "1" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("never: {sql}");
    };
    wait_for(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'holder' AND state = 'idle in transaction'",
    );
    // The calls borrow `store` until they are dropped, at the end of this block.
    {
        let mut held = std::pin::pin!(store.write(enqueue(bob, b"held")));
        assert!(futures::poll!(held.as_mut()).is_pending());
        wait_for(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        );
        // Queued while the worker waits: they make its next batch together.
        let fresh: Vec<[u8; 32]> = (0..100u8).map(|i| [i; 32]).collect();
        let fanout = WriteOp::Fanout {
            channel: b"refused".to_vec(),
            payload: vec![7; 20_000],
            recipients: fresh,
            required: None,
        };
        let mut refused = std::pin::pin!(store.write(fanout));
        let mut accepted = std::pin::pin!(store.write(enqueue(carol, b"accepted")));
        assert!(futures::poll!(refused.as_mut()).is_pending());
        assert!(futures::poll!(accepted.as_mut()).is_pending());
        cluster.close_idle(&url, "holder", holder);
        assert!(matches!(held.await, Ok(Outcome::Enqueued { .. })));
        let refused = refused.await;
        assert!(matches!(refused, Err(StoreError::OverQuota { .. })), "{refused:?}");
        assert!(matches!(accepted.await, Ok(Outcome::Enqueued { .. })));
    }
    assert_eq!(rows("qpq_queues"), "2", "bob's and carol's queue rows, none of the fanout's");
    assert_eq!(
        cluster.query(&url, "SELECT string_agg(convert_from(id, 'UTF8'), ',' ORDER BY id) FROM qpq_channels"),
        "accepted,held",
        "no row for the refused fanout's channel"
    );
    store.close();
}

fn store_limits(max_bytes: u64) -> qpq::store::QueueLimits {
    qpq::store::QueueLimits {
        max_messages: 1000,
        max_bytes,
        ttl_ms: 3_600_000,
        max_stored_bytes: 1 << 30,
        max_key_bytes: 1 << 30,
    }
}
