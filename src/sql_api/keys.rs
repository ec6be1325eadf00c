//! Keys: generate, install, unlock, lock.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use super::admin;
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
fn install_public_key(public_key: Option<&[u8]>) -> i32 {
    let public_key = super::required(public_key, "public_key");
    if let Err(e) = crypto::validate_public_key(public_key) {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid public key: {e}"),
        );
    }
    let relations = store::relations();
    // By the point each key stands for: a key installed before canonical
    // encodings were required may be another encoding of this one.
    let installed = store::as_owner(|| {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT key_id, public_key FROM subject_audit.writer_key ORDER BY key_id",
                    None,
                    &[],
                )?
                .map(|row| Ok((row.get::<i32>(1)?, row.get::<Vec<u8>>(2)?)))
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not read the installed keys: {e}"),
        )
    });
    let canonical = crypto::canonical_form(public_key);
    let existing = installed.into_iter().find_map(|(key_id, key)| {
        (key.as_deref().map(crypto::canonical_form) == Some(canonical.clone()))
            .then_some(key_id)
            .flatten()
    });
    if let Some(key_id) = existing {
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
    admin::record("KEY_INSTALL", &format!("install key {key_id}"), None);
    key_id
}

/// Adds a private key to this session's keyring; returns how many keys it holds.
#[pg_extern(volatile, parallel_unsafe)]
fn unlock(private_key: Option<&[u8]>) -> i32 {
    // First: whatever fails below, this statement's log lines and activity
    // must not show the key (it may have come through a wrapper function).
    keyring::note_key_statement();
    let private_key = super::required(private_key, "private_key");
    // Recorded before the key is added: a refused unlock adds nothing.
    let (_, keys) = keyring::unlock(private_key, |key_id| {
        admin::record_unlock(key_id, "unlock()")
    });
    keys as i32
}

/// Wipes this session's keyring.
#[pg_extern(volatile, parallel_unsafe)]
fn lock() {
    keyring::lock();
}

/// Stops using a key for writes; events written under it stay readable with
/// its private key. The last active key cannot be retired.
#[pg_extern(volatile, parallel_unsafe)]
fn retire_public_key(key_id: Option<i32>) {
    let key_id = super::required(key_id, "key_id");
    let relations = store::relations();
    // Serialize retirements: two at once must not both see "another key is active".
    store::as_owner(|| Spi::run("LOCK TABLE subject_audit.writer_key IN SHARE ROW EXCLUSIVE MODE"))
        .unwrap_or_else(|e| {
            raise(
                ERRCODE_INTERNAL_ERROR,
                format!("could not lock the key table: {e}"),
            )
        });
    let state = store::as_owner(|| {
        Spi::get_two_with_args::<bool, i64>(
            "SELECT pg_catalog.bool_or(key_id OPERATOR(pg_catalog.=) $1), pg_catalog.count(*) \
             FROM subject_audit.writer_key WHERE retired_at IS NULL",
            &[key_id.into()],
        )
    });
    match state {
        Ok((Some(true), Some(active))) if active > 1 => {}
        Ok((Some(true), _)) => raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("key {key_id} is the only active key: install another before retiring it"),
        ),
        _ => raise(
            ERRCODE_UNDEFINED_OBJECT,
            format!("no active key with id {key_id}"),
        ),
    }
    store::as_owner(|| {
        Spi::run_with_args(
            "UPDATE subject_audit.writer_key SET retired_at = pg_catalog.now() WHERE key_id OPERATOR(pg_catalog.=) $1",
            &[key_id.into()],
        )
    })
    .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, format!("could not retire key {key_id}: {e}")));
    store::invalidate(relations.writer_key);
    admin::record("KEY_RETIRE", &format!("retire key {key_id}"), None);
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test(
        error = "invalid public key: not the canonical encoding of an X25519 public key (top bit set, or not below 2^255 - 19)"
    )]
    fn a_key_with_its_top_bit_set_is_refused() {
        // The same point as a key already installed, under another encoding.
        Spi::run(
            "CREATE TEMP TABLE pair AS SELECT public_key FROM subject_audit.generate_keypair();
             SELECT subject_audit.install_public_key(public_key) FROM pair;
             SELECT subject_audit.install_public_key(
                 set_byte(public_key, 31, get_byte(public_key, 31) | 128)) FROM pair",
        )
        .unwrap();
    }

    #[pg_test(error = "this public key is already installed as key 1")]
    fn a_key_installed_under_another_encoding_is_a_duplicate() {
        // A key stored before canonical encodings were required.
        Spi::run(
            "CREATE TEMP TABLE pair AS SELECT public_key FROM subject_audit.generate_keypair();
             INSERT INTO subject_audit.writer_key (key_id, public_key)
                 SELECT 1, set_byte(public_key, 31, get_byte(public_key, 31) | 128) FROM pair;
             SELECT subject_audit.install_public_key(public_key) FROM pair",
        )
        .unwrap();
    }
}
