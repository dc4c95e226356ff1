//! The NodeService and Account capabilities: the AS and DS handlers behind `schemas/node.capnp`.
//!
//! Untrusted call parameters are parsed into typed values once, here at the boundary
//! ([`parse_identity`], [`parse_channel`], ...); every failure becomes an RPC error with a
//! lowercase message for the caller, never a panic or a dropped connection. `Account` exists only
//! as the result of a successful `authenticate`, so every method on it acts on a proven key.

use std::borrow::Borrow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use capnp::Error;
use capnp::capability::Rc;
use ed25519_dalek::{Signature, VerifyingKey};

use super::memory::ConnMemory;
use super::ratelimit::{ConnectionBucket, KeyedLimiter};
use super::{Shared, admission};
use crate::crypto::hybrid::{HYBRID_PUBLIC_KEY_LEN, SignedHybridKey};
use crate::limits;
use crate::logthrottle::SharedLogThrottle;
use crate::mls;
use crate::proto::node_capnp::{account, node_service};
use crate::proto::wire_error::{ErrorCode, WireError};
use crate::store::{
    DeliveryStore, IdentityKey, KeyPackageEntry, Outcome, StoreError, StoredMessage, Taken, WriteOp,
};
use crate::transport;

/// A malformed or out-of-range parameter (code `badRequest`).
fn failed(msg: impl Into<String>) -> Error {
    coded(ErrorCode::BadRequest, msg)
}

/// Reading a call's parameters fails only when the message is malformed (a pointer out of
/// bounds, a wrong type, past the traversal limit): the caller's fault. capnp's own error carries
/// no code and would read as `unknown` to a client; it is `badRequest` (a review).
trait Malformed<T> {
    fn malformed(self) -> Result<T, Error>;
}

impl<T> Malformed<T> for capnp::Result<T> {
    fn malformed(self) -> Result<T, Error> {
        self.map_err(|e| failed(format!("malformed call: {e}")))
    }
}

/// An error with its wire code; every error this module sends is built here or by
/// [`WireError::into_rpc`].
fn coded(code: ErrorCode, msg: impl Into<String>) -> Error {
    WireError::new(code, msg).into_rpc()
}

fn unexpected(outcome: &Outcome) -> Error {
    coded(ErrorCode::Internal, format!("internal error: unexpected outcome {outcome:?}"))
}

/// The `unavailable` log line is written from every connection on every RPC worker thread.
static UNAVAILABLE_LOG: SharedLogThrottle =
    SharedLogThrottle::new(Duration::from_millis(limits::STORE_OUTAGE_LOG_INTERVAL_MS));

/// So is the `store failure` line: a damaged row that every call of some key meets, or a
/// database refusing every write, would otherwise write one line per call.
static STORE_FAILURE_LOG: SharedLogThrottle =
    SharedLogThrottle::new(Duration::from_millis(limits::STORE_OUTAGE_LOG_INTERVAL_MS));

fn store_err(e: StoreError) -> Error {
    let code = match &e {
        StoreError::Db(inner) => {
            if let Some(unlogged) = STORE_FAILURE_LOG.note(std::time::Instant::now()) {
                tracing::error!(error = %inner, unlogged, "store failure");
            }
            return coded(ErrorCode::Internal, "internal storage error");
        }
        StoreError::OverQuota { .. } => {
            return WireError::retry_after(
                ErrorCode::OverQuota,
                e.to_string(),
                limits::OVER_QUOTA_RETRY_AFTER_MS,
            )
            .into_rpc();
        }
        // Key material leaves only as packages are taken or expire (weeks): no retry hint.
        StoreError::KeyStoreFull { .. } => ErrorCode::OverQuota,
        StoreError::QueueFull { .. } => ErrorCode::QueueFull,
        StoreError::PoolFull { .. } => ErrorCode::PoolFull,
        StoreError::NoKeyPackages => ErrorCode::NoKeyPackages,
        StoreError::DuplicateRecipient { .. } => ErrorCode::BadRequest,
        StoreError::StaleHybridKey { .. } => ErrorCode::StaleKey,
        StoreError::Closed => ErrorCode::ShuttingDown,
        StoreError::Unavailable(inner) => {
            if let Some(unlogged) = UNAVAILABLE_LOG.note(std::time::Instant::now()) {
                tracing::error!(error = %inner, unlogged, "shared database unavailable");
            }
            return WireError::retry_after(
                ErrorCode::Unavailable,
                "storage unavailable: the server cannot reach its database",
                limits::STORE_UNAVAILABLE_RETRY_AFTER_MS,
            )
            .into_rpc();
        }
        StoreError::SchemaVersion { .. } | StoreError::InUse => ErrorCode::Internal,
    };
    coded(code, e.to_string())
}

/// Parses a raw Ed25519 public key field.
pub fn parse_identity(what: &str, data: &[u8]) -> Result<IdentityKey, Error> {
    data.try_into()
        .map_err(|_| failed(format!("{what} must be {} bytes, got {}", limits::IDENTITY_KEY_LEN, data.len())))
}

fn parse_channel(data: &[u8]) -> Result<Vec<u8>, Error> {
    if data.len() > limits::MAX_CHANNEL_ID_LEN {
        return Err(failed(format!(
            "channel id too long: {} > {} bytes",
            data.len(),
            limits::MAX_CHANNEL_ID_LEN
        )));
    }
    Ok(data.to_vec())
}

fn check_payload(shared: &Shared, payload: &[u8]) -> Result<(), Error> {
    if payload.is_empty() {
        return Err(failed("payload is empty"));
    }
    if payload.len() > shared.limits.max_payload {
        return Err(coded(
            ErrorCode::TooLarge,
            format!("payload too large: {} > {} bytes", payload.len(), shared.limits.max_payload),
        ));
    }
    Ok(())
}

fn fetch_limit(requested: u32) -> u32 {
    match requested {
        0 => limits::MAX_FETCH_MESSAGES,
        n => n.min(limits::MAX_FETCH_MESSAGES),
    }
}

/// Request bytes in calls of one connection that have not been answered yet.
#[derive(Default, Clone)]
pub struct InflightBudget(std::rc::Rc<std::cell::Cell<usize>>);

/// Holds `bytes` of a connection's budget until dropped.
pub struct InflightGuard {
    budget: InflightBudget,
    bytes: usize,
}

impl InflightBudget {
    /// Reserves `bytes` or fails with a clear error when the connection has too much pending.
    fn reserve(&self, bytes: usize) -> Result<InflightGuard, Error> {
        let used = self.0.get();
        if used + bytes > limits::MAX_INFLIGHT_BYTES_PER_CONNECTION {
            return Err(WireError::retry_after(
                ErrorCode::Busy,
                format!(
                    "too many requests in flight on this connection: {} + {bytes} > {} bytes",
                    used,
                    limits::MAX_INFLIGHT_BYTES_PER_CONNECTION
                ),
                limits::BUSY_RETRY_AFTER_MS,
            )
            .into_rpc());
        }
        self.0.set(used + bytes);
        Ok(InflightGuard { budget: self.clone(), bytes })
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.budget.0.set(self.budget.0.get().saturating_sub(self.bytes));
    }
}

/// Bytes a call is counted for beyond its payloads (keys, channel id, capnp framing).
const CALL_OVERHEAD_BYTES: usize = 1024;

fn size_bytes(size: capnp::MessageSize) -> usize {
    usize::try_from(size.word_count).unwrap_or(usize::MAX).saturating_mul(8)
}

/// The bootstrap capability of one connection.
pub struct NodeServiceImpl {
    pub shared: Arc<Shared>,
    /// This connection's TLS-exported authentication challenge.
    pub challenge: [u8; 32],
    /// Shared by every capability of this connection.
    pub budget: InflightBudget,
    /// The peer's address as rate limits count it (IPv4, or IPv6 /64).
    source: IpAddr,
    enqueue_rate: ConnectionBucket,
    key_package_rate: ConnectionBucket,
    lookup_rate: ConnectionBucket,
    /// Shared with this connection's accounts, which make the uploads.
    key_upload_rate: Rc<ConnectionBucket>,
    /// This connection's unwritten replies and parked long polls.
    memory: Rc<ConnMemory>,
    /// The account capability of each identity authenticated on this connection: authenticating
    /// again hands out the same one, so a peer repeating `authenticate` (and never releasing
    /// what it got) does not grow capnp-rpc's export table; at most
    /// [`limits::MAX_IDENTITIES_PER_CONNECTION`] identities.
    accounts: std::cell::RefCell<std::collections::HashMap<IdentityKey, account::Client>>,
    /// `authenticate` calls of this connection that failed: past
    /// [`limits::MAX_AUTH_FAILURES_PER_CONNECTION`], no signature is checked any more.
    auth_failures: std::cell::Cell<usize>,
}

impl NodeServiceImpl {
    pub fn new(
        shared: Arc<Shared>,
        challenge: [u8; 32],
        remote: IpAddr,
        memory: Rc<ConnMemory>,
    ) -> NodeServiceImpl {
        let rates = shared.rates.config;
        let enqueue_rate = ConnectionBucket::new(rates.enqueue_per_connection, &shared.clock);
        let key_package_rate = ConnectionBucket::new(rates.key_package_per_connection, &shared.clock);
        let lookup_rate = ConnectionBucket::new(rates.lookup_per_connection, &shared.clock);
        let key_upload_rate = Rc::new(ConnectionBucket::new(rates.key_upload_per_connection, &shared.clock));
        NodeServiceImpl {
            challenge,
            budget: InflightBudget::default(),
            source: super::admission::quota_key(remote),
            enqueue_rate,
            key_package_rate,
            lookup_rate,
            key_upload_rate,
            shared,
            memory,
            accounts: Default::default(),
            auth_failures: Default::default(),
        }
    }

    /// Takes `bytes` of this connection's network's mail budget, all or nothing (see
    /// [`limits::DEFAULT_ENQUEUE_BYTES_RATE_PER_NETWORK`]), then writes `op`, which names
    /// `recipients` recipients (a batch's items, a fanout's keys).
    ///
    /// When the store refuses the write (a full queue, the storage quota), the network pays
    /// [`limits::REFUSED_RECIPIENT_BYTES`] per recipient instead of `bytes`: a client retrying a
    /// refused message is not charged its payload again, but a refusal is not free either. The
    /// store looked every recipient up before it refused (a batch whose last queue is full costs
    /// the writer a lookup per item), and with a full refund a sender could repeat such calls
    /// at the call rate alone, millions of lookups a second that every user's write waits
    /// behind (a review of the server). A failure of the server's own (its database, a
    /// shutdown) gives everything back.
    async fn write_enqueue(&self, op: WriteOp, bytes: usize, recipients: usize) -> Result<Outcome, Error> {
        let limiter = &self.shared.rates.enqueue_bytes_per_network;
        let network = admission::network_key(self.source);
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        limiter.take_n(network, self.shared.clock.now_ms(), bytes).map_err(|ms| {
            rate_limited_as("rate limited: too many bytes of mail enqueued from this network", ms)
        })?;
        let written = self.shared.store.write(op).await;
        if let Err(e) = &written {
            let owed = if refused_by_the_store(e) {
                (recipients as u64).saturating_mul(limits::REFUSED_RECIPIENT_BYTES)
            } else {
                0
            };
            let taken = u64::from(bytes);
            if owed <= taken {
                self.refund_network_bytes(taken - owed);
            } else {
                // Small payloads to many recipients: the rest goes into debt, which delays the
                // network's next enqueue.
                let more = u32::try_from(owed - taken).unwrap_or(u32::MAX);
                limiter.charge_n(network, self.shared.clock.now_ms(), more);
            }
        }
        written.map_err(store_err)
    }

    /// Gives back bytes [`Self::write_enqueue`] took from this network's budget for what was
    /// not stored after all (the recipients a fanout skipped).
    fn refund_network_bytes(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let network = admission::network_key(self.source);
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.shared.rates.enqueue_bytes_per_network.refund(network, self.shared.clock.now_ms(), bytes);
    }

    /// One token of this connection's and its address's enqueue budget.
    fn take_enqueue_token(&self) -> Result<(), Error> {
        let rates = &self.shared.rates;
        take_pair(&self.shared, &self.enqueue_rate, &rates.enqueue_per_address, self.source, "enqueues")
    }

    /// One token of this connection's and its address's lookup budget (`fetchHybridKey`).
    fn take_lookup_token(&self) -> Result<(), Error> {
        let rates = &self.shared.rates;
        take_pair(&self.shared, &self.lookup_rate, &rates.lookup_per_address, self.source, "key lookups")
    }

    /// One token of this connection's and its address's KeyPackage budget, and one of the
    /// target key's. The target's is taken before the store is asked (so that calls sent
    /// together cannot all pass a check and take a whole pool, as a review showed), and given
    /// back when no package is handed out ([`Self::refund_key_package_token`]): fetches for
    /// keys without packages (a stranger naming random keys) leave full buckets, which the
    /// per-target table drops first, so they cannot lock out real ones.
    ///
    /// The per-target limit fails open when its table is full of draining buckets (65,536
    /// targets each handed a package within the last few minutes): the fetch is then held only
    /// by the connection's and address's limits. Failing closed would refuse every fetch for
    /// any other person for as long as someone kept the table full, so nobody new could be
    /// added to a group; failing open only lets one who already drains 65,536 pools drain one
    /// more faster, and a drained pool still yields its last-resort package.
    fn take_key_package_token(&self, target: &IdentityKey) -> Result<(), Error> {
        let rates = &self.shared.rates;
        let what = "key package fetches";
        take_pair(&self.shared, &self.key_package_rate, &rates.key_package_per_address, self.source, what)?;
        rates
            .key_package_per_target
            .take_n(*target, self.shared.clock.now_ms(), 1)
            .map_err(|ms| rate_limited("key package fetches for this key", ms))
    }

    fn refund_key_package_token(&self, target: &IdentityKey) {
        self.shared.rates.key_package_per_target.refund(*target, self.shared.clock.now_ms(), 1);
    }
}

/// What [`AccountImpl::charge_key_uploads`] took from its network's key material budget: the
/// rows an upload would store and the bytes charged for them.
#[derive(Clone, Copy)]
struct KeyCharge {
    rows: u64,
    bytes: u32,
}

/// Whether the store refused a write after checking it (a limit it breaks), as opposed to
/// failing (its database, a shutdown): only a refusal is charged to the sender.
fn refused_by_the_store(e: &StoreError) -> bool {
    !matches!(e, StoreError::Db(_) | StoreError::Closed | StoreError::Unavailable(_))
}

/// One token of a connection's bucket, then one of its address's: `rateLimited` naming `what`
/// (the calls counted) and which of the two ran out.
fn take_pair(
    shared: &Shared,
    connection: &ConnectionBucket,
    per_address: &KeyedLimiter<IpAddr>,
    source: IpAddr,
    what: &str,
) -> Result<(), Error> {
    let now = shared.clock.now_ms();
    connection.take(&shared.clock).map_err(|ms| rate_limited(&format!("{what} from this connection"), ms))?;
    per_address.take(source, now).map_err(|ms| rate_limited(&format!("{what} from this address"), ms))
}

fn rate_limited(what: &str, retry_after_ms: u64) -> Error {
    rate_limited_as(&format!("rate limited: too many {what}"), retry_after_ms)
}

fn rate_limited_as(message: &str, retry_after_ms: u64) -> Error {
    WireError::retry_after(ErrorCode::RateLimited, message.to_string(), retry_after_ms).into_rpc()
}

/// The refusal of a key upload while its network's key material budget is spent.
fn key_material_limited(retry_after_ms: u64) -> Error {
    rate_limited_as("rate limited: too much key material uploaded from this network", retry_after_ms)
}

impl node_service::Server for NodeServiceImpl {
    fn health(
        self: Rc<Self>,
        _: node_service::HealthParams,
        mut results: node_service::HealthResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let mut r = results.get();
        r.set_status(if self.shared.is_draining() { "draining" } else { "ok" });
        r.set_version(env!("CARGO_PKG_VERSION"));
        r.set_uptime_secs(self.shared.started.elapsed().as_secs());
        std::future::ready(Ok(()))
    }

    fn authenticate(
        self: Rc<Self>,
        params: node_service::AuthenticateParams,
        mut results: node_service::AuthenticateResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        let res = (|| {
            let p = params.get().malformed()?;
            let who = parse_identity("identity key", p.get_identity_key().malformed()?)?;
            // An identity this connection has proved gets its account again without a second
            // check: it holds it already, and a peer replaying its own valid signature must not
            // buy a signature verification per call.
            if let Some(account) = self.accounts.borrow().get(&who) {
                results.get().set_account(account.clone());
                results.get().set_instance(self.shared.store.instance_id());
                return Ok(());
            }
            // A connection trying key after key: each try costs a point decompression and a
            // verification (~60 µs), on the worker thread every connection of it shares.
            if self.auth_failures.get() >= limits::MAX_AUTH_FAILURES_PER_CONNECTION {
                return Err(coded(
                    ErrorCode::AuthFailed,
                    format!(
                        "too many failed authentications on this connection (at most {}): use another connection",
                        limits::MAX_AUTH_FAILURES_PER_CONNECTION
                    ),
                ));
            }
            let failure = |e: Error| {
                self.auth_failures.set(self.auth_failures.get().saturating_add(1));
                e
            };
            let sig = p.get_signature().malformed()?;
            let sig = Signature::from_slice(sig).map_err(|_| {
                failure(failed(format!(
                    "signature must be {} bytes, got {}",
                    limits::SIGNATURE_LEN,
                    sig.len()
                )))
            })?;
            let vk = VerifyingKey::from_bytes(&who)
                .map_err(|_| failure(failed("identity key is not a valid ed25519 public key")))?;
            vk.verify_strict(&transport::auth_message(&self.challenge), &sig).map_err(|_| {
                failure(coded(
                    ErrorCode::AuthFailed,
                    "authentication failed: signature does not verify for this connection",
                ))
            })?;
            tracing::debug!(identity = %hex::encode(&who[..4]), "authenticated");
            let mut accounts = self.accounts.borrow_mut();
            if !accounts.contains_key(&who) && accounts.len() >= limits::MAX_IDENTITIES_PER_CONNECTION {
                return Err(coded(
                    ErrorCode::AuthFailed,
                    format!(
                        "too many identities on one connection (at most {}): use another connection",
                        limits::MAX_IDENTITIES_PER_CONNECTION
                    ),
                ));
            }
            let account = accounts.entry(who).or_insert_with(|| {
                capnp_rpc::new_client(AccountImpl {
                    shared: self.shared.clone(),
                    who,
                    budget: self.budget.clone(),
                    memory: self.memory.clone(),
                    source: self.source,
                    key_upload_rate: self.key_upload_rate.clone(),
                })
            });
            results.get().set_account(account.clone());
            results.get().set_instance(self.shared.store.instance_id());
            Ok(())
        })();
        std::future::ready(res)
    }

    fn fetch_key_package(
        self: Rc<Self>,
        params: node_service::FetchKeyPackageParams,
        mut results: node_service::FetchKeyPackageResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            let who =
                parse_identity("identity key", params.get().malformed()?.get_identity_key().malformed()?)?;
            drop(params); // its frame is not held across the store write (see `fetch_wait`)
            self.take_key_package_token(&who)?;
            let now = self.shared.key_package_now();
            let taken = self.shared.store.write(WriteOp::TakeKeyPackage { who, now }).await;
            if !matches!(taken, Ok(Outcome::KeyPackage { .. })) {
                self.refund_key_package_token(&who);
            }
            match taken.map_err(store_err)? {
                Outcome::KeyPackage { bytes, remaining, last_resort } => {
                    let mut r = results.get();
                    r.set_key_package(&bytes);
                    r.set_remaining(u32::try_from(remaining).unwrap_or(u32::MAX));
                    r.set_last_resort(last_resort);
                    Ok(())
                }
                other => Err(unexpected(&other)),
            }
        }
    }

    fn fetch_hybrid_key(
        self: Rc<Self>,
        params: node_service::FetchHybridKeyParams,
        mut results: node_service::FetchHybridKeyResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let who =
                parse_identity("identity key", params.get().malformed()?.get_identity_key().malformed()?)?;
            drop(params); // its frame is not held across the store read (see `fetch_wait`)
            self.take_lookup_token()?;
            let signed = self
                .shared
                .store
                .hybrid_key(&who)
                .await
                .map_err(store_err)?
                .ok_or_else(|| coded(ErrorCode::NoHybridKey, "no hybrid key for this key"))?;
            let mut r = results.get();
            r.set_hybrid_key(&signed.key);
            r.set_signature(&signed.signature);
            r.set_created_at_ms(signed.created_at_ms);
            Ok(())
        }
    }

    fn enqueue(
        self: Rc<Self>,
        params: node_service::EnqueueParams,
        mut results: node_service::EnqueueResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            self.take_enqueue_token()?;
            let p = params.get().malformed()?;
            let who = parse_identity("recipient key", p.get_recipient_key().malformed()?)?;
            let payload = p.get_payload().malformed()?;
            // Counted from what we read anyway: capnp's traversal limit counts every word read,
            // so a second pass (total_size) would halve the largest call we can take.
            let _bytes = self.budget.reserve(payload.len().saturating_add(CALL_OVERHEAD_BYTES))?;
            check_payload(&self.shared, payload)?;
            let channel = parse_channel(p.get_channel_id().malformed()?)?;
            let charged = stored_entry_bytes(&channel, payload.len());
            let op = WriteOp::Enqueue { channel, items: vec![(who, payload.to_vec())] };
            match self.write_enqueue(op, charged, 1).await? {
                Outcome::Enqueued { channel_seq, seqs } => {
                    let mut r = results.get();
                    r.set_seq(seqs.first().copied().unwrap_or(0));
                    r.set_channel_seq(channel_seq);
                    Ok(())
                }
                other => Err(unexpected(&other)),
            }
        }
    }

    fn enqueue_batch(
        self: Rc<Self>,
        params: node_service::EnqueueBatchParams,
        mut results: node_service::EnqueueBatchResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            self.take_enqueue_token()?;
            let p = params.get().malformed()?;
            let channel = parse_channel(p.get_channel_id().malformed()?)?;
            let list = p.get_items().malformed()?;
            if list.is_empty() {
                return Err(failed("batch has no recipients"));
            }
            if list.len() as usize > limits::MAX_BATCH_RECIPIENTS {
                // tooLarge, as for a fanout (the schema's codes): the call is over a size limit.
                return Err(coded(
                    ErrorCode::TooLarge,
                    format!("too many recipients: {} > {}", list.len(), limits::MAX_BATCH_RECIPIENTS),
                ));
            }
            let mut items = Vec::with_capacity(list.len() as usize);
            let mut seen = std::collections::HashMap::with_capacity(list.len() as usize);
            let mut total = 0usize;
            for (i, item) in list.iter().enumerate() {
                let who = parse_identity("recipient key", item.get_recipient_key().malformed()?)?;
                if let Some(first) = seen.insert(who, i) {
                    return Err(failed(format!("duplicate recipient: item {i} repeats item {first}")));
                }
                let payload = item.get_payload().malformed()?;
                check_payload(&self.shared, payload)?;
                total += payload.len();
                if total > limits::MAX_BATCH_BYTES {
                    return Err(coded(
                        ErrorCode::TooLarge,
                        format!("batch too large: more than {} bytes", limits::MAX_BATCH_BYTES),
                    ));
                }
                items.push((who, payload.to_vec()));
            }
            let _bytes = self.budget.reserve(total.saturating_add(CALL_OVERHEAD_BYTES))?;
            let named = items.len();
            let charged = items.iter().map(|(_, payload)| stored_entry_bytes(&channel, payload.len())).sum();
            match self.write_enqueue(WriteOp::Enqueue { channel, items }, charged, named).await? {
                Outcome::Enqueued { channel_seq, seqs } => {
                    let mut r = results.get();
                    r.set_channel_seq(channel_seq);
                    put_seqs(r.init_seqs(seqs.len() as u32), &seqs);
                    Ok(())
                }
                other => Err(unexpected(&other)),
            }
        }
    }

    fn enqueue_fanout(
        self: Rc<Self>,
        params: node_service::EnqueueFanoutParams,
        mut results: node_service::EnqueueFanoutResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            self.take_enqueue_token()?;
            let p = params.get().malformed()?;
            let channel = parse_channel(p.get_channel_id().malformed()?)?;
            let payload = p.get_payload().malformed()?;
            check_payload(&self.shared, payload)?;
            let recipients = parse_fanout_recipients(p.get_recipients().malformed()?)?;
            let required = parse_required(p.get_required().malformed()?, &recipients)?;
            let held = payload.len().saturating_add(recipients.len() * limits::IDENTITY_KEY_LEN);
            let _bytes = self.budget.reserve(held.saturating_add(CALL_OVERHEAD_BYTES))?;
            let fanout_bytes = (recipients.len() as u64).saturating_mul(limits::FANOUT_ENTRY_BYTES);
            // The shared row (its payload id and the inline entry) once, an index entry each.
            let row = 8usize.saturating_add(stored_entry_bytes(&channel, payload.len()));
            let charged = row.saturating_add(usize::try_from(fanout_bytes).unwrap_or(usize::MAX));
            let named = recipients.len();
            let op = WriteOp::Fanout { channel, payload: payload.to_vec(), recipients, required };
            match self.write_enqueue(op, charged, named).await? {
                Outcome::Enqueued { channel_seq, seqs } => {
                    // Recipients whose queues were full (seq 0) got nothing and cost nothing.
                    let skipped = seqs.iter().filter(|s| **s == 0).count() as u64;
                    self.refund_network_bytes(skipped.saturating_mul(limits::FANOUT_ENTRY_BYTES));
                    let mut r = results.get();
                    r.set_channel_seq(channel_seq);
                    put_seqs(r.init_seqs(seqs.len() as u32), &seqs);
                    Ok(())
                }
                other => Err(unexpected(&other)),
            }
        }
    }
}

/// What the storage quota charges for one queued copy of `payload_len` bytes on `channel`:
/// the payload with its entry header and channel id. The network's mail budget is charged the
/// same, so a stranger's one-byte payloads on 64-byte channels cost it what they cost the
/// quota (82 bytes each), not one byte (a review: 82 times less, so one address could fill the
/// quota that the budget says takes sixteen networks a day).
fn stored_entry_bytes(channel: &[u8], payload_len: usize) -> usize {
    limits::QUEUE_ENTRY_HEADER_BYTES.saturating_add(channel.len()).saturating_add(payload_len)
}

/// Writes each recipient's seq of an `enqueueBatch` or `enqueueFanout` answer, in request order.
fn put_seqs(mut out: capnp::primitive_list::Builder<'_, u64>, seqs: &[u64]) {
    for (i, s) in seqs.iter().enumerate() {
        out.set(i as u32, *s);
    }
}

/// Reads the recipient list of an `enqueueFanout`: 1..=[`limits::MAX_FANOUT_RECIPIENTS`]
/// distinct 32-byte keys.
fn parse_fanout_recipients(list: capnp::data_list::Reader<'_>) -> Result<Vec<IdentityKey>, Error> {
    if list.is_empty() {
        return Err(failed("fanout has no recipients"));
    }
    if list.len() as usize > limits::MAX_FANOUT_RECIPIENTS {
        return Err(coded(
            ErrorCode::TooLarge,
            format!("too many recipients: {} > {}", list.len(), limits::MAX_FANOUT_RECIPIENTS),
        ));
    }
    let mut keys = Vec::with_capacity(list.len() as usize);
    let mut seen = std::collections::HashMap::with_capacity(list.len() as usize);
    for (i, key) in list.iter().enumerate() {
        let who = parse_identity("recipient key", key.malformed()?)?;
        if let Some(first) = seen.insert(who, i) {
            return Err(failed(format!("duplicate recipient: item {i} repeats item {first}")));
        }
        keys.push(who);
    }
    Ok(keys)
}

/// Reads the `required` key of an `enqueueFanout`: empty for none, else one of `recipients`.
fn parse_required(data: &[u8], recipients: &[IdentityKey]) -> Result<Option<IdentityKey>, Error> {
    if data.is_empty() {
        return Ok(None);
    }
    let required = parse_identity("required key", data)?;
    if !recipients.contains(&required) {
        return Err(failed("required key is not one of the recipients"));
    }
    Ok(Some(required))
}

/// An authenticated account: every method acts on `who` only.
pub struct AccountImpl {
    shared: Arc<Shared>,
    who: IdentityKey,
    budget: InflightBudget,
    memory: Rc<ConnMemory>,
    /// The connection's address as rate limits count it, and its key upload bucket.
    source: IpAddr,
    key_upload_rate: Rc<ConnectionBucket>,
}

/// Bytes a fetch reply of `msgs` takes: payloads and channel ids plus the struct around each.
fn reply_bytes<M: Borrow<StoredMessage>>(msgs: &[M]) -> usize {
    msgs.iter().map(|m| m.borrow()).map(|m| m.payload.len() + m.channel_id.len() + 64).sum::<usize>() + 64
}

/// Writes `msgs` (read from the store, or shared with other waiters: see `store::notifier`).
fn write_messages<M: Borrow<StoredMessage>>(
    mut list: capnp::struct_list::Builder<'_, account::message::Owned>,
    msgs: &[M],
) {
    for (i, m) in msgs.iter().enumerate() {
        let m = m.borrow();
        let mut b = list.reborrow().get(i as u32);
        b.set_seq(m.seq);
        b.set_channel_id(&m.channel_id);
        b.set_channel_seq(m.channel_seq);
        b.set_payload(&m.payload);
        b.set_enqueued_at_ms(m.enqueued_at_ms);
    }
}

impl account::Server for AccountImpl {
    fn identity(
        self: Rc<Self>,
        _: account::IdentityParams,
        mut results: account::IdentityResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        results.get().set_identity_key(&self.who);
        std::future::ready(Ok(()))
    }

    fn upload_key_packages(
        self: Rc<Self>,
        params: account::UploadKeyPackagesParams,
        mut results: account::UploadKeyPackagesResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            self.take_key_upload_token()?;
            let _bytes =
                self.budget.reserve(size_bytes(params.get().malformed()?.total_size().malformed()?))?;
            let p = params.get().malformed()?;
            let list = p.get_key_packages().malformed()?;
            // tooLarge, as for a batch or a payload: the call is over a size limit (the schema).
            if list.len() as usize > limits::MAX_KEY_PACKAGES_PER_UPLOAD {
                return Err(coded(
                    ErrorCode::TooLarge,
                    format!(
                        "too many key packages in one upload: {} > {}",
                        list.len(),
                        limits::MAX_KEY_PACKAGES_PER_UPLOAD
                    ),
                ));
            }
            let lr_len = p.get_last_resort().malformed()?.len();
            let lr_given = lr_len > 0;
            let lens: Vec<usize> = list.iter().map(|kp| kp.map_or(0, <[u8]>::len)).collect();
            // Sizes before the network's budget is charged: junk of any size must not spend it.
            if let Some(len) =
                lens.iter().copied().chain([lr_len]).find(|&l| l > limits::MAX_KEY_PACKAGE_BYTES)
            {
                return Err(coded(
                    ErrorCode::TooLarge,
                    format!("key package too large: {len} > {} bytes", limits::MAX_KEY_PACKAGE_BYTES),
                ));
            }
            let charged = self.charge_key_uploads(
                list.len().saturating_add(u32::from(lr_given)),
                lens.into_iter().chain(lr_given.then_some(lr_len)),
            )?;
            // One reading of the clock judges the whole upload: the packages' own validity at
            // `now`, what is already stored (and what may be pruned) at the hand-out time.
            let now = self.shared.clock.now_secs();
            let kp_now = now.saturating_add(self.shared.limits.key_package_margin_secs);
            // A full pool is refused before the packages' signatures are checked (two each): a
            // replayed upload must not buy hundreds of checks. The write checks again, atomically.
            let adding = u64::from(list.len());
            if adding > 0 {
                let (have, _) =
                    self.shared.store.key_package_count(&self.who, kp_now).await.map_err(store_err)?;
                if have.saturating_add(adding) > limits::MAX_KEY_PACKAGES_PER_IDENTITY {
                    let max = limits::MAX_KEY_PACKAGES_PER_IDENTITY;
                    let full = StoreError::PoolFull { have, adding, max };
                    self.refund_key_bytes(charged, &full);
                    return Err(store_err(full));
                }
            }
            let mut packages = Vec::with_capacity(list.len() as usize);
            for kp in list.iter() {
                packages.push(self.check_key_package(kp.malformed()?, false, now)?);
            }
            let lr = p.get_last_resort().malformed()?;
            let last_resort = if lr.is_empty() { None } else { Some(self.check_key_package(lr, true, now)?) };
            if packages.is_empty() && last_resort.is_none() {
                return Err(failed("nothing to upload"));
            }
            let op = WriteOp::UploadKeyPackages { who: self.who, packages, last_resort, now: kp_now };
            match self.write_keys(op, charged).await? {
                Outcome::KeyPackagesStored { count } => {
                    results.get().set_count(u32::try_from(count).unwrap_or(u32::MAX));
                    Ok(())
                }
                other => Err(unexpected(&other)),
            }
        }
    }

    fn key_package_count(
        self: Rc<Self>,
        _: account::KeyPackageCountParams,
        mut results: account::KeyPackageCountResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let now = self.shared.key_package_now();
            let (n, lr) = self.shared.store.key_package_count(&self.who, now).await.map_err(store_err)?;
            let mut r = results.get();
            r.set_count(u32::try_from(n).unwrap_or(u32::MAX));
            r.set_has_last_resort(lr);
            Ok(())
        }
    }

    fn upload_hybrid_key(
        self: Rc<Self>,
        params: account::UploadHybridKeyParams,
        _: account::UploadHybridKeyResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            self.take_key_upload_token()?;
            let p = params.get().malformed()?;
            let signed = SignedHybridKey {
                key: p.get_hybrid_key().malformed()?.to_vec(),
                signature: p.get_signature().malformed()?.to_vec(),
                created_at_ms: p.get_created_at_ms(),
            };
            drop(params); // its frame is not held across the store write (see `fetch_wait`)
            let now = self.shared.clock.now_ms();
            let latest = now.saturating_add(limits::MAX_HYBRID_KEY_FUTURE_MS);
            if signed.created_at_ms == 0 || signed.created_at_ms > latest {
                return Err(failed(format!(
                    "invalid hybrid key: creation time out of range: {} not in 1..={latest} ms",
                    signed.created_at_ms
                )));
            }
            // Sizes before the network's budget is charged: junk of any size must not spend it.
            if signed.key.len() != HYBRID_PUBLIC_KEY_LEN || signed.signature.len() != limits::SIGNATURE_LEN {
                return Err(failed(format!(
                    "invalid hybrid key: a {HYBRID_PUBLIC_KEY_LEN}-byte key and a {}-byte signature expected, got {} and {}",
                    limits::SIGNATURE_LEN,
                    signed.key.len(),
                    signed.signature.len()
                )));
            }
            let charged =
                self.charge_key_uploads(0, [signed.key.len() + signed.signature.len()].into_iter())?;
            signed.verify(&self.who).map_err(|e| failed(format!("invalid hybrid key: {e}")))?;
            let op = WriteOp::PutHybridKey { who: self.who, signed };
            self.write_keys(op, charged).await?;
            Ok(())
        }
    }

    fn fetch(
        self: Rc<Self>,
        params: account::FetchParams,
        mut results: account::FetchResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let limit = fetch_limit(params.get().malformed()?.get_limit());
            drop(params); // its frame is not held across the store read (see `fetch_wait`)
            let _reading = self.memory.fetch_slot()?;
            // Held until the reply is built: what the page loaded, a message at a time.
            let mut page = self.memory.global.page_room();
            let (msgs, more) = self
                .shared
                .store
                .fetch(&self.who, 0, limit, limits::MAX_FETCH_BYTES, &mut |n| page.take(n))
                .await
                .map_err(store_err)?;
            page.check_progress(msgs.len())?;
            // Held until the reply is built; the reply then counts as unwritten until sent.
            let _room = self.memory.reply_from_page(page, reply_bytes(&msgs))?;
            let mut r = results.get();
            r.set_more(more);
            write_messages(r.init_messages(msgs.len() as u32), &msgs);
            Ok(())
        }
    }

    fn fetch_wait(
        self: Rc<Self>,
        params: account::FetchWaitParams,
        mut results: account::FetchWaitResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let p = params.get().malformed()?;
            let (timeout_ms, limit, ack_up_to) = (p.get_timeout_ms(), p.get_limit(), p.get_ack_up_to());
            // capnp-rpc keeps the call's whole frame (up to `limits::UNBUDGETED_FRAME_BYTES`,
            // outside every budget) for as long as `params` lives: not for a minute's wait.
            drop(params);
            if timeout_ms > limits::MAX_FETCH_WAIT_MS {
                return Err(failed(format!(
                    "timeout out of range: {timeout_ms} > {} ms",
                    limits::MAX_FETCH_WAIT_MS
                )));
            }
            let limit = fetch_limit(limit);
            // Refused once shutdown has begun, even without an ack: an empty answer would only
            // bring the client straight back.
            let _call = self.shared.call_guard()?;
            let _parked = self.memory.park_wait()?;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms.into());
            let shared = self.shared.clone();
            // The folded ack commits while we wait: messages it deletes are skipped by reading
            // after `ack_up_to`, so the wait never depends on that commit.
            let ack = async {
                if ack_up_to == 0 {
                    return Ok(0);
                }
                acked(shared.store.write(WriteOp::Ack { who: self.who, up_to: ack_up_to }).await)
            };
            let wait = async {
                // Subscribed before the read, so whatever is committed after it is handed to us
                // (see `store::notifier`).
                let subscription = shared.store.notifier().subscribe(&self.who);
                let mut read = true;
                loop {
                    if read {
                        let mut room = self.memory.global.page_room();
                        let max = limits::MAX_FETCH_BYTES;
                        let fetched =
                            shared.store.fetch(&self.who, ack_up_to, limit, max, &mut |n| room.take(n)).await;
                        match fetched {
                            Ok((msgs, more)) if !msgs.is_empty() => {
                                break Ok((msgs.into_iter().map(Arc::new).collect(), more, Some(room)));
                            }
                            // No room for its first message: answered `busy`, but only once the
                            // folded ack has committed (after the join below).
                            Ok(_) if room.refused() => break Ok((Vec::new(), true, Some(room))),
                            Ok(_) => {}
                            Err(e) => break Err(store_err(e)),
                        }
                    }
                    // A store whose wake-ups can be lost (another node's NOTIFY) is read again
                    // after its fallback interval; the deadline still ends the wait.
                    let recheck = match shared.store.fallback_poll() {
                        Some(every) => (tokio::time::Instant::now() + every).min(deadline),
                        None => deadline,
                    };
                    tokio::select! {
                        _ = subscription.changed() => {}
                        _ = tokio::time::sleep_until(recheck), if recheck < deadline => {
                            read = true;
                            continue;
                        }
                        _ = tokio::time::sleep_until(deadline) => break Ok((Vec::new(), false, None)),
                        _ = shared.shutdown.cancelled() => break Ok((Vec::new(), false, None)),
                    }
                    // Mail committed while we waited comes with the wake-up: no read transaction.
                    match subscription.take(ack_up_to, limit, limits::MAX_FETCH_BYTES) {
                        // Shared with the other waiters: in memory already, counted as the reply.
                        Taken::Messages(msgs, more) if !msgs.is_empty() => break Ok((msgs, more, None)),
                        Taken::Messages(..) => read = false,
                        Taken::ReadStore => read = true,
                    }
                }
            };
            // A failed ack ends the call at once rather than after the wait.
            let (removed, (msgs, more, page)) = tokio::try_join!(ack, wait)?;
            let _room = match page {
                Some(page) => {
                    page.check_progress(msgs.len())?;
                    self.memory.reply_from_page(page, reply_bytes(&msgs))?
                }
                None => self.memory.reserve_reply(reply_bytes(&msgs))?,
            };
            let mut r = results.get();
            r.set_more(more);
            r.set_removed(removed);
            write_messages(r.init_messages(msgs.len() as u32), &msgs);
            Ok(())
        }
    }

    fn ack(
        self: Rc<Self>,
        params: account::AckParams,
        mut results: account::AckResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        async move {
            let _call = self.shared.call_guard()?;
            let up_to = params.get().malformed()?.get_up_to_seq();
            drop(params); // its frame is not held across the store write (see `fetch_wait`)
            let removed = acked(self.shared.store.write(WriteOp::Ack { who: self.who, up_to }).await)?;
            results.get().set_removed(removed);
            Ok(())
        }
    }
}

/// The number of messages an `Ack` write removed.
fn acked(written: Result<Outcome, StoreError>) -> Result<u32, Error> {
    match written.map_err(store_err)? {
        Outcome::Acked { removed } => Ok(removed),
        other => Err(unexpected(&other)),
    }
}

impl AccountImpl {
    /// Spends one more token of this connection's and its address's key upload budget per
    /// package, once the upload's package count is known (before any is verified): the budget
    /// then bounds the key bytes and signature checks one address can cause, not its calls.
    ///
    /// First takes the upload's `values` (each package's or key's length) from its network's
    /// key material budget, as the key budget would charge them stored
    /// ([`limits::DEFAULT_KEY_BYTES_RATE_PER_NETWORK`]): all of them or, refused, none, so
    /// a budget nearly spent refuses a registration's first upload whole rather than letting
    /// it in and refusing its next call.
    ///
    /// Returns what it took, for [`Self::write_keys`].
    fn charge_key_uploads(
        &self,
        packages: u32,
        values: impl Iterator<Item = usize>,
    ) -> Result<KeyCharge, Error> {
        let now = self.shared.clock.now_ms();
        let rates = &self.shared.rates;
        let (rows, bytes) = values.fold((0u64, 0u64), |(rows, sum), len| {
            (rows + 1, sum.saturating_add(len as u64).saturating_add(limits::KEY_ROW_OVERHEAD_BYTES))
        });
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let network = admission::network_key(self.source);
        rates.key_bytes_per_network.take_n(network, now, bytes).map_err(key_material_limited)?;
        self.key_upload_rate.charge(packages, &self.shared.clock);
        rates.key_upload_per_address.charge_n(self.source, now, packages);
        Ok(KeyCharge { rows, bytes })
    }

    /// Writes a key upload that [`Self::charge_key_uploads`] charged. When nothing is stored the
    /// network's key material budget gets back what was taken for storing it: a refusal by the
    /// store (its key storage full, the pool full, a stale key) keeps
    /// [`limits::KEY_ROW_OVERHEAD_BYTES`] per row, about what the store's checks cost (as a
    /// refused enqueue keeps [`limits::REFUSED_RECIPIENT_BYTES`] per recipient), and a failure
    /// of the server's own gives everything back. Before, while strangers kept the key storage
    /// full, a client whose packages were due spent its network's whole daily budget on uploads
    /// that stored nothing, retrying every round, and once there was room it (and everyone on
    /// its network) could not upload for a day.
    async fn write_keys(&self, op: WriteOp, charged: KeyCharge) -> Result<Outcome, Error> {
        let written = self.shared.store.write(op).await;
        if let Err(e) = &written {
            self.refund_key_bytes(charged, e);
        }
        written.map_err(store_err)
    }

    /// Gives back what [`Self::write_keys`] says a key upload refused with `e` does not owe.
    /// `unavailable` gives nothing back: a PostgreSQL commit that went unanswered may have
    /// stored the keys (a review).
    fn refund_key_bytes(&self, charged: KeyCharge, e: &StoreError) {
        let owed = match e {
            StoreError::Unavailable(_) => return,
            e if refused_by_the_store(e) => charged.rows.saturating_mul(limits::KEY_ROW_OVERHEAD_BYTES),
            _ => 0,
        };
        let back = u64::from(charged.bytes).saturating_sub(owed);
        if back > 0 {
            let network = admission::network_key(self.source);
            let back = u32::try_from(back).unwrap_or(u32::MAX);
            self.shared.rates.key_bytes_per_network.refund(network, self.shared.clock.now_ms(), back);
        }
    }

    /// One token of this connection's and its address's key upload budget, taken before
    /// anything of the upload is read or verified; refused too while the network's key
    /// material budget is spent (in debt after earlier uploads).
    fn take_key_upload_token(&self) -> Result<(), Error> {
        let rates = &self.shared.rates;
        let now = self.shared.clock.now_ms();
        rates
            .key_bytes_per_network
            .check(admission::network_key(self.source), now)
            .map_err(key_material_limited)?;
        take_pair(
            &self.shared,
            &self.key_upload_rate,
            &rates.key_upload_per_address,
            self.source,
            "key uploads",
        )
    }

    /// Verifies an uploaded package, its lifetime as of `now` (the server's clock, unix seconds)
    /// included: an expired, not yet valid or overlong one is refused (RFC 9420 §7.2).
    fn check_key_package(
        &self,
        bytes: &[u8],
        want_last_resort: bool,
        now: u64,
    ) -> Result<KeyPackageEntry, Error> {
        // Its size was checked with the whole upload's, before the key budget was charged.
        let kp = mls::validate_key_package(bytes, now).map_err(|e| failed(e.to_string()))?;
        if kp.identity != self.who {
            return Err(failed("invalid key package: credential identity is not the authenticated key"));
        }
        match (kp.last_resort, want_last_resort) {
            (true, false) => Err(failed("invalid key package: last-resort package sent as a single-use one")),
            (false, true) => {
                Err(failed("invalid key package: last-resort package lacks the last_resort extension"))
            }
            _ => Ok(KeyPackageEntry { not_after: kp.not_after, bytes: bytes.to_vec() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inflight_budget_refuses_past_its_limit_and_frees_on_drop() {
        let budget = InflightBudget::default();
        let big = budget.reserve(limits::MAX_INFLIGHT_BYTES_PER_CONNECTION - 10).unwrap();
        let small = budget.reserve(10).unwrap();
        let err = budget.reserve(1).err().expect("over budget");
        assert!(err.extra.contains("too many requests in flight"), "{}", err.extra);
        drop(big);
        drop(small);
        assert_eq!(budget.0.get(), 0);
        assert!(budget.reserve(limits::MAX_INFLIGHT_BYTES_PER_CONNECTION).is_ok());
    }
}
