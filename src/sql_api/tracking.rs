//! Tracking: which tables are captured, and the trigger that captures them.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{spi, PgRelation};

use super::{admin, ddl_trail};
use crate::capture;
use crate::store::{self, error::raise};

const TRIGGERS: [(&str, &str, &str); 3] = [
    (
        "subject_audit_capture_insert",
        "INSERT",
        "NEW TABLE AS subject_audit_new",
    ),
    (
        "subject_audit_capture_update",
        "UPDATE",
        "OLD TABLE AS subject_audit_old NEW TABLE AS subject_audit_new",
    ),
    (
        "subject_audit_capture_delete",
        "DELETE",
        "OLD TABLE AS subject_audit_old",
    ),
];

fn quoted_name(table: &PgRelation) -> String {
    let schema = spi::quote_identifier(table.namespace());
    format!("{schema}.{}", spi::quote_identifier(table.name()))
}

fn attnum(table: &PgRelation, column: &str) -> i16 {
    let name = std::ffi::CString::new(column).unwrap_or_default();
    let attnum = unsafe { pg_sys::get_attnum(table.oid(), name.as_ptr()) };
    if attnum <= 0 {
        raise(
            ERRCODE_UNDEFINED_COLUMN,
            format!(
                "column \"{column}\" of {} does not exist",
                quoted_name(table)
            ),
        );
    }
    attnum
}

/// Starts capturing every change to `tbl`; tracking again replaces the settings.
#[pg_extern(volatile, parallel_unsafe)]
fn track(tbl: PgRelation, subject_column: &str, exclude_columns: default!(Vec<String>, "'{}'")) {
    let name = quoted_name(&tbl);
    let kind = unsafe { (*tbl.rd_rel).relkind };
    if kind != pg_sys::RELKIND_RELATION as std::ffi::c_char
        && kind != pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char
    {
        raise(
            ERRCODE_WRONG_OBJECT_TYPE,
            format!("{name} is not a table: only tables can be tracked"),
        );
    }
    let subject = attnum(&tbl, subject_column);
    let excluded: Vec<i16> = exclude_columns.iter().map(|c| attnum(&tbl, c)).collect();
    if excluded.contains(&subject) {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("the subject column \"{subject_column}\" cannot be excluded"),
        );
    }
    let has_key = store::as_owner(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM subject_audit.writer_key WHERE retired_at IS NULL)",
        )
    });
    if !matches!(has_key, Ok(Some(true))) {
        raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "install a public key with subject_audit.install_public_key() before tracking tables",
        );
    }
    store::as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO subject_audit.tracked_table (relid, subject_attnum, exclude_attnums) \
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3) \
             ON CONFLICT (relid) DO UPDATE SET subject_attnum = excluded.subject_attnum, \
             exclude_attnums = excluded.exclude_attnums",
            &[tbl.oid().into(), subject.into(), excluded.into()],
        )
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not record tracking of {name}: {e}"),
        )
    });
    // Trigger DDL runs as the caller, who must own the table.
    drop_triggers(&tbl, &name);
    admin::record("TRACK", &format!("track {name}"), Some(&name));
    for (trigger, event, transition) in TRIGGERS {
        Spi::run(&format!(
            "CREATE TRIGGER {trigger} AFTER {event} ON {name} REFERENCING {transition} \
             FOR EACH STATEMENT EXECUTE FUNCTION subject_audit.capture_change()"
        ))
        .unwrap_or_else(|e| {
            raise(
                ERRCODE_INTERNAL_ERROR,
                format!("could not create trigger on {name}: {e}"),
            )
        });
    }
    store::invalidate(tbl.oid());
}

/// Stops capturing `tbl`; its recorded events stay.
#[pg_extern(volatile, parallel_unsafe)]
fn untrack(tbl: PgRelation) {
    let name = quoted_name(&tbl);
    let removed = store::as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "WITH d AS (DELETE FROM subject_audit.tracked_table \
             WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass RETURNING 1) \
             SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM d",
            &[tbl.oid().into()],
        )
    });
    if !matches!(removed, Ok(Some(true))) {
        raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{name} is not tracked"),
        );
    }
    drop_triggers(&tbl, &name);
    store::invalidate(tbl.oid());
    admin::record("UNTRACK", &format!("untrack {name}"), Some(&name));
}

/// Drops the capture triggers `tbl` has, quietly (no "does not exist" notices).
fn drop_triggers(tbl: &PgRelation, name: &str) {
    ddl_trail::own_ddl(|| drop_each_trigger(tbl, name));
}

fn drop_each_trigger(tbl: &PgRelation, name: &str) {
    for (trigger, _, _) in TRIGGERS {
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger \
             WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND tgname OPERATOR(pg_catalog.=) $2)",
            &[tbl.oid().into(), trigger.into()],
        );
        if matches!(exists, Ok(Some(true))) {
            Spi::run(&format!("DROP TRIGGER {trigger} ON {name}")).unwrap_or_else(|e| {
                raise(
                    ERRCODE_INTERNAL_ERROR,
                    format!("could not drop trigger on {name}: {e}"),
                )
            });
        }
    }
}

/// The capture trigger `track()` installs: AFTER INSERT, UPDATE or DELETE,
/// FOR EACH STATEMENT, with transition tables.
#[pg_trigger]
fn capture_change<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    unsafe { capture::on_statement(trigger.trigger_data()) };
    Ok(None)
}
