//! Consent: an invitation from a key that is not a contact joins nothing until the person says
//! so (message requests, as Signal and SimpleX have them).
//!
//! A Welcome is first read in a throwaway copy of our MLS state
//! ([`crate::mls::MlsClient::preview_welcome`]), which tells who signed it (the signed
//! GroupInfo, not the frame's unauthenticated `inviter` field) without using up our
//! KeyPackage. A contact's invitation (or one from someone we already have a direct conversation
//! with) joins at once. A blocked key's is dropped silently and its KeyPackage private key
//! deleted. Anyone else's becomes a [`Request`]: the Welcome bytes, kept unprocessed, and the
//! group's messages that follow, held unread. `requests accept` joins for real and processes
//! what was held; `requests block` drops the messages and remembers the key. A declined or
//! blocked direct conversation's request is set aside with its Welcome and commits (at most
//! [`MAX_DECLINED_REQUESTS`], for the request's lifetime): the sender's client goes on writing
//! into that conversation, so their next message (after an unblock) makes it a request again.
//!
//! Everything here is bounded ([`crate::limits`]): the number of requests (in all and per
//! sender), the bytes of each (its Welcome and held messages), their age, and the block list,
//! so no stranger can make a home grow by more than [`crate::limits::MAX_STRANGER_BYTES`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::client::frame::AppMessage;
use crate::client::messenger::{ClientError, Event, Messenger};
use crate::client::state::{GroupKind, Orphan};
use crate::crypto::identity::PublicKey;
use crate::limits::{
    MAX_BLOCKED, MAX_BYTES_PER_REQUEST, MAX_DECLINED_REQUESTS, MAX_HELD_PER_REQUEST, MAX_REQUESTS,
    MAX_REQUESTS_PER_SENDER, REQUEST_PREVIEW_CHARS, REQUEST_TTL_MS,
};
use crate::mls::{Incoming, MlsError};

/// An invitation from a key that is not a contact, waiting for the person's decision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The inviter, as signed in the Welcome's GroupInfo.
    pub from: [u8; 32],
    /// The group the Welcome is for.
    pub group_id: Vec<u8>,
    /// A direct conversation or a named group (the name as the inviter chose it).
    pub kind: GroupKind,
    pub group_name: String,
    /// The MLS Welcome, not processed yet: accepting joins with it.
    #[serde(with = "serde_bytes")]
    pub welcome: Vec<u8>,
    /// Our clock when it came.
    pub received_at_ms: u64,
    /// The group's MLS messages that came after it, unprocessed, oldest first.
    pub held: Vec<HeldMessage>,
}

impl Request {
    /// Bytes this request keeps (what [`MAX_BYTES_PER_REQUEST`] counts).
    pub fn bytes(&self) -> usize {
        self.welcome.len()
            + self.group_id.len()
            + self.group_name.len()
            + self.held.iter().map(|m| m.0.len()).sum::<usize>()
    }
}

/// An MLS message kept unprocessed for a request. (A newtype so it is encoded as one byte
/// string; postcard writes that exactly as it writes a sequence of bytes, only faster.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HeldMessage(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What [`RequestBook::hold`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// Kept; `evicted` older application messages left to make room for it.
    Kept { evicted: usize },
    /// Not kept: an application message larger than a request may hold beside the group's
    /// commits.
    Refused(Refusal),
    /// A commit or proposal that does not fit beside the others: the request can never follow
    /// its group and was removed (here, so that its Welcome's KeyPackage can be discarded).
    Abandoned(Request),
}

/// True for an MLS application message, false for a commit or a proposal, None for bytes that
/// are no group message. The content type is in the clear (RFC 9420 §6).
fn content_is_application(message: &[u8]) -> Option<bool> {
    use crate::mls::{MlsClient, WireKind};
    MlsClient::peek(message)
        .ok()
        .filter(|i| matches!(i.kind, WireKind::PrivateMessage | WireKind::PublicMessage))
        .map(|i| i.application)
}

/// True for a held application message (the messages held are group messages: see
/// [`RequestBook::hold`]).
fn is_application(message: &[u8]) -> bool {
    content_is_application(message) == Some(true)
}

/// Removes and returns the requests of `list` older than [`REQUEST_TTL_MS`] at `now_ms`
/// (pending ones, and those set aside: see [`Messenger::set_aside`]).
pub fn take_expired(list: &mut Vec<Request>, now_ms: u64) -> Vec<Request> {
    let (old, fresh) = std::mem::take(list)
        .into_iter()
        .partition(|r| now_ms.saturating_sub(r.received_at_ms) >= REQUEST_TTL_MS);
    *list = fresh;
    old
}

/// Why a request or a held message was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many message requests ({MAX_REQUESTS}): accept or block some with `qpq requests`")]
    TooMany,
    #[error("too many message requests from one key ({MAX_REQUESTS_PER_SENDER})")]
    TooManyFromSender,
    #[error("a message request may keep at most {MAX_BYTES_PER_REQUEST} bytes")]
    TooLarge,
    #[error("not an mls group message")]
    NotGroupMessage,
    #[error("a request for that group is already waiting")]
    Duplicate,
}

/// The pending requests and the block list, as kept in the state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestBook {
    /// Oldest first (their `#n` are in [`RequestNumbers`]).
    pub pending: Vec<Request>,
    /// Keys whose invitations and messages are dropped without a word.
    pub blocked: BTreeSet<[u8; 32]>,
}

/// The `#n` of each pending request. A request keeps its number until it leaves, and a number
/// is never given twice, so `requests block #2` after `requests block #1` means the request
/// that was listed as `#2`, not the one that moved up (numbers were positions in the list).
///
/// Kept apart from [`RequestBook`] (whose encoding a qpq that knows nothing of numbers still
/// reads and writes): [`RequestNumbers::sync`] gives numbers to requests that have none (say,
/// after an older qpq filed them) and forgets those of requests that left.
///
/// A number belongs to the sender and the group together: a later request for the same group
/// id from someone else (group ids are the inviter's choice) gets a number of its own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestNumbers {
    /// The last number given (numbers start at 1).
    last: u64,
    /// The pending requests' numbers, by sender key and group id.
    by_request: BTreeMap<Vec<u8>, u64>,
}

impl RequestNumbers {
    fn key(r: &Request) -> Vec<u8> {
        [&r.from[..], &r.group_id[..]].concat()
    }

    /// Numbers the pending requests that have none, oldest first, and forgets the rest; true
    /// when anything changed (then worth saving).
    pub fn sync(&mut self, pending: &[Request]) -> bool {
        let keys: BTreeSet<Vec<u8>> = pending.iter().map(Self::key).collect();
        let before = self.by_request.len();
        self.by_request.retain(|k, _| keys.contains(k));
        let mut changed = before != self.by_request.len();
        for r in pending {
            let key = Self::key(r);
            if !self.by_request.contains_key(&key) {
                self.last = self.last.saturating_add(1);
                self.by_request.insert(key, self.last);
                changed = true;
            }
        }
        changed
    }

    /// The number of `r`.
    pub fn of(&self, r: &Request) -> Option<u64> {
        self.by_request.get(&Self::key(r)).copied()
    }

    /// Where request `#n` is in `pending`.
    pub fn position(&self, n: u64, pending: &[Request]) -> Option<usize> {
        pending.iter().position(|r| self.of(r) == Some(n))
    }
}

impl RequestBook {
    /// Bytes all pending requests keep.
    pub fn bytes(&self) -> usize {
        self.pending.iter().map(Request::bytes).sum()
    }

    pub fn is_blocked(&self, key: &[u8; 32]) -> bool {
        self.blocked.contains(key)
    }

    /// Keeps `request` if it fits every bound.
    pub fn admit(&mut self, request: Request) -> Result<(), Refusal> {
        if self.pending.iter().any(|r| r.group_id == request.group_id) {
            return Err(Refusal::Duplicate);
        }
        if self.pending.len() >= MAX_REQUESTS {
            return Err(Refusal::TooMany);
        }
        if self.pending.iter().filter(|r| r.from == request.from).count() >= MAX_REQUESTS_PER_SENDER {
            return Err(Refusal::TooManyFromSender);
        }
        if request.bytes() > MAX_BYTES_PER_REQUEST {
            return Err(Refusal::TooLarge);
        }
        self.pending.push(request);
        Ok(())
    }

    /// Holds `message` for the request of `group_id`: None when there is no such request.
    ///
    /// The group's commits and proposals are what joining later needs to follow it, so they
    /// are kept first: when a message does not fit, the oldest held application messages leave
    /// to make room (the newest chat is kept, as the inbox keeps it). A commit or proposal that
    /// does not fit even then means the request could never follow its group: the request is
    /// removed and returned ([`Held::Abandoned`]), rather than accepted later into a group whose
    /// messages it cannot read.
    pub fn hold(&mut self, group_id: &[u8], message: &[u8]) -> Option<Held> {
        let i = self.pending.iter().position(|r| r.group_id == group_id)?;
        let request = &mut self.pending[i];
        let Some(application) = content_is_application(message) else {
            return Some(Held::Refused(Refusal::NotGroupMessage));
        };
        // Each held message parsed once for its content type.
        let apps: Vec<bool> = request.held.iter().map(|m| is_application(&m.0)).collect();
        let app_bytes: usize =
            request.held.iter().zip(&apps).filter(|(_, a)| **a).map(|(m, _)| m.0.len()).sum();
        let mut bytes = request.bytes();
        if (bytes - app_bytes).saturating_add(message.len()) > MAX_BYTES_PER_REQUEST {
            if application {
                return Some(Held::Refused(Refusal::TooLarge));
            }
            return Some(Held::Abandoned(self.pending.remove(i)));
        }
        // The oldest application messages leave until the message fits; without them all it
        // does (above).
        let mut applications = apps.iter().filter(|a| **a).count();
        let mut oldest_first = apps.iter().enumerate().filter(|(_, a)| **a).map(|(j, _)| j);
        let mut leaving = vec![false; apps.len()];
        while bytes.saturating_add(message.len()) > MAX_BYTES_PER_REQUEST
            || (application && applications >= MAX_HELD_PER_REQUEST)
        {
            let Some(j) = oldest_first.next() else { break };
            // Invariant: `j` indexes `apps`, which has one entry per held message.
            leaving[j] = true;
            bytes -= request.held[j].0.len();
            applications -= 1;
        }
        let evicted = leaving.iter().filter(|l| **l).count();
        let mut index = 0;
        request.held.retain(|_| {
            index += 1;
            !leaving[index - 1]
        });
        request.held.push(HeldMessage(message.to_vec()));
        Some(Held::Kept { evicted })
    }

    /// Removes and returns the requests older than [`REQUEST_TTL_MS`] at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Request> {
        take_expired(&mut self.pending, now_ms)
    }

    /// Removes and returns every request from `key`.
    pub fn take_from(&mut self, key: &[u8; 32]) -> Vec<Request> {
        let (theirs, rest) = std::mem::take(&mut self.pending).into_iter().partition(|r| r.from == *key);
        self.pending = rest;
        theirs
    }

    /// Removes and returns the request of `group_id`.
    pub fn take_group(&mut self, group_id: &[u8]) -> Option<Request> {
        let i = self.pending.iter().position(|r| r.group_id == group_id)?;
        Some(self.pending.remove(i))
    }

    /// Blocks `key`: returns its requests, now removed. False in the flag when the block list
    /// is full (the requests are dropped all the same).
    pub fn block(&mut self, key: [u8; 32]) -> (Vec<Request>, bool) {
        let dropped = self.take_from(&key);
        let kept = self.blocked.len() < MAX_BLOCKED || self.blocked.contains(&key);
        if kept {
            self.blocked.insert(key);
        }
        (dropped, kept)
    }

    /// Unblocks `key`; false when it was not blocked.
    pub fn unblock(&mut self, key: &[u8; 32]) -> bool {
        self.blocked.remove(key)
    }
}

/// A pending request as `qpq requests` shows it.
#[derive(Debug, Clone)]
pub struct RequestView {
    /// Its number: `qpq requests accept N` (see [`RequestNumbers`]).
    pub number: u64,
    pub from: [u8; 32],
    pub group_id: Vec<u8>,
    /// None for a direct conversation, else the group's name as the inviter chose it.
    pub group: Option<String>,
    pub received_at_ms: u64,
    pub expires_at_ms: u64,
    /// Messages waiting with it.
    pub held: usize,
    /// The first waiting message from the inviter, as one short line (None when there is none
    /// to show).
    pub preview: Option<String>,
    /// The display name the sender signed into their leaf of the invitation's group (a claim:
    /// show it marked, see [`crate::client::names`]).
    pub claimed_name: Option<String>,
    /// Our name of a conversation we left whose group id this invitation reuses, when its
    /// sender was not a member of it then ([`Messenger::rejoin_by_a_newcomer`]): accepting
    /// gives that conversation to this group, which may not be the same one.
    pub reuses_left: Option<String>,
}

/// Which requests a command means: `#n` (its number in the list) or a key (all of its
/// requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestSelector {
    Number(u64),
    Key([u8; 32]),
}

impl RequestSelector {
    /// How errors name it: `#n` however the number was typed, else `typed` as it was.
    pub fn label(&self, typed: &str) -> String {
        match self {
            RequestSelector::Number(n) => format!("#{n}"),
            RequestSelector::Key(_) => typed.to_string(),
        }
    }
}

impl Messenger {
    /// True when invitations from `key` join at once: a contact, or someone we already have a
    /// direct conversation with (we wrote to them first, or accepted them before).
    pub(crate) fn consents_to(&self, key: &[u8; 32]) -> bool {
        self.contact_name(key).is_some() || self.find_direct(key).is_some()
    }

    /// Files a stranger's invitation as a request (and its messages that came ahead of it).
    pub(crate) fn file_request(
        &mut self,
        welcome: &[u8],
        group_id: Vec<u8>,
        name: &str,
        kind: GroupKind,
        from: [u8; 32],
        events: &mut Vec<Event>,
    ) {
        let kind = match kind {
            GroupKind::Direct { .. } => GroupKind::Direct { peer: from },
            GroupKind::Group => GroupKind::Group,
        };
        let request = Request {
            from,
            group_id: group_id.clone(),
            kind,
            group_name: name.to_string(),
            welcome: welcome.to_vec(),
            received_at_ms: self.clock.now_ms(),
            held: Vec::new(),
        };
        // Their invitation again, while we keep the one we declined: that copy comes back as
        // the request, with the commits it kept. Two copies would share one KeyPackage key,
        // and the older one's expiry would delete it from under the newer. It leaves the
        // set-aside ones only once admitted: refused, it stays as it was.
        let declined = &mut self.home.state.declined;
        let mut set_aside = None;
        let request = match declined.iter().position(|r| r.group_id == group_id && r.from == from) {
            Some(i) if declined[i].welcome == welcome => {
                set_aside = Some(i);
                Request { received_at_ms: request.received_at_ms, ..declined[i].clone() }
            }
            Some(i) => {
                let old = declined.remove(i);
                self.discard_welcome(&old.welcome);
                request
            }
            None => request,
        };
        match self.home.state.requests.admit(request) {
            Ok(()) => {
                if let Some(i) = set_aside {
                    self.home.state.declined.remove(i);
                }
                self.home.state.sync_request_numbers();
                let (mine, rest): (Vec<Orphan>, Vec<Orphan>) = std::mem::take(&mut self.home.state.orphans)
                    .into_iter()
                    .partition(|o| o.group_id == group_id);
                self.home.state.orphans = rest;
                for o in mine {
                    self.hold_for_request(&group_id, &o.message, events);
                }
                // Told only if it still waits: holding what came ahead of it may have dropped it.
                if self.home.state.requests.pending.iter().any(|r| r.group_id == group_id) {
                    events.push(Event::Request { group_id, from });
                }
            }
            // The same invitation again (a resend): the first one stands.
            Err(Refusal::Duplicate) => {}
            Err(e) => {
                self.discard_welcome(welcome);
                events.push(Event::Dropped {
                    reason: format!("a message request from {} was dropped: {e}", PublicKey(from).short()),
                });
            }
        }
    }

    /// Holds a group message for the request of `group_id`, telling what it cost (see
    /// [`RequestBook::hold`]); false when no request waits for that group.
    pub(crate) fn hold_for_request(
        &mut self,
        group_id: &[u8],
        message: &[u8],
        events: &mut Vec<Event>,
    ) -> bool {
        let reason = match self.home.state.requests.hold(group_id, message) {
            None => return false,
            Some(Held::Kept { evicted: 0 }) => return true,
            Some(Held::Kept { evicted }) => {
                let s = if evicted == 1 { "" } else { "s" };
                format!(
                    "{evicted} older message{s} waiting with a message request left to make room for newer ones (a request keeps at most {MAX_HELD_PER_REQUEST})"
                )
            }
            Some(Held::Refused(e)) => format!("a message waiting with a message request was dropped: {e}"),
            Some(Held::Abandoned(r)) => {
                self.discard_welcome(&r.welcome);
                format!(
                    "the message request from {} was dropped: its group changed more than a request can keep while it waited (ask them to invite you again)",
                    PublicKey(r.from).short()
                )
            }
        };
        events.push(Event::Dropped { reason });
        true
    }

    /// Deletes the KeyPackage private keys a Welcome we will never join was encrypted to,
    /// unless a request we keep (waiting or set aside) needs that key: a blocked sender's resend
    /// of its Welcome, a replay under another claimed inviter, or another Welcome to the same
    /// package (anyone who saw the package, the server or a co-member, can write one) must not
    /// take it. The caller takes its own request out of the lists first.
    pub(crate) fn discard_welcome(&mut self, welcome: &[u8]) {
        let state = &self.home.state;
        let kept = || state.requests.pending.iter().chain(&state.declined);
        if kept().any(|r| r.welcome == welcome) {
            return;
        }
        if let Ok(Some(ours)) = self.mls.welcome_key_package_ref(welcome) {
            let needs = |r: &Request| {
                self.mls.welcome_key_package_ref(&r.welcome).ok().flatten() == Some(ours.clone())
            };
            if kept().any(needs) {
                return;
            }
        }
        // Best effort: a Welcome that does not parse matched none of our packages anyway.
        let _ = self.mls.discard_welcome_key_packages(welcome);
    }

    /// Pending requests, oldest first, with a preview of the first message from each one's inviter.
    pub fn requests(&mut self) -> Result<Vec<RequestView>, ClientError> {
        let _op = self.begin()?;
        // Numbers given now are saved now: a number shown must stay that request's, even if
        // an older qpq (which knows nothing of them) changes the list before our next save.
        if self.expire_strangers() | self.home.state.sync_request_numbers() {
            self.persist()?;
        }
        let state = &self.home.state;
        Ok(state
            .requests
            .pending
            .iter()
            .filter_map(|r| Some((state.request_numbers.of(r)?, r)))
            .map(|(number, r)| {
                let (preview, claimed_name) = self.preview_and_name(r);
                RequestView {
                    number,
                    from: r.from,
                    group_id: r.group_id.clone(),
                    group: match r.kind {
                        GroupKind::Group => Some(r.group_name.clone()),
                        GroupKind::Direct { .. } => None,
                    },
                    received_at_ms: r.received_at_ms,
                    expires_at_ms: r.received_at_ms.saturating_add(REQUEST_TTL_MS),
                    held: r.held.len(),
                    preview,
                    claimed_name,
                    reuses_left: self.reuses_left(&r.group_id, &r.from),
                }
            })
            .collect())
    }

    /// The first held message of `r` that its inviter wrote and that reads as text, decrypted
    /// in a throwaway copy of our MLS state (nothing is joined, nothing of ours is used up).
    fn preview(&self, r: &Request) -> Option<String> {
        self.preview_and_name(r).0
    }

    /// [`Self::preview`] and the display name the sender signed into their leaf of the group,
    /// both read from one throwaway join.
    fn preview_and_name(&self, r: &Request) -> (Option<String>, Option<String>) {
        let Ok((_, mut scratch)) = self.mls.preview_welcome(&r.welcome) else { return (None, None) };
        let name = scratch.member_name(&r.group_id, &r.from);
        // Only the inviter's words: the preview is shown as theirs ("message request from
        // alice: ..."), and anyone else in the group could write the first message. The others
        // are still processed, in order, so the scratch state follows the group's epochs.
        let preview = r.held.iter().find_map(|m| match scratch.process(&r.group_id, &m.0) {
            Ok(Incoming::Application { sender, plaintext }) if sender == r.from => {
                AppMessage::decode(&plaintext).ok().map(|app| preview_line(&app.text, REQUEST_PREVIEW_CHARS))
            }
            _ => None,
        });
        (preview, name)
    }

    /// How to name the sender of the pending request for `group_id`: as
    /// [`Messenger::display_name`] does, with the name signed in the invitation when we share
    /// no group with them yet.
    pub fn request_sender_name(&self, group_id: &[u8], from: &[u8; 32]) -> String {
        self.name_for_people(from, || {
            self.claimed_name(from).or_else(|| {
                let pending = self.home.state.requests.pending.iter().find(|r| r.group_id == group_id)?;
                self.preview_and_name(pending).1
            })
        })
    }

    /// The number (`#n`) and preview of the pending request for `group_id`, for event lines.
    pub fn request_summary(&self, group_id: &[u8]) -> Option<(u64, Option<String>)> {
        let state = &self.home.state;
        let r = state.requests.pending.iter().find(|r| r.group_id == group_id)?;
        Some((state.request_numbers.of(r)?, self.preview(r)))
    }

    /// Our name of the conversation we left whose group id an invitation from `from` reuses,
    /// when `from` was not in it then (see [`RequestView::reuses_left`]).
    pub fn reuses_left(&self, group_id: &[u8], from: &[u8; 32]) -> Option<String> {
        self.rejoin_by_a_newcomer(group_id, from).then(|| self.conversation_name(group_id))
    }

    /// The group name a pending group request came with (None for a direct one).
    pub fn request_group_name(&self, group_id: &[u8]) -> Option<String> {
        let r = self.home.state.requests.pending.iter().find(|r| r.group_id == group_id)?;
        matches!(r.kind, GroupKind::Group).then(|| r.group_name.clone())
    }

    /// Parses `#n`, a bare `n` (a shell takes an unquoted `#1` for a comment) unless a contact
    /// has that name, or a contact name / 64-hex key.
    pub fn request_selector(&self, s: &str) -> Result<RequestSelector, ClientError> {
        let bare = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && !self.home.state.contacts.contains_key(s);
        if let Some(n) = s.strip_prefix('#').or(bare.then_some(s)) {
            return match n.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(RequestSelector::Number(n)),
                _ => Err(ClientError::NoRequest(format!("#{n}"))),
            };
        }
        Ok(RequestSelector::Key(self.resolve_person(s)?))
    }

    /// Removes the selected requests from the book (none selected is an error).
    fn take_requests(&mut self, which: &RequestSelector, label: &str) -> Result<Vec<Request>, ClientError> {
        let state = &mut self.home.state;
        state.sync_request_numbers();
        let taken = match which {
            RequestSelector::Number(n) => match state.request_numbers.position(*n, &state.requests.pending) {
                Some(i) => vec![state.requests.pending.remove(i)],
                None => Vec::new(),
            },
            RequestSelector::Key(k) => state.requests.take_from(k),
        };
        if taken.is_empty() {
            return Err(ClientError::NoRequest(label.to_string()));
        }
        Ok(taken)
    }

    /// Accepts requests: joins each group (or opens the direct conversation) and processes the
    /// messages that waited with it. The returned events carry those messages. With `shown`,
    /// the caller shows them, and they do not stay in the unread inbox; without, they stay
    /// there for its readers (the shell shows them from there, as every message). When one of
    /// several requests (all of a key's) fails, the others' events come back with the first
    /// failure: shown ones are in no inbox any more.
    pub fn request_accept(
        &mut self,
        which: &RequestSelector,
        label: &str,
        shown: bool,
    ) -> Result<(Vec<Event>, Option<ClientError>), ClientError> {
        let _op = self.begin()?;
        let taken = self.take_requests(which, label)?;
        let mut events = Vec::new();
        let mut failure = None;
        for r in taken {
            if let Err(e) = self.accept_one(r, shown, &mut events) {
                failure.get_or_insert(e);
            }
        }
        self.persist()?;
        Ok((events, failure))
    }

    /// Joins the group of `r` and processes what waited with it. With `shown`, the caller shows
    /// the messages (they come back as events and leave the unread inbox); otherwise they stay
    /// unread for the inbox's readers. Membership changes stay in the inbox either way.
    fn accept_one(
        &mut self,
        r: Request,
        shown: bool,
        events: &mut Vec<Event>,
    ) -> Result<Vec<u8>, ClientError> {
        let unread = self.home.state.inbox.len();
        let group_id = self
            .join_group(&r.welcome, &r.group_name, &r.kind, Some(r.from), true, events)
            .map_err(|e| match e {
                MlsError::NoMatchingKeyPackage => {
                    ClientError::RequestKeyPackageGone { who: self.display_name(&r.from) }
                }
                other => other.into(),
            })?;
        for m in &r.held {
            self.handle_group_message(&group_id, &m.0, None, events);
        }
        if shown {
            // The membership changes stay for the readers of the inbox (a shell shows them
            // from there).
            crate::client::inbox::unpush_since(&mut self.home.state, unread);
        }
        Ok(group_id)
    }

    /// Accepts the direct-conversation request of `peer`, if one waits (replying to a request
    /// accepts it); returns its group id.
    pub(crate) fn accept_direct_request_from(
        &mut self,
        peer: &[u8; 32],
        events: &mut Vec<Event>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let book = &mut self.home.state.requests;
        let direct = |r: &Request| r.from == *peer && matches!(r.kind, GroupKind::Direct { .. });
        // One we declined too: writing to them takes up their conversation rather than
        // starting a second one beside it.
        let r = match book.pending.iter().position(direct) {
            Some(i) => book.pending.remove(i),
            None => match self.home.state.declined.iter().position(direct) {
                Some(i) => self.home.state.declined.remove(i),
                None => return Ok(None),
            },
        };
        // Replying shows nothing: what waited stays unread for `recv` and the shell.
        let joined = self.accept_one(r, false, events);
        self.persist()?;
        joined.map(Some)
    }

    /// Declines requests without blocking their senders: they are dropped with what waited. A
    /// direct conversation's invitation is kept aside ([`Messenger::set_aside`]): the sender's
    /// client goes on writing into that conversation (nothing tells them), and their next
    /// message comes as a new request instead of being lost.
    pub fn request_decline(&mut self, which: &RequestSelector, label: &str) -> Result<usize, ClientError> {
        let _op = self.begin()?;
        let taken = self.take_requests(which, label)?;
        let n = taken.len();
        for r in taken {
            self.set_aside(r);
        }
        self.persist()?;
        Ok(n)
    }

    /// Keeps a declined or blocked direct-conversation request without the messages that
    /// waited with it (a group's is dropped: the group's next message is anyone's, not a new
    /// attempt to reach us), within [`MAX_DECLINED_REQUESTS`], the oldest leaving first. Its
    /// commits stay, as a pending request keeps them: joining later must follow the group
    /// through them (the sender's `name set` is one).
    fn set_aside(&mut self, mut r: Request) {
        if !matches!(r.kind, GroupKind::Direct { .. }) {
            self.discard_welcome(&r.welcome);
            return;
        }
        r.held.retain(|m| !is_application(&m.0));
        let declined = &mut self.home.state.declined;
        let replaced = declined.iter().position(|d| d.group_id == r.group_id).map(|i| declined.remove(i));
        declined.push(r);
        // After the push: `discard_welcome` keeps the key if this request needs it.
        if let Some(old) = replaced {
            self.discard_welcome(&old.welcome);
        }
        while self.home.state.declined.len() > MAX_DECLINED_REQUESTS {
            let oldest = self.home.state.declined.remove(0);
            self.discard_welcome(&oldest.welcome);
        }
    }

    /// A message for a direct conversation whose request we declined (or whose sender we
    /// blocked). A commit or proposal is kept with it (see [`Messenger::set_aside`]; one that
    /// does not fit ends it). A message brings the request back, holding it, and announced;
    /// while its sender is blocked it is dropped without a word. False when no such request was
    /// set aside.
    pub(crate) fn reopen_declined(
        &mut self,
        group_id: &[u8],
        message: &[u8],
        events: &mut Vec<Event>,
    ) -> bool {
        let Some(i) = self.home.state.declined.iter().position(|r| r.group_id == group_id) else {
            return false;
        };
        match content_is_application(message) {
            // Not a group message: nothing to keep.
            None => return true,
            Some(false) => {
                let declined = &mut self.home.state.declined;
                if declined[i].bytes().saturating_add(message.len()) > MAX_BYTES_PER_REQUEST {
                    let r = declined.remove(i);
                    self.discard_welcome(&r.welcome);
                } else {
                    declined[i].held.push(HeldMessage(message.to_vec()));
                }
                return true;
            }
            Some(true) => {}
        }
        if self.home.state.requests.is_blocked(&self.home.state.declined[i].from) {
            return true;
        }
        let mut r = self.home.state.declined.remove(i);
        r.received_at_ms = self.clock.now_ms();
        let (from, welcome) = (r.from, r.welcome.clone());
        match self.home.state.requests.admit(r) {
            Ok(()) => {
                self.home.state.sync_request_numbers();
                self.hold_for_request(group_id, message, events);
                if self.home.state.requests.pending.iter().any(|r| r.group_id == group_id) {
                    events.push(Event::Request { group_id: group_id.to_vec(), from });
                }
            }
            Err(e) => {
                self.discard_welcome(&welcome);
                events.push(Event::Dropped {
                    reason: format!("a message request from {} was dropped: {e}", PublicKey(from).short()),
                });
            }
        }
        true
    }

    /// Blocks a key (given, or the sender of request `#n`): its requests and what waited with
    /// them are dropped, and whatever it sends later is dropped without a word. Returns the key.
    pub fn request_block(&mut self, which: &RequestSelector, label: &str) -> Result<[u8; 32], ClientError> {
        let _op = self.begin()?;
        let key = match which {
            RequestSelector::Key(k) => *k,
            RequestSelector::Number(n) => {
                self.home.state.sync_request_numbers();
                let state = &self.home.state;
                let pending = &state.requests.pending;
                state
                    .request_numbers
                    .position(*n, pending)
                    .and_then(|i| pending.get(i))
                    .map(|r| r.from)
                    .ok_or_else(|| ClientError::NoRequest(label.to_string()))?
            }
        };
        if key == self.identity.public().0 {
            return Err(ClientError::SelfTarget);
        }
        let (dropped, kept) = self.home.state.requests.block(key);
        // Set aside, so that an unblock lets their next message through as a request.
        for r in dropped {
            self.set_aside(r);
        }
        self.persist()?;
        if !kept {
            return Err(ClientError::BlockListFull(MAX_BLOCKED));
        }
        Ok(key)
    }

    /// Unblocks a key: its later invitations become requests again.
    pub fn request_unblock(&mut self, who: &str) -> Result<[u8; 32], ClientError> {
        let key = self.resolve_person(who)?;
        let _op = self.begin()?;
        if !self.home.state.requests.unblock(&key) {
            return Err(ClientError::NotBlocked(who.to_string()));
        }
        self.home.save()?;
        Ok(key)
    }

    /// The blocked keys.
    pub fn blocked(&self) -> Vec<PublicKey> {
        self.home.state.requests.blocked.iter().map(|k| PublicKey(*k)).collect()
    }
}

/// A one-line preview of peer text: control characters (newlines, escapes) become spaces and
/// at most `max_chars` characters are kept, so a request cannot take over the terminal.
pub fn preview_line(text: &str, max_chars: usize) -> String {
    let mut out: String =
        text.chars().take(max_chars).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::testing::{bob_carol_and_eve, offline_messenger, receive_direct_welcome};
    use crate::limits::MAX_REQUEST_BYTES;

    /// A stranger's Welcome (a direct conversation) to one of `bob`'s fresh KeyPackages.
    fn strangers_welcome(bob: &mut Messenger) -> (crate::mls::MlsClient, Vec<u8>) {
        let mut stranger = crate::mls::MlsClient::new(&rand::random()).unwrap();
        let kp = bob.mls.key_packages(1).unwrap().remove(0).bytes;
        stranger.create_group(b"stranger-group-1").unwrap();
        let welcome = stranger.add_members(b"stranger-group-1", &[kp]).unwrap().welcome.unwrap();
        stranger.merge_pending(b"stranger-group-1").unwrap();
        (stranger, welcome)
    }

    #[test]
    fn a_request_that_outlived_its_key_package_fails_to_join_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let (stranger, welcome) = strangers_welcome(&mut bob);
        let peer = bob.public_key().0;
        let mut events = Vec::new();
        bob.handle_welcome(&welcome, "", GroupKind::Direct { peer }, stranger.identity(), &mut events);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]), "{events:?}");
        assert!(bob.mls.group_ids().is_empty(), "a request joins nothing");
        // What the KeyPackage expiry does to an old package's private key.
        bob.mls.discard_welcome_key_packages(&welcome).unwrap();
        let err = bob.request_accept(&RequestSelector::Number(1), "#1", true).unwrap().1.unwrap();
        assert!(matches!(err, ClientError::RequestKeyPackageGone { .. }), "{err}");
        assert!(err.to_string().contains("can no longer be accepted"), "{err}");
        assert!(bob.state().requests.pending.is_empty(), "an unjoinable request is not kept");
    }

    /// Found on a re-read (note24): a stranger's client sending its invitation again while we
    /// kept our declined copy filed a second copy beside it. The first expired first, deleted
    /// the KeyPackage key both needed, and accepting the second failed. A blocked sender's
    /// resend deleted that key too, so their request could not be accepted once unblocked.
    #[test]
    fn an_invitation_sent_again_after_a_decline_or_a_block_can_still_be_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let (mut stranger, welcome) = strangers_welcome(&mut bob);
        let group = b"stranger-group-1";
        let say = |m: &mut crate::mls::MlsClient, text: &str| {
            m.encrypt(group, &AppMessage { text: text.into(), sent_at_ms: 1 }.encode()).unwrap()
        };
        let mut events = receive_direct_welcome(&mut bob, &stranger, &welcome);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]));
        assert_eq!(bob.request_decline(&RequestSelector::Number(1), "#1").unwrap(), 1);
        // A commit (their `name set`, say) kept with the declined copy.
        let commit = stranger.self_update(group).unwrap().commit;
        stranger.merge_pending(group).unwrap();
        bob.handle_group_message(group, &commit, None, &mut events);
        let half = i64::try_from(REQUEST_TTL_MS / 2).unwrap();
        bob.clock.advance(half);
        let events = receive_direct_welcome(&mut bob, &stranger, &welcome);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]), "{events:?}");
        // Past the first copy's time, within the second's.
        bob.clock.advance(half + 1_000);
        bob.expire_strangers();
        let (_, failure) = bob.request_accept(&RequestSelector::Number(2), "#2", true).unwrap();
        assert!(failure.is_none(), "{failure:?}");
        let mut events = Vec::new();
        bob.handle_group_message(group, &say(&mut stranger, "after the commit"), None, &mut events);
        assert!(
            matches!(events.as_slice(), [Event::Message(m)] if m.text == "after the commit"),
            "the joined conversation follows the commit kept before the resend: {events:?}"
        );

        // Blocked: the resend is dropped, and the set-aside request keeps its key.
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let (mut stranger, welcome) = strangers_welcome(&mut bob);
        let mut events = receive_direct_welcome(&mut bob, &stranger, &welcome);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]));
        let key = RequestSelector::Key(stranger.identity());
        bob.request_block(&key, "them").unwrap();
        assert!(receive_direct_welcome(&mut bob, &stranger, &welcome).is_empty());
        bob.request_unblock(&PublicKey(stranger.identity()).to_string()).unwrap();
        events.clear();
        bob.handle_group_message(group, &say(&mut stranger, "hello again"), None, &mut events);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]), "{events:?}");
        let (shown, failure) = bob.request_accept(&RequestSelector::Number(2), "#2", true).unwrap();
        assert!(failure.is_none(), "{failure:?}");
        assert!(shown.iter().any(|e| matches!(e, Event::Message(m) if m.text == "hello again")), "{shown:?}");
    }

    /// Review: accepting all of a key's requests when one could no longer be joined returned
    /// only the failure, and the other's messages (taken out of the inbox to be shown) were
    /// never shown. They come back with the failure.
    #[test]
    fn a_failed_request_among_a_keys_does_not_hide_the_others_messages() {
        use crate::mls::MlsClient;
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let mut stranger = MlsClient::new(&rand::random()).unwrap();
        let mut welcomes = Vec::new();
        for group in [b"first-group".as_slice(), b"other-group"] {
            let kp = bob.mls.key_packages(1).unwrap().remove(0).bytes;
            stranger.create_group(group).unwrap();
            welcomes.push(stranger.add_members(group, &[kp]).unwrap().welcome.unwrap());
            stranger.merge_pending(group).unwrap();
        }
        let mut events = Vec::new();
        for (welcome, name) in welcomes.iter().zip(["first", "other"]) {
            bob.handle_welcome(welcome, name, GroupKind::Group, stranger.identity(), &mut events);
        }
        let hello = stranger
            .encrypt(b"other-group", &AppMessage { text: "hi".into(), sent_at_ms: 1 }.encode())
            .unwrap();
        assert!(bob.hold_for_request(b"other-group", &hello, &mut events));
        bob.mls.discard_welcome_key_packages(&welcomes[0]).unwrap();
        let key = RequestSelector::Key(stranger.identity());
        let (shown, failure) = bob.request_accept(&key, "them", true).unwrap();
        assert!(matches!(failure, Some(ClientError::RequestKeyPackageGone { .. })), "{failure:?}");
        assert!(shown.iter().any(|e| matches!(e, Event::Message(m) if m.text == "hi")), "{shown:?}");
    }

    /// Review: a resend that the requests refuse (here another stranger's request for the same
    /// group id waits) took the declined copy out of the set-aside ones all the same, and lost it.
    #[test]
    fn a_refused_resend_leaves_the_declined_copy_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let (stranger, welcome) = strangers_welcome(&mut bob);
        let (other, same_id) = strangers_welcome(&mut bob);
        assert!(matches!(
            receive_direct_welcome(&mut bob, &stranger, &welcome).as_slice(),
            [Event::Request { .. }]
        ));
        bob.request_decline(&RequestSelector::Number(1), "#1").unwrap();
        assert!(matches!(
            receive_direct_welcome(&mut bob, &other, &same_id).as_slice(),
            [Event::Request { .. }]
        ));
        assert!(receive_direct_welcome(&mut bob, &stranger, &welcome).is_empty());
        let declined: Vec<[u8; 32]> = bob.state().declined.iter().map(|r| r.from).collect();
        assert_eq!(declined, [stranger.identity()]);
    }

    /// Review: only the same Welcome's bytes kept a waiting request's key. Another Welcome to
    /// the same KeyPackage of ours (the server saw the package; so does every co-member, in the
    /// commit that adds us), dropped for claiming another inviter, deleted it.
    #[test]
    fn another_welcome_to_a_waiting_requests_package_does_not_take_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let kp = bob.mls.key_packages(1).unwrap().remove(0).bytes;
        let welcome_to = |group: &[u8]| {
            let mut m = crate::mls::MlsClient::new(&rand::random()).unwrap();
            m.create_group(group).unwrap();
            let welcome = m.add_members(group, std::slice::from_ref(&kp)).unwrap().welcome.unwrap();
            (m, welcome)
        };
        let (stranger, welcome) = welcome_to(b"stranger-group-1");
        let (_eve, forged) = welcome_to(b"eves-group");
        assert!(matches!(
            receive_direct_welcome(&mut bob, &stranger, &welcome).as_slice(),
            [Event::Request { .. }]
        ));
        let peer = bob.public_key().0;
        let mut events = Vec::new();
        bob.handle_welcome(&forged, "", GroupKind::Direct { peer }, stranger.identity(), &mut events);
        assert!(
            matches!(events.as_slice(), [Event::Dropped { reason }] if reason.contains("different inviter"))
        );
        let (_, failure) = bob.request_accept(&RequestSelector::Number(1), "#1", true).unwrap();
        assert!(failure.is_none(), "{failure:?}");
        assert_eq!(bob.mls.group_ids(), vec![b"stranger-group-1".to_vec()]);
    }

    #[test]
    fn a_stranger_claiming_a_contacts_key_is_refused_without_joining() {
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let (_stranger, welcome) = strangers_welcome(&mut bob);
        let contact = [9; 32];
        bob.home.state.contacts.insert("carol".into(), contact);
        let peer = bob.public_key().0;
        let mut events = Vec::new();
        bob.handle_welcome(&welcome, "", GroupKind::Direct { peer }, contact, &mut events);
        assert!(
            matches!(events.as_slice(), [Event::Dropped { reason }] if reason.contains("different inviter")),
            "{events:?}"
        );
        assert!(bob.mls.group_ids().is_empty() && bob.state().requests.pending.is_empty());
    }

    /// The "direct" label of a Welcome is its sender's claim: a contact's direct conversation
    /// that also holds a third person is not joined (it would show as private).
    #[test]
    fn a_direct_welcome_with_a_third_member_joins_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut bob, mut carol, eve) = bob_carol_and_eve(dir.path());
        let kps = vec![
            bob.mls.key_packages(1).unwrap().remove(0).bytes,
            eve.key_packages(1).unwrap().remove(0).bytes,
        ];
        carol.create_group(b"not-so-direct").unwrap();
        let welcome = carol.add_members(b"not-so-direct", &kps).unwrap().welcome.unwrap();
        let events = receive_direct_welcome(&mut bob, &carol, &welcome);
        assert!(
            matches!(events.as_slice(), [Event::Dropped { reason }] if reason.contains("only its two people")),
            "{events:?}"
        );
        assert!(bob.mls.group_ids().is_empty(), "nothing joined");
        assert!(bob.state().groups.is_empty());
    }

    /// "message request from alice: “…”" showed the first message held for the group,
    /// whichever member wrote it: another member (eve) could put words in the inviter's mouth.
    #[test]
    fn a_requests_preview_is_only_what_the_inviter_wrote() {
        use crate::mls::MlsClient;
        let dir = tempfile::tempdir().unwrap();
        let mut bob = offline_messenger(dir.path());
        let mut alice = MlsClient::new(&rand::random()).unwrap();
        let mut eve = MlsClient::new(&rand::random()).unwrap();
        let group = b"alices-group".to_vec();
        let kps = vec![
            bob.mls.key_packages(1).unwrap().remove(0).bytes,
            eve.key_packages(1).unwrap().remove(0).bytes,
        ];
        alice.create_group(&group).unwrap();
        let welcome = alice.add_members(&group, &kps).unwrap().welcome.unwrap();
        alice.merge_pending(&group).unwrap();
        eve.join(&welcome).unwrap();
        let mut events = Vec::new();
        bob.handle_welcome(&welcome, "team", GroupKind::Group, alice.identity(), &mut events);
        assert!(matches!(events.as_slice(), [Event::Request { .. }]), "{events:?}");
        let say = |m: &mut MlsClient, text: &str| {
            m.encrypt(&group, &AppMessage { text: text.into(), sent_at_ms: 1 }.encode()).unwrap()
        };
        assert!(bob.hold_for_request(&group, &say(&mut eve, "alice here: wire the money"), &mut events));
        assert_eq!(bob.requests().unwrap()[0].preview, None, "eve's words shown as alice's");
        assert!(bob.hold_for_request(&group, &say(&mut alice, "hi bob"), &mut events));
        let view = &bob.requests().unwrap()[0];
        assert_eq!((view.held, view.preview.as_deref()), (2, Some("hi bob")));
    }

    fn request(from: u8, group: u8, welcome_len: usize, at: u64) -> Request {
        Request {
            from: [from; 32],
            group_id: vec![group; 16],
            kind: GroupKind::Direct { peer: [from; 32] },
            group_name: String::new(),
            welcome: vec![0; welcome_len],
            received_at_ms: at,
            held: Vec::new(),
        }
    }

    #[test]
    fn requests_are_bounded_in_count_per_sender_and_bytes() {
        let mut book = RequestBook::default();
        for g in 0..MAX_REQUESTS_PER_SENDER as u8 {
            book.admit(request(1, g, 100, 0)).unwrap();
        }
        assert_eq!(book.admit(request(1, 200, 100, 0)), Err(Refusal::TooManyFromSender));
        assert_eq!(book.admit(request(2, 0, 100, 0)), Err(Refusal::Duplicate));
        assert_eq!(book.admit(request(2, 201, MAX_BYTES_PER_REQUEST + 1, 0)), Err(Refusal::TooLarge));
        let mut from = 10u8;
        while book.pending.len() < MAX_REQUESTS {
            book.admit(request(from, from, 100, 0)).unwrap();
            from += 1;
        }
        assert_eq!(book.admit(request(from, from, 100, 0)), Err(Refusal::TooMany));
        assert!(book.bytes() <= MAX_REQUEST_BYTES);
    }

    #[test]
    fn held_messages_keep_the_groups_commits_and_the_newest_chat() {
        use crate::mls::MlsClient;
        let group = vec![1u8; 16];
        let mut alice = MlsClient::new(&[7; 32]).unwrap();
        alice.create_group(&group).unwrap();
        let commit = |m: &mut MlsClient| {
            let c = m.self_update(&group).unwrap().commit;
            m.merge_pending(&group).unwrap();
            c
        };
        let c1 = commit(&mut alice);
        let chat: Vec<Vec<u8>> = (0..=MAX_HELD_PER_REQUEST)
            .map(|i| alice.encrypt(&group, format!("m{i:02}").as_bytes()).unwrap())
            .collect();
        let c2 = commit(&mut alice);
        let mut book = RequestBook::default();
        book.admit(request(1, 1, 100, 0)).unwrap();
        assert_eq!(book.hold(&[9; 16], &chat[0]), None, "no request for that group");
        assert_eq!(book.hold(&[1; 16], b"junk"), Some(Held::Refused(Refusal::NotGroupMessage)));
        assert_eq!(book.hold(&[1; 16], &c1), Some(Held::Kept { evicted: 0 }));
        for m in &chat[..MAX_HELD_PER_REQUEST] {
            assert_eq!(book.hold(&[1; 16], m), Some(Held::Kept { evicted: 0 }));
        }
        // One chat message too many: the oldest leaves, the commit stays.
        assert_eq!(book.hold(&[1; 16], &chat[MAX_HELD_PER_REQUEST]), Some(Held::Kept { evicted: 1 }));
        // A commit does not count against the chat messages' number.
        assert_eq!(book.hold(&[1; 16], &c2), Some(Held::Kept { evicted: 0 }));
        let held: Vec<&[u8]> = book.pending[0].held.iter().map(|m| m.0.as_slice()).collect();
        let mut want: Vec<&[u8]> = vec![&c1];
        want.extend(chat[1..].iter().map(Vec::as_slice));
        want.push(&c2);
        assert_eq!(held, want);

        // Bytes: a commit makes room by sending the oldest chat away.
        let (a, c) = (chat[0].len(), c2.len());
        assert!(chat.iter().all(|m| m.len() == a), "same-length texts seal to the same length");
        let welcome = MAX_BYTES_PER_REQUEST - 16 - 2 * a - c + 1;
        book.admit(request(2, 2, welcome, 0)).unwrap();
        for m in &chat[..2] {
            assert_eq!(book.hold(&[2; 16], m), Some(Held::Kept { evicted: 0 }));
        }
        assert_eq!(book.hold(&[2; 16], &c2), Some(Held::Kept { evicted: 1 }));
        let held: Vec<&[u8]> = book.pending[1].held.iter().map(|m| m.0.as_slice()).collect();
        assert_eq!(held, vec![chat[1].as_slice(), c2.as_slice()]);

        // Newer chat sends older chat away, never the commit.
        assert_eq!(book.hold(&[2; 16], &chat[2]), Some(Held::Kept { evicted: 1 }));
        let held: Vec<&[u8]> = book.pending[1].held.iter().map(|m| m.0.as_slice()).collect();
        assert_eq!(held, vec![c2.as_slice(), chat[2].as_slice()]);

        // A chat message that cannot fit beside the commits is refused.
        book.admit(request(3, 3, MAX_BYTES_PER_REQUEST - 16 - a + 1, 0)).unwrap();
        assert_eq!(book.hold(&[3; 16], &chat[0]), Some(Held::Refused(Refusal::TooLarge)));
        // A commit that cannot fit: the request could never follow its group, and goes.
        let abandoned = book.pending.len();
        assert_eq!(
            book.hold(&[3; 16], &c2).map(|h| matches!(h, Held::Abandoned(r) if r.group_id == [3; 16])),
            Some(true)
        );
        assert_eq!(book.pending.len(), abandoned - 1);
        assert!(book.pending.iter().all(|r| r.bytes() <= MAX_BYTES_PER_REQUEST));
    }

    /// Numbers follow the requests, not their places; a home without numbers (an older qpq's)
    /// numbers its requests oldest first; a number is never given twice.
    #[test]
    fn request_numbers_stay_with_their_requests_and_are_not_reused() {
        let mut numbers = RequestNumbers::default();
        let mut pending = vec![request(1, 1, 10, 0), request(2, 2, 10, 0), request(3, 3, 10, 0)];
        assert!(numbers.sync(&pending));
        assert!(!numbers.sync(&pending), "nothing new");
        assert_eq!(pending.iter().map(|r| numbers.of(r)).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
        pending.remove(0);
        assert!(numbers.sync(&pending));
        assert_eq!(numbers.position(2, &pending), Some(0));
        assert_eq!(numbers.position(1, &pending), None);
        pending.clear();
        numbers.sync(&pending);
        pending.push(request(4, 4, 10, 0));
        // Another sender's request for a group id that had a number is a new request.
        pending.push(request(5, 2, 10, 0));
        numbers.sync(&pending);
        assert_eq!(pending.iter().map(|r| numbers.of(r)).collect::<Vec<_>>(), [Some(4), Some(5)]);
    }

    #[test]
    fn requests_expire_after_their_ttl() {
        let mut book = RequestBook::default();
        book.admit(request(1, 1, 10, 1_000)).unwrap();
        book.admit(request(2, 2, 10, 5_000)).unwrap();
        assert!(book.expire(1_000 + REQUEST_TTL_MS - 1).is_empty());
        let gone = book.expire(1_000 + REQUEST_TTL_MS);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].from, [1; 32]);
        assert_eq!(book.pending.len(), 1);
    }

    #[test]
    fn blocking_drops_the_senders_requests_and_remembers_the_key() {
        let mut book = RequestBook::default();
        book.admit(request(1, 1, 10, 0)).unwrap();
        book.admit(request(1, 2, 10, 0)).unwrap();
        book.admit(request(2, 3, 10, 0)).unwrap();
        let (dropped, kept) = book.block([1; 32]);
        assert_eq!((dropped.len(), kept), (2, true));
        assert!(book.is_blocked(&[1; 32]));
        assert_eq!(book.pending.len(), 1);
        assert!(book.unblock(&[1; 32]));
        assert!(!book.unblock(&[1; 32]));
    }

    #[test]
    fn a_preview_is_one_short_line() {
        assert_eq!(preview_line("hi\nthere\x1b[2J", 80), "hi there [2J");
        assert_eq!(preview_line("abcdef", 3), "abc…");
        assert_eq!(preview_line("abc", 3), "abc");
    }
}
