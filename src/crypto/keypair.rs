//! X25519 reader key pairs (HPKE KEM DHKEM(X25519, HKDF-SHA256)).

use hpke::{Deserializable, Kem as _, Serializable};
use zeroize::Zeroizing;

use super::hpke_context::{Kem, SenderContext};
use super::CryptoError;

pub const KEY_LEN: usize = 32;

/// A fresh key pair: (public key, private key). The private key is wiped when dropped.
pub fn generate_keypair() -> ([u8; KEY_LEN], Zeroizing<[u8; KEY_LEN]>) {
    let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
    let (private, public) = Kem::gen_keypair(&mut rng);
    let mut private_bytes = Zeroizing::new([0u8; KEY_LEN]);
    private_bytes.copy_from_slice(&private.to_bytes());
    (public.to_bytes().into(), private_bytes)
}

/// The public key that belongs to `private_key`.
pub fn public_key_of(private_key: &[u8]) -> Result<[u8; KEY_LEN], CryptoError> {
    if private_key.len() != KEY_LEN {
        return Err(CryptoError::KeyLength(private_key.len()));
    }
    let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(private_key)
        .map_err(|_| CryptoError::KeyLength(private_key.len()))?;
    Ok(Kem::sk_to_pk(&private).to_bytes().into())
}

/// Checks that a writer could actually encapsulate to this key.
pub fn validate_public_key(public_key: &[u8]) -> Result<(), CryptoError> {
    SenderContext::new(public_key).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hex;

    #[test]
    fn generated_pairs_match_and_differ() {
        let (pk1, sk1) = generate_keypair();
        let (pk2, _) = generate_keypair();
        assert_ne!(pk1, pk2);
        assert_eq!(public_key_of(&sk1[..]).unwrap(), pk1);
        validate_public_key(&pk1).unwrap();
    }

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 §6.1, Alice's key pair.
        let sk = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pk = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(public_key_of(&sk).unwrap().to_vec(), pk);
    }

    #[test]
    fn rejects_wrong_lengths_and_low_order_points() {
        assert_eq!(public_key_of(&[1u8; 31]), Err(CryptoError::KeyLength(31)));
        assert_eq!(
            validate_public_key(&[1u8; 33]),
            Err(CryptoError::KeyLength(33))
        );
        // The all-zero point has small order: every shared secret would be zero.
        assert_eq!(
            validate_public_key(&[0u8; 32]),
            Err(CryptoError::UnusablePublicKey)
        );
    }

    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, no_panic};

    #[test]
    fn fuzz_public_keys() {
        // Keys a user hands in: any length, any bytes.
        fuzz("public_keys", 25, |rng| {
            let len = if rng.coin() {
                KEY_LEN
            } else {
                rng.range(0, 40)
            };
            let bytes = rng.bytes(len);
            let public = no_panic(&bytes, || public_key_of(&bytes));
            let valid = no_panic(&bytes, || validate_public_key(&bytes));
            if len != KEY_LEN {
                assert_eq!(public, Err(CryptoError::KeyLength(len)));
                assert_eq!(valid, Err(CryptoError::KeyLength(len)));
                return;
            }
            // Every 32 bytes are a private key, and its public key is usable.
            let public = public.unwrap();
            validate_public_key(&public).unwrap();
            // Random 32 bytes are a usable public key unless of small order.
            if valid.is_err() {
                assert_eq!(valid, Err(CryptoError::UnusablePublicKey));
            }
        });
    }
}
