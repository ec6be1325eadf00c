//! The hand-over queue: a fixed array of slots in shared memory, each
//! holding one encoded part of an `Entry` for one database, plus counters.
//! Backends fill slots (also while their transaction aborts: no allocation,
//! no catalog, one LWLock); the database's writer takes and frees them.
//!
//! A full queue never blocks an abort: what does not fit is dropped and
//! counted, per database and reason, in events; the writer records the
//! counts in the admin trail. Counts not recorded yet when the server stops
//! (or restarts after a crash) are saved by the postmaster to a file in the
//! data directory, with the events still queued, and loaded when shared
//! memory is set up again: a restart loses no count.
//!
//! A backend that must know its entry was written (a read of a trail, an
//! unlock) pushes it with itself as the waiter: when the
//! writer is done with such a slot, it keeps it as DONE, with the outcome,
//! until the waiter has looked (or, if the waiter went away, for a minute).

use std::ptr::{addr_of_mut, null_mut};

use pgrx::pg_sys;

use super::entry::Part;

/// Slots, and the bytes an encoded part may take (entries are split to fit).
const SLOTS: usize = 4096;
pub const SLOT_BYTES: usize = 4096 - 16;
/// Databases with a slot for their counters and writer.
const DATABASES: usize = 32;
/// Launches that found the writer gone before it attached: then the
/// database is taken as unreachable (dropped, or not accepting connections).
const MAX_FAILED_LAUNCHES: u32 = 3;
/// Times an entry that waited on a lock is put back before it is dropped
/// (about ten minutes, at one retry a second).
const MAX_ATTEMPTS: u32 = 600;
/// Times an entry is handed to a new writer after its writer died with it.
const MAX_HANDED_AGAIN: u32 = 3;

/// How long a DONE slot waits for its waiter to look, in microseconds.
const DONE_KEPT: i64 = 60_000_000;

const FREE: u32 = 0;
const FILLED: u32 = 1;
const TAKEN: u32 = 2;
/// Written or dropped, kept for its waiter to see which (`written`).
const DONE: u32 = 3;

/// Why events were dropped: each reason is its own DROPPED event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DropReason {
    QueueFull,
    TooLarge,
    NoWriter,
    LockWait,
    Failed,
    Stopped,
}

const REASONS: [DropReason; 6] = [
    DropReason::QueueFull,
    DropReason::TooLarge,
    DropReason::NoWriter,
    DropReason::LockWait,
    DropReason::Failed,
    DropReason::Stopped,
];

impl DropReason {
    /// What the DROPPED event's title says.
    pub fn why(self) -> &'static str {
        match self {
            DropReason::QueueFull => "the queue was full",
            DropReason::TooLarge => "a subject value was too large for the queue",
            DropReason::NoWriter => "no writer could connect to the database",
            DropReason::LockWait => "they waited ten minutes on another transaction's lock",
            DropReason::Failed => "they could not be written (see the server log)",
            DropReason::Stopped => "the server stopped before the writer wrote them",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A slot's state, kept apart from its bytes so that scans under the lock
/// read a few hundred kilobytes, not sixteen megabytes.
#[repr(C)]
struct Slot {
    state: u32,
    database: pg_sys::Oid,
    len: u32,
    /// Times it was put back after waiting on a lock.
    attempts: u32,
    /// Times it was handed out again because its writer died.
    handed_again: u32,
    /// Order of arrival: a database's entries are written in this order.
    sequence: u64,
    /// Events it makes (for drop counts).
    events: u64,
    /// Not to be taken before this time (a put-back entry), or, once DONE,
    /// when it was done; microseconds.
    due: i64,
    /// The backend waiting to learn the outcome, or null.
    waiter: *mut pg_sys::PGPROC,
    /// Once DONE: whether its events were written (else dropped).
    written: bool,
}

impl Slot {
    /// Holding an entry still to be written.
    fn queued(&self) -> bool {
        self.state == FILLED || self.state == TAKEN
    }

    /// Its entry was written, or dropped, at `now`: freed, or kept DONE for
    /// its waiter, which is returned (to be woken).
    fn finish(&mut self, written: bool, now: i64) -> Option<*mut pg_sys::PGPROC> {
        if self.waiter.is_null() {
            self.state = FREE;
            return None;
        }
        self.state = DONE;
        self.written = written;
        self.due = now;
        Some(self.waiter)
    }

    /// Whether it can take a new entry at `now`: free, or DONE long enough
    /// that its waiter is gone (a FATAL error ends a backend without its
    /// cleanup).
    fn reusable(&self, now: i64) -> bool {
        self.state == FREE || (self.state == DONE && now - self.due > DONE_KEPT)
    }

    /// What became of the entry numbered `sequence`, for its waiter; once
    /// it is known, the slot is freed (look once).
    fn outcome(&mut self, sequence: u64) -> Outcome {
        if self.sequence != sequence || self.waiter.is_null() {
            return Outcome::Dropped;
        }
        match self.state {
            FILLED | TAKEN => Outcome::Queued,
            DONE => {
                self.state = FREE;
                self.waiter = null_mut();
                if self.written {
                    Outcome::Written
                } else {
                    Outcome::Dropped
                }
            }
            _ => Outcome::Dropped,
        }
    }

    /// Its waiter stops waiting for the entry numbered `sequence`: still
    /// queued, it is written as usual; done, the slot is freed.
    fn forget(&mut self, sequence: u64) {
        if self.sequence != sequence || self.waiter.is_null() {
            return;
        }
        self.waiter = null_mut();
        if self.state == DONE {
            self.state = FREE;
        }
    }
}

#[repr(C)]
struct Database {
    oid: pg_sys::Oid,
    /// The attached writer, null when none runs.
    writer: *mut pg_sys::PGPROC,
    failed_launches: u32,
    /// No writer could connect (the database is gone, or refuses
    /// connections): its slot may be reused, unreported drops and all.
    unreachable: bool,
    written: u64,
    /// Per `DropReason`.
    dropped: [u64; REASONS.len()],
    /// Drops already recorded in this database's admin trail.
    reported: [u64; REASONS.len()],
}

impl Database {
    fn unreported(&self) -> u64 {
        self.dropped.iter().sum::<u64>() - self.reported.iter().sum::<u64>()
    }
}

#[repr(C)]
struct Shared {
    launcher: *mut pg_sys::PGPROC,
    next_sequence: u64,
    /// Where the search for a free slot starts.
    next_free: usize,
    /// Drops of databases without a slot of their own.
    dropped_elsewhere: u64,
    databases: [Database; DATABASES],
    slots: [Slot; SLOTS],
    data: [[u8; SLOT_BYTES]; SLOTS],
}

static mut SHARED: *mut Shared = null_mut();
static mut LOCK: *mut pg_sys::LWLock = null_mut();
static mut PREVIOUS_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_STARTUP: pg_sys::shmem_startup_hook_type = None;
const NAME: &std::ffi::CStr = c"pg_subject_audit deferred events";

/// Asks for the shared memory. Only from `_PG_init` while preloading.
pub fn init() {
    unsafe {
        PREVIOUS_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request);
        PREVIOUS_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request() {
    if let Some(previous) = PREVIOUS_REQUEST {
        previous();
    }
    pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
    pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup() {
    if let Some(previous) = PREVIOUS_STARTUP {
        previous();
    }
    // AddinShmemInitLock, a macro in lwlocknames.h.
    let init_lock = addr_of_mut!((*pg_sys::MainLWLockArray.add(21)).lock);
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let shared = pg_sys::ShmemInitStruct(NAME.as_ptr(), std::mem::size_of::<Shared>(), &mut found);
    SHARED = shared.cast();
    if !found {
        std::ptr::write_bytes(shared.cast::<u8>(), 0, std::mem::size_of::<Shared>());
        load_carried_over(&mut *SHARED);
    }
    // In the postmaster: it exits (or resets shared memory after a crash)
    // after every other process, so it sees the last counts.
    if !pg_sys::IsUnderPostmaster {
        pg_sys::on_shmem_exit(Some(save_at_exit), pg_sys::Datum::from(0));
    }
    LOCK = addr_of_mut!((*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock);
    pg_sys::LWLockRelease(init_lock);
}

/// Whether the queue exists (the library was preloaded).
pub fn available() -> bool {
    unsafe { !SHARED.is_null() }
}

/// Runs `f` on the shared state under the lock. `f` must not raise.
fn locked<R>(f: impl FnOnce(&mut Shared) -> R) -> R {
    unsafe {
        pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let r = f(&mut *SHARED);
        pg_sys::LWLockRelease(LOCK);
        r
    }
}

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

impl Shared {
    /// The slot of `oid`, taking a free one (or one no longer in use:
    /// nothing queued, no writer, every drop reported) if it has none.
    fn database(&mut self, oid: pg_sys::Oid) -> Option<&mut Database> {
        let i = match self.databases.iter().position(|d| d.oid == oid) {
            Some(i) => i,
            None => {
                let in_use: Vec<pg_sys::Oid> = self
                    .slots
                    .iter()
                    .filter(|s| s.queued())
                    .map(|s| s.database)
                    .collect();
                let empty = self
                    .databases
                    .iter()
                    .position(|d| d.oid == pg_sys::InvalidOid);
                let i = empty.or_else(|| {
                    self.databases.iter().position(|d| {
                        d.writer.is_null()
                            && (d.unreported() == 0 || d.unreachable)
                            && !in_use.contains(&d.oid)
                    })
                })?;
                self.databases[i] = Database {
                    oid,
                    writer: null_mut(),
                    failed_launches: 0,
                    unreachable: false,
                    written: 0,
                    dropped: [0; REASONS.len()],
                    reported: [0; REASONS.len()],
                };
                i
            }
        };
        Some(&mut self.databases[i])
    }

    fn count_dropped(&mut self, database: pg_sys::Oid, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        match self.database(database) {
            Some(d) => d.dropped[reason.index()] += n,
            None => self.dropped_elsewhere += n,
        }
    }

    /// Ends slot `i`: its events were written, or dropped. Wipes its bytes
    /// (they are plaintext); frees it, or keeps it DONE for its waiter.
    fn finish(&mut self, i: usize, written: bool) {
        let len = self.slots[i].len as usize;
        self.data[i][..len].fill(0);
        if let Some(waiter) = self.slots[i].finish(written, now()) {
            unsafe { wake(waiter) };
        }
    }
}

unsafe fn wake(proc_: *mut pg_sys::PGPROC) {
    if !proc_.is_null() {
        pg_sys::SetLatch(addr_of_mut!((*proc_).procLatch));
    }
}

/// A queued entry its backend waits for: the slot, and the entry's
/// sequence number, which tells it from a later entry in the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
    sequence: u64,
}

/// What became of a waited-for entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Queued,
    Written,
    /// Dropped, or no longer known (its slot was reclaimed).
    Dropped,
}

/// Puts the first of `parts` that fit into the queue for `database`, wakes
/// its writer (or the launcher), and returns a ticket for each one stored.
/// With `wait`, this backend is their waiter: see `outcome` and `forget`.
/// Stores nothing for a database that gets no slot (more than `DATABASES`
/// busy). Safe while a transaction aborts.
pub fn push(database: pg_sys::Oid, parts: &[Part], wait: bool) -> Vec<Ticket> {
    if !available() || parts.is_empty() {
        return Vec::new();
    }
    let now = now();
    let waiter = if wait {
        unsafe { pg_sys::MyProc }
    } else {
        null_mut()
    };
    let (stored, wake_up) = locked(|shared| {
        let Some(writer) = shared.database(database).map(|d| d.writer) else {
            return (Vec::new(), null_mut());
        };
        let mut stored = Vec::new();
        let start = shared.next_free;
        for k in 0..SLOTS {
            let Some(part) = parts
                .get(stored.len())
                .filter(|p| p.bytes.len() <= SLOT_BYTES)
            else {
                break;
            };
            let i = (start + k) % SLOTS;
            if !shared.slots[i].reusable(now) {
                continue;
            }
            shared.data[i][..part.bytes.len()].copy_from_slice(&part.bytes);
            let sequence = shared.next_sequence;
            shared.slots[i] = Slot {
                state: FILLED,
                database,
                len: part.bytes.len() as u32,
                attempts: 0,
                handed_again: 0,
                sequence,
                events: part.events,
                due: 0,
                waiter,
                written: false,
            };
            shared.next_sequence += 1;
            shared.next_free = (i + 1) % SLOTS;
            stored.push(Ticket { slot: i, sequence });
        }
        let wake_up = if writer.is_null() {
            shared.launcher
        } else {
            writer
        };
        (stored, wake_up)
    });
    if !stored.is_empty() {
        unsafe { wake(wake_up) };
    }
    stored
}

/// What became of the entry of `ticket` so far; once it is known, the
/// slot is freed (look once).
pub fn outcome(ticket: Ticket) -> Outcome {
    locked(|shared| shared.slots[ticket.slot].outcome(ticket.sequence))
}

/// Stops waiting for the entries of `tickets`: those still queued are
/// written as usual, those done are freed.
pub fn forget(tickets: &[Ticket]) {
    if tickets.is_empty() {
        return;
    }
    locked(|shared| {
        for ticket in tickets {
            shared.slots[ticket.slot].forget(ticket.sequence);
        }
    });
}

/// Counts `n` events of `database` that could not be queued.
pub fn count_dropped(database: pg_sys::Oid, reason: DropReason, n: u64) {
    if available() && n > 0 {
        locked(|shared| shared.count_dropped(database, reason, n));
    }
}

/// The launcher announces itself, so backends can wake it.
pub fn attach_launcher() {
    locked(|shared| shared.launcher = unsafe { pg_sys::MyProc });
}

/// Databases with entries waiting and no writer attached.
pub fn databases_waiting() -> Vec<pg_sys::Oid> {
    locked(|shared| {
        let mut waiting: Vec<pg_sys::Oid> = Vec::new();
        // Taken too: a writer that ended with some taken left them behind.
        for slot in shared.slots.iter().filter(|s| s.queued()) {
            if !waiting.contains(&slot.database) {
                waiting.push(slot.database);
            }
        }
        waiting.retain(|&oid| {
            shared
                .databases
                .iter()
                .any(|d| d.oid == oid && d.writer.is_null())
        });
        // Drops to record, those carried over a restart too.
        for d in &shared.databases {
            if d.writer.is_null()
                && !d.unreachable
                && d.unreported() > 0
                && !waiting.contains(&d.oid)
            {
                waiting.push(d.oid);
            }
        }
        waiting
    })
}

/// Counts a launch of a writer for `database`. After `MAX_FAILED_LAUNCHES`
/// writers that ended without attaching, the database is taken as
/// unreachable (dropped, or not accepting connections): its entries are
/// dropped and counted, and false is returned.
pub fn count_launch(database: pg_sys::Oid) -> bool {
    let gave_up = locked(|shared| {
        let launches = shared.database(database).map(|d| {
            d.failed_launches += 1;
            // Never while a writer is attached (attaching resets the count).
            if !d.writer.is_null() {
                d.failed_launches = 0;
            }
            d.failed_launches
        });
        if launches.is_some_and(|n| n <= MAX_FAILED_LAUNCHES) {
            return None;
        }
        // No writer runs there: taken slots are orphans of a dead one.
        let mut events = 0;
        for i in 0..SLOTS {
            if shared.slots[i].database == database && shared.slots[i].queued() {
                events += shared.slots[i].events;
                shared.finish(i, false);
            }
        }
        shared.count_dropped(database, DropReason::NoWriter, events);
        // Recorded in its trail if a writer runs there again before the
        // slot is reused; said in the server log in any case.
        if let Some(d) = shared.database(database) {
            d.failed_launches = 0;
            d.unreachable = true;
        }
        Some(events)
    });
    match gave_up {
        None => true,
        Some(events) => {
            pgrx::log!(
                "pg_subject_audit launcher: no writer could connect to database {}: {events} queued events dropped",
                database.to_u32()
            );
            false
        }
    }
}

/// The writer of `database` attaches; false if another one already is.
/// Entries a writer that died had taken are handed out again.
pub fn attach_writer(database: pg_sys::Oid) -> bool {
    locked(|shared| {
        let Some(d) = shared.database(database) else {
            return false;
        };
        if !d.writer.is_null() {
            return false;
        }
        d.writer = unsafe { pg_sys::MyProc };
        d.failed_launches = 0;
        d.unreachable = false;
        // An entry taken by writers that died each time may be what kills
        // them: after a few times it is dropped, counted.
        let mut poisoned = 0;
        for i in 0..SLOTS {
            let slot = &mut shared.slots[i];
            if slot.database == database && slot.state == TAKEN {
                slot.handed_again += 1;
                if slot.handed_again > MAX_HANDED_AGAIN {
                    poisoned += slot.events;
                    shared.finish(i, false);
                } else {
                    slot.state = FILLED;
                }
            }
        }
        shared.count_dropped(database, DropReason::Failed, poisoned);
        true
    })
}

/// Detaches the writer of `database`, unless entries are waiting for it.
pub fn detach_writer_if_idle(database: pg_sys::Oid) -> bool {
    locked(|shared| {
        let waiting = shared
            .slots
            .iter()
            .any(|s| s.database == database && s.state == FILLED);
        if !waiting {
            detach(shared, database);
        }
        !waiting
    })
}

/// Detaches this process as the writer of `database` (it is exiting).
pub fn detach_writer(database: pg_sys::Oid) {
    if available() {
        locked(|shared| detach(shared, database));
    }
}

fn detach(shared: &mut Shared, database: pg_sys::Oid) {
    let me = unsafe { pg_sys::MyProc };
    if let Some(d) = shared.databases.iter_mut().find(|d| d.oid == database) {
        if d.writer == me {
            d.writer = null_mut();
        }
    }
}

/// Takes up to `max` waiting entries of `database` that are due, oldest
/// first: (slot, bytes, times it was put back).
pub fn take(database: pg_sys::Oid, max: usize) -> Vec<(usize, Vec<u8>, u32)> {
    let now = now();
    locked(|shared| {
        let mut waiting: Vec<(u64, usize)> = shared
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.database == database && s.state == FILLED && s.due <= now)
            .map(|(i, s)| (s.sequence, i))
            .collect();
        waiting.sort_unstable();
        // An entry handed out again after its writer died goes alone: if it
        // is what kills writers, only it is counted for that.
        let max = match waiting
            .iter()
            .position(|&(_, i)| shared.slots[i].handed_again > 0)
        {
            Some(first) => {
                waiting = vec![waiting[first]];
                1
            }
            None => max,
        };
        waiting
            .into_iter()
            .take(max)
            .map(|(_, i)| {
                shared.slots[i].state = TAKEN;
                let len = shared.slots[i].len as usize;
                (i, shared.data[i][..len].to_vec(), shared.slots[i].attempts)
            })
            .collect()
    })
}

/// Frees taken slots: their events were written, or could not be (dropped).
pub fn release(database: pg_sys::Oid, slots: &[usize], written: bool) {
    locked(|shared| {
        let mine = |s: &Slot| s.state == TAKEN && s.database == database;
        let slots: Vec<usize> = slots
            .iter()
            .copied()
            .filter(|&i| mine(&shared.slots[i]))
            .collect();
        let events: u64 = slots.iter().map(|&i| shared.slots[i].events).sum();
        for &i in &slots {
            shared.finish(i, written);
        }
        if written {
            if let Some(d) = shared.database(database) {
                d.written += events;
            }
        } else {
            shared.count_dropped(database, DropReason::Failed, events);
        }
    });
}

/// Puts a taken slot back, to be retried in a second (it waited on a lock
/// another transaction holds); dropped and counted after `MAX_ATTEMPTS`.
pub fn retry_later(database: pg_sys::Oid, slot: usize) {
    let due = now() + 1_000_000;
    locked(|shared| {
        let s = &mut shared.slots[slot];
        if s.state != TAKEN || s.database != database {
            return;
        }
        s.attempts += 1;
        if s.attempts > MAX_ATTEMPTS {
            let events = s.events;
            shared.finish(slot, false);
            shared.count_dropped(database, DropReason::LockWait, events);
        } else {
            s.state = FILLED;
            s.due = due;
        }
    });
}

/// Puts taken slots back untouched (a writer stopping before writing them).
pub fn untake(database: pg_sys::Oid, slots: &[usize]) {
    locked(|shared| {
        for &i in slots {
            let s = &mut shared.slots[i];
            if s.state == TAKEN && s.database == database {
                s.state = FILLED;
            }
        }
    });
}

/// Drops of `database` not yet recorded in its admin trail, per reason.
pub fn unreported_drops(database: pg_sys::Oid) -> Vec<(DropReason, u64)> {
    locked(|shared| {
        let Some(d) = shared.databases.iter().find(|d| d.oid == database) else {
            return Vec::new();
        };
        REASONS
            .iter()
            .map(|&r| (r, d.dropped[r.index()] - d.reported[r.index()]))
            .filter(|&(_, n)| n > 0)
            .collect()
    })
}

pub fn mark_reported(database: pg_sys::Oid, reason: DropReason, n: u64) {
    locked(|shared| {
        if let Some(d) = shared.databases.iter_mut().find(|d| d.oid == database) {
            d.reported[reason.index()] += n;
        }
    });
}

/// (waiting entries, written events, dropped events, drops recorded in the
/// admin trail) for `database`, since the server started; drops carried
/// over from before a restart count as dropped since.
pub fn status(database: pg_sys::Oid) -> (i64, i64, i64, i64) {
    if !available() {
        return (0, 0, 0, 0);
    }
    locked(|shared| {
        let waiting = shared
            .slots
            .iter()
            .filter(|s| s.database == database && s.queued())
            .count() as i64;
        let (written, dropped, recorded) = shared
            .databases
            .iter()
            .find(|d| d.oid == database)
            .map_or((0, 0, 0), |d| {
                let sum = |counts: &[u64]| counts.iter().sum::<u64>() as i64;
                (d.written as i64, sum(&d.dropped), sum(&d.reported))
            });
        (waiting, written, dropped, recorded)
    })
}

/// Where the postmaster keeps unrecorded drops while the server is down
/// (relative to the data directory, its working directory). Removed once
/// loaded, so a base backup of a running server never copies it.
const CARRIED_OVER: &str = "pg_subject_audit_drops";

/// One line per database and reason: `<database oid> <reason> <events>`.
fn encode_carried_over(counts: &[(u32, DropReason, u64)]) -> String {
    counts
        .iter()
        .map(|(oid, reason, n)| format!("{oid} {} {n}\n", reason.index()))
        .collect()
}

/// What `encode_carried_over` wrote; other lines are skipped.
fn decode_carried_over(text: &str) -> Vec<(u32, DropReason, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let oid = fields.next()?.parse().ok()?;
            let reason = *REASONS.get(fields.next()?.parse::<usize>().ok()?)?;
            let n = fields.next()?.parse().ok()?;
            fields.next().is_none().then_some((oid, reason, n))
        })
        .collect()
}

/// The unrecorded drops of every database, and the events still queued
/// (counted as `Stopped`): every other process has exited.
fn unrecorded(shared: &Shared) -> Vec<(u32, DropReason, u64)> {
    let mut counts = Vec::new();
    for d in shared
        .databases
        .iter()
        .filter(|d| d.oid != pg_sys::InvalidOid)
    {
        let queued: u64 = shared
            .slots
            .iter()
            .filter(|s| s.queued() && s.database == d.oid)
            .map(|s| s.events)
            .sum();
        for r in REASONS {
            let mut n = d.dropped[r.index()] - d.reported[r.index()];
            if r == DropReason::Stopped {
                n += queued;
            }
            if n > 0 {
                counts.push((d.oid.to_u32(), r, n));
            }
        }
    }
    counts
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn save_at_exit(_code: i32, _arg: pg_sys::Datum) {
    if SHARED.is_null() {
        return;
    }
    let counts = unrecorded(&*SHARED);
    if counts.is_empty() {
        return;
    }
    let temporary = format!("{CARRIED_OVER}.tmp");
    let written = std::fs::File::create(&temporary)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, encode_carried_over(&counts).as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, CARRIED_OVER));
    if let Err(e) = written {
        pgrx::log!("pg_subject_audit: could not save the counts of dropped events ({counts:?}) to {CARRIED_OVER}: {e}");
    }
}

/// Counts the drops saved by the last `save_at_exit` as unrecorded ones.
fn load_carried_over(shared: &mut Shared) {
    let Ok(text) = std::fs::read_to_string(CARRIED_OVER) else {
        return;
    };
    for (oid, reason, n) in decode_carried_over(&text) {
        shared.count_dropped(pg_sys::Oid::from(oid), reason, n);
    }
    if let Err(e) = std::fs::remove_file(CARRIED_OVER) {
        pgrx::log!("pg_subject_audit: could not remove {CARRIED_OVER}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_over_counts_round_trip() {
        let counts = vec![
            (16384, DropReason::QueueFull, 104),
            (16384, DropReason::Stopped, 1),
            (5, DropReason::Failed, u64::MAX),
        ];
        let text = encode_carried_over(&counts);
        assert_eq!(decode_carried_over(&text), counts);
        for r in REASONS {
            assert_eq!(REASONS[r.index()], r);
        }
    }

    /// A slot holding entry 7, with a waiter unless `waiter` is false.
    fn slot(waiter: bool) -> Slot {
        Slot {
            state: FILLED,
            database: pg_sys::Oid::from(1),
            len: 10,
            attempts: 0,
            handed_again: 0,
            sequence: 7,
            events: 1,
            due: 0,
            // Never dereferenced here: only compared with null.
            waiter: if waiter {
                std::ptr::NonNull::dangling().as_ptr()
            } else {
                null_mut()
            },
            written: false,
        }
    }

    #[test]
    fn malformed_carried_over_lines_are_skipped() {
        let text = "16384 0 7\n1 6 3\nx 0 1\n1 0\n1 0 1 1\n1 0 -1\n\n2 2 9";
        assert_eq!(
            decode_carried_over(text),
            vec![
                (16384, DropReason::QueueFull, 7),
                (2, DropReason::NoWriter, 9)
            ]
        );
    }

    #[test]
    fn a_waited_entry_is_kept_until_its_waiter_looks() {
        let mut s = slot(true);
        assert_eq!(s.outcome(7), Outcome::Queued);
        s.state = TAKEN;
        assert_eq!(s.outcome(7), Outcome::Queued);
        assert!(s.finish(true, 1_000).is_some(), "the waiter is woken");
        assert_eq!(s.state, DONE);
        assert!(!s.queued() && !s.reusable(1_000));
        assert_eq!(s.outcome(7), Outcome::Written);
        assert_eq!(s.state, FREE);
        // Looked at once: the slot is someone else's now.
        assert_eq!(s.outcome(7), Outcome::Dropped);
    }

    #[test]
    fn a_dropped_entry_says_so() {
        let mut s = slot(true);
        s.finish(false, 0);
        assert_eq!(s.outcome(7), Outcome::Dropped);
        assert_eq!(s.state, FREE);
    }

    #[test]
    fn an_unwaited_entry_is_freed_at_once() {
        let mut s = slot(false);
        assert!(s.finish(true, 0).is_none());
        assert_eq!(s.state, FREE);
    }

    #[test]
    fn another_entry_in_the_slot_is_not_taken_for_the_waited_one() {
        let mut s = slot(true);
        s.sequence = 8;
        assert_eq!(s.outcome(7), Outcome::Dropped);
        s.forget(7);
        assert!(!s.waiter.is_null(), "entry 8's waiter stays");
        assert_eq!(s.outcome(8), Outcome::Queued);
    }

    #[test]
    fn a_forgotten_entry_is_still_written_and_then_freed() {
        let mut s = slot(true);
        s.forget(7);
        assert_eq!(s.state, FILLED);
        assert!(s.finish(true, 0).is_none(), "nobody to wake");
        assert_eq!(s.state, FREE);
        let mut done = slot(true);
        done.finish(true, 0);
        done.forget(7);
        assert_eq!(done.state, FREE);
    }

    #[test]
    fn a_done_slot_whose_waiter_went_away_is_reused_after_a_while() {
        let mut s = slot(true);
        s.finish(true, 5_000);
        assert!(!s.reusable(5_000 + DONE_KEPT));
        assert!(s.reusable(5_000 + DONE_KEPT + 1));
    }
}
