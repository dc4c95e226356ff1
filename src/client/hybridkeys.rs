//! Lifetimes of hybrid (X-Wing) envelope keys: rotating ours, caching and checking peers'.
//!
//! The envelope is the post-quantum layer over everything a client stores on the server, and
//! the server (or anyone recording its traffic) keeps the ciphertext. A key that lived forever
//! would let a later theft of one device open every envelope ever recorded for it. So:
//! - our key is replaced every [`HYBRID_KEY_LIFETIME_MS`] (or at once with `qpq keys rotate`);
//! - a replaced secret is kept for [`RETIRED_KEY_KEEP_MS`], long enough to open what senders
//!   sealed to it before they looked our key up again ([`PEER_KEY_REFRESH_MS`]) and what then
//!   waited in our queue (the server's default message TTL, 30 days); then it is erased;
//! - a peer's key is looked up again once our copy is [`PEER_KEY_REFRESH_MS`] old;
//! - a looked-up key must not be older than the one we know (its creation time is signed by its
//!   owner), so a server cannot roll a person back to an old, perhaps stolen, key.
//!
//! The decisions are pure functions of clock readings (unit-tested below); the `impl Messenger`
//! at the end does the I/O.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::client::messenger::{ClientError, Messenger};
use crate::crypto::hybrid::{
    self, HybridError, HybridPublicKey, HybridSecretKey, KEY_ID_LEN, SignedHybridKey,
};
use crate::crypto::sealmany::{self, SealManyError};
use crate::proto::wire_error::ErrorCode;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// How long our hybrid key is used before it is replaced.
pub const HYBRID_KEY_LIFETIME_MS: u64 = 7 * DAY_MS;
/// How long a replaced secret is kept: a sender's refresh interval plus the server's default
/// message TTL (`limits::DEFAULT_MESSAGE_TTL_SECS`, 30 days), plus margin.
pub const RETIRED_KEY_KEEP_MS: u64 = 35 * DAY_MS;
/// How long a peer's looked-up key is used before it is looked up again.
pub const PEER_KEY_REFRESH_MS: u64 = DAY_MS;
/// Most retired secrets kept, whatever their age (a burst of `keys rotate` cannot grow the
/// state without bound).
pub const MAX_RETIRED_KEYS: usize = 16;

/// A secret we replaced, kept to open envelopes sealed to it before senders knew the new one.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop, Clone)]
pub struct RetiredHybridKey {
    pub seed: [u8; 32],
    /// Its id in envelope headers (see `crypto::hybrid`), kept so that finding the key an
    /// envelope names costs no key derivation.
    pub key_id: [u8; KEY_ID_LEN],
    /// When it stopped being our current key (ms since the Unix epoch).
    pub retired_at_ms: u64,
}

/// A peer's verified hybrid key as we last looked it up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerHybridKey {
    pub key: Vec<u8>,
    /// Creation time its owner signed.
    pub created_at_ms: u64,
    /// When we looked it up (our clock).
    pub fetched_at_ms: u64,
}

impl PeerHybridKey {
    /// True while the copy is recent enough to seal to without looking it up again. A clock
    /// that went backwards counts as fresh; the next lookup happens once it has caught up.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.fetched_at_ms) < PEER_KEY_REFRESH_MS
    }
}

/// Why a looked-up key is refused although its signature is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rollback {
    #[error("it is older than the key already known")]
    Older,
    #[error("it differs from the key already known with the same creation time")]
    Conflicting,
}

/// Accepts a verified, looked-up key only if it is not older than the one we have.
pub fn check_not_rolled_back(
    known: Option<&PeerHybridKey>,
    fetched: &SignedHybridKey,
) -> Result<(), Rollback> {
    match known {
        Some(k) if fetched.created_at_ms < k.created_at_ms => Err(Rollback::Older),
        Some(k) if fetched.created_at_ms == k.created_at_ms && fetched.key != k.key => {
            Err(Rollback::Conflicting)
        }
        _ => Ok(()),
    }
}

/// True once our key created at `created_at_ms` has served its lifetime.
pub fn rotation_due(created_at_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(created_at_ms) >= HYBRID_KEY_LIFETIME_MS
}

/// Creation time of a replacement key: now, but always after the key it replaces, so peers that
/// know the old key accept the new one even if our clock went backwards.
pub fn next_created_at(previous_ms: u64, now_ms: u64) -> u64 {
    now_ms.max(previous_ms.saturating_add(1))
}

/// Erases retired secrets past [`RETIRED_KEY_KEEP_MS`], and the oldest beyond
/// [`MAX_RETIRED_KEYS`]. Returns how many were erased (dropping one zeroizes it).
///
/// With `keep_newest` (our current key is not published yet), the newest retired secret stays
/// whatever its age: the server still hands out its public half, and while the server refuses
/// the new one (a clock too far off, say) senders go on sealing to it. Erased, everything they
/// sealed to us became unreadable (a review).
pub fn purge_retired(retired: &mut Vec<RetiredHybridKey>, now_ms: u64, keep_newest: bool) -> usize {
    let before = retired.len();
    retired.sort_by_key(|r| std::cmp::Reverse(r.retired_at_ms));
    let mut first = keep_newest;
    // Newest first: `first` keeps the newest one when asked to.
    retired.retain(|r| {
        std::mem::take(&mut first) || now_ms.saturating_sub(r.retired_at_ms) < RETIRED_KEY_KEEP_MS
    });
    retired.truncate(MAX_RETIRED_KEYS);
    before - retired.len()
}

/// What `qpq keys show` prints about our envelope key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeKeyInfo {
    /// `sha256:` and the first 16 hex digits of the SHA-256 of the public key.
    pub fingerprint: String,
    /// When it was made, by our clock.
    pub created_at_ms: u64,
    pub age_ms: u64,
    pub published: bool,
    /// Replaced secrets still kept.
    pub retired: usize,
}

// ----- the messenger's side -----

impl Messenger {
    /// Our envelope key, for display.
    pub fn envelope_key(&self) -> EnvelopeKeyInfo {
        let state = &self.home.state;
        EnvelopeKeyInfo {
            // Invariant: the fingerprint is a 32-byte SHA-256 digest; 8 of its bytes are shown.
            fingerprint: format!(
                "sha256:{}",
                hex::encode(&self.own_hybrid().public_key().fingerprint()[..8])
            ),
            created_at_ms: state.hybrid_created_at_ms,
            age_ms: self.clock.now_ms().saturating_sub(state.hybrid_created_at_ms),
            published: state.hybrid_published,
            retired: state.secrets.retired_hybrid.len(),
        }
    }

    /// Our current hybrid secret key.
    pub(crate) fn own_hybrid(&self) -> HybridSecretKey {
        HybridSecretKey::from_seed(self.home.state.secrets.hybrid_seed)
    }

    /// Our current hybrid key, signed with its creation time, as the server should hold it.
    pub(crate) fn own_signed_hybrid(&self) -> SignedHybridKey {
        SignedHybridKey::sign(
            self.identity.signing_key(),
            self.home.state.hybrid_created_at_ms,
            &self.own_hybrid(),
        )
    }

    /// Opens an envelope with the key its header names: our current key, or a retired one (a
    /// sender may have sealed to our previous key before it looked the new one up). At most one
    /// decapsulation, whatever the envelope holds.
    pub(crate) fn open_envelope(&self, envelope: &[u8]) -> Result<Vec<u8>, HybridError> {
        let me = self.identity.public().0;
        let current = hybrid::open(&me, &self.own_hybrid(), envelope);
        let Err(HybridError::OtherKey) = current else { return current };
        let named = hybrid::envelope_key_id(envelope);
        match self.home.state.secrets.retired_hybrid.iter().find(|r| Some(r.key_id) == named) {
            Some(retired) => hybrid::open(&me, &HybridSecretKey::from_seed(retired.seed), envelope),
            None => current,
        }
    }

    /// Opens a payload sealed once for several recipients ([`crate::crypto::sealmany`]) with our
    /// current or a retired hybrid key.
    pub(crate) fn open_sealed_many(&self, data: &[u8]) -> Result<Vec<u8>, SealManyError> {
        let mut own_ids = vec![self.own_hybrid().public_key().key_id()];
        own_ids.extend(self.home.state.secrets.retired_hybrid.iter().map(|r| r.key_id));
        sealmany::open(data, &own_ids, |stanza| self.open_envelope(stanza))
    }

    /// Replaces our hybrid key now: the new secret (and the old one, retired) is durable before
    /// the server gets the new public key. If an earlier replacement has not reached the server
    /// yet, that one is published instead of making another (so at most one key is ever
    /// unpublished, and the first retired key is always the one the server handed out last).
    /// Returns the new key's creation time.
    pub async fn rotate_hybrid_key(&mut self) -> Result<u64, ClientError> {
        let _op = self.begin()?;
        if self.home.state.hybrid_published {
            self.replace_hybrid_key(self.clock.now_ms())?;
        }
        self.publish_hybrid_key().await?;
        Ok(self.home.state.hybrid_created_at_ms)
    }

    /// Per-round upkeep: erase expired retired keys, rotate when due, publish an unpublished key.
    /// Call with the home lock held.
    pub(crate) async fn maintain_hybrid_key(&mut self) -> Result<(), ClientError> {
        let _op = self.begin()?;
        let now = self.clock.now_ms();
        let unpublished = !self.home.state.hybrid_published;
        if purge_retired(&mut self.home.state.secrets.retired_hybrid, now, unpublished) > 0 {
            self.home.save()?;
        }
        let due =
            !self.home.state.hybrid_published || rotation_due(self.home.state.hybrid_created_at_ms, now);
        // After the server refused our keys for itself, the next upload waits, like a
        // KeyPackage upload's (see `client::keypool`).
        if !due || self.key_uploads_waiting() {
            return Ok(());
        }
        // A key the server does not have yet is published before any further rotation, so a
        // run of failed uploads cannot rotate the key the server still hands out into erasure.
        if self.home.state.hybrid_published {
            self.replace_hybrid_key(now)?;
        }
        let published = self.publish_hybrid_key().await;
        if let Err(ClientError::Session(e)) = &published
            && e.asks_to_wait()
        {
            self.home.state.key_upload_backoff.refused(now / 1000, e.retry_hint_secs());
            self.home.save()?;
        } else if published.is_ok() && self.home.state.key_upload_backoff.refusals > 0 {
            self.home.state.key_upload_backoff = Default::default();
            self.home.save()?;
        }
        published
    }

    /// Makes a fresh key current and retires the old one, durably; not yet published.
    fn replace_hybrid_key(&mut self, now: u64) -> Result<(), ClientError> {
        let fresh = HybridSecretKey::generate();
        let state = &mut self.home.state;
        let old_key_id = HybridSecretKey::from_seed(state.secrets.hybrid_seed).public_key().key_id();
        let old =
            RetiredHybridKey { seed: state.secrets.hybrid_seed, key_id: old_key_id, retired_at_ms: now };
        // A new vector rather than an insert, and the old buffer wiped whole, so growing the
        // list leaves no copy of a seed in freed memory.
        let mut retired = Vec::with_capacity(state.secrets.retired_hybrid.len() + 1);
        retired.push(old);
        retired.append(&mut state.secrets.retired_hybrid);
        state.secrets.retired_hybrid.zeroize();
        state.secrets.retired_hybrid = retired;
        // The key just retired is the newest, and young: nothing to protect.
        purge_retired(&mut state.secrets.retired_hybrid, now, false);
        state.secrets.hybrid_seed = *fresh.seed();
        state.hybrid_created_at_ms = next_created_at(state.hybrid_created_at_ms, now);
        state.hybrid_published = false;
        self.home.save()?;
        Ok(())
    }

    /// Uploads our current signed hybrid key and records that the server has it.
    pub(crate) async fn publish_hybrid_key(&mut self) -> Result<(), ClientError> {
        let _op = self.begin()?;
        let signed = self.own_signed_hybrid();
        self.session()?.upload_hybrid_key(&signed).await?;
        let state = &mut self.home.state;
        if !state.hybrid_published {
            state.hybrid_published = true;
            // Senders start sealing to the new key only now, so the previous key's keep time
            // starts now too, not at the (maybe much earlier) rotation.
            if let Some(previous) = state.secrets.retired_hybrid.first_mut() {
                previous.retired_at_ms = previous.retired_at_ms.max(self.clock.now_ms());
            }
            self.home.save()?;
        }
        Ok(())
    }

    /// The verified hybrid key of `who`: our copy while it is fresh, else looked up, verified
    /// and checked against rollback. If the server has no key for `who` (say, its database was
    /// replaced) a copy we verified earlier is still used.
    pub(crate) async fn hybrid_key_of(&mut self, who: &[u8; 32]) -> Result<HybridPublicKey, ClientError> {
        if *who == self.identity.public().0 {
            return Ok(self.own_hybrid().public_key());
        }
        let now = self.clock.now_ms();
        let known = self.home.state.hybrid_keys.get(who).cloned();
        let known_key = known.as_ref().and_then(|k| HybridPublicKey::from_bytes(&k.key).ok());
        if let (Some(k), Some(key)) = (&known, &known_key)
            && k.is_fresh(now)
        {
            return Ok(key.clone());
        }
        let fetched = match self.anonymous().await?.fetch_hybrid_key(who).await {
            Ok(f) => f,
            Err(e) if e.code() == Some(ErrorCode::NoHybridKey) => {
                return known_key.ok_or_else(|| ClientError::NoKeyPackages { who: self.display_name(who) });
            }
            Err(e) => return Err(e.into()),
        };
        let reject = |reason: String| ClientError::HybridKey { who: self.display_name(who), reason };
        let verified = fetched.verify(who).map_err(|e| reject(e.to_string()))?;
        check_not_rolled_back(known.as_ref(), &fetched).map_err(|e| reject(e.to_string()))?;
        let entry =
            PeerHybridKey { key: fetched.key, created_at_ms: fetched.created_at_ms, fetched_at_ms: now };
        // Saved at once: the next process must compare with this key, or an older one served
        // later would pass as new.
        let _op = self.begin()?;
        self.home.state.hybrid_keys.insert(*who, entry);
        self.persist()?;
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_764_000_000_000;

    fn signed(key: &[u8], created_at_ms: u64) -> SignedHybridKey {
        SignedHybridKey { key: key.to_vec(), signature: vec![0; 64], created_at_ms }
    }

    fn known(key: &[u8], created_at_ms: u64) -> PeerHybridKey {
        PeerHybridKey { key: key.to_vec(), created_at_ms, fetched_at_ms: T0 }
    }

    #[test]
    fn a_replayed_older_key_is_refused_and_a_newer_one_accepted() {
        let k = known(b"current", T0);
        assert_eq!(check_not_rolled_back(Some(&k), &signed(b"old", T0 - 1)), Err(Rollback::Older));
        assert_eq!(check_not_rolled_back(Some(&k), &signed(b"other", T0)), Err(Rollback::Conflicting));
        assert_eq!(check_not_rolled_back(Some(&k), &signed(b"current", T0)), Ok(()));
        assert_eq!(check_not_rolled_back(Some(&k), &signed(b"next", T0 + 1)), Ok(()));
        assert_eq!(check_not_rolled_back(None, &signed(b"any", 0)), Ok(()), "nothing known: first use");
    }

    #[test]
    fn a_peer_key_is_looked_up_again_after_a_day() {
        let k = known(b"k", T0);
        assert!(k.is_fresh(T0));
        assert!(k.is_fresh(T0 + PEER_KEY_REFRESH_MS - 1));
        assert!(!k.is_fresh(T0 + PEER_KEY_REFRESH_MS));
        assert!(k.is_fresh(T0 - 5_000), "a clock that went back does not force lookups");
    }

    #[test]
    fn our_key_rotates_weekly_and_a_new_one_is_always_newer() {
        assert!(!rotation_due(T0, T0 + HYBRID_KEY_LIFETIME_MS - 1));
        assert!(rotation_due(T0, T0 + HYBRID_KEY_LIFETIME_MS));
        assert!(!rotation_due(T0, T0 - 1), "a clock that went back does not rotate");
        assert_eq!(next_created_at(T0, T0 + 10), T0 + 10);
        assert_eq!(next_created_at(T0, T0 - 10), T0 + 1, "after the old key even if the clock went back");
        assert_eq!(next_created_at(u64::MAX, 0), u64::MAX);
    }

    #[test]
    fn retired_secrets_are_erased_after_their_keep_time_or_beyond_the_cap() {
        let r = |age_ms: u64| RetiredHybridKey {
            seed: [age_ms as u8; 32],
            key_id: [0; 4],
            retired_at_ms: T0 - age_ms,
        };
        let mut retired = vec![r(RETIRED_KEY_KEEP_MS), r(1), r(RETIRED_KEY_KEEP_MS - 1)];
        assert_eq!(purge_retired(&mut retired, T0, false), 1);
        let ages: Vec<u64> = retired.iter().map(|k| T0 - k.retired_at_ms).collect();
        assert_eq!(ages, vec![1, RETIRED_KEY_KEEP_MS - 1], "newest first, the expired one gone");

        // While our new key is not published, the newest retired one is what senders use.
        let mut old = vec![r(RETIRED_KEY_KEEP_MS + 1), r(RETIRED_KEY_KEEP_MS + 5)];
        assert_eq!(purge_retired(&mut old, T0, true), 1);
        assert_eq!(
            old.iter().map(|k| T0 - k.retired_at_ms).collect::<Vec<_>>(),
            vec![RETIRED_KEY_KEEP_MS + 1]
        );
        assert_eq!(purge_retired(&mut old, T0, false), 1, "once published, it goes");

        let mut many: Vec<RetiredHybridKey> = (0..MAX_RETIRED_KEYS as u64 + 3).map(|i| r(i * 1000)).collect();
        assert_eq!(purge_retired(&mut many, T0, false), 3);
        assert_eq!(many.len(), MAX_RETIRED_KEYS);
        assert!(
            many.iter().all(|k| T0 - k.retired_at_ms < MAX_RETIRED_KEYS as u64 * 1000),
            "the oldest went"
        );
    }
}
