//! Record keys and record sealing for the client database ([`super`]).
//!
//! Two keys ([`DbKey`]), random for a home made by format 6 on, kept sealed in the `key` record
//! under the key the passphrase unlocks; for an older home, derived from its state key (itself
//! HKDF over the Argon2id output, see [`crate::crypto::statefile`]) by HKDF-SHA256 (RFC 5869)
//! with distinct `info` labels:
//! - the *slot key*: a record's redb key is `HMAC-SHA256(slot key, table label || 0x00 ||
//!   logical key)` (RFC 2104), so neither names, group ids nor openmls labels appear on disk,
//!   and equal logical keys still find the same record;
//! - the *record key*: a record's value is `nonce (24) || XChaCha20-Poly1305(plaintext) || tag
//!   (16)` with a fresh random nonce per write, and associated data `"qpq.db/1" || table label
//!   || slot`, so a sealed value moved to another slot or table fails authentication.
//!
//! Labels are fixed ASCII without a zero byte, so `label || 0x00 || key` is unambiguous.

use std::cell::Cell;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::statefile::StateKey;

/// HKDF info of the slot (record name) key.
const SLOT_KEY_INFO: &[u8] = b"qpq.db/1 slot key";
/// HKDF info of the record (AEAD) key.
const RECORD_KEY_INFO: &[u8] = b"qpq.db/1 record key";
/// Prefix of every record's associated data.
const AAD_PREFIX: &[u8] = b"qpq.db/1";

/// Prefix of a wrapped [`DbKey`] in the `key` record (format 6; a home from before holds
/// [`super::KEY_CHECK`] there, and its records are sealed under [`DbKey::of`] its state key).
const WRAP_MAGIC: &[u8] = b"qpq.db/1 wrapped key";

/// Length of a slot (an HMAC-SHA256 output).
pub const SLOT_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// A record's place on disk: the keyed hash of its table and logical key.
pub type Slot = [u8; SLOT_LEN];

thread_local! {
    /// Records [`RecordKeys::open`] was asked to open on this thread. Per thread, so tests
    /// running side by side in one process do not count each other's reads; opening a home is
    /// synchronous, so its reads all happen on the caller's thread.
    static RECORDS_OPENED: Cell<u64> = const { Cell::new(0) };
}

/// How many sealed records this thread has opened so far (any table, any handle): what an
/// operation reads, for tests of issue 12's "opening a home reads O(1) records". One
/// thread-local add per record, next to an AEAD open.
pub fn records_opened_on_this_thread() -> u64 {
    RECORDS_OPENED.with(Cell::get)
}

/// What a home's records are sealed under: the slot key and the record key, wiped on drop.
///
/// The `key` record keeps them sealed under the key the passphrase unlocks ([`super`]), so a new
/// passphrase seals these 64 bytes anew (in a copy of the file, [`super::rekey`]), not every
/// record, and processes already holding these keys go on working. A home made before format 6 uses the keys derived from its first state key
/// ([`DbKey::of`]); a new home draws them at random. `qpq passphrase --new-key` (and a passphrase
/// set on a home without one) replaces the record key and re-seals every value; the slot key stays for the home's life (a slot is a one-way hash
/// of its record's name, so records cannot be re-slotted without knowing every name).
pub struct DbKey {
    slot: Zeroizing<[u8; 32]>,
    record: Zeroizing<[u8; 32]>,
}

impl DbKey {
    /// The keys of a home made before format 6: derived from its state key.
    pub fn of(key: &StateKey) -> DbKey {
        DbKey { slot: key.subkey(SLOT_KEY_INFO), record: key.subkey(RECORD_KEY_INFO) }
    }

    /// Fresh random keys for a new home.
    pub fn random() -> DbKey {
        let mut slot = Zeroizing::new([0; 32]);
        OsRng.fill_bytes(slot.as_mut());
        DbKey { slot, record: DbKey::random_record() }
    }

    fn random_record() -> Zeroizing<[u8; 32]> {
        let mut record = Zeroizing::new([0; 32]);
        OsRng.fill_bytes(record.as_mut());
        record
    }

    /// The same slot key with a fresh random record key (`qpq passphrase --new-key`).
    pub fn with_new_record_key(&self) -> DbKey {
        DbKey { slot: self.slot.clone(), record: DbKey::random_record() }
    }

    /// True when both name records with the same slots.
    pub fn same_slots(&self, other: &DbKey) -> bool {
        self.slot == other.slot
    }

    /// The `key` record's plaintext: the magic, then both keys.
    pub fn wrapped(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(WRAP_MAGIC.len() + 64));
        out.extend_from_slice(WRAP_MAGIC);
        out.extend_from_slice(self.slot.as_ref());
        out.extend_from_slice(self.record.as_ref());
        out
    }

    /// Reads [`DbKey::wrapped`]'s output; None for anything else.
    pub fn unwrap_from(plain: &[u8]) -> Option<DbKey> {
        let keys = plain.strip_prefix(WRAP_MAGIC)?;
        let (slot, record) = keys.split_at_checked(32)?;
        Some(DbKey {
            slot: Zeroizing::new(slot.try_into().ok()?),
            record: Zeroizing::new(record.try_into().ok()?),
        })
    }
}

impl Clone for DbKey {
    fn clone(&self) -> Self {
        DbKey { slot: self.slot.clone(), record: self.record.clone() }
    }
}

impl std::fmt::Debug for DbKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DbKey(..)")
    }
}

/// The two keys in use, wiped on drop.
pub struct RecordKeys {
    slot_key: Zeroizing<[u8; 32]>,
    cipher: XChaCha20Poly1305,
    // The cipher keeps its own copy of the key; chacha20poly1305 zeroizes it on drop (the
    // crate's `zeroize` feature is on through argon2/x-wing).
}

/// A record that does not open under our key in its slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a record of the client database is damaged or was moved")]
pub struct RecordDamaged;

impl RecordKeys {
    pub fn derive(key: &DbKey) -> RecordKeys {
        RecordKeys {
            slot_key: key.slot.clone(),
            cipher: XChaCha20Poly1305::new(Key::from_slice(key.record.as_ref())),
        }
    }

    /// The slot of `logical` in table `label`.
    pub fn slot(&self, label: &[u8], logical: &[u8]) -> Slot {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.slot_key.as_ref())
            // Invariant: HMAC accepts keys of any length.
            .expect("hmac takes any key length");
        mac.update(label);
        mac.update(&[0]);
        mac.update(logical);
        mac.finalize().into_bytes().into()
    }

    /// Seals `plaintext` for `slot` of table `label`.
    pub fn seal(&self, label: &[u8], slot: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        // Sized up front and encrypted in place: no plaintext copy is left by a reallocation.
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        // Invariant: `out` holds the NONCE_LEN-byte nonce, then the plaintext to encrypt.
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad(label, slot), &mut out[NONCE_LEN..])
            // Invariant: the only failure is a plaintext over 256 GiB; records are far smaller
            // (a redb value is at most 3 GiB).
            .expect("record plaintext is below the xchacha20poly1305 length limit");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a value sealed by [`RecordKeys::seal`] for the same slot and table.
    pub fn open(
        &self,
        label: &[u8],
        slot: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, RecordDamaged> {
        RECORDS_OPENED.with(|n| n.set(n.get().wrapping_add(1)));
        self.open_uncounted(label, slot, sealed)
    }

    /// [`RecordKeys::open`] without counting a record read (the journal's entries).
    pub fn open_uncounted(
        &self,
        label: &[u8],
        slot: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, RecordDamaged> {
        let (nonce, rest) = sealed.split_at_checked(NONCE_LEN).ok_or(RecordDamaged)?;
        let body_len = rest.len().checked_sub(TAG_LEN).ok_or(RecordDamaged)?;
        let (body, tag) = rest.split_at(body_len);
        let mut plain = Zeroizing::new(body.to_vec());
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &aad(label, slot),
                plain.as_mut_slice(),
                Tag::from_slice(tag),
            )
            .map_err(|_| RecordDamaged)?;
        Ok(plain)
    }
}

fn aad(label: &[u8], slot: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + label.len() + slot.len());
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(label);
    aad.extend_from_slice(slot);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_only_in_its_own_slot_and_table() {
        let keys = RecordKeys::derive(&DbKey::of(&StateKey::unprotected()));
        let slot = keys.slot(b"mls", b"group one");
        assert_ne!(slot, keys.slot(b"mls", b"group two"));
        assert_ne!(slot, keys.slot(b"state", b"group one"));
        let sealed = keys.seal(b"mls", &slot, b"epoch secrets");
        assert!(!sealed.windows(13).any(|w| w == b"epoch secrets"), "plaintext must not show");
        assert_eq!(keys.open(b"mls", &slot, &sealed).unwrap().as_slice(), b"epoch secrets");
        let other = keys.slot(b"mls", b"group two");
        assert_eq!(keys.open(b"mls", &other, &sealed), Err(RecordDamaged), "moved to another slot");
        assert_eq!(keys.open(b"state", &slot, &sealed), Err(RecordDamaged), "moved to another table");
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert_eq!(keys.open(b"mls", &slot, &flipped), Err(RecordDamaged));
        assert_eq!(keys.open(b"mls", &slot, &sealed[..20]), Err(RecordDamaged), "truncated");
    }

    #[test]
    fn another_key_names_and_seals_records_differently() {
        let a = RecordKeys::derive(&DbKey::of(&StateKey::unprotected()));
        let b = RecordKeys::derive(&DbKey::random());
        assert_ne!(a.slot(b"mls", b"x"), b.slot(b"mls", b"x"));
        let slot = a.slot(b"mls", b"x");
        let sealed = a.seal(b"mls", &slot, b"v");
        assert_eq!(b.open(b"mls", &slot, &sealed), Err(RecordDamaged));
    }
}
