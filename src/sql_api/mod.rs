//! Everything SQL calls: thin functions that check their input and hand over
//! to capture, reading and the keyring.

mod access;
mod admin;
mod erasure;
mod keys;
mod ledger;
mod reading;
mod tracking;
