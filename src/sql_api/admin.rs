//! The admin trail: key and tracking changes, unlocks, grants, settings
//! changes and erasures are events too (no subject, no payload), so they are
//! sealed into the ledger like the rest.

use std::time::Duration;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::deferred::{self, Entry, NotRecorded};
use crate::recorder::{self, Draft, Header, StatementContext, Subject};
use crate::store::{self, error::raise_with_hint};

static REQUIRE_RECORDED_READS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Defines `subject_audit.require_recorded_reads` (read by name where needed).
pub fn init() {
    GucRegistry::define_bool_guc(
        c"subject_audit.require_recorded_reads",
        c"Refuse reads of a trail, and unlocks, whose event the background writer has not committed.",
        c"On: refused on a hot standby, without shared_preload_libraries, and when the writer does not commit the event within ten seconds; reads of tracked tables are refused on a hot standby. Off: such reads work, with a NOTICE or WARNING. Superuser-only, so set it per role or database for readers.",
        &REQUIRE_RECORDED_READS,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// How long an access waits for its event to be written: under
/// `require_recorded_reads` (then refused), and otherwise (then it goes on
/// with a WARNING, its event still queued).
const REQUIRED_WAIT: Duration = Duration::from_secs(10);
const USUAL_WAIT: Duration = Duration::from_secs(1);

/// Why no event can be written here, if none can.
pub fn read_only_reason() -> Option<&'static str> {
    if unsafe { pg_sys::RecoveryInProgress() } {
        Some("the server is a hot standby")
    } else if unsafe { pg_sys::XactReadOnly } {
        Some("the transaction is read-only")
    } else {
        None
    }
}

fn require_recorded_reads() -> bool {
    store::setting(c"subject_audit.require_recorded_reads").as_deref() == Some("on")
}

/// Where an access (a read of a trail, an unlock) is recorded.
pub enum Recording {
    /// By the background writer, in its own transaction: it stays whatever
    /// becomes of the caller's, read-only or rolled back.
    Deferred,
    /// In the caller's transaction, which may roll it back: there is no
    /// writer (the library is not preloaded).
    InTransaction,
    /// Nowhere, for this reason: the access goes on with a NOTICE.
    Nowhere(&'static str),
}

/// Where an access of kind `what` can be recorded. With
/// `subject_audit.require_recorded_reads` on, it is refused unless its
/// event stays whatever becomes of this transaction.
pub fn recording(what: &str) -> Recording {
    let required = require_recorded_reads();
    if unsafe { pg_sys::RecoveryInProgress() } {
        let why = "the server is a hot standby";
        if required {
            raise_with_hint(
                ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("this {what} cannot be recorded: {why}"),
                "subject_audit.require_recorded_reads is on: use the primary",
            );
        }
        return Recording::Nowhere(why);
    }
    if deferred::available() {
        return Recording::Deferred;
    }
    if required {
        raise_with_hint(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("this {what} cannot be recorded beyond this transaction: pg_subject_audit is not in shared_preload_libraries, so there is no background writer"),
            "subject_audit.require_recorded_reads is on: add pg_subject_audit to shared_preload_libraries",
        );
    }
    if unsafe { pg_sys::XactReadOnly } {
        return Recording::Nowhere(
            "the transaction is read-only, and without pg_subject_audit in shared_preload_libraries there is no background writer",
        );
    }
    Recording::InTransaction
}

/// Hands an access event to the background writer and waits until the
/// writer has committed it: the access goes on only then, so its event is
/// in the trail before anything read is returned, like an event written in
/// the caller's transaction (but one no rollback takes away). If it is not
/// committed in time: with `subject_audit.require_recorded_reads` on, the
/// access is refused; else it goes on with a WARNING.
pub fn record_deferred(entry: &Entry, what: &str) {
    let required = require_recorded_reads();
    let wait = if required { REQUIRED_WAIT } else { USUAL_WAIT };
    let Err(why) = deferred::hand_over_and_wait(entry, wait, required) else {
        return;
    };
    if required {
        raise_with_hint(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("this {what} cannot be recorded: {why}"),
            "subject_audit.require_recorded_reads is on, so it is refused; subject_audit.writer_status() shows the queue",
        );
    }
    match why {
        NotRecorded::TimedOut => warning!("this {what} is not recorded yet: {why}; it stays queued"),
        _ => warning!("this {what} is not recorded: {why}; the drop is counted, and recorded as a DROPPED event"),
    }
}

/// Records that this session unlocked `key_id` (never the key), whatever
/// becomes of its transaction. Where no event can be written the unlock
/// still holds, and a NOTICE says it went unrecorded (unless
/// `subject_audit.require_recorded_reads` is on: then it raises).
pub fn record_unlock(key_id: i32, how: &str) {
    let title = format!("unlock key {key_id} ({how})");
    match recording("unlock") {
        Recording::Deferred => {
            let entry = Entry {
                admin: true,
                operation: "UNLOCK".into(),
                title,
                who: StatementContext::without_transaction(),
                ..Entry::default()
            };
            record_deferred(&entry, "unlock");
        }
        Recording::InTransaction => record("UNLOCK", &title, None),
        Recording::Nowhere(why) => {
            notice!("the unlock of key {key_id} is not recorded in the admin trail: {why}")
        }
    }
}

/// Records one admin event of nobody's.
pub fn record(operation: &str, title: &str, table_name: Option<&str>) {
    record_for(operation, title, table_name, Subject::Nobody);
}

pub fn record_for(operation: &str, title: &str, table_name: Option<&str>, subject: Subject) {
    let header = Header {
        operation,
        status: "ok",
        sqlstate: None,
        title: Some(title),
        table_name,
    };
    let draft = Draft {
        subject,
        columns: None,
        payload: None,
    };
    recorder::record(&header, &StatementContext::current(), &[draft]);
}
