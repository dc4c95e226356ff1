//! Receiving: fetch (or long-poll), parse each payload (a [`Parcel`]: open it when sealed), apply each frame in the server's order,
//! save, then ack. Also the follow-up work of a round: committing leave requests, refilling
//! KeyPackages, sending the Welcome outbox.
//!
//! Order of effects for every batch: process all → save the state (MLS storage, history, inbox,
//! `processed_seq`) durably → ack. A crash before the save re-delivers the batch; a crash after it
//! re-delivers messages at or below `processed_seq`, which are skipped. A batch in which every
//! message was dropped unopened (junk) changed nothing and is acked without a save: a flood of
//! junk costs no rewrites of the state file.

use zeroize::Zeroizing;

use crate::client::frame::{AppMessage, Frame};
use crate::client::inbox;
use crate::client::messenger::{
    Carried, ClientError, CommitStatus, Event, Messenger, entry_bytes, same_name, valid_name,
};
use crate::client::parcel::Parcel;
use crate::client::session::{Delivered, SessionError};
use crate::client::state::{Entry, GroupKind, GroupMeta, KeptProposal, Orphan, Outgoing};
use crate::limits::{
    MAX_CATCH_UP_ROUNDS, MAX_FETCH_BYTES, MAX_FETCH_MESSAGES, MAX_INBOX_BYTES, MAX_INBOX_ENTRIES,
    MAX_KEPT_LEAVE_PROPOSALS, MAX_ORPHAN_BYTES, MAX_ORPHANS, MAX_PAGES_PER_ROUND, ORPHAN_TTL_MS,
};
use crate::mls::{self, Incoming, MlsError};

impl Messenger {
    // ----- receiving -----

    /// Processes what is pending, one round (see [`Messenger::receive_round`]); with `wait_ms` >
    /// 0 and an empty queue, long-polls up to that long for the first message. Every message's
    /// effect is saved before it is acked. When [`Messenger::has_backlog`] says more is waiting,
    /// the caller shows what came and calls again at once.
    pub async fn receive(&mut self, wait_ms: u32) -> Result<Vec<Event>, ClientError> {
        if !self.wait_for_mail(wait_ms).await? {
            return Ok(Vec::new());
        }
        let _op = self.begin()?;
        let mut events = self.receive_round(0).await?;
        if !self.backlog {
            events.extend(self.finish_round().await?);
            // Messages typed while the server was away go out now, in order.
            self.flush_sends(&mut events).await?;
        }
        Ok(events)
    }

    /// The waiting part of [`Messenger::receive`]: true when a receive round has work (with
    /// `wait_ms` 0, queued sends or a backlog, at once), false when `wait_ms` passed with an
    /// empty queue or another qpq process on this home saved meanwhile (its reader shows what
    /// it fetched). It holds no lock and changes nothing, so it may be cancelled at any point.
    async fn wait_for_mail(&mut self, wait_ms: u32) -> Result<bool, ClientError> {
        self.connect().await?;
        // Queued messages go out before any long wait; a backlog is fetched at once.
        if wait_ms == 0 || self.has_queued_sends() || self.backlog {
            return Ok(true);
        }
        // Without the home lock, so other qpq processes on this home go on. One of them may
        // fetch what we wait for: its save ends the wait too, so that this process's reader
        // shows the messages without waiting for the next ones.
        let session = self.session()?;
        tokio::select! {
            r = session.fetch_wait(wait_ms, 1) => Ok(!r?.0.is_empty()),
            () = self.home.saved_elsewhere() => Ok(false),
        }
    }

    /// True when the last receive round stopped with messages still waiting on the server: the
    /// caller shows what came (it is in the inbox) and receives again without waiting.
    pub fn has_backlog(&self) -> bool {
        self.backlog
    }

    /// Receives until the server's queue is drained (at most [`MAX_CATCH_UP_ROUNDS`] rounds):
    /// what an operation that sends or commits runs first, so that it acts on the group's
    /// newest epoch. The messages are in the inbox for the readers; the events returned leave
    /// them out, so the events of many rounds stay small.
    pub(crate) async fn catch_up(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            let round = self.receive_round(0).await?;
            events.extend(round.into_iter().filter(|e| !matches!(e, Event::Message(_))));
            if !self.backlog {
                break;
            }
        }
        Ok(events)
    }

    /// One fetch (or fetchWait) and the processing of what came, repeated while the server says
    /// more is waiting and the round's bounds allow. Saves, then acks: a page's ack rides on the
    /// fetch of the next page (of this round or the next one), the last page's is its own call.
    ///
    /// A round is bounded so that what it returns and keeps is bounded whatever the server
    /// sends: it stops after a page when the next page (up to [`MAX_FETCH_BYTES`] and
    /// [`MAX_FETCH_MESSAGES`]) might not fit in the inbox beside what the round already added,
    /// so that a reader that was caught up when the round began misses nothing, and after
    /// [`MAX_PAGES_PER_ROUND`] pages in any case. It then sets [`Messenger::has_backlog`]; the
    /// Welcomes, resent commits and queued sends that follow a drained queue wait for the round
    /// that drains it.
    pub(crate) async fn receive_round(&mut self, wait_ms: u32) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        let mut wait = if self.backlog { 0 } else { wait_ms };
        let mut saved_up_to = std::mem::take(&mut self.unacked);
        self.backlog = false;
        let (mut pages, mut added_entries, mut added_bytes) = (0usize, 0usize, 0usize);
        let events_before = inbox::events_end(&self.home.state);
        if self.expire_strangers() {
            self.persist()?;
        }
        loop {
            let (msgs, more, _) = self.session()?.ack_and_fetch_wait(saved_up_to, wait, 0).await?;
            wait = 0;
            let Some(last) = msgs.last().map(|m| m.seq) else { break };
            if msgs.first().is_some_and(|m| m.seq <= saved_up_to) {
                // The server ignored ackUpTo (an older or broken one): ack the plain way and
                // stop rather than page over the same messages forever.
                self.session()?.ack(saved_up_to).await?;
                break;
            }
            let mut changed = false;
            let inbox_end = self.home.state.inbox_end_seq;
            for m in &msgs {
                if m.seq <= self.home.state.processed_seq {
                    continue; // re-delivery of something whose effect we already saved
                }
                changed |= self.process_delivered(m, &mut events);
                self.home.state.processed_seq = m.seq;
            }
            let added = usize::try_from(self.home.state.inbox_end_seq.saturating_sub(inbox_end))
                .unwrap_or(usize::MAX);
            added_entries = added_entries.saturating_add(added);
            added_bytes = self
                .home
                .state
                .inbox
                .iter()
                .rev()
                .take(added)
                .map(entry_bytes)
                .fold(added_bytes, usize::saturating_add);
            if changed {
                self.trim_inbox();
                self.persist()?;
            }
            if !more {
                self.session()?.ack(last).await?;
                break;
            }
            saved_up_to = last;
            pages += 1;
            // Membership events are bounded alike, counted apart: a message can make up to
            // three (a commit that adds, removes and sees someone leave).
            let (added_events, event_bytes) = inbox::events_since(&self.home.state, events_before);
            let inbox_full = added_bytes.saturating_add(MAX_FETCH_BYTES) > MAX_INBOX_BYTES
                || added_entries.saturating_add(MAX_FETCH_MESSAGES as usize) > MAX_INBOX_ENTRIES
                || event_bytes.saturating_add(MAX_FETCH_BYTES) > MAX_INBOX_BYTES
                || added_events.saturating_add(3 * MAX_FETCH_MESSAGES as usize) > MAX_INBOX_ENTRIES;
            if inbox_full || pages >= MAX_PAGES_PER_ROUND {
                self.backlog = true;
                self.unacked = last;
                return Ok(events);
            }
        }
        self.resend_unsent_commits().await?;
        self.flush_outbox(&mut events).await?;
        Ok(events)
    }

    /// A commit whose sending failed with an unknown outcome and whose echo is not in our (now
    /// drained) queue may or may not be in the server's hands: send it again. If the first copy
    /// did land, every member applies the first and ignores the second (it no longer fits the
    /// epoch), and so do we.
    async fn resend_unsent_commits(&mut self) -> Result<(), ClientError> {
        let unsent: Vec<(String, Vec<u8>)> = self
            .home
            .state
            .pending_commits
            .iter()
            .filter(|(_, p)| !p.sent)
            .map(|(k, p)| (k.clone(), p.commit.clone()))
            .collect();
        for (key, commit) in unsent {
            let Ok(group_id) = hex::decode(&key) else { continue };
            let recipients = self.mls.members(&group_id)?;
            let frame = Frame::Mls { group_id: group_id.clone(), message: commit }.encode();
            let skipped = self.fan_out_commit(&group_id, &recipients, &frame).await?;
            self.note_skipped(&group_id, &skipped, Carried::Commit);
            if let Some(p) = self.home.state.pending_commits.get_mut(&key) {
                p.sent = true;
            }
            self.home.save()?;
        }
        Ok(())
    }

    /// Sends what the outbox holds (Welcomes of commits that won), removing each item once the
    /// server has it. An item the server refuses (say, a full queue) is dropped with a notice
    /// rather than blocking everything behind it; when the server cannot be reached or the
    /// connection fails, the rest waits for the next round (see
    /// [`crate::client::session::SessionError::is_refusal_of_the_call`]): the commit won, and
    /// its new members can read the group only with these.
    pub(crate) async fn flush_outbox(&mut self, events: &mut Vec<Event>) -> Result<(), ClientError> {
        if crate::failpoint::active("outbox-connection-lost") {
            // Tests: the connection drops before the outbox goes; everything stays queued.
            return Ok(());
        }
        while let Some(item) = self.home.state.outbox.first().cloned() {
            let Outgoing { channel, recipients, frame } = item;
            match self.seal_for_each(&channel, &recipients, &frame).await {
                // The server took it for the others; those whose queue is full never get it.
                Ok(skipped) if !skipped.is_empty() => events.push(Event::WelcomeRefused {
                    to: skipped,
                    reason: "their queue on the server is full".into(),
                }),
                Ok(_) => {}
                Err(ClientError::Session(e)) if !e.is_refusal_of_the_call() => return Ok(()),
                Err(e) => {
                    events.push(Event::WelcomeRefused { to: recipients.clone(), reason: e.to_string() })
                }
            }
            self.home.state.outbox.remove(0);
            self.home.save()?;
        }
        Ok(())
    }

    /// Work that must not run inside a commit's confirmation loop: committing leave requests,
    /// asking again to leave where a commit passed over our request, and refilling KeyPackages.
    pub(crate) async fn finish_round(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        // Kept in the state until done, so a crash or a connection failure retries next round.
        // So does a refusal (our own queue full, say): the proposal stays pending until some
        // commit covers it, and meanwhile every message we send to the group is refused
        // (openmls sends nothing over pending proposals), so forgetting the request lost them.
        for gid in self.home.state.leave_requests.clone() {
            let mut keep = false;
            if self.home.state.groups.get(&hex::encode(&gid)).is_some_and(|g| g.active) {
                match self.commit_leave_requests(&gid).await {
                    Ok(evs) => events.extend(evs),
                    Err(ClientError::Session(e)) if !e.is_refusal_of_the_call() => return Err(e.into()),
                    Err(e @ ClientError::Mls(_)) => {
                        events.push(Event::Dropped { reason: format!("could not commit a leave: {e}") })
                    }
                    Err(e) => {
                        // Said once per process, not every round it is tried again.
                        if self.leave_retry_told.insert(gid.clone()) {
                            let group = self.conversation_name(&gid);
                            events.push(Event::Dropped {
                                reason: format!(
                                    "could not commit a leave in {group} yet: {e}; trying again later"
                                ),
                            });
                        }
                        keep = true;
                    }
                }
            }
            if !keep {
                self.home.state.leave_requests.retain(|g| *g != gid);
                self.home.state.leave_proposals.remove(&hex::encode(&gid));
                self.home.save()?;
            }
        }
        events.extend(self.repeat_leave_requests().await?);
        events.extend(self.sign_name_into_joined_groups().await?);
        // A round that waits after a refusal (see `client::keypool`) tries nothing: it neither
        // says nor forgets that the server refused, so the notice stays once per process.
        if self.kp_check || self.key_packages_due() {
            let waited = self.key_uploads_waiting();
            let done = self.maintain_key_packages(false).await.map(drop);
            if !(waited && done.is_ok()) {
                self.upkeep(done, "publish new key packages", &mut events)?;
            }
        }
        let waited = self.key_uploads_waiting();
        let done = self.maintain_hybrid_key().await;
        if !(waited && done.is_ok()) {
            self.upkeep(done, "replace the envelope key", &mut events)?;
        }
        Ok(events)
    }

    /// What became of the upkeep of our keys: the server's answer about itself (its key storage
    /// full of strangers' packages, a rate limit, busy) is a notice, said once per process and
    /// kind of answer, and the round goes on; it is tried again at the next one. It used to fail
    /// the whole round, so while strangers kept the server's key storage full, nobody whose keys
    /// were due could receive (their `recv` failed) or send (queued messages waited behind the
    /// failed round). A refusal of the upload itself (a clock too far off, say) still fails the
    /// round, loudly, as does a lost connection.
    fn upkeep(
        &mut self,
        done: Result<(), ClientError>,
        what: &'static str,
        events: &mut Vec<Event>,
    ) -> Result<(), ClientError> {
        match done {
            Ok(()) => {
                self.upkeep_told.retain(|(w, _)| *w != what);
                Ok(())
            }
            Err(ClientError::Session(e)) if e.is_answer_about_the_server() => {
                // (Only answers carry a code: `is_answer_about_the_server` holds for no other.)
                let code = if let SessionError::Rpc(r) = &e { r.code as u16 } else { 0 };
                if self.upkeep_told.insert((what, code)) {
                    events.push(Event::Dropped {
                        reason: format!("could not {what} yet: {e}; trying again later"),
                    });
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Tops the server's KeyPackage pool up and rotates the last-resort one when it may have
    /// been used (and replaces whatever is due by age, see [`crate::client::keypool`]).
    pub async fn refill_key_packages(&mut self) -> Result<(), ClientError> {
        self.kp_check = true;
        self.maintain_key_packages(false).await.map(drop)
    }

    /// Applies one delivered message; false when it was dropped before changing anything (it
    /// did not open or decode), so a page of such junk needs no save.
    fn process_delivered(&mut self, m: &Delivered, events: &mut Vec<Event>) -> bool {
        let (sealed, frame) = match Parcel::parse(&m.payload) {
            Ok(Parcel::Sealed(envelope)) => match self.open_envelope(envelope) {
                Ok(p) => (true, Zeroizing::new(p)),
                Err(e) => {
                    events.push(Event::Dropped { reason: format!("a message did not decrypt: {e}") });
                    return false;
                }
            },
            Ok(Parcel::SealedMany(data)) => match self.open_sealed_many(data) {
                Ok(p) => (true, Zeroizing::new(p)),
                Err(e) => {
                    events.push(Event::Dropped { reason: format!("a message did not decrypt: {e}") });
                    return false;
                }
            },
            Ok(Parcel::Group(frame)) => (false, Zeroizing::new(frame.to_vec())),
            Err(e) => {
                events.push(Event::Dropped { reason: e.to_string() });
                return false;
            }
        };
        match Frame::decode(&frame) {
            Ok(Frame::Welcome { welcome, group_name, kind, inviter }) if sealed => {
                self.handle_welcome(&welcome, &group_name, kind, inviter, events)
            }
            Ok(Frame::Welcome { .. }) => {
                // Its name and inviter travel outside MLS: only ever accepted sealed.
                events.push(Event::Dropped { reason: "a welcome came without its envelope".into() });
                return false;
            }
            Ok(Frame::Mls { group_id, message }) => {
                // Group messages travel on the group's channel (see `Messenger::fan_out`).
                let placed = (m.channel_id == group_id).then_some(m.channel_seq);
                self.handle_group_message(&group_id, &message, placed, events)
            }
            Err(e) => {
                events.push(Event::Dropped { reason: e.to_string() });
                return false;
            }
        }
        true
    }

    pub(crate) fn handle_welcome(
        &mut self,
        welcome: &[u8],
        name: &str,
        kind: GroupKind,
        claimed_inviter: [u8; 32],
        events: &mut Vec<Event>,
    ) {
        self.kp_check = true;
        // Read in a throwaway copy first: who signed it decides whether we join at all, and a
        // request must not use up our KeyPackage (see `client::requests`).
        let (preview, _) = match self.mls.preview_welcome(welcome) {
            Ok(p) => p,
            Err(e) => {
                events.push(Event::Dropped { reason: format!("could not join a group: {e}") });
                return;
            }
        };
        let inviter = preview.inviter;
        if inviter != claimed_inviter {
            // The frame's inviter field is not authenticated; the signed GroupInfo is.
            self.discard_welcome(welcome);
            events.push(Event::Dropped {
                reason: "a welcome claimed a different inviter than its signer".into(),
            });
            return;
        }
        if self.home.state.requests.is_blocked(&inviter) {
            self.discard_welcome(welcome);
            return;
        }
        // A re-invitation into a group we left, from someone who was not in it then, is the
        // person's to decide even from a contact: group ids are their creator's choice, so it
        // may be another group under our #team's id (the request says so).
        if !self.consents_to(&inviter) || self.rejoin_by_a_newcomer(&preview.group_id, &inviter) {
            self.file_request(welcome, preview.group_id, name, kind, inviter, events);
            return;
        }
        match self.join_group(welcome, name, &kind, Some(inviter), false, events) {
            Ok(_) => {}
            Err(MlsError::NotFromAMember) => events.push(Event::Dropped {
                reason: format!(
                    "{} invited you back to {}, but was not in it when you left: ask someone who was to add you",
                    self.display_name(&inviter),
                    self.conversation_name(&preview.group_id)
                ),
            }),
            Err(e) => events.push(Event::Dropped { reason: format!("could not join a group: {e}") }),
        }
    }

    /// For a commit (ours or another's) of the group `key` that takes out `removed` and
    /// `left`: moves to `left` those `removed` whose request to leave we hold (a removal by
    /// value after another commit passed over their request, see
    /// `Messenger::commit_leave_requests`, is their leave and reads as one: "bob left", not
    /// "carol removed bob", to carol too; only on the word of a request we checked), then
    /// forgets their requests: should they come back, a request of their first stay must not
    /// take them out again.
    fn settle_leavers(&mut self, key: &str, removed: &mut Vec<[u8; 32]>, left: &mut Vec<[u8; 32]>) {
        let Some(kept) = self.home.state.leave_proposals.get_mut(key) else { return };
        removed.retain(|k| {
            let asked = kept.iter().any(|p| p.sender == *k);
            if asked {
                left.push(*k);
            }
            !asked
        });
        kept.retain(|p| !left.contains(&p.sender));
    }

    /// Processes a message of a group we asked to leave while our removal is not committed:
    /// its commits keep our copy of the group in step, so that when one passes over our request
    /// [`Messenger::repeat_leave_requests`] asks again in the right epoch, and the one that
    /// removes us ends it (without a word: "you left" was said). Its messages are not shown:
    /// we left. False when MLS could not take it (a Welcome back may follow: an orphan then).
    fn follow_own_leave(&mut self, group_id: &[u8], message: &[u8]) -> bool {
        match self.mls.process(group_id, message) {
            Ok(Incoming::Commit { self_removed, .. }) => {
                if self_removed {
                    self.home.state.leaving.remove(&hex::encode(group_id));
                }
                true
            }
            Ok(Incoming::Application { .. } | Incoming::LeaveRequest { .. }) => true,
            Err(e) => matches!(e, MlsError::OwnMessage | MlsError::Replayed | MlsError::FormerMember(_)),
        }
    }

    /// True when `group_id` is a conversation we left (or were removed from) and `inviter` was
    /// not a member of it in the last epoch we saw (or we no longer hold that epoch): joining
    /// would give our conversation (its name, its history) to a group we cannot tell is the
    /// same one.
    pub fn rejoin_by_a_newcomer(&self, group_id: &[u8], inviter: &[u8; 32]) -> bool {
        let left = self.home.state.groups.get(&hex::encode(group_id)).is_some_and(|g| !g.active);
        left && !self.mls.was_member(group_id, inviter)
    }

    /// Joins from `welcome` for real, records the group and applies the messages that came
    /// ahead of it; returns the group id. With `expect_inviter`, a Welcome signed by someone
    /// else joins nothing. `accepted` says the person accepted this invitation (a request):
    /// it may then take back a group we left even from someone who was not in it then.
    pub(crate) fn join_group(
        &mut self,
        welcome: &[u8],
        name: &str,
        kind: &GroupKind,
        expect_inviter: Option<[u8; 32]>,
        accepted: bool,
        events: &mut Vec<Event>,
    ) -> Result<Vec<u8>, MlsError> {
        // A group we left is joined afresh (issue 10, bug 1).
        let groups = &self.home.state.groups;
        let left = |id: &[u8]| groups.get(&hex::encode(id)).is_some_and(|g| !g.active);
        let joined = self.mls.rejoin_welcome(welcome, left, accepted)?;
        let group_id = joined.group_id;
        let inviter = joined.inviter;
        if expect_inviter.is_some_and(|e| e != inviter) {
            let _ = self.mls.delete_group(&group_id);
            return Err(MlsError::InvalidMember("the welcome's signer changed"));
        }
        // The frame's "direct" label is the inviter's word, not MLS's: a direct conversation
        // that holds anyone but the two of us would show as private and is not.
        if matches!(kind, GroupKind::Direct { .. }) {
            let me = self.identity.public().0;
            let mut members = self.mls.members(&group_id)?;
            members.sort_unstable();
            let mut two = vec![me, inviter];
            two.sort_unstable();
            if members != two {
                let _ = self.mls.delete_group(&group_id);
                return Err(MlsError::InvalidMember("a direct conversation must hold only its two people"));
            }
        }
        if joined.key_package_refs.contains(&self.home.state.last_resort_ref) {
            // Our last-resort KeyPackage was used: replace it at the next refill.
            self.home.state.rotate_last_resort = true;
        }
        let kind = match kind {
            GroupKind::Direct { .. } => GroupKind::Direct { peer: inviter },
            GroupKind::Group => GroupKind::Group,
        };
        let key = hex::encode(&group_id);
        match self.home.state.groups.get_mut(&key) {
            // Rejoining: the group keeps its name and history (issue 10, bug 3).
            Some(g) if !g.active => {
                g.active = true;
                self.home.state.leaving.remove(&key);
                g.kind = kind;
                let name = g.name.clone();
                // Unless we gave its name to a new group meanwhile: two active `#team`s would
                // make `#team` ambiguous.
                let clash = self.home.state.groups.iter().any(|(k, other)| {
                    *k != key
                        && other.active
                        && other.kind == GroupKind::Group
                        && same_name(&other.name, &name)
                });
                if clash {
                    let fresh = self.unique_group_name(&name);
                    if let Some(g) = self.home.state.groups.get_mut(&key) {
                        g.name = fresh;
                    }
                }
            }
            _ => {
                let name = match &kind {
                    GroupKind::Group => self.unique_group_name(name),
                    GroupKind::Direct { .. } => String::new(),
                };
                let meta = GroupMeta { name, kind, active: true, history: Default::default() };
                self.home.state.groups.insert(key, meta);
            }
        }
        self.membership_event(Event::Joined { group_id: group_id.clone(), by: inviter }, events);
        // Messages that raced ahead of this Welcome.
        let (mine, rest): (Vec<Orphan>, Vec<Orphan>) =
            std::mem::take(&mut self.home.state.orphans).into_iter().partition(|o| o.group_id == group_id);
        self.home.state.orphans = rest;
        for o in mine {
            self.handle_group_message(&group_id, &o.message, None, events);
        }
        let me = self.identity.public().0;
        if self.mls.member_name(&group_id, &me).as_deref() != self.mls.display_name() {
            self.home.state.name_due.insert(hex::encode(&group_id));
        }
        Ok(group_id)
    }

    /// Keeps a message for a group we know nothing of yet, within the orphan bounds: the oldest
    /// make room for it.
    fn keep_orphan(&mut self, group_id: &[u8], message: &[u8]) {
        if message.len() > MAX_ORPHAN_BYTES {
            return;
        }
        let orphans = &mut self.home.state.orphans;
        let mut bytes: usize = orphans.iter().map(|o| o.message.len()).sum();
        while !orphans.is_empty()
            && (orphans.len() >= MAX_ORPHANS || bytes + message.len() > MAX_ORPHAN_BYTES)
        {
            bytes = bytes.saturating_sub(orphans.remove(0).message.len());
        }
        orphans.push(Orphan {
            group_id: group_id.to_vec(),
            message: message.to_vec(),
            received_at_ms: self.clock.now_ms(),
        });
    }

    /// Drops what outlived its time: orphans and unanswered requests (whose KeyPackage private
    /// keys go with them). True when anything was dropped.
    pub(crate) fn expire_strangers(&mut self) -> bool {
        let now = self.clock.now_ms();
        let before = self.home.state.orphans.len();
        self.home.state.orphans.retain(|o| now.saturating_sub(o.received_at_ms) < ORPHAN_TTL_MS);
        let mut expired = self.home.state.requests.expire(now);
        expired.extend(crate::client::requests::take_expired(&mut self.home.state.declined, now));
        for r in &expired {
            self.discard_welcome(&r.welcome);
        }
        before != self.home.state.orphans.len() || !expired.is_empty()
    }

    /// Keeps the inbox within its bounds (see [`crate::client::inbox`]).
    fn trim_inbox(&mut self) {
        inbox::trim(&mut self.home.state);
    }

    pub(crate) fn unique_group_name(&self, wanted: &str) -> String {
        let base = if valid_name(wanted) { wanted.to_string() } else { "group".to_string() };
        let taken = |n: &str| {
            self.home.state.groups.values().any(|g| g.kind == GroupKind::Group && same_name(&g.name, n))
        };
        if !taken(&base) {
            return base;
        }
        // Within the 32 bytes of a name (`valid_name`): the base gives way to the suffix. The
        // name is ASCII, so any byte index is a character boundary.
        (2..)
            .map(|i: u32| {
                let suffix = format!("-{i}");
                let keep = base.len().min(32usize.saturating_sub(suffix.len()));
                format!("{}{suffix}", base.get(..keep).unwrap_or_default())
            })
            .find(|n| !taken(n))
            .unwrap_or(base)
    }

    /// Applies one message of `group_id`; `placed` is its position in the group's channel when
    /// known (not for one that waited for its Welcome).
    pub(crate) fn handle_group_message(
        &mut self,
        group_id: &[u8],
        message: &[u8],
        placed: Option<u64>,
        events: &mut Vec<Event>,
    ) {
        let key = hex::encode(group_id);
        let Some(meta) = self.home.state.groups.get(&key) else {
            if !self.hold_for_request(group_id, message, events)
                && !self.reopen_declined(group_id, message, events)
            {
                self.keep_orphan(group_id, message);
            }
            return;
        };
        if !meta.active {
            if self.home.state.leaving.contains_key(&key) && self.follow_own_leave(group_id, message) {
                return;
            }
            // We left or were removed; should we be added back, this may have overtaken the
            // Welcome: it waits with the orphans (bounded, and stale ones go unread).
            self.keep_orphan(group_id, message);
            return;
        }
        let pending = self.home.state.pending_commits.get(&key);
        if pending.is_some_and(|p| p.commit.as_slice() == message) {
            let record = self.home.state.pending_commits.remove(&key);
            let changes = self.mls.pending_changes(group_id).unwrap_or_default();
            match self.mls.merge_pending(group_id) {
                Ok(()) => {
                    let me = self.identity.public().0;
                    let direct = self.home.state.groups.get(&key).is_some_and(|g| g.kind != GroupKind::Group);
                    let (mut removed, mut left) = (changes.removed, changes.left);
                    self.settle_leavers(&key, &mut removed, &mut left);
                    // Every reader of the home shows our change ("you added dave"), and the
                    // one-shot that made it says it (before, only a leave we committed for
                    // someone was said, issue 10 bug 2, and `group add` said nothing at all).
                    // Opening a direct conversation is no membership news.
                    if !direct {
                        let change = Event::Membership {
                            group_id: group_id.to_vec(),
                            by: me,
                            added: changes.added,
                            removed,
                            left,
                        };
                        self.membership_event(change, events);
                    }
                    // The Welcome goes out with the same save that records the merge.
                    if let Some(welcome) = record.and_then(|r| r.welcome) {
                        self.home.state.outbox.push(welcome);
                    }
                    self.sent_after_removal(group_id, placed, false);
                    crate::failpoint::hit("commit-merged");
                    self.commits.insert(group_id.to_vec(), CommitStatus::Won);
                }
                Err(e) => {
                    self.commits.insert(group_id.to_vec(), CommitStatus::Lost);
                    events.push(Event::Dropped { reason: format!("could not apply our own commit: {e}") });
                }
            }
            return;
        }
        let epoch_before = self.mls.epoch(group_id).unwrap_or(0);
        match self.mls.process(group_id, message) {
            // A blocked key's messages are dropped without a word wherever they come (the
            // README's promise for `requests block`: "everything that key sends from then on"),
            // in a conversation accepted before the block or a group we share with them too.
            Ok(Incoming::Application { sender, .. }) if self.home.state.requests.is_blocked(&sender) => {}
            Ok(Incoming::Application { sender, plaintext }) => match AppMessage::decode(&plaintext) {
                Ok(app) => {
                    let entry = Entry {
                        group_id: group_id.to_vec(),
                        from: sender,
                        text: app.text,
                        sent_at_ms: app.sent_at_ms,
                        received_at_ms: self.clock.now_ms(),
                        outgoing: false,
                    };
                    self.push_history(entry.clone());
                    inbox::push(&mut self.home.state, entry.clone());
                    events.push(Event::Message(entry));
                }
                Err(e) => events.push(Event::Dropped { reason: format!("undecodable message: {e}") }),
            },
            Ok(Incoming::Commit { sender, added, mut removed, mut left, self_removed, .. }) => {
                self.settle_leavers(&key, &mut removed, &mut left);
                if self.home.state.pending_commits.remove(&key).is_some() {
                    // Another commit took this epoch: ours can never apply.
                    let _ = self.mls.clear_pending(group_id);
                    self.commits.insert(group_id.to_vec(), CommitStatus::Lost);
                }
                let unread = self.sent_after_removal(group_id, placed, self_removed);
                if self_removed {
                    if let Some(g) = self.home.state.groups.get_mut(&key) {
                        g.active = false;
                    }
                    self.membership_event(Event::Removed { group_id: group_id.to_vec(), by: sender }, events);
                    if let Some(n) = unread {
                        let (count, them) = if n == 1 {
                            ("a message".to_string(), "it")
                        } else {
                            (format!("{n} messages"), "them")
                        };
                        events.push(Event::NotSent {
                            reason: format!(
                                "{count} you sent to {} reached the server after {} removed you: no member will read {them}",
                                self.conversation_name(group_id),
                                self.display_name(&sender)
                            ),
                        });
                    }
                } else if !added.is_empty() || !removed.is_empty() || !left.is_empty() {
                    let change =
                        Event::Membership { group_id: group_id.to_vec(), by: sender, added, removed, left };
                    self.membership_event(change, events);
                }
            }
            Ok(Incoming::LeaveRequest { sender }) => {
                if !self.home.state.leave_requests.iter().any(|g| g == group_id) {
                    self.home.state.leave_requests.push(group_id.to_vec());
                }
                // Kept to pass on before our commit of it: one per leaver, the newest. An older
                // one, of a past epoch, says they asked to leave though a commit passed over it:
                // see `Messenger::commit_leave_requests`.
                let epoch = self.mls.epoch(group_id).unwrap_or(0);
                let kept = self.home.state.leave_proposals.entry(key.clone()).or_default();
                kept.retain(|p| p.sender != sender);
                if kept.len() < MAX_KEPT_LEAVE_PROPOSALS {
                    kept.push(KeptProposal { epoch, sender, message: message.to_vec() });
                }
            }
            Err(MlsError::FormerMember(sender)) => {
                // The server placed it after their removal: not theirs to say any more, but not
                // to be swallowed without a word either (their side is told too). Once per round:
                // a former member may go on sending under old epochs.
                let reason = format!(
                    "a message from {} to {} came after they were removed and is not shown",
                    self.display_name(&sender),
                    self.conversation_name(group_id)
                );
                if !events.iter().any(|e| matches!(e, Event::Dropped { reason: r } if *r == reason)) {
                    events.push(Event::Dropped { reason });
                }
            }
            Err(e) => {
                // A commit that lost its epoch (or a message from an epoch we no longer keep)
                // fails here by design, and so does a copy of a message we have (a sender's
                // retry, see `client::outbox`); anything else is worth a notice.
                let stale = mls::MlsClient::peek(message).map(|i| i.epoch < epoch_before).unwrap_or(false)
                    || matches!(e, MlsError::OwnMessage | MlsError::Replayed);
                if !stale {
                    events.push(Event::Dropped {
                        reason: format!("a message of {} was dropped: {e}", self.conversation_name(group_id)),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::client::frame::Frame;
    use crate::client::messenger::{ClientError, ConnectOptions, Event, Messenger};
    use crate::client::session::SessionError;
    use crate::client::state::{GroupKind, Outgoing, Unlock};
    use crate::server::{self, RunningServer, ServerConfig};

    /// A real server in `dir` on 127.0.0.1:0; started again on the same `dir`, it has the same
    /// certificate and database (on a new port).
    async fn start(dir: &Path) -> RunningServer {
        start_with(dir, |_| {}).await
    }

    /// A server in `dir` with `configure` applied to its default configuration.
    async fn start_with(dir: &Path, configure: impl FnOnce(&mut ServerConfig)) -> RunningServer {
        let mut cfg = ServerConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        configure(&mut cfg);
        server::start(cfg).await.unwrap()
    }

    fn opts(server: &RunningServer) -> ConnectOptions {
        ConnectOptions {
            server: Some(server.local_addr().to_string()),
            fingerprint: Some(server.fingerprint()),
        }
    }

    async fn person(home: &Path, name: &str, server: &RunningServer) -> Messenger {
        Messenger::init(home, Some(name.into()), Unlock::None, opts(server)).await.unwrap().0
    }

    /// Runs `body` with alice and bob (each the other's contact when `contacts`) on a fresh
    /// server in `server_dir`, on a LocalSet; `body` hands the server back (it may have started
    /// it again) and the two, to be disconnected and shut down.
    async fn with_alice_and_bob<F, Fut>(contacts: bool, body: F)
    where
        F: FnOnce(std::path::PathBuf, RunningServer, Messenger, Messenger) -> Fut,
        Fut: std::future::Future<Output = (RunningServer, Messenger, Messenger)>,
    {
        with_alice_and_bob_on(|_| {}, contacts, body).await
    }

    /// [`with_alice_and_bob`] on a server configured by `configure`.
    async fn with_alice_and_bob_on<F, Fut>(configure: impl FnOnce(&mut ServerConfig), contacts: bool, body: F)
    where
        F: FnOnce(std::path::PathBuf, RunningServer, Messenger, Messenger) -> Fut,
        Fut: std::future::Future<Output = (RunningServer, Messenger, Messenger)>,
    {
        let [server_dir, alice_home, bob_home] = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let server = start_with(server_dir.path(), configure).await;
        let local = tokio::task::LocalSet::new();
        let server = local
            .run_until(async move {
                let mut alice = person(alice_home.path(), "alice", &server).await;
                let mut bob = person(bob_home.path(), "bob", &server).await;
                if contacts {
                    let (alice_key, bob_key) = (alice.public_key().0, bob.public_key().0);
                    alice.contact_add("bob", &hex::encode(bob_key)).unwrap();
                    bob.contact_add("alice", &hex::encode(alice_key)).unwrap();
                }
                let (server, mut alice, mut bob) =
                    body(server_dir.path().to_path_buf(), server, alice, bob).await;
                alice.disconnect().await;
                bob.disconnect().await;
                drop((alice_home, bob_home));
                server
            })
            .await;
        server.shutdown().await.unwrap();
    }

    /// One more person on `server`, in a fresh home, and alice's contact both ways (so alice's
    /// invitations join at once); the home lives as long as the returned directory.
    async fn contact_of_alice(
        alice: &mut Messenger,
        name: &str,
        server: &RunningServer,
    ) -> (tempfile::TempDir, Messenger) {
        let home = tempfile::tempdir().unwrap();
        let mut m = person(home.path(), name, server).await;
        alice.contact_add(name, &hex::encode(m.public_key().0)).unwrap();
        m.contact_add("alice", &hex::encode(alice.public_key().0)).unwrap();
        (home, m)
    }

    /// The texts of the messages among `events`.
    fn texts_of(events: Vec<Event>) -> Vec<String> {
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.text),
                _ => None,
            })
            .collect()
    }

    /// The leave tests' opening: alice's `#team` with bob and carol (her contact, made here),
    /// bob having read his Welcome. Returns carol's home (it lives as long as the directory),
    /// carol, and the group's id.
    async fn team_of_three(
        alice: &mut Messenger,
        bob: &mut Messenger,
        server: &RunningServer,
    ) -> (tempfile::TempDir, Messenger, Vec<u8>) {
        let (home, carol) = contact_of_alice(alice, "carol", server).await;
        let group_id = alice.group_create("team").unwrap();
        alice.group_add("team", &["bob".to_string(), "carol".to_string()]).await.unwrap();
        bob.receive(0).await.unwrap();
        (home, carol, group_id)
    }

    /// A Welcome whose connection could not be opened (the server went down after the commit
    /// won) was dropped as refused: bob became a member who could never read the group. It
    /// waits in the outbox and goes once the server is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_welcome_waits_while_the_server_is_down_and_goes_when_it_is_back() {
        let [server_dir, alice_home, bob_home] = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let server = start(server_dir.path()).await;
        let local = tokio::task::LocalSet::new();
        let server = local
            .run_until(async move {
                let mut alice = person(alice_home.path(), "alice", &server).await;
                let mut bob = person(bob_home.path(), "bob", &server).await;
                let bob_key = bob.public_key().0;
                bob.contact_add("alice", &hex::encode(alice.public_key().0)).unwrap();
                // alice's add of bob to #team won, and its Welcome waits in the outbox (as
                // `handle_group_message` leaves it when our commit comes back).
                let group_id = alice.group_create("team").unwrap();
                let kp = alice.anonymous().await.unwrap().fetch_key_package(&bob_key).await.unwrap();
                let welcome = alice.mls.add_members(&group_id, &[kp.bytes]).unwrap().welcome.unwrap();
                alice.mls.merge_pending(&group_id).unwrap();
                let inviter = alice.public_key().0;
                let frame =
                    Frame::Welcome { welcome, group_name: "team".into(), kind: GroupKind::Group, inviter }
                        .encode();
                let op = alice.begin().unwrap();
                let item = Outgoing { channel: Vec::new(), recipients: vec![bob_key], frame };
                alice.home.state.outbox.push(item);
                alice.persist().unwrap();

                server.shutdown().await.unwrap();
                let mut events = Vec::new();
                alice.flush_outbox(&mut events).await.unwrap();
                assert!(events.is_empty(), "not refused: {events:?}");
                assert_eq!(alice.state().outbox.len(), 1, "the Welcome waits");
                drop(op);

                let server = start(server_dir.path()).await;
                alice.opts = opts(&server);
                bob.opts = opts(&server);
                alice.receive(0).await.unwrap();
                assert!(alice.state().outbox.is_empty(), "the Welcome went");
                let events = bob.receive(0).await.unwrap();
                let joined =
                    |e: &Event| matches!(e, Event::Joined { group_id: g, by } if *g == group_id && *by == inviter);
                assert!(events.iter().any(joined), "{events:?}");
                alice.disconnect().await;
                bob.disconnect().await;
                server
            })
            .await;
        server.shutdown().await.unwrap();
    }

    /// Bob's leave of alice's two-member group is committed: no leave request left, alice alone,
    /// and `events` told of bob leaving.
    fn assert_only_bob_left(
        alice: &Messenger,
        group_id: &[u8],
        alice_key: [u8; 32],
        bob_key: [u8; 32],
        events: &[Event],
    ) {
        assert!(alice.state().leave_requests.is_empty(), "{events:?}");
        assert_eq!(alice.mls.members(group_id).unwrap(), vec![alice_key], "bob's leave is committed");
        let left = |e: &Event| matches!(e, Event::Membership { left, .. } if *left == vec![bob_key]);
        assert!(events.iter().any(left), "{events:?}");
    }

    /// A member's leave that could not be committed because the server was out of reach was
    /// forgotten ("could not commit a leave"), so bob stayed in alice's group. The request stays
    /// and is committed once the server is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_request_waits_while_the_server_is_down_and_is_committed_when_it_is_back() {
        with_alice_and_bob(true, |server_dir, server, mut alice, mut bob| async move {
            let (alice_key, bob_key) = (alice.public_key().0, bob.public_key().0);
            let group_id = alice.group_create("team").unwrap();
            alice.group_add("team", &["bob".to_string()]).await.unwrap();
            bob.receive(0).await.unwrap();
            bob.group_leave("team").await.unwrap();
            // alice reads bob's request to leave; the server goes down before she commits it.
            let op = alice.begin().unwrap();
            alice.receive_round(0).await.unwrap();
            assert_eq!(alice.state().leave_requests, vec![group_id.clone()]);

            server.shutdown().await.unwrap();
            let failed = alice.finish_round().await;
            assert!(matches!(failed, Err(ClientError::Session(SessionError::Connect { .. }))), "{failed:?}");
            assert_eq!(alice.state().leave_requests, vec![group_id.clone()], "the request stays");
            drop(op);

            let server = start(&server_dir).await;
            alice.opts = opts(&server);
            let events = alice.receive(0).await.unwrap();
            assert_only_bob_left(&alice, &group_id, alice_key, bob_key, &events);
            (server, alice, bob)
        })
        .await;
    }

    /// Found by exploratory testing: when the only other member of a group left, the last one
    /// passed the leave on to "everyone else", a fanout to nobody, which the server refuses; so
    /// the leave was never committed, and every command said "could not commit a leave" while
    /// the messages queued behind it (to anyone) stayed queued. The leave is committed at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_member_commits_the_only_other_members_leave_at_once() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            let (alice_key, bob_key) = (alice.public_key().0, bob.public_key().0);
            let group_id = alice.group_create("team").unwrap();
            alice.group_add("team", &["bob".to_string()]).await.unwrap();
            bob.receive(0).await.unwrap();
            bob.group_leave("team").await.unwrap();
            let events = alice.receive(0).await.unwrap();
            let stuck = |e: &Event| matches!(e, Event::Dropped { reason } if reason.contains("leave"));
            assert!(!events.iter().any(stuck), "{events:?}");
            assert_only_bob_left(&alice, &group_id, alice_key, bob_key, &events);
            (server, alice, bob)
        })
        .await;
    }

    /// Found by exploratory testing: a message to a group whose member's leave was not
    /// committed yet waited, as it must, but so did every message queued after it, to anyone,
    /// since the outbox went strictly in order. Order is kept within a conversation; the other
    /// conversations' messages go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_waiting_for_a_leave_commit_holds_only_its_own_messages() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            let (_carol_home, mut carol) = contact_of_alice(&mut alice, "carol", &server).await;
            let carol_key = carol.public_key().0;
            let to_carol = crate::client::messenger::Target::Person(carol_key);
            alice.send(&to_carol, "opening").await.unwrap();
            alice.group_create("team").unwrap();
            alice.group_add("team", &["bob".to_string(), "carol".to_string()]).await.unwrap();
            bob.receive(0).await.unwrap();
            bob.group_leave("team").await.unwrap();
            // alice reads bob's request to leave, and sends before committing it.
            let op = alice.begin().unwrap();
            alice.receive_round(0).await.unwrap();
            let team = crate::client::messenger::Target::Group("team".into());
            let held = alice.queue_send(&team, "to the team").unwrap();
            let goes = alice.queue_send(&to_carol, "to carol").unwrap();
            // Both typed in a connected shell: no notice unless they waited (review: the hold
            // made every other conversation's message announce itself as "queued").
            alice.send_quietly(held);
            alice.send_quietly(goes);
            let mut events = Vec::new();
            alice.flush_sends(&mut events).await.unwrap();
            assert!(alice.notices.is_empty(), "{:?}", alice.notices);
            let queued: Vec<u64> = alice.state().sends.iter().map(|s| s.id).collect();
            assert_eq!(queued, vec![held], "only the group's message waits: {events:?}");
            assert_ne!(held, goes);
            drop(op);
            let texts = texts_of(carol.receive(0).await.unwrap());
            assert!(texts.contains(&"to carol".to_string()), "{texts:?}");
            // The next round commits the leave, and the group's message follows, announced.
            alice.receive(0).await.unwrap();
            assert!(alice.state().sends.is_empty());
            assert_eq!(alice.notices, vec!["sent a queued message to #team".to_string()]);
            carol.disconnect().await;
            (server, alice, bob)
        })
        .await;
    }

    /// Found by exploratory testing: after an outage the shell said "sent a queued message to
    /// #team" once per message, forty lines for forty. One line per conversation now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_messages_that_go_together_are_said_once_per_conversation() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            use crate::client::messenger::Target;
            let to_bob = Target::Person(bob.public_key().0);
            alice.send(&to_bob, "hello").await.unwrap();
            alice.group_create("team").unwrap();
            alice.group_add("team", &["bob".to_string()]).await.unwrap();
            for text in ["one", "two", "three"] {
                alice.queue_send(&to_bob, text).unwrap();
            }
            alice.queue_send(&Target::Group("team".into()), "to the team").unwrap();
            alice.receive(0).await.unwrap();
            assert_eq!(alice.notices, ["sent 3 queued messages to bob", "sent a queued message to #team"]);
            let texts = texts_of(bob.receive(0).await.unwrap());
            assert_eq!(texts, ["hello", "one", "two", "three", "to the team"]);
            (server, alice, bob)
        })
        .await;
    }

    /// Found by exploratory testing: a reply typed before its `send` fetched the question took
    /// its place in history at the time it was typed, above the question, though it was
    /// encrypted after it and the group reads it after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_goes_after_what_its_send_fetched_first() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            use crate::client::history::HistoryQuery;
            use crate::client::messenger::Target;
            let (to_bob, to_alice) =
                (Target::Person(bob.public_key().0), Target::Person(alice.public_key().0));
            alice.send(&to_bob, "hello").await.unwrap();
            bob.receive(0).await.unwrap();
            alice.queue_send(&to_bob, "answer!").unwrap();
            alice.clock.advance(5_000);
            bob.send(&to_alice, "question?").await.unwrap();
            alice.send(&to_bob, "and more").await.unwrap();
            let conversation = alice.find_direct(&bob.public_key().0);
            let page = alice.history_page(&HistoryQuery::newest(conversation, 10)).unwrap();
            let texts: Vec<&str> = page.entries.iter().map(|e| e.entry.text.as_str()).collect();
            assert_eq!(texts, ["hello", "question?", "answer!", "and more"]);
            (server, alice, bob)
        })
        .await;
    }

    /// Review: a leave whose commit the server refused (here: a stranger filled alice's own
    /// queue, whose copy a commit needs) was forgotten, though bob's proposal stayed pending;
    /// openmls sends nothing over a pending proposal, so each message alice sent to the group
    /// was then refused and dropped. The request stays, and the next round commits it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_leave_commit_is_tried_again_and_messages_to_the_group_are_not_lost() {
        with_alice_and_bob_on(
            |cfg| cfg.max_queue_messages = 8,
            true,
            |_, server, mut alice, mut bob| async move {
                let (alice_key, alice_pk) = (alice.public_key().0, alice.public_key());
                let (_carol_home, mut carol, group_id) = team_of_three(&mut alice, &mut bob, &server).await;
                let carol_key = carol.public_key().0;
                bob.group_leave("team").await.unwrap();
                let op = alice.begin().unwrap();
                alice.receive_round(0).await.unwrap();
                assert_eq!(alice.state().leave_requests, vec![group_id.clone()]);
                let stranger = bob.anonymous().await.unwrap();
                while stranger.enqueue(&alice_pk.0, b"flood", b"").await.is_ok() {}
                let events = alice.finish_round().await.unwrap();
                let told =
                    |e: &Event| matches!(e, Event::Dropped { reason } if reason.contains("trying again"));
                assert!(events.iter().any(told), "{events:?}");
                assert_eq!(alice.state().leave_requests, vec![group_id.clone()], "the request stays");
                drop(op);

                let team = crate::client::messenger::Target::Group("team".into());
                let (fate, _) = alice.send(&team, "after the leave").await.unwrap();
                assert!(matches!(fate, crate::client::outbox::Fate::Sent { .. }), "{fate:?}");
                assert!(alice.state().leave_requests.is_empty());
                let mut members = alice.mls.members(&group_id).unwrap();
                members.sort();
                let mut want = vec![alice_key, carol_key];
                want.sort();
                assert_eq!(members, want, "bob's leave is committed");
                let events = carol.receive(0).await.unwrap();
                let read = |e: &Event| matches!(e, Event::Message(m) if m.text == "after the leave");
                assert!(events.iter().any(read), "{events:?}");
                carol.disconnect().await;
                (server, alice, bob)
            },
        )
        .await;
    }

    /// Found by exploratory testing: alice made a commit before bob's request to leave reached
    /// her, and the server placed it after the request; her commit (and carol's copy of it)
    /// took the epoch without the request, which went with it. bob stayed a member for
    /// everyone though he had asked to leave. alice now commits his removal herself, without
    /// waiting for bob to ask again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_request_a_commit_passed_over_is_committed_by_value_and_reads_as_a_leave() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            let (_carol_home, mut carol, group_id) = team_of_three(&mut alice, &mut bob, &server).await;
            let (alice_key, carol_key) = (alice.public_key().0, carol.public_key().0);
            carol.receive(0).await.unwrap();
            let epoch = alice.mls.epoch(&group_id).unwrap();

            bob.group_leave("team").await.unwrap();
            // alice's update, made without reading first: the server places it after bob's
            // request, which she reads on the way to her own commit.
            let op = alice.begin().unwrap();
            let gid = group_id.clone();
            alice
                .commit_change(&group_id, move |m| m.self_update(&gid), &[], GroupKind::Group)
                .await
                .unwrap();
            assert_eq!(alice.mls.epoch(&group_id).unwrap(), epoch + 1);
            assert_eq!(alice.mls.members(&group_id).unwrap().len(), 3, "her commit passed over the request");
            let events = alice.finish_round().await.unwrap();
            drop(op);
            let mut want = vec![alice_key, carol_key];
            want.sort();
            let mut members = alice.mls.members(&group_id).unwrap();
            members.sort();
            assert_eq!(members, want, "bob is out: {events:?}");
            assert!(alice.state().leave_requests.is_empty() && alice.state().leave_proposals.is_empty());
            // It reads as bob's leave, not as alice removing him, wherever the request was seen.
            let bob_key = bob.public_key().0;
            let left = |e: &Event| {
                matches!(e, Event::Membership { removed, left, .. } if removed.is_empty() && *left == vec![bob_key])
            };
            assert!(events.iter().any(left), "{events:?}");

            let events = carol.receive(0).await.unwrap();
            assert!(events.iter().any(left), "{events:?}");
            let mut members = carol.mls.members(&group_id).unwrap();
            members.sort();
            assert_eq!(members, want, "{events:?}");
            assert!(!events.iter().any(|e| matches!(e, Event::Dropped { .. })), "{events:?}");
            carol.disconnect().await;
            (server, alice, bob)
        })
        .await;
    }

    /// Review: only other members' commits forgot the requests of those they took out, so a
    /// request of bob's outlived alice's own commit removing him (until her round's end, which
    /// a failure can skip) and could take him out again once re-added.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn our_own_commit_taking_a_leaver_out_forgets_their_request() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            let (_carol_home, mut carol, group_id) = team_of_three(&mut alice, &mut bob, &server).await;
            let bob_key = bob.public_key().0;
            bob.group_leave("team").await.unwrap();
            let op = alice.begin().unwrap();
            alice.receive_round(0).await.unwrap();
            let key = hex::encode(&group_id);
            assert!(alice.state().leave_proposals.get(&key).is_some_and(|k| k.len() == 1));
            let gid = group_id.clone();
            let events = alice
                .commit_change(&group_id, move |m| m.remove_members(&gid, &[bob_key]), &[], GroupKind::Group)
                .await
                .unwrap();
            drop(op);
            assert!(alice.state().leave_proposals.get(&key).is_none_or(|k| k.is_empty()), "{events:?}");
            let left = |e: &Event| matches!(e, Event::Membership { left, removed, .. } if *left == vec![bob_key] && removed.is_empty());
            assert!(events.iter().any(left), "he asked to leave: {events:?}");
            carol.disconnect().await;
            (server, alice, bob)
        })
        .await;
    }

    /// The other side of `a_leave_request_a_commit_passed_over_..`: a request of bob's first
    /// stay, read by carol in one round with its commit and bob's re-add, must not take him out
    /// again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_leave_request_does_not_remove_the_leaver_once_added_back() {
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            let (_carol_home, mut carol, group_id) = team_of_three(&mut alice, &mut bob, &server).await;
            carol.receive(0).await.unwrap();
            bob.group_leave("team").await.unwrap();
            alice.receive(0).await.unwrap();
            alice.group_add("team", &["bob".to_string()]).await.unwrap();
            bob.receive(0).await.unwrap();
            assert_eq!(alice.mls.members(&group_id).unwrap().len(), 3);
            let epoch = alice.mls.epoch(&group_id).unwrap();

            let events = carol.receive(0).await.unwrap();
            assert_eq!(carol.mls.epoch(&group_id).unwrap(), epoch, "carol commits nothing: {events:?}");
            assert_eq!(carol.mls.members(&group_id).unwrap().len(), 3, "{events:?}");
            assert!(carol.state().leave_proposals.is_empty(), "{:?}", carol.state().leave_proposals);
            carol.disconnect().await;
            (server, alice, bob)
        })
        .await;
    }

    /// Review: a leave commit names the leaver's proposal by reference, so a member the
    /// proposal never reached (here carol: a stranger had filled her queue when bob sent it)
    /// could not process the commit and stayed behind for good. The committer now sends the
    /// proposal to every member again before its commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_proposal_that_missed_a_member_reaches_her_before_the_commit() {
        with_alice_and_bob_on(
            |cfg| cfg.max_queue_messages = 8,
            true,
            |_, server, mut alice, mut bob| async move {
                let (_carol_home, mut carol) = contact_of_alice(&mut alice, "carol", &server).await;
                let (_dave_home, mut dave) = contact_of_alice(&mut alice, "dave", &server).await;
                let carol_key = carol.public_key().0;
                let group_id = alice.group_create("team").unwrap();
                let invited = ["bob", "carol", "dave"].map(String::from);
                alice.group_add("team", &invited).await.unwrap();
                for m in [&mut bob, &mut carol, &mut dave] {
                    m.receive(0).await.unwrap();
                }

                let stranger = bob.anonymous().await.unwrap();
                while stranger.enqueue(&carol_key, b"flood", b"").await.is_ok() {}
                bob.group_leave("team").await.unwrap();
                carol.receive(0).await.unwrap(); // the flood, without bob's proposal
                // dave gets it, and commits nothing yet (only a whole receive would).
                let op = dave.begin().unwrap();
                dave.receive_round(0).await.unwrap();
                drop(op);
                alice.receive(0).await.unwrap(); // bob's proposal: alice passes it on, commits it
                assert_eq!(alice.mls.members(&group_id).unwrap().len(), 3, "alice committed the leave");
                assert!(alice.state().leave_proposals.is_empty(), "{:?}", alice.state().leave_proposals);

                let no_drop = |events: &[Event]| !events.iter().any(|e| matches!(e, Event::Dropped { .. }));
                let left = |e: &Event| matches!(e, Event::Membership { left, .. } if left.len() == 1);
                let epoch = alice.mls.epoch(&group_id).unwrap();
                let events = carol.receive(0).await.unwrap();
                assert_eq!(carol.mls.epoch(&group_id).unwrap(), epoch, "{events:?}");
                assert!(events.iter().any(left) && no_drop(&events), "carol sees bob leave: {events:?}");
                // dave had the proposal: its copy is dropped without a word.
                let events = dave.receive(0).await.unwrap();
                assert_eq!(dave.mls.epoch(&group_id).unwrap(), epoch, "{events:?}");
                assert!(events.iter().any(left) && no_drop(&events), "dave: {events:?}");
                let team = crate::client::messenger::Target::Group("team".into());
                alice.send(&team, "still here").await.unwrap();
                let events = carol.receive(0).await.unwrap();
                let read = |e: &Event| matches!(e, Event::Message(m) if m.text == "still here");
                assert!(events.iter().any(read), "{events:?}");
                carol.disconnect().await;
                dave.disconnect().await;
                (server, alice, bob)
            },
        )
        .await;
    }

    /// Review: every refill or upload of unknown outcome added a pool of KeyPackage keys, kept
    /// for 93 days, with no bound: a stranger (drain, junk Welcome, repeat) or a hostile server
    /// (a count of 0 every round) grew the home without end. Past the cap the oldest keys go,
    /// never the current last-resort package's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_key_packages_a_client_holds_are_capped_oldest_first() {
        use crate::client::keypool::Published;
        use crate::limits::MAX_HELD_KEY_PACKAGES;
        with_alice_and_bob(true, |_, server, mut alice, bob| async move {
            let first: Vec<Vec<u8>> =
                alice.state().key_pool.published.iter().map(|p| p.hash_ref.clone()).collect();
            assert!(!first.is_empty() && first.iter().all(|r| alice.mls.has_key_package(r)));
            let newest = alice.state().key_pool.published.iter().map(|p| p.not_after).max().unwrap();
            {
                let _op = alice.begin().unwrap();
                let pool = &mut alice.home.state.key_pool.published;
                // Younger than what the rotation makes (as after a clock that went back).
                for i in 0..MAX_HELD_KEY_PACKAGES {
                    let mut hash_ref = vec![0xee; 32];
                    hash_ref[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    let not_after = newest + crate::limits::KEY_PACKAGE_LIFETIME_SECS;
                    pool.push(Published { hash_ref, not_after, last_resort: false });
                }
                alice.home.save().unwrap();
            }
            alice.connect().await.unwrap();
            let before: std::collections::HashSet<Vec<u8>> =
                alice.state().key_pool.published.iter().map(|p| p.hash_ref.clone()).collect();
            alice.rotate_key_packages().await.unwrap();
            let s = alice.state();
            assert_eq!(s.key_pool.published.len(), MAX_HELD_KEY_PACKAGES);
            let new: Vec<&Published> =
                s.key_pool.published.iter().filter(|p| !before.contains(&p.hash_ref)).collect();
            assert_eq!(
                new.len(),
                crate::client::messenger::KEY_PACKAGE_POOL + 1,
                "what was just published stays"
            );
            assert!(new.iter().all(|p| alice.mls.has_key_package(&p.hash_ref)));
            assert!(
                s.key_pool.published.iter().any(|p| p.hash_ref == s.last_resort_ref),
                "the new last resort stays"
            );
            assert!(first.iter().all(|r| !alice.mls.has_key_package(r)), "the oldest keys were deleted");
            (server, alice, bob)
        })
        .await;
    }

    /// A backlog larger than the inbox came in one round: the round kept it all in memory and
    /// the inbox dropped the oldest before any reader saw them ("N earlier messages not
    /// shown"). Rounds now end where the next page might not fit, and the reader shows each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_larger_than_the_inbox_comes_in_rounds_a_reader_sees_whole() {
        use crate::client::messenger::{MAX_TEXT_BYTES, Target};
        use crate::limits::MAX_INBOX_BYTES;
        with_alice_and_bob(true, |_, server, mut alice, mut bob| async move {
            let bob_key = bob.public_key().0;
            let text = |i: usize| format!("{i:03} {}", "x".repeat(MAX_TEXT_BYTES - 16));
            let n = MAX_INBOX_BYTES / MAX_TEXT_BYTES + 8;
            for i in 0..n {
                alice.send(&Target::Person(bob_key), &text(i)).await.unwrap();
            }
            let mut cursor = bob.read_cursor().unwrap();
            let (mut shown, mut missed, mut rounds) = (Vec::new(), 0, 0);
            loop {
                bob.receive(0).await.unwrap();
                rounds += 1;
                let unread = bob.read_inbox(&mut cursor).unwrap();
                missed += unread.missed;
                shown.extend(unread.messages().map(|e| e.text.clone()));
                if !bob.has_backlog() {
                    break;
                }
                assert!(rounds < 10, "the backlog ends");
            }
            assert_eq!(missed, 0);
            assert_eq!(shown, (0..n).map(text).collect::<Vec<_>>(), "every message, once, in order");
            assert!(rounds >= 2, "{rounds} rounds");
            // The round ends were acked: nothing comes again.
            bob.receive(0).await.unwrap();
            assert!(bob.read_inbox(&mut cursor).unwrap().items.is_empty());
            (server, alice, bob)
        })
        .await;
    }

    /// A stranger's group sent more than a request holds while it waited, a commit among it:
    /// the commit was dropped with the overflow, so the accepted group could read nothing new.
    /// The request now keeps the group's commits first (and the newest chat).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_overflows_keeps_its_groups_commits() {
        use crate::client::messenger::Target;
        use crate::client::requests::RequestSelector;
        use crate::limits::MAX_HELD_PER_REQUEST;
        with_alice_and_bob(false, |_, server, mut alice, mut bob| async move {
            let bob_key = bob.public_key().0;
            alice.group_create("team").unwrap();
            alice.group_add("team", &[hex::encode(bob_key)]).await.unwrap();
            let team = Target::Group("team".into());
            let n = MAX_HELD_PER_REQUEST + 5;
            for i in 0..n {
                alice.send(&team, &format!("before {i}")).await.unwrap();
            }
            alice.group_update("team").await.unwrap();
            alice.send(&team, "after the commit").await.unwrap();
            let events = bob.receive(0).await.unwrap();
            assert!(events.iter().any(|e| matches!(e, Event::Request { .. })), "{events:?}");

            let (accepted, failure) = bob.request_accept(&RequestSelector::Number(1), "#1", true).unwrap();
            assert!(failure.is_none(), "{failure:?}");
            let texts: Vec<String> = accepted
                .iter()
                .filter_map(|e| match e {
                    Event::Message(m) => Some(m.text.clone()),
                    _ => None,
                })
                .collect();
            let mut want: Vec<String> =
                (n + 1 - MAX_HELD_PER_REQUEST..n).map(|i| format!("before {i}")).collect();
            want.push("after the commit".into());
            assert_eq!(texts, want, "the newest chat is kept: {accepted:?}");
            alice.send(&team, "later").await.unwrap();
            let mut cursor = bob.read_cursor().unwrap();
            let events = bob.receive(0).await.unwrap();
            let unread: Vec<String> =
                bob.read_inbox(&mut cursor).unwrap().messages().map(|e| e.text.clone()).collect();
            assert_eq!(unread, vec!["later".to_string()], "bob follows the group: {events:?}");
            (server, alice, bob)
        })
        .await;
    }

    /// A commit's fanout includes the committer: its own copy, in the channel's order, tells it
    /// that the commit won. When only bob's own queue was full (a stranger flooded it between
    /// his catch-up and his commit), the server skipped him and stored the commit for alice:
    /// she moved to the next epoch, and bob waited for his copy, timed out and stayed behind
    /// for good. His own copy is now required: the commit is refused and void for everyone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_whose_committers_queue_is_full_reaches_no_one() {
        use crate::proto::wire_error::ErrorCode;
        with_alice_and_bob_on(
            |cfg| cfg.max_queue_messages = 8,
            true,
            |_, server, mut alice, mut bob| async move {
                let bob_key = bob.public_key().0;
                let group_id = alice.group_create("team").unwrap();
                alice.group_add("team", &["bob".to_string()]).await.unwrap();
                bob.receive(0).await.unwrap();
                alice.receive(0).await.unwrap();
                let epoch = alice.mls.epoch(&group_id).unwrap();
                assert_eq!(bob.mls.epoch(&group_id).unwrap(), epoch);

                // bob caught up; then a stranger fills his queue before his commit goes.
                bob.connect().await.unwrap();
                let stranger = alice.anonymous().await.unwrap();
                while stranger.enqueue(&bob_key, b"flood", b"").await.is_ok() {}
                let op = bob.begin().unwrap();
                let gid = group_id.clone();
                let committed =
                    bob.commit_change(&group_id, move |m| m.self_update(&gid), &[], GroupKind::Group).await;
                drop(op);
                let code = match &committed {
                    Err(ClientError::Session(e)) => e.code(),
                    _ => None,
                };
                assert_eq!(code, Some(ErrorCode::QueueFull), "{committed:?}");
                assert!(bob.state().pending_commits.is_empty(), "the commit is void");
                assert_eq!(bob.mls.epoch(&group_id).unwrap(), epoch);
                alice.receive(0).await.unwrap();
                assert_eq!(alice.mls.epoch(&group_id).unwrap(), epoch, "alice got no commit");

                // Once his queue drains, bob's messages read as ever and his next commit wins.
                bob.receive(0).await.unwrap();
                let team = crate::client::messenger::Target::Group("team".into());
                bob.send(&team, "still here").await.unwrap();
                let events = alice.receive(0).await.unwrap();
                let read = |e: &Event| matches!(e, Event::Message(m) if m.text == "still here");
                assert!(events.iter().any(read), "{events:?}");
                bob.group_update("team").await.unwrap();
                alice.receive(0).await.unwrap();
                assert_eq!(alice.mls.epoch(&group_id).unwrap(), epoch + 1);
                assert_eq!(bob.mls.epoch(&group_id).unwrap(), epoch + 1);
                (server, alice, bob)
            },
        )
        .await;
    }

    /// The upkeep notice is said once per process and kind of answer. With the wait after a
    /// refusal (`client::keypool`), each waiting round counted as a success and made the next
    /// refusal say it again: a shell repeated it at every retry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_key_storage_is_told_once_across_the_waits_between_tries() {
        let [server_dir, home] = [(); 2].map(|()| tempfile::tempdir().unwrap());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let server = start(server_dir.path()).await;
                let mut bob = person(home.path(), "bob", &server).await;
                bob.disconnect().await;
                server.shutdown().await.unwrap();
                let server = start_with(server_dir.path(), |c| c.max_key_bytes = 1).await;
                bob.opts = opts(&server);
                let told = |events: &[Event]| {
                    events
                        .iter()
                        .filter(|e| matches!(e, Event::Dropped { reason } if reason.contains("could not publish new key packages yet")))
                        .count()
                };
                bob.home.state.rotate_last_resort = true;
                assert_eq!(told(&bob.receive(0).await.unwrap()), 1, "refused and told");
                let waiting = bob.state().key_upload_backoff;
                assert!(waiting.refusals == 1 && waiting.waiting(bob.now_ms() / 1000));
                assert_eq!(told(&bob.receive(0).await.unwrap()), 0, "waiting: nothing tried");
                bob.clock.advance(61_000);
                assert_eq!(told(&bob.receive(0).await.unwrap()), 0, "refused again: already told");
                assert_eq!(bob.state().key_upload_backoff.refusals, 2, "it did try");
                bob.disconnect().await;
                server.shutdown().await.unwrap();
            })
            .await;
    }

    /// A Welcome into a group bob was removed from, from mallory who was never in it (group
    /// ids are their creator's choice): even from a contact it joins nothing by itself. It
    /// waits as a request that says so, bob's #team keeps its name and stays left meanwhile,
    /// and it joins only once bob accepts it.
    #[test]
    fn a_welcome_into_a_left_group_from_a_non_member_waits_as_a_request_that_says_so() {
        use crate::client::requests::RequestSelector;
        use crate::client::testing::offline_messenger;
        use crate::mls::MlsClient;
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let mut carol = MlsClient::new(&rand::random()).unwrap();
        let mut mallory = MlsClient::new(&rand::random()).unwrap();
        bob.home.state.contacts.insert("carol".into(), carol.identity());
        bob.home.state.contacts.insert("mallory".into(), mallory.identity());
        let group = b"team-id".to_vec();
        carol.create_group(&group).unwrap();
        let kp = bob.mls.key_packages(1).unwrap().remove(0).bytes;
        let welcome = carol.add_members(&group, &[kp]).unwrap().welcome.unwrap();
        carol.merge_pending(&group).unwrap();
        let mut events = Vec::new();
        bob.handle_welcome(&welcome, "team", GroupKind::Group, carol.identity(), &mut events);
        let removal = carol.remove_members(&group, &[bob.public_key().0]).unwrap();
        carol.merge_pending(&group).unwrap();
        bob.handle_group_message(&group, &removal.commit, None, &mut events);
        let key = hex::encode(&group);
        assert!(bob.state().groups.get(&key).is_some_and(|g| !g.active && g.name == "team"), "{events:?}");

        mallory.create_group(&group).unwrap();
        for _ in 0..bob.mls.epoch(&group).unwrap() {
            mallory.self_update(&group).unwrap();
            mallory.merge_pending(&group).unwrap();
        }
        let kp = bob.mls.key_packages(1).unwrap().remove(0).bytes;
        let welcome = mallory.add_members(&group, &[kp]).unwrap().welcome.unwrap();
        let mut events = Vec::new();
        assert!(bob.rejoin_by_a_newcomer(&group, &mallory.identity()));
        assert!(!bob.rejoin_by_a_newcomer(&group, &carol.identity()), "carol was in it");
        bob.handle_welcome(&welcome, "team", GroupKind::Group, mallory.identity(), &mut events);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]), "{events:?}");
        assert!(bob.state().groups.get(&key).is_some_and(|g| !g.active && g.name == "team"));
        let list = bob.requests().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reuses_left.as_deref(), Some("#team"));

        // Accepted: bob is in mallory's group under his old name for it.
        let (joined, failure) =
            bob.request_accept(&RequestSelector::Number(list[0].number), "#1", true).unwrap();
        assert!(failure.is_none(), "{failure:?}");
        assert!(joined.iter().any(|e| matches!(e, Event::Joined { .. })), "{joined:?}");
        assert!(bob.state().groups.get(&key).is_some_and(|g| g.active && g.name == "team"));
        let mut members = bob.mls.members(&group).unwrap();
        members.sort_unstable();
        let mut want = vec![bob.public_key().0, mallory.identity()];
        want.sort_unstable();
        assert_eq!(members, want);
    }
}
