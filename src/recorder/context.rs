//! Who, when and why, gathered once per statement.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::store;

static ACTOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REASON: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Longest actor and reason, in characters: any role can set them, and
/// every event repeats them (the actor in its label, the reason encrypted in
/// its payload), so an unbounded one would bloat the trail.
const MAX_ACTOR_CHARS: usize = 200;
const MAX_REASON_CHARS: usize = 1000;

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
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"subject_audit.actor",
            c"Who acts, in the application's terms; recorded on every event.",
            c"Set per transaction with SET LOCAL. Empty means the database role. At most 200 characters.",
            &ACTOR,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_actor),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"subject_audit.reason",
            c"Why, e.g. a purpose or ticket; encrypted into every event's description.",
            c"Set per transaction with SET LOCAL. At most 1000 characters.",
            &REASON,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_reason),
            None,
            None,
        );

        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            Some(on_role_changed),
            pg_sys::Datum::from(0),
        );
    }
}

/// Why a setting's value of `chars` characters is refused, if it is.
fn length_problem(setting: &str, chars: usize, limit: usize) -> Option<String> {
    (chars > limit)
        .then(|| format!("{setting} is too long: {chars} characters, at most {limit} are accepted"))
}

/// Refuses a value longer than `limit` characters; the error does not repeat it.
unsafe fn check_length(newval: *mut *mut std::ffi::c_char, setting: &str, limit: usize) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true;
    }
    let chars = pg_sys::pg_mbstrlen(*newval) as usize;
    match length_problem(setting, chars, limit) {
        None => true,
        Some(problem) => {
            let problem = CString::new(problem).unwrap_or_default();
            pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(problem.as_ptr());
            false
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_actor(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    check_length(newval, "subject_audit.actor", MAX_ACTOR_CHARS)
}

#[pg_guard]
unsafe extern "C-unwind" fn check_reason(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    check_length(newval, "subject_audit.reason", MAX_REASON_CHARS)
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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test(
        error = "subject_audit.reason is too long: 100000 characters, at most 1000 are accepted"
    )]
    fn a_reason_past_the_limit_is_refused() {
        Spi::run("SELECT set_config('subject_audit.reason', repeat('x', 100000), true)").unwrap();
    }

    #[pg_test(error = "subject_audit.actor is too long: 201 characters, at most 200 are accepted")]
    fn an_actor_past_the_limit_is_refused() {
        Spi::run("SELECT set_config('subject_audit.actor', repeat('a', 201), true)").unwrap();
    }

    #[pg_test]
    fn the_limits_count_characters_not_bytes() {
        // Two bytes each in UTF-8: 2000 bytes, 1000 characters.
        Spi::run("SELECT set_config('subject_audit.reason', repeat('é', 1000), true)").unwrap();
        Spi::run("SELECT set_config('subject_audit.actor', repeat('é', 200), true)").unwrap();
        let reason = Spi::get_one::<String>("SELECT current_setting('subject_audit.reason')")
            .unwrap()
            .unwrap();
        assert_eq!(reason.chars().count(), 1000);
    }

    #[test]
    fn lengths_up_to_the_limit_pass_and_longer_ones_are_refused() {
        assert_eq!(
            length_problem("subject_audit.reason", MAX_REASON_CHARS, MAX_REASON_CHARS),
            None
        );
        assert_eq!(
            length_problem("subject_audit.reason", 100_000, MAX_REASON_CHARS).as_deref(),
            Some("subject_audit.reason is too long: 100000 characters, at most 1000 are accepted")
        );
        assert!(
            length_problem("subject_audit.actor", MAX_ACTOR_CHARS + 1, MAX_ACTOR_CHARS).is_some()
        );
    }
}
