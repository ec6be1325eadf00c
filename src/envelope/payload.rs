//! Compact binary payload codec:
//!
//! ```text
//! version 1: u8 1 | text reason | columns
//! version 2: u8 2 | text reason | text note | columns
//! text: varint length + 1 (0 = none), bytes
//! columns: varint column count | per column: u8 flags, [varint len, bytes] before, [varint len, bytes] after
//! flags: bits 0-1 before, bits 2-3 after (0 absent, 1 NULL, 2 text), bit 4 json
//! ```
//!
//! Version 2 is written only when there is a note (the description an
//! application gave with `record_access`), so change events stay version 1.
//! Columns are listed in the order of the event's `changed_columns`, so names
//! are stored once, outside the ciphertext.

const VERSION: u8 = 1;
const VERSION_WITH_NOTE: u8 = 2;
const JSON_FLAG: u8 = 0x10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<T> {
    /// Not part of this operation (an INSERT has no before, a DELETE no after).
    Absent,
    Null,
    Text(T),
}

impl<T> Value<T> {
    fn tag(&self) -> u8 {
        match self {
            Value::Absent => 0,
            Value::Null => 1,
            Value::Text(_) => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnValues {
    pub json: bool,
    pub before: Value<String>,
    pub after: Value<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    pub reason: Option<String>,
    /// A free-text description given by the application.
    pub note: Option<String>,
    pub columns: Vec<ColumnValues>,
}

/// Appends columns straight from borrowed bytes, so the capture path formats
/// each value once and copies it once.
pub struct PayloadWriter {
    buf: Vec<u8>,
    count: usize,
    count_at: usize,
}

impl PayloadWriter {
    pub fn new(reason: Option<&str>) -> Self {
        Self::with_note(reason, None)
    }

    pub fn with_note(reason: Option<&str>, note: Option<&str>) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.push(if note.is_some() {
            VERSION_WITH_NOTE
        } else {
            VERSION
        });
        put_text(&mut buf, reason);
        if note.is_some() {
            put_text(&mut buf, note);
        }
        let count_at = buf.len();
        Self {
            buf,
            count: 0,
            count_at,
        }
    }

    pub fn column(&mut self, json: bool, before: Value<&[u8]>, after: Value<&[u8]>) {
        let flags = before.tag() | (after.tag() << 2) | if json { JSON_FLAG } else { 0 };
        self.buf.push(flags);
        for v in [before, after] {
            if let Value::Text(bytes) = v {
                put_varint(&mut self.buf, bytes.len() as u64);
                self.buf.extend_from_slice(bytes);
            }
        }
        self.count += 1;
    }

    /// The column count goes in front of the columns: written last, inserted once.
    pub fn finish(mut self) -> Vec<u8> {
        let mut count = Vec::with_capacity(3);
        put_varint(&mut count, self.count as u64);
        self.buf.splice(self.count_at..self.count_at, count);
        self.buf
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Version(u8),
    Truncated,
    BadFlags(u8),
    NotUtf8,
    TrailingBytes,
    /// Bytes no writer produces: an overlong or overflowing varint, or a
    /// version 2 payload without a note. Each payload has exactly one encoding.
    NonCanonical,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Version(v) => write!(f, "unknown payload version {v}"),
            DecodeError::Truncated => f.write_str("truncated payload"),
            DecodeError::BadFlags(b) => write!(f, "bad column flags {b:#x}"),
            DecodeError::NotUtf8 => f.write_str("payload text is not UTF-8"),
            DecodeError::TrailingBytes => f.write_str("trailing bytes after payload"),
            DecodeError::NonCanonical => f.write_str("non-canonical payload encoding"),
        }
    }
}

impl Payload {
    pub fn decode(bytes: &[u8]) -> Result<Payload, DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.byte()?;
        if version != VERSION && version != VERSION_WITH_NOTE {
            return Err(DecodeError::Version(version));
        }
        let reason = r.optional_text()?;
        let note = match version {
            VERSION_WITH_NOTE => r.optional_text()?,
            _ => None,
        };
        let count = r.varint()? as usize;
        let mut columns = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            let flags = r.byte()?;
            if flags & !(JSON_FLAG | 0x0f) != 0 {
                return Err(DecodeError::BadFlags(flags));
            }
            let before = r.value(flags & 0x03, flags)?;
            let after = r.value((flags >> 2) & 0x03, flags)?;
            columns.push(ColumnValues {
                json: flags & JSON_FLAG != 0,
                before,
                after,
            });
        }
        if r.pos != bytes.len() {
            return Err(DecodeError::TrailingBytes);
        }
        // Version 2 exists for the note: without one, a writer uses version 1.
        if version == VERSION_WITH_NOTE && note.is_none() {
            return Err(DecodeError::NonCanonical);
        }
        Ok(Payload {
            reason,
            note,
            columns,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// A minimal-length LEB128 varint: a last byte of zero after others
    /// (overlong) or bits beyond 64 (overflow) are refused, so every value has
    /// exactly one encoding. More than ten bytes reads as truncated.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && (2..0x80).contains(&b) {
                return Err(DecodeError::NonCanonical);
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if b == 0 && shift > 0 {
                    return Err(DecodeError::NonCanonical);
                }
                return Ok(value);
            }
        }
        Err(DecodeError::Truncated)
    }

    fn text(&mut self, len: usize) -> Result<String, DecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(DecodeError::Truncated)?;
        let s =
            std::str::from_utf8(&self.bytes[self.pos..end]).map_err(|_| DecodeError::NotUtf8)?;
        self.pos = end;
        Ok(s.to_owned())
    }

    fn optional_text(&mut self) -> Result<Option<String>, DecodeError> {
        match self.varint()? {
            0 => Ok(None),
            n => Ok(Some(self.text((n - 1) as usize)?)),
        }
    }

    fn value(&mut self, tag: u8, flags: u8) -> Result<Value<String>, DecodeError> {
        match tag {
            0 => Ok(Value::Absent),
            1 => Ok(Value::Null),
            2 => {
                let len = self.varint()? as usize;
                Ok(Value::Text(self.text(len)?))
            }
            _ => Err(DecodeError::BadFlags(flags)),
        }
    }
}

fn put_text(buf: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(t) => {
            put_varint(buf, t.len() as u64 + 1);
            buf.extend_from_slice(t.as_bytes());
        }
        None => put_varint(buf, 0),
    }
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let big = "x".repeat(200_000);
        let mut w = PayloadWriter::new(None);
        w.column(false, Value::Absent, Value::Text(b"alice@example.com"));
        w.column(true, Value::Null, Value::Text(br#"{"a": 1}"#));
        w.column(false, Value::Text(big.as_bytes()), Value::Null);
        let p = Payload::decode(&w.finish()).unwrap();
        assert_eq!(p.reason, None);
        assert_eq!(p.columns.len(), 3);
        assert_eq!(
            p.columns[0],
            ColumnValues {
                json: false,
                before: Value::Absent,
                after: Value::Text("alice@example.com".into())
            }
        );
        assert!(p.columns[1].json);
        assert_eq!(p.columns[1].before, Value::Null);
        assert_eq!(p.columns[2].before, Value::Text(big));
        assert_eq!(p.columns[2].after, Value::Null);
    }

    #[test]
    fn empty_reason_differs_from_none() {
        let p = Payload::decode(&PayloadWriter::new(Some("")).finish()).unwrap();
        assert_eq!(p.reason.as_deref(), Some(""));
        assert!(p.columns.is_empty());
    }

    #[test]
    fn note_only_when_given() {
        let plain = PayloadWriter::new(Some("ticket #1")).finish();
        assert_eq!(plain[0], VERSION);
        let noted = PayloadWriter::with_note(None, Some("opened profile")).finish();
        assert_eq!(noted[0], VERSION_WITH_NOTE);
        let p = Payload::decode(&noted).unwrap();
        assert_eq!(
            (p.reason, p.note.as_deref()),
            (None, Some("opened profile"))
        );
        assert_eq!(Payload::decode(&plain).unwrap().note, None);
    }

    #[test]
    fn compact_encoding() {
        let mut w = PayloadWriter::new(None);
        w.column(false, Value::Text(b"a"), Value::Text(b"b"));
        assert_eq!(w.finish(), vec![1, 0, 1, 0x0a, 1, b'a', 1, b'b']);
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(Payload::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(Payload::decode(&[3, 0, 0]), Err(DecodeError::Version(3)));
        assert_eq!(Payload::decode(&[2, 0, 0]), Err(DecodeError::Truncated));
        assert_eq!(
            Payload::decode(&[1, 0, 1, 0x0a, 5, b'a']),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Payload::decode(&[1, 0, 1, 0x03]),
            Err(DecodeError::BadFlags(3))
        );
        assert_eq!(
            Payload::decode(&[1, 0, 0, 9]),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(Payload::decode(&[1, 2, 0xff, 0]), Err(DecodeError::NotUtf8));
        assert_eq!(
            Payload::decode(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated)
        );
    }
    #[test]
    fn rejects_non_canonical_encodings() {
        // Found by fuzz_payload_decode_mutated / fuzz_payload_varints: each of
        // these decoded to the payload whose only encoding is `[1, 0, 0]`.
        assert_eq!(Payload::decode(&[1, 0, 0]), Ok(Payload::default()));
        for bytes in [
            &[1, 0x80, 0x00, 0][..],
            &[1, 0, 0x80, 0x00],
            &[1, 0, 0x80, 0x80, 0x00],
            // Version 2 without a note.
            &[2, 0, 0, 0],
            // Bits beyond 64 that a u64 would drop: 2 << 63 == 0.
            &[
                1, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02,
            ],
        ] {
            assert_eq!(
                Payload::decode(bytes),
                Err(DecodeError::NonCanonical),
                "{bytes:x?}"
            );
        }
        // The largest varint still decodes (and is then too long a count).
        assert_eq!(
            Payload::decode(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(DecodeError::Truncated)
        );
    }

    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, hex, no_panic, Rng};

    /// The encoding a writer produces for `p`: the canonical one.
    fn encode(p: &Payload) -> Vec<u8> {
        let mut w = PayloadWriter::with_note(p.reason.as_deref(), p.note.as_deref());
        fn bytes(v: &Value<String>) -> Value<&[u8]> {
            match v {
                Value::Absent => Value::Absent,
                Value::Null => Value::Null,
                Value::Text(t) => Value::Text(t.as_bytes()),
            }
        }
        for c in &p.columns {
            w.column(c.json, bytes(&c.before), bytes(&c.after));
        }
        w.finish()
    }

    fn random_value(rng: &mut Rng) -> Value<String> {
        match rng.below(3) {
            0 => Value::Absent,
            1 => Value::Null,
            _ if rng.one_in(50) => Value::Text("v".repeat(rng.range(100, 20_000))),
            _ => Value::Text(rng.text(40, &['"', '{', '}', '\\'])),
        }
    }

    fn random_payload(rng: &mut Rng) -> Payload {
        let text = |rng: &mut Rng| rng.coin().then(|| rng.text(30, &[]));
        let reason = text(rng);
        let note = text(rng);
        // Mostly a few columns, sometimes enough for a two-byte column count.
        let count = if rng.one_in(20) {
            rng.range(120, 300)
        } else {
            rng.len(12)
        };
        let columns = (0..count)
            .map(|_| ColumnValues {
                json: rng.coin(),
                before: random_value(rng),
                after: random_value(rng),
            })
            .collect();
        Payload {
            reason,
            note,
            columns,
        }
    }

    /// Decodes `bytes`: never panics, and whatever it accepts is exactly what
    /// a writer produces for the answer, so no other bytes decode to it.
    fn check_decode(bytes: &[u8]) -> Result<Payload, DecodeError> {
        let decoded = no_panic(&bytes, || Payload::decode(bytes));
        if let Ok(p) = &decoded {
            let canonical = encode(p);
            assert!(
                canonical == bytes,
                "accepted {} as {p:?}, whose encoding is {}",
                hex(bytes),
                hex(&canonical)
            );
        }
        decoded
    }

    #[test]
    fn fuzz_payload_round_trip() {
        fuzz("payload_round_trip", 20_000, |rng| {
            let p = random_payload(rng);
            let bytes = encode(&p);
            assert_eq!(check_decode(&bytes).as_ref(), Ok(&p));
        });
    }

    #[test]
    fn fuzz_payload_decode_random_bytes() {
        fuzz("payload_decode_random_bytes", 20_000, |rng| {
            let len = rng.len(48);
            let mut bytes = rng.bytes(len);
            // Mostly a known version, so the decoder gets past the first byte.
            if !bytes.is_empty() && !rng.one_in(8) {
                bytes[0] = rng.range(1, 2) as u8;
            }
            let _ = check_decode(&bytes);
        });
    }

    #[test]
    fn fuzz_payload_decode_mutated() {
        fuzz("payload_decode_mutated", 20_000, |rng| {
            let p = random_payload(rng);
            let original = encode(&p);
            let mut bytes = original.clone();
            for _ in 0..rng.range(1, 4) {
                rng.mutate(&mut bytes);
            }
            match check_decode(&bytes) {
                // A mutation that left the bytes as they were.
                Ok(q) if bytes == original => assert_eq!(q, p),
                // Another canonical encoding: a different payload, never the original.
                Ok(q) => assert_ne!(q, p),
                Err(_) => {}
            }
        });
    }

    #[test]
    fn fuzz_payload_varints() {
        // Hand-made varints in every position a varint can take.
        fuzz("payload_varints", 20_000, |rng| {
            let varint = |rng: &mut Rng| {
                let mut v: Vec<u8> = (0..rng.range(0, 10))
                    .map(|_| {
                        let random = rng.byte() | 0x80;
                        *rng.pick(&[0x80, 0x81, 0xff, random])
                    })
                    .collect();
                let last = rng.byte() & 0x7f;
                v.push(*rng.pick(&[0x00, 0x01, 0x02, 0x7f, last]));
                v
            };
            let mut bytes = vec![rng.range(1, 2) as u8];
            for _ in 0..rng.range(1, 4) {
                bytes.extend(varint(rng));
                if rng.coin() {
                    bytes.push(*rng.pick(&[0x00, 0x05, 0x0a, 0x1a]));
                }
                if rng.coin() {
                    let n = rng.len(8);
                    bytes.extend(rng.bytes(n));
                }
            }
            let _ = check_decode(&bytes);
        });
    }
}
