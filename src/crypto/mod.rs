//! Pure cryptography: key pairs, HPKE contexts used for key agreement only,
//! per-subject AES-256-GCM data keys, keyed subject digests and randomness.
//!
//! Nothing here knows about PostgreSQL; every function is unit-tested with
//! plain `#[test]`s.

mod aead;
mod digest;
mod hpke_context;
mod keypair;

pub use aead::{DataKey, NONCE_LEN};
pub use digest::{sha256, DigestMap, Sha256Stream, SubjectDigester, DIGEST_LEN};
pub use hpke_context::{ReceiverContext, SenderContext};
pub use keypair::{canonical_form, generate_keypair, public_key_of, validate_public_key, KEY_LEN};

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// A key is not 32 bytes long.
    KeyLength(usize),
    /// HPKE refused the public key (for example a low-order point).
    UnusablePublicKey,
    /// Another encoding of a point than its canonical one (top bit set, or
    /// a value from 2^255 - 19 up).
    NonCanonicalPublicKey,
    /// An encapsulated key that no private key can open.
    BadEncapsulatedKey,
    /// AEAD authentication failed: wrong key, wrong associated data or tampering.
    Authentication,
    /// The operating system refused to hand out random bytes.
    Randomness,
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoError::KeyLength(n) => write!(f, "a key must be {KEY_LEN} bytes, got {n}"),
            CryptoError::UnusablePublicKey => f.write_str("not a usable X25519 public key"),
            CryptoError::NonCanonicalPublicKey => f.write_str(
                "not the canonical encoding of an X25519 public key (top bit set, or not below 2^255 - 19)",
            ),
            CryptoError::BadEncapsulatedKey => f.write_str("malformed encapsulated key"),
            CryptoError::Authentication => f.write_str("ciphertext failed authentication"),
            CryptoError::Randomness => f.write_str("the operating system random source failed"),
        }
    }
}

impl std::error::Error for CryptoError {}

/// Fills `buf` from the operating system's CSPRNG. No user-space state is kept,
/// so forked backends can never share a random stream.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    use rand_core::{OsRng, TryRngCore};
    OsRng
        .try_fill_bytes(buf)
        .map_err(|_| CryptoError::Randomness)
}

/// Hex decoding for test vectors.
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
