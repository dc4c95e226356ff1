//! The MLS crypto provider: libcrux for HPKE's KEMs and AEADs, RustCrypto for everything else.
//!
//! Why two libraries: qpq's suite ([`super::CIPHERSUITE`], 0x004F) seals every path secret and
//! every Welcome's GroupSecrets with X-Wing (ML-KEM-768 + X25519) HPKE, and derives every ratchet
//! tree node's key pair from a path secret (an ML-KEM-768 key generation from a seed). The seals
//! dominate a commit on a fresh tree (127 of them at 128 members). RustCrypto runs them through
//! the x-wing and ml-kem crates (portable Rust, software Keccak); libcrux runs the same algorithm
//! with its formally verified ML-KEM and SHA-3, which pick AVX2 code at run time where the CPU
//! has it. Counted with callgrind (BENCHMARKS.md, issue 11), that commit takes 370 M instructions
//! instead of 524 M, 1.68x the classical suite's instead of 2.38x. `qpq bench --scenario mls`
//! times both (`hpke_suite_*` against `hpke_rustcrypto_*`). The rest (Ed25519, SHA-256, HKDF,
//! AES-128-GCM, randomness) stays with RustCrypto: ed25519-dalek is as fast or faster, and
//! keeping it keeps signatures byte-identical to the identity code in [`crate::crypto`]. HPKE's
//! own HKDF is RustCrypto's too ([`super::hpke`] says why).
//!
//! Same suite, same wire format, same stored keys: both implement draft-connolly-cfrg-xwing-kem-06
//! with the 32-byte seed as the private key, so a key pair derived by one is the key pair the other
//! derives, and a ciphertext sealed by one opens with the other. `tests` checks all three, so a
//! database written before this provider keeps working.

use super::hpke::QpqHpke;
use hpke_rs::{Hpke, HpkePrivateKey, HpkePublicKey, Mode};
use hpke_rs_crypto::HpkeCrypto;
use hpke_rs_crypto::types::{AeadAlgorithm, KdfAlgorithm, KemAlgorithm};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeAeadType, HpkeCiphertext, HpkeConfig,
    HpkeKdfType, HpkeKemType, HpkeKeyPair, KemOutput, SignatureScheme,
};
use tls_codec::SecretVLBytes;

/// qpq's MLS crypto: HPKE's KEMs and AEADs by libcrux, the rest by RustCrypto (see the module
/// docs).
pub struct QpqCrypto {
    rust: RustCrypto,
}

impl QpqCrypto {
    /// Seeds the random generator from the operating system (HPKE seeds its own per operation).
    pub fn new() -> Result<QpqCrypto, CryptoError> {
        Ok(QpqCrypto { rust: RustCrypto::default() })
    }
}

/// hpke-rs's view of an MLS suite's HPKE algorithms, in base mode (RFC 9420 section 5.1.3), or
/// an error for one qpq's HPKE does not have. (So a suite counts as supported when libcrux has
/// its KEM: X25519, X-Wing, P-256. qpq's KeyPackages and groups are all [`super::CIPHERSUITE`];
/// the classical suite is kept for the bench's comparison.)
fn hpke(config: HpkeConfig) -> Result<Hpke<QpqHpke>, CryptoError> {
    let HpkeConfig(kem, kdf, aead) = config;
    let kem = match kem {
        HpkeKemType::DhKem25519 => KemAlgorithm::DhKem25519,
        HpkeKemType::XWingKemDraft6 => KemAlgorithm::XWingDraft06,
        HpkeKemType::DhKemP256 => KemAlgorithm::DhKemP256,
        _ => return Err(CryptoError::UnsupportedCiphersuite),
    };
    let kdf = match kdf {
        HpkeKdfType::HkdfSha256 => KdfAlgorithm::HkdfSha256,
        HpkeKdfType::HkdfSha384 => KdfAlgorithm::HkdfSha384,
        HpkeKdfType::HkdfSha512 => KdfAlgorithm::HkdfSha512,
    };
    let aead = match aead {
        HpkeAeadType::AesGcm128 => AeadAlgorithm::Aes128Gcm,
        HpkeAeadType::AesGcm256 => AeadAlgorithm::Aes256Gcm,
        HpkeAeadType::ChaCha20Poly1305 => AeadAlgorithm::ChaCha20Poly1305,
        HpkeAeadType::Export => AeadAlgorithm::HpkeExport,
    };
    QpqHpke::supports_kem(kem).map_err(|_| CryptoError::UnsupportedCiphersuite)?;
    QpqHpke::supports_kdf(kdf).map_err(|_| CryptoError::UnsupportedCiphersuite)?;
    QpqHpke::supports_aead(aead).map_err(|_| CryptoError::UnsupportedCiphersuite)?;
    Ok(Hpke::new(Mode::Base, kem, kdf, aead))
}

impl Default for QpqCrypto {
    fn default() -> QpqCrypto {
        // Invariant: seeding fails only when the OS entropy source does, and then
        // `RustCrypto::default()` (ChaCha20Rng::from_entropy) has already panicked; a process that
        // cannot get entropy must not run MLS.
        #[allow(clippy::expect_used)]
        QpqCrypto::new().expect("os entropy for the mls crypto provider")
    }
}

impl OpenMlsRand for QpqCrypto {
    type Error = <RustCrypto as OpenMlsRand>::Error;

    fn random_array<const N: usize>(&self) -> Result<[u8; N], Self::Error> {
        self.rust.random_array()
    }

    fn random_vec(&self, len: usize) -> Result<Vec<u8>, Self::Error> {
        self.rust.random_vec(len)
    }
}

impl OpenMlsCrypto for QpqCrypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        self.rust.supports(ciphersuite)?;
        hpke(ciphersuite.hpke_config()).map(|_| ())
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        self.rust.supported_ciphersuites().into_iter().filter(|cs| hpke(cs.hpke_config()).is_ok()).collect()
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.rust.hkdf_extract(hash_type, salt, ikm)
    }

    fn hmac(&self, hash_type: HashType, key: &[u8], message: &[u8]) -> Result<SecretVLBytes, CryptoError> {
        self.rust.hmac(hash_type, key, message)
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<SecretVLBytes, CryptoError> {
        self.rust.hkdf_expand(hash_type, prk, info, okm_len)
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.rust.hash(hash_type, data)
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.rust.aead_encrypt(alg, key, data, nonce, aad)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.rust.aead_decrypt(alg, key, ct_tag, nonce, aad)
    }

    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        self.rust.signature_key_gen(alg)
    }

    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.rust.verify_signature(alg, data, pk, signature)
    }

    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.rust.sign(alg, data, key)
    }

    fn hpke_seal(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        aad: &[u8],
        ptxt: &[u8],
    ) -> Result<HpkeCiphertext, CryptoError> {
        let pk_r = HpkePublicKey::new(pk_r.to_vec());
        let (kem_output, ciphertext) =
            hpke(config)?.seal(&pk_r, info, aad, ptxt, None, None, None).map_err(|e| match e {
                hpke_rs::HpkeError::InvalidConfig => CryptoError::SenderSetupError,
                _ => CryptoError::HpkeEncryptionError,
            })?;
        Ok(HpkeCiphertext { kem_output: kem_output.into(), ciphertext: ciphertext.into() })
    }

    fn hpke_open(
        &self,
        config: HpkeConfig,
        input: &HpkeCiphertext,
        sk_r: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        // HpkePrivateKey wipes its copy when dropped.
        let sk_r = HpkePrivateKey::new(sk_r.to_vec());
        hpke(config)?
            .open(input.kem_output.as_ref(), &sk_r, info, aad, input.ciphertext.as_ref(), None, None, None)
            .map_err(|e| match e {
                hpke_rs::HpkeError::InvalidConfig => CryptoError::ReceiverSetupError,
                _ => CryptoError::HpkeDecryptionError,
            })
    }

    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        let pk_r = HpkePublicKey::new(pk_r.to_vec());
        let (enc, context) = hpke(config)?
            .setup_sender(&pk_r, info, None, None, None)
            .map_err(|_| CryptoError::SenderSetupError)?;
        let exported =
            context.export(exporter_context, exporter_length).map_err(|_| CryptoError::ExporterError)?;
        Ok((enc, exported.into()))
    }

    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        let sk_r = HpkePrivateKey::new(sk_r.to_vec());
        let context = hpke(config)?
            .setup_receiver(enc, &sk_r, info, None, None, None)
            .map_err(|_| CryptoError::ReceiverSetupError)?;
        let exported =
            context.export(exporter_context, exporter_length).map_err(|_| CryptoError::ExporterError)?;
        Ok(ExporterSecret::from(exported))
    }

    fn derive_hpke_keypair(&self, config: HpkeConfig, ikm: &[u8]) -> Result<HpkeKeyPair, CryptoError> {
        let key_pair = hpke(config)?.derive_key_pair(ikm).map_err(|e| match e {
            hpke_rs::HpkeError::InvalidConfig => CryptoError::InvalidLength,
            _ => CryptoError::CryptoLibraryError,
        })?;
        let (private, public) = key_pair.into_keys();
        Ok(HpkeKeyPair { private: private.as_slice().to_vec().into(), public: public.as_slice().to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mls::{CIPHERSUITE, CLASSICAL_CIPHERSUITE};

    fn ikm(b: u8) -> Vec<u8> {
        (0..32u8).map(|i| i ^ b).collect()
    }

    #[test]
    fn both_libraries_derive_the_same_key_pairs() {
        let (ours, rust) = (QpqCrypto::default(), RustCrypto::default());
        for suite in [CIPHERSUITE, CLASSICAL_CIPHERSUITE] {
            for b in [0u8, 7, 0xff] {
                let a = ours.derive_hpke_keypair(suite.hpke_config(), &ikm(b)).unwrap();
                let r = rust.derive_hpke_keypair(suite.hpke_config(), &ikm(b)).unwrap();
                assert_eq!(a.public, r.public, "{suite:?}");
                assert_eq!(&*a.private, &*r.private, "{suite:?}");
            }
        }
    }

    #[test]
    fn a_seal_by_either_library_opens_with_the_other() {
        let (ours, rust) = (QpqCrypto::default(), RustCrypto::default());
        for suite in [CIPHERSUITE, CLASSICAL_CIPHERSUITE] {
            let kp = rust.derive_hpke_keypair(suite.hpke_config(), &ikm(3)).unwrap();
            let (info, aad, msg) = (b"info".as_slice(), b"aad".as_slice(), b"path secret".as_slice());
            let ct = ours.hpke_seal(suite.hpke_config(), &kp.public, info, aad, msg).unwrap();
            assert_eq!(rust.hpke_open(suite.hpke_config(), &ct, &kp.private, info, aad).unwrap(), msg);
            let ct = rust.hpke_seal(suite.hpke_config(), &kp.public, info, aad, msg).unwrap();
            assert_eq!(ours.hpke_open(suite.hpke_config(), &ct, &kp.private, info, aad).unwrap(), msg);
            // A wrong aad fails: the open above is a real check.
            assert!(ours.hpke_open(suite.hpke_config(), &ct, &kp.private, info, b"other").is_err());

            let (enc, secret) =
                ours.hpke_setup_sender_and_export(suite.hpke_config(), &kp.public, info, b"ctx", 32).unwrap();
            let theirs = rust
                .hpke_setup_receiver_and_export(suite.hpke_config(), &enc, &kp.private, info, b"ctx", 32)
                .unwrap();
            assert_eq!(&*secret, &*theirs);
        }
    }

    #[test]
    fn the_suite_is_supported() {
        let ours = QpqCrypto::default();
        ours.supports(CIPHERSUITE).unwrap();
        assert!(ours.supported_ciphersuites().contains(&CIPHERSUITE));
        assert!(ours.supported_ciphersuites().contains(&CLASSICAL_CIPHERSUITE));
    }

    /// Not a check: the fixed workload behind the instruction counts in BENCHMARKS.md. A group
    /// of 128 is built, then the creator commits a self-update on the fresh tree (127 seals).
    /// `QPQ_CG_SUITE=classical` picks the classical suite, `QPQ_CG_CRYPTO=rustcrypto` the
    /// provider qpq used before this module. Run the lib test binary under
    /// `valgrind --tool=callgrind --zero-before='*MlsGroup*self_update*'` so the counts start at
    /// the commit (all threads: zeroing is global), e.g.
    /// `QPQ_CG_SUITE=pq valgrind --tool=callgrind --zero-before='*MlsGroup*self_update*'
    ///  target/debug/deps/qpq-HASH --ignored --exact mls::crypto::tests::callgrind_commit_workload`.
    #[test]
    #[ignore = "a callgrind workload, run by hand"]
    fn callgrind_commit_workload() {
        let suite = match std::env::var("QPQ_CG_SUITE").as_deref() {
            Ok("classical") => CLASSICAL_CIPHERSUITE,
            _ => CIPHERSUITE,
        };
        match std::env::var("QPQ_CG_CRYPTO").as_deref() {
            Ok("rustcrypto") => commit_workload(openmls_rust_crypto::OpenMlsRustCrypto::default, suite, 128),
            _ => commit_workload(crate::client::db::mls::DbProvider::default, suite, 128),
        }
    }

    fn commit_workload<P: openmls_traits::OpenMlsProvider>(
        make: impl Fn() -> P,
        suite: Ciphersuite,
        n: usize,
    ) {
        use openmls::prelude::{
            BasicCredential, CredentialWithKey, KeyPackage, LeafNodeParameters, MlsGroup,
            MlsGroupCreateConfig,
        };
        use openmls_basic_credential::SignatureKeyPair;

        let member = || {
            let provider = make();
            let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
            signer.store(provider.storage()).unwrap();
            let credential = CredentialWithKey {
                credential: BasicCredential::new(signer.public().to_vec()).into(),
                signature_key: signer.public().into(),
            };
            (provider, signer, credential)
        };
        let creator = member();
        let kps: Vec<KeyPackage> = (1..n)
            .map(|_| {
                let m = member();
                KeyPackage::builder().build(suite, &m.0, &m.1, m.2.clone()).unwrap().key_package().clone()
            })
            .collect();
        let config =
            MlsGroupCreateConfig::builder().ciphersuite(suite).use_ratchet_tree_extension(true).build();
        let mut group = MlsGroup::new(&creator.0, &creator.1, &config, creator.2.clone()).unwrap();
        group.add_members(&creator.0, &creator.1, &kps).unwrap();
        group.merge_pending_commit(&creator.0).unwrap();
        group.self_update(&creator.0, &creator.1, LeafNodeParameters::default()).unwrap();
        group.merge_pending_commit(&creator.0).unwrap();
        assert_eq!(group.members().count(), n);
    }
}
