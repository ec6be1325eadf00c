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
}
