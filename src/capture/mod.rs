//! Capture: statement-level AFTER triggers with transition tables turn every
//! INSERT, UPDATE and DELETE on a tracked table into encrypted events; a
//! BEFORE TRUNCATE trigger records every row a TRUNCATE is about to remove.
//!
//! Per statement: read the transition tables straight from their tuplestores,
//! diff old and new tuples datum by datum, format only what is recorded, then
//! resolve all subject keys in one batch and insert the events directly into
//! the heap (no SPI, no per-row planning).

mod diff;
mod table_meta;

pub use table_meta::TableMeta;

use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::PgSqlErrorCode::*;

use crate::envelope::{PayloadWriter, Value};
use crate::keyring;
use crate::recorder::{self, Draft, Header, StatementContext, Subject};
use crate::store::error::raise;
use table_meta::Column;

/// Events recorded per chunk of a large statement.
const CHUNK: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Truncate => "TRUNCATE",
        }
    }
}

/// Registers the callbacks that drop stale table metadata.
pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut());
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PREPARE
    ) {
        table_meta::end_of_transaction();
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    table_meta::on_relation_invalidated(relid);
}

unsafe extern "C-unwind" {
    fn find_all_inheritors(
        parent: pg_sys::Oid,
        lockmode: pg_sys::LOCKMODE,
        parents: *mut *mut pg_sys::List,
    ) -> *mut pg_sys::List;
    fn datum_image_eq(
        value1: pg_sys::Datum,
        value2: pg_sys::Datum,
        by_value: bool,
        length: i32,
    ) -> bool;
}

/// The capture metadata of `relid` if it is tracked (itself or as a
/// partition of a tracked table). Cheap for other tables: only one with
/// capture triggers is looked up further.
///
/// # Safety
/// `relid` must be locked by the caller's statement (or not exist).
pub unsafe fn tracked_table(relid: pg_sys::Oid) -> Option<std::rc::Rc<TableMeta>> {
    let relation = pg_sys::RelationIdGetRelation(relid);
    if relation.is_null() {
        return None;
    }
    let meta = tracked_relation(relation);
    pg_sys::RelationClose(relation);
    meta
}

/// The capture metadata of `relation` if it is tracked, itself or as a
/// partition of a tracked table (partitions carry the capture triggers too).
/// Cheap for other tables: only one with capture triggers is looked up further.
///
/// # Safety
/// `relation` must be an open relation.
pub unsafe fn tracked_relation(relation: pg_sys::Relation) -> Option<std::rc::Rc<TableMeta>> {
    let triggers = (*relation).trigdesc;
    let has_capture = !triggers.is_null()
        && (0..(*triggers).numtriggers as usize).any(|i| {
            let name = CStr::from_ptr((*(*triggers).triggers.add(i)).tgname);
            name.to_bytes().starts_with(b"subject_audit_capture_")
        });
    if has_capture {
        table_meta::lookup(relation)
    } else {
        None
    }
}

/// The body of `subject_audit.capture_change()`.
///
/// # Safety
/// `trigger` must be the `TriggerData` PostgreSQL passed to the trigger function.
pub unsafe fn on_statement(trigger: &pg_sys::TriggerData) {
    let event = trigger.tg_event;
    let for_row = event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let after = event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER;
    let operation = match event & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => Operation::Insert,
        pg_sys::TRIGGER_EVENT_UPDATE => Operation::Update,
        pg_sys::TRIGGER_EVENT_DELETE => Operation::Delete,
        _ => Operation::Truncate,
    };
    // TRUNCATE has no transition table: its rows are read before they go.
    if for_row || after == (operation == Operation::Truncate) {
        raise(
            ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            "subject_audit.capture_change() must fire AFTER ... FOR EACH STATEMENT (BEFORE for TRUNCATE); use subject_audit.track()",
        );
    }
    let relation = trigger.tg_relation;
    let meta = table_meta::get(relation);
    let tupdesc = (*relation).rd_att;
    let statement = StatementContext::current();
    let reason = statement.reason.as_deref();

    let row_memory = pg_sys::AllocSetContextCreateExtended(
        pg_sys::CurrentMemoryContext,
        c"pg_subject_audit row".as_ptr(),
        pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
    );
    let header = Header {
        operation: operation.as_str(),
        status: "ok",
        sqlstate: None,
        title: None,
        table_name: Some(&meta.name),
    };
    let mut events = Vec::new();
    // A huge statement is recorded in chunks, so memory stays bounded.
    let flush_full = |events: &mut Vec<Draft>| {
        if events.len() >= CHUNK {
            recorder::record(&header, &statement, events);
            events.clear();
        }
    };
    let in_row_memory = |f: &mut dyn FnMut()| {
        let previous = pg_sys::MemoryContextSwitchTo(row_memory);
        f();
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::MemoryContextReset(row_memory);
    };
    // A row recorded whole, under its owner: after as INSERT records it (and
    // its new subject a change of subject), before as DELETE and TRUNCATE do
    // (and its old subject). A row of nobody's gets the names, no values.
    let whole_row = |row: &Row, subject: Subject, insert: bool| {
        let payload = (subject != Subject::Nobody).then(|| {
            let mut payload = PayloadWriter::new(reason);
            for column in &meta.columns {
                let value = format_value(column, row);
                let (before, after) = if insert {
                    (Value::Absent, value)
                } else {
                    (value, Value::Absent)
                };
                payload.column(column.json, before, after);
            }
            payload.finish().into()
        });
        Draft {
            subject,
            columns: Some(meta.column_names.clone()),
            payload,
        }
    };
    match operation {
        Operation::Truncate => {
            scan_rows(relation, (*trigger.tg_trigger).tgfoid, &mut |row| {
                in_row_memory(&mut || events.push(whole_row(row, subject_of(&meta, row), false)));
                flush_full(&mut events);
            });
        }
        Operation::Insert | Operation::Delete => {
            let (store, insert) = if operation == Operation::Insert {
                (trigger.tg_newtable, true)
            } else {
                (trigger.tg_oldtable, false)
            };
            let mut reader = TransitionReader::new(store, tupdesc);
            while reader.next() {
                in_row_memory(&mut || {
                    let row = reader.row();
                    events.push(whole_row(row, subject_of(&meta, row), insert))
                });
                flush_full(&mut events);
            }
            reader.finish();
        }
        Operation::Update => {
            let mut old = TransitionReader::new(trigger.tg_oldtable, tupdesc);
            let mut new = TransitionReader::new(trigger.tg_newtable, tupdesc);
            // Rows that changed the same columns share one name list.
            let mut shared: Option<(Vec<usize>, Rc<[String]>)> = None;
            while old.next() && new.next() {
                in_row_memory(&mut || {
                    let (before, after) = (old.row(), new.row());
                    let changed = changed_columns(&meta.columns, before, after);
                    if changed.is_empty() {
                        return;
                    }
                    let names = match &shared {
                        Some((set, names)) if *set == changed => names.clone(),
                        _ => {
                            let names: Rc<[String]> = changed
                                .iter()
                                .map(|&i| meta.columns[i].name.clone())
                                .collect();
                            shared = Some((changed.clone(), names.clone()));
                            names
                        }
                    };
                    let old_subject = subject_of(&meta, before);
                    let new_subject = if same_value(&meta.subject, before, after) {
                        old_subject
                    } else {
                        subject_of(&meta, after)
                    };
                    if old_subject != new_subject {
                        // A change of subject splits by ownership: each side
                        // gets the row as it held it, never the other's values.
                        for (subject, row, arrived) in
                            [(old_subject, before, false), (new_subject, after, true)]
                        {
                            events.push(match subject {
                                Subject::Nobody => Draft {
                                    subject,
                                    columns: Some(names.clone()),
                                    payload: None,
                                },
                                _ => whole_row(row, subject, arrived),
                            });
                        }
                        return;
                    }
                    let payload = (old_subject != Subject::Nobody).then(|| {
                        let mut payload = PayloadWriter::new(reason);
                        for &i in &changed {
                            let column = &meta.columns[i];
                            payload.column(
                                column.json,
                                format_value(column, before),
                                format_value(column, after),
                            );
                        }
                        payload.finish().into()
                    });
                    events.push(Draft {
                        subject: old_subject,
                        columns: Some(names),
                        payload,
                    });
                });
                flush_full(&mut events);
            }
            old.finish();
            new.finish();
        }
    }
    pg_sys::MemoryContextDelete(row_memory);
    if !events.is_empty() {
        recorder::record(&header, &statement, &events);
    }
}

/// The values of one transition-table row, deformed.
struct Row {
    values: *const pg_sys::Datum,
    nulls: *const bool,
}

impl Row {
    unsafe fn get(&self, index: usize) -> Option<pg_sys::Datum> {
        (!*self.nulls.add(index)).then(|| *self.values.add(index))
    }
}

/// Calls `f` with every row of `relation`, as of a snapshot taken now:
/// TRUNCATE holds its lock already, so no committed row is missed. A
/// partitioned table is truncated with all its partitions, each firing its
/// own trigger: here it reads only leaves without one (in its column layout).
unsafe fn scan_rows(relation: pg_sys::Relation, capture_fn: pg_sys::Oid, f: &mut dyn FnMut(&Row)) {
    let relid = (*relation).rd_id;
    let parent_desc = (*relation).rd_att;
    let leaves: Vec<pg_sys::Oid> =
        if (*(*relation).rd_rel).relkind == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char {
            let all = pg_sys::ffi::pg_guard_ffi_boundary(|| {
                find_all_inheritors(relid, pg_sys::AccessShareLock as i32, std::ptr::null_mut())
            });
            (0..(*all).length as usize)
                .map(|i| (*(*all).elements.add(i)).oid_value)
                .filter(|&oid| {
                    pg_sys::get_rel_relkind(oid) == pg_sys::RELKIND_RELATION as std::ffi::c_char
                        && !has_truncate_capture(oid, capture_fn)
                })
                .collect()
        } else {
            vec![relid]
        };
    let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
    for leaf in leaves {
        let rel = match leaf == relid {
            true => relation,
            false => pg_sys::table_open(leaf, pg_sys::AccessShareLock as i32),
        };
        let map = match leaf == relid {
            true => std::ptr::null_mut(),
            false => pg_sys::convert_tuples_by_name((*rel).rd_att, parent_desc),
        };
        let scan_slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let row_slot = match map.is_null() {
            true => scan_slot,
            false => pg_sys::MakeSingleTupleTableSlot(parent_desc, &pg_sys::TTSOpsVirtual),
        };
        let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
        while pg_sys::table_scan_getnextslot(
            scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            scan_slot,
        ) {
            if !map.is_null() {
                pg_sys::execute_attr_map_slot((*map).attrMap, scan_slot, row_slot);
            }
            pg_sys::slot_getallattrs(row_slot);
            f(&Row {
                values: (*row_slot).tts_values,
                nulls: (*row_slot).tts_isnull,
            });
        }
        pg_sys::table_endscan(scan);
        if !map.is_null() {
            pg_sys::ExecDropSingleTupleTableSlot(row_slot);
        }
        pg_sys::ExecDropSingleTupleTableSlot(scan_slot);
        if leaf != relid {
            pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        }
    }
    pg_sys::UnregisterSnapshot(snapshot);
}

/// Whether `relid` has a TRUNCATE trigger calling `capture_fn` that fires
/// now (the rule of trigger.c: ALWAYS, or ORIGIN/REPLICA by
/// `session_replication_role`).
unsafe fn has_truncate_capture(relid: pg_sys::Oid, capture_fn: pg_sys::Oid) -> bool {
    let replica = pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
    let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
    let triggers = (*rel).trigdesc;
    let found = !triggers.is_null()
        && (0..(*triggers).numtriggers as usize).any(|i| {
            let trigger = &*(*triggers).triggers.add(i);
            let fires = match trigger.tgenabled as u8 {
                b'A' => true,
                b'O' => !replica,
                b'R' => replica,
                _ => false,
            };
            fires
                && trigger.tgfoid == capture_fn
                && trigger.tgtype & pg_sys::TRIGGER_TYPE_TRUNCATE as i16 != 0
        });
    pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    found
}

/// Reads a transition table through a read pointer of its own, so other
/// triggers reading the same tuplestore are not disturbed.
struct TransitionReader {
    store: *mut pg_sys::Tuplestorestate,
    slot: *mut pg_sys::TupleTableSlot,
    pointer: i32,
    row: Row,
}

impl TransitionReader {
    unsafe fn new(store: *mut pg_sys::Tuplestorestate, tupdesc: pg_sys::TupleDesc) -> Self {
        if store.is_null() {
            raise(
                ERRCODE_TRIGGERED_ACTION_EXCEPTION,
                "subject_audit.capture_change() needs its transition tables; use subject_audit.track()",
            );
        }
        let slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
        let pointer = pg_sys::tuplestore_alloc_read_pointer(store, pg_sys::EXEC_FLAG_REWIND as i32);
        pg_sys::tuplestore_select_read_pointer(store, pointer);
        pg_sys::tuplestore_rescan(store);
        let row = Row {
            values: (*slot).tts_values,
            nulls: (*slot).tts_isnull,
        };
        TransitionReader {
            store,
            slot,
            pointer,
            row,
        }
    }

    unsafe fn next(&mut self) -> bool {
        pg_sys::tuplestore_select_read_pointer(self.store, self.pointer);
        if !pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot) {
            return false;
        }
        pg_sys::slot_getallattrs(self.slot);
        self.row = Row {
            values: (*self.slot).tts_values,
            nulls: (*self.slot).tts_isnull,
        };
        true
    }

    fn row(&self) -> &Row {
        &self.row
    }

    unsafe fn finish(self) {
        pg_sys::ExecDropSingleTupleTableSlot(self.slot);
    }
}

unsafe fn subject_of(meta: &TableMeta, row: &Row) -> Subject {
    match row.get(meta.subject.index) {
        None => Subject::Nobody,
        Some(datum) => {
            let text = pg_sys::OutputFunctionCall(
                meta.subject.output.as_ref() as *const _ as *mut _,
                datum,
            );
            Subject::Digest(keyring::subject_digest(CStr::from_ptr(text).to_bytes()))
        }
    }
}

unsafe fn format_value<'a>(column: &Column, row: &'a Row) -> Value<&'a [u8]> {
    match row.get(column.index) {
        None => Value::Null,
        Some(datum) => {
            let text =
                pg_sys::OutputFunctionCall(column.output.as_ref() as *const _ as *mut _, datum);
            // Allocated in the row context, which outlives this row's use.
            Value::Text(CStr::from_ptr(text).to_bytes())
        }
    }
}

/// Binary equality of two datums of `column`'s type (what "unchanged" means here).
unsafe fn same_datum(column: &Column, a: pg_sys::Datum, b: pg_sys::Datum) -> bool {
    pg_sys::ffi::pg_guard_ffi_boundary(|| {
        datum_image_eq(a, b, column.by_value, column.length.into())
    })
}

unsafe fn same_value(column: &Column, before: &Row, after: &Row) -> bool {
    match (before.get(column.index), after.get(column.index)) {
        (None, None) => true,
        (Some(a), Some(b)) => same_datum(column, a, b),
        _ => false,
    }
}

unsafe fn changed_columns(columns: &[Column], before: &Row, after: &Row) -> Vec<usize> {
    let old: Vec<_> = columns
        .iter()
        .map(|c| before.get(c.index).map(|d| (d, c)))
        .collect();
    let new: Vec<_> = columns
        .iter()
        .map(|c| after.get(c.index).map(|d| (d, c)))
        .collect();
    diff::changed(&old, &new, |(a, column), (b, _)| same_datum(column, *a, *b))
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).unwrap().unwrap()
    }

    fn setup() {
        Spi::run(
            "SELECT subject_audit.install_public_key(public_key), subject_audit.unlock(private_key)
             FROM subject_audit.generate_keypair();
             CREATE TABLE t (id int PRIMARY KEY, who text, email text);
             SELECT subject_audit.track('t', 'who');",
        )
        .unwrap();
    }

    /// Everything `token`'s trail shows of its changes, as one text.
    fn trail_text(token: &str) -> String {
        one(&format!(
            "SELECT string_agg(concat_ws(' ', description, before, after), ' | ' ORDER BY event_id)
             FROM subject_audit.audit_for_subject('{token}') WHERE operation <> 'READ'"
        ))
    }

    #[pg_test]
    fn a_change_of_subject_gives_each_side_only_its_own_values() {
        setup();
        Spi::run(
            "INSERT INTO t VALUES (1, 't1', 'one@t1');
             UPDATE t SET who = 't2', email = 'two@t2' WHERE id = 1;",
        )
        .unwrap();
        let (t1, t2) = (trail_text("t1"), trail_text("t2"));
        assert!(t1.contains("one@t1") && !t1.contains("two@t2"), "{t1}");
        assert!(t2.contains("two@t2") && !t2.contains("one@t1"), "{t2}");
        // t1 sees the row leave whole, t2 sees it come whole.
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', before, after) FROM subject_audit.audit_for_subject('t1')
                 WHERE operation = 'UPDATE'"
            ),
            r#"{"id": "1", "who": "t1", "email": "one@t1"}"#
        );
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', before, after) FROM subject_audit.audit_for_subject('t2')
                 WHERE operation = 'UPDATE'"
            ),
            r#"{"id": "1", "who": "t2", "email": "two@t2"}"#
        );
    }

    #[pg_test]
    fn a_row_of_nobody_is_recorded_without_values_and_its_first_subject_gets_them() {
        setup();
        Spi::run(
            "INSERT INTO t VALUES (1, NULL, 'before@assignment');
             UPDATE t SET email = 'still@nobody' WHERE id = 1;
             UPDATE t SET who = 't3' WHERE id = 1;
             UPDATE t SET who = NULL, email = 'after@release' WHERE id = 1;
             DELETE FROM t WHERE id = 1;",
        )
        .unwrap();
        // Nobody's events: INSERT, UPDATE, the two changes of subject, DELETE; none with a payload.
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.event e JOIN subject_audit.event_label l USING (label_id)
                 WHERE e.subject_key_id IS NULL AND l.table_name = 'public.t' AND e.payload IS NULL
                   AND l.operation IN ('INSERT', 'UPDATE', 'DELETE')"
            ),
            5
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.event
                 WHERE subject_key_id IS NULL AND payload IS NOT NULL"
            ),
            0
        );
        // t3 holds the row as it came (with what it carried while nobody's) and as it left.
        let t3 = trail_text("t3");
        assert!(t3.contains("still@nobody"), "{t3}");
        assert!(
            !t3.contains("before@assignment") && !t3.contains("after@release"),
            "{t3}"
        );
    }
}
