//! `subject_audit.session_key` and `subject_audit.session_subject`: a key and
//! a subject given in the connection's startup options, taken into the
//! keyring at once and replaced by a mask, so that neither stays in the GUC
//! table, where SHOW, a parallel worker or a dump of settings could reach it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use pgrx::pg_sys;

use super::{binding, redact, session};

/// Owned by the GUC machinery; only ever holds the mask, never a key.
static mut SESSION_KEY: *mut c_char = std::ptr::null_mut();
/// What `subject_audit.session_key` holds once its keys were taken.
const SESSION_KEY_MASK: &CStr = c"(hidden)";
/// Owned by the GUC machinery; only ever holds the mask, never a token.
static mut SESSION_SUBJECT: *mut c_char = std::ptr::null_mut();
/// What `subject_audit.session_subject` holds once the session is bound.
const SESSION_SUBJECT_MASK: &CStr = c"(bound)";

/// Defines both settings. Called from `_PG_init`.
pub fn define() {
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"subject_audit.session_key".as_ptr(),
            c"Private keys (hex, comma-separated) that unlock this session, from the connection's startup options (PGOPTIONS).".as_ptr(),
            c"The keys are taken into the session keyring at once; the setting then reads as (hidden). Refused anywhere else: SET, set_config() and ALTER … SET would put the key in statement text.".as_ptr(),
            &raw mut SESSION_KEY,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            (pg_sys::GUC_NO_SHOW_ALL | pg_sys::GUC_NOT_IN_SAMPLE | pg_sys::GUC_SUPERUSER_ONLY) as i32,
            Some(check_session_key),
            None,
            Some(show_session_key),
        );
        pg_sys::DefineCustomStringVariable(
            c"subject_audit.session_subject".as_ptr(),
            c"Binds this connection to one subject (a token), from the startup options.".as_ptr(),
            c"The reading functions and record_access then refuse any other token until the connection ends.".as_ptr(),
            &raw mut SESSION_SUBJECT,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_BACKEND,
            (pg_sys::GUC_NO_SHOW_ALL | pg_sys::GUC_NOT_IN_SAMPLE | pg_sys::GUC_SUPERUSER_ONLY) as i32,
            Some(check_session_subject),
            None,
            Some(show_session_subject),
        );
    }
}

/// Takes the keys out of the new value and replaces it with the mask, so the
/// key is kept neither in the GUC table nor anywhere SHOW could reach.
/// Accepted only from the connection's startup options (PGC_S_CLIENT). A SET
/// or set_config() in the session (PGC_S_SESSION), ALTER ROLE/DATABASE … SET
/// (checked as PGC_S_TEST) and ALTER SYSTEM or postgresql.conf (PGC_S_FILE)
/// are refused: their statement text, holding the key, would reach the log,
/// pg_stat_statements and other sessions' pg_stat_activity, and a stored key
/// would be readable by others or unlock every session. A refused value is
/// masked before returning, so PostgreSQL's error cannot repeat it. A
/// malformed key is reported on first use; errors here never repeat the value.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_session_key(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true;
    }
    let raw = CStr::from_ptr(*newval);
    if raw.is_empty() || raw == SESSION_KEY_MASK || source == pg_sys::GucSource::PGC_S_DEFAULT {
        return true;
    }
    if source != pg_sys::GucSource::PGC_S_CLIENT {
        // Whatever statement tried is key-carrying, however it is spelt.
        redact::note_key_statement();
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(
            c"subject_audit.session_key is accepted only in the connection's startup options"
                .as_ptr(),
        );
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(
            c"SET, set_config() and ALTER … SET would put the key in statement text: in the server log, pg_stat_statements and pg_stat_activity; stored, it would unlock sessions it was not meant for.".as_ptr(),
        );
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(
            c"Connect with PGOPTIONS='-c subject_audit.session_key=<hex>', or call subject_audit.unlock() with the key as a bind parameter.".as_ptr(),
        );
        replace_with_mask(newval, SESSION_KEY_MASK);
        return false;
    }
    session::stash_from_setting(&raw.to_string_lossy());
    STARTUP_COPIES_HOLD_KEY.with(|c| c.set(true));
    wipe_startup_copies();
    replace_with_mask(newval, SESSION_KEY_MASK)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_session_key() -> *const c_char {
    if SESSION_KEY.is_null() || *SESSION_KEY == 0 {
        c"".as_ptr()
    } else {
        SESSION_KEY_MASK.as_ptr()
    }
}

/// Binds the session and masks the value (a token is personal data).
/// Accepted only in the connection's startup options: stored anywhere else
/// (ALTER ROLE/DATABASE/SYSTEM, postgresql.conf) the token would sit in
/// plaintext in a catalog or file and bind sessions it was not meant for.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_session_subject(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true;
    }
    let raw = CStr::from_ptr(*newval);
    // The mask itself is what a bound session holds, and nothing else.
    if raw.is_empty() || source == pg_sys::GucSource::PGC_S_DEFAULT {
        return true;
    }
    if raw == SESSION_SUBJECT_MASK && binding::is_bound() {
        return true;
    }
    if source != pg_sys::GucSource::PGC_S_CLIENT {
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(
            c"subject_audit.session_subject is accepted only in connection startup options; use bind_subject() in a session".as_ptr(),
        );
        return false;
    }
    if !binding::bind_from_setting(&raw.to_string_lossy()) {
        pg_sys::GUC_check_errmsg_string =
            pg_sys::pstrdup(c"this session is already bound to another subject".as_ptr());
        return false;
    }
    replace_with_mask(newval, SESSION_SUBJECT_MASK)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_session_subject() -> *const c_char {
    if binding::is_bound() {
        SESSION_SUBJECT_MASK.as_ptr()
    } else {
        c"".as_ptr()
    }
}

/// Wipes and frees the value a check hook was given and puts `mask` in its
/// place (allocated with malloc, as the GUC machinery expects), so neither a
/// key nor a token stays in the GUC table.
unsafe fn replace_with_mask(newval: *mut *mut c_char, mask: &CStr) -> bool {
    let masked = libc::strdup(mask.as_ptr());
    if masked.is_null() {
        return false;
    }
    let old = *newval;
    std::ptr::write_bytes(old, 0, libc::strlen(old));
    libc::free(old.cast());
    *newval = masked;
    true
}

/// The start of PostgreSQL 15's `Port` (libpq/libpq-be.h), up to the
/// startup packet's options; pgrx leaves the struct opaque. Its layout is
/// checked against the connection's database and user names before use.
#[repr(C)]
struct PortStart {
    sock: pg_sys::pgsocket,
    noblock: bool,
    proto: pg_sys::ProtocolVersion,
    laddr: pg_sys::SockAddr,
    raddr: pg_sys::SockAddr,
    remote_host: *mut c_char,
    remote_hostname: *mut c_char,
    remote_hostname_resolv: c_int,
    remote_hostname_errcode: c_int,
    remote_port: *mut c_char,
    can_accept_connections: c_uint,
    database_name: *mut c_char,
    user_name: *mut c_char,
    /// The `options` startup parameter (PGOPTIONS), e.g. `-c name=value`.
    cmdline_options: *mut c_char,
    /// Other startup parameters, as alternating names and values.
    guc_options: *mut pg_sys::List,
}

/// The connection's startup options as PostgreSQL keeps them for the whole
/// session (in TopMemoryContext), if this is a client backend and the
/// layout above matches this server.
unsafe fn startup_options() -> Option<*mut PortStart> {
    let port = pg_sys::MyProcPort as *mut PortStart;
    if port.is_null() || (*port).database_name.is_null() || (*port).user_name.is_null() {
        return None;
    }
    // Read during startup, inside InitPostgres's transaction: the catalogs
    // can tell the connection's database and user.
    if !pg_sys::IsTransactionState() {
        return None;
    }
    let database = pg_sys::get_database_name(pg_sys::MyDatabaseId);
    let user = pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), true);
    let same = |kept: *const c_char, known: *const c_char| {
        !known.is_null() && CStr::from_ptr(kept) == CStr::from_ptr(known)
    };
    (same((*port).database_name, database) && same((*port).user_name, user)).then_some(port)
}

thread_local! {
    /// PostgreSQL's copies of the startup options still hold a key.
    static STARTUP_COPIES_HOLD_KEY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wipes the session key from PostgreSQL's own copies of the startup
/// options, which it keeps for the whole session: now if the catalogs can be
/// read (they confirm the layout of `Port`), else at the next call (the
/// first statement's parse analysis).
pub(super) fn wipe_startup_copies() {
    if !STARTUP_COPIES_HOLD_KEY.with(std::cell::Cell::get) {
        return;
    }
    unsafe {
        let Some(port) = startup_options() else {
            return;
        };
        let name = b"subject_audit.session_key";
        let options = (*port).cmdline_options;
        if !options.is_null() {
            let text = std::slice::from_raw_parts_mut(options.cast::<u8>(), libc::strlen(options));
            wipe_option_values(text, name);
        }
        let list = (*port).guc_options;
        if !list.is_null() {
            let cells = (*list).length as usize;
            for pair in (0..cells.saturating_sub(1)).step_by(2) {
                let option = (*(*list).elements.add(pair)).ptr_value as *const c_char;
                let value = (*(*list).elements.add(pair + 1)).ptr_value as *mut c_char;
                if !option.is_null()
                    && !value.is_null()
                    && CStr::from_ptr(option).to_bytes().eq_ignore_ascii_case(name)
                {
                    std::ptr::write_bytes(value, 0, libc::strlen(value));
                }
            }
        }
    }
    STARTUP_COPIES_HOLD_KEY.with(|c| c.set(false));
}

/// Overwrites with `*` the value of every `name=value` in an `options`
/// string (`-c name=value`, `--name=value`; the name in any case, `-` for
/// `_` as PostgreSQL accepts it), up to the next unescaped space.
fn wipe_option_values(text: &mut [u8], name: &[u8]) {
    let same = |a: u8, b: u8| {
        let fold = |c: u8| {
            if c == b'-' {
                b'_'
            } else {
                c.to_ascii_lowercase()
            }
        };
        fold(a) == fold(b)
    };
    let mut at = 0;
    while at + name.len() < text.len() {
        let found = text[at..at + name.len()]
            .iter()
            .zip(name)
            .all(|(&a, &b)| same(a, b))
            && text[at + name.len()] == b'=';
        if !found {
            at += 1;
            continue;
        }
        at += name.len() + 1;
        while at < text.len() && !text[at].is_ascii_whitespace() {
            // A backslash escapes the next character (pg_split_opts).
            if text[at] == b'\\' && at + 1 < text.len() {
                text[at] = b'*';
                at += 1;
            }
            text[at] = b'*';
            at += 1;
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    /// The mirror of `Port` reads this connection's database and user, so
    /// the wipe finds the options where PostgreSQL keeps them.
    #[pg_test]
    fn the_port_layout_matches_this_server() {
        assert!(unsafe { startup_options() }.is_some());
    }

    #[test]
    fn option_values_are_wiped() {
        let key = "ab".repeat(32);
        let wiped = |options: &str| {
            let mut text = options.as_bytes().to_vec();
            wipe_option_values(&mut text, b"subject_audit.session_key");
            String::from_utf8(text).unwrap()
        };
        let stars = "*".repeat(64);
        assert_eq!(
            wiped(&format!(
                "-c subject_audit.session_key={key} -c application_name=x"
            )),
            format!("-c subject_audit.session_key={stars} -c application_name=x")
        );
        assert_eq!(
            wiped(&format!("--Subject_Audit.Session-Key={key},{key}")),
            format!("--Subject_Audit.Session-Key={stars}*{stars}")
        );
        // An escaped space is part of the value; \\x is two characters.
        assert_eq!(
            wiped(&format!(
                "-csubject_audit.session_key=\\\\x{key}\\ x -c a=b"
            )),
            format!("-csubject_audit.session_key=***{stars}*** -c a=b")
        );
        assert_eq!(
            wiped("-c subject_audit.session_key"),
            "-c subject_audit.session_key"
        );
        assert_eq!(
            wiped("-c application_name=session_key"),
            "-c application_name=session_key"
        );
    }
}
