//! Encrypts a statement's events and inserts them straight into
//! `subject_audit.event` through the table AM and the executor's index
//! maintenance: no SPI, no plan, no permission check for the writing role
//! (writers hold no grant on the audit schema).

use std::collections::HashMap;
use std::ffi::c_char;

use pgrx::pg_sys;
use pgrx::PgSqlErrorCode::*;

use super::context::StatementContext;
use super::table_meta::TableMeta;
use super::{Operation, PendingEvent};
use crate::crypto::{self, DataKey, NONCE_LEN};
use crate::envelope;
use crate::integrity::{row_hash, EventFields};
use crate::keyring;
use crate::store::{self, error::raise};

unsafe extern "C-unwind" {
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// Columns of `subject_audit.event`, in table order.
const EVENT_COLUMNS: usize = 19;

pub unsafe fn write(
    operation: Operation,
    meta: &TableMeta,
    statement: &StatementContext,
    events: Vec<PendingEvent>,
) {
    let writer = keyring::writer_context();
    let digests: Vec<[u8; 32]> = events.iter().filter_map(|e| e.subject).collect();
    let subject_keys = keyring::subject_keys(&digests);
    let mut nonces = vec![0u8; NONCE_LEN * events.len()];
    crypto::fill_random(&mut nonces)
        .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));

    let relations = store::relations();
    let mut inserter = EventInserter::open(relations.event);
    let mut data_keys: HashMap<i64, DataKey> = HashMap::new();
    let no_subject_key = writer.sender.data_key(None);
    let mut column_arrays: Vec<(*const [usize], pg_sys::Datum)> = Vec::new();

    for (event, nonce) in events.iter().zip(nonces.chunks_exact(NONCE_LEN)) {
        let event_id =
            pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(relations.event_id_seq, false));
        let subject_key_id = event.subject.map(|d| subject_keys[&d].subject_key_id);
        let key = match event.subject {
            Some(digest) => {
                let subject = &subject_keys[&digest];
                data_keys
                    .entry(subject.subject_key_id)
                    .or_insert_with(|| writer.sender.data_key(Some(&subject.salt[..])))
            }
            None => &no_subject_key,
        };
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().expect("chunks_exact");
        let ciphertext = envelope::seal_event(
            key,
            nonce,
            event_id,
            subject_key_id,
            writer.context_id,
            &event.payload,
        )
        .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));
        let names: Vec<&str> = event
            .columns
            .iter()
            .map(|&i| meta.columns[i].name.as_str())
            .collect();
        let fields = EventFields {
            event_id,
            at: statement.at,
            txid: statement.txid,
            operation: operation.as_str(),
            status: "ok",
            sqlstate: None,
            title: None,
            table_name: Some(&meta.name),
            actor: &statement.actor,
            db_role: &statement.db_role,
            session_role: &statement.session_role,
            application_name: statement.application_name.as_deref(),
            client_addr: statement.client_addr.as_deref(),
            changed_columns: Some(&names),
            subject_key_id,
            context_id: Some(writer.context_id),
            nonce: Some(nonce),
            payload: Some(&ciphertext),
        };
        let hash = row_hash(&fields);
        // Events alike share one `changed_columns` array, built once per statement.
        let columns_ptr: *const [usize] = &*event.columns;
        let columns_datum = match column_arrays
            .iter()
            .find(|(p, _)| std::ptr::eq(*p, columns_ptr))
        {
            Some((_, d)) => *d,
            None => {
                let d = inserter.in_statement_memory(|| text_array(&names));
                column_arrays.push((columns_ptr, d));
                d
            }
        };
        inserter.insert(&fields, columns_datum, &hash);
    }
    inserter.close();
}

fn text_datum(bytes: &[u8]) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            bytes.as_ptr() as *const c_char,
            bytes.len() as i32,
        ))
    }
}

unsafe fn inet_datum(address: &str) -> pg_sys::Datum {
    let address = std::ffi::CString::new(address).unwrap_or_default();
    let mut input_fn = pg_sys::InvalidOid;
    let mut io_param = pg_sys::InvalidOid;
    pg_sys::getTypeInputInfo(pg_sys::INETOID, &mut input_fn, &mut io_param);
    pg_sys::OidInputFunctionCall(input_fn, address.as_ptr() as *mut c_char, io_param, -1)
}

unsafe fn text_array(items: &[&str]) -> pg_sys::Datum {
    let mut elements: Vec<pg_sys::Datum> = items.iter().map(|s| text_datum(s.as_bytes())).collect();
    let array = pg_sys::construct_array(
        elements.as_mut_ptr(),
        elements.len() as i32,
        pg_sys::TEXTOID,
        -1,
        false,
        pg_sys::TYPALIGN_INT as c_char,
    );
    pg_sys::Datum::from(array)
}

struct EventInserter {
    relation: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    result_relation: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    statement_memory: pg_sys::MemoryContext,
    row_memory: pg_sys::MemoryContext,
}

impl EventInserter {
    unsafe fn open(event: pg_sys::Oid) -> Self {
        let relation = pg_sys::table_open(event, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if (*(*relation).rd_att).natts as usize != EVENT_COLUMNS {
            raise(
                ERRCODE_DATA_CORRUPTED,
                "subject_audit.event does not have the expected columns",
            );
        }
        let estate = pg_sys::CreateExecutorState();
        let result_relation = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        (*result_relation).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(result_relation, relation, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(result_relation, false);
        let slot = pg_sys::table_slot_create(relation, std::ptr::null_mut());
        let statement_memory = pg_sys::CurrentMemoryContext;
        let row_memory = pg_sys::AllocSetContextCreateExtended(
            statement_memory,
            c"pg_subject_audit event".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        EventInserter {
            relation,
            estate,
            result_relation,
            slot,
            statement_memory,
            row_memory,
        }
    }

    unsafe fn in_statement_memory<R>(&self, f: impl FnOnce() -> R) -> R {
        let previous = pg_sys::MemoryContextSwitchTo(self.statement_memory);
        let result = f();
        pg_sys::MemoryContextSwitchTo(previous);
        result
    }

    unsafe fn insert(
        &mut self,
        f: &EventFields<'_>,
        changed_columns: pg_sys::Datum,
        hash: &[u8; 32],
    ) {
        let previous = pg_sys::MemoryContextSwitchTo(self.row_memory);
        let text = |s: Option<&str>| s.map(|s| text_datum(s.as_bytes()));
        let bytes = |b: Option<&[u8]>| b.map(text_datum);
        let values: [Option<pg_sys::Datum>; EVENT_COLUMNS] = [
            Some(pg_sys::Datum::from(f.event_id)),
            Some(pg_sys::Datum::from(f.at)),
            Some(pg_sys::Datum::from(f.txid)),
            text(Some(f.operation)),
            text(Some(f.status)),
            text(f.sqlstate),
            text(f.title),
            text(f.table_name),
            text(Some(f.actor)),
            text(Some(f.db_role)),
            text(Some(f.session_role)),
            text(f.application_name),
            f.client_addr.map(|a| inet_datum(a)),
            f.changed_columns.map(|_| changed_columns),
            f.subject_key_id.map(pg_sys::Datum::from),
            f.context_id.map(pg_sys::Datum::from),
            bytes(f.nonce),
            bytes(f.payload),
            Some(text_datum(hash)),
        ];
        let slot = self.slot;
        pg_sys::ExecClearTuple(slot);
        for (i, v) in values.iter().enumerate() {
            *(*slot).tts_values.add(i) = v.unwrap_or(pg_sys::Datum::from(0));
            *(*slot).tts_isnull.add(i) = v.is_none();
        }
        pg_sys::ExecStoreVirtualTuple(slot);
        pg_sys::simple_table_tuple_insert(self.relation, slot);
        pg_sys::ExecInsertIndexTuples(
            self.result_relation,
            slot,
            self.estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        pg_sys::ExecClearTuple(slot);
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::MemoryContextReset(self.row_memory);
    }

    unsafe fn close(self) {
        pg_sys::ExecDropSingleTupleTableSlot(self.slot);
        pg_sys::ExecCloseIndices(self.result_relation);
        pg_sys::FreeExecutorState(self.estate);
        pg_sys::table_close(self.relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::MemoryContextDelete(self.row_memory);
    }
}
