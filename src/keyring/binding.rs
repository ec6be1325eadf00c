//! Subject-bound sessions: a customer-facing connection bound to one subject
//! for its whole life, so the reading functions refuse every other token,
//! whatever the application sends. Kept beside the keys in backend memory;
//! `lock()` and DISCARD ALL leave it in place: only a new connection unbinds.

use std::cell::RefCell;

use pgrx::PgSqlErrorCode::*;
use zeroize::Zeroizing;

use crate::store::error::{raise, raise_with_hint};

thread_local! {
    static BOUND: RefCell<Option<Zeroizing<String>>> = const { RefCell::new(None) };
}

/// Binds the session to `token`. Binding again to the same token is a no-op;
/// to another one, an error.
pub fn bind(token: &str) {
    if token.is_empty() {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            "a session cannot be bound to an empty token",
        );
    }
    BOUND.with(|b| {
        let mut b = b.borrow_mut();
        match b.as_deref() {
            Some(bound) if bound.as_str() == token => {}
            Some(_) => raise_with_hint(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "this session is already bound to another subject",
                "a binding lasts as long as the connection: open a new one",
            ),
            None => *b = Some(Zeroizing::new(token.to_owned())),
        }
    });
}

/// Binds from `subject_audit.session_subject` at connection start; false if
/// the session is already bound to another token.
pub fn bind_from_setting(token: &str) -> bool {
    BOUND.with(|b| {
        let mut b = b.borrow_mut();
        match b.as_deref() {
            Some(bound) => bound.as_str() == token,
            None => {
                *b = Some(Zeroizing::new(token.to_owned()));
                true
            }
        }
    })
}

/// Whether the session is bound (to any subject).
pub fn is_bound() -> bool {
    BOUND.with(|b| b.borrow().is_some())
}

/// Refuses `token` if the session is bound to another subject.
pub fn check_bound(token: &str) {
    let allowed = BOUND.with(|b| {
        b.borrow()
            .as_deref()
            .is_none_or(|bound| bound.as_str() == token)
    });
    if !allowed {
        raise_with_hint(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "this session is bound to another subject",
            "a subject-bound session reads and records only the trail of the subject it was bound to",
        );
    }
}
