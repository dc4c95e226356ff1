//! The inbox: the received messages of a home as a log that every reader follows on its own.
//!
//! Several processes may read one home at once (two `recv --follow`, a shell and a `recv`).
//! Whichever of them fetches a message from the server appends it to the inbox, and the
//! entry gets the next home-wide sequence number ([`State::inbox_end_seq`]). Readers never take
//! entries out: each keeps a [`Cursor`] (the last sequence number it showed) and shows what
//! follows it, so every reader sees every message, in the order they were processed. The
//! persisted [`State::read_seq`] says how far some reader got: a new reader (one-shot `recv`,
//! a follower or shell that starts) begins there, so `recv` prints only what no reader showed.
//!
//! Bounds: unread entries are capped by [`MAX_INBOX_ENTRIES`] and [`MAX_INBOX_BYTES`] (the
//! oldest leave first; they stay in their conversation's history), and of the read ones only
//! the newest [`MAX_INBOX_READ_KEPT`] stay, for a reader a moment behind another. A reader
//! further behind than what is kept is told how many entries it missed and goes on with the
//! oldest one kept; it never waits for them.

use crate::client::messenger::{ClientError, Messenger, keep_newest};
use crate::client::state::{Entry, State};
use crate::limits::{MAX_INBOX_BYTES, MAX_INBOX_ENTRIES, MAX_INBOX_READ_KEPT};

/// A reader's place in the inbox: the sequence number of the last entry it showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(u64);

/// What a reader has not shown yet.
#[derive(Debug, Default)]
pub struct Unread {
    /// Entries that left the inbox before this reader showed them (it fell behind the caps).
    pub missed: u64,
    pub entries: Vec<Entry>,
    /// The home's read mark before and after this read (see [`Messenger::unread_again`]).
    marked: (u64, u64),
}

/// Sequence number of the inbox's first entry (`inbox_end_seq + 1` when it is empty).
fn first_seq(s: &State) -> u64 {
    (s.inbox_end_seq + 1).saturating_sub(s.inbox.len() as u64)
}

/// Appends a processed message to the inbox, numbering it.
pub(crate) fn push(s: &mut State, entry: Entry) {
    s.inbox.push_back(entry);
    s.inbox_end_seq += 1;
}

/// Takes back the entries pushed after the inbox had `len` entries: no reader saw them (the
/// caller holds the home lock and has not saved since), so their numbers are given back too.
pub(crate) fn unpush_since(s: &mut State, len: usize) {
    let extra = s.inbox.len().saturating_sub(len);
    s.inbox.truncate(len);
    s.inbox_end_seq = s.inbox_end_seq.saturating_sub(extra as u64);
    s.read_seq = s.read_seq.min(s.inbox_end_seq);
}

/// Keeps the inbox within its bounds: unread entries within the caps, read ones only a few.
pub(crate) fn trim(s: &mut State) {
    keep_newest(&mut s.inbox, MAX_INBOX_ENTRIES, MAX_INBOX_BYTES);
    let read = s.read_seq.saturating_sub(first_seq(s).saturating_sub(1));
    let drop = usize::try_from(read).unwrap_or(usize::MAX).saturating_sub(MAX_INBOX_READ_KEPT);
    s.inbox.drain(..drop.min(s.inbox.len()));
}

impl Messenger {
    /// Where a reader that starts now begins: after what some reader already showed.
    pub fn read_cursor(&mut self) -> Result<Cursor, ClientError> {
        let _op = self.begin()?;
        Ok(Cursor(self.home.state.read_seq.min(self.home.state.inbox_end_seq)))
    }

    /// The entries after `cursor`, oldest first; moves `cursor` past them and records them as
    /// read for the whole home (durably, before they are returned: a crash before they are
    /// printed loses the printout, never shows them twice).
    pub fn read_inbox(&mut self, cursor: &mut Cursor) -> Result<Unread, ClientError> {
        let _op = self.begin()?;
        let s = &mut self.home.state;
        let mut unread = unread_after(s, cursor.0);
        *cursor = Cursor(s.inbox_end_seq);
        unread.marked = (s.read_seq, s.read_seq.max(s.inbox_end_seq));
        if s.inbox_end_seq > s.read_seq {
            s.read_seq = s.inbox_end_seq;
            trim(s);
            self.home.save()?;
        }
        Ok(unread)
    }

    /// Marks what `unread` marked read as unread again, when showing it failed (the reader of a
    /// pipe went away, the disk is full): the next reader shows it. What a crash between the
    /// mark and the write loses stays lost; a failed write is told and undone. A no-op when
    /// another reader has shown more since. Entries beyond what the inbox keeps of read ones
    /// ([`MAX_INBOX_READ_KEPT`]) left it already: the next reader is told it missed them.
    ///
    /// `shown` entries of `unread` (its first ones) were shown whole: they stay read. Marking
    /// the whole read unread again made `recv --json | head -n1` print the same first message
    /// for ever when more than a pipe's buffer waited.
    pub fn unread_again(&mut self, unread: &Unread, shown: usize) -> Result<(), ClientError> {
        let _op = self.begin()?;
        let s = &mut self.home.state;
        let (before, after) = unread.marked;
        // The read's entries are the inbox's last ones, ending at `after`.
        let not_shown = unread.entries.len().saturating_sub(shown) as u64;
        let back_to = before.max(after.saturating_sub(not_shown));
        if s.read_seq == after && back_to < after {
            s.read_seq = back_to;
            self.home.save()?;
        }
        Ok(())
    }
}

/// The entries after sequence number `from`, and how many of those left the inbox already.
fn unread_after(s: &State, from: u64) -> Unread {
    // A state older than the cursor (say, restored from a backup) starts the count over.
    let from = from.min(s.inbox_end_seq);
    let first = first_seq(s);
    let missed = first.saturating_sub(from + 1);
    let skip = usize::try_from(from.saturating_sub(first.saturating_sub(1))).unwrap_or(usize::MAX);
    Unread { missed, entries: s.inbox.iter().skip(skip).cloned().collect(), marked: (0, 0) }
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

    fn state() -> State {
        State::new(Secrets::new([1; 32], [2; 32]), None, None)
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
        unpush_since(&mut s, len);
        assert_eq!(s.inbox_end_seq, MAX_INBOX_READ_KEPT as u64 + 10);
    }

    #[test]
    fn a_reader_behind_what_the_inbox_keeps_is_told_how_many_it_missed() {
        let mut s = state();
        for n in 1..=10 {
            push(&mut s, entry(n));
        }
        s.inbox.drain(..4); // entries 1-4 left (the caps)
        let texts = |u: &Unread| u.entries.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
        let behind = unread_after(&s, 1);
        assert_eq!(
            (behind.missed, texts(&behind)),
            (3, ["5", "6", "7", "8", "9", "10"].map(String::from).to_vec())
        );
        let current = unread_after(&s, 8);
        assert_eq!((current.missed, texts(&current)), (0, vec!["9".to_string(), "10".to_string()]));
        assert!(unread_after(&s, 10).entries.is_empty());
        // A cursor past the end (the state went back): nothing new, nothing missed.
        let ahead = unread_after(&s, 99);
        assert_eq!((ahead.missed, ahead.entries.len()), (0, 0));
    }
}
