//! Subject keys (id and salt) cached in shared memory, in front of the
//! `subject_key` table, so that a backend writing for a subject another
//! backend has already written for finds its key without an index probe.
//! Each backend still keeps its own cache in front of this one.
//!
//! Only committed keys get here: keys read from the table under a fresh
//! snapshot at once, keys this backend created when its transaction commits.
//! An erasure evicts the subject's entry before and after it commits, and
//! bumps a generation counter so that no lookup that started before can put
//! the old key back.
//!
//! A fixed array of entries in buckets of four, a subject's bucket chosen by
//! its digest (an HMAC, so uniformly spread): a new key takes a free or
//! the matching place, or replaces one of the four. Entries are scoped by
//! database and by the relfilenode of `subject_key`, so a dropped and
//! recreated extension, or a truncated key table, never sees old entries.

use std::ptr::{addr_of_mut, null_mut};
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::crypto::DIGEST_LEN;
use crate::store;

static CAPACITY: GucSetting<i32> = GucSetting::<i32>::new(262_144);
const NAME: &std::ffi::CStr = c"pg_subject_audit subject keys";
/// Lock partitions: a bucket is guarded by the lock of its index modulo this.
const PARTITIONS: usize = 64;
const WAYS: usize = 4;

#[repr(C)]
struct Header {
    generation: AtomicU64,
    buckets: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Entry {
    database: pg_sys::Oid,
    filenode: pg_sys::Oid,
    /// 0: empty (subject key ids start at 1).
    subject_key_id: i64,
    digest: [u8; DIGEST_LEN],
    salt: [u8; 32],
}

/// Where this database's keys live: entries of other scopes are misses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Scope {
    database: pg_sys::Oid,
    filenode: pg_sys::Oid,
}

static mut HEADER: *mut Header = null_mut();
static mut ENTRIES: *mut Entry = null_mut();
static mut LOCKS: *mut pg_sys::LWLockPadded = null_mut();
static mut PREVIOUS_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Defines `subject_audit.key_cache_size` and asks for the shared memory.
/// Only from `_PG_init` while preloading.
pub fn init() {
    GucRegistry::define_int_guc(
        c"subject_audit.key_cache_size",
        c"Subject keys (id and salt) cached in shared memory for all backends; 0 turns the cache off.",
        c"About 80 bytes each. Takes effect at server start.",
        &CAPACITY,
        0,
        16_777_216,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    unsafe {
        PREVIOUS_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request);
        PREVIOUS_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup);
    }
}

fn capacity() -> usize {
    CAPACITY.get().max(0) as usize
}

fn buckets() -> usize {
    capacity().div_ceil(WAYS)
}

fn size() -> usize {
    std::mem::size_of::<Header>() + buckets() * WAYS * std::mem::size_of::<Entry>()
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request() {
    if let Some(previous) = PREVIOUS_REQUEST {
        previous();
    }
    if capacity() > 0 {
        pg_sys::RequestAddinShmemSpace(size());
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), PARTITIONS as i32);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup() {
    if let Some(previous) = PREVIOUS_STARTUP {
        previous();
    }
    if capacity() == 0 {
        return;
    }
    // AddinShmemInitLock, a macro in lwlocknames.h.
    let init_lock = addr_of_mut!((*pg_sys::MainLWLockArray.add(21)).lock);
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let memory = pg_sys::ShmemInitStruct(NAME.as_ptr(), size(), &mut found);
    if !found {
        std::ptr::write_bytes(memory.cast::<u8>(), 0, size());
        (*memory.cast::<Header>()).buckets = buckets();
    }
    HEADER = memory.cast();
    ENTRIES = memory
        .cast::<u8>()
        .add(std::mem::size_of::<Header>())
        .cast();
    LOCKS = pg_sys::GetNamedLWLockTranche(NAME.as_ptr());
    pg_sys::LWLockRelease(init_lock);
}

fn available() -> bool {
    unsafe { !HEADER.is_null() }
}

/// This database's scope, or `None` when there is no shared cache.
pub fn scope(subject_key: pg_sys::Oid) -> Option<Scope> {
    if !available() {
        return None;
    }
    store::with_relation(subject_key, |r| Scope {
        database: unsafe { pg_sys::MyDatabaseId },
        filenode: r.rd_node.relNode,
    })
}

/// Bumped by every erasure; a lookup publishes only if it has not moved.
pub fn generation() -> u64 {
    if !available() {
        return 0;
    }
    unsafe { (*HEADER).generation.load(Ordering::Acquire) }
}

fn bucket_of(scope: Scope, digest: &[u8; DIGEST_LEN]) -> usize {
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    let spread = u64::from_le_bytes(head) ^ u64::from(scope.database.to_u32());
    unsafe { (spread % (*HEADER).buckets as u64) as usize }
}

impl Entry {
    fn holds(&self, scope: Scope, digest: &[u8; DIGEST_LEN]) -> bool {
        self.subject_key_id != 0
            && self.database == scope.database
            && self.filenode == scope.filenode
            && self.digest == *digest
    }
}

const EMPTY: Entry = Entry {
    database: pg_sys::InvalidOid,
    filenode: pg_sys::InvalidOid,
    subject_key_id: 0,
    digest: [0; DIGEST_LEN],
    salt: [0; 32],
};

/// Runs `f` on the bucket for `digest` under its partition's lock.
/// `f` must not raise.
fn with_bucket<R>(
    scope: Scope,
    digest: &[u8; DIGEST_LEN],
    mode: pg_sys::LWLockMode::Type,
    f: impl FnOnce(&mut [Entry; WAYS]) -> R,
) -> R {
    let bucket = bucket_of(scope, digest);
    unsafe {
        let lock = addr_of_mut!((*LOCKS.add(bucket % PARTITIONS)).lock);
        pg_sys::LWLockAcquire(lock, mode);
        let r = f(&mut *ENTRIES.add(bucket * WAYS).cast::<[Entry; WAYS]>());
        pg_sys::LWLockRelease(lock);
        r
    }
}

/// The cached keys among `digests`: (digest, subject key id, salt).
pub fn lookup(
    scope: Scope,
    digests: &[[u8; DIGEST_LEN]],
) -> Vec<([u8; DIGEST_LEN], i64, [u8; 32])> {
    digests
        .iter()
        .filter_map(|digest| {
            with_bucket(scope, digest, pg_sys::LWLockMode::LW_SHARED, |bucket| {
                bucket
                    .iter()
                    .find(|e| e.holds(scope, digest))
                    .map(|e| (*digest, e.subject_key_id, e.salt))
            })
        })
        .collect()
}

/// Caches committed keys, unless an erasure happened since `seen` (the
/// generation read before the keys were).
pub fn publish<'a>(
    scope: Scope,
    seen: u64,
    keys: impl IntoIterator<Item = (&'a [u8; DIGEST_LEN], i64, &'a [u8; 32])>,
) {
    for (digest, subject_key_id, salt) in keys {
        let current = with_bucket(scope, digest, pg_sys::LWLockMode::LW_EXCLUSIVE, |bucket| {
            // Checked under the lock that an eviction of this entry takes.
            if generation() != seen {
                return false;
            }
            // The subject's own place, else a free one, else one chosen by
            // the digest (any of the four is as good as another).
            let way = bucket
                .iter()
                .position(|e| e.holds(scope, digest))
                .or_else(|| bucket.iter().position(|e| e.subject_key_id == 0))
                .unwrap_or(usize::from(digest[8]) % WAYS);
            bucket[way] = Entry {
                database: scope.database,
                filenode: scope.filenode,
                subject_key_id,
                digest: *digest,
                salt: *salt,
            };
            true
        });
        if !current {
            return;
        }
    }
}

/// Drops the entries of erased subjects, after bumping the generation so
/// that no lookup already under way caches them again. Entries of the
/// database under an older relfilenode go too: a backend that has not yet
/// heard of a VACUUM FULL of the key table may still look them up.
pub fn evict(scope: Scope, digests: &[[u8; DIGEST_LEN]]) {
    if digests.is_empty() {
        return;
    }
    unsafe { (*HEADER).generation.fetch_add(1, Ordering::AcqRel) };
    for digest in digests {
        with_bucket(scope, digest, pg_sys::LWLockMode::LW_EXCLUSIVE, |bucket| {
            for e in bucket
                .iter_mut()
                .filter(|e| e.database == scope.database && e.digest == *digest)
            {
                *e = EMPTY;
            }
        });
    }
}
