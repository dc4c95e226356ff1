//! Server-side KeyPackage validation (RFC 9420 section 10.1) and the identity convention
//! shared with the client side: a leaf's BasicCredential identity is its Ed25519 signature key.

use openmls::prelude::{
    BasicCredential, Credential, KeyPackage, KeyPackageIn, KeyPackageVerifyError, ProtocolVersion,
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use tls_codec::Deserialize as _;

use super::{CIPHERSUITE, MlsError};

/// Why an uploaded KeyPackage was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPackageError {
    #[error("invalid key package: malformed: {0}")]
    Malformed(String),
    #[error("invalid key package: trailing bytes")]
    TrailingBytes,
    #[error("invalid key package: signature does not verify")]
    BadSignature,
    #[error("invalid key package: unsupported protocol version")]
    UnsupportedVersion,
    #[error("invalid key package: unsupported ciphersuite")]
    UnsupportedCiphersuite,
    #[error("invalid key package: not a basic credential")]
    NotBasicCredential,
    #[error("invalid key package: credential identity does not match its signature key")]
    IdentityMismatch,
    #[error("invalid key package: lifetime expired, not yet valid or too long")]
    BadLifetime,
    #[error("invalid key package: extension not listed in its capabilities")]
    UnsupportedExtension,
}

/// What the server learns from a KeyPackage that passed [`validate_key_package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedKeyPackage {
    /// Credential identity == leaf signature key.
    pub identity: [u8; 32],
    /// Carries the LastResort extension: hand it out repeatedly, never delete.
    pub last_resort: bool,
    /// The KeyPackageRef (RFC 9420 §5.2), a stable id for the package.
    pub hash_ref: Vec<u8>,
}

/// Parses and fully verifies a TLS-serialized KeyPackage. Stateless and
/// panic-free on arbitrary input; meant for the server's upload path.
pub fn validate_key_package(bytes: &[u8]) -> Result<ValidatedKeyPackage, KeyPackageError> {
    let crypto = RustCrypto::default();
    let key_package = verify_key_package(&crypto, bytes)?;
    let leaf = key_package.leaf_node();
    let identity = credential_identity(leaf.credential(), leaf.signature_key().as_slice())?;
    let hash_ref = key_package
        .hash_ref(&crypto)
        .map_err(|e| KeyPackageError::Malformed(format!("hash reference: {e:?}")))?;
    Ok(ValidatedKeyPackage {
        identity,
        last_resort: key_package.last_resort(),
        hash_ref: hash_ref.as_slice().to_vec(),
    })
}

/// Shared by the server check and by `add_members`, which must not trust
/// whatever the server handed out.
pub(super) fn verify_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
) -> Result<KeyPackage, KeyPackageError> {
    let unverified = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|e| match e {
        tls_codec::Error::TrailingData => KeyPackageError::TrailingBytes,
        tls_codec::Error::EndOfStream => KeyPackageError::Malformed("truncated".into()),
        other => KeyPackageError::Malformed(format!("{other:?}")),
    })?;
    // KeyPackageIn does not expose its ciphersuite before verification, and
    // verifying under a foreign suite would report a misleading signature
    // error. The TLS layout starts with version (u16) then cipher_suite (u16),
    // and the parse above guarantees those bytes exist.
    let suite = bytes
        .get(2..4)
        // `get(2..4)` yields exactly two bytes, so the indexing cannot panic.
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| KeyPackageError::Malformed("truncated".into()))?;
    if suite != u16::from(CIPHERSUITE) {
        return Err(KeyPackageError::UnsupportedCiphersuite);
    }
    let key_package = unverified.validate(crypto, ProtocolVersion::Mls10).map_err(|e| match e {
        KeyPackageVerifyError::InvalidSignature | KeyPackageVerifyError::InvalidLeafNodeSignature => {
            KeyPackageError::BadSignature
        }
        KeyPackageVerifyError::InvalidProtocolVersion => KeyPackageError::UnsupportedVersion,
        KeyPackageVerifyError::LifetimeError(_) | KeyPackageVerifyError::MissingLifetime => {
            KeyPackageError::BadLifetime
        }
        KeyPackageVerifyError::UnsupportedExtension => KeyPackageError::UnsupportedExtension,
        KeyPackageVerifyError::InitKeyEqualsEncryptionKey => {
            KeyPackageError::Malformed("init key equals encryption key".into())
        }
        KeyPackageVerifyError::InvalidLeafNodeSourceType => {
            KeyPackageError::Malformed("leaf node is not a key package leaf".into())
        }
        KeyPackageVerifyError::ExtensionTypeNotValidInKeyPackage(_) => {
            KeyPackageError::Malformed("extension not allowed in key packages".into())
        }
        KeyPackageVerifyError::LibraryError(e) => KeyPackageError::Malformed(format!("{e:?}")),
    })?;
    // openmls checks that the lifetime is current but not that it is bounded;
    // RFC 9420 §7.2 asks applications to reject overly long lifetimes.
    // `life_time()` unwraps internally, which cannot fire here: `validate`
    // returned `MissingLifetime` above if the leaf had none.
    if !key_package.life_time().has_acceptable_range() {
        return Err(KeyPackageError::BadLifetime);
    }
    Ok(key_package)
}

/// A leaf that breaks the identity convention.
#[derive(Debug, Clone, Copy)]
pub(super) enum ConventionViolation {
    NotBasic,
    Mismatch,
}

impl From<ConventionViolation> for KeyPackageError {
    fn from(v: ConventionViolation) -> Self {
        match v {
            ConventionViolation::NotBasic => KeyPackageError::NotBasicCredential,
            ConventionViolation::Mismatch => KeyPackageError::IdentityMismatch,
        }
    }
}

impl From<ConventionViolation> for MlsError {
    fn from(v: ConventionViolation) -> Self {
        MlsError::InvalidMember(match v {
            ConventionViolation::NotBasic => "not a basic credential",
            ConventionViolation::Mismatch => "credential identity does not match its signature key",
        })
    }
}

/// The identity of a leaf, provided it follows the convention: a basic
/// credential whose identity is exactly the 32-byte signature key.
pub(super) fn credential_identity(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<[u8; 32], ConventionViolation> {
    let basic = BasicCredential::try_from(credential.clone()).map_err(|_| ConventionViolation::NotBasic)?;
    if basic.identity() != signature_key {
        return Err(ConventionViolation::Mismatch);
    }
    <[u8; 32]>::try_from(signature_key).map_err(|_| ConventionViolation::Mismatch)
}

/// The identity named by a credential alone. Only used for senders, whose
/// leaves were checked against the convention when they entered the tree.
pub(super) fn sender_identity(credential: &Credential) -> Result<[u8; 32], MlsError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| MlsError::from(ConventionViolation::NotBasic))?;
    <[u8; 32]>::try_from(basic.identity()).map_err(|_| ConventionViolation::Mismatch.into())
}
