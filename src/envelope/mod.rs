//! The event envelope: what goes inside an event's ciphertext (the payload
//! codec) and what the ciphertext is bound to (associated data).

mod payload;

pub use payload::{DecodeError, Payload, PayloadWriter, Value};

use crate::crypto::{CryptoError, DataKey, NONCE_LEN};

/// Associated data that binds a ciphertext to its event, its subject key and
/// its writer context: a ciphertext copied to any other row fails to open.
pub fn event_aad(event_id: i64, subject_key_id: Option<i64>, context_id: i64) -> [u8; 28] {
    let mut aad = [0u8; 28];
    aad[..4].copy_from_slice(b"psa1");
    aad[4..12].copy_from_slice(&event_id.to_be_bytes());
    aad[12..20].copy_from_slice(&subject_key_id.unwrap_or(0).to_be_bytes());
    aad[20..28].copy_from_slice(&context_id.to_be_bytes());
    aad
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
    event_id: i64,
    subject_key_id: Option<i64>,
    context_id: i64,
    payload: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let aad = event_aad(event_id, subject_key_id, context_id);
    key.seal_with_nonce(nonce, &aad, payload).map(|(_, ct)| ct)
}

pub fn open_event(
    key: &DataKey,
    nonce: &[u8],
    event_id: i64,
    subject_key_id: Option<i64>,
    context_id: i64,
    ciphertext: &[u8],
) -> Result<Payload, EnvelopeError> {
    let aad = event_aad(event_id, subject_key_id, context_id);
    let plain = zeroize::Zeroizing::new(
        key.open(nonce, &aad, ciphertext)
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

    #[test]
    fn round_trip_and_binding() {
        let key = DataKey::new(&[5u8; 32]);
        let nonce = [1u8; NONCE_LEN];
        let ct = seal_event(&key, &nonce, 10, Some(3), 1, &sample()).unwrap();
        let p = open_event(&key, &nonce, 10, Some(3), 1, &ct).unwrap();
        assert_eq!(p.reason.as_deref(), Some("ticket #4711"));
        assert_eq!(p.columns[0].after, Value::Text("new@example.com".into()));
        // Moved to another event, another subject key or another context: refused.
        for (e, s, c) in [
            (11, Some(3), 1),
            (10, Some(4), 1),
            (10, None, 1),
            (10, Some(3), 2),
        ] {
            assert_eq!(
                open_event(&key, &nonce, e, s, c, &ct).unwrap_err(),
                EnvelopeError::Crypto(CryptoError::Authentication)
            );
        }
    }

    #[test]
    fn known_answer_envelope() {
        // Pins the wire format: key, nonce, AAD layout and payload codec together.
        let key = DataKey::new(&[5u8; 32]);
        let ct = seal_event(&key, &[1u8; NONCE_LEN], 10, Some(3), 1, &sample()).unwrap();
        let hex: String = ct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, KAT);
    }

    const KAT: &str = "42029a2c13a640d8e74a1bfd1902a9044c62b34fa42c00f620bd0b7a4aec25eb221b336ad842f84a32fe8cf9a6557b0e4a3169a9e3daea60451373ec02e6e875";
}
