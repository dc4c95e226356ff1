//! The raw quinn echo the references are measured with.
//!
//! Same QUIC/TLS setup as `qpq serve` ([`transport::server_config`] / [`transport::client_config`]:
//! TLS 1.3, ALPN `qpq/2`, one bidirectional stream per connection) and the same traffic shape as
//! the RPC: length-prefixed frames (`len: u32 BE ‖ payload`) pipelined on that one stream, echoed
//! back verbatim. Whatever qpq adds on top (Cap'n Proto, the NodeService, the store) is what a
//! ratio against it shows.
//!
//! The server runs in-process for throughput references ([`EchoServer`]) and as a child process
//! (`qpq bench --echo-server`, [`run_child`]) when its memory per connection is the reference.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::sync::Semaphore;

use super::Throughput;
use crate::transport::{self, Fingerprint, Pin};

/// Largest frame the echo server accepts (the biggest payload the bench sends is 4 KiB).
const MAX_ECHO_FRAME: usize = 64 * 1024;
/// Frame header: payload length, u32 big-endian.
const FRAME_HEADER_LEN: usize = 4;

/// An in-process echo server on 127.0.0.1:0 plus one client endpoint for all its connections.
pub struct EchoServer {
    endpoint: quinn::Endpoint,
    client: quinn::Endpoint,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// Holds the generated certificate and key.
    _dir: tempfile::TempDir,
}

impl EchoServer {
    /// Starts on 127.0.0.1:0 with a fresh self-signed certificate. Needs a tokio runtime.
    pub async fn start() -> anyhow::Result<EchoServer> {
        let dir = tempfile::Builder::new().prefix("qpq-echo-").tempdir()?;
        let (endpoint, fingerprint) = bind(dir.path())?;
        let addr = endpoint.local_addr()?;
        let task = tokio::spawn(accept_loop(endpoint.clone()));
        let client =
            transport::client_endpoint(addr, transport::client_config(Pin::Fingerprint(fingerprint))?)?;
        Ok(EchoServer { endpoint, client, addr, task, _dir: dir })
    }

    /// A new connection to this server.
    pub async fn connect(&self) -> anyhow::Result<quinn::Connection> {
        Ok(self.client.connect(self.addr, transport::SERVER_NAME)?.await?)
    }

    pub fn close(&self) {
        self.client.close(0u32.into(), b"done");
        self.endpoint.close(0u32.into(), b"done");
        self.task.abort();
    }
}

/// A server endpoint configured exactly like `qpq serve`'s, certificate generated in `dir`.
fn bind(dir: &std::path::Path) -> anyhow::Result<(quinn::Endpoint, Fingerprint)> {
    let identity = transport::load_or_generate_identity(dir)?;
    let cfg = transport::server_config(&identity)?;
    let endpoint = quinn::Endpoint::server(cfg, ([127, 0, 0, 1], 0).into())?;
    Ok((endpoint, identity.fingerprint))
}

async fn accept_loop(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            // One stream at a time, as the transport config allows; the next may follow.
            while let Ok((send, recv)) = conn.accept_bi().await {
                if let Err(e) = echo_stream(send, recv).await {
                    tracing::debug!(error = %e, "echo stream ended");
                }
            }
        });
    }
}

/// Echoes frames until the peer finishes its side, then finishes ours.
async fn echo_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + MAX_ECHO_FRAME);
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        match recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => break,
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(header) as usize;
        ensure!(len <= MAX_ECHO_FRAME, "echo frame too large: {len} > {MAX_ECHO_FRAME} bytes");
        frame.clear();
        frame.extend_from_slice(&header);
        frame.resize(FRAME_HEADER_LEN + len, 0);
        recv.read_exact(&mut frame[FRAME_HEADER_LEN..]).await?;
        send.write_all(&frame).await?;
    }
    send.finish()?;
    Ok(())
}

fn frame(payload_len: usize) -> anyhow::Result<Vec<u8>> {
    ensure!(payload_len <= MAX_ECHO_FRAME, "echo frame too large: {payload_len} > {MAX_ECHO_FRAME} bytes");
    let mut f = (payload_len as u32).to_be_bytes().to_vec();
    f.resize(FRAME_HEADER_LEN + payload_len, 0xa5);
    Ok(f)
}

/// Echoes `payload_len`-byte frames on a new stream of `conn` with `in_flight` outstanding until
/// `budget` passes (or [`super::MAX_OPS_PER_RUN`] complete).
pub async fn pipelined(
    conn: &quinn::Connection,
    payload_len: usize,
    in_flight: usize,
    budget: Duration,
) -> anyhow::Result<Throughput> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = frame(payload_len)?;
    let window = Semaphore::new(in_flight.max(1));
    let start = Instant::now();
    let deadline = start + budget;
    let writer = async {
        let mut sent = 0u64;
        while sent < super::MAX_OPS_PER_RUN && Instant::now() < deadline {
            window.acquire().await?.forget();
            send.write_all(&request).await?;
            sent += 1;
        }
        send.finish()?;
        anyhow::Ok(sent)
    };
    let reader = async {
        let mut received = 0u64;
        let mut reply = vec![0u8; FRAME_HEADER_LEN + payload_len];
        // Ends when the server finishes its side, after echoing everything we sent.
        loop {
            match recv.read_exact(&mut reply[..FRAME_HEADER_LEN]).await {
                Ok(()) => {}
                Err(quinn::ReadExactError::FinishedEarly(0)) => break,
                Err(e) => return Err(e.into()),
            }
            let len = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
            ensure!(len == payload_len, "echo returned {len} bytes, sent {payload_len}");
            recv.read_exact(&mut reply[FRAME_HEADER_LEN..]).await?;
            received += 1;
            window.add_permits(1);
        }
        anyhow::Ok(received)
    };
    let (sent, received) = futures::future::try_join(writer, reader).await?;
    let elapsed = start.elapsed();
    ensure!(sent == received, "echo lost frames: sent {sent}, received {received}");
    Ok(Throughput { ops: received, elapsed })
}

/// Opens the connection's stream and echoes one small frame, leaving the stream open: an idle
/// connection in the same state as an idle qpq RPC connection.
pub async fn open_idle_stream(
    conn: &quinn::Connection,
) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = frame(16)?;
    send.write_all(&request).await?;
    let mut reply = vec![0u8; request.len()];
    recv.read_exact(&mut reply).await?;
    ensure!(reply == request, "echo returned different bytes");
    Ok((send, recv))
}

/// `qpq bench --echo-server`: serves on 127.0.0.1:0, prints `certificate fingerprint ...` and
/// `listening on ADDR`, and exits when its stdin closes (so it never outlives the parent).
pub fn run_child() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::Builder::new().prefix("qpq-echo-").tempdir()?;
    let endpoint = rt.block_on(async {
        let (endpoint, fingerprint) = bind(dir.path())?;
        println!("certificate fingerprint {fingerprint}");
        println!("listening on {}", endpoint.local_addr()?);
        tokio::spawn(accept_loop(endpoint.clone()));
        anyhow::Ok(endpoint)
    })?;
    // Block this thread until the parent closes our stdin; the runtime serves meanwhile.
    let mut line = String::new();
    let mut stdin = std::io::stdin().lock();
    while stdin.read_line(&mut line).context("reading stdin")? > 0 {
        line.clear();
    }
    endpoint.close(0u32.into(), b"done");
    Ok(())
}

/// Reads `certificate fingerprint X` and `listening on ADDR` from a child's stdout.
pub fn read_child_banner(stdout: &mut impl std::io::BufRead) -> anyhow::Result<(SocketAddr, Fingerprint)> {
    /// The banner is a handful of lines; anything longer is not one of our children.
    const MAX_BANNER_LINES: usize = 20;
    let mut fingerprint = None;
    for _ in 0..MAX_BANNER_LINES {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            bail!("child exited before printing its address");
        }
        let line = line.trim();
        if let Some(f) = line.strip_prefix("certificate fingerprint ") {
            fingerprint = Some(Fingerprint::parse(f)?);
        }
        if let Some(a) = line.strip_prefix("listening on ") {
            let addr = a.parse().with_context(|| format!("bad address in child banner: {a:?}"))?;
            return Ok((addr, fingerprint.context("child printed no certificate fingerprint")?));
        }
    }
    bail!("child printed no address in its first {MAX_BANNER_LINES} lines")
}

/// Shared by the connections scenario: one client endpoint for many connections.
pub fn client_endpoint(addr: SocketAddr, fingerprint: Fingerprint) -> anyhow::Result<quinn::Endpoint> {
    Ok(transport::client_endpoint(addr, transport::client_config(Pin::Fingerprint(fingerprint))?)?)
}
