//! Watching statements on tracked tables, for events the triggers cannot
//! write: which subjects a query returned (`READ`), and which subjects a
//! failing INSERT, UPDATE, DELETE, MERGE, COPY or TRUNCATE had touched
//! (status `error`). Both reach the trail through the background writer
//! (`deferred`), so they survive the statement's rollback and cost the
//! reading transaction no transaction id, WAL or commit.
//!
//! Each watched statement gets a frame on a per-backend stack: pushed in
//! ExecutorStart (or the utility hook), popped in ExecutorEnd. A frame still
//! on the stack when its (sub)transaction aborts belongs to a statement
//! that failed: its events are handed over then, from backend memory only.
//!
//! Needs `shared_preload_libraries` (hooks, shared memory, the writer).

mod failures;
mod reads;

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

use crate::deferred::{self, Entry};
use crate::recorder::StatementContext;
use crate::store;

pub use failures::note_row;

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum LogReads {
    #[name = c"subject"]
    Subject,
    #[name = c"statement"]
    Statement,
    #[name = c"off"]
    Off,
}

static LOG_READS: GucSetting<LogReads> = GucSetting::<LogReads>::new(LogReads::Subject);
static LOG_FAILURES: GucSetting<bool> = GucSetting::<bool>::new(true);

static mut PREVIOUS_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREVIOUS_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREVIOUS_END: pg_sys::ExecutorEnd_hook_type = None;

unsafe extern "C-unwind" {
    // Not pgrx's bindings, which catch an error and raise it again without
    // its CONTEXT, position and table or constraint fields: called raw, a
    // statement's errors reach the client as PostgreSQL raised them. The
    // hooks hold no value with a destructor across these calls.
    #[link_name = "standard_ExecutorStart"]
    fn standard_executor_start(query: *mut pg_sys::QueryDesc, eflags: i32);
    #[link_name = "standard_ExecutorRun"]
    fn standard_executor_run(
        query: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    #[link_name = "standard_ExecutorEnd"]
    fn standard_executor_end(query: *mut pg_sys::QueryDesc);
}

thread_local! {
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

/// One watched statement.
struct Frame {
    /// The executor's query, or null for a utility statement (COPY, TRUNCATE).
    query: *mut pg_sys::QueryDesc,
    /// Transaction nesting level it runs at: a subtransaction's abort ends
    /// only the frames at its level or deeper.
    level: i32,
    who: StatementContext,
    kind: Kind,
}

enum Kind {
    /// Boxed: the receiver tap writes into it through a pointer while it runs.
    Read(Box<reads::Reading>),
    Change(failures::Change),
}

/// Defines `subject_audit.log_reads` (always, so the setting is known) and,
/// when preloading, installs the hooks.
pub fn init(preloading: bool) {
    GucRegistry::define_enum_guc(
        c"subject_audit.log_reads",
        c"Which reads of tracked tables enter the trail: subject, statement or off.",
        c"subject: one READ event per subject in the rows a query returned (statement-level where the subject column is not returned); statement: one READ event per statement and table; off: none. Superuser-only: set it per role or database. Needs shared_preload_libraries.",
        &LOG_READS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"subject_audit.log_failures",
        c"Record failed INSERT, UPDATE, DELETE, MERGE, COPY and TRUNCATE statements on tracked tables.",
        c"Each subject whose rows the statement had touched gets an event with status error, the SQLSTATE and the encrypted error message. Superuser-only. Needs shared_preload_libraries.",
        &LOG_FAILURES,
        GucContext::Suset,
        GucFlags::default(),
    );
    if !preloading {
        return;
    }
    unsafe {
        PREVIOUS_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREVIOUS_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREVIOUS_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        pg_sys::RegisterXactCallback(Some(on_transaction), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction), std::ptr::null_mut());
    }
    failures::init();
}

/// Whether statements of this backend are watched now: not the extension's
/// own queries, not a parallel worker (its leader watches), not a foreign
/// key check (PostgreSQL's own lookup, marked by SECURITY_NOFORCE_RLS).
fn watching() -> bool {
    deferred::available()
        && !store::in_own_query()
        && unsafe { pg_sys::ParallelWorkerNumber } < 0
        && !unsafe { pg_sys::InNoForceRLSOperation() }
}

fn push(frame: Frame) {
    FRAMES.with(|f| f.borrow_mut().push(frame));
}

/// Removes and returns the frame of `query` (null: the newest utility frame).
fn pop(query: *mut pg_sys::QueryDesc) -> Option<Frame> {
    FRAMES.with(|f| {
        let mut frames = f.borrow_mut();
        let i = frames.iter().rposition(|frame| frame.query == query)?;
        Some(frames.remove(i))
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
    if !explain_only && watching() {
        let stmt = (*query).plannedstmt;
        let kind = match (*stmt).commandType {
            pg_sys::CmdType::CMD_SELECT => match LOG_READS.get() {
                LogReads::Off => None,
                mode => reads::plan(stmt, mode == LogReads::Subject)
                    .filter(|_| reads::recordable())
                    .map(Kind::Read),
            },
            _ if !LOG_FAILURES.get() => None,
            command => failures::plan(stmt, command).map(Kind::Change),
        };
        // Pushed before the executor starts: a permission error raised
        // there fails the statement too.
        if let Some(kind) = kind {
            push(Frame {
                query,
                level: pg_sys::GetCurrentTransactionNestLevel(),
                who: StatementContext::without_transaction(),
                kind,
            });
        }
    }
    match PREVIOUS_START {
        Some(previous) => previous(query, eflags),
        None => standard_executor_start(query, eflags),
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_run(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    let reading = FRAMES.with(|f| {
        f.borrow_mut()
            .iter_mut()
            .rev()
            .find_map(|frame| match &mut frame.kind {
                Kind::Read(reading) if frame.query == query => {
                    Some(&mut **reading as *mut reads::Reading)
                }
                _ => None,
            })
    });
    let dest = (*query).dest;
    if let Some(reading) = reading {
        (*query).dest = reads::tap(reading, dest);
    }
    match PREVIOUS_RUN {
        Some(previous) => previous(query, direction, count, execute_once),
        None => standard_executor_run(query, direction, count, execute_once),
    }
    (*query).dest = dest;
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    if let Some(frame) = pop(query) {
        if let Kind::Read(reading) = frame.kind {
            hand_over(reading.entries(&frame.who), true);
        }
        // A change that got here succeeded: its events are the triggers'.
    }
    match PREVIOUS_END {
        Some(previous) => previous(query),
        None => standard_executor_end(query),
    }
}

/// Starts watching a utility statement that changes tracked tables (COPY
/// FROM, TRUNCATE), for the utility hook; `finish_utility` when it succeeded.
///
/// # Safety
/// `node` must be a valid parse tree node.
pub unsafe fn start_utility(node: *mut pg_sys::Node) -> bool {
    if !watching() || !LOG_FAILURES.get() {
        return false;
    }
    let Some(change) = failures::plan_utility(node) else {
        return false;
    };
    push(Frame {
        query: std::ptr::null_mut(),
        level: pg_sys::GetCurrentTransactionNestLevel(),
        who: StatementContext::without_transaction(),
        kind: Kind::Change(change),
    });
    true
}

pub fn finish_utility() {
    pop(std::ptr::null_mut());
}

/// Records a finished `COPY table TO …` of a tracked table as a
/// statement-level read (it bypasses the executor; `pg_dump` reads this way).
///
/// # Safety
/// `node` must be a valid parse tree node, `completion` the statement's (or null).
pub unsafe fn copied_out(node: *mut pg_sys::Node, completion: *mut pg_sys::QueryCompletion) {
    if !watching()
        || LOG_READS.get() == LogReads::Off
        || (*node).type_ != pg_sys::NodeTag::T_CopyStmt
    {
        return;
    }
    let copy = node as *mut pg_sys::CopyStmt;
    if (*copy).is_from || (*copy).relation.is_null() || !reads::recordable() {
        return;
    }
    let rows = if completion.is_null() {
        0
    } else {
        (*completion).nprocessed
    };
    if let Some(entry) = reads::copy_entry(copy, rows, &StatementContext::without_transaction()) {
        hand_over(vec![entry], true);
    }
}

/// Queues entries for the writer. `may_wait`: outside an abort, a full
/// queue is waited on for a while (back-pressure) before anything is
/// dropped; a drop is counted, recorded in the trail, and warned about.
fn hand_over(entries: Vec<Entry>, may_wait: bool) {
    if entries.is_empty() {
        return;
    }
    let dropped: usize = entries
        .iter()
        .map(|entry| deferred::hand_over(entry, may_wait))
        .sum();
    if dropped > 0 {
        let message = format!("pg_subject_audit: {dropped} audit events could not be queued (queue full); the count is recorded in the trail");
        if may_wait {
            warning!("{message}");
        } else {
            log!("{message}");
        }
    }
}

/// Frames left at `level` or deeper when it aborts are statements that
/// failed (or reads cut short): their events go to the writer now.
fn abort_frames(level: i32) {
    let ended: Vec<Frame> = FRAMES.with(|f| {
        let Ok(mut frames) = f.try_borrow_mut() else {
            return Vec::new();
        };
        let (ended, kept) = frames.drain(..).partition(|frame| frame.level >= level);
        *frames = kept;
        ended
    });
    let mut entries = Vec::new();
    for frame in ended {
        match frame.kind {
            Kind::Read(reading) => entries.extend(reading.entries(&frame.who)),
            Kind::Change(change) => entries.push(change.entry(&frame.who)),
        }
    }
    hand_over(entries, false);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_ABORT => abort_frames(0),
        // Nothing is left at commit but what never reached ExecutorEnd.
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            FRAMES.with(|f| f.borrow_mut().clear())
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction(
    event: pg_sys::SubXactEvent::Type,
    _subxact: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        abort_frames(pg_sys::GetCurrentTransactionNestLevel());
    }
}

/// The pointers of a `List` of pointers.
unsafe fn list_items(list: *mut pg_sys::List) -> Vec<*mut std::ffi::c_void> {
    if list.is_null() {
        return Vec::new();
    }
    (0..(*list).length as usize)
        .map(|i| (*(*list).elements.add(i)).ptr_value)
        .collect()
}

/// Entry fields every event of a frame shares.
fn entry_for(who: &StatementContext) -> Entry {
    Entry {
        at: who.at,
        actor: who.actor.clone(),
        db_role: who.db_role.clone(),
        session_role: who.session_role.clone(),
        application_name: who.application_name.clone(),
        client_addr: who.client_addr.clone(),
        reason: who.reason.clone(),
        ..Entry::default()
    }
}
