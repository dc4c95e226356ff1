//! One payload sealed once for several recipients: the body is encrypted once under a fresh
//! random key, and only that key is sealed to each recipient with the hybrid envelope
//! ([`super::hybrid`]).
//!
//! # Why
//! A Welcome carries the whole ratchet tree: about 280 KB at 189 members, 2.7 MB at 1000.
//! Sealing the whole Welcome to each new member separately cost members × Welcome size in CPU,
//! upload and server storage (adding 1000 people at once would have sealed and sent 2.7 GB).
//! Sealed once, it costs one body plus [`STANZA_LEN`] bytes and one X-Wing encapsulation per
//! recipient, and travels through `enqueueFanout` as one stored copy.
//!
//! # Construction
//! The pattern of age's recipient stanzas (age-encryption.org/v1: a random file key wrapped
//! for each recipient, the payload encrypted once under it) and of CMS `KEMRecipientInfo`
//! (RFC 9629): nothing new is built here.
//!
//! ```text
//! body_key = 32 random bytes (fresh per payload, used for exactly one encryption)
//! stanza_i = hybrid::seal(recipient_i identity, recipient_i hybrid key, body_key)   (1174 bytes)
//! body     = ChaCha20-Poly1305(key = body_key, nonce = 0^12, aad = LABEL, plaintext)  (RFC 8439)
//! wire     = count (u16, big endian) || stanza_1 .. stanza_count || body
//! ```
//!
//! The all-zero nonce is safe because `body_key` encrypts exactly one message (as in age, whose
//! payload nonce counter starts at zero under a fresh key). Each stanza is a complete hybrid
//! envelope, so it is bound to its recipient's identity and key as any envelope is, names the
//! recipient key by id, and opens only for it.
//!
//! What a recipient learns: the body, and how many others got it (the Welcome says who joined
//! anyway). What the server learns beyond per-recipient envelopes: that these recipients got the
//! same bytes, which it knows from the fan-out.

use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore as _;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use super::hybrid::{self, ENVELOPE_OVERHEAD, HybridError, HybridPublicKey, KEY_ID_LEN};

/// Bytes of the body key each stanza carries.
const BODY_KEY_LEN: usize = 32;
/// Bytes of one stanza: a hybrid envelope around the body key.
pub const STANZA_LEN: usize = ENVELOPE_OVERHEAD + BODY_KEY_LEN;
/// Associated data of the body: binds it to this construction and version.
const LABEL: &[u8] = b"qpq/2 sealed once";
/// Bytes of the body's AEAD tag.
const TAG_LEN: usize = 16;
/// Most recipients one payload names (the count is a u16).
pub const MAX_RECIPIENTS: usize = u16::MAX as usize;
/// Most stanzas naming one of our key ids that one payload may make us try: an honest payload
/// has one (ids are 4 bytes, so another recipient's rarely collides); junk full of our id must
/// not cost a decapsulation per stanza.
const MAX_TRIES: usize = 4;

/// What can go wrong opening a payload sealed for many.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealManyError {
    #[error("sealed payload too short: {len} < {min} bytes")]
    TooShort { len: usize, min: usize },
    #[error("sealed payload names no recipient")]
    NoRecipients,
    #[error("sealed payload is not for any of our keys")]
    NotForUs,
    #[error("sealed payload: {0}")]
    Envelope(HybridError),
    #[error("sealed payload body does not decrypt")]
    BodyFailed,
}

/// The stanzas and body of a payload sealed for many, split without any crypto.
struct Parts<'a> {
    stanzas: &'a [u8],
    body: &'a [u8],
}

fn split(data: &[u8]) -> Result<Parts<'_>, SealManyError> {
    let Some((count, rest)) = data.split_first_chunk::<2>() else {
        return Err(SealManyError::TooShort { len: data.len(), min: 2 + STANZA_LEN + TAG_LEN });
    };
    let count = usize::from(u16::from_be_bytes(*count));
    if count == 0 {
        return Err(SealManyError::NoRecipients);
    }
    let stanza_bytes = count * STANZA_LEN;
    let min = 2 + stanza_bytes + TAG_LEN;
    if data.len() < min {
        return Err(SealManyError::TooShort { len: data.len(), min });
    }
    // Cannot panic: `rest` is data minus the 2 count bytes, at least stanza_bytes + TAG_LEN long.
    let (stanzas, body) = rest.split_at(stanza_bytes);
    Ok(Parts { stanzas, body })
}

/// Seals `plaintext` once for `recipients` (identity, hybrid key). Returns `None` when there are
/// none or more than [`MAX_RECIPIENTS`].
///
/// # Panics
/// Only if the OS random source fails, or above ChaCha20-Poly1305's ~256 GiB limit (see
/// [`hybrid::seal`]).
#[must_use]
pub fn seal(recipients: &[([u8; 32], &HybridPublicKey)], plaintext: &[u8]) -> Option<Vec<u8>> {
    if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
        return None;
    }
    let count = u16::try_from(recipients.len()).ok()?;
    let mut body_key = Zeroizing::new([0u8; BODY_KEY_LEN]);
    OsRng.fill_bytes(&mut body_key[..]);
    let mut out = Vec::with_capacity(2 + recipients.len() * STANZA_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&count.to_be_bytes());
    for (identity, key) in recipients {
        out.extend_from_slice(&hybrid::seal(identity, key, &body_key[..]));
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&body_key[..]));
    let body = cipher
        .encrypt(&Nonce::default(), Payload { msg: plaintext, aad: LABEL })
        // Invariant: encryption only fails above ~256 GiB of plaintext (documented above).
        .expect("plaintext exceeds the chacha20poly1305 length limit");
    out.extend_from_slice(&body);
    Some(out)
}

/// Opens `data` with `open_stanza`, which tries one stanza with the recipient's key (current or
/// retired) and answers [`HybridError::OtherKey`] for a stanza of someone else's key. Only stanzas
/// whose key id is in `own_ids` are tried, so a payload costs at most a few decapsulations
/// whatever its recipient count.
///
/// Total over arbitrary input: any bytes yield `Ok` or `Err`, never a panic.
pub fn open(
    data: &[u8],
    own_ids: &[[u8; KEY_ID_LEN]],
    mut open_stanza: impl FnMut(&[u8]) -> Result<Vec<u8>, HybridError>,
) -> Result<Vec<u8>, SealManyError> {
    let parts = split(data)?;
    let mut last_error = SealManyError::NotForUs;
    let ours = parts
        .stanzas
        .chunks_exact(STANZA_LEN)
        .filter(|s| hybrid::envelope_key_id(s).is_some_and(|id| own_ids.contains(&id)));
    for stanza in ours.take(MAX_TRIES) {
        // Another recipient's key can share a 4-byte id with ours: its stanza fails to open
        // (the envelope is bound to its recipient's identity) and the next one is tried.
        let key = match open_stanza(stanza) {
            Ok(k) => Zeroizing::new(k),
            Err(e) => {
                last_error = SealManyError::Envelope(e);
                continue;
            }
        };
        if key.len() != BODY_KEY_LEN {
            last_error = SealManyError::BodyFailed;
            continue;
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key[..]));
        return cipher
            .decrypt(&Nonce::default(), Payload { msg: parts.body, aad: LABEL })
            .map_err(|_| SealManyError::BodyFailed);
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hybrid::HybridSecretKey;

    struct Someone {
        identity: [u8; 32],
        secret: HybridSecretKey,
        public: HybridPublicKey,
    }

    fn someone(n: u8) -> Someone {
        let secret = HybridSecretKey::from_seed([n; 32]);
        let public = secret.public_key();
        Someone { identity: [n; 32], secret, public }
    }

    fn open_as(data: &[u8], who: &Someone) -> Result<Vec<u8>, SealManyError> {
        open(data, &[who.public.key_id()], |s| hybrid::open(&who.identity, &who.secret, s))
    }

    #[test]
    fn every_recipient_opens_the_same_body_and_nobody_else_does() {
        let people: Vec<Someone> = (1..=5).map(someone).collect();
        let to: Vec<([u8; 32], &HybridPublicKey)> = people.iter().map(|p| (p.identity, &p.public)).collect();
        let sealed = seal(&to, b"a welcome").unwrap();
        assert_eq!(sealed.len(), 2 + 5 * STANZA_LEN + b"a welcome".len() + TAG_LEN);
        for p in &people {
            assert_eq!(open_as(&sealed, p).unwrap(), b"a welcome");
        }
        assert_eq!(open_as(&sealed, &someone(9)), Err(SealManyError::NotForUs));
        // The right key under the wrong identity: the stanza is bound to its recipient.
        let impostor = Someone { identity: [7; 32], ..someone(1) };
        assert_eq!(open_as(&sealed, &impostor), Err(SealManyError::Envelope(HybridError::DecryptionFailed)));
    }

    #[test]
    fn damage_anywhere_is_an_error_never_a_panic() {
        let p = someone(1);
        let sealed = seal(&[(p.identity, &p.public)], b"body").unwrap();
        let mut body = sealed.clone();
        *body.last_mut().unwrap() ^= 1;
        assert_eq!(open_as(&body, &p), Err(SealManyError::BodyFailed));
        let mut stanza = sealed.clone();
        stanza[2 + STANZA_LEN - 1] ^= 1;
        assert_eq!(open_as(&stanza, &p), Err(SealManyError::Envelope(HybridError::DecryptionFailed)));
        for len in 0..sealed.len() {
            assert!(open_as(&sealed[..len], &p).is_err(), "truncated to {len}");
        }
        assert_eq!(open_as(&[0, 0, 1, 2, 3], &p), Err(SealManyError::NoRecipients));
        // A count that claims more stanzas than there are bytes.
        let mut huge = vec![0xff, 0xff];
        huge.extend_from_slice(&sealed[2..]);
        assert!(matches!(open_as(&huge, &p), Err(SealManyError::TooShort { .. })));
        assert!(seal(&[], b"x").is_none());
    }

    #[test]
    fn junk_stanzas_with_our_key_id_cost_a_bounded_number_of_tries() {
        let p = someone(1);
        let one = seal(&[(p.identity, &p.public)], b"body").unwrap();
        let stanza = &one[2..2 + STANZA_LEN];
        let mut junk = vec![0, 50];
        for _ in 0..50 {
            let mut s = stanza.to_vec();
            s[STANZA_LEN - 1] ^= 1; // names our key, never opens
            junk.extend_from_slice(&s);
        }
        junk.extend_from_slice(&[0; TAG_LEN]);
        let mut tries = 0;
        let r = open(&junk, &[p.public.key_id()], |s| {
            tries += 1;
            hybrid::open(&p.identity, &p.secret, s)
        });
        assert_eq!(r, Err(SealManyError::Envelope(HybridError::DecryptionFailed)));
        assert_eq!(tries, MAX_TRIES);
    }
}
