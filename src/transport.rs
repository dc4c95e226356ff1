//! QUIC + TLS 1.3 set-up for both ends: the server's self-signed certificate, the client's
//! certificate pinning, and the connection-bound authentication challenge.
//!
//! qpq servers are self-hosted with self-signed certificates, so clients do not use the web PKI:
//! they pin the SHA-256 fingerprint of the server's certificate (trust on first use, like ssh's
//! known_hosts, or given explicitly). The TLS handshake signature is still verified against the
//! pinned certificate's key, so only the holder of that key can complete the handshake.
//!
//! Key exchange is the hybrid X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem) on both ends, so
//! recorded traffic stays confidential against a future quantum computer; a server accepts
//! classical X25519 too only when its config says `allow_classical_kx`.
//!
//! The ALPN id carries the wire protocol version (RFC 7301). A server also accepts the previous
//! version's id in the handshake, only to tell that client to upgrade (`server::outdated`) and
//! close with [`CLOSE_OUTDATED_PROTOCOL`] and a reason naming both versions; a client that meets a server
//! without its version gets TLS alert no_application_protocol, which QUIC carries as crypto
//! error 0x178 (RFC 9001 section 4.8). [`version_mismatch`] reads both from the typed quinn
//! error, never from its text.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::ClientSessionStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::{fsutil, limits};

/// ALPN protocol id; the version in it changes with any incompatible wire change.
pub const ALPN: &[u8] = b"qpq/2";

/// ALPN ids of earlier versions: a server accepts them in the handshake only to tell the client
/// to upgrade, then close with [`CLOSE_OUTDATED_PROTOCOL`] and a reason a person can act on.
pub const OUTDATED_ALPNS: &[&[u8]] = &[b"qpq/1"];

/// The previous version's ALPN id, named in the error a client shows for a server without ours.
pub const PREVIOUS_ALPN: &[u8] = b"qpq/1";

/// Application close code: the client speaks an outdated protocol version (the reason names
/// both). Other codes: 0 normal close, 1 no RPC stream or internal error, 2 evicted idle.
pub const CLOSE_OUTDATED_PROTOCOL: u32 = 3;

/// TLS alert no_application_protocol (RFC 7301 section 3.2).
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

// The two labels below keep their "qpq/1" from the first version: they separate the
// authentication signature from every other use of an identity key, and the ALPN already
// keeps versions apart (the exporter differs on every connection), so a new spelling would
// buy nothing.

/// TLS exporter label for the authentication challenge (RFC 8446 section 7.5).
pub const AUTH_EXPORTER_LABEL: &[u8] = b"EXPORTER-qpq/1 authenticate";

/// Domain-separation prefix of the authentication signature.
pub const AUTH_SIGNATURE_CONTEXT: &[u8] = b"qpq/1 authenticate\0";

/// Server name clients put in the TLS handshake; certificates are pinned, not name-checked.
pub const SERVER_NAME: &str = "qpq-server";

/// Certificate and key file names in the server's data dir.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// Largest PEM file read for a certificate or key.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("no private key found in {0}")]
    NoKey(PathBuf),
    #[error("invalid pem in {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("tls configuration failed: {0}")]
    Tls(String),
    #[error("invalid fingerprint {:?}: expected sha256: followed by 64 hex digits", crate::text::clipped(.0))]
    BadFingerprint(String),
}

/// SHA-256 of a certificate's DER bytes: what clients pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert_der).into())
    }

    /// Parses `sha256:HEX` (the prefix is optional, `:` separators between bytes allowed).
    pub fn parse(s: &str) -> Result<Fingerprint, TransportError> {
        let bad = || TransportError::BadFingerprint(s.to_string());
        let hexpart = s.trim().strip_prefix("sha256:").unwrap_or(s.trim()).replace(':', "");
        let bytes = hex::decode(&hexpart).map_err(|_| bad())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(Fingerprint(arr))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The server's certificate chain and key.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: Fingerprint,
    /// True when this run generated the certificate.
    pub generated: bool,
}

/// Which TLS key exchange groups an end accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyExchange {
    /// Only the hybrid X25519MLKEM768 (the default on both ends).
    HybridOnly,
    /// X25519MLKEM768 preferred, classical X25519 accepted (a server's `allow_classical_kx`).
    AllowClassical,
    /// Classical X25519 only: what an old or foreign client offers (`qpq bench`'s comparison).
    ClassicalOnly,
}

/// The rustls crypto provider of both ends, passed explicitly to every config (no process
/// default): aws-lc-rs, restricted to the key exchange groups `kx` allows.
///
/// Why aws-lc-rs: ring has no ML-KEM. rustls's aws-lc-rs provider ships X25519MLKEM768
/// (draft-ietf-tls-ecdhe-mlkem) with the hybrid combiner maintained inside rustls itself, and
/// ML-KEM from AWS-LC (FIPS 203); the rustls-post-quantum crate builds on this same provider.
/// A custom provider pairing ring with libcrux-ml-kem would mean writing the combiner and the
/// group plumbing ourselves. aws-lc-sys builds with cc (no cmake) and links
/// statically under `crt-static` (README, "A static binary").
fn provider_for(kx: KeyExchange) -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let kx_groups = match kx {
        KeyExchange::HybridOnly => vec![kx_group::X25519MLKEM768],
        KeyExchange::AllowClassical => vec![kx_group::X25519MLKEM768, kx_group::X25519],
        KeyExchange::ClassicalOnly => vec![kx_group::X25519],
    };
    Arc::new(CryptoProvider { kx_groups, ..default_provider() })
}

/// Loads `cert`/`key` PEM files given by the operator.
pub fn load_identity(cert: &Path, key: &Path) -> Result<ServerIdentity, TransportError> {
    let read = |p: &Path| {
        fsutil::read_bounded(p, MAX_PEM_BYTES)
            .map_err(|source| TransportError::Read { path: p.to_path_buf(), source })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = pem_certs(&cert_pem, cert)?;
    let key_der = pem_private_key(&key_pem, key)?;
    let first = chain.first().ok_or_else(|| TransportError::NoCertificate(cert.to_path_buf()))?;
    let fingerprint = Fingerprint::of(first);
    Ok(ServerIdentity { chain, key: key_der, fingerprint, generated: false })
}

/// Loads `cert.pem`/`key.pem` from the data dir, generating a self-signed pair on first run
/// (key file mode 0600).
pub fn load_or_generate_identity(data_dir: &Path) -> Result<ServerIdentity, TransportError> {
    let cert_path = data_dir.join(CERT_FILE);
    let key_path = data_dir.join(KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        return load_identity(&cert_path, &key_path);
    }
    let names = vec![SERVER_NAME.to_string(), "localhost".to_string()];
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TransportError::Generate(e.to_string()))?;
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    // Key first: a crash between the two writes leaves no certificate, so the next run
    // generates a fresh pair instead of pairing a certificate with a missing key.
    fsutil::write_atomic(&key_path, key_pem.as_bytes(), 0o600)
        .map_err(|source| TransportError::Write { path: key_path.clone(), source })?;
    fsutil::write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)
        .map_err(|source| TransportError::Write { path: cert_path.clone(), source })?;
    let mut id = load_identity(&cert_path, &key_path)?;
    id.generated = true;
    Ok(id)
}

fn pem_error(path: &Path, e: impl fmt::Display) -> TransportError {
    TransportError::Pem { path: path.to_path_buf(), reason: e.to_string() }
}

fn pem_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let chain =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(TransportError::NoCertificate(path.to_path_buf()));
    }
    Ok(chain)
}

fn pem_private_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TransportError::NoKey(path.to_path_buf()),
        other => pem_error(path, other),
    })
}

fn transport_config(keep_alive: Option<Duration>, idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One RPC stream per connection: nothing else may open streams.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // No QUIC datagrams: qpq sends none, and quinn buffers up to 1.25 MB of received ones per
    // connection for a reader that never comes (RFC 9221: not advertising the transport
    // parameter makes a datagram from the peer a protocol violation).
    t.datagram_receive_buffer_size(None);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(keep_alive);
    t
}

/// What quinn may buffer per server connection outside the server's memory budget: bytes
/// received and not yet read (a paused connection's calls), and bytes written and not yet
/// acknowledged by the peer. quinn's defaults (1.25 MB and 10 MB) are sized for one fast bulk
/// transfer, and times [`crate::limits::DEFAULT_MAX_CONNECTIONS`] were gigabytes no budget
/// counted. These still move 256 KiB per round trip in and 1 MiB out (20 MB/s down at 50 ms).
fn server_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config(None, Duration::from_secs(120));
    t.stream_receive_window(limits::SERVER_RECEIVE_WINDOW_BYTES.into());
    t.receive_window(limits::SERVER_RECEIVE_WINDOW_BYTES.into());
    t.send_window(limits::SERVER_SEND_WINDOW_BYTES);
    t
}

/// Server-side QUIC config: TLS 1.3 only, ALPN `qpq/2` (and the outdated ids, to refuse them
/// by name), hybrid key exchange only.
pub fn server_config(id: &ServerIdentity) -> Result<quinn::ServerConfig, TransportError> {
    server_config_with(id, KeyExchange::HybridOnly)
}

/// [`server_config`] accepting the key exchange groups `kx` allows.
pub fn server_config_with(
    id: &ServerIdentity,
    kx: KeyExchange,
) -> Result<quinn::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider_for(kx))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    // Ours first: rustls picks the first of the server's ids that the client offers.
    tls.alpn_protocols =
        std::iter::once(ALPN).chain(OUTDATED_ALPNS.iter().copied()).map(<[u8]>::to_vec).collect();
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // Clients keep their connections alive during long polls; two silent minutes mean gone.
    cfg.transport_config(Arc::new(server_transport_config()));
    Ok(cfg)
}

/// How the client decides whether to trust the server's certificate.
#[derive(Clone, Debug)]
pub enum Pin {
    /// Only a certificate with this fingerprint is accepted.
    Fingerprint(Fingerprint),
    /// Trust on first use: accept any certificate and record its fingerprint for the caller to
    /// pin.
    FirstUse(Arc<Mutex<Option<Fingerprint>>>),
}

#[derive(Debug)]
struct PinVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
    /// Learns the certificate the server presented, matching the pin or not.
    recorder: Arc<HandshakeRecorder>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        *self.recorder.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        match &self.pin {
            Pin::Fingerprint(want) if *want == seen => Ok(ServerCertVerified::assertion()),
            Pin::Fingerprint(want) => Err(rustls::Error::General(format!(
                "server certificate changed: pinned {want}, server presented {seen}"
            ))),
            Pin::FirstUse(slot) => {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("tls 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// What a client's handshake showed: the key exchange group and the server's certificate.
///
/// quinn does not expose rustls's negotiated group, but rustls hands it to the session store
/// once the handshake is complete (as a hint for the next connection, RFC 8446 section 4.2.7);
/// this store keeps that and resumes nothing (a qpq client config serves one connection). The
/// certificate comes from the pin verifier, so a refused certificate is known by its
/// fingerprint, not by parsing an error's text.
#[derive(Debug, Default)]
pub struct HandshakeRecorder {
    group: Mutex<Option<rustls::NamedGroup>>,
    presented: Mutex<Option<Fingerprint>>,
}

impl HandshakeRecorder {
    /// The group (`X25519`, ...) once the handshake completed.
    pub fn group(&self) -> Option<String> {
        self.group.lock().unwrap_or_else(|p| p.into_inner()).map(|g| format!("{g:?}"))
    }

    /// The fingerprint of the certificate the server presented, once it did.
    pub fn presented(&self) -> Option<Fingerprint> {
        *self.presented.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientSessionStore for HandshakeRecorder {
    fn set_kx_hint(&self, _: ServerName<'static>, group: rustls::NamedGroup) {
        *self.group.lock().unwrap_or_else(|p| p.into_inner()) = Some(group);
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: rustls::client::Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: rustls::client::Tls13ClientSessionValue) {}

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// Client-side QUIC config pinned as `pin` says.
pub fn client_config(pin: Pin) -> Result<quinn::ClientConfig, TransportError> {
    client_config_with(pin, KeyExchange::HybridOnly)
}

/// [`client_config`] offering the key exchange groups `kx` allows.
pub fn client_config_with(pin: Pin, kx: KeyExchange) -> Result<quinn::ClientConfig, TransportError> {
    client_config_recording_with(pin, kx, Arc::new(HandshakeRecorder::default()))
}

/// [`client_config`] whose handshake tells `recorder` the key exchange group it used and the
/// certificate the server presented.
pub fn client_config_recording(
    pin: Pin,
    recorder: Arc<HandshakeRecorder>,
) -> Result<quinn::ClientConfig, TransportError> {
    client_config_recording_with(pin, KeyExchange::HybridOnly, recorder)
}

fn client_config_recording_with(
    pin: Pin,
    kx: KeyExchange,
    recorder: Arc<HandshakeRecorder>,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider_for(kx);
    let verifier = Arc::new(PinVerifier { pin, provider: provider.clone(), recorder: recorder.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::store(recorder);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // Keep-alives every 3 s hold the connection open through 60 s long polls; 10 silent seconds
    // mean the server is gone, so a crashed server is noticed quickly (the shell reconnects).
    cfg.transport_config(Arc::new(transport_config(Some(Duration::from_secs(3)), Duration::from_secs(10))));
    Ok(cfg)
}

/// The ALPN id a finished handshake negotiated (`qpq/2`), from either end's view.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// An ALPN id as text for people and logs (`qpq/2`).
pub fn alpn_name(alpn: &[u8]) -> String {
    crate::text::shown(&String::from_utf8_lossy(alpn))
}

/// The close reason a server sends a client whose protocol `client_alpn` is outdated.
pub fn outdated_protocol_reason(client_alpn: &[u8]) -> String {
    format!(
        "this server speaks {}; your client speaks {}: upgrade qpq",
        alpn_name(ALPN),
        alpn_name(client_alpn)
    )
}

/// Why a connection failed for want of a common protocol version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionMismatch {
    /// The server has none of the client's ALPN ids (TLS alert no_application_protocol): to a
    /// qpq client, an older server.
    NoCommonProtocol,
    /// The server closed with [`CLOSE_OUTDATED_PROTOCOL`]: a newer server; its reason, for
    /// people.
    ClientOutdated { reason: String },
}

/// Reads a version mismatch from a connection error by its codes (the text is only shown).
pub fn version_mismatch(e: &quinn::ConnectionError) -> Option<VersionMismatch> {
    match e {
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL) =>
        {
            Some(VersionMismatch::NoCommonProtocol)
        }
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_OUTDATED_PROTOCOL) =>
        {
            let reason = String::from_utf8_lossy(&close.reason);
            let reason = crate::text::shown_at_most(&reason, crate::limits::MAX_CLOSE_REASON_CHARS);
            Some(VersionMismatch::ClientOutdated { reason })
        }
        _ => None,
    }
}

/// The 32-byte authentication challenge of this connection (both ends compute the same value).
pub fn auth_challenge(conn: &quinn::Connection) -> Result<[u8; 32], TransportError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, AUTH_EXPORTER_LABEL, b"")
        .map_err(|_| TransportError::Tls("tls keying material export failed".into()))?;
    Ok(out)
}

/// The bytes an identity signs to authenticate on a connection with this challenge.
pub fn auth_message(challenge: &[u8; 32]) -> Vec<u8> {
    let mut m = AUTH_SIGNATURE_CONTEXT.to_vec();
    m.extend_from_slice(challenge);
    m
}

/// The key exchange groups a server with policy `kx` accepts, in preference order.
pub fn key_exchange_groups(kx: KeyExchange) -> Vec<String> {
    provider_for(kx).kx_groups.iter().map(|g| format!("{:?}", g.name())).collect()
}

/// A client endpoint bound to the unspecified address of the server's family.
pub fn client_endpoint(server: SocketAddr, cfg: quinn::ClientConfig) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_through_display_and_parse() {
        let fp = Fingerprint::of(b"certificate bytes");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(Fingerprint::parse(&s).unwrap(), fp);
        assert_eq!(Fingerprint::parse(&s["sha256:".len()..]).unwrap(), fp);
        assert!(Fingerprint::parse("sha256:abcd").is_err());
        assert!(Fingerprint::parse("sha256:zz").is_err());
    }

    #[test]
    fn generated_identity_is_reused_and_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate_identity(dir.path()).unwrap();
        assert!(a.generated);
        let b = load_or_generate_identity(dir.path()).unwrap();
        assert!(!b.generated);
        assert_eq!(a.fingerprint, b.fingerprint);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
