//! One way to fail: a PostgreSQL ERROR with an SQLSTATE and a one-line
//! message, never Rust panic text.

use pgrx::PgSqlErrorCode;

pub fn raise(code: PgSqlErrorCode, message: impl Into<String>) -> ! {
    pgrx::ereport!(ERROR, code, message.into());
}

pub fn raise_with_hint(
    code: PgSqlErrorCode,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message.into(), "pg_subject_audit")
        .set_hint(hint.into())
        .report(pgrx::PgLogLevel::ERROR);
    unreachable!()
}
