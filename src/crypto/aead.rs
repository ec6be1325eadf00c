//! AES-256-GCM under a per-subject data key, with a fresh random 96-bit nonce
//! for every message.

use aes_gcm::aead::{Aead as _, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use super::CryptoError;

pub const NONCE_LEN: usize = 12;

pub struct DataKey(Aes256Gcm);

impl DataKey {
    pub fn new(key: &[u8; 32]) -> Self {
        DataKey(Aes256Gcm::new(key.into()))
    }

    /// Encrypts under a random nonce (capture draws a statement's nonces in one
    /// batch and calls `seal_with_nonce`). With random 96-bit nonces the chance of a
    /// repeat stays below 2^-32 for up to 2^32 messages under one key, and each
    /// key serves one subject within one writer context.
    #[cfg(test)]
    pub fn seal(
        &self,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<([u8; NONCE_LEN], Vec<u8>), CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        super::fill_random(&mut nonce)?;
        self.seal_with_nonce(&nonce, aad, plaintext)
    }

    /// Encrypts under a nonce the caller drew at random (batched draws are cheaper).
    pub fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<([u8; NONCE_LEN], Vec<u8>), CryptoError> {
        let ciphertext = self
            .0
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Authentication)?;
        Ok((*nonce, ciphertext))
    }

    pub fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if nonce.len() != NONCE_LEN {
            return Err(CryptoError::Authentication);
        }
        self.0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hex;
    use std::collections::HashSet;

    #[test]
    fn nist_gcm_known_answer() {
        // NIST GCM test case 13 (AES-256, zero key, zero nonce, empty message): tag only.
        let key = DataKey::new(&[0u8; 32]);
        let (_, ct) = key.seal_with_nonce(&[0u8; 12], b"", b"").unwrap();
        assert_eq!(ct, hex("530f8afbc74536b9a963b4f1c4cb738b"));
        // Test case 14: one zero block.
        let (_, ct) = key.seal_with_nonce(&[0u8; 12], b"", &[0u8; 16]).unwrap();
        assert_eq!(
            ct,
            hex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
        );
    }

    #[test]
    fn tampering_and_wrong_aad_fail() {
        let key = DataKey::new(&[9u8; 32]);
        let (nonce, mut ct) = key.seal(b"event 1", b"payload").unwrap();
        assert_eq!(key.open(&nonce, b"event 1", &ct).unwrap(), b"payload");
        assert_eq!(
            key.open(&nonce, b"event 2", &ct),
            Err(CryptoError::Authentication)
        );
        ct[0] ^= 1;
        assert_eq!(
            key.open(&nonce, b"event 1", &ct),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            key.open(&nonce[..11], b"event 1", &ct),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn nonces_do_not_repeat() {
        let key = DataKey::new(&[1u8; 32]);
        let nonces: HashSet<_> = (0..10_000)
            .map(|_| key.seal(b"", b"x").unwrap().0)
            .collect();
        assert_eq!(nonces.len(), 10_000);
    }

    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, no_panic};

    #[test]
    fn fuzz_data_key_open() {
        fuzz("data_key_open", 5_000, |rng| {
            let key = DataKey::new(&rng.array());
            let nonce: [u8; NONCE_LEN] = rng.array();
            let n = rng.len(24);
            let aad = rng.bytes(n);
            let n = rng.len(64);
            let plaintext = rng.bytes(n);
            let (_, ct) = key.seal_with_nonce(&nonce, &aad, &plaintext).unwrap();
            assert_eq!(key.open(&nonce, &aad, &ct).as_deref(), Ok(&plaintext[..]));
            // One of nonce (any length), associated data or ciphertext (any
            // length, shorter than a tag too) corrupted: refused, never a panic.
            let (mut nonce2, mut aad2, mut ct2) = (nonce.to_vec(), aad.clone(), ct.clone());
            match rng.below(4) {
                0 => rng.mutate(&mut nonce2),
                1 => rng.mutate(&mut aad2),
                2 => rng.mutate(&mut ct2),
                _ => {
                    let n = rng.len(40);
                    ct2 = rng.bytes(n);
                }
            }
            if (&nonce2[..], &aad2, &ct2) == (&nonce[..], &aad, &ct) {
                return;
            }
            let opened = no_panic(&(&nonce2, &aad2, &ct2), || key.open(&nonce2, &aad2, &ct2));
            assert_eq!(opened, Err(CryptoError::Authentication));
        });
    }
}
