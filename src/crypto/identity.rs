//! A user's long-term identity: one Ed25519 keypair.
//!
//! The raw 32-byte public key is the user's address everywhere: the server routes queues by it,
//! the MLS BasicCredential carries it, and people exchange it as 64 lowercase hex digits. The
//! secret is zeroized on drop (ed25519-dalek's `zeroize` feature) and never printed.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::rngs::OsRng;

use crate::transport;

/// Length of the short human-readable fingerprint (hex digits).
const SHORT_LEN: usize = 16;

/// Errors parsing keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("invalid key {:?}: expected 64 hex digits", crate::text::clipped(.0))]
    BadHex(String),
    #[error("invalid key: not an ed25519 public key")]
    NotAPoint,
}

/// The user's keypair.
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    pub fn generate() -> Identity {
        Identity { signing: SigningKey::generate(&mut OsRng) }
    }

    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        Identity { signing: SigningKey::from_bytes(seed) }
    }

    /// The secret seed, for the encrypted state file and the MLS signer only.
    pub fn seed(&self) -> &[u8; 32] {
        self.signing.as_bytes()
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signature proving possession of this identity on one connection (see `transport`).
    pub fn sign_auth_challenge(&self, challenge: &[u8; 32]) -> [u8; 64] {
        self.signing.sign(&transport::auth_message(challenge)).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("public", &self.public()).finish_non_exhaustive()
    }
}

/// A raw Ed25519 public key: a user's address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses 64 hex digits (either case) into a valid Ed25519 public key.
    pub fn parse_hex(s: &str) -> Result<PublicKey, IdentityError> {
        let bytes = hex::decode(s.trim()).map_err(|_| IdentityError::BadHex(s.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdentityError::BadHex(s.to_string()))?;
        PublicKey::from_bytes(arr)
    }

    pub fn from_bytes(arr: [u8; 32]) -> Result<PublicKey, IdentityError> {
        VerifyingKey::from_bytes(&arr).map_err(|_| IdentityError::NotAPoint)?;
        Ok(PublicKey(arr))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Short form for people: the first 16 hex digits, grouped in fours.
    pub fn short(&self) -> String {
        let h = self.to_hex();
        h.as_bytes()[..SHORT_LEN]
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }

    /// True when `s` looks like a full key (64 hex digits), as opposed to a contact name.
    pub fn looks_like_key(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_bad_input() {
        let id = Identity::generate();
        let pk = id.public();
        let hex = pk.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(PublicKey::parse_hex(&hex).unwrap(), pk);
        assert_eq!(PublicKey::parse_hex(&hex.to_uppercase()).unwrap(), pk);
        assert!(matches!(PublicKey::parse_hex(&hex[..62]), Err(IdentityError::BadHex(_))));
        assert!(matches!(PublicKey::parse_hex("zz"), Err(IdentityError::BadHex(_))));
        assert!(PublicKey::looks_like_key(&hex));
        assert!(!PublicKey::looks_like_key("bob"));
        assert_eq!(pk.short().len(), 19);
    }

    #[test]
    fn seed_round_trip_gives_same_key_and_debug_hides_secret() {
        let id = Identity::generate();
        let again = Identity::from_seed(id.seed());
        assert_eq!(again.public(), id.public());
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&hex::encode(id.seed())));
    }
}
