//! Safe among strangers: the server's budgets, rate limits and its handling of damaged data,
//! through real QUIC connections to a real server on 127.0.0.1:0 (issue 9).

mod common;

use common::{connect, local, login, start_server, start_server_with};
use qpq::client::session::{Session, SessionError};
use qpq::clock::Clock;
use qpq::crypto::hybrid::{HybridSecretKey, SignedHybridKey};
use qpq::crypto::identity::{Identity, PublicKey};
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

/// A full pool refuses an upload before its packages are verified: a replayed (or garbage)
/// upload costs a count, not two signature checks per package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_an_upload_before_checking_its_packages() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let alice = Identity::generate();
        let mls = MlsClient::new(alice.seed()).unwrap();
        let a = login(&server, &alice).await;
        let max = qpq::limits::MAX_KEY_PACKAGES_PER_IDENTITY as usize;
        let per = qpq::limits::MAX_KEY_PACKAGES_PER_UPLOAD;
        let mut stored = 0;
        while stored < max {
            let n = per.min(max - stored);
            let kps: Vec<Vec<u8>> = mls.key_packages(n).unwrap().into_iter().map(|k| k.bytes).collect();
            a.upload_key_packages(&kps, None).await.unwrap();
            stored += n;
        }
        let garbage = vec![vec![0u8; 64]];
        let e = refusal(a.upload_key_packages(&garbage, None).await);
        assert_eq!(e.code, ErrorCode::PoolFull, "{e:?}");
        assert_eq!(a.key_package_count().await.unwrap(), (max as u32, false));
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Key uploads (`uploadKeyPackages`, `uploadHybridKey`) are rate limited per connection, for
/// every identity on it, then per address: a token per call before anything in it is read, and
/// one per package once they are counted, before any is verified. Identities are free, and each
/// package costs two signature checks and room in the key budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_uploads_are_rate_limited_per_connection_then_per_address_by_their_packages() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    cfg.rate_limits.key_upload_per_connection = Rate { per_sec: 1.0, burst: 4 };
    cfg.rate_limits.key_upload_per_address = Rate { per_sec: 1.0, burst: 5 };
    let server = start_server_with(cfg).await;
    local(async {
        let (alice, bob, carol) = (Identity::generate(), Identity::generate(), Identity::generate());
        let mls = MlsClient::new(alice.seed()).unwrap();
        let kps = |n| -> Vec<Vec<u8>> { mls.key_packages(n).unwrap().into_iter().map(|k| k.bytes).collect() };
        let mut a = connect(&server).await;
        a.authenticate(&alice).await.unwrap();
        // A call and three packages: the connection's 4 tokens, 4 of the address's 5.
        assert_eq!(a.upload_key_packages(&kps(3), None).await.unwrap(), 3);
        // Garbage: refused for the rate, not for what it holds, so nothing was verified.
        let e = refusal(a.upload_key_packages(&[vec![0u8; 64]], None).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
        assert_eq!(e.message, "rate limited: too many key uploads from this connection");
        assert!(matches!(e.retry_after_ms, Some(1..=1000)), "{e:?}");
        // Another identity on the same connection shares its budget.
        a.authenticate(&bob).await.unwrap();
        let signed = SignedHybridKey::sign(bob.signing_key(), 1_000, &HybridSecretKey::generate());
        assert_eq!(refusal(a.upload_hybrid_key(&signed).await).code, ErrorCode::RateLimited);
        // A new connection from the same address has its own budget, but not the address's:
        // bob's hybrid key takes the address's last token.
        let b = login(&server, &bob).await;
        b.upload_hybrid_key(&signed).await.unwrap();
        let c = login(&server, &carol).await;
        let e = refusal(c.upload_key_packages(&[vec![0u8; 64]], None).await);
        assert_eq!(e.message, "rate limited: too many key uploads from this address");
        clock.advance(1_000);
        a.authenticate(&alice).await.unwrap();
        a.upload_key_packages(&kps(1), None).await.expect("a second later, a token each again");
        assert_eq!(a.key_package_count().await.unwrap(), (4, false));
        // The call's token and its package's: one token in debt, two seconds to the next.
        let e = refusal(a.upload_key_packages(&kps(1), None).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
        assert!(matches!(e.retry_after_ms, Some(1001..=2000)), "the package went into debt: {e:?}");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The key material one network (an IPv4 address, an IPv6 /48) may add has a daily budget of
/// its own, across connections and identities: before, one address could fill the whole key
/// budget with fresh identities' packages in about 90 minutes at the upload rate, and then
/// nobody could register for weeks. An upload is charged once its packages are counted, before
/// they are verified, and the next one is refused while the network is in debt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_material_of_one_network_has_a_budget_across_connections_and_identities() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob, carol) = (Identity::generate(), Identity::generate(), Identity::generate());
    let kps = |who: &Identity, n| -> Vec<Vec<u8>> {
        MlsClient::new(who.seed()).unwrap().key_packages(n).unwrap().into_iter().map(|k| k.bytes).collect()
    };
    let charge = |kps: &[Vec<u8>]| -> u64 {
        kps.iter().map(|k| k.len() as u64 + qpq::limits::KEY_ROW_OVERHEAD_BYTES).sum()
    };
    let (alice_kps, bob_kps) = (kps(&alice, 3), kps(&bob, 1));
    let signed = SignedHybridKey::sign(bob.signing_key(), 1_000, &HybridSecretKey::generate());
    let hybrid = (signed.key.len() + signed.signature.len()) as u64 + qpq::limits::KEY_ROW_OVERHEAD_BYTES;
    // Room for alice's packages and bob's hybrid key, and 100 bytes more: not for bob's package.
    let burst = charge(&alice_kps) + hybrid + 100;
    assert!(charge(&bob_kps) > hybrid + 100);
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    // One byte every 100 s, so the real time the test takes refills nothing that counts.
    cfg.rate_limits.key_bytes_per_network = Rate { per_sec: 0.01, burst: burst as u32 };
    let server = start_server_with(cfg).await;
    local(async {
        let a = login(&server, &alice).await;
        assert_eq!(a.upload_key_packages(&alice_kps, None).await.unwrap(), 3);
        // Another identity on another connection from the same network shares the budget: an
        // upload whose whole cost is not there is refused whole, nothing stored.
        let b = login(&server, &bob).await;
        let e = refusal(b.upload_key_packages(&bob_kps, None).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
        assert_eq!(e.message, "rate limited: too much key material uploaded from this network");
        assert_eq!(b.key_package_count().await.unwrap(), (0, false));
        // The hint is when the whole cost is there (the hybrid key's and 100 bytes are).
        let wait = e.retry_after_ms.expect("a retry hint");
        let short_ms = (charge(&bob_kps) - hybrid - 100) * 100_000;
        // Less the little the test's own real time refilled.
        assert!((short_ms - 1_000..=short_ms).contains(&wait), "{wait} ms to find {short_ms} ms of bytes");
        // What fits passes: bob's hybrid key; then the 100 bytes left hold no package.
        b.upload_hybrid_key(&signed).await.unwrap();
        let c = login(&server, &carol).await;
        let e = refusal(c.upload_key_packages(&[vec![0u8; 64]], None).await);
        assert_eq!(e.message, "rate limited: too much key material uploaded from this network");
        // The hybrid key took its share since the hint: wait for that too.
        clock.advance(wait as i64 + hybrid as i64 * 100_000);
        assert_eq!(b.upload_key_packages(&bob_kps, None).await.unwrap(), 1);
        // Spent to nothing: refused before anything of the upload is read.
        let e = refusal(c.upload_key_packages(&[vec![0u8; 64]], None).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
        assert_eq!(a.key_package_count().await.unwrap(), (3, false));
    })
    .await;
    server.shutdown().await.unwrap();
}

/// An upload the store refuses stored nothing, so its network's key material budget gets back
/// all but [`qpq::limits::KEY_ROW_OVERHEAD_BYTES`] a row. Before, while strangers kept the key
/// storage full, a client whose packages were due spent the whole budget on uploads retried
/// every round, so once there was room again nobody on its network could upload for a day: here
/// the second attempt was already `rateLimited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_refused_by_a_full_key_storage_cost_the_network_a_row_charge_not_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bob = Identity::generate();
    let kps: Vec<Vec<u8>> =
        MlsClient::new(bob.seed()).unwrap().key_packages(2).unwrap().into_iter().map(|k| k.bytes).collect();
    let row = qpq::limits::KEY_ROW_OVERHEAD_BYTES;
    let charge: u64 = kps.iter().map(|k| k.len() as u64 + row).sum();
    let signed = SignedHybridKey::sign(bob.signing_key(), 1_000, &HybridSecretKey::generate());
    let hybrid = (signed.key.len() + signed.signature.len()) as u64 + row;
    assert!(hybrid < charge);
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    // The key storage holds nothing. The budget holds one upload, what four refused uploads of
    // two rows and one refused hybrid key owe (a row each), and 100 bytes: a fifth refused
    // upload still finds its whole charge, the hybrid key then its own.
    cfg.max_key_bytes = 1;
    let burst = charge + 4 * 2 * row + row + 100;
    // One byte every 100 s, so the real time the test takes refills nothing that counts.
    cfg.rate_limits.key_bytes_per_network = Rate { per_sec: 0.01, burst: burst as u32 };
    let server = start_server_with(cfg).await;
    local(async {
        let b = login(&server, &bob).await;
        for attempt in 1..=5 {
            let e = refusal(b.upload_key_packages(&kps, None).await);
            assert_eq!(e.code, ErrorCode::OverQuota, "attempt {attempt}: {e:?}");
            assert!(e.message.contains("key storage full"), "{e:?}");
        }
        let e = refusal(b.upload_hybrid_key(&signed).await);
        assert_eq!(e.code, ErrorCode::OverQuota, "{e:?}");
        // Ten rows and a key refused: one more upload is short by two rows less 100 bytes.
        let e = refusal(b.upload_key_packages(&kps, None).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "refusals are not free: {e:?}");
        assert_eq!(e.message, "rate limited: too much key material uploaded from this network");
        let wait = e.retry_after_ms.expect("a retry hint");
        let short_ms = (2 * row - 100) * 100_000;
        assert!((short_ms - 1_000..=short_ms).contains(&wait), "{wait} ms to find {short_ms} ms of bytes");
        assert_eq!(b.key_package_count().await.unwrap(), (0, false));
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The same for a pool already full (the precheck before any signature is verified): a
/// refusal costs the network a row charge, not the package's bytes. Before, the second refusal
/// was already `rateLimited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_refused_by_a_full_pool_cost_the_network_a_row_charge_not_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bob = Identity::generate();
    let max = qpq::limits::MAX_KEY_PACKAGES_PER_IDENTITY as usize;
    let mls = MlsClient::new(bob.seed()).unwrap();
    let pool: Vec<Vec<u8>> = mls.key_packages(max).unwrap().into_iter().map(|k| k.bytes).collect();
    let one: Vec<Vec<u8>> = mls.key_packages(1).unwrap().into_iter().map(|k| k.bytes).collect();
    let row = qpq::limits::KEY_ROW_OVERHEAD_BYTES;
    let pool_charge: u64 = pool.iter().map(|k| k.len() as u64 + row).sum();
    let one_charge = one[0].len() as u64 + row;
    let mut cfg = config(dir.path());
    // The pool, what five refused uploads of one package owe (a row each), one package's
    // charge and 100 bytes: six refusals find their charge, the seventh does not.
    let burst = pool_charge + 5 * row + one_charge + 100;
    cfg.rate_limits.key_bytes_per_network = Rate { per_sec: 0.01, burst: burst as u32 };
    let server = start_server_with(cfg).await;
    local(async {
        let b = login(&server, &bob).await;
        for chunk in pool.chunks(qpq::limits::MAX_KEY_PACKAGES_PER_UPLOAD) {
            b.upload_key_packages(chunk, None).await.unwrap();
        }
        assert_eq!(b.key_package_count().await.unwrap(), (max as u32, false));
        for attempt in 1..=6 {
            let e = refusal(b.upload_key_packages(&one, None).await);
            assert_eq!(e.code, ErrorCode::PoolFull, "attempt {attempt}: {e:?}");
        }
        let e = refusal(b.upload_key_packages(&one, None).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "refusals are not free: {e:?}");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// An upload's sizes are checked before the network's key material budget is charged: junk
/// (oversized packages, a "hybrid key" of any length) must not spend a shared address's budget
/// for a day and lock its other users out of registering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_key_uploads_are_refused_before_they_spend_the_networks_budget() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Identity::generate();
    let kps: Vec<Vec<u8>> =
        MlsClient::new(alice.seed()).unwrap().key_packages(2).unwrap().into_iter().map(|k| k.bytes).collect();
    let mut cfg = config(dir.path());
    // Room for alice's two packages and a little more, not for one oversized package.
    let burst = kps.iter().map(|k| k.len() + 128).sum::<usize>() + 1_000;
    assert!(burst < qpq::limits::MAX_KEY_PACKAGE_BYTES);
    cfg.rate_limits.key_bytes_per_network = Rate { per_sec: 0.01, burst: burst as u32 };
    let server = start_server_with(cfg).await;
    local(async {
        let a = login(&server, &alice).await;
        let junk = vec![vec![7u8; qpq::limits::MAX_KEY_PACKAGE_BYTES + 1]; 3];
        let e = refusal(a.upload_key_packages(&junk, None).await);
        assert!(e.message.contains("too large") && e.code == ErrorCode::TooLarge, "{e:?}");
        let e = refusal(a.upload_key_packages(&kps[..1], Some(&junk[0])).await);
        assert!(e.message.contains("too large") && e.code == ErrorCode::TooLarge, "{e:?}");
        let fake =
            SignedHybridKey { key: vec![1u8; 40 << 10], signature: vec![2u8; 64], created_at_ms: 1_000 };
        let e = refusal(a.upload_hybrid_key(&fake).await);
        assert!(e.message.starts_with("invalid hybrid key"), "{e:?}");
        // The budget is untouched: the real upload fits.
        assert_eq!(a.upload_key_packages(&kps, None).await.unwrap(), 2);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// A fetch holds what it loads in the memory budget as it loads it (twice: the page and the
/// reply built from it), so a page stops where the budget is full and the client still gets a
/// message. Before, a page was loaded whole and only its reply asked for room: with less room
/// than a page (a small budget, or one mostly taken by others), every fetch and every
/// `fetchWait` of that queue was refused `busy`, for as long as the queue stayed that large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_loads_what_the_memory_budget_holds_and_still_makes_progress() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Room for one 1 MiB message loaded and answered, not for two.
    cfg.max_buffered_bytes = 3 << 20;
    let server = start_server_with(cfg).await;
    local(async {
        let alice = Identity::generate();
        let s = connect(&server).await;
        for i in 0..3u8 {
            s.enqueue(&alice.public().0, &vec![i; 1 << 20], b"").await.unwrap();
        }
        let a = login(&server, &alice).await;
        let (msgs, more) = a.fetch(0).await.unwrap();
        assert_eq!((msgs.len(), more), (1, true), "one message fits, and more are waiting");
        assert_eq!(msgs[0].payload, vec![0u8; 1 << 20]);
        let (msgs, more, acked) = a.ack_and_fetch_wait(msgs[0].seq, 1_000, 0).await.unwrap();
        assert_eq!(acked, 1);
        assert_eq!((msgs.len(), more), (1, true));
        assert_eq!(msgs[0].payload, vec![1u8; 1 << 20]);
        let (msgs, more, acked) = a.ack_and_fetch_wait(msgs[0].seq, 1_000, 0).await.unwrap();
        assert_eq!(acked, 1);
        assert_eq!((msgs.len(), more), (1, false));
        assert_eq!(msgs[0].payload, vec![2u8; 1 << 20]);
        // A message larger than half the budget (loaded and answered: more than all of it) is
        // still delivered, alone, once nothing else holds the budget.
        s.enqueue(&alice.public().0, &vec![3u8; 2 << 20], b"").await.unwrap();
        let (msgs, more, _) = a.ack_and_fetch_wait(msgs[0].seq, 1_000, 0).await.unwrap();
        assert_eq!((msgs.len(), more), (1, false));
        assert_eq!(msgs[0].payload, vec![3u8; 2 << 20]);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// `fetchHybridKey` needs no account: it is rate limited per connection (then per address),
/// with a retry hint, so a stranger cannot keep the store busy with lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lookups_are_rate_limited_per_connection_with_a_retry_hint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    cfg.rate_limits.lookup_per_connection = Rate { per_sec: 0.5, burst: 2 };
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let nobody = Identity::generate().public().0;
        for _ in 0..2 {
            assert_eq!(refusal(s.fetch_hybrid_key(&nobody).await).code, ErrorCode::NoHybridKey);
        }
        let node = node_service::Client { client: s.raw_node_client() };
        let mut req = node.fetch_hybrid_key_request();
        req.get().set_identity_key(&nobody);
        let e = refusal(req.send().promise.await.map(|_| ()).map_err(SessionError::from));
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.message, "rate limited: too many key lookups from this connection");
        assert!(matches!(e.retry_after_ms, Some(1..=2000)), "{e:?}");
        assert_eq!(
            refusal(connect(&server).await.fetch_hybrid_key(&nobody).await).code,
            ErrorCode::NoHybridKey
        );
        clock.advance(2_000);
        assert_eq!(refusal(s.fetch_hybrid_key(&nobody).await).code, ErrorCode::NoHybridKey);
    })
    .await;
    server.shutdown().await.unwrap();
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
        // Another key is not affected; it has no packages, a different code, and fetches that
        // hand nothing out spend none of its budget (random keys cannot fill the limiter).
        let stranger = Identity::generate().public().0;
        for _ in 0..3 {
            let e = refusal(raw_fetch_key_package(&s, &stranger).await);
            assert_eq!(e.code, ErrorCode::NoKeyPackages, "{e:?}");
        }
        assert_eq!(a.key_package_count().await.unwrap(), (3, false), "the refused fetches took nothing");
        clock.advance(5_000);
        raw_fetch_key_package(&s, &alice.public().0).await.unwrap();
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Enqueue rates count calls, and one call carries up to 16 MiB to keys that cost nothing to
/// name: one address could fill the storage quota for everyone in minutes. The bytes of mail one
/// network enqueues have a budget across its connections, charged whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mail_one_network_enqueues_has_a_byte_budget_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let clock = Clock::system();
    cfg.clock = clock.clone();
    // One byte every 100 s, so the real time the test takes refills nothing that counts.
    cfg.rate_limits.enqueue_bytes_per_network = Rate { per_sec: 0.01, burst: 10_000 };
    cfg.max_queue_messages = 1;
    let server = start_server_with(cfg).await;
    local(async {
        let (s, other) = (connect(&server).await, connect(&server).await);
        let to = |i: u8| PublicKey([i; 32]);
        s.enqueue(&to(1).0, &[1u8; 6_000], b"").await.unwrap();
        // What the store refuses (here a full queue) is given back but for 48 bytes per
        // recipient named: a retry is not charged its payload again.
        for _ in 0..3 {
            assert_eq!(refusal(s.enqueue(&to(1).0, &[1u8; 3_000], b"").await).code, ErrorCode::QueueFull);
        }
        // Each copy is charged as the storage quota charges it, its 17-byte header included:
        // 10,000 - 6,017 - 3 x 48 = 3,839 are left. A fanout of 2,814 to 10 (its row: 8 + 17 +
        // 2,814, and 10 x 48) passes and leaves 520.
        let recipients: Vec<PublicKey> = (10..20).map(to).collect();
        other.enqueue_fanout(b"", &[2u8; 2_814], &recipients).await.unwrap();
        // Without the session's retries, which would wait out the hint.
        let raw = |s: &Session, to: PublicKey, payload: Vec<u8>| {
            let node = node_service::Client { client: s.raw_node_client() };
            let mut req = node.enqueue_request();
            req.get().set_recipient_key(&to.0);
            req.get().set_payload(&payload);
            async move { req.send().promise.await.map(|_| ()).map_err(SessionError::from) }
        };
        let e = refusal(raw(&other, to(2), vec![3u8; 600]).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
        assert_eq!(e.message, "rate limited: too many bytes of mail enqueued from this network");
        let wait = e.retry_after_ms.expect("a retry hint");
        assert!((9_000_000..=10_000_000).contains(&wait), "617 is 97 bytes short at 0.01 B/s: {wait} ms");
        let node = node_service::Client { client: s.raw_node_client() };
        let mut batch = node.enqueue_batch_request();
        let mut list = batch.get().init_items(2);
        for (i, who) in [3u8, 4].into_iter().enumerate() {
            let mut item = list.reborrow().get(i as u32);
            item.set_recipient_key(&[who; 32]);
            item.set_payload(&[4u8; 300]);
        }
        let e = refusal(batch.send().promise.await.map(|_| ()).map_err(SessionError::from));
        assert_eq!(e.code, ErrorCode::RateLimited, "a batch is charged its total");
        clock.advance(wait as i64);
        other.enqueue(&to(2).0, &[3u8; 600], b"").await.unwrap();
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The budget was charged payload bytes only, while the quota is charged each copy's 17-byte
/// header and channel id too: one-byte payloads on 64-byte channels cost the network 82 times
/// less than they cost the quota (a review), so one address could fill the quota alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_payloads_cost_the_network_what_they_cost_the_storage_quota() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rate_limits.enqueue_bytes_per_network = Rate { per_sec: 0.01, burst: 10_000 };
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let node = node_service::Client { client: s.raw_node_client() };
        let batch = |first: u32| {
            let mut req = node.enqueue_batch_request();
            req.get().set_channel_id(&[7u8; 64]);
            let mut list = req.get().init_items(100);
            for i in 0..100u32 {
                let mut item = list.reborrow().get(i);
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&(first + i).to_be_bytes());
                item.set_recipient_key(&key);
                item.set_payload(b"y");
            }
            async move { req.send().promise.await.map(|_| ()).map_err(SessionError::from) }
        };
        // 100 x (17 + 64 + 1) = 8,200 of the 10,000: the first passes, the second cannot.
        batch(0).await.unwrap();
        let e = refusal(batch(100).await);
        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
    })
    .await;
    server.shutdown().await.unwrap();
}

/// Fetches sent together used to pass the per-target check together, before any of them was
/// charged, so one connection could take a whole pool past the limit; now the target's token is
/// taken first and given back only when no package is handed out.
/// A fanout that skips a full queue stores nothing for it, and so charges the network's byte
/// budget only for the recipients it stored for (the 48 bytes of a skipped one are given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_costs_the_network_nothing_for_a_recipient_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // One byte every 100 s: nothing the test's real time refills counts.
    cfg.rate_limits.enqueue_bytes_per_network = Rate { per_sec: 0.01, burst: 1_000 };
    cfg.max_queue_messages = 1;
    let server = start_server_with(cfg).await;
    local(async {
        let s = connect(&server).await;
        let to = |i: u8| PublicKey([i; 32]);
        s.enqueue(&to(1).0, &[1u8; 100], b"").await.unwrap();
        // 1,000 - 117 = 883 left. Charged 8 + 17 + 400 + 2 x 48 up front; to(1)'s queue is
        // full, so 48 come back: 410 left, what an enqueue of 393 (and its header) costs.
        let (_, seqs) = s.enqueue_fanout(b"", &[2u8; 400], &[to(1), to(2)]).await.unwrap();
        assert_eq!(seqs, vec![0, 1]);
        let node = node_service::Client { client: s.raw_node_client() };
        let mut req = node.enqueue_request();
        req.get().set_recipient_key(&to(3).0);
        req.get().set_payload(&[3u8; 393]);
        req.send().promise.await.expect("the skipped recipient's bytes were given back");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_sent_together_do_not_pass_the_per_target_limit_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rate_limits.key_package_per_target = Rate { per_sec: 0.01, burst: 2 };
    let server = start_server_with(cfg).await;
    local(async {
        let alice = Identity::generate();
        let mls = MlsClient::new(alice.seed()).unwrap();
        let a = login(&server, &alice).await;
        let kps: Vec<Vec<u8>> = mls.key_packages(6).unwrap().into_iter().map(|k| k.bytes).collect();
        a.upload_key_packages(&kps, None).await.unwrap();
        let s = connect(&server).await;
        let target = alice.public().0;
        let fetches = (0..6).map(|_| raw_fetch_key_package(&s, &target));
        let answers = futures::future::join_all(fetches).await;
        let handed = answers.iter().filter(|r| r.is_ok()).count();
        assert_eq!(handed, 2, "the target's burst, however many are sent at once");
        for e in answers.into_iter().filter_map(Result::err) {
            assert_eq!(refusal::<()>(Err(e)).code, ErrorCode::RateLimited);
        }
        assert_eq!(a.key_package_count().await.unwrap(), (4, false));
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
        // 256 KiB items: one item past the cap stays within the reader's slack
        // (`limits::RPC_TRAVERSAL_LIMIT_WORDS`), so the refusal is answered. An item of the
        // default max payload (4 MiB) would overshoot it, and such a call loses its connection.
        let full = vec![7u8; 256 * 1024];
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

// ----- memory: attacks against the real `qpq serve` binary, its RSS read from /proc -----

/// Server RSS may reach this under any attack below with the default limits: the 64 MiB memory
/// budget, QUIC buffers per connection and the allocator's slack on top of an idle server
/// (~20 MiB). Without the budget, the same attacks take it past 1 GiB.
const RSS_BOUND_MIB: u64 = 256;
/// After the attacker leaves, the server returns within this much of its idle RSS: glibc keeps
/// freed pages of its per-thread arenas (measured 34 to 127 MiB over idle after one or two waves
/// of the huge-frame attack, about the 64 MiB memory budget plus QUIC buffers per arena, more
/// when other tests load the machine); without the budget the attacks hold far more, for as
/// long as the attacker likes.
const RSS_SLACK_AFTER_MIB: u64 = 160;
/// The stall timeout the attack tests run the server with, so they end in a second.
const TEST_STALL_MS: u64 = 1_000;

/// Resident set of a process, in MiB (from /proc/<pid>/status).
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS line");
    kib / 1024
}

/// The binary with the default limits and a short stall timeout; idle RSS after one round trip.
async fn attacked_server(dir: &std::path::Path) -> (common::ServerProcess, u64) {
    let server =
        common::ServerProcess::start_with_config(dir, &format!("stall_timeout_ms = {TEST_STALL_MS}\n"));
    local(async {
        let s = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
        assert_eq!(s.health().await.unwrap().status, "ok");
        s.close().await;
    })
    .await;
    let idle = rss_mib(server.child.id());
    (server, idle)
}

/// Samples the server's RSS until `done` resolves (at most `limit`); returns the peak and
/// whether `done` resolved in time. Sampling is measurement, not synchronisation: the test
/// waits on `done`.
async fn peak_rss_until(pid: u32, done: impl std::future::Future, limit: std::time::Duration) -> (u64, bool) {
    let mut peak = rss_mib(pid);
    tokio::pin!(done);
    let give_up = tokio::time::sleep(limit);
    tokio::pin!(give_up);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = &mut done => return (peak.max(rss_mib(pid)), true),
            _ = &mut give_up => return (peak, false),
            _ = tick.tick() => peak = peak.max(rss_mib(pid)),
        }
    }
}

/// Reads from `inner` until `reading` is cleared, then never again: a peer that stops reading.
struct StopsReading<R> {
    inner: R,
    reading: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: futures::AsyncRead + Unpin> futures::AsyncRead for StopsReading<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.reading.get() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// A raw QUIC connection to the server, pinned to its certificate.
async fn raw_connection(server: &common::ServerProcess) -> (quinn::Endpoint, quinn::Connection) {
    let cfg = qpq::transport::client_config(server.pin()).unwrap();
    let ep = qpq::transport::client_endpoint(server.addr, cfg).unwrap();
    let conn = ep.connect(server.addr, qpq::transport::SERVER_NAME).unwrap().await.unwrap();
    (ep, conn)
}

/// Review: the server's redb page cache was redb's default, 1 GiB, outside every budget: mail
/// enqueued and fetched once stayed cached, so one network's daily mail grew the server by
/// as much. 384 MiB of distinct mail in and out must leave the server within its bound.
/// Fails without `limits::SERVER_DB_CACHE_BYTES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_came_and_went_leaves_the_page_cache_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (server, idle) = attacked_server(dir.path()).await;
    let pid = server.child.id();
    local(async {
        let people = [Identity::generate(), Identity::generate()];
        let sender = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
        let work = async {
            let mut n = 0u32;
            for who in &people {
                for _ in 0..48 {
                    n += 1;
                    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(n) >> 3) as u8).collect();
                    sender.enqueue(&who.public().0, &payload, b"").await.unwrap();
                }
            }
            for who in &people {
                let mut s = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
                s.authenticate(who).await.unwrap();
                let mut got = 0;
                loop {
                    let (msgs, more) = s.fetch(8).await.unwrap();
                    got += msgs.len();
                    if let Some(last) = msgs.last() {
                        s.ack(last.seq).await.unwrap();
                    }
                    if !more {
                        break;
                    }
                }
                assert_eq!(got, 48);
                s.close().await;
            }
        };
        let (peak, done) = peak_rss_until(pid, work, std::time::Duration::from_secs(240)).await;
        eprintln!("mail in and out: idle {idle} MiB, peak {peak} MiB");
        assert!(done, "the mail did not go through in time");
        let after = rss_mib(pid);
        eprintln!("mail in and out: after {after} MiB");
        assert!(peak < RSS_BOUND_MIB, "server RSS {peak} MiB >= {RSS_BOUND_MIB} MiB (idle {idle})");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_fetch_replies_is_paused_then_closed_and_rss_stays_bounded() {
    use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
    use qpq::proto::node_capnp::account;
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

    let dir = tempfile::tempdir().unwrap();
    let (server, idle) = attacked_server(dir.path()).await;
    let pid = server.child.id();
    local(async {
        // 256 x 32 KiB waiting for a fresh key: every fetch(limit=256) answers ~8 MiB.
        let victim = Identity::generate();
        let filler = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
        let payload = vec![5u8; 32 * 1024];
        let to = victim.public().0;
        let sends = (0..256).map(|_| filler.enqueue(&to, &payload, b""));
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
        filler.close().await;

        let (_ep, conn) = raw_connection(&server).await;
        let (send, recv) = conn.open_bi().await.unwrap();
        let reading = std::rc::Rc::new(std::cell::Cell::new(true));
        let input = StopsReading { inner: recv.compat(), reading: reading.clone() };
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(input),
            futures::io::BufWriter::new(send.compat_write()),
            Side::Client,
            Default::default(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let node: node_service::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(rpc);
        let challenge = qpq::transport::auth_challenge(&conn).unwrap();
        let mut req = node.authenticate_request();
        req.get().set_identity_key(&victim.public().0);
        req.get().set_signature(&victim.sign_auth_challenge(&challenge));
        let acct: account::Client = req.send().promise.await.unwrap().get().unwrap().get_account().unwrap();

        reading.set(false);
        let mut unanswered = Vec::new();
        for _ in 0..200 {
            let mut f = acct.fetch_request();
            f.get().set_limit(256);
            unanswered.push(f.send().promise);
        }
        let (peak, closed) = peak_rss_until(pid, conn.closed(), std::time::Duration::from_secs(60)).await;
        eprintln!("fetch without reading: idle {idle} MiB, peak {peak} MiB");
        assert!(peak < RSS_BOUND_MIB, "server RSS {peak} MiB >= {RSS_BOUND_MIB} MiB (idle {idle})");
        assert!(closed, "the server never closed a connection that stopped reading");
        drop(unanswered);

        let s = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
        assert_eq!(s.health().await.unwrap().status, "ok", "others are still served");
        let after = rss_mib(pid);
        eprintln!("fetch without reading: after {after} MiB");
        assert!(after < idle + RSS_SLACK_AFTER_MIB, "RSS {after} MiB after the attacker left (idle {idle})");
    })
    .await;
}

/// 24 connections that each announce one frame as large as the read limit allows, send 15/16
/// of its body and stall; returns the server's peak RSS until the server has closed them all.
async fn stall_in_huge_frames(server: &common::ServerProcess) -> u64 {
    let words = qpq::limits::RPC_TRAVERSAL_LIMIT_WORDS as u32;
    let mut head = 0u32.to_le_bytes().to_vec();
    head.extend_from_slice(&words.to_le_bytes());
    let body = std::sync::Arc::new(vec![0u8; words as usize * 8 / 16 * 15]);
    let mut conns = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..24 {
        let (ep, conn) = raw_connection(server).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let (head, body) = (head.clone(), body.clone());
        // The writes may block on flow control while the server waits for room: not awaited.
        writers.push(tokio::spawn(async move {
            send.write_all(&head).await?;
            send.write_all(&body).await?;
            Ok::<_, quinn::WriteError>(send)
        }));
        conns.push((ep, conn, recv));
    }
    let all_closed = futures::future::join_all(conns.iter().map(|(_, c, _)| c.closed()));
    let (peak, closed) =
        peak_rss_until(server.child.id(), all_closed, std::time::Duration::from_secs(60)).await;
    assert!(peak < RSS_BOUND_MIB, "server RSS {peak} MiB >= {RSS_BOUND_MIB} MiB");
    assert!(closed, "stalled frames were not ended by the stall timeout");
    for w in writers {
        w.abort();
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_huge_frames_on_many_connections_hold_no_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (server, idle) = attacked_server(dir.path()).await;
    let pid = server.child.id();
    let peak = stall_in_huge_frames(&server).await;
    let served = || {
        local(async {
            let s = Session::connect(&server.addr.to_string(), server.pin()).await.unwrap();
            assert_eq!(s.health().await.unwrap().status, "ok");
        })
    };
    served().await;
    let after = rss_mib(pid);
    eprintln!("half-sent frames: idle {idle} MiB, peak {peak} MiB, after {after} MiB");
    assert!(after < idle + RSS_SLACK_AFTER_MIB, "RSS {after} MiB after the attacker left (idle {idle})");
    // What the allocator kept is reused, not leaked: a second wave stays within the same bounds.
    let peak2 = stall_in_huge_frames(&server).await;
    served().await;
    let after2 = rss_mib(pid);
    eprintln!("half-sent frames, second wave: peak {peak2} MiB, after {after2} MiB");
    assert!(after2 < idle + RSS_SLACK_AFTER_MIB, "RSS {after2} MiB after a second wave (idle {idle})");
}
