//! The HPKE (RFC 9180) primitives behind [`super::QpqCrypto`]: libcrux's KEMs and AEADs,
//! RustCrypto's HKDF.
//!
//! Why not libcrux's HKDF as well: MLS seals every new member's GroupSecrets with the encrypted
//! GroupInfo as HPKE's `info` (RFC 9420 section 12.4.3.1, `EncryptWithLabel(init_key, "Welcome",
//! encrypted_group_info, group_secrets)`), and the GroupInfo carries the whole ratchet tree: about
//! 190 KB at 128 members in qpq's hybrid suite. HPKE's key schedule hashes `info` once per seal
//! (RFC 9180 section 5.1, `LabeledExtract("", "info_hash", info)`), so adding 127 members hashes
//! 24 MB. libcrux's SHA-256 is portable code; `sha2`, through `hpke-rs-rust-crypto`, uses the
//! CPU's SHA extensions where it has them (several times faster here: `qpq bench --scenario mls`,
//! "create + add", BENCHMARKS.md). The KEMs (X-Wing, X25519) and the AEADs stay with libcrux (see
//! [`super::crypto`]). Both are the same RFC 5869 HKDF, so the keys and ciphertexts are the same
//! bytes: `crypto::tests` seals with one provider and opens with the other.
//!
//! The same `info` is hashed for every new member of one commit, so the last large `info_hash`
//! is also kept per thread ([`InfoHashMemo`]): comparing 190 KB costs a fraction of hashing it.

use std::cell::RefCell;

use hpke_rs_crypto::HpkeCrypto;
use hpke_rs_crypto::error::Error;
use hpke_rs_crypto::types::{AeadAlgorithm, KdfAlgorithm, KemAlgorithm};
use hpke_rs_libcrux::HpkeLibcrux;
use hpke_rs_rust_crypto::HpkeRustCrypto;

/// HPKE with libcrux's KEMs and AEADs and RustCrypto's HKDF (see the module docs).
#[derive(Debug)]
pub struct QpqHpke;

impl HpkeCrypto for QpqHpke {
    type HpkePrng = <HpkeLibcrux as HpkeCrypto>::HpkePrng;

    fn name() -> String {
        "qpq (libcrux kem and aead, rustcrypto hkdf)".into()
    }

    fn supports_kdf(alg: KdfAlgorithm) -> Result<(), Error> {
        HpkeRustCrypto::supports_kdf(alg)
    }

    fn supports_kem(alg: KemAlgorithm) -> Result<(), Error> {
        HpkeLibcrux::supports_kem(alg)
    }

    fn supports_aead(alg: AeadAlgorithm) -> Result<(), Error> {
        HpkeLibcrux::supports_aead(alg)
    }

    fn prng() -> Self::HpkePrng {
        HpkeLibcrux::prng()
    }

    fn kdf_extract(alg: KdfAlgorithm, salt: &[u8], ikm: &[u8]) -> Result<Vec<u8>, Error> {
        if InfoHashMemo::applies(salt, ikm) {
            return INFO_HASH.with(|memo| memo.borrow_mut().extract(alg, salt, ikm));
        }
        HpkeRustCrypto::kdf_extract(alg, salt, ikm)
    }

    fn kdf_expand(alg: KdfAlgorithm, prk: &[u8], info: &[u8], output_size: usize) -> Result<Vec<u8>, Error> {
        HpkeRustCrypto::kdf_expand(alg, prk, info, output_size)
    }

    fn dh(alg: KemAlgorithm, pk: &[u8], sk: &[u8]) -> Result<Vec<u8>, Error> {
        HpkeLibcrux::dh(alg, pk, sk)
    }

    fn secret_to_public(alg: KemAlgorithm, sk: &[u8]) -> Result<Vec<u8>, Error> {
        HpkeLibcrux::secret_to_public(alg, sk)
    }

    fn kem_key_gen(alg: KemAlgorithm, prng: &mut Self::HpkePrng) -> Result<(Vec<u8>, Vec<u8>), Error> {
        HpkeLibcrux::kem_key_gen(alg, prng)
    }

    fn kem_key_gen_derand(alg: KemAlgorithm, seed: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
        HpkeLibcrux::kem_key_gen_derand(alg, seed)
    }

    fn kem_encaps(
        alg: KemAlgorithm,
        pk_r: &[u8],
        prng: &mut Self::HpkePrng,
    ) -> Result<(Vec<u8>, Vec<u8>), Error> {
        HpkeLibcrux::kem_encaps(alg, pk_r, prng)
    }

    fn kem_decaps(alg: KemAlgorithm, ct: &[u8], sk_r: &[u8]) -> Result<Vec<u8>, Error> {
        HpkeLibcrux::kem_decaps(alg, ct, sk_r)
    }

    fn dh_validate_sk(alg: KemAlgorithm, sk: &[u8]) -> Result<Vec<u8>, Error> {
        HpkeLibcrux::dh_validate_sk(alg, sk)
    }

    fn aead_seal(
        alg: AeadAlgorithm,
        key: &[u8],
        nonce: &[u8],
        aad: &[u8],
        msg: &[u8],
    ) -> Result<Vec<u8>, Error> {
        HpkeLibcrux::aead_seal(alg, key, nonce, aad, msg)
    }

    fn aead_open(
        alg: AeadAlgorithm,
        key: &[u8],
        nonce: &[u8],
        aad: &[u8],
        msg: &[u8],
    ) -> Result<Vec<u8>, Error> {
        HpkeLibcrux::aead_open(alg, key, nonce, aad, msg)
    }
}

thread_local! {
    static INFO_HASH: RefCell<InfoHashMemo> = const { RefCell::new(InfoHashMemo::new()) };
}

/// The last large `info_hash` this thread computed, with the input it came from.
///
/// Only `LabeledExtract("", "info_hash", info)` is kept (RFC 9180 section 5.1: its `labeled_ikm`
/// is `"HPKE-v1" || suite_id || "info_hash" || info`, the suite id 10 bytes, and its salt the
/// empty one, which hpke-rs passes as one zero byte: the same HMAC key, RFC 2104 pads keys with
/// zeros). It is a function of the public `info` alone, never of a shared secret or a key, so
/// the memo holds nothing secret, and a hit returns exactly what hashing would have.
struct InfoHashMemo {
    /// Algorithm, salt, `labeled_ikm` and the result.
    last: Option<(KdfAlgorithm, Vec<u8>, Vec<u8>, Vec<u8>)>,
    /// Answers given without hashing (for tests: the memo must work through hpke-rs itself).
    #[cfg(test)]
    hits: usize,
}

impl InfoHashMemo {
    /// Smaller inputs are hashed about as fast as they are compared.
    const MIN_BYTES: usize = 4096;
    /// The most it keeps: a Welcome's GroupInfo at a few thousand members, not more.
    const MAX_BYTES: usize = 4 << 20;
    /// Where the label sits in `labeled_ikm`: after "HPKE-v1" and the 10-byte suite id.
    const LABEL_AT: usize = 7 + 10;

    const fn new() -> InfoHashMemo {
        InfoHashMemo {
            last: None,
            #[cfg(test)]
            hits: 0,
        }
    }

    fn applies(salt: &[u8], ikm: &[u8]) -> bool {
        salt.len() <= 1
            && salt.iter().all(|b| *b == 0)
            && (Self::MIN_BYTES..=Self::MAX_BYTES).contains(&ikm.len())
            && ikm.starts_with(b"HPKE-v1")
            && ikm.get(Self::LABEL_AT..Self::LABEL_AT + 9) == Some(b"info_hash".as_slice())
    }

    fn extract(&mut self, alg: KdfAlgorithm, salt: &[u8], ikm: &[u8]) -> Result<Vec<u8>, Error> {
        if let Some((a, s, input, output)) = &self.last
            && *a == alg
            && s.as_slice() == salt
            && input.as_slice() == ikm
        {
            #[cfg(test)]
            {
                self.hits += 1;
            }
            return Ok(output.clone());
        }
        let output = HpkeRustCrypto::kdf_extract(alg, salt, ikm)?;
        self.last = Some((alg, salt.to_vec(), ikm.to_vec(), output.clone()));
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labeled(label: &[u8], info: &[u8]) -> Vec<u8> {
        [b"HPKE-v1".as_slice(), b"HPKE\x00\x20\x00\x01\x00\x01", label, info].concat()
    }

    fn hits() -> usize {
        INFO_HASH.with(|memo| memo.borrow().hits)
    }

    #[test]
    fn the_memo_returns_what_hashing_returns_and_only_for_info_hash() {
        let alg = KdfAlgorithm::HkdfSha256;
        let hashed = |salt: &[u8], ikm: &[u8]| HpkeRustCrypto::kdf_extract(alg, salt, ikm).unwrap();
        let (a, b) = (labeled(b"info_hash", &[1; 8000]), labeled(b"info_hash", &[2; 8000]));
        for salt in [&[][..], &[0]] {
            for ikm in [&a, &a, &b, &a, &b, &b] {
                assert_eq!(QpqHpke::kdf_extract(alg, salt, ikm).unwrap(), hashed(salt, ikm));
            }
        }
        // Same length, one byte apart: not a hit.
        let mut c = a.clone();
        c[5000] ^= 1;
        assert_eq!(QpqHpke::kdf_extract(alg, &[0], &a).unwrap(), hashed(&[0], &a));
        assert_eq!(QpqHpke::kdf_extract(alg, &[0], &c).unwrap(), hashed(&[0], &c));
        assert_ne!(hashed(&[0], &a), hashed(&[0], &c));
        // Another algorithm over the same bytes is not a hit either.
        let sha512 = HpkeRustCrypto::kdf_extract(KdfAlgorithm::HkdfSha512, &[0], &c).unwrap();
        assert_eq!(QpqHpke::kdf_extract(KdfAlgorithm::HkdfSha512, &[0], &c).unwrap(), sha512);

        assert!(InfoHashMemo::applies(&[], &a) && InfoHashMemo::applies(&[0], &a));
        assert!(!InfoHashMemo::applies(b"s", &a), "a salted extract is a secret's");
        assert!(!InfoHashMemo::applies(&[0; 32], &a));
        assert!(!InfoHashMemo::applies(&[0], &labeled(b"eae_prk..", &[1; 8000])));
        assert!(!InfoHashMemo::applies(&[0], &labeled(b"info_hash", &[1; 10])), "small");
        assert!(!InfoHashMemo::applies(&[0], &labeled(b"info_hash", &[1; InfoHashMemo::MAX_BYTES])));
    }

    /// Through hpke-rs itself, as MLS seals GroupSecrets to each new member: the second seal with
    /// the same large `info` answers `info_hash` from the memo, and both open.
    #[test]
    fn seals_with_one_large_info_hash_it_once() {
        use hpke_rs::{Hpke, Mode};
        let hpke = || {
            Hpke::<QpqHpke>::new(
                Mode::Base,
                KemAlgorithm::DhKem25519,
                KdfAlgorithm::HkdfSha256,
                AeadAlgorithm::Aes128Gcm,
            )
        };
        let info = vec![7u8; 64 << 10];
        let before = hits();
        for round in 0..3u8 {
            let keys = hpke().derive_key_pair(&[round; 32]).unwrap();
            let (enc, ct) =
                hpke().seal(keys.public_key(), &info, b"aad", b"secrets", None, None, None).unwrap();
            let opened = hpke().open(&enc, keys.private_key(), &info, b"aad", &ct, None, None, None).unwrap();
            assert_eq!(opened, b"secrets");
        }
        // Six key schedules (three seals, three opens), one hash.
        assert_eq!(hits() - before, 5);
    }
}
