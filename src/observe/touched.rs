//! The rows a changing statement is about to touch, noted as its plan
//! produces them, for the case that the statement fails: the node feeding
//! each ModifyTable of the query gets a wrapper around its ExecProcNodeReal.
//! Not row triggers: a BEFORE INSERT row trigger would switch off the
//! batching of COPY and of multi-row inserts, and a BEFORE UPDATE or DELETE
//! row trigger makes the executor lock every row first (a WAL record per
//! row) — about a tenth of a bulk UPDATE's time.
//!
//! - INSERT: the rows are the new rows, in the target table's column order;
//!   the subject is read by position.
//! - UPDATE, DELETE, MERGE: the rows name the row to change by its ctid (and,
//!   with several target tables, its tableoid); the old row is read from the
//!   table as it is, unlocked, for its subject. An UPDATE that sets the
//!   subject column notes the new value too, from the same row.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::ptr::addr_of_mut;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::capture::{self, TableMeta};

type Node = unsafe extern "C-unwind" fn(*mut pg_sys::PlanState) -> *mut pg_sys::TupleTableSlot;

struct Wrapped {
    original: Node,
    /// The Change frame the rows are noted in.
    frame: u64,
    /// Set once the frame itemizes no more subjects: rows are only counted.
    counting: Cell<bool>,
    rows: Rows,
}

enum Rows {
    /// An INSERT's new rows: the subject is at `attno` (1-based).
    New { attno: usize, meta: Rc<TableMeta> },
    /// An UPDATE's, DELETE's or MERGE's rows, naming the rows to change.
    Old {
        modify: *mut pg_sys::ModifyTableState,
        /// Per result relation of `modify`, in its order; `None` when it is
        /// not tracked (or names its rows otherwise: a foreign table).
        targets: Vec<Option<Target>>,
    },
}

struct Target {
    /// Keeps the subject column's output function alive.
    meta: Rc<TableMeta>,
    relation: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    /// Where the old row is read into, made when first needed (a plan may
    /// name many partitions and touch one); freed with the executor's tuple
    /// table.
    slot: Cell<*mut pg_sys::TupleTableSlot>,
    /// The row's column holding the ctid.
    row_id: usize,
    /// The row's column with the new subject value, if an UPDATE sets it.
    new_subject: Option<usize>,
}

thread_local! {
    /// Boxed: `next_row` works through a pointer to its wrapper, which stays
    /// until its frame ends (after the executor is done).
    static WRAPPED: RefCell<HashMap<usize, Box<Wrapped>>> = RefCell::new(HashMap::new());
}

/// Wraps the row source of every ModifyTable of `query` (the statement's
/// and those of data-modifying WITH queries) that changes a tracked table;
/// their rows are noted in frame `frame`. Called after ExecutorStart.
///
/// # Safety
/// `query` must be a started QueryDesc.
pub unsafe fn watch(query: *mut pg_sys::QueryDesc, frame: u64) {
    let estate = (*query).estate;
    let top = (*query).planstate;
    if estate.is_null() || top.is_null() {
        return;
    }
    let mut modifies = Vec::new();
    if (*top).type_ == pg_sys::NodeTag::T_ModifyTableState {
        modifies.push(top as *mut pg_sys::ModifyTableState);
    }
    let aux = (*estate).es_auxmodifytables;
    if !aux.is_null() {
        for i in 0..(*aux).length as usize {
            modifies.push((*(*aux).elements.add(i)).ptr_value as *mut pg_sys::ModifyTableState);
        }
    }
    for modify in modifies {
        let source = (*modify).ps.lefttree;
        if source.is_null() {
            continue;
        }
        let Some(original) = (*source).ExecProcNodeReal else {
            continue;
        };
        let rows = match (*modify).operation {
            pg_sys::CmdType::CMD_INSERT => new_rows(modify),
            pg_sys::CmdType::CMD_UPDATE
            | pg_sys::CmdType::CMD_DELETE
            | pg_sys::CmdType::CMD_MERGE => old_rows(modify, estate),
            _ => None,
        };
        let Some(rows) = rows else {
            continue;
        };
        let wrapped = Box::new(Wrapped {
            original,
            frame,
            counting: Cell::new(false),
            rows,
        });
        WRAPPED.with(|w| w.borrow_mut().insert(source as usize, wrapped));
        (*source).ExecProcNodeReal = Some(next_row);
    }
}

unsafe fn new_rows(modify: *mut pg_sys::ModifyTableState) -> Option<Rows> {
    let target = if (*modify).rootResultRelInfo.is_null() {
        (*modify).resultRelInfo
    } else {
        (*modify).rootResultRelInfo
    };
    if target.is_null() || (*target).ri_RelationDesc.is_null() {
        return None;
    }
    let meta = capture::tracked_relation((*target).ri_RelationDesc)?;
    Some(Rows::New {
        attno: meta.subject.index + 1,
        meta,
    })
}

unsafe fn old_rows(
    modify: *mut pg_sys::ModifyTableState,
    estate: *mut pg_sys::EState,
) -> Option<Rows> {
    let plan = (*modify).ps.plan as *mut pg_sys::ModifyTable;
    let updating = (*modify).operation == pg_sys::CmdType::CMD_UPDATE;
    let mut targets = Vec::with_capacity((*modify).mt_nrels as usize);
    for i in 0..(*modify).mt_nrels as usize {
        let info = (*modify).resultRelInfo.add(i);
        let relation = (*info).ri_RelationDesc;
        // Only heap tables name their rows by ctid (a foreign table has no
        // table AM: its rows are whole-row values).
        let heap = !relation.is_null()
            && !(*relation).rd_tableam.is_null()
            && (*(*relation).rd_rel).relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char;
        let meta = if heap && (*info).ri_RowIdAttNo > 0 {
            capture::tracked_relation(relation)
        } else {
            None
        };
        let Some(meta) = meta else {
            targets.push(None);
            continue;
        };
        let new_subject = if updating {
            let columns = list_nth_list((*plan).updateColnosLists, i);
            (0..list_length(columns))
                .find(|&n| {
                    (*(*columns).elements.add(n)).int_value as usize == meta.subject.index + 1
                })
                .map(|n| n + 1)
        } else {
            None
        };
        targets.push(Some(Target {
            meta,
            relation,
            estate,
            slot: Cell::new(std::ptr::null_mut()),
            row_id: (*info).ri_RowIdAttNo as usize,
            new_subject,
        }));
    }
    targets
        .iter()
        .any(Option::is_some)
        .then_some(Rows::Old { modify, targets })
}

unsafe fn list_length(list: *mut pg_sys::List) -> usize {
    if list.is_null() {
        0
    } else {
        (*list).length as usize
    }
}

unsafe fn list_nth_list(list: *mut pg_sys::List, n: usize) -> *mut pg_sys::List {
    if n >= list_length(list) {
        return std::ptr::null_mut();
    }
    (*(*list).elements.add(n)).ptr_value as *mut pg_sys::List
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
    let wrapped = WRAPPED.with(|w| {
        w.borrow()
            .get(&(node as usize))
            .map(|wrapped| &**wrapped as *const Wrapped)
    });
    let Some(wrapped) = wrapped else {
        // Unreachable: a wrapper is forgotten only once its executor is done.
        pgrx::error!("pg_subject_audit: a changing statement's row source lost its wrapper");
    };
    let slot = ((*wrapped).original)(node);
    if slot.is_null() || (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
        return slot;
    }
    let frame = (*wrapped).frame;
    let counting = (*wrapped).counting.get();
    let values = match &(*wrapped).rows {
        Rows::New { .. } if counting => {
            super::failures::count_in(frame);
            return slot;
        }
        Rows::New { attno, meta } => text_at(slot, *attno, &meta.subject.output)
            .into_iter()
            .collect(),
        Rows::Old { modify, targets } => match target_of(*modify, targets, slot) {
            // Past the itemized subjects: no need to read the row.
            Some(_) if counting => {
                super::failures::count_in(frame);
                return slot;
            }
            Some(target) => {
                let mut values: Vec<Vec<u8>> = old_subject(target, slot).into_iter().collect();
                let new = target
                    .new_subject
                    .and_then(|attno| text_at(slot, attno, &target.meta.subject.output));
                if let Some(value) = new.filter(|v| !values.contains(v)) {
                    values.push(value);
                }
                values
            }
            None => Vec::new(),
        },
    };
    if !values.is_empty() && !super::failures::note_in(frame, values) {
        (*wrapped).counting.set(true);
    }
    slot
}

/// The result relation the plan row `slot` is for, if it is tracked.
unsafe fn target_of(
    modify: *mut pg_sys::ModifyTableState,
    targets: &[Option<Target>],
    slot: *mut pg_sys::TupleTableSlot,
) -> Option<&Target> {
    let oid_attno = (*modify).mt_resultOidAttno;
    if oid_attno <= 0 {
        return targets.first()?.as_ref();
    }
    // NULL: a MERGE row without a matching target row (nothing to note).
    let oid = datum_at(slot, oid_attno as usize)?;
    let info =
        pg_sys::ExecLookupResultRelByOid(modify, pg_sys::Oid::from_datum(oid, false)?, true, false);
    if info.is_null() {
        return None;
    }
    let index = info.offset_from((*modify).resultRelInfo);
    targets.get(usize::try_from(index).ok()?)?.as_ref()
}

/// The subject of the row the plan row `slot` names, as it is in the table.
unsafe fn old_subject(target: &Target, slot: *mut pg_sys::TupleTableSlot) -> Option<Vec<u8>> {
    let tid = datum_at(slot, target.row_id)?.cast_mut_ptr::<pg_sys::ItemPointerData>();
    let relation = target.relation;
    let fetch = (*(*relation).rd_tableam).tuple_fetch_row_version?;
    if target.slot.get().is_null() {
        let estate = target.estate;
        let previous = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let slot = pg_sys::table_slot_create(relation, addr_of_mut!((*estate).es_tupleTable));
        pg_sys::MemoryContextSwitchTo(previous);
        target.slot.set(slot);
    }
    let slot = target.slot.get();
    if !fetch(relation, tid, addr_of_mut!(pg_sys::SnapshotAnyData), slot) {
        return None;
    }
    let value = text_at(
        slot,
        target.meta.subject.index + 1,
        &target.meta.subject.output,
    );
    // ExecClearTuple, an inline function in tuptable.h: drops the buffer pin.
    if let Some(clear) = (*(*slot).tts_ops).clear {
        clear(slot);
    }
    value
}

/// Column `attno` (1-based) of `slot`, unless NULL or beyond its columns.
unsafe fn datum_at(slot: *mut pg_sys::TupleTableSlot, attno: usize) -> Option<pg_sys::Datum> {
    if attno == 0 || attno > (*(*slot).tts_tupleDescriptor).natts as usize {
        return None;
    }
    // slot_getsomeattrs, an inline function in tuptable.h.
    if ((*slot).tts_nvalid as usize) < attno {
        pg_sys::slot_getsomeattrs_int(slot, attno as i32);
    }
    (!*(*slot).tts_isnull.add(attno - 1)).then(|| *(*slot).tts_values.add(attno - 1))
}

/// Column `attno` of `slot` as text, by the subject column's output function.
unsafe fn text_at(
    slot: *mut pg_sys::TupleTableSlot,
    attno: usize,
    output: &pg_sys::FmgrInfo,
) -> Option<Vec<u8>> {
    let datum = datum_at(slot, attno)?;
    let text = pg_sys::OutputFunctionCall(output as *const _ as *mut _, datum);
    let value = CStr::from_ptr(text).to_bytes().to_vec();
    pg_sys::pfree(text.cast());
    Some(value)
}
