//! The admin trail: key and tracking changes, unlocks, grants, settings
//! changes and erasures are events too (no subject, no payload), so they are
//! sealed into the ledger like the rest.

use pgrx::prelude::*;

use crate::recorder::{self, Draft, Header, StatementContext, Subject};

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

/// Records that this session unlocked `key_id` (never the key). Where no
/// event can be written the unlock still holds, and a NOTICE says it went
/// unrecorded.
pub fn record_unlock(key_id: i32, how: &str) {
    if let Some(why) = read_only_reason() {
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
