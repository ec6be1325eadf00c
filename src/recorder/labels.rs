//! Event labels: each distinct combination of what events say about
//! themselves (operation, table, who, which columns) is stored once in
//! `subject_audit.event_label`, and events name it by id.
//!
//! A backend remembers the labels it has used. Labels are never changed or
//! deleted, so a committed one stays valid; one this transaction added is
//! forgotten if the transaction (or the savepoint that added it) rolls back.
//! A label is only looked up with all its fields (not just its digest): a
//! label altered by hand is not picked up again (though a backend that
//! already holds its id keeps using it; verify() reports both). Two backends adding the
//! same label at once store it twice, which is harmless: events are hashed
//! over the label's fields, not its id.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{PgBuiltInOids, PgOid};

use crate::integrity::{label_digest, LabelFields};
use crate::store::{self, error::raise};

/// Past this many remembered labels the backend starts over (a workload with
/// ever new labels: client addresses, column combinations).
const MAX_REMEMBERED: usize = 10_000;

#[derive(Default)]
struct Labels {
    /// The `event_label` table the ids belong to: another one after the
    /// extension is dropped and created again.
    table: pg_sys::Oid,
    committed: HashMap<[u8; 32], i32>,
    /// Added by this transaction: id and the subtransaction that added it.
    added: HashMap<[u8; 32], (i32, pg_sys::SubTransactionId)>,
}

thread_local! {
    static LABELS: RefCell<Labels> = RefCell::new(Labels::default());
}

/// The id of the label with these fields, added if there is none yet.
pub fn label_id(label: &LabelFields<'_>) -> i32 {
    let digest = label_digest(label);
    let table = store::relations().event_label;
    let known = LABELS.with(|l| {
        let mut l = l.borrow_mut();
        if l.table != table {
            *l = Labels {
                table,
                ..Labels::default()
            };
        }
        l.committed
            .get(&digest)
            .or_else(|| l.added.get(&digest).map(|(id, _)| id))
            .copied()
    });
    if let Some(id) = known {
        return id;
    }
    // A row visible here that this transaction did not add is committed.
    if let Some(id) = run(FIND, &digest, label) {
        LABELS.with(|l| {
            let mut l = l.borrow_mut();
            if l.committed.len() >= MAX_REMEMBERED {
                l.committed.clear();
            }
            l.committed.insert(digest, id);
        });
        return id;
    }
    let id = run(ADD, &digest, label)
        .unwrap_or_else(|| raise(ERRCODE_INTERNAL_ERROR, "could not store an event label"));
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    LABELS.with(|l| l.borrow_mut().added.insert(digest, (id, subxact)));
    id
}

/// Forgets every remembered id, as a new backend would start.
#[cfg(any(test, feature = "pg_test"))]
pub fn forget_remembered() {
    LABELS.with(|l| *l.borrow_mut() = Labels::default());
}

/// A label with exactly these fields (NULLs alike). Spelled out rather than
/// `IS NOT DISTINCT FROM`, which finds its `=` through search_path.
const FIND: &str = "SELECT label_id FROM subject_audit.event_label \
     WHERE label_digest OPERATOR(pg_catalog.=) $1 AND operation OPERATOR(pg_catalog.=) $2 \
     AND status OPERATOR(pg_catalog.=) $3 \
     AND (sqlstate OPERATOR(pg_catalog.=) $4 OR (sqlstate IS NULL AND $4 IS NULL)) \
     AND (table_name OPERATOR(pg_catalog.=) $5 OR (table_name IS NULL AND $5 IS NULL)) \
     AND actor OPERATOR(pg_catalog.=) $6 \
     AND db_role OPERATOR(pg_catalog.=) $7 AND session_role OPERATOR(pg_catalog.=) $8 \
     AND (application_name OPERATOR(pg_catalog.=) $9 OR (application_name IS NULL AND $9 IS NULL)) \
     AND (client_addr OPERATOR(pg_catalog.=) $10::pg_catalog.inet \
          OR (client_addr IS NULL AND $10::pg_catalog.inet IS NULL)) \
     AND (changed_columns OPERATOR(pg_catalog.=) $11 OR (changed_columns IS NULL AND $11 IS NULL)) \
     LIMIT 1";
const ADD: &str =
    "INSERT INTO subject_audit.event_label (label_digest, operation, status, sqlstate, \
     table_name, actor, db_role, session_role, application_name, client_addr, changed_columns) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::pg_catalog.inet, $11) RETURNING label_id";

/// Runs `FIND` or `ADD` (plans kept for the backend) as the extension owner.
fn run(query: &'static str, digest: &[u8; 32], l: &LabelFields<'_>) -> Option<i32> {
    let mut types = vec![PgOid::BuiltIn(PgBuiltInOids::TEXTOID); 11];
    types[0] = PgOid::BuiltIn(PgBuiltInOids::BYTEAOID);
    types[10] = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
    let columns: Option<Vec<&str>> = l.changed_columns.map(<[&str]>::to_vec);
    let args: [pgrx::datum::DatumWithOid; 11] = [
        digest.as_slice().into(),
        l.operation.into(),
        l.status.into(),
        l.sqlstate.into(),
        l.table_name.into(),
        l.actor.into(),
        l.db_role.into(),
        l.session_role.into(),
        l.application_name.into(),
        l.client_addr.into(),
        columns.into(),
    ];
    store::as_owner(|| {
        Spi::connect_mut(|client| {
            let plan = store::prepared(client, query, &types);
            let table = client.update(&*plan, Some(1), &args)?;
            if table.is_empty() {
                return Ok(None);
            }
            table.first().get_one::<i32>()
        })
    })
    .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, format!("event label: {e}")))
}

/// Registers the callbacks that keep the labels honest.
pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// `event_label` truncated or rewritten (by hand: we never do): its OID
/// alone would not tell, so forget the ids. Compared with the table the ids
/// came from (`store` may have forgotten its OIDs by now).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    LABELS.with(|l| {
        let mut l = l.borrow_mut();
        if relid == pg_sys::InvalidOid || relid == l.table {
            l.committed.clear();
        }
    });
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            LABELS.with(|l| {
                let mut l = l.borrow_mut();
                let added = std::mem::take(&mut l.added);
                if l.committed.len() + added.len() > MAX_REMEMBERED {
                    l.committed.clear();
                }
                l.committed.extend(
                    added
                        .into_iter()
                        .take(MAX_REMEMBERED)
                        .map(|(digest, (id, _))| (digest, id)),
                );
            })
        }
        // A prepared transaction may still roll back: forget what it added.
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => LABELS.with(|l| l.borrow_mut().added.clear()),
        _ => {}
    }
}

/// Subtransaction ids grow within a transaction: an aborted savepoint takes
/// with it every label added at or after its id.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        LABELS.with(|l| {
            l.borrow_mut()
                .added
                .retain(|_, (_, since)| *since < my_subid)
        });
    }
}
