//! What capture needs to know about a tracked table, built once per backend
//! and dropped when the table's relcache entry is invalidated (ALTER TABLE,
//! track, untrack, DROP).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use crate::store::{self, error::raise};

pub struct Column {
    /// 0-based position in the table's tuple descriptor.
    pub index: usize,
    pub name: String,
    pub json: bool,
    pub by_value: bool,
    pub length: i16,
    pub output: Box<pg_sys::FmgrInfo>,
}

pub struct TableMeta {
    /// `schema.table` when the metadata was built: events keep it as text.
    pub name: String,
    pub subject: Column,
    /// Captured columns: every live column but the excluded ones.
    pub columns: Vec<Column>,
    /// Their names, shared by every INSERT and DELETE event of the table.
    pub column_names: std::rc::Rc<[String]>,
    memory: pg_sys::MemoryContext,
}

impl Drop for TableMeta {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.memory) };
    }
}

thread_local! {
    static TABLES: RefCell<HashMap<pg_sys::Oid, Rc<TableMeta>>> = RefCell::new(HashMap::new());
    /// Bumped by every invalidation: metadata built while it moved is not cached.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn get(relation: pg_sys::Relation) -> Rc<TableMeta> {
    let relid = unsafe { (*relation).rd_id };
    if let Some(meta) = TABLES.with(|t| t.borrow().get(&relid).cloned()) {
        return meta;
    }
    let seen = GENERATION.with(std::cell::Cell::get);
    let meta = Rc::new(unsafe { build(relation) });
    // Under REPEATABLE READ the tracking settings were read in an old
    // snapshot: good for this transaction, not for the next one.
    let transaction_snapshot =
        unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32;
    if !transaction_snapshot && GENERATION.with(std::cell::Cell::get) == seen {
        TABLES.with(|t| t.borrow_mut().insert(relid, meta.clone()));
    }
    meta
}

pub fn on_relation_invalidated(relid: pg_sys::Oid) {
    GENERATION.with(|g| g.set(g.get() + 1));
    TABLES.with(|t| {
        let mut t = t.borrow_mut();
        if relid == pg_sys::InvalidOid {
            t.clear();
        } else {
            t.remove(&relid);
        }
    });
}

unsafe fn build(relation: pg_sys::Relation) -> TableMeta {
    let relid = (*relation).rd_id;
    let config = store::as_owner(|| {
        Spi::get_two_with_args::<i16, Vec<i16>>(
            "SELECT subject_attnum, exclude_attnums FROM subject_audit.tracked_table \
             WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
            &[relid.into()],
        )
    });
    let name = qualified_name(relation);
    let (subject_attnum, excluded) = match config {
        Ok((Some(s), e)) => (s, e.unwrap_or_default()),
        _ => raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {name} is not tracked by pg_subject_audit; drop its subject_audit triggers or call subject_audit.track()"),
        ),
    };
    let memory = pg_sys::AllocSetContextCreateExtended(
        pg_sys::CacheMemoryContext,
        c"pg_subject_audit table".as_ptr(),
        pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
        pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
        pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
    );
    let tupdesc = (*relation).rd_att;
    let mut subject = None;
    let mut columns = Vec::new();
    for index in 0..(*tupdesc).natts as usize {
        let attr = &*(*tupdesc).attrs.as_ptr().add(index);
        if attr.attisdropped {
            continue;
        }
        let attnum = attr.attnum;
        let column = || {
            let mut output_fn = pg_sys::InvalidOid;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(attr.atttypid, &mut output_fn, &mut varlena);
            let mut output = Box::new(std::mem::zeroed::<pg_sys::FmgrInfo>());
            pg_sys::fmgr_info_cxt(output_fn, output.as_mut(), memory);
            Column {
                index,
                name: CStr::from_ptr(attr.attname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                json: attr.atttypid == pg_sys::JSONOID || attr.atttypid == pg_sys::JSONBOID,
                by_value: attr.attbyval,
                length: attr.attlen,
                output,
            }
        };
        if attnum == subject_attnum {
            subject = Some(column());
        }
        if !excluded.contains(&attnum) {
            columns.push(column());
        }
    }
    let Some(subject) = subject else {
        pg_sys::MemoryContextDelete(memory);
        raise(
            ERRCODE_UNDEFINED_COLUMN,
            format!(
                "the subject column of {name} no longer exists; call subject_audit.track() again"
            ),
        );
    };
    TableMeta {
        name,
        subject,
        column_names: columns.iter().map(|c| c.name.clone()).collect(),
        columns,
        memory,
    }
}

unsafe fn qualified_name(relation: pg_sys::Relation) -> String {
    let schema = pg_sys::get_namespace_name((*(*relation).rd_rel).relnamespace);
    let table = (*(*relation).rd_rel).relname.data.as_ptr();
    let schema = if schema.is_null() {
        "?".into()
    } else {
        CStr::from_ptr(schema).to_string_lossy()
    };
    format!("{}.{}", schema, CStr::from_ptr(table).to_string_lossy())
}
