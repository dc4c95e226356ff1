//! Wakes `fetchWait` calls when mail for their recipient is committed, and hands them that mail.
//!
//! Each parked call holds a [`Subscription`] with its own mailbox. After a commit is durable the
//! redb writer [`Notifier::hand`]s every message it committed to the mailboxes of its recipient,
//! so a woken call answers from memory instead of opening a read transaction. A store that cannot
//! hand messages (PostgreSQL, whose commits may come from another node) calls
//! [`Notifier::notify`] instead, which marks the mailbox *stale*: the call reads the store again.
//! A mailbox that would grow past [`MAX_HANDED_MESSAGES`] or [`MAX_HANDED_BYTES`] turns stale too,
//! so its memory is bounded and nothing is lost. A message handed to several waiters (one
//! recipient's parked calls, on as many connections as it likes) is one shared copy: copied per
//! waiter, one 64 KiB enqueue to a key with 40,000 parked calls held 2.5 GiB.
//!
//! Why nothing is missed: a subscription exists before its call reads the store, so a message is
//! either committed before that read (and the read returns it) or handed after it (commit, then
//! hand). Messages committed before the read but handed after are recognised by their seq (at
//! most the ack the call carries, or returned by the read, which then ends the wait). Each wake-up
//! is a `Notify::notify_one`, whose permit is kept when the call is not waiting yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::{IdentityKey, StoredMessage};

/// Messages one mailbox holds before it turns stale (the waiter then reads the store).
pub const MAX_HANDED_MESSAGES: usize = 64;
/// Payload bytes one mailbox holds before it turns stale.
pub const MAX_HANDED_BYTES: usize = 64 * 1024;
/// Payload bytes one [`Notifier::hand`] copies in all; the mailboxes it would copy more for turn
/// stale. A fanout's recipients each get their own message (their own seq), so without this one
/// 64 KiB fanout to 10,000 keys with parked calls copied 625 MiB at once, outside every budget.
pub const MAX_HANDED_BYTES_PER_HAND: usize = 4 * 1024 * 1024;

/// One message the writer has just made durable for `to` (borrowed from its write request).
pub struct Committed<'a> {
    pub to: IdentityKey,
    pub seq: u64,
    pub enqueued_at_ms: u64,
    pub channel_seq: u64,
    pub channel: &'a [u8],
    pub payload: &'a [u8],
}

/// Per-recipient mailboxes of the parked calls, created on demand and dropped with them.
#[derive(Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<IdentityKey, Vec<Arc<Mailbox>>>>,
}

#[derive(Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    notify: Notify,
}

#[derive(Default)]
struct MailboxState {
    messages: Vec<Arc<StoredMessage>>,
    bytes: usize,
    /// Something may have been committed that is not in `messages`: read the store.
    stale: bool,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_stale(&self) {
        let mut s = self.lock();
        s.stale = true;
        s.messages = Vec::new();
        s.bytes = 0;
        drop(s);
        self.notify.notify_one();
    }

    /// Puts `c` in this mailbox, as the copy `shared` holds (made by the first mailbox that
    /// takes it, when `budget` still has room for its payload).
    fn put(&self, c: &Committed<'_>, shared: &mut Option<Arc<StoredMessage>>, budget: &mut usize) {
        let mut s = self.lock();
        if s.stale {
            return; // already woken, and the store read will find this message
        }
        let no_copy = shared.is_none() && c.payload.len() > *budget;
        if no_copy || s.messages.len() >= MAX_HANDED_MESSAGES || s.bytes + c.payload.len() > MAX_HANDED_BYTES
        {
            drop(s);
            return self.mark_stale();
        }
        if shared.is_none() {
            *budget -= c.payload.len();
        }
        let first = s.messages.is_empty();
        s.bytes += c.payload.len();
        let message = shared.get_or_insert_with(|| {
            Arc::new(StoredMessage {
                seq: c.seq,
                channel_id: c.channel.to_vec(),
                channel_seq: c.channel_seq,
                payload: c.payload.to_vec(),
                enqueued_at_ms: c.enqueued_at_ms,
            })
        });
        s.messages.push(message.clone());
        drop(s);
        // One wake-up per batch of handed messages: later ones find the waiter already woken.
        if first {
            self.notify.notify_one();
        }
    }
}

impl Notifier {
    /// A mailbox for `who`; hold it across the store read and the wait. It unregisters itself
    /// when dropped, also when the waiting call is cancelled.
    pub fn subscribe<'a>(&'a self, who: &IdentityKey) -> Subscription<'a> {
        let mailbox = Arc::new(Mailbox::default());
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(*who).or_default().push(mailbox.clone());
        Subscription { notifier: self, who: *who, mailbox }
    }

    /// Number of recipients with a registered waiter (for tests and metrics).
    pub fn waiting_recipients(&self) -> usize {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Wakes every current waiter to read the store (after wake-ups may have been lost, see
    /// `postgres::listen`).
    pub fn notify_all(&self) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for m in map.values().flatten() {
            m.mark_stale();
        }
    }

    /// Wakes every current waiter of each recipient to read the store.
    pub fn notify<'a>(&self, recipients: impl IntoIterator<Item = &'a IdentityKey>) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for r in recipients {
            for m in map.get(r).into_iter().flatten() {
                m.mark_stale();
            }
        }
    }

    /// Hands each durably committed message to the waiters of its recipient, in commit order
    /// (seq order per recipient). Call only after the commit is on disk.
    pub fn hand(&self, committed: &[Committed<'_>]) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return;
        }
        let mut budget = MAX_HANDED_BYTES_PER_HAND;
        for c in committed {
            let mut shared = None;
            for m in map.get(&c.to).into_iter().flatten() {
                m.put(c, &mut shared, &mut budget);
            }
        }
    }
}

/// What a woken waiter found in its mailbox; see [`Subscription::take`].
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Messages after the waiter's seq, and whether more are waiting beyond its limits.
    Messages(Vec<Arc<StoredMessage>>, bool),
    /// The mailbox may be incomplete: read the store.
    ReadStore,
}

/// A registered waiter; see [`Notifier::subscribe`].
pub struct Subscription<'a> {
    notifier: &'a Notifier,
    who: IdentityKey,
    mailbox: Arc<Mailbox>,
}

impl Subscription<'_> {
    /// Resolves once something was handed or marked stale since the last call (at once if that
    /// happened before this call).
    pub async fn changed(&self) {
        self.mailbox.notify.notified().await
    }

    /// Empties the mailbox: its messages with seq > `after`, at most `limit` of them and at most
    /// `max_bytes` of payload (but at least one), like a store read. Handed messages were
    /// committed while this call waited, so none has outlived the queue's TTL.
    pub fn take(&self, after: u64, limit: u32, max_bytes: usize) -> Taken {
        let mut s = self.mailbox.lock();
        let state = std::mem::take(&mut *s);
        drop(s);
        if state.stale {
            return Taken::ReadStore;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for msg in state.messages.into_iter().filter(|m| m.seq > after) {
            if out.len() as u32 >= limit || (!out.is_empty() && bytes + msg.payload.len() > max_bytes) {
                return Taken::Messages(out, true);
            }
            bytes += msg.payload.len();
            out.push(msg);
        }
        Taken::Messages(out, false)
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut map = self.notifier.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(&self.who) {
            list.retain(|m| !Arc::ptr_eq(m, &self.mailbox));
            if list.is_empty() {
                map.remove(&self.who);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(to: IdentityKey, seq: u64, payload: &[u8]) -> Committed<'_> {
        Committed { to, seq, enqueued_at_ms: 1, channel_seq: 0, channel: &[], payload }
    }

    #[tokio::test]
    async fn a_handed_message_wakes_its_waiter_and_is_taken_once() {
        let n = Notifier::default();
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let sub = n.subscribe(&alice);
        n.hand(&[committed(bob, 1, b"not yours"), committed(alice, 7, b"hi")]);
        sub.changed().await;
        match sub.take(0, 10, 1 << 20) {
            Taken::Messages(m, more) => {
                assert_eq!(
                    m.iter().map(|m| (m.seq, m.payload.as_slice())).collect::<Vec<_>>(),
                    [(7, &b"hi"[..])]
                );
                assert!(!more);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sub.take(0, 10, 1 << 20), Taken::Messages(Vec::new(), false));
    }

    /// A fanout's recipients each get a message of their own: handing one to 10,000 parked
    /// calls copied its payload 10,000 times. The copies one hand makes are bounded; the rest
    /// of the waiters read the store.
    #[test]
    fn one_hand_copies_a_bounded_number_of_bytes_and_sends_the_rest_to_the_store() {
        let n = Notifier::default();
        let payload = vec![7u8; MAX_HANDED_BYTES];
        let keys: Vec<IdentityKey> = (0..200u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                k
            })
            .collect();
        let subs: Vec<_> = keys.iter().map(|k| n.subscribe(k)).collect();
        let fanout: Vec<_> = keys.iter().map(|k| committed(*k, 1, &payload)).collect();
        n.hand(&fanout);
        let handed = subs
            .iter()
            .filter(|s| matches!(s.take(0, 10, 1 << 20), Taken::Messages(m, _) if m.len() == 1))
            .count();
        assert_eq!(handed, MAX_HANDED_BYTES_PER_HAND / MAX_HANDED_BYTES, "the rest read the store");
        assert!(subs.iter().all(|s| s.take(0, 10, 1 << 20) == Taken::Messages(Vec::new(), false)));
    }

    #[test]
    fn seqs_the_waiter_already_has_are_skipped_and_limits_apply() {
        let n = Notifier::default();
        let alice = [1u8; 32];
        let sub = n.subscribe(&alice);
        n.hand(&[committed(alice, 3, b"a"), committed(alice, 4, b"b"), committed(alice, 5, b"c")]);
        match sub.take(3, 1, 1 << 20) {
            Taken::Messages(m, more) => {
                assert_eq!(m.iter().map(|m| m.seq).collect::<Vec<_>>(), [4]);
                assert!(more, "seq 5 is left for the next read");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_mailbox_or_a_plain_notify_sends_the_waiter_to_the_store() {
        let n = Notifier::default();
        let alice = [1u8; 32];
        let sub = n.subscribe(&alice);
        let big = vec![0u8; MAX_HANDED_BYTES];
        n.hand(&[committed(alice, 1, b"x"), committed(alice, 2, &big)]);
        assert_eq!(sub.take(0, 10, usize::MAX), Taken::ReadStore);
        n.hand(&[committed(alice, 3, b"y")]);
        n.notify([&alice]);
        assert_eq!(sub.take(0, 10, usize::MAX), Taken::ReadStore);
    }

    #[test]
    fn every_waiter_of_a_recipient_gets_the_message_and_leaves_no_entry() {
        let n = Notifier::default();
        let alice = [1u8; 32];
        let (a, b) = (n.subscribe(&alice), n.subscribe(&alice));
        n.hand(&[committed(alice, 1, b"x")]);
        let taken: Vec<Arc<StoredMessage>> = [&a, &b]
            .into_iter()
            .flat_map(|s| match s.take(0, 10, 1024) {
                Taken::Messages(m, _) => m,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(taken.len(), 2, "one each");
        assert!(Arc::ptr_eq(&taken[0], &taken[1]), "the same copy: memory does not grow per waiter");
        assert_eq!(n.waiting_recipients(), 1);
        drop((a, b));
        assert_eq!(n.waiting_recipients(), 0);
    }
}
