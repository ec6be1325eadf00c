//! Who looked: every read of a subject's trail, and every retrieval the
//! application reports with `record_access`, leaves a READ event in that
//! subject's trail, with the reader's context and reason. A read of the
//! trail is recorded by the background writer, so that neither a rollback
//! nor a read-only transaction takes its event away.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use zeroize::Zeroizing;

use super::admin::{self, read_only_reason, Recording};
use crate::deferred::Entry;
use crate::envelope::PayloadWriter;
use crate::keyring;
use crate::recorder::{self, Draft, Header, StatementContext, Subject};
use crate::store::error::raise_with_hint;

/// Records that the trail of `token` was read by one of our functions,
/// whatever becomes of this transaction (`admin::recording` says where it
/// cannot be): returns once the background writer has committed the event
/// (`admin::record_deferred` says what happens if it does not).
pub fn record_trail_read(token: &str, title: &str) {
    const WHAT: &str = "read of the audit trail";
    match admin::recording(WHAT) {
        // A subject whose key this transaction created exists only in it
        // (a rollback takes what was read with it), and the writer could not
        // record its event before this transaction ends: recorded here.
        Recording::Deferred
            if keyring::created_here(&keyring::subject_digest(token.as_bytes())) =>
        {
            record_read(token, title, None);
        }
        Recording::Deferred => {
            let entry = Entry {
                operation: "READ".into(),
                title: title.to_owned(),
                subjects: vec![token.as_bytes().to_vec()],
                who: StatementContext::without_transaction(),
                ..Entry::default()
            };
            admin::record_deferred(&entry, WHAT);
        }
        Recording::InTransaction => {
            record_read(token, title, None);
        }
        Recording::Nowhere(why) => {
            notice!("this read of the audit trail is not recorded in the subject's trail: {why}")
        }
    }
}

/// The application's own retrieval of a subject's data; returns the event id.
pub fn record_application_access(token: &str, title: &str, description: Option<&str>) -> i64 {
    keyring::check_bound(token);
    if title.trim().is_empty() {
        raise_with_hint(
            ERRCODE_INVALID_PARAMETER_VALUE,
            "the title of an access must not be empty",
            "say what was retrieved, e.g. 'opened customer profile'",
        );
    }
    if let Some(why) = read_only_reason() {
        raise_with_hint(
            ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot record an access: {why}"),
            "record accesses in a read-write transaction on the primary",
        );
    }
    record_read(token, title, description)
}

fn record_read(token: &str, title: &str, note: Option<&str>) -> i64 {
    let statement = StatementContext::current();
    let payload = PayloadWriter::with_note(statement.reason.as_deref(), note).finish();
    let header = Header {
        operation: "READ",
        status: "ok",
        sqlstate: None,
        title: Some(title),
        table_name: None,
    };
    let draft = Draft {
        subject: Subject::Digest(keyring::subject_digest(token.as_bytes())),
        columns: None,
        payload: Some(Zeroizing::new(payload)),
    };
    recorder::record(&header, &statement, &[draft])[0]
}

/// Checks that this session may read `token`'s trail (a subject-bound
/// session reads only its own subject), and records the unlocks of keys
/// given in `subject_audit.session_key`, checked on first use.
pub fn before_trail_read(token: &str) {
    keyring::check_bound(token);
    keyring::unlock_pending(|key_id| admin::record_unlock(key_id, "subject_audit.session_key"));
}

/// Binds this session to one subject for the rest of its life: the reading
/// functions and `record_access` refuse every other token from then on.
#[pg_extern(volatile, parallel_unsafe)]
fn bind_subject(token: Option<&str>) {
    let token = super::required(token, "token");
    keyring::bind(token);
}

/// The background writer's queue in this database, since the server
/// started: entries waiting, events written, events dropped (queue full,
/// writer unavailable, ...; with those carried over from before a restart
/// that were not recorded yet), and how many of the dropped are recorded in
/// the admin trail as DROPPED events.
#[pg_extern(volatile, parallel_safe)]
fn writer_status() -> TableIterator<
    'static,
    (
        name!(waiting, i64),
        name!(written, i64),
        name!(dropped, i64),
        name!(dropped_recorded, i64),
    ),
> {
    TableIterator::once(crate::deferred::status())
}

/// Waits until the background writer has recorded every read and failure
/// this database queued so far (or `timeout_ms` passed: false). For tests
/// and for applications that show a trail right after reading.
#[pg_extern(volatile, parallel_unsafe)]
fn wait_for_writer(timeout_ms: default!(Option<i32>, "5000")) -> bool {
    let timeout_ms = super::required(timeout_ms, "timeout_ms").max(0) as u64;
    // This session's own entries first (a cursor may still hold some).
    crate::observe::flush_pending(true);
    crate::deferred::wait_until_written(std::time::Duration::from_millis(timeout_ms))
}
