//! The capture triggers `track()` installs on a tracked table and its
//! partitions, and what is wrong with them: used by tracking (which
//! manages them) and by the utility hook (which watches them).

use std::cell::Cell;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use crate::store::{self, error::raise};

thread_local! {
    /// Set while `track()`/`untrack()` manage the triggers themselves: they
    /// leave their own TRACK/UNTRACK events.
    static OWN_DDL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, whose trigger DDL is the extension's own and not recorded by the hook.
pub(super) fn own_ddl<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag however `f` ends, an error included.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OWN_DDL.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OWN_DDL.with(|o| o.replace(true)));
    f()
}

/// Whether the statement running now is the extension's own trigger DDL.
pub(super) fn in_own_ddl() -> bool {
    OWN_DDL.with(Cell::get)
}

/// A trigger `track()` installs. What it must look like once created (its
/// `pg_trigger.tgtype`, function, ALWAYS) is checked by the view
/// `subject_audit.trigger_gaps` (sql/finalize.sql), which lists the same names.
struct TriggerSpec {
    name: &'static str,
    /// Timing and event, `{table}` standing for the table.
    when: &'static str,
    function: &'static str,
}

/// The capture triggers: statement-level with transition tables; TRUNCATE
/// has none, so it is read before it happens. (Whose rows a failing
/// statement touched is noted from its plan: `observe`.)
const TRIGGERS: [TriggerSpec; 4] = [
    TriggerSpec {
        name: "subject_audit_capture_insert",
        when: "AFTER INSERT ON {table} REFERENCING NEW TABLE AS subject_audit_new",
        function: "capture_change",
    },
    TriggerSpec {
        name: "subject_audit_capture_update",
        when: "AFTER UPDATE ON {table} REFERENCING OLD TABLE AS subject_audit_old NEW TABLE AS subject_audit_new",
        function: "capture_change",
    },
    TriggerSpec {
        name: "subject_audit_capture_delete",
        when: "AFTER DELETE ON {table} REFERENCING OLD TABLE AS subject_audit_old",
        function: "capture_change",
    },
    TriggerSpec {
        name: "subject_audit_capture_truncate",
        when: "BEFORE TRUNCATE ON {table}",
        function: "capture_change",
    },
];

/// The functions our triggers call.
pub(super) const TRIGGER_FUNCTIONS: [&std::ffi::CStr; 1] = [c"capture_change"];

/// Whether `name` is one of the capture triggers' names.
pub(super) fn is_capture_trigger(name: &str) -> bool {
    trigger_function(name).is_some()
}

/// The function one of our triggers must call, by the trigger's name.
pub(super) fn trigger_function(name: &str) -> Option<&'static str> {
    TRIGGERS.iter().find(|t| t.name == name).map(|t| t.function)
}

/// Creates the capture triggers on the table `name` (quoted), firing ALWAYS:
/// also under `session_replication_role = replica` and in logical
/// replication apply, so neither is a way around capture.
pub(super) fn create_triggers(name: &str) {
    own_ddl(|| {
        for spec in &TRIGGERS {
            let (trigger, function) = (spec.name, spec.function);
            let when = spec.when.replace("{table}", name);
            Spi::run(&format!(
                "CREATE TRIGGER {trigger} {when} FOR EACH STATEMENT \
                 EXECUTE FUNCTION subject_audit.{function}(); \
                 ALTER TABLE {name} ENABLE ALWAYS TRIGGER {trigger}"
            ))
            .unwrap_or_else(|e| {
                raise(
                    ERRCODE_INTERNAL_ERROR,
                    format!("could not create trigger on {name}: {e}"),
                )
            });
        }
    })
}

/// Drops the capture triggers `relid` (named `name`, quoted) has, quietly
/// (no "does not exist" notices).
pub(super) fn drop_triggers(relid: pg_sys::Oid, name: &str) {
    own_ddl(|| {
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
    })
}

/// One capture trigger that does not capture as it should.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct CaptureGap {
    /// `table: trigger_name`
    pub trigger: String,
    /// missing, disabled, fires only in origin mode, ...
    pub problem: String,
}

/// What is wrong with the capture triggers of the tracked tables and their
/// partitions (the view `subject_audit.trigger_gaps`). Read-only and
/// lock-free (the partition tree is walked in pg_inherits), so it can run
/// around any DDL statement.
pub(super) fn capture_gaps() -> Vec<CaptureGap> {
    let gaps = store::as_owner(|| {
        store::select_one::<Vec<String>>(
            "SELECT pg_catalog.array_agg(pg_catalog.format('%s: %s|%s', table_name, trigger_name, problem) \
             ORDER BY table_name, trigger_name) FROM subject_audit.trigger_gaps",
            &[],
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

/// The gaps in `after` that a statement opened or widened, given the gaps
/// `before` it: every change of a trigger's state that leaves it not
/// capturing fully counts (disabled, then enabled only in origin mode, then
/// disabled again: three events), except a missing trigger coming back
/// (created: by pg_restore, say, on another connection).
pub(super) fn new_gaps(before: &[CaptureGap], after: &[CaptureGap]) -> Vec<CaptureGap> {
    after
        .iter()
        .filter(
            |gap| match before.iter().find(|b| b.trigger == gap.trigger) {
                None => true,
                Some(old) => old.problem != gap.problem && old.problem != "missing",
            },
        )
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(trigger: &str, problem: &str) -> CaptureGap {
        CaptureGap {
            trigger: trigger.to_owned(),
            problem: problem.to_owned(),
        }
    }

    fn problems(gaps: Vec<CaptureGap>) -> Vec<String> {
        gaps.into_iter()
            .map(|g| format!("{} {}", g.trigger, g.problem))
            .collect()
    }

    #[test]
    fn every_weakening_of_a_trigger_is_a_new_gap() {
        let disabled = [gap("t: ins", "disabled")];
        let origin = [gap("t: ins", "fires only in origin mode")];
        assert_eq!(problems(new_gaps(&[], &disabled)), ["t: ins disabled"]);
        assert_eq!(
            problems(new_gaps(&disabled, &origin)),
            ["t: ins fires only in origin mode"]
        );
        assert_eq!(problems(new_gaps(&origin, &disabled)), ["t: ins disabled"]);
        // Unchanged, or healthy again: nothing new.
        assert!(new_gaps(&disabled, &disabled).is_empty());
        assert!(new_gaps(&disabled, &[]).is_empty());
    }

    #[test]
    fn a_missing_trigger_created_again_is_not_a_new_gap() {
        let missing = [gap("t: ins", "missing"), gap("t: upd", "disabled")];
        let created = [
            gap("t: ins", "fires only in origin mode"),
            gap("t: upd", "missing"),
        ];
        assert_eq!(problems(new_gaps(&missing, &created)), ["t: upd missing"]);
    }
}
