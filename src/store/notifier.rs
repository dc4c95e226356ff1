//! Wakes `fetchWait` calls when mail for their recipient is committed.
//!
//! A waiter registers *before* it reads its queue (`Notified::enable`), so a commit that lands
//! between the read and the wait is never missed; the writer calls [`Notifier::notify`] only
//! after the commit is durable, so a woken waiter always finds the message. There is no polling:
//! the wake-up costs one `notify_waiters` per recipient per commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::IdentityKey;

/// Per-recipient wake-up channels, created on demand and dropped when no one waits.
#[derive(Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<IdentityKey, Arc<Notify>>>,
}

impl Notifier {
    /// The wake-up channel of `who`; hold the subscription across the read and the wait. It
    /// unregisters itself when dropped, also when the waiting call is cancelled.
    pub fn subscribe<'a>(&'a self, who: &IdentityKey) -> Subscription<'a> {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let notify = map.entry(*who).or_default().clone();
        Subscription { notifier: self, who: *who, notify }
    }

    /// Number of recipients with a registered waiter (for tests and metrics).
    pub fn waiting_recipients(&self) -> usize {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Wakes every current waiter (after wake-ups may have been lost, see `postgres::listen`).
    pub fn notify_all(&self) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for n in map.values() {
            n.notify_waiters();
        }
    }

    /// Wakes every current waiter of each recipient.
    pub fn notify<'a>(&self, recipients: impl IntoIterator<Item = &'a IdentityKey>) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for r in recipients {
            if let Some(n) = map.get(r) {
                n.notify_waiters();
            }
        }
    }
}

/// A registered waiter; see [`Notifier::subscribe`].
pub struct Subscription<'a> {
    notifier: &'a Notifier,
    who: IdentityKey,
    notify: Arc<Notify>,
}

impl Subscription<'_> {
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut map = self.notifier.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Two references left: the map's and ours; then nobody else waits for this key.
        if Arc::strong_count(&self.notify) <= 2 {
            map.remove(&self.who);
        }
    }
}
