//! Keyed subject digests (HMAC-SHA256 under the installation secret) and SHA-256.

use std::collections::HashMap;

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

/// Hashes keyed digests in hash maps by their leading bytes: an HMAC under
/// a secret key is uniformly spread and cannot be steered by whoever picks
/// the tokens, so a keyed hash function (SipHash, the default) would only
/// hash 32 bytes again on every lookup — several per captured event.
#[derive(Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A digest arrives as its length, then its bytes: both fold in.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
}

/// A hash map keyed by subject digests.
pub type DigestMap<V> = HashMap<[u8; DIGEST_LEN], V, std::hash::BuildHasherDefault<DigestHasher>>;

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256Stream::default();
    for part in parts {
        hasher.update(part);
    }
    hasher.finish()
}

/// SHA-256 fed piece by piece, for inputs too large to gather first.
#[derive(Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn update(&mut self, part: &[u8]) {
        self.0.update(part);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
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
    fn digest_map_tells_digests_apart_by_every_byte() {
        let d = SubjectDigester::new(b"secret");
        let mut map = DigestMap::default();
        for i in 0..10_000u32 {
            map.insert(d.digest(&i.to_le_bytes()), i);
        }
        for i in 0..10_000u32 {
            assert_eq!(map.get(&d.digest(&i.to_le_bytes())), Some(&i));
        }
        // Digests alike but for one byte, anywhere, are different keys and hashes.
        let base = [7u8; DIGEST_LEN];
        let hasher = map.hasher().clone();
        let hash = |k: &[u8; DIGEST_LEN]| std::hash::BuildHasher::hash_one(&hasher, k);
        for at in 0..DIGEST_LEN {
            let mut other = base;
            other[at] ^= 1;
            assert_ne!(hash(&base), hash(&other), "byte {at}");
            map.insert(other, 1_000_000 + at as u32);
        }
        assert_eq!(map.len(), 10_000 + DIGEST_LEN);
    }

    #[test]
    fn sha256_of_abc() {
        let h = sha256(&[b"a", b"bc"]);
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
