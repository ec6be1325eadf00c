//! Inserts event rows straight into `subject_audit.event` through the table
//! AM in batches (as COPY does) plus the executor's index maintenance: no
//! SPI, no plan, no permission check for the writing role (writers hold no
//! grant on the audit schema).

use std::ffi::c_char;

use pgrx::pg_sys;
use pgrx::pg_sys::Datum;
use pgrx::PgSqlErrorCode::*;

use crate::store::error::raise;

/// Columns of `subject_audit.event`, in table order.
pub const EVENT_COLUMNS: usize = 10;
/// Events per `table_multi_insert` call.
const BATCH: usize = 1000;

/// A text (or bytea: same layout) datum in the current memory context.
pub unsafe fn text_datum(bytes: &[u8]) -> Datum {
    Datum::from(pg_sys::cstring_to_text_with_len(
        bytes.as_ptr() as *const c_char,
        bytes.len() as i32,
    ))
}

/// Buffers events in slots and writes them with `table_multi_insert`, one
/// WAL record per heap page instead of one per event, then maintains the
/// indexes for each.
pub struct EventInserter {
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
    pub unsafe fn open(event: pg_sys::Oid, expected: usize) -> Self {
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
        let slots = (0..expected.clamp(1, BATCH))
            .map(|_| pg_sys::table_slot_create(relation, std::ptr::null_mut()))
            .collect();
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
    pub unsafe fn insert(&mut self, values: impl FnOnce() -> [Option<Datum>; EVENT_COLUMNS]) {
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

    pub unsafe fn close(mut self) {
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
