//! The event envelope: what goes inside an event's ciphertext (the payload
//! codec) and what the ciphertext is bound to (associated data).

mod payload;

pub use payload::{DecodeError, Payload, PayloadWriter, Value};

use crate::crypto::{CryptoError, DataKey, NONCE_LEN};

/// Everything a ciphertext is bound to (AEAD associated data): its event, its
/// subject (key id and keyed digest), its writer context and what the event
/// says it is (operation, table, changed columns). A ciphertext copied to any
/// other row, or a row relabelled around it, fails to open.
pub struct Binding<'a> {
    pub event_id: i64,
    pub subject_key_id: Option<i64>,
    pub subject_digest: Option<&'a [u8]>,
    pub context_id: i64,
    /// `metadata_digest` of the event's operation, table and changed columns.
    pub metadata: [u8; 32],
}

impl Binding<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(96);
        aad.extend_from_slice(b"psa2");
        aad.extend_from_slice(&self.event_id.to_be_bytes());
        aad.extend_from_slice(&self.subject_key_id.unwrap_or(0).to_be_bytes());
        aad.extend_from_slice(&self.context_id.to_be_bytes());
        let digest = self.subject_digest.unwrap_or(&[]);
        aad.push(digest.len() as u8);
        aad.extend_from_slice(digest);
        aad.extend_from_slice(&self.metadata);
        aad
    }
}

/// A digest of what an event says it is, computed once per set of events alike.
pub fn metadata_digest(
    operation: &str,
    table_name: Option<&str>,
    columns: Option<&[&str]>,
) -> [u8; 32] {
    let mut parts: Vec<&[u8]> = vec![b"pg_subject_audit metadata v1", operation.as_bytes(), b"\0"];
    parts.push(table_name.map_or(&b"\x01"[..], str::as_bytes));
    parts.push(b"\0");
    for c in columns.unwrap_or(&[]) {
        parts.push(c.as_bytes());
        parts.push(b"\0");
    }
    crate::crypto::sha256(&parts)
}

#[derive(Debug, PartialEq, Eq)]
pub enum EnvelopeError {
    Crypto(CryptoError),
    Decode(DecodeError),
}

impl std::fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvelopeError::Crypto(e) => e.fmt(f),
            EnvelopeError::Decode(e) => e.fmt(f),
        }
    }
}

pub fn seal_event(
    key: &DataKey,
    nonce: &[u8; NONCE_LEN],
    binding: &Binding<'_>,
    payload: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    key.seal_with_nonce(nonce, &binding.aad(), payload)
        .map(|(_, ct)| ct)
}

pub fn open_event(
    key: &DataKey,
    nonce: &[u8],
    binding: &Binding<'_>,
    ciphertext: &[u8],
) -> Result<Payload, EnvelopeError> {
    let plain = zeroize::Zeroizing::new(
        key.open(nonce, &binding.aad(), ciphertext)
            .map_err(EnvelopeError::Crypto)?,
    );
    Payload::decode(&plain).map_err(EnvelopeError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = PayloadWriter::new(Some("ticket #4711"));
        w.column(
            false,
            Value::Text(b"old@example.com"),
            Value::Text(b"new@example.com"),
        );
        w.finish()
    }

    fn binding(
        event_id: i64,
        subject_key_id: Option<i64>,
        digest: &[u8],
        context_id: i64,
    ) -> Binding<'_> {
        Binding {
            event_id,
            subject_key_id,
            subject_digest: Some(digest),
            context_id,
            metadata: metadata_digest("UPDATE", Some("public.customers"), Some(&["email"])),
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let key = DataKey::new(&[5u8; 32]);
        let nonce = [1u8; NONCE_LEN];
        let ct = seal_event(&key, &nonce, &binding(10, Some(3), &[7; 32], 1), &sample()).unwrap();
        let p = open_event(&key, &nonce, &binding(10, Some(3), &[7; 32], 1), &ct).unwrap();
        assert_eq!(p.reason.as_deref(), Some("ticket #4711"));
        assert_eq!(p.columns[0].after, Value::Text("new@example.com".into()));
        // Moved to another event, subject key, subject, context: refused.
        for b in [
            binding(11, Some(3), &[7; 32], 1),
            binding(10, Some(4), &[7; 32], 1),
            binding(10, None, &[7; 32], 1),
            binding(10, Some(3), &[8; 32], 1),
            binding(10, Some(3), &[7; 32], 2),
        ] {
            assert_eq!(
                open_event(&key, &nonce, &b, &ct).unwrap_err(),
                EnvelopeError::Crypto(CryptoError::Authentication)
            );
        }
        // Relabelled: another operation, table or column list.
        for metadata in [
            metadata_digest("INSERT", Some("public.customers"), Some(&["email"])),
            metadata_digest("UPDATE", Some("public.other"), Some(&["email"])),
            metadata_digest("UPDATE", Some("public.customers"), Some(&["phone"])),
            metadata_digest("UPDATE", None, Some(&["email"])),
        ] {
            let b = Binding {
                metadata,
                ..binding(10, Some(3), &[7; 32], 1)
            };
            assert_eq!(
                open_event(&key, &nonce, &b, &ct).unwrap_err(),
                EnvelopeError::Crypto(CryptoError::Authentication)
            );
        }
    }

    #[test]
    fn metadata_digest_is_unambiguous() {
        assert_ne!(
            metadata_digest("A", Some("b"), Some(&["c", "d"])),
            metadata_digest("A", Some("b"), Some(&["cd"]))
        );
        assert_ne!(
            metadata_digest("A", None, None),
            metadata_digest("A", Some(""), None)
        );
    }

    #[test]
    fn known_answer_envelope() {
        // Pins the wire format: key, nonce, associated data layout and payload codec together.
        let key = DataKey::new(&[5u8; 32]);
        let ct = seal_event(
            &key,
            &[1u8; NONCE_LEN],
            &binding(10, Some(3), &[7; 32], 1),
            &sample(),
        )
        .unwrap();
        let hex: String = ct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, KAT);
    }

    const KAT: &str = "42029a2c13a640d8e74a1bfd1902a9044c62b34fa42c00f620bd0b7a4aec25eb221b336ad842f84a32fe8cf9a6557b0e8ba8d61a9ff70fd39f6bf0c432990e5e";
}
