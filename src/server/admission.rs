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
//! A site is often given a whole /48 (65,536 /64s), so each IPv6 /48 holds at most
//! [`limits::CONNECTIONS_PER_NETWORK_FACTOR`] times the per-address quota: before, one /48
//! could take every slot of the server 256 at a time. IPv4 has no such cap: its addresses are
//! scarce, and carriers' NAT pools put many unrelated people in one /24, whom a few rented
//! neighbours could otherwise lock out.
//!
//! An address at its quota whose new connection has proven the address evicts its own
//! longest-idle connection instead of being refused: one nothing has arrived on for
//! [`limits::EVICT_IDLE_AFTER_MS`] (by the server's clock) and nothing is waiting to be written
//! to. A parked `fetchWait` counts as idle once it is that old. So 256 kept-alive idle
//! connections cannot lock out the others behind the same address (a NAT), while busy ones are
//! never cut. Likewise at a full /48: a proven address with fewer connections than another
//! address of the /48 evicts that one's longest-idle connection, so a few neighbours on a
//! provider's shared /48 cannot lock the rest out with idle connections. And at a full server:
//! a proven connection from a network (IPv4 address or IPv6 /48) evicts the longest-idle
//! connection of the networks holding at least two more than its own, so a few networks (40
//! IPv4 addresses at their quota, ten /48s at theirs) cannot fill the server with idle
//! connections; "two more" so that networks one apart do not just trade places, and a server
//! full of one-connection networks stays as it is.
//!
//! The decision is pure bookkeeping (no I/O): the accept loop asks [`Admission::admit`] and keeps
//! the returned [`Slot`] for as long as the connection lives; an evicted connection's
//! [`Activity::evicted`] token is cancelled and its task closes it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::limits;

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
    max_per_net: usize,
    clock: Clock,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Each address's connections (their count is the address's share of the quota).
    per_ip: HashMap<IpAddr, Vec<Arc<Activity>>>,
    /// Connections per network ([`network_key`]); no entry for a network with none.
    per_net: HashMap<IpAddr, usize>,
    /// When a scan for a victim at a full server last found none, and the smallest network size
    /// it would take from (see [`Admission::evict_idlest_of_heavier`]).
    fruitless_scan: Option<(u64, usize)>,
}

impl Open {
    fn add_to_net(&mut self, net: IpAddr) {
        *self.per_net.entry(net).or_default() += 1;
    }

    fn remove_from_net(&mut self, net: IpAddr) {
        if let Some(n) = self.per_net.get_mut(&net) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_net.remove(&net);
            }
        }
    }
}

/// What admission knows of one connection's use, updated by the connection's task.
#[derive(Debug)]
pub struct Activity {
    /// When something last arrived on the connection (ms, the server's clock).
    last_input_ms: AtomicU64,
    /// Reply bytes not yet written to it.
    unsent: AtomicUsize,
    /// Cancelled when admission evicts the connection to make room.
    pub evicted: CancellationToken,
    /// Set once the connection's place in the counts has been given back.
    released: AtomicBool,
    clock: Clock,
}

impl Activity {
    /// Activity of a connection not counted by any [`Admission`] (the fuzz target's).
    pub fn untracked(clock: Clock) -> Arc<Activity> {
        Arc::new(Activity {
            last_input_ms: AtomicU64::new(clock.now_ms()),
            unsent: AtomicUsize::new(0),
            evicted: CancellationToken::new(),
            released: AtomicBool::new(false),
            clock,
        })
    }

    /// Something arrived on the connection.
    pub fn touch(&self) {
        self.last_input_ms.store(self.clock.now_ms(), Ordering::Relaxed);
    }

    pub fn set_unsent(&self, bytes: usize) {
        self.unsent.store(bytes, Ordering::Relaxed);
    }

    /// Quiet since this time, when it may be evicted at `now`. A last input after `now` (the
    /// wall clock stepped back) becomes `now`: quiet from here on, rather than never idle until
    /// the clock catches up again.
    fn idle_since(&self, now: u64) -> Option<u64> {
        let last = self.last_input_ms.fetch_min(now, Ordering::Relaxed).min(now);
        let quiet = now.saturating_sub(last) >= limits::EVICT_IDLE_AFTER_MS;
        (quiet && self.unsent.load(Ordering::Relaxed) == 0).then_some(last)
    }
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Admission> {
        Admission::with_clock(max_total, max_per_ip, Clock::system())
    }

    /// An admission whose idle times read `clock` (the server's).
    pub fn with_clock(max_total: usize, max_per_ip: usize, clock: Clock) -> Arc<Admission> {
        let max_per_net = max_per_ip.saturating_mul(limits::CONNECTIONS_PER_NETWORK_FACTOR);
        Arc::new(Admission { max_total, max_per_ip, max_per_net, clock, open: Mutex::new(Open::default()) })
    }

    /// Decides on a connection from `ip`; `validated` says whether the client has already proven
    /// that it owns that address (it answered a Retry).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Decision {
        let ip = quota_key(ip);
        let net = network_key(ip);
        let mut open = self.lock();
        let from_ip = open.per_ip.get(&ip).map_or(0, Vec::len);
        if from_ip >= self.max_per_ip {
            // Only a proven address may evict: forged Initials must not cut real connections.
            if !validated {
                return Decision::Validate;
            }
            if !Self::evict_idlest(&mut open, ip, self.clock.now_ms()) {
                return Decision::Refuse("too many connections from this address");
            }
        }
        let mut from_net = open.per_net.get(&net).copied().unwrap_or(0);
        if from_net >= self.max_per_net {
            if !validated {
                return Decision::Validate;
            }
            // A network is often shared (a provider's /48): a proven address with fewer
            // connections than another of its network takes that one's longest-idle connection,
            // so idle connections of a few neighbours cannot lock the rest out.
            let from_ip = open.per_ip.get(&ip).map_or(0, Vec::len);
            if !Self::evict_idlest_in_net(&mut open, net, from_ip, self.clock.now_ms()) {
                return Decision::Refuse("too many connections from this network");
            }
            from_net -= 1;
        }
        // Unproven addresses hold a slot until their handshake ends or times out: once any
        // count is half full, only proven ones may take more, so forged Initials cannot fill
        // the server (from one address, one network, or from many).
        if !validated
            && (from_ip >= self.max_per_ip.div_ceil(2)
                || from_net >= self.max_per_net.div_ceil(2)
                || open.total >= self.max_total.div_ceil(2))
        {
            return Decision::Validate;
        }
        // Only a proven newcomer gets here at a full server (an unproven one was asked to
        // validate above), and none of the steps above evicted anything (that would have made
        // room). Like at a full network, it may take the longest-idle connection of a network
        // heavier than its own, so idle connections of a few networks cannot fill the server.
        if open.total >= self.max_total
            && !Self::evict_idlest_of_heavier(&mut open, from_net + 1, self.clock.now_ms())
        {
            return Decision::Refuse("server full");
        }
        open.total += 1;
        open.add_to_net(net);
        let activity = Activity::untracked(self.clock.clone());
        open.per_ip.entry(ip).or_default().push(activity.clone());
        Decision::Admit(Slot { admission: self.clone(), ip, activity })
    }

    /// Evicts `ip`'s connection that has been idle longest, if one may be evicted at `now`.
    fn evict_idlest(open: &mut Open, ip: IpAddr, now: u64) -> bool {
        let Some(conns) = open.per_ip.get_mut(&ip) else { return false };
        let idlest = conns
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.idle_since(now).map(|since| (since, i)))
            .min()
            .map(|(_, i)| i);
        let Some(i) = idlest else { return false };
        let victim = conns.swap_remove(i);
        victim.released.store(true, Ordering::SeqCst);
        victim.evicted.cancel();
        if conns.is_empty() {
            open.per_ip.remove(&ip);
        }
        open.total = open.total.saturating_sub(1);
        open.remove_from_net(network_key(ip));
        true
    }

    /// Evicts the longest-idle connection (if one may be evicted at `now`) of the addresses of
    /// `net` that hold more than `than` connections. Scans every address: only at a full
    /// network, and the map holds at most the server's connections.
    fn evict_idlest_in_net(open: &mut Open, net: IpAddr, than: usize, now: u64) -> bool {
        let victim = open
            .per_ip
            .iter()
            .filter(|(ip, conns)| network_key(**ip) == net && conns.len() > than)
            .filter_map(|(ip, conns)| {
                conns.iter().filter_map(|a| a.idle_since(now)).min().map(|since| (since, *ip))
            })
            .min()
            .map(|(_, ip)| ip);
        victim.is_some_and(|ip| Self::evict_idlest(open, ip, now))
    }

    /// Evicts the longest-idle connection (if one may be evicted at `now`) of the networks that
    /// hold more than `than` connections. Scans every connection (up to the server's cap), which
    /// is fine because it runs only at a full server for a proven newcomer, and is paid for at
    /// most once per eviction (the newcomer's fresh connection
    /// cannot be evicted for [`limits::EVICT_IDLE_AFTER_MS`]) or once per
    /// [`limits::EVICTION_RESCAN_AFTER_MS`] when it finds nothing: a flood of proven newcomers at
    /// a server full of busy connections is refused without a scan until then.
    fn evict_idlest_of_heavier(open: &mut Open, than: usize, now: u64) -> bool {
        if let Some((at, covered)) = open.fruitless_scan {
            // A clock stepped back (`now < at`) expires it rather than extending it.
            let recent = now.checked_sub(at).is_some_and(|d| d < limits::EVICTION_RESCAN_AFTER_MS);
            if recent && than >= covered {
                return false; // that scan looked at every network this one would
            }
        }
        let per_net = &open.per_net;
        // From the heaviest network first, then the longest idle: a network holding many
        // connections gives one up before a household with two does.
        let victim = open
            .per_ip
            .iter()
            .filter_map(|(ip, conns)| {
                let held = per_net.get(&network_key(*ip)).copied().filter(|n| *n > than)?;
                let since = conns.iter().filter_map(|a| a.idle_since(now)).min()?;
                Some((std::cmp::Reverse(held), since, *ip))
            })
            .min()
            .map(|(_, _, ip)| ip);
        let evicted = victim.is_some_and(|ip| Self::evict_idlest(open, ip, now));
        if !evicted {
            open.fruitless_scan = Some((now, than));
        }
        evicted
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

/// The address a connection's quota is counted under: IPv4 as is, IPv6 by its /64 prefix.
pub fn quota_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// The network a connection's address belongs to, for the per-network cap: an IPv6 /48; an IPv4
/// address (IPv4-mapped ones included) is its own network, which its per-address cap already
/// holds below the network cap.
pub fn network_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
        v4 => v4,
    }
}

/// One admitted connection's place in the counts, given back on drop (or on eviction).
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
    activity: Arc<Activity>,
}

impl Slot {
    /// The connection's activity record, for its task to update and to watch for eviction.
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        if self.activity.released.swap(true, Ordering::SeqCst) {
            return; // evicted: already given back
        }
        open.total = open.total.saturating_sub(1);
        open.remove_from_net(network_key(self.ip));
        if let Some(conns) = open.per_ip.get_mut(&self.ip) {
            conns.retain(|a| !Arc::ptr_eq(a, &self.activity));
            if conns.is_empty() {
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
    fn at_its_cap_a_proven_address_evicts_its_longest_idle_connection_not_a_busy_one() {
        let clock = Clock::system();
        let a = Admission::with_clock(100, 3, clock.clone());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let slots: Vec<Slot> = (0..3).map(|_| admitted(a.admit(ip, true))).collect();
        assert!(matches!(a.admit(ip, true), Decision::Refuse(_)), "connections just opened are not idle yet");
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64 + 1);
        slots[0].activity().touch(); // something just arrived on the first
        slots[2].activity().set_unsent(10); // a reply is being written to the third
        assert!(matches!(a.admit(ip, false), Decision::Validate), "an unproven address evicts nothing");
        assert!(slots.iter().all(|s| !s.activity().evicted.is_cancelled()));
        let fourth = admitted(a.admit(ip, true));
        let evicted: Vec<bool> = slots.iter().map(|s| s.activity().evicted.is_cancelled()).collect();
        assert_eq!(evicted, [false, true, false], "the idle one goes, the active and the busy stay");
        assert_eq!(a.open(), 3);
        assert!(matches!(a.admit(ip, true), Decision::Refuse(_)), "nothing else is idle");
        drop(slots); // the evicted slot was given back already: no double count
        assert_eq!(a.open(), 1);
        drop(fourth);
        assert!(a.lock().per_ip.is_empty());
        assert!(a.lock().per_net.is_empty(), "an eviction gave its network count back once");
    }

    #[test]
    fn at_a_full_server_a_proven_newcomer_evicts_an_idle_connection_of_a_heavier_network() {
        let clock = Clock::system();
        let a = Admission::with_clock(4, 2, clock.clone());
        let [x, y, newcomer, other]: [IpAddr; 4] =
            ["192.0.2.1", "192.0.2.2", "198.51.100.9", "203.0.113.4"].map(|s| s.parse().unwrap());
        let slots: Vec<Slot> = [x, x, y, y].iter().map(|ip| admitted(a.admit(*ip, true))).collect();
        assert!(matches!(a.admit(newcomer, true), Decision::Refuse("server full")), "nobody is idle yet");
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64 + 1);
        for s in &slots[..3] {
            s.activity().touch(); // all busy but y's second
        }
        assert!(matches!(a.admit(newcomer, false), Decision::Validate), "an unproven address evicts nothing");
        assert!(slots.iter().all(|s| !s.activity().evicted.is_cancelled()));
        let first = admitted(a.admit(newcomer, true));
        let evicted: Vec<bool> = slots.iter().map(|s| s.activity().evicted.is_cancelled()).collect();
        assert_eq!(evicted, [false, false, false, true], "only the idle one goes");
        assert_eq!(a.open(), 4, "still full, not over");
        // Everyone is idle now. The newcomer (one connection) takes nothing from x (two): they
        // would only trade places. An address with none takes x's longest-idle one.
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64 + 1);
        slots[1].activity().touch();
        assert!(matches!(a.admit(newcomer, true), Decision::Refuse("server full")));
        let _second = admitted(a.admit(other, true));
        assert!(slots[0].activity().evicted.is_cancelled() && !slots[1].activity().evicted.is_cancelled());
        assert!(!first.activity().evicted.is_cancelled(), "not from a network as light as the newcomer's");
        drop(first);
        drop(slots);
        assert_eq!(a.open(), 1);
    }

    /// Review: the victim was the longest-idle connection of any heavier network, so a
    /// household with two connections lost one before a network holding many. The heaviest
    /// network now gives one up first. Fails without the ordering.
    #[test]
    fn at_a_full_server_the_heaviest_network_gives_up_a_connection_first() {
        let clock = Clock::system();
        let a = Admission::with_clock(5, 3, clock.clone());
        let [home, many, newcomer]: [IpAddr; 3] =
            ["192.0.2.1", "198.51.100.9", "203.0.113.4"].map(|s| s.parse().unwrap());
        // The household's two came first: they have been idle longest.
        let household: Vec<Slot> = (0..2).map(|_| admitted(a.admit(home, true))).collect();
        clock.advance(1_000);
        let crowd: Vec<Slot> = (0..3).map(|_| admitted(a.admit(many, true))).collect();
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64 + 1);
        let _in = admitted(a.admit(newcomer, true));
        assert!(household.iter().all(|s| !s.activity().evicted.is_cancelled()), "the household keeps both");
        assert_eq!(crowd.iter().filter(|s| s.activity().evicted.is_cancelled()).count(), 1);
    }

    #[test]
    fn at_a_full_server_a_fruitless_search_for_an_idle_connection_waits_before_the_next() {
        let clock = Clock::system();
        let a = Admission::with_clock(2, 2, clock.clone());
        let x: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<Slot> = (0..2).map(|_| admitted(a.admit(x, true))).collect();
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64 + 1);
        for s in &slots {
            s.activity().set_unsent(10); // idle, but replies are being written
        }
        let newcomer: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(matches!(a.admit(newcomer, true), Decision::Refuse("server full")));
        slots[0].activity().set_unsent(0);
        assert!(matches!(a.admit(newcomer, true), Decision::Refuse("server full")), "no second scan yet");
        clock.advance(limits::EVICTION_RESCAN_AFTER_MS as i64);
        let _admitted = admitted(a.admit(newcomer, true));
        assert!(slots[0].activity().evicted.is_cancelled());
    }

    #[test]
    fn after_the_wall_clock_steps_back_connections_turn_idle_again() {
        let clock = Clock::system();
        let a = Admission::with_clock(100, 1, clock.clone());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let old = admitted(a.admit(ip, true));
        clock.advance(-3_600_000);
        assert!(matches!(a.admit(ip, true), Decision::Refuse(_)), "not idle: quiet from the step on");
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64);
        let _new = admitted(a.admit(ip, true));
        assert!(old.activity().evicted.is_cancelled());
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
    fn at_a_full_network_a_proven_newcomer_evicts_an_idle_connection_of_a_heavier_neighbour() {
        let factor = limits::CONNECTIONS_PER_NETWORK_FACTOR;
        let clock = Clock::system();
        let a = Admission::with_clock(1000, 2, clock.clone());
        let in_48 = |i: usize| -> IpAddr { format!("2001:db8:7:{i:x}::1").parse().unwrap() };
        // The network is full: `factor` neighbours with two connections each.
        let slots: Vec<Slot> =
            (0..factor).flat_map(|i| [0, 1].map(|_| admitted(a.admit(in_48(i), true)))).collect();
        let newcomer = in_48(factor);
        assert!(matches!(a.admit(newcomer, true), Decision::Refuse(_)), "nobody is idle yet");
        clock.advance(limits::EVICT_IDLE_AFTER_MS as i64 + 1);
        for s in &slots[1..] {
            s.activity().touch(); // all busy but the first
        }
        assert!(matches!(a.admit(newcomer, false), Decision::Validate), "an unproven address evicts nothing");
        let first = admitted(a.admit(newcomer, true));
        let evicted: Vec<bool> = slots.iter().map(|s| s.activity().evicted.is_cancelled()).collect();
        assert!(evicted[0] && !evicted[1..].iter().any(|e| *e), "only the idle one: {evicted:?}");
        assert_eq!(a.lock().per_net.values().sum::<usize>(), 2 * factor, "still full, not over");
        // Nobody else is idle, and the newcomer (now with one) takes no more from neighbours
        // with the same count or fewer than its own.
        assert!(matches!(
            a.admit(newcomer, true),
            Decision::Refuse("too many connections from this network")
        ));
        drop(first);
        drop(slots);
        assert!(a.lock().per_ip.is_empty() && a.lock().per_net.is_empty());
    }

    #[test]
    fn a_network_holds_a_bounded_multiple_of_the_address_quota() {
        let factor = limits::CONNECTIONS_PER_NETWORK_FACTOR;
        let a = Admission::new(1000, 2);
        // Addresses of one /48, each at its own quota of 2.
        let in_48 = |i: usize| -> IpAddr { format!("2001:db8:7:{i:x}::1").parse().unwrap() };
        let mut slots: Vec<Slot> =
            (0..factor / 2).flat_map(|i| [0, 1].map(|_| admitted(a.admit(in_48(i), true)))).collect();
        // Half the network's cap is held: a new address of it must prove itself first.
        assert!(matches!(a.admit(in_48(factor), false), Decision::Validate), "half the network's cap");
        slots.extend((factor / 2..factor).flat_map(|i| [0, 1].map(|_| admitted(a.admit(in_48(i), true)))));
        assert!(matches!(a.admit(in_48(factor), false), Decision::Validate), "past half, prove the address");
        assert!(matches!(
            a.admit(in_48(factor), true),
            Decision::Refuse("too many connections from this network")
        ));
        // Another /48 is not affected, nor are IPv4 addresses of one /24 (a carrier's NAT pool):
        // each is held only by its own cap.
        let _other = admitted(a.admit("2001:db8:8::1".parse().unwrap(), false));
        let in_24 = |i: usize| -> IpAddr { format!("192.0.2.{i}").parse().unwrap() };
        let _v4: Vec<Slot> =
            (0..=factor).flat_map(|i| [0, 1].map(|_| admitted(a.admit(in_24(i), true)))).collect();
        // A connection given back makes room in its network.
        slots.pop();
        let _again = admitted(a.admit(in_48(factor), true));
        drop(slots);
        assert_eq!(a.lock().per_net.len(), 2 + factor + 1, "the two /48s, and each IPv4 address");
    }

    #[test]
    fn counts_drop_to_nothing_when_every_slot_is_gone() {
        let a = Admission::new(10, 10);
        let slots: Vec<Slot> =
            (0..3).map(|_| admitted(a.admit("192.0.2.5".parse().unwrap(), true))).collect();
        drop(slots);
        assert_eq!(a.open(), 0);
        assert!(a.lock().per_ip.is_empty(), "no entry is left behind for an address with no connection");
        assert!(a.lock().per_net.is_empty(), "nor for a network");
    }
}
