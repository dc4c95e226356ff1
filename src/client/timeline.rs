//! Membership changes kept with each conversation's history (issue 10, item 6), so `/history`
//! shows "bob left #team" in its place among the messages.
//!
//! A conversation's [`GroupLog`] counts the messages ever added to its history and keeps its
//! recent [`MemberEvent`]s, each stamped with our clock and with that count when it happened.
//! The events are bounded like history: at most the history limit in number and
//! [`MAX_HISTORY_BYTES_PER_CONVERSATION`] in bytes, the oldest going first.
//!
//! # Placing events among messages
//! History is in [`HistoryKey`] order: receive time, then index (the count when the message
//! was added). The two orders differ for a message we wrote: it takes its place at the time it
//! was typed (or of the newest membership change or message in its history when it was
//! encrypted, if later: the change decided who reads it, and both come before it in the group's
//! order), and its index when it is encrypted, after whatever its `send` fetched first. So
//! an event takes its place in the same order, by its time and then its count
//! ([`MemberEvent::precedes`]): it goes before the first entry that comes after it in history
//! and after the others, which puts it exactly once between two neighbouring entries whatever
//! the indices say. ([`Timelines::merged`] and `Messenger::page_items` in
//! [`crate::client::history`] both place events this way. Placing them by the count alone
//! showed a join twice, at the top and again before the first message fetched with an
//! earlier index, when we wrote before reading it.)
//!
//! On disk the logs follow the [`State`](super::state::State) in the sealed state file (see
//! [`super::state`]'s "Trailer"), so this needs no new state version: a home written before
//! them opens with no events, and an older qpq of the same version reads the file (postcard
//! ignores what follows the state) though a save by it drops the events.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::client::db::HistoryKey;
use crate::client::inbox;
use crate::client::messenger::{Event, Messenger};
use crate::client::state::Entry;
use crate::limits::MAX_HISTORY_BYTES_PER_CONVERSATION;

/// What happened to a group's membership.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberEventKind {
    /// We joined (`by` invited us).
    Joined,
    /// `by` added `members`.
    Added,
    /// `by` removed `members`.
    Removed,
    /// `members` left (`by` committed it; us for our own leave).
    Left,
    /// `by` removed us.
    RemovedUs,
}

impl MemberEventKind {
    /// The `event` field of its JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberEventKind::Joined => "joined",
            MemberEventKind::Added => "added",
            MemberEventKind::Removed => "removed",
            MemberEventKind::Left => "left",
            MemberEventKind::RemovedUs => "removed_you",
        }
    }
}

/// One membership change of a conversation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MemberEvent {
    pub kind: MemberEventKind,
    pub by: [u8; 32],
    pub members: Vec<[u8; 32]>,
    /// Our clock when we learned of it, ms since the Unix epoch.
    pub at_ms: u64,
    /// How many messages the conversation's history had received before it.
    after: u64,
}

impl MemberEvent {
    /// The same change as a live [`Event`] of the conversation `group_id`.
    pub fn to_event(&self, group_id: &[u8]) -> Event {
        change_event(group_id, self.kind, self.by, self.members.clone())
    }

    /// Whether this change goes before the history entry at `entry`: it came earlier by our
    /// clock, or in the same millisecond before that entry was counted (see the module header).
    pub fn precedes(&self, entry: HistoryKey) -> bool {
        (self.at_ms, self.after) <= (entry.at_ms, entry.index)
    }

    fn bytes(&self) -> usize {
        32 * (self.members.len() + 1) + 32
    }
}

/// One kind of change of one commit: `by` did `kind` to `members`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: MemberEventKind,
    pub by: [u8; 32],
    pub members: Vec<[u8; 32]>,
}

/// The live [`Event`] of one change of the conversation `group_id`.
pub fn change_event(group_id: &[u8], kind: MemberEventKind, by: [u8; 32], members: Vec<[u8; 32]>) -> Event {
    let group_id = group_id.to_vec();
    let membership =
        |added, removed, left| Event::Membership { group_id: group_id.clone(), by, added, removed, left };
    match kind {
        MemberEventKind::Joined => Event::Joined { group_id, by },
        MemberEventKind::RemovedUs => Event::Removed { group_id, by },
        MemberEventKind::Added => membership(members, Vec::new(), Vec::new()),
        MemberEventKind::Removed => membership(Vec::new(), members, Vec::new()),
        MemberEventKind::Left => membership(Vec::new(), Vec::new(), members),
    }
}

/// The membership changes of one live [`Event`] (none for messages, requests and notices), and
/// the conversation they belong to.
pub fn changes_of(e: &Event) -> Option<(&[u8], Vec<Change>)> {
    let change =
        |kind, by: &[u8; 32], members: &Vec<[u8; 32]>| Change { kind, by: *by, members: members.clone() };
    match e {
        Event::Joined { group_id, by } => {
            Some((group_id, vec![change(MemberEventKind::Joined, by, &Vec::new())]))
        }
        Event::Removed { group_id, by } => {
            Some((group_id, vec![change(MemberEventKind::RemovedUs, by, &Vec::new())]))
        }
        Event::Membership { group_id, by, added, removed, left } => {
            let parts = [
                (MemberEventKind::Added, added),
                (MemberEventKind::Removed, removed),
                (MemberEventKind::Left, left),
            ];
            let changes = parts
                .into_iter()
                .filter(|(_, who)| !who.is_empty())
                .map(|(kind, who)| change(kind, by, who))
                .collect();
            Some((group_id, changes))
        }
        Event::Message(_)
        | Event::Request { .. }
        | Event::Dropped { .. }
        | Event::NotSent { .. }
        | Event::WelcomeRefused { .. } => None,
    }
}

/// One line of a conversation's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Message(Entry),
    Event(MemberEvent),
}

/// The membership logs of all conversations, by hex group id (as [`State::groups`]).
///
/// [`State::groups`]: super::state::State::groups
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Timelines {
    by_group: BTreeMap<String, GroupLog>,
}

/// One conversation's log.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct GroupLog {
    /// Messages ever added to the conversation's history.
    messages: u64,
    events: VecDeque<MemberEvent>,
}

/// The message counters of [`Timelines`], by hex group id: the part a message changes.
pub type MessageCounts = BTreeMap<String, u64>;

/// The membership events of [`Timelines`], by hex group id (conversations with none left out):
/// the part only a membership change changes.
pub type MemberEvents = BTreeMap<String, VecDeque<MemberEvent>>;

impl Timelines {
    /// The two parts the client database stores as records of their own, so a message rewrites
    /// a counter per conversation (tens of bytes each) and not every conversation's events,
    /// which hold member lists ([`crate::client::db::records`]). Borrowed: they encode as
    /// [`MessageCounts`] and [`MemberEvents`].
    pub fn split(&self) -> (BTreeMap<&str, u64>, BTreeMap<&str, &VecDeque<MemberEvent>>) {
        let counts = self.by_group.iter().map(|(g, log)| (g.as_str(), log.messages)).collect();
        let events = self
            .by_group
            .iter()
            .filter(|(_, log)| !log.events.is_empty())
            .map(|(g, log)| (g.as_str(), &log.events))
            .collect();
        (counts, events)
    }

    /// Joins what [`Timelines::split`] made.
    pub fn join(counts: MessageCounts, events: MemberEvents) -> Timelines {
        let mut by_group: BTreeMap<String, GroupLog> = counts
            .into_iter()
            .map(|(g, messages)| (g, GroupLog { messages, events: VecDeque::new() }))
            .collect();
        for (g, events) in events {
            by_group.entry(g).or_default().events = events;
        }
        Timelines { by_group }
    }

    /// A message was added to the history of `group` (hex id).
    pub fn note_message(&mut self, group: &str) {
        let log = self.by_group.entry(group.to_string()).or_default();
        log.messages = log.messages.saturating_add(1);
    }

    /// Keeps a change of `group` (hex id), within `limit` events and the byte bound.
    pub fn record(
        &mut self,
        group: &str,
        kind: MemberEventKind,
        by: [u8; 32],
        members: Vec<[u8; 32]>,
        at_ms: u64,
        limit: usize,
    ) {
        let log = self.by_group.entry(group.to_string()).or_default();
        log.events.push_back(MemberEvent { kind, by, members, at_ms, after: log.messages });
        let mut bytes: usize = log.events.iter().map(MemberEvent::bytes).sum();
        while log.events.len() > limit || bytes > MAX_HISTORY_BYTES_PER_CONVERSATION {
            let Some(old) = log.events.pop_front() else { break };
            bytes = bytes.saturating_sub(old.bytes());
        }
    }

    /// When we learned of `group`'s newest membership change still kept (None: none kept).
    pub fn last_change_ms(&self, group: &str) -> Option<u64> {
        self.by_group.get(group)?.events.iter().map(|e| e.at_ms).max()
    }

    /// Messages ever added to `group`'s history.
    pub fn message_count(&self, group: &str) -> u64 {
        self.by_group.get(group).map_or(0, |log| log.messages)
    }

    /// The index (among all messages ever added) of the oldest of the `kept` messages still in
    /// `group`'s history: the kept ones are the newest.
    pub fn first_index(&self, group: &str, kept: usize) -> u64 {
        self.message_count(group).saturating_sub(kept as u64)
    }

    /// `group`'s events that go after the history entry at `after` (None: from the first) and
    /// before the one at `before` (None: to the last), in the order they happened.
    pub fn events_between(
        &self,
        group: &str,
        after: Option<HistoryKey>,
        before: Option<HistoryKey>,
    ) -> Vec<MemberEvent> {
        let Some(log) = self.by_group.get(group) else { return Vec::new() };
        log.events
            .iter()
            .filter(|e| after.is_none_or(|k| !e.precedes(k)) && before.is_none_or(|k| e.precedes(k)))
            .cloned()
            .collect()
    }

    /// Forgets a conversation that never came to be.
    pub fn forget(&mut self, group: &str) {
        self.by_group.remove(group);
    }

    /// The last `n` items of `group`'s history (its messages `history`, in the order they were
    /// added) with its membership events in their places, in history order (see the module
    /// header).
    pub fn merged(&self, group: &str, history: &VecDeque<Entry>, n: usize) -> Vec<Item> {
        let Some(log) = self.by_group.get(group) else {
            return history.iter().rev().take(n).rev().cloned().map(Item::Message).collect();
        };
        // The messages still in history are the last `history.len()` of all ever added.
        let first = log.messages.saturating_sub(history.len() as u64);
        let mut items = Vec::with_capacity(history.len() + log.events.len());
        let mut entries: Vec<(HistoryKey, &Entry)> = history
            .iter()
            .enumerate()
            .map(|(i, e)| (HistoryKey { at_ms: e.received_at_ms, index: first.saturating_add(i as u64) }, e))
            .collect();
        entries.sort_by_key(|(k, _)| *k);
        let mut events: Vec<&MemberEvent> = log.events.iter().collect();
        events.sort_by_key(|e| (e.at_ms, e.after));
        let mut events = events.into_iter().peekable();
        for (key, entry) in entries {
            while let Some(e) = events.next_if(|e| e.precedes(key)) {
                items.push(Item::Event(e.clone()));
            }
            items.push(Item::Message(entry.clone()));
        }
        items.extend(events.cloned().map(Item::Event));
        let skip = items.len().saturating_sub(n);
        items.split_off(skip)
    }
}

impl Messenger {
    /// Keeps the membership changes of `e` in its conversation's log.
    pub(crate) fn record_membership(&mut self, e: &Event) {
        let Some((group_id, changes)) = changes_of(e) else { return };
        let group = hex::encode(group_id);
        let at_ms = self.clock.now_ms();
        let limit = self.home.state.history_limit;
        for c in changes {
            self.home.state.timelines.record(&group, c.kind, c.by, c.members, at_ms, limit);
        }
    }

    /// Records `e` in its conversation's log and [announces](Self::announce) it.
    pub(crate) fn membership_event(&mut self, e: Event, events: &mut Vec<Event>) {
        self.record_membership(&e);
        self.announce(e, events);
    }

    /// Puts the membership changes of `e` in the inbox, where every reader of the home shows
    /// them (see [`crate::client::inbox`]), and hands `e` on to the caller.
    pub(crate) fn announce(&mut self, e: Event, events: &mut Vec<Event>) {
        if let Some((group_id, changes)) = changes_of(&e) {
            let at_ms = self.clock.now_ms();
            let n = changes.len() as u64;
            inbox::push_changes(&mut self.home.state, group_id, changes, at_ms);
            if let Some(announced) = &mut self.announced {
                announced.extend(inbox::newest_events(&self.home.state, n));
            }
        }
        events.push(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str) -> Entry {
        Entry {
            group_id: vec![1; 16],
            from: [2; 32],
            text: text.to_string(),
            sent_at_ms: 0,
            received_at_ms: 0,
            outgoing: false,
        }
    }

    fn texts(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Item::Message(e) => e.text.clone(),
                Item::Event(e) => e.kind.as_str().to_string(),
            })
            .collect()
    }

    #[test]
    fn events_sit_between_the_messages_they_came_between() {
        let mut t = Timelines::default();
        let mut history = VecDeque::new();
        t.record("g", MemberEventKind::Joined, [1; 32], vec![], 0, 10);
        for text in ["one", "two"] {
            history.push_back(entry(text));
            t.note_message("g");
        }
        t.record("g", MemberEventKind::Left, [1; 32], vec![[3; 32]], 0, 10);
        history.push_back(entry("three"));
        t.note_message("g");
        t.record("g", MemberEventKind::Added, [1; 32], vec![[3; 32]], 0, 10);
        assert_eq!(texts(&t.merged("g", &history, 100)), ["joined", "one", "two", "left", "three", "added"]);
        assert_eq!(texts(&t.merged("g", &history, 3)), ["left", "three", "added"]);
        // The oldest message left history: the rest keep their places.
        history.pop_front();
        assert_eq!(texts(&t.merged("g", &history, 100)), ["joined", "two", "left", "three", "added"]);
    }

    #[test]
    fn positions_count_every_message_ever_added_and_events_find_their_message() {
        let mut t = Timelines::default();
        t.record("g", MemberEventKind::Joined, [1; 32], vec![], 0, 10);
        for _ in 0..5 {
            t.note_message("g");
        }
        t.record("g", MemberEventKind::Left, [1; 32], vec![[3; 32]], 0, 10);
        t.note_message("g");
        t.record("g", MemberEventKind::Added, [1; 32], vec![[3; 32]], 0, 10);
        assert_eq!(t.message_count("g"), 6);
        // Three messages kept: they are numbers 3, 4, 5 of all six.
        assert_eq!(t.first_index("g", 3), 3);
        let kinds = |v: Vec<MemberEvent>| v.into_iter().map(|e| e.kind.as_str()).collect::<Vec<_>>();
        // All in one millisecond: the count places them.
        let message = |index| Some(HistoryKey { at_ms: 0, index });
        assert_eq!(kinds(t.events_between("g", None, message(0))), ["joined"], "before message 0");
        assert_eq!(kinds(t.events_between("g", message(4), message(5))), ["left"], "before message 5");
        assert_eq!(kinds(t.events_between("g", message(5), None)), ["added"], "after the newest");
        assert!(t.events_between("g", message(0), message(4)).is_empty());
        assert!(t.events_between("other", None, None).is_empty());
        assert_eq!(t.first_index("other", 2), 0, "a home from before the counter");
    }

    /// A message we wrote was once put in history at the time it was typed, and counted when it
    /// was encrypted, after the message its `send` fetched first (homes written before keep such
    /// entries): the count alone put the
    /// join before both (first message by time, and message 0 by count), so it showed twice.
    #[test]
    fn a_message_written_before_reading_the_one_ahead_of_it_leaves_each_event_once() {
        let mut t = Timelines::default();
        let at = |text: &str, ms| Entry { received_at_ms: ms, ..entry(text) };
        t.record("g", MemberEventKind::Joined, [1; 32], vec![], 10, 10);
        // Typed at 20; its send fetched b1 at 30 (message 0), then encrypted it (message 1).
        let history: VecDeque<Entry> = [at("b1", 30), at("c1", 20)].into();
        t.note_message("g");
        t.note_message("g");
        t.record("g", MemberEventKind::Added, [1; 32], vec![[3; 32]], 40, 10);
        assert_eq!(texts(&t.merged("g", &history, 100)), ["joined", "c1", "b1", "added"]);
        // Between neighbours in history order, each event is found once.
        let (c1, b1) = (HistoryKey { at_ms: 20, index: 1 }, HistoryKey { at_ms: 30, index: 0 });
        let kinds = |v: Vec<MemberEvent>| v.into_iter().map(|e| e.kind.as_str()).collect::<Vec<_>>();
        assert_eq!(kinds(t.events_between("g", None, Some(c1))), ["joined"]);
        assert!(t.events_between("g", Some(c1), Some(b1)).is_empty(), "not again before message 0");
        assert_eq!(kinds(t.events_between("g", Some(b1), None)), ["added"], "after the newest by time");
        // In one millisecond, a change counted before a message goes before it.
        let joined = &t.events_between("g", None, None)[0];
        assert!(joined.precedes(HistoryKey { at_ms: 10, index: 0 }));
        assert!(!joined.precedes(HistoryKey { at_ms: 9, index: 5 }));
    }

    #[test]
    fn events_are_bounded_like_history() {
        let mut t = Timelines::default();
        for _ in 0..10 {
            t.record("g", MemberEventKind::Added, [1; 32], vec![[3; 32]], 0, 4);
        }
        assert_eq!(t.merged("g", &VecDeque::new(), 100).len(), 4);
        let many = vec![[3; 32]; MAX_HISTORY_BYTES_PER_CONVERSATION / 32];
        t.record("g", MemberEventKind::Added, [1; 32], many, 0, 4);
        assert!(t.merged("g", &VecDeque::new(), 100).is_empty(), "one event over the byte bound goes too");
    }
}
