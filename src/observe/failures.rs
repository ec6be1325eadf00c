//! Failed changes. While a statement changes a tracked table, each row its
//! plan hands to the change is noted by its subject in the statement's
//! frame (`touched`): before constraints, unique indexes and AFTER triggers
//! run, so the row that fails is noted too. If the
//! statement fails, the error's SQLSTATE, message and detail (caught by
//! `emit_log_hook` as the error is reported) go with them to the writer,
//! which encrypts the message like any payload: it can hold personal values.
//! Where a table with excluded columns takes part, the error's text is not
//! kept at all (its message or detail can quote their values), only the
//! names of the constraint and column it concerns.
//! A statement that succeeds drops its notes in ExecutorEnd.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::CStr;

use pgrx::pg_sys;

use super::{Kind, FRAMES};
use crate::capture;
use crate::deferred::Entry;
use crate::recorder::StatementContext;
use crate::store;

/// Subject values noted per statement; more rows are counted, not itemized.
const MAX_SUBJECTS: usize = 10_000;
/// Error text kept per statement (the writer encrypts it).
const MAX_MESSAGE: usize = 2_000;

static mut PREVIOUS_EMIT_LOG: pg_sys::emit_log_hook_type = None;

thread_local! {
    /// Changes that failed in a subtransaction whose error was not reported
    /// (yet): the next error reported takes them, else they were handled.
    static UNREPORTED: RefCell<Vec<(Change, StatementContext)>> = const { RefCell::new(Vec::new()) };
}

pub fn init() {
    unsafe {
        PREVIOUS_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
    }
}

/// A statement changing tracked tables, while it runs.
pub struct Change {
    operation: &'static str,
    /// The tracked tables it changes (a partition under its tracked ancestor).
    tables: Vec<String>,
    subjects: HashSet<Vec<u8>>,
    not_itemized: u64,
    /// Excluded columns of every tracked table the statement names (changed
    /// or read): while any exists, the error's text is not kept.
    excluded: Vec<String>,
    /// SQLSTATE and text of the error that ended it, when it was reported.
    error: Option<(String, String)>,
    /// SQLSTATE of the first error thrown while it ran (a handler may have
    /// caught it: then it was never reported).
    thrown: Option<String>,
}

impl Change {
    pub fn has_error(&self) -> bool {
        self.error.is_some()
    }

    fn new(operation: &'static str, tables: Vec<String>, excluded: Vec<String>) -> Option<Change> {
        (!tables.is_empty()).then_some(Change {
            operation,
            tables,
            subjects: HashSet::new(),
            not_itemized: 0,
            excluded,
            error: None,
            thrown: None,
        })
    }

    /// The failure's event entry: one event per distinct subject noted, or
    /// one of nobody's when no row was touched (e.g. permission denied).
    pub fn entry(self, who: &StatementContext) -> Entry {
        let mut subjects: Vec<Vec<u8>> = self.subjects.into_iter().collect();
        subjects.sort_unstable();
        let table_name = self.tables.join(", ");
        let mut title = format!("{} {table_name} failed", self.operation.to_lowercase());
        if self.not_itemized > 0 {
            title.push_str(&format!(" ({} more rows, not itemized)", self.not_itemized));
        }
        let (sqlstate, message) = match self.error {
            Some((sqlstate, message)) => (Some(sqlstate), message),
            // Caught by an exception handler (PL/pgSQL), so never reported.
            None => (
                self.thrown,
                "the error was handled by the caller; its message is not available".to_owned(),
            ),
        };
        // An event of nobody's holds no message: it may quote values (Key
        // (email)=(…), a trigger's RAISE) that no erasure could reach.
        let message = (!subjects.is_empty()).then_some(message);
        Entry {
            failed: true,
            operation: self.operation.to_owned(),
            title,
            table_name,
            sqlstate,
            message,
            subjects,
            who: who.clone(),
            ..Entry::default()
        }
    }
}

/// What an INSERT, UPDATE, DELETE or MERGE changes of tracked tables.
///
/// # Safety
/// `stmt` must be the plan the executor is starting.
pub unsafe fn plan(
    stmt: *mut pg_sys::PlannedStmt,
    command: pg_sys::CmdType::Type,
) -> Option<Change> {
    let operation = match command {
        pg_sys::CmdType::CMD_INSERT => "INSERT",
        pg_sys::CmdType::CMD_UPDATE => "UPDATE",
        pg_sys::CmdType::CMD_DELETE => "DELETE",
        pg_sys::CmdType::CMD_MERGE => "MERGE",
        _ => return None,
    };
    let result_relations = (*stmt).resultRelations;
    if result_relations.is_null() {
        return None;
    }
    let mut tables = Vec::new();
    let mut excluded = Vec::new();
    for i in 0..(*result_relations).length as usize {
        let index = (*(*result_relations).elements.add(i)).int_value;
        let rte = pg_sys::list_nth((*stmt).rtable, index - 1) as *mut pg_sys::RangeTblEntry;
        add_table(&mut tables, &mut excluded, Some((*rte).relid));
    }
    if tables.is_empty() {
        return None;
    }
    // A table it only reads can put its values in the error too
    // (`INSERT … SELECT note::int FROM notes`).
    for rte in super::list_items((*stmt).rtable) {
        let rte = rte as *mut pg_sys::RangeTblEntry;
        if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION {
            add_table(&mut Vec::new(), &mut excluded, Some((*rte).relid));
        }
    }
    Change::new(operation, tables, excluded)
}

/// What a COPY FROM or TRUNCATE changes of tracked tables.
///
/// # Safety
/// `node` must be a valid parse tree node.
pub unsafe fn plan_utility(node: *mut pg_sys::Node) -> Option<Change> {
    let mut tables = Vec::new();
    let mut excluded = Vec::new();
    let operation = match (*node).type_ {
        pg_sys::NodeTag::T_CopyStmt => {
            let copy = node as *mut pg_sys::CopyStmt;
            if !(*copy).is_from || (*copy).relation.is_null() {
                return None;
            }
            add_table(
                &mut tables,
                &mut excluded,
                store::relation_id((*copy).relation),
            );
            "INSERT"
        }
        pg_sys::NodeTag::T_TruncateStmt => {
            for relation in super::list_items((*(node as *mut pg_sys::TruncateStmt)).relations) {
                add_table(
                    &mut tables,
                    &mut excluded,
                    store::relation_id(relation.cast()),
                );
            }
            "TRUNCATE"
        }
        _ => return None,
    };
    Change::new(operation, tables, excluded)
}

unsafe fn add_table(
    tables: &mut Vec<String>,
    excluded: &mut Vec<String>,
    relid: Option<pg_sys::Oid>,
) {
    let Some(relid) = relid else {
        return;
    };
    if let Some(meta) = capture::tracked_table(relid) {
        if !tables.contains(&meta.name) {
            tables.push(meta.name.clone());
        }
        for column in &meta.excluded {
            if !excluded.contains(column) {
                excluded.push(column.clone());
            }
        }
    }
}

/// Notes subject values in the Change frame `frame`; false once it itemizes
/// no more (then `count_in` counts the rows instead).
pub fn note_in(frame: u64, values: Vec<Vec<u8>>) -> bool {
    with_change(frame, |change| {
        for value in values {
            if change.subjects.len() < MAX_SUBJECTS || change.subjects.contains(&value) {
                change.subjects.insert(value);
            } else {
                change.not_itemized += 1;
            }
        }
        change.subjects.len() < MAX_SUBJECTS
    })
    .unwrap_or(false)
}

/// Counts a row of the Change frame `frame` that is not itemized.
pub fn count_in(frame: u64) {
    with_change(frame, |change| change.not_itemized += 1);
}

fn with_change<R>(frame: u64, f: impl FnOnce(&mut Change) -> R) -> Option<R> {
    FRAMES.with(|frames| {
        let mut frames = frames.borrow_mut();
        frames
            .iter_mut()
            .rev()
            .find_map(|f| match &mut f.kind {
                Kind::Change(change) if f.id == frame => Some(change),
                _ => None,
            })
            .map(f)
    })
}

/// Keeps a change that failed in an aborted subtransaction without a
/// reported error, until the next error is reported or the statement ends.
pub fn hold_unreported(change: Change, who: StatementContext) {
    UNREPORTED.with(|u| {
        if let Ok(mut u) = u.try_borrow_mut() {
            u.push((change, who));
        }
    });
}

/// The held changes' errors were handled (no error was reported since):
/// their entries go to the pending ones.
pub fn settle_unreported() {
    let held = UNREPORTED.with(|u| u.try_borrow_mut().map(|mut u| std::mem::take(&mut *u)));
    if let Ok(held) = held {
        if !held.is_empty() {
            super::pending::collect(held.into_iter().map(|(c, who)| c.entry(&who)).collect());
        }
    }
}

/// Error context callback (see `error_watch`): notes the SQLSTATE of an
/// error thrown while the Change frame `arg` runs. Must not raise.
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn note_error_code(arg: *mut std::ffi::c_void) {
    let id = arg as usize as u64;
    let code = pg_sys::geterrcode();
    // Our own, caught and undone where it was raised (a key insert's unique
    // violation): it fails nothing.
    if store::is_caught_here(code) {
        return;
    }
    let sqlstate = CStr::from_ptr(pg_sys::unpack_sql_state(code))
        .to_string_lossy()
        .into_owned();
    // Notices (00), warnings (01) and "no data" (02) do not fail anything.
    if ["00", "01", "02"]
        .iter()
        .any(|class| sqlstate.starts_with(class))
    {
        return;
    }
    FRAMES.with(|f| {
        let Ok(mut frames) = f.try_borrow_mut() else {
            return;
        };
        for frame in frames.iter_mut().filter(|frame| frame.id == id) {
            if let Kind::Change(change) = &mut frame.kind {
                change.thrown.get_or_insert_with(|| sqlstate.clone());
            }
        }
    });
}

/// Takes the first error reported while watched changes run: it is what
/// failed them. Must not raise (it runs inside error reporting).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    if !edata.is_null() && (*edata).elevel >= pgrx::PgLogLevel::ERROR as i32 {
        // A re-raised error reaches here after its subtransaction ended.
        let held = UNREPORTED.with(|u| u.try_borrow_mut().map(|mut u| std::mem::take(&mut *u)));
        if let Ok(held) = held {
            if !held.is_empty() {
                // Only the error they threw themselves, raised again.
                let excluded: Vec<&String> = held
                    .iter()
                    .flat_map(|(change, _)| &change.excluded)
                    .collect();
                let error = describe(edata, &excluded);
                let (theirs, others): (Vec<_>, Vec<_>) = held
                    .into_iter()
                    .partition(|(change, _)| change.thrown.as_deref() == Some(error.0.as_str()));
                let entries = theirs
                    .into_iter()
                    .map(|(mut change, who)| {
                        change.error = Some(error.clone());
                        change.entry(&who)
                    })
                    .collect();
                super::pending::collect(entries);
                UNREPORTED.with(|u| {
                    if let Ok(mut u) = u.try_borrow_mut() {
                        u.extend(others);
                    }
                });
            }
        }
        FRAMES.with(|f| {
            let Ok(mut frames) = f.try_borrow_mut() else {
                return;
            };
            // Only statements of the (sub)transaction that fails now.
            let level = pg_sys::GetCurrentTransactionNestLevel();
            // Every statement under way can have put values in the error
            // (a trigger's insert into another table, a function's read).
            let excluded: Vec<String> = frames
                .iter()
                .filter(|frame| frame.level >= level)
                .flat_map(|frame| -> Vec<String> {
                    match &frame.kind {
                        Kind::Change(change) => change.excluded.clone(),
                        Kind::Read(reading) => reading.excluded().cloned().collect(),
                    }
                })
                .collect();
            let mut failed = frames.iter_mut().filter_map(|frame| match &mut frame.kind {
                Kind::Change(change) if change.error.is_none() && frame.level >= level => {
                    Some(change)
                }
                _ => None,
            });
            let Some(first) = failed.next() else { return };
            let error = describe(edata, &excluded.iter().collect::<Vec<_>>());
            for change in failed {
                change.error = Some(error.clone());
            }
            first.error = Some(error);
        });
    }
    if let Some(previous) = PREVIOUS_EMIT_LOG {
        previous(edata);
    }
}

/// SQLSTATE, and the error's text (see `error_text`), cut to `MAX_MESSAGE` bytes.
unsafe fn describe(edata: *mut pg_sys::ErrorData, excluded: &[&String]) -> (String, String) {
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
    };
    let sqlstate = text(pg_sys::unpack_sql_state((*edata).sqlerrcode)).unwrap_or_default();
    let mut message = error_text(
        ErrorText {
            message: text((*edata).message).unwrap_or_default(),
            detail: text((*edata).detail),
            constraint: text((*edata).constraint_name),
            column: text((*edata).column_name),
        },
        excluded,
    );
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    (sqlstate, message)
}

/// What an error report says.
struct ErrorText {
    message: String,
    detail: Option<String>,
    constraint: Option<String>,
    column: Option<String>,
}

/// The text a failure event keeps: message and detail; or, when `excluded`
/// columns took part, only the constraint and column names the error
/// concerns (any text can quote their values: `Key (note)=(…)`, `invalid
/// input syntax for type integer: "…"`), and those only where they contain
/// no excluded column's name.
fn error_text(error: ErrorText, excluded: &[&String]) -> String {
    if excluded.is_empty() {
        let mut message = error.message;
        // "Failing row contains (…)" lists every column.
        if let Some(detail) = error
            .detail
            .filter(|d| !d.starts_with("Failing row contains"))
        {
            message.push_str("\nDETAIL: ");
            message.push_str(&detail);
        }
        return message;
    }
    let names_none = |name: &String| {
        let name = name.to_lowercase();
        !excluded.iter().any(|c| name.contains(&c.to_lowercase()))
    };
    let mut message =
        "error text not kept: a table with excluded columns took part in the statement".to_owned();
    if let Some(constraint) = error.constraint.filter(names_none) {
        message.push_str(&format!("; constraint \"{constraint}\""));
    }
    if let Some(column) = error.column.filter(names_none) {
        message.push_str(&format!("; column \"{column}\""));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique_violation() -> ErrorText {
        ErrorText {
            message: "duplicate key value violates unique constraint \"notes_code\"".into(),
            detail: Some("Key (secret_note)=(the secret) already exists.".into()),
            constraint: Some("notes_code".into()),
            column: None,
        }
    }

    #[test]
    fn without_excluded_columns_message_and_detail_are_kept() {
        assert_eq!(
            error_text(unique_violation(), &[]),
            "duplicate key value violates unique constraint \"notes_code\"\nDETAIL: Key (secret_note)=(the secret) already exists."
        );
        let check = ErrorText {
            detail: Some("Failing row contains (1, the secret).".into()),
            ..unique_violation()
        };
        assert!(!error_text(check, &[]).contains("the secret"));
    }

    #[test]
    fn with_excluded_columns_no_text_that_can_quote_a_value_is_kept() {
        let secret_note = "secret_note".to_owned();
        let kept = error_text(unique_violation(), &[&secret_note]);
        assert_eq!(
            kept,
            "error text not kept: a table with excluded columns took part in the statement; constraint \"notes_code\""
        );
        // A message can quote a value itself.
        let cast = ErrorText {
            message: "invalid input syntax for type integer: \"the secret\"".into(),
            detail: None,
            constraint: None,
            column: Some("amount".into()),
        };
        let kept = error_text(cast, &[&secret_note]);
        assert!(!kept.contains("the secret"), "{kept}");
        assert!(kept.ends_with("; column \"amount\""), "{kept}");
    }

    #[test]
    fn names_that_contain_an_excluded_column_are_left_out() {
        let secret_note = "Secret_Note".to_owned();
        let error = ErrorText {
            constraint: Some("notes_secret_note_key".into()),
            column: Some("secret_note".into()),
            ..unique_violation()
        };
        let kept = error_text(error, &[&secret_note]);
        assert!(!kept.to_lowercase().contains("secret_note"), "{kept}");
    }
}
