//! pg_subject_audit: an encrypted, per-subject, tamper-evident audit trail.
//!
//! The pipeline, top to bottom (imports only point down):
//! - `sql_api`   — functions SQL calls, thin
//! - `observe` — executor hooks: reads of tracked tables, failed changes
//! - `capture`, `reading`, `ledger`, `deferred` — triggers and diffs;
//!   decrypting a subject's trail; sealing and verifying; the queue and
//!   background writer for events written after their statement
//! - `recorder` — encrypting, hashing and inserting events, for all of the above
//! - `keyring`, `envelope`, `integrity` — keys in backend memory; payload codec
//!   and AEAD binding; per-event ledger hashes
//! - `store`, `crypto` — the extension's tables and running as their owner;
//!   pure cryptography

use std::ffi::{c_char, c_void, CStr};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

mod capture;
mod crypto;
mod deferred;
mod envelope;
mod integrity;
mod keyring;
mod ledger;
mod observe;
mod reading;
mod recorder;
mod sql_api;
mod store;
#[cfg(test)]
mod test_support;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

static REQUIRE_RECORDED_READS: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Owned by the GUC machinery; only ever holds the mask, never a key.
static mut SESSION_KEY: *mut c_char = std::ptr::null_mut();

/// What `subject_audit.session_key` holds once its keys were taken.
const SESSION_KEY_MASK: &CStr = c"(hidden)";
/// Owned by the GUC machinery; only ever holds the mask, never a token.
static mut SESSION_SUBJECT: *mut c_char = std::ptr::null_mut();
/// What `subject_audit.session_subject` holds once the session is bound.
const SESSION_SUBJECT_MASK: &CStr = c"(bound)";

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Errors reach clients: never let a Rust backtrace ride along in DETAIL.
    // Safe here: _PG_init runs before this process starts any thread.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    GucRegistry::define_bool_guc(
        c"subject_audit.require_recorded_reads",
        c"Refuse reads of a trail, and unlocks, whose event the background writer has not committed.",
        c"On: refused on a hot standby, without shared_preload_libraries, and when the writer does not commit the event within ten seconds; reads of tracked tables are refused on a hot standby. Off: such reads work, with a NOTICE or WARNING. Superuser-only, so set it per role or database for readers.",
        &REQUIRE_RECORDED_READS,
        GucContext::Suset,
        GucFlags::default(),
    );
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"subject_audit.session_key".as_ptr(),
            c"Private keys (hex, comma-separated) that unlock this session, e.g. from PGOPTIONS.".as_ptr(),
            c"The keys are taken into the session keyring at once; the setting then reads as (hidden).".as_ptr(),
            &raw mut SESSION_KEY,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            (pg_sys::GUC_NO_SHOW_ALL | pg_sys::GUC_NOT_IN_SAMPLE | pg_sys::GUC_SUPERUSER_ONLY) as i32,
            Some(check_session_key),
            None,
            Some(show_session_key),
        );
        pg_sys::DefineCustomStringVariable(
            c"subject_audit.session_subject".as_ptr(),
            c"Binds this connection to one subject (a token), from the startup options.".as_ptr(),
            c"The reading functions and record_access then refuse any other token until the connection ends.".as_ptr(),
            &raw mut SESSION_SUBJECT,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_BACKEND,
            (pg_sys::GUC_NO_SHOW_ALL | pg_sys::GUC_NOT_IN_SAMPLE | pg_sys::GUC_SUPERUSER_ONLY) as i32,
            Some(check_session_subject),
            None,
            Some(show_session_subject),
        );
    }
    // Registration order matters: these relcache callbacks consult the
    // relation OIDs that `store` forgets in its own callback, registered last.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    keyring::init(preloading);
    recorder::init();
    capture::init();
    store::init();
    ledger::worker::init();
    if preloading {
        deferred::init();
    }
    observe::init(preloading);
    sql_api::init();
    // After every subject_audit.* setting is defined: a misspelt one is then an error.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"subject_audit".as_ptr()) };
}

/// Takes the keys out of the new value and replaces it with the mask, so the
/// key is kept neither in the GUC table nor anywhere SHOW could reach.
/// Accepted only from the connection's startup options or a SET in the
/// session: anywhere else (postgresql.conf, ALTER ROLE/DATABASE/SYSTEM) the
/// key would be stored, readable by others, or unlock every session. A
/// malformed key is reported on first use; errors here never repeat the value.
#[pg_guard]
unsafe extern "C-unwind" fn check_session_key(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true;
    }
    let raw = CStr::from_ptr(*newval);
    if raw.is_empty() || raw == SESSION_KEY_MASK || source == pg_sys::GucSource::PGC_S_DEFAULT {
        return true;
    }
    if source != pg_sys::GucSource::PGC_S_CLIENT && source != pg_sys::GucSource::PGC_S_SESSION {
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(
            c"subject_audit.session_key is accepted only in connection startup options or SET, never stored".as_ptr(),
        );
        return false;
    }
    keyring::stash_from_setting(&raw.to_string_lossy());
    replace_with_mask(newval, SESSION_KEY_MASK)
}

#[pg_guard]
unsafe extern "C-unwind" fn show_session_key() -> *const c_char {
    if SESSION_KEY.is_null() || *SESSION_KEY == 0 {
        c"".as_ptr()
    } else {
        SESSION_KEY_MASK.as_ptr()
    }
}

/// Binds the session and masks the value (a token is personal data).
/// Accepted only in the connection's startup options: stored anywhere else
/// (ALTER ROLE/DATABASE/SYSTEM, postgresql.conf) the token would sit in
/// plaintext in a catalog or file and bind sessions it was not meant for.
#[pg_guard]
unsafe extern "C-unwind" fn check_session_subject(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true;
    }
    let raw = CStr::from_ptr(*newval);
    // The mask itself is what a bound session holds, and nothing else.
    if raw.is_empty() || source == pg_sys::GucSource::PGC_S_DEFAULT {
        return true;
    }
    if raw == SESSION_SUBJECT_MASK && keyring::is_bound() {
        return true;
    }
    if source != pg_sys::GucSource::PGC_S_CLIENT {
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(
            c"subject_audit.session_subject is accepted only in connection startup options; use bind_subject() in a session".as_ptr(),
        );
        return false;
    }
    if !keyring::bind_from_setting(&raw.to_string_lossy()) {
        pg_sys::GUC_check_errmsg_string =
            pg_sys::pstrdup(c"this session is already bound to another subject".as_ptr());
        return false;
    }
    replace_with_mask(newval, SESSION_SUBJECT_MASK)
}

/// Wipes and frees the value a check hook was given and puts `mask` in its
/// place (allocated with malloc, as the GUC machinery expects), so neither a
/// key nor a token stays in the GUC table.
unsafe fn replace_with_mask(newval: *mut *mut c_char, mask: &CStr) -> bool {
    let masked = libc::strdup(mask.as_ptr());
    if masked.is_null() {
        return false;
    }
    let old = *newval;
    std::ptr::write_bytes(old, 0, libc::strlen(old));
    libc::free(old.cast());
    *newval = masked;
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn show_session_subject() -> *const c_char {
    if keyring::is_bound() {
        SESSION_SUBJECT_MASK.as_ptr()
    } else {
        c"".as_ptr()
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
