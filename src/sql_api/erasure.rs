//! The right to erasure: crypto-shredding one subject.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use super::admin;
use crate::keyring;
use crate::recorder::Subject;
use crate::store::{self, error::raise};

/// Deletes the subject's salts: its payloads become unreadable with any key,
/// its events and their ledger proofs stay. Returns how many events that
/// subject has; records an ERASE event in its trail. A later row with the
/// same token starts a new subject key.
#[pg_extern(volatile, parallel_unsafe)]
fn forget_subject(token: Option<&str>) -> i64 {
    let token = super::required(token, "token");
    keyring::check_bound(token);
    let subject_digest = keyring::subject_digest(token.as_bytes());
    let digest = subject_digest.to_vec();
    let erased = store::as_owner(|| {
        Spi::get_one_with_args::<Vec<i64>>(
            "WITH e AS (UPDATE subject_audit.subject_key SET salt = NULL, erased_at = pg_catalog.clock_timestamp() \
             WHERE subject_digest OPERATOR(pg_catalog.=) $1 AND erased_at IS NULL RETURNING subject_key_id) \
             SELECT pg_catalog.array_agg(subject_key_id) FROM e",
            &[digest.clone().into()],
        )
    })
    .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, format!("could not erase the subject: {e}")))
    .unwrap_or_default();
    let events = store::as_owner(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT pg_catalog.count(*) FROM subject_audit.event e JOIN subject_audit.subject_key k \
             ON e.subject_key_id OPERATOR(pg_catalog.=) k.subject_key_id \
             WHERE k.subject_digest OPERATOR(pg_catalog.=) $1",
            &[digest.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(0);
    if let Some(&subject_key_id) = erased.first() {
        // Every backend drops its cached salts at commit: none encrypts under this one again.
        store::invalidate(store::relations().subject_key);
        keyring::note_erased(subject_digest);
        admin::record_for(
            "ERASE",
            "erase subject",
            None,
            Subject::Key(subject_key_id, subject_digest),
        );
    }
    events
}
