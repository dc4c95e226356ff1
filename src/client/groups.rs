//! Group management and the commit protocol (one commit per epoch, see [`super::messenger`]).

use rand::RngCore;

use crate::client::frame::Frame;
use crate::client::messenger::{Carried, ClientError, CommitStatus, Event, Messenger, same_name, valid_name};
use crate::client::state::KeptProposal;
use crate::client::state::{GroupKind, GroupMeta, Outgoing, PendingCommit};
use crate::crypto::identity::PublicKey;
use crate::mls::{self, KeyPackageError, MlsClient, Pending};
use crate::proto::wire_error::ErrorCode;

/// How many times a change is retried after losing its epoch to a concurrent commit.
pub const MAX_COMMIT_ATTEMPTS: usize = 8;
/// Long-poll rounds spent waiting for our own commit to come back from the server.
const CONFIRM_ROUNDS: usize = 6;
/// Long-poll length of one confirmation round.
const CONFIRM_WAIT_MS: u32 = 5_000;

/// What `group add` did.
#[derive(Debug)]
pub struct Added {
    /// What catching up brought in, and the membership change itself.
    pub events: Vec<Event>,
    /// Added members whose Welcome still waits in the outbox (the server went out of reach after
    /// the commit won): they are members, and read the group once the Welcome goes.
    pub welcome_queued: Vec<[u8; 32]>,
}

/// A member of a group, for listing.
#[derive(Debug, Clone)]
pub struct Member {
    pub key: PublicKey,
    pub name: Option<String>,
    pub me: bool,
}

/// A group, for listing.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    pub name: String,
    pub group_id: Vec<u8>,
    /// A named group, or a direct conversation and its other person.
    pub kind: GroupKind,
    pub active: bool,
    pub members: usize,
    pub epoch: u64,
}

impl GroupSummary {
    pub fn is_direct(&self) -> bool {
        matches!(self.kind, GroupKind::Direct { .. })
    }
}

impl Messenger {
    /// Creates a group with only us in it. Local until someone is added.
    pub fn group_create(&mut self, name: &str) -> Result<Vec<u8>, ClientError> {
        if !valid_name(name) {
            return Err(ClientError::BadName(name.to_string()));
        }
        let _op = self.begin()?;
        let groups = self.home.state.groups.values();
        if let Some(g) =
            groups.filter(|g| g.active && g.kind == GroupKind::Group).find(|g| same_name(&g.name, name))
        {
            return Err(ClientError::GroupExists(g.name.clone()));
        }
        // A group we left by that name keeps its history under a free name, and `#name` is the
        // new one (exploratory testing: `group list` showed two `#solo`, and once both were
        // left `history '#solo'` showed the old one's only).
        let left: Vec<String> = (self.home.state.groups.iter())
            .filter(|(_, g)| !g.active && g.kind == GroupKind::Group && same_name(&g.name, name))
            .map(|(k, _)| k.clone())
            .collect();
        let mut renamed = Vec::new();
        for key in left {
            let Some(old) = self.home.state.groups.get(&key).map(|g| g.name.clone()) else { continue };
            let fresh = self.unique_group_name(&old);
            if let Some(g) = self.home.state.groups.get_mut(&key) {
                g.name = fresh.clone();
                renamed.push(format!("the group you left named #{old} is now #{fresh}, with its history"));
            }
        }
        let group_id = new_group_id();
        self.mls.create_group(&group_id)?;
        self.home.state.groups.insert(
            hex::encode(&group_id),
            GroupMeta {
                name: name.to_string(),
                kind: GroupKind::Group,
                active: true,
                history: Default::default(),
            },
        );
        self.persist()?;
        // Said once it is saved.
        self.notices.extend(renamed);
        Ok(group_id)
    }

    /// Opens a direct conversation with `peer`: a new two-member group.
    pub(crate) async fn create_direct(&mut self, peer: [u8; 32]) -> Result<Vec<u8>, ClientError> {
        // Everything that can fail on bad input happens before any state changes.
        let kp = self.fetch_checked_key_package(&peer).await?;
        self.hybrid_key_of(&peer).await?;
        let group_id = new_group_id();
        self.mls.create_group(&group_id)?;
        self.home.state.groups.insert(
            hex::encode(&group_id),
            GroupMeta {
                name: String::new(),
                kind: GroupKind::Direct { peer },
                active: true,
                history: Default::default(),
            },
        );
        self.persist()?;
        let kps = vec![kp];
        let added = self
            .commit_change(&group_id, |m| m.add_members(&group_id, &kps), &[peer], GroupKind::Direct { peer })
            .await;
        if let Err(e) = added {
            let unknown = matches!(&e, ClientError::Session(se) if !se.is_definite_refusal());
            if !unknown {
                // The conversation never came to be: forget it, so the next send starts afresh.
                self.home.state.groups.remove(&hex::encode(&group_id));
                self.home.state.timelines.forget(&hex::encode(&group_id));
                self.mls.delete_group(&group_id)?;
                self.persist()?;
            }
            return Err(e);
        }
        Ok(group_id)
    }

    /// The group `name` names, caught up first when it is not known (or not as a member): an
    /// invitation may wait on the server (exploratory testing: `send '#g7'` right after being
    /// added said "no group named #g7" until a `recv`). What the catch-up brought goes to
    /// `events`; with the server out of reach, the lookup's own error.
    pub(crate) async fn find_group_fetching(
        &mut self,
        name: &str,
        events: &mut Vec<Event>,
    ) -> Result<Vec<u8>, ClientError> {
        match self.find_group(name) {
            Err(e @ (ClientError::UnknownGroup(_) | ClientError::NotMember(_))) => {
                if self.connect().await.is_err() {
                    return Err(e);
                }
                let _op = self.begin()?;
                events.extend(self.catch_up().await?);
                self.find_group(name)
            }
            found => found,
        }
    }

    /// The keys `members` name (contact names, keys, short keys), each once however often it
    /// is named (exploratory testing: `group add team bob bob` failed in MLS with a raw key).
    fn people(&self, members: &[String]) -> Result<Vec<[u8; 32]>, ClientError> {
        let mut keys = Vec::with_capacity(members.len());
        for m in members {
            let k = self.resolve_person(m)?;
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Ok(keys)
    }

    /// Adds people (contact names or hex keys) to a group. The commit won when this returns
    /// `Ok`; [`Added::welcome_queued`] names the new members whose Welcome did not leave yet.
    pub async fn group_add(&mut self, name: &str, members: &[String]) -> Result<Added, ClientError> {
        let keys = self.people(members)?;
        let mut events = Vec::new();
        let group_id = self.find_group_fetching(name, &mut events).await?;
        self.connect().await?;
        let _op = self.begin()?;
        events.extend(self.catch_up().await?);
        // Someone who just left is still a member until their leave is committed: commit it
        // first, so they can be added again (issue 10, bug 1).
        if self.home.state.leave_requests.contains(&group_id) {
            events.extend(self.commit_leave_requests(&group_id).await?);
            self.home.state.leave_requests.retain(|g| *g != group_id);
            self.home.state.leave_proposals.remove(&hex::encode(&group_id));
            self.persist()?;
        }
        let current = self.mls.members(&group_id)?;
        for k in &keys {
            if *k == self.identity.public().0 {
                return Err(ClientError::AddSelf(name.to_string()));
            }
            if current.contains(k) {
                return Err(ClientError::AlreadyMember {
                    who: self.display_name(k),
                    group: name.to_string(),
                });
            }
        }
        let mut kps = Vec::with_capacity(keys.len());
        for k in &keys {
            kps.push(self.fetch_checked_key_package(k).await?);
            self.hybrid_key_of(k).await?;
        }
        let gid = group_id.clone();
        events.extend(
            self.commit_change(&group_id, move |m| m.add_members(&gid, &kps), &keys, GroupKind::Group)
                .await?,
        );
        events.extend(self.finish_round().await?);
        // Members whose Welcome the server refused will never read the group: not a success.
        let refused = events.iter().find_map(|e| match e {
            Event::WelcomeRefused { to, reason } if to.iter().any(|k| keys.contains(k)) => {
                Some((to.clone(), reason.clone()))
            }
            _ => None,
        });
        if let Some((to, reason)) = refused {
            let who = to.iter().map(|k| self.display_name(k)).collect::<Vec<_>>().join(" ");
            return Err(ClientError::WelcomeRefused { who, group: name.to_string(), reason });
        }
        // The connection was lost after the commit won: the Welcome waits in the outbox (durably)
        // and any later command that connects sends it. Said, so the caller does not take the
        // add for delivered (issue 11).
        let mut welcome_queued: Vec<[u8; 32]> = self
            .home
            .state
            .outbox
            .iter()
            .flat_map(|o| o.recipients.iter())
            .filter(|k| keys.contains(k))
            .copied()
            .collect();
        welcome_queued.sort_unstable();
        welcome_queued.dedup();
        Ok(Added { events, welcome_queued })
    }

    /// Removes people from a group.
    pub async fn group_remove(&mut self, name: &str, members: &[String]) -> Result<Vec<Event>, ClientError> {
        let keys = self.people(members)?;
        let mut events = Vec::new();
        let group_id = self.find_group_fetching(name, &mut events).await?;
        self.connect().await?;
        let _op = self.begin()?;
        events.extend(self.catch_up().await?);
        let current = self.mls.members(&group_id)?;
        for k in &keys {
            if !current.contains(k) {
                return Err(ClientError::NotAMember { who: self.display_name(k), group: name.to_string() });
            }
            if *k == self.identity.public().0 {
                return Err(ClientError::RemoveSelf(name.to_string()));
            }
        }
        let gid = group_id.clone();
        events.extend(
            self.commit_change(&group_id, move |m| m.remove_members(&gid, &keys), &[], GroupKind::Group)
                .await?,
        );
        events.extend(self.finish_round().await?);
        Ok(events)
    }

    /// Rotates our leaf key in a group (post-compromise security).
    pub async fn group_update(&mut self, name: &str) -> Result<Vec<Event>, ClientError> {
        let group_id = self.find_group(name)?;
        self.connect().await?;
        let _op = self.begin()?;
        let mut events = self.catch_up().await?;
        let gid = group_id.clone();
        events.extend(
            self.commit_change(&group_id, move |m| m.self_update(&gid), &[], GroupKind::Group).await?,
        );
        events.extend(self.finish_round().await?);
        Ok(events)
    }

    /// Leaves a group: asks the others to commit our removal and stops using it at once.
    pub async fn group_leave(&mut self, name: &str) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        let group_id = self.find_group_fetching(name, &mut events).await?;
        self.connect().await?;
        let _op = self.begin()?;
        events.extend(self.catch_up().await?);
        let me = self.identity.public().0;
        let others: Vec<[u8; 32]> = self.mls.members(&group_id)?.into_iter().filter(|m| *m != me).collect();
        if !others.is_empty() {
            self.request_leave(&group_id, &others).await?;
        }
        if let Some(g) = self.home.state.groups.get_mut(&hex::encode(&group_id)) {
            g.active = false;
        }
        // Inactive, the group's messages are no longer processed: nothing to compare them with.
        self.home.state.placed_sends.remove(&hex::encode(&group_id));
        let left =
            Event::Membership { group_id, by: me, added: Vec::new(), removed: Vec::new(), left: vec![me] };
        self.membership_event(left, &mut events);
        self.persist()?;
        Ok(events)
    }

    /// Sends our request to leave `group_id` (a Remove proposal of our own leaf, RFC 9420
    /// section 12.1.3) to `others` and notes the epoch it went out in, so that a commit passing
    /// over it is followed by the request again ([`Messenger::repeat_leave_requests`]).
    async fn request_leave(&mut self, group_id: &[u8], others: &[[u8; 32]]) -> Result<(), ClientError> {
        let epoch = self.mls.epoch(group_id)?;
        let proposal = self.mls.leave_group(group_id)?;
        self.persist()?;
        crate::failpoint::hit("leave-proposed");
        let frame = Frame::Mls { group_id: group_id.to_vec(), message: proposal }.encode();
        let skipped = self.fan_out(group_id, others, &frame).await?;
        self.note_skipped(group_id, &skipped, Carried::LeaveRequest);
        self.home.state.leaving.insert(hex::encode(group_id), epoch);
        Ok(())
    }

    /// Asks again to leave the groups we left whose removal a commit passed over: another
    /// member committed something else in the epoch of our request (made before the request
    /// reached them, or before it reached anyone, the server placing it after their commit),
    /// so the request went with its epoch and we stayed a member for everyone else. Groups
    /// whose removal was committed are forgotten here. Lost connections wait for the next
    /// round; any other failure (a refusal) is said, and left to the next process, so that a
    /// refusing server does not get a request a round.
    pub(crate) async fn repeat_leave_requests(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        let me = self.identity.public().0;
        for (key, asked_in) in self.home.state.leaving.clone() {
            let Ok(group_id) = hex::decode(&key) else { continue };
            let members = self.mls.members(&group_id).unwrap_or_default();
            let still_in = self.mls.is_active(&group_id).unwrap_or(false) && members.contains(&me);
            let others: Vec<[u8; 32]> = members.into_iter().filter(|m| *m != me).collect();
            if !still_in || others.is_empty() {
                self.home.state.leaving.remove(&key);
                self.persist()?;
                continue;
            }
            if self.mls.epoch(&group_id).is_ok_and(|e| e != asked_in)
                && !self.leave_repeat_failed.contains(&group_id)
            {
                match self.request_leave(&group_id, &others).await {
                    Ok(()) => self.persist()?,
                    Err(ClientError::Session(e)) if !e.is_refusal_of_the_call() => return Err(e.into()),
                    Err(e) => {
                        let group = self.conversation_name(&group_id);
                        events.push(Event::Dropped {
                            reason: format!(
                                "could not ask again to leave {group} (a change passed over your request): {e}; the next command tries again"
                            ),
                        });
                        self.leave_repeat_failed.insert(group_id);
                    }
                }
            }
        }
        Ok(events)
    }

    /// Commits pending leave proposals of `group_id` (someone asked to leave).
    ///
    /// The proposals go out again first, to every member, on the group's channel: the commit
    /// names them by reference (RFC 9420 section 12.4), and a member who never got one (the
    /// leaver sent it to some members only, or skipped a full queue) could not process the
    /// commit and would stay behind for good. Those who have it already drop the copy (its
    /// key was used, section 9.2).
    ///
    /// Once per epoch per process: a commit refused and tried again each round does not send
    /// the copies again (each takes a slot of every member's queue). The leavers get none.
    pub(crate) async fn commit_leave_requests(&mut self, group_id: &[u8]) -> Result<Vec<Event>, ClientError> {
        let key = hex::encode(group_id);
        let epoch = self.mls.epoch(group_id)?;
        let proposals: Vec<KeptProposal> = self
            .home
            .state
            .leave_proposals
            .get(&key)
            .map(|kept| kept.iter().filter(|p| p.epoch == epoch).cloned().collect())
            .unwrap_or_default();
        let me = self.identity.public().0;
        let others: Vec<[u8; 32]> = self
            .mls
            .members(group_id)?
            .into_iter()
            .filter(|k| *k != me && !proposals.iter().any(|p| p.sender == *k))
            .collect();
        // With nobody but us and the leavers there is no one to pass the proposals on to (a
        // fanout to nobody is refused: the last member was stuck with the leave uncommitted,
        // and every message queued behind it with it).
        if !proposals.is_empty()
            && !others.is_empty()
            && self.mls.has_pending_proposals(group_id)
            && self.leave_relayed.insert((group_id.to_vec(), epoch))
        {
            for p in proposals {
                let frame = Frame::Mls { group_id: group_id.to_vec(), message: p.message }.encode();
                self.fan_out(group_id, &others, &frame).await?;
            }
        }
        // A request of a past epoch whose sender is still a member was passed over by a commit
        // that did not cover it (made before the request reached its committer): the request
        // went with its epoch, so we commit the removal itself (RFC 9420 section 12.1.3, by
        // value) along with whatever is pending. Worked out again for each attempt, since a
        // commit that beats ours may pass over a request of this epoch the same way.
        let asked: Vec<([u8; 32], u64)> = self
            .home
            .state
            .leave_proposals
            .get(&key)
            .map(|kept| kept.iter().filter(|p| p.sender != me).map(|p| (p.sender, p.epoch)).collect())
            .unwrap_or_default();
        let gid = group_id.to_vec();
        let make = move |m: &mut MlsClient| {
            let (epoch, members) = (m.epoch(&gid)?, m.members(&gid)?);
            let passed_over: Vec<[u8; 32]> = asked
                .iter()
                .filter(|(sender, asked_in)| *asked_in < epoch && members.contains(sender))
                .map(|(sender, _)| *sender)
                .collect();
            if !passed_over.is_empty() {
                return m.remove_members(&gid, &passed_over);
            }
            m.commit_pending_proposals(&gid)?.ok_or(mls::MlsError::EmptyInput("no pending proposals"))
        };
        match self.commit_change(group_id, make, &[], GroupKind::Group).await {
            // Someone else committed the leave first: nothing left to do.
            Err(ClientError::Mls(mls::MlsError::EmptyInput(_))) => Ok(Vec::new()),
            other => other,
        }
    }

    /// Lists our groups (named groups and direct conversations).
    pub fn group_list(&self) -> Vec<GroupSummary> {
        let mut out: Vec<GroupSummary> = self
            .home
            .state
            .groups
            .iter()
            .filter_map(|(id, g)| {
                let group_id = hex::decode(id).ok()?;
                let members =
                    if g.active { self.mls.members(&group_id).map(|m| m.len()).unwrap_or(0) } else { 0 };
                Some(GroupSummary {
                    name: self.conversation_name(&group_id),
                    epoch: self.mls.epoch(&group_id).unwrap_or(0),
                    kind: g.kind.clone(),
                    active: g.active,
                    group_id,
                    members,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.is_direct(), &a.name).cmp(&(b.is_direct(), &b.name)));
        out
    }

    /// The group called `name`, or when there is none, the direct conversation with the person
    /// `name` names (a contact, a key): what `group members` and `group info` look at, since
    /// `group list` lists both.
    pub fn group_or_direct(&self, name: &str) -> Result<Vec<u8>, ClientError> {
        match self.find_group(name) {
            Err(e @ ClientError::UnknownGroup(_)) => {
                self.resolve_person(name).ok().and_then(|k| self.find_direct(&k)).ok_or(e)
            }
            found => found,
        }
    }

    /// Members of a group (or direct conversation), as this client's MLS state sees them.
    pub fn group_members(&self, name: &str) -> Result<Vec<Member>, ClientError> {
        let group_id = self.group_or_direct(name)?;
        let me = self.identity.public().0;
        Ok(self
            .mls
            .members(&group_id)?
            .into_iter()
            .map(|k| Member {
                key: PublicKey(k),
                name: self.contact_name(&k).map(str::to_string),
                me: k == me,
            })
            .collect())
    }

    /// The MLS ciphersuite of a group, by name and number (`MLS_128_..._Ed25519 (0x004f)`).
    pub fn group_ciphersuite(&self, name: &str) -> Result<String, ClientError> {
        let suite = self.mls.ciphersuite(&self.group_or_direct(name)?)?;
        Ok(format!("{suite:?} ({:#06x})", u16::from(suite)))
    }

    /// The group id of a conversation by its display name (`#team` or a contact/key); a group we
    /// left or were removed from still has its history.
    pub fn conversation_id(&self, target: &str) -> Result<Vec<u8>, ClientError> {
        match self.resolve_target(target)? {
            crate::client::messenger::Target::Group(g) => match self.find_group(&g) {
                Err(ClientError::NotMember(_)) => {
                    self.any_group_named(&g).ok_or(ClientError::UnknownGroup(g))
                }
                found => found,
            },
            crate::client::messenger::Target::Person(p) => {
                self.find_direct(&p).ok_or_else(|| ClientError::UnknownContact(target.to_string()))
            }
        }
    }

    pub fn epoch(&self, group_id: &[u8]) -> u64 {
        self.mls.epoch(group_id).unwrap_or(0)
    }

    /// Fetches a KeyPackage of `who` and checks it really is theirs.
    async fn fetch_checked_key_package(&mut self, who: &[u8; 32]) -> Result<Vec<u8>, ClientError> {
        let looked_up = self.anonymous().await?.fetch_key_package(who).await;
        let fetched = looked_up.map_err(|e| match e {
            e if e.code() == Some(ErrorCode::NoKeyPackages) => {
                ClientError::NoKeyPackages { who: self.display_name(who) }
            }
            other => other.into(),
        })?;
        let v = mls::validate_key_package(&fetched.bytes, self.mls.now_secs()).map_err(|e| match e {
            KeyPackageError::Expired { .. } | KeyPackageError::NotYetValid { .. } => {
                ClientError::KeyPackageLifetime { who: self.display_name(who), reason: e.to_string() }
            }
            _ => ClientError::ForeignKeyPackage(self.display_name(who)),
        })?;
        if v.identity != *who {
            return Err(ClientError::ForeignKeyPackage(self.display_name(who)));
        }
        Ok(fetched.bytes)
    }

    /// Runs the commit protocol for one change: stage it, send it to every member including us,
    /// merge it if ours comes back first, otherwise retry on the new epoch. Sends the Welcome
    /// (to `added`) only after the commit won.
    pub(crate) async fn commit_change<F>(
        &mut self,
        group_id: &[u8],
        mut make: F,
        added: &[[u8; 32]],
        kind: GroupKind,
    ) -> Result<Vec<Event>, ClientError>
    where
        F: FnMut(&mut MlsClient) -> Result<Pending, mls::MlsError>,
    {
        let mut events = Vec::new();
        let key = hex::encode(group_id);
        for _attempt in 0..MAX_COMMIT_ATTEMPTS {
            let pending = make(&mut self.mls)?;
            let welcome = match pending.welcome {
                Some(welcome) => {
                    let group_name =
                        self.home.state.groups.get(&key).map(|g| g.name.clone()).unwrap_or_default();
                    let inviter = self.identity.public().0;
                    let frame = Frame::Welcome { welcome, group_name, kind: kind.clone(), inviter }.encode();
                    Some(Outgoing { channel: Vec::new(), recipients: added.to_vec(), frame })
                }
                None => None,
            };
            // The staged commit (its secrets, the Welcome to send if it wins) is durable before
            // it leaves: a crash at any point resumes from here.
            self.home
                .state
                .pending_commits
                .insert(key.clone(), PendingCommit { commit: pending.commit.clone(), sent: false, welcome });
            self.commits.remove(group_id);
            self.persist()?;
            crate::failpoint::hit("commit-staged");
            let recipients = self.mls.members(group_id)?;
            let frame = Frame::Mls { group_id: group_id.to_vec(), message: pending.commit.clone() }.encode();
            // Those whose queue was full: told about once the commit won (a lost one is void).
            // Our own copy is required: if our queue is full the commit reaches no one.
            let skipped = match self.fan_out_commit(group_id, &recipients, &frame).await {
                Ok(skipped) => {
                    crate::failpoint::hit("commit-sent");
                    if let Some(p) = self.home.state.pending_commits.get_mut(&key) {
                        p.sent = true;
                    }
                    self.home.save()?;
                    skipped
                }
                Err(e) if !matches!(&e, ClientError::Session(se) if !se.is_definite_refusal()) => {
                    // Refused (or never sent): nothing was stored, the commit is void.
                    self.home.state.pending_commits.remove(&key);
                    self.mls.clear_pending(group_id)?;
                    self.persist()?;
                    return Err(e);
                }
                // Unknown whether the server has it: the record stays, and the next receive
                // round sends it again (see `resend_unsent_commits`); a duplicate is harmless.
                Err(e) => return Err(e),
            };
            let mut rounds = 0;
            while !self.commits.contains_key(group_id) {
                if rounds == CONFIRM_ROUNDS {
                    return Err(ClientError::CommitTimeout);
                }
                rounds += 1;
                events.extend(self.receive_round(CONFIRM_WAIT_MS).await?);
                if self.backlog {
                    // Our echo may be behind a long queue: drain it, a round without waiting
                    // at a time.
                    events.extend(self.catch_up().await?);
                }
            }
            match self.commits.remove(group_id) {
                // receive_round already sent the Welcome from the outbox.
                Some(CommitStatus::Won) => {
                    // Someone it removed need not follow the group.
                    let members = self.mls.members(group_id)?;
                    let skipped: Vec<[u8; 32]> =
                        skipped.into_iter().filter(|k| members.contains(k)).collect();
                    self.note_skipped(group_id, &skipped, Carried::Commit);
                    return Ok(events);
                }
                _ => {
                    // Lost the epoch: the winner is applied; is our change still needed?
                    if !self.home.state.groups.get(&key).is_some_and(|g| g.active) {
                        return Err(ClientError::NotMember(self.conversation_name(group_id)));
                    }
                    continue;
                }
            }
        }
        Err(ClientError::CommitRace)
    }
}

fn new_group_id() -> Vec<u8> {
    let mut id = vec![0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    id
}
