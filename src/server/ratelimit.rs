//! Rate limits for the calls anyone may make without authenticating (`enqueue`,
//! `enqueueBatch`, `enqueueFanout`, `fetchKeyPackage`): token buckets per connection, per source address (IPv4,
//! or IPv6 /64, as [`super::admission`] counts them) and, for `fetchKeyPackage`, per target
//! key, so nobody drains one person's KeyPackage pool in a burst.
//!
//! A bucket holds up to `burst` tokens and gains `per_sec` a second; a call takes one or is
//! refused with the time until one is there, which the client gets as its retry hint. Time is
//! the server's [`Clock`], so tests move it instead of waiting.
//!
//! Keyed buckets are bounded in number ([`limits::MAX_RATE_LIMITED_KEYS`]): a bucket that has
//! refilled is the same as none and is dropped when room is needed. When every tracked key is
//! still draining, the map does not grow: [`KeyedLimiter::take`] refuses the new key (fail
//! closed: the per-address limits, which a flood of new addresses must not lift), while
//! [`KeyedLimiter::take_n`] and [`KeyedLimiter::charge_n`] let it through unlimited (fail open:
//! the per-target and per-network limits, where refusing would let whoever fills the map refuse
//! everyone else; the per-connection and per-address limits still hold).

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use serde::Deserialize;

use crate::clock::Clock;
use crate::limits;

/// A token bucket's shape: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Tokens gained per second (> 0; may be fractional: 0.2 is one every five seconds).
    pub per_sec: f64,
    /// Most tokens held, so the most calls in a burst (>= 1).
    pub burst: u32,
}

impl Rate {
    /// Why this rate is unusable, if it is.
    pub fn invalid(&self) -> Option<String> {
        if !(self.per_sec.is_finite() && self.per_sec > 0.0) {
            return Some(format!("per_sec must be a number > 0, got {}", self.per_sec));
        }
        (self.burst == 0).then(|| "burst must be >= 1".to_string())
    }
}

/// Every rate limit of the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub enqueue_per_connection: Rate,
    pub enqueue_per_address: Rate,
    pub key_package_per_connection: Rate,
    pub key_package_per_address: Rate,
    pub key_package_per_target: Rate,
    pub lookup_per_connection: Rate,
    pub lookup_per_address: Rate,
    pub key_upload_per_connection: Rate,
    pub key_upload_per_address: Rate,
    /// Bytes, not calls: see [`limits::DEFAULT_KEY_BYTES_RATE_PER_NETWORK`].
    pub key_bytes_per_network: Rate,
    pub enqueue_bytes_per_network: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enqueue_per_connection: limits::DEFAULT_ENQUEUE_RATE_PER_CONNECTION,
            enqueue_per_address: limits::DEFAULT_ENQUEUE_RATE_PER_ADDRESS,
            key_package_per_connection: limits::DEFAULT_KEY_PACKAGE_RATE_PER_CONNECTION,
            key_package_per_address: limits::DEFAULT_KEY_PACKAGE_RATE_PER_ADDRESS,
            key_package_per_target: limits::DEFAULT_KEY_PACKAGE_RATE_PER_TARGET,
            lookup_per_connection: limits::DEFAULT_LOOKUP_RATE_PER_CONNECTION,
            lookup_per_address: limits::DEFAULT_LOOKUP_RATE_PER_ADDRESS,
            key_upload_per_connection: limits::DEFAULT_KEY_UPLOAD_RATE_PER_CONNECTION,
            key_upload_per_address: limits::DEFAULT_KEY_UPLOAD_RATE_PER_ADDRESS,
            key_bytes_per_network: limits::DEFAULT_KEY_BYTES_RATE_PER_NETWORK,
            enqueue_bytes_per_network: limits::DEFAULT_ENQUEUE_BYTES_RATE_PER_NETWORK,
        }
    }
}

impl RateLimits {
    /// Limits no real client reaches (for `qpq bench`, which measures capacity).
    pub fn unlimited() -> RateLimits {
        let r = Rate { per_sec: 1e9, burst: u32::MAX };
        RateLimits {
            enqueue_per_connection: r,
            enqueue_per_address: r,
            key_package_per_connection: r,
            key_package_per_address: r,
            key_package_per_target: r,
            lookup_per_connection: r,
            lookup_per_address: r,
            key_upload_per_connection: r,
            key_upload_per_address: r,
            key_bytes_per_network: r,
            enqueue_bytes_per_network: r,
        }
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket { tokens: f64::from(rate.burst), at_ms: now_ms }
    }

    /// Adds the tokens gained since the bucket was last looked at. A wall clock stepped back
    /// (by more than [`limits::RATE_LIMIT_PRUNE_EVERY_MS`]) counts as no time passed and moves
    /// the stamp back with it: kept at the later time, a drained bucket would not refill until
    /// the clock caught up again (hours, for a big step). A smaller step back is two callers'
    /// readings arriving out of order (each reads the clock before taking the lock): the
    /// stamp stays, so no interval is credited twice.
    fn refill(&mut self, rate: Rate, now_ms: u64) {
        if now_ms < self.at_ms {
            if self.at_ms - now_ms > limits::RATE_LIMIT_PRUNE_EVERY_MS {
                self.at_ms = now_ms;
            }
            return;
        }
        let elapsed_s = (now_ms - self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed_s * rate.per_sec).min(f64::from(rate.burst));
        self.at_ms = now_ms;
    }

    /// Takes one token, or returns the milliseconds until one is there.
    fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        self.refill(rate, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = ((1.0 - self.tokens) / rate.per_sec * 1000.0).ceil();
        // Finite and positive: per_sec > 0 (checked at configuration) and tokens < 1.
        Err((wait_ms as u64).max(1))
    }
}

/// A bucket for one connection (capnp-rpc serves a connection on one thread).
#[derive(Debug)]
pub struct ConnectionBucket {
    rate: Rate,
    bucket: Cell<Bucket>,
}

impl ConnectionBucket {
    pub fn new(rate: Rate, clock: &Clock) -> ConnectionBucket {
        ConnectionBucket { rate, bucket: Cell::new(Bucket::full(rate, clock.now_ms())) }
    }

    pub fn take(&self, clock: &Clock) -> Result<(), u64> {
        let mut b = self.bucket.get();
        let out = b.take(self.rate, clock.now_ms());
        self.bucket.set(b);
        out
    }

    /// Spends `tokens` more, going into debt (which delays the next [`Self::take`]): for a call
    /// whose cost is known only once it has been let in (an upload's package count).
    pub fn charge(&self, tokens: u32, clock: &Clock) {
        let mut b = self.bucket.get();
        b.refill(self.rate, clock.now_ms());
        b.tokens -= f64::from(tokens);
        self.bucket.set(b);
    }
}

/// Buckets per key (a source address, a target identity), shared by every connection.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    state: Mutex<Keyed<K>>,
}

#[derive(Debug)]
struct Keyed<K> {
    buckets: HashMap<K, Bucket>,
    /// When full buckets were last dropped, so a full map is not scanned on every call.
    pruned_at_ms: u64,
}

impl<K: Hash + Eq + Copy> KeyedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> KeyedLimiter<K> {
        KeyedLimiter { rate, max_keys, state: Mutex::new(Keyed { buckets: HashMap::new(), pruned_at_ms: 0 }) }
    }

    /// Takes one token of `key`'s bucket, or returns the milliseconds until one is there.
    pub fn take(&self, key: K, now_ms: u64) -> Result<(), u64> {
        let mut state = self.lock();
        if !self.room_for(&mut state, &key, now_ms) {
            return Err(limits::RATE_LIMIT_PRUNE_EVERY_MS);
        }
        let rate = self.rate;
        state.buckets.entry(key).or_insert_with(|| Bucket::full(rate, now_ms)).take(rate, now_ms)
    }

    /// Whether `key` has a token now, without taking it: Ok for a key without a bucket (it
    /// would start full), else the milliseconds until one is there. With [`Self::charge`], for
    /// a limit that only what actually happened should spend.
    pub fn check(&self, key: K, now_ms: u64) -> Result<(), u64> {
        let mut state = self.lock();
        let rate = self.rate;
        let Some(bucket) = state.buckets.get_mut(&key) else { return Ok(()) };
        bucket.refill(rate, now_ms);
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        let mut probe = *bucket;
        probe.take(rate, now_ms)
    }

    /// Takes `tokens` of `key`'s bucket at once if it holds them all (or, for more than its
    /// burst, if it is full: the take then leaves it in debt), else takes nothing and returns
    /// the milliseconds until it will. Fails open like [`Self::charge_n`].
    pub fn take_n(&self, key: K, now_ms: u64, tokens: u32) -> Result<(), u64> {
        let mut state = self.lock();
        let rate = self.rate;
        if !self.room_for(&mut state, &key, now_ms) {
            return Ok(());
        }
        let bucket = state.buckets.entry(key).or_insert_with(|| Bucket::full(rate, now_ms));
        bucket.refill(rate, now_ms);
        let need = f64::from(tokens.min(rate.burst));
        if bucket.tokens >= need {
            bucket.tokens -= f64::from(tokens);
            return Ok(());
        }
        let wait_ms = ((need - bucket.tokens) / rate.per_sec * 1000.0).ceil();
        // Finite and positive: per_sec > 0 (checked at configuration) and tokens < need.
        Err((wait_ms as u64).max(1))
    }

    /// Spends one token of `key`'s bucket, going into debt if concurrent callers passed
    /// [`Self::check`] together (the debt delays the next ones). A key that finds the map full
    /// and nothing to prune is not limited: failing open here only lifts this one limit, where
    /// failing closed would let whoever fills the map refuse everyone.
    pub fn charge(&self, key: K, now_ms: u64) {
        self.charge_n(key, now_ms, 1);
    }

    /// [`Self::charge`] of `tokens` tokens at once.
    pub fn charge_n(&self, key: K, now_ms: u64, tokens: u32) {
        let mut state = self.lock();
        let rate = self.rate;
        if !self.room_for(&mut state, &key, now_ms) {
            return;
        }
        let bucket = state.buckets.entry(key).or_insert_with(|| Bucket::full(rate, now_ms));
        bucket.refill(rate, now_ms);
        bucket.tokens -= f64::from(tokens);
    }

    /// Gives back `tokens` taken from `key`'s bucket for something that did not happen (up to
    /// its burst); nothing for a key without a bucket.
    pub fn refund(&self, key: K, now_ms: u64, tokens: u32) {
        let mut state = self.lock();
        let rate = self.rate;
        if let Some(bucket) = state.buckets.get_mut(&key) {
            bucket.refill(rate, now_ms);
            bucket.tokens = (bucket.tokens + f64::from(tokens)).min(f64::from(rate.burst));
        }
    }

    /// Whether `key` has a bucket or the map room for one, after dropping the full buckets
    /// (at most once per [`limits::RATE_LIMIT_PRUNE_EVERY_MS`], so a full map is not scanned on
    /// every call).
    fn room_for(&self, state: &mut Keyed<K>, key: &K, now_ms: u64) -> bool {
        if state.buckets.contains_key(key) || state.buckets.len() < self.max_keys {
            return true;
        }
        // A clock stepped back far before the last pruning makes pruning due, not far off; a
        // reading just behind it (callers out of order) does not, or a full map would be
        // scanned on every such call.
        let due = match now_ms.checked_sub(state.pruned_at_ms) {
            Some(since) => since >= limits::RATE_LIMIT_PRUNE_EVERY_MS,
            None => state.pruned_at_ms - now_ms > limits::RATE_LIMIT_PRUNE_EVERY_MS,
        };
        if due {
            let rate = self.rate;
            state.pruned_at_ms = now_ms;
            state.buckets.retain(|_, b| {
                b.refill(rate, now_ms);
                b.tokens < f64::from(rate.burst)
            });
        }
        state.buckets.len() < self.max_keys
    }

    /// Keys with a bucket (for tests).
    pub fn tracked(&self) -> usize {
        self.lock().buckets.len()
    }

    fn lock(&self) -> MutexGuard<'_, Keyed<K>> {
        // Every update is a single step on plain data: the map is consistent even after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate { per_sec: 2.0, burst: 3 };

    #[test]
    fn take_n_takes_all_or_nothing_and_says_when_all_are_there() {
        let l = KeyedLimiter::new(Rate { per_sec: 2.0, burst: 10 }, 10);
        l.take_n(1u8, 0, 7).unwrap();
        assert_eq!(l.take_n(1u8, 0, 4), Err(500), "one more token needed, every 500 ms");
        l.take_n(1u8, 0, 3).unwrap();
        assert_eq!(l.take_n(1u8, 0, 1), Err(500), "the refused take took nothing");
        // More than the burst: a full bucket lets it in, into debt.
        assert_eq!(l.take_n(2u8, 0, 15), Ok(()));
        assert_eq!(l.take_n(2u8, 0, 1), Err(3000));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_when_the_next_token_comes() {
        let l = KeyedLimiter::new(RATE, 10);
        for _ in 0..3 {
            l.take(1u8, 1_000).unwrap();
        }
        assert_eq!(l.take(1u8, 1_000), Err(500), "one token every 500 ms");
        assert_eq!(l.take(1u8, 1_300), Err(200));
        l.take(1u8, 1_500).unwrap();
        l.take(2u8, 1_500).unwrap();
    }

    #[test]
    fn refilled_buckets_make_room_and_draining_ones_are_not_evicted() {
        let l = KeyedLimiter::new(RATE, 2);
        l.take(1u8, 0).unwrap();
        l.take(2u8, 0).unwrap();
        assert!(l.take(3u8, 0).is_err(), "both tracked keys still drain: a third is refused");
        l.take(3u8, 10_000).unwrap();
        assert_eq!(l.tracked(), 1, "refilled buckets were dropped");
    }

    #[test]
    fn checking_spends_nothing_and_a_charge_may_go_into_debt() {
        let l = KeyedLimiter::new(RATE, 1);
        for _ in 0..10 {
            l.check(1u8, 0).unwrap();
        }
        assert_eq!(l.tracked(), 0, "a check creates no bucket");
        for _ in 0..4 {
            l.charge(1u8, 0);
        }
        assert_eq!(l.check(1u8, 0), Err(1000), "one token in debt: two tokens' time");
        l.charge(2u8, 0); // the map is full of a draining key: not limited, not tracked
        l.check(2u8, 0).unwrap();
        assert_eq!(l.tracked(), 1);
        l.check(1u8, 1_000).unwrap();
    }

    #[test]
    fn a_wall_clock_stepped_back_counts_as_no_time_passed_not_as_time_owed() {
        let l = KeyedLimiter::new(RATE, 1);
        for _ in 0..3 {
            l.take(1u8, 10_000_000).unwrap();
        }
        l.take(2u8, 10_000_000).unwrap_err(); // the map is full of a draining key (and pruned)
        // The clock steps back an hour.
        assert!(l.take(1u8, 6_400_000).is_err(), "drained, and the step back refilled nothing");
        l.take(1u8, 6_401_000).unwrap();
        // Key 1 has refilled: the full map can be pruned, not only once the clock is back.
        l.take(2u8, 6_402_000).unwrap();
        assert_eq!(l.tracked(), 1);

        let clock = Clock::system();
        let conn = ConnectionBucket::new(RATE, &clock);
        for _ in 0..3 {
            conn.take(&clock).unwrap();
        }
        clock.advance(-3_600_000);
        conn.take(&clock).unwrap_err();
        clock.advance(1_000);
        conn.take(&clock).unwrap();
    }

    #[test]
    fn bad_rates_are_named() {
        assert!(Rate { per_sec: 0.0, burst: 1 }.invalid().is_some());
        assert!(Rate { per_sec: f64::NAN, burst: 1 }.invalid().is_some());
        assert!(Rate { per_sec: 1.0, burst: 0 }.invalid().is_some());
        assert!(RATE.invalid().is_none());
    }
}
