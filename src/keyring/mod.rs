//! Key material held in memory: the backend's own, and (salts only) shared.
//!
//! - `session`: the reader side, private keys this session unlocked and the
//!   HPKE receiver contexts derived from them.
//! - `binding`: the subject a customer-facing session is bound to, if any.
//! - `writer`: the writer side, this backend's HPKE sender context, the
//!   subject keys it has used and the subject digester.
//! - `shared`: subject keys cached in shared memory for every backend
//!   (committed keys only; erasure evicts).
//! - `settings`: `subject_audit.session_key` and `session_subject`, taken
//!   from the startup options and masked.
//! - `redact`: keeps keys out of the server log, pg_stat_statements and
//!   pg_stat_activity.
//!
//! Caches here never outlive the truth: entries created in a transaction are
//! dropped if it (or the savepoint that created them) rolls back, and a
//! relcache invalidation of our key tables, sent on key install/retire and on
//! erasure, drops the matching cache in every backend.

mod binding;
mod redact;
mod session;
mod settings;
mod shared;
mod writer;

pub use binding::{bind, check_bound};
pub use redact::note_key_statement;
pub use session::{ensure_unlocked, lock, reader_data_key, unlock, unlock_pending, KeyNotUnlocked};
#[cfg(any(test, feature = "pg_test"))]
pub use writer::forget_cached_subjects;
pub use writer::{created_here, note_erased, subject_digest, subject_keys, writer_context};

use pgrx::pg_sys;

/// `InvalidSubTransactionId`: an abort of the whole transaction.
pub(crate) const INVALID_SUBTRANSACTION_ID: pg_sys::SubTransactionId = 0;

static mut PREVIOUS_POST_PARSE: pg_sys::post_parse_analyze_hook_type = None;

/// Defines the session settings, registers the callbacks that keep the
/// caches honest, and the shared cache when preloading. Called from `_PG_init`.
pub fn init(preloading: bool) {
    settings::define();
    if preloading {
        shared::init();
    }
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// Installs the hooks that keep keys out of logs and statistics. Called last
/// in `_PG_init`: of several log hooks, the last installed runs first.
pub fn init_hooks() {
    redact::init();
    unsafe {
        PREVIOUS_POST_PARSE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse_analyze);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn post_parse_analyze(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    if let Some(previous) = PREVIOUS_POST_PARSE {
        previous(pstate, query, jstate);
    }
    // In a transaction now, whatever the check hook at startup could do.
    settings::wipe_startup_copies();
    redact::on_parse(pstate, query);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    writer::on_relation_invalidated(relid);
    session::on_relation_invalidated(relid);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            writer::on_commit()
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => writer::before_prepare(),
        // A prepared transaction may still roll back: forget what it created.
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => writer::on_abort(INVALID_SUBTRANSACTION_ID),
        _ => {}
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        writer::on_abort(my_subid);
    }
}
