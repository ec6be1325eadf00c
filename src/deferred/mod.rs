//! Events written after their statement, by a background writer: reads of
//! tracked tables and failed changes. Backends hand them over through a
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
        let stored = queue::push(database, rest.parts);
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
