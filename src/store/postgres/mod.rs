//! The PostgreSQL store: several `qpq serve` nodes share one database.
//!
//! Every write is committed in a PostgreSQL transaction on a pooled connection
//! (deadpool-postgres over tokio-postgres) with `synchronous_commit = on` (forced in the
//! connection options), so a reply means the commit is in the flushed WAL. Enqueues and acks,
//! the frequent writes, are group-committed: the ones waiting at one moment share a transaction
//! ([`batch`]); the rest run one transaction each ([`ops`]). Concurrency is left to PostgreSQL's
//! row locks, not to locks in this process: that is what makes several nodes safe. Queue
//! fetches waiting at one moment share one read statement ([`reads`]).
//!
//! Each call runs as a task on the runtime that opened the store (the server's multi-threaded
//! one), so the pool's connection tasks live there whichever RPC worker asked.
//!
//! After an enqueue commits, this node wakes its own waiters directly and hands the recipients
//! to its wake-up sender ([`wake`]), which sends `NOTIFY qpq_mail` in a separate, non-durable
//! transaction; every other node's listen connection ([`listen`]) turns it into wake-ups there.
//! The NOTIFY is sent only after the data commit, so a woken waiter always finds its mail.
//!
//! TLS to the database: none (`NoTls`). Run PostgreSQL on loopback or a private network, or
//! tunnel it; a `sslmode=require` URL is refused at start-up rather than silently downgraded.

mod batch;
mod listen;
mod mail;
mod ops;
mod reads;
mod reconnect;
mod schema;
mod wake;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

pub use schema::SCHEMA_VERSION;

use super::{IdentityKey, Notifier, Outcome, QueueLimits, StoreError, StoredMessage, WriteOp};
use crate::clock::Clock;
use crate::crypto::hybrid::SignedHybridKey;
use crate::limits;

/// The NOTIFY channel every node listens on.
const MAIL_CHANNEL: &str = "qpq_mail";

/// Why a transaction did not commit.
#[derive(Debug)]
pub(crate) enum TxError {
    /// A deadlock or serialization failure: PostgreSQL rolled it back; run it again.
    Conflict(String),
    /// The server is read-only (25006): a standby, such as the old primary after a failover
    /// that moved the database's address elsewhere. The connection is dropped, not pooled again
    /// (see [`Inner::discard`]), and the write runs again on a new one.
    ReadOnly(String),
    /// No answer within the node's reply deadline ([`Inner::answered`]): the connection is
    /// dropped, not pooled again ([`Inner::abandon`]), since a transaction may still be open on
    /// it. One whose COMMIT was sent may have committed, so it is never run again here and is
    /// reported `unavailable`, as a commit cut off by a lost connection is: the client's retry
    /// may store a duplicate, which MLS discards.
    Silent(Duration),
    /// Anything else: roll back and report.
    Store(StoreError),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> TxError {
        TxError::Store(e)
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> TxError {
        use tokio_postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE => {
                TxError::Conflict(e.to_string())
            }
            Some(c) if *c == SqlState::READ_ONLY_SQL_TRANSACTION => TxError::ReadOnly(db_text(&e)),
            // An error the server sent about our SQL or data: a bug or damage, not an outage.
            // Lock and idle timeouts (55P03, 25P03) are outages too: try again later. So is a
            // statement PostgreSQL cancelled at `statement_timeout` (57014, a class 57 code).
            Some(c)
                if !c.code().starts_with("08")
                    && !c.code().starts_with("57")
                    && !c.code().starts_with("53")
                    && !matches!(c.code(), "55P03" | "25P03") =>
            {
                TxError::Store(StoreError::Db(format!("postgresql: {}", db_text(&e))))
            }
            // Connection failures, shutdown, out of resources, or no server answer at all.
            _ => TxError::Store(StoreError::Unavailable(db_text(&e))),
        }
    }
}

impl From<deadpool_postgres::PoolError> for TxError {
    fn from(e: deadpool_postgres::PoolError) -> TxError {
        TxError::Store(StoreError::Unavailable(format!("no database connection: {e}")))
    }
}

/// The most useful text of a driver error (the server's message when it sent one).
fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// Shared by the store handle and the tasks it spawns.
struct Inner {
    pool: Pool,
    limits: QueueLimits,
    clock: Clock,
    notifier: Arc<Notifier>,
    /// Recipients whose NOTIFY the wake-up sender has yet to send.
    wakeups: Arc<wake::Pending>,
    commits: AtomicU64,
    /// Read statements the fetch workers have run (each serves one or more fetches).
    reads: AtomicU64,
    /// The most payload bytes one read statement loaded (see [`reads`]; for tests).
    largest_read: std::sync::atomic::AtomicUsize,
    instance_id: u64,
    /// Random per process: a node skips its own NOTIFYs (it woke its waiters already).
    node_id: u64,
    /// How long a transaction or read waits for the database's answers (see [`Inner::answered`]).
    reply_timeout: Duration,
    /// Full queues the group commit need not look at for expired mail for a while.
    young_heads: mail::YoungHeads,
    /// What this node deletes by age by, and hides expired mail by: the clock, but not a step
    /// forward of it (see [`crate::store::DeliveryStore::deletion_clock`]).
    deletion: crate::clock::DeletionClock,
}

/// The PostgreSQL-backed store of one node.
pub struct PgStore {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
    /// Enqueues and acks for the group-commit workers (they stop when this closes).
    batches: mpsc::Sender<batch::Request>,
    /// Acks, for their own group-commit lane (see [`batch`]).
    acks: mpsc::Sender<batch::Request>,
    /// Fetches, for the read workers that coalesce them (see [`reads`]).
    fetches: mpsc::Sender<reads::Request>,
    /// Stops the listen and wake-up tasks.
    stop: CancellationToken,
}

/// Settings every connection of a node starts with (after the URL's own `options`, so they win):
/// - `synchronous_commit=on`: durable before acknowledged, whatever the server's default.
/// - `plan_cache_mode=force_generic_plan`: every statement is prepared once per connection
///   (`prepare_cached`) and its array parameters hide their lengths, so PostgreSQL's default
///   kept planning a custom plan at every call; the fetch statement spent 0.32 ms planning for
///   0.09 ms executing (pg_stat_statements, delivery bench, issue 13). Our statements look rows
///   up by key, so one generic plan fits every call; it is re-planned when PostgreSQL
///   invalidates it (an ANALYZE of its tables).
/// - `random_page_cost=1.1`: the queue tables are small, hot and churned (rows live for
///   milliseconds), so until autovacuum runs their pages are mostly dead rows; at the default
///   4.0 the planner chose sequential scans of them over primary-key lookups (0.2-0.45 ms to
///   delete three acked entries). 1.1 is the usual value for data in memory or on SSDs, and is
///   set for this session only.
/// - `default_transaction_isolation=read committed`: the floor reads and the row locks of an
///   enqueue count on each statement seeing what committed before it (PostgreSQL's default, but
///   a database or role may set another; under repeatable read an enqueue racing a sweep could
///   hand out sequence numbers below the recipient's cursor).
/// - `lock_timeout` ([`limits::PG_LOCK_TIMEOUT_MS`]), `statement_timeout`
///   ([`limits::PG_STATEMENT_TIMEOUT_MS`]) and `idle_in_transaction_session_timeout`
///   ([`limits::PG_IDLE_IN_TRANSACTION_TIMEOUT_MS`]): PostgreSQL ends what waits or runs too
///   long, or what a stalled node left open, and frees its locks, so the other nodes' writes
///   answer `unavailable` instead of hanging their workers. (Migrations wait for each other
///   without a limit: see [`schema::migrate`].)
fn session_options() -> String {
    format!(
        "-c synchronous_commit=on -c plan_cache_mode=force_generic_plan -c random_page_cost=1.1 \
         -c default_transaction_isolation=read\\ committed -c lock_timeout={} -c statement_timeout={} \
         -c idle_in_transaction_session_timeout={}",
        limits::PG_LOCK_TIMEOUT_MS,
        limits::PG_STATEMENT_TIMEOUT_MS,
        limits::PG_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    )
}

/// Parses and checks a `postgres://` URL; the password never appears in an error.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg: tokio_postgres::Config =
        url.parse().map_err(|_| StoreError::Unavailable("invalid postgres url".to_string()))?;
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(StoreError::Unavailable(
            "sslmode=require is not supported: qpq connects to postgresql without tls (use loopback, \
             a private network or a tunnel)"
                .to_string(),
        ));
    }
    let options = match cfg.get_options() {
        Some(o) => format!("{o} {}", session_options()),
        None => session_options(),
    };
    cfg.options(&options);
    cfg.connect_timeout(Duration::from_millis(limits::PG_CONNECT_TIMEOUT_MS));
    // A database host that vanished (no RST) is noticed in about a minute, not two hours, and
    // not after 15 minutes of retransmission when a query was in flight (see `limits`).
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(limits::PG_KEEPALIVE_IDLE_SECS))
        .keepalives_interval(Duration::from_secs(limits::PG_KEEPALIVE_INTERVAL_SECS))
        .keepalives_retries(limits::PG_KEEPALIVE_RETRIES)
        .tcp_user_timeout(Duration::from_millis(limits::PG_TCP_USER_TIMEOUT_MS));
    if cfg.get_application_name().is_none() {
        cfg.application_name(&schema::application_name());
    }
    // Every node writes: a new connection goes to a host that accepts writes (with a URL naming
    // several hosts, the first that does), never to a standby.
    cfg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    Ok(cfg)
}

impl PgStore {
    /// Connects, migrates the schema and starts listening for other nodes' mail. Must be called
    /// inside a tokio runtime, which then runs every database call.
    pub async fn open(url: &str, limits: QueueLimits, clock: Clock) -> Result<PgStore, StoreError> {
        let reply_timeout = Duration::from_millis(limits::PG_REPLY_TIMEOUT_MS);
        PgStore::open_with_reply_timeout(url, limits, clock, reply_timeout).await
    }

    /// [`PgStore::open`], with `reply_timeout` as how long a call waits for the database's
    /// answers ([`limits::PG_REPLY_TIMEOUT_MS`] but in tests).
    pub async fn open_with_reply_timeout(
        url: &str,
        limits: QueueLimits,
        clock: Clock,
        reply_timeout: Duration,
    ) -> Result<PgStore, StoreError> {
        let cfg = parse_url(url)?;
        let manager = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let timeout = Some(Duration::from_millis(limits::PG_CONNECT_TIMEOUT_MS));
        let pool = Pool::builder(manager)
            .max_size(limits::PG_POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the connection pool: {e}")))?;
        let (instance_id, deletion_mark) = {
            let mut client = pool.get().await.map_err(|e| unavailable(TxError::from(e)))?;
            let tx = client.transaction().await.map_err(|e| unavailable(TxError::from(e)))?;
            let id = schema::migrate(&tx).await.map_err(unavailable)?;
            let row = tx
                .query_one(
                    "SELECT (SELECT value FROM qpq_meta WHERE name = 'deletion_mark'),
                            (SELECT value FROM qpq_meta WHERE name = 'deletion_mark_wall')",
                    &[],
                )
                .await
                .map_err(|e| unavailable(TxError::from(e)))?;
            let read = |i| row.get::<_, Option<i64>>(i).and_then(|v| u64::try_from(v).ok());
            let mark = read(0).map(|at| crate::clock::DeletionMark { at, wall: read(1).unwrap_or(at) });
            tx.commit().await.map_err(|e| unavailable(TxError::from(e)))?;
            (id, mark)
        };
        let inner = Arc::new(Inner {
            pool,
            limits,
            deletion: crate::clock::DeletionClock::resuming(clock.clone(), deletion_mark),
            clock,
            notifier: Arc::new(Notifier::default()),
            wakeups: Arc::new(wake::Pending::default()),
            commits: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            largest_read: std::sync::atomic::AtomicUsize::new(0),
            instance_id,
            node_id: rand::random(),
            reply_timeout,
            young_heads: mail::YoungHeads::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(listen::run(cfg.clone(), inner.node_id, inner.notifier.clone(), stop.clone()));
        tokio::spawn(wake::run(cfg, inner.node_id, inner.wakeups.clone(), stop.clone()));
        let lane = |inner: &Arc<Inner>| {
            let (sender, queue) = mpsc::channel(limits::PG_BATCH_QUEUE);
            let queue = Arc::new(tokio::sync::Mutex::new(queue));
            for _ in 0..limits::PG_BATCH_WORKERS {
                tokio::spawn(batch::run_worker(inner.clone(), queue.clone()));
            }
            sender
        };
        let (batches, acks) = (lane(&inner), lane(&inner));
        let (fetches, queue) = mpsc::channel(limits::PG_BATCH_QUEUE);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        for _ in 0..limits::PG_FETCH_WORKERS {
            tokio::spawn(reads::run_worker(inner.clone(), queue.clone()));
        }
        Ok(PgStore { inner, runtime: tokio::runtime::Handle::current(), batches, acks, fetches, stop })
    }

    /// Runs `f` on the store's runtime and waits for it.
    async fn on_runtime<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.runtime.spawn(f(self.inner.clone())).await.map_err(|_| StoreError::Closed)?
    }

    pub async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        if let WriteOp::Fanout { channel, payload, recipients, required: Some(required) } = &op
            && recipients.len() > 1
        {
            let (who, add) = (*required, mail::queue_charge(channel, payload));
            self.on_runtime(move |inner| async move { inner.required_has_room(&who, add).await }).await?;
        }
        if !batch::batched(&op) {
            return self.on_runtime(|inner| async move { inner.write(op).await }).await;
        }
        let (reply, answer) = oneshot::channel();
        let lane = if matches!(op, WriteOp::Ack { .. }) { &self.acks } else { &self.batches };
        lane.send((op, reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn fetch(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        if after >= i64::MAX as u64 {
            // No seq is that high (they are bigints).
            return Ok((Vec::new(), false));
        }
        let (reply, answer) = oneshot::channel();
        let request = reads::Request { who: *who, after, limit, max_bytes, reply };
        self.fetches.send(request).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn key_package_count(&self, who: &IdentityKey, now: u64) -> Result<(u64, bool), StoreError> {
        let who = *who;
        self.on_runtime(move |inner| async move {
            let client = inner.pool.get().await.map_err(|e| unavailable(e.into()))?;
            let counted = inner.answered(ops::key_package_count(&client, &who, now)).await;
            inner.settle(client, counted)
        })
        .await
    }

    pub async fn hybrid_key(&self, who: &IdentityKey) -> Result<Option<SignedHybridKey>, StoreError> {
        let who = *who;
        self.on_runtime(move |inner| async move {
            let client = inner.pool.get().await.map_err(|e| unavailable(e.into()))?;
            let found = inner.answered(ops::hybrid_key(&client, &who)).await;
            inner.settle(client, found)
        })
        .await
    }

    pub fn instance_id(&self) -> u64 {
        self.inner.instance_id
    }

    /// The time to delete by age by, resumed from what any node's sweeps recorded (see
    /// [`crate::store::DeliveryStore::deletion_clock`]).
    pub fn deletion_clock(&self) -> &crate::clock::DeletionClock {
        &self.inner.deletion
    }

    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.inner.notifier
    }

    /// Write transactions this node has committed; a group commit that wrote nothing (see
    /// `batch::Applied`) is not counted.
    pub fn commit_count(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// Read statements this node has run for fetches (several fetches may share one).
    pub fn read_statements(&self) -> u64 {
        self.inner.reads.load(Ordering::Relaxed)
    }

    /// The most payload bytes one coalesced read statement has loaded.
    pub fn largest_read_statement_bytes(&self) -> usize {
        self.inner.largest_read.load(Ordering::Relaxed)
    }

    /// Stops listening and closes the pool (calls in flight finish or fail `unavailable`).
    pub fn close(self) {
        self.stop.cancel();
        self.inner.pool.close();
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A [`TxError`] as the caller sees it.
fn unavailable(e: TxError) -> StoreError {
    match e {
        TxError::Conflict(m) => StoreError::Unavailable(format!("transaction kept conflicting: {m}")),
        TxError::ReadOnly(m) => StoreError::Unavailable(format!("the database is read-only: {m}")),
        TxError::Silent(waited) => StoreError::Unavailable(format!(
            "no answer from the database within {} ms (a write may have taken effect)",
            waited.as_millis()
        )),
        TxError::Store(e) => e,
    }
}

impl Inner {
    /// Refuses a fanout whose `required` recipient's queue has no room for `add` more bytes
    /// before it joins a batch, with a read of that one queue. The batch checks it again under
    /// its locks, but only after locking (creating where missing) every recipient's queue row:
    /// a stranger naming 9,999 fresh keys and a queue it had filled made each refused call
    /// upsert 10,000 rows. A refusal read from a committed snapshot is one the fanout could
    /// have met at that moment (a refused fanout takes no number, so nothing orders it
    /// further); a queue with room here is checked again under the batch's locks. So is a full
    /// queue whose oldest message has expired: the batch deletes the expired ones at its head
    /// to make room.
    async fn required_has_room(&self, required: &IdentityKey, add: i64) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(|e| unavailable(e.into()))?;
        let (cutoff, _) = mail::expire_heads_bounds(self.limits, self.deletion.now().0);
        let held = self.answered(ops::queue_held(&client, required, cutoff)).await;
        let (count, bytes, head_expired) = self.settle(client, held)?;
        match mail::queue_full(self.limits, count, bytes, add) {
            Some(full) if !head_expired => Err(full),
            _ => Ok(()),
        }
    }

    /// Drops `client`'s connection instead of returning it to the pool, and every idle one
    /// with it: the server they reached is read-only now (a failover moved the primary), and a
    /// pooled connection would go on failing every write until the node restarted. New ones go
    /// where the URL now leads, to a host that accepts writes (`target_session_attrs`).
    fn discard(&self, client: deadpool_postgres::Object) {
        drop(deadpool_postgres::Object::take(client));
        self.pool.retain(|_, _| false);
        tracing::warn!("the database is read-only (a standby after a failover?); reconnecting");
    }

    /// `work` (one transaction or read on one pooled connection), given up as
    /// [`TxError::Silent`] when the database has not answered it within the reply deadline.
    async fn answered<T>(&self, work: impl Future<Output = Result<T, TxError>>) -> Result<T, TxError> {
        tokio::time::timeout(self.reply_timeout, work)
            .await
            .unwrap_or(Err(TxError::Silent(self.reply_timeout)))
    }

    /// Drops `client`'s connection, which did not answer in time, and every idle one with it.
    /// Its state is unknown (a transaction may be open on it, its COMMIT perhaps still to run),
    /// and the idle ones most likely share its fate (the same path to the same host); new ones
    /// are opened on demand, each within [`limits::PG_CONNECT_TIMEOUT_MS`], so the calls that
    /// follow a partition fail within that instead of each waiting out the deadline on a dead
    /// pooled connection. The dropped connection's task ends once its answers come or TCP gives
    /// up (see [`limits::PG_TCP_USER_TIMEOUT_MS`]); PostgreSQL ends the statement it was running
    /// ([`limits::PG_STATEMENT_TIMEOUT_MS`]).
    fn abandon(&self, client: deadpool_postgres::Object) {
        drop(deadpool_postgres::Object::take(client));
        self.pool.retain(|_, _| false);
        tracing::warn!(
            waited_ms = self.reply_timeout.as_millis() as u64,
            "the database did not answer in time; dropping its connections"
        );
    }

    /// The result of one read on `client`, which goes back to the pool unless it was silent.
    fn settle<T>(
        &self,
        client: deadpool_postgres::Object,
        result: Result<T, TxError>,
    ) -> Result<T, StoreError> {
        if let Err(TxError::Silent(_)) = result {
            self.abandon(client);
        }
        result.map_err(unavailable)
    }

    /// One write in its own transaction, run again after a deadlock or serialization failure,
    /// or on a new connection after meeting a read-only server.
    async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        let now_ms = self.clock.now_ms();
        let mut last = String::new();
        for _ in 0..limits::PG_TX_ATTEMPTS {
            let mut client = self.pool.get().await.map_err(|e| unavailable(e.into()))?;
            let mut woken = Vec::new();
            // An inner refusal commits what the operation did before refusing (a take that
            // found no live package still deletes the expired ones, as redb does); a refused
            // enqueue or fanout is an outer error and rolls back (`ops::apply`). An error drops
            // `tx`, which rolls it back.
            let attempt = async {
                let tx = client.transaction().await?;
                let expiry = mail::Expiry { by: self.deletion.now().0, young: None };
                let outcome = ops::apply(&tx, self.limits, (now_ms, expiry), &op, &mut woken).await?;
                tx.commit().await?;
                Ok(outcome)
            };
            match self.answered(attempt).await {
                Ok(outcome) => {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    self.notifier.notify(woken.iter());
                    self.wakeups.push(woken.iter());
                    return outcome;
                }
                Err(TxError::Conflict(m)) => last = m,
                Err(TxError::ReadOnly(m)) => {
                    last = m;
                    self.discard(client);
                }
                Err(e @ TxError::Silent(_)) => {
                    self.abandon(client);
                    return Err(unavailable(e));
                }
                Err(TxError::Store(e)) => return Err(e),
            }
            tracing::debug!(error = %last, "postgresql transaction conflicted, running it again");
        }
        Err(StoreError::Unavailable(format!("transaction kept conflicting: {last}")))
    }
}

impl super::DeliveryStore for PgStore {
    async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        PgStore::write(self, op).await
    }

    async fn fetch(
        &self,
        who: &IdentityKey,
        after: u64,
        limit: u32,
        max_bytes: usize,
        room: &mut dyn FnMut(usize) -> bool,
    ) -> Result<(Vec<StoredMessage>, bool), StoreError> {
        let (mut msgs, mut more) = PgStore::fetch(self, who, after, limit, max_bytes).await?;
        if let Some(cut) = msgs.iter().position(|m| !room(m.payload.len() + m.channel_id.len())) {
            msgs.truncate(cut);
            more = true;
        }
        Ok((msgs, more))
    }

    async fn key_package_count(&self, who: &IdentityKey, now: u64) -> Result<(u64, bool), StoreError> {
        PgStore::key_package_count(self, who, now).await
    }

    async fn hybrid_key(&self, who: &IdentityKey) -> Result<Option<SignedHybridKey>, StoreError> {
        PgStore::hybrid_key(self, who).await
    }

    fn instance_id(&self) -> u64 {
        PgStore::instance_id(self)
    }

    fn deletion_clock(&self) -> &crate::clock::DeletionClock {
        PgStore::deletion_clock(self)
    }

    fn notifier(&self) -> &Arc<Notifier> {
        PgStore::notifier(self)
    }

    fn commit_count(&self) -> u64 {
        PgStore::commit_count(self)
    }

    fn fallback_poll(&self) -> Option<Duration> {
        // NOTIFYs sent while the listen connection was down are lost (see `listen`).
        Some(Duration::from_millis(limits::PG_FALLBACK_POLL_MS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_forces_durable_commits_and_generic_plans_after_the_urls_own_options() {
        let cfg = parse_url("postgres://qpq@127.0.0.1:5432/qpq?options=-c%20synchronous_commit%3Doff%20-c%20plan_cache_mode%3Dauto")
            .expect("a valid url");
        let options = cfg.get_options().expect("options are set");
        // PostgreSQL applies `-c` settings in order, so ours must come last to win.
        assert!(options.starts_with("-c synchronous_commit=off -c plan_cache_mode=auto "), "{options}");
        let ours = session_options();
        assert!(options.ends_with(&ours), "{options}");
        for forced in [
            "synchronous_commit=on",
            "plan_cache_mode=force_generic_plan",
            "random_page_cost=1.1",
            "default_transaction_isolation=read\\ committed",
            &format!("lock_timeout={} ", limits::PG_LOCK_TIMEOUT_MS),
            &format!("statement_timeout={} ", limits::PG_STATEMENT_TIMEOUT_MS),
            &format!("idle_in_transaction_session_timeout={}", limits::PG_IDLE_IN_TRANSACTION_TIMEOUT_MS),
        ] {
            assert!(ours.contains(forced), "{forced} missing from {ours}");
        }
        let plain = parse_url("postgres://qpq@127.0.0.1:5432/qpq").expect("a valid url");
        assert_eq!(plain.get_options(), Some(ours.as_str()));
        // A query in flight to a vanished host fails within a minute, not after retransmission.
        assert_eq!(plain.get_keepalives_idle(), Duration::from_secs(limits::PG_KEEPALIVE_IDLE_SECS));
        assert_eq!(
            plain.get_tcp_user_timeout(),
            Some(&Duration::from_millis(limits::PG_TCP_USER_TIMEOUT_MS))
        );
        // Named after the schema it speaks, so a migrating node sees it (see `schema`).
        assert_eq!(plain.get_application_name(), Some(format!("qpq schema {SCHEMA_VERSION}").as_str()));
    }
}
