//! Tracking: which tables are captured, and the trigger that captures them.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{spi, PgRelation};

use super::admin;
use super::capture_triggers::{create_triggers, drop_triggers};
use crate::store::{self, error::raise};
use crate::{capture, deferred};

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
fn track(
    tbl: Option<PgRelation>,
    subject_column: Option<&str>,
    exclude_columns: default!(Option<Vec<Option<String>>>, "'{}'"),
) {
    let tbl = super::required(tbl, "tbl");
    let subject_column = super::required(subject_column, "subject_column");
    let exclude_columns: Vec<String> = super::required(exclude_columns, "exclude_columns")
        .into_iter()
        .map(|c| super::required(c, "an element of exclude_columns"))
        .collect();
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
    // Tracking again repairs whatever `tracked` shows wrong (triggers
    // recreated, the name it goes by now recorded): the event says what.
    let problems = store::as_owner(|| {
        store::select_one::<Vec<String>>(
            "SELECT problems FROM subject_audit.tracked \
             WHERE table_name OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
            &[tbl.oid().into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or_default();
    store::as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO subject_audit.tracked_table (relid, subject_attnum, exclude_attnums, tracked_as) \
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4) \
             ON CONFLICT (relid) DO UPDATE SET subject_attnum = excluded.subject_attnum, \
             exclude_attnums = excluded.exclude_attnums, tracked_as = excluded.tracked_as",
            &[
                tbl.oid().into(),
                subject.into(),
                excluded.into(),
                name.as_str().into(),
            ],
        )
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not record tracking of {name}: {e}"),
        )
    });
    // Trigger DDL runs as the caller, who must own the table, and with the
    // table closed: ALTER TABLE refuses a table this session holds open.
    let relid = tbl.oid();
    drop(tbl);
    let title = match problems.is_empty() {
        true => format!("track {name}"),
        false => format!("track {name} (repairs: {})", problems.join("; ")),
    };
    admin::record("TRACK", &title, Some(&name));
    // A partitioned table: its partitions get the triggers too, for DML
    // that names a partition directly.
    for (table, table_name) in [(relid, name)].into_iter().chain(partitions(relid)) {
        drop_triggers(table, &table_name);
        create_triggers(&table_name);
        store::invalidate(table);
    }
    if !deferred::available() {
        notice!("pg_subject_audit is not in shared_preload_libraries: changes are captured, but reads of this table and failed statements on it are not recorded");
    }
}

/// Stops capturing `tbl`; its recorded events stay.
#[pg_extern(volatile, parallel_unsafe)]
fn untrack(tbl: Option<PgRelation>) {
    let tbl = super::required(tbl, "tbl");
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
    let relid = tbl.oid();
    drop(tbl);
    for (table, table_name) in [(relid, name.clone())].into_iter().chain(partitions(relid)) {
        drop_triggers(table, &table_name);
        store::invalidate(table);
    }
    admin::record("UNTRACK", &format!("untrack {name}"), Some(&name));
}

/// Every partition below `relid` (none for a plain table), with quoted names.
fn partitions(relid: pg_sys::Oid) -> Vec<(pg_sys::Oid, String)> {
    let rows = Spi::connect(|client| {
        client
            .select(
                "SELECT p.relid::pg_catalog.oid, pg_catalog.format('%I.%I', n.nspname, c.relname) \
                 FROM pg_catalog.pg_partition_tree($1::pg_catalog.oid::pg_catalog.regclass) p \
                 JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.relid \
                 JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                 WHERE p.relid OPERATOR(pg_catalog.<>) $1::pg_catalog.oid::pg_catalog.regclass",
                None,
                &[relid.into()],
            )?
            .map(|row| Ok((row.get::<pg_sys::Oid>(1)?, row.get::<String>(2)?)))
            .collect::<Result<Vec<_>, spi::SpiError>>()
    });
    rows.unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not list partitions: {e}"),
        )
    })
    .into_iter()
    .filter_map(|(oid, name)| Some((oid?, name?)))
    .collect()
}

/// The tracked table `relid` belongs to: itself or its nearest tracked
/// partition ancestor.
fn tracked_ancestor(relid: pg_sys::Oid) -> Option<String> {
    store::as_owner(|| {
        store::select_one::<String>(
            "SELECT t.relid::pg_catalog.text \
             FROM pg_catalog.pg_partition_ancestors($1::pg_catalog.oid::pg_catalog.regclass) WITH ORDINALITY a(relid, depth) \
             JOIN subject_audit.tracked_table t ON t.relid OPERATOR(pg_catalog.=) a.relid ORDER BY a.depth LIMIT 1",
            &[relid.into()],
        )
    })
    .ok()
    .flatten()
}

/// A partition created in, attached to or detached from a partitioned table:
/// it gets (or loses) the capture triggers of its tracked ancestor, with an
/// admin event saying so.
pub(super) fn follow_partition(relid: pg_sys::Oid, attached: bool) {
    let name = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
         WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into()],
    );
    let Ok(Some(name)) = name else { return };
    let ancestor = tracked_ancestor(relid);
    let tables = || [(relid, name.clone())].into_iter().chain(partitions(relid));
    match (attached, ancestor) {
        (true, Some(ancestor)) => {
            for (table, table_name) in tables() {
                drop_triggers(table, &table_name);
                create_triggers(&table_name);
                store::invalidate(table);
            }
            admin::record(
                "TRACK",
                &format!("track {name} (partition of {ancestor})"),
                Some(&name),
            );
        }
        (false, None) => {
            for (table, table_name) in tables() {
                drop_triggers(table, &table_name);
                store::invalidate(table);
            }
            admin::record(
                "UNTRACK",
                &format!("untrack {name} (partition detached)"),
                Some(&name),
            );
        }
        _ => {}
    }
}

/// Tracked tables by OID, with their names while they still have them.
pub(super) fn tracked_tables() -> Vec<(pg_sys::Oid, String)> {
    let rows = store::as_owner(|| {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT relid::pg_catalog.oid, relid::pg_catalog.text FROM subject_audit.tracked_table",
                    None,
                    &[],
                )?
                .map(|row| Ok((row.get::<pg_sys::Oid>(1)?, row.get::<String>(2)?)))
                .collect::<Result<Vec<_>, spi::SpiError>>()
        })
    });
    rows.unwrap_or_default()
        .into_iter()
        .filter_map(|(oid, name)| Some((oid?, name?)))
        .collect()
}

/// After a DROP: tables that are gone leave `tracked`, with an UNTRACK event
/// in the admin trail; their events stay.
pub(super) fn forget_dropped_tables(before: &[(pg_sys::Oid, String)]) {
    let gone = store::as_owner(|| {
        Spi::get_one::<Vec<pg_sys::Oid>>(
            "WITH d AS (DELETE FROM subject_audit.tracked_table t WHERE NOT EXISTS \
             (SELECT FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) t.relid) \
             RETURNING t.relid::pg_catalog.oid AS oid) SELECT pg_catalog.array_agg(oid) FROM d",
        )
    })
    .ok()
    .flatten()
    .unwrap_or_default();
    for (_, name) in before.iter().filter(|(oid, _)| gone.contains(oid)) {
        admin::record(
            "UNTRACK",
            &format!("untrack {name} (table dropped)"),
            Some(name),
        );
    }
}

/// After a statement that may rename tables or move them to another schema:
/// a tracked table that goes by another name now leaves a RENAME event. Its
/// changes are still captured, under the new name; whatever takes the old
/// name is not tracked (`tracked` shows it until `track()` is run again).
pub(super) fn record_renames(before: &[(pg_sys::Oid, String)]) {
    let after = tracked_tables();
    for (oid, old) in before {
        let Some((_, new)) = after.iter().find(|(o, _)| o == oid) else {
            continue;
        };
        if new != old {
            admin::record(
                "RENAME",
                &format!("rename tracked table {old} to {new}: {old} is no longer captured"),
                Some(new),
            );
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
