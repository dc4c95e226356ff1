//! Moving a home from the state file (`qpq-state.bin`, state versions 3 and 4) to the client
//! database, once and crash-safe.
//!
//! The database is built whole under [`PARTIAL_FILE`], committed (redb fsyncs), renamed to
//! [`super::DB_FILE`] and the directory synced; only then is the state file removed. A kill at
//! any moment leaves one of:
//! - the state file alone, maybe with a partial database: the partial file is deleted and the
//!   migration starts over;
//! - both the database and the state file: the database is durable and wins; the state file
//!   is removed once the database has opened with the key and read whole
//!   ([`remove_leftover`]), never before: a damaged database next to it must not cost the
//!   only good copy;
//! - the database alone: migrated.
//!
//! The database keeps the state file's key (same Argon2id salt and parameters), so migrating
//! costs no second key derivation and the passphrase stays the same.

use std::path::Path;

use super::{ClientDb, DbKey, records};
use crate::client::state::{self, STATE_FILE, State, StateError};
use crate::crypto::statefile::{self, StateKey};
use crate::fsutil;

/// Where a database is built before it is renamed into place.
pub const PARTIAL_FILE: &str = "qpq.db.partial";

fn io(op: &'static str, path: &Path) -> impl Fn(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path: path.clone(), source }
}

/// Deletes `path` if it exists.
pub fn remove_if_present(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Builds a complete database for `state` at `path` (records sealed under `data`, itself sealed
/// under `unlock`), durable when this returns.
pub fn write_new(path: &Path, unlock: &StateKey, data: &DbKey, state: &State) -> Result<(), StateError> {
    let db = ClientDb::create_at(path.to_path_buf(), unlock, data)?;
    let mut w = db.write()?;
    // The state file's kept history goes into the history table with the records.
    records::write_changed(state, &Default::default(), 0, &mut w)?;
    if !state.mls_storage.is_empty() {
        // Parsed and checked (every group loads, and is ours) by the MLS client itself.
        let mls = crate::mls::MlsClient::from_storage(&state.secrets.identity_seed, &state.mls_storage)
            .map_err(|e| StateError::Decode(format!("mls storage: {e}")))?;
        mls.store().flush(&mut w)?;
    }
    w.commit()?;
    Ok(())
}

/// Renames the built database into place and syncs the directory.
pub fn publish(dir: &Path, partial: &Path) -> Result<(), StateError> {
    let db = dir.join(super::DB_FILE);
    std::fs::rename(partial, &db).map_err(io("rename", partial))?;
    fsutil::sync_dir(dir).map_err(io("sync", dir))
}

/// Finishes or performs the migration of `dir` (the caller holds the home's lock). Returns the
/// records' keys when it migrated (the passphrase already proven), None when the database was
/// there.
pub fn migrate_if_needed(dir: &Path, passphrase: Option<&[u8]>) -> Result<Option<DbKey>, StateError> {
    let partial = dir.join(PARTIAL_FILE);
    let old = dir.join(STATE_FILE);
    if super::exists(dir) {
        // A migration that published the database but died before cleaning up leaves the state
        // file: the caller removes it once the database has opened ([`remove_leftover`]).
        remove_if_present(&partial)?;
        return Ok(None);
    }
    // A migration that died before publishing: start over from the state file.
    remove_if_present(&partial)?;
    let bytes = state::read(dir)?;
    let (key, plain) = statefile::open(&bytes, passphrase)?;
    let state = State::decode(&plain)?;
    let data = DbKey::random();
    write_new(&partial, &key, &data, &state)?;
    crate::failpoint::hit("migrate-before-publish");
    publish(dir, &partial)?;
    crate::failpoint::hit("migrate-before-remove");
    remove_if_present(&old)?;
    fsutil::sync_dir(dir).map_err(io("sync", dir))?;
    Ok(Some(data))
}

/// Removes the state file a published migration left behind; call only once the database has
/// opened with its key and read whole.
pub fn remove_leftover(dir: &Path) -> Result<(), StateError> {
    let old = dir.join(STATE_FILE);
    if old.exists() {
        remove_if_present(&old)?;
        fsutil::sync_dir(dir).map_err(io("sync", dir))?;
    }
    Ok(())
}
