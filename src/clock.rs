//! Time as an input: every decision about a lifetime (KeyPackages, envelope keys, message TTLs,
//! requests, rate limits) reads a [`Clock`] instead of the system clock, so tests can move time.
//!
//! A `Clock` is the system clock plus a signed offset that tests may change while the program
//! runs ([`Clock::advance`], [`Clock::set_offset_ms`]); clones share the offset. It also
//! counts the time that really passed ([`Clock::elapsed_ms`], monotonic), which
//! [`Clock::advance`] moves too (time passing) and [`Clock::step_ms`] and
//! [`Clock::set_offset_ms`] do not (the wall clock set to another time): what deletes by age
//! tells the two apart (see [`DeletionClock`]). The binary takes
//! its starting offset from `QPQ_TEST_CLOCK_OFFSET_SECS` (tests only: it moves what this program
//! believes the time is, nothing else).
//!
//! Note: openmls checks KeyPackage and leaf lifetimes against the real system clock internally;
//! qpq's own checks (which package the server hands out, when a client replaces its packages)
//! read this clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Environment variable that sets the binary's starting clock offset, in seconds (may be
/// negative). For tests.
pub const OFFSET_ENV: &str = "QPQ_TEST_CLOCK_OFFSET_SECS";

/// The system clock shifted by a shared, adjustable offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
    /// What [`Clock::advance`] added to the monotonic time.
    passed_ms: Arc<AtomicI64>,
}

/// The start of [`Clock::elapsed_ms`]'s count: the first reading in this process.
static MONOTONIC_START: OnceLock<Instant> = OnceLock::new();

impl Clock {
    /// The real system clock (offset 0).
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock `offset_ms` away from the system clock.
    pub fn with_offset_ms(offset_ms: i64) -> Clock {
        Clock { offset_ms: Arc::new(AtomicI64::new(offset_ms)), passed_ms: Arc::default() }
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

    /// Milliseconds of time that really passed since some fixed moment of this process (a
    /// monotonic count, plus what [`Clock::advance`] added): unlike [`Clock::now_ms`], never
    /// moved by the wall clock being set.
    pub fn elapsed_ms(&self) -> u64 {
        let start = MONOTONIC_START.get_or_init(Instant::now);
        let real = i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX);
        u64::try_from(real.saturating_add(self.passed_ms.load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// Lets `ms` pass for this clock (and every clone of it): the time moves forward by `ms`
    /// (backward when negative), and so does [`Clock::elapsed_ms`].
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
        self.passed_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Sets the wall time `ms` ahead (behind when negative) with no time passing: a system
    /// clock stepped by a bad time source or an operator.
    pub fn step_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Sets the offset from the system clock (a step: no time passes).
    pub fn set_offset_ms(&self, ms: i64) {
        self.offset_ms.store(ms, Ordering::Relaxed);
    }
}

/// The time to delete by age by (messages past the TTL, keys past their lifetime): the clock's
/// time, but never running ahead of the time that really passed by more than it makes up at
/// twice real speed.
///
/// Why: a server deletes every message older than the TTL (30 days) and every key past its
/// lifetime by the wall clock. A clock stepped forward by a month (a bad NTP source, a VM
/// restored with a wrong clock, an operator's typo) made the next sweep delete all queued mail,
/// acknowledged and durable, for good. Now a step forward is taken in over as much real time as
/// it skipped, so an operator has that long to notice (the server warns) and fix the clock. A
/// step back is followed at once: it deletes less. Fetches hide expired mail by this time too,
/// so mail stays visible until it is really deleted, and KeyPackage takes delete by it.
///
/// A step made while the program was not running (a VPS booted with a bad hardware clock, a VM
/// restored from a snapshot) is seen through the store: each sweep records the time it deleted
/// by and the wall clock's reading then (a [`DeletionMark`]), and a restarted server starts past
/// that time by no more than the wall clock moved since, and at most [`RESTART_GRACE_MS`]
/// ([`DeletionClock::resuming`]). So a server that was down for an hour takes the hour in at
/// once, and one that comes back a month ahead takes the month in at twice real speed, as if
/// the step had happened while it ran; restarting it again and again does not add a day each
/// time, since its clock moved only as much as time passed.
///
/// Left as is: once a step was taken in whole (the clock was left wrong for as long as it
/// skipped), the mark is ahead of the real time, and a mark is never lowered; setting the
/// clock right then deletes less, and a later step while stopped is bounded by that mark.
#[derive(Debug)]
pub struct DeletionClock {
    clock: Clock,
    /// The time last handed out (ms since the epoch), and [`Clock::elapsed_ms`] then.
    last: std::sync::Mutex<(u64, u64)>,
}

/// A step forward of the wall clock smaller than this is taken in without a warning.
pub const QUIET_STEP_MS: u64 = 60_000;

/// How far past the store's deletion mark a restarted server's deletion time may start: time
/// a server may be down (plus the sweep interval the mark lags by) and take in at once. A
/// clock that came back stepped ahead deletes at most this much early. One day: an upgrade or
/// a reboot is minutes, and a day early is little against a 30-day message TTL and keys of
/// weeks; what this guards against is a month or a year.
pub const RESTART_GRACE_MS: u64 = 24 * 3600 * 1000;

/// What a sweep records in the store (ms since the epoch): the time it deleted by, and the
/// wall clock's reading at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletionMark {
    pub at: u64,
    pub wall: u64,
}

impl DeletionClock {
    /// Starts at `clock`'s time now.
    pub fn new(clock: Clock) -> DeletionClock {
        DeletionClock::resuming(clock, None)
    }

    /// Starts at `clock`'s time now, but past `mark` (what the store's sweeps last recorded,
    /// None for a new store) by no more than the clock moved since, and at most
    /// [`RESTART_GRACE_MS`].
    pub fn resuming(clock: Clock, mark: Option<DeletionMark>) -> DeletionClock {
        let start = resume_time(clock.now_ms(), mark);
        let last = std::sync::Mutex::new((start, clock.elapsed_ms()));
        DeletionClock { clock, last }
    }

    /// The time to delete by now, and how far (ms) the clock is ahead of it (0 when it is not;
    /// more than [`QUIET_STEP_MS`] is worth a warning).
    pub fn now(&self) -> (u64, u64) {
        let (wall, elapsed) = (self.clock.now_ms(), self.clock.elapsed_ms());
        // A poisoned lock (a panic elsewhere while it was held) still holds a valid reading.
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (now, ahead) = deletion_time(*last, wall, elapsed);
        *last = (now, elapsed);
        (now, ahead)
    }
}

/// [`DeletionClock::resuming`]'s rule: where deletion time starts, the wall clock reading `wall`
/// and the store's deletion mark `mark`.
fn resume_time(wall: u64, mark: Option<DeletionMark>) -> u64 {
    mark.map_or(wall, |m| {
        let moved = wall.saturating_sub(m.wall).min(RESTART_GRACE_MS);
        wall.min(m.at.saturating_add(moved))
    })
}

/// [`DeletionClock::now`]'s rule: from the time `last` handed out at elapsed reading `last.1`,
/// the wall clock reading `wall` at elapsed reading `elapsed`: (time to delete by, ahead).
fn deletion_time(last: (u64, u64), wall: u64, elapsed: u64) -> (u64, u64) {
    let passed = elapsed.saturating_sub(last.1);
    let allowed = last.0.saturating_add(passed.saturating_mul(2));
    let now = wall.min(allowed);
    (now, wall - now)
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

    #[test]
    fn advance_lets_time_pass_and_a_step_does_not() {
        let clock = Clock::system();
        let (wall, elapsed) = (clock.now_ms(), clock.elapsed_ms());
        clock.advance(3_600_000);
        assert!(clock.elapsed_ms() >= elapsed + 3_600_000);
        clock.step_ms(30 * 24 * 3_600_000);
        assert!(clock.now_ms() >= wall + 30 * 24 * 3_600_000 + 3_600_000);
        assert!(clock.elapsed_ms() < elapsed + 2 * 3_600_000, "a step is no time passing");
    }

    const MIN: u64 = 60_000;
    const DAY: u64 = 24 * 60 * MIN;

    #[test]
    fn a_step_forward_is_taken_in_over_as_much_real_time_as_it_skipped() {
        let wall0 = 1_800_000_000_000;
        let mut last = (wall0, 0);
        let mut read = |wall: u64, elapsed: u64| {
            let (now, ahead) = deletion_time(last, wall, elapsed);
            last = (now, elapsed);
            (now, ahead)
        };
        // Ten minutes of normal time: the clock as it reads.
        assert_eq!(read(wall0 + 10 * MIN, 10 * MIN), (wall0 + 10 * MIN, 0));
        // The clock steps a month ahead: deletion time goes on twenty minutes per ten.
        let stepped = |min: u64| wall0 + 30 * DAY + min * MIN;
        assert_eq!(read(stepped(20), 20 * MIN), (wall0 + 30 * MIN, 30 * DAY - 10 * MIN));
        assert_eq!(read(stepped(30), 30 * MIN).0, wall0 + 50 * MIN);
        // Set right again (back): followed at once; nothing was deleted by the month.
        assert_eq!(read(wall0 + 40 * MIN, 40 * MIN), (wall0 + 40 * MIN, 0));
        // No time passed (two readings at once): deletion time stands still.
        assert_eq!(read(wall0 + 41 * MIN, 40 * MIN), (wall0 + 40 * MIN, MIN));
        // A step forward left alone is caught up after as much real time as it skipped.
        let (step, mut minutes) = (2 * DAY, 40);
        loop {
            minutes += 10;
            let (now, ahead) = read(wall0 + step + minutes * MIN, minutes * MIN);
            assert!(now <= wall0 + step + minutes * MIN);
            if ahead == 0 {
                break;
            }
        }
        assert!(minutes * MIN <= 40 * MIN + step, "caught up within two days of real time");
    }

    #[test]
    fn a_restart_takes_in_a_day_past_the_mark_at_once_and_the_rest_at_twice_real_speed() {
        let t = 1_800_000_000_000;
        let mark = Some(DeletionMark { at: t, wall: t });
        // A new store, or a clock behind its mark (set back while down): the clock as it reads.
        assert_eq!(resume_time(t, None), t);
        assert_eq!(resume_time(t - DAY, mark), t - DAY);
        // Down for an hour: taken in at once.
        assert_eq!(resume_time(t + 60 * MIN, mark), t + 60 * MIN);
        // Back a month ahead: a day at once, then the rest as for a step while running.
        let wall = t + 30 * DAY;
        let start = resume_time(wall, mark);
        assert_eq!(start, t + DAY);
        let (now, ahead) = deletion_time((start, 0), wall + 10 * MIN, 10 * MIN);
        assert_eq!((now, ahead), (t + DAY + 20 * MIN, 29 * DAY - 10 * MIN));
        // Restarted ten minutes later, its first sweep having recorded (now, that wall time):
        // the ten minutes, not another day.
        let again = Some(DeletionMark { at: now, wall: wall + 10 * MIN });
        assert_eq!(resume_time(wall + 20 * MIN, again), now + 10 * MIN);
    }

    #[test]
    fn a_deletion_clock_resuming_from_a_mark_resists_a_step_made_while_stopped() {
        let clock = Clock::system();
        let mark = Some(DeletionMark { at: clock.now_ms(), wall: clock.now_ms() });
        clock.step_ms(40 * DAY as i64);
        let (now, ahead) = DeletionClock::resuming(clock.clone(), mark).now();
        let at = mark.map_or(0, |m| m.at);
        assert!(now <= at + DAY + 60_000 && ahead >= 39 * DAY - 60_000, "{now} {ahead}");
        let (now, ahead) = DeletionClock::new(clock.clone()).now();
        assert!(now + 60_000 >= clock.now_ms() && ahead < 60_000, "no mark: the clock as it reads");
    }

    #[test]
    fn a_deletion_clock_follows_advance_and_resists_a_step() {
        let clock = Clock::system();
        let deletion = DeletionClock::new(clock.clone());
        clock.advance(31 * DAY as i64);
        let (now, ahead) = deletion.now();
        assert!(ahead == 0 && now >= clock.now_ms() - 1_000, "time that passed is followed");
        clock.step_ms(31 * DAY as i64);
        let (now, ahead) = deletion.now();
        assert!(ahead > 30 * DAY && now + 30 * DAY < clock.now_ms(), "a step is not: {ahead}");
    }
}
