//! Log lines about repeated events, at most one per interval: the next line that is written
//! counts the ones left out since the last.
//!
//! Why: some events come in floods that say nothing new after the first. A connection flood
//! refused at the door, or a database outage, during which every client's retry fails a call
//! and the node's listen and wake-up connections retry every second: one `error` line per
//! failed call was about 1 GB of log an hour with 10,000 clients retrying. A throttle keeps the
//! first line of a flood (so an outage is seen at once) and a count of the rest.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of log line, owned by the one task that writes it.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> LogThrottle {
        LogThrottle { interval, last: None, suppressed: 0 }
    }

    /// Some(events not logged since the last line) when this one may be logged, else None (and
    /// it is counted).
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A [`LogThrottle`] for a line written from many threads (a `static` next to it: the log is
/// the process's, whichever connection or worker thread writes to it).
#[derive(Debug)]
pub struct SharedLogThrottle(Mutex<LogThrottle>);

impl SharedLogThrottle {
    pub const fn new(interval: Duration) -> SharedLogThrottle {
        SharedLogThrottle(Mutex::new(LogThrottle::new(interval)))
    }

    /// As [`LogThrottle::note`].
    pub fn note(&self, now: Instant) -> Option<u64> {
        // The state stays consistent even if a holder panicked: `note` updates it in one step.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).note(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_one_line_per_interval_and_counts_the_rest() {
        let mut log = LogThrottle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(0), "the first of a flood is logged at once");
        for _ in 0..1962 {
            assert_eq!(log.note(t0 + Duration::from_millis(999)), None);
        }
        let later = t0 + Duration::from_secs(1);
        assert_eq!(log.note(later), Some(1962), "the next line counts what went unlogged");
        assert_eq!(log.note(later), None);
        assert_eq!(log.note(later + Duration::from_secs(60)), Some(1), "and starts counting again");
    }

    #[test]
    fn a_shared_throttle_logs_one_line_per_interval_from_many_threads() {
        static LOG: SharedLogThrottle = SharedLogThrottle::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        let logged: u64 = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..1000).filter(|_| LOG.note(t0).is_some()).count() as u64))
                .collect();
            threads.into_iter().map(|t| t.join().expect("no panic")).sum()
        });
        assert_eq!(logged, 1, "8,000 failed calls, one line");
        assert_eq!(LOG.note(t0 + Duration::from_secs(3600)), Some(7999));
    }
}
