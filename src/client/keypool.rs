//! Our KeyPackages over their lifetimes: what the server holds for us, when to replace it, and
//! when the private keys of superseded packages are deleted.
//!
//! Every package lives [`limits::KEY_PACKAGE_LIFETIME_SECS`] (63 days) by our clock; the server
//! hands one out only while it has [`limits::key_package_margin_secs`] (31 days at the default
//! message TTL) left, so that the commit adding us stays valid for every member. The policy:
//! - **Replace by age.** In every receive round (and on `qpq keys rotate`) the client uploads a
//!   fresh pool of single-use packages and a new last-resort one once the newest it published
//!   is [`limits::KEY_PACKAGE_REPLACE_AFTER_SECS`] (14 days) old. Older packages the server still
//!   holds stay valid and are handed out first; the server deletes them once they are within the
//!   margin.
//! - **Refill by count.** After a Welcome used one of ours, the pool is topped up to
//!   [`KEY_PACKAGE_POOL`] when fewer than [`KEY_PACKAGE_REFILL_BELOW`] valid ones are left, and
//!   a used last-resort package is replaced.
//! - **Retry a failed upload.** Packages are recorded (their keys durable) before the upload.
//!   If the server refuses it, they are forgotten with their keys, so the next round sees the
//!   pool as the server holds it and tries again; if its outcome is unknown (the connection
//!   dropped), they are kept and the next round publishes a new pool and last-resort package.
//!   A refusal about the server itself (its key storage full, a rate limit, busy; not a
//!   shutdown) is tried again only after a wait ([`UploadBackoff`]): one minute, doubling to an
//!   hour, or the server's hint. One wait covers both kinds of key upload: a success of either
//!   ends it. Without it, every round of a `recv --follow` or a shell (one per message
//!   received) made, stored and uploaded a pool for as long as strangers kept the server full,
//!   each upload a charge on our network's budget. `qpq keys rotate` does not wait. The
//!   envelope key's upkeep waits on the same clock (`client::hybridkeys`).
//! - **Delete superseded keys.** The private keys of a package are kept until its `not_after`
//!   plus [`limits::KEY_PACKAGE_KEY_RETENTION_SECS`] (a Welcome to it may wait that long in a
//!   queue), then deleted from the MLS storage. openmls already deletes a single-use package's
//!   keys when a Welcome uses it; the rest (never used, or last-resort) go by this rule. We
//!   judge by time rather than by asking the server, so a server that lies about what it holds
//!   cannot make us keep or lose keys.
//! - **Hold a bounded number.** At most [`limits::MAX_HELD_KEY_PACKAGES`] packages' keys are
//!   kept; past that the oldest go (but never the current last-resort one). Each refill and each
//!   upload of unknown outcome adds a pool, and a stranger (a drained pool, then a junk Welcome,
//!   every few minutes) or a hostile server (a count of 0, a dropped answer, every round) could
//!   otherwise grow the home by a pool's keys per round for the 93 days each is kept.

use serde::{Deserialize, Serialize};

use crate::client::messenger::{ClientError, KEY_PACKAGE_POOL, KEY_PACKAGE_REFILL_BELOW, Messenger};
use crate::limits;
use crate::mls::{MlsClient, MlsError, NewKeyPackage};

/// One KeyPackage we published and whose private keys we may still hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Its KeyPackageRef (RFC 9420 §5.2).
    pub hash_ref: Vec<u8>,
    /// End of its lifetime (unix seconds, our clock).
    pub not_after: u64,
    pub last_resort: bool,
}

/// When an upload of our keys (KeyPackages, the envelope key) that the server refused for itself
/// may be tried again (kept in the client state, so one-shot commands wait too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadBackoff {
    /// Refusals in a row.
    pub refusals: u32,
    /// Not before this (unix seconds, our clock); 0: no wait.
    pub retry_at: u64,
}

impl UploadBackoff {
    /// Records a refusal at `now`; `hint_secs` is the server's retry hint, if it gave one.
    pub fn refused(&mut self, now: u64, hint_secs: Option<u64>) {
        let doubling = limits::KEY_UPLOAD_RETRY_MIN_SECS.saturating_mul(1 << self.refusals.min(16));
        let wait = doubling.max(hint_secs.unwrap_or(0)).min(limits::KEY_UPLOAD_RETRY_MAX_SECS);
        self.refusals = self.refusals.saturating_add(1);
        self.retry_at = now.saturating_add(wait);
    }

    /// True while an upload should wait. A retry time further ahead than the longest wait was
    /// set by a clock that has since been put back: it is not waited for.
    pub fn waiting(&self, now: u64) -> bool {
        now < self.retry_at && self.retry_at - now <= limits::KEY_UPLOAD_RETRY_MAX_SECS
    }
}

/// The KeyPackages we published, newest last (kept in the client state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPool {
    pub published: Vec<Published>,
}

impl KeyPool {
    /// Remembers packages about to be published.
    pub fn record(&mut self, packages: &[NewKeyPackage], last_resort: bool) {
        self.published.extend(packages.iter().map(|p| Published {
            hash_ref: p.hash_ref.clone(),
            not_after: p.not_after,
            last_resort,
        }));
    }

    /// True when the newest package of that kind is old enough to be replaced (or none exists).
    pub fn replacement_due(&self, last_resort: bool, now: u64) -> bool {
        let newest =
            self.published.iter().filter(|p| p.last_resort == last_resort).map(|p| p.not_after).max();
        match newest {
            None => true,
            Some(not_after) => {
                let made_at = not_after.saturating_sub(limits::KEY_PACKAGE_LIFETIME_SECS);
                now >= made_at.saturating_add(limits::KEY_PACKAGE_REPLACE_AFTER_SECS)
            }
        }
    }

    /// Forgets and returns the oldest packages beyond `max`, never one `keep` names (the
    /// current last-resort package, the ones about to be published: ties in age, or a clock
    /// that went back, must not make them the oldest).
    pub fn take_over(&mut self, max: usize, keep: &[&[u8]]) -> Vec<Published> {
        let excess = self.published.len().saturating_sub(max);
        if excess == 0 {
            return Vec::new();
        }
        let mut order: Vec<usize> = (0..self.published.len()).collect();
        order.sort_by_key(|&i| self.published[i].not_after);
        let doomed: std::collections::HashSet<usize> = order
            .into_iter()
            .filter(|&i| !keep.contains(&&self.published[i].hash_ref[..]))
            .take(excess)
            .collect();
        let (gone, kept) = std::mem::take(&mut self.published)
            .into_iter()
            .enumerate()
            .partition::<Vec<_>, _>(|(i, _)| doomed.contains(i));
        self.published = kept.into_iter().map(|(_, p)| p).collect();
        gone.into_iter().map(|(_, p)| p).collect()
    }

    /// Forgets and returns the packages whose private keys may go as of `now`: past their
    /// `not_after` by the retention margin.
    pub fn take_superseded(&mut self, now: u64) -> Vec<Published> {
        let (gone, kept) = std::mem::take(&mut self.published)
            .into_iter()
            .partition(|p| p.not_after.saturating_add(limits::KEY_PACKAGE_KEY_RETENTION_SECS) <= now);
        self.published = kept;
        gone
    }
}

/// Deletes the private keys of every superseded package; returns how many went.
pub fn delete_superseded(pool: &mut KeyPool, mls: &MlsClient, now: u64) -> Result<usize, MlsError> {
    let gone = pool.take_superseded(now);
    for p in &gone {
        mls.delete_key_package(&p.hash_ref)?;
    }
    Ok(gone.len())
}

impl Messenger {
    /// True when [`Messenger::maintain_key_packages`] has work that needs no server round trip
    /// to discover: a replacement by age or asked for (a used last-resort package, an upload
    /// whose outcome is unknown: the flag outlives the process that set it), or keys to delete.
    pub(crate) fn key_packages_due(&self) -> bool {
        let now = self.mls.now_secs();
        let pool = &self.home.state.key_pool;
        self.home.state.rotate_last_resort
            || pool.replacement_due(false, now)
            || pool.replacement_due(true, now)
            || pool
                .published
                .iter()
                .any(|p| p.not_after.saturating_add(limits::KEY_PACKAGE_KEY_RETENTION_SECS) <= now)
    }

    /// True while our key uploads wait after a refusal ([`UploadBackoff`]).
    pub(crate) fn key_uploads_waiting(&self) -> bool {
        self.home.state.key_upload_backoff.waiting(self.mls.now_secs())
    }

    /// Publishes a fresh KeyPackage pool and last-resort package now (`qpq keys rotate`);
    /// returns how many single-use ones.
    pub async fn rotate_key_packages(&mut self) -> Result<usize, ClientError> {
        self.maintain_key_packages(true).await
    }

    /// Per-round upkeep of our KeyPackages (see the module header). `force` replaces the pool
    /// and the last-resort package whatever their age (`qpq keys rotate`). Returns how many
    /// single-use packages were uploaded.
    pub(crate) async fn maintain_key_packages(&mut self, force: bool) -> Result<usize, ClientError> {
        let _op = self.begin()?;
        let now = self.mls.now_secs();
        if delete_superseded(&mut self.home.state.key_pool, &self.mls, now)? > 0 {
            self.persist()?;
        }
        let pool = &self.home.state.key_pool;
        let replace_pool = force || pool.replacement_due(false, now) || self.home.state.rotate_last_resort;
        let replace_lr = force || pool.replacement_due(true, now) || self.home.state.rotate_last_resort;
        if !(replace_pool || replace_lr || self.kp_check) {
            return Ok(0);
        }
        if !force && self.key_uploads_waiting() {
            // `kp_check` stays: the first round after the wait tries again.
            return Ok(0);
        }
        self.kp_check = false;
        // The server counts only packages still valid by its clock.
        let (count, has_lr) = self.session()?.key_package_count().await?;
        let count = count as usize;
        let room = (limits::MAX_KEY_PACKAGES_PER_IDENTITY as usize).saturating_sub(count);
        let n = if replace_pool {
            KEY_PACKAGE_POOL
        } else if count < KEY_PACKAGE_REFILL_BELOW as usize {
            KEY_PACKAGE_POOL.saturating_sub(count)
        } else {
            0
        }
        .min(room);
        let rotate = replace_lr || !has_lr;
        if n == 0 && !rotate {
            // The server answered: the refusals in a row, if any, are over.
            if self.home.state.key_upload_backoff != UploadBackoff::default() {
                self.home.state.key_upload_backoff = UploadBackoff::default();
                self.home.save()?;
            }
            return Ok(0);
        }
        let kps = self.mls.key_packages(n)?;
        let lr = if rotate { Some(self.mls.last_resort_key_package()?) } else { None };
        let previous_lr = self.home.state.last_resort_ref.clone();
        self.home.state.key_pool.record(&kps, false);
        if let Some(lr) = &lr {
            self.home.state.key_pool.record(std::slice::from_ref(lr), true);
            self.home.state.last_resort_ref = lr.hash_ref.clone();
        }
        let refs: Vec<Vec<u8>> = kps.iter().chain(lr.as_ref()).map(|k| k.hash_ref.clone()).collect();
        let state = &mut self.home.state;
        let keep: Vec<&[u8]> =
            refs.iter().map(Vec::as_slice).chain([state.last_resort_ref.as_slice()]).collect();
        for p in state.key_pool.take_over(limits::MAX_HELD_KEY_PACKAGES, &keep) {
            self.mls.delete_key_package(&p.hash_ref)?;
        }
        // Private keys must be durable before the public halves are published (and recorded, so
        // that they are deleted in time even if we crash before the upload's outcome is known).
        self.persist()?;
        let bytes: Vec<Vec<u8>> = kps.into_iter().map(|k| k.bytes).collect();
        let uploaded =
            self.session()?.upload_key_packages(&bytes, lr.as_ref().map(|l| l.bytes.as_slice())).await;
        if let (Err(e), Some(lr)) = (&uploaded, &lr)
            && is_key_storage_full(e)
            && !bytes.is_empty()
            && self.replace_last_resort_alone(lr, &refs).await?
        {
            // The pool waits for room; our last-resort package, which keeps us invitable, did
            // not (a replacement frees what it takes, so it fits a full key storage).
            self.kp_check = true;
            if let Err(e) = &uploaded {
                self.home.state.key_upload_backoff.refused(now, e.retry_hint_secs());
            }
            self.persist()?;
            // (`uploaded` is the refusal matched above; the fallback never runs.)
            return Err(uploaded.err().map(Into::into).unwrap_or(ClientError::NoServer));
        }
        if let Err(e) = uploaded {
            if e.is_definite_refusal() {
                // The server answered without storing any (a full key storage, a rate limit, a
                // restart): forget them and their keys, so that the next round judges by what the
                // server holds and tries again. Keeping them, as for an unknown outcome, would
                // add a pool of private keys per round for as long as the server stays full.
                self.home.state.key_pool.published.retain(|p| !refs.contains(&p.hash_ref));
                for r in &refs {
                    self.mls.delete_key_package(r)?;
                }
                self.home.state.last_resort_ref = previous_lr;
                if e.asks_to_wait() {
                    self.home.state.key_upload_backoff.refused(now, e.retry_hint_secs());
                }
            } else {
                // They may have reached the server: their keys stay (a Welcome may use them),
                // and the next round replaces the pool and the last-resort package all the same.
                self.home.state.rotate_last_resort = true;
            }
            self.kp_check = true;
            self.persist()?;
            return Err(e.into());
        }
        if rotate {
            self.home.state.rotate_last_resort = false;
        }
        self.home.state.key_upload_backoff = UploadBackoff::default();
        self.home.save()?;
        Ok(n)
    }

    /// After the server refused a pool and a last-resort package for want of key storage:
    /// uploads the last-resort package alone. Strangers can keep a server's key storage full
    /// (two networks' daily key budget fills it), and a last-resort package that was never
    /// replaced expired after 63 days, so nobody could invite us any more. True unless the server
    /// refused it too: the pool's packages (the rest of `refs`) are then forgotten with their keys.
    async fn replace_last_resort_alone(
        &mut self,
        lr: &crate::mls::NewKeyPackage,
        refs: &[Vec<u8>],
    ) -> Result<bool, ClientError> {
        let alone = self.session()?.upload_key_packages(&[], Some(&lr.bytes)).await;
        if alone.as_ref().is_err_and(|e| e.is_definite_refusal()) {
            return Ok(false);
        }
        let pool: Vec<&Vec<u8>> = refs.iter().filter(|r| **r != lr.hash_ref).collect();
        self.home.state.key_pool.published.retain(|p| !pool.contains(&&p.hash_ref));
        for r in pool {
            self.mls.delete_key_package(r)?;
        }
        // An unknown outcome keeps its keys (it may be on the server) and is replaced next round.
        self.home.state.rotate_last_resort = alone.is_err();
        Ok(true)
    }
}

/// The server refused an upload because its key storage is full (`overQuota`).
fn is_key_storage_full(e: &crate::client::session::SessionError) -> bool {
    matches!(e, crate::client::session::SessionError::Rpc(r) if r.code == crate::proto::wire_error::ErrorCode::OverQuota)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600;

    fn made_at(t: u64, last_resort: bool, tag: u8) -> Published {
        Published { hash_ref: vec![tag], not_after: t + limits::KEY_PACKAGE_LIFETIME_SECS, last_resort }
    }

    #[test]
    fn packages_are_replaced_after_two_weeks() {
        let t0 = 1_000_000_000;
        let mut pool = KeyPool::default();
        assert!(pool.replacement_due(false, t0), "nothing published yet");
        pool.published = vec![made_at(t0, false, 1), made_at(t0, true, 2)];
        assert!(!pool.replacement_due(false, t0 + 13 * DAY));
        assert!(!pool.replacement_due(true, t0 + 13 * DAY));
        assert!(pool.replacement_due(false, t0 + 14 * DAY));
        assert!(pool.replacement_due(true, t0 + 14 * DAY));
        // The newest package of each kind decides.
        pool.published.push(made_at(t0 + 10 * DAY, false, 3));
        assert!(!pool.replacement_due(false, t0 + 20 * DAY));
        assert!(pool.replacement_due(true, t0 + 20 * DAY));
    }

    #[test]
    fn keys_are_superseded_only_after_expiry_plus_the_retention_margin() {
        let t0 = 1_000_000_000;
        let mut pool = KeyPool { published: vec![made_at(t0, false, 1), made_at(t0 + 5 * DAY, true, 2)] };
        let expiry = t0 + limits::KEY_PACKAGE_LIFETIME_SECS;
        assert!(pool.take_superseded(expiry).is_empty(), "a welcome may still be on its way");
        let margin = limits::KEY_PACKAGE_KEY_RETENTION_SECS;
        assert!(pool.take_superseded(expiry + margin - 1).is_empty());
        let gone = pool.take_superseded(expiry + margin);
        assert_eq!(gone.iter().map(|p| p.hash_ref.clone()).collect::<Vec<_>>(), vec![vec![1]]);
        assert_eq!(pool.published.len(), 1, "the younger one stays");
    }

    #[test]
    fn refused_uploads_wait_a_minute_doubling_to_an_hour_or_the_servers_hint() {
        let t0 = 1_000_000_000;
        let mut b = UploadBackoff::default();
        assert!(!b.waiting(t0), "no refusal, no wait");
        let mut waits = Vec::new();
        for _ in 0..9 {
            b.refused(t0, None);
            waits.push(b.retry_at - t0);
        }
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert!(b.waiting(t0 + 3599) && !b.waiting(t0 + 3600));

        let mut b = UploadBackoff::default();
        b.refused(t0, Some(600));
        assert_eq!(b.retry_at, t0 + 600, "a longer hint wins");
        b.refused(t0, Some(1_000_000));
        assert_eq!(b.retry_at, t0 + 3600, "but never past the longest wait");
        for _ in 0..100 {
            b.refused(t0, None);
        }
        assert_eq!(b.retry_at, t0 + 3600, "many refusals do not overflow");

        // Set by a clock a day ahead, then put back: not waited for.
        let mut b = UploadBackoff::default();
        b.refused(t0 + 24 * 3600, None);
        assert!(!b.waiting(t0));
        assert!(b.waiting(t0 + 24 * 3600 + 59));
    }

    #[test]
    fn beyond_the_cap_the_oldest_go_but_never_the_current_last_resort() {
        let t0 = 1_000_000_000;
        let mut pool = KeyPool::default();
        pool.published = vec![made_at(t0, true, 1), made_at(t0 + 1, false, 2), made_at(t0 + 3, false, 3)];
        pool.published.push(made_at(t0 + 2, false, 4));
        assert!(pool.take_over(4, &[&[1]]).is_empty(), "within the cap");
        let gone = pool.take_over(2, &[&[1]]);
        assert_eq!(
            gone.iter().map(|p| p.hash_ref[0]).collect::<Vec<_>>(),
            [2, 4],
            "the oldest but the kept one"
        );
        assert_eq!(pool.published.iter().map(|p| p.hash_ref[0]).collect::<Vec<_>>(), [1, 3]);
    }
}
