//! Message history as pages: `qpq history` and the shell's `/history` (issue 12).
//!
//! History is kept without a count cap; a user may set a retention (entries received before
//! `now - retention` are deleted). Reading it is paging backwards: a [`HistoryQuery`] names a
//! conversation (or all), where to start (`before` a [`Position`] or a time), how many entries
//! and an optional word to look for, and [`page`] answers with a [`HistoryPage`]: the entries
//! oldest first and the cursor of the next older page.
//!
//! # Positions
//! Every entry has a [`Position`]: its receive time, its conversation's group id and its index
//! among all messages that conversation ever received. Positions order the history strictly
//! (time first, then group id, then index), so "older than the cursor" never skips nor repeats
//! an entry, whatever arrives or expires between two pages. The index comes from the
//! conversation's message counter (see [`crate::client::timeline`]), so it is stable while new
//! entries arrive and old ones go.
//!
//! # Reading a page
//! [`page`] is pure logic over an iterator of entries, newest first. [`Messenger::history_page`]
//! feeds it from the client database, whose `history` table orders each conversation's entries
//! by receive time then index ([`crate::client::db::HistoryKey`]), which is [`Position`] order
//! within one conversation: per conversation it reads one range below the cursor, at most one
//! entry past the page (more only while a `--grep` skips entries), and merges the
//! conversations. A page costs O(n) records for one conversation and O(n × conversations) for
//! all of them, whatever the history's length.
//!
//! # Membership events
//! [`Messenger::page_items`] puts each conversation's membership changes among a page's
//! messages, in the order of positions (see [`crate::client::timeline`]): per conversation the
//! page knows the entry just older than its own and whether it holds the newest ([`Edges`]),
//! so a change shows once over all pages.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use crate::client::db::{HistoryKey, records};
use crate::client::messenger::{ClientError, Messenger};
use crate::client::state::{Entry, StateError};
use crate::client::timeline::Item;

/// Where an entry sits in the history (ordered oldest to newest).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Our clock when we received (or sent) it, ms since the Unix epoch.
    pub at_ms: u64,
    /// The conversation's MLS group id.
    pub group_id: Vec<u8>,
    /// Its index among all messages the conversation ever had (0 = the first).
    pub index: u64,
}

impl Position {
    /// Its place within its conversation (the order of the `history` table).
    pub fn key(&self) -> HistoryKey {
        HistoryKey { at_ms: self.at_ms, index: self.index }
    }

    /// Parses a cursor as [`Position`]'s `Display` writes it: `AT_MS.GROUPHEX.INDEX`.
    pub fn parse_cursor(s: &str) -> Option<Position> {
        let mut parts = s.split('.');
        let at_ms = parts.next()?.parse().ok()?;
        let group = parts.next()?;
        let index = parts.next()?.parse().ok()?;
        if parts.next().is_some() || group.is_empty() {
            return None;
        }
        let group_id = hex::decode(group).ok()?;
        Some(Position { at_ms, group_id, index })
    }
}

/// The cursor form: `1795960987123.0f3a...9c.17`, what `--before` takes back.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.at_ms, hex::encode(&self.group_id), self.index)
    }
}

/// Where a page ends (exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Before {
    /// The newest page.
    #[default]
    Newest,
    /// Entries older than this position (a cursor from the previous page).
    Position(Position),
    /// Entries received before this time, ms since the Unix epoch.
    Time(u64),
}

/// Why a history request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "cannot read --before {:?}: expected a cursor from the previous page, a time like \"2026-11-30 14:00\", \"today\", \"yesterday\", or an age like \"2h\" or \"3d\"", crate::text::clipped(.0)
    )]
    BadBefore(String),
    #[error(
        "cannot read --retention {:?}: expected an age like \"90d\" or \"12h\", or \"off\" to keep everything", crate::text::clipped(.0)
    )]
    BadRetention(String),
    #[error(
        "a history retention of {:?} is under an hour and would delete messages minutes old: refused (months are written \"6months\", minutes \"6m\")", crate::text::clipped(.0)
    )]
    ShortRetention(String),
}

impl Before {
    /// Reads what a person passes to `--before` (see [`HistoryError::BadBefore`]); `now_ms`
    /// anchors "today" and ages.
    pub fn parse(text: &str, now_ms: u64) -> Result<Before, HistoryError> {
        let text = text.trim();
        if let Some(p) = Position::parse_cursor(text) {
            return Ok(Before::Position(p));
        }
        if let Some(ms) = crate::localtime::parse_local(text, now_ms) {
            return Ok(Before::Time(ms));
        }
        match humantime::parse_duration(text) {
            Ok(age) if !age.is_zero() => {
                Ok(Before::Time(now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))))
            }
            _ => Err(HistoryError::BadBefore(text.to_string())),
        }
    }
}

/// Shortest retention taken: `6m` reads as six minutes, and a retention deletes at once.
pub const MIN_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// Reads `--retention`: an age (`90d`) of at least [`MIN_RETENTION`], or `off` for none.
pub fn parse_retention(text: &str) -> Result<Option<std::time::Duration>, HistoryError> {
    match text.trim() {
        "off" | "none" => Ok(None),
        t => match humantime::parse_duration(t) {
            Ok(age) if age < MIN_RETENTION && !age.is_zero() => {
                Err(HistoryError::ShortRetention(t.to_string()))
            }
            Ok(age) if !age.is_zero() => Ok(Some(age)),
            _ => Err(HistoryError::BadRetention(t.to_string())),
        },
    }
}

/// What to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// One conversation by group id, or None for all of them.
    pub conversation: Option<Vec<u8>>,
    pub before: Before,
    /// Entries per page (at least 1).
    pub n: usize,
    /// Only entries whose text contains this, ignoring case.
    pub grep: Option<String>,
}

impl HistoryQuery {
    /// The newest `n` entries of `conversation` (or of all).
    pub fn newest(conversation: Option<Vec<u8>>, n: usize) -> HistoryQuery {
        HistoryQuery { conversation, before: Before::Newest, n, grep: None }
    }
}

/// One entry with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub position: Position,
    pub entry: Entry,
}

/// One page of history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryPage {
    /// Oldest first.
    pub entries: Vec<HistoryEntry>,
    /// The cursor of the next older page (the position of the oldest entry here), or None when
    /// no older entry matches.
    pub older: Option<Position>,
    /// Where the entries of each conversation on the page sit among all of its kept ones, by
    /// group id (filled by [`Messenger::history_page`]; see [`Messenger::page_items`]).
    pub edges: BTreeMap<Vec<u8>, Edges>,
}

/// A conversation's kept entries on either side of those a page holds: what places the
/// membership events that come before its first entry there and after its last.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Edges {
    /// Its newest entry older than those on the page (None: the page holds its oldest kept).
    pub previous: Option<Position>,
    /// Its newest entry, when the page holds it.
    pub newest: Option<Position>,
}

/// Case-insensitive substring matching (Unicode lowercase on both sides).
struct Needle(Option<String>);

impl Needle {
    fn new(word: Option<&str>) -> Needle {
        Needle(word.filter(|w| !w.is_empty()).map(str::to_lowercase))
    }

    fn matches(&self, text: &str) -> bool {
        match &self.0 {
            None => true,
            Some(w) => text.to_lowercase().contains(w.as_str()),
        }
    }
}

/// Answers `query` from `newest_first`: every entry of the history in descending [`Position`]
/// order (a conversation filter is applied here too, so a source may pass more). Reads at most
/// one entry past the page, besides those skipped.
pub fn page<'a, I>(newest_first: I, query: &HistoryQuery) -> HistoryPage
where
    I: IntoIterator<Item = (Position, &'a Entry)>,
{
    let needle = Needle::new(query.grep.as_deref());
    let n = query.n.max(1);
    let mut picked: Vec<HistoryEntry> = Vec::with_capacity(n.min(1024));
    let mut more = false;
    for (position, entry) in newest_first {
        if query.conversation.as_ref().is_some_and(|c| *c != position.group_id) {
            continue;
        }
        let older = match &query.before {
            Before::Newest => true,
            Before::Position(p) => position < *p,
            Before::Time(t) => position.at_ms < *t,
        };
        if !older || !needle.matches(&entry.text) {
            continue;
        }
        if picked.len() == n {
            more = true;
            break;
        }
        picked.push(HistoryEntry { position, entry: entry.clone() });
    }
    picked.reverse();
    let older = if more { picked.first().map(|e| e.position.clone()) } else { None };
    HistoryPage { entries: picked, older, edges: BTreeMap::new() }
}

/// Records read per range scan while a search skips entries.
const GREP_CHUNK: usize = 256;

/// The highest key of `conversation` that sorts before `before` (None: nothing does).
fn upper_key(conversation: &[u8], before: &Before) -> Option<HistoryKey> {
    match before {
        Before::Newest => Some(HistoryKey::MAX),
        Before::Time(t) => HistoryKey { at_ms: *t, index: 0 }.below(),
        Before::Position(p) => match conversation.cmp(p.group_id.as_slice()) {
            // Same time, smaller group id: older, whatever the index.
            Ordering::Less => Some(HistoryKey { at_ms: p.at_ms, index: u64::MAX }),
            Ordering::Equal => HistoryKey { at_ms: p.at_ms, index: p.index }.below(),
            Ordering::Greater => HistoryKey { at_ms: p.at_ms, index: 0 }.below(),
        },
    }
}

impl Messenger {
    /// The history retention (None: keep everything).
    pub fn history_retention(&self) -> Option<std::time::Duration> {
        let ms = self.home.state.history_retention_ms;
        (ms != 0).then(|| std::time::Duration::from_millis(ms))
    }

    /// Sets the retention (None: keep everything), deletes what it excludes, and saves;
    /// returns how many entries were deleted.
    pub fn set_history_retention(&mut self, keep: Option<std::time::Duration>) -> Result<usize, ClientError> {
        let _op = self.begin()?;
        let ms = keep.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        self.home.state.history_retention_ms = ms;
        self.expire_history();
        self.home.save()?;
        Ok(self.home.last_history.expired)
    }

    /// Entries received before this time are past the retention (0 when there is none).
    fn retention_cutoff_ms(&self) -> u64 {
        match self.home.state.history_retention_ms {
            0 => 0,
            keep => self.now_ms().saturating_sub(keep),
        }
    }

    /// Makes the next save delete the entries past the retention (one range per
    /// conversation; oldest first, so the positions of the rest stay as they were).
    pub(crate) fn expire_history(&mut self) {
        self.home.expire_before_ms = self.retention_cutoff_ms();
    }

    /// Bench only: appends `entries` to their conversations' history as if received, and
    /// saves (the bench fills a large home this way instead of sending 100k messages).
    #[doc(hidden)]
    pub fn inject_history_for_bench(&mut self, entries: Vec<Entry>) -> Result<(), ClientError> {
        let _op = self.begin()?;
        for e in entries {
            self.push_history(e);
        }
        self.home.save()?;
        Ok(())
    }

    /// Our receive time of the newest message in `group_id`'s history, saved or waiting for
    /// the next save; None when it has none. Needs the home's lock (an operation's).
    pub(crate) fn newest_history_ms(&self, group_id: &[u8]) -> Result<Option<u64>, ClientError> {
        Ok(self.newest_history_key(group_id)?.map(|k| k.at_ms))
    }

    /// The key of the newest message in `group_id`'s history, saved or waiting for the next
    /// save; None when it has none. Needs the home's lock (an operation's).
    fn newest_history_key(&self, group_id: &[u8]) -> Result<Option<HistoryKey>, ClientError> {
        let state = &self.home.state;
        let key = hex::encode(group_id);
        let pending = state.groups.get(&key).and_then(|g| {
            let base = state.timelines.first_index(&key, g.history.len());
            let keys = g.history.iter().enumerate();
            keys.map(|(i, e)| HistoryKey { at_ms: e.received_at_ms, index: base + i as u64 }).max()
        });
        let stored = self.home.db()?.history_newest(group_id).map_err(StateError::from)?;
        Ok(pending.max(stored))
    }

    /// One page of history (see the module header). Entries past the retention are left out
    /// even before the next save deletes them. Takes the home's lock to read the database.
    pub fn history_page(&mut self, query: &HistoryQuery) -> Result<HistoryPage, ClientError> {
        let _op = self.begin()?;
        let db = self.home.db()?;
        let cutoff = self.retention_cutoff_ms();
        let needle = Needle::new(query.grep.as_deref());
        let want = query.n.max(1).saturating_add(1);
        let chunk = if needle.0.is_some() { want.max(GREP_CHUNK) } else { want };
        let state = &self.home.state;
        let conversations: Vec<(String, Vec<u8>)> = match &query.conversation {
            Some(id) => vec![(hex::encode(id), id.clone())],
            None => state.groups.keys().filter_map(|k| Some((k.clone(), hex::decode(k).ok()?))).collect(),
        };
        let lowest = HistoryKey { at_ms: cutoff, index: 0 };
        let mut found: Vec<(Position, Entry)> = Vec::new();
        for (key, id) in &conversations {
            let position = |k: HistoryKey| Position { at_ms: k.at_ms, group_id: id.clone(), index: k.index };
            let mut picked = 0;
            // Entries added since the last save (none once an operation saved), newest first.
            if let Some(g) = state.groups.get(key) {
                let first = state.timelines.first_index(key, g.history.len());
                for (i, e) in g.history.iter().enumerate().rev() {
                    let p = position(HistoryKey { at_ms: e.received_at_ms, index: first + i as u64 });
                    if upper_key(id, &query.before)
                        .is_some_and(|hi| p.at_ms >= cutoff && (p.at_ms, p.index) <= (hi.at_ms, hi.index))
                        && needle.matches(&e.text)
                    {
                        found.push((p, e.clone()));
                        picked += 1;
                    }
                }
            }
            let mut hi = upper_key(id, &query.before);
            while picked < want {
                let Some(top) = hi.filter(|h| *h >= lowest) else { break };
                let records = db.history_page(id, lowest..=top, chunk).map_err(StateError::from)?;
                let full = records.len() == chunk;
                for (k, plain) in records {
                    hi = k.below();
                    let e = records::decode_entry(&plain)?;
                    if needle.matches(&e.text) {
                        found.push((position(k), e));
                        picked += 1;
                        if picked >= want {
                            break;
                        }
                    }
                }
                if !full {
                    break;
                }
            }
        }
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        let mut page = page(found.iter().map(|(p, e)| (p.clone(), e)), query);
        // The oldest and newest entry of each conversation on the page.
        let mut spans: BTreeMap<&[u8], (&Position, &Position)> = BTreeMap::new();
        for e in &page.entries {
            let p = &e.position;
            spans.entry(&p.group_id).and_modify(|s| s.1 = p).or_insert((p, p));
        }
        // `found` holds each conversation's newest entries below the cursor, one more than a
        // page: the one just older than the page's, if any is kept, is among them (newest
        // first, so the first such entry met is it). One pass for all conversations.
        let mut previous_of: BTreeMap<&[u8], &Position> = BTreeMap::new();
        for (p, _) in &found {
            if let Some((first, _)) = spans.get(p.group_id.as_slice())
                && p < *first
            {
                previous_of.entry(&p.group_id).or_insert(p);
            }
        }
        let mut edges = BTreeMap::new();
        for (id, (_, last)) in spans {
            let previous = previous_of.get(id).map(|p| (*p).clone());
            let newest = match query.before {
                // Nothing newer was left out.
                Before::Newest => true,
                _ => self.newest_history_key(id)? <= Some(last.key()),
            };
            let edge = Edges { previous, newest: newest.then(|| last.clone()) };
            edges.insert(id.to_vec(), edge);
        }
        page.edges = edges;
        Ok(page)
    }

    /// A page's messages with the membership events of their conversations in their places:
    /// an event goes before the first message of its conversation that comes after it in
    /// history ([`crate::client::timeline::MemberEvent::precedes`]), and the events after a
    /// conversation's newest message follow it when the page holds that message (or when the
    /// page is empty and asked for the newest of one conversation). Each event shows once over
    /// all pages: on the page of the message it goes before, or of the newest message.
    pub fn page_items(&self, query: &HistoryQuery, page: &HistoryPage) -> Vec<(Vec<u8>, Item)> {
        if query.grep.is_some() {
            // A search shows what matched, nothing around it.
            return page
                .entries
                .iter()
                .map(|e| (e.position.group_id.clone(), Item::Message(e.entry.clone())))
                .collect();
        }
        let state = &self.home.state;
        let mut items = Vec::with_capacity(page.entries.len());
        // The entry of each conversation placed last, by group id.
        let mut placed: BTreeMap<&[u8], HistoryKey> = BTreeMap::new();
        for e in &page.entries {
            let id = e.position.group_id.as_slice();
            let key = hex::encode(id);
            let edges = page.edges.get(id);
            let here = e.position.key();
            let previous = match placed.insert(id, here) {
                Some(k) => Some(k),
                None => edges.and_then(|x| x.previous.as_ref()).map(Position::key),
            };
            for ev in state.timelines.events_between(&key, previous, Some(here)) {
                items.push((id.to_vec(), Item::Event(ev)));
            }
            items.push((id.to_vec(), Item::Message(e.entry.clone())));
            if edges.is_some_and(|x| x.newest.as_ref() == Some(&e.position)) {
                for ev in state.timelines.events_between(&key, Some(here), None) {
                    items.push((id.to_vec(), Item::Event(ev)));
                }
            }
        }
        if page.entries.is_empty()
            && query.before == Before::Newest
            && let Some(id) = &query.conversation
        {
            for ev in state.timelines.events_between(&hex::encode(id), None, None) {
                items.push((id.clone(), Item::Event(ev)));
            }
        }
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(group: u8, text: &str, at_ms: u64) -> Entry {
        Entry {
            group_id: vec![group; 16],
            from: [2; 32],
            text: text.to_string(),
            sent_at_ms: at_ms,
            received_at_ms: at_ms,
            outgoing: false,
        }
    }

    /// Two conversations interleaved in time, with equal times across them; newest first.
    fn history() -> Vec<(Position, Entry)> {
        let mut all = Vec::new();
        for (group, count) in [(1u8, 25u64), (2, 18)] {
            for i in 0..count {
                let at = 1000 + (i / 2) * 10 + u64::from(group);
                let e =
                    entry(group, &format!("g{group} m{i} {}", if i % 5 == 0 { "Hello" } else { "bye" }), at);
                all.push((Position { at_ms: at, group_id: vec![group; 16], index: i }, e));
            }
        }
        all.sort_by(|a, b| b.0.cmp(&a.0));
        all
    }

    fn run(all: &[(Position, Entry)], q: &HistoryQuery) -> HistoryPage {
        page(all.iter().map(|(p, e)| (p.clone(), e)), q)
    }

    /// Pages back to the start; returns every entry shown, newest page first.
    fn all_pages(all: &[(Position, Entry)], mut q: HistoryQuery) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        loop {
            let p = run(all, &q);
            assert!(p.entries.len() <= q.n);
            assert!(p.entries.windows(2).all(|w| w[0].position < w[1].position), "oldest first");
            pages.push(p.entries.iter().map(|e| e.entry.text.clone()).collect());
            match p.older {
                Some(c) => q.before = Before::Position(c),
                None => return pages,
            }
        }
    }

    #[test]
    fn paging_back_across_conversations_shows_every_entry_once_in_order() {
        let all = history();
        for n in [1, 3, 7, 43, 44, 100] {
            let pages = all_pages(&all, HistoryQuery::newest(None, n));
            let shown: Vec<String> = pages.into_iter().rev().flatten().collect();
            let want: Vec<String> = all.iter().rev().map(|(_, e)| e.text.clone()).collect();
            assert_eq!(shown, want, "n = {n}");
        }
    }

    #[test]
    fn paging_one_conversation_ignores_the_others() {
        let all = history();
        let pages = all_pages(&all, HistoryQuery::newest(Some(vec![2; 16]), 4));
        assert_eq!(pages.len(), 5, "18 entries in pages of 4");
        let shown: Vec<String> = pages.into_iter().rev().flatten().collect();
        assert_eq!(shown.len(), 18);
        assert!(shown.iter().all(|t| t.starts_with("g2 ")));
        assert_eq!(shown.first().map(String::as_str), Some("g2 m0 Hello"));
    }

    #[test]
    fn new_entries_between_pages_neither_shift_nor_repeat_the_next_page() {
        let mut all = history();
        let first = run(&all, &HistoryQuery::newest(None, 10));
        let cursor = first.older.clone().expect("more pages");
        // A message arrives while the user reads.
        let late = entry(1, "late", 99_999);
        all.insert(0, (Position { at_ms: 99_999, group_id: vec![1; 16], index: 25 }, late));
        let q = HistoryQuery { before: Before::Position(cursor), ..HistoryQuery::newest(None, 10) };
        let second = run(&all, &q);
        let want: Vec<&str> = all.iter().skip(11).take(10).rev().map(|(_, e)| e.text.as_str()).collect();
        assert_eq!(second.entries.iter().map(|e| e.entry.text.as_str()).collect::<Vec<_>>(), want);
        assert!(first.entries.iter().all(|a| second.entries.iter().all(|b| a.position != b.position)));
    }

    #[test]
    fn grep_matches_a_word_in_any_case_and_pages_too() {
        let all = history();
        let q = HistoryQuery { grep: Some("hELLo".into()), ..HistoryQuery::newest(None, 2) };
        let pages = all_pages(&all, q);
        let shown: Vec<String> = pages.into_iter().rev().flatten().collect();
        // m0, m5, m10, m15, m20 of g1 and m0, m5, m10, m15 of g2.
        assert_eq!(shown.len(), 9, "{shown:?}");
        assert!(shown.iter().all(|t| t.contains("Hello")));
        let q = HistoryQuery { grep: Some("nowhere".into()), ..HistoryQuery::newest(None, 5) };
        assert_eq!(run(&all, &q), HistoryPage::default());
    }

    #[test]
    fn grep_folds_unicode_case() {
        let e = [(Position { at_ms: 1, group_id: vec![1], index: 0 }, entry(1, "Grüße aus ÖSTERREICH", 1))];
        let q = HistoryQuery { grep: Some("österreich".into()), ..HistoryQuery::newest(None, 5) };
        assert_eq!(run(&e, &q).entries.len(), 1);
    }

    #[test]
    fn before_a_time_starts_below_it() {
        let all = history();
        let q = HistoryQuery { before: Before::Time(1011), ..HistoryQuery::newest(None, 100) };
        let p = run(&all, &q);
        // Times 1001, 1002 (two of each group) and 1011 is excluded.
        assert_eq!(p.entries.len(), 4, "{p:?}");
        assert!(p.entries.iter().all(|e| e.position.at_ms < 1011));
        assert_eq!(p.older, None);
    }

    #[test]
    fn the_last_page_has_no_cursor() {
        let all = history();
        let p = run(&all, &HistoryQuery::newest(None, 43));
        assert_eq!(p.entries.len(), 43);
        assert_eq!(p.older, None, "exactly everything: nothing older");
        assert!(run(&[], &HistoryQuery::newest(None, 5)).entries.is_empty());
    }

    #[test]
    fn before_reads_cursors_times_and_ages() {
        let now = 10_000_000_000;
        let p = Position { at_ms: 5, group_id: vec![1, 2], index: 3 };
        assert_eq!(Before::parse(&p.to_string(), now), Ok(Before::Position(p)));
        assert_eq!(Before::parse("2h", now), Ok(Before::Time(now - 2 * 3600 * 1000)));
        assert_eq!(Before::parse(" 3d ", now), Ok(Before::Time(now - 3 * 24 * 3600 * 1000)));
        assert_eq!(Before::parse("1970-01-01T00:00:01Z", now), Ok(Before::Time(1000)));
        assert!(matches!(Before::parse("yesterday", now), Ok(Before::Time(t)) if t < now));
        let e = Before::parse("last tuesday", now).unwrap_err().to_string();
        assert!(e.starts_with("cannot read --before \"last tuesday\": expected a cursor"), "{e}");
        assert!(Before::parse("0s", now).is_err(), "an age of nothing is a mistake");
        assert_eq!(parse_retention("off"), Ok(None));
        assert_eq!(parse_retention("90d"), Ok(Some(std::time::Duration::from_secs(90 * 24 * 3600))));
        assert!(parse_retention("0d").is_err());
        assert_eq!(
            parse_retention("forever").unwrap_err().to_string(),
            "cannot read --retention \"forever\": expected an age like \"90d\" or \"12h\", or \"off\" to keep everything"
        );
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let p = Position { at_ms: 1_795_960_987_123, group_id: vec![0xab, 0x01], index: 17 };
        assert_eq!(p.to_string(), "1795960987123.ab01.17");
        assert_eq!(Position::parse_cursor(&p.to_string()), Some(p));
        for junk in ["", "1", "1.ab", "1..2", "1.zz.2", "1.ab.2.3", "-1.ab.2", "1.abc.2", "yesterday"] {
            assert_eq!(Position::parse_cursor(junk), None, "{junk:?}");
        }
    }
}
