//! ALTER TABLE that would change or remove captured values without an event
//! is refused before it runs (the values' own history stays whole):
//! - ALTER COLUMN … TYPE of a captured column (the subject column included),
//!   unless no value can change: no USING, the same base type (text and
//!   varchar count as one: same bytes, same text) and no new or narrower
//!   length limit (a longer varchar, or none, is fine).
//! - DROP COLUMN of the subject column, always; of another captured column
//!   while any row still holds a value in it (checked under the statement's
//!   own lock, so no value can slip in before the drop).
//!
//! Excluded columns are never recorded: they may change freely.

use std::ffi::CString;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use super::nodes::{list_items, text};
use crate::store::{self, error::raise_with_hint};

/// A tracked table the statement reaches (the table itself, a tracked
/// ancestor, or a tracked partition below it), with what it records.
struct Tracked {
    name: String,
    subject: String,
    excluded: Vec<String>,
}

impl Tracked {
    fn captures(&self, column: &str) -> bool {
        !self.excluded.iter().any(|c| c == column)
    }
}

/// Refuses an ALTER TABLE whose column changes would change or remove
/// captured values unrecorded. Runs before the statement.
///
/// # Safety
/// `node` must be a valid parse tree (or NULL).
pub(super) unsafe fn refuse_unrecorded_value_changes(node: *mut pg_sys::Node) {
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_AlterTableStmt {
        return;
    }
    let stmt = node as *mut pg_sys::AlterTableStmt;
    let cmds: Vec<*mut pg_sys::AlterTableCmd> = list_items((*stmt).cmds)
        .into_iter()
        .map(|cmd| cmd as *mut pg_sys::AlterTableCmd)
        .filter(|&cmd| {
            matches!(
                (*cmd).subtype,
                pg_sys::AlterTableType::AT_AlterColumnType | pg_sys::AlterTableType::AT_DropColumn
            )
        })
        .collect();
    if cmds.is_empty() || (*stmt).relation.is_null() {
        return;
    }
    let Some(relid) = store::relation_id((*stmt).relation) else {
        return;
    };
    // Not the owner: PostgreSQL refuses the statement itself (and no lock
    // is taken here on a table the caller may not alter).
    if !pg_sys::pg_class_ownercheck(relid, pg_sys::GetUserId()) {
        return;
    }
    let tracked = tracked_around(relid);
    if tracked.is_empty() {
        return;
    }
    for cmd in cmds {
        let column = text((*cmd).name);
        let Some(table) = tracked
            .iter()
            .find(|t| t.subject == column)
            .or_else(|| tracked.iter().find(|t| t.captures(&column)))
        else {
            continue;
        };
        if (*cmd).subtype == pg_sys::AlterTableType::AT_AlterColumnType {
            refuse_type_change(relid, &column, (*cmd).def as *mut pg_sys::ColumnDef, table);
        } else if column == table.subject {
            raise_with_hint(
                ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot drop column \"{column}\": it is the subject column of tracked table {}",
                    table.name
                ),
                "untrack the table first with subject_audit.untrack() (an UNTRACK event records it)",
            );
        } else if holds_values(relid, &column) {
            raise_with_hint(
                ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot drop column \"{column}\" of tracked table {}: rows still hold values in it, and dropping it would remove them unrecorded",
                    table.name
                ),
                format!(
                    "set it to NULL first (UPDATE … SET \"{column}\" = NULL is captured per subject), or stop recording it with subject_audit.track() and exclude_columns (a TRACK event records it)"
                ),
            );
        }
    }
}

/// Refuses a type change of a captured column that could change its values.
unsafe fn refuse_type_change(
    relid: pg_sys::Oid,
    column: &str,
    def: *mut pg_sys::ColumnDef,
    table: &Tracked,
) {
    let name = CString::new(column).unwrap_or_default();
    let attnum = pg_sys::get_attnum(relid, name.as_ptr());
    if attnum <= 0 || def.is_null() {
        return;
    }
    let (mut old_type, mut old_typmod, mut collation) =
        (pg_sys::InvalidOid, -1, pg_sys::InvalidOid);
    pg_sys::get_atttypetypmodcoll(
        relid,
        attnum,
        &mut old_type,
        &mut old_typmod,
        &mut collation,
    );
    let (mut new_type, mut new_typmod) = (pg_sys::InvalidOid, -1);
    pg_sys::typenameTypeIdAndMod(
        std::ptr::null_mut(),
        (*def).typeName,
        &mut new_type,
        &mut new_typmod,
    );
    // A domain's values are its base type's, with the base's length limit.
    let old_base = pg_sys::getBaseTypeAndTypmod(old_type, &mut old_typmod);
    let new_base = pg_sys::getBaseTypeAndTypmod(new_type, &mut new_typmod);
    let using = !(*def).raw_default.is_null();
    if !using && keeps_values((old_base, old_typmod), (new_base, new_typmod)) {
        return;
    }
    let what = match using {
        true => "a USING expression may change",
        false => "the new type may change",
    };
    raise_with_hint(
        ERRCODE_FEATURE_NOT_SUPPORTED,
        format!(
            "cannot change the type of column \"{column}\" of tracked table {}: {what} its values, unrecorded",
            table.name
        ),
        "add a new column and fill it with UPDATE (captured per subject), or untrack the table first with subject_audit.untrack() (an UNTRACK event records it)",
    );
}

/// Whether converting values of base type and length limit `old` to `new`,
/// without USING, leaves every value's text as it was. Only the same type
/// does (text and varchar alike), with no length limit added or narrowed: a
/// new limit can cut trailing spaces, a longer char(n) pads, another numeric
/// scale rounds or adds digits.
fn keeps_values(old: (pg_sys::Oid, i32), new: (pg_sys::Oid, i32)) -> bool {
    let text_like = |t: pg_sys::Oid| match t {
        pg_sys::VARCHAROID => pg_sys::TEXTOID,
        t => t,
    };
    let ((old_type, old_typmod), (new_type, new_typmod)) = (old, new);
    text_like(old_type) == text_like(new_type)
        && (new_typmod < 0
            || new_typmod == old_typmod
            || (new_type == pg_sys::VARCHAROID && old_typmod >= 0 && new_typmod > old_typmod))
}

/// The tracked tables an ALTER TABLE of `relid` reaches: `relid` itself or
/// its nearest tracked ancestor, and tracked tables below it.
fn tracked_around(relid: pg_sys::Oid) -> Vec<Tracked> {
    let rows = store::as_owner(|| {
        Spi::connect(|client| {
            client
                .select(
                    "WITH RECURSIVE below(relid) AS (SELECT $1::pg_catalog.oid \
                       UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i \
                       JOIN below ON i.inhparent OPERATOR(pg_catalog.=) below.relid) \
                     SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), \
                       (SELECT x.attname::pg_catalog.text FROM pg_catalog.pg_attribute x \
                        WHERE x.attrelid OPERATOR(pg_catalog.=) t.relid AND x.attnum OPERATOR(pg_catalog.=) t.subject_attnum), \
                       ARRAY(SELECT x.attname::pg_catalog.text FROM pg_catalog.pg_attribute x \
                        WHERE x.attrelid OPERATOR(pg_catalog.=) t.relid AND x.attnum OPERATOR(pg_catalog.=) ANY (t.exclude_attnums)) \
                     FROM subject_audit.tracked_table t \
                     JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid \
                     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                     WHERE t.relid::pg_catalog.oid IN (SELECT relid FROM below \
                       UNION SELECT a.relid::pg_catalog.oid FROM pg_catalog.pg_partition_ancestors($1::pg_catalog.oid::pg_catalog.regclass) a(relid))",
                    None,
                    &[relid.into()],
                )?
                .map(|row| {
                    Ok(Tracked {
                        name: row.get::<String>(1)?.unwrap_or_default(),
                        subject: row.get::<String>(2)?.unwrap_or_default(),
                        excluded: row.get::<Vec<String>>(3)?.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
    });
    rows.unwrap_or_else(|e| {
        store::error::raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not read the tracked tables: {e}"),
        )
    })
}

/// Whether any row of `relid` (or of its partitions) holds a value in
/// `column`. Each table is locked as DROP COLUMN would lock it (ACCESS
/// EXCLUSIVE, held to the end of the transaction) before it is read, under a
/// fresh snapshot: what is seen is what the drop would remove. Read through
/// the table access method, not SQL: no row-level security policy or
/// privilege hides a row from it.
unsafe fn holds_values(relid: pg_sys::Oid, column: &str) -> bool {
    let lock = pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE;
    pg_sys::LockRelationOid(relid, lock);
    let below = store::as_owner(|| {
        Spi::get_one_with_args::<Vec<pg_sys::Oid>>(
            "WITH RECURSIVE below(relid, depth) AS (SELECT $1::pg_catalog.oid, 0 \
               UNION SELECT i.inhrelid, below.depth OPERATOR(pg_catalog.+) 1 FROM pg_catalog.pg_inherits i \
               JOIN below ON i.inhparent OPERATOR(pg_catalog.=) below.relid) \
             SELECT pg_catalog.array_agg(relid ORDER BY depth, relid) FROM below",
            &[relid.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or_default();
    let name = CString::new(column).unwrap_or_default();
    below.into_iter().any(|table| {
        pg_sys::LockRelationOid(table, lock);
        column_has_value(table, &name)
    })
}

/// Whether a row of the plain table `relid` (locked) has a non-NULL `column`.
unsafe fn column_has_value(relid: pg_sys::Oid, column: &std::ffi::CStr) -> bool {
    // Partitioned tables hold no rows; a foreign table's rows are elsewhere.
    if pg_sys::get_rel_relkind(relid) != pg_sys::RELKIND_RELATION as std::ffi::c_char {
        return false;
    }
    let attnum = pg_sys::get_attnum(relid, column.as_ptr());
    if attnum <= 0 {
        return false;
    }
    let relation = pg_sys::table_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
    let am = &*(*relation).rd_tableam;
    let (Some(begin), Some(next), Some(end)) = (am.scan_begin, am.scan_getnextslot, am.scan_end)
    else {
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        return true;
    };
    let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
    let slot = pg_sys::table_slot_create(relation, std::ptr::null_mut());
    let scan = begin(
        relation,
        snapshot,
        0,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        pg_sys::ScanOptions::SO_TYPE_SEQSCAN
            | pg_sys::ScanOptions::SO_ALLOW_STRAT
            | pg_sys::ScanOptions::SO_ALLOW_SYNC
            | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE,
    );
    let mut found = false;
    while next(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
        if i32::from((*slot).tts_nvalid) < i32::from(attnum) {
            pg_sys::slot_getsomeattrs_int(slot, i32::from(attnum));
        }
        if !*(*slot).tts_isnull.add(attnum as usize - 1) {
            found = true;
            break;
        }
    }
    end(scan);
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    pg_sys::UnregisterSnapshot(snapshot);
    pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const VARCHAR: pg_sys::Oid = pg_sys::VARCHAROID;
    const TEXT: pg_sys::Oid = pg_sys::TEXTOID;

    #[test]
    fn only_the_same_values_in_the_same_length_limit_or_a_wider_one_keep_values() {
        // varchar(50) -> varchar(100), varchar(50) -> text, text -> varchar.
        assert!(keeps_values((VARCHAR, 54), (VARCHAR, 104)));
        assert!(keeps_values((VARCHAR, 54), (TEXT, -1)));
        assert!(keeps_values((TEXT, -1), (VARCHAR, -1)));
        assert!(keeps_values((pg_sys::INT4OID, -1), (pg_sys::INT4OID, -1)));
        // Narrower, or a limit where there was none: trailing spaces are cut.
        assert!(!keeps_values((VARCHAR, 104), (VARCHAR, 54)));
        assert!(!keeps_values((TEXT, -1), (VARCHAR, 54)));
        // char(n) pads, numeric scale changes digits, int -> bigint is another type.
        assert!(!keeps_values(
            (pg_sys::BPCHAROID, 9),
            (pg_sys::BPCHAROID, 14)
        ));
        assert!(!keeps_values(
            (pg_sys::NUMERICOID, 0x000a_0006),
            (pg_sys::NUMERICOID, 0x000c_0007)
        ));
        assert!(!keeps_values((pg_sys::INT4OID, -1), (pg_sys::INT8OID, -1)));
        assert!(!keeps_values((pg_sys::INT4OID, -1), (pg_sys::OIDOID, -1)));
    }
}
