//! The utility hook. DISCARD ALL wipes the session keyring. Statements that
//! change how auditing works enter the admin trail once they succeeded, in
//! the database where they ran.
//! - SETTING: ALTER SYSTEM, ALTER DATABASE … SET and ALTER ROLE … SET on a
//!   `subject_audit.*` parameter (and RESET ALL, which resets ours too);
//!   refused where the event cannot be written, warned about on a standby.
//!   A session's own SET is not recorded: it changes nothing for anyone else.
//! - CAPTURE_OFF: a capture trigger that stops capturing (dropped, disabled,
//!   origin- or replica-only, narrowed, re-pointed), whatever the statement:
//!   the trigger state is checked, not the syntax, and every change to a
//!   state that does not capture fully is an event (disabled, enabled in
//!   origin mode only, disabled again: three). Creating, replacing or
//!   renaming a capture trigger by hand is refused.
//! - RENAME: a tracked table renamed or moved to another schema (itself or
//!   its schema): whatever takes its old name is not tracked.
//! - Tracked tables follow DDL: a dropped one leaves `tracked` (an UNTRACK
//!   event says so; its events stay), partitions created, attached or
//!   detached later get or lose the capture triggers.
//! - Column changes that would change or remove captured values unrecorded
//!   are refused (`column_ddl`).
//!
//! Needs the library loaded before the statement runs: with
//! `shared_preload_libraries` it always is.

use std::ffi::CStr;

use pgrx::pg_sys;

use super::capture_triggers::{self, capture_gaps, new_gaps};
use super::nodes::{list_items, text};
use super::{admin, column_ddl, tracking};
use crate::{keyring, observe, store};

static mut PREVIOUS_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

unsafe extern "C-unwind" {
    // Not pgrx's binding, which catches an error and raises it again without
    // its CONTEXT, position and table or constraint fields: called raw, the
    // statement's errors reach the client as PostgreSQL raised them.
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        statement: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        completion: *mut pg_sys::QueryCompletion,
    );
}

/// Settings whose value is recorded; the others may hold personal values
/// (actor, reason) or secrets (session key, session subject).
const VALUE_RECORDED: [&str; 2] = ["subject_audit.database", "subject_audit.seal_interval"];

/// Installs the utility hook. Called from `_PG_init`.
pub fn init() {
    unsafe {
        PREVIOUS_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    let node = (*statement).utilityStmt;
    // DISCARD ALL resets a pooled connection for its next user: the keyring
    // must not survive it (a subject binding does: it lasts the connection).
    if !node.is_null()
        && (*node).type_ == pg_sys::NodeTag::T_DiscardStmt
        && (*(node as *mut pg_sys::DiscardStmt)).target == pg_sys::DiscardMode::DISCARD_ALL
    {
        keyring::lock();
    }
    // Most statements concern us not at all; none can while the transaction
    // is aborted (ROLLBACK), when no catalog may be read.
    // Nor do our own CREATE/ALTER EXTENSION scripts.
    let relevant =
        !node.is_null() && RELEVANT.contains(&(*node).type_) && pg_sys::IsTransactionState();
    let installed = relevant && store::extension_installed() && !in_our_script();
    let own = capture_triggers::in_own_ddl();
    // Described before running: the statement's tree may be scribbled on.
    let setting = if installed {
        describe_setting(node)
    } else {
        None
    };
    // ALTER SYSTEM changes a file at once, for good: where its event cannot be
    // written (a read-only transaction on the primary), refuse it first.
    if setting.is_some() && !pg_sys::RecoveryInProgress() {
        if let Some(why) = admin::read_only_reason() {
            store::error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("cannot record this change of a subject_audit setting: {why}"),
            );
        }
    }
    if installed && !own {
        column_ddl::refuse_unrecorded_value_changes(node);
        refuse_capture_trigger_ddl(node);
    }
    let tracked_before = (installed && drops_relations(node)).then(tracking::tracked_tables);
    let names_before = (installed && renames_relations(node)).then(tracking::tracked_tables);
    let gaps_before = (installed && !own && may_switch_capture_off(node)).then(capture_gaps);
    let partition = if installed {
        partition_change(node)
    } else {
        None
    };
    // COPY and TRUNCATE of a tracked table bypass the executor hooks: COPY TO
    // is a read, a failing COPY FROM or TRUNCATE a failed change.
    let watched = !node.is_null()
        && matches!(
            (*node).type_,
            pg_sys::NodeTag::T_CopyStmt | pg_sys::NodeTag::T_TruncateStmt
        )
        && pg_sys::IsTransactionState()
        && observe::start_utility(node);
    // Held by pointer across the call: an error there jumps past this frame,
    // which must hold no value whose destructor would be skipped (it leaks).
    let before = Box::into_raw(Box::new((
        setting,
        tracked_before,
        names_before,
        gaps_before,
        partition,
    )));
    match PREVIOUS_PROCESS_UTILITY {
        Some(previous) => previous(
            statement,
            query,
            read_only_tree,
            context,
            params,
            query_env,
            dest,
            completion,
        ),
        None => standard_process_utility(
            statement,
            query,
            read_only_tree,
            context,
            params,
            query_env,
            dest,
            completion,
        ),
    }
    let (setting, tracked_before, names_before, gaps_before, partition) = *Box::from_raw(before);
    if watched {
        let rows = if completion.is_null() {
            0
        } else {
            (*completion).nprocessed
        };
        observe::finish_utility(rows);
    }
    // Checked again: the statement may have been DROP EXTENSION.
    if !installed || !store::extension_installed() {
        return;
    }
    if let Some(title) = setting {
        // ALTER SYSTEM runs on a standby too, where nothing can be written.
        match admin::read_only_reason() {
            Some(why) => {
                pgrx::warning!("this settings change is not recorded in the admin trail: {why}")
            }
            None => admin::record("SETTING", &title, None),
        }
    }
    if let Some(before) = tracked_before {
        tracking::forget_dropped_tables(&before);
    }
    if let Some(before) = names_before {
        tracking::record_renames(&before);
    }
    if let Some((partition, attached)) = partition {
        if let Some(relid) = store::relation_id(partition) {
            tracking::follow_partition(relid, attached);
        }
    }
    // Whatever the syntax, what counts is the state it leaves: every capture
    // trigger present, calling its function, firing ALWAYS. Each change to a
    // state short of that is reported, so a trigger already off cannot be
    // weakened further unseen.
    if let Some(before) = gaps_before {
        for gap in new_gaps(&before, &capture_gaps()) {
            let title = format!("capture off: {} {}", gap.trigger, gap.problem);
            admin::record("CAPTURE_OFF", &title, None);
        }
    }
}

/// Statements the hook looks at; everything else passes straight through.
const RELEVANT: [pg_sys::NodeTag; 12] = [
    pg_sys::NodeTag::T_AlterSystemStmt,
    pg_sys::NodeTag::T_AlterDatabaseSetStmt,
    pg_sys::NodeTag::T_AlterRoleSetStmt,
    pg_sys::NodeTag::T_AlterTableStmt,
    pg_sys::NodeTag::T_DropStmt,
    pg_sys::NodeTag::T_DropOwnedStmt,
    pg_sys::NodeTag::T_RenameStmt,
    pg_sys::NodeTag::T_AlterObjectSchemaStmt,
    pg_sys::NodeTag::T_CreateTrigStmt,
    pg_sys::NodeTag::T_AlterObjectDependsStmt,
    pg_sys::NodeTag::T_CreateStmt,
    pg_sys::NodeTag::T_CreateForeignTableStmt,
];

/// Statements that can drop, disable or re-point a capture trigger (not a
/// concurrent DROP, which drops an index and must start its transaction).
unsafe fn may_switch_capture_off(node: *mut pg_sys::Node) -> bool {
    match (*node).type_ {
        pg_sys::NodeTag::T_DropStmt => !(*(node as *mut pg_sys::DropStmt)).concurrent,
        pg_sys::NodeTag::T_AlterTableStmt
        | pg_sys::NodeTag::T_DropOwnedStmt
        | pg_sys::NodeTag::T_AlterObjectDependsStmt => true,
        _ => false,
    }
}

/// Capture triggers belong to `track()`: replacing one, or renaming one or
/// to one of their names, is refused (a renamed trigger would escape every
/// check by name); so is a trigger calling capture_change() under another
/// name (it would record events twice) or one of ours calling anything else.
/// A plain CREATE TRIGGER of ours calling its own function is what pg_restore
/// sends: allowed.
unsafe fn refuse_capture_trigger_ddl(node: *mut pg_sys::Node) {
    let refused = match (*node).type_ {
        pg_sys::NodeTag::T_CreateTrigStmt => {
            let stmt = node as *mut pg_sys::CreateTrigStmt;
            let name = text((*stmt).trigname);
            let function = pg_sys::LookupFuncName((*stmt).funcname, 0, std::ptr::null(), true);
            let calls_ours = function != pg_sys::InvalidOid
                && capture_triggers::TRIGGER_FUNCTIONS
                    .iter()
                    .any(|f| our_function(f) == function);
            let refused = match capture_triggers::trigger_function(&name) {
                Some(expected) => {
                    let expected = std::ffi::CString::new(expected).unwrap_or_default();
                    (*stmt).replace || function != our_function(&expected)
                }
                None => calls_ours,
            };
            refused.then_some(name)
        }
        pg_sys::NodeTag::T_RenameStmt => {
            let stmt = node as *mut pg_sys::RenameStmt;
            let (old, new) = (text((*stmt).subname), text((*stmt).newname));
            ((*stmt).renameType == pg_sys::ObjectType::OBJECT_TRIGGER
                && (capture_triggers::is_capture_trigger(&old)
                    || capture_triggers::is_capture_trigger(&new)))
            .then_some(old)
        }
        _ => None,
    };
    if let Some(name) = refused {
        store::error::raise_with_hint(
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("trigger \"{name}\": capture triggers are managed by pg_subject_audit"),
            "use subject_audit.track() and subject_audit.untrack()",
        );
    }
}

/// OID of `subject_audit.<name>()`, looked up in our schema only.
unsafe fn our_function(name: &CStr) -> pg_sys::Oid {
    let schema = pg_sys::get_namespace_oid(store::SCHEMA.as_ptr(), true);
    if schema == pg_sys::InvalidOid {
        return pg_sys::InvalidOid;
    }
    let no_arguments = pg_sys::buildoidvector(std::ptr::null(), 0);
    pg_sys::GetSysCacheOid(
        pg_sys::SysCacheIdentifier::PROCNAMEARGSNSP as i32,
        pg_sys::Anum_pg_proc_oid as i16,
        pg_sys::Datum::from(name.as_ptr()),
        pg_sys::Datum::from(no_arguments),
        pg_sys::Datum::from(schema),
        pg_sys::Datum::from(0),
    )
}

/// The partition a statement creates, attaches (true) or detaches (false).
unsafe fn partition_change(node: *mut pg_sys::Node) -> Option<(*mut pg_sys::RangeVar, bool)> {
    if node.is_null() {
        return None;
    }
    match (*node).type_ {
        // A foreign table's statement begins with a CreateStmt.
        pg_sys::NodeTag::T_CreateStmt | pg_sys::NodeTag::T_CreateForeignTableStmt => {
            let stmt = node as *mut pg_sys::CreateStmt;
            (!(*stmt).partbound.is_null()).then(|| ((*stmt).relation, true))
        }
        pg_sys::NodeTag::T_AlterTableStmt => {
            let stmt = node as *mut pg_sys::AlterTableStmt;
            list_items((*stmt).cmds).into_iter().find_map(|cmd| {
                let cmd = cmd as *mut pg_sys::AlterTableCmd;
                let attached = match (*cmd).subtype {
                    pg_sys::AlterTableType::AT_AttachPartition => true,
                    pg_sys::AlterTableType::AT_DetachPartition
                    | pg_sys::AlterTableType::AT_DetachPartitionFinalize => false,
                    _ => return None,
                };
                let partition = (*cmd).def as *mut pg_sys::PartitionCmd;
                Some(((*partition).name, attached))
            })
        }
        _ => None,
    }
}

/// Running our own CREATE/ALTER EXTENSION script (other extensions' scripts
/// are watched like any DDL).
unsafe fn in_our_script() -> bool {
    pg_sys::creating_extension
        && pg_sys::CurrentExtensionObject
            == pg_sys::get_extension_oid(c"pg_subject_audit".as_ptr(), true)
}

/// Whether the statement may rename a table or move it to another schema
/// (itself or its schema: any rename, any SET SCHEMA).
unsafe fn renames_relations(node: *mut pg_sys::Node) -> bool {
    matches!(
        (*node).type_,
        pg_sys::NodeTag::T_RenameStmt | pg_sys::NodeTag::T_AlterObjectSchemaStmt
    )
}

/// Whether the statement may drop tables (directly, by cascade or with their owner).
unsafe fn drops_relations(node: *mut pg_sys::Node) -> bool {
    if node.is_null() {
        return false;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_DropOwnedStmt => true,
        pg_sys::NodeTag::T_DropStmt => !matches!(
            (*(node as *mut pg_sys::DropStmt)).removeType,
            pg_sys::ObjectType::OBJECT_INDEX
                | pg_sys::ObjectType::OBJECT_TRIGGER
                | pg_sys::ObjectType::OBJECT_POLICY
                | pg_sys::ObjectType::OBJECT_RULE
        ),
        _ => false,
    }
}

/// `ALTER ROLE app SET subject_audit.seal_interval = '500'`, if the statement
/// changes one of our settings beyond this session.
unsafe fn describe_setting(node: *mut pg_sys::Node) -> Option<String> {
    if node.is_null() {
        return None;
    }
    let (scope, set) = match (*node).type_ {
        pg_sys::NodeTag::T_AlterSystemStmt => {
            let stmt = node as *mut pg_sys::AlterSystemStmt;
            ("ALTER SYSTEM".to_owned(), (*stmt).setstmt)
        }
        pg_sys::NodeTag::T_AlterDatabaseSetStmt => {
            let stmt = node as *mut pg_sys::AlterDatabaseSetStmt;
            (
                format!("ALTER DATABASE {}", text((*stmt).dbname)),
                (*stmt).setstmt,
            )
        }
        pg_sys::NodeTag::T_AlterRoleSetStmt => {
            let stmt = node as *mut pg_sys::AlterRoleSetStmt;
            let role = match (*stmt).role.is_null() {
                true => "ALL".to_owned(),
                false => text(pg_sys::get_rolespec_name((*stmt).role)),
            };
            let database = match (*stmt).database.is_null() {
                true => String::new(),
                false => format!(" IN DATABASE {}", text((*stmt).database)),
            };
            (format!("ALTER ROLE {role}{database}"), (*stmt).setstmt)
        }
        _ => return None,
    };
    if set.is_null() {
        return None;
    }
    if (*set).kind == pg_sys::VariableSetKind::VAR_RESET_ALL {
        return Some(format!("{scope} RESET ALL"));
    }
    let name = text((*set).name).to_lowercase();
    if !name.starts_with("subject_audit.") {
        return None;
    }
    let action = match (*set).kind {
        pg_sys::VariableSetKind::VAR_SET_VALUE if VALUE_RECORDED.contains(&name.as_str()) => {
            format!(
                "SET {name} = '{}'",
                text(pg_sys::ExtractSetVariableArgs(set))
            )
        }
        pg_sys::VariableSetKind::VAR_SET_VALUE => format!("SET {name} (value not recorded)"),
        pg_sys::VariableSetKind::VAR_SET_DEFAULT | pg_sys::VariableSetKind::VAR_RESET => {
            format!("RESET {name}")
        }
        _ => format!("SET {name}"),
    };
    Some(format!("{scope} {action}"))
}
