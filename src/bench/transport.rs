//! Transport: NodeService calls over Cap'n Proto RPC against a raw quinn echo of the same size.
//!
//! Reference: [`super::echo::pipelined`], frames of the same payload size pipelined on one
//! bidirectional stream with the same number in flight, on a connection configured like qpq's.
//! Measured, on one connection to the server under test, with 1, 16 and 64 calls in flight:
//! - `health`: the small case. No payload and no store access, so it is the bare RPC round trip
//!   (capnp framing, the two-party protocol, the server's dispatch). Its reference echoes
//!   [`HEALTH_ECHO_LEN`]-byte frames, about the size of a health request and reply.
//! - `enqueue` of 256 B and 4 KiB to throwaway keys: adds payload copies and the store's durable
//!   group commit, so a ratio far below the health one is the disk's share, not the transport's.
//!   The keys rotate every [`MESSAGES_PER_KEY`] messages to stay below the queue cap, and their
//!   queues are acked empty after each case.

use std::time::Duration;

use super::{Bench, Row, Settings, closed_loop};
use crate::crypto::identity::Identity;

/// Echo frame size standing in for a health call (request ~40 B, reply ~80 B on the wire).
pub const HEALTH_ECHO_LEN: usize = 64;
/// Payload sizes of the enqueue cases.
pub const ENQUEUE_SIZES: [usize; 2] = [256, 4096];
/// Messages sent to one throwaway key before the next: well under the default queue cap.
pub const MESSAGES_PER_KEY: u64 = 2_000;

/// What one case calls.
#[derive(Debug, Clone, Copy)]
enum Call {
    Health,
    Enqueue(usize),
}

impl Call {
    fn label(self) -> String {
        match self {
            Call::Health => "health".to_string(),
            Call::Enqueue(n) => format!("enqueue {}", size_label(n)),
        }
    }

    fn echo_len(self) -> usize {
        match self {
            Call::Health => HEALTH_ECHO_LEN,
            Call::Enqueue(n) => n,
        }
    }
}

pub fn size_label(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) { format!("{} KiB", n / 1024) } else { format!("{n} B") }
}

pub fn steps(s: &Settings) -> u64 {
    ((1 + ENQUEUE_SIZES.len()) * s.in_flight.len()) as u64
}

pub async fn run(b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
    let calls = std::iter::once(Call::Health).chain(ENQUEUE_SIZES.into_iter().map(Call::Enqueue));
    let mut rows = Vec::new();
    for call in calls {
        for &k in &b.settings.in_flight {
            b.step(&format!("transport: {} x{k}", call.label()));
            let measured = measure(b, call, k).await?;
            let reference = b.echo_rate(call.echo_len(), k).await?;
            rows.push(Row::new(format!("{}, {k} in flight", call.label()), measured, "calls/s").against(
                format!("raw quinn echo {} x{k}", size_label(call.echo_len())),
                Some(reference),
                "calls/s",
            ));
            b.done_step();
        }
    }
    Ok(rows)
}

/// Calls per second of `call` with `k` in flight on one connection.
async fn measure(b: &Bench<'_>, call: Call, k: usize) -> anyhow::Result<f64> {
    let session = b.connect().await?;
    let budget = b.settings.duration();
    let rate = match call {
        Call::Health => {
            closed_loop(k, budget / 5, |_| async { Ok(session.health().await.map(drop)?) }).await?;
            closed_loop(k, budget, |_| async { Ok(session.health().await.map(drop)?) }).await?.per_sec()
        }
        Call::Enqueue(size) => {
            let payload = vec![0x5a; size];
            let mut keys: Vec<Identity> = Vec::new();
            let max_keys = (super::MAX_OPS_PER_RUN / MESSAGES_PER_KEY + 1) as usize;
            keys.resize_with(max_keys, Identity::generate);
            let keys = &keys;
            let payload = &payload;
            let session = &session;
            let send = |i: u64| async move {
                let to = &keys[(i / MESSAGES_PER_KEY) as usize];
                session.enqueue(&to.public().0, payload, b"").await?;
                anyhow::Ok(())
            };
            // Warm-up on the last keys, which the measured run never reaches.
            let warm = closed_loop(k, budget / 5, |i| send(super::MAX_OPS_PER_RUN - 1 - i)).await?;
            let t = closed_loop(k, budget, send).await?;
            let used = (t.ops.div_ceil(MESSAGES_PER_KEY) as usize).min(keys.len());
            let warm_used = (warm.ops.div_ceil(MESSAGES_PER_KEY) as usize).min(keys.len());
            drain(b, keys[..used].iter().chain(&keys[keys.len() - warm_used..])).await?;
            t.per_sec()
        }
    };
    session.close().await;
    Ok(rate)
}

/// Acks every message waiting for `keys`, leaving the server as it was.
async fn drain(b: &Bench<'_>, keys: impl Iterator<Item = &Identity>) -> anyhow::Result<()> {
    for id in keys {
        let s = b.login(id).await?;
        s.ack(u64::MAX).await?;
        s.close().await;
    }
    // Let the acks' commit settle before the next case measures.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
