//! Keeping private keys out of the server log, pg_stat_statements and
//! pg_stat_activity.
//!
//! A statement is key-carrying when its text holds `unlock` or `session_key`
//! (in any case: the SQL routes to a key are `unlock()` and the setting), or
//! when it was seen to carry one: it called `unlock()`, tried to set the key,
//! or EXECUTEs a prepared statement whose text holds those words. False
//! positives only hide more. For a key-carrying statement:
//! - every log message drops the statement (no STATEMENT line; `statement:`,
//!   `duration: … statement:` and `execute/parse/bind …:` keep only their
//!   prefix), its bind parameters (the `parameters: $1 = …` detail and the
//!   `… with parameters: …` context) and any run of 32 or more hex digits
//!   (a key quoted in an error, a PL/pgSQL context or an internal query);
//! - pg_stat_activity shows a mask instead of its text from its parse
//!   analysis on; before that, the text is there as it arrived;
//! - pg_stat_statements records nothing of it (its query id is 0).
//!
//! Needs the library preloaded, so the hooks are in place before the first
//! statement of every session.

use std::cell::Cell;
use std::ffi::{c_char, CStr};
use std::hash::{Hash, Hasher};

use pgrx::pg_sys;

/// What stands for a hidden statement, parameter list or key.
const HIDDEN: &[u8] = b"(hidden by pg_subject_audit: it may hold a private key)";
/// What pg_stat_activity shows for a key-carrying statement.
const ACTIVITY_MASK: &CStr = c"-- statement hidden by pg_subject_audit: it may hold a private key";
/// Hex runs at least this long are hidden (a key is 64 hex digits).
const MIN_HEX_RUN: usize = 32;

static mut PREVIOUS_EMIT_LOG: pg_sys::emit_log_hook_type = None;

thread_local! {
    /// A digest of the last statement text seen to carry a key by what it did.
    static MARKED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Installs the log hook. Called last in `_PG_init`: hooks installed later
/// run first, and the others (failure capture) should see scrubbed text.
pub(super) fn init() {
    unsafe {
        PREVIOUS_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
    }
}

/// The rule on statement text. Runs on every statement: only a `u` or an
/// `s` starts a comparison.
pub(super) fn carries_key(text: &[u8]) -> bool {
    const WORDS: [&[u8]; 2] = [b"unlock", b"session_key"];
    text.iter().enumerate().any(|(at, &byte)| {
        matches!(byte | 0x20, b'u' | b's')
            && WORDS.iter().any(|word| {
                text.get(at..at + word.len())
                    .is_some_and(|window| window.eq_ignore_ascii_case(word))
            })
    })
}

fn digest(text: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The top-level statement this backend runs now, as the client sent it.
unsafe fn current_statement() -> Option<&'static [u8]> {
    let text = pg_sys::debug_query_string;
    (!text.is_null()).then(|| CStr::from_ptr(text).to_bytes())
}

/// The statement running now carries a key, whatever its text says: its
/// log lines are scrubbed from now on (and those of the same text later),
/// and pg_stat_activity shows the mask.
pub fn note_key_statement() {
    if let Some(text) = unsafe { current_statement() } {
        MARKED.with(|m| m.set(Some(digest(text))));
    }
    hide_activity();
}

/// Replaces this backend's statement text in pg_stat_activity.
fn hide_activity() {
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, ACTIVITY_MASK.as_ptr())
    };
}

/// Parse analysis of a statement (top-level or nested): a key-carrying one
/// is masked in pg_stat_activity and left out of pg_stat_statements.
///
/// # Safety
/// `pstate` and `query` must be what the parser hands `post_parse_analyze_hook`.
pub(super) unsafe fn on_parse(pstate: *mut pg_sys::ParseState, query: *mut pg_sys::Query) {
    let source = (*pstate).p_sourcetext;
    let carries = (!source.is_null() && carries_key(CStr::from_ptr(source).to_bytes()))
        || executes_key(query);
    if carries {
        (*query).queryId = 0;
        note_key_statement();
    }
}

/// Whether `query` is an EXECUTE of a prepared statement whose text carries a key.
unsafe fn executes_key(query: *mut pg_sys::Query) -> bool {
    let utility = (*query).utilityStmt;
    if utility.is_null() || (*utility).type_ != pg_sys::NodeTag::T_ExecuteStmt {
        return false;
    }
    let prepared =
        pg_sys::FetchPreparedStatement((*utility.cast::<pg_sys::ExecuteStmt>()).name, false);
    if prepared.is_null() || (*prepared).plansource.is_null() {
        return false;
    }
    let text = (*(*prepared).plansource).query_string;
    !text.is_null() && carries_key(CStr::from_ptr(text).to_bytes())
}

/// Whether the message being logged belongs to a key-carrying statement.
unsafe fn logging_key_statement(edata: *mut pg_sys::ErrorData) -> bool {
    let Some(text) = current_statement() else {
        return false;
    };
    if carries_key(text) || MARKED.with(Cell::get).is_some_and(|m| m == digest(text)) {
        return true;
    }
    // `statement: EXECUTE name(…)` is logged before it is parsed; its
    // detail names the prepared statement's text.
    let detail = (*edata).detail;
    !detail.is_null() && {
        let detail = CStr::from_ptr(detail).to_bytes();
        detail.starts_with(b"prepare: ") && carries_key(detail)
    }
}

/// Scrubs every message of a key-carrying statement. Must not raise (it
/// runs inside error reporting); allocates in the error's memory context.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    if !edata.is_null() && logging_key_statement(edata) {
        (*edata).hide_stmt = true;
        rewrite(&raw mut (*edata).message, |m| {
            mask_hex_runs(&hide_statement_text(m).unwrap_or_else(|| m.to_vec()))
        });
        rewrite(&raw mut (*edata).detail, |d| {
            mask_hex_runs(&hide_parameters(d).unwrap_or_else(|| d.to_vec()))
        });
        rewrite(&raw mut (*edata).context, |c| {
            mask_hex_runs(&hide_parameter_context(c))
        });
        for field in [
            &raw mut (*edata).detail_log,
            &raw mut (*edata).hint,
            &raw mut (*edata).internalquery,
        ] {
            rewrite(field, mask_hex_runs);
        }
    }
    if let Some(previous) = PREVIOUS_EMIT_LOG {
        previous(edata);
    }
}

/// Replaces the text `field` points to with `f` of it, if that differs.
unsafe fn rewrite(field: *mut *mut c_char, f: impl Fn(&[u8]) -> Vec<u8>) {
    if (*field).is_null() {
        return;
    }
    let old = CStr::from_ptr(*field).to_bytes();
    let new = f(old);
    if new != old {
        let copy = pg_sys::palloc(new.len() + 1).cast::<u8>();
        std::ptr::copy_nonoverlapping(new.as_ptr(), copy, new.len());
        *copy.add(new.len()) = 0;
        *field = copy.cast();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn hidden_after(prefix: &[u8]) -> Vec<u8> {
    [prefix, HIDDEN].concat()
}

/// The messages that quote a statement (log_statement, log_duration,
/// log_min_duration_statement), with the statement hidden; `None` for others.
fn hide_statement_text(message: &[u8]) -> Option<Vec<u8>> {
    let mut start = 0;
    if message.starts_with(b"duration: ") {
        // "duration: 0.123 ms  statement: …"; alone with log_duration.
        start = find(message, b"  ")? + 2;
    }
    let rest = &message[start..];
    let quotes = [b"statement: ".as_slice(), b"execute ", b"parse ", b"bind "]
        .iter()
        .any(|p| rest.starts_with(p));
    if !quotes {
        return None;
    }
    let colon = find(rest, b": ")?;
    Some(hidden_after(&message[..start + colon + 2]))
}

/// A detail listing bind parameters or a prepared statement's text, hidden.
fn hide_parameters(detail: &[u8]) -> Option<Vec<u8>> {
    [b"parameters: ".as_slice(), b"prepare: "]
        .iter()
        .find(|p| detail.starts_with(p))
        .map(|p| hidden_after(p))
}

/// Context lines listing bind parameters (`extended query with parameters:
/// …`, `portal "p" with parameters: …`), with the parameters hidden.
fn hide_parameter_context(context: &[u8]) -> Vec<u8> {
    let lines: Vec<Vec<u8>> = context
        .split(|&b| b == b'\n')
        .map(|line| match find(line, b" with parameters: ") {
            Some(at) => hidden_after(&line[..at + b" with parameters: ".len()]),
            None => line.to_vec(),
        })
        .collect();
    lines.join(&b'\n')
}

/// Every run of `MIN_HEX_RUN` or more hex digits, hidden.
fn mask_hex_runs(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        let run = text[at..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if run >= MIN_HEX_RUN {
            out.extend_from_slice(HIDDEN);
            at += run;
        } else if run > 0 {
            out.extend_from_slice(&text[at..at + run]);
            at += run;
        } else {
            out.push(text[at]);
            at += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    const H: &str = "(hidden by pg_subject_audit: it may hold a private key)";

    #[test]
    fn the_rule_is_two_words_in_any_case() {
        assert!(carries_key(b"SELECT subject_audit.UNLOCK($1)"));
        assert!(carries_key(b"set Subject_Audit.Session_Key = 'x'"));
        assert!(!carries_key(b"SELECT subject_audit.lock()"));
        assert!(!carries_key(b"SELECT 1"));
        assert!(!carries_key(b""));
        assert!(!carries_key(b"unloc"));
        assert!(carries_key(b"x;UnLock"));
    }

    #[test]
    fn statement_text_is_hidden_in_every_form() {
        let key = "ab".repeat(32);
        let cases = [
            (
                format!("statement: SELECT unlock('\\x{key}')"),
                format!("statement: {H}"),
            ),
            (
                format!("duration: 0.123 ms  statement: SELECT unlock('\\x{key}')"),
                format!("duration: 0.123 ms  statement: {H}"),
            ),
            (
                "execute <unnamed>: SELECT unlock($1)".into(),
                format!("execute <unnamed>: {H}"),
            ),
            (
                "duration: 1.5 ms  bind S_1: SELECT unlock($1)".into(),
                format!("duration: 1.5 ms  bind S_1: {H}"),
            ),
            ("parse u: SELECT unlock($1)".into(), format!("parse u: {H}")),
            (
                "execute fetch from <unnamed>/C_1: SELECT unlock($1)".into(),
                format!("execute fetch from <unnamed>/C_1: {H}"),
            ),
        ];
        for (message, hidden) in cases {
            assert_eq!(s(hide_statement_text(message.as_bytes()).unwrap()), hidden);
        }
        assert_eq!(hide_statement_text(b"duration: 0.123 ms"), None);
        assert_eq!(hide_statement_text(b"division by zero"), None);
    }

    #[test]
    fn parameters_are_hidden() {
        assert_eq!(
            s(hide_parameters(b"parameters: $1 = '\\xabcd'").unwrap()),
            format!("parameters: {H}")
        );
        assert_eq!(
            s(hide_parameters(b"prepare: PREPARE u AS SELECT unlock('\\xab')").unwrap()),
            format!("prepare: {H}")
        );
        assert_eq!(hide_parameters(b"Key (id)=(1) already exists."), None);
        assert_eq!(
            s(hide_parameter_context(
                b"PL/pgSQL function f line 3\nextended query with parameters: $1 = '\\xab'"
            )),
            format!("PL/pgSQL function f line 3\nextended query with parameters: {H}")
        );
        assert_eq!(
            s(hide_parameter_context(
                b"portal \"p\" with parameters: $1 = 'x'"
            )),
            format!("portal \"p\" with parameters: {H}")
        );
    }

    #[test]
    fn long_hex_runs_are_hidden() {
        let key = "0f".repeat(32);
        assert_eq!(
            s(mask_hex_runs(
                format!("column \"{key}\" does not exist").as_bytes()
            )),
            format!("column \"{H}\" does not exist")
        );
        let short = "a".repeat(MIN_HEX_RUN - 1);
        assert_eq!(s(mask_hex_runs(short.as_bytes())), short);
        assert_eq!(s(mask_hex_runs(b"line 3 at PERFORM")), "line 3 at PERFORM");
    }
}
