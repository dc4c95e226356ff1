//! `qpq bench`: measures the server and the client against the limits of their own stack.
//!
//! Every figure is printed next to a reference measured in the same run on the same machine, and
//! the ratio of the two: a raw quinn echo on a stream configured exactly like qpq's, the disk's
//! own fsync rate, a bare redb commit, the cryptographic floor of an MLS operation built from
//! primitive timings, a bare quinn server's memory per connection. A ratio survives a change of
//! machine where an absolute number does not, and it says how much of the cost is qpq's own.
//! Goals (BENCHMARKS.md) are reported, never asserted: no test fails on a time.
//!
//! # Scenarios (one file each)
//! - [`transport`]: NodeService calls at 1/16/64 in flight against a pipelined raw quinn echo.
//! - [`delivery`]: N senders → M recipients (`fetchWait` + `ack`), against fsync, a bare redb
//!   commit and the echo; messages per commit (group commit); enqueue→wake-up latency; the
//!   server's CPU per delivered message, measured on a `qpq serve` child ([`child`]).
//! - [`mls`]: openmls operations at several group sizes against their cryptographic floor.
//! - [`fanout`]: application messages through a real `Messenger` to groups of 2, 100 and 1000
//!   members: the sender's CPU, upload and the server's storage per message against 2 members.
//! - [`connections`]: idle connections to a real `qpq serve` child: server RSS per connection
//!   and handshake rate, against a bare quinn echo server child.
//! - [`home`]: `send` and receive from a home with 50 groups of 100 and 100k history entries,
//!   against a fresh home (only on request: `--scenario home`).
//! - [`echo`]: the raw quinn echo server and client the references use.
//!
//! # Shape
//! [`run`] starts an in-process server (temp data dir, `127.0.0.1:0`) unless `--server` names a
//! remote one (then references that need the server's data dir are skipped), runs the selected
//! scenarios on a `LocalSet` (capnp-rpc is `!Send`) while a progress bar runs on stderr, and
//! prints a table, or `--json`, on stdout.

pub mod child;
pub mod connections;
pub mod delivery;
pub mod delivery_pg;
pub mod echo;
pub mod fanout;
pub mod home;
pub mod kx;
pub mod mls;
pub mod transport;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::GlobalArgs;
use crate::client::session::Session;
use crate::server::{self, RunningServer, ServerConfig};
use crate::transport::{Fingerprint, Pin};

/// Default time one throughput measurement runs: long enough for a stable rate, short enough
/// that a full run stays under two minutes on two cores.
const DEFAULT_DURATION_MS: u64 = 700;
/// `--quick`: enough to exercise every path, not to measure anything precisely.
const QUICK_DURATION_MS: u64 = 120;
/// Longest measurement `--duration-ms` accepts (a full run is ~40 of them).
const MAX_DURATION_MS: u64 = 60_000;
/// Hard cap on operations in one measurement, so every loop is bounded whatever the clock says.
pub const MAX_OPS_PER_RUN: u64 = 2_000_000;
/// Default MLS group sizes; 1000 only on request (`--mls-sizes 2,16,128,1000`).
const DEFAULT_MLS_SIZES: &[usize] = &[2, 16, 128];
const QUICK_MLS_SIZES: &[usize] = &[2, 16];
/// Default group sizes of the fanout scenario (issue 11's 2, 100 and 1000 members).
const DEFAULT_FANOUT_SIZES: &[usize] = &[2, 100, 1000];
const QUICK_FANOUT_SIZES: &[usize] = &[2, 16];
/// Largest MLS group accepted: every member is a real client built in this process.
const MAX_MLS_GROUP: usize = 4096;
/// Idle connections by default: enough to see the per-connection slope, quick to open.
const DEFAULT_CONNECTIONS: usize = 500;
const QUICK_CONNECTIONS: usize = 16;
/// Most idle connections: one client endpoint (one UDP socket) carries them all.
const MAX_CONNECTIONS: usize = 10_000;
/// Recipients in the delivery scenario.
const DEFAULT_RECIPIENTS: usize = 8;
const QUICK_RECIPIENTS: usize = 2;
const MAX_RECIPIENTS: usize = 256;

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Transport,
    Delivery,
    Mls,
    Fanout,
    Connections,
    Home,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Transport => "transport",
            Scenario::Delivery => "delivery",
            Scenario::Mls => "mls",
            Scenario::Fanout => "fanout",
            Scenario::Connections => "connections",
            Scenario::Home => "home",
        }
    }
}

/// Flags of `qpq bench`. `--server`/`--server-fingerprint` (global) select a remote server.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Scenarios to run, comma separated [default: all but home, which builds a large home
    /// for minutes]
    #[arg(long, value_enum, value_delimiter = ',', value_name = "NAME,...")]
    pub scenario: Vec<Scenario>,
    /// Tiny sizes and very short runs: checks that everything works, measures little
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// How long each throughput measurement runs [default: 700, 120 with --quick]
    #[arg(long, value_name = "MS")]
    pub duration_ms: Option<u64>,
    /// MLS group sizes [default: 2,16,128; 2,16 with --quick]
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub mls_sizes: Vec<usize>,
    /// Group sizes of the fanout scenario [default: 2,100,1000; 2,16 with --quick]
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub fanout_sizes: Vec<usize>,
    /// Idle connections to open [default: 500, 16 with --quick]
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,
    /// Recipients in the delivery scenario [default: 8, 2 with --quick]
    #[arg(long, value_name = "N")]
    pub recipients: Option<usize>,
    /// Also run the delivery scenario on this PostgreSQL database (a throwaway one: the bench
    /// writes to it): one node, then two nodes with senders on one and recipients on the other
    #[arg(long, env = "QPQ_BENCH_POSTGRES", value_name = "URL", hide_env_values = true)]
    pub postgres: Option<String>,
    /// Internal: run the bare quinn echo server the connections scenario compares against
    #[arg(long, hide = true)]
    pub echo_server: bool,
    /// The `qpq` executable whose `serve` the server-CPU measurement runs [default: this one];
    /// to compare a build with an older one under the same load generator
    #[arg(long, hide = true, value_name = "PATH")]
    pub server_exe: Option<PathBuf>,
}

/// [`BenchArgs`] resolved and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub scenarios: Vec<Scenario>,
    pub quick: bool,
    pub duration_ms: u64,
    pub in_flight: Vec<usize>,
    pub senders: Vec<usize>,
    pub recipients: usize,
    pub mls_sizes: Vec<usize>,
    pub fanout_sizes: Vec<usize>,
    pub connections: usize,
    pub server_exe: Option<PathBuf>,
    /// The PostgreSQL database the delivery scenario also runs on (never printed: it may hold
    /// a password).
    #[serde(skip)]
    pub postgres: Option<String>,
}

impl Settings {
    pub fn resolve(args: &BenchArgs) -> anyhow::Result<Settings> {
        let quick = args.quick;
        let mut scenarios = if args.scenario.is_empty() {
            vec![
                Scenario::Transport,
                Scenario::Delivery,
                Scenario::Mls,
                Scenario::Fanout,
                Scenario::Connections,
            ]
        } else {
            args.scenario.clone()
        };
        scenarios.sort();
        scenarios.dedup();
        let duration_ms =
            args.duration_ms.unwrap_or(if quick { QUICK_DURATION_MS } else { DEFAULT_DURATION_MS });
        if duration_ms == 0 || duration_ms > MAX_DURATION_MS {
            bail!("--duration-ms out of range: {duration_ms} (expected 1..={MAX_DURATION_MS})");
        }
        let mls_sizes = if args.mls_sizes.is_empty() {
            if quick { QUICK_MLS_SIZES.to_vec() } else { DEFAULT_MLS_SIZES.to_vec() }
        } else {
            args.mls_sizes.clone()
        };
        if let Some(bad) = mls_sizes.iter().find(|n| !(2..=MAX_MLS_GROUP).contains(*n)) {
            bail!("mls group size out of range: {bad} (expected 2..={MAX_MLS_GROUP})");
        }
        let fanout_sizes = if args.fanout_sizes.is_empty() {
            if quick { QUICK_FANOUT_SIZES.to_vec() } else { DEFAULT_FANOUT_SIZES.to_vec() }
        } else {
            args.fanout_sizes.clone()
        };
        if let Some(bad) = fanout_sizes.iter().find(|n| !(2..=fanout::MAX_FANOUT_GROUP).contains(*n)) {
            bail!("fanout group size out of range: {bad} (expected 2..={})", fanout::MAX_FANOUT_GROUP);
        }
        let connections =
            args.connections.unwrap_or(if quick { QUICK_CONNECTIONS } else { DEFAULT_CONNECTIONS });
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            bail!("--connections out of range: {connections} (expected 1..={MAX_CONNECTIONS})");
        }
        let recipients = args.recipients.unwrap_or(if quick { QUICK_RECIPIENTS } else { DEFAULT_RECIPIENTS });
        if !(1..=MAX_RECIPIENTS).contains(&recipients) {
            bail!("--recipients out of range: {recipients} (expected 1..={MAX_RECIPIENTS})");
        }
        Ok(Settings {
            scenarios,
            quick,
            duration_ms,
            in_flight: if quick { vec![1, 16] } else { vec![1, 16, 64] },
            senders: if quick { vec![1, 4] } else { vec![1, 16, 64] },
            recipients,
            mls_sizes,
            fanout_sizes,
            connections,
            server_exe: args.server_exe.clone(),
            postgres: args.postgres.clone(),
        })
    }

    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.duration_ms)
    }
}

/// A goal from issue 6, evaluated on this run's figures (reported, not asserted).
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub text: String,
    pub met: bool,
}

/// One measured figure next to its reference.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the reference is, e.g. "raw quinn echo 256 B, 16 in flight".
    pub reference: String,
    /// `None` when the reference could not be measured (remote server).
    pub reference_value: Option<f64>,
    pub reference_unit: &'static str,
    /// `value / reference_value`.
    pub ratio: Option<f64>,
    pub goal: Option<Goal>,
    /// Further figures of the same measurement (latency percentiles, counts), unit in the name.
    pub extra: BTreeMap<String, f64>,
}

impl Row {
    pub fn new(case: impl Into<String>, value: f64, unit: &'static str) -> Row {
        Row {
            case: case.into(),
            value,
            unit,
            reference: String::new(),
            reference_value: None,
            reference_unit: "",
            ratio: None,
            goal: None,
            extra: BTreeMap::new(),
        }
    }

    /// Sets the reference and the ratio `value / reference`.
    pub fn against(mut self, what: impl Into<String>, value: Option<f64>, unit: &'static str) -> Row {
        self.reference = what.into();
        self.reference_value = value;
        self.reference_unit = unit;
        self.ratio = value.filter(|v| *v > 0.0).map(|v| self.value / v);
        self
    }

    pub fn goal(mut self, text: impl Into<String>, met: bool) -> Row {
        self.goal = Some(Goal { text: text.into(), met });
        self
    }

    pub fn extra(mut self, name: &str, value: f64) -> Row {
        self.extra.insert(name.to_string(), value);
        self
    }
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
            .unwrap_or("unknown")
            .to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_kib = proc_kib(&meminfo, "MemTotal:").unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            mem_total_kib,
        }
    }
}

/// A `Name:   123 kB` line of a /proc file, in KiB.
pub fn proc_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|r| r.split_whitespace().next()?.parse().ok())
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub qpq_version: &'static str,
    pub machine: Machine,
    /// "in-process" or the remote address.
    pub server: String,
    pub settings: Settings,
    /// Primitive timings and rates the references were built from, unit in the name.
    pub references: BTreeMap<String, f64>,
    /// Rows per scenario, in the order measured.
    pub scenarios: BTreeMap<&'static str, Vec<Row>>,
}

/// The server under test.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    /// The in-process server, for its commit counter and data dir; `None` when remote.
    pub local: Option<(&'a RunningServer, PathBuf)>,
}

/// Shared state of one run: the target, settings, progress, cached references.
pub struct Bench<'a> {
    pub settings: Settings,
    pub target: Target<'a>,
    pub progress: ProgressBar,
    /// Zero point of the timestamps delivery payloads carry (same process, monotonic clock).
    pub epoch: Instant,
    echo: RefCell<Option<std::rc::Rc<echo::EchoServer>>>,
    echo_rates: RefCell<HashMap<(usize, usize), f64>>,
    references: RefCell<BTreeMap<String, f64>>,
}

impl<'a> Bench<'a> {
    pub fn new(settings: Settings, target: Target<'a>, progress: ProgressBar) -> Bench<'a> {
        Bench {
            settings,
            target,
            progress,
            epoch: Instant::now(),
            echo: RefCell::new(None),
            echo_rates: RefCell::new(HashMap::new()),
            references: RefCell::new(BTreeMap::new()),
        }
    }

    pub fn is_remote(&self) -> bool {
        self.target.local.is_none()
    }

    /// Write transactions the in-process store has committed, `None` when remote.
    pub fn commit_count(&self) -> Option<u64> {
        self.target.local.as_ref().map(|(s, _)| s.commit_count())
    }

    /// The in-process server's data dir, `None` when remote.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.target.local.as_ref().map(|(_, d)| d.as_path())
    }

    /// Bytes of queued messages the in-process store charges its quota, `None` when remote.
    pub fn stored_bytes(&self) -> Option<u64> {
        self.target.local.as_ref().and_then(|(s, _)| s.stored_bytes().ok())
    }

    /// A new, unauthenticated connection to the server under test.
    pub async fn connect(&self) -> anyhow::Result<Session> {
        self.connect_at(None).await
    }

    /// A new connection authenticated as `id`.
    pub async fn login(&self, id: &crate::crypto::identity::Identity) -> anyhow::Result<Session> {
        self.login_at(None, id).await
    }

    /// [`Bench::connect`] to `at` (address, fingerprint) instead of the target when set.
    pub async fn connect_at(&self, at: Option<(SocketAddr, Fingerprint)>) -> anyhow::Result<Session> {
        let (addr, fingerprint) = at.unwrap_or((self.target.addr, self.target.fingerprint));
        Ok(Session::connect(&addr.to_string(), Pin::Fingerprint(fingerprint)).await?)
    }

    /// [`Bench::login`] to `at` instead of the target when set.
    pub async fn login_at(
        &self,
        at: Option<(SocketAddr, Fingerprint)>,
        id: &crate::crypto::identity::Identity,
    ) -> anyhow::Result<Session> {
        let mut s = self.connect_at(at).await?;
        s.authenticate(id).await?;
        Ok(s)
    }

    /// Records a primitive figure for the report's `references` section.
    pub fn record_reference(&self, name: &str, value: f64) {
        self.references.borrow_mut().insert(name.to_string(), value);
    }

    pub fn step(&self, what: &str) {
        self.progress.set_message(what.to_string());
    }

    pub fn done_step(&self) {
        self.progress.inc(1);
    }

    /// Calls per second of the raw quinn echo reference with `payload` bytes and `in_flight`
    /// frames outstanding; measured once per run and cached.
    pub async fn echo_rate(&self, payload: usize, in_flight: usize) -> anyhow::Result<f64> {
        if let Some(r) = self.echo_rates.borrow().get(&(payload, in_flight)) {
            return Ok(*r);
        }
        let server = self.echo_server().await?;
        let conn = server.connect().await?;
        // Warm-up on its own stream: congestion window, allocator, caches.
        echo::pipelined(&conn, payload, in_flight, self.settings.duration() / 5).await?;
        let t = echo::pipelined(&conn, payload, in_flight, self.settings.duration()).await?;
        conn.close(0u32.into(), b"done");
        let rate = t.per_sec();
        self.echo_rates.borrow_mut().insert((payload, in_flight), rate);
        self.record_reference(&format!("echo_{payload}B_x{in_flight}_per_s"), rate);
        Ok(rate)
    }

    async fn echo_server(&self) -> anyhow::Result<std::rc::Rc<echo::EchoServer>> {
        if let Some(s) = self.echo.borrow().as_ref() {
            return Ok(s.clone());
        }
        let s = std::rc::Rc::new(echo::EchoServer::start().await?);
        *self.echo.borrow_mut() = Some(s.clone());
        Ok(s)
    }

    fn shutdown(&self) {
        if let Some(s) = self.echo.borrow_mut().take() {
            s.close();
        }
    }
}

/// Completed operations over a wall-clock interval.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub ops: u64,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `op(i)` with `in_flight` calls outstanding until `budget` has passed (or
/// [`MAX_OPS_PER_RUN`] completed) and returns how many completed in how long.
pub async fn closed_loop<F, Fut>(in_flight: usize, budget: Duration, mut op: F) -> anyhow::Result<Throughput>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let deadline = start + budget;
    let mut calls = futures::stream::iter(0..MAX_OPS_PER_RUN)
        .take_while(move |_| std::future::ready(Instant::now() < deadline))
        .map(&mut op)
        .buffer_unordered(in_flight.max(1));
    let mut ops = 0;
    while let Some(r) = calls.next().await {
        r?;
        ops += 1;
    }
    Ok(Throughput { ops, elapsed: start.elapsed() })
}

/// The `p`-quantile (0..=1) of ascending `sorted`, nearest rank; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Entry point of `qpq bench`.
pub fn run(g: &GlobalArgs, args: BenchArgs) -> anyhow::Result<()> {
    if args.echo_server {
        return echo::run_child();
    }
    crate::cli::init_logging("warn");
    let settings = Settings::resolve(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, async move {
        match &g.server {
            Some(server) => {
                let fingerprint = g.server_fingerprint.as_deref().context(
                    "a remote server needs --server-fingerprint (the bench never trusts on first use)",
                )?;
                let fingerprint = Fingerprint::parse(fingerprint)?;
                let addr = crate::client::session::resolve(server).await?;
                let target = Target { addr, fingerprint, local: None };
                run_scenarios(settings, target, format!("remote {server}")).await
            }
            None => {
                let dir = tempfile::Builder::new().prefix("qpq-bench-").tempdir()?;
                let data_dir = dir.path().join("server");
                let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
                let mut cfg = ServerConfig::new(data_dir.clone(), listen);
                // Every bench connection comes from 127.0.0.1.
                cfg.max_connections_per_ip = cfg.max_connections;
                // A bench measures the server's capacity, not its rate limits.
                cfg.rate_limits = crate::server::ratelimit::RateLimits::unlimited();
                let running = server::start(cfg).await?;
                let target = Target {
                    addr: running.local_addr(),
                    fingerprint: running.fingerprint(),
                    local: Some((&running, dir.path().to_path_buf())),
                };
                let report = run_scenarios(settings, target, "in-process".to_string()).await;
                running.shutdown().await?;
                report
            }
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(())
}

async fn run_scenarios(settings: Settings, target: Target<'_>, server: String) -> anyhow::Result<Report> {
    let steps: u64 = settings
        .scenarios
        .iter()
        .map(|s| match s {
            Scenario::Transport => transport::steps(&settings),
            Scenario::Delivery => delivery::steps(&settings),
            Scenario::Mls => mls::steps(&settings),
            Scenario::Fanout => fanout::steps(&settings),
            Scenario::Connections => connections::steps(&settings),
            Scenario::Home => home::steps(&settings),
        })
        .sum();
    let progress = ProgressBar::new(steps);
    if let Ok(style) = ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}") {
        progress.set_style(style.progress_chars("=> "));
    }
    let bench = Bench::new(settings.clone(), target, progress);
    let mut scenarios = BTreeMap::new();
    let mut outcome = Ok(());
    for s in &settings.scenarios {
        let rows = match s {
            Scenario::Transport => transport::run(&bench).await,
            Scenario::Delivery => delivery::run(&bench).await,
            Scenario::Mls => mls::run(&bench).await,
            Scenario::Fanout => fanout::run(&bench).await,
            Scenario::Connections => connections::run(&bench).await,
            Scenario::Home => home::run(&bench).await,
        };
        match rows {
            Ok(rows) => {
                scenarios.insert(s.name(), rows);
            }
            Err(e) => {
                outcome = Err(e.context(format!("{} scenario failed", s.name())));
                break;
            }
        }
    }
    bench.shutdown();
    bench.progress.finish_and_clear();
    outcome?;
    Ok(Report {
        qpq_version: crate::cli::VERSION,
        machine: Machine::probe(),
        server,
        settings,
        references: bench.references.borrow().clone(),
        scenarios,
    })
}

/// `12.3k`, `456`, `1.23M`, `0.0123`: three significant figures, SI suffix above 10 000.
pub fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e7 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The human table: one line per row, extras on an indented second line.
pub fn render_table(r: &Report) -> String {
    let mut lines: Vec<[String; 6]> = Vec::new();
    let mut extras: Vec<Option<String>> = Vec::new();
    for (scenario, rows) in &r.scenarios {
        for row in rows {
            let reference = match row.reference_value {
                Some(v) => format!("{} {} {}", row.reference, human(v), row.reference_unit),
                None => format!("{} (n/a)", row.reference),
            };
            let goal = row
                .goal
                .as_ref()
                .map(|g| format!("{} {}", g.text, if g.met { "met" } else { "MISSED" }))
                .unwrap_or_default();
            lines.push([
                scenario.to_string(),
                row.case.clone(),
                format!("{} {}", human(row.value), row.unit),
                reference,
                row.ratio.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
                goal,
            ]);
            extras.push((!row.extra.is_empty()).then(|| {
                row.extra.iter().map(|(k, v)| format!("{k} {}", human(*v))).collect::<Vec<_>>().join(", ")
            }));
        }
    }
    let header = ["scenario", "case", "measured", "reference", "ratio", "goal"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "qpq {} | {} | {} cpus, {} | {} MiB RAM",
        r.qpq_version,
        r.server,
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.mem_total_kib / 1024
    );
    let render = |cells: &[String; 6]| {
        let mut line = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w.saturating_sub(c.chars().count()));
            // Numbers read best right-aligned.
            if i == 2 || i == 4 {
                let _ = write!(line, "{pad}{c}  ");
            } else {
                let _ = write!(line, "{c}{pad}  ");
            }
        }
        line.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", render(&header));
    for (l, e) in lines.iter().zip(&extras) {
        let _ = writeln!(out, "{}", render(l));
        if let Some(e) = e {
            let _ = writeln!(out, "{}    {e}", " ".repeat(widths[0]));
        }
    }
    let refs = r.references.iter().map(|(k, v)| format!("{k} {}", human(*v))).collect::<Vec<_>>();
    if !refs.is_empty() {
        let _ = writeln!(out, "\nreferences: {}", refs.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[3.0], 0.01), 3.0);
    }

    #[test]
    fn row_ratio_is_value_over_reference_and_absent_without_one() {
        let r = Row::new("x", 50.0, "calls/s").against("ref", Some(200.0), "calls/s");
        assert_eq!(r.ratio, Some(0.25));
        let r = Row::new("x", 50.0, "calls/s").against("ref", None, "calls/s");
        assert_eq!(r.ratio, None);
    }

    #[test]
    fn human_numbers_keep_three_significant_figures() {
        assert_eq!(human(12_345.0), "12.3k");
        assert_eq!(human(456.4), "456");
        assert_eq!(human(1.234), "1.23");
        assert_eq!(human(0.01234), "0.012");
        assert_eq!(human(23_456_789.0), "23.46M");
    }

    #[test]
    fn settings_reject_out_of_range_sizes() {
        let args = |sizes: Vec<usize>| BenchArgs {
            scenario: vec![],
            quick: false,
            json: false,
            duration_ms: None,
            mls_sizes: sizes,
            fanout_sizes: vec![],
            connections: None,
            recipients: None,
            postgres: None,
            echo_server: false,
            server_exe: None,
        };
        assert!(Settings::resolve(&args(vec![1])).is_err());
        assert!(Settings::resolve(&args(vec![2, 16, 1000])).is_ok());
        let s = Settings::resolve(&args(vec![])).unwrap();
        assert_eq!(s.scenarios.len(), 5);
        assert_eq!(s.mls_sizes, DEFAULT_MLS_SIZES);
    }
}
