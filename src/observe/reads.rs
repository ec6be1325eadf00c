//! Reads of tracked tables. A query's output columns carry the table and
//! column they come from (`resorigtbl`, `resorigcol`, as in the plan's
//! target list): when a tracked table's subject column is among them, the
//! rows actually handed to the query's receiver are tapped for subject
//! values, and each subject gets one READ event. Tables read without their
//! subject in the output get one statement-level READ event (columns, row
//! count, no subject). The rows an INSERT, UPDATE or DELETE hands back with
//! RETURNING are read the same way. Statement text is never kept.

use std::collections::HashSet;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::capture::{self, TableMeta};
use crate::deferred::Entry;
use crate::recorder::StatementContext;
use crate::store;

/// Distinct subjects itemized per statement and table; more are counted.
const MAX_SUBJECTS: usize = 100_000;

/// What one query read from tracked tables so far.
pub struct Reading {
    tables: Vec<ReadTable>,
    /// Rows handed to the receiver (a SELECT, RETURNING), or processed (DML, COPY).
    rows: u64,
    /// Whether rows are counted by the receiver tap (a SELECT, RETURNING).
    tapped: bool,
    /// Its executor ran (a statement refused before that read nothing).
    started: bool,
    /// It ended normally (else it was cut short by an error).
    finished: bool,
}

struct ReadTable {
    relid: pg_sys::Oid,
    meta: Rc<TableMeta>,
    /// `select public.customers`, `copy …`, `update … returning`.
    title: String,
    /// Columns named in the query (statement-level) or returned (per subject).
    selected: Vec<String>,
    returned: Vec<String>,
    /// Output attribute numbers holding this table's subject column.
    subject_outputs: Vec<usize>,
    subjects: HashSet<Vec<u8>>,
    /// Subject values beyond `MAX_SUBJECTS`, not itemized.
    not_itemized: u64,
}

/// What a statement reads of tracked tables, or None if nothing: a SELECT
/// (per subject where it returns the subject column, with `per_subject`),
/// or the tables a DML statement reads besides the ones it changes (its
/// own target's rows are in its change events) — and, if it hands rows back
/// (RETURNING), its targets too, like a SELECT: those rows are read.
///
/// # Safety
/// `stmt` must be the plan the executor is starting.
pub unsafe fn plan(
    stmt: *mut pg_sys::PlannedStmt,
    per_subject: bool,
    dml: bool,
) -> Option<Box<Reading>> {
    let results: Vec<i32> = int_items((*stmt).resultRelations);
    let returning = dml && (*stmt).hasReturning;
    let mut tables: Vec<ReadTable> = Vec::new();
    for (index, rte) in super::list_items((*stmt).rtable).into_iter().enumerate() {
        let rte = rte as *mut pg_sys::RangeTblEntry;
        let target = dml && results.contains(&(index as i32 + 1));
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
            || (*rte).requiredPerms & pg_sys::ACL_SELECT as pg_sys::AclMode == 0
            || (target && !returning)
        {
            continue;
        }
        let relid = (*rte).relid;
        let known = tables.iter().position(|t| t.relid == relid);
        let table = match known {
            Some(i) => &mut tables[i],
            None => {
                let Some(meta) = capture::tracked_table(relid) else {
                    continue;
                };
                tables.push(ReadTable {
                    relid,
                    title: format!("select {}", meta.name),
                    meta,
                    selected: Vec::new(),
                    returned: Vec::new(),
                    subject_outputs: Vec::new(),
                    subjects: HashSet::new(),
                    not_itemized: 0,
                });
                tables.last_mut().expect("just pushed")
            }
        };
        if target {
            table.title = format!("{} {} returning", command_verb(stmt), table.meta.name);
        }
        // Excluded columns appear nowhere, not even by name.
        for column in selected_columns(relid, (*rte).selectedCols) {
            if table.meta.column_names.contains(&column) && !table.selected.contains(&column) {
                table.selected.push(column);
            }
        }
    }
    if tables.is_empty() {
        return None;
    }
    if per_subject {
        for entry in super::list_items((*(*stmt).planTree).targetlist) {
            let entry = entry as *mut pg_sys::TargetEntry;
            if (*entry).resjunk {
                continue;
            }
            let Some(table) = tables.iter_mut().find(|t| t.relid == (*entry).resorigtbl) else {
                continue;
            };
            let column = (*entry).resorigcol;
            if let Some(name) = column_name(table.relid, column) {
                if table.meta.column_names.contains(&name) && !table.returned.contains(&name) {
                    table.returned.push(name);
                }
            }
            if column as usize == table.meta.subject.index + 1 {
                table.subject_outputs.push((*entry).resno as usize);
            }
        }
    }
    Some(Box::new(Reading {
        tables,
        rows: 0,
        tapped: !dml || returning,
        started: false,
        finished: false,
    }))
}

/// `insert`, `update` or `delete`, for the title of what RETURNING read.
unsafe fn command_verb(stmt: *mut pg_sys::PlannedStmt) -> &'static str {
    match (*stmt).commandType {
        pg_sys::CmdType::CMD_INSERT => "insert",
        pg_sys::CmdType::CMD_UPDATE => "update",
        pg_sys::CmdType::CMD_DELETE => "delete",
        _ => "change",
    }
}

/// What `COPY table TO …` reads, if the table is tracked: a statement-level
/// read (COPY bypasses the executor; `pg_dump` reads this way).
///
/// # Safety
/// `node` must be a valid parse tree node.
pub unsafe fn plan_copy_to(node: *mut pg_sys::Node) -> Option<Box<Reading>> {
    if (*node).type_ != pg_sys::NodeTag::T_CopyStmt {
        return None;
    }
    let copy = node as *mut pg_sys::CopyStmt;
    if (*copy).is_from || (*copy).relation.is_null() {
        return None;
    }
    let relid = store::relation_id((*copy).relation)?;
    let meta = capture::tracked_table(relid)?;
    let named: Vec<String> = super::list_items((*copy).attlist)
        .into_iter()
        .map(|n| {
            CStr::from_ptr((*n.cast::<pg_sys::String>()).sval)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let selected = if named.is_empty() {
        all_columns(relid)
    } else {
        named
    };
    let selected = selected
        .into_iter()
        .filter(|c| meta.column_names.contains(c))
        .collect();
    Some(Box::new(Reading {
        tables: vec![ReadTable {
            relid,
            title: format!("copy {}", meta.name),
            meta,
            selected,
            returned: Vec::new(),
            subject_outputs: Vec::new(),
            subjects: HashSet::new(),
            not_itemized: 0,
        }],
        rows: 0,
        tapped: false,
        started: false,
        finished: false,
    }))
}

/// The integers of an integer `List`.
unsafe fn int_items(list: *mut pg_sys::List) -> Vec<i32> {
    if list.is_null() {
        return Vec::new();
    }
    (0..(*list).length as usize)
        .map(|i| (*(*list).elements.add(i)).int_value)
        .collect()
}

/// The names of the columns in a `selectedCols` set (all for a whole-row reference).
unsafe fn selected_columns(relid: pg_sys::Oid, set: *mut pg_sys::Bitmapset) -> Vec<String> {
    let mut names = Vec::new();
    let mut member = -1;
    loop {
        member = pg_sys::bms_next_member(set, member);
        if member < 0 {
            break;
        }
        let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
        if attnum == 0 {
            names.extend(all_columns(relid));
        } else if attnum > 0 {
            names.extend(column_name(relid, attnum as i16));
        }
    }
    names.dedup();
    names
}

unsafe fn column_name(relid: pg_sys::Oid, attnum: i16) -> Option<String> {
    if attnum <= 0 {
        return None;
    }
    let name = pg_sys::get_attname(relid, attnum, true);
    (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
}

/// Every live column of `relid`, by name.
unsafe fn all_columns(relid: pg_sys::Oid) -> Vec<String> {
    let relation = pg_sys::RelationIdGetRelation(relid);
    if relation.is_null() {
        return Vec::new();
    }
    let desc = (*relation).rd_att;
    let names = (0..(*desc).natts as usize)
        .map(|i| &*(*desc).attrs.as_ptr().add(i))
        .filter(|attr| !attr.attisdropped)
        .map(|attr| {
            CStr::from_ptr(attr.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    pg_sys::RelationClose(relation);
    names
}

/// Whether reads can be recorded here. On a hot standby nothing can be
/// written: the read goes on with a NOTICE once per session, or is refused
/// with `subject_audit.require_recorded_reads`.
pub fn recordable() -> bool {
    if !unsafe { pg_sys::RecoveryInProgress() } {
        return true;
    }
    if store::setting(c"subject_audit.require_recorded_reads").as_deref() == Some("on") {
        store::error::raise_with_hint(
            pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "this read of a tracked table cannot be recorded: the server is a hot standby",
            "subject_audit.require_recorded_reads is on: read tracked tables on the primary",
        );
    }
    thread_local! {
        static TOLD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !TOLD.with(|t| t.replace(true)) {
        notice!("reads of tracked tables are not recorded on a hot standby");
    }
    false
}

impl Reading {
    /// The excluded columns of the tables it reads.
    pub fn excluded(&self) -> impl Iterator<Item = &String> {
        self.tables.iter().flat_map(|t| &t.meta.excluded)
    }

    /// Whether its rows are counted (and subjects noted) by a receiver tap.
    pub fn taps(&self) -> bool {
        self.tapped
    }

    /// Its executor runs (or the COPY starts).
    pub fn start(&mut self) {
        self.started = true;
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// It ended normally; `processed` is the row count where no tap counted.
    pub fn finish(&mut self, processed: u64) {
        if !self.tapped {
            self.rows = processed;
        }
        self.finished = true;
    }

    /// The events of what was read: per subject, or per statement and table.
    pub fn entries(&self, who: &StatementContext) -> Vec<Entry> {
        let mut entries = Vec::new();
        for table in &self.tables {
            let entry = |title: String, columns: &[String], subjects: Vec<Vec<u8>>| Entry {
                operation: "READ".into(),
                title,
                // Statement-level: counted (merged reads of one statement add up).
                rows: (subjects.is_empty() && (self.finished || self.tapped)).then_some(self.rows),
                table_name: table.meta.name.clone(),
                columns: columns.to_vec(),
                subjects,
                who: who.clone(),
                ..Entry::default()
            };
            let title = &table.title;
            if table.subject_outputs.is_empty() {
                // Rows a tap counted were sent, even if the statement failed later.
                let title = if self.finished || self.tapped {
                    title.clone()
                } else {
                    format!("{title}: cut short")
                };
                entries.push(entry(title, &table.selected, Vec::new()));
                continue;
            }
            if !table.subjects.is_empty() {
                entries.push(entry(
                    title.clone(),
                    &table.returned,
                    table.subjects.iter().cloned().collect(),
                ));
            }
            if table.not_itemized > 0 {
                entries.push(entry(
                    format!(
                        "{title}: {} more subject values, not itemized",
                        table.not_itemized
                    ),
                    &table.returned,
                    Vec::new(),
                ));
            }
        }
        entries
    }

    /// Notes the subjects of one row handed to the receiver.
    unsafe fn note(&mut self, slot: *mut pg_sys::TupleTableSlot) {
        self.rows += 1;
        if self.tables.iter().all(|t| t.subject_outputs.is_empty()) {
            return;
        }
        pg_sys::slot_getallattrs(slot);
        for table in &mut self.tables {
            for &attno in &table.subject_outputs {
                if *(*slot).tts_isnull.add(attno - 1) {
                    continue;
                }
                let datum = *(*slot).tts_values.add(attno - 1);
                let text = pg_sys::OutputFunctionCall(
                    table.meta.subject.output.as_ref() as *const _ as *mut _,
                    datum,
                );
                let value = CStr::from_ptr(text).to_bytes();
                if !table.subjects.contains(value) {
                    if table.subjects.len() < MAX_SUBJECTS {
                        table.subjects.insert(value.to_vec());
                    } else {
                        table.not_itemized += 1;
                    }
                }
                pg_sys::pfree(text.cast());
            }
        }
    }
}

/// A receiver that passes every row on to the query's own receiver and
/// notes what it carried.
#[repr(C)]
struct Tap {
    base: pg_sys::DestReceiver,
    inner: *mut pg_sys::DestReceiver,
    reading: *mut Reading,
}

/// Wraps `inner` for one ExecutorRun of `query`, whose frame holds `reading`.
///
/// # Safety
/// `reading` must outlive the run (frames are popped only in ExecutorEnd or abort).
pub unsafe fn tap(
    reading: *mut Reading,
    inner: *mut pg_sys::DestReceiver,
) -> *mut pg_sys::DestReceiver {
    let tap = pg_sys::palloc0(std::mem::size_of::<Tap>()) as *mut Tap;
    (*tap).base = pg_sys::DestReceiver {
        receiveSlot: Some(tap_receive),
        rStartup: Some(tap_startup),
        rShutdown: Some(tap_shutdown),
        rDestroy: Some(tap_destroy),
        mydest: (*inner).mydest,
    };
    (*tap).inner = inner;
    (*tap).reading = reading;
    tap.cast()
}

#[pg_guard]
unsafe extern "C-unwind" fn tap_receive(
    slot: *mut pg_sys::TupleTableSlot,
    receiver: *mut pg_sys::DestReceiver,
) -> bool {
    let tap = receiver as *mut Tap;
    let inner = (*tap).inner;
    let sent = (*inner)
        .receiveSlot
        .is_none_or(|receive| receive(slot, inner));
    (*(*tap).reading).note(slot);
    sent
}

#[pg_guard]
unsafe extern "C-unwind" fn tap_startup(
    receiver: *mut pg_sys::DestReceiver,
    operation: i32,
    desc: pg_sys::TupleDesc,
) {
    let inner = (*(receiver as *mut Tap)).inner;
    if let Some(startup) = (*inner).rStartup {
        startup(inner, operation, desc);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tap_shutdown(receiver: *mut pg_sys::DestReceiver) {
    let inner = (*(receiver as *mut Tap)).inner;
    if let Some(shutdown) = (*inner).rShutdown {
        shutdown(inner);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tap_destroy(receiver: *mut pg_sys::DestReceiver) {
    let inner = (*(receiver as *mut Tap)).inner;
    if let Some(destroy) = (*inner).rDestroy {
        destroy(inner);
    }
}
