//! What a backend hands to the background writer: one statement's events,
//! not yet encrypted, as a flat byte string that fits a queue slot.
//!
//! ```text
//! u8 version | u8 flags (bit 0: failed, bit 1: rows, bit 2: admin) | i64 at | [varint rows] | strings ... | varint subject count | subjects
//! string: varint length + 1 (0 = none), bytes
//! ```
//! Pure Rust, so the codec is tested without PostgreSQL.

use crate::recorder::StatementContext;

const VERSION: u8 = 1;
const FAILED: u8 = 1;
const ROWS: u8 = 2;
const ADMIN: u8 = 4;

/// One statement's events for the background writer to record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// A failed change (status `error`), else a read (status `ok`).
    pub failed: bool,
    /// An admin event (an unlock): no payload, so the reason is not kept,
    /// as in every admin event.
    pub admin: bool,
    /// Who, when (statement start) and why, as the statement's backend saw
    /// it; its `txid` is unused: the events are the writer's transaction's.
    pub who: StatementContext,
    /// `READ`, `INSERT`, `UPDATE`, `DELETE`, `MERGE` or `TRUNCATE`.
    pub operation: String,
    /// Plain metadata: `select public.customers`, never a value.
    pub title: String,
    /// Rows a statement-level read returned or processed: the title gets
    /// `: N rows`. Counted reads of one statement merge by adding them.
    pub rows: Option<u64>,
    /// Empty for an event of no table (a read of a trail, an unlock).
    pub table_name: String,
    /// Columns read (a read) or touched (a failed change); names only.
    pub columns: Vec<String>,
    pub sqlstate: Option<String>,
    /// The error message and detail; encrypted by the writer.
    pub message: Option<String>,
    /// Subject values as text; each gets an event. None: one event of nobody's.
    pub subjects: Vec<Vec<u8>>,
}

/// One encoded piece of an entry, and how many events it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub bytes: Vec<u8>,
    pub events: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    Version(u8),
    NotUtf8,
    TrailingBytes,
}

/// Bytes kept of a free-text field (actor, reason, application name): a
/// session can set them to anything, and every part of an entry repeats them.
const MAX_TEXT: usize = 256;
/// Column names kept per entry.
const MAX_COLUMNS: usize = 32;

impl Entry {
    /// Whether `other` is the same event but for its subjects, so the two
    /// can travel as one entry.
    pub fn same_but_subjects(&self, other: &Entry) -> bool {
        self.failed == other.failed
            && self.admin == other.admin
            && self.rows.is_some() == other.rows.is_some()
            && self.who == other.who
            && self.operation == other.operation
            && self.title == other.title
            && self.table_name == other.table_name
            && self.columns == other.columns
            && self.sqlstate == other.sqlstate
            && self.message == other.message
    }

    /// Cuts the free-text fields and the column list to their limits, so
    /// the rest of an entry always fits a slot beside its subjects.
    fn bounded_head(&self) -> Entry {
        let cut = |s: &str| -> String {
            let mut end = s.len().min(MAX_TEXT);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_owned()
        };
        Entry {
            title: cut(&self.title),
            table_name: cut(&self.table_name),
            columns: self
                .columns
                .iter()
                .take(MAX_COLUMNS)
                .map(|c| cut(c))
                .collect(),
            sqlstate: self.sqlstate.as_deref().map(cut),
            who: StatementContext {
                actor: cut(&self.who.actor),
                db_role: cut(&self.who.db_role),
                session_role: cut(&self.who.session_role),
                application_name: self.who.application_name.as_deref().map(cut),
                client_addr: self.who.client_addr.as_deref().map(cut),
                reason: self.who.reason.as_deref().map(cut),
                ..self.who.clone()
            },
            failed: self.failed,
            admin: self.admin,
            operation: self.operation.clone(),
            rows: self.rows,
            message: self.message.clone(),
            subjects: Vec::new(),
        }
    }

    /// The title with the row count, if any: `select public.customers: 3 rows`.
    pub fn full_title(&self) -> String {
        match self.rows {
            None => self.title.clone(),
            Some(1) => format!("{}: 1 row", self.title),
            Some(n) => format!("{}: {n} rows", self.title),
        }
    }

    /// The encoding without the subjects, which `split` spreads over entries.
    fn encode_head(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        let flags = if self.failed { FAILED } else { 0 }
            | if self.rows.is_some() { ROWS } else { 0 }
            | if self.admin { ADMIN } else { 0 };
        out.push(flags);
        out.extend_from_slice(&self.who.at.to_le_bytes());
        if let Some(rows) = self.rows {
            put_varint(out, rows);
        }
        for s in [&self.operation, &self.title, &self.table_name] {
            put(out, Some(s.as_bytes()));
        }
        put_varint(out, self.columns.len() as u64);
        for c in &self.columns {
            put(out, Some(c.as_bytes()));
        }
        for s in [&self.sqlstate, &self.message] {
            put(out, s.as_deref().map(str::as_bytes));
        }
        let who = &self.who;
        for s in [&who.actor, &who.db_role, &who.session_role] {
            put(out, Some(s.as_bytes()));
        }
        for s in [&who.application_name, &who.client_addr, &who.reason] {
            put(out, s.as_deref().map(str::as_bytes));
        }
    }

    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.encode_head(&mut out);
        put_varint(&mut out, self.subjects.len() as u64);
        for s in &self.subjects {
            put(&mut out, Some(s));
        }
        out
    }

    /// Encodings of at most `limit` bytes each, together carrying every
    /// subject (a subject's event goes in exactly one of them). Text that
    /// cannot fit even alone is cut short: a message at a character
    /// boundary, a subject value never (it would be another person): such a
    /// value is left out, and counted in the second item.
    pub fn split(&self, limit: usize) -> (Vec<Part>, usize) {
        let mut entry = self.bounded_head();
        let mut head = Vec::new();
        entry.encode_head(&mut head);
        // Room for the subject count and at least one subject.
        while head.len() + 16 > limit / 2 {
            let Some(message) = entry.message.as_mut().filter(|m| !m.is_empty()) else {
                break;
            };
            let mut cut = message.len() / 2;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            head.clear();
            entry.encode_head(&mut head);
        }
        let mut out = Vec::new();
        let mut left_out = 0;
        let mut subjects: Vec<&[u8]> = Vec::new();
        let mut size = head.len() + 5;
        let finish = |subjects: &mut Vec<&[u8]>, out: &mut Vec<Part>| {
            let mut bytes = head.clone();
            put_varint(&mut bytes, subjects.len() as u64);
            // An entry without subjects is one event of nobody's.
            let events = subjects.len().max(1) as u64;
            for s in subjects.drain(..) {
                put(&mut bytes, Some(s));
            }
            out.push(Part { bytes, events });
        };
        for subject in &self.subjects {
            let cost = subject.len() + 10;
            if head.len() + 5 + cost > limit {
                left_out += 1;
                continue;
            }
            if size + cost > limit && !subjects.is_empty() {
                finish(&mut subjects, &mut out);
                size = head.len() + 5;
            }
            subjects.push(subject);
            size += cost;
        }
        if !subjects.is_empty() || out.is_empty() {
            finish(&mut subjects, &mut out);
        }
        (out, left_out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.byte()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let flags = r.byte()?;
        let failed = flags & FAILED != 0;
        let admin = flags & ADMIN != 0;
        let at = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let rows = if flags & ROWS != 0 {
            Some(r.varint()?)
        } else {
            None
        };
        let operation = r.string()?.unwrap_or_default();
        let title = r.string()?.unwrap_or_default();
        let table_name = r.string()?.unwrap_or_default();
        let columns = (0..r.count()?)
            .map(|_| r.string().map(Option::unwrap_or_default))
            .collect::<Result<_, _>>()?;
        let sqlstate = r.string()?;
        let message = r.string()?;
        let who = StatementContext {
            at,
            txid: 0,
            actor: r.string()?.unwrap_or_default(),
            db_role: r.string()?.unwrap_or_default(),
            session_role: r.string()?.unwrap_or_default(),
            application_name: r.string()?,
            client_addr: r.string()?,
            reason: r.string()?,
        };
        let subjects = (0..r.count()?)
            .map(|_| r.bytes().map(|b| b.unwrap_or_default().to_vec()))
            .collect::<Result<_, _>>()?;
        if r.at != bytes.len() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(Entry {
            failed,
            admin,
            who,
            operation,
            title,
            rows,
            table_name,
            columns,
            sqlstate,
            message,
            subjects,
        })
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        None => put_varint(out, 0),
        Some(s) => {
            put_varint(out, s.len() as u64 + 1);
            out.extend_from_slice(s);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Truncated)
    }

    /// A count of items that each take at least one byte.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.varint()? {
            0 => Ok(None),
            n => {
                let len = usize::try_from(n - 1).map_err(|_| DecodeError::Truncated)?;
                self.take(len).map(Some)
            }
        }
    }

    fn string(&mut self) -> Result<Option<String>, DecodeError> {
        self.bytes()?
            .map(|b| {
                std::str::from_utf8(b)
                    .map(str::to_owned)
                    .map_err(|_| DecodeError::NotUtf8)
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fuzz, no_panic};

    fn sample() -> Entry {
        Entry {
            failed: true,
            admin: false,
            who: StatementContext {
                at: 123_456_789,
                txid: 0,
                actor: "support:7".into(),
                db_role: "app".into(),
                session_role: "app".into(),
                application_name: None,
                client_addr: Some("10.0.0.7".into()),
                reason: Some("ticket #1".into()),
            },
            operation: "INSERT".into(),
            title: "insert public.customers".into(),
            rows: None,
            table_name: "public.customers".into(),
            columns: vec!["email".into(), "name".into()],
            sqlstate: Some("23505".into()),
            message: Some("duplicate key value violates unique constraint \"c_email_key\"\nDETAIL: Key (email)=(ann@example.com) already exists.".into()),
            subjects: vec![b"c-1".to_vec(), b"c-2".to_vec()],
        }
    }

    #[test]
    fn round_trip() {
        let entry = sample();
        assert_eq!(Entry::decode(&entry.encode()), Ok(entry));
        let empty = Entry::default();
        assert_eq!(Entry::decode(&empty.encode()), Ok(empty));
        let counted = Entry {
            rows: Some(300),
            ..sample()
        };
        assert_eq!(Entry::decode(&counted.encode()), Ok(counted.clone()));
        let unlock = Entry {
            admin: true,
            operation: "UNLOCK".into(),
            title: "unlock key 1 (unlock())".into(),
            ..Entry::default()
        };
        assert_eq!(Entry::decode(&unlock.encode()), Ok(unlock));
        assert_eq!(counted.full_title(), "insert public.customers: 300 rows");
    }

    #[test]
    fn rejects_truncated_and_trailing() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Entry::decode(&longer), Err(DecodeError::TrailingBytes));
        let mut other = bytes;
        other[0] = 9;
        assert_eq!(Entry::decode(&other), Err(DecodeError::Version(9)));
    }

    #[test]
    fn split_carries_every_subject_once_within_the_limit() {
        let mut entry = sample();
        entry.subjects = (0..1000)
            .map(|i| format!("subject-{i}").into_bytes())
            .collect();
        let (parts, left_out) = entry.split(1024);
        assert_eq!(left_out, 0);
        assert!(parts.len() > 1);
        let mut seen = Vec::new();
        for part in &parts {
            assert!(part.bytes.len() <= 1024, "{} bytes", part.bytes.len());
            let decoded = Entry::decode(&part.bytes).expect("decodes");
            assert_eq!(part.events, decoded.subjects.len() as u64);
            assert_eq!(decoded.message, entry.message);
            assert_eq!(decoded.columns, entry.columns);
            seen.extend(decoded.subjects);
        }
        assert_eq!(seen, entry.subjects);
    }

    #[test]
    fn split_cuts_a_long_message_at_a_character_boundary() {
        let mut entry = sample();
        entry.message = Some("é".repeat(5000));
        let (parts, _) = entry.split(1024);
        assert_eq!(parts.len(), 1);
        let decoded = Entry::decode(&parts[0].bytes).expect("decodes");
        let message = decoded.message.expect("message kept");
        assert!(!message.is_empty() && message.len() < 1024);
        assert!(message.chars().all(|c| c == 'é'));
        assert_eq!(decoded.subjects, entry.subjects);
    }

    #[test]
    fn split_without_subjects_gives_one_entry() {
        let mut entry = sample();
        entry.subjects.clear();
        let (parts, _) = entry.split(4096);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].events, 1);
        assert_eq!(Entry::decode(&parts[0].bytes), Ok(entry));
    }

    #[test]
    fn split_leaves_out_a_subject_too_large_for_any_slot() {
        let mut entry = sample();
        entry.subjects = vec![vec![b'x'; 5000], b"c-1".to_vec()];
        let (parts, left_out) = entry.split(1024);
        assert_eq!(left_out, 1);
        let decoded: Vec<_> = parts
            .iter()
            .flat_map(|p| Entry::decode(&p.bytes).expect("decodes").subjects)
            .collect();
        assert_eq!(decoded, vec![b"c-1".to_vec()]);
    }

    #[test]
    fn fuzz_entry_split_and_decode() {
        fuzz("entry_split_and_decode", 2_000, |rng| {
            let mut entry = sample();
            entry.message = Some("ü".repeat(rng.below(3000)));
            entry.subjects = (0..rng.below(300))
                .map(|_| {
                    let len = rng.below(200);
                    rng.bytes(len)
                })
                .collect();
            let limit = rng.range(512, 8192);
            let (parts, left_out) = no_panic(&limit, || entry.split(limit));
            let mut seen = 0;
            for part in &parts {
                assert!(part.bytes.len() <= limit);
                let mut mutated = part.bytes.clone();
                rng.mutate(&mut mutated);
                let _ = no_panic(&mutated, || Entry::decode(&mutated));
                seen += Entry::decode(&part.bytes).expect("decodes").subjects.len();
            }
            assert_eq!(seen + left_out, entry.subjects.len());
        });
    }

    #[test]
    fn split_bounds_whatever_a_session_can_set() {
        let mut entry = sample();
        entry.who.reason = Some("r".repeat(100_000));
        entry.who.actor = "a".repeat(100_000);
        entry.columns = (0..5000).map(|i| format!("column_{i}")).collect();
        let (parts, left_out) = entry.split(4096);
        assert_eq!(left_out, 0);
        let decoded: Vec<Entry> = parts
            .iter()
            .map(|p| Entry::decode(&p.bytes).expect("decodes"))
            .collect();
        assert!(parts.iter().all(|p| p.bytes.len() <= 4096));
        assert_eq!(
            decoded[0].who.reason.as_deref().map(str::len),
            Some(MAX_TEXT)
        );
        assert_eq!(decoded[0].columns.len(), MAX_COLUMNS);
        let subjects: usize = decoded.iter().map(|e| e.subjects.len()).sum();
        assert_eq!(subjects, entry.subjects.len());
    }

    #[test]
    fn same_but_subjects_ignores_only_the_subjects() {
        let a = sample();
        let mut b = sample();
        b.subjects = vec![b"c-9".to_vec()];
        assert!(a.same_but_subjects(&b));
        b.admin = true;
        assert!(!a.same_but_subjects(&b));
        b.admin = false;
        b.title.push('x');
        assert!(!a.same_but_subjects(&b));
    }
}
