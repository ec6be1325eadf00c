//! Integrity: seal, verify, checkpoint.

use pgrx::prelude::*;

use crate::ledger;

/// Seals every finished, unsealed event into a new ledger block; returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn seal() -> i64 {
    ledger::seal()
}

/// Checks every sealed event and block; given a checkpoint saved earlier,
/// also that today's ledger still extends it. Unsealed events are counted.
#[pg_extern(volatile, parallel_unsafe)]
fn verify(
    checkpoint: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(events_checked, i64),
        name!(problems, Vec<String>),
        name!(unsealed, i64),
    ),
> {
    let v = ledger::verify(checkpoint);
    TableIterator::once((v.ok, v.events_checked, v.problems, v.unsealed))
}

/// The current ledger digest, to keep outside the database.
#[pg_extern(volatile, parallel_unsafe)]
fn checkpoint() -> String {
    ledger::checkpoint()
}
