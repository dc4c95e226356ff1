//! openmls's `StorageProvider` on the client database: an MLS operation changes only the records
//! it touches, and they land in the same redb transaction as the messenger's own changes.
//!
//! [`MlsStore`] is a read-through cache with a write overlay. openmls reads a value: the store
//! looks in its cache, then (if attached to a [`ClientDb`]) opens the sealed record and caches
//! the plaintext. openmls writes or deletes: only the cache changes and the key is marked dirty.
//! [`MlsStore::flush`] puts the dirty records into a caller's [`DbWrite`], which the messenger
//! commits together with its cursor, inbox and history; [`MlsStore::forget`] drops everything
//! not yet committed (a failed operation, or another process wrote: see the generation in
//! [`super`]). Without a database the store is purely in memory, which is what
//! [`MlsStore::snapshot`]/[`MlsStore::restore`] (the old state file's blob) use.
//!
//! Keys mirror `openmls_memory_storage` 0.6 (MIT): storage key = label ‖ JSON key ‖ u16 BE
//! storage version. Values are [`VALUE_TAG`] ‖ postcard, a binary serde encoding: openmls's
//! values are mostly byte strings (keys, secrets, the ratchet tree), which JSON writes as arrays
//! of decimal integers, four times their size and slow to encode, and a group's message secrets
//! are rewritten on every message. Those message secrets are stored in two parts
//! ([`super::past_leaves`]): the past epochs' member lists live in records of their own
//! ([`PAST_LEAVES_LABEL`]), written once per epoch and deleted when the epoch leaves openmls's
//! window or the group's message secrets are deleted, so a message encodes no member list (it
//! encoded one per kept past epoch). Such a list names its members by reference
//! ([`super::past_members`]): each member is a record ([`PAST_MEMBER_LABEL`]) shared by the
//! epochs that hold it, so a commit writes the ended epoch's list of references and the members
//! that changed, not the whole member list (165 KB at 128 members). A
//! group's ratchet tree is stored one record per node ([`super::tree_nodes`],
//! [`TREE_NODE_LABEL`]), and a write whose bytes equal the cached record's is no change
//! ([`MlsStore::set`]), so a commit writes the nodes it changed, not the whole tree (issue 12:
//! 187 KB per commit at 128 members). Two exceptions stay JSON: the join config, whose past-epoch
//! policy openmls decodes as an untagged enum (postcard cannot), and values written before
//! (the old state file's blob, databases of earlier builds), which are read as JSON: no JSON text
//! starts with the tag byte. Lists are JSON arrays of encoded items. Two departures:
//! `clear_proposal_queue` deletes the queued proposals under their real key (the memory store
//! deletes an unprefixed key, so proposals outlive their queue), and the store keeps an index of
//! its groups (record [`GROUP_INDEX_KEY`]), since sealed slots cannot be listed by prefix.
//!
//! Every plaintext is [`Zeroizing`]: dropped, forgotten or replaced values are wiped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::{CURRENT_VERSION, Entity, StorageProvider, traits};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::past_members::{self, MemberRef};
use super::tree_nodes::{self, NodeKind};
use super::{ClientDb, DbError, DbWrite, Table, past_leaves};
use crate::mls::QpqCrypto;

const KEY_PACKAGE_LABEL: &[u8] = b"KeyPackage";
const PSK_LABEL: &[u8] = b"Psk";
const ENCRYPTION_KEY_PAIR_LABEL: &[u8] = b"EncryptionKeyPair";
const SIGNATURE_KEY_PAIR_LABEL: &[u8] = b"SignatureKeyPair";
const EPOCH_KEY_PAIRS_LABEL: &[u8] = b"EpochKeyPairs";
const TREE_LABEL: &[u8] = b"Tree";
const GROUP_CONTEXT_LABEL: &[u8] = b"GroupContext";
const INTERIM_TRANSCRIPT_HASH_LABEL: &[u8] = b"InterimTranscriptHash";
const CONFIRMATION_TAG_LABEL: &[u8] = b"ConfirmationTag";
/// Public: every stored group has exactly one join config (see `crate::mls`).
pub const JOIN_CONFIG_LABEL: &[u8] = b"MlsGroupJoinConfig";
const OWN_LEAF_NODES_LABEL: &[u8] = b"OwnLeafNodes";
const GROUP_STATE_LABEL: &[u8] = b"GroupState";
const QUEUED_PROPOSAL_LABEL: &[u8] = b"QueuedProposal";
const PROPOSAL_QUEUE_REFS_LABEL: &[u8] = b"ProposalQueueRefs";
const OWN_LEAF_NODE_INDEX_LABEL: &[u8] = b"OwnLeafNodeIndex";
const EPOCH_SECRETS_LABEL: &[u8] = b"EpochSecrets";
const RESUMPTION_PSK_STORE_LABEL: &[u8] = b"ResumptionPsk";
const MESSAGE_SECRETS_LABEL: &[u8] = b"MessageSecrets";
/// The member list of one past epoch of a group's message secrets ([`super::past_leaves`]):
/// storage key = this label ‖ JSON group id ‖ JSON epoch ‖ version. No openmls label starts
/// with `qpq/`.
pub const PAST_LEAVES_LABEL: &[u8] = b"qpq/PastEpochLeaves";
/// One member of some past epochs of a group ([`super::past_members`]): storage key = this
/// label ‖ JSON group id ‖ hex of the member's reference ‖ version.
pub const PAST_MEMBER_LABEL: &[u8] = b"qpq/PastMember";
/// One node of a group's ratchet tree ([`super::tree_nodes`]): storage key = this label ‖ JSON
/// group id ‖ `L` (leaf) or `P` (parent) ‖ JSON index ‖ version.
pub const TREE_NODE_LABEL: &[u8] = b"qpq/TreeNode";

/// First byte of a postcard-encoded value; never the first byte of JSON text.
pub const VALUE_TAG: u8 = 0xb1;

/// Encodes a value: postcard behind [`VALUE_TAG`], JSON for the join config (see the header).
fn encode<V: Serialize + ?Sized>(label: &[u8], value: &V) -> Result<Vec<u8>, MlsStoreError> {
    if label == JOIN_CONFIG_LABEL {
        return Ok(serde_json::to_vec(value)?);
    }
    let mut out =
        past_leaves::encode_wiping(&[VALUE_TAG], value).map_err(|_| MlsStoreError::Serialization)?;
    // Moved out whole (no copy left behind): the caller keeps it in a `Zeroizing` at once.
    Ok(std::mem::take(&mut *out))
}

/// Decodes either encoding of [`encode`].
fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, MlsStoreError> {
    match bytes.split_first() {
        Some((&VALUE_TAG, rest)) => postcard::from_bytes(rest).map_err(|_| MlsStoreError::Serialization),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// True when `bytes` is a well-formed value of either encoding as far as can be told without
/// its type (JSON fully parsed; postcard only tagged: its decoding needs the type).
pub fn plausible_value(bytes: &[u8]) -> bool {
    matches!(
        bytes.first(),
        Some(&VALUE_TAG | &past_leaves::SPLIT_TAG | &tree_nodes::SPLIT_TAG | &past_members::LIST_TAG)
    ) || serde_json::from_slice::<serde_json::Value>(bytes).is_ok()
}

/// Logical key of the store's own record: the JSON list of the storage keys of the stored
/// groups' join configs. No openmls label starts with `qpq/`.
pub const GROUP_INDEX_KEY: &[u8] = b"qpq/group-index";

/// An openmls provider whose storage is an [`MlsStore`], with qpq's crypto ([`QpqCrypto`]).
#[derive(Default)]
pub struct DbProvider {
    crypto: QpqCrypto,
    store: MlsStore,
}

impl DbProvider {
    pub fn new(store: MlsStore) -> DbProvider {
        DbProvider { crypto: QpqCrypto::default(), store }
    }
}

impl OpenMlsProvider for DbProvider {
    type CryptoProvider = QpqCrypto;
    type RandProvider = QpqCrypto;
    type StorageProvider = MlsStore;

    fn storage(&self) -> &MlsStore {
        &self.store
    }

    fn crypto(&self) -> &QpqCrypto {
        &self.crypto
    }

    fn rand(&self) -> &QpqCrypto {
        &self.crypto
    }
}

/// Errors of the store, as openmls carries them.
#[derive(Debug, thiserror::Error)]
pub enum MlsStoreError {
    #[error("mls storage value could not be (de)serialized")]
    Serialization,
    #[error("{0}")]
    Db(String),
}

impl From<serde_json::Error> for MlsStoreError {
    fn from(_: serde_json::Error) -> Self {
        MlsStoreError::Serialization
    }
}

impl From<DbError> for MlsStoreError {
    fn from(e: DbError) -> Self {
        MlsStoreError::Db(e.to_string())
    }
}

/// A storage key and its plaintext value.
pub type MlsRecord = (Vec<u8>, Zeroizing<Vec<u8>>);

/// A cached record: `None` is "known absent" (deleted, or not in the database).
type Cached = Option<Zeroizing<Vec<u8>>>;

/// openmls storage over the client database (or only in memory); see the module header.
#[derive(Default)]
pub struct MlsStore {
    // Mutexes, not RefCells, so an `MlsClient` can move between threads; never contended
    // (openmls calls the store from one thread at a time) and never held across calls.
    db: Mutex<Option<Arc<ClientDb>>>,
    cache: Mutex<BTreeMap<Vec<u8>, Cached>>,
    dirty: Mutex<BTreeSet<Vec<u8>>>,
    /// Bumped whenever the contents are replaced or dropped other than through openmls's own
    /// writes (see [`MlsStore::version`]).
    version: AtomicU64,
    /// Tests only: the postcard bytes of the last message secrets written per group.
    #[cfg(test)]
    written: Mutex<BTreeMap<Vec<u8>, Zeroizing<Vec<u8>>>>,
}

/// Locks `m`; a panic while it was held leaves plain data, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for MlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("MlsStore").field("dirty", &lock(&self.dirty).len()).finish_non_exhaustive()
    }
}

impl MlsStore {
    /// An empty store that lives only in memory until attached.
    pub fn memory() -> MlsStore {
        MlsStore::default()
    }

    /// Reads missing records from `db` from now on (while the caller holds the home lock).
    ///
    /// `db` must hold the records this store last saw (another handle on the same file, no
    /// other process wrote since: the messenger checks the generation first and builds a new
    /// store otherwise, `Home::refresh`). So attaching does not move [`MlsStore::version`]:
    /// the cached records and the groups decoded from them stay valid. It used to, and every
    /// messenger operation (which attaches that operation's handle) then decoded its group's
    /// whole ratchet tree again: O(members) per message.
    pub fn attach(&self, db: Arc<ClientDb>) {
        *lock(&self.db) = Some(db);
    }

    /// Changes whenever the records may differ from what openmls last wrote or read through
    /// this store ([`MlsStore::forget`], [`MlsStore::restore`], [`MlsStore::load_all`]):
    /// whoever keeps values decoded from the store (the loaded groups of
    /// [`crate::mls::MlsClient`]) drops them when it moves.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Stops reading from the database (the lock is about to be released).
    pub fn detach(&self) {
        *lock(&self.db) = None;
    }

    /// Drops every cached record and every change not flushed yet (all wiped on drop).
    pub fn forget(&self) {
        lock(&self.cache).clear();
        lock(&self.dirty).clear();
        self.bump();
    }

    /// The storage keys of the changes waiting for [`MlsStore::flush`].
    #[cfg(test)]
    pub fn dirty_keys(&self) -> Vec<Vec<u8>> {
        lock(&self.dirty).iter().cloned().collect()
    }

    /// True when some change waits for [`MlsStore::flush`].
    pub fn is_dirty(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    /// Puts the changed records into `w` (the caller commits them with its own); returns how
    /// many. The cache keeps them: after the commit they are what the database holds. If the
    /// commit fails the caller must [`MlsStore::forget`].
    pub fn flush(&self, w: &mut DbWrite<'_>) -> Result<usize, DbError> {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        let cache = lock(&self.cache);
        for key in &dirty {
            match cache.get(key) {
                Some(Some(value)) => w.put(Table::Mls, key, &pair(key, value))?,
                _ => w.delete(Table::Mls, key)?,
            }
        }
        Ok(dirty.len())
    }

    /// Every record (the store must hold all of them: in memory, or loaded with
    /// [`MlsStore::load_all`]), sorted by key.
    pub fn snapshot(&self) -> Vec<MlsRecord> {
        lock(&self.cache).iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect()
    }

    /// Replaces the contents with `entries`, all marked dirty (a migration writes them all).
    pub fn restore(&self, entries: impl IntoIterator<Item = MlsRecord>) {
        self.forget();
        let mut cache = lock(&self.cache);
        let mut dirty = lock(&self.dirty);
        let mut groups = Vec::new();
        for (k, v) in entries {
            if k.starts_with(JOIN_CONFIG_LABEL) {
                groups.push(k.clone());
            }
            dirty.insert(k.clone());
            cache.insert(k, Some(v));
        }
        groups.sort();
        let index = serde_json::to_vec(&groups).unwrap_or_default();
        dirty.insert(GROUP_INDEX_KEY.to_vec());
        cache.insert(GROUP_INDEX_KEY.to_vec(), Some(Zeroizing::new(index)));
    }

    /// Loads every record of `db` (clean, nothing to flush), replacing what the store held.
    pub fn load_all(&self, db: &ClientDb) -> Result<(), DbError> {
        let records = db.scan(Table::Mls)?;
        let mut cache = lock(&self.cache);
        cache.clear();
        lock(&self.dirty).clear();
        self.bump();
        for p in records {
            let (k, v) = unpair(&p).ok_or(super::seal::RecordDamaged)?;
            cache.insert(k.to_vec(), Some(v));
        }
        Ok(())
    }

    /// The storage keys of every stored group's join config (from the index record).
    pub fn group_config_keys(&self) -> Result<Vec<Vec<u8>>, MlsStoreError> {
        match self.get(GROUP_INDEX_KEY)? {
            Some(v) => Ok(serde_json::from_slice(&v)?),
            None => Ok(Vec::new()),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Cached, MlsStoreError> {
        if let Some(v) = lock(&self.cache).get(key) {
            return Ok(v.clone());
        }
        let db = lock(&self.db).clone();
        let Some(db) = db else { return Ok(None) };
        let v = match db.get(Table::Mls, key)? {
            Some(p) => {
                let (k, v) = unpair(&p).ok_or(MlsStoreError::Serialization)?;
                // The slot is keyed by `key`, so only damage could make these differ.
                if k != key {
                    return Err(MlsStoreError::Serialization);
                }
                Some(v)
            }
            None => None,
        };
        lock(&self.cache).insert(key.to_vec(), v.clone());
        Ok(v)
    }

    /// Changes a record in the overlay. A value equal to the cached one changes nothing: the
    /// cache holds what the database holds, or a change already marked dirty (see
    /// [`MlsStore::flush`]), so an unchanged tree node is not written again.
    fn set(&self, key: Vec<u8>, value: Cached) {
        let mut cache = lock(&self.cache);
        if cache.get(&key).is_some_and(|cached| *cached == value) {
            return;
        }
        lock(&self.dirty).insert(key.clone());
        cache.insert(key, value);
    }

    fn update_index(&self, config_key: &[u8], present: bool) -> Result<(), MlsStoreError> {
        let mut keys = self.group_config_keys()?;
        let pos = keys.binary_search_by(|k| k.as_slice().cmp(config_key));
        match (pos, present) {
            (Err(i), true) => keys.insert(i, config_key.to_vec()),
            (Ok(i), false) => {
                keys.remove(i);
            }
            _ => return Ok(()),
        }
        self.set(GROUP_INDEX_KEY.to_vec(), Some(Zeroizing::new(serde_json::to_vec(&keys)?)));
        Ok(())
    }

    fn write(&self, label: &[u8], key: &[u8], value: Vec<u8>) -> Result<(), MlsStoreError> {
        let storage_key = build_key_from_vec(label, key.to_vec());
        if label == JOIN_CONFIG_LABEL {
            self.update_index(&storage_key, true)?;
        }
        self.set(storage_key, Some(Zeroizing::new(value)));
        Ok(())
    }

    fn append(&self, label: &[u8], key: &[u8], value: Vec<u8>) -> Result<(), MlsStoreError> {
        let storage_key = build_key_from_vec(label, key.to_vec());
        let mut list: Vec<Vec<u8>> = match self.get(&storage_key)? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Vec::new(),
        };
        list.push(value);
        let out = Zeroizing::new(serde_json::to_vec(&list)?);
        wipe_list(list);
        self.set(storage_key, Some(out));
        Ok(())
    }

    fn remove_item(&self, label: &[u8], key: &[u8], value: Vec<u8>) -> Result<(), MlsStoreError> {
        let storage_key = build_key_from_vec(label, key.to_vec());
        let mut list: Vec<Vec<u8>> = match self.get(&storage_key)? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Vec::new(),
        };
        if let Some(pos) = list.iter().position(|item| item == &value) {
            list.remove(pos);
        }
        let out = Zeroizing::new(serde_json::to_vec(&list)?);
        wipe_list(list);
        self.set(storage_key, Some(out));
        Ok(())
    }

    fn read<V: DeserializeOwned>(&self, label: &[u8], key: &[u8]) -> Result<Option<V>, MlsStoreError> {
        match self.get(&build_key_from_vec(label, key.to_vec()))? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    fn read_list<V: Entity<CURRENT_VERSION>>(
        &self,
        label: &[u8],
        key: &[u8],
    ) -> Result<Vec<V>, MlsStoreError> {
        let list: Vec<Vec<u8>> = match self.get(&build_key_from_vec(label, key.to_vec()))? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Vec::new(),
        };
        let out = list.iter().map(|v| decode(v)).collect::<Result<Vec<V>, _>>();
        wipe_list(list);
        Ok(out?)
    }

    /// Stores a group's message secrets split ([`past_leaves`]): the main record, plus the
    /// lists of the past epochs it did not name before and their members not stored yet
    /// ([`past_members`]); the lists of epochs it no longer names are deleted, and the members
    /// no list names any more. A value of another shape is stored whole (and its old lists and
    /// members deleted).
    fn write_split_message_secrets<V: Serialize + ?Sized>(
        &self,
        group_id: &[u8],
        value: &V,
    ) -> Result<(), MlsStoreError> {
        #[cfg(test)]
        self.written_secrets(group_id, value);
        let key = build_key_from_vec(MESSAGE_SECRETS_LABEL, group_id.to_vec());
        let before = self.past_epochs(&key)?;
        let (main, epochs, new_leaves) = match past_leaves::split(value, &|e| before.contains(&e)) {
            Ok(split) => (split.main, split.epochs, split.new_leaves),
            Err(past_leaves::ShapeError) => {
                (Zeroizing::new(encode(MESSAGE_SECRETS_LABEL, value)?), Vec::new(), Vec::new())
            }
        };
        // Every message sent or received: the same epochs, nothing else to write.
        if new_leaves.is_empty() && before.iter().all(|e| epochs.contains(e)) {
            self.set(key, Some(main));
            return Ok(());
        }
        // The live sets before and after (see `past_members`): the kept epochs' lists are the
        // same in both.
        let mut old_live = BTreeSet::new();
        let mut new_live = BTreeSet::new();
        let mut latest: Vec<MemberRef> = Vec::new();
        for &epoch in &before {
            let refs = self.list_refs(group_id, epoch)?;
            if epochs.contains(&epoch) {
                new_live.extend(refs.iter().copied());
            }
            old_live.extend(refs.iter().copied());
            latest = refs;
        }
        let mut members = BTreeMap::new();
        for (epoch, records) in new_leaves {
            let refs = self.member_refs(group_id, &records, &latest)?;
            self.set(
                past_leaves_key(group_id, epoch)?,
                Some(past_members::list(&refs).map_err(|_| MlsStoreError::Serialization)?),
            );
            new_live.extend(refs.iter().copied());
            members.extend(refs.iter().copied().zip(records));
            latest = refs;
        }
        let (put, delete) = past_members::changes(&old_live, &new_live);
        for r in put {
            // Every reference of a new list came with its record.
            let record = members.remove(&r).ok_or(MlsStoreError::Serialization)?;
            self.set(past_member_key(group_id, &r)?, Some(record));
        }
        for r in delete {
            self.set(past_member_key(group_id, &r)?, None);
        }
        for gone in before.iter().filter(|e| !epochs.contains(e)) {
            self.set(past_leaves_key(group_id, *gone)?, None);
        }
        self.set(key, Some(main));
        Ok(())
    }

    /// The references of an epoch's `records` (each a member record). A member equal to the
    /// one at the same place in the `previous` epoch's list (read from the cache: the records
    /// of a loaded group are there) takes its reference without hashing: a commit changes a
    /// few members of 128.
    fn member_refs(
        &self,
        group_id: &[u8],
        records: &[Zeroizing<Vec<u8>>],
        previous: &[MemberRef],
    ) -> Result<Vec<MemberRef>, MlsStoreError> {
        let mut refs = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let mut reused = None;
            if let Some(r) = previous.get(i) {
                // The record under a reference is the one that hashes to it.
                let key = past_member_key(group_id, r)?;
                if lock(&self.cache).get(&key).is_some_and(|v| v.as_ref() == Some(record)) {
                    reused = Some(*r);
                }
            }
            refs.push(reused.unwrap_or_else(|| past_members::reference(record)));
        }
        Ok(refs)
    }

    /// The references the leaves record of `epoch` names: none when it is absent or holds its
    /// members inline (format 4); an error when it is a damaged list (what it named is unknown).
    fn list_refs(&self, group_id: &[u8], epoch: u64) -> Result<Vec<MemberRef>, MlsStoreError> {
        match self.get(&past_leaves_key(group_id, epoch)?)? {
            Some(record) if past_members::is_list(&record) => {
                past_members::refs(&record).ok_or(MlsStoreError::Serialization)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Stores a group's ratchet tree as a main record and one record per node
    /// ([`tree_nodes`]); [`MlsStore::set`] skips the nodes whose bytes did not change, and the
    /// nodes past the end of a shrunk tree are deleted. A value of another shape is stored
    /// whole (and its old nodes deleted).
    fn write_split_tree<V: Serialize + ?Sized>(
        &self,
        group_id: &[u8],
        value: &V,
    ) -> Result<(), MlsStoreError> {
        let key = build_key_from_vec(TREE_LABEL, group_id.to_vec());
        let (old_leaves, old_parents) = self.tree_counts(&key)?;
        let (main, leaves, parents) = match tree_nodes::split(value) {
            Ok(split) => {
                let (leaves, parents) = (split.leaves.len(), split.parents.len());
                for (kind, records) in [(NodeKind::Leaf, split.leaves), (NodeKind::Parent, split.parents)] {
                    for (i, record) in records.into_iter().enumerate() {
                        self.set(tree_node_key(group_id, kind, i)?, Some(record));
                    }
                }
                (split.main, leaves, parents)
            }
            Err(past_leaves::ShapeError) => (Zeroizing::new(encode(TREE_LABEL, value)?), 0, 0),
        };
        self.delete_tree_nodes(group_id, (leaves, old_leaves), (parents, old_parents))?;
        self.set(key, Some(main));
        Ok(())
    }

    /// Deletes the leaves `from..to` and the parents `from..to` of a group's tree.
    fn delete_tree_nodes(
        &self,
        group_id: &[u8],
        leaves: (usize, usize),
        parents: (usize, usize),
    ) -> Result<(), MlsStoreError> {
        for (kind, (from, to)) in [(NodeKind::Leaf, leaves), (NodeKind::Parent, parents)] {
            for i in from..to {
                self.set(tree_node_key(group_id, kind, i)?, None);
            }
        }
        Ok(())
    }

    /// The node counts of the tree stored at `key`: (0, 0) when absent or stored whole.
    fn tree_counts(&self, key: &[u8]) -> Result<(usize, usize), MlsStoreError> {
        Ok(self.get(key)?.and_then(|main| tree_nodes::counts(&main)).unwrap_or((0, 0)))
    }

    fn read_tree<V: DeserializeOwned>(&self, group_id: &[u8]) -> Result<Option<V>, MlsStoreError> {
        let Some(main) = self.get(&build_key_from_vec(TREE_LABEL, group_id.to_vec()))? else {
            return Ok(None);
        };
        if main.first() != Some(&tree_nodes::SPLIT_TAG) {
            return Ok(Some(decode(&main)?));
        }
        let node = |kind, i| self.get(&tree_node_key(group_id, kind, i)?);
        let whole = tree_nodes::join(&main, node)?.ok_or(MlsStoreError::Serialization)?;
        Ok(Some(postcard::from_bytes(&whole).map_err(|_| MlsStoreError::Serialization)?))
    }

    /// A group's tree as format 3 stored it: one record, [`VALUE_TAG`] ‖ postcard.
    #[cfg(test)]
    pub fn whole_tree(&self, group_id: &[u8]) -> Result<Zeroizing<Vec<u8>>, MlsStoreError> {
        let main = self.get(&build_key_from_vec(TREE_LABEL, group_id.to_vec()))?;
        let main = main.ok_or(MlsStoreError::Serialization)?;
        let node = |kind, i| self.get(&tree_node_key(group_id, kind, i)?);
        let whole = tree_nodes::join(&main, node)?.ok_or(MlsStoreError::Serialization)?;
        Ok(Zeroizing::new([&[VALUE_TAG][..], &whole].concat()))
    }

    fn delete_split_tree(&self, group_id: &[u8]) -> Result<(), MlsStoreError> {
        let key = build_key_from_vec(TREE_LABEL, group_id.to_vec());
        let (leaves, parents) = self.tree_counts(&key)?;
        self.delete_tree_nodes(group_id, (0, leaves), (0, parents))?;
        self.set(key, None);
        Ok(())
    }

    /// The past epochs whose leaves records the message secrets at `key` name.
    fn past_epochs(&self, key: &[u8]) -> Result<Vec<u64>, MlsStoreError> {
        if let Some(Some(v)) = lock(&self.cache).get(key) {
            return Ok(past_leaves::epochs(v));
        }
        Ok(self.get(key)?.map(|v| past_leaves::epochs(&v)).unwrap_or_default())
    }

    fn read_message_secrets<V: DeserializeOwned>(&self, group_id: &[u8]) -> Result<Option<V>, MlsStoreError> {
        let Some(main) = self.get(&build_key_from_vec(MESSAGE_SECRETS_LABEL, group_id.to_vec()))? else {
            return Ok(None);
        };
        if main.first() != Some(&past_leaves::SPLIT_TAG) {
            return Ok(Some(decode(&main)?));
        }
        let whole = self.join_message_secrets(group_id, &main)?;
        Ok(Some(postcard::from_bytes(&whole).map_err(|_| MlsStoreError::Serialization)?))
    }

    /// The postcard bytes of a group's message secrets from their split main record.
    fn join_message_secrets(
        &self,
        group_id: &[u8],
        main: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, MlsStoreError> {
        let leaves = |epoch| -> Result<Cached, MlsStoreError> {
            let Some(record) = self.get(&past_leaves_key(group_id, epoch)?)? else { return Ok(None) };
            if !past_members::is_list(&record) {
                return Ok(Some(record));
            }
            past_members::join(&record, |r| self.get(&past_member_key(group_id, r)?))
        };
        past_leaves::join(main, leaves)?.ok_or(MlsStoreError::Serialization)
    }

    /// Deletes a group's message secrets, the lists of their past epochs and every member
    /// those name (the live set becomes empty: [`past_members`]).
    fn delete_split_message_secrets(&self, group_id: &[u8]) -> Result<(), MlsStoreError> {
        let key = build_key_from_vec(MESSAGE_SECRETS_LABEL, group_id.to_vec());
        let mut live = BTreeSet::new();
        for epoch in self.past_epochs(&key)? {
            live.extend(self.list_refs(group_id, epoch)?);
            self.set(past_leaves_key(group_id, epoch)?, None);
        }
        for r in live {
            self.set(past_member_key(group_id, &r)?, None);
        }
        self.set(key, None);
        Ok(())
    }

    /// Remembers the postcard bytes of the last message secrets written for a group, to check
    /// that reading gives them back.
    #[cfg(test)]
    fn written_secrets<V: Serialize + ?Sized>(&self, group_id: &[u8], value: &V) {
        let bytes = Zeroizing::new(postcard::to_stdvec(value).unwrap_or_default());
        lock(&self.written).insert(group_id.to_vec(), bytes);
    }

    /// (postcard of the last message secrets written for the group, postcard of what reading
    /// them back gives).
    #[cfg(test)]
    pub fn secrets_written_and_read(
        &self,
        group_id: &[u8],
        reader: &MlsStore,
    ) -> Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>), MlsStoreError> {
        let written = lock(&self.written).get(group_id).cloned().ok_or(MlsStoreError::Serialization)?;
        let key = build_key_from_vec(MESSAGE_SECRETS_LABEL, group_id.to_vec());
        let main = reader.get(&key)?.ok_or(MlsStoreError::Serialization)?;
        Ok((written, reader.join_message_secrets(group_id, &main)?))
    }

    fn delete(&self, label: &[u8], key: &[u8]) -> Result<(), MlsStoreError> {
        let storage_key = build_key_from_vec(label, key.to_vec());
        if label == JOIN_CONFIG_LABEL {
            self.update_index(&storage_key, false)?;
        }
        self.set(storage_key, None);
        Ok(())
    }
}

/// A record's plaintext: u32 BE key length ‖ key ‖ value, so a scan of the table (whose slots
/// are keyed hashes) recovers the storage keys.
fn pair(key: &[u8], value: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(4 + key.len() + value.len()));
    // Storage keys are a label and a JSON id: far below 4 GiB.
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

fn unpair(p: &[u8]) -> Option<(&[u8], Zeroizing<Vec<u8>>)> {
    let (len, rest) = p.split_at_checked(4)?;
    let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
    let (key, value) = rest.split_at_checked(len)?;
    Some((key, Zeroizing::new(value.to_vec())))
}

/// Lists may hold secrets (own leaf nodes hold none, but wipe alike).
fn wipe_list(list: Vec<Vec<u8>>) {
    for item in list {
        drop(Zeroizing::new(item));
    }
}

fn build_key_from_vec(label: &[u8], key: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + key.len() + 2);
    out.extend_from_slice(label);
    out.extend_from_slice(&key);
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    out
}

fn json<K: Serialize>(key: K) -> Result<Vec<u8>, MlsStoreError> {
    Ok(serde_json::to_vec(&key)?)
}

/// Storage key of one node of a group's tree ([`TREE_NODE_LABEL`]).
fn tree_node_key(group_id: &[u8], kind: NodeKind, index: usize) -> Result<Vec<u8>, MlsStoreError> {
    let mut key = group_id.to_vec();
    key.push(match kind {
        NodeKind::Leaf => b'L',
        NodeKind::Parent => b'P',
    });
    key.extend_from_slice(&serde_json::to_vec(&index)?);
    Ok(build_key_from_vec(TREE_NODE_LABEL, key))
}

/// Storage key of one member of a group's past epochs ([`PAST_MEMBER_LABEL`]).
pub(super) fn past_member_key(group_id: &[u8], member: &MemberRef) -> Result<Vec<u8>, MlsStoreError> {
    let mut key = group_id.to_vec();
    key.extend_from_slice(hex::encode(member).as_bytes());
    Ok(build_key_from_vec(PAST_MEMBER_LABEL, key))
}

/// Storage key of one past epoch's leaves ([`PAST_LEAVES_LABEL`]).
fn past_leaves_key(group_id: &[u8], epoch: u64) -> Result<Vec<u8>, MlsStoreError> {
    let mut key = group_id.to_vec();
    key.extend_from_slice(&serde_json::to_vec(&epoch)?);
    Ok(build_key_from_vec(PAST_LEAVES_LABEL, key))
}

fn epoch_key_pairs_id(
    group_id: &impl traits::GroupId<CURRENT_VERSION>,
    epoch: &impl traits::EpochKey<CURRENT_VERSION>,
    leaf_index: u32,
) -> Result<Vec<u8>, MlsStoreError> {
    let mut key = serde_json::to_vec(group_id)?;
    key.extend_from_slice(&serde_json::to_vec(epoch)?);
    key.extend_from_slice(&serde_json::to_vec(&leaf_index)?);
    Ok(key)
}

impl StorageProvider<CURRENT_VERSION> for MlsStore {
    type Error = MlsStoreError;

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.write(
            QUEUED_PROPOSAL_LABEL,
            &json((group_id, proposal_ref))?,
            encode(QUEUED_PROPOSAL_LABEL, proposal)?,
        )?;
        self.append(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?, json(proposal_ref)?)
    }

    fn write_tree<GroupId: traits::GroupId<CURRENT_VERSION>, TreeSync: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write_split_tree(&json(group_id)?, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write(
            INTERIM_TRANSCRIPT_HASH_LABEL,
            &json(group_id)?,
            encode(INTERIM_TRANSCRIPT_HASH_LABEL, interim_transcript_hash)?,
        )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write(GROUP_CONTEXT_LABEL, &json(group_id)?, encode(GROUP_CONTEXT_LABEL, group_context)?)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write(
            CONFIRMATION_TAG_LABEL,
            &json(group_id)?,
            encode(CONFIRMATION_TAG_LABEL, confirmation_tag)?,
        )
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(
            SIGNATURE_KEY_PAIR_LABEL,
            &json(public_key)?,
            encode(SIGNATURE_KEY_PAIR_LABEL, signature_key_pair)?,
        )
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.read_list(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?)?;
        refs.into_iter()
            .map(|proposal_ref| {
                let proposal = self
                    .read(QUEUED_PROPOSAL_LABEL, &json((group_id, &proposal_ref))?)?
                    // The memory store unwraps here; a queue naming a missing proposal is damage.
                    .ok_or(MlsStoreError::Serialization)?;
                Ok((proposal_ref, proposal))
            })
            .collect()
    }

    fn tree<GroupId: traits::GroupId<CURRENT_VERSION>, TreeSync: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read_tree(&json(group_id)?)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read(GROUP_CONTEXT_LABEL, &json(group_id)?)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read(INTERIM_TRANSCRIPT_HASH_LABEL, &json(group_id)?)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read(CONFIRMATION_TAG_LABEL, &json(group_id)?)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read(SIGNATURE_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write(KEY_PACKAGE_LABEL, &json(hash_ref)?, encode(KEY_PACKAGE_LABEL, key_package)?)
    }

    fn write_psk<PskId: traits::PskId<CURRENT_VERSION>, PskBundle: traits::PskBundle<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write(PSK_LABEL, &json(psk_id)?, encode(PSK_LABEL, psk)?)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(
            ENCRYPTION_KEY_PAIR_LABEL,
            &json(public_key)?,
            encode(ENCRYPTION_KEY_PAIR_LABEL, key_pair)?,
        )
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read(KEY_PACKAGE_LABEL, &json(hash_ref)?)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read(PSK_LABEL, &json(psk_id)?)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read(ENCRYPTION_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn delete_signature_key_pair<SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>>(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.delete(SIGNATURE_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.delete(ENCRYPTION_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete(KEY_PACKAGE_LABEL, &json(hash_ref)?)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(&self, psk_id: &PskKey) -> Result<(), Self::Error> {
        self.delete(PSK_LABEL, &json(psk_id)?)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read(GROUP_STATE_LABEL, &json(group_id)?)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write(GROUP_STATE_LABEL, &json(group_id)?, encode(GROUP_STATE_LABEL, group_state)?)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(GROUP_STATE_LABEL, &json(group_id)?)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.read_message_secrets(&json(group_id)?)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.write_split_message_secrets(&json(group_id)?, message_secrets)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_split_message_secrets(&json(group_id)?)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read(RESUMPTION_PSK_STORE_LABEL, &json(group_id)?)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write(
            RESUMPTION_PSK_STORE_LABEL,
            &json(group_id)?,
            encode(RESUMPTION_PSK_STORE_LABEL, resumption_psk_store)?,
        )
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(RESUMPTION_PSK_STORE_LABEL, &json(group_id)?)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read(OWN_LEAF_NODE_INDEX_LABEL, &json(group_id)?)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write(
            OWN_LEAF_NODE_INDEX_LABEL,
            &json(group_id)?,
            encode(OWN_LEAF_NODE_INDEX_LABEL, own_leaf_index)?,
        )
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(OWN_LEAF_NODE_INDEX_LABEL, &json(group_id)?)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read(EPOCH_SECRETS_LABEL, &json(group_id)?)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write(EPOCH_SECRETS_LABEL, &json(group_id)?, encode(EPOCH_SECRETS_LABEL, group_epoch_secrets)?)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(EPOCH_SECRETS_LABEL, &json(group_id)?)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.write(
            EPOCH_KEY_PAIRS_LABEL,
            &epoch_key_pairs_id(group_id, epoch, leaf_index)?,
            encode(EPOCH_KEY_PAIRS_LABEL, key_pairs)?,
        )
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        let key = epoch_key_pairs_id(group_id, epoch, leaf_index)?;
        Ok(self.read(EPOCH_KEY_PAIRS_LABEL, &key)?.unwrap_or_default())
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.delete(EPOCH_KEY_PAIRS_LABEL, &epoch_key_pairs_id(group_id, epoch, leaf_index)?)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?)?;
        for proposal_ref in refs {
            // Under the key `queue_proposal` wrote it (see the module header).
            self.delete(QUEUED_PROPOSAL_LABEL, &json((group_id, proposal_ref))?)?;
        }
        self.delete(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read(JOIN_CONFIG_LABEL, &json(group_id)?)
    }

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write(JOIN_CONFIG_LABEL, &json(group_id)?, encode(JOIN_CONFIG_LABEL, config)?)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.read_list(OWN_LEAF_NODES_LABEL, &json(group_id)?)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.append(OWN_LEAF_NODES_LABEL, &json(group_id)?, json(leaf_node)?)
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(OWN_LEAF_NODES_LABEL, &json(group_id)?)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(JOIN_CONFIG_LABEL, &json(group_id)?)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_split_tree(&json(group_id)?)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(CONFIRMATION_TAG_LABEL, &json(group_id)?)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(GROUP_CONTEXT_LABEL, &json(group_id)?)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(INTERIM_TRANSCRIPT_HASH_LABEL, &json(group_id)?)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.remove_item(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?, json(proposal_ref)?)?;
        self.delete(QUEUED_PROPOSAL_LABEL, &json((group_id, proposal_ref))?)
    }
}
