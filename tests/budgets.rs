//! Safe among strangers: the server's budgets, rate limits and its handling of damaged data,
//! through real QUIC connections to a real server on 127.0.0.1:0 (issue 9).

mod common;

use common::{connect, local, login, start_server, start_server_with};
use qpq::client::session::{Session, SessionError};
use qpq::clock::Clock;
use qpq::crypto::hybrid::{HybridSecretKey, SignedHybridKey};
use qpq::crypto::identity::Identity;
use qpq::mls::MlsClient;
use qpq::proto::node_capnp::node_service;
use qpq::proto::wire_error::{ErrorCode, WireError};
use qpq::server::ServerConfig;
use qpq::server::ratelimit::Rate;

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap())
}

/// The server's answer as a wire error (panics on success or a lost connection).
fn refusal<T: std::fmt::Debug>(r: Result<T, SessionError>) -> WireError {
    match r {
        Err(SessionError::Rpc(e)) => e,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

/// One `enqueue` without the session's retries, so a test sees the first refusal.
async fn raw_enqueue(s: &Session, to: &[u8]) -> Result<(), SessionError> {
    let node = node_service::Client { client: s.raw_node_client() };
    let mut req = node.enqueue_request();
    req.get().set_recipient_key(to);
    req.get().set_payload(b"x");
    req.send().promise.await?;
    Ok(())
}

/// One `fetchKeyPackage` without the session's retries.
async fn raw_fetch_key_package(s: &Session, who: &[u8]) -> Result<(), SessionError> {
    let node = node_service::Client { client: s.raw_node_client() };
    let mut req = node.fetch_key_package_request();
    req.get().set_identity_key(who);
    req.send().promise.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueues_are_rate_limited_per_connection_then_per_address_with_a_retry_hint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    cfg.rate_limits.enqueue_per_connection = Rate { per_sec: 1.0, burst: 2 };
    cfg.rate_limits.enqueue_per_address = Rate { per_sec: 1.0, burst: 3 };
    let server = start_server_with(cfg).await;
    local(async {
        let to = Identity::generate().public().0;
        let a = connect(&server).await;
        raw_enqueue(&a, &to).await.unwrap();
        raw_enqueue(&a, &to).await.unwrap();
        let e = refusal(raw_enqueue(&a, &to).await);
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.message, "rate limited: too many enqueues from this connection");
        assert!(matches!(e.retry_after_ms, Some(1..=1000)), "one token a second: {e:?}");
        // Another connection from the same address shares the address's budget.
        let b = connect(&server).await;
        raw_enqueue(&b, &to).await.unwrap();
        let e = refusal(raw_enqueue(&b, &to).await);
        assert_eq!(e.message, "rate limited: too many enqueues from this address");
        // The session backs off by the server's hint (here under a second) instead of failing.
        let batch = b.enqueue_batch(b"", &[(Identity::generate().public(), b"y".to_vec())]).await;
        assert!(batch.is_ok(), "the client retried after the hint: {batch:?}");
        clock.advance(60_000);
        raw_enqueue(&a, &to).await.unwrap();
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_drains_one_keys_pool_in_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    cfg.rate_limits.key_package_per_target = Rate { per_sec: 0.2, burst: 2 };
    let server = start_server_with(cfg).await;
    local(async {
        let alice = Identity::generate();
        let mls = MlsClient::new(alice.seed()).unwrap();
        let a = login(&server, &alice).await;
        a.upload_key_packages(
            &mls.key_packages(5).unwrap().into_iter().map(|k| k.bytes).collect::<Vec<_>>(),
            None,
        )
        .await
        .unwrap();
        let s = connect(&server).await;
        let other = connect(&server).await;
        raw_fetch_key_package(&s, &alice.public().0).await.unwrap();
        raw_fetch_key_package(&other, &alice.public().0).await.unwrap();
        let e = refusal(raw_fetch_key_package(&s, &alice.public().0).await);
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.message, "rate limited: too many key package fetches for this key");
        assert!(matches!(e.retry_after_ms, Some(1..=5000)), "one token in 5 s: {e:?}");
        let e = refusal(raw_fetch_key_package(&other, &alice.public().0).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "a second connection does not help");
        // Another key is not affected; it has no packages, a different code.
        let e = refusal(raw_fetch_key_package(&s, &Identity::generate().public().0).await);
        assert_eq!(e.code, ErrorCode::NoKeyPackages);
        assert_eq!(a.key_package_count().await.unwrap(), (3, false), "the refused fetches took nothing");
        clock.advance(5_000);
        raw_fetch_key_package(&s, &alice.public().0).await.unwrap();
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_naming_one_recipient_twice_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let bob = Identity::generate().public();
        let s = connect(&server).await;
        let items = [(alice.public(), b"1".to_vec()), (bob, b"2".to_vec()), (alice.public(), b"3".to_vec())];
        let e = refusal(s.enqueue_batch(b"", &items).await);
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::BadRequest, "duplicate recipient: item 2 repeats item 0")
        );
        let a = login(&server, &alice).await;
        assert!(a.fetch(0).await.unwrap().0.is_empty());
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_key_older_than_the_stored_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let a = login(&server, &alice).await;
        let newer = SignedHybridKey::sign(alice.signing_key(), 2_000, &HybridSecretKey::generate());
        a.upload_hybrid_key(&newer).await.unwrap();
        a.upload_hybrid_key(&newer).await.expect("sending the stored key again is harmless");
        let older = SignedHybridKey::sign(alice.signing_key(), 1_000, &HybridSecretKey::generate());
        let e = refusal(a.upload_hybrid_key(&older).await);
        assert_eq!(e.code, ErrorCode::StaleKey);
        assert_eq!(e.message, "hybrid key not newer than the stored one: created 1000 <= 2000 ms");
        for bad in [0, u64::MAX] {
            let k = SignedHybridKey::sign(alice.signing_key(), bad, &HybridSecretKey::generate());
            assert_eq!(
                refusal(a.upload_hybrid_key(&k).await).code,
                ErrorCode::BadRequest,
                "created at {bad}"
            );
        }
        let s = connect(&server).await;
        assert_eq!(s.fetch_hybrid_key(&alice.public().0).await.unwrap(), newer);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_damaged_while_the_server_was_stopped_is_an_error_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Identity::generate();
    let bob = Identity::generate();
    start_server(dir.path()).await.shutdown().await.unwrap();
    {
        // Rows no qpq writes, put into the file while the server is down.
        let queue: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("queue");
        let db = redb::Database::open(dir.path().join(qpq::server::DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(queue).unwrap();
            t.insert(&[9u8; 5][..], &[0u8; 30][..]).unwrap();
            let mut long = alice.public().0.to_vec();
            long.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5, 1]);
            t.insert(&long[..], &[7u8; 3][..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let server = start_server(dir.path()).await;
    local(async {
        let a = login(&server, &alice).await;
        match a.fetch(10).await {
            Err(SessionError::Rpc(m)) => {
                assert_eq!((m.code, m.message.as_str()), (ErrorCode::Internal, "internal storage error"))
            }
            other => panic!("a damaged row must be an rpc error, got {other:?}"),
        }
        // The sweep removes what it cannot deliver instead of killing the writer.
        server.sweep().await;
        let sender = connect(&server).await;
        sender.enqueue(&bob.public().0, b"still writing", b"").await.unwrap();
        sender.enqueue(&alice.public().0, b"for alice", b"").await.unwrap();
        let (msgs, _) = a.fetch(10).await.unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].payload, b"for alice");
        let b = login(&server, &bob).await;
        assert_eq!(b.fetch(10).await.unwrap().0.len(), 1);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_cap_is_reachable_and_answered_on_a_live_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = connect(&server).await;
        let full = vec![7u8; qpq::limits::DEFAULT_MAX_PAYLOAD];
        let fits = qpq::limits::MAX_BATCH_BYTES / full.len();
        let items: Vec<_> = (0..fits).map(|_| (Identity::generate().public(), full.clone())).collect();
        let (_, seqs) = s.enqueue_batch(b"", &items).await.expect("a batch of exactly the cap is stored");
        assert_eq!(seqs.len(), fits);
        let mut over = items;
        over.push((Identity::generate().public(), full.clone()));
        let e = refusal(s.enqueue_batch(b"", &over).await);
        assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");
        assert!(e.message.starts_with("batch too large"), "{e:?}");
        assert_eq!(s.health().await.unwrap().status, "ok", "the connection stays up");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_storage_quota_refuses_with_a_retry_hint_and_acks_free_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Each 1-byte message counts 18 bytes (header + payload): room for three.
    cfg.max_stored_bytes = 3 * 18;
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let alice = Identity::generate();
        let first = Identity::generate();
        raw_enqueue(&s, &first.public().0).await.unwrap();
        for _ in 0..2 {
            // Each to a fresh key: only the global quota can stop this.
            raw_enqueue(&s, &Identity::generate().public().0).await.unwrap();
        }
        let e = refusal(raw_enqueue(&s, &alice.public().0).await);
        assert_eq!(e.code, ErrorCode::OverQuota, "{e:?}");
        assert_eq!(e.message, "server storage full: 54 + 18 > 54 bytes of queued messages");
        assert_eq!(e.retry_after_ms, Some(qpq::limits::OVER_QUOTA_RETRY_AFTER_MS));
        let f = login(&server, &first).await;
        assert_eq!(f.ack(u64::MAX).await.unwrap(), 1);
        raw_enqueue(&s, &alice.public().0).await.expect("an ack gives its bytes back to the quota");
    })
    .await;
    server.shutdown().await.unwrap();
}
