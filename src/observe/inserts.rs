//! The rows an INSERT is about to write, noted as its plan produces them,
//! for the case that the statement fails. Not a row trigger: a BEFORE
//! INSERT row trigger would switch off the batching of COPY and of
//! multi-row inserts for every tracked table. The node feeding the
//! ModifyTable gets a wrapper around its ExecProcNodeReal; its rows are in
//! the target table's column order, so the subject is read by position.
//! (UPDATE and DELETE rows are noted by the `subject_audit_note` trigger.)

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::capture::{self, TableMeta};

type Node = unsafe extern "C-unwind" fn(*mut pg_sys::PlanState) -> *mut pg_sys::TupleTableSlot;

struct Wrapped {
    original: Node,
    /// 1-based position of the subject column in the rows.
    attno: usize,
    /// Keeps the subject column's output function alive.
    meta: Rc<TableMeta>,
    /// The Change frame the rows are noted in.
    frame: u64,
}

thread_local! {
    static WRAPPED: RefCell<HashMap<usize, Wrapped>> = RefCell::new(HashMap::new());
}

/// Wraps the row source of `query` if it is an INSERT into a tracked table;
/// its rows are noted in frame `frame`. Called after ExecutorStart.
///
/// # Safety
/// `query` must be a started QueryDesc.
pub unsafe fn watch(query: *mut pg_sys::QueryDesc, frame: u64) {
    let state = (*query).planstate;
    if state.is_null() || (*state).type_ != pg_sys::NodeTag::T_ModifyTableState {
        return;
    }
    let modify = state as *mut pg_sys::ModifyTableState;
    let source = (*modify).ps.lefttree;
    if (*modify).operation != pg_sys::CmdType::CMD_INSERT || source.is_null() {
        return;
    }
    let target = if (*modify).rootResultRelInfo.is_null() {
        (*modify).resultRelInfo
    } else {
        (*modify).rootResultRelInfo
    };
    if target.is_null() || (*target).ri_RelationDesc.is_null() {
        return;
    }
    let Some(meta) = capture::tracked_table((*(*target).ri_RelationDesc).rd_id) else {
        return;
    };
    let Some(original) = (*source).ExecProcNodeReal else {
        return;
    };
    let wrapped = Wrapped {
        original,
        attno: meta.subject.index + 1,
        meta,
        frame,
    };
    WRAPPED.with(|w| w.borrow_mut().insert(source as usize, wrapped));
    (*source).ExecProcNodeReal = Some(next_row);
}

/// Forgets the wrappers of frames that ended (their executors are done).
pub fn forget(frames: &[u64]) {
    WRAPPED.with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            if !w.is_empty() {
                w.retain(|_, wrapped| !frames.contains(&wrapped.frame));
            }
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn next_row(node: *mut pg_sys::PlanState) -> *mut pg_sys::TupleTableSlot {
    let found = WRAPPED.with(|w| {
        w.borrow().get(&(node as usize)).map(|wrapped| {
            let output = wrapped.meta.subject.output.as_ref() as *const _ as *mut pg_sys::FmgrInfo;
            (wrapped.original, wrapped.attno, output, wrapped.frame)
        })
    });
    let Some((original, attno, output, frame)) = found else {
        // Unreachable: a wrapper is forgotten only once its executor is done.
        pgrx::error!("pg_subject_audit: an INSERT's row source lost its wrapper");
    };
    let slot = original(node);
    let empty = slot.is_null() || (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0;
    if empty || attno > (*(*slot).tts_tupleDescriptor).natts as usize {
        return slot;
    }
    // slot_getsomeattrs, an inline function in tuptable.h.
    if ((*slot).tts_nvalid as usize) < attno {
        pg_sys::slot_getsomeattrs_int(slot, attno as i32);
    }
    if !*(*slot).tts_isnull.add(attno - 1) {
        let text = pg_sys::OutputFunctionCall(output, *(*slot).tts_values.add(attno - 1));
        let value = CStr::from_ptr(text).to_bytes().to_vec();
        pg_sys::pfree(text.cast());
        super::failures::note_in(frame, vec![value]);
    }
    slot
}
