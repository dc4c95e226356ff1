//! `home`: what a large home costs a one-shot `send` and a one-shot receive (issue 12).
//!
//! A "large" home holds 50 groups of 100 members and 100k history entries; a fresh home holds
//! one direct conversation. Each measures the same two operations on a 2-member direct
//! conversation, alternating between the homes so drift on a shared machine hits both alike:
//! - **send**: open the home, send one message (encrypt, enqueue, save), close: `qpq send`
//!   without the process start.
//! - **receive**: the peer sends one message (not timed), then open the home, receive it and
//!   save, close: a one-shot `qpq recv`.
//!
//! Figures are medians of several repetitions, in wall time and in CPU time of the client's
//! thread (the client runs on this thread; the in-process server on its own threads), each as
//! a ratio to the fresh home. Goal: at most 1.5x.
//!
//! # Building the large home
//! The 99 other members of every group are identities built in this process: their
//! KeyPackages go straight to the sender's MLS client, which creates each group and merges the
//! commit adding them without the server (nobody needs the Welcomes; the sender's state is
//! what a real add leaves behind). The history is injected directly
//! ([`Messenger::inject_history_for_bench`]). Homes are unprotected (no passphrase), so the
//! Argon2id derivation both pay alike is not in the figures.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{Bench, Row, Settings};
use crate::client::messenger::{ConnectOptions, Event, Messenger, Target};
use crate::client::state::{Entry, GroupKind, GroupMeta, Unlock};
use crate::mls::MlsClient;

/// Issue 12 goal: a large home's operation / a fresh home's.
const GOAL: f64 = 1.5;

/// The large home's shape, and the repetitions per measurement.
struct Shape {
    groups: usize,
    members: usize,
    history: usize,
    reps: usize,
}

const FULL: Shape = Shape { groups: 50, members: 100, history: 100_000, reps: 7 };
const QUICK: Shape = Shape { groups: 2, members: 4, history: 200, reps: 2 };

/// Setup steps plus one per measured operation.
pub fn steps(_: &Settings) -> u64 {
    5
}

/// One operation's cost.
#[derive(Debug, Clone, Copy)]
struct Cost {
    wall: Duration,
    cpu: Duration,
}

/// CPU time this thread has run, from the scheduler's own accounting (ns, unlike the 10 ms
/// ticks of `/proc/.../stat`); None where /proc has no such file.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Times `op` in wall and thread CPU time.
async fn timed<T, F: std::future::Future<Output = anyhow::Result<T>>>(op: F) -> anyhow::Result<(T, Cost)> {
    let (cpu0, t0) = (thread_cpu(), Instant::now());
    let out = op.await?;
    let wall = t0.elapsed();
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    };
    Ok((out, Cost { wall, cpu }))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A home and its direct conversation's peer (a live client of its own).
struct Pair {
    dir: tempfile::TempDir,
    key: [u8; 32],
    peer: Messenger,
    _peer_dir: tempfile::TempDir,
    peer_key: [u8; 32],
}

impl Pair {
    async fn new(b: &Bench<'_>, name: &str) -> anyhow::Result<Pair> {
        let dir = tempfile::tempdir()?;
        let peer_dir = tempfile::tempdir()?;
        let (m, _) = Messenger::init(dir.path(), Some(name.into()), Unlock::None, opts(b)).await?;
        let (peer, _) = Messenger::init(peer_dir.path(), Some("peer".into()), Unlock::None, opts(b)).await?;
        let (key, peer_key) = (m.public_key().0, peer.public_key().0);
        drop(m);
        // A contact's invitation is joined at once (a stranger's would wait as a request).
        let mut peer = peer;
        peer.contact_add("home", &hex::encode(key))?;
        let mut pair = Pair { dir, key, peer, _peer_dir: peer_dir, peer_key };
        // The conversation is opened by the first send; the peer joins it.
        pair.send().await?;
        pair.peer.receive(0).await?;
        if pair.peer.find_direct(&key).is_none() {
            bail!("the peer did not join the direct conversation");
        }
        Ok(pair)
    }

    /// Opens the home, sends one message to the peer, closes it.
    async fn send(&mut self) -> anyhow::Result<()> {
        let mut m = Messenger::open(self.dir.path(), None, self.peer.opts.clone())?;
        let (fate, _) = m.send(&Target::Person(self.peer_key), "the bench says hi").await?;
        m.disconnect().await;
        if !matches!(fate, crate::client::outbox::Fate::Sent { .. }) {
            bail!("the bench message was not sent: {fate:?}");
        }
        Ok(())
    }

    /// Opens the home, receives until the peer's message came, closes it.
    async fn receive(&mut self) -> anyhow::Result<()> {
        let mut m = Messenger::open(self.dir.path(), None, self.peer.opts.clone())?;
        let events = m.receive(0).await?;
        m.disconnect().await;
        if !events.iter().any(|e| matches!(e, Event::Message(_))) {
            bail!("the peer's message did not arrive");
        }
        Ok(())
    }

    /// The peer's message the next `receive` gets (not timed); also drains what we sent it.
    async fn peer_says_hi(&mut self) -> anyhow::Result<()> {
        self.peer.receive(0).await?;
        let (fate, _) = self.peer.send(&Target::Person(self.key), "hi back").await?;
        if !matches!(fate, crate::client::outbox::Fate::Sent { .. }) {
            bail!("the peer's message was not sent: {fate:?}");
        }
        Ok(())
    }
}

fn opts(b: &Bench<'_>) -> ConnectOptions {
    ConnectOptions { server: Some(b.target.addr.to_string()), fingerprint: Some(b.target.fingerprint) }
}

pub async fn run(b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
    let shape = if b.settings.quick { QUICK } else { FULL };
    b.step("home: a fresh home");
    let mut fresh = Pair::new(b, "fresh").await.context("fresh home")?;
    b.done_step();
    b.step(&format!("home: {} groups of {} members", shape.groups, shape.members));
    let mut large = Pair::new(b, "large").await.context("large home")?;
    let setup = Instant::now();
    fill_groups(large.dir.path(), &shape)?;
    b.done_step();
    b.step(&format!("home: {} history entries", shape.history));
    fill_history(large.dir.path(), &shape)?;
    let state_bytes = std::fs::metadata(large.dir.path().join(crate::client::db::DB_FILE))?.len();
    let setup_secs = setup.elapsed().as_secs_f64();
    b.done_step();

    b.step("home: send");
    let (mut fresh_send, mut large_send) = (Vec::new(), Vec::new());
    // One unmeasured round each warms caches and connections alike.
    for rep in 0..=shape.reps {
        let ((), f) = timed(fresh.send()).await?;
        let ((), l) = timed(large.send()).await?;
        if rep > 0 {
            fresh_send.push(f);
            large_send.push(l);
        }
    }
    b.done_step();
    b.step("home: receive");
    let (mut fresh_recv, mut large_recv) = (Vec::new(), Vec::new());
    for rep in 0..=shape.reps {
        fresh.peer_says_hi().await?;
        large.peer_says_hi().await?;
        let ((), f) = timed(fresh.receive()).await?;
        let ((), l) = timed(large.receive()).await?;
        if rep > 0 {
            fresh_recv.push(f);
            large_recv.push(l);
        }
    }
    b.done_step();

    let what = format!(
        "{}x{} members, {} entries, {:.1} MB, built in {setup_secs:.0} s",
        shape.groups,
        shape.members,
        shape.history,
        state_bytes as f64 / 1e6
    );
    let mut rows = Vec::new();
    for (op, fresh, large) in [("send", fresh_send, large_send), ("receive", fresh_recv, large_recv)] {
        for (clock, pick) in
            [("wall", (|c: &Cost| c.wall) as fn(&Cost) -> Duration), ("cpu", |c: &Cost| c.cpu)]
        {
            let f = median(fresh.iter().map(pick).collect());
            let l = median(large.iter().map(pick).collect());
            let row = Row::new(format!("{op}, DM, large home, {clock} median"), ms(l), "ms")
                .against(format!("fresh home (large: {what})"), Some(ms(f)), "ms")
                .extra("reps", shape.reps as f64)
                .extra("state_bytes", state_bytes as f64);
            let met = row.ratio.is_some_and(|r| r <= GOAL);
            rows.push(row.goal(format!("<= {GOAL}x"), met));
        }
    }
    Ok(rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Adds `shape.groups` groups of `shape.members` members to the home in `dir`.
fn fill_groups(dir: &Path, shape: &Shape) -> anyhow::Result<()> {
    let others = shape.members.saturating_sub(1);
    // Every other member gives one KeyPackage per group.
    let mut kps: Vec<Vec<Vec<u8>>> = vec![Vec::with_capacity(others); shape.groups];
    for i in 0..others {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let member = MlsClient::new(&seed)?;
        for (g, kp) in member.key_packages(shape.groups)?.into_iter().enumerate() {
            kps[g].push(kp.bytes);
        }
    }
    let mut m = Messenger::open(dir, None, ConnectOptions { server: None, fingerprint: None })?;
    m.bench_local_groups(kps)?;
    Ok(())
}

/// Spreads `shape.history` entries over the home's groups.
fn fill_history(dir: &Path, shape: &Shape) -> anyhow::Result<()> {
    let mut m = Messenger::open(dir, None, ConnectOptions { server: None, fingerprint: None })?;
    let groups: Vec<Vec<u8>> = m
        .state()
        .groups
        .iter()
        .filter(|(_, g)| g.kind == GroupKind::Group)
        .filter_map(|(id, _)| hex::decode(id).ok())
        .collect();
    if groups.is_empty() {
        bail!("no groups to fill");
    }
    let now = m.now_ms();
    let from = m.public_key().0;
    let entries = (0..shape.history)
        .map(|i| {
            let at = now.saturating_sub((shape.history - i) as u64 * 1000);
            Entry {
                group_id: groups[i % groups.len()].clone(),
                from,
                text: format!("history entry {i}: a line of ordinary chat, about this long"),
                sent_at_ms: at,
                received_at_ms: at,
                outgoing: i % 3 == 0,
            }
        })
        .collect();
    m.inject_history_for_bench(entries)?;
    Ok(())
}

impl Messenger {
    /// Bench only: creates one group per element of `key_packages`, named `benchN`, with us
    /// and the members whose KeyPackages it holds, merged locally (no server, no Welcomes);
    /// saves once.
    fn bench_local_groups(&mut self, key_packages: Vec<Vec<Vec<u8>>>) -> anyhow::Result<()> {
        let _op = self.begin()?;
        for (i, kps) in key_packages.into_iter().enumerate() {
            let mut group_id = vec![0xbe; 16];
            group_id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            self.mls.create_group(&group_id)?;
            self.mls.add_members(&group_id, &kps)?;
            self.mls.merge_pending(&group_id)?;
            let meta = GroupMeta {
                name: format!("bench{i}"),
                kind: GroupKind::Group,
                active: true,
                history: Default::default(),
            };
            self.home.state.groups.insert(hex::encode(&group_id), meta);
        }
        self.persist()?;
        Ok(())
    }
}
