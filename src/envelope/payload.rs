//! Compact binary payload codec (version 1):
//!
//! ```text
//! u8 version | varint reason length + 1 (0 = none) | reason bytes
//! varint column count | per column: u8 flags, [varint len, bytes] before, [varint len, bytes] after
//! flags: bits 0-1 before, bits 2-3 after (0 absent, 1 NULL, 2 text), bit 4 json
//! ```
//!
//! Columns are listed in the order of the event's `changed_columns`, so names
//! are stored once, outside the ciphertext.

const VERSION: u8 = 1;
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
        let mut buf = Vec::with_capacity(256);
        buf.push(VERSION);
        match reason {
            Some(r) => {
                put_varint(&mut buf, r.len() as u64 + 1);
                buf.extend_from_slice(r.as_bytes());
            }
            None => put_varint(&mut buf, 0),
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
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Version(v) => write!(f, "unknown payload version {v}"),
            DecodeError::Truncated => f.write_str("truncated payload"),
            DecodeError::BadFlags(b) => write!(f, "bad column flags {b:#x}"),
            DecodeError::NotUtf8 => f.write_str("payload text is not UTF-8"),
            DecodeError::TrailingBytes => f.write_str("trailing bytes after payload"),
        }
    }
}

impl Payload {
    pub fn decode(bytes: &[u8]) -> Result<Payload, DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.byte()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let reason = match r.varint()? {
            0 => None,
            n => Some(r.text(n as usize - 1)?),
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
        Ok(Payload { reason, columns })
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

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
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
    fn compact_encoding() {
        let mut w = PayloadWriter::new(None);
        w.column(false, Value::Text(b"a"), Value::Text(b"b"));
        assert_eq!(w.finish(), vec![1, 0, 1, 0x0a, 1, b'a', 1, b'b']);
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(Payload::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(Payload::decode(&[2, 0, 0]), Err(DecodeError::Version(2)));
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
}
