//! The answer to a client of an outdated wire protocol (ALPN `qpq/1`): tell it, in words it
//! already prints, that it must upgrade.
//!
//! A `qpq/1` client does not show a connection's close reason (quinn turns a closed stream into
//! "connection lost"), but it does show the text of an RPC error. So the server accepts the
//! outdated ALPN in the handshake, answers every NodeService call of the old schema with
//! `badRequest: this server speaks qpq/2; your client speaks qpq/1: upgrade qpq`, and then closes
//! the connection with [`transport::CLOSE_OUTDATED_PROTOCOL`] and the same reason, which a newer
//! client reads by its code. The conversation is bounded in bytes read, message size and time,
//! like any stranger's.

use std::rc::Rc;
use std::time::Duration;

use capnp::Error;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use futures::AsyncReadExt as _;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::proto::node_capnp::node_service;
use crate::proto::wire_error::{ErrorCode, WireError};
use crate::transport;

/// Answers an outdated client on `conn` (whose handshake negotiated `client_alpn`) until it
/// hangs up or [`limits::OUTDATED_CLIENT_SECS`] pass, then closes the connection. Must run
/// inside a `LocalSet`.
pub async fn refuse(conn: quinn::Connection, client_alpn: &[u8], shutdown: CancellationToken) {
    let reason = transport::outdated_protocol_reason(client_alpn);
    let answer = async {
        let Ok((send, recv)) = conn.accept_bi().await else { return };
        let mut opts = capnp::message::ReaderOptions::new();
        opts.traversal_limit_in_words(Some(limits::OUTDATED_CLIENT_MAX_MESSAGE_WORDS));
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(recv.compat().take(limits::OUTDATED_CLIENT_MAX_READ_BYTES)),
            futures::io::BufWriter::new(send.compat_write()),
            rpc_twoparty_capnp::Side::Server,
            opts,
        );
        let node: node_service::Client = capnp_rpc::new_client(Outdated { reason: reason.clone() });
        let _ = RpcSystem::new(Box::new(network), Some(node.client)).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(Duration::from_secs(limits::OUTDATED_CLIENT_SECS), answer) => {}
        _ = shutdown.cancelled() => {}
    }
    conn.close(transport::CLOSE_OUTDATED_PROTOCOL.into(), reason.as_bytes());
}

/// A NodeService that fails every call of the old schema with the upgrade message.
struct Outdated {
    reason: String,
}

impl Outdated {
    fn refusal(&self) -> std::future::Ready<Result<(), Error>> {
        std::future::ready(Err(WireError::new(ErrorCode::BadRequest, self.reason.clone()).into_rpc()))
    }
}

impl node_service::Server for Outdated {
    fn health(
        self: Rc<Self>,
        _: node_service::HealthParams,
        _: node_service::HealthResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.refusal()
    }

    fn authenticate(
        self: Rc<Self>,
        _: node_service::AuthenticateParams,
        _: node_service::AuthenticateResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.refusal()
    }

    fn fetch_key_package(
        self: Rc<Self>,
        _: node_service::FetchKeyPackageParams,
        _: node_service::FetchKeyPackageResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.refusal()
    }

    fn fetch_hybrid_key(
        self: Rc<Self>,
        _: node_service::FetchHybridKeyParams,
        _: node_service::FetchHybridKeyResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.refusal()
    }

    fn enqueue(
        self: Rc<Self>,
        _: node_service::EnqueueParams,
        _: node_service::EnqueueResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.refusal()
    }

    fn enqueue_batch(
        self: Rc<Self>,
        _: node_service::EnqueueBatchParams,
        _: node_service::EnqueueBatchResults,
    ) -> impl Future<Output = Result<(), Error>> + 'static {
        self.refusal()
    }
}
