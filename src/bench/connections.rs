//! Connections: what an idle connection costs the server, and how fast they are accepted.
//!
//! The server is the real binary (`qpq serve`, this executable, spawned on 127.0.0.1:0 with a
//! temp data dir), so its resident memory (`VmRSS` of `/proc/PID/status`) is its own and not
//! shared with the clients. An idle connection is the state a waiting client leaves: QUIC + TLS
//! handshake, the RPC stream opened, Cap'n Proto bootstrapped, one `health` call answered.
//!
//! Reference: the bare quinn echo server (`qpq bench --echo-server`, same QUIC/TLS config) as a
//! child too, with connections that opened their stream and echoed one frame: what quinn and
//! rustls alone cost per connection and per handshake. Memory per connection is
//! `(RSS after − RSS before) / N` once the connections are open and the server has settled.
//!
//! All connections share ONE client endpoint (one UDP socket), so N is not bounded by file
//! descriptors. Against a remote server only the handshake rate is measured, with bare QUIC
//! handshakes (no stream) to the same server as the reference; its `max_connections_per_ip`
//! applies (past half of it each handshake takes a QUIC Retry), so raise it there first.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use futures::StreamExt as _;
use tokio_util::compat::{TokioAsyncReadCompatExt as _, TokioAsyncWriteCompatExt as _};

use super::child::ChildServer;
use super::{Bench, Row, Settings, echo};
use crate::proto::node_capnp::node_service;
use crate::transport;

/// Handshakes in progress at once while opening connections.
const HANDSHAKE_CONCURRENCY: usize = 16;
/// Pause after the last connection before reading RSS, so deferred allocations land.
const SETTLE: Duration = Duration::from_millis(500);
/// Goal from issue 6: server memory per idle connection.
const RSS_GOAL_KIB: f64 = 64.0;
/// How long one connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn steps(_: &Settings) -> u64 {
    3
}

/// An idle qpq connection: QUIC, the RPC stream, a bootstrapped NodeService.
struct IdleRpc {
    conn: quinn::Connection,
    _node: node_service::Client,
    rpc: tokio::task::JoinHandle<()>,
}

impl Drop for IdleRpc {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
        self.rpc.abort();
    }
}

async fn open_rpc(endpoint: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<IdleRpc> {
    let conn = endpoint.connect(addr, transport::SERVER_NAME)?.await?;
    let (send, recv) = conn.open_bi().await?;
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(recv.compat()),
        futures::io::BufWriter::new(send.compat_write()),
        rpc_twoparty_capnp::Side::Client,
        capnp::message::ReaderOptions::new(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let node: node_service::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    let rpc = tokio::task::spawn_local(async move {
        let _ = rpc.await;
    });
    node.health_request().send().promise.await?;
    Ok(IdleRpc { conn, _node: node, rpc })
}

/// An idle echo connection (the stream halves keep the stream open).
type IdleEcho = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

async fn open_echo(endpoint: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<IdleEcho> {
    let conn = endpoint.connect(addr, transport::SERVER_NAME)?.await?;
    let (send, recv) = echo::open_idle_stream(&conn).await?;
    Ok((conn, send, recv))
}

/// Opens `n` connections with `open`, [`HANDSHAKE_CONCURRENCY`] at a time; returns them and the
/// connections per second.
async fn open_many<T, F, Fut>(n: usize, open: F) -> anyhow::Result<(Vec<T>, f64)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    let mut pending = futures::stream::iter(0..n)
        .map(|_| async {
            tokio::time::timeout(CONNECT_TIMEOUT, open())
                .await
                .map_err(|_| anyhow::anyhow!("connect timed out"))?
        })
        .buffer_unordered(HANDSHAKE_CONCURRENCY);
    let mut open_conns = Vec::with_capacity(n);
    while let Some(c) = pending.next().await {
        open_conns.push(c?);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok((open_conns, rate))
}

/// What N idle connections did to one server.
struct Load {
    handshakes_per_s: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

impl Load {
    fn kib_per_conn(&self, n: usize) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / n as f64
    }
}

pub async fn run(b: &Bench<'_>) -> anyhow::Result<Vec<Row>> {
    let n = b.settings.connections;
    if b.is_remote() {
        return remote(b, n).await;
    }
    b.step(&format!("connections: {n} to a bare quinn echo server"));
    let reference = {
        let server = ChildServer::echo()?;
        let endpoint = echo::client_endpoint(server.addr, server.fingerprint)?;
        let _warm = open_echo(&endpoint, server.addr).await?;
        tokio::time::sleep(SETTLE).await;
        let rss_before_kib = server.rss_kib()?;
        let (conns, handshakes_per_s) = open_many(n, || open_echo(&endpoint, server.addr)).await?;
        tokio::time::sleep(SETTLE).await;
        let rss_after_kib = server.rss_kib()?;
        drop(conns);
        endpoint.close(0u32.into(), b"done");
        Load { handshakes_per_s, rss_before_kib, rss_after_kib }
    };
    b.done_step();

    b.step(&format!("connections: {n} to qpq serve"));
    let measured = {
        let server = ChildServer::serve()?;
        let endpoint = echo::client_endpoint(server.addr, server.fingerprint)?;
        let _warm = open_rpc(&endpoint, server.addr).await?;
        tokio::time::sleep(SETTLE).await;
        let rss_before_kib = server.rss_kib()?;
        let (conns, handshakes_per_s) = open_many(n, || open_rpc(&endpoint, server.addr)).await?;
        tokio::time::sleep(SETTLE).await;
        let rss_after_kib = server.rss_kib()?;
        anyhow::ensure!(
            conns.iter().all(|c| c.conn.close_reason().is_none()),
            "the server closed idle connections while they were counted"
        );
        drop(conns);
        endpoint.close(0u32.into(), b"done");
        Load { handshakes_per_s, rss_before_kib, rss_after_kib }
    };
    b.done_step();

    b.record_reference("echo_server_rss_base_kib", reference.rss_before_kib as f64);
    let per_conn = measured.kib_per_conn(n);
    // RSS grows in pages: with few connections the slope may round to zero.
    let reference_per_conn = reference.kib_per_conn(n);
    let rss_row = Row::new(format!("server RSS per idle connection, {n} open"), per_conn, "KiB")
        .against("bare quinn echo server", Some(reference_per_conn).filter(|v| *v > 0.0), "KiB")
        .goal(format!("<= {RSS_GOAL_KIB} KiB"), per_conn <= RSS_GOAL_KIB)
        .extra("server_rss_before_kib", measured.rss_before_kib as f64)
        .extra("server_rss_after_kib", measured.rss_after_kib as f64)
        .extra("echo_rss_after_kib", reference.rss_after_kib as f64);
    let rate_row = Row::new("connect + rpc bootstrap + health", measured.handshakes_per_s, "conn/s").against(
        "quinn connect + stream + echo",
        Some(reference.handshakes_per_s),
        "conn/s",
    );
    b.step("connections: tls key exchange groups");
    let kx_row = super::kx::compare(n).await?;
    b.done_step();
    Ok(vec![rss_row, rate_row, kx_row])
}

/// Remote: handshake rate only, against bare QUIC handshakes to the same server.
async fn remote(b: &Bench<'_>, n: usize) -> anyhow::Result<Vec<Row>> {
    let addr = b.target.addr;
    let endpoint = echo::client_endpoint(addr, b.target.fingerprint)?;
    b.step("connections: bare handshakes");
    let (bare, bare_rate) = open_many(n, || async {
        let c = endpoint.connect(addr, transport::SERVER_NAME)?.await?;
        c.close(0u32.into(), b"done");
        anyhow::Ok(())
    })
    .await?;
    drop(bare);
    b.done_step();
    b.step("connections: rpc connections");
    let (conns, rate) = open_many(n, || open_rpc(&endpoint, addr)).await?;
    drop(conns);
    endpoint.close(0u32.into(), b"done");
    b.done_step();
    if rate <= 0.0 {
        bail!("no connection opened");
    }
    Ok(vec![Row::new("connect + rpc bootstrap + health", rate, "conn/s").against(
        "bare quic handshake",
        Some(bare_rate),
        "conn/s",
    )])
}
