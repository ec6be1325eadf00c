//! Events written after their statement, by a background writer: reads of
//! tracked tables and of trails, unlocks, and failed changes. Backends hand
//! them over through a
//! queue in shared memory (plaintext there, never on disk); the writer
//! encrypts, hashes and inserts them like every other event, in its own
//! transactions, so they survive the rollback of the statement they
//! describe. Needs `shared_preload_libraries`.

pub mod entry;
mod queue;
mod writer;

pub use entry::Entry;
use entry::Part;
pub use queue::DropReason;
use queue::Outcome;

use std::time::{Duration, Instant};

use pgrx::pg_sys;

/// How long a backend outside an abort waits for room in a full queue.
const BACK_PRESSURE: Duration = Duration::from_secs(2);

/// Sets up the queue and the launcher. Only while preloading.
pub fn init() {
    queue::init();
    writer::register_launcher();
}

/// Whether this server has the queue (the library was preloaded).
pub fn available() -> bool {
    queue::available()
}

/// Hands `entries` to this database's writer; returns how many of their
/// events were dropped (counted per reason, and recorded in the admin trail
/// by the writer). With `may_wait`, a full queue is waited on while the writer
/// makes room (back-pressure, given up after two seconds without progress,
/// for the whole call); an aborting transaction must not wait.
pub fn hand_over(entries: &[Entry], may_wait: bool) -> u64 {
    let database = unsafe { pg_sys::MyDatabaseId };
    let mut parts = Vec::new();
    let mut left_out = 0;
    for entry in entries {
        let (p, l) = entry.split(queue::SLOT_BYTES);
        parts.extend(p);
        left_out += l as u64;
    }
    /// Counts whatever was not queued, also when a cancel ends the wait.
    struct NotQueued<'a> {
        database: pg_sys::Oid,
        parts: &'a [Part],
        left_out: u64,
    }
    impl NotQueued<'_> {
        fn not_stored(&self) -> u64 {
            self.parts.iter().map(|p| p.events).sum::<u64>()
        }
    }
    impl Drop for NotQueued<'_> {
        fn drop(&mut self) {
            queue::count_dropped(self.database, DropReason::TooLarge, self.left_out);
            queue::count_dropped(self.database, DropReason::QueueFull, self.not_stored());
        }
    }
    let mut rest = NotQueued {
        database,
        parts: &parts,
        left_out,
    };
    let mut since_progress = Instant::now();
    let mut waiting = may_wait;
    loop {
        let stored = queue::push(database, rest.parts, false).len();
        if stored > 0 {
            since_progress = Instant::now();
        }
        rest.parts = &rest.parts[stored..];
        if rest.parts.is_empty() || !waiting {
            break;
        }
        if since_progress.elapsed() >= BACK_PRESSURE {
            waiting = false;
            continue;
        }
        sleep_briefly();
    }
    rest.left_out + rest.not_stored()
}

/// Why the events of an entry were not recorded in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRecorded {
    /// The queue stayed full, or has no room for one more database.
    QueueFull,
    /// A subject value too large for any slot.
    TooLarge,
    /// The writer gave it up: it could not start, or could not write it.
    Dropped,
    /// Not written within the time given (it may still be, later).
    TimedOut,
}

impl std::fmt::Display for NotRecorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotRecorded::QueueFull => "the queue of the background writer is full",
            NotRecorded::TooLarge => "the subject value is too large for the queue",
            NotRecorded::Dropped => "the background writer could not write it",
            NotRecorded::TimedOut => "the background writer did not write it in time",
        })
    }
}

/// Hands `entry` to this database's writer and waits until the writer has
/// committed its events, up to `timeout`. With `refused`, the caller
/// refuses the access if they are not: what could not be queued is then not
/// counted as dropped. Parts already queued are written in any case (an
/// access refused may show as made; never the other way round).
pub fn hand_over_and_wait(
    entry: &Entry,
    timeout: Duration,
    refused: bool,
) -> Result<(), NotRecorded> {
    let (parts, left_out) = entry.split(queue::SLOT_BYTES);
    let database = unsafe { pg_sys::MyDatabaseId };
    let unqueued = |parts: &[Part]| {
        if !refused {
            queue::count_dropped(database, DropReason::TooLarge, left_out as u64);
            let events = parts.iter().map(|p| p.events).sum::<u64>();
            queue::count_dropped(database, DropReason::QueueFull, events);
        }
    };
    if left_out > 0 {
        unqueued(&parts);
        return Err(NotRecorded::TooLarge);
    }
    /// Stops waiting on the way out, however it is left (a cancel too):
    /// whatever is still queued is then written as usual.
    struct Waiting(Vec<queue::Ticket>);
    impl Drop for Waiting {
        fn drop(&mut self) {
            queue::forget(&self.0);
        }
    }
    let mut waiting = Waiting(Vec::with_capacity(parts.len()));
    let started = Instant::now();
    let mut since_progress = started;
    let mut rest = &parts[..];
    while !rest.is_empty() {
        let stored = queue::push(database, rest, true);
        if !stored.is_empty() {
            since_progress = Instant::now();
        }
        rest = &rest[stored.len()..];
        waiting.0.extend(stored);
        if rest.is_empty() {
            break;
        }
        if since_progress.elapsed() >= BACK_PRESSURE {
            unqueued(rest);
            return Err(NotRecorded::QueueFull);
        }
        sleep_briefly();
    }
    loop {
        let mut dropped = false;
        waiting.0.retain(|&ticket| match queue::outcome(ticket) {
            Outcome::Queued => true,
            Outcome::Written => false,
            Outcome::Dropped => {
                dropped = true;
                false
            }
        });
        if dropped {
            return Err(NotRecorded::Dropped);
        }
        if waiting.0.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(NotRecorded::TimedOut);
        }
        sleep_briefly();
    }
}

/// Waits until the writer has taken care of every entry of this database
/// queued so far (written or dropped), up to `timeout`; false if it had not.
pub fn wait_until_written(timeout: Duration) -> bool {
    let started = Instant::now();
    loop {
        if status().0 == 0 {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        sleep_briefly();
    }
}

/// Ten milliseconds, or less if the latch is set; interruptible.
fn sleep_briefly() {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            10,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::check_for_interrupts!();
    }
}

/// (waiting, written, dropped, dropped_recorded) for this database since
/// the server started.
pub fn status() -> (i64, i64, i64, i64) {
    queue::status(unsafe { pg_sys::MyDatabaseId })
}
