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
    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, no_panic, Rng};

    /// What a stored event's row gives `open_event`, owned so it can be corrupted.
    #[derive(Debug, Clone, PartialEq)]
    struct Stored {
        nonce: Vec<u8>,
        ciphertext: Vec<u8>,
        event_id: i64,
        subject_key_id: Option<i64>,
        subject_digest: Option<Vec<u8>>,
        context_id: i64,
        operation: String,
        table_name: Option<String>,
        columns: Vec<String>,
        metadata: [u8; 32],
    }

    impl Stored {
        fn binding(&self) -> Binding<'_> {
            Binding {
                event_id: self.event_id,
                subject_key_id: self.subject_key_id,
                subject_digest: self.subject_digest.as_deref(),
                context_id: self.context_id,
                metadata: self.metadata,
            }
        }

        fn open(&self, key: &DataKey) -> Result<Payload, EnvelopeError> {
            no_panic(self, || {
                open_event(key, &self.nonce, &self.binding(), &self.ciphertext)
            })
        }
    }

    fn random_id(rng: &mut Rng) -> i64 {
        match rng.below(4) {
            0 => rng.range(1, 10) as i64,
            1 => *rng.pick(&[1, i64::MAX, i64::MIN, -1]),
            _ => rng.next_u64() as i64,
        }
    }

    /// An identity value. Subject keys are numbered from 1: the associated
    /// data cannot tell subject key 0 from none.
    fn random_key_id(rng: &mut Rng) -> i64 {
        (random_id(rng) & i64::MAX).max(1)
    }

    /// A name as PostgreSQL stores one: text without NUL.
    fn random_name(rng: &mut Rng) -> String {
        rng.text(12, &['.', '"', ' ']).replace('\0', "")
    }

    fn random_payload(rng: &mut Rng, columns: usize) -> Vec<u8> {
        let reason = rng.coin().then(|| rng.text(10, &[]));
        let note = rng.one_in(4).then(|| rng.text(10, &[]));
        let mut w = PayloadWriter::with_note(reason.as_deref(), note.as_deref());
        for _ in 0..columns {
            let values: Vec<Option<String>> = (0..2)
                .map(|_| rng.coin().then(|| rng.text(20, &[])))
                .collect();
            fn value(v: &Option<String>) -> Value<&[u8]> {
                match v {
                    Some(t) => Value::Text(t.as_bytes()),
                    None => Value::Null,
                }
            }
            w.column(rng.coin(), value(&values[0]), value(&values[1]));
        }
        w.finish()
    }

    /// A sealed event as the recorder stores it, with its payload and key.
    fn random_event(rng: &mut Rng) -> (DataKey, Stored, Vec<u8>) {
        let key = DataKey::new(&rng.array());
        let columns: Vec<String> = (0..rng.len(4)).map(|_| random_name(rng)).collect();
        let operation = rng
            .pick(&["INSERT", "UPDATE", "DELETE", "READ", "ACCESS"])
            .to_string();
        let table_name = rng
            .coin()
            .then(|| format!("{}.{}", random_name(rng), random_name(rng)));
        let column_refs: Vec<&str> = columns.iter().map(String::as_str).collect();
        let metadata = metadata_digest(&operation, table_name.as_deref(), Some(&column_refs));
        let subject = !rng.one_in(4);
        let nonce: [u8; NONCE_LEN] = rng.array();
        let mut stored = Stored {
            nonce: nonce.to_vec(),
            ciphertext: Vec::new(),
            event_id: random_id(rng),
            subject_key_id: subject.then(|| random_key_id(rng)),
            subject_digest: subject.then(|| rng.bytes(32)),
            context_id: random_key_id(rng),
            operation,
            table_name,
            columns,
            metadata,
        };
        let payload = random_payload(rng, stored.columns.len());
        stored.ciphertext = seal_event(&key, &nonce, &stored.binding(), &payload).unwrap();
        (key, stored, payload)
    }

    /// Changes one thing `open_event` is given, as tampering or corruption in
    /// storage could; returns what was changed.
    fn corrupt(rng: &mut Rng, s: &mut Stored) -> &'static str {
        match rng.below(12) {
            0 => {
                rng.mutate(&mut s.nonce);
                "nonce"
            }
            1 | 2 => {
                rng.mutate(&mut s.ciphertext);
                "ciphertext"
            }
            3 => {
                let n = rng.len(s.ciphertext.len() + 8);
                s.ciphertext = rng.bytes(n);
                "ciphertext replaced"
            }
            4 => {
                s.event_id = match rng.below(3) {
                    0 => s.event_id.wrapping_add(1),
                    1 => s.event_id ^ (1 << rng.below(64)),
                    _ => random_id(rng),
                };
                "event id"
            }
            5 => {
                s.subject_key_id = match s.subject_key_id {
                    Some(_) if rng.one_in(3) => None,
                    _ => Some(random_key_id(rng)),
                };
                "subject key id"
            }
            6 => {
                s.subject_digest = match s.subject_digest.take() {
                    Some(_) if rng.one_in(4) => None,
                    Some(mut d) => {
                        rng.mutate(&mut d);
                        if d.is_empty() {
                            // The associated data cannot tell an empty digest
                            // from none; a reader always passes 32 bytes.
                            d.push(rng.byte());
                        }
                        Some(d)
                    }
                    None => Some(rng.bytes(32)),
                };
                "subject digest"
            }
            7 => {
                s.context_id = match rng.below(3) {
                    0 => s.context_id.wrapping_add(1),
                    1 => s.context_id ^ (1 << rng.below(64)),
                    _ => random_key_id(rng),
                };
                "context id"
            }
            8 => {
                let i = rng.below(32);
                s.metadata[i] ^= 1 << rng.below(8);
                "metadata bytes"
            }
            _ => {
                // Relabelled: another operation, table or column list.
                match rng.below(4) {
                    0 => s.operation = rng.pick(&["INSERT", "UPDATE", "DELETE"]).to_string(),
                    1 => {
                        s.table_name = match s.table_name.take() {
                            Some(mut t) if rng.coin() => {
                                rng.mutate_text(&mut t, &['.']);
                                Some(t.replace('\0', ""))
                            }
                            Some(_) => None,
                            None => Some(format!("public.{}", random_name(rng))),
                        }
                    }
                    2 if !s.columns.is_empty() => {
                        let i = rng.below(s.columns.len());
                        if rng.coin() {
                            s.columns.remove(i);
                        } else {
                            rng.mutate_text(&mut s.columns[i], &[]);
                            s.columns[i] = s.columns[i].replace('\0', "");
                        }
                    }
                    _ => s.columns.push(random_name(rng)),
                }
                let columns: Vec<&str> = s.columns.iter().map(String::as_str).collect();
                s.metadata = metadata_digest(&s.operation, s.table_name.as_deref(), Some(&columns));
                "operation, table or columns"
            }
        }
    }

    #[test]
    fn fuzz_open_event() {
        fuzz("open_event", 5_000, |rng| {
            let (key, stored, payload) = random_event(rng);
            let expected = Payload::decode(&payload).unwrap();
            // The untouched event always opens, to its payload.
            assert_eq!(stored.open(&key), Ok(expected.clone()), "{stored:?}");
            let mut corrupted = stored.clone();
            let mut what = Vec::new();
            for _ in 0..rng.range(1, 3) {
                what.push(corrupt(rng, &mut corrupted));
            }
            if corrupted == stored {
                return; // The corruptions undid each other.
            }
            // Anything else fails authentication: never a panic, never a payload.
            assert_eq!(
                corrupted.open(&key),
                Err(EnvelopeError::Crypto(CryptoError::Authentication)),
                "changed {what:?}: {stored:?} -> {corrupted:?}"
            );
            // So does the untouched event under another key.
            let other = DataKey::new(&rng.array());
            assert_eq!(
                stored.open(&other),
                Err(EnvelopeError::Crypto(CryptoError::Authentication))
            );
        });
    }

    /// An event's operation, table and columns, `None` columns being the
    /// empty list (as the recorder and the reader pass them).
    type Label = (String, Option<String>, Vec<String>);

    fn random_label(rng: &mut Rng) -> Label {
        let names = |rng: &mut Rng, n| (0..n).map(|_| random_name(rng)).collect::<Vec<_>>();
        let op = rng
            .pick(&["INSERT", "UPDATE", "DELETE", "", "A"])
            .to_string();
        let table = rng.coin().then(|| names(rng, 2).join("."));
        let n = rng.len(4);
        (op, table, names(rng, n))
    }

    fn label_digest((op, table, columns): &Label, as_none: bool) -> [u8; 32] {
        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
        let columns = (!(as_none && columns.is_empty())).then_some(&columns[..]);
        metadata_digest(op, table.as_deref(), columns)
    }

    #[test]
    fn fuzz_metadata_digest() {
        // Different labels never share a digest, so a relabelled event fails to
        // open. The domain is what PostgreSQL can store: no NUL in any name.
        // (Outside it, a table named "\x01" would share the digest of none.)
        fuzz("metadata_digest", 20_000, |rng| {
            let a = random_label(rng);
            let mut b = a.clone();
            match rng.below(4) {
                0 => b = random_label(rng),
                1 => b.0 = random_label(rng).0,
                2 => {
                    b.1 = match b.1.take() {
                        Some(mut t) if rng.coin() => {
                            rng.mutate_text(&mut t, &['.']);
                            Some(t.replace(['\0', '\u{1}'], ""))
                        }
                        Some(_) => None,
                        None => Some(random_name(rng)).filter(|t| t != "\u{1}"),
                    }
                }
                _ => {
                    if !b.2.is_empty() && rng.coin() {
                        let i = rng.below(b.2.len());
                        rng.mutate_text(&mut b.2[i], &[]);
                        b.2[i] = b.2[i].replace('\0', "");
                    } else if !b.2.is_empty() && rng.coin() {
                        let (i, j) = (rng.below(b.2.len()), rng.below(b.2.len()));
                        b.2.swap(i, j);
                    } else if rng.coin() {
                        b.2.push(random_name(rng));
                    } else {
                        b.2.clear();
                    }
                }
            }
            let (da, db) = (label_digest(&a, rng.coin()), label_digest(&b, rng.coin()));
            assert_eq!(da == db, a == b, "{a:?} vs {b:?}");
        });
    }
}
