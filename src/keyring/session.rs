//! The session keyring: private keys this session unlocked, in backend memory
//! only, wiped on `lock()`, on DISCARD ALL and at backend exit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use zeroize::Zeroizing;

use crate::crypto::{self, DataKey, ReceiverContext, KEY_LEN};
use crate::store::{self, error::raise, error::raise_with_hint};

/// More receiver contexts than this and the cache starts over.
const MAX_RECEIVERS: usize = 10_000;

/// Keys live in boxes: moving a key moves a pointer, so no stray copy of the
/// key is left behind in freed memory when vectors grow.
type SecretKey = Box<Zeroizing<[u8; KEY_LEN]>>;

struct UnlockedKey {
    key_id: i32,
    private_key: SecretKey,
}

#[derive(Default)]
struct SessionKeys {
    keys: Vec<UnlockedKey>,
    /// Keys given in `subject_audit.session_key`, checked against the
    /// installed public keys on first use (the setting is parsed before any
    /// database access is possible).
    pending: Vec<SecretKey>,
    pending_malformed: bool,
    /// By writer context id, with the encapsulated key it was set up from:
    /// ids are reused after DROP/CREATE EXTENSION, keys are not.
    receivers: HashMap<i64, (Vec<u8>, Rc<ReceiverContext>)>,
}

thread_local! {
    static SESSION: RefCell<SessionKeys> = RefCell::new(SessionKeys::default());
}

/// An event is encrypted under a key this session has not unlocked.
pub struct KeyNotUnlocked(pub i32);

/// Adds a key; returns its key id and how many keys the ring holds.
/// `record` records the unlock of that key id before the key is added: if
/// it raises, the key is not added.
pub fn unlock(private_key: &[u8], record: impl FnOnce(i32)) -> (i32, usize) {
    let key = parse_private_key(private_key);
    let key_id = matching_key_id(&key, "this private key matches no installed public key");
    record(key_id);
    (key_id, add_key(key_id, key))
}

fn parse_private_key(bytes: &[u8]) -> SecretKey {
    if bytes.len() != KEY_LEN {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("a private key is {KEY_LEN} bytes, got {}", bytes.len()),
        );
    }
    let mut key: SecretKey = Box::default();
    key.copy_from_slice(bytes);
    key
}

/// The id of the installed public key `private_key` belongs to.
fn matching_key_id(private_key: &SecretKey, unmatched: &str) -> i32 {
    let public_key = crypto::public_key_of(&private_key[..])
        .unwrap_or_else(|e| raise(ERRCODE_INVALID_PARAMETER_VALUE, e.to_string()));
    let key_id = store::as_owner(|| {
        store::select_one::<i32>(
            "SELECT key_id FROM subject_audit.writer_key WHERE public_key OPERATOR(pg_catalog.=) $1",
            &[public_key.to_vec().into()],
        )
    });
    match key_id {
        Ok(Some(id)) => id,
        _ => raise_with_hint(
            ERRCODE_INVALID_PARAMETER_VALUE,
            unmatched,
            "install its public key with subject_audit.install_public_key() first",
        ),
    }
}

/// Adds a matched key; returns how many keys the ring holds.
fn add_key(key_id: i32, private_key: SecretKey) -> usize {
    wipe_at_exit();
    SESSION.with(|s| {
        let mut s = s.borrow_mut();
        if !s.keys.iter().any(|k| k.key_id == key_id) {
            s.keys.push(UnlockedKey {
                key_id,
                private_key,
            });
        }
        s.keys.len()
    })
}

/// Wipes every key and every context derived from one.
pub fn lock() {
    wipe();
}

/// Registers the exit wipe in this process. Done on first use, not in
/// `_PG_init`: a preloaded library runs that in the postmaster, whose exit
/// callbacks every backend discards when it starts.
fn wipe_at_exit() {
    thread_local! { static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    if !REGISTERED.with(|r| r.replace(true)) {
        unsafe { pg_sys::on_proc_exit(Some(wipe_on_exit), pg_sys::Datum::from(0)) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn wipe_on_exit(_code: i32, _arg: pg_sys::Datum) {
    wipe();
}

pub(super) fn wipe() {
    // Zeroizing wipes each key as it is dropped.
    SESSION.with(|s| *s.borrow_mut() = SessionKeys::default());
}

/// Parses `subject_audit.session_key` (hex keys, comma-separated, `\x` optional)
/// into pending keys. Never fails: a malformed value is reported on first use,
/// because a GUC error would echo the value into the server log.
pub fn stash_from_setting(value: &str) {
    wipe_at_exit();
    let mut pending = Vec::new();
    let mut malformed = false;
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match decode_hex_key(item) {
            Some(key) => pending.push(key),
            None => malformed = true,
        }
    }
    SESSION.with(|s| {
        let mut s = s.borrow_mut();
        s.pending.extend(pending);
        s.pending_malformed |= malformed;
    });
}

fn decode_hex_key(item: &str) -> Option<SecretKey> {
    let hex = item.strip_prefix("\\x").unwrap_or(item).as_bytes();
    if hex.len() != KEY_LEN * 2 {
        return None;
    }
    let mut key: SecretKey = Box::default();
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        key[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(key)
}

/// Adds the keys given in `subject_audit.session_key` that were not checked
/// yet, each once `record` has recorded the unlock of its key id. If that
/// raises, the keys not added yet stay pending, for the next read to try.
pub fn unlock_pending(mut record: impl FnMut(i32)) {
    let (pending, malformed) = SESSION.with(|s| {
        let mut s = s.borrow_mut();
        (
            std::mem::take(&mut s.pending),
            std::mem::take(&mut s.pending_malformed),
        )
    });
    if malformed {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            "subject_audit.session_key is malformed: expected 64 hex digits per key, comma-separated",
        );
    }
    // An unmatched key is reported once: the pending keys are gone then.
    let key_ids: Vec<i32> = pending
        .iter()
        .map(|key| {
            matching_key_id(
                key,
                "subject_audit.session_key holds a key that matches no installed public key",
            )
        })
        .collect();
    /// Puts back the keys not added, however the loop is left.
    struct StillPending(Vec<SecretKey>);
    impl Drop for StillPending {
        fn drop(&mut self) {
            let mut keys = std::mem::take(&mut self.0);
            if !keys.is_empty() {
                SESSION.with(|s| {
                    let mut s = s.borrow_mut();
                    keys.append(&mut s.pending);
                    s.pending = keys;
                });
            }
        }
    }
    let mut left = StillPending(pending);
    for key_id in key_ids {
        record(key_id);
        let key = left.0.remove(0);
        add_key(key_id, key);
    }
}

/// Makes sure at least one key is unlocked (the pending ones were unlocked
/// by the caller, which records that).
pub fn ensure_unlocked() {
    if SESSION.with(|s| s.borrow().keys.is_empty()) {
        raise_with_hint(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "no key is unlocked in this session",
            "call subject_audit.unlock(private_key), or connect with -c subject_audit.session_key=<hex>",
        );
    }
}

/// The data key of one subject (by its salt) within one writer context.
pub fn reader_data_key(
    context_id: i64,
    key_id: i32,
    encapsulated_key: &[u8],
    salt: &[u8],
) -> Result<DataKey, KeyNotUnlocked> {
    let cached = SESSION.with(|s| {
        s.borrow()
            .receivers
            .get(&context_id)
            .filter(|(from, _)| from[..] == *encapsulated_key)
            .map(|(_, r)| r.clone())
    });
    let receiver = match cached {
        Some(r) => r,
        None => {
            let receiver = SESSION.with(|s| {
                let s = s.borrow();
                let key = s
                    .keys
                    .iter()
                    .find(|k| k.key_id == key_id)
                    .ok_or(KeyNotUnlocked(key_id))?;
                ReceiverContext::new(&key.private_key[..], encapsulated_key)
                    .map(Rc::new)
                    .map_err(|_| KeyNotUnlocked(key_id))
            })?;
            SESSION.with(|s| {
                let mut s = s.borrow_mut();
                if s.receivers.len() >= MAX_RECEIVERS {
                    s.receivers.clear();
                }
                s.receivers
                    .insert(context_id, (encapsulated_key.to_vec(), receiver.clone()));
            });
            receiver
        }
    };
    Ok(receiver.data_key(salt))
}

pub(super) fn on_relation_invalidated(relid: pg_sys::Oid) {
    // Writer contexts are immutable rows, but DROP/CREATE EXTENSION reuses their ids.
    if relid == pg_sys::InvalidOid || store::is_cached(relid, |r| r.writer_context) {
        SESSION.with(|s| s.borrow_mut().receivers.clear());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_parse() {
        let k = decode_hex_key(&"ab".repeat(32)).unwrap();
        assert_eq!(k[0], 0xab);
        assert!(decode_hex_key(&format!("\\x{}", "01".repeat(32))).is_some());
        assert!(decode_hex_key(&"ab".repeat(31)).is_none());
        assert!(decode_hex_key(&"zz".repeat(32)).is_none());
    }

    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, hex, no_panic};

    const HEX_CHARS: &[char] = &[
        '0', '7', '9', 'a', 'f', 'A', 'F', 'g', 'x', 'X', '\\', '+', '-', ' ', ',', '\u{e9}',
        '\u{ff10}', // a full-width digit
    ];

    #[test]
    fn fuzz_decode_hex_key() {
        fuzz("decode_hex_key", 20_000, |rng| {
            let key: [u8; KEY_LEN] = rng.array();
            let mut text = hex(&key);
            match rng.below(4) {
                0 => text = text.to_uppercase(),
                1 => {
                    text = text
                        .chars()
                        .map(|c| {
                            if rng.coin() {
                                c.to_ascii_uppercase()
                            } else {
                                c
                            }
                        })
                        .collect()
                }
                _ => {}
            }
            if rng.coin() {
                text.insert_str(0, "\\x");
            }
            let valid = text.clone();
            match rng.below(4) {
                // Valid as it is: decodes to the key.
                0 => {
                    let decoded = no_panic(&text, || decode_hex_key(&text));
                    assert_eq!(decoded.as_deref().map(|k| &k[..]), Some(&key[..]), "{text}");
                    return;
                }
                1 => text = rng.text(70, HEX_CHARS),
                _ => {
                    for _ in 0..rng.range(1, 3) {
                        rng.mutate_text(&mut text, HEX_CHARS);
                    }
                }
            }
            // Never a panic; an accepted key is exactly the hex it was given.
            if let Some(k) = no_panic(&text, || decode_hex_key(&text)) {
                let digits = text.strip_prefix("\\x").unwrap_or(&text);
                assert!(
                    hex(&k[..]).eq_ignore_ascii_case(digits),
                    "accepted {text:?} (mutated from {valid:?}) as {}",
                    hex(&k[..])
                );
            }
        });
    }
}
