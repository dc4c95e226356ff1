//! The reconnect loop of this node's two dedicated connections (the listen connection,
//! [`super::listen`], and the wake-up sender, [`super::wake`]): run one connection's life until
//! it ends, say why, pause, connect again, until the store stops.
//!
//! Why a pause: a database that refuses connections would otherwise be asked again at once,
//! in a busy loop. Why the "lost" line is throttled ([`limits::STORE_OUTAGE_LOG_INTERVAL_MS`]):
//! during an outage each attempt fails, and one warning a second per connection said nothing
//! the first had not. Why nothing is lost meanwhile: each caller's attempt restores its own state
//! when it starts again (the listener wakes every waiter, the sender keeps its pending set).

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::logthrottle::LogThrottle;

/// Runs `attempt` again and again, [`limits::PG_LISTEN_RETRY_MS`] apart, until `stop` is
/// cancelled. `attempt` is one connection's life and returns why it ended, which is logged as
/// `what` lost (the first time at once, then at most once per outage-log interval).
pub(super) async fn forever<F, Fut>(what: &str, stop: &CancellationToken, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = String>,
{
    let mut log = LogThrottle::new(Duration::from_millis(limits::STORE_OUTAGE_LOG_INTERVAL_MS));
    loop {
        tokio::select! {
            ended = attempt() => {
                if let Some(unlogged) = log.note(Instant::now()) {
                    tracing::warn!(reason = %ended, unlogged, "postgresql {what} connection lost; reconnecting");
                }
            }
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(limits::PG_LISTEN_RETRY_MS)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
