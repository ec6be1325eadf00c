//! Tracking: which tables are captured, and the trigger that captures them.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{spi, PgRelation};

use super::{admin, ddl_trail};
use crate::store::{self, error::raise, error::raise_with_hint};
use crate::{capture, deferred};

/// A trigger `track()` installs.
struct TriggerSpec {
    name: &'static str,
    /// Timing and event, `{table}` standing for the table.
    when: &'static str,
    for_each: &'static str,
    function: &'static str,
    /// `pg_trigger.tgtype` of the trigger as created.
    tgtype: i16,
}

/// The capture triggers: statement-level with transition tables; TRUNCATE
/// has none, so it is read before it happens. (Whose rows a failing
/// statement touched is noted from its plan: `observe`.)
const TRIGGERS: [TriggerSpec; 4] = [
    TriggerSpec {
        name: "subject_audit_capture_insert",
        when: "AFTER INSERT ON {table} REFERENCING NEW TABLE AS subject_audit_new",
        for_each: "STATEMENT",
        function: "capture_change",
        tgtype: 4,
    },
    TriggerSpec {
        name: "subject_audit_capture_update",
        when: "AFTER UPDATE ON {table} REFERENCING OLD TABLE AS subject_audit_old NEW TABLE AS subject_audit_new",
        for_each: "STATEMENT",
        function: "capture_change",
        tgtype: 16,
    },
    TriggerSpec {
        name: "subject_audit_capture_delete",
        when: "AFTER DELETE ON {table} REFERENCING OLD TABLE AS subject_audit_old",
        for_each: "STATEMENT",
        function: "capture_change",
        tgtype: 8,
    },
    TriggerSpec {
        name: "subject_audit_capture_truncate",
        when: "BEFORE TRUNCATE ON {table}",
        for_each: "STATEMENT",
        function: "capture_change",
        tgtype: 34,
    },
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
    // Trigger DDL runs as the caller, who must own the table, and with the
    // table closed: ALTER TABLE refuses a table this session holds open.
    let relid = tbl.oid();
    drop(tbl);
    admin::record("TRACK", &format!("track {name}"), Some(&name));
    // A partitioned table: its partitions get the triggers too, for DML
    // that names a partition directly.
    for (table, table_name) in [(relid, name)].into_iter().chain(partitions(relid)) {
        drop_triggers(table, &table_name);
        ddl_trail::own_ddl(|| create_triggers(&table_name));
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
                ddl_trail::own_ddl(|| create_triggers(&table_name));
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

/// What is wrong with the capture triggers of the tracked tables and their
/// partitions, one line per trigger: missing, disabled, firing only in
/// origin or replica mode, calling another function, or narrowed (other
/// events, a column list, a WHEN clause). Read-only and lock-free (the
/// partition tree is walked in pg_inherits, not with pg_partition_tree, which
/// locks every partition), so it can run around any DDL statement.
pub(super) fn capture_gaps() -> Vec<CaptureGap> {
    let expected = pgrx::JsonB(serde_json::Value::Array(
        TRIGGERS
            .iter()
            .map(|t| {
                serde_json::json!({"tgname": t.name, "tgtype": t.tgtype,
                    "function": t.function})
            })
            .collect(),
    ));
    let gaps = store::as_owner(|| {
        store::select_one::<Vec<String>>(
            "WITH RECURSIVE tables(relid) AS ( \
               SELECT t.relid::pg_catalog.oid FROM subject_audit.tracked_table t \
               UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tables ON i.inhparent OPERATOR(pg_catalog.=) tables.relid), \
             expected(tgname, tgtype, foid) AS (SELECT x.tgname, x.tgtype, \
               pg_catalog.to_regprocedure(pg_catalog.format('subject_audit.%s()', x.function))::pg_catalog.oid \
               FROM pg_catalog.jsonb_to_recordset($1) x(tgname pg_catalog.text, tgtype pg_catalog.int2, function pg_catalog.text)) \
             SELECT pg_catalog.array_agg(pg_catalog.format('%s: %s|%s', tables.relid::pg_catalog.regclass::pg_catalog.text, e.tgname, \
               CASE WHEN g.oid IS NULL THEN 'missing' \
                    WHEN g.tgfoid OPERATOR(pg_catalog.<>) e.foid THEN 'calls another function' \
                    WHEN g.tgtype OPERATOR(pg_catalog.<>) e.tgtype OR g.tgqual IS NOT NULL \
                      OR pg_catalog.cardinality(g.tgattr::pg_catalog.int2[]) OPERATOR(pg_catalog.>) 0 THEN 'narrowed' \
                    WHEN g.tgenabled OPERATOR(pg_catalog.=) 'D' THEN 'disabled' \
                    WHEN g.tgenabled OPERATOR(pg_catalog.=) 'R' THEN 'fires only in replica mode' \
                    ELSE 'fires only in origin mode' END) ORDER BY tables.relid, e.tgname) \
             FROM tables CROSS JOIN expected e \
             LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid OPERATOR(pg_catalog.=) tables.relid \
               AND g.tgname OPERATOR(pg_catalog.=) e.tgname \
             WHERE e.foid IS NOT NULL \
               AND (g.oid IS NULL OR g.tgfoid OPERATOR(pg_catalog.<>) e.foid \
               OR g.tgtype OPERATOR(pg_catalog.<>) e.tgtype OR g.tgqual IS NOT NULL \
               OR pg_catalog.cardinality(g.tgattr::pg_catalog.int2[]) OPERATOR(pg_catalog.>) 0 \
               OR g.tgenabled OPERATOR(pg_catalog.<>) 'A')",
            &[expected.into()],
        )
    });
    gaps.unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not check the capture triggers: {e}"),
        )
    })
    .unwrap_or_default()
    .into_iter()
    .filter_map(|line| {
        let (trigger, problem) = line.split_once('|')?;
        Some(CaptureGap {
            trigger: trigger.to_owned(),
            problem: problem.to_owned(),
        })
    })
    .collect()
}

/// One capture trigger that does not capture as it should.
pub(super) struct CaptureGap {
    /// `table: trigger_name`
    pub trigger: String,
    /// missing, disabled, fires only in origin mode, ...
    pub problem: String,
}

/// Whether `name` is one of the capture triggers' names.
pub(super) fn is_capture_trigger(name: &str) -> bool {
    trigger_function(name).is_some()
}

/// The function one of our triggers must call, by the trigger's name.
pub(super) fn trigger_function(name: &str) -> Option<&'static str> {
    TRIGGERS.iter().find(|t| t.name == name).map(|t| t.function)
}

/// The functions our triggers call.
pub(super) const TRIGGER_FUNCTIONS: [&std::ffi::CStr; 1] = [c"capture_change"];

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

/// Refuses `ALTER TABLE … DROP COLUMN` of a tracked table's subject column:
/// capture could no longer tell whose rows change.
pub(super) unsafe fn refuse_subject_column_drop(node: *mut pg_sys::Node) {
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_AlterTableStmt {
        return;
    }
    let stmt = node as *mut pg_sys::AlterTableStmt;
    let drops: Vec<String> = ddl_trail::list_items((*stmt).cmds)
        .into_iter()
        .map(|cmd| cmd as *mut pg_sys::AlterTableCmd)
        .filter(|&cmd| (*cmd).subtype == pg_sys::AlterTableType::AT_DropColumn)
        .map(|cmd| ddl_trail::text((*cmd).name))
        .collect();
    if drops.is_empty() || (*stmt).relation.is_null() {
        return;
    }
    let Some(relid) = store::relation_id((*stmt).relation) else {
        return;
    };
    let subject = store::as_owner(|| {
        store::select_one::<String>(
            "SELECT a.attname::pg_catalog.text FROM subject_audit.tracked_table t \
             JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) t.relid \
             AND a.attnum OPERATOR(pg_catalog.=) t.subject_attnum \
             WHERE t.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
            &[relid.into()],
        )
    });
    if let Ok(Some(subject)) = subject {
        if drops.contains(&subject) {
            raise_with_hint(
                ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot drop column \"{subject}\": it is the subject column of a tracked table"
                ),
                "untrack the table first with subject_audit.untrack()",
            );
        }
    }
}

/// Creates the capture triggers, firing ALWAYS: also under
/// `session_replication_role = replica` and in logical replication apply,
/// so neither is a way around capture.
fn create_triggers(name: &str) {
    for spec in &TRIGGERS {
        let (trigger, function) = (spec.name, spec.function);
        let when = spec.when.replace("{table}", name);
        Spi::run(&format!(
            "CREATE TRIGGER {trigger} {when} FOR EACH {} \
             EXECUTE FUNCTION subject_audit.{function}(); \
             ALTER TABLE {name} ENABLE ALWAYS TRIGGER {trigger}",
            spec.for_each
        ))
        .unwrap_or_else(|e| {
            raise(
                ERRCODE_INTERNAL_ERROR,
                format!("could not create trigger on {name}: {e}"),
            )
        });
    }
}

/// Drops the capture triggers `tbl` has, quietly (no "does not exist" notices).
fn drop_triggers(relid: pg_sys::Oid, name: &str) {
    ddl_trail::own_ddl(|| drop_each_trigger(relid, name));
}

fn drop_each_trigger(relid: pg_sys::Oid, name: &str) {
    for trigger in TRIGGERS.map(|t| t.name) {
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger \
             WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND tgname OPERATOR(pg_catalog.=) $2)",
            &[relid.into(), trigger.into()],
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
