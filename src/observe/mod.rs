//! Watching statements on tracked tables, for events the triggers cannot
//! write: which subjects a query returned (`READ`), and which subjects a
//! failing INSERT, UPDATE, DELETE, MERGE, COPY or TRUNCATE had touched
//! (status `error`). Both reach the trail through the background writer
//! (`deferred`), so they survive the statement's rollback and cost the
//! reading transaction no transaction id, WAL or commit.
//!
//! Each watched statement gets a frame in backend memory, pushed in
//! ExecutorStart (or the utility hook). A frame ends in ExecutorEnd (the
//! statement finished) or, failing that, when the memory its query lives in
//! goes away (a reset callback): the statement failed or was cut short, and
//! that is known without trusting any pointer into freed executor state.
//! A (sub)transaction's abort ends the frames opened at its level or deeper.
//! Entries are collected per outermost statement and queued when it ends
//! (`pending`), so a function reading a tracked table once per row fills
//! one entry, not thousands.
//!
//! Needs `shared_preload_libraries` (hooks, shared memory, the writer).

mod failures;
mod pending;
mod reads;
mod touched;

use std::cell::{Cell, RefCell};
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

use crate::deferred::{self, Entry};

use crate::recorder::StatementContext;
use crate::store;
pub use pending::flush as flush_pending;

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
static mut PREVIOUS_FINISH: pg_sys::ExecutorFinish_hook_type = None;
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
    #[link_name = "standard_ExecutorFinish"]
    fn standard_executor_finish(query: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ExecutorEnd"]
    fn standard_executor_end(query: *mut pg_sys::QueryDesc);
}

thread_local! {
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
    static NEXT_ID: Cell<u64> = const { Cell::new(1) };
    /// Executors of this backend whose state is alive, every statement
    /// counted: each one's memory, going away, counts it out, however it
    /// ended (cursors, savepoints and failures included).
    static LIVE: Cell<u32> = const { Cell::new(0) };
}

/// One watched statement.
struct Frame {
    /// Shared by the frames of one query (a DML statement may read too).
    id: u64,
    /// The executor's query, or null for a utility statement (COPY, TRUNCATE).
    query: *mut pg_sys::QueryDesc,
    /// A small memory context of the query's own, whose reset callback ends
    /// the frames if the query's memory goes without ExecutorEnd; deleted in
    /// ExecutorEnd. Null for utility frames.
    memory: pg_sys::MemoryContext,
    /// Transaction nesting level: a subtransaction's abort ends the frames
    /// at its level or deeper.
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
        PREVIOUS_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREVIOUS_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        pg_sys::RegisterXactCallback(Some(on_transaction), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction), std::ptr::null_mut());
    }
    failures::init();
}

/// Whether statements of this backend are watched now: not the extension's
/// own queries, not a parallel worker (its leader watches).
fn watching() -> bool {
    deferred::available() && !store::in_own_query() && unsafe { pg_sys::ParallelWorkerNumber } < 0
}

/// A foreign key check: PostgreSQL's own `SELECT 1 FROM … FOR KEY SHARE`,
/// run with SECURITY_NOFORCE_RLS, which only ri_triggers.c sets. Statements
/// nested in a cascade (user triggers) are not skipped.
unsafe fn is_foreign_key_check(query: *mut pg_sys::QueryDesc) -> bool {
    pg_sys::InNoForceRLSOperation()
        && !(*query).sourceText.is_null()
        && CStr::from_ptr((*query).sourceText)
            .to_bytes()
            .starts_with(b"SELECT 1 FROM ")
}

fn next_id() -> u64 {
    NEXT_ID.with(|n| n.replace(n.get() + 1))
}

/// Removes and returns the frames matching `which`.
fn take_frames(which: impl Fn(&Frame) -> bool) -> Vec<Frame> {
    FRAMES.with(|f| {
        let Ok(mut frames) = f.try_borrow_mut() else {
            return Vec::new();
        };
        if !frames.iter().any(&which) {
            return Vec::new();
        }
        let (taken, kept): (Vec<Frame>, Vec<Frame>) =
            frames.drain(..).partition(|frame| which(frame));
        *frames = kept;
        let ids: Vec<u64> = taken.iter().map(|frame| frame.id).collect();
        touched::forget(&ids);
        taken
    })
}

/// The entries of frames that ended: a read's events, a failed change's.
fn entries_of(frames: Vec<Frame>, failed: bool) -> Vec<Entry> {
    let mut entries = Vec::new();
    for frame in frames {
        match frame.kind {
            // A read that never ran (permission denied) read nothing.
            Kind::Read(reading) if failed && !reading.started() => {}
            Kind::Read(reading) => entries.extend(reading.entries(&frame.who)),
            Kind::Change(change) if failed => entries.push(change.entry(&frame.who)),
            // A change that got to ExecutorEnd succeeded: its events are the triggers'.
            Kind::Change(_) => {}
        }
    }
    entries
}

/// Queues what is pending if no statement runs (the outermost one ended),
/// or too much piled up; called where waiting on a full queue is allowed.
fn flush_if_due() {
    failures::settle_unreported();
    if LIVE.with(Cell::get) == 0 || pending::len() > pending::MAX_PENDING {
        pending::flush(true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_gone(_arg: *mut std::ffi::c_void) {
    LIVE.with(|l| l.set(l.get().saturating_sub(1)));
}

/// Counts a started executor in, until its memory goes.
unsafe fn count_live(query: *mut pg_sys::QueryDesc) {
    let estate = (*query).estate;
    if estate.is_null() {
        return;
    }
    let memory = (*estate).es_query_cxt;
    let callback = pg_sys::MemoryContextAllocZero(
        memory,
        std::mem::size_of::<pg_sys::MemoryContextCallback>(),
    ) as *mut pg_sys::MemoryContextCallback;
    (*callback).func = Some(executor_gone);
    pg_sys::MemoryContextRegisterResetCallback(memory, callback);
    LIVE.with(|l| l.set(l.get() + 1));
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // Left over from callbacks that could not queue (a failed statement).
    flush_if_due();
    let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
    let change = if !explain_only && watching() {
        watch(query)
    } else {
        None
    };
    let mut errors = no_error_watch();
    error_watch(&mut errors, change);
    match PREVIOUS_START {
        Some(previous) => previous(query, eflags),
        None => standard_executor_start(query, eflags),
    }
    end_error_watch(&mut errors, change);
    count_live(query);
    if let Some(frame) = change {
        touched::watch(query, frame);
    }
}

/// Pushes the frames of a statement that reads or changes tracked tables,
/// before its executor starts (a permission error raised there fails the
/// statement too), and ties their end to the memory of the query. Returns
/// the id of its Change frame, if it has one.
unsafe fn watch(query: *mut pg_sys::QueryDesc) -> Option<u64> {
    let stmt = (*query).plannedstmt;
    let command = (*stmt).commandType;
    let select = command == pg_sys::CmdType::CMD_SELECT;
    // RETURNING hands rows back: read like a SELECT's.
    let returns_rows = select || (*stmt).hasReturning;
    let reading = match LOG_READS.get() {
        LogReads::Off => None,
        _ if is_foreign_key_check(query) => None,
        mode => reads::plan(stmt, returns_rows && mode == LogReads::Subject, !select),
    }
    .filter(|_| reads::recordable());
    // Nothing changes on a standby: the statement is refused right after.
    let change = if LOG_FAILURES.get() && !pg_sys::RecoveryInProgress() {
        failures::plan(stmt, command)
    } else {
        None
    };
    if reading.is_none() && change.is_none() {
        return None;
    }
    let id = next_id();
    let memory = pg_sys::AllocSetContextCreateExtended(
        pg_sys::CurrentMemoryContext,
        c"pg_subject_audit watch".as_ptr(),
        0,
        pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
        pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
    );
    let callback = pg_sys::MemoryContextAllocZero(
        memory,
        std::mem::size_of::<pg_sys::MemoryContextCallback>(),
    ) as *mut pg_sys::MemoryContextCallback;
    (*callback).func = Some(on_query_memory_gone);
    (*callback).arg = id as usize as *mut std::ffi::c_void;
    pg_sys::MemoryContextRegisterResetCallback(memory, callback);
    let level = pg_sys::GetCurrentTransactionNestLevel();
    let who = StatementContext::without_transaction();
    let change_frame = change.is_some().then_some(id);
    FRAMES.with(|f| {
        let mut frames = f.borrow_mut();
        if let Some(reading) = reading {
            frames.push(Frame {
                id,
                query,
                memory,
                level,
                who: who.clone(),
                kind: Kind::Read(reading),
            });
        }
        if let Some(change) = change {
            frames.push(Frame {
                id,
                query,
                memory,
                level,
                who,
                kind: Kind::Change(change),
            });
        }
    });
    change_frame
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
                    reading.start();
                    reading
                        .taps()
                        .then_some(&mut **reading as *mut reads::Reading)
                }
                _ => None,
            })
    });
    let dest = (*query).dest;
    // EXPLAIN ANALYZE runs the query but sends no row anywhere (a portal's
    // receiver is only known here, not in ExecutorStart).
    let tap = match reading {
        Some(reading) if !dest.is_null() && (*dest).mydest != pg_sys::CommandDest::DestNone => {
            reads::tap(reading, dest)
        }
        _ => std::ptr::null_mut(),
    };
    if !tap.is_null() {
        (*query).dest = tap;
    }
    let change = change_frame(query);
    let mut errors = no_error_watch();
    error_watch(&mut errors, change);
    match PREVIOUS_RUN {
        Some(previous) => previous(query, direction, count, execute_once),
        None => standard_executor_run(query, direction, count, execute_once),
    }
    end_error_watch(&mut errors, change);
    if !tap.is_null() {
        (*query).dest = dest;
        pg_sys::pfree(tap.cast());
    }
}

/// AFTER triggers and foreign key checks run here, and can fail the change.
#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    let change = change_frame(query);
    let mut errors = no_error_watch();
    error_watch(&mut errors, change);
    match PREVIOUS_FINISH {
        Some(previous) => previous(query),
        None => standard_executor_finish(query),
    }
    end_error_watch(&mut errors, change);
}

/// The Change frame of `query`, if it has one.
fn change_frame(query: *mut pg_sys::QueryDesc) -> Option<u64> {
    FRAMES.with(|f| {
        f.borrow()
            .iter()
            .find(|frame| frame.query == query && matches!(frame.kind, Kind::Change(_)))
            .map(|frame| frame.id)
    })
}

/// Pushes an error context callback for the Change frame `frame` while its
/// executor runs: error context callbacks run when an error is thrown, also
/// one a handler catches later, so a handled failure still has its
/// SQLSTATE. `callback` lives in the caller's stack frame.
fn error_watch(callback: &mut pg_sys::ErrorContextCallback, frame: Option<u64>) {
    if let Some(id) = frame {
        callback.previous = unsafe { pg_sys::error_context_stack };
        callback.callback = Some(failures::note_error_code);
        callback.arg = id as usize as *mut std::ffi::c_void;
        unsafe { pg_sys::error_context_stack = callback };
    }
}

fn no_error_watch() -> pg_sys::ErrorContextCallback {
    pg_sys::ErrorContextCallback {
        previous: std::ptr::null_mut(),
        callback: None,
        arg: std::ptr::null_mut(),
    }
}

/// Pops the callback of `error_watch` (an error thrown instead pops it: the
/// catching code restores the stack).
fn end_error_watch(callback: &mut pg_sys::ErrorContextCallback, frame: Option<u64>) {
    if frame.is_some() {
        unsafe { pg_sys::error_context_stack = callback.previous };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    end_frames(query);
    match PREVIOUS_END {
        Some(previous) => previous(query),
        None => standard_executor_end(query),
    }
    // The executor's memory is gone now: if it was the outermost, queue.
    flush_if_due();
}

/// Collects the entries of `query`'s frames, which finished.
unsafe fn end_frames(query: *mut pg_sys::QueryDesc) {
    let mut ended = take_frames(|frame| frame.query == query);
    let Some(memory) = ended.first().map(|frame| frame.memory) else {
        return;
    };
    // Rows a DML statement read from other tables: as many as it processed.
    let processed = if (*query).estate.is_null() {
        0
    } else {
        (*(*query).estate).es_processed
    };
    for frame in &mut ended {
        if let Kind::Read(reading) = &mut frame.kind {
            reading.finish(processed);
        }
    }
    pending::collect(entries_of(ended, false));
    // Its reset callback now finds no frame.
    pg_sys::MemoryContextDelete(memory);
}

/// The memory a watched query lived in is going away. Frames still there
/// never reached ExecutorEnd: the statement failed (or, for a read, was cut
/// short). Runs during aborts: must not raise, must not queue.
#[pg_guard]
unsafe extern "C-unwind" fn on_query_memory_gone(arg: *mut std::ffi::c_void) {
    let id = arg as usize as u64;
    pending::collect(entries_of(take_frames(|frame| frame.id == id), true));
}

/// Starts watching a utility statement on tracked tables: COPY FROM and
/// TRUNCATE (their failures), COPY TO (a statement-level read, refused
/// before it streams anything where it cannot be recorded). The utility
/// hook calls `finish_utility` when it succeeded.
///
/// # Safety
/// `node` must be a valid parse tree node.
pub unsafe fn start_utility(node: *mut pg_sys::Node) -> bool {
    if !watching() {
        return false;
    }
    let kind = match reads::plan_copy_to(node) {
        Some(reading) if LOG_READS.get() != LogReads::Off && reads::recordable() => {
            Some(Kind::Read(reading))
        }
        Some(_) => None,
        None if LOG_FAILURES.get() && !pg_sys::RecoveryInProgress() => {
            failures::plan_utility(node).map(Kind::Change)
        }
        None => None,
    };
    let Some(mut kind) = kind else {
        return false;
    };
    if let Kind::Read(reading) = &mut kind {
        reading.start();
    }
    // Built before FRAMES is borrowed: it may run a query (client address).
    let frame = Frame {
        id: next_id(),
        query: std::ptr::null_mut(),
        memory: std::ptr::null_mut(),
        level: pg_sys::GetCurrentTransactionNestLevel(),
        who: StatementContext::without_transaction(),
        kind,
    };
    FRAMES.with(|f| f.borrow_mut().push(frame));
    true
}

/// The watched utility statement succeeded, having processed `rows`.
pub fn finish_utility(rows: u64) {
    let mut frames = FRAMES.with(|f| {
        let mut frames = f.borrow_mut();
        let last = frames.iter().rposition(|frame| frame.query.is_null());
        last.map(|i| vec![frames.remove(i)]).unwrap_or_default()
    });
    for frame in &mut frames {
        if let Kind::Read(reading) = &mut frame.kind {
            reading.finish(rows);
        }
    }
    pending::collect(entries_of(frames, false));
    flush_if_due();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        // Before the commit, where waiting (and so an error) is still allowed.
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            failures::settle_unreported();
            pending::flush(true)
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT => {
            // Every statement still open failed with the transaction.
            pending::collect(entries_of(take_frames(|_| true), true));
            failures::settle_unreported();
            pending::flush(false);
            // No executor outlives the transaction (held cursors are materialized).
            LIVE.with(|l| l.set(0));
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            failures::settle_unreported();
            pending::flush(false);
            LIVE.with(|l| l.set(0));
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
    let level = pg_sys::GetCurrentTransactionNestLevel();
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            // Statements opened inside failed with it; queued later, where
            // waiting is allowed. A change whose error was not reported yet
            // waits for it: PL/pgSQL aborts the subtransaction before it
            // re-raises an error no handler took.
            let ended = take_frames(|frame| frame.level >= level);
            let mut failed = Vec::new();
            for frame in ended {
                match frame.kind {
                    Kind::Change(change) if !change.has_error() => {
                        failures::hold_unreported(change, frame.who)
                    }
                    _ => failed.push(frame),
                }
            }
            pending::collect(entries_of(failed, true));
        }
        // What was opened in a released savepoint now belongs to its parent.
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
            FRAMES.with(|f| {
                if let Ok(mut frames) = f.try_borrow_mut() {
                    for frame in frames.iter_mut().filter(|frame| frame.level >= level) {
                        frame.level = level - 1;
                    }
                }
            });
        }
        _ => {}
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
