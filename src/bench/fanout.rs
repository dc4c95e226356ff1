//! Group messages end to end (issue 11, item 5): a real [`Messenger`] sends application
//! messages to groups of 2, 100 and 1000 members (`--fanout-sizes`), through `enqueueFanout`.
//!
//! Per message, and each against the 2-member figure of the same run:
//! - the sender's CPU time: user + system CPU of the thread that runs the messenger
//!   (/proc/thread-self/stat; MLS encryption, state saves, RPC encoding), over as many
//!   messages as it takes to use half a second of it. The in-process server and the QUIC
//!   endpoints run on other threads and are not counted;
//! - bytes uploaded: UDP bytes the messenger's connections sent (QUIC stats), all headers and
//!   acks included;
//! - bytes the server stores: the store's quota count (`stored_bytes`), which charges a
//!   fanned-out payload once and [`crate::limits::FANOUT_ENTRY_BYTES`] per recipient.
//!
//! Setup, not measured: members beyond the sender run no client. Their KeyPackages are made in
//! this process and the sender adds them to its MLS group directly (one commit, merged), so no
//! Welcome is sent: a Welcome carrying a 1000-member ratchet tree is larger than a payload may be.
//!
//! Goals (issue 11): 1000 members cost the sender at most 2x the CPU of 2 members; upload and
//! storage per message at most payload + 64 bytes x recipients.

use anyhow::Context as _;

use super::{Bench, Row, Settings};
use crate::client::messenger::{ConnectOptions, Messenger, Target};
use crate::client::state::Unlock;
use crate::crypto::identity::Identity;

use crate::mls::MlsClient;

/// Issue 11 goal: CPU per message at the largest size / at 2 members.
const CPU_GOAL: f64 = 2.0;
/// Issue 11 goal: bytes per recipient allowed above the payload, uploaded and stored.
const PER_RECIPIENT_GOAL: f64 = 64.0;
/// Text of every measured message.
const TEXT_LEN: usize = 200;
/// Messages sent per size before measuring (connections, caches).
const WARMUP_MESSAGES: usize = 2;
/// CPU the sender spends per size before the measurement stops: 50 ticks, so the tick
/// resolution costs at most 2%.
const CPU_BUDGET_S: f64 = 0.5;
const QUICK_CPU_BUDGET_S: f64 = 0.05;
/// Fewest and most measured messages per size.
const MIN_MESSAGES: usize = 5;
const MAX_MESSAGES: usize = 1000;
/// Largest group accepted.
pub const MAX_FANOUT_GROUP: usize = 4096;

pub fn steps(s: &Settings) -> u64 {
    s.fanout_sizes.len() as u64
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, fixed at 100 in Linux's ABI).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) of the calling thread, from /proc/thread-self/stat, in seconds; the
/// resolution is one tick (10 ms), so a measurement runs until [`CPU_BUDGET_S`] of CPU is used.
fn thread_cpu_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").context("read /proc/thread-self/stat")?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/thread-self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<f64> {
        let v: u64 = fields.get(i).context("short /proc/thread-self/stat")?.parse()?;
        Ok(v as f64)
    };
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    Ok((tick(11)? + tick(12)?) / USER_HZ)
}

/// Per-message figures of one group size.
struct Measured {
    members: usize,
    cpu_ms: f64,
    upload: f64,
    stored: f64,
    payload: f64,
    state_bytes: f64,
    messages: usize,
}

async fn measure(b: &Bench<'_>, members: usize, cpu_budget_s: f64) -> anyhow::Result<Measured> {
    let home = tempfile::tempdir()?;
    let opts =
        ConnectOptions { server: Some(b.target.addr.to_string()), fingerprint: Some(b.target.fingerprint) };
    let (mut m, _) = Messenger::init(home.path(), None, Unlock::None, opts).await?;
    let name = format!("g{members}");
    let group_id = m.group_create(&name)?;
    let others: Vec<Identity> = (1..members).map(|_| Identity::generate()).collect();
    let mut kps = Vec::with_capacity(others.len());
    for o in &others {
        let mut kp = MlsClient::new(o.seed())?.key_packages(1)?;
        kps.push(kp.pop().context("one key package")?.bytes);
    }
    {
        let _op = m.begin()?;
        m.mls.add_members(&group_id, &kps)?;
        m.mls.merge_pending(&group_id)?;
        m.persist()?;
    }
    let target = Target::Group(name);
    let text = "x".repeat(TEXT_LEN);
    for _ in 0..WARMUP_MESSAGES {
        m.send(&target, &text).await?;
    }
    let sent_before = m.bytes_sent();
    let stored_before = b.stored_bytes().unwrap_or(0);
    let cpu_before = thread_cpu_s()?;
    let mut sent = 0;
    let mut cpu = 0.0;
    while sent < MAX_MESSAGES && (sent < MIN_MESSAGES || cpu < cpu_budget_s) {
        m.send(&target, &text).await?;
        sent += 1;
        cpu = thread_cpu_s()? - cpu_before;
    }
    let n = sent as f64;
    let upload = m.bytes_sent().saturating_sub(sent_before) as f64 / n;
    let stored = b.stored_bytes().map(|s| s.saturating_sub(stored_before) as f64 / n).unwrap_or(0.0);
    let state_bytes = std::fs::metadata(home.path().join(crate::client::db::DB_FILE))
        .map(|md| md.len() as f64)
        .unwrap_or(0.0);
    m.disconnect().await;
    // One member's view of the last message: the payload every member fetches.
    let reader = b.login(others.first().context("a group has a second member")?).await?;
    let (got, _) = reader.fetch(1).await?;
    let payload = got.first().map(|d| d.payload.len() as f64).unwrap_or(0.0);
    reader.close().await;
    Ok(Measured { members, cpu_ms: cpu * 1e3 / n, messages: sent, upload, stored, payload, state_bytes })
}

pub async fn run(b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
    let budget = if b.settings.quick { QUICK_CPU_BUDGET_S } else { CPU_BUDGET_S };
    let mut all = Vec::new();
    for &n in &b.settings.fanout_sizes {
        b.step(&format!("fanout: group of {n}"));
        tokio::task::yield_now().await;
        all.push(measure(b, n, budget).await?);
        b.done_step();
    }
    let base = all.iter().find(|x| x.members == 2).or(all.first());
    let (base_cpu, base_up, base_stored) =
        base.map(|x| (Some(x.cpu_ms), Some(x.upload), Some(x.stored))).unwrap_or((None, None, None));
    let largest = all.iter().map(|x| x.members).max().unwrap_or(0);
    let mut rows = Vec::new();
    for x in &all {
        let recipients = (x.members - 1) as f64;
        let bound = x.payload + PER_RECIPIENT_GOAL * recipients;
        // The goals are stated for the largest group; smaller ones show the fixed costs.
        let judged = x.members == largest && x.members > 2;
        // What each recipient beyond the first adds, against the 2-member figure.
        let slope = |v: f64, base: Option<f64>| match base {
            Some(b) if x.members > 2 => (v - b) / (x.members - 2) as f64,
            _ => 0.0,
        };
        let mut cpu = Row::new(format!("cpu/msg, {} members", x.members), x.cpu_ms, "ms")
            .against("2 members", base_cpu, "ms")
            .extra("state_file_bytes", x.state_bytes)
            .extra("messages", x.messages as f64);
        if judged {
            let ratio = base_cpu.filter(|c| *c > 0.0).map(|c| x.cpu_ms / c).unwrap_or(f64::INFINITY);
            cpu = cpu.goal(format!("<= {CPU_GOAL}x"), ratio <= CPU_GOAL);
        }
        rows.push(cpu);
        let mut upload = Row::new(format!("upload/msg, {} members", x.members), x.upload, "B")
            .against("2 members", base_up, "B")
            .extra("payload_B", x.payload)
            .extra("B_per_added_recipient", slope(x.upload, base_up));
        if judged {
            upload = upload.goal("<= payload + 64 B x recipients", x.upload <= bound);
        }
        rows.push(upload);
        let mut stored = Row::new(format!("stored/msg, {} members", x.members), x.stored, "B")
            .against("2 members", base_stored, "B")
            .extra("B_per_added_recipient", slope(x.stored, base_stored));
        if judged && !b.is_remote() {
            stored = stored.goal("<= payload + 64 B x recipients", x.stored <= bound);
        }
        rows.push(stored);
    }
    Ok(rows)
}
