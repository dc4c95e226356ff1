//! The inbox: the received messages and membership events of a home as a log that every reader
//! follows on its own.
//!
//! Several processes may read one home at once (two `recv --follow`, a shell and a `recv`).
//! Whichever of them fetches a message from the server appends it to the inbox, and the
//! entry gets the next home-wide sequence number ([`State::inbox_end_seq`]). Readers never take
//! entries out: each keeps a [`Cursor`] (the last sequence number it showed) and shows what
//! follows it, so every reader sees every message, in the order they were processed. The
//! persisted [`State::read_seq`] says how far some reader got: a new reader (one-shot `recv`,
//! a follower or shell that starts) begins there, so `recv` prints only what no reader showed.
//!
//! Membership changes ("bob added carol to #team", "you were added to #team") are a second log
//! of the same kind, [`InboxEvents`], numbered on their own: each event also records the entry
//! it came after, so a reader shows messages and events in the order they happened, whichever
//! process fetched them. (They were once handed only to the process that fetched them: a
//! `recv --follow --json` never printed the join that a one-shot `send` of the same home had
//! fetched, and a shell round cut short by a typed line lost its events.) Requests and notices
//! stay with the process that fetched them: requests are listed by `qpq requests`.
//!
//! Bounds: unread entries are capped by [`MAX_INBOX_ENTRIES`] and [`MAX_INBOX_BYTES`] (the
//! oldest leave first; they stay in their conversation's history), and of the read ones the
//! newest [`MAX_INBOX_READ_KEPT`] stay, for a reader a moment behind another. A reader that
//! follows the inbox as it runs (`recv --follow`, the shell) also keeps its place in the home
//! ([`LiveReaders`]), and the read entries after it stay within the caps of unread ones: during
//! a burst a faster reader of the same home once moved hundreds of entries past a follower that
//! was still printing, and the follower missed them. A live reader renews its place at every
//! read, at least every [`LIVE_READER_WAIT_MS`](crate::limits::LIVE_READER_WAIT_MS); one not seen for [`LIVE_READER_LEASE_MS`]
//! (killed, suspended) holds nothing. A reader further behind than what is kept is told how
//! many entries it missed and goes on with the oldest one kept; it never waits for them. Events
//! have the same bounds, counted apart.
//!
//! A one-shot command that learns of a membership change (a `send` that catches up first, a
//! `group leave`) tells its person at once, on stderr; it also marks the event told
//! ([`State::told_events`]) once it has printed it, and a one-shot `recv` that prints for people skips it, so one
//! person at one terminal reads each change once. Readers that keep a view of their own (the
//! shell, `recv --follow`) and `--json` readers, whose output is data, still show every event.
//!
//! On disk the events are a record of their own (`inbox_events`, see
//! [`crate::client::db::records`]); a home written before it opens with none.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::client::messenger::{ClientError, Event, Messenger, entry_bytes, keep_newest};
use crate::client::state::{Entry, State};
use crate::client::timeline::{Change, MemberEventKind, change_event, changes_of};
use crate::limits::{
    LIVE_READER_LEASE_MS, MAX_INBOX_BYTES, MAX_INBOX_ENTRIES, MAX_INBOX_READ_KEPT, MAX_LIVE_READERS,
};

/// A reader's place in the inbox: the sequence numbers of the last entry and the last event
/// it showed, and for a live reader the id its place is kept under in the home.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    entries: u64,
    events: u64,
    live: Option<u64>,
}

/// The places of the live readers of a home, by a random id (see the module header).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveReaders {
    by_id: BTreeMap<u64, LivePlace>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
struct LivePlace {
    entries: u64,
    events: u64,
    /// Our clock when the reader last read, ms since the Unix epoch.
    seen_ms: u64,
}

impl LiveReaders {
    /// Takes a place for a new reader `id` at `cursor`, unless [`MAX_LIVE_READERS`] hold one
    /// (then it reads as a plain reader); true when it got one.
    fn register(&mut self, id: u64, cursor: Cursor, now_ms: u64) -> bool {
        if self.by_id.len() >= MAX_LIVE_READERS {
            return false;
        }
        self.by_id.insert(id, LivePlace { entries: cursor.entries, events: cursor.events, seen_ms: now_ms });
        true
    }

    /// Moves the place of reader `id` to `cursor` at `now_ms`: `Some(true)` when that changed
    /// the record (it moved, or a renewal is due: half the lease passed, or the clock went
    /// back), `Some(false)` when nothing needs writing, None when it has no place any more
    /// (its lease lapsed): it reads on as a plain reader rather than take one again, so
    /// readers never take places from each other in turn.
    fn mark(&mut self, id: u64, cursor: Cursor, now_ms: u64) -> Option<bool> {
        let p = self.by_id.get_mut(&id)?;
        let due = p.entries != cursor.entries
            || p.events != cursor.events
            || now_ms < p.seen_ms
            || now_ms - p.seen_ms >= LIVE_READER_LEASE_MS / 2;
        if due {
            *p = LivePlace { entries: cursor.entries, events: cursor.events, seen_ms: now_ms };
        }
        Some(due)
    }

    /// Drops the readers not seen within the lease (a clock that went back keeps them); true
    /// when any went.
    fn expire(&mut self, now_ms: u64) -> bool {
        let before = self.by_id.len();
        self.by_id.retain(|_, p| now_ms.saturating_sub(p.seen_ms) < LIVE_READER_LEASE_MS);
        self.by_id.len() != before
    }

    /// The places no read entry (and no read event) after which may leave: the furthest-behind
    /// live reader's (`u64::MAX`: no live reader).
    fn held_after(&self) -> (u64, u64) {
        let entries = self.by_id.values().map(|p| p.entries).min().unwrap_or(u64::MAX);
        let events = self.by_id.values().map(|p| p.events).min().unwrap_or(u64::MAX);
        (entries, events)
    }
}

/// One membership change in the inbox.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InboxEvent {
    pub group_id: Vec<u8>,
    pub kind: MemberEventKind,
    pub by: [u8; 32],
    pub members: Vec<[u8; 32]>,
    /// Our clock when we learned of it, ms since the Unix epoch.
    pub at_ms: u64,
    /// Sequence number of the inbox entry it came after (0: before every entry).
    after: u64,
    /// A one-shot command told its person of it as it learned it (see the module header):
    /// set on a reader's copy only, from [`State::told_events`].
    #[serde(skip)]
    pub told: bool,
}

impl InboxEvent {
    /// The same change as a live [`Event`].
    pub fn to_event(&self) -> Event {
        change_event(&self.group_id, self.kind, self.by, self.members.clone())
    }

    fn bytes(&self) -> usize {
        32 * (self.members.len() + 1) + self.group_id.len() + 32
    }
}

/// The membership events of the inbox: a log like [`State::inbox`], numbered on its own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct InboxEvents {
    /// Oldest first; event `i` has the sequence number `end_seq - len + 1 + i`.
    list: VecDeque<InboxEvent>,
    /// Sequence number of the newest event ever added (0: none yet).
    end_seq: u64,
    /// Events up to this sequence number were shown by some reader.
    read_seq: u64,
}

/// One thing a reader shows: a message or a membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    Message(Entry),
    Event(InboxEvent),
}

/// What a reader has not shown yet.
#[derive(Debug, Default)]
pub struct Unread {
    /// Entries that left the inbox before this reader showed them (it fell behind the caps).
    pub missed: u64,
    /// Events that did the same.
    pub missed_events: u64,
    /// Messages and events in the order they were processed.
    pub items: Vec<Arrival>,
    /// The home's read marks (entries, events) before and after this read (see
    /// [`Messenger::unread_again`]).
    marked: ((u64, u64), (u64, u64)),
}

impl Unread {
    /// The messages alone.
    pub fn messages(&self) -> impl Iterator<Item = &Entry> {
        self.items.iter().filter_map(|a| match a {
            Arrival::Message(e) => Some(e),
            Arrival::Event(_) => None,
        })
    }
}

/// Sequence number of the first of `len` items numbered up to `end` (`end + 1` when none).
fn first_of(end: u64, len: usize) -> u64 {
    (end + 1).saturating_sub(len as u64)
}

/// Sequence number of the inbox's first entry.
fn first_seq(s: &State) -> u64 {
    first_of(s.inbox_end_seq, s.inbox.len())
}

/// Keeps one of the inbox's logs (numbered up to `end`, read up to `read`) within its bounds:
/// every item within the caps, and of the read ones a few, and those after `held` (the place of
/// the live reader furthest behind).
fn bound<T>(list: &mut VecDeque<T>, end: u64, read: u64, held: u64, bytes_of: impl Fn(&T) -> usize) {
    keep_newest(list, MAX_INBOX_ENTRIES, MAX_INBOX_BYTES, bytes_of);
    let before_first = first_of(end, list.len()).saturating_sub(1);
    let count = |upto: u64| usize::try_from(upto.saturating_sub(before_first)).unwrap_or(usize::MAX);
    let drop = count(read).saturating_sub(MAX_INBOX_READ_KEPT).min(count(held));
    list.drain(..drop.min(list.len()));
}

/// Of a log of `len` items numbered up to `end`, for a reader that showed up to `from`: how many
/// it missed (they left the log) and how many of the log's items it showed already.
fn span(end: u64, len: usize, from: u64) -> (u64, usize) {
    // A state older than the cursor (say, restored from a backup) starts the count over.
    let from = from.min(end);
    let first = first_of(end, len);
    let skip = usize::try_from(from.saturating_sub(first.saturating_sub(1))).unwrap_or(usize::MAX);
    (first.saturating_sub(from + 1), skip)
}

/// Appends a processed message to the inbox, numbering it.
pub(crate) fn push(s: &mut State, entry: Entry) {
    s.inbox.push_back(entry);
    s.inbox_end_seq += 1;
}

/// Appends the membership changes of one event of `group_id` to the inbox's events, after the
/// newest entry.
pub(crate) fn push_changes(s: &mut State, group_id: &[u8], changes: Vec<Change>, at_ms: u64) {
    for c in changes {
        let after = s.inbox_end_seq;
        let e = InboxEvent {
            group_id: group_id.to_vec(),
            kind: c.kind,
            by: c.by,
            members: c.members,
            at_ms,
            after,
            told: false,
        };
        s.inbox_events.list.push_back(e);
        s.inbox_events.end_seq += 1;
    }
}

/// The event numbered `seq`, while the inbox has it.
fn event_at(s: &State, seq: u64) -> Option<&InboxEvent> {
    let ev = &s.inbox_events;
    let i = usize::try_from(seq.checked_sub(first_of(ev.end_seq, ev.list.len()))?).ok()?;
    ev.list.get(i)
}

impl InboxEvent {
    /// The same membership change as `other`, wherever each came after and whoever told it.
    fn same_change(&self, other: &InboxEvent) -> bool {
        (&self.group_id, self.kind, self.by, &self.members, self.at_ms)
            == (&other.group_id, other.kind, other.by, &other.members, other.at_ms)
    }
}

/// Takes back the entries pushed after the inbox had `len` entries: no reader saw them (the
/// caller holds the home lock and has not saved since, and shows them itself), so their
/// numbers are given back too. Events pushed meanwhile stay for the readers.
pub(crate) fn unpush_since(s: &mut State, len: usize) {
    let extra = s.inbox.len().saturating_sub(len);
    s.inbox.truncate(len);
    s.inbox_end_seq = s.inbox_end_seq.saturating_sub(extra as u64);
    s.read_seq = s.read_seq.min(s.inbox_end_seq);
    // An event that came after a taken-back entry now comes after the newest one left: the
    // numbers given back go to later messages, which must not show before it.
    let end = s.inbox_end_seq;
    for e in s.inbox_events.list.iter_mut().rev().take_while(|e| e.after > end) {
        e.after = end;
    }
}

/// The newest `n` events (fewer when the inbox has fewer), numbered.
pub(crate) fn newest_events(s: &State, n: u64) -> Vec<(u64, InboxEvent)> {
    let ev = &s.inbox_events;
    let first = ev.end_seq.saturating_sub(n) + 1;
    (first..=ev.end_seq).filter_map(|seq| event_at(s, seq).map(|e| (seq, e.clone()))).collect()
}

/// Sequence number of the newest event (to give [`events_since`] later).
pub(crate) fn events_end(s: &State) -> u64 {
    s.inbox_events.end_seq
}

/// How many events were added after the newest was `end` (still in the inbox), and their bytes.
pub(crate) fn events_since(s: &State, end: u64) -> (usize, usize) {
    let added = usize::try_from(s.inbox_events.end_seq.saturating_sub(end)).unwrap_or(usize::MAX);
    let bytes = s.inbox_events.list.iter().rev().take(added).map(InboxEvent::bytes).sum();
    (added, bytes)
}

/// Keeps the inbox within its bounds: unread entries and events within the caps, read ones
/// only a few.
pub(crate) fn trim(s: &mut State) {
    let (held_entries, held_events) = s.live_readers.held_after();
    bound(&mut s.inbox, s.inbox_end_seq, s.read_seq, held_entries, entry_bytes);
    let ev = &mut s.inbox_events;
    bound(&mut ev.list, ev.end_seq, ev.read_seq, held_events, InboxEvent::bytes);
    // Only those a reader may still show: in the inbox, after where a new reader starts.
    let first = first_of(ev.end_seq, ev.list.len()).max(ev.read_seq + 1);
    let end = ev.end_seq;
    s.told_events.retain(|seq| (first..=end).contains(seq));
}

impl Messenger {
    /// Makes this process a one-shot command that tells its person of the membership changes
    /// it learns as it prints them (see the module header and [`Self::mark_changes_told`]).
    pub fn tell_changes(&mut self) {
        self.announced.get_or_insert_with(Vec::new);
    }

    /// Where a reader that starts now begins: after what some reader already showed.
    pub fn read_cursor(&mut self) -> Result<Cursor, ClientError> {
        let _op = self.begin()?;
        Ok(start_cursor(&self.home.state))
    }

    /// [`Self::read_cursor`] for a reader that follows the inbox as it runs: its place is kept
    /// in the home at once, so what comes after it stays until it has shown it (see the module
    /// header). It must read at least every [`LIVE_READER_WAIT_MS`](crate::limits::LIVE_READER_WAIT_MS); [`Self::forget_reader`]
    /// gives the place up.
    ///
    /// Past [`MAX_LIVE_READERS`], or when the home cannot be written (say, a full disk: the
    /// shell still shows `/history`), it is a plain reader's cursor.
    pub fn live_cursor(&mut self) -> Result<Cursor, ClientError> {
        // One operation: a reader that trimmed between the start and the place would take
        // entries this one has not shown.
        let _op = self.begin()?;
        let now = self.now_ms();
        let s = &mut self.home.state;
        let mut cursor = start_cursor(s);
        let id = rand::random::<u64>();
        s.live_readers.expire(now);
        if s.live_readers.register(id, cursor, now) {
            if self.home.save().is_err() {
                self.home.state.live_readers.by_id.remove(&id);
                return Ok(cursor);
            }
            cursor.live = Some(id);
        }
        Ok(cursor)
    }

    /// Gives up a live reader's place (it stops reading).
    pub fn forget_reader(&mut self, cursor: &Cursor) -> Result<(), ClientError> {
        let Some(id) = cursor.live else { return Ok(()) };
        let _op = self.begin()?;
        if self.home.state.live_readers.by_id.remove(&id).is_some() {
            trim(&mut self.home.state);
            self.home.save()?;
        }
        Ok(())
    }

    /// The entries and events after `cursor`, oldest first; moves `cursor` past them and
    /// records them as read for the whole home (durably, before they are returned: a crash
    /// before they are printed loses the printout, never shows them twice).
    pub fn read_inbox(&mut self, cursor: &mut Cursor) -> Result<Unread, ClientError> {
        let _op = self.begin()?;
        let now = self.now_ms();
        let s = &mut self.home.state;
        let mut unread = unread_after(s, *cursor);
        let mut next = Cursor { entries: s.inbox_end_seq, events: s.inbox_events.end_seq, live: cursor.live };
        let placed = match next.live.map(|id| s.live_readers.mark(id, next, now)) {
            Some(Some(changed)) => changed,
            // Its place lapsed (it did not read for the lease): a plain reader from now on.
            Some(None) => {
                next.live = None;
                false
            }
            None => false,
        };
        let expired = s.live_readers.expire(now);
        let ev = &mut s.inbox_events;
        unread.marked =
            ((s.read_seq, s.read_seq.max(s.inbox_end_seq)), (ev.read_seq, ev.read_seq.max(ev.end_seq)));
        let new = s.inbox_end_seq > s.read_seq || ev.end_seq > ev.read_seq;
        if new || placed || expired {
            s.read_seq = s.read_seq.max(s.inbox_end_seq);
            ev.read_seq = ev.read_seq.max(ev.end_seq);
            trim(s);
            self.home.save()?;
        }
        // Moved only once saved: a failed save leaves the reader where it was.
        *cursor = next;
        Ok(unread)
    }

    /// Marks told the membership changes among `printed` that this process learned and its
    /// person was just told of (see the module header and [`Messenger::tell_changes`]); a
    /// one-shot `recv` for people then skips them. A change the inbox no longer has as it was
    /// announced (trimmed, or the state reloaded without it) is left alone.
    pub fn mark_changes_told(&mut self, printed: &[Event]) -> Result<(), ClientError> {
        let mut announced = self.announced.as_mut().map(std::mem::take).unwrap_or_default();
        let mut told = Vec::new();
        for (group_id, changes) in printed.iter().filter_map(changes_of) {
            for c in changes {
                let found = announced.iter().position(|(_, a)| {
                    (a.group_id.as_slice(), a.kind, a.by, &a.members) == (group_id, c.kind, c.by, &c.members)
                });
                if let Some(i) = found {
                    told.push(announced.swap_remove(i));
                }
            }
        }
        // The others wait for a later call of this process (`requests accept` marks what it
        // printed, then the one-shot what it prints after).
        if let Some(rest) = self.announced.as_mut() {
            *rest = announced;
        }
        if told.is_empty() {
            return Ok(());
        }
        let _op = self.begin()?;
        let s = &mut self.home.state;
        let mut changed = false;
        for (seq, a) in told {
            if event_at(s, seq).is_some_and(|e| e.same_change(&a)) && s.told_events.insert(seq) {
                changed = true;
            }
        }
        if changed {
            self.home.save()?;
        }
        Ok(())
    }

    /// Marks what `unread` marked read as unread again, when showing it failed (the reader of a
    /// pipe went away, the disk is full): the next reader shows it. What a crash between the
    /// mark and the write loses stays lost; a failed write is told and undone. A no-op when
    /// another reader has shown more since. Entries beyond what the inbox keeps of read ones
    /// ([`MAX_INBOX_READ_KEPT`]) left it already: the next reader is told it missed them.
    ///
    /// `shown` items of `unread` (its first ones) were shown whole: they stay read. Marking
    /// the whole read unread again made `recv --json | head -n1` print the same first message
    /// for ever when more than a pipe's buffer waited.
    pub fn unread_again(&mut self, unread: &Unread, shown: usize) -> Result<(), ClientError> {
        let _op = self.begin()?;
        let not_shown = unread.items.get(shown..).unwrap_or_default();
        let entries = not_shown.iter().filter(|a| matches!(a, Arrival::Message(_))).count() as u64;
        let events = not_shown.len() as u64 - entries;
        let s = &mut self.home.state;
        // The read's entries (and events) are the inbox's last ones, ending at `after`.
        let back = |seq: &mut u64, (before, after): (u64, u64), not_shown: u64| {
            let back_to = before.max(after.saturating_sub(not_shown));
            let moved = *seq == after && back_to < after;
            if moved {
                *seq = back_to;
            }
            moved
        };
        let (marked_entries, marked_events) = unread.marked;
        let moved_entries = back(&mut s.read_seq, marked_entries, entries);
        let moved_events = back(&mut s.inbox_events.read_seq, marked_events, events);
        if moved_entries || moved_events {
            self.home.save()?;
        }
        Ok(())
    }
}

/// Where a reader that starts now begins: after what some reader already showed.
fn start_cursor(s: &State) -> Cursor {
    let ev = &s.inbox_events;
    Cursor { entries: s.read_seq.min(s.inbox_end_seq), events: ev.read_seq.min(ev.end_seq), live: None }
}

/// The entries and events after `from`, merged in the order they were processed, and how many
/// of them left the inbox already.
fn unread_after(s: &State, from: Cursor) -> Unread {
    let (missed, skip) = span(s.inbox_end_seq, s.inbox.len(), from.entries);
    let ev = &s.inbox_events;
    let (missed_events, skip_events) = span(ev.end_seq, ev.list.len(), from.events);
    // Entry `first + skip + i` comes before every event recorded after it.
    let first = first_seq(s);
    let mut entries = s.inbox.iter().skip(skip).zip(first.saturating_add(skip as u64)..).peekable();
    let mut items = Vec::new();
    let first_event = first_of(ev.end_seq, ev.list.len());
    for (e, seq) in ev.list.iter().skip(skip_events).zip(first_event.saturating_add(skip_events as u64)..) {
        while let Some((entry, _)) = entries.next_if(|(_, seq)| *seq <= e.after) {
            items.push(Arrival::Message(entry.clone()));
        }
        let told = s.told_events.contains(&seq);
        items.push(Arrival::Event(InboxEvent { told, ..e.clone() }));
    }
    items.extend(entries.map(|(entry, _)| Arrival::Message(entry.clone())));
    Unread { missed, missed_events, items, marked: ((0, 0), (0, 0)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::state::Secrets;

    fn entry(n: u64) -> Entry {
        Entry {
            group_id: vec![1; 16],
            from: [2; 32],
            text: n.to_string(),
            sent_at_ms: n,
            received_at_ms: n,
            outgoing: false,
        }
    }

    fn change(by: u8) -> Vec<Change> {
        vec![Change { kind: MemberEventKind::Added, by: [by; 32], members: vec![[7; 32]] }]
    }

    fn state() -> State {
        State::new(Secrets::new([1; 32], [2; 32]), None, None)
    }

    fn at(n: u64) -> Cursor {
        Cursor { entries: n, events: 0, live: None }
    }

    /// Messages as their text, events as `+` and the first byte of who made them.
    fn shown(u: &Unread) -> Vec<String> {
        u.items
            .iter()
            .map(|a| match a {
                Arrival::Message(e) => e.text.clone(),
                Arrival::Event(e) => format!("+{}", e.by[0]),
            })
            .collect()
    }

    /// Found by exploratory testing: a `recv --follow` still printing lost entries that a
    /// shell of the same home had read, once more than the few read ones kept came in a burst.
    #[test]
    fn a_live_reader_behind_keeps_what_it_has_not_shown_until_its_lease_lapses() {
        let mut s = state();
        let burst = MAX_INBOX_READ_KEPT as u64 * 3;
        let follower = Cursor { entries: 0, events: 0, live: Some(7) };
        assert_eq!(s.live_readers.mark(7, follower, 1_000), None, "no place before it registers");
        assert!(s.live_readers.register(7, follower, 1_000));
        assert_eq!(s.live_readers.mark(7, follower, 2_000), Some(false), "same place, lease fresh");
        assert_eq!(s.live_readers.mark(7, follower, 500), Some(true), "the clock went back: renewed");
        for n in 1..=burst {
            push(&mut s, entry(n));
            push_changes(&mut s, &[1; 16], change(3), 0);
        }
        // A faster reader shows everything.
        s.read_seq = s.inbox_end_seq;
        s.inbox_events.read_seq = s.inbox_events.end_seq;
        trim(&mut s);
        let u = unread_after(&s, follower);
        assert_eq!((u.missed, u.missed_events), (0, 0));
        assert_eq!(u.messages().count() as u64, burst, "the follower still gets every message");
        assert_eq!(u.items.len() as u64, 2 * burst, "and every event");
        // It shows half and renews its place there: what it showed may leave.
        let half = Cursor { entries: burst / 2, events: burst / 2, live: Some(7) };
        assert_eq!(s.live_readers.mark(7, half, 3_000), Some(true));
        trim(&mut s);
        assert_eq!(first_seq(&s), burst / 2 + 1);
        // Killed, it stops renewing: after the lease its place holds nothing.
        assert!(!s.live_readers.expire(3_000 + LIVE_READER_LEASE_MS - 1));
        assert!(s.live_readers.expire(3_000 + LIVE_READER_LEASE_MS));
        trim(&mut s);
        assert_eq!(s.inbox.len(), MAX_INBOX_READ_KEPT);
        assert_eq!(s.inbox_events.list.len(), MAX_INBOX_READ_KEPT);
        // However far behind, a live reader holds no more than the caps of unread entries.
        assert_eq!(s.live_readers.mark(7, half, 4_000), None, "lapsed: it does not take a place again");
        assert!(s.live_readers.register(8, at(0), 5_000));
        for n in 0..MAX_INBOX_ENTRIES as u64 + 5 {
            push(&mut s, entry(n));
        }
        s.read_seq = s.inbox_end_seq;
        trim(&mut s);
        assert_eq!(s.inbox.len(), MAX_INBOX_ENTRIES);
    }

    /// Review: past the cap, every read evicted the reader seen longest ago, which took a
    /// place again at its next read, and so on: a write every few hundred ms, for ever.
    #[test]
    fn past_the_cap_a_new_reader_is_a_plain_one_and_nobody_loses_a_place() {
        let mut r = LiveReaders::default();
        for id in 0..MAX_LIVE_READERS as u64 {
            assert!(r.register(id, at(id), 1_000 + id));
        }
        assert!(!r.register(99, at(0), 2_000), "the 17th reads as a plain reader");
        assert!(!r.expire(2_000));
        assert_eq!(r.by_id.len(), MAX_LIVE_READERS);
        assert_eq!(r.mark(0, at(0), 2_000), Some(false), "the first keeps its place");
        assert_eq!(r.held_after(), (0, 0));
    }

    #[test]
    fn numbers_stay_attached_to_entries_when_old_ones_are_trimmed() {
        let mut s = state();
        for n in 1..=(MAX_INBOX_READ_KEPT as u64 + 10) {
            push(&mut s, entry(n));
        }
        s.read_seq = s.inbox_end_seq - 3;
        trim(&mut s);
        assert_eq!(s.inbox.len(), MAX_INBOX_READ_KEPT + 3, "read entries beyond the few kept left");
        assert_eq!(first_seq(&s), 8);
        assert_eq!(s.inbox.front().map(|e| e.text.as_str()), Some("8"), "entry 8 has number 8");
        let len = s.inbox.len();
        push(&mut s, entry(999));
        push_changes(&mut s, &[1; 16], change(3), 0);
        unpush_since(&mut s, len);
        assert_eq!(s.inbox_end_seq, MAX_INBOX_READ_KEPT as u64 + 10);
        assert_eq!(s.inbox_events.end_seq, 1, "the event stays for the readers");
        // ...before the message that takes the number given back.
        push(&mut s, entry(1000));
        let from = Cursor { entries: s.inbox_end_seq - 1, events: 0, live: None };
        assert_eq!(shown(&unread_after(&s, from)), ["+3", "1000"]);
    }

    #[test]
    fn a_reader_behind_what_the_inbox_keeps_is_told_how_many_it_missed() {
        let mut s = state();
        for n in 1..=10 {
            push(&mut s, entry(n));
        }
        s.inbox.drain(..4); // entries 1-4 left (the caps)
        let behind = unread_after(&s, at(1));
        assert_eq!(
            (behind.missed, shown(&behind)),
            (3, ["5", "6", "7", "8", "9", "10"].map(String::from).to_vec())
        );
        let current = unread_after(&s, at(8));
        assert_eq!((current.missed, shown(&current)), (0, vec!["9".to_string(), "10".to_string()]));
        assert!(unread_after(&s, at(10)).items.is_empty());
        // A cursor past the end (the state went back): nothing new, nothing missed.
        let ahead = unread_after(&s, Cursor { entries: 99, events: 99, live: None });
        assert_eq!((ahead.missed, ahead.items.len()), (0, 0));
    }

    /// Events sit between the messages they came between, for a reader from any place.
    #[test]
    fn events_come_in_their_place_among_the_messages() {
        let mut s = state();
        push_changes(&mut s, &[1; 16], change(1), 0); // before every message
        push(&mut s, entry(1));
        push(&mut s, entry(2));
        push_changes(&mut s, &[1; 16], change(2), 0);
        push_changes(&mut s, &[1; 16], change(3), 0);
        push(&mut s, entry(3));
        push_changes(&mut s, &[1; 16], change(4), 0); // after the newest
        let all = unread_after(&s, Cursor { entries: 0, events: 0, live: None });
        assert_eq!(shown(&all), ["+1", "1", "2", "+2", "+3", "3", "+4"]);
        // A reader that showed messages 1-2 and event 1 before events 2-3 came.
        let later = unread_after(&s, Cursor { entries: 2, events: 1, live: None });
        assert_eq!(shown(&later), ["+2", "+3", "3", "+4"]);
        // Events missed are counted apart.
        s.inbox_events.list.pop_front();
        let behind = unread_after(&s, Cursor { entries: 0, events: 0, live: None });
        assert_eq!((behind.missed, behind.missed_events), (0, 1));
    }

    #[test]
    fn events_since_counts_what_came_after_a_mark_and_its_bytes() {
        let mut s = state();
        push_changes(&mut s, &[1; 16], change(1), 0);
        let mark = events_end(&s);
        assert_eq!(events_since(&s, mark), (0, 0));
        push_changes(&mut s, &[1; 16], change(2), 0);
        push_changes(&mut s, &[1; 16], change(3), 0);
        let one = s.inbox_events.list[0].bytes();
        assert_eq!(events_since(&s, mark), (2, 2 * one));
    }

    #[test]
    fn events_are_bounded_like_entries() {
        let mut s = state();
        for n in 0..(MAX_INBOX_ENTRIES + 5) {
            push_changes(&mut s, &[1; 16], change((n % 200) as u8), 0);
        }
        trim(&mut s);
        assert_eq!(s.inbox_events.list.len(), MAX_INBOX_ENTRIES, "unread ones within the cap");
        s.inbox_events.read_seq = s.inbox_events.end_seq;
        trim(&mut s);
        assert_eq!(s.inbox_events.list.len(), MAX_INBOX_READ_KEPT, "of read ones only a few");
        let big = Change {
            kind: MemberEventKind::Added,
            by: [1; 32],
            members: vec![[7; 32]; MAX_INBOX_BYTES / 32],
        };
        push_changes(&mut s, &[1; 16], vec![big], 0);
        trim(&mut s);
        assert!(s.inbox_events.list.iter().map(InboxEvent::bytes).sum::<usize>() <= MAX_INBOX_BYTES);
        assert_eq!(s.inbox_events.end_seq, (MAX_INBOX_ENTRIES + 6) as u64, "numbers go on");
    }

    /// A reader whose output failed after an entry and an event gives back the rest of both,
    /// and the events are on disk: a reader of the reopened home shows them.
    #[test]
    fn what_a_failed_reader_did_not_show_is_unread_again_and_events_are_kept_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = crate::client::testing::offline_messenger(dir.path());
        let mut cursor = m.read_cursor().unwrap();
        {
            let _op = m.begin().unwrap();
            let s = &mut m.home.state;
            push(s, entry(1));
            push_changes(s, &[1; 16], change(1), 0);
            push(s, entry(2));
            push_changes(s, &[1; 16], change(2), 0);
            m.home.save().unwrap();
        }
        let unread = m.read_inbox(&mut cursor).unwrap();
        assert_eq!(shown(&unread), ["1", "+1", "2", "+2"]);
        m.unread_again(&unread, 2).unwrap();
        drop(m);
        let mut m = Messenger::open(dir.path(), None, Default::default()).unwrap();
        let mut fresh = m.read_cursor().unwrap();
        assert_eq!(shown(&m.read_inbox(&mut fresh).unwrap()), ["2", "+2"], "the two not shown");
        let mut next = m.read_cursor().unwrap();
        assert!(m.read_inbox(&mut next).unwrap().items.is_empty(), "read now");
    }
}
