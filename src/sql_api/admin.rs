//! The admin trail: key and tracking changes, unlocks, grants, settings
//! changes and erasures are events too (no subject, no payload), so they are
//! sealed into the ledger like the rest.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::recorder::{self, Draft, Header, StatementContext, Subject};
use crate::store::{self, error::raise_with_hint};

static REQUIRE_RECORDED_READS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Defines `subject_audit.require_recorded_reads` (read by name where needed).
pub fn init() {
    GucRegistry::define_bool_guc(
        c"subject_audit.require_recorded_reads",
        c"Refuse reads of a trail that cannot be recorded (read-only transaction, hot standby).",
        c"Off: such reads work, with a NOTICE that they went unrecorded. Superuser-only, so set it per role or database for readers.",
        &REQUIRE_RECORDED_READS,
        GucContext::Suset,
        GucFlags::default(),
    );
}

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

/// With `subject_audit.require_recorded_reads` on, an access that cannot be
/// recorded is refused rather than let through with a NOTICE.
pub fn refuse_unrecorded(what: &str, why: &str) {
    if store::setting(c"subject_audit.require_recorded_reads").as_deref() == Some("on") {
        raise_with_hint(
            ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("this {what} cannot be recorded: {why}"),
            "subject_audit.require_recorded_reads is on: read in a read-write transaction on the primary",
        );
    }
}

/// Records that this session unlocked `key_id` (never the key). Where no
/// event can be written the unlock still holds, and a NOTICE says it went
/// unrecorded (unless `subject_audit.require_recorded_reads` is on).
pub fn record_unlock(key_id: i32, how: &str) {
    if let Some(why) = read_only_reason() {
        refuse_unrecorded("unlock", why);
        notice!("the unlock of key {key_id} is not recorded in the admin trail: {why}");
        return;
    }
    record("UNLOCK", &format!("unlock key {key_id} ({how})"), None);
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
