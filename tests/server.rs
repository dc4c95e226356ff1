//! The NodeService contract, through real QUIC connections to a real server on 127.0.0.1:0.

mod common;

use std::collections::HashSet;

use common::{ServerProcess, connect, local, login, start_server, start_server_with};
use qpq::client::session::{Session, SessionError};
use qpq::crypto::hybrid::{HybridSecretKey, SignedHybridKey};
use qpq::crypto::identity::{Identity, PublicKey};
use qpq::mls::MlsClient;
use qpq::transport::Pin;

fn rpc_msg(r: Result<impl std::fmt::Debug, SessionError>) -> String {
    match r {
        Err(SessionError::Rpc(m)) => m.message,
        other => panic!("expected an rpc error, got {other:?}"),
    }
}

/// The bytes of freshly made KeyPackages, as uploaded.
fn kp_bytes(kps: Vec<qpq::mls::NewKeyPackage>) -> Vec<Vec<u8>> {
    kps.into_iter().map(|k| k.bytes).collect()
}

/// A QUIC connection to `server` and the bidirectional stream the RPC system would use, for
/// writing raw bytes (the endpoint is returned so it outlives the connection).
async fn raw_rpc_stream(
    server: &qpq::server::RunningServer,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let cfg = qpq::transport::client_config(Pin::Fingerprint(server.fingerprint())).unwrap();
    let ep = qpq::transport::client_endpoint(server.local_addr(), cfg).unwrap();
    let conn = ep.connect(server.local_addr(), qpq::transport::SERVER_NAME).unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (ep, conn, send, recv)
}

/// One Cap'n Proto RPC message (rpc.capnp), framed for the stream.
fn rpc_frame(build: impl FnOnce(capnp_rpc::rpc_capnp::message::Builder<'_>)) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    build(m.init_root());
    capnp::serialize::write_message_to_words(&m)
}

/// Waits until the server ends `conn`, which sent `what`: at most a minute, so that a
/// regression fails instead of hanging (the server keeps an open connection alive).
async fn ended_by_the_server(conn: &quinn::Connection, what: &str) {
    let reason = tokio::time::timeout(std::time::Duration::from_secs(60), conn.closed())
        .await
        .unwrap_or_else(|_| panic!("the server kept a connection that sent {what}"));
    assert!(!matches!(reason, quinn::ConnectionError::TimedOut), "{what}: the server ended it: {reason:?}");
}

/// The PostgreSQL schema version this qpq migrates to.
const PG_SCHEMA: i32 = qpq::store::postgres::SCHEMA_VERSION;

/// What the server charges a stored KeyPackage against its key budget.
fn key_charge(kp: &[u8]) -> u64 {
    8 + kp.len() as u64 + qpq::limits::KEY_ROW_OVERHEAD_BYTES
}

on_both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_status_version_and_uptime() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        let h = s.health().await.unwrap();
        assert_eq!(h.status, "ok");
        assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
        assert!(h.uptime_secs < 3600);
        s.close().await;
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fetch_ack_round_trip_and_fetch_does_not_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let sender = connect(&server).await;
        let (s1, c1) = sender.enqueue(&alice.public().0, b"one", b"").await.unwrap();
        let (s2, _) = sender.enqueue(&alice.public().0, b"two", b"chan").await.unwrap();
        assert_eq!((s1, c1), (1, 0));
        assert_eq!(s2, 2);

        let a = login(&server, &alice).await;
        let (first, more) = a.fetch(0).await.unwrap();
        assert!(!more);
        let (again, _) = a.fetch(0).await.unwrap();
        assert_eq!(first, again, "fetch without ack returns the same messages");
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].payload, b"one");
        assert_eq!(first[1].payload, b"two");
        assert_eq!(first[1].channel_id, b"chan");
        assert_eq!(first[1].channel_seq, 1);

        assert_eq!(a.ack(1).await.unwrap(), 1);
        let (left, _) = a.fetch(0).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].seq, 2);
        assert_eq!(a.ack(2).await.unwrap(), 1);
        assert!(a.fetch(0).await.unwrap().0.is_empty());
        // Sequence numbers keep growing after acks.
        let (s3, _) = sender.enqueue(&alice.public().0, b"three", b"").await.unwrap();
        assert_eq!(s3, 3);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// `ack` has no rate limit, and every ack was a durable commit (on redb an fsync, even with
/// nothing to delete) that every other write waited behind: anyone authenticated (identities
/// are free) could pipeline `ack(0)` to keep the disk busy. An ack, or a fetchWait's folded
/// ack, that finds nothing to remove commits nothing; one that does still deletes for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_that_removes_nothing_commits_nothing_and_one_that_does_deletes_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Identity::generate();
    let server = start_server(dir.path()).await;
    local(async {
        let a = login(&server, &alice).await;
        let before = server.commit_count();
        for _ in 0..1_000 {
            assert_eq!(a.ack(0).await.unwrap(), 0);
        }
        assert_eq!(a.ack(u64::MAX).await.unwrap(), 0, "an empty queue, whatever the number");
        let (msgs, _, removed) = a.ack_and_fetch_wait(7, 0, 10).await.unwrap();
        assert_eq!((msgs.len(), removed), (0, 0));
        assert_eq!(server.commit_count(), before, "acks that removed nothing committed");

        let sender = connect(&server).await;
        for payload in [&b"one"[..], b"two", b"three"] {
            sender.enqueue(&alice.public().0, payload, b"").await.unwrap();
        }
        let before = server.commit_count();
        assert_eq!(a.ack(1).await.unwrap(), 1);
        assert_eq!(server.commit_count(), before + 1, "a real ack is a commit");
        assert_eq!(a.ack(1).await.unwrap(), 0, "acked already");
        let (msgs, _, removed) = a.ack_and_fetch_wait(2, 0, 10).await.unwrap();
        assert_eq!(removed, 1);
        assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(server.commit_count(), before + 2);
    })
    .await;
    server.shutdown().await.unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let (msgs, _) = login(&server, &alice).await.fetch(0).await.unwrap();
        assert_eq!(msgs.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"three".to_vec()]);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_limit_pages_and_reports_more() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let sender = connect(&server).await;
        for i in 0..5u8 {
            sender.enqueue(&alice.public().0, &[i + 1], b"").await.unwrap();
        }
        let a = login(&server, &alice).await;
        let (page, more) = a.fetch(2).await.unwrap();
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(more);
        a.ack(2).await.unwrap();
        let (page, more) = a.fetch(10).await.unwrap();
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(!more);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A message larger than a fetch's byte budget (possible with `max_payload_bytes` above
/// 8 MiB) comes alone, and the page still says more are waiting. Before, PostgreSQL's page cut
/// the next row away and answered `more = false`, so the client parked instead of fetching on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_a_page_still_reports_more() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_payload = 12 << 20;
    cfg.max_buffered_bytes = 64 << 20;
    let big = qpq::limits::MAX_FETCH_BYTES + 1024;
    let server = start_server_with(cfg).await;
    local(async {
        let alice = Identity::generate();
        let sender = connect(&server).await;
        sender.enqueue(&alice.public().0, &vec![7u8; big], b"").await.unwrap();
        sender.enqueue(&alice.public().0, b"small", b"").await.unwrap();
        let a = login(&server, &alice).await;
        let (page, more) = a.fetch(10).await.unwrap();
        assert_eq!(page.iter().map(|m| m.payload.len()).collect::<Vec<_>>(), vec![big]);
        assert!(more, "the small one is waiting");
        a.ack(page[0].seq).await.unwrap();
        let (page, more) = a.fetch(10).await.unwrap();
        assert_eq!(page.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(), vec![&b"small"[..]]);
        assert!(!more);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bob_cannot_fetch_or_ack_alices_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let bob = Identity::generate();
        let sender = connect(&server).await;
        sender.enqueue(&alice.public().0, b"for alice", b"").await.unwrap();
        let b = login(&server, &bob).await;
        assert_eq!(b.account_identity().await.unwrap(), bob.public().0);
        assert!(b.fetch(0).await.unwrap().0.is_empty());
        assert_eq!(b.ack(u64::MAX).await.unwrap(), 0);
        let a = login(&server, &alice).await;
        assert_eq!(a.fetch(0).await.unwrap().0.len(), 1, "bob's ack did not touch alice's queue");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_methods_need_authentication_and_bad_signatures_fail() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mut s = connect(&server).await;
        assert!(matches!(s.fetch(0).await, Err(SessionError::NotAuthenticated)));
        // Signature over the wrong challenge.
        let bad = alice.sign_auth_challenge(&[7u8; 32]);
        let msg = rpc_msg(s.authenticate_raw(&alice.public().0, &bad).await);
        assert!(msg.contains("authentication failed"), "{msg}");
        assert!(matches!(s.fetch(0).await, Err(SessionError::NotAuthenticated)));
        // Zero-length and wrong-length keys and signatures.
        let msg = rpc_msg(s.authenticate_raw(&[], &bad).await);
        assert_eq!(msg, "identity key must be 32 bytes, got 0");
        let msg = rpc_msg(s.authenticate_raw(&[1u8; 33], &bad).await);
        assert_eq!(msg, "identity key must be 32 bytes, got 33");
        let msg = rpc_msg(s.authenticate_raw(&alice.public().0, &bad[..10]).await);
        assert_eq!(msg, "signature must be 64 bytes, got 10");
        // The connection still works after all that.
        s.authenticate(&alice).await.unwrap();
        assert!(s.fetch(0).await.unwrap().0.is_empty());
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_replayed_on_another_connection_fails() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mut first = connect(&server).await;
        let mut second = connect(&server).await;
        let c1 = first.auth_challenge().unwrap();
        let c2 = second.auth_challenge().unwrap();
        assert_ne!(c1, c2, "every connection has its own challenge");
        let sig = alice.sign_auth_challenge(&c1);
        first.authenticate_raw(&alice.public().0, &sig).await.unwrap();
        let msg = rpc_msg(second.authenticate_raw(&alice.public().0, &sig).await);
        assert!(msg.contains("authentication failed"), "{msg}");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_are_single_use_under_concurrency_then_last_resort() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mls = MlsClient::new(alice.seed()).unwrap();
        let kps = kp_bytes(mls.key_packages(5).unwrap());
        let lr = mls.last_resort_key_package().unwrap().bytes;
        let a = login(&server, &alice).await;
        assert_eq!(a.upload_key_packages(&kps, Some(&lr)).await.unwrap(), 5);
        assert_eq!(a.key_package_count().await.unwrap(), (5, true));

        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(connect(&server).await);
        }
        let key = alice.public().0;
        let fetches = (0..20).map(|i| {
            let s = &sessions[i % sessions.len()];
            async move { s.fetch_key_package(&key).await.unwrap() }
        });
        let results = futures::future::join_all(fetches).await;
        let single: Vec<_> = results.iter().filter(|r| !r.last_resort).collect();
        let distinct: HashSet<_> = single.iter().map(|r| r.bytes.clone()).collect();
        assert_eq!(single.len(), 5);
        assert_eq!(distinct.len(), 5, "no KeyPackage was handed out twice");
        assert_eq!(distinct, kps.iter().cloned().collect::<HashSet<_>>());
        for r in results.iter().filter(|r| r.last_resort) {
            assert_eq!(r.bytes, lr);
            assert_eq!(r.remaining, 0);
        }
        assert_eq!(a.key_package_count().await.unwrap(), (0, true), "last resort is kept");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A package stored twice (named twice in one upload, or uploaded again after a retry whose
/// first try did take effect) was handed to two inviters; the second could not join its
/// invitee. Each package is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_package_uploaded_twice_is_stored_and_handed_out_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mls = MlsClient::new(alice.seed()).unwrap();
        let kps = kp_bytes(mls.key_packages(2).unwrap());
        let a = login(&server, &alice).await;
        let twice = vec![kps[0].clone(), kps[0].clone()];
        assert_eq!(a.upload_key_packages(&twice, None).await.unwrap(), 1);
        assert_eq!(a.upload_key_packages(&kps, None).await.unwrap(), 2, "only the new one is added");
        let s = connect(&server).await;
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(s.fetch_key_package(&alice.public().0).await.unwrap().bytes);
        }
        got.sort();
        let mut want = kps.clone();
        want.sort();
        assert_eq!(got, want);
        let e = s.fetch_key_package(&alice.public().0).await.unwrap_err();
        assert_eq!(e.code(), Some(qpq::proto::wire_error::ErrorCode::NoKeyPackages), "{e}");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_has_a_budget_and_handed_out_or_expired_packages_free_it() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let (alice_mls, bob_mls) = (MlsClient::new(alice.seed()).unwrap(), MlsClient::new(bob.seed()).unwrap());
    let kps = kp_bytes(alice_mls.key_packages(3).unwrap());
    let lr = alice_mls.last_resort_key_package().unwrap().bytes;
    let bobs = kp_bytes(bob_mls.key_packages(1).unwrap());
    let alices: u64 = kps.iter().map(|k| key_charge(k)).sum::<u64>() + key_charge(&lr);
    let mut cfg = common::server_config(dir.path());
    // Alice's packages fit; then neither a hybrid key (64 + 8 + its 1216 bytes) nor a package
    // (larger) does, by a byte.
    let hybrid_charge = 64 + 8 + qpq::limits::HYBRID_KEY_LEN as u64 + qpq::limits::KEY_ROW_OVERHEAD_BYTES;
    assert!(key_charge(&bobs[0]) > hybrid_charge);
    cfg.max_key_bytes = alices + hybrid_charge - 1;
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    let server = start_server_with(cfg).await;
    local(async {
        let a = login(&server, &alice).await;
        assert_eq!(a.upload_key_packages(&kps, Some(&lr)).await.unwrap(), 3);
        let b = login(&server, &bob).await;
        let e = b.upload_key_packages(&bobs, None).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::OverQuota), "{e}");
        assert!(e.to_string().contains("key storage full"), "{e}");
        // A new hybrid key is key material too.
        let signed = SignedHybridKey::sign(bob.signing_key(), 1_000, &HybridSecretKey::generate());
        let e = b.upload_hybrid_key(&signed).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::OverQuota), "{e}");
        assert_eq!(b.key_package_count().await.unwrap(), (0, false), "nothing of bob's was stored");

        // A package handed out frees its charge.
        connect(&server).await.fetch_key_package(&alice.public().0).await.unwrap();
        assert_eq!(b.upload_key_packages(&bobs, None).await.unwrap(), 1);

        // Expired packages free theirs once the sweep deletes them.
        clock.advance((qpq::limits::KEY_PACKAGE_LIFETIME_SECS as i64 + 3600) * 1000);
        server.sweep().await;
        clock.set_offset_ms(0);
        assert_eq!(a.key_package_count().await.unwrap(), (0, false), "deleted, not just hidden");
        let more = kp_bytes(alice_mls.key_packages(3).unwrap());
        assert_eq!(a.upload_key_packages(&more, Some(&lr)).await.unwrap(), 3, "the budget is free again");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A hybrid key its owner has not replaced for the server's lifetime (clients replace theirs
/// weekly) is deleted by the sweep, so identities that came once do not keep a row for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_key_not_replaced_for_its_server_lifetime_is_deleted_by_the_sweep() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let now_ms = std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_millis() as u64;
        let lifetime_ms = qpq::limits::HYBRID_KEY_SERVER_LIFETIME_SECS * 1000;
        let fresh = SignedHybridKey::sign(alice.signing_key(), now_ms, &HybridSecretKey::generate());
        login(&server, &alice).await.upload_hybrid_key(&fresh).await.unwrap();
        let created = now_ms - lifetime_ms - 2000;
        let stale = SignedHybridKey::sign(bob.signing_key(), created, &HybridSecretKey::generate());
        login(&server, &bob).await.upload_hybrid_key(&stale).await.unwrap();
        let s = connect(&server).await;
        assert_eq!(s.fetch_hybrid_key(&bob.public().0).await.unwrap().created_at_ms, created);
        server.sweep().await;
        let e = s.fetch_hybrid_key(&bob.public().0).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NoHybridKey), "{e}");
        assert_eq!(s.fetch_hybrid_key(&alice.public().0).await.unwrap().created_at_ms, now_ms, "kept");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_and_foreign_key_packages_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let bob = Identity::generate();
        let bob_mls = MlsClient::new(bob.seed()).unwrap();
        let alice_mls = MlsClient::new(alice.seed()).unwrap();
        let a = login(&server, &alice).await;

        let msg = rpc_msg(a.upload_key_packages(&[b"garbage".to_vec()], None).await);
        assert!(msg.starts_with("invalid key package"), "{msg}");
        let foreign = kp_bytes(bob_mls.key_packages(1).unwrap());
        let msg = rpc_msg(a.upload_key_packages(&foreign, None).await);
        assert_eq!(msg, "invalid key package: credential identity is not the authenticated key");
        let mut tampered = kp_bytes(alice_mls.key_packages(1).unwrap());
        let n = tampered[0].len();
        tampered[0][n - 5] ^= 1;
        let msg = rpc_msg(a.upload_key_packages(&tampered, None).await);
        assert!(msg.starts_with("invalid key package"), "{msg}");
        let lr = alice_mls.last_resort_key_package().unwrap().bytes;
        let msg = rpc_msg(a.upload_key_packages(std::slice::from_ref(&lr), None).await);
        assert!(msg.contains("last-resort package sent as a single-use one"), "{msg}");
        let plain = kp_bytes(alice_mls.key_packages(1).unwrap());
        let msg = rpc_msg(a.upload_key_packages(&[], Some(&plain[0])).await);
        assert!(msg.contains("lacks the last_resort extension"), "{msg}");
        // A good package mixed with a bad one: nothing is stored.
        let mut mixed = kp_bytes(alice_mls.key_packages(1).unwrap());
        mixed.push(b"junk".to_vec());
        rpc_msg(a.upload_key_packages(&mixed, None).await);
        assert_eq!(a.key_package_count().await.unwrap(), (0, false));
        let msg = rpc_msg(connect(&server).await.fetch_key_package(&alice.public().0).await);
        assert_eq!(msg, "no key packages for this key");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_key_round_trips_with_its_signature_and_bad_ones_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let hk = HybridSecretKey::generate();
        let pk = hk.public_key();
        let signed = SignedHybridKey::sign(alice.signing_key(), 1_000, &hk);
        let a = login(&server, &alice).await;
        // A valid signature over another key, or over another creation time, is refused.
        let swapped = SignedHybridKey {
            key: HybridSecretKey::generate().public_key().as_bytes().to_vec(),
            ..signed.clone()
        };
        let msg = rpc_msg(a.upload_hybrid_key(&swapped).await);
        assert!(msg.starts_with("invalid hybrid key"), "{msg}");
        let redated = SignedHybridKey { created_at_ms: 2_000, ..signed.clone() };
        assert!(rpc_msg(a.upload_hybrid_key(&redated).await).starts_with("invalid hybrid key"));
        a.upload_hybrid_key(&signed).await.unwrap();
        let anyone = connect(&server).await;
        let got = anyone.fetch_hybrid_key(&alice.public().0).await.unwrap();
        assert_eq!(got, signed, "key, signature and creation time come back as uploaded");
        assert_eq!(got.verify(&alice.public().0).unwrap(), pk);
        // A rotated key replaces the old one.
        let next = SignedHybridKey::sign(alice.signing_key(), 3_000, &HybridSecretKey::generate());
        a.upload_hybrid_key(&next).await.unwrap();
        assert_eq!(anyone.fetch_hybrid_key(&alice.public().0).await.unwrap(), next);
        // Dated at most a day ahead of the server's clock: the server keeps a key for its
        // lifetime from that date, so one dated a year ahead stayed two years.
        let now_ms = std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_millis() as u64;
        let ahead = |ms: u64| SignedHybridKey::sign(alice.signing_key(), now_ms + ms, &HybridSecretKey::generate());
        let msg = rpc_msg(a.upload_hybrid_key(&ahead(2 * 24 * 3600 * 1000)).await);
        assert!(msg.contains("creation time out of range"), "{msg}");
        a.upload_hybrid_key(&ahead(3600 * 1000)).await.unwrap();
        let msg = rpc_msg(anyone.fetch_hybrid_key(&Identity::generate().public().0).await);
        assert_eq!(msg, "no hybrid key for this key");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_wait_wakes_on_enqueue_and_times_out_empty() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let a = login(&server, &alice).await;
        // Times out empty when nothing comes.
        let (msgs, _) = a.fetch_wait(50, 0).await.unwrap();
        assert!(msgs.is_empty());
        // A long wait returns with the message: only a wake-up can make it non-empty, since
        // the timeout path returns empty.
        let sender = connect(&server).await;
        let waiting = a.fetch_wait(60_000, 0);
        let sending = async {
            // The waiter is registered once the server sees the call; any order works, because a
            // message enqueued before the wait starts is returned at once.
            sender.enqueue(&alice.public().0, b"ping", b"").await.unwrap()
        };
        let ((msgs, _), _) = tokio::join!(async { waiting.await.unwrap() }, sending);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].payload, b"ping");
        let msg = rpc_msg(a.fetch_wait(60_001, 0).await);
        assert_eq!(msg, "timeout out of range: 60001 > 60000 ms");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_fetch_wait_does_not_keep_its_call_frame() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let a = login(&server, &alice).await;
        let sender = connect(&server).await;
        let waiting = a.fetch_wait(60_000, 0);
        let watching = async {
            // The server reads a connection's calls in order: once this is answered, it has read
            // the fetchWait call (sent first, on the first poll of `waiting`).
            a.health().await.unwrap();
            // Once the wait is parked, no call is being worked on: every frame has been let go.
            // (Polled, with a deadline, because nothing says from outside when it has parked.)
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while server.received_frame_bytes() > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a parked fetchWait holds {} bytes of frames",
                    server.received_frame_bytes()
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            sender.enqueue(&alice.public().0, b"ping", b"").await.unwrap()
        };
        let ((msgs, _), _) = tokio::join!(async { waiting.await.unwrap() }, watching);
        assert_eq!(msgs.len(), 1, "the wait was parked, and woken by the enqueue");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_wait_with_a_folded_ack_deletes_the_batch_before_and_returns_only_later_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let sender = connect(&server).await;
        for p in [b"one", b"two", b"six"] {
            sender.enqueue(&alice.public().0, p, b"").await.unwrap();
        }
        let a = login(&server, &alice).await;
        // Ack 1..=2 and fetch in one call: only seq 3 comes back, and 2 were removed.
        let (msgs, more, removed) = a.ack_and_fetch_wait(2, 0, 0).await.unwrap();
        assert_eq!((msgs.len(), more, removed), (1, false, 2));
        assert_eq!((msgs[0].seq, msgs[0].payload.as_slice()), (3, &b"six"[..]));
        // The ack is in the store, not only hidden from that one call.
        let (left, _) = a.fetch(0).await.unwrap();
        assert_eq!(left.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
        // Acking everything and waiting: the wait is woken by the next enqueue, and the folded
        // ack removed seq 3 meanwhile.
        let waiting = a.ack_and_fetch_wait(3, 60_000, 0);
        let sending = async { sender.enqueue(&alice.public().0, b"ten", b"").await.unwrap() };
        let ((msgs, _, removed), (seq, _)) = tokio::join!(async { waiting.await.unwrap() }, sending);
        assert_eq!(removed, 1);
        assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![seq]);
        // Acking past the end is harmless and returns nothing more.
        let (msgs, _, removed) = a.ack_and_fetch_wait(u64::MAX, 0, 0).await.unwrap();
        assert_eq!((msgs.len(), removed), (0, 1));
        assert!(a.fetch(0).await.unwrap().0.is_empty());
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enqueues_get_clear_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        let key = Identity::generate().public().0;
        let big = vec![0u8; qpq::limits::DEFAULT_MAX_PAYLOAD + 1];
        assert_eq!(
            rpc_msg(s.enqueue(&key, &big, b"").await),
            format!("payload too large: {} > {} bytes", big.len(), qpq::limits::DEFAULT_MAX_PAYLOAD)
        );
        assert_eq!(rpc_msg(s.enqueue(&[], b"x", b"").await), "recipient key must be 32 bytes, got 0");
        assert_eq!(rpc_msg(s.enqueue(&[0u8; 31], b"x", b"").await), "recipient key must be 32 bytes, got 31");
        assert_eq!(rpc_msg(s.enqueue(&key, b"", b"").await), "payload is empty");
        assert_eq!(rpc_msg(s.enqueue(&key, b"x", &[0u8; 65]).await), "channel id too long: 65 > 64 bytes");
        assert_eq!(rpc_msg(s.enqueue_batch(b"", &[]).await), "batch has no recipients");
        // Same connection still serves.
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_get_an_error_not_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        let raw = s.raw_node_client();
        let req = raw.new_call::<capnp::any_pointer::Owned, capnp::any_pointer::Owned>(
            <qpq::proto::node_capnp::node_service::Client as capnp::traits::HasTypeId>::TYPE_ID,
            99,
            None,
        );
        let err = req.send().promise.await.err().expect("unknown method fails");
        assert_eq!(err.kind, capnp::ErrorKind::Unimplemented);
        let req = raw.new_call::<capnp::any_pointer::Owned, capnp::any_pointer::Owned>(0x1234, 0, None);
        assert!(req.send().promise.await.is_err());
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A call whose parameters do not decode (here: a list where the parameter struct belongs) is
/// the caller's fault: "badRequest", not capnp's code-less error, which a client reads as
/// `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_parameters_are_a_bad_request() {
    use qpq::proto::node_capnp::node_service;
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        let raw = s.raw_node_client();
        let type_id = <node_service::Client as capnp::traits::HasTypeId>::TYPE_ID;
        let mut req = raw.new_call::<capnp::any_pointer::Owned, capnp::any_pointer::Owned>(type_id, 4, None);
        req.get().initn_as::<capnp::primitive_list::Builder<'_, u8>>(3);
        let err = req.send().promise.await.err().expect("a list is no enqueue");
        let SessionError::Rpc(e) = SessionError::from(err) else { panic!("an rpc error") };
        assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
        assert!(e.message.starts_with("malformed call: ") && e.message.len() > 20, "{e:?}");
        assert_eq!(s.health().await.unwrap().status, "ok", "the connection stays");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_is_a_clear_error_and_batches_are_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 3;
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let full = Identity::generate();
        let empty = Identity::generate();
        for _ in 0..3 {
            s.enqueue(&full.public().0, b"x", b"").await.unwrap();
        }
        let msg = rpc_msg(s.enqueue(&full.public().0, b"x", b"").await);
        assert!(msg.starts_with("queue full: recipient has 3 messages"), "{msg}");
        let items = vec![(empty.public(), b"a".to_vec()), (full.public(), b"b".to_vec())];
        let msg = rpc_msg(s.enqueue_batch(b"group", &items).await);
        assert!(msg.starts_with("queue full"), "{msg}");
        let e = login(&server, &empty).await;
        assert!(e.fetch(0).await.unwrap().0.is_empty(), "the failed batch stored nothing");
        // The channel position was not consumed either.
        let (cseq, seqs) = s.enqueue_batch(b"group", &[(empty.public(), b"a".to_vec())]).await.unwrap();
        assert_eq!((cseq, seqs), (1, vec![1]));
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Requests in flight together share a commit (group commit on both backends): a refused one
/// must neither store anything nor take a number, and must not disturb the others; two acks
/// of one queue together remove each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_accepted_requests_in_flight_together_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 12;
    let server = start_server_with(cfg).await;
    local(async {
        let (full, open, carol) = (Identity::generate(), Identity::generate(), Identity::generate());
        let mut senders = Vec::new();
        for _ in 0..8 {
            senders.push(connect(&server).await);
        }
        for i in 0..4u8 {
            senders[0].enqueue(&carol.public().0, &[i], b"").await.unwrap();
        }
        for i in 0..8u8 {
            senders[0].enqueue(&full.public().0, &[i], b"").await.unwrap();
        }
        let c = login(&server, &carol).await;
        // `full` has room for 4 more. 8 singles to `full`, 8 batches on "team" naming `full`
        // too (each all-or-nothing), 8 batches on "team" to `open` only (all fit), and two
        // acks of carol's queue, all at once.
        let full_key = full.public().0;
        let mixed_items = [(open.public(), b"m".to_vec()), (full.public(), b"m".to_vec())];
        let plain_items = [(open.public(), b"p".to_vec())];
        let singles = senders.iter().map(|s| s.enqueue(&full_key, b"s", b""));
        let mixed = senders.iter().map(|s| s.enqueue_batch(b"team", &mixed_items));
        let plain = senders.iter().map(|s| s.enqueue_batch(b"team", &plain_items));
        let (singles, mixed, plain, acks) = tokio::join!(
            futures::future::join_all(singles),
            futures::future::join_all(mixed),
            futures::future::join_all(plain),
            futures::future::join(c.ack(2), c.ack(3)),
        );
        let single_seqs: HashSet<u64> = singles.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.0).collect();
        let mixed_ok: Vec<(u64, Vec<u64>)> = mixed.into_iter().filter_map(|r| r.ok()).collect();
        let taken_by_mixed = mixed_ok.len();
        assert_eq!(single_seqs.len() + taken_by_mixed, 4, "exactly the cap was stored in `full`");
        for r in singles.iter().filter(|r| r.is_err()) {
            assert!(format!("{r:?}").contains("queue full"), "{r:?}");
        }
        let plain: Vec<(u64, Vec<u64>)> = plain.into_iter().map(|r| r.unwrap()).collect();
        let mut cseqs: Vec<u64> = plain.iter().chain(&mixed_ok).map(|r| r.0).collect();
        cseqs.sort();
        let n = cseqs.len() as u64;
        assert_eq!(cseqs, (1..=n).collect::<Vec<u64>>(), "refused batches took no channel position");
        let o = login(&server, &open).await;
        let (msgs, _) = o.fetch(0).await.unwrap();
        let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<u64>>(), "dense seqs: refused batches stored nothing");
        let f = login(&server, &full).await;
        assert_eq!(f.fetch(0).await.unwrap().0.len(), 12);
        let (a2, a3) = (acks.0.unwrap(), acks.1.unwrap());
        assert_eq!(a2 + a3, 3, "each acked message removed once: {a2} + {a3}");
        let left: Vec<u64> = c.fetch(0).await.unwrap().0.iter().map(|m| m.seq).collect();
        assert_eq!(left, vec![4]);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_on_a_channel_are_seen_in_one_order_by_every_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let members: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
        let keys: Vec<PublicKey> = members.iter().map(|m| m.public()).collect();
        let mut senders = Vec::new();
        for _ in 0..4 {
            senders.push(connect(&server).await);
        }
        let sends = (0..24u8).map(|i| {
            let s = &senders[i as usize % senders.len()];
            let items: Vec<_> = keys.iter().map(|k| (*k, vec![i])).collect();
            async move { s.enqueue_batch(b"team", &items).await.unwrap() }
        });
        let results = futures::future::join_all(sends).await;
        let cseqs: HashSet<u64> = results.iter().map(|r| r.0).collect();
        assert_eq!(cseqs.len(), 24, "every batch got its own channel position");
        let mut orders = Vec::new();
        for m in &members {
            let s = login(&server, m).await;
            let (msgs, _) = s.fetch(0).await.unwrap();
            assert_eq!(msgs.len(), 24);
            let by_seq: Vec<u64> = msgs.iter().map(|m| m.channel_seq).collect();
            let mut sorted = by_seq.clone();
            sorted.sort();
            assert_eq!(by_seq, sorted, "queue order is channel order");
            orders.push(msgs.iter().map(|m| m.payload[0]).collect::<Vec<_>>());
        }
        assert_eq!(orders[0], orders[1]);
        assert_eq!(orders[1], orders[2]);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_key_packages_and_certificate_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Identity::generate();
    let server = start_server(dir.path()).await;
    let fp = server.fingerprint();
    local(async {
        let mls = MlsClient::new(alice.seed()).unwrap();
        let a = login(&server, &alice).await;
        a.upload_key_packages(&kp_bytes(mls.key_packages(2).unwrap()), None).await.unwrap();
        a.enqueue(&alice.public().0, b"kept", b"c").await.unwrap();
        a.close().await;
    })
    .await;
    server.shutdown().await.unwrap();

    let server = start_server(dir.path()).await;
    assert_eq!(server.fingerprint(), fp, "certificate reused");
    assert!(!server.generated_cert());
    local(async {
        let a = login(&server, &alice).await;
        let (msgs, _) = a.fetch(0).await.unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].payload, b"kept");
        assert_eq!(a.key_package_count().await.unwrap(), (2, false));
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_alpn_and_garbage_on_the_stream_only_cost_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    // Garbage bytes on the RPC stream.
    let (_ep, conn, mut send, mut recv) = raw_rpc_stream(&server).await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    send.write_all(&garbage).await.unwrap();
    let _ = send.finish();
    // The server ends the connection: reading to the end finishes (EOF or reset), no hang.
    let _ = recv.read_to_end(1 << 20).await;
    let reason = conn.closed().await;
    assert!(!matches!(reason, quinn::ConnectionError::TimedOut), "server closed it: {reason:?}");

    // Wrong ALPN: the handshake fails.
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(common::AcceptAny))
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"qpq/0".to_vec()];
    let qcfg = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut ep2 = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep2.set_default_client_config(qcfg);
    let res = ep2.connect(server.local_addr(), "qpq-server").unwrap().await;
    assert!(res.is_err(), "a wrong ALPN must not connect");

    // Other clients are still served.
    local(async {
        let s = connect(&server).await;
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Authenticating again as the same identity on one connection works (and hands out the same
/// account, which capnp-rpc then exports once); a connection authenticating as ever new
/// identities is refused past the cap, by code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_authenticates_as_a_bounded_number_of_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mut s = login(&server, &alice).await;
        for _ in 0..50 {
            s.authenticate(&alice).await.expect("the same identity again");
        }
        assert_eq!(s.fetch(0).await.unwrap().0.len(), 0, "its account still works");
        for _ in 1..qpq::limits::MAX_IDENTITIES_PER_CONNECTION {
            s.authenticate(&Identity::generate()).await.expect("under the cap");
        }
        let refused = s.authenticate(&Identity::generate()).await.unwrap_err();
        assert_eq!(refused.code(), Some(qpq::proto::wire_error::ErrorCode::AuthFailed), "{refused}");
        s.authenticate(&alice).await.expect("one it already has is still fine");
        assert!(login(&server, &Identity::generate()).await.fetch(0).await.is_ok(), "a new connection is");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Each failed `authenticate` costs the server a signature verification on a worker thread
/// many connections share: past a few failures a connection is refused without one, even with
/// a good signature; a repeat of an identity the connection proved needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_a_bounded_number_of_failed_authentications() {
    use qpq::proto::node_capnp::node_service;
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mut s = login(&server, &alice).await;
        let node = node_service::Client { client: s.raw_node_client() };
        let bad = |key: [u8; 32]| {
            let mut req = node.authenticate_request();
            req.get().set_identity_key(&key);
            req.get().set_signature(&[1u8; 64]);
            req
        };
        // Alice's own key with a bad signature: she proved it already, so no check is made.
        bad(alice.public().0).send().promise.await.expect("a proved identity needs no second check");
        for _ in 0..qpq::limits::MAX_AUTH_FAILURES_PER_CONNECTION {
            let e = SessionError::from(bad(Identity::generate().public().0).send().promise.await.map(|_| ()).unwrap_err());
            assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}");
            assert!(e.to_string().contains("signature does not verify"), "{e}");
        }
        let e = s.authenticate(&Identity::generate()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}");
        assert!(e.to_string().contains("too many failed authentications"), "{e}");
        assert!(login(&server, &Identity::generate()).await.fetch(0).await.is_ok(), "a new connection is fine");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A peer that calls and never sends `Finish` would keep one answer per failed call on the
/// server for as long as the connection lives; past the open-call cap the server ends the
/// connection instead (and serves everyone else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_never_finished_end_their_connection_at_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let (_ep, conn, mut send, mut recv) = raw_rpc_stream(&server).await;
    // Read every answer, so the server never pauses for unread replies.
    let reader = tokio::spawn(async move { recv.read_to_end(usize::MAX).await.map(|b| b.len()) });
    let mut out = rpc_frame(|m| m.init_bootstrap().set_question_id(0));
    let calls = qpq::limits::MAX_OPEN_CALLS_PER_CONNECTION as u32 + 100;
    for q in 1..=calls {
        out.extend(rpc_frame(|m| {
            let mut call = m.init_call();
            call.set_question_id(q);
            call.set_interface_id(
                <qpq::proto::node_capnp::node_service::Client as capnp::traits::HasTypeId>::TYPE_ID,
            );
            call.set_method_id(3); // fetchHybridKey, with a 1-byte key: an error answer
            let mut promised = call.reborrow().init_target().init_promised_answer();
            promised.set_question_id(0);
            let params: capnp::any_pointer::Builder<'_> = call.init_params().get_content();
            let mut p = params.init_as::<qpq::proto::node_capnp::node_service::fetch_hybrid_key_params::Builder<'_>>();
            p.set_identity_key(&[1]);
        }));
    }
    // The server may end the connection while this is still being written.
    let _ = send.write_all(&out).await;
    ended_by_the_server(&conn, "thousands of unfinished calls").await;
    let _ = reader.await;

    local(async {
        let s = connect(&server).await;
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// quinn buffers up to 1.25 MB of received QUIC datagrams per connection by default, for a
/// reader the server never runs: the server advertises no datagram support, so a peer cannot
/// send any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_takes_no_quic_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let (_ep, conn, _send, _recv) = raw_rpc_stream(&server).await;
    assert_eq!(conn.max_datagram_size(), None);
    assert!(conn.send_datagram(vec![0u8; 100].into()).is_err());
    server.shutdown().await.unwrap();
}

/// A call whose parameters carry capabilities (our schema takes none) would make capnp-rpc
/// create an import per descriptor, and a Release message for each later, before our code sees
/// the call: a million from one 17 MiB frame. The server ends such a connection on reading it,
/// and a Resolve or Return from a client (the server asks it nothing) the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_client_never_sends_end_the_connection_before_capnp_acts_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let service = <qpq::proto::node_capnp::node_service::Client as capnp::traits::HasTypeId>::TYPE_ID;
    let with_caps = rpc_frame(|m| {
        let mut call = m.init_call();
        call.set_question_id(1);
        call.set_interface_id(service);
        call.set_method_id(0); // health
        call.reborrow().init_target().init_promised_answer().set_question_id(0);
        let mut table = call.init_params().init_cap_table(10_000);
        for i in 0..10_000u32 {
            table.reborrow().get(i).set_sender_hosted(i);
        }
    });
    let ret = rpc_frame(|m| {
        let mut r = m.init_return();
        r.set_answer_id(7);
        r.init_results();
    });
    let resolve = rpc_frame(|m| {
        let mut r = m.init_resolve();
        r.set_promise_id(3);
        r.init_cap().set_sender_hosted(4);
    });
    // fetchHybridKey takes a 32-byte key: a 100 KiB one would live as long as the call.
    let padded = rpc_frame(|m| {
        let mut call = m.init_call();
        call.set_question_id(1);
        call.set_interface_id(service);
        call.set_method_id(3);
        call.reborrow().init_target().init_promised_answer().set_question_id(0);
        let params: capnp::any_pointer::Builder<'_> = call.init_params().get_content();
        let mut p = params.init_as::<qpq::proto::node_capnp::node_service::fetch_hybrid_key_params::Builder<'_>>();
        p.set_identity_key(&vec![1u8; 100 << 10]);
    });
    for (what, frame) in [
        ("a call with capabilities", with_caps),
        ("a return", ret),
        ("a resolve", resolve),
        ("a large frame for a call with small parameters", padded),
    ] {
        let (_ep, conn, mut send, mut recv) = raw_rpc_stream(&server).await;
        let reader = tokio::spawn(async move { recv.read_to_end(usize::MAX).await.map(|b| b.len()) });
        let mut out = rpc_frame(|m| m.init_bootstrap().set_question_id(0));
        out.extend(frame);
        let _ = send.write_all(&out).await;
        ended_by_the_server(&conn, what).await;
        let _ = reader.await;
    }
    local(async {
        let s = connect(&server).await;
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_is_refused_naming_both_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let wrong = qpq::transport::Fingerprint([9u8; 32]);
    let res = local(Session::connect(&server.local_addr().to_string(), Pin::Fingerprint(wrong))).await;
    match res {
        Err(SessionError::CertificateChanged { pinned, presented }) => {
            assert_eq!(pinned, wrong);
            assert_eq!(presented, server.fingerprint());
        }
        Err(other) => panic!("expected a certificate error, got {other}"),
        Ok(_) => panic!("expected a certificate error, got a session"),
    }
    server.shutdown().await.unwrap();
}

/// The real binary, killed with SIGKILL while enqueues are in flight: every enqueue that
/// returned success is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enqueues_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let proc = ServerProcess::start(dir.path());
    let addr = proc.addr.to_string();
    let pin = proc.pin();
    let alice = Identity::generate();
    let acked = local(async {
        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(Session::connect(&addr, pin.clone()).await.unwrap());
        }
        let acked = std::cell::RefCell::new(Vec::<Vec<u8>>::new());
        let killed = std::cell::Cell::new(false);
        let active = std::cell::Cell::new(sessions.len());
        let progress = tokio::sync::Notify::new();
        let mut proc = Some(proc);
        let workers = sessions.iter().enumerate().map(|(w, s)| {
            let (acked, killed, active, progress) = (&acked, &killed, &active, &progress);
            let key = alice.public().0;
            async move {
                for i in 0..10_000u32 {
                    let payload = format!("w{w}-m{i}").into_bytes();
                    // After the kill an in-flight call never gets an answer; give up on it (it
                    // was never acknowledged, so it does not count). Before the kill a slow
                    // answer (a stalled disk) is only not counted.
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
            // Kill once a good number of writes have been acknowledged, with more in flight.
            while acked.borrow().len() < 200 && active.get() > 0 {
                progress.notified().await;
            }
            killed.set(true);
            if let Some(p) = proc.take() {
                p.kill9();
            }
        };
        tokio::join!(futures::future::join_all(workers), killer);

        acked.into_inner()
    })
    .await;
    assert!(acked.len() >= 200, "only {} enqueues were acknowledged before the workers stopped", acked.len());

    let proc = ServerProcess::start(dir.path());
    let stored = local(async {
        let mut s = Session::connect(&proc.addr.to_string(), proc.pin()).await.unwrap();
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
    drop(proc);
}

#[test]
fn sigterm_stops_the_binary_cleanly_with_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let proc = ServerProcess::start(dir.path());
    let status = proc.terminate();
    assert!(status.success(), "exit status {status:?}");
    // The database closed cleanly: the next start opens it.
    let again = ServerProcess::start(dir.path());
    assert_eq!(again.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_own_certificate_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["chat.example.org".to_string()]).unwrap();
    let cert_path = dir.path().join("own-cert.pem");
    let key_path = dir.path().join("own-key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let mut cfg = common::server_config(&dir.path().join("data"));
    cfg.cert = Some(cert_path);
    cfg.key = Some(key_path);
    let server = start_server_with(cfg).await;
    let want = qpq::transport::Fingerprint::of(certified.cert.der());
    assert_eq!(server.fingerprint(), want);
    assert!(!dir.path().join("data").join(qpq::transport::CERT_FILE).exists(), "nothing generated");
    local(async {
        let s = connect(&server).await;
        assert_eq!(s.fingerprint(), want);
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The binary reads QPQ_LISTEN from the environment and limits from qpq-server.toml.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_env_and_config_file_settings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("qpq-server.toml"),
        "listen = \"127.0.0.1:1\"\nmax_payload_bytes = 1000\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qpq"))
        .arg("serve")
        .env("QPQ_DATA_DIR", dir.path())
        .env("QPQ_LISTEN", "127.0.0.1:0")
        .env("QPQ_STORE", common::backend().store_arg())
        .env("QPQ_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = common::Lines::of(child.stdout.take().unwrap());
    let (mut addr, mut fp) = (None, None);
    while addr.is_none() {
        let line = lines.next_line().unwrap();
        if let Some(f) = line.strip_prefix("certificate fingerprint ") {
            fp = Some(qpq::transport::Fingerprint::parse(f).unwrap());
        }
        addr = line.strip_prefix("listening on ").map(str::to_string);
    }
    let addr = addr.unwrap();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":1"), "env beats the file: {addr}");
    local(async {
        let s = Session::connect(&addr, Pin::Fingerprint(fp.unwrap())).await.unwrap();
        let key = Identity::generate().public().0;
        assert_eq!(rpc_msg(s.enqueue(&key, &[0u8; 2000], b"").await), "payload too large: 2000 > 1000 bytes");
        s.enqueue(&key, &[0u8; 1000], b"").await.unwrap();
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_the_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_connections = 2;
    let server = start_server_with(cfg).await;
    local(async {
        let a = connect(&server).await;
        let b = connect(&server).await;
        let third =
            Session::connect(&server.local_addr().to_string(), Pin::Fingerprint(server.fingerprint())).await;
        match third {
            Err(SessionError::Connect { reason, .. }) => assert!(reason.contains("refused"), "{reason}"),
            Err(other) => panic!("expected a refused connection, got {other}"),
            Ok(_) => panic!("a third connection was accepted"),
        }
        assert_eq!(a.health().await.unwrap().status, "ok");
        assert_eq!(b.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_held_to_its_quota_after_proving_it_owns_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_connections_per_ip = 4;
    let server = start_server_with(cfg).await;
    local(async {
        // The first two are admitted at once; the next two only after answering a QUIC Retry,
        // which the client does by itself.
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(connect(&server).await);
        }
        let fifth =
            Session::connect(&server.local_addr().to_string(), Pin::Fingerprint(server.fingerprint())).await;
        match fifth {
            Err(SessionError::Connect { reason, .. }) => assert!(reason.contains("refused"), "{reason}"),
            Err(other) => panic!("expected a refused connection, got {other}"),
            Ok(_) => panic!("a fifth connection from one address was accepted"),
        }
        for s in &open {
            assert_eq!(s.health().await.unwrap().status, "ok");
        }
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Review: the server handed out a KeyPackage with hours left, and a member who processed the
/// commit adding it later (back after a few days away, the commit waiting in its queue) refused
/// that commit, since openmls checks the added package's lifetime by the receiver's clock, and
/// fell out of the group for good. Packages valid for less than the message TTL and a day more
/// are now neither handed out nor counted, and the sweep deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_that_could_expire_before_the_commit_reaches_everyone_are_not_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    let ttl = 10 * 24 * 3600;
    cfg.message_ttl_secs = ttl;
    let server = start_server_with(cfg).await;
    local(async {
        let alice = Identity::generate();
        let mls = MlsClient::new(alice.seed()).unwrap();
        let a = login(&server, &alice).await;
        a.upload_key_packages(&kp_bytes(mls.key_packages(2).unwrap()), None).await.unwrap();
        let margin = qpq::limits::key_package_margin_secs(ttl);
        assert_eq!(margin, ttl + 24 * 3600);
        // An hour before only the margin is left: counted and handed out.
        let lifetime = qpq::limits::KEY_PACKAGE_LIFETIME_SECS;
        clock.advance(((lifetime - margin - 3600) * 1000) as i64);
        assert_eq!(a.key_package_count().await.unwrap(), (2, false));
        connect(&server).await.fetch_key_package(&alice.public().0).await.unwrap();
        // Two hours later, with days of its lifetime left, the other one is not.
        clock.advance(2 * 3600 * 1000);
        assert_eq!(a.key_package_count().await.unwrap(), (0, false));
        let msg = rpc_msg(connect(&server).await.fetch_key_package(&alice.public().0).await);
        assert_eq!(msg, "no key packages for this key");
        server.sweep().await;
        clock.set_offset_ms(0);
        assert_eq!(a.key_package_count().await.unwrap(), (0, false), "deleted, not just hidden");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_its_ttl_on_the_servers_clock_is_swept_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    cfg.message_ttl_secs = 3600;
    let server = start_server_with(cfg).await;
    local(async {
        let alice = Identity::generate();
        let sender = connect(&server).await;
        sender.enqueue(&alice.public().0, b"old", b"").await.unwrap();
        let a = login(&server, &alice).await;
        assert_eq!(a.fetch(0).await.unwrap().0.len(), 1);
        clock.advance(3601 * 1000);
        assert!(a.fetch(0).await.unwrap().0.is_empty(), "past the ttl by the server's clock: invisible");
        server.sweep().await;
        // Back to the real time: only a message the sweep deleted stays gone.
        clock.set_offset_ms(0);
        assert!(a.fetch(0).await.unwrap().0.is_empty(), "the sweep deleted it");
        sender.enqueue(&alice.public().0, b"new", b"").await.unwrap();
        let (left, _) = a.fetch(0).await.unwrap();
        assert_eq!(left.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"new".to_vec()]);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_of_an_address_at_its_cap_make_room_for_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    cfg.max_connections_per_ip = 4;
    let server = start_server_with(cfg).await;
    local(async {
        let mut open = Vec::new();
        for _ in 0..4 {
            let s = connect(&server).await;
            assert_eq!(s.health().await.unwrap().status, "ok");
            open.push(s);
        }
        // Kept open but quiet past the idle time by the server's clock, except for three that
        // just made a call.
        clock.advance(qpq::limits::EVICT_IDLE_AFTER_MS as i64 + 1_000);
        for s in &open[..3] {
            assert_eq!(s.health().await.unwrap().status, "ok");
        }
        let fifth = connect(&server).await;
        assert_eq!(fifth.health().await.unwrap().status, "ok", "a new connection is let in");
        // The quiet one was closed to make room; its calls fail once the close arrives.
        let mut tries = 0;
        while open[3].health().await.is_ok() {
            tries += 1;
            assert!(tries < 100, "the idle connection was not evicted");
        }
        for s in &open[..3] {
            assert_eq!(s.health().await.unwrap().status, "ok", "active connections stay");
        }
        let sixth =
            Session::connect(&server.local_addr().to_string(), Pin::Fingerprint(server.fingerprint())).await;
        assert!(sixth.is_err(), "with none idle, the cap still holds");
    })
    .await;
    server.shutdown().await.unwrap();
}
}

/// (payload rows, queue entries) a stopped server stored: redb's `payloads` and `queue` tables
/// in its database file, or PostgreSQL's `qpq_payloads` and `qpq_entries`.
fn stored_rows(dir: &std::path::Path) -> (usize, usize) {
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
    if let common::Backend::Postgres(url) = common::backend() {
        let out = common::pg::Cluster::get().query(
            &url,
            "SELECT (SELECT count(*) FROM qpq_payloads) || ' ' || (SELECT count(*) FROM qpq_entries)",
        );
        let (p, q) = out.split_once(' ').expect("two counts");
        return (p.parse().unwrap(), q.parse().unwrap());
    }
    let payloads: TableDefinition<u64, &[u8]> = TableDefinition::new("payloads");
    let queue: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queue");
    let db = redb::Database::open(dir.join("qpq.db")).unwrap();
    let txn = db.begin_read().unwrap();
    let p = txn.open_table(payloads).unwrap().len().unwrap() as usize;
    let q = txn.open_table(queue).unwrap().len().unwrap() as usize;
    (p, q)
}

/// Bytes charged against the storage quota, on PostgreSQL (None on redb, which keeps the total
/// in its file's metadata).
fn pg_stored_bytes() -> Option<u64> {
    let common::Backend::Postgres(url) = common::backend() else { return None };
    let out = common::pg::Cluster::get().query(&url, "SELECT coalesce(sum(bytes), 0) FROM qpq_stored_bytes");
    Some(out.parse().unwrap())
}

on_both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_is_stored_once_and_deleted_after_the_last_ack_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let people: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    let keys: Vec<PublicKey> = people.iter().map(|p| p.public()).collect();
    let payload = vec![0x42u8; 5000];
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        s.enqueue(&keys[1].0, b"earlier", b"").await.unwrap();
        let (cseq, seqs) = s.enqueue_fanout(b"grp", &payload, &keys).await.unwrap();
        assert_eq!((cseq, seqs), (1, vec![1, 2, 1]), "one channel position, each recipient's own seq");
        for p in &people {
            let (msgs, _) = login(&server, p).await.fetch(0).await.unwrap();
            let m = msgs.last().unwrap();
            assert_eq!((m.channel_id.as_slice(), m.channel_seq, &m.payload), (&b"grp"[..], 1, &payload));
        }
    })
    .await;
    server.shutdown().await.unwrap();
    // Both stores keep the single enqueue inside its queue entry (PostgreSQL since schema
    // version 4): the fanout's is the only payload row.
    assert_eq!(stored_rows(dir.path()), (1, 4), "one payload row for three recipients, none for one");
    // The quota: the single enqueue's entry (17 + 7), the fanout's row once (8 + 17 + 3 + 5000)
    // and 48 bytes per recipient's entry.
    let fanout_row = 8 + 17 + 3 + 5000;
    if let Some(used) = pg_stored_bytes() {
        assert_eq!(used, 24 + fanout_row + 3 * qpq::limits::FANOUT_ENTRY_BYTES);
    }

    let server = start_server(dir.path()).await;
    local(async {
        for p in &people[..2] {
            login(&server, p).await.ack(u64::MAX).await.unwrap();
        }
    })
    .await;
    server.shutdown().await.unwrap();
    assert_eq!(stored_rows(dir.path()), (1, 1), "the last recipient has not acked yet");
    if let Some(used) = pg_stored_bytes() {
        assert_eq!(used, fanout_row + qpq::limits::FANOUT_ENTRY_BYTES, "the row stays charged until its last ack");
    }

    let server = start_server(dir.path()).await;
    local(async {
        let last = login(&server, &people[2]).await;
        assert_eq!(last.fetch(0).await.unwrap().0[0].payload, payload);
        last.ack(u64::MAX).await.unwrap();
    })
    .await;
    server.shutdown().await.unwrap();
    assert_eq!(stored_rows(dir.path()), (0, 0), "the last ack deleted it");
    if let Some(used) = pg_stored_bytes() {
        assert_eq!(used, 0, "every charge was given back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fanouts_are_refused_with_codes_and_store_nothing() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        let alice = Identity::generate();
        let a = alice.public();
        let refused = |r: Result<(u64, Vec<u64>), SessionError>| match r {
            Err(SessionError::Rpc(e)) => (e.code, e.message),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let bad = ErrorCode::BadRequest;
        assert_eq!(refused(s.enqueue_fanout(b"", b"x", &[]).await), (bad, "fanout has no recipients".into()));
        assert_eq!(
            refused(s.enqueue_fanout(b"", b"x", &[a, Identity::generate().public(), a]).await),
            (bad, "duplicate recipient: item 2 repeats item 0".into())
        );
        let many: Vec<PublicKey> = (0..=qpq::limits::MAX_FANOUT_RECIPIENTS)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                PublicKey(k)
            })
            .collect();
        assert_eq!(
            refused(s.enqueue_fanout(b"", b"x", &many).await),
            (ErrorCode::TooLarge, "too many recipients: 10001 > 10000".into())
        );
        // A batch over its recipient cap is tooLarge too, as the schema says.
        let batch: Vec<(PublicKey, Vec<u8>)> =
            many[..=qpq::limits::MAX_BATCH_RECIPIENTS].iter().map(|k| (*k, b"x".to_vec())).collect();
        assert_eq!(
            refused(s.enqueue_batch(b"", &batch).await),
            (ErrorCode::TooLarge, "too many recipients: 4097 > 4096".into())
        );
        let (_, seqs) = s.enqueue_fanout(b"", b"x", &many[1..]).await.expect("exactly the cap is taken");
        assert_eq!(seqs.len(), qpq::limits::MAX_FANOUT_RECIPIENTS);
        let max = qpq::limits::DEFAULT_MAX_PAYLOAD;
        assert_eq!(
            refused(s.enqueue_fanout(b"", &vec![0u8; max + 1], &[a]).await),
            (ErrorCode::TooLarge, format!("payload too large: {} > {max} bytes", max + 1))
        );
        assert_eq!(refused(s.enqueue_fanout(b"", b"", &[a]).await), (bad, "payload is empty".into()));
        assert_eq!(
            refused(s.enqueue_fanout(&[0u8; 65], b"x", &[a]).await),
            (bad, "channel id too long: 65 > 64 bytes".into())
        );
        assert!(login(&server, &alice).await.fetch(0).await.unwrap().0.is_empty(), "nothing was stored");
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_charges_the_storage_quota_once_and_each_queue_the_whole_payload() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let payload = vec![7u8; 20_000];
    let n = 100u64;
    let entry = 17 + payload.len() as u64; // the queue entry's header, no channel id
    let mut cfg = common::server_config(dir.path());
    // Room for one stored copy and 100 index entries; 100 copies would need 2 MB.
    cfg.max_stored_bytes = 8 + entry + n * qpq::limits::FANOUT_ENTRY_BYTES;
    cfg.max_queue_bytes = entry + 10;
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let keys: Vec<PublicKey> = (0..n).map(|_| Identity::generate().public()).collect();
        s.enqueue_fanout(b"", &payload, &keys).await.expect("one copy fits the quota");
        // Without the session's retries (the refusal asks to come back in seconds).
        let node = qpq::proto::node_capnp::node_service::Client { client: s.raw_node_client() };
        let mut req = node.enqueue_fanout_request();
        req.get().set_payload(b"more");
        req.get().init_recipients(1).set(0, &Identity::generate().public().0);
        let e = SessionError::from(req.send().promise.await.err().expect("over the quota"));
        assert_eq!(e.code(), Some(ErrorCode::OverQuota), "{e}");
        // Each recipient's queue was charged the whole payload: its byte cap is reached too.
        let e = s.enqueue(&keys[0].0, &[1u8; 20], b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "{e}");
    })
    .await;
    server.shutdown().await.unwrap();
}
}

/// Bytes a stopped server charged against its storage quota: redb's `stored_bytes` counter in
/// its database file, or the sum of PostgreSQL's shards.
fn stored_bytes(dir: &std::path::Path) -> u64 {
    use redb::{ReadableDatabase, TableDefinition};
    if let Some(used) = pg_stored_bytes() {
        return used;
    }
    let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
    let db = redb::Database::open(dir.join("qpq.db")).unwrap();
    let txn = db.begin_read().unwrap();
    let used = txn.open_table(meta).unwrap().get("stored_bytes").unwrap().map(|g| g.value());
    used.unwrap_or(0)
}

/// The wire code of a call's refusal (panics on success).
fn refusal_code<T: std::fmt::Debug>(r: Result<T, capnp::Error>) -> qpq::proto::wire_error::ErrorCode {
    match r.map_err(SessionError::from) {
        Err(SessionError::Rpc(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A key no one uses, the `i`th of a series.
fn fresh_key(i: u32) -> PublicKey {
    let mut k = [0xA5u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    PublicKey(k)
}

/// Sends `call` until the server answers `rateLimited`; every answer before it must be
/// `queueFull`. Returns how many were refused `queueFull` first (panics after `most`).
async fn refused_until_rate_limited<F, Fut>(most: usize, mut call: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = qpq::proto::wire_error::ErrorCode>,
{
    use qpq::proto::wire_error::ErrorCode;
    for refused in 0..most {
        match call().await {
            ErrorCode::QueueFull => {}
            ErrorCode::RateLimited => return refused,
            other => panic!("expected queueFull or rateLimited, got {other:?}"),
        }
    }
    panic!("{most} refused calls and still not rate limited: refusals cost the sender nothing");
}

on_both_backends! {
/// PostgreSQL review: a refused enqueue committed the channel and queue rows its transaction
/// had created (to lock them), so a stranger's refused enqueues to fresh channel ids left rows
/// for 30 days that nothing charged. A refusal now changes no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_enqueue_leaves_no_channel_or_queue_row() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 1;
    let server = start_server_with(cfg).await;
    let full = Identity::generate().public();
    local(async {
        let s = connect(&server).await;
        s.enqueue(&full.0, b"fills it", b"").await.unwrap();
        let e = s.enqueue(&full.0, b"refused", b"fresh channel").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "{e}");
    })
    .await;
    server.shutdown().await.unwrap();
    if let common::Backend::Postgres(url) = common::backend() {
        let count = |sql: &str| common::pg::Cluster::get().query(&url, sql);
        let channel = hex::encode(b"fresh channel");
        assert_eq!(count(&format!("SELECT count(*) FROM qpq_channels WHERE id = '\\x{channel}'")), "0");
        assert_eq!(count("SELECT count(*) FROM qpq_queues"), "1", "only the full queue's row");
    } else {
        assert_eq!(stored_rows(dir.path()).1, 1, "one queue entry");
    }
}

/// Review: on PostgreSQL a channel's counter row lived until the message TTL (30 days) after
/// its last use, uncharged, so a stranger enqueueing to fresh channel ids (and acking) left a
/// row per call for a month. It now goes an hour after its last use, in slices, and numbers on
/// the channel still only rise. (redb deletes its row once nothing on the channel is queued.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channels_counter_row_is_deleted_and_its_numbers_still_rise() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    let server = start_server_with(cfg).await;
    let pg = match common::backend() {
        common::Backend::Postgres(url) => Some(url),
        common::Backend::Redb => None,
    };
    let count = |sql: &str| common::pg::Cluster::get().query(pg.as_deref().unwrap(), sql);
    if pg.is_some() {
        // Old idle rows of other channels, more than one sweep slice holds.
        let n = qpq::limits::SWEEP_SLICE_ROWS * 2 + 10;
        count(&format!(
            "INSERT INTO qpq_channels (id, last_seq, touched_ms)
             SELECT int8send(i), i, 0 FROM generate_series(1, {n}) i"
        ));
    }
    let stranger = Identity::generate();
    local(async {
        let s = login(&server, &stranger).await;
        let mut last = 0;
        for channel in [&b"fresh 1"[..], b"fresh 2", b"fresh 3"] {
            let (seq, cseq) = s.enqueue(&stranger.public().0, b"x", channel).await.unwrap();
            s.ack(seq).await.unwrap();
            last = last.max(cseq);
        }
        // A channel in use keeps its row.
        s.enqueue(&stranger.public().0, b"kept", b"busy").await.unwrap();
        clock.advance((qpq::limits::CHANNEL_IDLE_MS + 60_000) as i64);
        s.enqueue(&stranger.public().0, b"kept", b"busy").await.unwrap();
        server.sweep().await;
        if pg.is_some() {
            assert_eq!(count("SELECT count(*) FROM qpq_channels"), "1", "only the busy channel's row is left");
        }
        let (_, again) = s.enqueue(&stranger.public().0, b"y", b"fresh 1").await.unwrap();
        assert!(again > last, "a re-created channel counts on above its old numbers: {again} > {last}");
        if pg.is_some() {
            let old = (qpq::limits::SWEEP_SLICE_ROWS * 2 + 10) as u64;
            assert!(again > old, "and above the swept rows' numbers: {again} > {old}");
        }
    })
    .await;
    server.shutdown().await.unwrap();
    if pg.is_none() {
        use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
        let channels: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("channels");
        let db = redb::Database::open(dir.path().join("qpq.db")).unwrap();
        let rows = db.begin_read().unwrap().open_table(channels).unwrap().len().unwrap();
        assert_eq!(rows, 2, "the channels with queued messages: busy and fresh 1");
    }
}

/// Security review: a stranger who filled one member's queue (10,000 anonymous 1-byte enqueues)
/// made every fanout naming that member fail with queueFull, freezing all their groups. A full
/// queue now skips its recipient (seq 0) and the others still get the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_skips_full_queues_and_stores_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 3;
    let server = start_server_with(cfg).await;
    // alice and carol have room; bob's and dave's queues are full.
    let people: Vec<Identity> = (0..4).map(|_| Identity::generate()).collect();
    let keys: Vec<PublicKey> = people.iter().map(|p| p.public()).collect();
    let (bob, dave) = (keys[1], keys[3]);
    let payload = vec![0x42u8; 1000];
    local(async {
        let s = connect(&server).await;
        for _ in 0..3 {
            s.enqueue(&bob.0, b"x", b"").await.unwrap();
            s.enqueue(&dave.0, b"x", b"").await.unwrap();
        }
        let (cseq, seqs) = s.enqueue_fanout(b"grp", &payload, &keys).await.expect("stored for the others");
        assert_eq!((cseq, seqs), (1, vec![1, 0, 1, 0]), "one channel position, 0 for the full queues");
        for p in [&people[0], &people[2]] {
            let (msgs, _) = login(&server, p).await.fetch(0).await.unwrap();
            let got: Vec<_> = msgs.iter().map(|m| (m.seq, m.channel_id.as_slice(), m.channel_seq, &m.payload)).collect();
            assert_eq!(got, vec![(1, &b"grp"[..], 1, &payload)]);
        }
        for p in [&people[1], &people[3]] {
            let (msgs, _) = login(&server, p).await.fetch(0).await.unwrap();
            assert!(msgs.iter().all(|m| m.payload == b"x"), "nothing past the cap");
            assert_eq!(msgs.len(), 3);
        }
        // Every recipient full: refused as before, and nothing stored, no channel position taken.
        let msg = rpc_msg(s.enqueue_fanout(b"grp", b"y", &[bob, dave]).await);
        assert!(msg.starts_with("queue full: recipient has 3 messages"), "{msg}");
        let (cseq, seqs) = s.enqueue_fanout(b"grp", b"z", &[keys[0]]).await.unwrap();
        assert_eq!((cseq, seqs), (2, vec![2]), "the refused fanout took no number");
    })
    .await;
    server.shutdown().await.unwrap();
    // Six 1-byte enqueues (17 + 1 each), the first fanout's row once (8 + 17 + 3 + 1000) and two
    // entries (not four), the last fanout's row (8 + 17 + 3 + 1) and one entry.
    let entry = qpq::limits::FANOUT_ENTRY_BYTES;
    assert_eq!(stored_bytes(dir.path()), 6 * 18 + (8 + 17 + 3 + 1000) + 2 * entry + (8 + 17 + 3 + 1) + entry);
    assert_eq!(stored_rows(dir.path()), (2, 6 + 2 + 1), "no entry for a skipped recipient");
}

/// A committer learns that its commit won from its own copy, in the channel's order. When only
/// its own queue was full (a stranger flooded it) the server skipped it and stored the commit
/// for the others: they moved to the next epoch and the committer never did. A fanout that
/// names a required recipient is refused whole when that recipient's queue is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_whose_required_recipients_queue_is_full_stores_nothing_for_anyone() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 2;
    let server = start_server_with(cfg).await;
    let (alice, bob, carol) = (Identity::generate(), Identity::generate(), Identity::generate());
    let keys = [alice.public(), bob.public(), carol.public()];
    let refused = |r: Result<(u64, Vec<u64>), SessionError>| match r {
        Err(SessionError::Rpc(e)) => (e.code, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    local(async {
        let s = connect(&server).await;
        // A stranger fills alice's queue.
        for _ in 0..2 {
            s.enqueue(&keys[0].0, b"flood", b"").await.unwrap();
        }
        let (code, msg) = refused(s.enqueue_fanout_requiring(b"grp", b"commit", &keys, &keys[0]).await);
        assert_eq!(code, ErrorCode::QueueFull, "{msg}");
        assert!(msg.starts_with("queue full: recipient has 2 messages"), "{msg}");
        // Also on a fresh channel, to fresh queues: no row is left behind (checked below).
        let erin = Identity::generate().public();
        let (code, _) = refused(s.enqueue_fanout_requiring(b"fresh", b"commit", &[erin, keys[0]], &keys[0]).await);
        assert_eq!(code, ErrorCode::QueueFull);
        for p in [&bob, &carol] {
            let (msgs, _) = login(&server, p).await.fetch(0).await.unwrap();
            assert!(msgs.is_empty(), "nothing stored for the others: {msgs:?}");
        }
        let stranger = Identity::generate().public();
        assert_eq!(
            refused(s.enqueue_fanout_requiring(b"grp", b"x", &keys[1..], &stranger).await),
            (ErrorCode::BadRequest, "required key is not one of the recipients".into())
        );
        // Without the requirement the same fanout skips alice and stores for the others, at
        // the channel's first position: the refused ones took none.
        let (cseq, seqs) = s.enqueue_fanout(b"grp", b"commit", &keys).await.unwrap();
        assert_eq!((cseq, seqs), (1, vec![0, 1, 1]));
        // A required recipient with room is stored for like any other.
        let (cseq, seqs) = s.enqueue_fanout_requiring(b"grp", b"m", &keys[1..], &keys[1]).await.unwrap();
        assert_eq!((cseq, seqs), (2, vec![2, 2]));
    })
    .await;
    server.shutdown().await.unwrap();
    // alice's two enqueues; two fanout rows, each with two entries.
    assert_eq!(stored_rows(dir.path()), (2, 2 + 2 + 2), "nothing of the refused fanouts");
    if let common::Backend::Postgres(url) = common::backend() {
        let count = |sql: &str| common::pg::Cluster::get().query(&url, sql);
        let fresh = hex::encode(b"fresh");
        assert_eq!(count(&format!("SELECT count(*) FROM qpq_channels WHERE id = '\\x{fresh}'")), "0");
        assert_eq!(count("SELECT count(*) FROM qpq_queues"), "3", "no queue row for erin");
    }
}

/// Mail past its TTL is hidden from fetches at once but deleted only when the sweep comes round
/// (every ten minutes), and until then it counted against its queue's caps: a queue full of it
/// refused new mail, and a committer whose own queue was full of it could not commit. Now the
/// expired messages at the head of a full queue make room, on enqueue and fanout alike, and
/// give their quota back; a queue full of young mail is still full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_full_of_expired_mail_takes_new_mail_before_the_sweep() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    cfg.message_ttl_secs = 3600;
    cfg.max_queue_messages = 2;
    let server = start_server_with(cfg).await;
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let keys = [alice.public(), bob.public()];
    local(async {
        let s = connect(&server).await;
        // alice's queue full of enqueued mail, bob's of a fanout's entry and an enqueue.
        for p in [b"old1", b"old2"] {
            s.enqueue(&keys[0].0, p, b"").await.unwrap();
        }
        s.enqueue_fanout(b"grp", b"old3", &keys[1..]).await.unwrap();
        s.enqueue(&keys[1].0, b"old4", b"").await.unwrap();
        let e = s.enqueue(&keys[0].0, b"young", b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "{e}");
        // An hour later by the server's clock, with no sweep run, all of it has expired.
        clock.advance(3601 * 1000);
        // carol's queue is full of young mail: a batch to alice and carol is refused whole, as
        // before, and the expired messages of alice's that it deleted stay deleted (on
        // PostgreSQL read here; redb's store test `expired_mail_deleted_to_make_room_stays_...`).
        let carol = Identity::generate().public();
        for p in [b"c1", b"c2"] {
            s.enqueue(&carol.0, p, b"").await.unwrap();
        }
        let both = [(keys[0], b"x".to_vec()), (carol, b"x".to_vec())];
        let e = s.enqueue_batch(b"", &both).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "{e}");
        if let common::Backend::Postgres(url) = common::backend() {
            let alices = format!("SELECT count(*) FROM qpq_entries WHERE recipient = '\\x{}'", hex::encode(keys[0].0));
            assert_eq!(common::pg::Cluster::get().query(&url, &alices), "0", "deleted with the refused batch");
        }
        s.enqueue(&keys[0].0, b"new", b"").await.expect("alice's expired mail makes room");
        let (cseq, seqs) = s
            .enqueue_fanout_requiring(b"grp", b"commit", &keys, &keys[1])
            .await
            .expect("bob's expired mail makes room for his commit");
        assert_eq!((cseq, seqs), (2, vec![4, 3]));
        let a = login(&server, &alice).await;
        let (got, _) = a.fetch(0).await.unwrap();
        let got: Vec<_> = got.iter().map(|m| (m.seq, m.payload.clone())).collect();
        assert_eq!(got, vec![(3, b"new".to_vec()), (4, b"commit".to_vec())]);
        let (got, _) = login(&server, &bob).await.fetch(0).await.unwrap();
        assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
        // alice's queue is full again, of young mail: refused as before.
        let e = s.enqueue(&keys[0].0, b"more", b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "{e}");
    })
    .await;
    server.shutdown().await.unwrap();
    // Only the young mail is stored, and charged: carol's two (17 + 2 each), "new" (17 + 3)
    // and the commit's row (8 + 17 + 3 + 6) with its two entries; the expired messages gave
    // their rows and quota back.
    assert_eq!(stored_rows(dir.path()), (1, 5));
    let entry = qpq::limits::FANOUT_ENTRY_BYTES;
    assert_eq!(stored_bytes(dir.path()), 2 * (17 + 2) + (17 + 3) + (8 + 17 + 3 + 6) + 2 * entry);
}

/// A server clock stepped 40 days ahead (a bad time source, a restored VM) made the next sweep
/// delete all queued mail and every key, for good, though the fetches that hide expired mail
/// show it again once the clock is set right. Deleting by age now follows the clock only as
/// fast as time really passes (twice as fast, to catch up): the sweep, and an enqueue making
/// room in a full queue, delete nothing early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_forty_days_ahead_deletes_no_mail_and_no_keys() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    cfg.max_queue_messages = 2;
    let server = start_server_with(cfg).await;
    let alice = Identity::generate();
    let kps = kp_bytes(MlsClient::new(alice.seed()).unwrap().key_packages(2).unwrap());
    local(async {
        let a = login(&server, &alice).await;
        assert_eq!(a.upload_key_packages(&kps, None).await.unwrap(), 2);
        let s = connect(&server).await;
        for p in [b"old1", b"old2"] {
            s.enqueue(&alice.public().0, p, b"").await.unwrap();
        }
        clock.step_ms(40 * 24 * 3600 * 1000);
        server.sweep().await;
        let e = s.enqueue(&alice.public().0, b"new", b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "the full queue's head is not expired: {e}");
        // Nor hidden: mail is visible until it is really deleted.
        let (got, _) = a.fetch(0).await.unwrap();
        assert_eq!(got.len(), 2, "the step hid the mail");
        // The clock set right: everything is still there.
        clock.set_offset_ms(0);
        let (got, _) = a.fetch(0).await.unwrap();
        assert_eq!(got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"old1".to_vec(), b"old2".to_vec()]);
        assert_eq!(a.key_package_count().await.unwrap(), (2, false));
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A take met its target's packages expired by the server's clock and deleted them, and the
/// last-resort one too: with that clock stepped ahead, every inviter's attempt erased its
/// invitee's keys for good. A take now deletes only what expired by the deletion clock; it
/// hands out nothing that looks expired, and the keys are all there once the clock is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_by_a_clock_stepped_ahead_deletes_no_key_packages() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    let server = start_server_with(cfg).await;
    let alice = Identity::generate();
    let mls = MlsClient::new(alice.seed()).unwrap();
    let kps = kp_bytes(mls.key_packages(2).unwrap());
    let lr = mls.last_resort_key_package().unwrap().bytes;
    local(async {
        let a = login(&server, &alice).await;
        assert_eq!(a.upload_key_packages(&kps, Some(&lr)).await.unwrap(), 2);
        // Past every package's lifetime (64 days at most).
        clock.step_ms(70 * 24 * 3600 * 1000);
        let s = connect(&server).await;
        for _ in 0..2 {
            let e = s.fetch_key_package(&alice.public().0).await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::NoKeyPackages), "{e}");
        }
        clock.set_offset_ms(0);
        assert_eq!(a.key_package_count().await.unwrap(), (2, true), "nothing was deleted");
        assert!(kps.contains(&s.fetch_key_package(&alice.public().0).await.unwrap().bytes));
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A step made while the server was stopped (a VPS booting with a bad hardware clock, a VM
/// restored from a snapshot): the restarted server's deletion clock started from the clock as
/// it found it, so its first sweep deleted all mail and keys. Now it resumes from the time the
/// store's last sweep deleted by, plus what the clock moved since and a day at most, and takes
/// the rest in as time passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_forty_days_ahead_deletes_no_mail_and_no_keys() {
    use qpq::proto::wire_error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    let clock = qpq::clock::Clock::system();
    cfg.clock = clock.clone();
    cfg.max_queue_messages = 2;
    let alice = Identity::generate();
    let kps = kp_bytes(MlsClient::new(alice.seed()).unwrap().key_packages(2).unwrap());
    let server = start_server_with(cfg.clone()).await;
    local(async {
        let a = login(&server, &alice).await;
        assert_eq!(a.upload_key_packages(&kps, None).await.unwrap(), 2);
        for p in [b"old1", b"old2"] {
            a.enqueue(&alice.public().0, p, b"").await.unwrap();
        }
    })
    .await;
    // The sweep records the time it deleted by.
    server.sweep().await;
    server.shutdown().await.unwrap();

    clock.step_ms(40 * 24 * 3600 * 1000);
    // Restarted again and again (a crash loop) with no time passing: each start may take in
    // what the clock moved since the last sweep, which is nothing here, not a day each time.
    for _ in 0..31 {
        let server = start_server_with(cfg.clone()).await;
        server.sweep().await;
        server.shutdown().await.unwrap();
    }
    let server = start_server_with(cfg.clone()).await;
    server.sweep().await;
    local(async {
        let s = connect(&server).await;
        let e = s.enqueue(&alice.public().0, b"new", b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "the full queue's head is not expired: {e}");
        clock.set_offset_ms(0);
        let a = login(&server, &alice).await;
        let (got, _) = a.fetch(0).await.unwrap();
        assert_eq!(got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"old1".to_vec(), b"old2".to_vec()]);
        assert_eq!(a.key_package_count().await.unwrap(), (2, false));
        // Time that really passes is followed: forty days on, the mail is deleted.
        clock.advance(40 * 24 * 3600 * 1000);
    })
    .await;
    server.sweep().await;
    local(async {
        clock.set_offset_ms(0);
        let a = login(&server, &alice).await;
        assert!(a.fetch(0).await.unwrap().0.is_empty(), "expired mail is deleted once its time has passed");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A refused fanout gave its network's byte budget back in full, so a stranger could repeat
/// one naming thousands of fresh keys and then a queue it had filled at the call rate alone,
/// each costing the store work per recipient. Now a refusal costs 48 bytes per recipient it
/// names (its payload is given back), and the budget runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_fanouts_spend_the_networks_byte_budget_per_recipient_named() {
    use qpq::proto::node_capnp::node_service;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 1;
    // One byte every 100 s: the test's real time refills nothing that counts.
    cfg.rate_limits.enqueue_bytes_per_network = qpq::server::ratelimit::Rate { per_sec: 0.01, burst: 200_000 };
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let filled = fresh_key(u32::MAX);
        s.enqueue(&filled.0, b"x", b"").await.unwrap();
        let mut recipients: Vec<PublicKey> = (0..1_000).map(fresh_key).collect();
        recipients.push(filled);
        let node = node_service::Client { client: s.raw_node_client() };
        let fanout = || {
            let mut req = node.enqueue_fanout_request();
            req.get().set_payload(b"y");
            req.get().set_required(&filled.0);
            let mut list = req.get().init_recipients(recipients.len() as u32);
            for (i, to) in recipients.iter().enumerate() {
                list.set(i as u32, &to.0);
            }
            async move { refusal_code(req.send().promise.await.map(|_| ())) }
        };
        // 199,982 bytes left (the first enqueue cost 1 + its 17-byte header); each refusal
        // keeps 1,001 x 48 = 48,048 of the 48,074 it took (its row: 8 + 17 + 1).
        assert_eq!(refused_until_rate_limited(50, fanout).await, 4);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The same for a batch: it is refused at its one full queue, after the store checked the
/// items before it; a refusal costs 48 bytes per item, however small its payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_spend_the_networks_byte_budget_per_item() {
    use qpq::proto::node_capnp::node_service;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 1;
    cfg.rate_limits.enqueue_bytes_per_network = qpq::server::ratelimit::Rate { per_sec: 0.01, burst: 20_000 };
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let filled = fresh_key(u32::MAX);
        s.enqueue(&filled.0, b"x", b"").await.unwrap();
        let mut recipients: Vec<PublicKey> = (0..100).map(fresh_key).collect();
        recipients.push(filled);
        let node = node_service::Client { client: s.raw_node_client() };
        let batch = || {
            let mut req = node.enqueue_batch_request();
            let mut list = req.get().init_items(recipients.len() as u32);
            for (i, to) in recipients.iter().enumerate() {
                let mut item = list.reborrow().get(i as u32);
                item.set_recipient_key(&to.0);
                item.set_payload(b"y");
            }
            async move { refusal_code(req.send().promise.await.map(|_| ())) }
        };
        // 19,982 bytes left (the first enqueue cost 1 + its 17-byte header); each refusal
        // costs 101 x 48 = 4,848 (101 x 18 are taken up front): 4 leave 590, short of the
        // fifth's 1,818.
        assert_eq!(refused_until_rate_limited(50, batch).await, 4);
    })
    .await;
    server.shutdown().await.unwrap();
}
}

/// PostgreSQL schema version 1 as it shipped (frozen here: a database written by it must keep
/// working), with its version row.
const PG_SCHEMA_V1: &str = "
     CREATE TABLE qpq_schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
     INSERT INTO qpq_schema_version (version) VALUES (1);
     CREATE TABLE qpq_meta (name text PRIMARY KEY, value bigint NOT NULL);
     INSERT INTO qpq_meta (name, value) VALUES ('seq_floor', 0), ('channel_seq_floor', 0);
     CREATE TABLE qpq_queues (recipient bytea PRIMARY KEY, next_seq bigint NOT NULL, count bigint NOT NULL,
         bytes bigint NOT NULL);
     CREATE TABLE qpq_channels (id bytea PRIMARY KEY, last_seq bigint NOT NULL, touched_ms bigint NOT NULL);
     CREATE TABLE qpq_payloads (id bigserial PRIMARY KEY, channel_id bytea NOT NULL, channel_seq bigint NOT NULL,
         enqueued_at_ms bigint NOT NULL, body bytea NOT NULL);
     CREATE TABLE qpq_entries (recipient bytea NOT NULL, seq bigint NOT NULL, payload_id bigint NOT NULL,
         bytes bigint NOT NULL, enqueued_at_ms bigint NOT NULL, PRIMARY KEY (recipient, seq));
     CREATE INDEX qpq_entries_by_age ON qpq_entries (enqueued_at_ms);
     CREATE TABLE qpq_stored_bytes (shard integer PRIMARY KEY, bytes bigint NOT NULL);
     CREATE TABLE qpq_key_packages (id bigserial PRIMARY KEY, identity bytea NOT NULL, not_after bigint NOT NULL,
         bytes bytea NOT NULL);
     CREATE INDEX qpq_key_packages_by_identity ON qpq_key_packages (identity, id);
     CREATE INDEX qpq_key_packages_by_expiry ON qpq_key_packages (not_after);
     CREATE TABLE qpq_key_package_owners (identity bytea PRIMARY KEY);
     CREATE TABLE qpq_last_resort (identity bytea PRIMARY KEY, not_after bigint NOT NULL, bytes bytea NOT NULL);
     CREATE TABLE qpq_hybrid_keys (identity bytea PRIMARY KEY, created_at_ms bigint NOT NULL, value bytea NOT NULL);";

/// A database written by schema version 1 (a payload row per entry) is migrated at start-up:
/// its mail is fetched and acked as before, the ack gives back exactly what version 1 charged,
/// and fanouts stored after the migration share a payload row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_postgres_database_is_migrated_and_its_mail_read_and_acked_as_before() {
    let cluster = common::pg::Cluster::get();
    let url = cluster.fresh_database();
    let bob = Identity::generate();
    let carol = Identity::generate();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let key = hex::encode(bob.public().0);
    // One message of 7 bytes, no channel: charged 17 + 7 on the queue and the quota.
    cluster.query(
        &url,
        &format!(
            "{PG_SCHEMA_V1};
             INSERT INTO qpq_queues VALUES ('\\x{key}', 2, 1, 24);
             INSERT INTO qpq_payloads (channel_id, channel_seq, enqueued_at_ms, body) VALUES ('', 0, {now_ms}, 'earlier');
             INSERT INTO qpq_entries VALUES ('\\x{key}', 1, 1, 24, {now_ms});
             INSERT INTO qpq_stored_bytes VALUES (0, 24);"
        ),
    );
    common::use_backend(common::Backend::Postgres(url.clone()));
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let b = login(&server, &bob).await;
        let (msgs, _) = b.fetch(0).await.unwrap();
        assert_eq!(
            msgs.iter().map(|m| (m.seq, m.payload.clone())).collect::<Vec<_>>(),
            vec![(1, b"earlier".to_vec())]
        );
        let s = connect(&server).await;
        let (_, seqs) = s.enqueue_fanout(b"", b"shared", &[bob.public(), carol.public()]).await.unwrap();
        assert_eq!(seqs, vec![2, 1], "bob's numbers go on from the migrated queue");
        assert_eq!(b.ack(2).await.unwrap(), 2);
        login(&server, &carol).await.ack(1).await.unwrap();
    })
    .await;
    server.shutdown().await.unwrap();
    assert_eq!(cluster.query(&url, "SELECT max(version) FROM qpq_schema_version"), PG_SCHEMA.to_string());
    assert_eq!(stored_rows(dir.path()), (0, 0));
    assert_eq!(pg_stored_bytes(), Some(0), "the version 1 entry gave back its 24 bytes");
}

/// What PostgreSQL schema version 2 added to version 1 as it shipped (frozen here, like
/// [`PG_SCHEMA_V1`]), with its version row.
const PG_SCHEMA_V2_ON_V1: &str = "
     ALTER TABLE qpq_payloads ADD COLUMN refs bigint NOT NULL DEFAULT 1, ADD COLUMN quota bigint NOT NULL DEFAULT 0;
     ALTER TABLE qpq_entries ADD COLUMN quota bigint;
     UPDATE qpq_entries SET quota = bytes;
     ALTER TABLE qpq_entries ALTER COLUMN quota SET NOT NULL;
     CREATE INDEX qpq_payloads_unreferenced ON qpq_payloads (id) WHERE refs <= 0;
     INSERT INTO qpq_schema_version (version) VALUES (2);";

/// What PostgreSQL schema version 3 added to version 2 as it shipped, with its version row.
const PG_SCHEMA_V3_ON_V2: &str = "
     CREATE TABLE qpq_queue_freed (recipient bytea PRIMARY KEY, count bigint NOT NULL, bytes bigint NOT NULL);
     INSERT INTO qpq_schema_version (version) VALUES (3);";

/// A node that would migrate a version 3 database refuses to start while a node of an older
/// version is connected to it (that node would not see the mail the new one keeps in its
/// entries, and its clients' acks would delete it unread), says so, and leaves the database as
/// it was; once the older node is gone, it migrates. A connection of a node of its own version
/// does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_does_not_migrate_a_database_an_older_node_is_using() {
    let cluster = common::pg::Cluster::get();
    let url = cluster.fresh_database();
    cluster.query(&url, &format!("{PG_SCHEMA_V1}; {PG_SCHEMA_V2_ON_V1} {PG_SCHEMA_V3_ON_V2}"));
    common::use_backend(common::Backend::Postgres(url.clone()));
    let dir = tempfile::tempdir().unwrap();
    let older = cluster.idle_connection(&url, "qpq");
    let peer_name = format!("qpq schema {}", qpq::store::postgres::SCHEMA_VERSION);
    let peer = cluster.idle_connection(&url, &peer_name);
    let refused = match qpq::server::start(common::server_config(dir.path())).await {
        Ok(_) => panic!("started and migrated under an older node"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("schema version 3") && refused.contains("1 connection(s) of older qpq nodes"),
        "{refused}"
    );
    assert_eq!(cluster.query(&url, "SELECT max(version) FROM qpq_schema_version"), "3", "not migrated");
    cluster.close_idle(&url, "qpq", older);
    let server = start_server(dir.path()).await;
    server.shutdown().await.unwrap();
    cluster.close_idle(&url, &peer_name, peer);
    assert_eq!(cluster.query(&url, "SELECT max(version) FROM qpq_schema_version"), PG_SCHEMA.to_string());
}

/// A database written by schema version 2 (acks decremented the queue row) is migrated to
/// the newest version at start-up: its full queue refuses one more, an ack of its old mail makes
/// room again (the freed row starts from nothing), its numbers go on, and its payload-row
/// entries read in one page with the inline ones written after the migration. Its key rows
/// are charged to the key budget (version 5) and an expired one gives its charge back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_postgres_database_is_migrated_and_its_full_queue_drains_by_acks() {
    use qpq::proto::wire_error::ErrorCode;
    let cluster = common::pg::Cluster::get();
    let url = cluster.fresh_database();
    let bob = Identity::generate();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let key = hex::encode(bob.public().0);
    // Two messages of 7 bytes, no channel: 17 + 7 each on the queue and the quota.
    cluster.query(
        &url,
        &format!(
            "{PG_SCHEMA_V1}; {PG_SCHEMA_V2_ON_V1}
             INSERT INTO qpq_queues VALUES ('\\x{key}', 3, 2, 48);
             INSERT INTO qpq_payloads (channel_id, channel_seq, enqueued_at_ms, body, refs, quota)
                 VALUES ('', 0, {now_ms}, 'earlier', 1, 0), ('', 0, {now_ms}, 'earliest', 1, 0);
             INSERT INTO qpq_entries (recipient, seq, payload_id, bytes, enqueued_at_ms, quota)
                 VALUES ('\\x{key}', 1, 1, 24, {now_ms}, 24), ('\\x{key}', 2, 2, 24, {now_ms}, 24);
             INSERT INTO qpq_stored_bytes VALUES (0, 48);
             INSERT INTO qpq_key_packages (identity, not_after, bytes)
                 VALUES ('\\x{key}', {past}, '\\x01020304'), ('\\x{key}', {later}, '\\x0102');
             INSERT INTO qpq_last_resort VALUES ('\\x{key}', {later}, '\\x010203');
             INSERT INTO qpq_hybrid_keys VALUES ('\\x{key}', {now_ms}, '\\x00010203040506070809');
             INSERT INTO qpq_key_packages (identity, not_after, bytes) VALUES ('\\x00', {past}, '\\x01');
             INSERT INTO qpq_key_package_owners VALUES ('\\x00'), ('\\x{key}');",
            past = now_ms / 1000 - 10,
            later = now_ms / 1000 + 60 * 24 * 3600, // past the hand-out margin (31 days)
        ),
    );
    common::use_backend(common::Backend::Postgres(url.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::server_config(dir.path());
    cfg.max_queue_messages = 2;
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let e = s.enqueue(&bob.public().0, b"x", b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "{e}");
        let b = login(&server, &bob).await;
        assert_eq!(b.ack(1).await.unwrap(), 1);
        let (seq, _) = s.enqueue(&bob.public().0, b"x", b"").await.unwrap();
        assert_eq!(seq, 3, "numbers go on from the migrated queue");
        let e = s.enqueue(&bob.public().0, b"y", b"").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::QueueFull), "full again: the migrated count still holds");
        // One page holds a migrated entry (its payload row) and a new one (its body inline,
        // schema version 4).
        let (msgs, _) = b.fetch(0).await.unwrap();
        assert_eq!(
            msgs.iter().map(|m| (m.seq, m.payload.clone(), m.channel_id.clone())).collect::<Vec<_>>(),
            vec![(2, b"earliest".to_vec(), Vec::new()), (3, b"x".to_vec(), Vec::new())]
        );
        assert_eq!(b.ack(3).await.unwrap(), 2);
        // Packages: 8 + their bytes + 128 each; the hybrid key: its value + 128.
        assert_eq!(cluster.query(&url, "SELECT sum(bytes) FROM qpq_key_bytes"), "692");
        server.sweep().await;
        assert_eq!(
            cluster.query(&url, "SELECT sum(bytes) FROM qpq_key_bytes"),
            "415",
            "the expired ones' 140 and 137 freed"
        );
        let owners = cluster.query(&url, "SELECT to_regclass('qpq_key_package_owners') IS NULL");
        assert_eq!(owners, "t", "version 6 drops the owner rows (uploads take an advisory lock)");
    })
    .await;
    server.shutdown().await.unwrap();
    assert_eq!(cluster.query(&url, "SELECT max(version) FROM qpq_schema_version"), PG_SCHEMA.to_string());
    assert_eq!(stored_rows(dir.path()), (0, 0));
    assert_eq!(pg_stored_bytes(), Some(0), "the version 2 entries gave back their 48 bytes");
}
