//! Who may open a connection: a cap on all open connections and one per client IP address.
//!
//! capnp-rpc and quinn cost memory per connection (BENCHMARKS.md: ~50 KiB idle), so the total is
//! capped; the per-IP cap keeps one host (or a botnet's single member) from taking every slot.
//! A QUIC Initial's source address can be forged, so an attacker could fill a victim's per-IP
//! quota, or the whole server, with handshakes that never finish. Once an address holds half its
//! quota, or the server half its total, new connections must first prove they own their address
//! with a QUIC Retry (RFC 9000 section 8.1), which a forger never answers; and a handshake that
//! does not finish within `limits::HANDSHAKE_TIMEOUT_MS` gives its slot back.
//!
//! An IPv6 host usually holds a whole /64 and can pick any address in it, so IPv6 clients are
//! counted per /64 prefix; IPv4 per address (an IPv4-mapped IPv6 address counts as its IPv4).
//!
//! The decision is pure bookkeeping (no I/O): the accept loop asks [`Admission::admit`] and keeps
//! the returned [`Slot`] for as long as the connection lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the accept loop does with an incoming connection.
#[derive(Debug)]
pub enum Decision {
    /// Serve it; the slot frees its place when dropped.
    Admit(Slot),
    /// Ask the client to prove its address first (QUIC Retry), then decide again.
    Validate,
    /// Refuse it, for the reason given (logged).
    Refuse(&'static str),
}

/// Open connections, in all and per client IP address.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Admission> {
        Arc::new(Admission { max_total, max_per_ip, open: Mutex::new(Open::default()) })
    }

    /// Decides on a connection from `ip`; `validated` says whether the client has already proven
    /// that it owns that address (it answered a Retry).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Decision {
        let ip = quota_key(ip);
        let mut open = self.lock();
        let from_ip = open.per_ip.get(&ip).copied().unwrap_or(0);
        if open.total >= self.max_total {
            return Decision::Refuse("server full");
        }
        if from_ip >= self.max_per_ip {
            return Decision::Refuse("too many connections from this address");
        }
        // Unproven addresses hold a slot until their handshake ends or times out: once either
        // count is half full, only proven ones may take more, so forged Initials cannot fill
        // the server (from one address, or from many).
        if !validated && (from_ip >= self.max_per_ip.div_ceil(2) || open.total >= self.max_total.div_ceil(2))
        {
            return Decision::Validate;
        }
        open.total += 1;
        *open.per_ip.entry(ip).or_insert(0) += 1;
        Decision::Admit(Slot { admission: self.clone(), ip })
    }

    /// Open connections in all.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        // The counts stay consistent even if a holder panicked: every update is a single step.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Rate limit for "connection refused" log lines: a flood of refused connections must not
/// become a flood of log lines. At most one line per [`limits::REFUSAL_LOG_INTERVAL_MS`]; the
/// next line says how many refusals went unlogged meanwhile.
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// Some(refusals not logged since the last line) when this refusal may be logged.
    pub fn note(&mut self, now: std::time::Instant) -> Option<u64> {
        let interval = std::time::Duration::from_millis(crate::limits::REFUSAL_LOG_INTERVAL_MS);
        match self.last {
            Some(last) if now.saturating_duration_since(last) < interval => {
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

/// The address a connection's quota is counted under: IPv4 as is, IPv6 by its /64 prefix.
pub fn quota_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// One admitted connection's place in the counts, given back on drop.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(d: Decision) -> Slot {
        match d {
            Decision::Admit(s) => s,
            other => panic!("expected admission, got {other:?}"),
        }
    }

    #[test]
    fn one_address_is_capped_and_must_validate_past_half_its_quota() {
        let a = Admission::new(100, 4);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let first = admitted(a.admit(ip, false));
        let _second = admitted(a.admit(ip, false));
        assert!(matches!(a.admit(ip, false), Decision::Validate), "half the quota: prove the address");
        let _third = admitted(a.admit(ip, true));
        let _fourth = admitted(a.admit(ip, true));
        assert!(matches!(a.admit(ip, true), Decision::Refuse("too many connections from this address")));
        // Another address is not affected.
        let _other = admitted(a.admit("198.51.100.1".parse().unwrap(), false));
        assert_eq!(a.open(), 5);
        drop(first);
        let _again = admitted(a.admit(ip, true));
        assert_eq!(a.open(), 5);
    }

    #[test]
    fn past_half_the_total_every_new_address_must_validate() {
        let a = Admission::new(4, 10);
        let _x = admitted(a.admit("192.0.2.1".parse().unwrap(), false));
        let _y = admitted(a.admit("192.0.2.2".parse().unwrap(), false));
        assert!(matches!(a.admit("192.0.2.3".parse().unwrap(), false), Decision::Validate));
        let _z = admitted(a.admit("192.0.2.3".parse().unwrap(), true));
    }

    #[test]
    fn the_total_is_capped_and_freed_slots_are_reused() {
        let a = Admission::new(2, 10);
        let x = admitted(a.admit("192.0.2.1".parse().unwrap(), false));
        let _y = admitted(a.admit("192.0.2.2".parse().unwrap(), true));
        assert!(matches!(a.admit("192.0.2.3".parse().unwrap(), true), Decision::Refuse("server full")));
        drop(x);
        let _z = admitted(a.admit("192.0.2.3".parse().unwrap(), true));
        assert_eq!(a.open(), 2);
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_counts_as_the_ipv4_address() {
        let a = Admission::new(10, 1);
        let _v4 = admitted(a.admit("192.0.2.9".parse().unwrap(), true));
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert!(matches!(a.admit(mapped, true), Decision::Refuse(_)));
    }

    #[test]
    fn ipv6_addresses_share_the_quota_of_their_64_prefix() {
        let a = Admission::new(10, 1);
        let _one = admitted(a.admit("2001:db8:1:2::1".parse().unwrap(), true));
        let same_64: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        assert!(matches!(a.admit(same_64, true), Decision::Refuse(_)), "same /64, same quota");
        let _other_64 = admitted(a.admit("2001:db8:1:3::1".parse().unwrap(), true));
    }

    #[test]
    fn a_refusal_flood_logs_one_line_per_interval_and_counts_the_rest() {
        let mut log = RefusalLog::default();
        let t0 = std::time::Instant::now();
        assert_eq!(log.note(t0), Some(0));
        for _ in 0..1962 {
            assert_eq!(log.note(t0), None);
        }
        let later = t0 + std::time::Duration::from_millis(crate::limits::REFUSAL_LOG_INTERVAL_MS);
        assert_eq!(log.note(later), Some(1962), "the next line counts what went unlogged");
        assert_eq!(log.note(later), None);
    }

    #[test]
    fn counts_drop_to_nothing_when_every_slot_is_gone() {
        let a = Admission::new(10, 10);
        let slots: Vec<Slot> =
            (0..3).map(|_| admitted(a.admit("192.0.2.5".parse().unwrap(), true))).collect();
        drop(slots);
        assert_eq!(a.open(), 0);
        assert!(a.lock().per_ip.is_empty(), "no entry is left behind for an address with no connection");
    }
}
