//! One connection to a qpq server: QUIC + pinned TLS 1.3, Cap'n Proto RPC on one stream, typed
//! wrappers around every NodeService/Account method.
//!
//! capnp-rpc is `!Send`: a `Session` must live inside a tokio `LocalSet` (the CLI, the shell and
//! the tests all run one).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::crypto::hybrid::SignedHybridKey;
use crate::crypto::identity::{Identity, PublicKey};
use crate::limits;
use crate::proto::node_capnp::{account, node_service};
use crate::proto::wire_error::{ErrorCode, WireError};
use crate::text;
use crate::transport::{self, Fingerprint, Pin};

/// How long connecting (resolve + QUIC/TLS handshake + stream) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the answer to one call (a long poll gets its own timeout on top): a server
/// that stops answering must not hang a command forever.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Awaits an RPC answer for at most `limit`.
async fn timed<T>(
    answer: impl std::future::Future<Output = Result<T, capnp::Error>>,
    limit: Duration,
) -> Result<T, SessionError> {
    match tokio::time::timeout(limit, answer).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SessionError::Timeout(limit.as_secs())),
    }
}

/// How long `close` waits for the connection to finish closing.
pub const CLOSE_WAIT: Duration = Duration::from_millis(5);

/// Errors talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve server address {:?}", crate::text::clipped(.0))]
    Resolve(String),
    /// An address without a port (`example.org`, `10.0.0.5`, `::1`): no lookup can fix it.
    #[error("server address {:?} has no port: write it as HOST:PORT", crate::text::clipped(.0))]
    NoPort(String),
    #[error("cannot reach server {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error(
        "server certificate changed: pinned {pinned}, server presented {presented} (if the operator really replaced it, re-pin with `qpq server pin {presented}`)"
    )]
    CertificateChanged { pinned: Fingerprint, presented: Fingerprint },
    #[error(
        "server {addr} does not speak {ours} (it offered no protocol this client speaks; an older server speaks {previous}): the server needs an upgraded qpq"
    )]
    ServerOutdated { addr: String, ours: String, previous: String },
    /// A newer server closed the connection because this client is outdated; `reason` is the
    /// server's text, which names both versions.
    #[error("server {addr} refused this client's protocol {ours}: {reason}")]
    ClientOutdated { addr: String, ours: String, reason: String },
    /// The server answered with an error: its code (branch on this) and text.
    #[error("server error: {0}")]
    Rpc(WireError),
    #[error("not authenticated")]
    NotAuthenticated,
    #[error("the server did not answer within {0} s")]
    Timeout(u64),
    #[error("connection to the server lost: {0}")]
    Disconnected(String),
    /// The server's answer broke the protocol (e.g. more messages than asked for).
    #[error("the server answered out of protocol: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Transport(#[from] transport::TransportError),
}

impl From<capnp::Error> for SessionError {
    fn from(e: capnp::Error) -> Self {
        match e.kind {
            // The server answered: the call had no effect (our handlers fail before writing).
            capnp::ErrorKind::Failed | capnp::ErrorKind::Overloaded | capnp::ErrorKind::Unimplemented => {
                SessionError::Rpc(WireError::parse(&clean_rpc_error(&e)))
            }
            // No answer: the call may or may not have taken effect.
            _ => SessionError::Disconnected(clean_rpc_error(&e)),
        }
    }
}

impl SessionError {
    /// True when the server definitely did not act on the call (it answered with an error, or
    /// the call never left); false when the outcome is unknown (lost connection, timeout).
    pub fn is_definite_refusal(&self) -> bool {
        match self {
            SessionError::Disconnected(_) | SessionError::Timeout(_) => false,
            // The node lost its database: a write cut off mid-commit may have taken effect (the
            // schema says so), so a commit answered this way may be stored and delivered.
            SessionError::Rpc(e) => e.code != ErrorCode::Unavailable,
            _ => true,
        }
    }

    /// True when the server answered that it will not take this call (a full queue, a bad
    /// request, no such key, ...). Everything else says nothing about the call: the server out of
    /// reach, a connection that failed or broke, no answer in time, an answer out of protocol,
    /// or an answer about the server itself (shutting down, its database unavailable). Work that
    /// must get done (a Welcome to deliver, a leave to commit) is kept and tried again then, not
    /// given up. Not [`SessionError::is_definite_refusal`]'s question: a connection that could
    /// not be opened definitely had no effect, and is still no reason to drop what was to go on it.
    pub fn is_refusal_of_the_call(&self) -> bool {
        matches!(self, SessionError::Rpc(_)) && !self.is_answer_about_the_server()
    }

    /// True for the server's answers about itself rather than the call: shutting down, its
    /// database unavailable, busy, or over a rate or its storage quota for now (all but the
    /// first carry a retry hint). What must get done (a queued message, a Welcome, a leave)
    /// is kept and tried again on these; a review found Welcomes dropped on a full quota.
    pub fn is_answer_about_the_server(&self) -> bool {
        matches!(
            self,
            SessionError::Rpc(e) if matches!(
                e.code,
                ErrorCode::ShuttingDown
                    | ErrorCode::Unavailable
                    | ErrorCode::Busy
                    | ErrorCode::RateLimited
                    | ErrorCode::OverQuota
            )
        )
    }

    /// The server's error code, when the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SessionError::Rpc(e) => Some(e.code),
            _ => None,
        }
    }

    /// True when the server asked us to come back later: over a rate, over its storage quota,
    /// or busy. (Not a shutdown: another node, or the same one restarted, may take the call
    /// at once.)
    pub fn asks_to_wait(&self) -> bool {
        matches!(
            self,
            SessionError::Rpc(e) if matches!(e.code, ErrorCode::RateLimited | ErrorCode::OverQuota | ErrorCode::Busy)
        )
    }

    /// The server's retry hint in milliseconds, when it gave one.
    fn retry_hint_ms(&self) -> Option<u64> {
        match self {
            SessionError::Rpc(WireError { retry_after_ms, .. }) => *retry_after_ms,
            _ => None,
        }
    }

    /// The server's retry hint in whole seconds (rounded up), when it gave one.
    pub fn retry_hint_secs(&self) -> Option<u64> {
        self.retry_hint_ms().map(|ms| ms.div_ceil(1000))
    }

    /// How long to wait before retrying, when the server asked the caller to come back later
    /// ([`SessionError::asks_to_wait`]) and said when; capped at [`MAX_BACKOFF`].
    fn backoff(&self) -> Option<Duration> {
        let ms = self.retry_hint_ms().filter(|_| self.asks_to_wait())?;
        Some(Duration::from_millis(ms).min(MAX_BACKOFF))
    }
}

/// Most times one call is retried after the server asked us to come back later.
pub const MAX_RETRIES: u32 = 3;

/// Longest wait before one retry, whatever the server's hint says.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs `call`, and again after the server's retry hint when it answers rateLimited, overQuota
/// or busy, at most [`MAX_RETRIES`] more times; then returns the last answer. The call had no
/// effect when refused that way, so repeating it is safe.
async fn with_backoff<T, F, Fut>(mut call: F) -> Result<T, SessionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SessionError>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if tries < MAX_RETRIES => match e.backoff() {
                Some(wait) => {
                    tries += 1;
                    tracing::debug!(error = %e, ?wait, "server asks to retry later");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            },
            other => return other,
        }
    }
}

/// The message the server put in its error, without capnp's decoration, on one line: a server
/// is a stranger too, and its text is printed (by the shell among chat lines), so line breaks
/// and every other unsafe character are escaped here ([`text::shown`]) and the length is
/// capped ([`limits::MAX_SERVER_ERROR_CHARS`]); a newline in it could otherwise forge a line
/// that looks like a message.
pub fn clean_rpc_error(e: &capnp::Error) -> String {
    let s = e.extra.trim();
    let s = s.strip_prefix("remote exception: ").unwrap_or(s);
    let s = s.strip_prefix("Failed: ").or_else(|| s.strip_prefix("Overloaded: ")).unwrap_or(s);
    if s.is_empty() {
        return format!("{:?}", e.kind).to_lowercase();
    }
    text::shown_at_most(s, limits::MAX_SERVER_ERROR_CHARS)
}

/// Server status from `health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub uptime_secs: u64,
}

/// A message as the DS returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub seq: u64,
    pub channel_id: Vec<u8>,
    pub channel_seq: u64,
    pub payload: Vec<u8>,
    pub enqueued_at_ms: u64,
}

/// A fetched KeyPackage.
#[derive(Debug, Clone)]
pub struct FetchedKeyPackage {
    pub bytes: Vec<u8>,
    pub remaining: u32,
    pub last_resort: bool,
}

/// An open connection to the server.
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    node: node_service::Client,
    account: Option<account::Client>,
    fingerprint: Fingerprint,
    /// The server database's id, learned at authentication (0 before).
    instance: u64,
    rpc_task: tokio::task::JoinHandle<()>,
    /// Learns the TLS key exchange group and the presented certificate during the handshake.
    kx: Arc<transport::HandshakeRecorder>,
}

/// Resolves `HOST:PORT` (names via the system resolver, IP literals directly).
pub async fn resolve(server: &str) -> Result<SocketAddr, SessionError> {
    if let Ok(a) = server.parse::<SocketAddr>() {
        return Ok(a);
    }
    if server.parse::<std::net::IpAddr>().is_ok() || !server.contains(':') {
        return Err(SessionError::NoPort(server.to_string()));
    }
    let mut addrs =
        tokio::net::lookup_host(server).await.map_err(|_| SessionError::Resolve(server.to_string()))?;
    addrs.next().ok_or_else(|| SessionError::Resolve(server.to_string()))
}

impl Session {
    /// Connects, verifying the server certificate against `pin`.
    pub async fn connect(server: &str, pin: Pin) -> Result<Session, SessionError> {
        Session::connect_within(server, pin, CONNECT_TIMEOUT).await
    }

    /// [`Session::connect`] with `timeout` for the handshake and the stream together.
    pub async fn connect_within(server: &str, pin: Pin, timeout: Duration) -> Result<Session, SessionError> {
        let addr = resolve(server).await?;
        let connect_err = |reason: String| SessionError::Connect { addr: server.to_string(), reason };
        let seen: Arc<Mutex<Option<Fingerprint>>> = match &pin {
            Pin::FirstUse(slot) => slot.clone(),
            Pin::Fingerprint(_) => Arc::new(Mutex::new(None)),
        };
        let kx = Arc::new(transport::HandshakeRecorder::default());
        let endpoint =
            transport::client_endpoint(addr, transport::client_config_recording(pin.clone(), kx.clone())?)
                .map_err(|e| connect_err(e.to_string()))?;
        let connecting =
            endpoint.connect(addr, transport::SERVER_NAME).map_err(|e| connect_err(e.to_string()))?;
        // One deadline for the handshake and the stream: opening a stream waits for the
        // server's stream credit, and a server that grants none would hang us for ever (its
        // keep-alives keep the connection open).
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = match tokio::time::timeout_at(deadline, connecting).await {
            Err(_) => return Err(connect_err("timed out".into())),
            Ok(Err(e)) => return Err(handshake_error(server, &pin, &kx, &e)),
            Ok(Ok(c)) => c,
        };
        let fingerprint = match &pin {
            Pin::Fingerprint(f) => *f,
            Pin::FirstUse(_) => seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ok_or_else(|| connect_err("no server certificate seen".into()))?,
        };
        let (send, recv) = match tokio::time::timeout_at(deadline, conn.open_bi()).await {
            Err(_) => return Err(connect_err("timed out opening a stream".into())),
            Ok(opened) => opened.map_err(|e| handshake_error(server, &pin, &kx, &e))?,
        };
        let mut opts = capnp::message::ReaderOptions::new();
        opts.traversal_limit_in_words(Some(limits::RPC_TRAVERSAL_LIMIT_WORDS));
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(recv.compat()),
            futures::io::BufWriter::new(send.compat_write()),
            rpc_twoparty_capnp::Side::Client,
            opts,
        );
        let mut rpc = RpcSystem::new(Box::new(super::vat::GuardedNetwork::new(network)), None);
        let node: node_service::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let rpc_task = tokio::task::spawn_local(async move {
            if let Err(e) = rpc.await {
                tracing::debug!(error = %e, "rpc session ended");
            }
        });
        Ok(Session { endpoint, conn, node, account: None, fingerprint, instance: 0, rpc_task, kx })
    }

    /// The wire protocol negotiated on this connection (`qpq/2`).
    pub fn protocol(&self) -> Option<String> {
        transport::negotiated_alpn(&self.conn).map(|p| transport::alpn_name(&p))
    }

    /// The TLS key exchange group negotiated on this connection (`X25519`, ...).
    pub fn key_exchange_group(&self) -> Option<String> {
        self.kx.group()
    }

    /// The id of the server's database, known after `authenticate`.
    pub fn server_instance(&self) -> u64 {
        self.instance
    }

    /// The server certificate's fingerprint on this connection.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Proves possession of `id` on this connection and keeps the returned Account.
    pub async fn authenticate(&mut self, id: &Identity) -> Result<(), SessionError> {
        let challenge = transport::auth_challenge(&self.conn)?;
        let sig = id.sign_auth_challenge(&challenge);
        self.authenticate_raw(&id.public().0, &sig).await
    }

    /// `authenticate` with caller-made bytes (tests use it to send bad signatures).
    pub async fn authenticate_raw(&mut self, key: &[u8], sig: &[u8]) -> Result<(), SessionError> {
        let mut req = self.node.authenticate_request();
        req.get().set_identity_key(key);
        req.get().set_signature(sig);
        let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
        self.account = Some(resp.get()?.get_account()?);
        self.instance = resp.get()?.get_instance();
        Ok(())
    }

    /// This connection's auth challenge (tests replay signatures with it).
    pub fn auth_challenge(&self) -> Result<[u8; 32], SessionError> {
        Ok(transport::auth_challenge(&self.conn)?)
    }

    fn account(&self) -> Result<&account::Client, SessionError> {
        self.account.as_ref().ok_or(SessionError::NotAuthenticated)
    }

    /// The key this connection authenticated as, as the server sees it.
    pub async fn account_identity(&self) -> Result<Vec<u8>, SessionError> {
        let resp = timed(self.account()?.identity_request().send().promise, RPC_TIMEOUT).await?;
        Ok(resp.get()?.get_identity_key()?.to_vec())
    }

    pub async fn health(&self) -> Result<Health, SessionError> {
        let resp = timed(self.node.health_request().send().promise, RPC_TIMEOUT).await?;
        let r = resp.get()?;
        Ok(Health {
            status: r
                .get_status()?
                .to_str()
                .map_err(|_| {
                    SessionError::Rpc(WireError::new(ErrorCode::Unknown, "health status is not utf-8"))
                })?
                .to_string(),
            version: r
                .get_version()?
                .to_str()
                .map_err(|_| {
                    SessionError::Rpc(WireError::new(ErrorCode::Unknown, "health version is not utf-8"))
                })?
                .to_string(),
            uptime_secs: r.get_uptime_secs(),
        })
    }

    pub async fn fetch_key_package(&self, who: &[u8]) -> Result<FetchedKeyPackage, SessionError> {
        with_backoff(|| async {
            let mut req = self.node.fetch_key_package_request();
            req.get().set_identity_key(who);
            let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
            let r = resp.get()?;
            Ok(FetchedKeyPackage {
                bytes: r.get_key_package()?.to_vec(),
                remaining: r.get_remaining(),
                last_resort: r.get_last_resort(),
            })
        })
        .await
    }

    /// The hybrid key of `who` and the signature over it (unverified: see `crypto::hybrid`).
    pub async fn fetch_hybrid_key(&self, who: &[u8]) -> Result<SignedHybridKey, SessionError> {
        let mut req = self.node.fetch_hybrid_key_request();
        req.get().set_identity_key(who);
        let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
        let r = resp.get()?;
        Ok(SignedHybridKey {
            key: r.get_hybrid_key()?.to_vec(),
            signature: r.get_signature()?.to_vec(),
            created_at_ms: r.get_created_at_ms(),
        })
    }

    /// Enqueues one payload; returns (seq, channel_seq).
    pub async fn enqueue(
        &self,
        to: &[u8],
        payload: &[u8],
        channel: &[u8],
    ) -> Result<(u64, u64), SessionError> {
        with_backoff(|| async {
            let mut req = self.node.enqueue_request();
            req.get().set_recipient_key(to);
            req.get().set_payload(payload);
            req.get().set_channel_id(channel);
            let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
            let r = resp.get()?;
            Ok((r.get_seq(), r.get_channel_seq()))
        })
        .await
    }

    /// Enqueues each payload to its recipient atomically; returns (channel_seq, seqs).
    pub async fn enqueue_batch(
        &self,
        channel: &[u8],
        items: &[(PublicKey, Vec<u8>)],
    ) -> Result<(u64, Vec<u64>), SessionError> {
        with_backoff(|| async {
            let mut req = self.node.enqueue_batch_request();
            req.get().set_channel_id(channel);
            let mut list = req.get().init_items(items.len() as u32);
            for (i, (to, payload)) in items.iter().enumerate() {
                let mut b = list.reborrow().get(i as u32);
                b.set_recipient_key(&to.0);
                b.set_payload(payload);
            }
            let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
            let r = resp.get()?;
            Ok((r.get_channel_seq(), r.get_seqs()?.iter().collect()))
        })
        .await
    }

    /// UDP bytes this connection has sent so far (QUIC headers, acks and retransmissions
    /// included); read by `qpq bench`.
    pub fn bytes_sent(&self) -> u64 {
        self.conn.stats().udp_tx.bytes
    }

    /// Enqueues one payload for every recipient whose queue has room, in one transaction (the
    /// server stores it once); returns (channel_seq, seqs), a seq of 0 for each recipient the
    /// server skipped because its queue is full.
    pub async fn enqueue_fanout(
        &self,
        channel: &[u8],
        payload: &[u8],
        recipients: &[PublicKey],
    ) -> Result<(u64, Vec<u64>), SessionError> {
        self.fanout(channel, payload, recipients, None).await
    }

    /// [`Self::enqueue_fanout`], except that `required` (one of `recipients`) is never
    /// skipped: when its queue is full the call is refused with `queueFull` and nothing is
    /// stored for anyone. A committer requires itself (see `enqueueFanout` in the schema).
    pub async fn enqueue_fanout_requiring(
        &self,
        channel: &[u8],
        payload: &[u8],
        recipients: &[PublicKey],
        required: &PublicKey,
    ) -> Result<(u64, Vec<u64>), SessionError> {
        self.fanout(channel, payload, recipients, Some(required)).await
    }

    async fn fanout(
        &self,
        channel: &[u8],
        payload: &[u8],
        recipients: &[PublicKey],
        required: Option<&PublicKey>,
    ) -> Result<(u64, Vec<u64>), SessionError> {
        with_backoff(|| async {
            let mut req = self.node.enqueue_fanout_request();
            req.get().set_channel_id(channel);
            req.get().set_payload(payload);
            req.get().set_required(required.map_or(&[][..], |k| &k.0[..]));
            let mut list = req.get().init_recipients(recipients.len() as u32);
            for (i, to) in recipients.iter().enumerate() {
                list.set(i as u32, &to.0);
            }
            let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
            let r = resp.get()?;
            Ok((r.get_channel_seq(), r.get_seqs()?.iter().collect()))
        })
        .await
    }

    pub async fn upload_key_packages(
        &self,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
    ) -> Result<u32, SessionError> {
        let mut req = self.account()?.upload_key_packages_request();
        let mut list = req.get().init_key_packages(packages.len() as u32);
        for (i, kp) in packages.iter().enumerate() {
            list.set(i as u32, kp);
        }
        req.get().set_last_resort(last_resort.unwrap_or(&[]));
        let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
        Ok(resp.get()?.get_count())
    }

    /// (single-use KeyPackages left, has a last-resort one).
    pub async fn key_package_count(&self) -> Result<(u32, bool), SessionError> {
        let resp = timed(self.account()?.key_package_count_request().send().promise, RPC_TIMEOUT).await?;
        let r = resp.get()?;
        Ok((r.get_count(), r.get_has_last_resort()))
    }

    pub async fn upload_hybrid_key(&self, signed: &SignedHybridKey) -> Result<(), SessionError> {
        let mut req = self.account()?.upload_hybrid_key_request();
        req.get().set_hybrid_key(&signed.key);
        req.get().set_signature(&signed.signature);
        req.get().set_created_at_ms(signed.created_at_ms);
        timed(req.send().promise, RPC_TIMEOUT).await?;
        Ok(())
    }

    pub async fn fetch(&self, limit: u32) -> Result<(Vec<Delivered>, bool), SessionError> {
        let mut req = self.account()?.fetch_request();
        req.get().set_limit(limit);
        let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
        let r = resp.get()?;
        Ok((read_messages(r.get_messages()?, limit)?, r.get_more()))
    }

    pub async fn fetch_wait(
        &self,
        timeout_ms: u32,
        limit: u32,
    ) -> Result<(Vec<Delivered>, bool), SessionError> {
        self.ack_and_fetch_wait(0, timeout_ms, limit).await.map(|(msgs, more, _)| (msgs, more))
    }

    /// `fetchWait` with a folded ack: deletes messages up to `ack_up_to` (durably, before the
    /// answer) and returns only later ones, in one round trip. Returns (messages, more, removed).
    pub async fn ack_and_fetch_wait(
        &self,
        ack_up_to: u64,
        timeout_ms: u32,
        limit: u32,
    ) -> Result<(Vec<Delivered>, bool, u32), SessionError> {
        let mut req = self.account()?.fetch_wait_request();
        req.get().set_timeout_ms(timeout_ms);
        req.get().set_limit(limit);
        req.get().set_ack_up_to(ack_up_to);
        let resp = timed(req.send().promise, RPC_TIMEOUT + Duration::from_millis(timeout_ms.into())).await?;
        let r = resp.get()?;
        Ok((read_messages(r.get_messages()?, limit)?, r.get_more(), r.get_removed()))
    }

    pub async fn ack(&self, up_to_seq: u64) -> Result<u32, SessionError> {
        let mut req = self.account()?.ack_request();
        req.get().set_up_to_seq(up_to_seq);
        let resp = timed(req.send().promise, RPC_TIMEOUT).await?;
        Ok(resp.get()?.get_removed())
    }

    /// The untyped bootstrap capability (tests call unknown methods through it).
    pub fn raw_node_client(&self) -> capnp::capability::Client {
        self.node.client.clone()
    }

    /// True while the QUIC connection is open.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Closes the connection and waits briefly for the close to reach the server.
    pub async fn close(self) {
        drop(self.account);
        drop(self.node);
        self.conn.close(0u32.into(), b"bye");
        self.rpc_task.abort();
        // The close frame leaves with the endpoint driver's next poll; waiting out QUIC's whole
        // closing period (three probe timeouts, ~85 ms on loopback) would only protect against
        // that one packet being lost, in which case the server drops the connection at its idle
        // timeout anyway. A short bounded wait keeps one-shot commands fast.
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// The error for a connection that failed during or right after its handshake, told apart by
/// the typed quinn error and what the handshake recorded, never by the error's text.
fn handshake_error(
    server: &str,
    pin: &Pin,
    seen: &transport::HandshakeRecorder,
    e: &quinn::ConnectionError,
) -> SessionError {
    let addr = server.to_string();
    match transport::version_mismatch(e) {
        Some(transport::VersionMismatch::NoCommonProtocol) => {
            return SessionError::ServerOutdated {
                addr,
                ours: transport::alpn_name(transport::ALPN),
                previous: transport::alpn_name(transport::PREVIOUS_ALPN),
            };
        }
        Some(transport::VersionMismatch::ClientOutdated { reason }) => {
            return SessionError::ClientOutdated {
                addr,
                ours: transport::alpn_name(transport::ALPN),
                reason,
            };
        }
        None => {}
    }
    if let (Pin::Fingerprint(pinned), Some(presented)) = (pin, seen.presented())
        && presented != *pinned
    {
        return SessionError::CertificateChanged { pinned: *pinned, presented };
    }
    // A close reason is the peer's text: one line, capped, like its error messages.
    SessionError::Connect {
        addr,
        reason: text::shown_at_most(&e.to_string(), limits::MAX_SERVER_ERROR_CHARS),
    }
}

/// The messages of a fetch answer; more than `asked` (or than any server sends,
/// [`limits::MAX_FETCH_MESSAGES`]) is refused before anything is copied: a list of empty
/// entries costs the server a few bytes each and us a `Delivered` each.
fn read_messages(
    list: capnp::struct_list::Reader<'_, account::message::Owned>,
    asked: u32,
) -> Result<Vec<Delivered>, SessionError> {
    // 0 asks for the server's most, as on the server.
    let most = if asked == 0 { limits::MAX_FETCH_MESSAGES } else { asked.min(limits::MAX_FETCH_MESSAGES) };
    if list.len() > most {
        return Err(SessionError::BadAnswer(format!("{} messages in a fetch of at most {most}", list.len())));
    }
    let mut out = Vec::with_capacity(list.len() as usize);
    for m in list.iter() {
        out.push(Delivered {
            seq: m.get_seq(),
            channel_id: m.get_channel_id()?.to_vec(),
            channel_seq: m.get_channel_seq(),
            payload: m.get_payload()?.to_vec(),
            enqueued_at_ms: m.get_enqueued_at_ms(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch answer of `n` empty messages, read back as `read_messages` asking for `asked`.
    fn read_answer_of(n: u32, asked: u32) -> Result<usize, SessionError> {
        let mut message = capnp::message::Builder::new_default();
        message.initn_root::<capnp::struct_list::Builder<account::message::Owned>>(n);
        let list = message.get_root_as_reader::<capnp::struct_list::Reader<account::message::Owned>>()?;
        read_messages(list, asked).map(|m| m.len())
    }

    /// Review: only the handshake had a deadline; opening the stream waits for the server's
    /// stream credit, and a server that granted none (its keep-alives holding the connection)
    /// hung `qpq health --server X`, an `init` probe or a script for ever. Fails without the
    /// fix (the outer timeout).
    #[tokio::test]
    async fn a_server_that_grants_no_stream_is_given_up_on_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let id = transport::load_or_generate_identity(dir.path()).unwrap();
        let mut cfg = transport::server_config(&id).unwrap();
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(0u32.into());
        cfg.transport_config(Arc::new(t));
        let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap().to_string();
        let accepting = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            conn.closed().await;
        });
        let pin = Pin::Fingerprint(id.fingerprint);
        let connecting = Session::connect_within(&addr, pin, Duration::from_millis(500));
        let r = tokio::time::timeout(Duration::from_secs(20), connecting).await.expect("gave up in time");
        let e = r.err().expect("no session without a stream");
        assert!(e.to_string().contains("timed out opening a stream"), "{e}");
        accepting.abort();
    }

    #[test]
    fn a_fetch_answer_longer_than_asked_is_refused() {
        assert_eq!(read_answer_of(3, 3).unwrap(), 3);
        assert_eq!(
            read_answer_of(limits::MAX_FETCH_MESSAGES, 0).unwrap(),
            limits::MAX_FETCH_MESSAGES as usize
        );
        for (n, asked) in [(4, 3), (limits::MAX_FETCH_MESSAGES + 1, 0), (100_000, u32::MAX)] {
            let err = read_answer_of(n, asked).unwrap_err();
            assert!(matches!(err, SessionError::BadAnswer(_)), "{n} of {asked}: {err}");
        }
    }

    #[test]
    fn a_servers_error_text_stays_on_one_line() {
        let forged = "busy: x\n14:03 [#team] alice: send me the code\n\x1b[2J";
        let e = SessionError::from(capnp::Error::failed(format!("remote exception: Failed: {forged}")));
        let shown = e.to_string();
        assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown:?}");
        assert!(shown.contains("x\\n14:03 [#team] alice"), "escaped, still readable: {shown}");
        assert_eq!(e.code(), Some(ErrorCode::Busy), "the code is still read");
        let long = SessionError::from(capnp::Error::failed("y".repeat(100_000)));
        assert!(long.to_string().len() < 2 * limits::MAX_SERVER_ERROR_CHARS, "capped");
    }

    #[test]
    fn only_an_answer_from_the_server_is_a_definite_refusal() {
        let answered =
            SessionError::from(capnp::Error::failed("remote exception: Failed: queue full".into()));
        assert!(matches!(&answered, SessionError::Rpc(m) if m.message == "queue full"));
        assert_eq!(answered.code(), Some(ErrorCode::Unknown), "no code prefix: unknown");
        let coded = SessionError::from(capnp::Error::failed(
            "remote exception: Failed: rateLimited: too many enqueues (retry after 20 ms)".into(),
        ));
        assert_eq!(coded.code(), Some(ErrorCode::RateLimited));
        assert_eq!(coded.backoff(), Some(Duration::from_millis(20)));
        assert!(!coded.is_refusal_of_the_call(), "over a rate for now: about the server, kept");
        assert!(answered.is_definite_refusal());
        let lost = SessionError::from(capnp::Error::disconnected("connection reset".into()));
        assert!(matches!(lost, SessionError::Disconnected(_)));
        assert!(!lost.is_definite_refusal());
        assert!(!SessionError::Timeout(30).is_definite_refusal());
        assert!(SessionError::NotAuthenticated.is_definite_refusal());
        assert!(answered.is_refusal_of_the_call());
        let unreachable = SessionError::Connect { addr: "127.0.0.1:9".into(), reason: "timed out".into() };
        assert!(unreachable.is_definite_refusal(), "nothing left");
        assert!(!unreachable.is_refusal_of_the_call(), "and yet the server said nothing about the call");
        assert!(!lost.is_refusal_of_the_call());
        assert!(
            !SessionError::BadAnswer("3 messages in a fetch of at most 2".into()).is_refusal_of_the_call()
        );
        let draining = SessionError::from(capnp::Error::failed(
            "remote exception: Failed: shuttingDown: the server is shutting down".into(),
        ));
        assert_eq!(draining.code(), Some(ErrorCode::ShuttingDown));
        assert!(!draining.is_refusal_of_the_call(), "about the server, not the call");
        assert!(draining.is_definite_refusal(), "a draining server took nothing");
        let unavailable = SessionError::from(capnp::Error::failed(
            "remote exception: Failed: unavailable: storage unavailable (retry after 1000 ms)".into(),
        ));
        assert_eq!(unavailable.code(), Some(ErrorCode::Unavailable));
        assert!(!unavailable.is_definite_refusal(), "a write cut off mid-commit may have taken effect");
    }
}
