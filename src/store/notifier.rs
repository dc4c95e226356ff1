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
    /// The wake-up channel of `who`; hold it across the read and the wait.
    pub fn subscribe(&self, who: &IdentityKey) -> Arc<Notify> {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(*who).or_default().clone()
    }

    /// Drops `who`'s channel when the caller was its last user.
    pub fn release(&self, who: &IdentityKey, handle: Arc<Notify>) {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Two references left: the map's and the caller's `handle`.
        if Arc::strong_count(&handle) <= 2 {
            map.remove(who);
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
