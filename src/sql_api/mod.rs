//! Everything SQL calls: thin functions that check their input and hand over
//! to capture, reading and the keyring.

mod keys;
mod reading;
mod tracking;
