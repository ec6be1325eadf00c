//! The sealer: with the library in `shared_preload_libraries`, a background
//! worker calls `subject_audit.seal()` every `subject_audit.seal_interval`
//! in the database named by `subject_audit.database`.

use std::ffi::CString;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::store;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static SEAL_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// Defines the sealer's settings and, when preloaded, registers the worker.
pub fn init() {
    GucRegistry::define_string_guc(
        c"subject_audit.database",
        c"Database whose ledger the background sealer seals (empty: no sealer).",
        c"Needs pg_subject_audit in shared_preload_libraries; read when the worker starts. Other databases: schedule subject_audit.seal().",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"subject_audit.seal_interval",
        c"How often the background sealer seals finished events.",
        c"",
        &SEAL_INTERVAL,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        register();
    }
}

fn register() {
    BackgroundWorkerBuilder::new("pg_subject_audit sealer")
        .set_type("pg_subject_audit sealer")
        .set_library("pg_subject_audit")
        .set_function("pg_subject_audit_sealer_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_subject_audit_sealer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(database) = DATABASE
        .get()
        .map(|d| d.to_string_lossy().into_owned())
        .filter(|d| !d.is_empty())
    else {
        log!("pg_subject_audit sealer: subject_audit.database is not set; not sealing");
        return;
    };
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    store::pin_worker_settings(&[]);
    let interval = || Duration::from_millis(SEAL_INTERVAL.get().max(10) as u64);
    while BackgroundWorker::wait_latch(Some(interval())) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        BackgroundWorker::transaction(|| {
            if store::extension_installed() {
                super::seal();
            }
        });
    }
}
