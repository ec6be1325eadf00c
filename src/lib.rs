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

use pgrx::prelude::*;

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

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Errors reach clients: never let a Rust backtrace ride along in DETAIL.
    // Safe here: _PG_init runs before this process starts any thread.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
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
    // Last: its log hook then runs first, and the others see scrubbed text.
    keyring::init_hooks();
    // After every subject_audit.* setting is defined: a misspelt one is then an error.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"subject_audit".as_ptr()) };
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
