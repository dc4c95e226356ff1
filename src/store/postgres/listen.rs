//! The listen connection: other nodes' NOTIFYs become wake-ups of this node's `fetchWait`s.
//!
//! One dedicated connection (outside the pool) runs `LISTEN qpq_mail`. A payload is the sending
//! node's id and the recipients' keys in hex (`node:key:key...`); this node's own are skipped.
//! When the connection drops, notifications sent meanwhile are lost: on every (re)connect, once
//! LISTEN is in place, every parked waiter is woken to read again, and each waiter also reads
//! again after [`crate::limits::PG_FALLBACK_POLL_MS`] on its own. A lost notification delays
//! a message; it never loses one (the message is in the database).

use std::sync::Arc;

use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{MAIL_CHANNEL, reconnect};
use crate::store::{IdentityKey, Notifier};

/// Listens until `stop` is cancelled, reconnecting after a pause whenever the connection ends.
pub(super) async fn run(
    cfg: tokio_postgres::Config,
    node_id: u64,
    notifier: Arc<Notifier>,
    stop: CancellationToken,
) {
    reconnect::forever("listen", &stop, || listen_once(&cfg, node_id, &notifier)).await
}

/// One connection's life; returns why it ended.
async fn listen_once(cfg: &tokio_postgres::Config, node_id: u64, notifier: &Notifier) -> String {
    let (client, mut connection) = match cfg.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return format!("cannot connect: {e}"),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for LISTEN itself to complete, so drive it from the start.
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "connection closed".to_string()
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {MAIL_CHANNEL}")).await {
        driver.abort();
        return format!("listen failed: {e}");
    }
    // Whatever was committed while nobody listened: every waiter reads again.
    notifier.notify_all();
    let own = format!("{node_id:016x}");
    while let Some(payload) = rx.recv().await {
        let mut parts = payload.split(':');
        if parts.next() == Some(own.as_str()) {
            continue;
        }
        let keys: Vec<IdentityKey> = parts
            .filter_map(|h| hex::decode(h).ok().and_then(|b| IdentityKey::try_from(b.as_slice()).ok()))
            .collect();
        notifier.notify(keys.iter());
    }
    drop(client);
    match driver.await {
        Ok(reason) => reason,
        Err(e) => format!("listen task failed: {e}"),
    }
}
