//! The messenger core shared by the one-shot commands and the shell: identity, contacts,
//! conversations, sending, receiving. No printing: results come back as values and [`Event`]s.
//!
//! # Delivery
//! Every payload on the DS is a [`Parcel`](super::parcel): a group's MLS messages (direct
//! conversations included) are sent once for all members through `enqueueFanout`, sealed by
//! MLS alone; a Welcome is sealed once for its new members (the frame once, its key in a hybrid
//! envelope per member) and fanned out too. Group traffic uses the MLS group id as the DS channel id, so all members see a group's
//! messages in one server-assigned order. [`Messenger::receive`] processes messages in that
//! order, saves the state that holds their effect, and only then acks them: a crash re-delivers,
//! and `processed_seq` makes a re-delivery a no-op.
//!
//! # One commit per epoch
//! Membership changes are commits. A committer sends its commit to every member including itself
//! and merges it only when its own copy comes back before any other commit of that epoch; if
//! another commit comes first, openmls applies that one (ours no longer fits the epoch) and we
//! retry the change on the new epoch, a bounded number of times. Every member applies the first
//! valid commit of an epoch and fails on later ones, so nobody forks. Welcomes are sent only for
//! a commit that won. See [`groups`](super::groups).

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::rc::Rc;

use crate::client::outbox::Watch;
use crate::client::parcel::Parcel;
use crate::client::session::{Session, SessionError};
use crate::client::state::{
    Entry, GroupKind, GroupMeta, Home, HomeGuard, Secrets, State, StateError, Unlock,
};
use crate::clock::Clock;
use crate::crypto::hybrid::{self, HybridSecretKey, SignedHybridKey};
use crate::crypto::identity::{Identity, IdentityError, PublicKey};
use crate::crypto::sealmany;
use crate::mls::{MlsClient, MlsError};
use crate::text::clipped;
use crate::transport::{Fingerprint, Pin};

/// Recipients of one sealed-once Welcome parcel: 64 stanzas are 75 KB.
const WELCOME_RECIPIENTS_PER_PARCEL: usize = 64;

/// Single-use KeyPackages `init` uploads and refills to.
pub const KEY_PACKAGE_POOL: usize = 20;
/// Refill when the server holds fewer than this many.
pub const KEY_PACKAGE_REFILL_BELOW: u32 = 5;
/// Longest text message (after the envelope and MLS overhead it stays under the DS limit).
pub const MAX_TEXT_BYTES: usize = 200 * 1024;

/// Errors of client operations, phrased for the person who typed the command (what they typed
/// is quoted back [`clipped`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("{0}")]
    Mls(#[from] MlsError),
    #[error("{0}")]
    Key(#[from] IdentityError),
    #[error("no server: pass --server HOST:PORT (or set QPQ_SERVER)")]
    NoServer,
    #[error("unknown contact {:?}: add it with `contact add NAME KEY` or use the 64-hex key", clipped(.0))]
    UnknownContact(String),
    /// A short key (`304b-9934`) that starts none of the keys this home knows.
    #[error("no key this home knows starts with {:?}: use the whole key (64 hex digits)", clipped(.0))]
    UnknownShortKey(String),
    #[error("no group named #{}", clipped(.0))]
    UnknownGroup(String),
    #[error("you are no longer a member of #{}", clipped(.0))]
    NotMember(String),
    #[error("invalid name {:?}: use 1-32 ASCII letters, digits, '-', '_' or '.'", clipped(.0))]
    BadName(String),
    #[error("invalid display name {:?}: use 1-64 bytes of printable text", clipped(.0))]
    BadDisplayName(String),
    #[error("{:?} matches several keys: {candidates}; type more of the key", clipped(.given))]
    AmbiguousKey { given: String, candidates: String },
    #[error("{:?} cannot name a contact: {why}", clipped(.name))]
    ContactNameClash { name: String, why: &'static str },
    #[error("{} could be any of {names}: write the name as it is written there", clipped(.given))]
    AmbiguousName { given: String, names: String },
    #[error("a contact named {0:?} already exists")]
    ContactExists(String),
    #[error("a group named #{0} already exists")]
    GroupExists(String),
    #[error(
        "{who} has no valid key packages on the server: they must come online once (or run `qpq init` there)"
    )]
    NoKeyPackages { who: String },
    #[error(
        "the server handed out a key package of {who} that is not valid now ({reason}): check the clocks"
    )]
    KeyPackageLifetime { who: String, reason: String },
    #[error("{who} is already a member of #{group}")]
    AlreadyMember { who: String, group: String },
    #[error("{who} is not a member of #{group}")]
    NotAMember { who: String, group: String },
    #[error("the server returned a key package that does not belong to {0}")]
    ForeignKeyPackage(String),
    #[error("hybrid key of {who} rejected: {reason} (the server may have swapped it)")]
    HybridKey { who: String, reason: String },
    #[error("#{0} has no other members: add some with `group add`")]
    Alone(String),
    #[error(
        "the direct conversation with {peer} now has {others} too, so it is not private: not sending (start a group to talk to all of them)"
    )]
    DirectNotPrivate { peer: String, others: String },
    #[error("message too large: {0} > {MAX_TEXT_BYTES} bytes")]
    TooLarge(usize),
    #[error("nothing to send: the message is empty")]
    EmptyMessage,
    #[error(
        "{who} joined #{group} but the server refused their invitation ({reason}), so they cannot read it: \
         remove them with `qpq group remove {group} {who}` and add them again later"
    )]
    WelcomeRefused { who: String, group: String, reason: String },
    #[error("the group changed concurrently too many times; try again")]
    CommitRace,
    #[error("the server did not confirm our commit in time; try again")]
    CommitTimeout,
    #[error("that is your own key")]
    SelfTarget,
    #[error("that is your own key: you are in #{0} already")]
    AddSelf(String),
    #[error("that is your own key: to leave #{0}, run `qpq group leave {0}`")]
    RemoveSelf(String),
    #[error("the outbox is full ({0} messages wait): they go out when the server is back, then send again")]
    OutboxFull(usize),
    #[error("no message request {}: see `qpq requests`", clipped(.0))]
    NoRequest(String),
    #[error(
        "the invitation from {who} can no longer be accepted: its key package is gone (expired); ask them to invite you again"
    )]
    RequestKeyPackageGone { who: String },
    #[error("the block list is full ({0} keys): unblock some first")]
    BlockListFull(usize),
    #[error("{} is not blocked", clipped(.0))]
    NotBlocked(String),
    #[error("that is your own key: contacts are other people")]
    ContactIsSelf,
    #[error("{0} is not anyone's identity key (a small-order point, like the all-zero key)")]
    WeakKey(String),
    #[error("that key is already your contact {0:?}: `qpq contact remove {0}` first to rename it")]
    KeyAlreadyContact(String),
    #[error(
        "--server-fingerprint {given} is not the certificate pinned for {server} ({pinned}): if the operator replaced it, re-pin with `qpq server pin {given}`"
    )]
    PinMismatch { server: String, pinned: Fingerprint, given: Fingerprint },
}

impl ClientError {
    /// True when the home was re-sealed under a new key since this process opened it (`qpq
    /// passphrase --new-key`): nothing this process does can open it again.
    pub fn home_key_changed(&self) -> bool {
        matches!(self, ClientError::State(StateError::Db(crate::client::db::DbError::KeyChanged(_))))
    }
}

/// Something that happened while processing incoming messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An application message (already kept in history and the inbox).
    Message(Entry),
    /// We joined a group.
    Joined { group_id: Vec<u8>, by: [u8; 32] },
    /// A key that is not a contact invited us (a message request, see `client::requests`).
    Request { group_id: Vec<u8>, from: [u8; 32] },
    /// Members were added, removed or left (their own removal, committed by `by`) by a commit;
    /// `left` holds our own key after we left.
    Membership {
        group_id: Vec<u8>,
        by: [u8; 32],
        added: Vec<[u8; 32]>,
        removed: Vec<[u8; 32]>,
        left: Vec<[u8; 32]>,
    },
    /// We were removed from a group (or our leave was committed).
    Removed { group_id: Vec<u8>, by: [u8; 32] },
    /// A message that could not be used; processing went on.
    Dropped { reason: String },
    /// A message of ours that waited in the outbox was refused by the server and left it
    /// unsent (a script's shell exits 1 for it).
    NotSent { reason: String },
    /// The server refused the Welcome of a commit that added `to`: they are members who will
    /// never read the group.
    WelcomeRefused { to: Vec<[u8; 32]>, reason: String },
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Group(String),
    Person([u8; 32]),
}

/// Connection settings given on the command line.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub server: Option<String>,
    pub fingerprint: Option<Fingerprint>,
}

/// Result of `init`.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub key: PublicKey,
    pub fingerprint: Fingerprint,
    /// True when the fingerprint was pinned on first use rather than given.
    pub first_use: bool,
}

/// How a commit of ours fared once the server ordered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitStatus {
    Won,
    Lost,
}

/// What a fanout carried, for the notice naming the members whose full queue skipped it
/// ([`Messenger::note_skipped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    /// An application message: only it is lost to them.
    Message,
    /// Our request to leave: they will not commit it.
    LeaveRequest,
    /// A commit: without it they cannot read the group's later epochs.
    Commit,
}

/// The recipients of a fanout the server skipped (seq 0: their queue is full), from its
/// answer `seqs` in `recipients` order. A server that answers fewer seqs than it was asked
/// about is out of protocol; the ones it left out are not named (the message was taken).
fn skipped(recipients: &[[u8; 32]], seqs: &[u64]) -> Vec<[u8; 32]> {
    recipients.iter().zip(seqs).filter(|(_, seq)| **seq == 0).map(|(r, _)| *r).collect()
}

/// The client: an open home plus (lazily) a connection.
pub struct Messenger {
    pub(crate) home: Home,
    pub(crate) identity: Identity,
    pub(crate) mls: MlsClient,
    pub(crate) session: Option<Session>,
    /// A second, unauthenticated connection for enqueues and key lookups, so the server cannot
    /// tie what we send (or whom we look up) to the identity that fetches on `session`.
    pub(crate) anonymous: Option<Session>,
    pub(crate) opts: ConnectOptions,
    /// Fate of our commits decided during this process's receive rounds, by group id (the
    /// commits themselves are in the state's `pending_commits`, which survives a crash).
    pub(crate) commits: HashMap<Vec<u8>, CommitStatus>,
    /// Set when a Welcome used one of our KeyPackages: check the server's pool.
    pub(crate) kp_check: bool,
    /// Groups whose leave commit this process was refused and said it retries: said once, not
    /// every round.
    pub(crate) leave_retry_told: std::collections::HashSet<Vec<u8>>,
    /// Key upkeep the server refused and this process said it retries (see `upkeep`).
    /// (what, wire code as a number: the generated enum has no `Hash`).
    pub(crate) upkeep_told: std::collections::HashSet<(&'static str, u16)>,
    /// (group id, epoch) whose leave proposals this process passed on before committing them.
    pub(crate) leave_relayed: std::collections::HashSet<(Vec<u8>, u64)>,
    /// Groups whose leave request this process failed to send again (see
    /// `Messenger::repeat_leave_requests`): said once, and left to the next process.
    pub(crate) leave_repeat_failed: std::collections::HashSet<Vec<u8>>,
    /// Notices for the person (pinned certificate, refills); the caller prints them.
    pub notices: Vec<String>,
    /// True while an operation holds the home's lock (see [`Messenger::begin`]).
    held: Rc<Cell<bool>>,
    /// The time source for lifetimes (message requests, orphans).
    pub(crate) clock: Clock,
    /// The queued message this process waits for (see [`crate::client::outbox`]).
    pub(crate) watch: Watch,
    /// The last receive round stopped with messages still waiting on the server (see
    /// [`Messenger::has_backlog`]).
    pub(crate) backlog: bool,
    /// The last message whose effect is saved but whose ack has not gone yet: it rides on the
    /// next round's first fetch (0 when none).
    pub(crate) unacked: u64,
    /// When this process is a one-shot command that tells its person of the membership
    /// changes it learns (see [`Messenger::tell_changes`]): the inbox events it announced, by
    /// sequence number, for [`Messenger::mark_changes_told`]. None otherwise.
    pub(crate) announced: Option<Vec<(u64, crate::client::inbox::InboxEvent)>>,
}

/// One operation's hold on the home lock; releases it when dropped (if it took it).
pub(crate) struct OpGuard {
    lock: Option<HomeGuard>,
    held: Rc<Cell<bool>>,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        if self.lock.take().is_some() {
            self.held.set(false);
        }
    }
}

/// What an entry costs in the state, for the byte bounds of history and inbox: its text plus
/// the fixed fields (keys, times, group id).
pub(crate) fn entry_bytes(e: &Entry) -> usize {
    e.text.len() + e.group_id.len() + 64
}

/// Drops the oldest items until at most `max_items` of at most `max_bytes` together (each
/// costed by `bytes_of`, [`entry_bytes`] for messages) remain.
pub(crate) fn keep_newest<T>(
    items: &mut VecDeque<T>,
    max_items: usize,
    max_bytes: usize,
    bytes_of: impl Fn(&T) -> usize,
) {
    let mut bytes: usize = items.iter().map(&bytes_of).sum();
    while items.len() > max_items || bytes > max_bytes {
        let Some(old) = items.pop_front() else { break };
        bytes = bytes.saturating_sub(bytes_of(&old));
    }
}

/// Valid contact and group names: short, no spaces or shell-special characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !PublicKey::looks_like_key(name)
}

/// Why `name` cannot name a contact though it is a [`valid_name`], if it cannot: qpq shows
/// you as "me" and "you"; a number stands for a message request (`requests accept 1`) or a
/// page size (`history 5`); a short key (`8b95-fc23`) stands for the key it starts. A contact
/// so named would pass for you or for someone else (exploratory testing: `contact add
/// 8b95-fc23 KEY` took bob's short key for eve, and `send 8b95-fc23` went to her).
pub fn contact_name_clash(name: &str) -> Option<&'static str> {
    if same_name(name, "me") || same_name(name, "you") {
        Some("qpq shows you as \"me\" and \"you\"")
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        Some("a number stands for a message request or a page size")
    } else if crate::client::names::short_key_digits(name).is_some() {
        Some("it reads as a short key")
    } else {
        None
    }
}

/// Whether two contact or group names are the same name: names are ASCII (see [`valid_name`])
/// and compared ignoring case, so `#team` and `#TEAM` cannot both be there to be confused, and
/// `send Bob` finds the contact `bob`. A home written before this may hold two names that differ
/// only in case: the exact one is found first.
pub fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Of `names`, the one `name` means: the exact one, else the only one that is the
/// [`same_name`]; `Err` with all of them (sorted) when several are and none exactly.
pub(crate) fn pick_name<'a, T>(
    name: &str,
    names: impl Iterator<Item = (&'a str, T)>,
) -> Result<Option<(&'a str, T)>, Vec<&'a str>> {
    let mut like: Vec<(&'a str, T)> = Vec::new();
    for (n, t) in names {
        if n == name {
            return Ok(Some((n, t)));
        }
        if same_name(n, name) {
            like.push((n, t));
        }
    }
    match like.len() {
        0 | 1 => Ok(like.pop()),
        _ => {
            let mut names: Vec<&str> = like.into_iter().map(|(n, _)| n).collect();
            names.sort_unstable();
            Err(names)
        }
    }
}

/// Keys that cannot be a contact: our own, a small-order point (no one holds its secret; the
/// all-zero key is one, RFC 8032 section 5.1.3 decodes it), one already named otherwise.
fn check_contact_key(pk: &PublicKey, me: &PublicKey, existing: Option<&str>) -> Result<(), ClientError> {
    if pk == me {
        return Err(ClientError::ContactIsSelf);
    }
    let weak = ed25519_dalek::VerifyingKey::from_bytes(&pk.0).map_or(true, |k| k.is_weak());
    if weak {
        return Err(ClientError::WeakKey(pk.short()));
    }
    if let Some(name) = existing {
        return Err(ClientError::KeyAlreadyContact(name.to_string()));
    }
    Ok(())
}

async fn open_session(
    server: &str,
    known: Option<&String>,
    explicit: Option<Fingerprint>,
) -> Result<(Session, bool), ClientError> {
    let known = known.map(|k| Fingerprint::parse(k).map_err(SessionError::Transport)).transpose()?;
    let pin = match (explicit, known) {
        // A pin changes only through `qpq server pin`, never as a side effect of a flag.
        (Some(given), Some(pinned)) if given != pinned => {
            return Err(ClientError::PinMismatch { server: server.to_string(), pinned, given });
        }
        (Some(f), _) => Pin::Fingerprint(f),
        (None, Some(k)) => Pin::Fingerprint(k),
        (None, None) => Pin::FirstUse(Default::default()),
    };
    let first_use = matches!(pin, Pin::FirstUse(_));
    Ok((Session::connect(server, pin).await?, first_use))
}

impl Messenger {
    /// Creates an identity in `dir`, pins the server, uploads KeyPackages and the signed hybrid
    /// key. Nothing is written to `dir` unless all of that succeeds.
    pub async fn init(
        dir: &Path,
        name: Option<String>,
        unlock: Unlock,
        opts: ConnectOptions,
    ) -> Result<(Messenger, InitReport), ClientError> {
        if crate::client::state::exists(dir) {
            return Err(StateError::AlreadyInitialized(dir.to_path_buf()).into());
        }
        // Spaces around a name are nobody's intent (and would show inside its marks).
        let typed = name.clone();
        let name = name.map(|n| n.trim().to_string());
        if let Some(n) = &name
            && !crate::mls::valid_display_name(n)
        {
            return Err(ClientError::BadDisplayName(typed.unwrap_or_default()));
        }
        let server = opts.server.clone().ok_or(ClientError::NoServer)?;
        let identity = Identity::generate();
        let hybrid = HybridSecretKey::generate();
        // One clock for the messenger and its MLS client (KeyPackage lifetimes), so a test that
        // moves it moves both.
        let clock = Clock::from_env();
        let mls =
            MlsClient::new(identity.seed())?.with_clock(clock.clone()).with_display_name(name.as_deref());
        let (mut session, first_use) = open_session(&server, None, opts.fingerprint).await?;
        session.authenticate(&identity).await?;
        let server_instance = session.server_instance();
        let kps = mls.key_packages(KEY_PACKAGE_POOL)?;
        let lr = mls.last_resort_key_package()?;
        let bytes: Vec<Vec<u8>> = kps.iter().map(|k| k.bytes.clone()).collect();
        session.upload_key_packages(&bytes, Some(&lr.bytes)).await?;
        let hybrid_created_at_ms = clock.now_ms();
        session
            .upload_hybrid_key(&SignedHybridKey::sign(identity.signing_key(), hybrid_created_at_ms, &hybrid))
            .await?;
        let fingerprint = session.fingerprint();
        let mut state =
            State::new(Secrets::new(*identity.seed(), *hybrid.seed()), name, Some(server.clone()));
        state.hybrid_created_at_ms = hybrid_created_at_ms;
        state.hybrid_published = true;
        state.known_servers.insert(server, fingerprint.to_string());
        state.server_instance = server_instance;
        state.mls_storage = mls.export_storage()?;
        state.key_pool.record(&kps, false);
        state.key_pool.record(std::slice::from_ref(&lr), true);
        state.last_resort_ref = lr.hash_ref.clone();
        let mut home = Home::create(dir, state, unlock)?;
        // The same records as `mls`, but clean: nothing left to write.
        let mls = match home.take_mls() {
            Some(store) => MlsClient::from_store_lazy(identity.seed(), store)?
                .with_clock(clock.clone())
                .with_display_name(home.state.name.as_deref()),
            None => mls,
        };
        let report = InitReport { key: identity.public(), fingerprint, first_use };
        let m = Messenger {
            home,
            identity,
            mls,
            session: Some(session),
            anonymous: None,
            opts,
            commits: HashMap::new(),
            kp_check: false,
            leave_retry_told: Default::default(),
            upkeep_told: Default::default(),
            leave_relayed: Default::default(),
            leave_repeat_failed: Default::default(),
            notices: Vec::new(),
            held: Rc::new(Cell::new(false)),
            clock,
            watch: Watch::default(),
            backlog: false,
            unacked: 0,
            announced: None,
        };
        Ok((m, report))
    }

    /// Opens an existing home (taking its lock).
    pub fn open(
        dir: &Path,
        passphrase: Option<&[u8]>,
        opts: ConnectOptions,
    ) -> Result<Messenger, ClientError> {
        let mut home = Home::open(dir, passphrase)?;
        let identity = Identity::from_seed(&home.state.secrets.identity_seed);
        let clock = Clock::from_env();
        let mls = MlsClient::from_store_lazy(identity.seed(), home.take_mls().unwrap_or_default())?
            .with_clock(clock.clone())
            .with_display_name(home.state.name.as_deref());
        Ok(Messenger {
            home,
            identity,
            mls,
            session: None,
            anonymous: None,
            opts,
            commits: HashMap::new(),
            kp_check: false,
            leave_retry_told: Default::default(),
            upkeep_told: Default::default(),
            leave_relayed: Default::default(),
            leave_repeat_failed: Default::default(),
            notices: Vec::new(),
            held: Rc::new(Cell::new(false)),
            clock,
            watch: Watch::default(),
            backlog: false,
            unacked: 0,
            announced: None,
        })
    }

    /// Starts an operation that may change the state: takes the home lock (unless an outer
    /// operation holds it already) and reloads what another process saved meanwhile. Every
    /// save happens under such a guard.
    pub(crate) fn begin(&mut self) -> Result<OpGuard, ClientError> {
        if self.held.get() {
            return Ok(OpGuard { lock: None, held: self.held.clone() });
        }
        let lock = self.home.lock()?;
        self.held.set(true);
        let guard = OpGuard { lock: Some(lock), held: self.held.clone() };
        if self.home.refresh()?
            && let Some(store) = self.home.take_mls()
        {
            self.mls = MlsClient::from_store_lazy(self.identity.seed(), store)?
                .with_clock(self.clock.clone())
                .with_display_name(self.home.state.name.as_deref());
        }
        // openmls reads its records on demand through this operation's handle (the previous
        // one was closed with the lock).
        self.mls.store().attach(self.home.db()?);
        Ok(guard)
    }

    /// Picks up changes another qpq process saved (for long-lived users such as the shell).
    pub fn refresh(&mut self) -> Result<(), ClientError> {
        self.begin().map(drop)
    }

    pub fn state(&self) -> &State {
        &self.home.state
    }

    /// Now, by this messenger's clock (ms since the Unix epoch).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn public_key(&self) -> PublicKey {
        self.identity.public()
    }

    /// True once this process found its home re-sealed under another key (`qpq passphrase
    /// --new-key` ran elsewhere): no operation of it can succeed any more.
    pub fn home_key_changed(&self) -> bool {
        self.home.key_changed()
    }

    pub fn server(&self) -> Option<String> {
        self.opts.server.clone().or_else(|| self.home.state.server.clone())
    }

    /// Writes the state (with the current MLS storage) durably.
    pub(crate) fn persist(&mut self) -> Result<(), ClientError> {
        debug_assert!(self.held.get(), "saves happen under the home lock");
        self.home.save_with(Some(self.mls.store()))?;
        Ok(())
    }

    /// Connects and authenticates if not connected yet (or the connection dropped).
    pub async fn connect(&mut self) -> Result<&Session, ClientError> {
        if self.session.as_ref().is_some_and(Session::is_open) {
            // Checked just above; the borrow checker needs the second lookup.
            return self.session.as_ref().ok_or(ClientError::NoServer);
        }
        self.session = None;
        // The pin as the home holds it now: another process may have re-pinned (`qpq server
        // pin` after a replaced certificate) since this one loaded it, and a long-lived process
        // (the shell, `recv --follow`) reconnecting with its old copy failed for ever.
        self.refresh()?;
        let server = self.server().ok_or(ClientError::NoServer)?;
        let known = self.home.state.known_servers.get(&server).cloned();
        let (mut session, first_use) = open_session(&server, known.as_ref(), self.opts.fingerprint).await?;
        session.authenticate(&self.identity).await?;
        let instance = session.server_instance();
        let mut replaced = false;
        if instance != self.home.state.server_instance {
            let _op = self.begin()?;
            if self.home.state.server_instance != 0 {
                // A new server database numbers our queue from 1 again and has none of our
                // keys: start the cursor over (or every new message would look like a
                // redelivery and be skipped) and publish our keys again below.
                self.notices
                    .push("the server's database was replaced: publishing our keys again".to_string());
                self.home.state.processed_seq = 0;
                // Nor may an ack carried from the old database's round delete the new one's.
                self.unacked = 0;
                self.backlog = false;
                // Recorded with the new instance, so that a republish cut short below (a lost
                // connection, a cancelled call) is done by the next rounds' upkeep instead of
                // never: this instance is not "new" to the next connect.
                self.home.state.hybrid_published = false;
                self.home.state.rotate_last_resort = true;
                // The new database refused us nothing: no wait from the old one's refusals.
                self.home.state.key_upload_backoff = Default::default();
                replaced = true;
            }
            self.home.state.server_instance = instance;
            self.home.save()?;
        }
        let fp = session.fingerprint().to_string();
        if known.as_ref() != Some(&fp) {
            let _op = self.begin()?;
            let now = self.home.state.known_servers.get(&server);
            if now != known.as_ref() && now != Some(&fp) {
                // Re-pinned by another process while we connected: its pin stands, not the
                // certificate this connection accepted against the old one.
                session.close().await;
                return Err(ClientError::Session(SessionError::Connect {
                    addr: server,
                    reason: "its pinned certificate changed while connecting; try again".into(),
                }));
            }
            if first_use {
                self.notices.push(format!("pinned certificate of {server}: {fp}"));
            }
            self.home.state.known_servers.insert(server, fp);
            self.home.save()?;
        }
        self.session = Some(session);
        if replaced {
            self.republish().await?;
        }
        self.session.as_ref().ok_or(ClientError::NoServer)
    }

    /// Uploads our signed hybrid key and a fresh KeyPackage pool (with a new last-resort one).
    async fn republish(&mut self) -> Result<(), ClientError> {
        // Under the lock, with the state reloaded: another process may have rotated our key.
        let _op = self.begin()?;
        self.publish_hybrid_key().await?;
        self.refill_key_packages().await
    }

    /// After an operation was dropped midway (the shell's Ctrl-C): forget everything that is
    /// only in memory and reload what is on disk, exactly as a restart after a crash would; the
    /// connections (which may have calls in flight) are closed and reopened on the next call.
    pub async fn abandon(&mut self) -> Result<(), ClientError> {
        self.disconnect().await;
        self.commits.clear();
        self.kp_check = false;
        self.home.forget_seen();
        self.refresh()
    }

    /// Drops the connections (the next call reconnects).
    pub async fn disconnect(&mut self) {
        let closing = (self.anonymous.take().map(Session::close), self.session.take().map(Session::close));
        match closing {
            (Some(a), Some(s)) => {
                futures::join!(a, s);
            }
            (Some(a), None) => a.await,
            (None, Some(s)) => s.await,
            (None, None) => {}
        }
    }

    /// True while a connection is open (a dead server is noticed only by the next call or the
    /// QUIC idle timeout). The shell uses it to report that the server is back.
    pub fn is_connected(&self) -> bool {
        self.session.as_ref().is_some_and(Session::is_open)
    }

    pub(crate) fn session(&self) -> Result<&Session, ClientError> {
        self.session.as_ref().ok_or(ClientError::NoServer)
    }

    /// The unauthenticated connection, opened on first use with the certificate the
    /// authenticated one pinned.
    pub(crate) async fn anonymous(&mut self) -> Result<&Session, ClientError> {
        if !self.anonymous.as_ref().is_some_and(Session::is_open) {
            let pin = Pin::Fingerprint(self.connect().await?.fingerprint());
            let server = self.server().ok_or(ClientError::NoServer)?;
            self.anonymous = Some(Session::connect(&server, pin).await?);
        }
        self.anonymous.as_ref().ok_or(ClientError::NoServer)
    }

    // ----- the pinned server -----

    /// The certificate fingerprint pinned for `server`, if any.
    pub fn pinned(&self, server: &str) -> Option<Fingerprint> {
        self.home.state.known_servers.get(server).and_then(|k| Fingerprint::parse(k).ok())
    }

    /// Every pin, by server address.
    pub fn pins(&self) -> Vec<(String, String)> {
        self.home.state.known_servers.iter().map(|(s, f)| (s.clone(), f.clone())).collect()
    }

    /// Pins `fp` for `server`, replacing any earlier pin (`qpq server pin`).
    pub fn pin_server(&mut self, server: &str, fp: Fingerprint) -> Result<(), ClientError> {
        let _op = self.begin()?;
        self.home.state.known_servers.insert(server.to_string(), fp.to_string());
        self.home.save()?;
        Ok(())
    }

    /// Forgets the pin of `server`; false when there was none.
    pub fn forget_server(&mut self, server: &str) -> Result<bool, ClientError> {
        let _op = self.begin()?;
        if self.home.state.known_servers.remove(server).is_none() {
            return Ok(false);
        }
        self.home.save()?;
        Ok(true)
    }

    // ----- names -----

    /// The contact name of `key`, if any.
    pub fn contact_name(&self, key: &[u8; 32]) -> Option<&str> {
        self.home.state.contacts.iter().find(|(_, k)| *k == key).map(|(n, _)| n.as_str())
    }

    /// A name for people: "me", the contact name, the name they signed marked as a claim
    /// (`~Alice (304b-9934)`, see [`names`](super::names)), or the short key.
    pub fn display_name(&self, key: &[u8; 32]) -> String {
        self.name_for_people(key, || self.claimed_name(key))
    }

    /// Resolves a contact name, a 64-hex key or a unique short key (see
    /// [`names`](super::names)).
    pub fn resolve_person(&self, s: &str) -> Result<[u8; 32], ClientError> {
        if let Some((_, k)) = self.contact_named(s)? {
            return Ok(k);
        }
        if PublicKey::looks_like_key(s) {
            return Ok(PublicKey::parse_hex(s)?.0);
        }
        if s.len() >= 60 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdentityError::BadHex(s.to_string()).into());
        }
        self.resolve_short_key(s).unwrap_or_else(|| Err(ClientError::UnknownContact(s.to_string())))
    }

    /// Parses a send target: `#group`, a contact name, a 64-hex key or a unique short key.
    pub fn resolve_target(&self, s: &str) -> Result<Target, ClientError> {
        if let Some(g) = s.strip_prefix('#') {
            return Ok(Target::Group(g.to_string()));
        }
        let k = self.resolve_person(s)?;
        if k == self.identity.public().0 {
            return Err(ClientError::SelfTarget);
        }
        Ok(Target::Person(k))
    }

    // ----- contacts -----

    /// The contact `name` means (see [`pick_name`]): its name as written in the home, and key.
    pub(crate) fn contact_named(&self, name: &str) -> Result<Option<(&str, [u8; 32])>, ClientError> {
        let all = self.home.state.contacts.iter().map(|(n, k)| (n.as_str(), *k));
        pick_name(name, all).map_err(|names| ClientError::AmbiguousName {
            given: format!("{name:?}"),
            names: names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
        })
    }

    pub fn contact_add(&mut self, name: &str, key: &str) -> Result<PublicKey, ClientError> {
        let _op = self.begin()?;
        if !valid_name(name) {
            return Err(ClientError::BadName(name.to_string()));
        }
        if let Some(why) = contact_name_clash(name) {
            return Err(ClientError::ContactNameClash { name: name.to_string(), why });
        }
        // A whole key, or the short form of one this home already knows (a group member's).
        let pk = match self.resolve_short_key(key) {
            Some(found) => PublicKey(found?),
            None => PublicKey::parse_hex(key)?,
        };
        if let Some(taken) = self.home.state.contacts.keys().find(|n| same_name(n, name)) {
            return Err(ClientError::ContactExists(taken.clone()));
        }
        check_contact_key(&pk, &self.identity.public(), self.contact_name(&pk.0))?;
        self.home.state.contacts.insert(name.to_string(), pk.0);
        self.home.save()?;
        Ok(pk)
    }

    pub fn contact_remove(&mut self, name: &str) -> Result<(), ClientError> {
        let _op = self.begin()?;
        let Some((named, _)) = self.contact_named(name)? else {
            return Err(ClientError::UnknownContact(name.to_string()));
        };
        let named = named.to_string();
        self.home.state.contacts.remove(&named);
        self.home.save()?;
        Ok(())
    }

    pub fn contacts(&self) -> Vec<(String, PublicKey)> {
        self.home.state.contacts.iter().map(|(n, k)| (n.clone(), PublicKey(*k))).collect()
    }

    // ----- conversations -----

    /// Display name of a conversation: `#name` for groups, the peer's name for DMs.
    pub fn conversation_name(&self, group_id: &[u8]) -> String {
        match self.home.state.groups.get(&hex::encode(group_id)) {
            Some(GroupMeta { kind: GroupKind::Direct { peer }, .. }) => self.display_name(peer),
            Some(g) => format!("#{}", g.name),
            None => format!("#{}", hex::encode(&group_id[..group_id.len().min(4)])),
        }
    }

    /// The other person of a direct conversation (None for a group or an unknown id).
    pub fn direct_peer(&self, group_id: &[u8]) -> Option<[u8; 32]> {
        match self.home.state.groups.get(&hex::encode(group_id))?.kind {
            GroupKind::Direct { peer } => Some(peer),
            GroupKind::Group => None,
        }
    }

    /// Group name for JSON output: the group's name, or None for a direct conversation.
    pub fn group_label(&self, group_id: &[u8]) -> Option<String> {
        match self.home.state.groups.get(&hex::encode(group_id)) {
            Some(GroupMeta { kind: GroupKind::Direct { .. }, .. }) => None,
            Some(g) => Some(g.name.clone()),
            None => None,
        }
    }

    /// The group id of the active group called `name` (see [`same_name`]).
    pub fn find_group(&self, name: &str) -> Result<Vec<u8>, ClientError> {
        let groups = || self.home.state.groups.iter().filter(|(_, g)| g.kind == GroupKind::Group);
        let active = groups().filter(|(_, g)| g.active).map(|(id, g)| (g.name.as_str(), id));
        let ambiguous = |names: Vec<&str>| ClientError::AmbiguousName {
            given: format!("#{name}"),
            names: names.iter().map(|n| format!("#{n}")).collect::<Vec<_>>().join(", "),
        };
        match pick_name(name, active).map_err(ambiguous)? {
            Some((_, id)) => hex::decode(id).map_err(|_| ClientError::UnknownGroup(name.to_string())),
            None if groups().any(|(_, g)| same_name(&g.name, name)) => {
                Err(ClientError::NotMember(name.to_string()))
            }
            None => Err(ClientError::UnknownGroup(name.to_string())),
        }
    }

    /// The group called `name`, active or not (see [`same_name`]): the active one when there
    /// is one, else of those left the first by id.
    pub(crate) fn any_group_named(&self, name: &str) -> Option<Vec<u8>> {
        self.find_group(name).ok().or_else(|| {
            let groups = self.home.state.groups.iter().filter(|(_, g)| g.kind == GroupKind::Group);
            let all = groups.map(|(id, g)| (g.name.as_str(), id));
            pick_name(name, all).ok().flatten().and_then(|(_, id)| hex::decode(id).ok())
        })
    }

    /// The active direct conversation with `peer` (lowest group id wins when both sides created
    /// one at the same time, so both ends converge on the same one).
    pub fn find_direct(&self, peer: &[u8; 32]) -> Option<Vec<u8>> {
        self.home
            .state
            .groups
            .iter()
            .filter(|(_, g)| g.active && g.kind == GroupKind::Direct { peer: *peer })
            .map(|(id, _)| id)
            .min()
            .and_then(|id| hex::decode(id).ok())
    }

    // ----- sending (queued first, see [`crate::client::outbox`]) -----

    /// Sends a group's MLS `frame` (an encoded [`Frame::Mls`](super::frame::Frame::Mls)) once
    /// for every recipient on `channel`: the server stores one copy, and the cost does not grow
    /// with the group beyond 32 bytes of key per recipient. Returns the recipients the server
    /// skipped because their queue is full (it stored the frame for the others; see
    /// [`Messenger::note_skipped`]).
    pub(crate) async fn fan_out(
        &mut self,
        channel: &[u8],
        recipients: &[[u8; 32]],
        frame: &[u8],
    ) -> Result<Vec<[u8; 32]>, ClientError> {
        Ok(self.fan_out_requiring(channel, recipients, frame, None).await?.1)
    }

    /// [`Messenger::fan_out`], with the position the server gave it in `channel`.
    pub(crate) async fn fan_out_placed(
        &mut self,
        channel: &[u8],
        recipients: &[[u8; 32]],
        frame: &[u8],
    ) -> Result<(u64, Vec<[u8; 32]>), ClientError> {
        self.fan_out_requiring(channel, recipients, frame, None).await
    }

    /// [`Messenger::fan_out`] for a commit, whose `recipients` include us: our own copy is
    /// required. Coming back in the channel's order, it is how we learn whether the commit won
    /// the epoch; if the server skipped only us (our queue full, say flooded by a stranger), the
    /// others would move to an epoch we never learn we created, and re-sending our copy later
    /// could order it after a rival commit. So when our queue is full the server refuses the
    /// whole fanout (queueFull) and the commit is void for everyone.
    pub(crate) async fn fan_out_commit(
        &mut self,
        channel: &[u8],
        recipients: &[[u8; 32]],
        frame: &[u8],
    ) -> Result<Vec<[u8; 32]>, ClientError> {
        let me = self.identity.public();
        Ok(self.fan_out_requiring(channel, recipients, frame, Some(&me)).await?.1)
    }

    /// The fanout of [`Messenger::fan_out`] and [`Messenger::fan_out_commit`].
    async fn fan_out_requiring(
        &mut self,
        channel: &[u8],
        recipients: &[[u8; 32]],
        frame: &[u8],
        required: Option<&PublicKey>,
    ) -> Result<(u64, Vec<[u8; 32]>), ClientError> {
        let payload = Parcel::Group(frame).encode();
        let to: Vec<PublicKey> = recipients.iter().map(|r| PublicKey(*r)).collect();
        let session = self.anonymous().await?;
        let (channel_seq, seqs) = match required {
            Some(me) => session.enqueue_fanout_requiring(channel, &payload, &to, me).await?,
            None => session.enqueue_fanout(channel, &payload, &to).await?,
        };
        Ok((channel_seq, skipped(recipients, &seqs)))
    }

    /// Seals `frame` (a Welcome's) once for its recipients ([`sealmany`]: the frame once, its key
    /// in a hybrid envelope per recipient) and fans it out on `channel`: the server stores one
    /// copy. Recipients go [`WELCOME_RECIPIENTS_PER_PARCEL`] to a parcel, so a parcel stays
    /// within a few dozen KB of the Welcome itself (whose size the server's payload limit
    /// bounds). Each Welcome stands alone, so splitting loses no ordering; if the connection
    /// drops between parcels the whole item is sent again, and a joiner who already joined drops
    /// the repeat (its KeyPackage is used up). Returns the recipients the server skipped because
    /// their queue is full.
    pub(crate) async fn seal_for_each(
        &mut self,
        channel: &[u8],
        recipients: &[[u8; 32]],
        frame: &[u8],
    ) -> Result<Vec<[u8; 32]>, ClientError> {
        let mut skipped_all = Vec::new();
        for chunk in recipients.chunks(WELCOME_RECIPIENTS_PER_PARCEL) {
            let mut keys = Vec::with_capacity(chunk.len());
            for r in chunk {
                keys.push((*r, self.hybrid_key_of(r).await?));
            }
            let to: Vec<([u8; 32], &hybrid::HybridPublicKey)> = keys.iter().map(|(r, k)| (*r, k)).collect();
            // Invariant: `chunk` is non-empty and at most WELCOME_RECIPIENTS_PER_PARCEL long,
            // far below sealmany::MAX_RECIPIENTS.
            let Some(sealed) = sealmany::seal(&to, frame) else { continue };
            let payload = Parcel::SealedMany(&sealed).encode();
            let to: Vec<PublicKey> = chunk.iter().map(|r| PublicKey(*r)).collect();
            match self.anonymous().await?.enqueue_fanout(channel, &payload, &to).await {
                Ok((_, seqs)) => skipped_all.extend(skipped(chunk, &seqs)),
                // Every recipient of this parcel has a full queue: it is theirs that fails,
                // and the next parcels (and the ones before, already sent) are for others.
                Err(e) if e.code() == Some(crate::proto::wire_error::ErrorCode::QueueFull) => {
                    skipped_all.extend_from_slice(chunk)
                }
                Err(e) => return Err(e.into()),
            }
            // Sealing is milliseconds per parcel, on the thread that also drives the QUIC
            // connections: let keep-alives out between parcels.
            tokio::task::yield_now().await;
        }
        Ok(skipped_all)
    }

    /// Records a notice naming the members of `group_id` (other than us) that a fanout of
    /// `carried` skipped: the server took it for everyone else, so it counts as sent.
    pub(crate) fn note_skipped(&mut self, group_id: &[u8], skipped: &[[u8; 32]], carried: Carried) {
        let me = self.identity.public().0;
        let names: Vec<String> =
            skipped.iter().filter(|k| **k != me).map(|k| self.display_name_in(group_id, k)).collect();
        if names.is_empty() {
            return;
        }
        let (who, to) = (names.join(", "), self.conversation_name(group_id));
        let full = "their queue on the server is full";
        self.notices.push(match carried {
            Carried::Message => format!("{who} did not get your message to {to}: {full}"),
            Carried::LeaveRequest => format!("{who} did not get your leave request for {to}: {full}"),
            Carried::Commit => format!(
                "{who} did not get a change to {to} ({full}), so they can no longer follow it \
                 (in a group, remove them and add them again)"
            ),
        });
    }

    /// UDP bytes this messenger's open connections have sent (for `qpq bench`).
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.session.iter().chain(self.anonymous.iter()).map(Session::bytes_sent).sum()
    }

    pub(crate) fn push_history(&mut self, entry: Entry) {
        let key = hex::encode(&entry.group_id);
        if let Some(g) = self.home.state.groups.get_mut(&key) {
            self.home.state.timelines.note_message(&key);
            // Appended to the history table by the next save (no cap: issue 12).
            g.history.push_back(entry);
        }
        self.expire_history();
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

    #[test]
    fn history_and_inbox_keep_the_newest_within_count_and_bytes() {
        let mut q: VecDeque<Entry> = ["a", "b", "c"].into_iter().map(entry).collect();
        keep_newest(&mut q, 2, usize::MAX, entry_bytes);
        assert_eq!(q.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        let big = "x".repeat(1000);
        let mut q: VecDeque<Entry> = [big.as_str(), "small", big.as_str()].into_iter().map(entry).collect();
        let one_big = entry_bytes(&entry(&big));
        keep_newest(&mut q, 10, one_big + entry_bytes(&entry("small")), entry_bytes);
        assert_eq!(q.len(), 2, "the oldest big entry went first");
        assert_eq!(q[0].text, "small");
        keep_newest(&mut q, 10, 10, entry_bytes);
        assert!(q.is_empty(), "nothing fits in 10 bytes");
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;
    use crate::client::testing::offline_messenger;

    /// Exploratory testing: `#team` and `#TEAM` could both exist (two groups a message could
    /// go to by a slip of the shift key), and `send Bob` did not find the contact `bob`.
    #[test]
    fn names_that_differ_only_in_case_are_one_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = offline_messenger(dir.path());
        let bob = hex::encode(MlsClient::new(&rand::random()).unwrap().identity());
        m.contact_add("bob", &bob).unwrap();
        assert_eq!(m.resolve_person("BOB").unwrap(), m.resolve_person("bob").unwrap());
        let carol = hex::encode(MlsClient::new(&rand::random()).unwrap().identity());
        let err = m.contact_add("Bob", &carol).unwrap_err();
        assert_eq!(err.to_string(), "a contact named \"bob\" already exists");
        // Names that would pass for you, a request number or someone's short key.
        for (name, why) in [
            ("me", "qpq shows you as \"me\" and \"you\""),
            ("You", "qpq shows you as \"me\" and \"you\""),
            ("12", "a number stands for a message request or a page size"),
            ("8b95-fc23", "it reads as a short key"),
            ("deadBEEF", "it reads as a short key"),
        ] {
            let err = m.contact_add(name, &carol).unwrap_err().to_string();
            assert_eq!(err, format!("{name:?} cannot name a contact: {why}"));
        }
        for fine in ["meg", "8b95-fc2", "b0b"] {
            m.contact_add(fine, &hex::encode(MlsClient::new(&rand::random()).unwrap().identity())).unwrap();
            m.contact_remove(fine).unwrap();
        }

        let team = m.group_create("team").unwrap();
        assert_eq!(m.group_create("TEAM").unwrap_err().to_string(), "a group named #team already exists");
        assert_eq!(m.find_group("Team").unwrap(), team);
        assert_eq!(m.conversation_id("#TEAM").unwrap(), team);

        // A home from before the rule may hold both: the exact name is found first, and a name
        // that is neither is refused rather than guessed.
        let other = m.group_create("other").unwrap();
        m.home.state.groups.get_mut(&hex::encode(&other)).unwrap().name = "Team".into();
        assert_eq!(m.find_group("team").unwrap(), team);
        assert_eq!(m.find_group("Team").unwrap(), other);
        assert_eq!(
            m.find_group("TEAM").unwrap_err().to_string(),
            "#TEAM could be any of #Team, #team: write the name as it is written there"
        );
        m.home.state.contacts.insert("BOB".into(), MlsClient::new(&rand::random()).unwrap().identity());
        assert!(matches!(m.resolve_person("Bob"), Err(ClientError::AmbiguousName { .. })));
        m.contact_remove("BOB").unwrap();
        m.contact_remove("Bob").unwrap();
        assert!(m.contacts().is_empty());
    }
}
