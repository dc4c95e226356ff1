//! The outbox: every message is queued durably in the home first ([`State::sends`]) and sent
//! from there, in order, by whatever command connects next (`send`, `recv`, the shell's
//! receive loop, any command that catches up).
//!
//! A message's fate is one of three:
//! - sent: the server answered the enqueue; it leaves the outbox.
//! - refused: the server answered with an error (a full queue, ...), or it cannot be sent at
//!   all (the group is gone): it leaves the outbox with an error for the person.
//! - unknown: no connection, or the request left and the connection dropped before the answer.
//!   It stays queued. `send` says "queued, will send when the server is back" (exit
//!   [`EXIT_QUEUED`]) or "may have been sent; retrying", never "failed".
//!
//! # One ciphertext per message
//! Encrypting advances the MLS ratchet, so a message is encrypted once and its ciphertext saved
//! in the outbox with the ratchet ([`SealedSend`]) before the first attempt: a crash between
//! encrypting and sending loses nothing. A retry sends the same bytes; a receiver that already
//! has them finds their generation's key used up and drops the copy quietly
//! (see [`crate::mls::MlsError::Replayed`]).
//!
//! When the group's epoch moved on before a retry (a commit came in), the saved ciphertext
//! belongs to an older epoch:
//! - if no request carrying it ever left ([`SealedSend::maybe_sent`] false), the text is
//!   encrypted again for the current epoch (the old ciphertext was never seen by anyone);
//! - if one may have left, the same bytes go again: re-encrypting could show the text twice.
//!   Members keep the secrets of a few past epochs (`MAX_PAST_EPOCHS` in [`crate::mls`]), so
//!   the copy still opens for a member that never got the first one unless that many commits
//!   came in between.
//!
//! # Who says that a queued message went
//! The command that queued a message says what became of it. When another process sends it
//! (a `recv --follow`, the shell, the next one-shot), that process says "sent a queued message
//! to ..." unless the command that queued it still runs and has not said it waits
//! ([`State::reporting_sends`], written with the message: no extra write). A follower that
//! happened to send a message a one-shot `send` had queued a moment before announced it as if
//! it had waited, while the `send` itself then said "sent". A command that exited (`send`
//! with [`EXIT_QUEUED`]) or died, and one that said the message waits (the shell), leave the
//! announcement to whoever sends it; so does one still running after
//! [`ANNOUNCE_UNTOLD_AFTER_MS`] (a process id reused meanwhile cannot silence it for long).
//!
//! A crash after a request left but before `maybe_sent` was saved is the one case where a
//! retry in a later epoch re-encrypts and a receiver may see the text twice.

use std::collections::HashSet;

use crate::client::frame::{AppMessage, Frame};
use crate::client::messenger::{Carried, ClientError, Event, MAX_TEXT_BYTES, Messenger, Target};
use crate::client::session::SessionError;
use crate::client::state::{Entry, GroupKind, MAX_PLACED_SENDS, QueuedSend, QueuedTarget, SealedSend};
use crate::limits::{MAX_QUEUED_SEND_BYTES, MAX_QUEUED_SENDS};
use crate::mls::MlsError;

/// Characters of a refused queued message quoted in its notice.
const NOT_SENT_PREVIEW_CHARS: usize = 40;

/// A queued message whose command still runs is announced by another process that sends it
/// once it waited this long.
pub const ANNOUNCE_UNTOLD_AFTER_MS: u64 = 60_000;

/// Exit status of a `send` whose message waits in the outbox (EX_TEMPFAIL of sysexits.h: try
/// again later, which qpq does by itself).
pub const EXIT_QUEUED: u8 = 75;

/// Which queued messages [`Messenger::queued_entries`] lists.
#[derive(Clone, Copy, Debug)]
pub enum QueuedFor<'a> {
    /// Those to one conversation, by group id.
    Conversation(&'a [u8]),
    /// Those to a person we have no conversation with yet.
    NewContact(&'a [u8; 32]),
    /// Every one.
    All,
}

/// A queued message as a history entry.
#[derive(Clone, Debug)]
pub struct QueuedEntry {
    /// Its `group_id` is empty when it goes to a person we have no conversation with yet.
    pub entry: Entry,
    /// That person, then.
    pub new_contact: Option<[u8; 32]>,
}

/// What became of a queued message in this process.
#[derive(Debug)]
pub enum Fate {
    /// The server has it.
    Sent { group_id: Vec<u8>, recipients: usize },
    /// It left the outbox unsent.
    Refused(ClientError),
    /// Still queued; `maybe_sent` when a request carrying it may have reached the server.
    Kept { maybe_sent: bool, reason: String },
    /// Still queued in a home this process can no longer open: `qpq passphrase --new-key`
    /// re-sealed it meanwhile. The next command that opens the home sends it.
    LeftForNext { maybe_sent: bool },
}

/// The one message a command waits for, and what became of it.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    awaited: Option<u64>,
    fate: Option<Fate>,
    /// Messages whose sending needs no notice (the shell queued them while connected; once an
    /// attempt failed, each is announced when it finally goes).
    quiet: HashSet<u64>,
}

/// True while process `pid` runs (Linux's `/proc`; elsewhere never, so every queued message is
/// announced, as before [`State::reporting_sends`]).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses (proc(5)): a zombie (Z) or a dead
        // (X) process ran; it will say nothing more.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// True for errors that say nothing about the message, only about the server or the way to
/// it: out of reach, stopped answering, or answered about itself (shutting down, its database
/// unavailable, busy, over a rate or its storage quota for now:
/// [`SessionError::is_answer_about_the_server`]). The message stays queued and goes once the
/// server takes it again; dropping it there lost what the user wrote to a server restart.
/// Everything else refuses it, with a notice: an answer about the message, a server failing
/// (internal) or answering out of protocol, which may never stop and would otherwise hold
/// every message behind this one for ever, and a changed certificate or an outdated protocol
/// (the user must act first).
pub fn is_offline(e: &ClientError) -> bool {
    match e {
        ClientError::Session(
            SessionError::Connect { .. }
            | SessionError::Resolve(_)
            | SessionError::NoPort(_)
            | SessionError::Disconnected(_)
            | SessionError::Timeout(_),
        ) => true,
        ClientError::Session(se) => se.is_answer_about_the_server(),
        _ => false,
    }
}

impl Messenger {
    /// Checks what can be checked without the server and queues `text` for `target` durably;
    /// returns the message's id in the outbox.
    pub fn queue_send(&mut self, target: &Target, text: &str) -> Result<u64, ClientError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(ClientError::TooLarge(text.len()));
        }
        if text.trim().is_empty() {
            // The one-shot refuses it before it comes here; the shell's `send bob ''` did not.
            // Blank counts as empty: spaces or newlines alone say nothing, and were sent.
            return Err(ClientError::EmptyMessage);
        }
        let _op = self.begin()?;
        let to = match target {
            Target::Group(name) => QueuedTarget::Conversation(self.find_group(name)?),
            Target::Person(peer) => match self.find_direct(peer) {
                Some(id) => QueuedTarget::Conversation(id),
                None => QueuedTarget::Person(*peer),
            },
        };
        if let QueuedTarget::Conversation(id) = &to {
            self.recipients_of(id)?;
        }
        let queued = &self.home.state.sends;
        let bytes: usize = queued.iter().map(|s| s.text.len()).sum::<usize>() + text.len();
        if queued.len() >= MAX_QUEUED_SENDS || bytes > MAX_QUEUED_SEND_BYTES {
            return Err(ClientError::OutboxFull(queued.len()));
        }
        let id = rand::random();
        let item =
            QueuedSend { id, to, text: text.to_string(), sent_at_ms: self.clock.now_ms(), sealed: None };
        self.home.state.sends.push_back(item);
        self.home.state.reporting_sends.push((id, std::process::id()));
        self.home.save()?;
        Ok(id)
    }

    /// Sending message `id` (queued by this process) needs no notice unless an attempt fails.
    pub fn send_quietly(&mut self, id: u64) {
        self.watch.quiet.insert(id);
    }

    /// From now on every queued message is announced when it goes (an attempt failed: the
    /// person was told they wait).
    pub fn announce_queued_sends(&mut self) {
        self.watch.quiet.clear();
        let ids: Vec<u64> = self.home.state.sends.iter().map(|s| s.id).collect();
        self.mark_told(&ids);
    }

    /// Notes that the person was told messages `ids` wait, so whichever process sends them
    /// says so. Best effort: unrecorded, a message is announced once it is old enough.
    pub fn mark_told(&mut self, ids: &[u64]) {
        if !self.home.state.reporting_sends.iter().any(|(id, _)| ids.contains(id)) {
            return;
        }
        let Ok(_op) = self.begin() else { return };
        self.forget_reporters(ids);
    }

    /// [`Messenger::mark_told`] under the caller's operation.
    fn forget_reporters(&mut self, ids: &[u64]) {
        // (Entries of messages another process sent are dropped when the state is read.)
        let reporting_sends = &mut self.home.state.reporting_sends;
        let before = reporting_sends.len();
        reporting_sends.retain(|(id, _)| !ids.contains(id));
        if reporting_sends.len() != before {
            let _ = self.home.save();
        }
    }

    /// True when a process that did not queue `item` in this run should say that it went (see
    /// the module header).
    fn announce_when_sent(&self, item: &QueuedSend) -> bool {
        let reporter = self.home.state.reporting_sends.iter().find(|(id, _)| *id == item.id);
        let young = self.clock.now_ms().saturating_sub(item.sent_at_ms) < ANNOUNCE_UNTOLD_AFTER_MS;
        // This process's own messages: its `quiet` set decides.
        let other = reporter.is_some_and(|(_, pid)| *pid != std::process::id() && process_runs(*pid));
        !(other && young)
    }

    /// The messages that wait in the outbox and are not in a history yet (a message enters
    /// its conversation's history when it is encrypted), as history entries, oldest first.
    pub fn queued_entries(&self, which: QueuedFor<'_>) -> Vec<QueuedEntry> {
        let me = self.identity.public().0;
        self.home
            .state
            .sends
            .iter()
            .filter(|s| s.sealed.is_none())
            .filter_map(|s| {
                // Where it goes now: a person's direct conversation may have begun since.
                let (group_id, new_contact) = match &s.to {
                    QueuedTarget::Conversation(id) => (id.clone(), None),
                    QueuedTarget::Person(peer) => match self.find_direct(peer) {
                        Some(id) => (id, None),
                        None => (Vec::new(), Some(*peer)),
                    },
                };
                let wanted = match which {
                    QueuedFor::All => true,
                    QueuedFor::Conversation(id) => new_contact.is_none() && group_id == id,
                    QueuedFor::NewContact(peer) => new_contact.as_ref() == Some(peer),
                };
                let entry = Entry {
                    group_id,
                    from: me,
                    text: s.text.clone(),
                    sent_at_ms: s.sent_at_ms,
                    received_at_ms: s.sent_at_ms,
                    outgoing: true,
                };
                wanted.then_some(QueuedEntry { entry, new_contact })
            })
            .collect()
    }

    /// The person `target` names when we have no conversation with them yet (messages to them
    /// wait for one to begin); None for a group, an unknown name or a person we talk to.
    pub fn new_contact(&self, target: &str) -> Option<[u8; 32]> {
        match self.resolve_target(target) {
            Ok(Target::Person(peer)) if self.find_direct(&peer).is_none() => Some(peer),
            _ => None,
        }
    }

    /// How many messages wait in the outbox.
    pub fn queued_sends(&self) -> usize {
        self.home.state.sends.len()
    }

    /// True while messages wait in the outbox.
    pub fn has_queued_sends(&self) -> bool {
        !self.home.state.sends.is_empty()
    }

    /// Takes a queued message out again (it never left: nothing was encrypted for it).
    pub(crate) fn unqueue(&mut self, id: u64) -> Result<(), ClientError> {
        let _op = self.begin()?;
        let before = self.home.state.sends.len();
        self.home.state.sends.retain(|s| s.id != id || s.sealed.is_some());
        if self.home.state.sends.len() != before {
            self.home.state.reporting_sends.retain(|(t, _)| *t != id);
            self.home.save()?;
        }
        Ok(())
    }

    /// Sends the outbox in order, under the home lock and connected. Stops at the first
    /// message that cannot go because of the server (the rest waits behind it, to keep the
    /// order). A message whose conversation must commit a member's leave first waits with the
    /// later messages of that conversation, and the other conversations' messages go on: one
    /// group in trouble held every message to everyone. Messages the server refuses leave the
    /// outbox with a notice (or as the awaited message's fate).
    pub(crate) async fn flush_sends(&mut self, events: &mut Vec<Event>) -> Result<(), ClientError> {
        // Said once per conversation, with a count: after an outage, forty lines of "sent a
        // queued message to #team" told no more than one (exploratory testing).
        let mut announced: Vec<(Vec<u8>, usize)> = Vec::new();
        let r = self.flush_each(events, &mut announced).await;
        for (group_id, n) in announced {
            let to = self.conversation_name(&group_id);
            self.notices.push(match n {
                1 => format!("sent a queued message to {to}"),
                n => format!("sent {n} queued messages to {to}"),
            });
        }
        r
    }

    /// [`Messenger::flush_sends`]'s work: counts in `announced` what goes that it says.
    async fn flush_each(
        &mut self,
        events: &mut Vec<Event>,
        announced: &mut Vec<(Vec<u8>, usize)>,
    ) -> Result<(), ClientError> {
        let ids: Vec<u64> = self.home.state.sends.iter().map(|s| s.id).collect();
        // Conversations (a group id, or a person's key before their conversation begins) whose
        // first queued message waits this round.
        let mut held: Vec<Vec<u8>> = Vec::new();
        for id in ids {
            let Some(item) = self.home.state.sends.iter().find(|s| s.id == id).cloned() else { continue };
            let conversation = match &item.to {
                QueuedTarget::Conversation(gid) => gid.clone(),
                QueuedTarget::Person(peer) => self.find_direct(peer).unwrap_or_else(|| peer.to_vec()),
            };
            let awaited = self.watch.awaited == Some(item.id);
            if held.contains(&conversation) {
                // It waits behind its conversation's first: announced when it goes.
                self.watch.quiet.remove(&item.id);
                if awaited {
                    let reason = "a member's leave must be committed first".to_string();
                    self.watch.fate = Some(Fate::Kept { maybe_sent: false, reason });
                }
                continue;
            }
            match self.send_queued(item.clone(), events).await {
                Ok((group_id, recipients)) => {
                    let announce = self.announce_when_sent(&item);
                    self.drop_queued(item.id)?;
                    if awaited {
                        self.watch.fate = Some(Fate::Sent { group_id, recipients });
                    } else if !self.watch.quiet.remove(&item.id) && announce {
                        match announced.iter_mut().find(|(g, _)| *g == group_id) {
                            Some((_, n)) => *n += 1,
                            None => announced.push((group_id, 1)),
                        }
                    }
                }
                Err(e) if is_offline(&e) => {
                    let maybe_sent = self
                        .home
                        .state
                        .sends
                        .iter()
                        .find(|s| s.id == item.id)
                        .and_then(|s| s.sealed.as_ref())
                        .is_some_and(|s| s.maybe_sent);
                    if awaited {
                        self.watch.fate = Some(Fate::Kept { maybe_sent, reason: e.to_string() });
                    }
                    self.watch.quiet.clear();
                    return Err(e);
                }
                // A member's leave waits to be committed (see `finish_round`, which tries again
                // next round): openmls sends nothing until then, and the message is no less
                // sendable for it, so it waits here, with the later ones to its conversation.
                Err(ClientError::Mls(MlsError::PendingProposals)) => {
                    // A person's conversation may have begun during this very send.
                    let conversation = match &item.to {
                        QueuedTarget::Person(peer) => match self.find_direct(peer) {
                            Some(gid) => {
                                held.push(peer.to_vec());
                                gid
                            }
                            None => conversation,
                        },
                        QueuedTarget::Conversation(_) => conversation,
                    };
                    // Whatever became of the request (a home from before it was kept), the
                    // next round commits what is pending.
                    if self.home.state.groups.contains_key(&hex::encode(&conversation))
                        && !self.home.state.leave_requests.contains(&conversation)
                    {
                        self.home.state.leave_requests.push(conversation.clone());
                        self.home.save()?;
                    }
                    if awaited {
                        let reason = "a member's leave must be committed first".to_string();
                        self.watch.fate = Some(Fate::Kept { maybe_sent: false, reason });
                    }
                    // Announced when it goes; the other conversations' messages that go now
                    // did not wait, and stay quiet.
                    self.watch.quiet.remove(&item.id);
                    held.push(conversation);
                }
                Err(e) => {
                    self.drop_queued(item.id)?;
                    if awaited {
                        self.watch.fate = Some(Fate::Refused(e));
                    } else {
                        let to = match &item.to {
                            QueuedTarget::Conversation(id) => self.conversation_name(id),
                            QueuedTarget::Person(k) => self.display_name(k),
                        };
                        // Which message: its start, so the person knows what to send again
                        // (it never left, though its history may show it: it went there when
                        // it was encrypted).
                        let text = crate::client::requests::preview_line(&item.text, NOT_SENT_PREVIEW_CHARS);
                        events.push(Event::NotSent {
                            reason: format!(
                                "a queued message to {to} (\u{201c}{text}\u{201d}) was not sent: {e}"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn drop_queued(&mut self, id: u64) -> Result<(), ClientError> {
        self.home.state.sends.retain(|s| s.id != id);
        self.home.state.reporting_sends.retain(|(t, _)| *t != id);
        self.home.save()?;
        Ok(())
    }

    /// Members of a conversation other than us; an error when there are none.
    fn recipients_of(&self, group_id: &[u8]) -> Result<Vec<[u8; 32]>, ClientError> {
        let me = self.identity.public().0;
        let meta = self.home.state.groups.get(&hex::encode(group_id));
        if meta.is_some_and(|g| !g.active) {
            return Err(ClientError::NotMember(
                self.conversation_name(group_id).trim_start_matches('#').into(),
            ));
        }
        let recipients: Vec<[u8; 32]> =
            self.mls.members(group_id)?.into_iter().filter(|m| *m != me).collect();
        // A direct conversation is the two of us: if its peer added someone, saying anything
        // there would tell them too, which is not what the person typing means.
        // (Names are escaped where errors are printed, as for every other error.)
        if let Some(GroupKind::Direct { peer }) = meta.map(|g| &g.kind)
            && recipients.iter().any(|r| r != peer)
        {
            let others: Vec<String> =
                recipients.iter().filter(|r| *r != peer).map(|r| self.display_name(r)).collect();
            return Err(ClientError::DirectNotPrivate {
                peer: self.display_name(peer),
                others: others.join(", "),
            });
        }
        if recipients.is_empty() {
            return Err(ClientError::Alone(
                self.conversation_name(group_id).trim_start_matches('#').to_string(),
            ));
        }
        Ok(recipients)
    }

    /// One queued message: opens its conversation if needed, encrypts it if not yet (or again,
    /// see the module header), saves, sends.
    async fn send_queued(
        &mut self,
        item: QueuedSend,
        events: &mut Vec<Event>,
    ) -> Result<(Vec<u8>, usize), ClientError> {
        let group_id = match &item.to {
            QueuedTarget::Conversation(id) => id.clone(),
            QueuedTarget::Person(peer) => {
                let id = match self.find_direct(peer) {
                    Some(id) => id,
                    // Replying to a message request accepts it (its conversation is the one).
                    None => match self.accept_direct_request_from(peer, events)? {
                        Some(id) => id,
                        None => self.create_direct(*peer).await?,
                    },
                };
                self.set_queued(item.id, |s| s.to = QueuedTarget::Conversation(id.clone()));
                self.persist()?;
                id
            }
        };
        let recipients = self.recipients_of(&group_id)?;
        let epoch = self.mls.epoch(&group_id)?;
        let ciphertext = match item.sealed {
            Some(s) if s.group_id == group_id && (s.maybe_sent || s.epoch == epoch) => s.ciphertext,
            sealed => {
                // In history at the time it was typed, unless a membership change or a message
                // came between: it is encrypted after them, and goes after them in the group's
                // order, so they go first. (Exploratory testing: the member whose `send`
                // committed a leave first saw "dave left" after her message; a reply whose
                // `send` fetched the question showed above it.) Only the order hangs on the
                // history's newest record: one that cannot be read does not stop the message.
                let changed = self.home.state.timelines.last_change_ms(&hex::encode(&group_id));
                let newest =
                    if sealed.is_none() { self.newest_history_ms(&group_id).ok().flatten() } else { None };
                let at = [changed, newest].into_iter().flatten().fold(item.sent_at_ms, u64::max);
                let body = AppMessage { text: item.text.clone(), sent_at_ms: item.sent_at_ms }.encode();
                let ciphertext = self.mls.encrypt(&group_id, &body)?;
                if sealed.is_none() {
                    self.push_history(Entry {
                        group_id: group_id.clone(),
                        from: self.identity.public().0,
                        text: item.text.clone(),
                        sent_at_ms: item.sent_at_ms,
                        received_at_ms: at,
                        outgoing: true,
                    });
                }
                let sealed = SealedSend { group_id: group_id.clone(), epoch, ciphertext, maybe_sent: false };
                self.set_queued(item.id, |s| s.sealed = Some(sealed.clone()));
                // The ratchet advanced: saved with the ciphertext before anything leaves, so a
                // crash never reuses a key and never loses the message.
                self.persist()?;
                crate::failpoint::hit("send-sealed");
                sealed.ciphertext
            }
        };
        let frame = Frame::Mls { group_id: group_id.clone(), message: ciphertext }.encode();
        let mut sent = self.fan_out_placed(&group_id, &recipients, &frame).await;
        if sent.is_ok() && crate::failpoint::active("send-answer-lost") {
            // Tests: the server took it, and the answer never came.
            sent = Err(SessionError::Disconnected("the answer was lost (test point)".into()).into());
        }
        match sent {
            Ok((channel_seq, skipped)) => {
                // Noted with the save that takes it out of the outbox (see `sent_after_removal`).
                self.note_placed(&group_id, channel_seq);
                // Tests stop here to leave a message on the server and in the outbox both.
                crate::failpoint::hit("send-enqueued");
                // Sent: the server has it for everyone but those whose queue is full.
                self.note_skipped(&group_id, &skipped, Carried::Message);
                Ok((group_id, recipients.len().saturating_sub(skipped.len())))
            }
            Err(e) => {
                if matches!(&e, ClientError::Session(se) if !se.is_definite_refusal()) {
                    self.set_queued(item.id, |s| {
                        if let Some(sealed) = &mut s.sealed {
                            sealed.maybe_sent = true;
                        }
                    });
                    self.home.save()?;
                }
                Err(e)
            }
        }
    }

    /// Notes where the server placed a message of ours in `group_id`'s channel. A commit that
    /// removes us while the message was on its way (`group remove`, a leave committed) may be
    /// placed before it: every member then processes the removal first and drops the message
    /// as from a former member ([`MlsError::FormerMember`]), though the server took it.
    /// [`Messenger::sent_after_removal`] tells us.
    fn note_placed(&mut self, group_id: &[u8], channel_seq: u64) {
        let key = hex::encode(group_id);
        // Only groups remove members: a direct conversation's send writes nothing more.
        if !self.home.state.groups.get(&key).is_some_and(|g| g.kind == GroupKind::Group) {
            return;
        }
        let placed = self.home.state.placed_sends.entry(key).or_default();
        placed.push(channel_seq);
        if placed.len() > MAX_PLACED_SENDS {
            placed.remove(0);
        }
    }

    /// A commit placed at `channel_seq` in `group_id`'s channel was processed: our messages
    /// placed before it were read as usual, and the commit's notice if it `removed_us` says how
    /// many placed after it no member will read. None when there are none (or the position is
    /// unknown: a message that waited for its Welcome).
    pub(crate) fn sent_after_removal(
        &mut self,
        group_id: &[u8],
        channel_seq: Option<u64>,
        removed_us: bool,
    ) -> Option<usize> {
        let key = hex::encode(group_id);
        if removed_us {
            let placed = self.home.state.placed_sends.remove(&key)?;
            let after = placed.iter().filter(|p| channel_seq.is_some_and(|c| **p > c)).count();
            return (after > 0).then_some(after);
        }
        if let (Some(c), Some(placed)) = (channel_seq, self.home.state.placed_sends.get_mut(&key)) {
            placed.retain(|p| *p > c);
            if placed.is_empty() {
                self.home.state.placed_sends.remove(&key);
            }
        }
        None
    }

    fn set_queued(&mut self, id: u64, f: impl FnOnce(&mut QueuedSend)) {
        if let Some(s) = self.home.state.sends.iter_mut().find(|s| s.id == id) {
            f(s);
        }
    }

    /// Queues `text` for `target` and sends the outbox up to it. Ok with [`Fate::Kept`] when
    /// it stays queued; the error when it was refused or could not be queued.
    pub async fn send(&mut self, target: &Target, text: &str) -> Result<(Fate, Vec<Event>), ClientError> {
        let mut events = Vec::new();
        if let Target::Group(name) = target {
            self.find_group_fetching(name, &mut events).await?;
        }
        let id = self.queue_send(target, text)?;
        // Tests run `qpq passphrase --new-key` here: between the two operations of a send.
        crate::failpoint::hit("send-queued");
        let mut fate = self.deliver_outbox(id, &mut events).await;
        if let Fate::Kept { maybe_sent: true, .. } = &fate {
            // The request may have arrived: the same bytes once more, on a new connection.
            self.notices.push("may have been sent; retrying".to_string());
            self.disconnect().await;
            fate = self.deliver_outbox(id, &mut events).await;
        }
        match fate {
            Fate::Refused(e) => {
                // Refused before it was encrypted (say, a changed server certificate): it
                // leaves the outbox, as a failed send always did.
                self.unqueue(id)?;
                Err(e)
            }
            f @ Fate::Kept { .. } => {
                // The command says it waits: whoever sends it later says that it went. Another
                // process may have sent it since this one looked (it said nothing: this one was
                // to), and then it went.
                let Ok(_op) = self.begin() else { return Ok((f, events)) };
                if !self.home.state.sends.iter().any(|s| s.id == id) {
                    return Ok((Fate::Sent { group_id: Vec::new(), recipients: 0 }, events));
                }
                self.forget_reporters(&[id]);
                Ok((f, events))
            }
            f => Ok((f, events)),
        }
    }

    /// Connects, catches up, and sends the outbox: what became of message `id`.
    async fn deliver_outbox(&mut self, id: u64, events: &mut Vec<Event>) -> Fate {
        self.watch.awaited = Some(id);
        self.watch.fate = None;
        let r = async {
            self.connect().await?;
            let _op = self.begin()?;
            // Catch up first: a commit or a Welcome may be waiting (the peer may have opened a
            // direct conversation with us, which we then reuse).
            events.extend(self.catch_up().await?);
            events.extend(self.finish_round().await?);
            self.flush_sends(events).await
        }
        .await;
        self.watch.awaited = None;
        let recorded = self.watch.fate.take();
        let queued = self.home.state.sends.iter().find(|s| s.id == id);
        let maybe_sent = queued.and_then(|s| s.sealed.as_ref()).is_some_and(|s| s.maybe_sent);
        match (recorded, r) {
            (Some(f), _) => f,
            // `qpq passphrase --new-key` re-sealed the home between queueing the message and
            // this operation (it cannot within one: the operation holds the home's lock).
            (None, Err(e)) if e.home_key_changed() || self.home_key_changed() => {
                Fate::LeftForNext { maybe_sent }
            }
            (None, Err(e)) if is_offline(&e) => Fate::Kept { maybe_sent, reason: e.to_string() },
            (None, Err(e)) => Fate::Refused(e),
            // Another process of this home sent it meanwhile.
            (None, Ok(())) if queued.is_none() => Fate::Sent { group_id: Vec::new(), recipients: 0 },
            (None, Ok(())) => Fate::Kept { maybe_sent, reason: "it is still queued".into() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued message is dropped only for what the server says about it, never because the
    /// server is restarting, its database is down or it is briefly over a limit.
    #[test]
    fn answers_about_the_server_keep_a_message_queued_answers_about_the_message_do_not() {
        use crate::proto::wire_error::ErrorCode;
        let rpc = |code| {
            ClientError::Session(SessionError::Rpc(crate::proto::wire_error::WireError::new(code, "x")))
        };
        for code in [
            ErrorCode::ShuttingDown,
            ErrorCode::Unavailable,
            ErrorCode::Busy,
            ErrorCode::RateLimited,
            ErrorCode::OverQuota,
        ] {
            assert!(is_offline(&rpc(code)), "{code:?} keeps it queued");
        }
        for code in
            [ErrorCode::BadRequest, ErrorCode::TooLarge, ErrorCode::QueueFull, ErrorCode::NoKeyPackages]
        {
            assert!(!is_offline(&rpc(code)), "{code:?} is about the message");
        }
        // May never stop: kept, it would hold every message behind it for ever.
        assert!(!is_offline(&rpc(ErrorCode::Internal)));
        assert!(!is_offline(&ClientError::Session(SessionError::BadAnswer("x".into()))));
        assert!(is_offline(&ClientError::Session(SessionError::Timeout(30))));
        let changed = SessionError::CertificateChanged {
            pinned: crate::transport::Fingerprint([1; 32]),
            presented: crate::transport::Fingerprint([2; 32]),
        };
        assert!(!is_offline(&ClientError::Session(changed)), "the user must act first");
    }

    use crate::client::testing::{bob_carol_and_eve, receive_direct_welcome};

    /// A direct conversation whose peer later adds someone is not used to send: the person
    /// typing to carol would be telling eve too.
    #[test]
    fn a_direct_conversation_that_gained_a_member_refuses_to_send() {
        let dir = tempfile::tempdir().unwrap();
        let (mut bob, mut carol, eve) = bob_carol_and_eve(dir.path());
        let group = b"carol-and-bob".as_slice();
        carol.create_group(group).unwrap();
        let kp = bob.mls.key_packages(1).unwrap().remove(0).bytes;
        let welcome = carol.add_members(group, &[kp]).unwrap().welcome.unwrap();
        carol.merge_pending(group).unwrap();
        let events = receive_direct_welcome(&mut bob, &carol, &welcome);
        assert_eq!(bob.recipients_of(group).unwrap(), vec![carol.identity()], "{events:?}");

        let add = carol.add_members(group, &[eve.key_packages(1).unwrap().remove(0).bytes]).unwrap();
        carol.merge_pending(group).unwrap();
        bob.mls.process(group, &add.commit).unwrap();
        let err = bob.recipients_of(group).unwrap_err();
        assert!(matches!(err, ClientError::DirectNotPrivate { .. }), "{err}");
        assert!(err.to_string().contains("not private"), "{err}");
    }
}
