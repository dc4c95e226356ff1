//! The messenger's [`State`] as records of the `state` table, so a save writes only the
//! records that changed.
//!
//! Each field of [`State`] is one record named after the field (postcard, like the old file),
//! except `groups`, which is one record per group (`group/<hex id>`: a [`GroupRecord`], without
//! history) plus the list of their names (`groups`), and `mls_storage`, which is not a record at
//! all: openmls's records live in the `mls` table (see [`super::mls`]).
//!
//! History is not in these records: each entry is a record of the `history` table keyed by
//! its receive time and index ([`super::HistoryKey`]). In memory a group's
//! [`GroupMeta::history`] holds only the entries added since the last save (the newest of the
//! conversation, so entry `i` of `n` has index `message_count - n + i`), which the save appends.
//!
//! A save encodes every record and compares a SHA-256 digest with what it last wrote or read,
//! so the write is proportional to the change; the encoding is proportional to the state
//! without MLS and history (well under a KiB per group, the inbox and the outbox).

use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{ClientDb, DbError, DbWrite, HistoryKey, Table};
use crate::client::state::{Entry, GroupKind, GroupMeta, Secrets, State, StateError};

/// Name of the record listing the groups' record names.
const GROUPS_INDEX: &str = "groups";
/// Prefix of a group's record name.
const GROUP_PREFIX: &str = "group/";

/// A group's record: [`GroupMeta`] without its history.
#[derive(Serialize, Deserialize)]
struct GroupRecord {
    name: String,
    kind: GroupKind,
    active: bool,
}

/// The same, borrowed, for encoding.
#[derive(Serialize)]
struct GroupRecordRef<'a> {
    name: &'a str,
    kind: &'a GroupKind,
    active: bool,
}

/// Digests of the records as last written or read, by record name.
pub type Written = HashMap<String, [u8; 32]>;

/// Calls `$m!(field)` for every field of [`State`] stored as a record of its own.
macro_rules! plain_fields {
    ($m:ident) => {
        $m!(version);
        $m!(name);
        $m!(server);
        $m!(known_servers);
        $m!(contacts);
        $m!(hybrid_created_at_ms);
        $m!(hybrid_published);
        $m!(hybrid_keys);
        $m!(inbox);
        $m!(orphans);
        $m!(processed_seq);
        $m!(history_limit);
        $m!(rotate_last_resort);
        $m!(last_resort_ref);
        $m!(pending_commits);
        $m!(outbox);
        $m!(leave_requests);
        $m!(server_instance);
        $m!(key_pool);
        $m!(requests);
        $m!(inbox_end_seq);
        $m!(read_seq);
        $m!(sends);
        $m!(timelines);
        $m!(history_retention_ms);
    };
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Zeroizing<Vec<u8>>, StateError> {
    postcard::to_allocvec(v).map(Zeroizing::new).map_err(|e| StateError::Encode(e.to_string()))
}

fn decode<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, StateError> {
    postcard::from_bytes(bytes).map_err(|e| StateError::Decode(format!("record {name}: {e}")))
}

/// Every record of `state`, by name.
pub fn records(state: &State) -> Result<BTreeMap<String, Zeroizing<Vec<u8>>>, StateError> {
    let mut out = BTreeMap::new();
    out.insert("secrets".to_string(), encode(&state.secrets)?);
    macro_rules! put {
        ($f:ident) => {
            out.insert(stringify!($f).to_string(), encode(&state.$f)?);
        };
    }
    plain_fields!(put);
    let names: Vec<String> = state.groups.keys().map(|id| format!("{GROUP_PREFIX}{id}")).collect();
    out.insert(GROUPS_INDEX.to_string(), encode(&names)?);
    for (id, g) in &state.groups {
        let record = GroupRecordRef { name: &g.name, kind: &g.kind, active: g.active };
        out.insert(format!("{GROUP_PREFIX}{id}"), encode(&record)?);
    }
    Ok(out)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// What a save wrote besides the records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HistoryWrites {
    /// Entries appended to the `history` table.
    pub added: usize,
    /// Entries deleted because they were received before the cutoff.
    pub expired: usize,
}

/// Puts the records of `state` that differ from `written` into `w`, deletes the ones that are
/// gone (and the history of a group that is gone), appends the groups' new history entries and,
/// when `expire_before_ms` is not 0, deletes every conversation's entries received before it;
/// returns the digests to remember once `w` commits. The caller clears the groups' new entries
/// once `w` committed.
pub fn write_changed(
    state: &State,
    written: &Written,
    expire_before_ms: u64,
    w: &mut DbWrite<'_>,
) -> Result<(Written, HistoryWrites), StateError> {
    let now = records(state)?;
    let mut next = Written::with_capacity(now.len());
    for (name, plain) in &now {
        let d = digest(plain);
        if written.get(name) != Some(&d) {
            w.put(Table::State, name.as_bytes(), plain).map_err(db_err)?;
        }
        next.insert(name.clone(), d);
    }
    for name in written.keys().filter(|n| !now.contains_key(*n)) {
        w.delete(Table::State, name.as_bytes()).map_err(db_err)?;
        if let Some(id) = name.strip_prefix(GROUP_PREFIX).and_then(|h| hex::decode(h).ok()) {
            w.delete_history_before(&id, u64::MAX).map_err(db_err)?;
        }
    }
    let mut history = HistoryWrites::default();
    for (hex_id, g) in &state.groups {
        let Ok(id) = hex::decode(hex_id) else { continue };
        let first = state.timelines.first_index(hex_id, g.history.len());
        for (i, e) in g.history.iter().enumerate() {
            if e.received_at_ms < expire_before_ms {
                history.expired += 1;
                continue;
            }
            let key = HistoryKey { at_ms: e.received_at_ms, index: first.saturating_add(i as u64) };
            w.put_history(&id, key, &encode(e)?).map_err(db_err)?;
            history.added += 1;
        }
        if expire_before_ms != 0 {
            history.expired += w.delete_history_before(&id, expire_before_ms).map_err(db_err)?;
        }
    }
    Ok((next, history))
}

/// Decodes a history record.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, StateError> {
    decode("history entry", bytes)
}

/// Reads the whole [`State`] (without `mls_storage`) and the digests of its records.
pub fn read_state(db: &ClientDb) -> Result<(State, Written), StateError> {
    let mut written = Written::new();
    let mut get = |name: &str| -> Result<Zeroizing<Vec<u8>>, StateError> {
        let v = db
            .get(Table::State, name.as_bytes())
            .map_err(db_err)?
            .ok_or_else(|| StateError::Decode(format!("record {name} is missing")))?;
        written.insert(name.to_string(), digest(&v));
        Ok(v)
    };
    let secrets: Secrets = decode("secrets", &get("secrets")?)?;
    let mut state = State::new(secrets, None, None);
    macro_rules! take {
        ($f:ident) => {
            state.$f = decode(stringify!($f), &get(stringify!($f))?)?;
        };
    }
    plain_fields!(take);
    let names: Vec<String> = decode(GROUPS_INDEX, &get(GROUPS_INDEX)?)?;
    for name in names {
        let id = name.strip_prefix(GROUP_PREFIX).unwrap_or(&name).to_string();
        let g: GroupRecord = decode(&name, &get(&name)?)?;
        let group = GroupMeta { name: g.name, kind: g.kind, active: g.active, history: Default::default() };
        state.groups.insert(id, group);
    }
    Ok((state, written))
}

fn db_err(e: DbError) -> StateError {
    StateError::Db(e)
}
