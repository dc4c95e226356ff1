//! Durable delivery: N senders enqueue to M recipients who `fetchWait` and `ack`.
//!
//! Each sender is its own connection with one enqueue outstanding; recipients are authenticated
//! connections looping `fetchWait`, each call acking the batch before (`ackUpTo`), as a client
//! that has saved that batch would. Every payload carries the moment its enqueue started
//! (nanoseconds since the run's epoch, same process), so the recipient measures
//! enqueue→wake-up latency: the enqueue RPC, the group commit with its fsync, the wake-up and the
//! `fetchWait` reply.
//!
//! References, measured in the server's temp dir (skipped for a remote server):
//! - the disk's fsync rate: [`FSYNC_BLOCK`]-byte write in place + `File::sync_data`, in a loop.
//!   A durable redb commit is one `sync_data` (redb's default single-phase commit), so this is
//!   the ceiling of the store's commits per second. The disk of a shared machine changes speed
//!   by the second, so each load level is compared with short probes taken right around it;
//! - a bare redb commit: one insert per write transaction with `Durability::Immediate`, in a
//!   separate redb file, against the fsync rate: what the storage engine adds to a flush;
//! - the raw quinn echo of the same payload with N in flight (always), and its round trip with
//!   one in flight.
//!
//! Delivered msgs/s is compared with a physical bound (issue 14): a sender has one enqueue
//! outstanding and none can be acknowledged before its fsync, so N senders deliver at most
//! N / (fsync p50 + echo round trip) messages per second, whatever the CPU.
//!
//! Messages per commit counts the store's write transactions (`RunningServer::commit_count`,
//! enqueues and acks alike) during the run: group-commit efficiency. Then the 16-sender load
//! is replayed paced at half the peak rate to read the latency an unsaturated server gives,
//! against the disk's fsync p99 plus an echo round trip.
//!
//! Finally the server's CPU per delivered message: the same 16-sender load against the real
//! `qpq serve` as a child process ([`child`]), whose CPU time (all its threads) is read before and
//! after the load, so the load generator's own CPU is not counted. Reference: the bare quinn echo
//! server, also a child, per 256-byte call at 16 in flight.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redb::{Database, Durability, TableDefinition};
use tokio::time::MissedTickBehavior;

use super::child::{ChildServer, Usage};
use super::{Bench, Row, Settings, percentile};
use crate::client::session::Session;
use crate::crypto::identity::Identity;
use crate::transport::{Fingerprint, Pin};

/// Payload of every delivered message (timestamp first, then padding).
pub const PAYLOAD_LEN: usize = 256;
/// Bytes written before each fsync of the disk reference.
pub const FSYNC_BLOCK: usize = 4096;
/// How long a recipient's `fetchWait` parks before it rechecks whether the run is over.
const FETCH_WAIT_MS: u32 = 100;
/// Messages one `fetchWait` returns at most.
const FETCH_LIMIT: u32 = 256;
/// After the senders stop, how long recipients may take to drain what is still queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Senders of the paced (half-peak) run; the goal is stated for this load.
const PACED_SENDERS: usize = 16;
/// The fraction of the peak rate the paced run offers.
const PACED_FRACTION: f64 = 0.5;
/// Goal from issue 14: wake-up p99 at half load against fsync p99 + echo round trip.
const WAKE_UP_GOAL_RATIO: f64 = 3.0;
/// Goal: delivered msgs/s at 16 senders against the physical bound.
const DELIVERED_GOAL_RATIO: f64 = 0.5;
/// Senders of the server CPU measurement; the goal is stated for this load.
const CPU_SENDERS: usize = 16;
/// Goal from issue 14: server CPU per delivered message at 16 senders.
const CPU_GOAL_US: f64 = 40.0;
/// Rate limits of the child server: a bench measures capacity, not the limits.
const UNLIMITED_RATES: &str = "[rate_limits]
enqueue_per_connection = { per_sec = 1e9, burst = 4294967295 }
enqueue_per_address = { per_sec = 1e9, burst = 4294967295 }
key_package_per_connection = { per_sec = 1e9, burst = 4294967295 }
key_package_per_address = { per_sec = 1e9, burst = 4294967295 }
key_package_per_target = { per_sec = 1e9, burst = 4294967295 }
enqueue_bytes_per_network = { per_sec = 1e9, burst = 4294967295 }
";
/// A level's fsync probes (before and after) each run for the measurement time divided by this.
const DISK_PROBE_DIVISOR: u32 = 4;
/// Size of the fsync reference's preallocated file, in blocks.
const FSYNC_FILE_BLOCKS: u64 = 256;
/// Keys the redb reference cycles over (its warm-up writes each once).
const REDB_REFERENCE_KEYS: u64 = 64;
/// Most fsyncs / redb commits a reference loop performs.
const MAX_REFERENCE_OPS: u64 = 100_000;

const REFERENCE_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("bench");

pub fn steps(s: &Settings) -> u64 {
    // With PostgreSQL: one and two nodes per sender count, and three paced runs.
    let pg = if s.postgres.is_some() { 2 * s.senders.len() as u64 + 3 } else { 0 };
    1 + s.senders.len() as u64 + 2 + pg
}

/// Where a level's senders and recipients connect, and how to count the store's commits.
pub(super) struct Route<'r> {
    pub senders_at: SocketAddr,
    pub recipients_at: SocketAddr,
    pub fingerprint: Fingerprint,
    pub commits: &'r dyn Fn() -> Option<u64>,
    /// The child server whose CPU the level measures, when it runs against one.
    pub child: Option<&'r ChildServer>,
}

impl Route<'_> {
    async fn connect(&self, at: SocketAddr) -> anyhow::Result<Session> {
        Ok(Session::connect(&at.to_string(), Pin::Fingerprint(self.fingerprint)).await?)
    }
}

/// What one load level produced.
pub(super) struct Level {
    pub delivered: u64,
    /// Start of the run to the last delivery.
    pub elapsed: Duration,
    pub commits: Option<u64>,
    /// Enqueue→wake-up, milliseconds, ascending.
    pub latencies_ms: Vec<f64>,
    /// The child server's usage once every connection was open, and once all was delivered.
    usage: Option<(Usage, Usage)>,
}

impl Level {
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn with_latency(&self, row: Row) -> Row {
        row.extra("p50_ms", percentile(&self.latencies_ms, 0.50))
            .extra("p99_ms", percentile(&self.latencies_ms, 0.99))
            .extra("max_ms", percentile(&self.latencies_ms, 1.0))
    }
}

pub async fn run(b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
    let budget = b.settings.duration();
    let mut rows = Vec::new();

    b.step("delivery: disk references");
    if let Some(dir) = b.data_dir() {
        let redb_rate = redb_reference(dir, budget)?;
        let fsync = fsync_reference(dir, budget)?;
        b.record_reference("redb_commit_per_s", redb_rate);
        b.record_reference("fsync_4KiB_per_s", fsync.rate);
        b.record_reference("fsync_4KiB_p50_ms", fsync.p50_ms);
        rows.push(Row::new("bare redb commit, 1 insert", redb_rate, "commits/s").against(
            "fsync 4 KiB",
            Some(fsync.rate),
            "/s",
        ));
    }
    b.done_step();

    let m = b.settings.recipients;
    let commits = || b.commit_count();
    let route = Route {
        senders_at: b.target.addr,
        recipients_at: b.target.addr,
        fingerprint: b.target.fingerprint,
        commits: &commits,
        child: None,
    };
    let mut peak: f64 = 0.0;
    let echo_1 = b.echo_rate(PAYLOAD_LEN, 1).await?;
    let echo_rtt_ms = 1000.0 / echo_1.max(1e-9);
    b.record_reference("echo_256B_rtt_ms", echo_rtt_ms);
    // (senders, msg/s, wake-up p99 ms) of the main target, for the PostgreSQL comparison.
    let mut by_senders = Vec::new();
    for &n in &b.settings.senders {
        b.step(&format!("delivery: {n} senders"));
        let (level, disk) = with_disk_probe(b, run_level(b, &route, n, m, budget, None)).await?;
        let rate = level.rate();
        peak = peak.max(rate);
        by_senders.push((n, rate));
        let echo = b.echo_rate(PAYLOAD_LEN, n).await?;
        // No enqueue is acknowledged before its fsync: one per sender per fsync + round trip.
        let bound = disk.map(|d| n as f64 * 1000.0 / (d.p50_ms + echo_rtt_ms));
        let mut delivered = Row::new(format!("delivered, {n} senders -> {m} recipients"), rate, "msg/s")
            .against(format!("{n} senders / (fsync p50 + echo rtt)"), bound, "msg/s")
            .extra(&format!("echo_256B_x{n}_calls_per_s"), echo);
        if n == 16 {
            let met = delivered.ratio.is_some_and(|r| r >= DELIVERED_GOAL_RATIO);
            delivered = delivered.goal(format!(">= {DELIVERED_GOAL_RATIO}x"), met);
        }
        rows.push(level.with_latency(delivered));
        if let Some(commits) = level.commits {
            let commit_rate = commits as f64 / level.elapsed.as_secs_f64().max(1e-9);
            let per_commit = level.delivered as f64 / commits.max(1) as f64;
            let mut row = Row::new(format!("store commits, {n} senders"), commit_rate, "commits/s")
                .against("fsync 4 KiB, around this run", disk.map(|d| d.rate), "/s")
                .extra("msgs_per_commit", per_commit);
            if n == 64 {
                row = row.goal(">= 10 msg/commit", per_commit >= 10.0);
            }
            rows.push(row);
        }
        b.done_step();
    }

    // Half of the peak, offered open-loop by PACED_SENDERS senders.
    b.step("delivery: paced at half of peak");
    let target = (peak * PACED_FRACTION).max(1.0);
    let senders = PACED_SENDERS.min(b.settings.senders.iter().copied().max().unwrap_or(1));
    let period = Duration::from_secs_f64(senders as f64 / target);
    let (level, disk) =
        with_disk_probe(b, run_level(b, &route, senders, m, budget * 2, Some(period))).await?;
    // One durable enqueue cannot beat one fsync plus one round trip; the p99 against the disk's.
    let floor_ms = disk.map(|d| d.p99_ms + echo_rtt_ms);
    let p99 = percentile(&level.latencies_ms, 0.99);
    let mut row = Row::new(
        format!("wake-up p99 at {} msg/s (half of peak), {senders} senders", super::human(target)),
        p99,
        "ms",
    )
    .against("fsync p99 + echo round trip", floor_ms, "ms")
    .extra("offered_msg_per_s", target)
    .extra("delivered_msg_per_s", level.rate());
    if let Some(ratio) = row.ratio {
        row = row.goal(format!("<= {WAKE_UP_GOAL_RATIO}x"), ratio <= WAKE_UP_GOAL_RATIO);
    }
    rows.push(level.with_latency(row));
    b.done_step();

    b.step("delivery: server cpu per message");
    if !b.is_remote() {
        let n = CPU_SENDERS.min(b.settings.senders.iter().copied().max().unwrap_or(1));
        rows.push(server_cpu(b, n, m, budget).await?);
    }
    b.done_step();
    if let Some(url) = b.settings.postgres.clone() {
        rows.extend(super::delivery_pg::run(b, &url, &by_senders, m, peak).await?);
    }
    Ok(rows)
}

/// Server CPU per delivered message at `n` senders, `qpq serve` as a child (see the module
/// docs), against the bare quinn echo server's CPU per call.
async fn server_cpu(b: &Bench<'_>, n: usize, m: usize, budget: Duration) -> anyhow::Result<Row> {
    let exe = match &b.settings.server_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let server = ChildServer::serve_with(&exe, UNLIMITED_RATES)?;
    // A short warm-up: allocator, redb's file and caches, quinn's congestion windows.
    let no_commits = || None;
    let route = Route {
        senders_at: server.addr,
        recipients_at: server.addr,
        fingerprint: server.fingerprint,
        commits: &no_commits,
        child: Some(&server),
    };
    run_level(b, &route, n, m, budget / 4, None).await?;
    let level = run_level(b, &route, n, m, budget, None).await?;
    drop(server);
    let (before, after) = level.usage.context("child usage not measured")?;
    let delivered = level.delivered.max(1) as f64;
    let cpu_us = after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e3 / delivered;
    let switches = after.context_switches.saturating_sub(before.context_switches) as f64 / delivered;

    let echo = ChildServer::echo()?;
    let endpoint = super::echo::client_endpoint(echo.addr, echo.fingerprint)?;
    let conn = endpoint.connect(echo.addr, crate::transport::SERVER_NAME)?.await?;
    super::echo::pipelined(&conn, PAYLOAD_LEN, n, budget / 4).await?;
    let before = echo.usage()?;
    let calls = super::echo::pipelined(&conn, PAYLOAD_LEN, n, budget).await?;
    let after = echo.usage()?;
    conn.close(0u32.into(), b"done");
    endpoint.close(0u32.into(), b"done");
    let calls_n = calls.ops.max(1) as f64;
    let echo_us = after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e3 / calls_n;
    let echo_switches = after.context_switches.saturating_sub(before.context_switches) as f64 / calls_n;
    Ok(Row::new(format!("server cpu per delivered msg, {n} senders -> {m} recipients"), cpu_us, "us")
        .against(format!("quinn echo server cpu per 256 B call x{n}"), Some(echo_us), "us")
        .goal(format!("<= {CPU_GOAL_US} us"), cpu_us <= CPU_GOAL_US)
        .extra("delivered_msg_per_s", level.rate())
        .extra("server_ctx_switches_per_msg", switches)
        .extra("echo_ctx_switches_per_call", echo_switches))
}

/// The disk's flush rate and latency.
#[derive(Debug, Clone, Copy)]
struct Disk {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `level` between two short fsync probes and returns the probes' mean. The disk of a shared
/// machine changes speed from one second to the next, so a level is compared with the disk as it
/// was around that level, not at the start of the run. `None` for a remote server.
async fn with_disk_probe<T>(
    b: &Bench<'_>,
    level: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Option<Disk>)> {
    let probe = b.settings.duration() / DISK_PROBE_DIVISOR;
    let before = b.data_dir().map(|d| fsync_reference(d, probe)).transpose()?;
    let out = level.await?;
    let after = b.data_dir().map(|d| fsync_reference(d, probe)).transpose()?;
    let disk = before.zip(after).map(|(x, y)| Disk {
        rate: (x.rate + y.rate) / 2.0,
        p50_ms: (x.p50_ms + y.p50_ms) / 2.0,
        p99_ms: (x.p99_ms + y.p99_ms) / 2.0,
    });
    Ok((out, disk))
}

/// One load level: `n` senders (closed loop, or one message per `pace` each) for `budget`, to `m`
/// recipients who drain everything sent.
pub(super) async fn run_level(
    b: &Bench<'_>,
    route: &Route<'_>,
    n: usize,
    m: usize,
    budget: Duration,
    pace: Option<Duration>,
) -> anyhow::Result<Level> {
    let ids: Vec<Identity> = (0..m).map(|_| Identity::generate()).collect();
    let mut recipients = Vec::with_capacity(m);
    for id in &ids {
        let mut s = route.connect(route.recipients_at).await?;
        s.authenticate(id).await?;
        recipients.push(s);
    }
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        senders.push(route.connect(route.senders_at).await?);
    }
    let usage_before = route.child.map(ChildServer::usage).transpose()?;

    let sent = Cell::new(0u64);
    let active_senders = Cell::new(n);
    let received = Cell::new(0u64);
    let last_delivery = Cell::new(None::<Instant>);
    let latencies = RefCell::new(Vec::new());
    let commits_before = (route.commits)();
    let start = Instant::now();
    let deadline = start + budget;

    let send_loops = senders.iter().enumerate().map(|(i, s)| {
        let (ids, sent, active) = (&ids, &sent, &active_senders);
        async move {
            let mut ticker = pace.map(|p| {
                // Spread the senders' ticks over one period so they do not fire together.
                let offset = p.mul_f64(i as f64 / n as f64);
                let mut t = tokio::time::interval_at((start + offset).into(), p);
                t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                t
            });
            let mut j = 0u64;
            let result = async {
                while j < super::MAX_OPS_PER_RUN && Instant::now() < deadline {
                    if let Some(t) = ticker.as_mut() {
                        t.tick().await;
                    }
                    let to = &ids[(i + j as usize) % ids.len()];
                    s.enqueue(&to.public().0, &stamp(b), b"").await?;
                    sent.set(sent.get() + 1);
                    j += 1;
                }
                anyhow::Ok(())
            }
            .await;
            active.set(active.get() - 1);
            result
        }
    });
    let receive_loops = recipients.iter().map(|r| {
        let (sent, active, received, last_delivery, latencies) =
            (&sent, &active_senders, &received, &last_delivery, &latencies);
        async move {
            let mut drain_deadline = None;
            let mut ack_up_to = 0;
            loop {
                if active.get() == 0 {
                    if received.get() >= sent.get() {
                        break;
                    }
                    let d = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                    anyhow::ensure!(
                        Instant::now() < d,
                        "{} of {} messages not delivered within {DRAIN_TIMEOUT:?}",
                        sent.get() - received.get(),
                        sent.get()
                    );
                }
                let (msgs, _more, _) = r.ack_and_fetch_wait(ack_up_to, FETCH_WAIT_MS, FETCH_LIMIT).await?;
                ack_up_to = 0;
                let Some(last) = msgs.last().map(|m| m.seq) else { continue };
                let now_ns = b.epoch.elapsed().as_nanos() as u64;
                {
                    let mut l = latencies.borrow_mut();
                    for m in &msgs {
                        let at = read_stamp(&m.payload).context("delivered payload has no timestamp")?;
                        l.push(now_ns.saturating_sub(at) as f64 / 1e6);
                    }
                }
                received.set(received.get() + msgs.len() as u64);
                last_delivery.set(Some(Instant::now()));
                ack_up_to = last;
            }
            anyhow::Ok(())
        }
    });
    futures::future::try_join(
        futures::future::try_join_all(send_loops),
        futures::future::try_join_all(receive_loops),
    )
    .await?;
    let usage = usage_before.zip(route.child.map(ChildServer::usage).transpose()?);
    let commits = (route.commits)().zip(commits_before).map(|(after, before)| after - before);
    let elapsed = last_delivery.get().map_or(start.elapsed(), |t| t - start);
    for s in senders {
        s.close().await;
    }
    for r in recipients {
        r.close().await;
    }
    let mut latencies_ms = latencies.into_inner();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Level { delivered: received.get(), elapsed, commits, latencies_ms, usage })
}

/// A payload stamped with the current time since the run's epoch.
fn stamp(b: &Bench<'_>) -> Vec<u8> {
    let mut p = (b.epoch.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
    p.resize(PAYLOAD_LEN, 0);
    p
}

fn read_stamp(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// fsync rate and median latency: [`FSYNC_BLOCK`]-byte writes in place
/// over a preallocated file in `dir`, each followed by `sync_data`. In place, like redb's writes
/// once its file has grown, so the figure is the disk's flush and not file-size journaling.
fn fsync_reference(dir: &std::path::Path, budget: Duration) -> anyhow::Result<Disk> {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join("bench-fsync.bin");
    let file = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let block = vec![0x33u8; FSYNC_BLOCK];
    for i in 0..FSYNC_FILE_BLOCKS {
        file.write_all_at(&block, i * FSYNC_BLOCK as u64)?;
    }
    file.sync_all()?;
    let mut lat = Vec::new();
    let start = Instant::now();
    while (lat.len() as u64) < MAX_REFERENCE_OPS && start.elapsed() < budget {
        let t = Instant::now();
        let offset = (lat.len() as u64 % FSYNC_FILE_BLOCKS) * FSYNC_BLOCK as u64;
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    lat.sort_by(f64::total_cmp);
    Ok(Disk { rate, p50_ms: percentile(&lat, 0.5), p99_ms: percentile(&lat, 0.99) })
}

/// Durable single-insert redb commits per second, in a separate file in `dir`. Keys cycle over
/// [`REDB_REFERENCE_KEYS`] after a warm-up, so the file stops growing, as a server's does once
/// its queues are drained as fast as they fill.
fn redb_reference(dir: &std::path::Path, budget: Duration) -> anyhow::Result<f64> {
    let path = dir.join("bench-reference.redb");
    let db = Database::create(&path)?;
    let value = vec![0x44u8; PAYLOAD_LEN];
    let commit = |key: u64| -> anyhow::Result<()> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(REFERENCE_TABLE)?.insert(key % REDB_REFERENCE_KEYS, &value[..])?;
        txn.commit()?;
        Ok(())
    };
    for key in 0..REDB_REFERENCE_KEYS {
        commit(key)?;
    }
    let start = Instant::now();
    let mut commits = 0u64;
    while commits < MAX_REFERENCE_OPS && start.elapsed() < budget {
        commit(commits)?;
        commits += 1;
    }
    let rate = commits as f64 / start.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}
