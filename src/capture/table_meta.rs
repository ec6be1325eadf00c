//! What capture needs to know about a tracked table, built once per backend
//! and dropped when the table's relcache entry is invalidated (ALTER TABLE,
//! track, untrack, DROP). A partition is captured as part of its nearest
//! tracked ancestor: same name in the events, columns matched by name (a
//! partition's column numbers may differ from its parent's).

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
    /// `schema.table` of the tracked table (a partition's tracked ancestor)
    /// when the metadata was built: events keep it as text.
    pub name: String,
    /// The tracked table itself, or the partition's tracked ancestor.
    pub tracked: pg_sys::Oid,
    pub subject: Column,
    /// Captured columns: every live column but the excluded ones.
    pub columns: Vec<Column>,
    /// Their names, shared by every INSERT and DELETE event of the table.
    pub column_names: std::rc::Rc<[String]>,
    /// The excluded columns' names: they must appear nowhere, not even in
    /// a failed statement's error text.
    pub excluded: Vec<String>,
    memory: pg_sys::MemoryContext,
}

impl Drop for TableMeta {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.memory) };
    }
}

thread_local! {
    static TABLES: RefCell<HashMap<pg_sys::Oid, Rc<TableMeta>>> = RefCell::new(HashMap::new());
    /// Metadata read under a REPEATABLE READ or SERIALIZABLE snapshot: good
    /// until the transaction ends (`end_of_transaction`), not beyond.
    static TRANSACTION_TABLES: RefCell<HashMap<pg_sys::Oid, Rc<TableMeta>>> = RefCell::new(HashMap::new());
    /// Bumped by every invalidation: metadata built while it moved is not cached.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The metadata of a table capture fires on; an error if it is not tracked.
pub fn get(relation: pg_sys::Relation) -> Rc<TableMeta> {
    lookup(relation).unwrap_or_else(|| {
        let here = unsafe { qualified_name(relation) };
        raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {here} is not tracked by pg_subject_audit; drop its subject_audit triggers or call subject_audit.track()"),
        )
    })
}

/// The metadata of `relation` if it is tracked (itself or through an ancestor).
pub fn lookup(relation: pg_sys::Relation) -> Option<Rc<TableMeta>> {
    let relid = unsafe { (*relation).rd_id };
    let cached = TABLES
        .with(|t| t.borrow().get(&relid).cloned())
        .or_else(|| TRANSACTION_TABLES.with(|t| t.borrow().get(&relid).cloned()));
    if cached.is_some() {
        return cached;
    }
    let seen = GENERATION.with(std::cell::Cell::get);
    let meta = Rc::new(unsafe { build(relation) }?);
    // Under REPEATABLE READ the tracking settings were read in an old
    // snapshot: good for this transaction, not for the next one.
    let transaction_snapshot =
        unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32;
    if GENERATION.with(std::cell::Cell::get) == seen {
        let cache = if transaction_snapshot {
            &TRANSACTION_TABLES
        } else {
            &TABLES
        };
        cache.with(|t| t.borrow_mut().insert(relid, meta.clone()));
    }
    Some(meta)
}

/// The transaction ended: what its snapshot said is forgotten.
pub fn end_of_transaction() {
    TRANSACTION_TABLES.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            t.clear();
        }
    });
}

pub fn on_relation_invalidated(relid: pg_sys::Oid) {
    GENERATION.with(|g| g.set(g.get() + 1));
    TRANSACTION_TABLES.with(|t| t.borrow_mut().clear());
    TABLES.with(|t| {
        let mut t = t.borrow_mut();
        if relid == pg_sys::InvalidOid {
            t.clear();
        } else {
            // A partition's entry also goes when its tracked ancestor changes.
            t.retain(|&key, meta| key != relid && meta.tracked != relid);
        }
    });
}

unsafe fn build(relation: pg_sys::Relation) -> Option<TableMeta> {
    let relid = (*relation).rd_id;
    // The table itself, else its nearest tracked ancestor; columns by name.
    let config = store::as_owner(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "WITH a AS (SELECT $1::pg_catalog.oid::pg_catalog.regclass AS relid, 0::pg_catalog.int8 AS depth \
                 UNION ALL SELECT p.relid, p.depth FROM pg_catalog.pg_partition_ancestors($1::pg_catalog.oid::pg_catalog.regclass) \
                 WITH ORDINALITY p(relid, depth)) \
                 SELECT t.relid::pg_catalog.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), \
                 (SELECT x.attname::pg_catalog.text FROM pg_catalog.pg_attribute x \
                  WHERE x.attrelid OPERATOR(pg_catalog.=) t.relid AND x.attnum OPERATOR(pg_catalog.=) t.subject_attnum), \
                 ARRAY(SELECT x.attname::pg_catalog.text FROM pg_catalog.pg_attribute x \
                  WHERE x.attrelid OPERATOR(pg_catalog.=) t.relid AND x.attnum OPERATOR(pg_catalog.=) ANY (t.exclude_attnums)) \
                 FROM a JOIN subject_audit.tracked_table t ON t.relid OPERATOR(pg_catalog.=) a.relid \
                 JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid \
                 JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                 ORDER BY a.depth LIMIT 1",
                Some(1),
                &[relid.into()],
            )?;
            if rows.is_empty() {
                return Ok(None);
            }
            let row = rows.first();
            Ok::<_, pgrx::spi::SpiError>(Some((
                row.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?,
                row.get::<Vec<String>>(4)?.unwrap_or_default(),
            )))
        })
    });
    let Ok(Some((tracked, name, subject_name, excluded_names))) = config else {
        return None;
    };
    let attnum_here = |column: &str| {
        let column = std::ffi::CString::new(column).unwrap_or_default();
        pg_sys::get_attnum(relid, column.as_ptr())
    };
    let subject_attnum = subject_name.as_deref().map_or(0, attnum_here);
    let excluded: Vec<i16> = excluded_names.iter().map(|c| attnum_here(c)).collect();
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
    Some(TableMeta {
        name,
        tracked,
        subject,
        column_names: columns.iter().map(|c| c.name.clone()).collect(),
        columns,
        excluded: excluded_names,
        memory,
    })
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
