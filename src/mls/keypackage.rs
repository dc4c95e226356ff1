//! Server-side KeyPackage validation (RFC 9420 section 10.1) and the identity convention
//! shared with the client side: a leaf's BasicCredential identity is its Ed25519 signature key.
//!
//! Lifetimes are judged by qpq's [`crate::clock::Clock`], not by the system clock openmls reads
//! internally (see [`verify_key_package`]): the server decides with its clock which packages it
//! accepts and hands out, and tests move that clock.

use openmls::prelude::{
    BasicCredential, Credential, KeyPackage, KeyPackageIn, KeyPackageVerifyError, Lifetime, ProtocolVersion,
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use tls_codec::Deserialize as _;

use super::{CIPHERSUITE, MlsError};
use crate::limits;

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
    #[error(
        "invalid key package: ciphersuite {0:#06x} refused, qpq requires \
         MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519 (0x004f); the sender's qpq is too old"
    )]
    UnsupportedCiphersuite(u16),
    #[error("invalid key package: not a basic credential")]
    NotBasicCredential,
    #[error("invalid key package: credential identity does not match its signature key")]
    IdentityMismatch,
    #[error("invalid key package: no lifetime")]
    MissingLifetime,
    #[error("invalid key package: expired at {not_after}, now is {now} (unix seconds)")]
    Expired { not_after: u64, now: u64 },
    #[error("invalid key package: not valid before {not_before}, now is {now} (unix seconds)")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("invalid key package: lifetime too long: {range} > {max} seconds")]
    LifetimeTooLong { range: u64, max: u64 },
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
    /// End of the package's lifetime (unix seconds): nobody may be handed it from then on.
    pub not_after: u64,
}

/// Parses and fully verifies a TLS-serialized KeyPackage, judging its lifetime as of `now`
/// (unix seconds, from the caller's [`crate::clock::Clock`]). Stateless and panic-free on
/// arbitrary input; used on the server's upload path and on packages a client fetched.
pub fn validate_key_package(bytes: &[u8], now: u64) -> Result<ValidatedKeyPackage, KeyPackageError> {
    let crypto = RustCrypto::default();
    let key_package = verify_key_package(&crypto, bytes, now)?;
    let leaf = key_package.leaf_node();
    let identity = credential_identity(leaf.credential(), leaf.signature_key().as_slice())?;
    let hash_ref = key_package
        .hash_ref(&crypto)
        .map_err(|e| KeyPackageError::Malformed(format!("hash reference: {e:?}")))?;
    Ok(ValidatedKeyPackage {
        identity,
        last_resort: key_package.last_resort(),
        hash_ref: hash_ref.as_slice().to_vec(),
        not_after: key_package.life_time().not_after(),
    })
}

/// Checks a lifetime against `now` and qpq's bound on its length (RFC 9420 §7.2: "applications
/// MUST define a maximum total lifetime that is acceptable for a KeyPackage").
pub fn check_lifetime(lifetime: &Lifetime, now: u64) -> Result<(), KeyPackageError> {
    let range = lifetime.not_after().saturating_sub(lifetime.not_before());
    if range > limits::MAX_KEY_PACKAGE_LIFETIME_RANGE_SECS {
        return Err(KeyPackageError::LifetimeTooLong {
            range,
            max: limits::MAX_KEY_PACKAGE_LIFETIME_RANGE_SECS,
        });
    }
    if lifetime.not_after() <= now {
        return Err(KeyPackageError::Expired { not_after: lifetime.not_after(), now });
    }
    if lifetime.not_before() > now {
        return Err(KeyPackageError::NotYetValid { not_before: lifetime.not_before(), now });
    }
    Ok(())
}

/// Shared by the server check and by `add_members`, which must not trust
/// whatever the server handed out.
pub(super) fn verify_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
    now: u64,
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
        return Err(KeyPackageError::UnsupportedCiphersuite(suite));
    }
    // Kept for the lifetime case below (a few hundred bytes).
    let unverified_copy = unverified.clone();
    let key_package = match unverified.validate(crypto, ProtocolVersion::Mls10) {
        Ok(key_package) => key_package,
        // openmls judges the lifetime by the real system clock, and as the very last step of
        // `KeyPackageIn::validate` (openmls 0.9 key_package_in.rs): both signatures, the
        // version, the init key and the extension support have all passed when it reports a
        // lifetime error. qpq judges lifetimes by its own clock instead (below), so such a
        // package is as verified as any other. openmls lets only its test-utils turn a
        // `KeyPackageIn` into a `KeyPackage` without `validate`; the two types share one serde
        // form (the one openmls's own storage uses), so the conversion goes through it.
        Err(KeyPackageVerifyError::LifetimeError(_)) => verified_but_for_lifetime(&unverified_copy)?,
        Err(e) => return Err(verify_error(e)),
    };
    // Present: `validate` returned `MissingLifetime` otherwise, and the lifetime branch above
    // only happens when openmls found a lifetime to check. (`life_time()` unwraps internally.)
    check_lifetime(key_package.life_time(), now)?;
    Ok(key_package)
}

/// See the lifetime branch of [`verify_key_package`]: only call it for a package whose
/// `validate` failed on its lifetime alone.
fn verified_but_for_lifetime(unverified: &KeyPackageIn) -> Result<KeyPackage, KeyPackageError> {
    let json = serde_json::to_vec(unverified)
        .map_err(|e| KeyPackageError::Malformed(format!("re-encoding: {e}")))?;
    serde_json::from_slice::<KeyPackage>(&json)
        .map_err(|e| KeyPackageError::Malformed(format!("re-encoding: {e}")))
}

fn verify_error(e: KeyPackageVerifyError) -> KeyPackageError {
    match e {
        KeyPackageVerifyError::InvalidSignature | KeyPackageVerifyError::InvalidLeafNodeSignature => {
            KeyPackageError::BadSignature
        }
        KeyPackageVerifyError::InvalidProtocolVersion => KeyPackageError::UnsupportedVersion,
        KeyPackageVerifyError::MissingLifetime => KeyPackageError::MissingLifetime,
        // Handled by the caller; kept total for the match.
        KeyPackageVerifyError::LifetimeError(e) => KeyPackageError::Malformed(format!("lifetime: {e:?}")),
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
    }
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
