//! MLS (RFC 9420) group state for qpq, on top of openmls.
//!
//! The rest of the crate never touches openmls directly: the client drives
//! its groups through [`MlsClient`], and the server checks uploaded
//! KeyPackages with [`validate_key_package`] without holding any MLS state.
//! Keeping every openmls call here confines the library's API churn to one
//! file and lets this module enforce qpq's conventions in one place.
//!
//! Identity convention: a user *is* an Ed25519 keypair. The raw 32-byte
//! public key is both the MLS `BasicCredential` identity and the MLS leaf
//! signature key, so "who sent this" and "which key signed this" can never
//! disagree. The server authenticates connections with the same key, which is
//! why it can bind an uploaded KeyPackage to the uploader. This module
//! rejects KeyPackages, Welcomes and Commits that would put a leaf violating
//! the convention into a group, and every proposal but a member's request to leave (see
//! `accept_proposal`).
//!
//! Persistence: openmls keeps all group state, pending commits, queued
//! proposals and KeyPackage private keys in its storage provider; ours is
//! [`crate::client::db::mls::MlsStore`], which works in memory or over the
//! client database. [`MlsClient::export_storage`] serializes its records (sorted by key,
//! length-prefixed, so equal states give equal bytes) and
//! [`MlsClient::from_storage`] loads it into a fresh provider; the caller
//! keeps the bytes inside its encrypted state file. The storage is the only
//! source of truth: openmls writes every change through to it, so an export
//! taken between calls is always complete. Decoding a group from it costs
//! O(members) (the whole ratchet tree), so loaded groups are kept in a cache
//! (see [`GroupCache`]) that an operation checks a group out of and returns
//! it to only on success: a failed operation drops its copy and the next one
//! reloads what the storage holds, exactly as if nothing were cached. The
//! cache is emptied whenever the storage's contents are replaced underneath
//! (another process wrote: see [`MlsStore::version`]). The signing key is not
//! stored: it is re-derived from the identity seed the caller already keeps.
//! The storage holds HPKE private keys and epoch secrets: exports are
//! [`Zeroizing`] (built in one allocation so no stale copy is left behind) and
//! every stored value is wiped when the client drops. openmls itself replaces
//! map entries without wiping the old value; that copy is out of our reach.
//!
//! Lifetimes: KeyPackages get qpq's lifetime
//! ([`crate::limits::KEY_PACKAGE_LIFETIME_SECS`]) as of the client's
//! [`Clock`], and KeyPackages we are handed are judged by that clock too
//! (see [`keypackage`]).
//!
//! Wire policy: every group uses one ciphersuite, carries the ratchet tree in
//! Welcomes, sends commits and proposals as PrivateMessages (the server only
//! sees ciphertext), keeps a few past epochs so application messages that
//! race a commit still decrypt, and tolerates reordering within an epoch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ed25519_dalek::SigningKey;
use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::group::{ProcessMessageError, ValidationError};
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, ContentType, CredentialWithKey, ExtensionType, GroupId,
    KeyPackage, KeyPackageBundle, KeyPackageRef, LeafNodeIndex, LeafNodeParameters, Lifetime, MlsGroup,
    MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut,
    PURE_CIPHERTEXT_WIRE_FORMAT_POLICY, ProcessedMessageContent, Proposal, ProtocolMessage, QueuedProposal,
    Sender, SenderRatchetConfiguration, StagedCommit, StagedWelcome, WelcomeError,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::StorageProvider as _;
use openmls_traits::types::SignatureScheme;
use tls_codec::{Deserialize as _, Serialize as _};
use zeroize::Zeroizing;

use crate::client::db::mls::{DbProvider, MlsStore};
use crate::clock::Clock;
use crate::limits;

/// The only ciphersuite qpq speaks (0x004F): HPKE with the hybrid X-Wing KEM (ML-KEM-768 +
/// X25519, draft-connolly-cfrg-xwing-kem-06) + AES-128-GCM + SHA-256 + Ed25519 signatures
/// matching the Ed25519 user identities (draft-ietf-mls-pq-ciphersuites). Group secrets thus
/// rest on ML-KEM and X25519 together; authentication stays classical (Ed25519).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;

/// The classical suite qpq spoke before: refused now, kept for `qpq bench mls`'s comparison.
pub const CLASSICAL_CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Past epochs whose message secrets are kept, so an application message
/// sent just before a commit still decrypts after the commit is merged.
///
/// Why 5 and not 1: the server orders a group's messages, so a live sender races at most
/// one commit, but the outbox (`crate::client::outbox`) re-sends a ciphertext that may have
/// left as it was, after however many commits came in meanwhile, and each kept epoch is one
/// more commit such a retry survives. Why the cost is fine: the client database stores each past
/// epoch's member list once (`crate::client::db::past_leaves`), so a kept epoch adds only its
/// secret tree to the record rewritten per message (`qpq bench --scenario fanout`, issue 11).
const MAX_PAST_EPOCHS: usize = 5;

/// How far back within one sender's ratchet a message may arrive (reordering).
const OUT_OF_ORDER_TOLERANCE: u32 = 100;

/// How far ahead one sender's ratchet may jump (messages lost or delayed).
const MAXIMUM_FORWARD_DISTANCE: u32 = 5000;

/// Prefix of the storage export, so a future format change is detectable.
const STORAGE_MAGIC: &[u8; 8] = b"qpqmls01";

/// `MemoryStorage` key prefix of per-group join configs. Every stored group has
/// exactly one, so the keys under it enumerate the groups (see `group_ids`).
const JOIN_CONFIG_LABEL: &[u8] = b"MlsGroupJoinConfig";

/// Errors of the client-side MLS operations.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    #[error("unknown group")]
    UnknownGroup,
    #[error("group already exists")]
    GroupExists,
    #[error("an old welcome: it starts at epoch {welcome}, and our copy of the group reached {ours}")]
    StaleWelcome { welcome: u64, ours: u64 },
    #[error("a welcome into a group we were in, from someone who was not in it then")]
    NotFromAMember,
    #[error("invalid group id: must not be empty")]
    EmptyGroupId,
    #[error("not a member of this group")]
    NotMember,
    #[error("unknown member {0}")]
    UnknownMember(String),
    #[error("already a member: {0}")]
    AlreadyMember(String),
    #[error("cannot remove ourselves with a commit, leave the group instead")]
    CannotRemoveSelf,
    #[error("nothing to do: {0}")]
    EmptyInput(&'static str),
    #[error("a commit of ours is pending: merge or clear it first")]
    PendingCommit,
    #[error("no pending commit")]
    NoPendingCommit,
    #[error("pending proposals must be committed first")]
    PendingProposals,
    #[error("malformed mls message: {0}")]
    Malformed(String),
    #[error("unexpected mls message: {0}")]
    UnexpectedMessage(&'static str),
    #[error("message belongs to a different group")]
    WrongGroup,
    #[error("cannot process our own message")]
    OwnMessage,
    #[error("a message from someone who is no longer a member")]
    FormerMember([u8; 32]),
    #[error("a message that was processed already came again")]
    Replayed,
    #[error("refused proposal: {0}, only a member's request to leave is accepted")]
    RefusedProposal(&'static str),
    #[error("unsupported mls message: {0}")]
    Unsupported(&'static str),
    #[error("welcome matches none of our key packages")]
    NoMatchingKeyPackage,
    #[error("member violates the identity convention: {0}")]
    InvalidMember(&'static str),
    #[error(transparent)]
    KeyPackage(#[from] KeyPackageError),
    #[error("invalid mls storage: {0}")]
    Storage(String),
    #[error("{op} failed: {detail}")]
    Openmls { op: &'static str, detail: String },
}

mod crypto;
mod hpke;
mod keypackage;
mod profile;
#[cfg(test)]
mod tests;

pub use crypto::QpqCrypto;
pub use keypackage::{KeyPackageError, ValidatedKeyPackage, check_lifetime, validate_key_package};
use keypackage::{credential_identity, sender_identity, verify_key_package};
pub use profile::{DISPLAY_NAME_EXTENSION, valid_display_name};

/// A commit of ours, staged but not merged until the server orders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Serialized MlsMessage (PrivateMessage) for the group.
    pub commit: Vec<u8>,
    /// Serialized MlsMessage (Welcome) for members added by this commit.
    pub welcome: Option<Vec<u8>>,
}

/// Who a commit adds and removes, telling a leave (a Remove proposal its subject sent, see
/// [`MlsClient::leave_group`]) from a removal by someone else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<[u8; 32]>,
    pub removed: Vec<[u8; 32]>,
    pub left: Vec<[u8; 32]>,
}

/// A processed group message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Application {
        sender: [u8; 32],
        plaintext: Vec<u8>,
    },
    /// Already merged; `epoch` is the epoch the group is in now.
    Commit {
        sender: [u8; 32],
        epoch: u64,
        added: Vec<[u8; 32]>,
        /// Removed by someone else.
        removed: Vec<[u8; 32]>,
        /// Removed at their own request (they proposed their removal: a leave).
        left: Vec<[u8; 32]>,
        /// We were removed: the group is now inactive.
        self_removed: bool,
    },
    /// A member's request to leave (a Remove proposal naming its sender, see
    /// [`MlsClient::leave_group`]), the only proposal qpq accepts. Queued until some member
    /// commits it; while queued we cannot send application messages (openmls refuses), so
    /// commit it promptly.
    LeaveRequest {
        sender: [u8; 32],
    },
}

/// The MLSMessage wire formats (RFC 9420 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireKind {
    Welcome,
    PrivateMessage,
    PublicMessage,
    KeyPackage,
    GroupInfo,
}

/// Routing information readable without any group state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    /// Empty for Welcome and KeyPackage, whose group id is encrypted or absent.
    pub group_id: Vec<u8>,
    /// 0 for Welcome and KeyPackage.
    pub epoch: u64,
    pub kind: WireKind,
    /// A group message whose content type (RFC 9420 §6, in the clear in both framings) is
    /// application data; false for proposals and commits and for the other formats.
    pub application: bool,
}

/// A KeyPackage we just made; its private keys are in our storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKeyPackage {
    /// TLS-serialized KeyPackage, to publish.
    pub bytes: Vec<u8>,
    /// Its KeyPackageRef (RFC 9420 §5.2), the storage key of its private keys.
    pub hash_ref: Vec<u8>,
    /// End of its lifetime (unix seconds).
    pub not_after: u64,
}

/// The result of joining a group from a Welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub group_id: Vec<u8>,
    /// The member who sent the Welcome, from the signed GroupInfo.
    pub inviter: [u8; 32],
    /// Hash references of the KeyPackages the Welcome's secrets are encrypted to.
    pub key_package_refs: Vec<Vec<u8>>,
}

/// One user's MLS state: signing key plus every group and KeyPackage secret.
pub struct MlsClient {
    identity: [u8; 32],
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    provider: DbProvider,
    /// Decides KeyPackage lifetimes (ours and the ones we are handed).
    clock: Clock,
    /// The name we sign into the leaves we make (see [`profile`]).
    display_name: Option<String>,
    /// Groups decoded from the storage, kept between operations (see the module header).
    groups: GroupCache,
}

/// Loaded groups by group id, valid for one [`MlsStore::version`] of the storage. A Mutex, not a
/// RefCell, so an `MlsClient` can move between threads; never held across an openmls call.
#[derive(Default)]
struct GroupCache(
    Mutex<CachedGroups>,
    /// Groups decoded from the storage so far (tests check the cache is used).
    #[cfg(test)]
    std::sync::atomic::AtomicUsize,
);

#[derive(Default)]
struct CachedGroups {
    /// The storage version the groups were loaded at.
    version: u64,
    groups: HashMap<Vec<u8>, MlsGroup>,
}

impl GroupCache {
    fn lock(&self) -> MutexGuard<'_, CachedGroups> {
        // A panic while held leaves at worst a missing group, which is reloaded.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the group out if it was loaded at `version` (everything is dropped otherwise).
    fn take(&self, version: u64, group_id: &[u8]) -> Option<MlsGroup> {
        let mut cached = self.lock();
        if cached.version != version {
            cached.groups.clear();
            cached.version = version;
            return None;
        }
        cached.groups.remove(group_id)
    }

    /// Returns a group loaded or last changed at `version`, unless the storage moved since.
    fn put(&self, version: u64, group_id: Vec<u8>, group: MlsGroup) {
        let mut cached = self.lock();
        if cached.version == version {
            cached.groups.insert(group_id, group);
        }
    }

    fn evict(&self, group_id: &[u8]) {
        self.lock().groups.remove(group_id);
    }
}

/// A group checked out of the [`GroupCache`] for one operation. [`Checkout::keep`] returns it
/// once the operation succeeded; dropped without that (an error on the way), the copy is
/// discarded and the next operation reloads the group from the storage.
struct Checkout<'a> {
    cache: &'a GroupCache,
    version: u64,
    group_id: Vec<u8>,
    group: MlsGroup,
}

impl Checkout<'_> {
    fn keep(self) {
        self.cache.put(self.version, self.group_id, self.group);
    }
}

impl std::ops::Deref for Checkout<'_> {
    type Target = MlsGroup;
    fn deref(&self) -> &MlsGroup {
        &self.group
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut MlsGroup {
        &mut self.group
    }
}

impl fmt::Debug for MlsClient {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlsClient").field("identity", &hex::encode(self.identity)).finish_non_exhaustive()
    }
}

impl MlsClient {
    /// A client with empty storage for the Ed25519 secret seed.
    pub fn new(identity_seed: &[u8; 32]) -> Result<Self, MlsError> {
        let public = SigningKey::from_bytes(identity_seed).verifying_key().to_bytes();
        // openmls_basic_credential signs with `ed25519_dalek::SigningKey::
        // try_from(private)`, i.e. it expects the 32-byte seed.
        let signer =
            SignatureKeyPair::from_raw(SignatureScheme::ED25519, identity_seed.to_vec(), public.to_vec());
        let credential = CredentialWithKey {
            credential: BasicCredential::new(public.to_vec()).into(),
            signature_key: public.to_vec().into(),
        };
        Ok(Self {
            identity: public,
            signer,
            credential,
            provider: DbProvider::default(),
            clock: Clock::system(),
            display_name: None,
            groups: GroupCache::default(),
        })
    }

    /// The same client signing `name` into the leaves it makes from now on: KeyPackages and
    /// groups it creates (see [`profile`]). An invalid name is not signed at all.
    pub fn with_display_name(mut self, name: Option<&str>) -> Self {
        self.display_name = name.filter(|n| valid_display_name(n)).map(str::to_string);
        self
    }

    /// Changes the name signed into the leaves made from now on (see [`Self::with_display_name`]).
    pub fn set_display_name(&mut self, name: Option<&str>) {
        self.display_name = name.filter(|n| valid_display_name(n)).map(str::to_string);
    }

    /// The name this client signs into the leaves it makes (see [`Self::with_display_name`]).
    pub fn display_name(&self) -> Option<&str> {
        self.display_name.as_deref()
    }

    /// The display name member `key` of the group signed into its leaf, if a valid one.
    pub fn member_name(&self, group_id: &[u8], key: &[u8; 32]) -> Option<String> {
        let group = self.checkout(group_id).ok()??;
        let name = group
            .members()
            .find(|m| m.signature_key.as_slice() == key)
            .and_then(|member| group.public_group().leaf(member.index).and_then(profile::name_of));
        group.keep();
        name
    }

    /// The same client judging time by `clock` (the system clock by default).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Deterministic snapshot of the whole openmls storage.
    pub fn export_storage(&self) -> Result<Zeroizing<Vec<u8>>, MlsError> {
        // Our own index record is rebuilt by `from_storage`: the blob stays what it was.
        let mut values = self.provider.storage().snapshot();
        values.retain(|(k, _)| k.as_slice() != crate::client::db::mls::GROUP_INDEX_KEY);
        let sorted: BTreeMap<&Vec<u8>, &Zeroizing<Vec<u8>>> = values.iter().map(|(k, v)| (k, v)).collect();
        // Sized up front: a growing Vec would leave copies of secrets in the memory it frees.
        let size = STORAGE_MAGIC.len() + 4 + sorted.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        out.extend_from_slice(STORAGE_MAGIC);
        out.extend_from_slice(&len_u32(sorted.len())?.to_be_bytes());
        for (key, value) in sorted {
            out.extend_from_slice(&len_u32(key.len())?.to_be_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&len_u32(value.len())?.to_be_bytes());
            out.extend_from_slice(value);
        }
        Ok(out)
    }

    /// Restores a client from [`MlsClient::export_storage`] output. Fails if
    /// a stored group's own leaf belongs to another identity.
    pub fn from_storage(identity_seed: &[u8; 32], storage: &[u8]) -> Result<Self, MlsError> {
        let client = Self::new(identity_seed)?;
        let entries = parse_storage(storage)?;
        client.provider.storage().restore(entries);
        client.check_groups()?;
        Ok(client)
    }

    /// A client over `store` (records loaded from the client database), checked like
    /// [`MlsClient::from_storage`].
    pub fn from_store(identity_seed: &[u8; 32], store: MlsStore) -> Result<Self, MlsError> {
        let mut client = Self::new(identity_seed)?;
        client.provider = DbProvider::new(store);
        client.check_groups()?;
        Ok(client)
    }

    /// A client over `store` reading through to the client database: no group is loaded up
    /// front (opening a home costs O(1) records, issue 12). Each record read is authenticated
    /// by its seal, and the store returns errors (never panics) on values of the wrong shape, so
    /// a group is checked when it is first loaded rather than all of them at open.
    pub fn from_store_lazy(identity_seed: &[u8; 32], store: MlsStore) -> Result<Self, MlsError> {
        let mut client = Self::new(identity_seed)?;
        client.provider = DbProvider::new(store);
        Ok(client)
    }

    /// The storage: the messenger flushes its changes into its own database writes.
    pub fn store(&self) -> &MlsStore {
        self.provider.storage()
    }

    /// Loads every stored group once: fails if one is damaged or is not ours.
    fn check_groups(&self) -> Result<(), MlsError> {
        let client = self;
        // openmls_memory_storage unwraps the typed decoding of every value it reads, so JSON of
        // the wrong shape would panic at first use. Loading every group here reads each group's
        // values once; a panic in that load is a damaged store, reported as an error. The
        // values are plain data, so nothing is left half-updated by an unwind.
        let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), MlsError> {
            for group_id in client.group_ids() {
                let group = client.group(&group_id)?;
                if let Some(leaf) = group.own_leaf_node()
                    && leaf.signature_key().as_slice() != client.identity
                {
                    return Err(MlsError::Storage("belongs to a different identity".into()));
                }
                // Loaded anyway: the first operation on it finds it decoded.
                group.keep();
            }
            Ok(())
        }));
        match check {
            Ok(result) => result?,
            Err(_) => return Err(MlsError::Storage("damaged value".into())),
        }
        Ok(())
    }

    pub fn identity(&self) -> [u8; 32] {
        self.identity
    }

    /// Unix seconds by this client's clock.
    pub fn now_secs(&self) -> u64 {
        self.clock.now_secs()
    }

    /// `n` fresh one-time KeyPackages; their private keys stay in storage
    /// until a Welcome consumes them or [`MlsClient::delete_key_package`].
    pub fn key_packages(&self, n: usize) -> Result<Vec<NewKeyPackage>, MlsError> {
        (0..n).map(|_| self.build_key_package(false)).collect()
    }

    /// A KeyPackage with the LastResort extension, for when the server runs
    /// out of one-time ones. openmls keeps its private key after a join
    /// (`keys_for_welcome` skips deleting last-resort bundles), so it can be
    /// used for any number of groups.
    pub fn last_resort_key_package(&self) -> Result<NewKeyPackage, MlsError> {
        self.build_key_package(true)
    }

    /// Deletes the private keys of one of our KeyPackages (by hash reference); a Welcome to it
    /// can no longer be joined. Deleting an unknown one is not an error.
    pub fn delete_key_package(&self, hash_ref: &[u8]) -> Result<(), MlsError> {
        self.provider
            .storage()
            .delete_key_package(&key_package_ref(hash_ref)?)
            .map_err(|e| MlsError::Storage(format!("{e:?}")))
    }

    /// True while the private keys of that KeyPackage are stored.
    pub fn has_key_package(&self, hash_ref: &[u8]) -> bool {
        let Ok(reference) = key_package_ref(hash_ref) else { return false };
        let bundle: Result<Option<openmls::prelude::KeyPackageBundle>, _> =
            self.provider.storage().key_package(&reference);
        matches!(bundle, Ok(Some(_)))
    }

    fn build_key_package(&self, last_resort: bool) -> Result<NewKeyPackage, MlsError> {
        let now = self.clock.now_secs();
        // Explicit times from our clock (RFC 9420 §7.2), not openmls's 84-day default.
        let lifetime = Lifetime::init(
            now.saturating_sub(limits::KEY_PACKAGE_NOT_BEFORE_MARGIN_SECS),
            now.saturating_add(limits::KEY_PACKAGE_LIFETIME_SECS),
        );
        let mut builder = KeyPackage::builder()
            .leaf_node_capabilities(capabilities())
            .leaf_node_extensions(profile::leaf_extensions(self.display_name.as_deref()))
            .key_package_lifetime(lifetime);
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone())
            .map_err(|e| openmls_err("build key package", e))?;
        let key_package = bundle.key_package();
        let hash_ref = key_package
            .hash_ref(self.provider.crypto())
            .map_err(|e| openmls_err("key package hash reference", e))?;
        Ok(NewKeyPackage {
            bytes: key_package
                .tls_serialize_detached()
                .map_err(|e| openmls_err("serialize key package", e))?,
            hash_ref: hash_ref.as_slice().to_vec(),
            not_after: lifetime.not_after(),
        })
    }

    /// Creates a group with us as the only member, at epoch 0.
    pub fn create_group(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        if group_id.is_empty() {
            return Err(MlsError::EmptyGroupId);
        }
        if let Some(existing) = self.checkout(group_id)? {
            existing.keep();
            return Err(MlsError::GroupExists);
        }
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .capabilities(capabilities())
            .use_ratchet_tree_extension(true)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(ratchet_config())
            .with_leaf_node_extensions(profile::leaf_extensions(self.display_name.as_deref()))
            .map_err(|e| openmls_err("create group", e))?
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(group_id),
            self.credential.clone(),
        )
        .map_err(|e| openmls_err("create group", e))?;
        self.groups.put(self.provider.storage().version(), group_id.to_vec(), group);
        Ok(())
    }

    /// Stages a commit adding the owners of `key_packages` (each verified
    /// here too). The commit stays pending until `merge_pending`.
    pub fn add_members(&mut self, group_id: &[u8], key_packages: &[Vec<u8>]) -> Result<Pending, MlsError> {
        if key_packages.is_empty() {
            return Err(MlsError::EmptyInput("no key packages"));
        }
        let mut group = self.load_committable(group_id)?;
        let mut present: HashSet<Vec<u8>> = group.members().map(|m| m.signature_key).collect();
        let mut verified = Vec::with_capacity(key_packages.len());
        for bytes in key_packages {
            let key_package = verify_key_package(self.provider.crypto(), bytes, self.clock.now_secs())?;
            let leaf = key_package.leaf_node();
            let identity = credential_identity(leaf.credential(), leaf.signature_key().as_slice())
                .map_err(KeyPackageError::from)?;
            // RFC 9420 forbids duplicate signature keys in a tree; catch it
            // here with a clear error rather than deep inside openmls.
            if !present.insert(identity.to_vec()) {
                return Err(MlsError::AlreadyMember(hex::encode(identity)));
            }
            verified.push(key_package);
        }
        let (commit, welcome, _group_info) = group
            .add_members(&self.provider, &self.signer, &verified)
            .map_err(|e| openmls_err("add members", e))?;
        group.keep();
        Ok(Pending { commit: to_bytes(&commit)?, welcome: Some(to_bytes(&welcome)?) })
    }

    /// Stages a commit removing `members` (identities).
    pub fn remove_members(&mut self, group_id: &[u8], members: &[[u8; 32]]) -> Result<Pending, MlsError> {
        if members.is_empty() {
            return Err(MlsError::EmptyInput("no members to remove"));
        }
        let mut group = self.load_committable(group_id)?;
        let mut indices = Vec::with_capacity(members.len());
        for member in members {
            if *member == self.identity {
                return Err(MlsError::CannotRemoveSelf);
            }
            let index = group
                .members()
                .find(|m| m.signature_key == member)
                .map(|m| m.index)
                .ok_or_else(|| MlsError::UnknownMember(hex::encode(member)))?;
            indices.push(index);
        }
        let (commit, welcome, _group_info) = group
            .remove_members(&self.provider, &self.signer, &indices)
            .map_err(|e| openmls_err("remove members", e))?;
        group.keep();
        pending(&commit, welcome.as_ref())
    }

    /// Stages a commit with a fresh leaf and path secrets (post-compromise
    /// security). Also covers any queued proposals. The new leaf carries our
    /// current display name (see [`profile`]), so this is also how a new name
    /// reaches a group.
    pub fn self_update(&mut self, group_id: &[u8]) -> Result<Pending, MlsError> {
        let mut group = self.load_committable(group_id)?;
        let leaf = LeafNodeParameters::builder()
            .with_capabilities(capabilities())
            .with_extensions(profile::leaf_extensions(self.display_name.as_deref()))
            .build();
        let bundle = group
            .self_update(&self.provider, &self.signer, leaf)
            .map_err(|e| openmls_err("self update", e))?;
        group.keep();
        let (commit, welcome, _group_info) = bundle.into_messages();
        pending(&commit, welcome.as_ref())
    }

    /// Stages a commit covering the queued proposals (e.g. a member's leave),
    /// or returns `None` if nothing is queued.
    pub fn commit_pending_proposals(&mut self, group_id: &[u8]) -> Result<Option<Pending>, MlsError> {
        let mut group = self.load_committable(group_id)?;
        if !group.has_pending_proposals() {
            group.keep();
            return Ok(None);
        }
        let (commit, welcome, _group_info) = group
            .commit_to_pending_proposals(&self.provider, &self.signer)
            .map_err(|e| openmls_err("commit pending proposals", e))?;
        group.keep();
        pending(&commit, welcome.as_ref()).map(Some)
    }

    /// A proposal to remove ourselves; another member must commit it. Until
    /// then we stay a member (and cannot send application messages).
    pub fn leave_group(&mut self, group_id: &[u8]) -> Result<Vec<u8>, MlsError> {
        let mut group = self.load_committable(group_id)?;
        let proposal =
            group.leave_group(&self.provider, &self.signer).map_err(|e| openmls_err("leave group", e))?;
        group.keep();
        to_bytes(&proposal)
    }

    /// Our pending commit was accepted by the server: apply it.
    pub fn merge_pending(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        let mut group = self.group(group_id)?;
        if group.pending_commit().is_none() {
            return Err(MlsError::NoPendingCommit);
        }
        group.merge_pending_commit(&self.provider).map_err(|e| openmls_err("merge pending commit", e))?;
        group.keep();
        Ok(())
    }

    /// What our pending commit changes (call before [`MlsClient::merge_pending`]).
    pub fn pending_changes(&self, group_id: &[u8]) -> Result<Changes, MlsError> {
        let group = self.group(group_id)?;
        let staged = group.pending_commit().ok_or(MlsError::NoPendingCommit)?;
        let changes = Changes { added: added_members(staged)?, ..removals(&group, staged)? };
        group.keep();
        Ok(changes)
    }

    /// Our pending commit lost the race: drop it. Idempotent, so a client
    /// that crashed mid-way can simply call it again.
    pub fn clear_pending(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        let mut group = self.group(group_id)?;
        group
            .clear_pending_commit(self.provider.storage())
            .map_err(|e| openmls_err("clear pending commit", e))?;
        group.keep();
        Ok(())
    }

    /// Whether we have a staged, unmerged commit (false for unknown groups).
    pub fn has_pending(&self, group_id: &[u8]) -> bool {
        let Ok(Some(group)) = self.checkout(group_id) else { return false };
        let pending = group.pending_commit().is_some();
        group.keep();
        pending
    }

    /// Whether proposals wait to be committed (false for unknown groups).
    pub fn has_pending_proposals(&self, group_id: &[u8]) -> bool {
        let Ok(Some(group)) = self.checkout(group_id) else { return false };
        let pending = group.has_pending_proposals();
        group.keep();
        pending
    }

    /// Encrypts an application message for the group's current epoch.
    pub fn encrypt(&mut self, group_id: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, MlsError> {
        let mut group = self.load_active(group_id)?;
        if group.has_pending_proposals() {
            group.keep();
            return Err(MlsError::PendingProposals);
        }
        let message = group
            .create_message(&self.provider, &self.signer, plaintext)
            .map_err(|e| openmls_err("encrypt", e))?;
        group.keep();
        to_bytes(&message)
    }

    /// Group id, epoch and wire format of an MLSMessage, without any state.
    pub fn peek(bytes: &[u8]) -> Result<MessageInfo, MlsError> {
        let info = |group_id: &GroupId, epoch: u64, kind, content: Option<ContentType>| MessageInfo {
            group_id: group_id.to_vec(),
            epoch,
            kind,
            application: content == Some(ContentType::Application),
        };
        let stateless = |kind| MessageInfo { group_id: Vec::new(), epoch: 0, kind, application: false };
        Ok(match parse_message(bytes)?.extract() {
            MlsMessageBodyIn::PrivateMessage(m) => {
                info(m.group_id(), m.epoch().as_u64(), WireKind::PrivateMessage, Some(m.content_type()))
            }
            MlsMessageBodyIn::PublicMessage(m) => {
                info(m.group_id(), m.epoch().as_u64(), WireKind::PublicMessage, Some(m.content_type()))
            }
            MlsMessageBodyIn::GroupInfo(g) => {
                info(g.group_id(), g.epoch().as_u64(), WireKind::GroupInfo, None)
            }
            MlsMessageBodyIn::Welcome(_) => stateless(WireKind::Welcome),
            MlsMessageBodyIn::KeyPackage(_) => stateless(WireKind::KeyPackage),
        })
    }

    /// Decrypts and applies a group message. Commits are merged right away:
    /// the caller must have decided the order (and cleared any losing
    /// pending commit of ours) before calling. Our own messages cannot be
    /// decrypted by us and yield [`MlsError::OwnMessage`].
    pub fn process(&mut self, group_id: &[u8], bytes: &[u8]) -> Result<Incoming, MlsError> {
        let message: ProtocolMessage = match parse_message(bytes)?.extract() {
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            _ => return Err(MlsError::UnexpectedMessage("expected a group message")),
        };
        if message.group_id().as_slice() != group_id {
            return Err(MlsError::WrongGroup);
        }
        let mut group = self.load_active(group_id)?;
        let past_epoch = message.epoch() < group.epoch();
        let processed = group.process_message(&self.provider, message).map_err(|e| match e {
            // The key of this sender's generation was used already (RFC 9420 section 9.2 deletes
            // it after use): the same message came again.
            ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
                MessageDecryptionError::SecretTreeError(SecretTreeError::SecretReuseError),
            )) => MlsError::Replayed,
            e => openmls_err("process message", e),
        })?;
        let sender_credential = processed.credential().clone();
        let incoming = match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let sender = sender_identity(&sender_credential)?;
                // openmls opens messages of the last MAX_PAST_EPOCHS epochs (for messages in
                // flight while a commit landed) and names their sender from that epoch's tree:
                // someone removed since could go on posting until five more commits. What the
                // server ordered after their removal is not theirs to say any more. (A message
                // of the current epoch was named from the current tree.)
                let member = || {
                    group.members().any(|m| {
                        credential_identity(&m.credential, &m.signature_key).is_ok_and(|k| k == sender)
                    })
                };
                if past_epoch && !member() {
                    group.keep();
                    return Err(MlsError::FormerMember(sender));
                }
                Incoming::Application { sender, plaintext: app.into_bytes() }
            }
            ProcessedMessageContent::ProposalMessage(queued) => {
                let sender = sender_identity(&sender_credential)?;
                self.accept_proposal(&mut group, sender, *queued)?
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let sender = sender_identity(&sender_credential)?;
                self.accept_commit(&mut group, sender, *staged)?
            }
            ProcessedMessageContent::OwnPrivateMessage | ProcessedMessageContent::OwnPendingCommit => {
                return Err(MlsError::OwnMessage);
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                return Err(MlsError::Unsupported("external join proposal"));
            }
        };
        group.keep();
        Ok(incoming)
    }

    /// Queues a member's request to leave; refuses every other proposal. qpq never sends any
    /// other (adds, removals and updates travel inside commits), and a queued proposal is
    /// committed by whichever member commits next, so storing one would let any member act in
    /// the next committer's name (a Remove of someone else), block everyone's sending until a
    /// commit (openmls refuses to encrypt while proposals wait) or break every later commit
    /// (a PreSharedKey proposal naming a PSK nobody has). A commit that references a refused
    /// proposal fails to process here like any invalid commit; honest qpq committers never
    /// include one, since they never queued it.
    fn accept_proposal(
        &self,
        group: &mut MlsGroup,
        sender: [u8; 32],
        queued: QueuedProposal,
    ) -> Result<Incoming, MlsError> {
        let refused = match queued.proposal() {
            Proposal::Remove(remove) => match queued.sender() {
                Sender::Member(by) if *by == remove.removed() => None,
                _ => Some("a removal of someone else"),
            },
            Proposal::SelfRemove => None,
            Proposal::Add(_) => Some("an add"),
            Proposal::Update(_) => Some("an update"),
            Proposal::PreSharedKey(_) => Some("a pre-shared key"),
            Proposal::ReInit(_) => Some("a reinit"),
            Proposal::ExternalInit(_) => Some("an external init"),
            Proposal::GroupContextExtensions(_) => Some("a group context change"),
            Proposal::Custom(_) => Some("a custom proposal"),
        };
        if let Some(kind) = refused {
            return Err(MlsError::RefusedProposal(kind));
        }
        group
            .store_pending_proposal(self.provider.storage(), queued)
            .map_err(|e| openmls_err("store proposal", e))?;
        Ok(Incoming::LeaveRequest { sender })
    }

    fn accept_commit(
        &self,
        group: &mut MlsGroup,
        sender: [u8; 32],
        staged: StagedCommit,
    ) -> Result<Incoming, MlsError> {
        // Check every leaf the commit would put into the tree before merging;
        // a rejected commit is simply dropped.
        let added = added_members(&staged)?;
        for update in staged.update_proposals() {
            let leaf = update.update_proposal().leaf_node();
            credential_identity(leaf.credential(), leaf.signature_key().as_slice())?;
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            // The committer may refresh its keys but not become someone else.
            let identity = credential_identity(leaf.credential(), leaf.signature_key().as_slice())?;
            if identity != sender {
                return Err(MlsError::InvalidMember("committer changed its identity"));
            }
        }
        // Removed leaves must be resolved against the tree before the merge.
        let Changes { removed, left, .. } = removals(group, &staged)?;
        let self_removed = staged.self_removed();
        let epoch = staged.epoch().as_u64();
        group.merge_staged_commit(&self.provider, staged).map_err(|e| openmls_err("merge commit", e))?;
        Ok(Incoming::Commit { sender, epoch, added, removed, left, self_removed })
    }

    /// Joins a group from a Welcome addressed to one of our KeyPackages and
    /// returns its group id. A group we were removed from is replaced.
    pub fn join(&mut self, welcome: &[u8]) -> Result<Vec<u8>, MlsError> {
        Ok(self.join_welcome(welcome)?.group_id)
    }

    /// Joins from a Welcome and reports who sent it (from the signed GroupInfo, not from any
    /// unauthenticated wrapper) and which of our KeyPackages it was encrypted to.
    pub fn join_welcome(&mut self, welcome: &[u8]) -> Result<Joined, MlsError> {
        self.rejoin_welcome(welcome, |_| false, false)
    }

    /// [`MlsClient::join_welcome`], where a stored group for which `left` says true is replaced
    /// even though it looks active: after a leave we never see the commit that removed us, so
    /// our copy of the group stays active (RFC 9420 section 12.1.3: the leaver's Remove proposal
    /// is committed by someone else). The old group is deleted whole (its queued proposals,
    /// secrets and keys) only once the Welcome has been verified. A Welcome into a group we
    /// hold must come from a member of the last epoch we saw ([`MlsError::NotFromAMember`]),
    /// unless `from_anyone`: the person accepted this very invitation knowing its sender was
    /// not one (see [`MlsClient::was_member`] and `client::requests`).
    pub fn rejoin_welcome(
        &mut self,
        welcome: &[u8],
        left: impl Fn(&[u8]) -> bool,
        from_anyone: bool,
    ) -> Result<Joined, MlsError> {
        let MlsMessageBodyIn::Welcome(welcome) = parse_message(welcome)?.extract() else {
            return Err(MlsError::UnexpectedMessage("expected a welcome"));
        };
        let key_package_refs: Vec<Vec<u8>> =
            welcome.secrets().iter().map(|s| s.new_member().as_slice().to_vec()).collect();
        let builder = StagedWelcome::build_from_welcome(&self.provider, &join_config(), welcome)
            .map_err(welcome_err)?;
        let group_id = builder.processed_welcome().unverified_group_info().group_id().to_vec();
        // Leaves added long ago may carry an expired KeyPackage lifetime;
        // RFC 9420 §7.3 only asks to check lifetimes of fresh KeyPackages, and
        // checking them would make old groups unjoinable.
        let mut builder = builder.skip_lifetime_validation();
        // A join writes the group's records behind the cache: never reuse a cached copy.
        self.groups.evict(&group_id);
        let old = self.stored_group(&group_id)?;
        match &old {
            Some(existing) if existing.is_active() && !left(&group_id) => return Err(MlsError::GroupExists),
            Some(_) => builder = builder.replace_old_group(),
            None => {}
        }
        let staged = builder.build().map_err(welcome_err)?;
        // A Welcome into a group we were in must start after the epoch we last saw: one of ours
        // from before (the server can keep and replay it; a last-resort KeyPackage still opens
        // it) would put us back at an old epoch, to read old messages again.
        if let Some(existing) = &old {
            let (welcome, ours) = (staged.group_context().epoch().as_u64(), existing.epoch().as_u64());
            if welcome <= ours {
                return Err(MlsError::StaleWelcome { welcome, ours });
            }
        }
        for member in staged.members() {
            credential_identity(&member.credential, &member.signature_key)?;
        }
        let sender = staged.welcome_sender().map_err(|e| openmls_err("welcome sender", e))?;
        let inviter = credential_identity(sender.credential(), sender.signature_key().as_slice())?;
        // Group ids are their creator's choice: anyone could create a group with the id of one
        // we were in and invite us, and our copy (its name, its history) would become theirs.
        // Only someone who was a member in the last epoch we saw brings us back.
        if let Some(existing) = &old
            && !from_anyone
        {
            let was_member = existing
                .members()
                .any(|m| credential_identity(&m.credential, &m.signature_key).is_ok_and(|id| id == inviter));
            if !was_member {
                return Err(MlsError::NotFromAMember);
            }
        }
        if let Some(mut old) = old {
            old.delete(self.provider.storage()).map_err(|e| openmls_err("delete old group", e))?;
        }
        let group = staged.into_group(&self.provider).map_err(|e| openmls_err("join", e))?;
        let group_id = group.group_id().to_vec();
        self.groups.put(self.provider.storage().version(), group_id.clone(), group);
        Ok(Joined { group_id, inviter, key_package_refs })
    }

    /// Joins from a Welcome in a throwaway copy that holds only the KeyPackage the Welcome is
    /// for, and returns that copy: who sent it (verified as in [`MlsClient::join_welcome`]),
    /// the group id, and a client that can read the group's first messages for a preview. Our
    /// own storage is untouched, so the KeyPackage private key stays until a real join (a
    /// message request is decided by the person, later). The sender is the GroupInfo's signer
    /// (RFC 9420 section 12.4.3: the new member verifies the GroupInfo signature against the
    /// signer's leaf in the ratchet tree).
    pub fn preview_welcome(&self, welcome: &[u8]) -> Result<(Joined, MlsClient), MlsError> {
        let MlsMessageBodyIn::Welcome(parsed) = parse_message(welcome)?.extract() else {
            return Err(MlsError::UnexpectedMessage("expected a welcome"));
        };
        // The signer has no Clone; a round trip through its encoding copies it (wiped after).
        let encoded = zeroize::Zeroizing::new(
            self.signer.tls_serialize_detached().map_err(|e| openmls_err("copy signer", e))?,
        );
        let signer = SignatureKeyPair::tls_deserialize_exact(&encoded[..])
            .map_err(|e| openmls_err("copy signer", e))?;
        let mut scratch = MlsClient {
            identity: self.identity,
            signer,
            credential: self.credential.clone(),
            provider: DbProvider::default(),
            clock: self.clock.clone(),
            display_name: self.display_name.clone(),
            groups: GroupCache::default(),
        };
        let ours = self.provider.storage();
        for secret in parsed.secrets() {
            let hash_ref = secret.new_member();
            let bundle: Option<KeyPackageBundle> =
                ours.key_package(&hash_ref).map_err(|e| openmls_err("read key package", e))?;
            if let Some(bundle) = bundle {
                scratch
                    .provider
                    .storage()
                    .write_key_package(&hash_ref, &bundle)
                    .map_err(|e| openmls_err("copy key package", e))?;
            }
        }
        let joined = scratch.join_welcome(welcome)?;
        Ok((joined, scratch))
    }

    /// Deletes the private keys of the one-time KeyPackage a Welcome we will never use was
    /// encrypted to (a blocked sender's, an expired request's); a last-resort one is kept.
    ///
    /// Only the package joining would have used: the first of ours the Welcome names, as
    /// openmls picks it. Anyone who saw one of our packages (a co-member, in the commit that
    /// added us; the server) could otherwise list our other packages in a Welcome of theirs
    /// and have us delete the keys of an invitation that still waits as a request.
    pub fn discard_welcome_key_packages(&mut self, welcome: &[u8]) -> Result<(), MlsError> {
        let Some((hash_ref, bundle)) = self.welcome_key_package(welcome)? else { return Ok(()) };
        if !bundle.key_package().last_resort() {
            let storage = self.provider.storage();
            storage.delete_key_package(&hash_ref).map_err(|e| openmls_err("delete key package", e))?;
        }
        Ok(())
    }

    /// The reference of the KeyPackage of ours that joining `welcome` would use; None when it
    /// names none we hold. Two Welcomes with one answer need one private key.
    pub fn welcome_key_package_ref(&self, welcome: &[u8]) -> Result<Option<Vec<u8>>, MlsError> {
        Ok(self.welcome_key_package(welcome)?.map(|(hash_ref, _)| hash_ref.as_slice().to_vec()))
    }

    /// The first of our KeyPackages `welcome` names, as openmls picks it when joining.
    fn welcome_key_package(
        &self,
        welcome: &[u8],
    ) -> Result<Option<(KeyPackageRef, KeyPackageBundle)>, MlsError> {
        let MlsMessageBodyIn::Welcome(parsed) = parse_message(welcome)?.extract() else {
            return Err(MlsError::UnexpectedMessage("expected a welcome"));
        };
        let storage = self.provider.storage();
        for secret in parsed.secrets() {
            let hash_ref = secret.new_member();
            let bundle: Option<KeyPackageBundle> =
                storage.key_package(&hash_ref).map_err(|e| openmls_err("read key package", e))?;
            if let Some(bundle) = bundle {
                return Ok(Some((hash_ref, bundle)));
            }
        }
        Ok(None)
    }

    /// Identities of the current members, in leaf order.
    /// True when we hold `group_id` (active or not) and `who` is a member of the last epoch we
    /// saw of it; false for a group we do not hold.
    pub fn was_member(&self, group_id: &[u8], who: &[u8; 32]) -> bool {
        self.members(group_id).is_ok_and(|members| members.contains(who))
    }

    pub fn members(&self, group_id: &[u8]) -> Result<Vec<[u8; 32]>, MlsError> {
        let group = self.group(group_id)?;
        let members = group
            .members()
            .map(|m| credential_identity(&m.credential, &m.signature_key).map_err(MlsError::from))
            .collect::<Result<Vec<_>, _>>()?;
        group.keep();
        Ok(members)
    }

    /// The group's ciphersuite ([`CIPHERSUITE`] for every group qpq creates or joins).
    pub fn ciphersuite(&self, group_id: &[u8]) -> Result<Ciphersuite, MlsError> {
        let group = self.group(group_id)?;
        let suite = group.ciphersuite();
        group.keep();
        Ok(suite)
    }

    pub fn epoch(&self, group_id: &[u8]) -> Result<u64, MlsError> {
        let group = self.group(group_id)?;
        let epoch = group.epoch().as_u64();
        group.keep();
        Ok(epoch)
    }

    /// False once a merged commit removed us.
    pub fn is_active(&self, group_id: &[u8]) -> Result<bool, MlsError> {
        let group = self.group(group_id)?;
        let active = group.is_active();
        group.keep();
        Ok(active)
    }

    /// Forgets the group's state entirely.
    pub fn delete_group(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        // Not kept: its records are gone.
        let mut group = self.group(group_id)?;
        group.delete(self.provider.storage()).map_err(|e| openmls_err("delete group", e))
    }

    /// Ids of all stored groups (active or not), sorted. Derived from the
    /// storage keys of the join configs (label ‖ JSON group id ‖ u16 version) that the store
    /// indexes (see [`MlsStore::group_config_keys`]).
    pub fn group_ids(&self) -> Vec<Vec<u8>> {
        let Ok(keys) = self.provider.storage().group_config_keys() else {
            return Vec::new();
        };
        let mut ids: Vec<Vec<u8>> = keys
            .iter()
            .filter_map(|key| {
                let rest = key.strip_prefix(JOIN_CONFIG_LABEL)?;
                let json = rest.get(..rest.len().checked_sub(2)?)?;
                serde_json::from_slice::<GroupId>(json).ok()
            })
            .map(|id| id.to_vec())
            .collect();
        ids.sort();
        ids
    }

    /// The group as the storage holds it, decoded afresh (bypassing the cache).
    fn stored_group(&self, group_id: &[u8]) -> Result<Option<MlsGroup>, MlsError> {
        #[cfg(test)]
        self.groups.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        MlsGroup::load(self.provider.storage(), &GroupId::from_slice(group_id))
            .map_err(|e| MlsError::Storage(format!("{e:?}")))
    }

    /// A fresh decoding of a stored group, for tests that play a client skipping our checks.
    #[cfg(test)]
    fn load_group(&self, group_id: &[u8]) -> Result<MlsGroup, MlsError> {
        self.stored_group(group_id)?.ok_or(MlsError::UnknownGroup)
    }

    /// The group for one operation: from the cache, or decoded from the storage.
    fn checkout(&self, group_id: &[u8]) -> Result<Option<Checkout<'_>>, MlsError> {
        let version = self.provider.storage().version();
        let group = match self.groups.take(version, group_id) {
            Some(group) => group,
            None => match self.stored_group(group_id)? {
                Some(group) => group,
                None => return Ok(None),
            },
        };
        Ok(Some(Checkout { cache: &self.groups, version, group_id: group_id.to_vec(), group }))
    }

    fn group(&self, group_id: &[u8]) -> Result<Checkout<'_>, MlsError> {
        self.checkout(group_id)?.ok_or(MlsError::UnknownGroup)
    }

    fn load_active(&self, group_id: &[u8]) -> Result<Checkout<'_>, MlsError> {
        let group = self.group(group_id)?;
        if !group.is_active() {
            group.keep();
            return Err(MlsError::NotMember);
        }
        Ok(group)
    }

    /// Checked up front so callers get our errors instead of openmls's
    /// generic "not operational".
    fn load_committable(&self, group_id: &[u8]) -> Result<Checkout<'_>, MlsError> {
        let group = self.load_active(group_id)?;
        if group.pending_commit().is_some() {
            group.keep();
            return Err(MlsError::PendingCommit);
        }
        Ok(group)
    }
}

/// Leaf capabilities: the defaults plus LastResort and our display name, which openmls
/// requires to be listed before a leaf may carry those extensions.
fn capabilities() -> Capabilities {
    Capabilities::builder().extensions(vec![ExtensionType::LastResort, profile::extension_type()]).build()
}

fn ratchet_config() -> SenderRatchetConfiguration {
    SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAXIMUM_FORWARD_DISTANCE)
}

/// Runtime settings for joined groups; must match `create_group`'s.
fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(ratchet_config())
        .build()
}

/// The identities a staged commit removes (`added` is left empty). A leave
/// is a Remove proposal whose sender is the member it removes.
/// The identities a staged commit adds, each checked against its leaf's signature key.
fn added_members(staged: &StagedCommit) -> Result<Vec<[u8; 32]>, MlsError> {
    staged
        .add_proposals()
        .map(|p| {
            let leaf = p.add_proposal().key_package().leaf_node();
            credential_identity(leaf.credential(), leaf.signature_key().as_slice())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(MlsError::from)
}

fn removals(group: &MlsGroup, staged: &StagedCommit) -> Result<Changes, MlsError> {
    let (mut removed, mut left) = (Vec::new(), Vec::new());
    for p in staged.remove_proposals() {
        let index = p.remove_proposal().removed();
        let who = member_identity(group, index)?;
        if matches!(p.sender(), Sender::Member(by) if *by == index) {
            left.push(who);
        } else {
            removed.push(who);
        }
    }
    Ok(Changes { added: Vec::new(), removed, left })
}

fn member_identity(group: &MlsGroup, index: LeafNodeIndex) -> Result<[u8; 32], MlsError> {
    let member =
        group.member_at(index).ok_or_else(|| MlsError::UnknownMember(format!("at leaf {}", index.u32())))?;
    Ok(credential_identity(&member.credential, &member.signature_key)?)
}

fn parse_message(bytes: &[u8]) -> Result<MlsMessageIn, MlsError> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Malformed(format!("{e:?}")))
}

fn to_bytes(message: &MlsMessageOut) -> Result<Vec<u8>, MlsError> {
    message.to_bytes().map_err(|e| openmls_err("serialize message", e))
}

fn pending(commit: &MlsMessageOut, welcome: Option<&MlsMessageOut>) -> Result<Pending, MlsError> {
    Ok(Pending { commit: to_bytes(commit)?, welcome: welcome.map(to_bytes).transpose()? })
}

fn openmls_err(op: &'static str, e: impl fmt::Debug) -> MlsError {
    MlsError::Openmls { op, detail: format!("{e:?}") }
}

fn welcome_err<E: fmt::Debug>(e: WelcomeError<E>) -> MlsError {
    match e {
        WelcomeError::NoMatchingKeyPackage => MlsError::NoMatchingKeyPackage,
        other => openmls_err("join", other),
    }
}

/// A KeyPackageRef from its bytes. openmls builds one from a slice only for its tests, so this
/// goes through its TLS form (a variable-length vector, RFC 9420 §2.1.2).
fn key_package_ref(hash_ref: &[u8]) -> Result<KeyPackageRef, MlsError> {
    let encoded = tls_codec::VLBytes::new(hash_ref.to_vec())
        .tls_serialize_detached()
        .map_err(|e| MlsError::Storage(format!("key package reference: {e:?}")))?;
    KeyPackageRef::tls_deserialize_exact(encoded.as_slice())
        .map_err(|e| MlsError::Storage(format!("key package reference: {e:?}")))
}

fn len_u32(len: usize) -> Result<u32, MlsError> {
    u32::try_from(len).map_err(|_| MlsError::Storage("entry too large".into()))
}

/// Inverse of `export_storage`; rejects anything it would not have written.
fn parse_storage(bytes: &[u8]) -> Result<Vec<crate::client::db::mls::MlsRecord>, MlsError> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], MlsError> {
        if input.len() < n {
            return Err(MlsError::Storage("truncated".into()));
        }
        let (head, tail) = input.split_at(n);
        *input = tail;
        Ok(head)
    }
    fn take_u32(input: &mut &[u8]) -> Result<usize, MlsError> {
        // `take` returned exactly four bytes, so the indexing cannot panic.
        let b = take(input, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    let mut input = bytes;
    if take(&mut input, STORAGE_MAGIC.len())? != STORAGE_MAGIC {
        return Err(MlsError::Storage("unknown format".into()));
    }
    let count = take_u32(&mut input)?;
    // Do not trust `count` for preallocation: each entry needs >= 8 bytes.
    let mut map = Vec::with_capacity(count.min(input.len() / 8));
    let mut previous: Option<&[u8]> = None;
    for _ in 0..count {
        let key_len = take_u32(&mut input)?;
        let key = take(&mut input, key_len)?;
        let value_len = take_u32(&mut input)?;
        let value = take(&mut input, value_len)?;
        // Strictly increasing keys: the canonical form, and no duplicates.
        if previous.is_some_and(|p| p >= key) {
            return Err(MlsError::Storage("keys not strictly sorted".into()));
        }
        previous = Some(key);
        // openmls_memory_storage 0.6 decoded stored values with serde_json and unwrapped the
        // result, so a damaged value would panic at its first use: refuse what is not a value of
        // either encoding of the store here (JSON fully parsed: IgnoredAny skips string escapes
        // unchecked, found by the fuzz smoke); a damaged binary value fails at its decoding.
        if !crate::client::db::mls::plausible_value(value) {
            return Err(MlsError::Storage("damaged value".into()));
        }
        map.push((key.to_vec(), Zeroizing::new(value.to_vec())));
    }
    if !input.is_empty() {
        return Err(MlsError::Storage("trailing bytes".into()));
    }
    Ok(map)
}
