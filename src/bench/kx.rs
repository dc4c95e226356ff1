//! TLS key exchange: full-handshake rate with the hybrid X25519MLKEM768 against classical X25519.
//!
//! One in-process quinn endpoint with qpq's server config accepting both groups
//! (`allow_classical_kx`), and one client endpoint per group with qpq's client config restricted
//! to that group; each opens the same number of fresh connections (full TLS 1.3 handshakes, no
//! resumption: each connection gets a new client config, whose session cache is empty) and
//! closes them. The
//! issue 11 goal: the hybrid rate is at least 0.8× the classical rate in the same run.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context as _;

use super::Row;
use crate::transport::{self, KeyExchange, Pin};

/// Issue 11 goal: hybrid handshakes per second / classical ones.
const RATE_GOAL: f64 = 0.8;

/// Handshakes per second of `n` connections made one after another with `kx`.
async fn rate(
    addr: SocketAddr,
    pin: transport::Fingerprint,
    kx: KeyExchange,
    n: usize,
) -> anyhow::Result<f64> {
    let cfg = transport::client_config_with(Pin::Fingerprint(pin), kx)?;
    let endpoint = transport::client_endpoint(addr, cfg)?;
    // A fresh config per connection: its empty session cache makes every handshake a full one
    // (no resumption), and building them is kept out of the timing.
    let configs = (0..n)
        .map(|_| transport::client_config_with(Pin::Fingerprint(pin), kx))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    for cfg in configs {
        let conn =
            endpoint.connect_with(cfg, addr, transport::SERVER_NAME)?.await.context("tls handshake")?;
        conn.close(0u32.into(), b"done");
    }
    let secs = t.elapsed().as_secs_f64();
    endpoint.wait_idle().await;
    Ok(n as f64 / secs.max(f64::MIN_POSITIVE))
}

/// The hybrid handshake rate against the classical one, `n` handshakes each (alternating
/// halves, so drift on a shared machine hits both alike).
pub async fn compare(n: usize) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let id = transport::load_or_generate_identity(dir.path())?;
    let cfg = transport::server_config_with(&id, KeyExchange::AllowClassical)?;
    let server = quinn::Endpoint::server(cfg, (std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let addr = server.local_addr()?;
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        conn.closed().await;
                    }
                });
            }
        }
    });
    let half = n.div_ceil(2).max(1);
    let (mut hybrid, mut classical) = (0.0, 0.0);
    for _ in 0..2 {
        hybrid += rate(addr, id.fingerprint, KeyExchange::HybridOnly, half).await? / 2.0;
        classical += rate(addr, id.fingerprint, KeyExchange::ClassicalOnly, half).await? / 2.0;
    }
    server.close(0u32.into(), b"done");
    accept.abort();
    let row = Row::new(format!("tls full handshake X25519MLKEM768, {n}"), hybrid, "conn/s").against(
        "X25519",
        Some(classical),
        "conn/s",
    );
    let met = row.ratio.is_some_and(|r| r >= RATE_GOAL);
    Ok(row.goal(format!(">= {RATE_GOAL}x"), met))
}
