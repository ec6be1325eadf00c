//! Reading a subject's trail: find its events by keyed digest, decrypt each
//! under the session's keys, and shape it for SQL. Only this subject's rows
//! are fetched and decrypted.

use pgrx::datum::ToIsoString;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{PgBuiltInOids, PgOid};
use std::collections::HashMap;

use serde_json::{Map, Value as Json};

use crate::crypto::DataKey;
use crate::envelope::{self, Binding, Payload, Value};
use crate::keyring::{self, KeyNotUnlocked};
use crate::store::{self, error::raise, error::raise_with_hint};

pub struct DecryptedEvent {
    pub event_id: i64,
    pub at: TimestampWithTimeZone,
    pub operation: String,
    pub title: String,
    pub status: String,
    pub sqlstate: Option<String>,
    pub actor: String,
    pub db_role: String,
    pub session_role: String,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub txid: i64,
    pub table_name: Option<String>,
    pub changed_columns: Vec<String>,
    /// `None` once the subject was erased, or for events that never had one.
    pub payload: Option<Payload>,
    /// It had a payload, and the subject's erasure destroyed its key.
    pub erased: bool,
    /// Its ciphertext failed authentication (tampered with, or moved from
    /// another event): its payload is not shown, the rest of the trail is.
    pub unauthenticated: bool,
}

impl DecryptedEvent {
    /// A sentence: `changed email, phone — ticket #4711`.
    pub fn description(&self) -> String {
        if self.unauthenticated {
            return UNAUTHENTICATED.into();
        }
        let note = self.payload.as_ref().and_then(|p| p.note.as_deref());
        let what = match (self.operation.as_str(), note) {
            // A failed statement: the note is its error message.
            (_, Some(note)) if self.status == "error" => format!("failed: {note}"),
            (_, Some(note)) => note.to_owned(),
            (_, None) if self.status == "error" => "failed".into(),
            ("READ", _) if self.table_name.is_some() && !self.changed_columns.is_empty() => {
                format!("read {}", self.changed_columns.join(", "))
            }
            ("INSERT", _) => format!("created {}", self.changed_columns.join(", ")),
            ("UPDATE", _) => match self.moved() {
                Some(Moved::Left) => format!(
                    "row passed to another subject or to nobody; it held {}",
                    self.changed_columns.join(", ")
                ),
                Some(Moved::Came) => format!(
                    "row came to this subject; it holds {}",
                    self.changed_columns.join(", ")
                ),
                None => format!("changed {}", self.changed_columns.join(", ")),
            },
            ("DELETE", _) => format!("deleted {}", self.changed_columns.join(", ")),
            ("TRUNCATE", _) => format!(
                "deleted {} (table truncated)",
                self.changed_columns.join(", ")
            ),
            ("ERASE", _) => "erased: the personal values of this subject's earlier events can no longer be decrypted".into(),
            ("READ", _) => self.title.clone(),
            (other, _) => other.to_lowercase(),
        };
        match self.payload.as_ref().and_then(|p| p.reason.as_deref()) {
            Some(reason) => format!("{what} — {reason}"),
            None => what,
        }
    }

    /// Whether this UPDATE changed the row's subject, seen from this subject:
    /// its payload then holds only the row as it left, or as it came. Known
    /// only while the payload can be read.
    fn moved(&self) -> Option<Moved> {
        let columns = &self.payload.as_ref()?.columns;
        if columns.is_empty() {
            None
        } else if columns.iter().all(|c| c.after == Value::Absent) {
            Some(Moved::Left)
        } else if columns.iter().all(|c| c.before == Value::Absent) {
            Some(Moved::Came)
        } else {
            None
        }
    }

    /// The row before and after as JSON objects (only the recorded columns).
    pub fn images(&self) -> (Option<Json>, Option<Json>) {
        let Some(payload) = &self.payload else {
            return (None, None);
        };
        if payload.columns.is_empty() {
            return (None, None);
        }
        let mut before = Map::new();
        let mut after = Map::new();
        for (name, column) in self.changed_columns.iter().zip(&payload.columns) {
            for (image, value) in [(&mut before, &column.before), (&mut after, &column.after)] {
                if let Some(v) = json_value(value, column.json) {
                    image.insert(name.clone(), v);
                }
            }
        }
        let object = |m: Map<String, Json>| (!m.is_empty()).then_some(Json::Object(m));
        // An UPDATE that changed the row's subject holds one side only (the
        // row as it left one subject, or as it came to the other).
        (object(before), object(after))
    }

    /// The event as an object of the export document (`docs/export.md`).
    pub fn to_export_json(&self) -> Json {
        let (before, after) = self.images();
        serde_json::json!({
            "event_id": self.event_id,
            "at": self.at.to_iso_string(),
            "operation": self.operation,
            "title": self.title,
            "status": self.status,
            "sqlstate": self.sqlstate,
            "description": self.description(),
            "actor": self.actor,
            "database_role": self.db_role,
            "session_role": self.session_role,
            "application_name": self.application_name,
            "client_address": self.client_addr,
            "transaction_id": self.txid,
            "table_name": self.table_name,
            "changed_columns": self.changed_columns,
            "before": before,
            "after": after,
            "erased": self.erased,
            "authenticated": !self.unauthenticated,
        })
    }
}

/// Which way a row went in an UPDATE that changed its subject.
enum Moved {
    Left,
    Came,
}

/// What an event whose ciphertext fails authentication says instead.
const UNAUTHENTICATED: &str = "could not be authenticated: its ciphertext does not belong to this event and subject (altered or moved; see subject_audit.verify())";

/// The export document of one subject: `docs/export.md` documents its schema.
pub fn export_document(token: &str, events: &[DecryptedEvent]) -> Json {
    let digest = keyring::subject_digest(token.as_bytes());
    let generated_at = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let generated_at = unsafe { TimestampWithTimeZone::from_datum(generated_at.into(), false) }
        .map(|t| t.to_iso_string());
    serde_json::json!({
        "format": "pg_subject_audit export",
        "format_version": EXPORT_FORMAT_VERSION,
        "generated_at": generated_at,
        "subject": {
            "token": token,
            "subject_ref": subject_ref(&digest),
        },
        "event_count": events.len(),
        "events": events.iter().map(DecryptedEvent::to_export_json).collect::<Vec<_>>(),
    })
}

/// Version of the export document's schema; bumped on any incompatible change.
pub const EXPORT_FORMAT_VERSION: i32 = 1;

/// The short pseudonymous reference the `events` view shows: the first 48
/// bits of the keyed digest, in hex.
pub fn subject_ref(digest: &[u8]) -> String {
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn json_value(value: &Value<String>, json: bool) -> Option<Json> {
    match value {
        Value::Absent => None,
        Value::Null => Some(Json::Null),
        Value::Text(t) if json => {
            Some(serde_json::from_str(t).unwrap_or_else(|_| Json::String(t.clone())))
        }
        Value::Text(t) => Some(Json::String(t.clone())),
    }
}

/// A subject's events (`$1`: its digest), with a condition of their own.
macro_rules! subject_events_where {
    ($condition:literal) => {
        concat!(
            "SELECT e.event_id, e.at, l.operation, \
     CASE WHEN e.title OPERATOR(pg_catalog.<>) '' THEN e.title \
     ELSE pg_catalog.lower(l.operation) OPERATOR(pg_catalog.||) ' ' OPERATOR(pg_catalog.||) l.table_name END, \
     l.status, l.actor, l.table_name, l.changed_columns, e.subject_key_id, e.context_id, \
     e.nonce, e.payload, k.salt, c.key_id, c.encapsulated_key, \
     l.sqlstate, l.db_role, l.session_role, l.application_name, pg_catalog.host(l.client_addr), e.txid, \
     l.label_id \
     FROM subject_audit.subject_key k \
     JOIN subject_audit.event e ON e.subject_key_id OPERATOR(pg_catalog.=) k.subject_key_id \
     LEFT JOIN subject_audit.event_label l ON l.label_id OPERATOR(pg_catalog.=) e.label_id \
     LEFT JOIN subject_audit.writer_context c ON c.context_id OPERATOR(pg_catalog.=) e.context_id \
     WHERE k.subject_digest OPERATOR(pg_catalog.=) $1",
            $condition,
            " ORDER BY e.event_id"
        )
    };
}
/// Kept plans are generic: one query for all events, one for one event (`$2`).
const SUBJECT_EVENTS: &str = subject_events_where!("");
const SUBJECT_EVENT: &str = subject_events_where!(" AND e.event_id OPERATOR(pg_catalog.=) $2");

/// Every event of the subject `token`, oldest first (or just `only_event`).
pub fn subject_events(token: &str, only_event: Option<i64>) -> Vec<DecryptedEvent> {
    keyring::ensure_unlocked();
    let digest = keyring::subject_digest(token.as_bytes());
    store::as_owner(|| {
        Spi::connect(|client| {
            // Kept: planning this join cost as much as running it.
            let bytea = PgOid::BuiltIn(PgBuiltInOids::BYTEAOID);
            let rows = match only_event {
                None => {
                    let plan = store::prepared(client, SUBJECT_EVENTS, &[bytea]);
                    client.select(&*plan, None, &[digest.to_vec().into()])?
                }
                Some(event_id) => {
                    let int8 = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
                    let plan = store::prepared(client, SUBJECT_EVENT, &[bytea, int8]);
                    client.select(&*plan, None, &[digest.to_vec().into(), event_id.into()])?
                }
            };
            let mut events = Vec::with_capacity(rows.len());
            let mut keys = DataKeys::new();
            for row in rows {
                let mut event = DecryptedEvent {
                    event_id: row.get(1)?.unwrap_or_default(),
                    at: row.get(2)?.expect("event.at is NOT NULL"),
                    operation: row.get(3)?.unwrap_or_default(),
                    title: row.get(4)?.unwrap_or_default(),
                    status: row.get(5)?.unwrap_or_default(),
                    sqlstate: row.get(16)?,
                    actor: row.get(6)?.unwrap_or_default(),
                    db_role: row.get(17)?.unwrap_or_default(),
                    session_role: row.get(18)?.unwrap_or_default(),
                    application_name: row.get(19)?,
                    client_addr: row.get(20)?,
                    txid: row.get(21)?.unwrap_or_default(),
                    table_name: row.get(7)?,
                    changed_columns: row.get(8)?.unwrap_or_default(),
                    payload: None,
                    erased: false,
                    unauthenticated: false,
                };
                if row.get::<i32>(22)?.is_none() {
                    raise(
                        ERRCODE_DATA_CORRUPTED,
                        format!("event {}: its label is missing from subject_audit.event_label (see subject_audit.verify())", event.event_id),
                    );
                }
                let ciphertext = row.get::<Vec<u8>>(12)?;
                // An erased subject key has no salt: its payloads are gone for good.
                let salt = row.get::<Vec<u8>>(13)?;
                event.erased = ciphertext.is_some() && salt.is_none();
                if let (Some(salt), Some(ciphertext)) = (salt, ciphertext) {
                    let stored = StoredCiphertext {
                        subject_key_id: row.get(9)?,
                        context_id: row.get(10)?,
                        key_id: row.get(14)?,
                        encapsulated_key: row.get::<Vec<u8>>(15)?.unwrap_or_default(),
                        nonce: row.get::<Vec<u8>>(11)?.unwrap_or_default(),
                        ciphertext,
                    };
                    match decrypt(&event, &stored, &digest, &salt, &mut keys) {
                        Some(payload) => event.payload = Some(payload),
                        // One bad event must not hide the rest of the trail.
                        None => {
                            pgrx::warning!(
                                "event {} could not be authenticated: its values are not shown",
                                event.event_id
                            );
                            event.unauthenticated = true;
                        }
                    }
                }
                events.push(event);
            }
            Ok::<_, pgrx::spi::SpiError>(events)
        })
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not read the audit trail: {e}"),
        )
    })
}

/// What an event row stores about its ciphertext.
struct StoredCiphertext {
    subject_key_id: Option<i64>,
    context_id: Option<i64>,
    key_id: Option<i32>,
    encapsulated_key: Vec<u8>,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// Data keys derived during one read, by writer context and subject key: a
/// subject's events from one writer share a key, derived once.
type DataKeys = HashMap<(i64, Option<i64>), Box<DataKey>>;

fn decrypt(
    event: &DecryptedEvent,
    stored: &StoredCiphertext,
    digest: &[u8],
    salt: &[u8],
    keys: &mut DataKeys,
) -> Option<Payload> {
    let event_id = event.event_id;
    // No context to derive a key from: as unauthenticated as a bad tag.
    let (Some(context_id), Some(key_id)) = (stored.context_id, stored.key_id) else {
        return None;
    };
    let key = keys.entry((context_id, stored.subject_key_id)).or_insert_with(|| {
        let key = keyring::reader_data_key(context_id, key_id, &stored.encapsulated_key, salt)
            .unwrap_or_else(|KeyNotUnlocked(key_id)| {
                raise_with_hint(
                    ERRCODE_INSUFFICIENT_PRIVILEGE,
                    format!("event {event_id} is encrypted under key {key_id}, which this session has not unlocked"),
                    "unlock that key's private key too: subject_audit.unlock() accepts several keys",
                )
            });
        Box::new(key)
    });
    let columns: Vec<&str> = event.changed_columns.iter().map(String::as_str).collect();
    let binding = Binding {
        event_id,
        subject_key_id: stored.subject_key_id,
        subject_digest: Some(digest),
        context_id,
        metadata: envelope::metadata_digest(
            &event.operation,
            event.table_name.as_deref(),
            Some(&columns),
        ),
    };
    envelope::open_event(key, &stored.nonce, &binding, &stored.ciphertext).ok()
}
