//! Post-quantum at the TLS and MLS layers (issue 11 items 1 and 2): the hybrid TLS key exchange
//! X25519MLKEM768 from both ends of a real loopback QUIC connection, the server's refusal of
//! classical-only clients unless `allow_classical_kx`, and the hybrid MLS ciphersuite of every
//! KeyPackage and group, with the server refusing classical KeyPackages.

mod common;

use std::sync::Arc;

use common::{local, login, start_server, start_server_with};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, KeyPackage, KeyPackageIn, MlsMessageIn,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::types::SignatureScheme;
use qpq::crypto::identity::Identity;
use qpq::mls::{CIPHERSUITE, MlsClient};
use qpq::server::ServerConfig;
use qpq::server::config::{CONFIG_FILE, Overrides};
use qpq::transport::{self, KeyExchange, Pin};
use rustls::NamedGroup;

/// The group a finished handshake negotiated, read from quinn's rustls handshake data.
fn group_of(conn: &quinn::Connection) -> NamedGroup {
    let data = conn.handshake_data().expect("handshake finished");
    data.downcast::<quinn::crypto::rustls::HandshakeData>()
        .expect("rustls handshake data")
        .negotiated_key_exchange_group
}

/// A server endpoint on 127.0.0.1:0 with qpq's own server config, and one accepted connection
/// from a qpq client: (client's view, server's view).
async fn connect_pair(
    kx: KeyExchange,
    client: quinn::ClientConfig,
) -> Result<(quinn::Connection, quinn::Connection), String> {
    let dir = tempfile::tempdir().unwrap();
    let id = transport::load_or_generate_identity(dir.path()).unwrap();
    let server = quinn::Endpoint::server(
        transport::server_config_with(&id, kx).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let incoming = server.accept().await.expect("an incoming connection");
        let conn = incoming.await.map_err(|e| e.to_string());
        (conn, server)
    });
    let ep = transport::client_endpoint(addr, client).unwrap();
    let c = ep.connect(addr, transport::SERVER_NAME).unwrap().await.map_err(|e| e.to_string());
    let (s, _server) = accept.await.unwrap();
    Ok((c?, s?))
}

/// A client config offering only classical X25519, as an old or foreign client would.
fn classical_only_client() -> quinn::ClientConfig {
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::AcceptAny))
        .with_no_client_auth();
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()))
}

fn tofu_client() -> quinn::ClientConfig {
    transport::client_config(Pin::FirstUse(Default::default())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_x25519mlkem768_on_both_ends() {
    let (client, server) = connect_pair(KeyExchange::HybridOnly, tofu_client()).await.unwrap();
    assert_eq!(group_of(&client), NamedGroup::X25519MLKEM768, "client side");
    assert_eq!(group_of(&server), NamedGroup::X25519MLKEM768, "server side");
    // A server that also allows X25519 still gets the hybrid group from a qpq client.
    let (client, server) = connect_pair(KeyExchange::AllowClassical, tofu_client()).await.unwrap();
    assert_eq!(group_of(&client), NamedGroup::X25519MLKEM768);
    assert_eq!(group_of(&server), NamedGroup::X25519MLKEM768);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offering_only_x25519_is_refused_unless_allow_classical_kx() {
    // The real server with its default configuration refuses the handshake.
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let ep = transport::client_endpoint(server.local_addr(), classical_only_client()).unwrap();
    let refused = ep.connect(server.local_addr(), transport::SERVER_NAME).unwrap().await;
    let err = refused.expect_err("a classical-only client must not connect by default");
    assert!(err.to_string().to_lowercase().contains("handshake"), "{err}");
    server.shutdown().await.unwrap();

    // `allow_classical_kx = true` in qpq-server.toml lets it in, on X25519.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), "allow_classical_kx = true\n").unwrap();
    let cfg = ServerConfig::resolve(Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(cfg.allow_classical_kx);
    let server = start_server_with(cfg).await;
    let ep = transport::client_endpoint(server.local_addr(), classical_only_client()).unwrap();
    let conn = ep.connect(server.local_addr(), transport::SERVER_NAME).unwrap().await.expect("allowed now");
    assert_eq!(group_of(&conn), NamedGroup::X25519);
    conn.close(0u32.into(), b"done");
    // qpq's own client still negotiates the hybrid group there and is served.
    local(async {
        let s = common::connect(&server).await;
        assert_eq!(s.health().await.unwrap().status, "ok");
    })
    .await;
    server.shutdown().await.unwrap();
}

#[test]
fn key_packages_and_groups_use_the_hybrid_mls_suite() {
    assert_eq!(CIPHERSUITE, Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519);
    let mut alice = MlsClient::new(&rand::random()).unwrap();
    let bob = MlsClient::new(&rand::random()).unwrap();
    let mut packages = bob.key_packages(2).unwrap();
    packages.push(bob.last_resort_key_package().unwrap());
    for kp in &packages {
        let parsed = KeyPackageIn::tls_deserialize_exact(&kp.bytes).unwrap();
        let verified = parsed
            .validate(OpenMlsRustCrypto::default().crypto(), openmls::prelude::ProtocolVersion::Mls10)
            .unwrap();
        assert_eq!(verified.ciphersuite(), CIPHERSUITE);
        // An X-Wing init key is 1216 bytes (ML-KEM-768's 1184 + X25519's 32), not X25519's 32.
        assert_eq!(verified.hpke_init_key().as_slice().len(), 1216);
    }
    alice.create_group(b"g").unwrap();
    let pending = alice.add_members(b"g", &[packages[0].bytes.clone()]).unwrap();
    alice.merge_pending(b"g").unwrap();
    let welcome = MlsMessageIn::tls_deserialize_exact(pending.welcome.unwrap()).unwrap();
    let openmls::prelude::MlsMessageBodyIn::Welcome(w) = welcome.extract() else { panic!("a welcome") };
    assert_eq!(w.ciphersuite(), CIPHERSUITE, "the welcome, so the group, runs the hybrid suite");
    assert_eq!(alice.ciphersuite(b"g").unwrap(), CIPHERSUITE);
}

/// A KeyPackage of the classical suite qpq spoke before, for `identity`.
fn classical_key_package(identity: &Identity) -> Vec<u8> {
    let provider = OpenMlsRustCrypto::default();
    let signer = SignatureKeyPair::from_raw(
        SignatureScheme::ED25519,
        identity.seed().to_vec(),
        identity.public().0.to_vec(),
    );
    let credential = CredentialWithKey {
        credential: BasicCredential::new(identity.public().0.to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let bundle = KeyPackage::builder()
        .build(Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519, &provider, &signer, credential)
        .unwrap();
    bundle.key_package().tls_serialize_detached().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_a_classical_key_package_naming_the_required_suite() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let alice = Identity::generate();
    local(async {
        let s = login(&server, &alice).await;
        let err = s.upload_key_packages(&[classical_key_package(&alice)], None).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ciphersuite 0x0001 refused")
                && text.contains("MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519"),
            "{text}"
        );
        assert_eq!(s.key_package_count().await.unwrap(), (0, false), "nothing stored");
        // The hybrid ones are accepted.
        let kp = MlsClient::new(alice.seed()).unwrap().key_packages(1).unwrap().remove(0);
        assert_eq!(s.upload_key_packages(&[kp.bytes], None).await.unwrap(), 1);
    })
    .await;
    server.shutdown().await.unwrap();
}

#[test]
fn group_info_shows_the_hybrid_suite_on_both_sides() {
    let (_dir, _server, [alice, bob]) = common::cast(["alice", "bob"]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", "bob"]);
    bob.recv();
    for user in [&alice, &bob] {
        let out = user.ok(&["group", "info", "#team"]);
        assert!(out.contains("members 2\n"), "{out}");
        assert!(
            out.contains("ciphersuite MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519 (0x004f)\n"),
            "{out}"
        );
    }
    assert!(alice.fails(&["group", "info", "ghost"]).contains("no group named #ghost"));
}
