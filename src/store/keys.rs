//! Key material in the redb store: single-use KeyPackages, last-resort ones and hybrid keys,
//! their byte budget and their expiry.
//!
//! Why a budget of its own: identities cost nothing, so without one a stranger could fill the
//! disk with KeyPackages (200 of up to 16 KiB per identity, as many identities as they like).
//! Every stored key row is charged [`charge`] bytes against `meta.key_bytes`; an upload or a
//! new hybrid key that would pass [`QueueLimits::max_key_bytes`] is refused
//! ([`StoreError::KeyStoreFull`]). It is separate from the message quota so that a flood of
//! one kind cannot starve the other.
//!
//! Why an expiry index: `key_package_expiry` holds one empty row per stored package and hybrid
//! key, keyed not_after ‖ identity ‖ slot (the package's id, [`LAST_RESORT_SLOT`], or
//! [`HYBRID_SLOT`] with the key's [`hybrid_expires_at`]), so
//! [`WriteOp::ExpireKeyPackages`](super::WriteOp) deletes the expired ones in time order, a
//! slice per transaction, reading only what it deletes (it scanned every package of the file
//! in one transaction before).
//!
//! Every function here keeps three things in step: the row, its index row and the charge.

use redb::{ReadableTable, Table, WriteTransaction};

use super::writer::Outcome;
use super::{
    HYBRID_KEYS, IdentityKey, KEY_BYTES, KEY_EXPIRY, KEY_PACKAGE_META, KEY_PACKAGES, KeyPackageEntry,
    LAST_RESORT, QueueLimits, StoreError, queue_key,
};
use crate::crypto::hybrid::SignedHybridKey;
use crate::limits;

/// The index slot of an identity's last-resort package (single-use ids count up from 0 by at
/// most [`limits::MAX_KEY_PACKAGES_PER_UPLOAD`] per upload, so they never reach it, nor
/// [`HYBRID_SLOT`]).
pub(super) const LAST_RESORT_SLOT: u64 = u64::MAX;

/// The index slot of an identity's hybrid key, whose row expires
/// [`limits::HYBRID_KEY_SERVER_LIFETIME_SECS`] after its signed creation ([`hybrid_expires_at`]).
pub(super) const HYBRID_SLOT: u64 = u64::MAX - 1;

/// When a hybrid key created at `created_at_ms` (signed by its owner) is deleted, in unix
/// seconds: it is expired at `now` once this is <= now, as a KeyPackage's not_after is.
pub(crate) fn hybrid_expires_at(created_at_ms: u64) -> u64 {
    (created_at_ms / 1000).saturating_add(limits::HYBRID_KEY_SERVER_LIFETIME_SECS)
}

/// Bytes a stored key row is charged: its value plus [`limits::KEY_ROW_OVERHEAD_BYTES`] for
/// its key, its index row and the table's own overhead.
pub(crate) fn charge(value_len: usize) -> u64 {
    (value_len as u64).saturating_add(limits::KEY_ROW_OVERHEAD_BYTES)
}

/// `key_packages` key: identity ‖ id (u64 BE).
pub(super) fn kp_key(who: &IdentityKey, id: u64) -> [u8; 40] {
    queue_key(who, id)
}

/// `key_package_expiry` key: not_after (u64 BE) ‖ identity ‖ slot (u64 BE).
pub(super) fn expiry_key(not_after: u64, who: &[u8], slot: u64) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..8].copy_from_slice(&not_after.to_be_bytes());
    // Identities are 32 bytes wherever they come from (a key of `key_packages` or `last_resort`);
    // a shorter one leaves zeros, a longer one is cut: either way the row stays findable by
    // the same call.
    let n = who.len().min(32);
    k[8..8 + n].copy_from_slice(&who[..n]);
    k[40..].copy_from_slice(&slot.to_be_bytes());
    k
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Db(format!("corrupt {what}"))
}

/// The key tables one operation works on, plus the `meta` table the batch already holds open.
pub(super) struct Keys<'t, 'm> {
    packages: Table<'t, &'static [u8], &'static [u8]>,
    pool: Table<'t, &'static [u8], (u64, u64)>,
    last_resort: Table<'t, &'static [u8], &'static [u8]>,
    hybrid: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, &'static [u8], ()>,
    meta: &'m mut Table<'t, &'static str, u64>,
}

impl<'t, 'm> Keys<'t, 'm> {
    pub(super) fn open(
        txn: &'t WriteTransaction,
        meta: &'m mut Table<'t, &'static str, u64>,
    ) -> Result<Keys<'t, 'm>, StoreError> {
        Ok(Keys {
            packages: txn.open_table(KEY_PACKAGES)?,
            pool: txn.open_table(KEY_PACKAGE_META)?,
            last_resort: txn.open_table(LAST_RESORT)?,
            hybrid: txn.open_table(HYBRID_KEYS)?,
            expiry: txn.open_table(KEY_EXPIRY)?,
            meta,
        })
    }

    /// Records `who`'s (next id, package rows); an identity with no package left has no row,
    /// so identities that come and go (they are free) leave nothing behind. Its ids may then
    /// start again from 0: no package row, and so no index row, of its is left to collide with.
    fn set_pool(&mut self, who: &IdentityKey, next: u64, count: u64) -> Result<(), StoreError> {
        if count == 0 {
            self.pool.remove(&who[..])?;
        } else {
            self.pool.insert(&who[..], (next, count))?;
        }
        Ok(())
    }

    fn used(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get(KEY_BYTES)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Adds `added` and takes `freed` from the charged total.
    fn account(&mut self, added: u64, freed: u64) -> Result<(), StoreError> {
        if added == 0 && freed == 0 {
            return Ok(());
        }
        let used = self.used()?.saturating_sub(freed).saturating_add(added);
        self.meta.insert(KEY_BYTES, used)?;
        Ok(())
    }

    /// Refuses `adding` more bytes when, after `freeing`, they would pass the budget.
    fn check_room(&self, limits: QueueLimits, adding: u64, freeing: u64) -> Result<(), StoreError> {
        let used = self.used()?.saturating_sub(freeing);
        if adding > 0 && used.saturating_add(adding) > limits.max_key_bytes {
            return Err(StoreError::KeyStoreFull { used, adding, max: limits.max_key_bytes });
        }
        Ok(())
    }

    /// Deletes the single-use package at `key` (value `value_len` bytes, expiring at
    /// `not_after`) with its index row; returns its charge.
    fn drop_package(&mut self, key: &[u8], not_after: u64, value_len: usize) -> Result<u64, StoreError> {
        let (who, id) = super::split_queue_key(key).map_err(|_| corrupt("key package key"))?;
        self.packages.remove(key)?;
        self.expiry.remove(&expiry_key(not_after, &who, id)[..])?;
        Ok(charge(value_len))
    }

    /// Deletes `who`'s last-resort package, if any, with its index row; returns its charge.
    fn drop_last_resort(&mut self, who: &[u8]) -> Result<u64, StoreError> {
        let Some(old) = self.last_resort.remove(who)? else { return Ok(0) };
        // A damaged row names no index row; one left behind finds no package and goes alone.
        let (len, not_after) = (old.value().len(), KeyPackageEntry::decode_not_after(old.value()).ok());
        drop(old);
        if let Some(not_after) = not_after {
            self.expiry.remove(&expiry_key(not_after, who, LAST_RESORT_SLOT)[..])?;
        }
        Ok(charge(len))
    }

    /// Deletes `who`'s single-use packages expired at `now`; returns how many rows are left.
    fn prune(&mut self, who: &IdentityKey, now: u64) -> Result<u64, StoreError> {
        let (start, end) = (kp_key(who, 0), kp_key(who, u64::MAX));
        let mut doomed = Vec::new();
        for entry in self.packages.range(&start[..]..=&end[..])? {
            let (k, v) = entry?;
            let not_after = KeyPackageEntry::decode_not_after(v.value())?;
            if !KeyPackageEntry::is_valid_at(not_after, now) {
                doomed.push((k.value().to_vec(), not_after, v.value().len()));
            }
        }
        let mut freed = 0;
        for (k, not_after, len) in &doomed {
            freed += self.drop_package(k, *not_after, *len)?;
        }
        self.account(0, freed)?;
        let (next, count) = self.pool.get(&who[..])?.map(|g| g.value()).unwrap_or((0, 0));
        let left = count.saturating_sub(doomed.len() as u64);
        if !doomed.is_empty() {
            self.set_pool(who, next, left)?;
        }
        Ok(left)
    }

    /// Which of `packages` `who` already has stored (byte for byte).
    fn stored_among(
        &self,
        who: &IdentityKey,
        packages: &[KeyPackageEntry],
    ) -> Result<std::collections::HashSet<Vec<u8>>, StoreError> {
        let mut found = std::collections::HashSet::new();
        if packages.is_empty() {
            // A last-resort package alone: nothing to compare (and nothing to read).
            return Ok(found);
        }
        let wanted: std::collections::HashSet<&[u8]> = packages.iter().map(|p| &p.bytes[..]).collect();
        let (start, end) = (kp_key(who, 0), kp_key(who, u64::MAX));
        for entry in self.packages.range(&start[..]..=&end[..])? {
            let (_, v) = entry?;
            let bytes = KeyPackageEntry::decode(v.value())?.bytes;
            if wanted.contains(&bytes[..]) {
                found.insert(bytes);
            }
        }
        Ok(found)
    }

    pub(super) fn upload(
        &mut self,
        limits: QueueLimits,
        who: &IdentityKey,
        packages: &[KeyPackageEntry],
        last_resort: Option<&KeyPackageEntry>,
        now: u64,
    ) -> Result<Outcome, StoreError> {
        // Expired packages must not count against the cap: a returning user could never refill.
        let count = self.prune(who, now)?;
        let stored = self.stored_among(who, packages)?;
        let packages = &super::single_copies(packages, &stored);
        let (mut next, _) = self.pool.get(&who[..])?.map(|g| g.value()).unwrap_or((0, 0));
        let adding = packages.len() as u64;
        if count + adding > limits::MAX_KEY_PACKAGES_PER_IDENTITY {
            return Err(StoreError::PoolFull {
                have: count,
                adding,
                max: limits::MAX_KEY_PACKAGES_PER_IDENTITY,
            });
        }
        let encoded: Vec<Vec<u8>> = packages.iter().map(KeyPackageEntry::encode).collect();
        let lr = last_resort.map(|lr| (lr.not_after, lr.encode()));
        let replaced = match (&lr, self.last_resort.get(&who[..])?) {
            (Some(_), Some(old)) => charge(old.value().len()),
            _ => 0,
        };
        let bytes: u64 = encoded.iter().chain(lr.as_ref().map(|(_, v)| v)).map(|v| charge(v.len())).sum();
        self.check_room(limits, bytes, replaced)?;
        for (kp, value) in packages.iter().zip(&encoded) {
            self.packages.insert(&kp_key(who, next)[..], &value[..])?;
            self.expiry.insert(&expiry_key(kp.not_after, who, next)[..], ())?;
            next += 1;
        }
        self.set_pool(who, next, count + adding)?;
        let mut freed = 0;
        if let Some((not_after, value)) = &lr {
            freed = self.drop_last_resort(who)?;
            self.last_resort.insert(&who[..], &value[..])?;
            self.expiry.insert(&expiry_key(*not_after, who, LAST_RESORT_SLOT)[..], ())?;
        }
        self.account(bytes, freed)?;
        Ok(Outcome::KeyPackagesStored { count: count + adding })
    }

    /// Takes `who`'s oldest package valid at `now` (else its last-resort one), deleting the
    /// expired packages it meets on the way. What it deletes as expired is judged at
    /// `expire_by` (unix s, no later than `now`): `now` as the store's
    /// [`crate::clock::DeletionClock`] sees it, so a clock stepped ahead makes a take skip
    /// packages that look expired but not delete them (nor the last-resort one) for good.
    pub(super) fn take(
        &mut self,
        who: &IdentityKey,
        now: u64,
        expire_by: u64,
    ) -> Result<Outcome, StoreError> {
        let (start, end) = (kp_key(who, 0), kp_key(who, u64::MAX));
        let mut met = Vec::new();
        let mut found = None;
        for entry in self.packages.range(&start[..]..=&end[..])? {
            let (k, v) = entry?;
            let not_after = KeyPackageEntry::decode_not_after(v.value())?;
            if KeyPackageEntry::is_valid_at(not_after, now) {
                met.push((k.value().to_vec(), not_after, v.value().len()));
                found = Some(KeyPackageEntry::decode(v.value())?.bytes);
                break;
            }
            if !KeyPackageEntry::is_valid_at(not_after, expire_by) {
                met.push((k.value().to_vec(), not_after, v.value().len()));
            }
        }
        // The packages met expired at `expire_by` are deleted, and then the one taken.
        let removed = met.len() as u64;
        let mut freed = 0;
        for (k, not_after, len) in &met {
            freed += self.drop_package(k, *not_after, *len)?;
        }
        self.account(0, freed)?;
        let mut remaining = 0;
        if removed > 0 {
            let (next, count) = self.pool.get(&who[..])?.map(|g| g.value()).unwrap_or((0, removed));
            remaining = count.saturating_sub(removed);
            self.set_pool(who, next, remaining)?;
        }
        if let Some(bytes) = found {
            // Rows after the one taken may have expired too; `remaining` is an upper bound until
            // they are met (the count RPC reports the exact number of valid ones).
            return Ok(Outcome::KeyPackage { bytes, remaining, last_resort: false });
        }
        let last = match self.last_resort.get(&who[..])? {
            Some(v) => Some(KeyPackageEntry::decode(v.value())?),
            None => None,
        };
        match last {
            Some(kp) if KeyPackageEntry::is_valid_at(kp.not_after, now) => {
                Ok(Outcome::KeyPackage { bytes: kp.bytes, remaining: 0, last_resort: true })
            }
            Some(kp) if KeyPackageEntry::is_valid_at(kp.not_after, expire_by) => {
                Err(StoreError::NoKeyPackages)
            }
            Some(_) => {
                let freed = self.drop_last_resort(&who[..])?;
                self.account(0, freed)?;
                Err(StoreError::NoKeyPackages)
            }
            None => Err(StoreError::NoKeyPackages),
        }
    }

    /// Deletes up to [`limits::SWEEP_SLICE_ROWS`] packages expired at `now`, oldest first;
    /// `more` says whether another slice may find some.
    pub(super) fn expire(&mut self, now: u64) -> Result<Outcome, StoreError> {
        let end = expiry_key(now.saturating_add(1), &[], 0);
        let mut doomed: Vec<[u8; 48]> = Vec::new();
        for entry in self.expiry.range(..&end[..])? {
            let (k, _) = entry?;
            doomed.push(k.value().try_into().map_err(|_| corrupt("key package expiry row"))?);
            if doomed.len() >= limits::SWEEP_SLICE_ROWS {
                break;
            }
        }
        let more = doomed.len() >= limits::SWEEP_SLICE_ROWS;
        let mut freed = 0;
        let mut removed = 0u64;
        for k in &doomed {
            // Fixed offsets into a 48-byte array: these slices cannot fail.
            let (not_after, who, slot) = (&k[..8], &k[8..40], &k[40..]);
            let not_after = u64::from_be_bytes(not_after.try_into().unwrap_or_default());
            let slot = u64::from_be_bytes(slot.try_into().unwrap_or_default());
            self.expiry.remove(&k[..])?;
            // A key row too damaged to decode is deleted when its index row comes up: an error
            // here failed the slice, and expiry, oldest first, never got past it again, so no
            // later key expired and the key budget was never freed.
            if slot == HYBRID_SLOT {
                // Only the key this row indexes (a replaced one took its row with it).
                let stored = match self.hybrid.get(who)? {
                    Some(v) => {
                        let at =
                            super::decode_hybrid_key(v.value()).map(|k| hybrid_expires_at(k.created_at_ms));
                        Some((at.unwrap_or(not_after), v.value().len()))
                    }
                    None => None,
                };
                if let Some((_, len)) = stored.filter(|(at, _)| *at == not_after) {
                    self.hybrid.remove(who)?;
                    freed += charge(len);
                    removed += 1;
                }
                continue;
            }
            if slot == LAST_RESORT_SLOT {
                // Only the package this row indexes: a replaced one took its row with it, but
                // a stale row must never cost anyone a valid last-resort package.
                let stored = match self.last_resort.get(who)? {
                    Some(v) => Some(KeyPackageEntry::decode_not_after(v.value()).unwrap_or(not_after)),
                    None => None,
                };
                if stored == Some(not_after) {
                    freed += self.drop_last_resort(who)?;
                    removed += 1;
                }
                continue;
            }
            let who: IdentityKey = who.try_into().map_err(|_| corrupt("key package expiry row"))?;
            let key = kp_key(&who, slot);
            // Only the package this row indexes. It always is: an identity's ids start again only
            // once none of its packages, and so none of its index rows, is left.
            let stored = match self.packages.get(&key[..])? {
                Some(v) => {
                    Some((KeyPackageEntry::decode_not_after(v.value()).unwrap_or(not_after), v.value().len()))
                }
                None => None,
            };
            if let Some((_, len)) = stored.filter(|(at, _)| *at == not_after) {
                self.packages.remove(&key[..])?;
                freed += charge(len);
                removed += 1;
                let pool = self.pool.get(&who[..])?.map(|g| g.value());
                if let Some((next, count)) = pool {
                    self.set_pool(&who, next, count.saturating_sub(1))?;
                }
            }
        }
        self.account(0, freed)?;
        Ok(Outcome::KeyPackagesExpired { removed, more })
    }

    /// Replaces `who`'s hybrid key only with a newer one: an older signed key (a replay of one
    /// the owner has rotated away from) is refused. Re-sending the stored key is a no-op success.
    pub(super) fn put_hybrid(
        &mut self,
        limits: QueueLimits,
        who: &IdentityKey,
        signed: &SignedHybridKey,
    ) -> Result<Outcome, StoreError> {
        let encoded = super::encode_hybrid_key(signed);
        let stored = self.hybrid.get(&who[..])?.map(|g| g.value().to_vec());
        let mut replaced = 0;
        let mut stored_at = None;
        if let Some(stored) = stored {
            if stored == encoded {
                return Ok(Outcome::HybridKeyStored);
            }
            let at = super::decode_hybrid_key(&stored)?.created_at_ms;
            if signed.created_at_ms <= at {
                return Err(StoreError::StaleHybridKey { stored: at, offered: signed.created_at_ms });
            }
            stored_at = Some(at);
            replaced = charge(stored.len());
        }
        let adding = charge(encoded.len());
        // Refused before anything changes: the batch commits a refused request's writes.
        self.check_room(limits, adding, replaced)?;
        if let Some(old) = stored_at {
            self.expiry.remove(&expiry_key(hybrid_expires_at(old), who, HYBRID_SLOT)[..])?;
        }
        self.hybrid.insert(&who[..], &encoded[..])?;
        self.expiry.insert(&expiry_key(hybrid_expires_at(signed.created_at_ms), who, HYBRID_SLOT)[..], ())?;
        self.account(adding, replaced)?;
        Ok(Outcome::HybridKeyStored)
    }
}

/// Builds `key_package_expiry` and `meta.key_bytes` from the key tables of a file written
/// before they existed (format version 6 or older), in the open transaction.
pub(super) fn index_existing(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut expiry = txn.open_table(KEY_EXPIRY)?;
    let mut total = 0u64;
    for entry in txn.open_table(KEY_PACKAGES)?.iter()? {
        let (k, v) = entry?;
        let (who, id) = super::split_queue_key(k.value()).map_err(|_| corrupt("key package key"))?;
        expiry.insert(&expiry_key(KeyPackageEntry::decode_not_after(v.value())?, &who, id)[..], ())?;
        total = total.saturating_add(charge(v.value().len()));
    }
    for entry in txn.open_table(LAST_RESORT)?.iter()? {
        let (k, v) = entry?;
        let not_after = KeyPackageEntry::decode_not_after(v.value())?;
        expiry.insert(&expiry_key(not_after, k.value(), LAST_RESORT_SLOT)[..], ())?;
        total = total.saturating_add(charge(v.value().len()));
    }
    for entry in txn.open_table(HYBRID_KEYS)?.iter()? {
        let (k, v) = entry?;
        let at = super::decode_hybrid_key(v.value())?.created_at_ms;
        expiry.insert(&expiry_key(hybrid_expires_at(at), k.value(), HYBRID_SLOT)[..], ())?;
        total = total.saturating_add(charge(v.value().len()));
    }
    txn.open_table(super::META)?.insert(KEY_BYTES, total)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase};

    use super::*;
    use crate::store::{META, Store, WriteOp};

    fn limits(max_key_bytes: u64) -> QueueLimits {
        QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            ttl_ms: 60_000,
            max_stored_bytes: u64::MAX,
            max_key_bytes,
        }
    }

    /// A package of `len` bytes, distinct from every other one made here (the store keeps one
    /// copy of a package): its first bytes count up.
    fn kp(not_after: u64, len: usize) -> KeyPackageEntry {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes();
        let mut bytes = vec![7; len];
        let k = len.min(n.len());
        bytes[..k].copy_from_slice(&n[..k]);
        KeyPackageEntry { not_after, bytes }
    }

    fn upload(
        who: IdentityKey,
        packages: Vec<KeyPackageEntry>,
        lr: Option<KeyPackageEntry>,
        now: u64,
    ) -> WriteOp {
        WriteOp::UploadKeyPackages { who, packages, last_resort: lr, now }
    }

    fn hybrid(created_at_ms: u64) -> SignedHybridKey {
        SignedHybridKey { key: vec![1; limits::HYBRID_KEY_LEN], signature: vec![2; 64], created_at_ms }
    }

    /// The key rows' charges and index rows counted from scratch: (charged bytes, index rows,
    /// key rows: packages, last-resort packages and hybrid keys, one index row each).
    fn recount(path: &std::path::Path) -> (u64, u64, u64) {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let mut total = 0;
        let mut rows = 0;
        for table in [KEY_PACKAGES, LAST_RESORT] {
            for e in txn.open_table(table).unwrap().iter().unwrap() {
                total += charge(e.unwrap().1.value().len());
                rows += 1;
            }
        }
        for e in txn.open_table(HYBRID_KEYS).unwrap().iter().unwrap() {
            total += charge(e.unwrap().1.value().len());
            rows += 1;
        }
        // Version 6 had no index.
        let index = txn.open_table(KEY_EXPIRY).map(|t| t.iter().unwrap().count() as u64).unwrap_or(0);
        (total, index, rows)
    }

    /// Closes the store, checks its total and index against a recount, and opens it again.
    fn check(store: Store, path: &std::path::Path, max: u64) -> Store {
        let charged = store.key_bytes().unwrap();
        store.close().unwrap();
        let (total, index, rows) = recount(path);
        assert_eq!(charged, total, "the running total matches a recount");
        assert_eq!(index, rows, "one index row per package");
        Store::open(path, limits(max)).unwrap()
    }

    #[tokio::test]
    async fn every_key_row_is_charged_and_the_budget_refuses_what_would_pass_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let now = 1_000_000;
        // Room for alice's three packages and last-resort one, and not one byte more.
        let max = 3 * charge(8 + 100) + charge(8 + 50);
        let store = Store::open(&path, limits(max)).unwrap();
        let op = upload(
            alice,
            vec![kp(now + 10, 100), kp(now + 99, 100), kp(now + 99, 100)],
            Some(kp(now + 99, 50)),
            now,
        );
        assert_eq!(store.write(op).await.unwrap(), Outcome::KeyPackagesStored { count: 3 });
        assert_eq!(store.key_bytes().unwrap(), max);
        let store = check(store, &path, max);
        let refused = store.write(upload(bob, vec![kp(now + 99, 1)], None, now)).await;
        assert!(matches!(refused, Err(StoreError::KeyStoreFull { .. })), "{refused:?}");
        let refused = store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(5) }).await;
        assert!(matches!(refused, Err(StoreError::KeyStoreFull { .. })), "{refused:?}");
        assert_eq!(store.key_package_count(&bob, now).unwrap(), (0, false), "nothing of bob's stored");

        // A package handed out frees its charge; so does replacing the last-resort one with a
        // smaller one (charged only for what it adds after the old one goes).
        store.write(WriteOp::TakeKeyPackage { who: alice, now }).await.unwrap();
        assert_eq!(store.key_bytes().unwrap(), max - charge(8 + 100));
        let op = upload(bob, vec![kp(now + 99, 60)], None, now);
        assert_eq!(store.write(op).await.unwrap(), Outcome::KeyPackagesStored { count: 1 });
        let op = upload(alice, Vec::new(), Some(kp(now + 200, 10)), now);
        store.write(op).await.unwrap();
        let store = check(store, &path, max);

        // Expiry frees what it deletes: alice's two left at now + 99 and bob's.
        let later = now + 99;
        let out = store.write(WriteOp::ExpireKeyPackages { now: later }).await.unwrap();
        assert_eq!(out, Outcome::KeyPackagesExpired { removed: 3, more: false });
        assert_eq!(store.key_bytes().unwrap(), charge(8 + 10), "only alice's new last-resort one is left");
        assert_eq!(store.key_package_count(&alice, later).unwrap(), (0, true));
        // A hybrid key (1.4 KB) is over this budget; the rest runs under a larger one.
        let refused = store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(5) }).await;
        assert!(matches!(refused, Err(StoreError::KeyStoreFull { .. })), "{refused:?}");
        let store = check(store, &path, u64::MAX);

        // Hybrid keys are charged once; a newer one replaces the old one's charge.
        store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(5) }).await.unwrap();
        store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(6) }).await.unwrap();
        let hybrid_charge = charge(64 + 8 + limits::HYBRID_KEY_LEN);
        assert_eq!(store.key_bytes().unwrap(), charge(8 + 10) + hybrid_charge);
        check(store, &path, max).close().unwrap();
    }

    #[tokio::test]
    async fn expiry_deletes_in_slices_in_time_order_and_spares_valid_packages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        let now = 1_000_000;
        let per = limits::MAX_KEY_PACKAGES_PER_IDENTITY as usize;
        let people = limits::SWEEP_SLICE_ROWS / (per / 2) + 1;
        for i in 0..people {
            let who = [i as u8 + 1; 32];
            let mut packages: Vec<_> = (0..per / 2).map(|_| kp(now + 10, 4)).collect();
            packages.extend((0..per / 2).map(|_| kp(now + 1000, 4)));
            for chunk in packages.chunks(limits::MAX_KEY_PACKAGES_PER_UPLOAD) {
                let lr = Some(kp(now + 10 + i as u64 % 2 * 1000, 4));
                store.write(upload(who, chunk.to_vec(), lr, now)).await.unwrap();
            }
        }
        let expired = (people * per / 2 + people.div_ceil(2)) as u64;
        assert!(expired > limits::SWEEP_SLICE_ROWS as u64, "the test needs more than one slice");
        let later = now + 10;
        let first = store.write(WriteOp::ExpireKeyPackages { now: later }).await.unwrap();
        assert_eq!(
            first,
            Outcome::KeyPackagesExpired { removed: limits::SWEEP_SLICE_ROWS as u64, more: true }
        );
        let rest = store.write(WriteOp::ExpireKeyPackages { now: later }).await.unwrap();
        let left_over = expired - limits::SWEEP_SLICE_ROWS as u64;
        assert_eq!(rest, Outcome::KeyPackagesExpired { removed: left_over, more: false });
        for i in 0..people {
            let valid = (per as u64 / 2, i % 2 == 1);
            assert_eq!(
                store.key_package_count(&[i as u8 + 1; 32], now).unwrap(),
                valid,
                "only expired ones went"
            );
        }
        let none = store.write(WriteOp::ExpireKeyPackages { now: later }).await.unwrap();
        assert_eq!(none, Outcome::KeyPackagesExpired { removed: 0, more: false });
        check(store, &path, u64::MAX).close().unwrap();
    }

    /// A hybrid key not replaced for HYBRID_KEY_SERVER_LIFETIME_SECS after its signed creation is
    /// deleted by expiry, with its charge; a replaced one's time no longer counts.
    #[tokio::test]
    async fn a_hybrid_key_left_unreplaced_for_its_server_lifetime_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        let (old, newer) = (1_000_000, 90 * 24 * 3600 * 1000);
        store.write(WriteOp::PutHybridKey { who: alice, signed: hybrid(old) }).await.unwrap();
        store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(old) }).await.unwrap();
        store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(newer) }).await.unwrap();
        let store = check(store, &path, u64::MAX);
        let expire = |now| WriteOp::ExpireKeyPackages { now };
        let due = hybrid_expires_at(old);
        let out = store.write(expire(due - 1)).await.unwrap();
        assert_eq!(out, Outcome::KeyPackagesExpired { removed: 0, more: false }, "not yet");
        let out = store.write(expire(due)).await.unwrap();
        assert_eq!(
            out,
            Outcome::KeyPackagesExpired { removed: 1, more: false },
            "alice's, not bob's newer one"
        );
        assert_eq!(store.hybrid_key(&alice).unwrap(), None);
        assert_eq!(store.hybrid_key(&bob).unwrap().map(|k| k.created_at_ms), Some(newer));
        assert_eq!(store.key_bytes().unwrap(), charge(64 + 8 + limits::HYBRID_KEY_LEN));
        let store = check(store, &path, u64::MAX);
        let out = store.write(expire(hybrid_expires_at(newer))).await.unwrap();
        assert_eq!(out, Outcome::KeyPackagesExpired { removed: 1, more: false });
        assert_eq!(store.key_bytes().unwrap(), 0);
        check(store, &path, u64::MAX).close().unwrap();
    }

    /// A replacement the budget refuses changes nothing: the old key keeps its index row (the
    /// writer commits a refused request's writes with the rest of its batch).
    #[tokio::test]
    async fn a_refused_hybrid_key_replacement_keeps_the_old_keys_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let who = [1u8; 32];
        let first = hybrid(1_000_000);
        let max = charge(64 + 8 + first.key.len());
        let store = Store::open(&path, limits(max)).unwrap();
        store.write(WriteOp::PutHybridKey { who, signed: first }).await.unwrap();
        let larger = SignedHybridKey { key: vec![1; limits::HYBRID_KEY_LEN + 1], ..hybrid(2_000_000) };
        let refused = store.write(WriteOp::PutHybridKey { who, signed: larger }).await;
        assert!(matches!(refused, Err(StoreError::KeyStoreFull { .. })), "{refused:?}");
        let store = check(store, &path, max);
        let out =
            store.write(WriteOp::ExpireKeyPackages { now: hybrid_expires_at(1_000_000) }).await.unwrap();
        assert_eq!(out, Outcome::KeyPackagesExpired { removed: 1, more: false }, "still found by its row");
        check(store, &path, max).close().unwrap();
    }

    /// Identities are free: one whose packages are all gone (taken or expired) leaves no row.
    #[tokio::test]
    async fn an_identity_with_no_package_left_leaves_no_pool_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let now = 1_000_000;
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        store.write(upload(alice, vec![kp(now + 10, 4), kp(now + 10, 5)], None, now)).await.unwrap();
        store.write(upload(bob, vec![kp(now + 10, 4)], None, now)).await.unwrap();
        for _ in 0..2 {
            store.write(WriteOp::TakeKeyPackage { who: alice, now }).await.unwrap();
        }
        store.write(WriteOp::ExpireKeyPackages { now: now + 10 }).await.unwrap();
        store.close().unwrap();
        {
            let db = Database::open(&path).unwrap();
            let rows = db.begin_read().unwrap().open_table(KEY_PACKAGE_META).unwrap().iter().unwrap().count();
            assert_eq!(rows, 0, "taken and expired: no pool row left");
        }
        // Ids start again, and packages come and go as before.
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        let again = kp(now + 99, 6);
        store.write(upload(alice, vec![again.clone()], None, now)).await.unwrap();
        let taken = store.write(WriteOp::TakeKeyPackage { who: alice, now }).await.unwrap();
        assert_eq!(taken, Outcome::KeyPackage { bytes: again.bytes, remaining: 0, last_resort: false });
        check(store, &path, u64::MAX).close().unwrap();
    }

    #[tokio::test]
    async fn a_stale_expiry_row_never_deletes_a_valid_package() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let who = [1u8; 32];
        let now = 1_000_000;
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        store.write(upload(who, vec![kp(now + 1000, 4)], Some(kp(now + 1000, 4)), now)).await.unwrap();
        store.close().unwrap();
        {
            // Rows naming the stored packages with an earlier not_after (a damaged index).
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut expiry = txn.open_table(KEY_EXPIRY).unwrap();
            expiry.insert(&expiry_key(now + 5, &who, 0)[..], ()).unwrap();
            expiry.insert(&expiry_key(now + 5, &who, LAST_RESORT_SLOT)[..], ()).unwrap();
            drop(expiry);
            txn.commit().unwrap();
        }
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        let out = store.write(WriteOp::ExpireKeyPackages { now: now + 10 }).await.unwrap();
        assert_eq!(out, Outcome::KeyPackagesExpired { removed: 0, more: false });
        assert_eq!(store.key_package_count(&who, now + 10).unwrap(), (1, true), "both packages kept");
        check(store, &path, u64::MAX).close().unwrap();
    }

    #[tokio::test]
    async fn a_version_6_file_gets_its_index_and_total_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let (alice, bob) = ([1u8; 32], [2u8; 32]);
        let now = 1_000_000;
        {
            let store = Store::open(&path, limits(u64::MAX)).unwrap();
            store
                .write(upload(alice, vec![kp(now + 10, 30), kp(now + 99, 40)], Some(kp(now + 10, 20)), now))
                .await
                .unwrap();
            store.write(upload(bob, vec![kp(now + 99, 50)], Some(kp(now + 99, 20)), now)).await.unwrap();
            store.write(WriteOp::PutHybridKey { who: bob, signed: hybrid(5) }).await.unwrap();
            store.close().unwrap();
            // What version 6 wrote: no index, no total.
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(KEY_EXPIRY).unwrap();
            let mut meta = txn.open_table(META).unwrap();
            meta.remove(KEY_BYTES).unwrap();
            meta.insert("schema_version", 6).unwrap();
            drop(meta);
            txn.commit().unwrap();
        }
        let (total, _, rows) = recount(&path);
        let store = Store::open(&path, limits(u64::MAX)).unwrap();
        assert_eq!(store.key_bytes().unwrap(), total);
        let store = check(store, &path, u64::MAX);
        assert_eq!(rows, 6);
        let out = store.write(WriteOp::ExpireKeyPackages { now: now + 10 }).await.unwrap();
        assert_eq!(
            out,
            Outcome::KeyPackagesExpired { removed: 2, more: false },
            "found through the new index"
        );
        assert_eq!(store.key_package_count(&alice, now).unwrap(), (1, false));
        assert_eq!(store.key_package_count(&bob, now).unwrap(), (1, true));
        let store = check(store, &path, u64::MAX);
        store.close().unwrap();
        let db = Database::open(&path).unwrap();
        let version = db.begin_read().unwrap().open_table(META).unwrap().get("schema_version").unwrap();
        assert_eq!(version.map(|g| g.value()), Some(crate::store::SCHEMA_VERSION));
    }
}
