//! Keys: generate, install, unlock, lock.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use crate::crypto;
use crate::keyring;
use crate::store::{self, error::raise};

/// A new reader key pair. Nothing is stored: keep the private key outside the database.
#[pg_extern(volatile, parallel_unsafe)]
fn generate_keypair(
) -> TableIterator<'static, (name!(public_key, Vec<u8>), name!(private_key, Vec<u8>))> {
    let (public_key, private_key) = crypto::generate_keypair();
    TableIterator::once((public_key.to_vec(), private_key.to_vec()))
}

/// Installs a writer key and makes it the active one; returns its key id.
#[pg_extern(volatile, parallel_unsafe)]
fn install_public_key(public_key: &[u8]) -> i32 {
    if let Err(e) = crypto::validate_public_key(public_key) {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid public key: {e}"),
        );
    }
    let relations = store::relations();
    let existing = store::as_owner(|| {
        Spi::get_one_with_args::<i32>(
            "SELECT key_id FROM subject_audit.writer_key WHERE public_key OPERATOR(pg_catalog.=) $1",
            &[public_key.into()],
        )
    });
    if let Ok(Some(key_id)) = existing {
        raise(
            ERRCODE_DUPLICATE_OBJECT,
            format!("this public key is already installed as key {key_id}"),
        );
    }
    let key_id = store::as_owner(|| {
        Spi::get_one_with_args::<i32>(
            "INSERT INTO subject_audit.writer_key (public_key) VALUES ($1) RETURNING key_id",
            &[public_key.into()],
        )
    });
    let Ok(Some(key_id)) = key_id else {
        raise(ERRCODE_INTERNAL_ERROR, "could not install the public key");
    };
    // Every backend drops its writer context at commit and sets up one to this key.
    store::invalidate(relations.writer_key);
    key_id
}

/// Adds a private key to this session's keyring; returns how many keys it holds.
#[pg_extern(volatile, parallel_unsafe)]
fn unlock(private_key: &[u8]) -> i32 {
    keyring::unlock(private_key) as i32
}

/// Wipes this session's keyring.
#[pg_extern(volatile, parallel_unsafe)]
fn lock() {
    keyring::lock();
}
