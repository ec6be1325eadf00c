//! Per-event hashes for the tamper-evident ledger. Each event's hash covers
//! every stored field and is computed at insert from the event alone: no other
//! row is read, so writers never wait on each other.

use crate::crypto::sha256;

/// The stored fields of one event, in table order, as the ledger hashes them.
pub struct EventFields<'a> {
    pub event_id: i64,
    /// Microseconds since 2000-01-01 UTC (PostgreSQL's timestamptz).
    pub at: i64,
    pub txid: u64,
    pub operation: &'a str,
    pub status: &'a str,
    pub sqlstate: Option<&'a str>,
    pub title: Option<&'a str>,
    pub table_name: Option<&'a str>,
    pub actor: &'a str,
    pub db_role: &'a str,
    pub session_role: &'a str,
    pub application_name: Option<&'a str>,
    pub client_addr: Option<&'a str>,
    pub changed_columns: Option<&'a [&'a str]>,
    pub subject_key_id: Option<i64>,
    pub context_id: Option<i64>,
    pub nonce: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// SHA-256 over an unambiguous encoding: every field is tagged present or
/// NULL and length-prefixed, so no two different rows encode alike.
pub fn row_hash(f: &EventFields<'_>) -> [u8; 32] {
    let mut buf = Vec::with_capacity(256 + f.payload.map_or(0, <[u8]>::len));
    buf.extend_from_slice(b"pg_subject_audit event v1");
    buf.extend_from_slice(&f.event_id.to_be_bytes());
    buf.extend_from_slice(&f.at.to_be_bytes());
    buf.extend_from_slice(&f.txid.to_be_bytes());
    for s in [
        Some(f.operation),
        Some(f.status),
        f.sqlstate,
        f.title,
        f.table_name,
        Some(f.actor),
    ] {
        put_opt(&mut buf, s.map(str::as_bytes));
    }
    for s in [
        Some(f.db_role),
        Some(f.session_role),
        f.application_name,
        f.client_addr,
    ] {
        put_opt(&mut buf, s.map(str::as_bytes));
    }
    match f.changed_columns {
        None => buf.push(0),
        Some(cols) => {
            buf.push(1);
            buf.extend_from_slice(&(cols.len() as u32).to_be_bytes());
            for c in cols {
                put_opt(&mut buf, Some(c.as_bytes()));
            }
        }
    }
    for id in [f.subject_key_id, f.context_id] {
        put_opt(&mut buf, id.map(i64::to_be_bytes).as_ref().map(|b| &b[..]));
    }
    put_opt(&mut buf, f.nonce);
    put_opt(&mut buf, f.payload);
    sha256(&[&buf])
}

fn put_opt(buf: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => buf.push(0),
        Some(bytes) => {
            buf.push(1);
            buf.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            buf.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> EventFields<'static> {
        EventFields {
            event_id: 1,
            at: 0,
            txid: 700,
            operation: "UPDATE",
            status: "ok",
            sqlstate: None,
            title: None,
            table_name: Some("public.customers"),
            actor: "app",
            db_role: "app",
            session_role: "app",
            application_name: Some("psql"),
            client_addr: None,
            changed_columns: Some(&["email"]),
            subject_key_id: Some(1),
            context_id: Some(1),
            nonce: Some(&[0; 12]),
            payload: Some(b"ct"),
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let h = row_hash(&base());
        type Change = Box<dyn Fn(&mut EventFields<'static>)>;
        let variants: Vec<Change> = vec![
            Box::new(|f| f.event_id = 2),
            Box::new(|f| f.at = 1),
            Box::new(|f| f.txid = 701),
            Box::new(|f| f.operation = "DELETE"),
            Box::new(|f| f.status = "error"),
            Box::new(|f| f.sqlstate = Some("23505")),
            Box::new(|f| f.title = Some("x")),
            Box::new(|f| f.table_name = None),
            Box::new(|f| f.actor = "bob"),
            Box::new(|f| f.db_role = "bob"),
            Box::new(|f| f.session_role = "bob"),
            Box::new(|f| f.application_name = None),
            Box::new(|f| f.client_addr = Some("127.0.0.1")),
            Box::new(|f| f.changed_columns = Some(&["phone"])),
            Box::new(|f| f.changed_columns = None),
            Box::new(|f| f.subject_key_id = Some(2)),
            Box::new(|f| f.context_id = None),
            Box::new(|f| f.nonce = Some(&[1; 12])),
            Box::new(|f| f.payload = Some(b"cu")),
        ];
        for change in variants {
            let mut f = base();
            change(&mut f);
            assert_ne!(row_hash(&f), h);
        }
        assert_eq!(row_hash(&base()), h);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = base();
        a.actor = "ab";
        a.db_role = "c";
        let mut b = base();
        b.actor = "a";
        b.db_role = "bc";
        assert_ne!(row_hash(&a), row_hash(&b));
    }
}
