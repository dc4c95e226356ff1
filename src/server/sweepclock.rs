//! The time the periodic sweep deletes by: the server's clock, but never running ahead of the
//! time that really passed by more than it can make up at twice real speed.
//!
//! Why: the sweep deletes every message older than the TTL (30 days) and every key past its
//! lifetime by the wall clock. A clock stepped forward by a month (a bad NTP source, a VM
//! restored with a wrong clock, an operator's typo) made the next sweep delete all queued mail,
//! acknowledged and durable, for good; the fetches that hide expired mail show it again once
//! the clock is set right, but only if it was not deleted meanwhile. Now a step forward is taken
//! in over as much real time as it skipped (the sweep's clock runs at most twice as fast as the
//! monotonic one), with a warning, so an operator has that long to notice and fix the clock.
//! A step back is followed at once: it deletes less. What this cannot see: a step made while
//! the server was down (it starts from the wall clock as it finds it).

use std::time::Instant;

/// A step forward of the wall clock smaller than this is followed without a warning.
const QUIET_STEP_MS: u64 = 60_000;

pub struct SweepClock {
    /// The time the last sweep used (ms since the epoch) and when, by the monotonic clock.
    last_ms: u64,
    last_at: Instant,
}

impl SweepClock {
    /// Starts at the wall clock's reading `wall_ms`, taken at `at`.
    pub fn new(wall_ms: u64, at: Instant) -> SweepClock {
        SweepClock { last_ms: wall_ms, last_at: at }
    }

    /// The time a sweep starting at `at`, with the wall clock reading `wall_ms`, deletes by, and
    /// how far (ms) the wall clock is ahead of it (0 when it is not).
    pub fn now(&mut self, wall_ms: u64, at: Instant) -> (u64, u64) {
        let passed =
            u64::try_from(at.saturating_duration_since(self.last_at).as_millis()).unwrap_or(u64::MAX);
        let allowed = self.last_ms.saturating_add(passed.saturating_mul(2));
        let now = wall_ms.min(allowed);
        self.last_ms = now;
        self.last_at = at;
        (now, wall_ms - now)
    }

    /// Whether a wall clock `ahead` ms of the sweep's is worth a warning.
    pub fn worth_a_warning(ahead: u64) -> bool {
        ahead > QUIET_STEP_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIN: u64 = 60_000;
    const DAY: u64 = 24 * 60 * MIN;

    #[test]
    fn a_step_forward_is_taken_in_over_as_much_real_time_as_it_skipped() {
        let t0 = Instant::now();
        let wall0 = 1_800_000_000_000;
        let mut clock = SweepClock::new(wall0, t0);
        let at = |min: u64| t0 + Duration::from_millis(min * MIN);
        // Ten minutes of normal time: the wall clock as it reads.
        assert_eq!(clock.now(wall0 + 10 * MIN, at(10)), (wall0 + 10 * MIN, 0));
        // The wall clock steps a month ahead: the sweep goes on twenty minutes per ten.
        let jumped = |min: u64| wall0 + 30 * DAY + min * MIN;
        assert_eq!(clock.now(jumped(20), at(20)), (wall0 + 30 * MIN, 30 * DAY - 10 * MIN));
        assert!(SweepClock::worth_a_warning(30 * DAY - 10 * MIN));
        assert_eq!(clock.now(jumped(30), at(30)).0, wall0 + 50 * MIN);
        // Set right again (back): followed at once; nothing was deleted by the month.
        let (now, ahead) = clock.now(wall0 + 40 * MIN, at(40));
        assert_eq!((now, ahead), (wall0 + 40 * MIN, 0));
        // A step forward left alone is caught up after as much real time as it skipped.
        let mut clock = SweepClock::new(wall0, t0);
        let step = 2 * DAY;
        let mut minutes = 0;
        loop {
            minutes += 10;
            let (now, ahead) = clock.now(wall0 + step + minutes * MIN, at(minutes));
            assert!(now <= wall0 + step + minutes * MIN);
            if ahead == 0 {
                break;
            }
        }
        assert_eq!(minutes * MIN, step, "caught up after two days of real time");
    }

    #[test]
    fn small_steps_and_a_monotonic_clock_that_stood_still_are_safe() {
        let t0 = Instant::now();
        let mut clock = SweepClock::new(1_000 * MIN, t0);
        // The monotonic clock did not move (two sweeps at once): the time does not move either.
        assert_eq!(clock.now(1_001 * MIN, t0), (1_000 * MIN, MIN));
        assert!(!SweepClock::worth_a_warning(MIN));
        // A wall clock behind the last sweep's time: followed.
        assert_eq!(clock.now(999 * MIN, t0 + Duration::from_secs(1)), (999 * MIN, 0));
    }
}
