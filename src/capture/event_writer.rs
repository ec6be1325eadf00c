//! Encrypts a statement's events and inserts them straight into
//! `subject_audit.event` through the table AM in batches (as COPY does) plus
//! the executor's index maintenance: no SPI, no plan, no permission check for
//! the writing role (writers hold no grant on the audit schema).

use std::collections::HashMap;
use std::ffi::c_char;

use pgrx::pg_sys;
use pgrx::pg_sys::Datum;
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
/// Events per `table_multi_insert` call.
const BATCH: usize = 1000;

pub unsafe fn write(operation: Operation, meta: &TableMeta, statement: &StatementContext, events: Vec<PendingEvent>) {
    let writer = keyring::writer_context();
    let digests: Vec<[u8; 32]> = events.iter().filter_map(|e| e.subject).collect();
    let subject_keys = keyring::subject_keys(&digests);
    let mut nonces = vec![0u8; NONCE_LEN * events.len()];
    crypto::fill_random(&mut nonces).unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));

    let relations = store::relations();
    let mut inserter = EventInserter::open(relations.event, events.len());
    // Values shared by every event of the statement, as datums built once.
    let shared = SharedDatums {
        at: Datum::from(statement.at),
        txid: Datum::from(statement.txid),
        operation: text_datum(operation.as_str().as_bytes()),
        status: text_datum(b"ok"),
        table_name: text_datum(meta.name.as_bytes()),
        actor: text_datum(statement.actor.as_bytes()),
        db_role: text_datum(statement.db_role.as_bytes()),
        session_role: text_datum(statement.session_role.as_bytes()),
        application_name: statement.application_name.as_deref().map(|a| text_datum(a.as_bytes())),
        client_addr: statement.client_addr.as_deref().map(|a| inet_datum(a)),
        context_id: Datum::from(writer.context_id),
    };
    // Boxed: a DataKey is large, and the map must not move them around as it grows.
    let mut data_keys: HashMap<i64, Box<DataKey>> = HashMap::with_capacity(subject_keys.len());
    let no_subject_key = writer.sender.data_key(None);
    // Events alike share one `changed_columns` array (and name list).
    let mut column_sets: Vec<(*const [usize], Vec<&str>, Datum)> = Vec::new();

    for (event, nonce) in events.iter().zip(nonces.chunks_exact(NONCE_LEN)) {
        let event_id = pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(relations.event_id_seq, false));
        let subject_key_id = event.subject.map(|d| subject_keys[&d].subject_key_id);
        let key: &DataKey = match event.subject {
            Some(digest) => {
                let subject = &subject_keys[&digest];
                data_keys
                    .entry(subject.subject_key_id)
                    .or_insert_with(|| Box::new(writer.sender.data_key(Some(&subject.salt[..]))))
            }
            None => &no_subject_key,
        };
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().expect("chunks_exact");
        let ciphertext =
            envelope::seal_event(key, nonce, event_id, subject_key_id, writer.context_id, &event.payload)
                .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));
        let columns_ptr: *const [usize] = &*event.columns;
        let set = match column_sets.iter().position(|(p, _, _)| std::ptr::eq(*p, columns_ptr)) {
            Some(i) => i,
            None => {
                let names: Vec<&str> = event.columns.iter().map(|&i| meta.columns[i].name.as_str()).collect();
                let datum = text_array(&names);
                column_sets.push((columns_ptr, names, datum));
                column_sets.len() - 1
            }
        };
        let (_, names, columns_datum) = &column_sets[set];
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
            changed_columns: Some(names),
            subject_key_id,
            context_id: Some(writer.context_id),
            nonce: Some(nonce),
            payload: Some(&ciphertext),
        };
        let hash = row_hash(&fields);
        inserter.insert(|| {
            [
                Some(Datum::from(event_id)),
                Some(shared.at),
                Some(shared.txid),
                Some(shared.operation),
                Some(shared.status),
                None,
                None,
                Some(shared.table_name),
                Some(shared.actor),
                Some(shared.db_role),
                Some(shared.session_role),
                shared.application_name,
                shared.client_addr,
                Some(*columns_datum),
                subject_key_id.map(Datum::from),
                Some(shared.context_id),
                Some(text_datum(nonce)),
                Some(text_datum(&ciphertext)),
                Some(text_datum(&hash)),
            ]
        });
    }
    inserter.close();
}

struct SharedDatums {
    at: Datum,
    txid: Datum,
    operation: Datum,
    status: Datum,
    table_name: Datum,
    actor: Datum,
    db_role: Datum,
    session_role: Datum,
    application_name: Option<Datum>,
    client_addr: Option<Datum>,
    context_id: Datum,
}

/// A text (or bytea: same layout) datum in the current memory context.
unsafe fn text_datum(bytes: &[u8]) -> Datum {
    Datum::from(pg_sys::cstring_to_text_with_len(bytes.as_ptr() as *const c_char, bytes.len() as i32))
}

unsafe fn inet_datum(address: &str) -> Datum {
    let address = std::ffi::CString::new(address).unwrap_or_default();
    let mut input_fn = pg_sys::InvalidOid;
    let mut io_param = pg_sys::InvalidOid;
    pg_sys::getTypeInputInfo(pg_sys::INETOID, &mut input_fn, &mut io_param);
    pg_sys::OidInputFunctionCall(input_fn, address.as_ptr() as *mut c_char, io_param, -1)
}

unsafe fn text_array(items: &[&str]) -> Datum {
    let mut elements: Vec<Datum> = items.iter().map(|s| text_datum(s.as_bytes())).collect();
    let array = pg_sys::construct_array(
        elements.as_mut_ptr(),
        elements.len() as i32,
        pg_sys::TEXTOID,
        -1,
        false,
        pg_sys::TYPALIGN_INT as c_char,
    );
    Datum::from(array)
}

/// Buffers events in slots and writes them with `table_multi_insert`, one
/// WAL record per heap page instead of one per event, then maintains the
/// indexes for each.
struct EventInserter {
    relation: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    result_relation: *mut pg_sys::ResultRelInfo,
    slots: Vec<*mut pg_sys::TupleTableSlot>,
    filled: usize,
    command_id: pg_sys::CommandId,
    /// Holds the per-event datums of the current batch.
    batch_memory: pg_sys::MemoryContext,
}

impl EventInserter {
    unsafe fn open(event: pg_sys::Oid, expected: usize) -> Self {
        let relation = pg_sys::table_open(event, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if (*(*relation).rd_att).natts as usize != EVENT_COLUMNS {
            raise(ERRCODE_DATA_CORRUPTED, "subject_audit.event does not have the expected columns");
        }
        let estate = pg_sys::CreateExecutorState();
        let result_relation =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()) as *mut pg_sys::ResultRelInfo;
        (*result_relation).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(result_relation, relation, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(result_relation, false);
        let slots = (0..expected.min(BATCH)).map(|_| pg_sys::table_slot_create(relation, std::ptr::null_mut())).collect();
        let batch_memory = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"pg_subject_audit events".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        EventInserter {
            relation,
            estate,
            result_relation,
            slots,
            filled: 0,
            command_id: pg_sys::GetCurrentCommandId(true),
            batch_memory,
        }
    }

    /// Adds one event; `values` builds its datums inside the batch's memory.
    unsafe fn insert(&mut self, values: impl FnOnce() -> [Option<Datum>; EVENT_COLUMNS]) {
        let previous = pg_sys::MemoryContextSwitchTo(self.batch_memory);
        let values = values();
        pg_sys::MemoryContextSwitchTo(previous);
        let slot = self.slots[self.filled];
        pg_sys::ExecClearTuple(slot);
        for (i, v) in values.iter().enumerate() {
            *(*slot).tts_values.add(i) = v.unwrap_or(Datum::from(0));
            *(*slot).tts_isnull.add(i) = v.is_none();
        }
        pg_sys::ExecStoreVirtualTuple(slot);
        self.filled += 1;
        if self.filled == self.slots.len() {
            self.flush();
        }
    }

    unsafe fn flush(&mut self) {
        if self.filled == 0 {
            return;
        }
        pg_sys::table_multi_insert(
            self.relation,
            self.slots.as_mut_ptr(),
            self.filled as i32,
            self.command_id,
            0,
            std::ptr::null_mut(),
        );
        for &slot in &self.slots[..self.filled] {
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
        }
        self.filled = 0;
        pg_sys::MemoryContextReset(self.batch_memory);
    }

    unsafe fn close(mut self) {
        self.flush();
        for &slot in &self.slots {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        pg_sys::ExecCloseIndices(self.result_relation);
        pg_sys::FreeExecutorState(self.estate);
        pg_sys::table_close(self.relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::MemoryContextDelete(self.batch_memory);
    }
}
