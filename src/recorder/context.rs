//! Who, when and why, gathered once per statement.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::store;

static ACTOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REASON: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

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
    /// Role names by OID, forgotten whenever pg_authid changes.
    static ROLE_NAMES: RefCell<HashMap<u32, String>> = RefCell::new(HashMap::new());
}

/// Defines the settings that say who acts and why, and registers the
/// callback that keeps the role names current.
pub fn init() {
    GucRegistry::define_string_guc(
        c"subject_audit.actor",
        c"Who acts, in the application's terms; recorded on every event.",
        c"Set per transaction with SET LOCAL. Empty means the database role.",
        &ACTOR,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"subject_audit.reason",
        c"Why, e.g. a purpose or ticket; encrypted into every event's description.",
        c"Set per transaction with SET LOCAL.",
        &REASON,
        GucContext::Userset,
        GucFlags::default(),
    );
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            Some(on_role_changed),
            pg_sys::Datum::from(0),
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_role_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    ROLE_NAMES.with(|names| names.borrow_mut().clear());
}

/// A role's current name: renames show at once (the cache is dropped on
/// any change to pg_authid). Looked up twice per statement, so cached.
fn role_name(role: pg_sys::Oid) -> String {
    if let Some(name) = ROLE_NAMES.with(|names| names.borrow().get(&role.to_u32()).cloned()) {
        return name;
    }
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        // Dropped while this session still runs as it.
        return format!("role {}", role.to_u32());
    }
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    ROLE_NAMES.with(|names| names.borrow_mut().insert(role.to_u32(), name.clone()));
    name
}

/// A string setting's value where the GUC machinery keeps it; empty means unset.
fn setting(value: *const std::ffi::c_char) -> Option<String> {
    if value.is_null() {
        return None;
    }
    let value = unsafe { CStr::from_ptr(value) }.to_string_lossy();
    (!value.is_empty()).then(|| value.into_owned())
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
            actor: setting(unsafe { *ACTOR.as_ptr() }).unwrap_or_else(|| db_role.clone()),
            session_role: role_name(unsafe { pg_sys::GetSessionUserId() }),
            db_role,
            application_name: setting(unsafe { pg_sys::application_name }),
            client_addr: client_addr(),
            reason: setting(unsafe { *REASON.as_ptr() }),
        }
    }
}
