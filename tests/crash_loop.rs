//! A crash loop: senders keep enqueueing to one recipient while the real `qpq serve` binary is
//! killed with SIGKILL at random moments and restarted on its address, 20 times. Every enqueue
//! the server acknowledged must arrive exactly once, nothing may arrive twice, and the data dir
//! must open again after every kill.
//!
//! The moments are random delays from a seeded RNG (`QPQ_CRASH_SEED` replays a run; the seed is
//! in every failure message). The delays are the point of the test, not synchronisation: each
//! round first waits for an acknowledged enqueue on the new server, and senders learn of a
//! restart from a generation counter instead of waiting for their QUIC connection to time out.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::ServerProcess;
use qpq::client::session::Session;
use qpq::crypto::identity::Identity;
use qpq::transport::Pin;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

const KILLS: usize = 20;
const SENDERS: usize = 3;
/// Longest random delay between the first acknowledged enqueue on a new server and its kill.
const MAX_KILL_DELAY_MS: u64 = 300;
/// Longest the test waits for any acknowledged enqueue after a restart: far beyond a healthy
/// round trip, so reaching it means the senders are stuck and the test fails instead of hanging.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Most enqueues one sender makes per server life. Without a bound a fast build fills the
/// recipient's queue (10,000 messages by default) before the 20 rounds end, and every later
/// enqueue is refused as `queueFull`, which is the server keeping its limit, not a lost ack.
const MAX_ENQUEUES_PER_ROUND: usize = 100;

/// What one sender learned: payload numbers the server acknowledged.
struct SenderLog {
    acked: Vec<u64>,
}

fn payload(sender: usize, n: u64) -> Vec<u8> {
    format!("s{sender}-{n}").into_bytes()
}

/// One sender: a fresh numbered payload per attempt (never resent, so a duplicate is the
/// server's), reconnecting after each restart. An attempt cut off by a kill is not acknowledged
/// and may arrive at most once.
fn run_sender(
    sender: usize,
    addr: String,
    pin: Pin,
    recipient: [u8; 32],
    mut generation: watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
    acks: mpsc::Sender<u64>,
) -> SenderLog {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut log = SenderLog { acked: Vec::new() };
        let mut next = 0u64;
        while !stop.load(Ordering::SeqCst) {
            // The server life this connection belongs to: every ack says which one took it.
            let life = *generation.borrow_and_update();
            let session = tokio::select! {
                s = Session::connect(&addr, pin.clone()) => s.ok(),
                _ = generation.changed() => continue,
            };
            let Some(session) = session else {
                // The server is down: try again once it has been restarted (or we are stopped).
                let _ = generation.changed().await;
                continue;
            };
            let mut this_round = 0;
            loop {
                if this_round == MAX_ENQUEUES_PER_ROUND {
                    // Enough on this server: wait for the next one (or the stop).
                    let _ = generation.changed().await;
                    break;
                }
                this_round += 1;
                let n = next;
                next += 1;
                let (body, channel) = (payload(sender, n), [sender as u8; 16]);
                let sent = tokio::select! {
                    r = session.enqueue(&recipient, &body, &channel) => r,
                    _ = generation.changed() => break,
                };
                match sent {
                    Ok(_) => {
                        log.acked.push(n);
                        let _ = acks.send(life);
                    }
                    Err(_) => break,
                }
                if stop.load(Ordering::SeqCst) {
                    break;
                }
            }
        }
        log
    })
}

/// Fetches and acks the recipient's whole queue.
fn drain(addr: &str, pin: Pin, recipient: &Identity) -> Vec<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut session = Session::connect(addr, pin).await.expect("recipient connects");
        session.authenticate(recipient).await.expect("recipient authenticates");
        let mut got = Vec::new();
        loop {
            let (messages, _more) = session.fetch(0).await.expect("fetch");
            let Some(last) = messages.last().map(|m| m.seq) else { break };
            got.extend(messages.into_iter().map(|m| m.payload));
            session.ack(last).await.expect("ack");
        }
        session.close().await;
        got
    })
}

#[test]
fn acknowledged_enqueues_survive_twenty_sigkills_exactly_once() {
    let seed: u64 =
        std::env::var("QPQ_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash loop: QPQ_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_restartable(dir.path());
    let addr = server.addr;
    let pin = server.pin();
    let recipient = Identity::generate();

    let (generation_tx, generation_rx) = watch::channel(0u64);
    let stop = Arc::new(AtomicBool::new(false));
    let (ack_tx, ack_rx) = mpsc::channel();
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| {
            let (addr, pin, to, gen_rx, stop, acks) = (
                addr.to_string(),
                pin.clone(),
                recipient.public().0,
                generation_rx.clone(),
                stop.clone(),
                ack_tx.clone(),
            );
            std::thread::spawn(move || run_sender(i, addr, pin, to, gen_rx, stop, acks))
        })
        .collect();
    drop(ack_tx);

    let mut delays = Vec::new();
    for round in 0..KILLS {
        // Acks from the previous server do not count: this one must have taken an enqueue.
        let deadline = std::time::Instant::now() + PROGRESS_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let life = ack_rx.recv_timeout(left).unwrap_or_else(|e| {
                panic!("no acknowledged enqueue within {PROGRESS_TIMEOUT:?} in round {round} ({e}); QPQ_CRASH_SEED={seed}")
            });
            if life == round as u64 {
                break;
            }
        }
        let delay = rng.gen_range(0..=MAX_KILL_DELAY_MS);
        delays.push(delay);
        std::thread::sleep(Duration::from_millis(delay));
        server.kill9();
        // Panics unless the data dir opens again and the server listens on its address.
        server = ServerProcess::start_on(dir.path(), addr);
        generation_tx.send_modify(|g| *g += 1);
    }
    stop.store(true, Ordering::SeqCst);
    generation_tx.send_modify(|g| *g += 1);
    let logs: Vec<SenderLog> = senders.into_iter().map(|h| h.join().expect("sender thread")).collect();

    let received = drain(&addr.to_string(), pin, &recipient);
    let mut counts: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for p in &received {
        *counts.entry(p.clone()).or_default() += 1;
    }
    let context = format!("QPQ_CRASH_SEED={seed}, kill delays {delays:?} ms");
    let doubled: Vec<_> =
        counts.iter().filter(|(_, n)| **n > 1).map(|(p, n)| (String::from_utf8_lossy(p), *n)).collect();
    assert!(doubled.is_empty(), "payloads delivered more than once: {doubled:?}; {context}");
    let mut acked_total = 0;
    for (i, log) in logs.iter().enumerate() {
        let acked: BTreeSet<u64> = log.acked.iter().copied().collect();
        acked_total += acked.len();
        let lost: Vec<u64> =
            acked.iter().copied().filter(|n| !counts.contains_key(&payload(i, *n))).collect();
        assert!(
            lost.is_empty(),
            "sender {i}: {} of {} acknowledged payloads lost, first {:?}; {context}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(10)]
        );
    }
    assert!(acked_total >= KILLS, "each round had an acknowledged enqueue; {context}");
    eprintln!("crash loop: {acked_total} acknowledged, {} received, {context}", received.len());
    drop(server);
}
