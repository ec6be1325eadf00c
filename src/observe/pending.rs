//! Entries of the outermost statement so far, merged and queued when it
//! ends. A function that reads a tracked table once per row, or a loop of
//! statements, fills one entry per distinct event, not one per call.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;

use pgrx::prelude::*;

use crate::deferred::{self, Entry};

/// Distinct subjects kept per pending entry; more are counted.
const MAX_SUBJECTS: usize = 100_000;
/// Pending entries beyond which they are queued at the next chance to wait.
pub const MAX_PENDING: usize = 64;

struct Pending {
    /// Its subjects are in `subjects`, not here.
    entry: Entry,
    subjects: HashSet<Vec<u8>>,
    not_itemized: u64,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    static EXIT_FLUSH: Cell<bool> = const { Cell::new(false) };
}

/// Adds entries, merging those that are the same event but for their
/// subjects (or, for counted statement-level reads, their row counts).
/// Never queues: safe in abort and memory-context callbacks.
pub fn collect(entries: Vec<Entry>) {
    if entries.is_empty() {
        return;
    }
    register_exit_flush();
    PENDING.with(|p| {
        let Ok(mut pending) = p.try_borrow_mut() else {
            return;
        };
        for mut entry in entries {
            let subjects = std::mem::take(&mut entry.subjects);
            let mergeable = |p: &&mut Pending| {
                p.entry.same_but_subjects(&entry)
                    && (subjects.is_empty() == p.subjects.is_empty())
                    && (!subjects.is_empty() || entry.rows.is_some())
            };
            match pending.iter_mut().find(mergeable) {
                Some(p) => {
                    if let (Some(total), Some(rows)) = (p.entry.rows.as_mut(), entry.rows) {
                        *total += rows;
                    }
                    add_subjects(p, subjects);
                }
                None => {
                    let mut p = Pending {
                        entry,
                        subjects: HashSet::new(),
                        not_itemized: 0,
                    };
                    add_subjects(&mut p, subjects);
                    pending.push(p);
                }
            }
        }
    });
}

fn add_subjects(p: &mut Pending, subjects: Vec<Vec<u8>>) {
    for subject in subjects {
        if p.subjects.len() < MAX_SUBJECTS || p.subjects.contains(&subject) {
            p.subjects.insert(subject);
        } else {
            p.not_itemized += 1;
        }
    }
}

pub fn len() -> usize {
    PENDING.with(|p| p.try_borrow().map_or(0, |p| p.len()))
}

/// Queues what is pending. `may_wait`: not in an abort or a callback, so a
/// full queue may be waited on (back-pressure).
pub fn flush(may_wait: bool) {
    let pending = PENDING.with(|p| p.try_borrow_mut().map(|mut p| std::mem::take(&mut *p)));
    let Ok(pending) = pending else {
        return;
    };
    let mut entries = Vec::with_capacity(pending.len());
    for p in pending {
        let mut entry = p.entry;
        let mut subjects: Vec<Vec<u8>> = p.subjects.into_iter().collect();
        subjects.sort_unstable();
        if p.not_itemized > 0 {
            // Of nobody's: no message, which may quote values.
            entries.push(Entry {
                title: format!(
                    "{}: {} more subject values, not itemized",
                    entry.title, p.not_itemized
                ),
                message: None,
                ..entry.clone()
            });
        }
        entry.subjects = subjects;
        entries.push(entry);
    }
    if entries.is_empty() {
        return;
    }
    let dropped = deferred::hand_over(&entries, may_wait);
    if dropped > 0 {
        let message = format!("pg_subject_audit: {dropped} audit events could not be queued; the count is recorded in the trail");
        if may_wait {
            warning!("{message}");
        } else {
            log!("{message}");
        }
    }
}

/// Once per backend: what is still pending when it exits is queued.
fn register_exit_flush() {
    if !EXIT_FLUSH.with(|f| f.replace(true)) {
        unsafe { pg_sys::before_shmem_exit(Some(flush_at_exit), pg_sys::Datum::from(0)) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn flush_at_exit(_code: i32, _arg: pg_sys::Datum) {
    flush(false);
}
