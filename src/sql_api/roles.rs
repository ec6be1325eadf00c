//! Ready-made roles: each grant function applies exactly what one kind of
//! user needs (docs/roles.md), and records a GRANT event in the admin trail.
//! They run with the caller's rights: only a superuser (or the extension's
//! owner) can hand out what the schema's owner holds.

use pgrx::prelude::*;
use pgrx::spi;
use pgrx::PgSqlErrorCode::*;

use super::admin;
use crate::store::error::raise;

const USAGE: &str = "USAGE ON SCHEMA subject_audit";

/// Applications that change tracked tables need nothing for capture; this
/// lets them record their own retrievals of a subject's data.
const WRITER: &[&str] = &[
    USAGE,
    "EXECUTE ON FUNCTION subject_audit.record_access(text, text, text)",
];

/// Services that show subjects their trail (they also need a private key).
const READER: &[&str] = &[
    USAGE,
    "EXECUTE ON FUNCTION subject_audit.unlock(bytea)",
    "EXECUTE ON FUNCTION subject_audit.lock()",
    "EXECUTE ON FUNCTION subject_audit.bind_subject(text)",
    "EXECUTE ON FUNCTION subject_audit.audit_for_subject(text)",
    "EXECUTE ON FUNCTION subject_audit.audit_event(text, bigint)",
    "EXECUTE ON FUNCTION subject_audit.export_subject(text)",
    "EXECUTE ON FUNCTION subject_audit.record_access(text, text, text)",
    "EXECUTE ON FUNCTION subject_audit.wait_for_writer(integer)",
];

/// Integrity checks and reporting on metadata: no key, no personal values.
const AUDITOR: &[&str] = &[
    USAGE,
    "EXECUTE ON FUNCTION subject_audit.verify(text)",
    "EXECUTE ON FUNCTION subject_audit.checkpoint()",
    "EXECUTE ON FUNCTION subject_audit.writer_status()",
    "EXECUTE ON FUNCTION subject_audit.wait_for_writer(integer)",
    "SELECT ON subject_audit.events, subject_audit.activity, subject_audit.tracked",
];

/// Keys, tracking, erasure and the ledger; no private key, so no personal values.
const ADMIN: &[&str] = &[
    USAGE,
    "EXECUTE ON FUNCTION subject_audit.generate_keypair()",
    "EXECUTE ON FUNCTION subject_audit.install_public_key(bytea)",
    "EXECUTE ON FUNCTION subject_audit.retire_public_key(integer)",
    "EXECUTE ON FUNCTION subject_audit.track(regclass, text, text[])",
    "EXECUTE ON FUNCTION subject_audit.untrack(regclass)",
    "EXECUTE ON FUNCTION subject_audit.capture_change()",
    "EXECUTE ON FUNCTION subject_audit.forget_subject(text)",
    "EXECUTE ON FUNCTION subject_audit.seal()",
    "EXECUTE ON FUNCTION subject_audit.verify(text)",
    "EXECUTE ON FUNCTION subject_audit.checkpoint()",
    "EXECUTE ON FUNCTION subject_audit.writer_status()",
    "EXECUTE ON FUNCTION subject_audit.wait_for_writer(integer)",
    "SELECT ON subject_audit.events, subject_audit.activity, subject_audit.tracked",
];

/// The role's name, quoted for SQL; a clear error if there is no such role.
fn quoted_role(role: &str) -> String {
    let exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) $1)",
        &[role.into()],
    );
    if !matches!(exists, Ok(Some(true))) {
        raise(
            ERRCODE_UNDEFINED_OBJECT,
            format!("role \"{role}\" does not exist"),
        );
    }
    spi::quote_identifier(role)
}

fn apply(verb: &str, privileges: &[&str], role: &str) {
    let grantee = quoted_role(role);
    let preposition = if verb == "GRANT" { "TO" } else { "FROM" };
    for privilege in privileges {
        Spi::run(&format!("{verb} {privilege} {preposition} {grantee}")).unwrap_or_else(|e| {
            raise(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("could not {} {privilege}: {e}", verb.to_lowercase()),
            )
        });
    }
}

fn grant(kind: &str, privileges: &[&str], role: &str) {
    apply("GRANT", privileges, role);
    admin::record("GRANT", &format!("grant {kind} to {role}"), None);
}

/// What an application that writes tracked tables may use: `record_access`.
#[pg_extern(volatile, parallel_unsafe)]
fn grant_writer(role: Option<&str>) {
    let role = super::required(role, "role");
    grant("writer", WRITER, role);
}

/// What a service showing subjects their trail needs (plus a private key).
#[pg_extern(volatile, parallel_unsafe)]
fn grant_reader(role: Option<&str>) {
    let role = super::required(role, "role");
    grant("reader", READER, role);
}

/// Integrity checks and metadata reports; no key.
#[pg_extern(volatile, parallel_unsafe)]
fn grant_auditor(role: Option<&str>) {
    let role = super::required(role, "role");
    grant("auditor", AUDITOR, role);
}

/// Keys, tracking, erasure and sealing; no key to read personal values.
#[pg_extern(volatile, parallel_unsafe)]
fn grant_admin(role: Option<&str>) {
    let role = super::required(role, "role");
    grant("admin", ADMIN, role);
}

/// Takes back everything the grant functions hand out.
#[pg_extern(volatile, parallel_unsafe)]
fn revoke_grants(role: Option<&str>) {
    let role = super::required(role, "role");
    let mut all: Vec<&str> = [WRITER, READER, AUDITOR, ADMIN].concat();
    all.sort_unstable();
    all.dedup();
    apply("REVOKE", &all, role);
    admin::record("GRANT", &format!("revoke all grants from {role}"), None);
}
