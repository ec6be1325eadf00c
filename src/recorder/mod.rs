//! Writes events: resolves subject keys in one batch, encrypts each payload
//! under its subject's key, hashes every stored field for the ledger and
//! inserts the rows in batches. Capture, reads of the trail and admin
//! actions all record through here.

mod context;
mod inserter;
mod labels;

pub use context::StatementContext;
#[cfg(any(test, feature = "pg_test"))]
pub use labels::{forget_remembered, label_id};

use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::pg_sys::Datum;
use pgrx::PgSqlErrorCode::*;
use zeroize::Zeroizing;

use crate::crypto::{self, DataKey, DIGEST_LEN, NONCE_LEN};
use crate::envelope::{self, Binding};
use crate::integrity::{row_hash, EventFields, LabelFields};
use crate::keyring;
use crate::store::{self, error::raise, error::raise_with_hint};
use inserter::{text_datum, EventInserter, EVENT_COLUMNS};

unsafe extern "C-unwind" {
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// Registers the recorder's settings and cache callbacks.
pub fn init() {
    context::init();
    labels::init();
}

/// Whose event it is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Subject {
    /// Nobody's (admin events, rows whose subject is NULL): never with a
    /// payload, as no erasure could destroy the key of values of nobody's.
    Nobody,
    /// The subject with this keyed digest; its live key is used (or created).
    Digest([u8; DIGEST_LEN]),
    /// A subject key by id (and its digest), for events that carry no
    /// payload (e.g. its erasure).
    Key(i64, [u8; DIGEST_LEN]),
}

/// One event to record, its payload not yet encrypted.
pub struct Draft {
    pub subject: Subject,
    /// `changed_columns`; drafts alike share one list.
    pub columns: Option<Rc<[String]>>,
    pub payload: Option<Zeroizing<Vec<u8>>>,
}

/// What the events of one `record` call have in common.
pub struct Header<'a> {
    pub operation: &'a str,
    pub status: &'a str,
    /// The SQLSTATE of a failed operation (status `error`).
    pub sqlstate: Option<&'a str>,
    pub title: Option<&'a str>,
    pub table_name: Option<&'a str>,
}

/// A `changed_columns` list shared by drafts alike (or none), with what
/// the events that share it have in common.
struct ColumnSet<'a> {
    shared: Option<&'a Rc<[String]>>,
    names: Option<Vec<&'a str>>,
    /// `metadata_digest` of the events that share this list.
    metadata: [u8; 32],
    label_id: i32,
}

impl<'a> ColumnSet<'a> {
    fn new(
        header: &'a Header<'a>,
        statement: &'a StatementContext,
        shared: Option<&'a Rc<[String]>>,
    ) -> Self {
        let names: Option<Vec<&str>> = shared.map(|cols| cols.iter().map(String::as_str).collect());
        let label = label_fields(header, statement, names.as_deref());
        ColumnSet {
            shared,
            metadata: envelope::metadata_digest(
                header.operation,
                header.table_name,
                names.as_deref(),
            ),
            label_id: labels::label_id(&label),
            names,
        }
    }

    fn holds(&self, columns: Option<&Rc<[String]>>) -> bool {
        match (self.shared, columns) {
            (Some(a), Some(b)) => Rc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

fn label_fields<'a>(
    header: &'a Header<'a>,
    statement: &'a StatementContext,
    changed_columns: Option<&'a [&'a str]>,
) -> LabelFields<'a> {
    LabelFields {
        operation: header.operation,
        status: header.status,
        sqlstate: header.sqlstate,
        table_name: header.table_name,
        actor: &statement.actor,
        db_role: &statement.db_role,
        session_role: &statement.session_role,
        application_name: statement.application_name.as_deref(),
        client_addr: statement.client_addr.as_deref(),
        changed_columns,
    }
}

/// Records `drafts`, returns their event ids in order.
pub fn record(header: &Header<'_>, statement: &StatementContext, drafts: &[Draft]) -> Vec<i64> {
    record_groups(&[Group {
        header,
        statement,
        drafts,
    }])
}

/// Events of one statement: what they share, and the drafts.
pub struct Group<'a> {
    pub header: &'a Header<'a>,
    pub statement: &'a StatementContext,
    pub drafts: &'a [Draft],
}

/// Records several statements' events in one pass (one key lookup, one
/// inserter), as the background writer does; returns the event ids in order.
pub fn record_groups(groups: &[Group<'_>]) -> Vec<i64> {
    unsafe { record_unchecked(groups) }
}

thread_local! {
    static LEDGER_HORIZON_CHECKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Once per backend: the sealed ledger must lie behind this cluster's
/// transaction counter. It always does, unless the database was restored
/// into another cluster whose counter is behind: new events would then fall
/// into sealed blocks and break verification, so nothing is written until
/// the counter is advanced (docs/ledger.md).
fn check_ledger_horizon(txid: u64) {
    if LEDGER_HORIZON_CHECKED.with(std::cell::Cell::get) {
        return;
    }
    let sealed_to = store::as_owner(|| {
        store::select_one::<i64>(
            "SELECT pg_catalog.max(to_txid) FROM subject_audit.block",
            &[],
        )
    });
    if let Ok(Some(sealed_to)) = sealed_to {
        if (txid as i64) < sealed_to {
            raise_with_hint(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the audit ledger is sealed up to transaction {sealed_to}, but this cluster is at transaction {txid}: was this database restored into another cluster?"),
                "advance the cluster's transaction counter past the ledger (pg_resetwal -x, see docs/ledger.md) before writing",
            );
        }
    }
    LEDGER_HORIZON_CHECKED.with(|c| c.set(true));
}

unsafe fn record_unchecked(groups: &[Group<'_>]) -> Vec<i64> {
    let Some(first) = groups.first() else {
        return Vec::new();
    };
    check_ledger_horizon(first.statement.txid);
    let all_drafts = || groups.iter().flat_map(|g| g.drafts.iter());
    let count = all_drafts().count();
    let encrypted = all_drafts().any(|d| d.payload.is_some());
    let writer = encrypted.then(keyring::writer_context);
    let digests: Vec<[u8; DIGEST_LEN]> = all_drafts()
        .filter_map(|d| match d.subject {
            Subject::Digest(digest) => Some(digest),
            _ => None,
        })
        .collect();
    let subject_keys = keyring::subject_keys(&digests);
    let mut nonces = Zeroizing::new(vec![0u8; NONCE_LEN * count]);
    crypto::fill_random(&mut nonces)
        .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));
    let mut nonces = nonces.chunks_exact(NONCE_LEN);

    // Labels first: finding or adding one runs queries, which must not
    // interleave with the inserter's batches.
    let column_sets: Vec<(Vec<ColumnSet<'_>>, Vec<usize>)> = groups
        .iter()
        .map(|group| {
            let mut sets: Vec<ColumnSet<'_>> = Vec::new();
            // Drafts alike mostly come in runs sharing one list; lists equal
            // in content are one set all the same.
            let mut by_content: HashMap<Option<&[String]>, usize> = HashMap::new();
            let mut last: Option<usize> = None;
            let of_draft = group
                .drafts
                .iter()
                .map(|draft| {
                    let columns = draft.columns.as_ref();
                    if let Some(i) = last.filter(|&i| sets[i].holds(columns)) {
                        return i;
                    }
                    let i = *by_content
                        .entry(columns.map(|c| &c[..]))
                        .or_insert_with(|| {
                            sets.push(ColumnSet::new(group.header, group.statement, columns));
                            sets.len() - 1
                        });
                    last = Some(i);
                    i
                })
                .collect();
            (sets, of_draft)
        })
        .collect();

    let relations = store::relations();
    let mut inserter = EventInserter::open(relations.event, count);
    // Boxed: a DataKey is large, and the map must not move them around as it grows.
    let mut data_keys: HashMap<i64, Box<DataKey>> = HashMap::with_capacity(subject_keys.len());
    let mut event_ids = Vec::with_capacity(count);
    for (group, (sets, of_draft)) in groups.iter().zip(&column_sets) {
        let (header, statement) = (group.header, group.statement);
        // Values shared by every event of the group, as datums built once.
        let shared = [
            Some(Datum::from(statement.at)),
            Some(Datum::from(statement.txid)),
        ];
        // An empty title stands for none (the default) in the table: so in the hash.
        let title = header.title.filter(|t| !t.is_empty());
        let title_datum = text_datum(title.unwrap_or_default().as_bytes());
        for ((draft, set), nonce) in group.drafts.iter().zip(of_draft).zip(&mut nonces) {
            let set = &sets[*set];
            let event_id = pg_sys::ffi::pg_guard_ffi_boundary(|| {
                nextval_internal(relations.event_id_seq, false)
            });
            event_ids.push(event_id);
            let subject_key = match draft.subject {
                Subject::Digest(digest) => Some(&subject_keys[&digest]),
                Subject::Nobody | Subject::Key(..) => None,
            };
            let (subject_key_id, subject_digest) = match &draft.subject {
                Subject::Nobody => (None, None),
                Subject::Digest(digest) => {
                    (subject_key.map(|k| k.subject_key_id), Some(&digest[..]))
                }
                Subject::Key(id, digest) => (Some(*id), Some(&digest[..])),
            };
            let nonce: &[u8; NONCE_LEN] = nonce.try_into().expect("chunks_exact");
            let sealed = match (&draft.payload, &writer) {
                (Some(payload), Some(writer)) => {
                    let key: &DataKey = match subject_key {
                        Some(k) => data_keys
                            .entry(k.subject_key_id)
                            .or_insert_with(|| Box::new(writer.sender.data_key(&k.salt[..]))),
                        None => raise(
                            ERRCODE_INTERNAL_ERROR,
                            "an event of nobody's, or for a subject key by id, carries no payload",
                        ),
                    };
                    let binding = Binding {
                        event_id,
                        subject_key_id,
                        subject_digest,
                        context_id: writer.context_id,
                        metadata: set.metadata,
                    };
                    let ciphertext = envelope::seal_event(key, nonce, &binding, payload)
                        .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));
                    Some((writer.context_id, ciphertext))
                }
                _ => None,
            };
            let label = label_fields(header, statement, set.names.as_deref());
            let hash = row_hash(&EventFields {
                event_id,
                at: statement.at,
                txid: statement.txid,
                label: &label,
                title,
                subject_key_id,
                subject_digest,
                context_id: sealed.as_ref().map(|s| s.0),
                nonce: sealed.as_ref().map(|_| &nonce[..]),
                payload: sealed.as_ref().map(|s| &s.1[..]),
            });
            inserter.insert(|| {
                let mut values: [Option<Datum>; EVENT_COLUMNS] = [None; EVENT_COLUMNS];
                values[0] = Some(Datum::from(event_id));
                values[1..3].copy_from_slice(&shared);
                values[3] = subject_key_id.map(Datum::from);
                values[5] = Some(Datum::from(set.label_id));
                values[6] = Some(title_datum);
                if let Some((context_id, ciphertext)) = &sealed {
                    values[4] = Some(Datum::from(*context_id));
                    values[7] = Some(text_datum(nonce));
                    values[8] = Some(text_datum(ciphertext));
                }
                values[9] = Some(text_datum(&hash));
                values
            });
        }
    }
    inserter.close();
    event_ids
}
