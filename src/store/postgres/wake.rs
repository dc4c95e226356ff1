//! The wake-up sender: after mail is committed, tells the other nodes with `NOTIFY qpq_mail`,
//! in its own transaction, on its own connection, without waiting for a WAL flush.
//!
//! Why not NOTIFY inside the data transaction (as before, issue 13): a transaction that has
//! NOTIFYed takes, at commit, a heavyweight lock on "database 0" — the whole cluster — and
//! keeps it until the transaction ends, that is across its WAL flush. PostgreSQL 15,
//! src/backend/commands/async.c, `PreCommit_Notify`:
//! `LockSharedObject(DatabaseRelationId, InvalidOid, 0, AccessExclusiveLock)`, "a special lock
//! that we hold till after commit". So every notifying commit waited for the previous one's
//! fsync: no two commits shared a flush, whichever worker or node sent them.
//!
//! Here the data transaction commits (durably) without NOTIFY; its recipients are added to a
//! pending set; one task per node takes everything pending and sends it in one autocommit
//! statement on a connection with `synchronous_commit = off`, so the lock is held for
//! microseconds, not a flush. A notification needs no durability: the mail it points at is
//! already durable, and a lost one (this connection failing, the database crashing) only delays
//! delivery until the waiter's fallback poll ([`crate::limits::PG_FALLBACK_POLL_MS`]). Sent
//! only after the data commit, a NOTIFY still never wakes a waiter before its mail is readable.
//!
//! Pending recipients are a set, so bursts coalesce: while one NOTIFY statement runs, the next
//! batch's recipients accumulate. It holds at most [`limits::PG_MAX_PENDING_WAKEUPS`]: while the
//! sender cannot reach the database, every recipient of committed mail is added, and one more
//! empties it instead. That loses no message and sends no "wake everyone" notice: every waiter
//! on the other nodes reads its queue again after [`limits::PG_FALLBACK_POLL_MS`] whatever it
//! is told, so a dropped recipient's mail is late by at most that. Only a sender that cannot
//! send lets the set grow that large (it takes the whole set at each statement), so most of it
//! was that late already; a notice would only make every waiter of the cluster read at once.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{MAIL_CHANNEL, ops, reconnect};
use crate::limits;
use crate::store::IdentityKey;

/// Recipients with committed mail whose NOTIFY has not been sent yet.
#[derive(Default)]
pub(super) struct Pending {
    keys: Mutex<HashSet<IdentityKey>>,
    ready: Notify,
}

impl Pending {
    /// Call only after the mail of `keys` is committed. Past the cap the set is emptied (see
    /// the module docs).
    pub(super) fn push<'a>(&self, keys: impl IntoIterator<Item = &'a IdentityKey>) {
        let mut set = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let before = set.len();
        set.extend(keys);
        if set.len() > limits::PG_MAX_PENDING_WAKEUPS {
            let dropped = set.len();
            *set = HashSet::new();
            drop(set);
            tracing::warn!(
                dropped,
                "too many wake-ups waiting for the notify connection; left to the fallback poll"
            );
            return;
        }
        let added = set.len() > before;
        drop(set);
        if added {
            // A permit is kept when the sender is busy, so nothing waits unseen.
            self.ready.notify_one();
        }
    }

    fn take(&self) -> Vec<IdentityKey> {
        let mut set = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<IdentityKey> = std::mem::take(&mut *set).into_iter().collect();
        drop(set);
        keys.sort_unstable();
        keys
    }
}

/// Sends the pending NOTIFYs until `stop` is cancelled, reconnecting after a pause when the
/// connection fails (the recipients it was sending for go back into the set).
pub(super) async fn run(
    cfg: tokio_postgres::Config,
    node_id: u64,
    pending: std::sync::Arc<Pending>,
    stop: CancellationToken,
) {
    reconnect::forever("notify", &stop, || send_until_error(&cfg, node_id, &pending)).await
}

/// One connection's life; returns why it ended.
async fn send_until_error(cfg: &tokio_postgres::Config, node_id: u64, pending: &Pending) -> String {
    let (client, connection) = match cfg.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return format!("cannot connect: {e}"),
    };
    let driver = tokio::spawn(connection);
    let ended = async {
        // Only this connection's transactions, which write nothing but notifications.
        client.batch_execute("SET synchronous_commit = off").await?;
        let stmt = client.prepare("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS t(p)").await?;
        loop {
            pending.ready.notified().await;
            let keys = pending.take();
            if keys.is_empty() {
                continue;
            }
            let payloads = ops::notify_payloads(node_id, &keys);
            if let Err(e) = client.query(&stmt, &[&MAIL_CHANNEL, &payloads]).await {
                pending.push(keys.iter());
                return Err::<(), _>(e);
            }
        }
    }
    .await;
    driver.abort();
    match ended {
        Err(e) => e.to_string(),
        Ok(()) => "notify loop ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> IdentityKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64).to_be_bytes());
        k
    }

    #[test]
    fn pending_wake_ups_past_the_cap_are_dropped_for_the_fallback_poll() {
        let pending = Pending::default();
        let cap = limits::PG_MAX_PENDING_WAKEUPS;
        let first: Vec<IdentityKey> = (0..cap).map(key).collect();
        pending.push(first.iter());
        pending.push(first[..10].iter());
        assert_eq!(pending.take().len(), cap, "up to the cap, every recipient is kept once");
        pending.push(first.iter());
        pending.push([key(cap)].iter());
        assert!(pending.take().is_empty(), "one more empties the set");
        pending.push([key(1)].iter());
        assert_eq!(pending.take(), vec![key(1)], "and it fills again");
    }
}
