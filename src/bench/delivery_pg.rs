//! The delivery scenario on a PostgreSQL store (`qpq bench --postgres URL`), against the redb
//! server measured just before in the same run.
//!
//! Two in-process nodes share the database and one certificate (node B is given node A's). One
//! node: senders and recipients on node A. Two nodes: senders on A, recipients parked on B, so
//! every delivery is a cross-node wake-up (A's commit, its NOTIFY, B's listen connection, B's
//! `fetchWait`). Messages per commit counts both nodes' transactions. Then the same paced load
//! (half the lower of the two peaks) runs on redb, one PostgreSQL node and two, for wake-up p99
//! at equal offered rates.

use std::time::Duration;

use super::delivery::{Route, run_level};
use super::{Bench, Row, percentile};
use crate::server::{self, RunningServer, ServerConfig, StoreLocation};

/// Senders of the paced comparison (or fewer, when the run has fewer).
const PACED_SENDERS: usize = 16;

async fn start_node(
    dir: &std::path::Path,
    url: &str,
    cert_of: Option<&std::path::Path>,
) -> anyhow::Result<RunningServer> {
    let mut cfg = ServerConfig::new(dir.to_path_buf(), ([127, 0, 0, 1], 0).into());
    cfg.max_connections_per_ip = cfg.max_connections;
    cfg.rate_limits = crate::server::ratelimit::RateLimits::unlimited();
    cfg.store = StoreLocation::Postgres(url.to_string());
    if let Some(other) = cert_of {
        cfg.cert = Some(other.join(crate::transport::CERT_FILE));
        cfg.key = Some(other.join(crate::transport::KEY_FILE));
    }
    Ok(server::start(cfg).await?)
}

pub async fn run(
    b: &Bench<'_>,
    url: &str,
    redb_by_senders: &[(usize, f64)],
    m: usize,
    redb_peak: f64,
) -> anyhow::Result<Vec<Row>> {
    let budget = b.settings.duration();
    let dir = tempfile::Builder::new().prefix("qpq-bench-pg-").tempdir()?;
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let node_a = start_node(&dir_a, url, None).await?;
    let node_b = start_node(&dir_b, url, Some(&dir_a)).await?;
    let one_commits = || Some(node_a.commit_count());
    let two_commits = || Some(node_a.commit_count() + node_b.commit_count());
    let one = Route {
        senders_at: node_a.local_addr(),
        recipients_at: node_a.local_addr(),
        fingerprint: node_a.fingerprint(),
        commits: &one_commits,
        child: None,
    };
    let two = Route {
        senders_at: node_a.local_addr(),
        recipients_at: node_b.local_addr(),
        fingerprint: node_a.fingerprint(),
        commits: &two_commits,
        child: None,
    };
    let mut rows = Vec::new();
    let mut two_node_peak: f64 = 0.0;
    for &(n, redb_rate) in redb_by_senders {
        for (label, route) in [("1 node", &one), ("2 nodes, cross-node", &two)] {
            b.step(&format!("delivery: postgres {label}, {n} senders"));
            let level = run_level(b, route, n, m, budget, None).await?;
            let rate = level.rate();
            let mut row = Row::new(
                format!("postgres {label}: delivered, {n} senders -> {m} recipients"),
                rate,
                "msg/s",
            )
            .against(format!("redb 1 node, {n} senders, this run"), Some(redb_rate), "msg/s");
            if let Some(c) = level.commits {
                row = row.extra("msgs_per_commit", level.delivered as f64 / c.max(1) as f64);
            }
            if route.recipients_at != route.senders_at {
                two_node_peak = two_node_peak.max(rate);
                if n == 16 {
                    let met = row.ratio.is_some_and(|r| r >= 0.5);
                    row = row.goal(">= 0.5x", met);
                }
            }
            rows.push(level.with_latency(row));
            b.done_step();
        }
    }
    // Wake-up latency at one offered rate that all three keep up with.
    let target = (redb_peak.min(two_node_peak) * 0.5).max(1.0);
    let senders = PACED_SENDERS.min(redb_by_senders.iter().map(|(n, _)| *n).max().unwrap_or(1));
    let period = Duration::from_secs_f64(senders as f64 / target);
    let redb_commits = || b.commit_count();
    let redb = Route {
        senders_at: b.target.addr,
        recipients_at: b.target.addr,
        fingerprint: b.target.fingerprint,
        commits: &redb_commits,
        child: None,
    };
    let mut p99 = Vec::new();
    for (label, route) in
        [("redb 1 node", &redb), ("postgres 1 node", &one), ("postgres 2 nodes, cross-node", &two)]
    {
        b.step(&format!("delivery: paced, {label}"));
        let level = run_level(b, route, senders, m, budget * 2, Some(period)).await?;
        p99.push((label, percentile(&level.latencies_ms, 0.99), level));
        b.done_step();
    }
    let redb_p99 = p99.first().map(|(_, p, _)| *p);
    let one_p99 = p99.get(1).map(|(_, p, _)| *p);
    for (label, p, level) in &p99[1..] {
        let mut row = Row::new(
            format!("wake-up p99 at {} msg/s, {senders} senders, {label}", super::human(target)),
            *p,
            "ms",
        )
        .against("redb 1 node, same load", redb_p99, "ms")
        .extra("delivered_msg_per_s", level.rate());
        if label.contains("2 nodes") {
            let met = one_p99.is_some_and(|one| *p <= 3.0 * one);
            row = row.goal("<= 3x postgres 1 node", met);
            if let Some(one) = one_p99 {
                row = row.extra("vs_postgres_1_node", *p / one.max(1e-9));
            }
        }
        rows.push(level.with_latency(row));
    }
    node_b.shutdown().await?;
    node_a.shutdown().await?;
    Ok(rows)
}
