//! `qpq serve`: the NodeService (AS + DS) over QUIC, Cap'n Proto RPC and redb.
//!
//! # Shape
//! - [`start`] binds the QUIC endpoint, opens the store and returns a [`RunningServer`] (its
//!   bound address, certificate fingerprint and a shutdown handle), so tests start it on port 0.
//! - Threads and hand-offs (issue 14: each hop between threads is a wake-up and usually a context
//!   switch, and they were 40% of the server's CPU per message):
//!   ```text
//!   UDP ─▶ [qpq-rpc-0: quinn endpoint driver, accept loop, connections, RPC] ─submit─▶ [writer]
//!          [qpq-rpc-N: connections, RPC (only with more than RPC_CORES_PER_WORKER cores)]   │
//!            ▲ enqueue replies, fetchWait wake-ups (after the fsync) ───────────────────────┘
//!   ```
//!   capnp-rpc's `RpcSystem` is `!Send`, so each RPC worker runs a current-thread runtime with a
//!   `LocalSet`. The quinn endpoint (its UDP socket and driver) lives on worker 0, with the accept
//!   loop: a datagram for a connection on worker 0 is decrypted and answered without leaving that
//!   thread. Connections are spread round-robin over the workers; with few cores there is one, so
//!   the only hops per message are to the store writer and back. The caller's runtime only runs
//!   the sweeper and shutdown. Before a connection is handed on, [`admission`] decides whether it
//!   is served at all (caps in all and per IP address, QUIC Retry for busy addresses).
//! - Calls anyone may make without authenticating (`enqueue`, `enqueueBatch`, `enqueueFanout`,
//!   `fetchKeyPackage`) draw on token buckets per connection, per source address and per target
//!   key ([`ratelimit`]); the store enforces per-recipient caps and a global storage quota.
//!   Every error goes out with a wire code from `schemas/node.capnp`
//!   ([`crate::proto::wire_error`]).
//! - Each connection carries one bidirectional stream for RPC; its bootstrap object is a
//!   [`rpc::NodeServiceImpl`] that knows the connection's TLS-exported auth challenge. A client
//!   of an outdated protocol version (ALPN `qpq/1`) gets [`outdated`] instead: an error naming
//!   both versions for each call, then a close.
//! - What peers make the server buffer is bounded by one [`memory::MemoryBudget`]: large frames
//!   are read through a [`framegate::FrameGate`] that holds their size first, and every
//!   outgoing message counts until written ([`vat::MeteredNetwork`], one `spawn_local` task per
//!   connection on its worker gives the counts back in write order). A peer that leaves its replies unread is paused, then
//!   closed after the stall timeout; at its per-address cap, [`admission`] evicts an idle
//!   connection for a proven newcomer.
//!
//! # Shutdown
//! [`RunningServer::shutdown`] (wired to SIGINT/SIGTERM by the CLI) stops accepting, wakes long
//! polls, waits up to [`limits::SHUTDOWN_GRACE_MS`] for calls in flight to finish, closes every
//! connection, then stops the store writer after it has committed everything it was handed, and
//! closes redb. Connection tasks still alive after the grace (a peer that never finishes closing)
//! are dropped with their worker's task set, and the sweeper is awaited, so that when `shutdown`
//! returns nothing holds the store any more and the same data dir can be opened again at once.

pub mod admission;
pub mod config;
pub mod framegate;
pub mod memory;
pub mod outdated;
pub mod ratelimit;
pub mod rpc;
pub mod vat;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use tokio::sync::mpsc;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::{ServerConfig, StoreLocation};

use self::admission::{Admission, Decision, Slot};
use crate::limits;
use crate::logthrottle::LogThrottle;
use crate::proto::node_capnp::node_service;
use crate::proto::wire_error::{ErrorCode, WireError};
use crate::store::{AnyStore, DeliveryStore, Outcome, PgStore, QueueLimits, Store, StoreError, WriteOp};
use crate::transport::{self, Fingerprint, TransportError};

/// Name of the database file in the data dir.
pub const DB_FILE: &str = "qpq.db";

/// How long a new connection may take to open its RPC stream.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot use data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(
        "data dir {0} is in use by another qpq serve (one that is shutting down holds it until it exits)"
    )]
    DataDirInUse(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start rpc worker: {0}")]
    Worker(std::io::Error),
}

/// Limits the RPC layer checks before it touches the store.
#[derive(Debug, Clone, Copy)]
pub struct RpcLimits {
    pub max_payload: usize,
    /// KeyPackages valid for less than this many seconds more are not handed out
    /// ([`limits::key_package_margin_secs`]).
    pub key_package_margin_secs: u64,
}

/// State every connection shares.
pub struct Shared {
    pub store: AnyStore,
    pub limits: RpcLimits,
    pub started: Instant,
    /// Cancelled when shutdown begins: long polls return, no new connections are served.
    pub shutdown: CancellationToken,
    draining: AtomicBool,
    /// Open client connections, in all and per address, against their caps.
    admission: Arc<Admission>,
    /// The server's clock: KeyPackage lifetimes, rate limits and hybrid key times read it
    /// (tests move it).
    pub clock: crate::clock::Clock,
    /// Rate limits shared by every connection (per source address, per target key).
    pub rates: SharedRates,
    /// Calls that change or reserve state and must finish before the store closes.
    inflight: AtomicUsize,
    inflight_zero: tokio::sync::Notify,
    /// Bytes buffered for peers by every connection together (see [`memory`]).
    pub memory: Arc<memory::MemoryBudget>,
    /// How long a connection may leave replies unread, or take over a large frame.
    pub stall_timeout: Duration,
}

impl Shared {
    /// State for connections served from `store`, not yet shutting down.
    pub fn new(
        store: impl Into<AnyStore>,
        limits: RpcLimits,
        admission: Arc<Admission>,
        clock: crate::clock::Clock,
        rate_limits: ratelimit::RateLimits,
    ) -> Arc<Shared> {
        let memory =
            (limits::DEFAULT_MAX_BUFFERED_BYTES, Duration::from_millis(limits::DEFAULT_STALL_TIMEOUT_MS));
        Shared::with_memory(store, limits, admission, clock, rate_limits, memory)
    }

    /// [`Shared::new`] with the memory budget's cap and the stall timeout.
    pub fn with_memory(
        store: impl Into<AnyStore>,
        limits: RpcLimits,
        admission: Arc<Admission>,
        clock: crate::clock::Clock,
        rate_limits: ratelimit::RateLimits,
        (max_buffered_bytes, stall_timeout): (usize, Duration),
    ) -> Arc<Shared> {
        Arc::new(Shared {
            store: store.into(),
            limits,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            draining: AtomicBool::new(false),
            admission,
            clock,
            rates: SharedRates::new(rate_limits),
            inflight: AtomicUsize::new(0),
            inflight_zero: tokio::sync::Notify::new(),
            memory: memory::MemoryBudget::new(max_buffered_bytes),
            stall_timeout,
        })
    }

    /// The time KeyPackages are judged at (unix seconds): now plus the hand-out margin, so a
    /// package that would expire before a commit adding it can reach every member counts as
    /// expired already (see [`limits::key_package_margin_secs`]).
    pub fn key_package_now(&self) -> u64 {
        self.clock.now_secs().saturating_add(self.limits.key_package_margin_secs)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Counts a call in flight until the guard drops. Once shutdown has begun, new calls that
    /// would write are refused with a definite error, so clients never have to guess whether a
    /// call cut off by the shutdown took effect.
    pub fn call_guard(self: &Arc<Self>) -> Result<CallGuard, capnp::Error> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = CallGuard(self.clone());
        if self.is_draining() {
            return Err(WireError::new(ErrorCode::ShuttingDown, "server shutting down").into_rpc());
        }
        Ok(guard)
    }

    /// Resolves once no call counted by [`Shared::call_guard`] is in flight.
    pub async fn calls_finished(&self) {
        loop {
            let zero = self.inflight_zero.notified();
            if self.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            zero.await;
        }
    }
}

/// The rate limiters every connection shares; per-connection buckets live in
/// [`rpc::NodeServiceImpl`].
pub struct SharedRates {
    pub config: ratelimit::RateLimits,
    pub enqueue_per_address: ratelimit::KeyedLimiter<std::net::IpAddr>,
    pub key_package_per_address: ratelimit::KeyedLimiter<std::net::IpAddr>,
    pub key_package_per_target: ratelimit::KeyedLimiter<crate::store::IdentityKey>,
    pub lookup_per_address: ratelimit::KeyedLimiter<std::net::IpAddr>,
    pub key_upload_per_address: ratelimit::KeyedLimiter<std::net::IpAddr>,
    /// Keyed by [`admission::network_key`].
    pub key_bytes_per_network: ratelimit::KeyedLimiter<std::net::IpAddr>,
    /// Keyed by [`admission::network_key`].
    pub enqueue_bytes_per_network: ratelimit::KeyedLimiter<std::net::IpAddr>,
}

impl SharedRates {
    fn new(config: ratelimit::RateLimits) -> SharedRates {
        let n = limits::MAX_RATE_LIMITED_KEYS;
        SharedRates {
            config,
            enqueue_per_address: ratelimit::KeyedLimiter::new(config.enqueue_per_address, n),
            key_package_per_address: ratelimit::KeyedLimiter::new(config.key_package_per_address, n),
            key_package_per_target: ratelimit::KeyedLimiter::new(config.key_package_per_target, n),
            lookup_per_address: ratelimit::KeyedLimiter::new(config.lookup_per_address, n),
            key_upload_per_address: ratelimit::KeyedLimiter::new(config.key_upload_per_address, n),
            key_bytes_per_network: ratelimit::KeyedLimiter::new(config.key_bytes_per_network, n),
            enqueue_bytes_per_network: ratelimit::KeyedLimiter::new(config.enqueue_bytes_per_network, n),
        }
    }
}

/// See [`Shared::call_guard`].
pub struct CallGuard(Arc<Shared>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inflight_zero.notify_waiters();
        }
    }
}

/// A server that is accepting connections.
pub struct RunningServer {
    local_addr: SocketAddr,
    fingerprint: Fingerprint,
    generated_cert: bool,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    /// Resolves (sender dropped) when the accept loop on worker 0 has ended.
    accept_done: tokio::sync::oneshot::Receiver<()>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// Cancelled once the grace has passed: workers drop the connection tasks still running.
    hard_stop: CancellationToken,
    sweeper: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Durable write transactions the store has committed since start (see
    /// [`Store::commit_count`]).
    pub fn commit_count(&self) -> u64 {
        self.shared.store.commit_count()
    }

    /// Bytes of queued messages as the storage quota counts them (see [`Store::stored_bytes`]).
    pub fn stored_bytes(&self) -> Result<u64, crate::store::StoreError> {
        self.shared.store.stored_bytes()
    }

    /// Bytes of incoming frames the RPC system holds now (see [`memory::Received`]).
    pub fn received_frame_bytes(&self) -> usize {
        self.shared.memory.received_bytes()
    }

    /// Runs one full expiry sweep now, of messages and then KeyPackages, as the server does
    /// every [`limits::SWEEP_INTERVAL_SECS`]; returns when it is done.
    /// By the store's [`crate::clock::DeletionClock`], which follows the clock but not a step
    /// forward.
    pub async fn sweep(&self) {
        sweep(&self.shared).await;
    }

    /// True when this start generated the self-signed certificate.
    pub fn generated_cert(&self) -> bool {
        self.generated_cert
    }

    /// A token that, when cancelled, makes [`RunningServer::wait`] return.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Waits until shutdown is requested, then shuts down gracefully.
    pub async fn wait(self) -> Result<(), ServerError> {
        self.shared.shutdown.cancelled().await;
        self.shutdown().await
    }

    /// Graceful shutdown; see the module docs.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let RunningServer { shared, endpoint, accept_done, workers, hard_stop, sweeper, .. } = self;
        shared.draining.store(true, Ordering::SeqCst);
        shared.shutdown.cancel();
        let _ = accept_done.await;
        let grace = Duration::from_millis(limits::SHUTDOWN_GRACE_MS);
        let _ = tokio::time::timeout(grace, shared.calls_finished()).await;
        endpoint.close(0u32.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        // Workers exit once their connections are gone and the accept loop has ended; whatever
        // is still running then is dropped (its connection is closed already).
        hard_stop.cancel();
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        });
        let _ = tokio::time::timeout(grace, joined).await;
        // The sweeper returns at the shutdown token; its reference must be gone before closing.
        let _ = tokio::time::timeout(grace, sweeper).await;
        match Arc::try_unwrap(shared) {
            Ok(shared) => shared.store.close()?,
            Err(shared) => {
                // A worker still holds a reference (it timed out); the writer still commits
                // everything it was handed before its queue is dropped with the last reference.
                tracing::warn!(refs = Arc::strong_count(&shared), "store still referenced at shutdown");
            }
        }
        Ok(())
    }
}

/// Starts the server: data dir, certificate, database, endpoint, workers, accept loop.
/// Must be called inside a multi-threaded tokio runtime.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    let data_dir_err = |source| ServerError::DataDir { path: cfg.data_dir.display().to_string(), source };
    if std::fs::metadata(&cfg.data_dir).is_ok_and(|m| !m.is_dir()) {
        // Said as such: creating it would fail with "file exists".
        return Err(data_dir_err(std::io::Error::from(std::io::ErrorKind::NotADirectory)));
    }
    crate::fsutil::ensure_private_dir(&cfg.data_dir).map_err(data_dir_err)?;
    let identity = match (&cfg.cert, &cfg.key) {
        (Some(c), Some(k)) => transport::load_identity(c, k)?,
        _ => transport::load_or_generate_identity(&cfg.data_dir)?,
    };
    let kx = if cfg.allow_classical_kx {
        transport::KeyExchange::AllowClassical
    } else {
        transport::KeyExchange::HybridOnly
    };
    let server_cfg = transport::server_config_with(&identity, kx)?;
    let queue_limits = QueueLimits {
        max_messages: cfg.max_queue_messages,
        max_bytes: cfg.max_queue_bytes,
        ttl_ms: cfg.message_ttl_secs.saturating_mul(1000),
        max_stored_bytes: cfg.max_stored_bytes,
        max_key_bytes: cfg.max_key_bytes,
    };
    let store: AnyStore = match &cfg.store {
        StoreLocation::Redb => {
            Store::open_with_clock(&cfg.data_dir.join(DB_FILE), queue_limits, cfg.clock.clone())
                .map_err(|e| match e {
                    StoreError::InUse => ServerError::DataDirInUse(cfg.data_dir.display().to_string()),
                    e => e.into(),
                })?
                .into()
        }
        StoreLocation::Postgres(url) => PgStore::open(url, queue_limits, cfg.clock.clone()).await?.into(),
    };
    let shared = Shared::with_memory(
        store,
        RpcLimits {
            max_payload: cfg.max_payload,
            key_package_margin_secs: limits::key_package_margin_secs(cfg.message_ttl_secs),
        },
        Admission::with_clock(cfg.max_connections, cfg.max_connections_per_ip, cfg.clock.clone()),
        cfg.clock.clone(),
        cfg.rate_limits,
        (cfg.max_buffered_bytes, Duration::from_millis(cfg.stall_timeout_ms)),
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let worker_count = cores.div_ceil(limits::RPC_CORES_PER_WORKER).clamp(1, limits::MAX_RPC_WORKERS);
    let mut senders = Vec::with_capacity(worker_count);
    let mut receivers = Vec::with_capacity(worker_count);
    for _ in 0..worker_count {
        let (tx, rx) = mpsc::unbounded_channel::<(u64, quinn::Incoming, Slot)>();
        senders.push(tx);
        receivers.push(rx);
    }
    // Worker 0 binds the endpoint on its own runtime (so quinn's driver runs there) and reports
    // back; the accept loop then runs next to it.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<quinn::Endpoint, ServerError>>();
    let (accept_done_tx, accept_done) = tokio::sync::oneshot::channel::<()>();
    let mut network =
        Some(Network { server_cfg, listen: cfg.listen, bound: bound_tx, senders, accept_done_tx });
    let mut workers = Vec::with_capacity(worker_count);
    let hard_stop = CancellationToken::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        let shared = shared.clone();
        let network = network.take();
        let hard_stop = hard_stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("qpq-rpc-{i}"))
            .spawn(move || rpc_worker(shared, rx, network, hard_stop))
            .map_err(ServerError::Worker)?;
        workers.push(handle);
    }
    let bound = tokio::task::spawn_blocking(move || bound_rx.recv())
        .await
        .map_err(|e| ServerError::Worker(std::io::Error::other(e.to_string())))?;
    let endpoint = match bound {
        Ok(Ok(endpoint)) => endpoint,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(ServerError::Worker(std::io::Error::other("rpc worker 0 ended before binding")));
        }
    };
    let local_addr =
        endpoint.local_addr().map_err(|source| ServerError::Bind { addr: cfg.listen, source })?;
    let sweeper = spawn_sweeper(shared.clone());
    Ok(RunningServer {
        local_addr,
        fingerprint: identity.fingerprint,
        generated_cert: identity.generated,
        shared,
        endpoint,
        accept_done,
        workers,
        hard_stop,
        sweeper,
    })
}

/// What worker 0 needs to run the endpoint and the accept loop.
struct Network {
    server_cfg: quinn::ServerConfig,
    listen: SocketAddr,
    /// Where the bound endpoint (or why it could not bind) goes.
    bound: std::sync::mpsc::Sender<Result<quinn::Endpoint, ServerError>>,
    /// One channel per RPC worker, this one included.
    senders: Vec<mpsc::UnboundedSender<(u64, quinn::Incoming, Slot)>>,
    /// Dropped when the accept loop ends.
    accept_done_tx: tokio::sync::oneshot::Sender<()>,
}

impl Network {
    /// Binds the endpoint on the current runtime and spawns the accept loop there.
    fn start(self, shared: &Arc<Shared>) {
        let Network { server_cfg, listen, bound, senders, accept_done_tx } = self;
        let endpoint = match quinn::Endpoint::server(server_cfg, listen) {
            Ok(e) => e,
            Err(source) => {
                let _ = bound.send(Err(ServerError::Bind { addr: listen, source }));
                return;
            }
        };
        let _ = bound.send(Ok(endpoint.clone()));
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            accept_loop(endpoint, shared, senders).await;
            drop(accept_done_tx);
        });
    }
}

fn spawn_sweeper(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let period = Duration::from_secs(limits::SWEEP_INTERVAL_SECS);
        // The first pass comes one period after start, not at once: a restart loop must not
        // turn into a sweep loop.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shared.shutdown.cancelled() => return,
            }
            sweep(&shared).await;
        }
    })
}

/// One sweep of messages, then of keys, by the store's deletion clock.
async fn sweep(shared: &Shared) {
    let (now_ms, ahead) = shared.store.deletion_clock().now();
    if ahead > crate::clock::QUIET_STEP_MS {
        tracing::warn!(
            ahead_secs = ahead / 1000,
            "the system clock is ahead of the time that passed (it was stepped, or the server was \
             down for over a day since its last sweep); the sweep takes the difference in at twice \
             real speed, so that mail and keys are not deleted early: check the clock"
        );
    }
    sweep_once(shared, now_ms).await;
    let key_now = (now_ms / 1000).saturating_add(shared.limits.key_package_margin_secs);
    expire_key_packages(shared, key_now).await;
}

/// Deletes every KeyPackage expired now, one slice per write transaction (see
/// [`WriteOp::ExpireKeyPackages`]); other writes commit between the slices.
async fn expire_key_packages(shared: &Shared, now: u64) {
    let mut removed = 0u64;
    loop {
        match shared.store.write(WriteOp::ExpireKeyPackages { now }).await {
            Ok(Outcome::KeyPackagesExpired { removed: n, more }) => {
                removed += n;
                if !more {
                    break;
                }
            }
            Ok(other) => {
                tracing::warn!(?other, "key package expiry: unexpected outcome");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "key package expiry failed");
                break;
            }
        }
        if shared.shutdown.is_cancelled() {
            break;
        }
    }
    tracing::debug!(removed, "expired key packages deleted");
}

/// One pass over the whole queue table, one slice per write transaction (see
/// [`WriteOp::Sweep`]); other writes commit between the slices.
async fn sweep_once(shared: &Shared, now_ms: u64) {
    let mut after = Vec::new();
    let mut removed = 0u64;
    loop {
        match shared.store.write(WriteOp::Sweep { now_ms, after }).await {
            Ok(Outcome::Swept { removed: n, resume }) => {
                removed += n;
                match resume {
                    Some(key) => after = key,
                    None => break,
                }
            }
            Ok(other) => {
                tracing::warn!(?other, "sweep: unexpected outcome");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "sweep failed");
                break;
            }
        }
        if shared.shutdown.is_cancelled() {
            break;
        }
    }
    tracing::debug!(removed, "expired messages swept");
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    workers: Vec<mpsc::UnboundedSender<(u64, quinn::Incoming, Slot)>>,
) {
    let next_id = AtomicU64::new(1);
    // A flood of refused connections must not become a flood of log lines.
    let mut refusals = LogThrottle::new(Duration::from_millis(limits::REFUSAL_LOG_INTERVAL_MS));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shared.shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let decision = shared.admission.admit(remote.ip(), incoming.remote_address_validated());
        let slot = match decision {
            Decision::Admit(slot) => slot,
            Decision::Validate if incoming.may_retry() => {
                if let Err(e) = incoming.retry() {
                    tracing::debug!(error = %e, %remote, "retry not sent");
                }
                continue;
            }
            Decision::Validate => {
                if let Some(unlogged) = refusals.note(Instant::now()) {
                    tracing::warn!(%remote, unlogged, "connection refused: address not validated");
                }
                incoming.refuse();
                continue;
            }
            Decision::Refuse(reason) => {
                if let Some(unlogged) = refusals.note(Instant::now()) {
                    tracing::warn!(%remote, unlogged, "connection refused: {reason}");
                }
                incoming.refuse();
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let worker = &workers[(id as usize) % workers.len()];
        // The slot lives as long as the connection's task (see `serve_connection`).
        if worker.send((id, incoming, slot)).is_err() {
            tracing::error!("rpc worker is gone");
            break;
        }
    }
    // Dropping the senders lets idle workers finish once their connections are gone.
}

fn rpc_worker(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(u64, quinn::Incoming, Slot)>,
    network: Option<Network>,
    hard_stop: CancellationToken,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build rpc worker runtime");
            if let Some(n) = network {
                let _ = n.bound.send(Err(ServerError::Worker(e)));
            }
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        if let Some(network) = network {
            network.start(&shared);
        }
        while let Some((id, incoming, slot)) = rx.recv().await {
            let span = tracing::info_span!("conn", id, remote = %incoming.remote_address());
            tokio::task::spawn_local(serve_connection(incoming, shared.clone(), slot).instrument(span));
        }
    });
    // Let connections still open on this worker finish (they end at endpoint close), until the
    // grace has passed; dropping the task set then drops the rest.
    rt.block_on(async {
        tokio::select! {
            _ = local => {}
            _ = hard_stop.cancelled() => {}
        }
    });
}

/// Serves one connection; `slot` frees its place in the admission counts when this task ends,
/// however it ends, and says when admission evicts the connection (it is then closed).
async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>, slot: Slot) {
    let remote = incoming.remote_address().ip();
    let handshake = tokio::time::timeout(Duration::from_millis(limits::HANDSHAKE_TIMEOUT_MS), incoming);
    let conn = match handshake.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    let alpn = transport::negotiated_alpn(&conn).unwrap_or_default();
    if alpn != transport::ALPN {
        // An outdated client (the handshake accepts only our id and the outdated ones): tell it
        // to upgrade instead of failing the handshake without a word.
        tracing::debug!(client_protocol = %transport::alpn_name(&alpn), "refusing an outdated client");
        outdated::refuse(conn, &alpn, shared.shutdown.clone()).await;
        return;
    }
    tracing::debug!("connected");
    let streams = tokio::select! {
        s = tokio::time::timeout(STREAM_OPEN_TIMEOUT, conn.accept_bi()) => s,
        _ = shared.shutdown.cancelled() => return,
    };
    let (send, recv) = match streams {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection closed before opening its stream");
            return;
        }
        Err(_) => {
            conn.close(1u32.into(), b"no rpc stream opened");
            return;
        }
    };
    let challenge = match transport::auth_challenge(&conn) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no auth challenge");
            conn.close(1u32.into(), b"internal error");
            return;
        }
    };
    let activity = slot.activity();
    let evicted = activity.evicted.clone();
    tokio::select! {
        served = serve_rpc_tracked(recv.compat(), send.compat_write(), shared, challenge, remote, activity) => {
            match served {
                Ok(()) => tracing::debug!("rpc session ended"),
                Err(e) => tracing::debug!(error = %e, "rpc session failed"),
            }
            conn.close(0u32.into(), b"bye");
        }
        _ = evicted.cancelled() => {
            tracing::debug!("evicted: idle while its address is at its connection cap");
            conn.close(2u32.into(), b"idle connection evicted");
        }
    }
}

/// Serves one connection's RPC system over any byte stream until the peer disconnects: the part
/// of a connection that does not depend on QUIC, so the fuzz target can feed it raw bytes.
/// `challenge` is the connection's authentication challenge. Must run inside a `LocalSet`.
///
/// Large frames are read through a [`framegate::FrameGate`] and every outgoing message is
/// counted until written ([`vat::MeteredNetwork`]); a peer that leaves its replies unread past
/// the stall timeout, or stalls inside a large frame, ends here with an error, and dropping the
/// RPC system frees everything queued for it.
pub async fn serve_rpc<R, W>(
    recv: R,
    send: W,
    shared: Arc<Shared>,
    challenge: [u8; 32],
    remote: std::net::IpAddr,
) -> Result<(), capnp::Error>
where
    R: futures::AsyncRead + Unpin + 'static,
    W: futures::AsyncWrite + Unpin + 'static,
{
    let activity = admission::Activity::untracked(shared.clock.clone());
    serve_rpc_tracked(recv, send, shared, challenge, remote, activity).await
}

/// [`serve_rpc`] for a connection admission follows through `activity`.
async fn serve_rpc_tracked<R, W>(
    recv: R,
    send: W,
    shared: Arc<Shared>,
    challenge: [u8; 32],
    remote: std::net::IpAddr,
    activity: Arc<admission::Activity>,
) -> Result<(), capnp::Error>
where
    R: futures::AsyncRead + Unpin + 'static,
    W: futures::AsyncWrite + Unpin + 'static,
{
    let mut opts = capnp::message::ReaderOptions::new();
    opts.traversal_limit_in_words(Some(limits::RPC_TRAVERSAL_LIMIT_WORDS));
    let conn = memory::ConnMemory::with_activity(shared.memory.clone(), shared.stall_timeout, activity);
    let network = twoparty::VatNetwork::new(
        framegate::FrameGate::new(futures::io::BufReader::new(recv), conn.clone()),
        futures::io::BufWriter::new(send),
        rpc_twoparty_capnp::Side::Server,
        opts,
    );
    let node: node_service::Client =
        capnp_rpc::new_client(rpc::NodeServiceImpl::new(shared, challenge, remote, conn.clone()));
    let system = RpcSystem::new(Box::new(vat::MeteredNetwork::new(network, conn.clone())), Some(node.client));
    tokio::select! {
        done = system => done,
        reason = conn.watchdog() => {
            tracing::debug!(reason, unsent = conn.unsent(), "closing a stalled connection");
            Err(capnp::Error::disconnected(reason.to_string()))
        }
    }
}
