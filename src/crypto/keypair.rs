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

/// Checks that a writer could actually encapsulate to this key, and that
/// it is the one canonical encoding of its point: X25519 ignores the top
/// bit and reduces modulo 2^255 - 19, so other encodings of one key would
/// pass for different keys.
pub fn validate_public_key(public_key: &[u8]) -> Result<(), CryptoError> {
    if public_key.len() == KEY_LEN && canonical_form(public_key) != public_key {
        return Err(CryptoError::NonCanonicalPublicKey);
    }
    SenderContext::new(public_key).map(|_| ())
}

/// The canonical encoding of the point an X25519 public key of any 32 bytes
/// stands for (RFC 7748 §5: the top bit is ignored, the value taken modulo
/// p = 2^255 - 19). Keys that stand for the same point have the same form.
pub fn canonical_form(public_key: &[u8]) -> Vec<u8> {
    let mut u = public_key.to_vec();
    if u.len() != KEY_LEN {
        return u;
    }
    u[31] &= 0x7f;
    // Below 2^255 a value is at most p + 18: p itself is ff..ff7f with the
    // low byte ed, so only these 19 values need p subtracted (one step).
    if u[31] == 0x7f && u[1..31].iter().all(|&b| b == 0xff) && u[0] >= 0xed {
        u[0] -= 0xed;
        u[1..31].fill(0);
        u[31] = 0;
    }
    u
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

    #[test]
    fn other_encodings_of_one_key_are_refused() {
        let (pk, _) = generate_keypair();
        assert_eq!(canonical_form(&pk), pk.to_vec());
        validate_public_key(&pk).unwrap();
        // The same point with the top bit set.
        let mut high = pk;
        high[31] |= 0x80;
        assert_eq!(canonical_form(&high), pk.to_vec());
        assert_eq!(
            validate_public_key(&high),
            Err(CryptoError::NonCanonicalPublicKey)
        );
    }

    #[test]
    fn values_from_p_up_are_reduced() {
        // p = 2^255 - 19 encodes 0; p + 9 encodes the base point 9.
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert_eq!(canonical_form(&p), vec![0u8; 32]);
        let mut p9 = p;
        p9[0] = 0xf6;
        let mut nine = vec![0u8; 32];
        nine[0] = 9;
        assert_eq!(canonical_form(&p9), nine);
        assert_eq!(
            validate_public_key(&p9),
            Err(CryptoError::NonCanonicalPublicKey)
        );
        // p - 1 is canonical (and below p).
        let mut below = p;
        below[0] = 0xec;
        assert_eq!(canonical_form(&below), below.to_vec());
        // With the top bit set too, p + 9 is still the base point.
        p9[31] |= 0x80;
        assert_eq!(canonical_form(&p9), nine);
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
            // Random 32 bytes are a usable public key unless of small order
            // or not the canonical encoding of their point.
            match valid {
                Ok(()) => assert_eq!(canonical_form(&bytes), bytes),
                Err(CryptoError::NonCanonicalPublicKey) => {
                    assert_ne!(canonical_form(&bytes), bytes)
                }
                Err(e) => assert_eq!(e, CryptoError::UnusablePublicKey),
            }
        });
    }
}
