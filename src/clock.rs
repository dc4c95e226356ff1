//! Time as an input: every decision about a lifetime (KeyPackages, envelope keys, message TTLs,
//! requests, rate limits) reads a [`Clock`] instead of the system clock, so tests can move time.
//!
//! A `Clock` is the system clock plus a signed offset that tests may change while the program
//! runs ([`Clock::advance`], [`Clock::set_offset_ms`]); clones share the offset. The binary takes
//! its starting offset from `QPQ_TEST_CLOCK_OFFSET_SECS` (tests only: it moves what this program
//! believes the time is, nothing else).
//!
//! Note: openmls checks KeyPackage and leaf lifetimes against the real system clock internally;
//! qpq's own checks (which package the server hands out, when a client replaces its packages)
//! read this clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable that sets the binary's starting clock offset, in seconds (may be
/// negative). For tests.
pub const OFFSET_ENV: &str = "QPQ_TEST_CLOCK_OFFSET_SECS";

/// The system clock shifted by a shared, adjustable offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The real system clock (offset 0).
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock `offset_ms` away from the system clock.
    pub fn with_offset_ms(offset_ms: i64) -> Clock {
        Clock { offset_ms: Arc::new(AtomicI64::new(offset_ms)) }
    }

    /// The system clock shifted by [`OFFSET_ENV`] when it is set to a whole number of seconds;
    /// a missing or unparsable value means no shift.
    pub fn from_env() -> Clock {
        let secs = std::env::var(OFFSET_ENV).ok().and_then(|v| v.trim().parse::<i64>().ok()).unwrap_or(0);
        Clock::with_offset_ms(secs.saturating_mul(1000))
    }

    /// Milliseconds since the Unix epoch, as this clock reads now (0 before the epoch).
    pub fn now_ms(&self) -> u64 {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        u64::try_from(real.saturating_add(self.offset_ms.load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// Seconds since the Unix epoch, as this clock reads now.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Moves this clock (and every clone of it) forward by `ms` (backward when negative).
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Sets the offset from the system clock.
    pub fn set_offset_ms(&self, ms: i64) {
        self.offset_ms.store(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_offset_and_advance_moves_time() {
        let clock = Clock::system();
        let other = clock.clone();
        let before = other.now_ms();
        clock.advance(365 * 24 * 3600 * 1000);
        let after = other.now_ms();
        assert!(after >= before + 365 * 24 * 3600 * 1000, "{before} -> {after}");
        clock.set_offset_ms(-1000 * 3600);
        assert!(other.now_ms() < before, "a negative offset moves the clock back");
    }
}
