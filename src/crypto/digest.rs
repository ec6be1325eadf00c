//! Keyed subject digests (HMAC-SHA256 under the installation secret) and SHA-256.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const DIGEST_LEN: usize = 32;

/// Turns a subject token into a keyed digest: the database stores the digest,
/// never the token, and without the secret a digest cannot be tested against
/// guessed tokens.
#[derive(Clone)]
pub struct SubjectDigester(Hmac<Sha256>);

impl SubjectDigester {
    pub fn new(secret: &[u8]) -> Self {
        SubjectDigester(
            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"),
        )
    }

    pub fn digest(&self, token: &[u8]) -> [u8; DIGEST_LEN] {
        let mut mac = self.0.clone();
        mac.update(token);
        mac.finalize().into_bytes().into()
    }
}

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2() {
        let d = SubjectDigester::new(b"Jefe").digest(b"what do ya want for nothing?");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn digest_depends_on_secret_and_token() {
        let a = SubjectDigester::new(b"secret one");
        let b = SubjectDigester::new(b"secret two");
        assert_ne!(a.digest(b"alice"), b.digest(b"alice"));
        assert_ne!(a.digest(b"alice"), a.digest(b"bob"));
        assert_eq!(a.digest(b"alice"), a.digest(b"alice"));
    }

    #[test]
    fn sha256_of_abc() {
        let h = sha256(&[b"a", b"bc"]);
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
