//! The background writers. A launcher (one, started with the server, no
//! database) starts a writer for each database that has entries waiting;
//! the writer records them in its own transactions, under the same keys and
//! ledger as every other event, and leaves when the queue stays empty (so it
//! never holds up DROP DATABASE for long).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use zeroize::Zeroizing;

use super::entry::Entry;
use super::queue;
use crate::envelope::PayloadWriter;
use crate::keyring;
use crate::recorder::{self, Draft, Group, Header, StatementContext, Subject};
use crate::store;

/// Entries recorded per transaction.
const BATCH: usize = 256;
/// A writer with nothing to do for this long leaves.
const IDLE_EXIT: Duration = Duration::from_secs(2);
/// How long a writer asked to stop keeps writing what is queued.
const DRAIN_AT_SHUTDOWN: Duration = Duration::from_secs(3);
/// How long a writer waits to try again after drops could not be recorded.
const REPORT_RETRY: Duration = Duration::from_secs(1);

/// Registers the launcher. Only while preloading.
pub fn register_launcher() {
    BackgroundWorkerBuilder::new("pg_subject_audit launcher")
        .set_type("pg_subject_audit launcher")
        .set_library("pg_subject_audit")
        .set_function("pg_subject_audit_launcher_main")
        .enable_shmem_access(None)
        // A standby cannot write: its reads are not queued (docs/reads-and-failures.md).
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_subject_audit_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    queue::attach_launcher();
    let mut writers: HashMap<pg_sys::Oid, DynamicBackgroundWorker> = HashMap::new();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        for database in queue::databases_waiting() {
            // One still starting (or running, about to attach) is waited for.
            let starting = writers.get(&database).is_some_and(|w| {
                matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted))
            });
            if starting || !queue::count_launch(database) {
                continue;
            }
            match BackgroundWorkerBuilder::new("pg_subject_audit writer")
                .set_type("pg_subject_audit writer")
                .set_library("pg_subject_audit")
                .set_function("pg_subject_audit_writer_main")
                .set_argument(Some(pg_sys::Datum::from(database)))
                .enable_spi_access()
                .set_restart_time(None)
                .load_dynamic()
            {
                Ok(worker) => {
                    writers.insert(database, worker);
                }
                Err(_) => log!("pg_subject_audit launcher: no free worker slot for a writer (max_worker_processes); retrying"),
            }
        }
    }
    // A non-zero exit: if this was pg_terminate_backend and not a shutdown,
    // the postmaster starts the launcher again.
    unsafe { pg_sys::proc_exit(1) };
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_subject_audit_writer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !queue::attach_writer(database) {
        return;
    }
    // However this process ends (a FATAL too), its slot must not keep
    // naming it, or no writer would start for this database again.
    unsafe { pg_sys::before_shmem_exit(Some(detach_on_exit), pg_sys::Datum::from(database)) };
    store::pin_worker_settings(&[
        // Nobody waits for these commits; the queue itself does not survive a
        // crash either. WAL is still written and flushed within moments.
        (c"synchronous_commit", c"off"),
        // A subject key another transaction is creating (uncommitted) would
        // block the writer for as long as that transaction lives: such an
        // entry is retried later instead.
        (c"lock_timeout", c"200ms"),
    ]);
    let mut idle_since = Instant::now();
    let mut report_due = Instant::now();
    // Set when asked to stop (shutdown): what is queued is still written, for a while.
    let mut stopping: Option<Instant> = None;
    loop {
        if Instant::now() >= report_due && !report_drops(database) {
            report_due = Instant::now() + REPORT_RETRY;
        }
        let taken = queue::take(database, BATCH);
        let drained = stopping.is_some_and(|since| since.elapsed() >= DRAIN_AT_SHUTDOWN);
        if drained {
            let slots: Vec<usize> = taken.iter().map(|(slot, _, _)| *slot).collect();
            queue::untake(database, &slots);
            break;
        }
        if !taken.is_empty() {
            write(database, taken);
            idle_since = Instant::now();
            continue;
        }
        if stopping.is_some() {
            break;
        }
        if idle_since.elapsed() >= IDLE_EXIT && queue::detach_writer_if_idle(database) {
            return;
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(200))) {
            stopping = Some(Instant::now());
        }
    }
    queue::detach_writer(database);
}

#[pg_guard]
unsafe extern "C-unwind" fn detach_on_exit(_code: i32, database: pg_sys::Datum) {
    queue::detach_writer(pg_sys::Oid::from(database.value() as u32));
}

/// Records the taken entries in one transaction; if that fails, one by one,
/// so a bad entry costs only itself: dropped and counted, or, if it waited
/// on another transaction's lock, retried later.
fn write(database: pg_sys::Oid, taken: Vec<(usize, Vec<u8>, u32)>) {
    // Entries that already waited on a lock go alone, so they cannot hold
    // up the others again.
    let (retried, fresh): (Vec<_>, Vec<_>) = taken.into_iter().partition(|(_, _, n)| *n > 0);
    let (slots, bytes): (Vec<usize>, Vec<Vec<u8>>) =
        fresh.into_iter().map(|(slot, b, _)| (slot, b)).unzip();
    let (mut single_slots, mut single_bytes): (Vec<usize>, Vec<Vec<u8>>) =
        retried.into_iter().map(|(slot, b, _)| (slot, b)).unzip();
    if !bytes.is_empty() {
        if in_transaction(|| record(&bytes)) == Outcome::Done {
            queue::release(database, &slots, true);
        } else {
            single_slots.extend(slots);
            single_bytes.extend(bytes);
        }
    }
    for (slot, b) in single_slots.iter().zip(&single_bytes) {
        match in_transaction(|| record(std::slice::from_ref(b))) {
            Outcome::Done => queue::release(database, &[*slot], true),
            Outcome::LockBusy => queue::retry_later(database, *slot),
            Outcome::Failed | Outcome::NotInstalled => queue::release(database, &[*slot], false),
        }
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Done,
    /// It waited on a lock held by another transaction (lock_timeout).
    LockBusy,
    Failed,
    /// The extension is not installed in this database (any more).
    NotInstalled,
}

/// Records in the admin trail how many events were dropped since the last
/// report, one DROPPED event per reason; false if one could not be recorded
/// yet (it is tried again; the counts survive a restart).
fn report_drops(database: pg_sys::Oid) -> bool {
    for (reason, dropped) in queue::unreported_drops(database) {
        let title = format!(
            "{dropped} reads or failed statements not recorded: {}",
            reason.why()
        );
        match in_transaction(|| {
            let header = Header {
                operation: "DROPPED",
                status: "error",
                sqlstate: None,
                title: Some(&title),
                table_name: None,
            };
            let draft = Draft {
                subject: Subject::Nobody,
                columns: None,
                payload: None,
            };
            recorder::record(&header, &context(&Entry::default()), &[draft]);
        }) {
            Outcome::Done => queue::mark_reported(database, reason, dropped),
            Outcome::NotInstalled => {
                // No trail to record them in: the server log is all there is.
                log!("pg_subject_audit writer: {title} (pg_subject_audit is not installed in database {})", database.to_u32());
                queue::mark_reported(database, reason, dropped);
            }
            Outcome::LockBusy | Outcome::Failed => return false,
        }
    }
    true
}

/// Runs `f` in a transaction of its own; rolled back (and logged, unless it
/// only waited on a lock) if it failed.
fn in_transaction(f: impl FnOnce()) -> Outcome {
    PgTryBuilder::new(AssertUnwindSafe(move || unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let installed = store::extension_installed();
        if installed {
            f();
        }
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
        if installed {
            Outcome::Done
        } else {
            Outcome::NotInstalled
        }
    }))
    .catch_others(|e| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        match &e {
            pg_sys::panic::CaughtError::PostgresError(report)
                if report.sql_error_code() == pgrx::PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE =>
            {
                Outcome::LockBusy
            }
            pg_sys::panic::CaughtError::PostgresError(report) => {
                log!(
                    "pg_subject_audit writer: could not record deferred events: {}",
                    report.message()
                );
                Outcome::Failed
            }
            _ => Outcome::Failed,
        }
    })
    .execute()
}

/// Who and when, as the statement's backend saw it; the transaction is the writer's.
fn context(entry: &Entry) -> StatementContext {
    let who = &entry.who;
    let or_writer = |name: &String| match name.is_empty() {
        true => "pg_subject_audit writer".to_owned(),
        false => name.clone(),
    };
    StatementContext {
        at: if who.at == 0 {
            unsafe { pg_sys::GetCurrentTimestamp() }
        } else {
            who.at
        },
        txid: unsafe { pg_sys::GetTopFullTransactionId() }.value,
        actor: or_writer(&who.actor),
        db_role: or_writer(&who.db_role),
        session_role: or_writer(&who.session_role),
        ..who.clone()
    }
}

/// The entries' events, in one pass: per entry one event per subject, or
/// one of nobody's.
fn record(encoded: &[Vec<u8>]) {
    let entries: Vec<Entry> = encoded
        .iter()
        .map(|bytes| {
            Entry::decode(bytes).unwrap_or_else(|e| {
                store::error::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                    format!("undecodable deferred entry: {e:?}"),
                )
            })
        })
        .collect();
    let titles: Vec<String> = entries.iter().map(Entry::full_title).collect();
    let headers: Vec<Header> = entries
        .iter()
        .zip(&titles)
        .map(|(entry, title)| Header {
            operation: &entry.operation,
            status: if entry.failed { "error" } else { "ok" },
            sqlstate: entry.sqlstate.as_deref(),
            title: Some(title),
            // A read of a trail, an unlock: no table.
            table_name: (!entry.table_name.is_empty()).then_some(entry.table_name.as_str()),
        })
        .collect();
    let contexts: Vec<StatementContext> = entries.iter().map(context).collect();
    let drafts: Vec<Vec<Draft>> = entries.iter().map(drafts).collect();
    let groups: Vec<Group> = headers
        .iter()
        .zip(&contexts)
        .zip(&drafts)
        .map(|((header, statement), drafts)| Group {
            header,
            statement,
            drafts,
        })
        .collect();
    recorder::record_groups(&groups);
}

fn drafts(entry: &Entry) -> Vec<Draft> {
    let columns: Option<Rc<[String]>> =
        (!entry.columns.is_empty()).then(|| entry.columns.clone().into());
    let payload = || {
        (!entry.admin).then(|| {
            Zeroizing::new(
                PayloadWriter::with_note(entry.who.reason.as_deref(), entry.message.as_deref())
                    .finish(),
            )
        })
    };
    // Of nobody's: no payload (no erasure could reach it).
    if entry.subjects.is_empty() {
        return vec![Draft {
            subject: Subject::Nobody,
            columns,
            payload: None,
        }];
    }
    entry
        .subjects
        .iter()
        .map(|token| Draft {
            subject: Subject::Digest(keyring::subject_digest(token)),
            columns: columns.clone(),
            payload: payload(),
        })
        .collect()
}
