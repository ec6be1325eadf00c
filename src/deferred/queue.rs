//! The hand-over queue: a fixed array of slots in shared memory, each
//! holding one encoded `Entry` for one database, plus counters. Backends
//! fill slots (also while their transaction aborts: no allocation, no
//! catalog, one LWLock); the database's writer takes and frees them.
//!
//! A full queue never blocks an abort: the entry is dropped and counted,
//! per database, and the writer records the count in the admin trail.

use std::ptr::{addr_of_mut, null_mut};

use pgrx::pg_sys;

/// Slots, and the bytes an encoded entry may take (entries are split to fit).
const SLOTS: usize = 1024;
pub const SLOT_BYTES: usize = 4096 - 16;
/// Databases with a writer slot; others' entries are dropped (counted).
const DATABASES: usize = 32;
/// Launches that found the writer gone before it attached: then the
/// database is taken as unreachable (dropped, or not accepting connections).
const MAX_FAILED_LAUNCHES: u32 = 3;

const FREE: u32 = 0;
const FILLED: u32 = 1;
const TAKEN: u32 = 2;

/// A slot's state, kept apart from its bytes so that scans under the lock
/// read a few cache lines, not megabytes.
#[repr(C)]
struct Slot {
    state: u32,
    database: pg_sys::Oid,
    len: u32,
    /// Order of arrival: a database's entries are written in this order.
    sequence: u64,
}

#[repr(C)]
struct Database {
    oid: pg_sys::Oid,
    /// The attached writer, null when none runs.
    writer: *mut pg_sys::PGPROC,
    failed_launches: u32,
    written: u64,
    dropped: u64,
    /// Drops already recorded in this database's admin trail.
    reported: u64,
}

#[repr(C)]
struct Shared {
    launcher: *mut pg_sys::PGPROC,
    next_sequence: u64,
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
    if !found {
        std::ptr::write_bytes(shared.cast::<u8>(), 0, std::mem::size_of::<Shared>());
    }
    SHARED = shared.cast();
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

impl Shared {
    fn database(&mut self, oid: pg_sys::Oid) -> Option<&mut Database> {
        let i = self
            .databases
            .iter()
            .position(|d| d.oid == oid)
            .or_else(|| {
                self.databases
                    .iter()
                    .position(|d| d.oid == pg_sys::InvalidOid)
            })?;
        let d = &mut self.databases[i];
        d.oid = oid;
        Some(d)
    }

    fn count_dropped(&mut self, database: pg_sys::Oid, n: u64) {
        match self.database(database) {
            Some(d) => d.dropped += n,
            None => self.dropped_elsewhere += n,
        }
    }
}

unsafe fn wake(proc_: *mut pg_sys::PGPROC) {
    if !proc_.is_null() {
        pg_sys::SetLatch(addr_of_mut!((*proc_).procLatch));
    }
}

/// Puts the first of `entries` that fit into the queue for `database`,
/// wakes its writer (or the launcher), and returns how many were stored.
/// Safe while a transaction aborts.
pub fn push(database: pg_sys::Oid, entries: &[Vec<u8>]) -> usize {
    if !available() || entries.is_empty() {
        return 0;
    }
    let (stored, wake_up) = locked(|shared| {
        let mut stored = 0;
        for (slot, data) in shared
            .slots
            .iter_mut()
            .zip(shared.data.iter_mut())
            .filter(|(s, _)| s.state == FREE)
        {
            let Some(entry) = entries.get(stored).filter(|e| e.len() <= SLOT_BYTES) else {
                break;
            };
            data[..entry.len()].copy_from_slice(entry);
            slot.len = entry.len() as u32;
            slot.database = database;
            slot.state = FILLED;
            slot.sequence = shared.next_sequence;
            shared.next_sequence += 1;
            stored += 1;
        }
        let writer = shared.database(database).map_or(null_mut(), |d| d.writer);
        let wake_up = if writer.is_null() {
            shared.launcher
        } else {
            writer
        };
        (stored, wake_up)
    });
    if stored > 0 {
        unsafe { wake(wake_up) };
    }
    stored
}

/// Counts `n` events of `database` that could not be queued at all.
pub fn count_dropped(database: pg_sys::Oid, n: usize) {
    if available() && n > 0 {
        locked(|shared| shared.count_dropped(database, n as u64));
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
        for slot in shared.slots.iter().filter(|s| s.state == FILLED) {
            if !waiting.contains(&slot.database) {
                waiting.push(slot.database);
            }
        }
        waiting.retain(|&oid| shared.database(oid).is_some_and(|d| d.writer.is_null()));
        waiting
    })
}

/// Counts a launch of a writer for `database`. After `MAX_FAILED_LAUNCHES`
/// writers that ended without attaching, the database is taken as
/// unreachable (dropped, or not accepting connections): its entries are
/// dropped and counted, and false is returned.
pub fn count_launch(database: pg_sys::Oid) -> bool {
    locked(|shared| {
        let launches = shared.database(database).map(|d| {
            d.failed_launches += 1;
            d.failed_launches
        });
        if launches.is_some_and(|n| n <= MAX_FAILED_LAUNCHES) {
            return true;
        }
        let mut n = 0;
        for slot in shared.slots.iter_mut() {
            if slot.database == database && slot.state == FILLED {
                slot.state = FREE;
                n += 1;
            }
        }
        shared.count_dropped(database, n);
        if let Some(d) = shared.database(database) {
            d.failed_launches = 0;
        }
        false
    })
}

/// The writer of `database` attaches; false if another one already is.
/// Entries a crashed writer had taken are handed out again.
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
        for slot in shared.slots.iter_mut() {
            if slot.database == database && slot.state == TAKEN {
                slot.state = FILLED;
            }
        }
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
            if let Some(d) = shared.database(database) {
                d.writer = null_mut();
            }
        }
        !waiting
    })
}

/// Detaches the writer of `database` (it is exiting).
pub fn detach_writer(database: pg_sys::Oid) {
    locked(|shared| {
        if let Some(d) = shared.database(database) {
            d.writer = null_mut();
        }
    });
}

/// Takes up to `max` waiting entries of `database`, oldest first: (slot, bytes).
pub fn take(database: pg_sys::Oid, max: usize) -> Vec<(usize, Vec<u8>)> {
    locked(|shared| {
        let mut waiting: Vec<(u64, usize)> = shared
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.database == database && s.state == FILLED)
            .map(|(i, s)| (s.sequence, i))
            .collect();
        waiting.sort_unstable();
        waiting
            .into_iter()
            .take(max)
            .map(|(_, i)| {
                let slot = &mut shared.slots[i];
                slot.state = TAKEN;
                (i, shared.data[i][..slot.len as usize].to_vec())
            })
            .collect()
    })
}

/// Frees taken slots: their events were written, or could not be (dropped).
pub fn release(database: pg_sys::Oid, slots: &[usize], written: bool) {
    locked(|shared| {
        for &i in slots {
            shared.slots[i].state = FREE;
        }
        let n = slots.len() as u64;
        if written {
            if let Some(d) = shared.database(database) {
                d.written += n;
            }
        } else {
            shared.count_dropped(database, n);
        }
    });
}

/// Drops of `database` not yet recorded in its admin trail.
pub fn unreported_drops(database: pg_sys::Oid) -> u64 {
    locked(|shared| {
        shared
            .database(database)
            .map_or(0, |d| d.dropped - d.reported)
    })
}

pub fn mark_reported(database: pg_sys::Oid, n: u64) {
    locked(|shared| {
        if let Some(d) = shared.database(database) {
            d.reported += n;
        }
    });
}

/// (waiting, written, dropped) for `database`, since the server started.
pub fn status(database: pg_sys::Oid) -> (i64, i64, i64) {
    if !available() {
        return (0, 0, 0);
    }
    locked(|shared| {
        let waiting = shared
            .slots
            .iter()
            .filter(|s| s.database == database && s.state != FREE)
            .count() as i64;
        let (written, dropped) = shared
            .databases
            .iter()
            .find(|d| d.oid == database)
            .map_or((0, 0), |d| (d.written as i64, d.dropped as i64));
        (waiting, written, dropped)
    })
}
