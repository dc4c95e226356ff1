//! Wire protocol versions (issue 11 item 4): both ends negotiate ALPN `qpq/2`; a `qpq/1` client
//! gets an RPC error naming both versions, then a close with code 3 and the same reason; a
//! `qpq/2` client meeting a `qpq/1` server gets an error naming both, read from the typed TLS
//! alert, not from text.

mod common;

use std::sync::Arc;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use common::{local, start_server, tofu};
use qpq::client::session::{Session, SessionError};
use qpq::proto::node_capnp::node_service;
use qpq::proto::wire_error::ErrorCode;
use qpq::transport::{self, VersionMismatch};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// A raw quinn client config offering only `alpn`, trusting any certificate, with qpq's own
/// (hybrid) key exchange: what an older qpq client sends.
fn client_offering(alpn: &[u8]) -> quinn::ClientConfig {
    let mut tls =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()))
}

/// A tiny quinn server on 127.0.0.1:0 that offers only `alpn`, as an older qpq server does.
fn server_offering(alpn: &[u8], dir: &std::path::Path) -> quinn::Endpoint {
    let id = transport::load_or_generate_identity(dir).unwrap();
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(id.chain, id.key)
            .unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_negotiate_qpq2() {
    assert_eq!(transport::ALPN, b"qpq/2");
    let dir = tempfile::tempdir().unwrap();
    let id = transport::load_or_generate_identity(dir.path()).unwrap();
    let server =
        quinn::Endpoint::server(transport::server_config(&id).unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.expect("an incoming connection").await.expect("handshake");
        (transport::negotiated_alpn(&conn), server)
    });
    let ep = transport::client_endpoint(addr, transport::client_config(tofu()).unwrap()).unwrap();
    let conn = ep.connect(addr, transport::SERVER_NAME).unwrap().await.expect("handshake");
    assert_eq!(transport::negotiated_alpn(&conn).as_deref(), Some(&b"qpq/2"[..]), "client side");
    let (server_side, _server) = accept.await.unwrap();
    assert_eq!(server_side.as_deref(), Some(&b"qpq/2"[..]), "server side");

    // The real server serves a qpq client on qpq/2, and the session says so.
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    local(async {
        let s = common::connect(&server).await;
        assert_eq!(s.protocol().as_deref(), Some("qpq/2"));
        assert_eq!(s.health().await.unwrap().status, "ok");
        s.close().await;
    })
    .await;
    server.shutdown().await.unwrap();
}

const UPGRADE: &str = "this server speaks qpq/2; your client speaks qpq/1: upgrade qpq";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qpq1_client_is_told_both_versions_then_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let ep = transport::client_endpoint(server.local_addr(), client_offering(b"qpq/1")).unwrap();
    // The handshake completes on qpq/1, so the server can say why it will not serve.
    let conn = ep.connect(server.local_addr(), transport::SERVER_NAME).unwrap().await.expect("handshake");
    assert_eq!(transport::negotiated_alpn(&conn).as_deref(), Some(&b"qpq/1"[..]));
    // What a qpq/1 client does first (the NodeService of qpq/1 has the same methods): its
    // call fails with text it prints, naming both versions.
    let failed = local(async {
        let (send, recv) = conn.open_bi().await.unwrap();
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(recv.compat()),
            futures::io::BufWriter::new(send.compat_write()),
            rpc_twoparty_capnp::Side::Client,
            Default::default(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let node: node_service::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let rpc_task = tokio::task::spawn_local(rpc);
        let failed = node.health_request().send().promise.await.map(drop).expect_err("refused");
        drop(node);
        rpc_task.abort();
        failed
    })
    .await;
    let seen = SessionError::from(failed);
    assert_eq!(seen.to_string(), format!("server error: {UPGRADE}"), "as a qpq/1 client prints it");
    assert_eq!(seen.code(), Some(ErrorCode::BadRequest));
    // Then the server closes the connection with code 3 and the same reason.
    let closed = conn.closed().await;
    match &closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(transport::CLOSE_OUTDATED_PROTOCOL));
            assert_eq!(&close.reason[..], UPGRADE.as_bytes());
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    // The typed reading a qpq client does of the same close.
    assert_eq!(
        transport::version_mismatch(&closed),
        Some(VersionMismatch::ClientOutdated { reason: UPGRADE.into() })
    );
    // An unknown protocol gets no handshake at all.
    let ep = transport::client_endpoint(server.local_addr(), client_offering(b"qpq/0")).unwrap();
    let refused = ep.connect(server.local_addr(), transport::SERVER_NAME).unwrap().await;
    let err = refused.expect_err("qpq/0 is no protocol of this server");
    assert_eq!(transport::version_mismatch(&err), Some(VersionMismatch::NoCommonProtocol), "{err}");
    // Other clients are served as ever.
    local(async {
        let s = common::connect(&server).await;
        assert_eq!(s.health().await.unwrap().status, "ok");
        s.close().await;
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qpq2_client_meeting_a_qpq1_server_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let old = server_offering(b"qpq/1", dir.path());
    let addr = old.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let incoming = old.accept().await.expect("an incoming connection");
        let refused = incoming.await.expect_err("no common protocol");
        (refused, old)
    });
    let res = local(Session::connect(&addr.to_string(), tofu())).await;
    let err = match res {
        Err(e) => e,
        Ok(_) => panic!("a qpq/2 client must not connect to a qpq/1 server"),
    };
    assert!(matches!(err, SessionError::ServerOutdated { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "server {addr} does not speak qpq/2 (it offered no protocol this client speaks; an older server \
             speaks qpq/1): the server needs an upgraded qpq"
        )
    );
    let (server_side, _old) = accept.await.unwrap();
    // The old server refused with alert no_application_protocol (120), i.e. QUIC crypto error
    // 0x178: what the client's typed reading relies on.
    match server_side {
        quinn::ConnectionError::TransportError(e) => {
            assert_eq!(e.code, quinn::TransportErrorCode::crypto(120), "{e}");
        }
        other => panic!("expected a tls alert on the server side, got {other:?}"),
    }
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}
