//! Everything SQL calls: thin functions that check their input and hand over
//! to capture, reading and the keyring.

mod access;
mod admin;
mod ddl_trail;
mod erasure;
mod keys;
mod ledger;
mod reading;
mod roles;
mod tracking;

/// Installs the hook that records settings changes and capture switched off. Called from `_PG_init`.
pub fn init() {
    ddl_trail::init();
}
