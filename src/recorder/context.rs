//! Who, when and why, gathered once per statement.

use std::cell::RefCell;
use std::ffi::CStr;

use pgrx::prelude::*;

use crate::store;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatementContext {
    pub at: i64,
    pub txid: u64,
    pub actor: String,
    pub db_role: String,
    pub session_role: String,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub reason: Option<String>,
}

thread_local! {
    static CLIENT_ADDR: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// A role's current name (a syscache lookup: renames show at once).
fn role_name(role: pg_sys::Oid) -> String {
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        // Dropped while this session still runs as it.
        return format!("role {}", role.to_u32());
    }
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// The client's address as `host()` prints it; constant for the session.
fn client_addr() -> Option<String> {
    if let Some(a) = CLIENT_ADDR.with(|c| c.borrow().clone()) {
        return a;
    }
    // Read-only: must not give a reading transaction a transaction id.
    let addr =
        store::select_one::<String>("SELECT pg_catalog.host(pg_catalog.inet_client_addr())", &[])
            .ok()
            .flatten();
    CLIENT_ADDR.with(|c| *c.borrow_mut() = Some(addr.clone()));
    addr
}

impl StatementContext {
    pub fn current() -> Self {
        StatementContext {
            txid: unsafe { pg_sys::GetTopFullTransactionId() }.value,
            ..Self::without_transaction()
        }
    }

    /// Everything but the transaction id (0), which it does not assign: for
    /// events written later by the background writer, in its transaction.
    pub fn without_transaction() -> Self {
        let db_role = role_name(unsafe { pg_sys::GetUserId() });
        StatementContext {
            at: unsafe { pg_sys::GetCurrentStatementStartTimestamp() },
            txid: 0,
            actor: store::setting(c"subject_audit.actor").unwrap_or_else(|| db_role.clone()),
            session_role: role_name(unsafe { pg_sys::GetSessionUserId() }),
            db_role,
            application_name: store::setting(c"application_name"),
            client_addr: client_addr(),
            reason: store::setting(c"subject_audit.reason"),
        }
    }
}
