//! The shell's view of its connection, so that a server going away is reported once, retried
//! with a capped exponential backoff while the line editor stays usable, and its return is
//! announced. Pure state: the core loop does the I/O and asks this when to try again.

use std::time::Duration;

use tokio::time::Instant;

/// First wait after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts: a server that comes back is noticed within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Connection state as the shell reports it.
#[derive(Debug)]
pub struct Link {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No receive has finished yet.
    Starting,
    Online,
    /// The last attempt failed; the next one is due at `next`.
    Offline {
        backoff: Duration,
        next: Instant,
    },
}

/// What changed, for the one line the shell prints about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing worth saying.
    Same,
    /// Went down: say so once.
    Lost,
    /// The first attempt of the session failed: say so once.
    Unreachable,
    /// Came back after being down.
    Back,
}

impl Default for Link {
    fn default() -> Self {
        Link { state: State::Starting }
    }
}

impl Link {
    /// When the next receive may start (now unless backing off).
    pub fn next_attempt(&self, now: Instant) -> Instant {
        match self.state {
            State::Offline { next, .. } => next,
            _ => now,
        }
    }

    /// True until the first receive of the session finished.
    pub fn is_starting(&self) -> bool {
        self.state == State::Starting
    }

    pub fn is_offline(&self) -> bool {
        matches!(self.state, State::Offline { .. })
    }

    /// A receive succeeded.
    pub fn succeeded(&mut self) -> Change {
        let was = std::mem::replace(&mut self.state, State::Online);
        if matches!(was, State::Offline { .. }) { Change::Back } else { Change::Same }
    }

    /// A receive failed at `now`: wait longer before the next one.
    pub fn failed(&mut self, now: Instant) -> Change {
        let (backoff, change) = match self.state {
            State::Offline { backoff, .. } => ((backoff * 2).min(MAX_BACKOFF), Change::Same),
            State::Online => (FIRST_BACKOFF, Change::Lost),
            State::Starting => (FIRST_BACKOFF, Change::Unreachable),
        };
        self.state = State::Offline { backoff, next: now + backoff };
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_server_is_reported_once_and_retried_with_capped_backoff() {
        let now = Instant::now();
        let mut link = Link::default();
        assert!(link.is_starting());
        assert_eq!(link.next_attempt(now), now);
        assert_eq!(link.failed(now), Change::Unreachable);
        let mut waits = vec![link.next_attempt(now) - now];
        for _ in 0..6 {
            assert_eq!(link.failed(now), Change::Same);
            waits.push(link.next_attempt(now) - now);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10, 10]);
        assert!(link.is_offline());
        assert_eq!(link.succeeded(), Change::Back);
        assert_eq!(link.succeeded(), Change::Same);
        assert!(!link.is_offline());
        assert_eq!(link.next_attempt(now), now);
        assert_eq!(link.failed(now), Change::Lost, "a new outage is reported again");
    }
}
