//! MLS: the client's group operations against their cryptographic floor.
//!
//! The floor of an operation is the sum of the asymmetric primitives RFC 9420 obliges it to run,
//! each timed in this run with the very implementations openmls uses (`openmls_rust_crypto`:
//! Ed25519 via ed25519-dalek; the suite's HPKE, X-Wing/HKDF-SHA256/AES-128-GCM, via qpq's provider,
//! [`crate::mls::QpqCrypto`], whose HPKE KEMs and AEADs are libcrux's) and,
//! for the envelope, X-Wing (ML-KEM-768 + X25519) via the x-wing crate. A last step sets the
//! hybrid suite against the classical DHKEM-X25519 one qpq spoke before: wire sizes and times. Hashing, symmetric encryption,
//! serialization and storage are left out on purpose: they are what `measured / floor` exposes.
//! The primitives are timed right before and right after each group size and averaged, so the
//! floor describes the same moments as the operations on a machine whose speed drifts.
//!
//! # Counting model
//! Primitives: S = Ed25519 sign, V = Ed25519 verify, E = HPKE seal (encap + AEAD), O = HPKE
//! open, K = HPKE key pair derivation (`DeriveKeyPair`: KDF + one X25519 base-point multiply).
//! A group of n members has a ratchet tree of depth d = ⌈log2 n⌉; the creator sits at leaf 0 and
//! member i at leaf i (openmls fills the leftmost free leaves in order). Leaf 0's filtered direct
//! path has d parent nodes, since every copath subtree holds a leaf. The lowest common ancestor of
//! leaves 0 and j is at level ⌊log2 j⌋ + 1, so a member at leaf j derives the d − ⌊log2 j⌋ node
//! keys from there to the root.
//! - create + add (n−1 KeyPackages, one commit, then merge): create signs its leaf (1 S, 1 K);
//!   each KeyPackage is verified before the add, its own and its leaf node's signature (2 V
//!   each); the commit carries a path (openmls's `add_members` forces one): new leaf (1 S, 1 K),
//!   d path keys (d K, in parallel), no path encryption since every copath leaf is new, the commit and the
//!   GroupInfo signed (2 S), GroupSecrets sealed to each new member (n−1 E).
//!   Total 4 S + 2(n−1) V + (d+2) K + (n−1) E.
//! - commit (the creator's self-update, then merge): after the adds only leaf 0's direct path is
//!   non-blank, so every copath resolution is the subtree's leaves: n−1 E in all, the level
//!   below the root alone holding n − 2^(d−1); new leaf and d path keys (d+1 K); leaf, commit and
//!   GroupInfo signed (3 S).
//! - process commit (member at leaf j): commit signature and the update path's leaf (2 V), the
//!   path secret at the common ancestor (1 O), node keys from there to the root (d − ⌊log2 j⌋ K).
//! - Welcome join (member at leaf j): GroupSecrets (1 O), GroupInfo signature plus every leaf of
//!   the ratchet tree (n + 1 V), node keys from the common ancestor (d − ⌊log2 j⌋ K).
//! - application message encrypt + decrypt: the sender signs, the receiver verifies (1 S + 1 V).
//! - envelope seal + open ([`crypto::hybrid`]): one X-Wing encapsulation plus one decapsulation.
//!
//! # Storage included (issue 12)
//! Each size runs twice. The rows without a suffix keep every client's openmls records in
//! memory ([`MlsStore`] without a database). The rows marked `qpq.db` give every timed client
//! its own client database in a temporary directory and, after each operation, do what the
//! messenger does: flush the changed records into one write transaction and commit it durably
//! (sealed records, redb, one fsync). Their floor is the crypto floor plus one durable write per
//! client that saved: a 4 KiB write + `sync_data` of the same disk, timed around the size like
//! the primitives (`fsync` in the row's extras). A durable write per operation is part of "storage
//! included": the messenger acknowledges nothing before it is on disk, and no storage design
//! avoids that one flush. Everything else the database costs (encoding, sealing, redb's pages
//! and its two-phase commit) is what `measured / floor` exposes.
//!
//! Parallelism: openmls (rayon) encrypts the levels of an update path in parallel, each level's
//! resolution in turn, and derives path node keys in parallel. For those steps the floor charges
//! the critical path on this machine's cores: max(largest level, ⌈total / cores⌉) seals and
//! ⌈path keys / cores⌉ derivations. Everything else (KeyPackage checks, Welcome secrets, tree
//! verification on join) runs on one thread and is charged in full.
//!
//! # The commit's bytes (issue 12)
//! The floor leaves out work that grows with the message, yet RFC 9420 obliges a receiver to do
//! it once for any commit: open the PrivateMessage (AEAD, §6.3), check the signature over the
//! whole FramedContentTBS (Ed25519 hashes it with SHA-512, §6.1), and hash the commit into the
//! confirmed transcript hash (SHA-256, §8.2). A hybrid commit at 128 members is ~159 KB
//! (an X-Wing ciphertext per copath leaf), so this is not small next to the floor. The process
//! commit rows are therefore reported a second time against the floor plus the commit's length
//! times the cost per byte of those three passes (`bulk_per_byte`, timed like the primitives
//! over [`BULK_LEN`] bytes): what no implementation can avoid, so the ratio of that row is the
//! part of the gap that storage, encoding and openmls's own work (tree hashes, copies) leave.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{HpkeCiphertext, SignatureScheme};
use rand::RngCore as _;
use x_wing::{Decapsulate as _, Decapsulator as _};

use super::{Bench, Row, Settings};
use crate::client::db::ClientDb;
use crate::crypto::hybrid::{self, HybridSecretKey};
use crate::crypto::statefile::StateKey;
use crate::mls::{CIPHERSUITE, CLASSICAL_CIPHERSUITE, Incoming, MlsClient, QpqCrypto};
use openmls::prelude::Ciphersuite;
use openmls_traits::OpenMlsProvider as _;

/// Bytes signed in the Ed25519 primitive timing: about a LeafNode's to-be-signed content.
const SIGNED_LEN: usize = 256;
/// Plaintext of the HPKE primitive timing: about an encrypted path secret / GroupSecrets.
const HPKE_PLAINTEXT_LEN: usize = 64;
/// Application message size.
const APP_MESSAGE_LEN: usize = 64;
/// Envelope payload size: a typical application message plus MLS framing.
const ENVELOPE_PAYLOAD_LEN: usize = 1024;
/// How long each primitive is timed, before and after each group size (bounded by
/// [`MAX_PRIMITIVE_OPS`] too).
const PRIMITIVE_BUDGET: Duration = Duration::from_millis(100);
const QUICK_PRIMITIVE_BUDGET: Duration = Duration::from_millis(20);
const MAX_PRIMITIVE_OPS: u64 = 100_000;
/// Repetitions per operation: groups of 1000 take seconds to build, so fewer there.
const REPS_SMALL: usize = 5;
const REPS_LARGE: usize = 2;
/// Group size from which [`REPS_LARGE`] applies.
const LARGE_GROUP: usize = 256;
/// Members whose join is timed per group size.
const JOINERS: usize = 3;
/// Repetitions of the envelope seal + open.
const MESSAGE_REPS: usize = 50;
/// Repetitions of the application message: enough for the client database's journal to fill
/// past its checkpoint mark about twice per side (an entry is ~1.4 KiB at 128 members, a
/// checkpoint comes every ~90), so the `qpq.db` row's mean carries the checkpoints' cost too
/// instead of a window that happens to fall between two of them.
const APP_MESSAGE_REPS: usize = 200;
/// Bytes written before each fsync of the durable-write floor.
const FSYNC_BLOCK: usize = 4096;
/// Bytes the per-byte cost of a commit's AEAD, signature hash and transcript hash is timed over.
const BULK_LEN: usize = 64 * 1024;

/// Group size of the hybrid-against-classical suite comparison (the commit goal is at
/// 128 members).
const SUITE_COMPARE_MEMBERS: usize = 128;
const QUICK_SUITE_COMPARE_MEMBERS: usize = 8;

pub fn steps(s: &Settings) -> u64 {
    s.mls_sizes.len() as u64 + 2
}

/// Mean seconds of each primitive, and the cores openmls's parallel steps can use.
#[derive(Debug, Clone, Copy)]
pub struct Primitives {
    pub sign: f64,
    pub verify: f64,
    pub hpke_seal: f64,
    pub hpke_open: f64,
    pub derive_keypair: f64,
    pub xwing_encaps: f64,
    pub xwing_decaps: f64,
    /// rayon's pool size (one thread per core).
    pub cores: u64,
    /// One durable 4 KiB write (write + `sync_data`) on the disk of the client databases.
    pub fsync: f64,
    /// Seconds per byte a receiver spends on a commit's bytes whatever it does (see the module
    /// docs): AES-128-GCM open + Ed25519 verify beyond a short message's + SHA-256.
    pub bulk_per_byte: f64,
}

impl Primitives {
    /// The mean of two timings of the same primitives.
    pub fn mean(&self, other: &Primitives) -> Primitives {
        let m = |a: f64, b: f64| (a + b) / 2.0;
        Primitives {
            sign: m(self.sign, other.sign),
            verify: m(self.verify, other.verify),
            hpke_seal: m(self.hpke_seal, other.hpke_seal),
            hpke_open: m(self.hpke_open, other.hpke_open),
            derive_keypair: m(self.derive_keypair, other.derive_keypair),
            xwing_encaps: m(self.xwing_encaps, other.xwing_encaps),
            xwing_decaps: m(self.xwing_decaps, other.xwing_decaps),
            cores: self.cores,
            fsync: m(self.fsync, other.fsync),
            bulk_per_byte: m(self.bulk_per_byte, other.bulk_per_byte),
        }
    }
}

/// How many of each primitive one operation needs (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCount {
    pub sign: u64,
    pub verify: u64,
    /// HPKE seals run one after another (Welcome GroupSecrets).
    pub hpke_seal: u64,
    pub hpke_open: u64,
    /// Key derivations run one after another (new leaf keys).
    pub derive_keypair: u64,
    /// Path secret encryptions: all levels of the path in parallel, each level's resolution in
    /// turn. Their total, and the largest level.
    pub path_seals: u64,
    pub path_seals_max_level: u64,
    /// Path node key derivations, all in parallel.
    pub path_derives: u64,
    /// Durable database writes (one per client that saves; `qpq.db` rows only).
    pub durable_writes: u64,
}

impl OpCount {
    /// HPKE seals on the critical path: no schedule on `cores` threads beats the larger of the
    /// biggest level and an even split of the total.
    pub fn critical_seals(&self, cores: u64) -> u64 {
        self.hpke_seal + self.path_seals_max_level.max(self.path_seals.div_ceil(cores.max(1)))
    }

    /// Key derivations on the critical path.
    pub fn critical_derives(&self, cores: u64) -> u64 {
        self.derive_keypair + self.path_derives.div_ceil(cores.max(1))
    }

    /// The floor in seconds.
    pub fn floor(&self, p: &Primitives) -> f64 {
        self.sign as f64 * p.sign
            + self.verify as f64 * p.verify
            + self.critical_seals(p.cores) as f64 * p.hpke_seal
            + self.hpke_open as f64 * p.hpke_open
            + self.critical_derives(p.cores) as f64 * p.derive_keypair
            + self.durable_writes as f64 * p.fsync
    }

    /// The same operation saved durably by `clients` clients.
    fn durable(self, clients: u64) -> OpCount {
        OpCount { durable_writes: clients, ..self }
    }

    fn annotate(&self, row: Row, cores: u64) -> Row {
        row.extra("n_sign", self.sign as f64)
            .extra("n_verify", self.verify as f64)
            .extra("n_hpke_seal", (self.hpke_seal + self.path_seals) as f64)
            .extra("n_hpke_seal_critical", self.critical_seals(cores) as f64)
            .extra("n_hpke_open", self.hpke_open as f64)
            .extra("n_derive", (self.derive_keypair + self.path_derives) as f64)
            .extra("n_fsync", self.durable_writes as f64)
    }
}

/// d = ⌈log2 n⌉, the ratchet tree depth of an n-member group.
pub fn tree_depth(n: usize) -> u64 {
    (n.max(1) as u64).next_power_of_two().trailing_zeros() as u64
}

/// Node keys a member at `leaf` derives from a path secret of leaf 0's path.
pub fn keys_from_lca(n: usize, leaf: usize) -> u64 {
    let lca_level = (leaf.max(1) as u64).ilog2() as u64 + 1;
    (tree_depth(n) + 1).saturating_sub(lca_level)
}

/// Sizes of leaf 0's copath resolutions, level 1 up to the root, when every parent node off
/// leaf 0's direct path is blank: the leaves of each sibling subtree.
pub fn copath_leaves(n: usize) -> Vec<u64> {
    let n = n as u64;
    (1..=tree_depth(n as usize))
        .map(|level| {
            let (lo, hi) = (1u64 << (level - 1), 1u64 << level);
            hi.min(n).saturating_sub(lo)
        })
        .collect()
}

pub fn create_add(n: usize) -> OpCount {
    let added = n as u64 - 1;
    OpCount {
        sign: 4,
        verify: 2 * added,
        hpke_seal: added,
        derive_keypair: 2,
        path_derives: tree_depth(n),
        ..OpCount::default()
    }
}

pub fn commit(n: usize) -> OpCount {
    let levels = copath_leaves(n);
    OpCount {
        sign: 3,
        derive_keypair: 1,
        path_seals: levels.iter().sum(),
        path_seals_max_level: levels.iter().copied().max().unwrap_or(0),
        path_derives: tree_depth(n),
        ..OpCount::default()
    }
}

pub fn process_commit(n: usize, leaf: usize) -> OpCount {
    OpCount { verify: 2, hpke_open: 1, path_derives: keys_from_lca(n, leaf), ..OpCount::default() }
}

pub fn join(n: usize, leaf: usize) -> OpCount {
    OpCount { verify: n as u64 + 1, hpke_open: 1, path_derives: keys_from_lca(n, leaf), ..OpCount::default() }
}

pub fn app_message() -> OpCount {
    OpCount { sign: 1, verify: 1, ..OpCount::default() }
}

pub async fn run(b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
    let budget = if b.settings.quick { QUICK_PRIMITIVE_BUDGET } else { PRIMITIVE_BUDGET };
    let mut rows = Vec::new();
    let mut first = None;
    let disk = tempfile::tempdir()?;
    for &n in &b.settings.mls_sizes {
        b.step(&format!("mls: group of {n}"));
        // Let the progress bar draw before a long synchronous stretch.
        tokio::task::yield_now().await;
        // Primitives are timed right before and after each size and averaged: on a shared
        // machine their speed drifts, and the floor must describe the same moments.
        let before = primitives(budget, disk.path())?;
        let mut ops = group_ops(n, b.settings.quick, None)?;
        ops.extend(group_ops(n, b.settings.quick, Some(disk.path()))?);
        let p = before.mean(&primitives(budget, disk.path())?);
        rows.extend(ops.iter().flat_map(|m| m.rows(&p)));
        first.get_or_insert(p);
        b.done_step();
    }

    b.step("mls: hybrid suite against classical");
    tokio::task::yield_now().await;
    let members = if b.settings.quick { QUICK_SUITE_COMPARE_MEMBERS } else { SUITE_COMPARE_MEMBERS };
    rows.extend(suite_comparison(members, if b.settings.quick { 1 } else { REPS_SMALL })?);
    b.done_step();

    b.step("mls: envelope");
    let before = primitives(budget, disk.path())?;
    let envelope = envelope_op(if b.settings.quick { 5 } else { MESSAGE_REPS })?;
    let p = before.mean(&primitives(budget, disk.path())?);
    rows.push(
        Row::new(format!("envelope seal + open, {ENVELOPE_PAYLOAD_LEN} B"), ms(envelope), "ms").against(
            "x-wing encaps + decaps",
            Some(ms(p.xwing_encaps + p.xwing_decaps)),
            "ms",
        ),
    );
    let first = first.unwrap_or(p);
    for (name, v) in [
        ("ed25519_sign_us", first.sign),
        ("ed25519_verify_us", first.verify),
        ("hpke_suite_seal_us", first.hpke_seal),
        ("hpke_suite_open_us", first.hpke_open),
        ("hpke_suite_derive_keypair_us", first.derive_keypair),
        ("xwing_encaps_us", p.xwing_encaps),
        ("xwing_decaps_us", p.xwing_decaps),
        ("fsync_4KiB_us", first.fsync),
        ("commit_bytes_per_KiB_us", first.bulk_per_byte * 1024.0),
    ] {
        b.record_reference(name, v * 1e6);
    }
    // What the suite's HPKE cost with RustCrypto alone (openmls_rust_crypto, the x-wing crate),
    // the provider qpq used before src/mls/crypto.rs.
    let (seal, open, derive) = hpke_timings(&RustCrypto::default(), budget)?;
    b.record_reference("hpke_rustcrypto_seal_us", seal * 1e6);
    b.record_reference("hpke_rustcrypto_open_us", open * 1e6);
    b.record_reference("hpke_rustcrypto_derive_keypair_us", derive * 1e6);
    b.done_step();
    Ok(rows)
}

fn ms(secs: f64) -> f64 {
    secs * 1e3
}

/// The goals for MLS operations.
#[derive(Debug, Clone, Copy)]
enum OpGoal {
    None,
    /// measured / floor at most this (at 128 members).
    RatioAtMost(f64),
    /// Wall time under this many seconds (joining 1000 members).
    SecondsUnder(f64),
}

/// One timed operation, before its floor is known.
struct Measured {
    case: String,
    /// Mean seconds per operation.
    secs: f64,
    /// The operation counts of each timed instance (joins differ by leaf); the floor is their mean.
    counts: Vec<OpCount>,
    goal: OpGoal,
    /// The length of the message each instance processed, when a second row reports it
    /// against the floor plus its bytes (see the module docs).
    bytes: Option<usize>,
}

impl Measured {
    fn new(case: String, secs: f64, count: OpCount, goal: OpGoal) -> Measured {
        Measured { case, secs, counts: vec![count], goal, bytes: None }
    }

    /// The rows of this measurement: against the floor, and (with [`Measured::bytes`]) against
    /// the floor plus the message's bytes.
    fn rows(&self, p: &Primitives) -> Vec<Row> {
        let row = self.row(p);
        let Some(bytes) = self.bytes else { return vec![row] };
        let floor = self.counts.iter().map(|c| c.floor(p)).sum::<f64>() / self.counts.len().max(1) as f64;
        let on_bytes = bytes as f64 * p.bulk_per_byte;
        let with_bytes = Row::new(self.case.clone(), ms(self.secs), "ms")
            .against(
                "floor + the commit's bytes once (AEAD, signature, transcript)",
                Some(ms(floor + on_bytes)),
                "ms",
            )
            .extra("commit_bytes", bytes as f64)
            .extra("bytes_ms", ms(on_bytes));
        vec![row, with_bytes]
    }

    fn row(&self, p: &Primitives) -> Row {
        let floor = self.counts.iter().map(|c| c.floor(p)).sum::<f64>() / self.counts.len().max(1) as f64;
        let durable = self.counts.first().is_some_and(|c| c.durable_writes > 0);
        let reference = if durable { "crypto floor + fsync per saving client" } else { "crypto floor" };
        let row = Row::new(self.case.clone(), ms(self.secs), "ms").against(reference, Some(ms(floor)), "ms");
        let row = if durable {
            let crypto =
                self.counts.iter().map(|c| OpCount { durable_writes: 0, ..*c }.floor(p)).sum::<f64>()
                    / self.counts.len().max(1) as f64;
            row.extra("crypto_floor_ms", ms(crypto))
                .extra("fsync_ms", ms(p.fsync))
                .extra("ratio_to_crypto_floor", self.secs / crypto.max(f64::MIN_POSITIVE))
        } else {
            row
        };
        let row = match self.goal {
            OpGoal::None => row,
            OpGoal::RatioAtMost(max) => {
                let met = row.ratio.is_some_and(|r| r <= max);
                row.goal(format!("<= {max}x"), met)
            }
            OpGoal::SecondsUnder(max) => row.goal(format!("< {max} s"), self.secs < max),
        };
        match self.counts.first() {
            Some(c) => c.annotate(row, p.cores),
            None => row,
        }
    }
}

/// The client database of one timed client, saved after each operation as the messenger
/// saves: the changed openmls records in one durable write.
struct Durable {
    db: ClientDb,
    _dir: tempfile::TempDir,
}

impl Durable {
    fn create(parent: &std::path::Path) -> anyhow::Result<Durable> {
        let dir = tempfile::tempdir_in(parent)?;
        let db = ClientDb::create(dir.path(), &StateKey::unprotected(), &crate::client::db::DbKey::random())?;
        Ok(Durable { db, _dir: dir })
    }

    fn save(&self, client: &MlsClient) -> anyhow::Result<()> {
        let mut w = self.db.write()?;
        client.store().flush(&mut w)?;
        w.commit()?;
        Ok(())
    }
}

/// Saves `client` if it has a database (`qpq.db` rows), else nothing.
fn save(db: Option<&Durable>, client: &MlsClient) -> anyhow::Result<()> {
    db.map_or(Ok(()), |d| d.save(client))
}

/// The timed part of "process commit": the receiver applies the commit and saves. Never
/// inlined, so a profiler can isolate it by name, e.g.
/// `valgrind --tool=callgrind --dump-before=*process_commit_saved* --dump-after=*process_commit_saved*`.
#[inline(never)]
fn process_commit_saved(
    receiver: &mut MlsClient,
    db: Option<&Durable>,
    gid: &[u8],
    commit: &[u8],
) -> anyhow::Result<Incoming> {
    let incoming = receiver.process(gid, commit)?;
    save(db, receiver)?;
    Ok(incoming)
}

/// Times all group operations at size `n`; with `disk`, the timed clients save to client
/// databases under it after each operation (see the module header).
fn group_ops(n: usize, quick: bool, disk: Option<&std::path::Path>) -> anyhow::Result<Vec<Measured>> {
    let reps = if quick {
        1
    } else if n >= LARGE_GROUP {
        REPS_LARGE
    } else {
        REPS_SMALL
    };
    let mut creator = MlsClient::new(&rand::random())?;
    let mut members: Vec<MlsClient> =
        (1..n).map(|_| MlsClient::new(&rand::random())).collect::<Result<_, _>>()?;
    // Members at the last leaves join (and the last one receives); they and the creator save.
    let joiners = JOINERS.min(n - 1);
    let durable = |_: ()| disk.map(Durable::create).transpose();
    let creator_db = durable(())?;
    let mut member_dbs: Vec<Option<Durable>> = (1..n).map(|_| None).collect();
    for k in 0..joiners {
        if let Some(slot) = member_dbs.get_mut(n - 2 - k) {
            *slot = durable(())?;
        }
    }
    let suffix = if disk.is_some() { ", qpq.db" } else { "" };
    let saving = |count: OpCount, clients: u64| if disk.is_some() { count.durable(clients) } else { count };
    let ratio_goal = match (n, disk) {
        (128, None) => OpGoal::RatioAtMost(1.5),
        _ => OpGoal::None,
    };
    // Issue 12: at 128 members with storage included.
    let (process_goal, message_goal) = match (n, disk) {
        (128, Some(_)) => (OpGoal::RatioAtMost(2.0), OpGoal::RatioAtMost(3.0)),
        _ => (ratio_goal, ratio_goal),
    };

    // create + add: a fresh group per repetition; the last one is used below.
    let mut create_total = 0.0;
    let mut welcome = Vec::new();
    let mut gid = Vec::new();
    for r in 0..reps {
        let kps = members
            .iter()
            .map(|m| m.key_packages(1).map(|mut v| v.remove(0).bytes))
            .collect::<Result<Vec<_>, _>>()?;
        // Their KeyPackages' keys are saved before anything is timed.
        for (m, db) in members.iter().zip(&member_dbs) {
            save(db.as_ref(), m)?;
        }
        gid = format!("bench-{n}-{r}").into_bytes();
        let t = Instant::now();
        creator.create_group(&gid)?;
        let pending = creator.add_members(&gid, &kps)?;
        creator.merge_pending(&gid)?;
        save(creator_db.as_ref(), &creator)?;
        create_total += t.elapsed().as_secs_f64();
        welcome = pending.welcome.context("an add produces a welcome")?;
    }
    let mut out = vec![Measured::new(
        format!("create + add, {n} members{suffix}"),
        create_total / reps as f64,
        saving(create_add(n), 1),
        ratio_goal,
    )];

    // Welcome join by the last members (leaves n-1, n-2, ...); the first of them stays in.
    let mut join_time = 0.0;
    let mut counts = Vec::with_capacity(joiners);
    for k in 0..joiners {
        let leaf = n - 1 - k;
        let member = members.get_mut(leaf - 1).context("a joiner")?;
        let db = member_dbs.get(leaf - 1).and_then(Option::as_ref);
        let t = Instant::now();
        member.join(&welcome)?;
        save(db, member)?;
        join_time += t.elapsed().as_secs_f64();
        counts.push(saving(join(n, leaf), 1));
    }
    let goal = if n == 1000 { OpGoal::SecondsUnder(2.0) } else { ratio_goal };
    out.push(Measured {
        case: format!("welcome join, {n} members{suffix}"),
        secs: join_time / joiners as f64,
        counts,
        goal,
        bytes: None,
    });

    // Commit by the creator, processed by the member at the last leaf.
    let receiver = members.last_mut().context("a group has at least two members")?;
    let receiver_db = member_dbs.last().and_then(Option::as_ref);
    let (mut commit_time, mut process_time, mut commit_bytes) = (0.0, 0.0, 0);
    for _ in 0..reps {
        let t = Instant::now();
        let pending = creator.self_update(&gid)?;
        creator.merge_pending(&gid)?;
        save(creator_db.as_ref(), &creator)?;
        commit_time += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let incoming = process_commit_saved(receiver, receiver_db, &gid, &pending.commit)?;
        process_time += t.elapsed().as_secs_f64();
        commit_bytes += pending.commit.len();
        anyhow::ensure!(matches!(incoming, Incoming::Commit { .. }), "expected a commit, got {incoming:?}");
    }
    out.push(Measured::new(
        format!("commit, {n} members{suffix}"),
        commit_time / reps as f64,
        saving(commit(n), 1),
        ratio_goal,
    ));
    out.push(Measured {
        bytes: Some(commit_bytes / reps.max(1)),
        ..Measured::new(
            format!("process commit, {n} members{suffix}"),
            process_time / reps as f64,
            saving(process_commit(n, n - 1), 1),
            process_goal,
        )
    });

    // Application messages: creator encrypts, the receiver decrypts.
    let reps = if quick { 5 } else { APP_MESSAGE_REPS };
    let text = vec![0x61u8; APP_MESSAGE_LEN];
    let t = Instant::now();
    for _ in 0..reps {
        let ct = creator.encrypt(&gid, &text)?;
        save(creator_db.as_ref(), &creator)?;
        let incoming = receiver.process(&gid, &ct)?;
        save(receiver_db, receiver)?;
        anyhow::ensure!(
            matches!(&incoming, Incoming::Application { plaintext, .. } if *plaintext == text),
            "application message did not round-trip"
        );
    }
    out.push(Measured::new(
        format!("app message encrypt + decrypt, {n} members{suffix}"),
        t.elapsed().as_secs_f64() / reps as f64,
        saving(app_message(), 2),
        message_goal,
    ));
    Ok(out)
}

/// What one suite costs at a group size: bytes on the wire and seconds per operation.
struct SuiteCost {
    key_package_bytes: usize,
    commit_bytes: usize,
    welcome_bytes: usize,
    /// A self-update right after the adds: every parent off the creator's path is blank, so the
    /// path secrets are sealed to every other leaf (n - 1 seals).
    commit_secs: f64,
    /// A self-update after one member in each of the creator's copath subtrees has committed
    /// (⌈log2 n⌉ - 1 commits): every copath node is a parent with a key, so d seals.
    settled_commit_secs: f64,
    join_secs: f64,
}

/// Builds a group of `n` under `suite` with openmls directly (the same code for both suites,
/// since qpq's own client speaks only [`CIPHERSUITE`]) and qpq's crypto provider: a KeyPackage,
/// the Welcome of adding the last member to the other `n - 1`, that member's join, a
/// self-update commit at `n` on the fresh tree, then again once the tree has settled (see
/// [`SuiteCost`]).
fn suite_cost(suite: Ciphersuite, n: usize, reps: usize) -> anyhow::Result<SuiteCost> {
    use openmls::prelude::{
        BasicCredential, CredentialWithKey, KeyPackage, LeafNodeParameters, MlsGroup, MlsGroupCreateConfig,
        MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, StagedWelcome,
    };
    use openmls_basic_credential::SignatureKeyPair;
    use tls_codec::{Deserialize as _, Serialize as _};

    use crate::client::db::mls::DbProvider;

    type Member = (DbProvider, SignatureKeyPair, CredentialWithKey);
    let err = |what: &'static str| move |e: &dyn std::fmt::Debug| anyhow::anyhow!("{what}: {e:?}");
    let member = || -> anyhow::Result<Member> {
        let provider = DbProvider::default();
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).map_err(|e| err("keygen")(&e))?;
        signer.store(provider.storage()).map_err(|e| err("store signer")(&e))?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(signer.public().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Ok((provider, signer, credential))
    };
    let key_package = |m: &Member| {
        KeyPackage::builder()
            .build(suite, &m.0, &m.1, m.2.clone())
            .map(|b| b.key_package().clone())
            .map_err(|e| err("key package")(&e))
    };
    let join_config = MlsGroupJoinConfig::builder().use_ratchet_tree_extension(true).build();
    let join = |m: &Member, welcome: &[u8]| -> anyhow::Result<MlsGroup> {
        let MlsMessageBodyIn::Welcome(w) =
            MlsMessageIn::tls_deserialize_exact(welcome).map_err(|e| err("parse welcome")(&e))?.extract()
        else {
            anyhow::bail!("expected a welcome");
        };
        StagedWelcome::new_from_welcome(&m.0, &join_config, w, None)
            .map_err(|e| err("stage welcome")(&e))?
            .into_group(&m.0)
            .map_err(|e| err("join")(&e))
    };
    let process = |m: &Member, group: &mut MlsGroup, commit: &[u8]| -> anyhow::Result<()> {
        let message = MlsMessageIn::tls_deserialize_exact(commit)
            .map_err(|e| err("parse commit")(&e))?
            .try_into_protocol_message()
            .map_err(|e| err("protocol message")(&e))?;
        let processed = group.process_message(&m.0, message).map_err(|e| err("process commit")(&e))?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            anyhow::bail!("expected a commit");
        };
        group.merge_staged_commit(&m.0, *staged).map_err(|e| err("merge")(&e))
    };
    let creator = member()?;
    let config = MlsGroupCreateConfig::builder().ciphersuite(suite).use_ratchet_tree_extension(true).build();
    let mut group = MlsGroup::new(&creator.0, &creator.1, &config, creator.2.clone())
        .map_err(|e| err("create group")(&e))?;
    // Member i (0-based) of `others` sits at leaf i + 1.
    let others = (2..n).map(|_| member()).collect::<Result<Vec<_>, _>>()?;
    let others_kps = others.iter().map(key_package).collect::<Result<Vec<_>, _>>()?;
    // Every commit after the first add, in order: what a member joining by its Welcome replays.
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut first_welcome = Vec::new();
    if !others_kps.is_empty() {
        let (_, welcome, _) =
            group.add_members(&creator.0, &creator.1, &others_kps).map_err(|e| err("add members")(&e))?;
        group.merge_pending_commit(&creator.0).map_err(|e| err("merge")(&e))?;
        first_welcome = welcome.tls_serialize_detached().map_err(|e| err("serialize")(&e))?;
    }
    let last = member()?;
    let last_kp = key_package(&last)?;
    let key_package_bytes = last_kp.tls_serialize_detached().map_err(|e| err("serialize")(&e))?.len();
    let (commit, welcome, _) =
        group.add_members(&creator.0, &creator.1, &[last_kp]).map_err(|e| err("add member")(&e))?;
    group.merge_pending_commit(&creator.0).map_err(|e| err("merge")(&e))?;
    log.push(commit.tls_serialize_detached().map_err(|e| err("serialize")(&e))?);
    let welcome = welcome.tls_serialize_detached().map_err(|e| err("serialize")(&e))?;
    let t = Instant::now();
    join(&last, &welcome)?;
    let join_secs = t.elapsed().as_secs_f64();
    let self_update = |group: &mut MlsGroup| -> anyhow::Result<(f64, Vec<u8>)> {
        let t = Instant::now();
        let bundle = group
            .self_update(&creator.0, &creator.1, LeafNodeParameters::default())
            .map_err(|e| err("self update")(&e))?;
        group.merge_pending_commit(&creator.0).map_err(|e| err("merge")(&e))?;
        let secs = t.elapsed().as_secs_f64();
        Ok((secs, bundle.commit().tls_serialize_detached().map_err(|e| err("serialize")(&e))?))
    };
    let (mut commit_bytes, mut commit_total) = (0, 0.0);
    for _ in 0..reps {
        let (secs, commit) = self_update(&mut group)?;
        commit_total += secs;
        commit_bytes = commit.len();
        log.push(commit);
    }

    // Settle the tree: the members at leaves 2^(d-1), ..., 4, 2 (one in each of the creator's
    // copath subtrees above leaf 1) join, catch up and commit in turn, each commit processed by
    // the creator and the committers still to come.
    let leaves: Vec<usize> = (1..tree_depth(n)).rev().map(|k| 1usize << k).filter(|&l| l < n - 1).collect();
    let mut committers = Vec::new();
    for &leaf in &leaves {
        let m = others.get(leaf - 1).context("a member at every leaf below n - 1")?;
        let mut g = join(m, &first_welcome)?;
        for c in &log {
            process(m, &mut g, c)?;
        }
        committers.push((m, g));
    }
    for i in 0..committers.len() {
        let (done, rest) = committers.split_at_mut(i + 1);
        let (m, g) = done.last_mut().context("committer")?;
        let bundle =
            g.self_update(&m.0, &m.1, LeafNodeParameters::default()).map_err(|e| err("self update")(&e))?;
        g.merge_pending_commit(&m.0).map_err(|e| err("merge")(&e))?;
        let commit = bundle.commit().tls_serialize_detached().map_err(|e| err("serialize")(&e))?;
        process(&creator, &mut group, &commit)?;
        for (m, g) in rest {
            process(m, g, &commit)?;
        }
    }
    let mut settled_total = 0.0;
    for _ in 0..reps {
        settled_total += self_update(&mut group)?.0;
    }
    Ok(SuiteCost {
        key_package_bytes,
        commit_bytes,
        welcome_bytes: welcome.len(),
        commit_secs: commit_total / reps.max(1) as f64,
        settled_commit_secs: settled_total / reps.max(1) as f64,
        join_secs,
    })
}

/// The hybrid suite qpq speaks against the classical one it spoke before, at `n` members: sizes
/// of a KeyPackage, a commit and a Welcome, and the time of a commit and a join.
fn suite_comparison(n: usize, reps: usize) -> anyhow::Result<Vec<Row>> {
    let pq = suite_cost(CIPHERSUITE, n, reps)?;
    let classical = suite_cost(CLASSICAL_CIPHERSUITE, n, reps)?;
    let vs = "classical x25519 suite";
    let commit_goal = (n == 128).then_some(2.0);
    let mut commit = Row::new(format!("pq suite commit, {n} members"), ms(pq.commit_secs), "ms").against(
        vs,
        Some(ms(classical.commit_secs)),
        "ms",
    );
    if let Some(max) = commit_goal {
        let met = commit.ratio.is_some_and(|r| r <= max);
        commit = commit.goal(format!("<= {max}x"), met);
    }
    let settled =
        Row::new(format!("pq suite commit, {n} members, settled tree"), ms(pq.settled_commit_secs), "ms")
            .against(vs, Some(ms(classical.settled_commit_secs)), "ms");
    Ok(vec![
        Row::new("pq suite key package", pq.key_package_bytes as f64, "B").against(
            vs,
            Some(classical.key_package_bytes as f64),
            "B",
        ),
        Row::new(format!("pq suite commit, {n} members"), pq.commit_bytes as f64, "B").against(
            vs,
            Some(classical.commit_bytes as f64),
            "B",
        ),
        Row::new(format!("pq suite welcome, joining {n} members"), pq.welcome_bytes as f64, "B").against(
            vs,
            Some(classical.welcome_bytes as f64),
            "B",
        ),
        commit,
        settled,
        Row::new(format!("pq suite welcome join, {n} members"), ms(pq.join_secs), "ms").against(
            vs,
            Some(ms(classical.join_secs)),
            "ms",
        ),
    ])
}

/// Mean seconds of one envelope seal + open of [`ENVELOPE_PAYLOAD_LEN`] bytes.
fn envelope_op(reps: usize) -> anyhow::Result<f64> {
    let identity: [u8; 32] = rand::random();
    let secret = HybridSecretKey::generate();
    let public = secret.public_key();
    let payload = vec![0x42u8; ENVELOPE_PAYLOAD_LEN];
    let t = Instant::now();
    for _ in 0..reps {
        let sealed = hybrid::seal(&identity, &public, &payload);
        let opened = hybrid::open(&identity, &secret, &sealed)?;
        anyhow::ensure!(opened == payload, "envelope did not round-trip");
    }
    Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
}

/// Mean seconds per call of `f`, run for `budget` (at most [`MAX_PRIMITIVE_OPS`] calls) after a
/// short warm-up.
fn time_mean(budget: Duration, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while n < MAX_PRIMITIVE_OPS && start.elapsed() < budget {
        f()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n.max(1) as f64)
}

fn crypto_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("{what} failed: {e:?}")
}

/// Mean seconds of one durable [`FSYNC_BLOCK`]-byte write in a file under `dir`.
fn fsync_floor(budget: Duration, dir: &std::path::Path) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt as _;
    let file = tempfile::tempfile_in(dir)?;
    let block = vec![0x33u8; FSYNC_BLOCK];
    file.write_all_at(&block, 0)?;
    file.sync_all()?;
    time_mean(budget, || {
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        Ok(())
    })
}

/// Mean seconds of one HPKE seal, open and key pair derivation of the suite by `crypto`.
pub fn hpke_timings(crypto: &impl OpenMlsCrypto, budget: Duration) -> anyhow::Result<(f64, f64, f64)> {
    // `HpkeConfig` is not Copy; building it is free.
    let hpke = || CIPHERSUITE.hpke_config();
    let mut ikm = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut ikm);
    let keypair = crypto.derive_hpke_keypair(hpke(), &ikm).map_err(|e| crypto_err("derive", e))?;
    let derive = time_mean(budget, || {
        ikm[0] = ikm[0].wrapping_add(1);
        crypto.derive_hpke_keypair(hpke(), &ikm).map(drop).map_err(|e| crypto_err("derive", e))
    })?;
    let plaintext = vec![0x29u8; HPKE_PLAINTEXT_LEN];
    let info = b"qpq bench";
    let sealed: HpkeCiphertext = crypto
        .hpke_seal(hpke(), &keypair.public, info, b"", &plaintext)
        .map_err(|e| crypto_err("hpke seal", e))?;
    let seal = time_mean(budget, || {
        crypto
            .hpke_seal(hpke(), &keypair.public, info, b"", &plaintext)
            .map(drop)
            .map_err(|e| crypto_err("hpke seal", e))
    })?;
    let open = time_mean(budget, || {
        crypto
            .hpke_open(hpke(), &sealed, &keypair.private, info, b"")
            .map(drop)
            .map_err(|e| crypto_err("hpke open", e))
    })?;
    Ok((seal, open, derive))
}

/// Times every primitive of the counting model: Ed25519 by RustCrypto, the suite's HPKE by
/// qpq's provider ([`QpqCrypto`]), as openmls runs them.
pub fn primitives(budget: Duration, dir: &std::path::Path) -> anyhow::Result<Primitives> {
    let crypto = RustCrypto::default();
    let message = vec![0x17u8; SIGNED_LEN];
    let (sk, pk) = crypto.signature_key_gen(SignatureScheme::ED25519).map_err(|e| crypto_err("keygen", e))?;
    let sig = crypto.sign(SignatureScheme::ED25519, &message, &sk).map_err(|e| crypto_err("sign", e))?;
    let sign = time_mean(budget, || {
        crypto.sign(SignatureScheme::ED25519, &message, &sk).map(drop).map_err(|e| crypto_err("sign", e))
    })?;
    let verify = time_mean(budget, || {
        crypto
            .verify_signature(SignatureScheme::ED25519, &message, &pk, &sig)
            .map_err(|e| crypto_err("verify", e))
    })?;

    let (hpke_seal, hpke_open, derive_keypair) = hpke_timings(&QpqCrypto::default(), budget)?;

    let mut seed = [0u8; x_wing::DECAPSULATION_KEY_SIZE];
    rand::thread_rng().fill_bytes(&mut seed);
    let dk = x_wing::DecapsulationKey::from(seed);
    let ek = dk.encapsulation_key().clone();
    let mut randomness = [0u8; x_wing::ENCAPSULATION_RANDOMNESS_SIZE];
    let xwing_encaps = time_mean(budget, || {
        rand::thread_rng().fill_bytes(&mut randomness);
        let _ = ek.encapsulate_deterministic(&randomness.into());
        Ok(())
    })?;
    let (ct, _) = ek.encapsulate_deterministic(&randomness.into());
    let xwing_decaps = time_mean(budget, || {
        let _ = dk.decapsulate(&ct);
        Ok(())
    })?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let fsync = fsync_floor(budget, dir)?;
    let bulk_per_byte = bulk_per_byte(budget, (&crypto, &sk, &pk), verify)?;
    Ok(Primitives {
        sign,
        verify,
        hpke_seal,
        hpke_open,
        derive_keypair,
        xwing_encaps,
        xwing_decaps,
        cores,
        fsync,
        bulk_per_byte,
    })
}

/// [`Primitives::bulk_per_byte`]: each pass timed over [`BULK_LEN`] bytes, by the
/// implementations openmls uses (Ed25519 from `crypto`, the suite's AEAD and hash from qpq's
/// provider); `verify` is the short message's verify time, taken off the long one's.
fn bulk_per_byte(
    budget: Duration,
    (crypto, sk, pk): (&RustCrypto, &[u8], &[u8]),
    verify: f64,
) -> anyhow::Result<f64> {
    use openmls_traits::types::{AeadType, HashType};
    let suite = QpqCrypto::default();
    let long = vec![0x17u8; BULK_LEN];
    let sig = crypto.sign(SignatureScheme::ED25519, &long, sk).map_err(|e| crypto_err("sign", e))?;
    let verify_long = time_mean(budget, || {
        crypto
            .verify_signature(SignatureScheme::ED25519, &long, pk, &sig)
            .map_err(|e| crypto_err("verify", e))
    })?;
    let (key, nonce) = ([7u8; 16], [9u8; 12]);
    let sealed = suite
        .aead_encrypt(AeadType::Aes128Gcm, &key, &long, &nonce, &[])
        .map_err(|e| crypto_err("aead", e))?;
    let open = time_mean(budget, || {
        suite
            .aead_decrypt(AeadType::Aes128Gcm, &key, &sealed, &nonce, &[])
            .map(drop)
            .map_err(|e| crypto_err("aead", e))
    })?;
    let hash = time_mean(budget, || {
        suite.hash(HashType::Sha2_256, &long).map(drop).map_err(|e| crypto_err("hash", e))
    })?;
    Ok(((verify_long - verify).max(0.0) + open + hash) / BULK_LEN as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_depth_is_ceil_log2() {
        assert_eq!(tree_depth(2), 1);
        assert_eq!(tree_depth(16), 4);
        assert_eq!(tree_depth(17), 5);
        assert_eq!(tree_depth(128), 7);
        assert_eq!(tree_depth(1000), 10);
    }

    #[test]
    fn members_derive_keys_from_their_common_ancestor_with_leaf_0() {
        // Leaf 1 shares leaf 0's lowest parent: it derives the whole path.
        assert_eq!(keys_from_lca(16, 1), 4);
        // Leaves 8..15 meet leaf 0 at the root only.
        assert_eq!(keys_from_lca(16, 15), 1);
        assert_eq!(keys_from_lca(16, 8), 1);
        assert_eq!(keys_from_lca(16, 4), 2);
        assert_eq!(keys_from_lca(2, 1), 1);
    }

    #[test]
    fn join_verifies_every_leaf_and_the_group_info() {
        assert_eq!(join(128, 127).verify, 129);
        assert_eq!(create_add(128).hpke_seal, 127);
    }

    #[test]
    fn a_commit_seals_to_every_other_leaf_with_the_largest_level_on_the_critical_path() {
        assert_eq!(copath_leaves(128), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(copath_leaves(1000), vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 488]);
        let c = commit(128);
        assert_eq!(c.path_seals, 127);
        assert_eq!(c.critical_seals(1), 127);
        assert_eq!(c.critical_seals(2), 64);
        assert_eq!(c.critical_seals(8), 64);
        assert_eq!(commit(2).critical_seals(2), 1);
    }
}
