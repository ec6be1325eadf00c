//! Everything SQL calls: thin functions that check their input and hand over
//! to capture, reading and the keyring.

mod access;
mod admin;
mod capture_triggers;
mod column_ddl;
mod ddl_trail;
mod erasure;
mod keys;
mod ledger;
mod nodes;
mod reading;
mod roles;
mod tracking;

/// Defines the readers' setting and installs the utility hook (DISCARD
/// ALL, settings changes, capture switched off). Called from `_PG_init`.
pub fn init() {
    admin::init();
    ddl_trail::init();
}

/// A required argument's value: NULL is an error, not a silent no-op.
fn required<T>(value: Option<T>, name: &str) -> T {
    value.unwrap_or_else(|| {
        crate::store::error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{name} must not be NULL"),
        )
    })
}
