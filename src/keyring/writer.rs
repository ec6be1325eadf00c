//! The writer side: one HPKE sender context per backend (its encapsulated key
//! stored once in `writer_context`), the subject keys this backend has used,
//! and the keyed subject digester. Writers hold no secret that can decrypt
//! anything already written: the sender context only exports keys forward.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use pgrx::{PgBuiltInOids, PgOid};
use zeroize::Zeroizing;

use super::{shared, INVALID_SUBTRANSACTION_ID};
use crate::crypto::{self, DigestMap, SenderContext, SubjectDigester, DIGEST_LEN};
use crate::store::{self, error::raise, error::raise_with_hint};

/// More cached subjects than this and the cache starts over (about 100 bytes each).
const MAX_SUBJECTS: usize = 200_000;

pub struct WriterContext {
    pub context_id: i64,
    pub sender: SenderContext,
}

#[derive(Clone)]
pub struct SubjectKey {
    pub subject_key_id: i64,
    pub salt: Rc<Zeroizing<[u8; 32]>>,
}

struct Cached<T> {
    value: T,
    /// The subtransaction that created or first read the entry; `None` once
    /// its transaction committed.
    since: Option<pg_sys::SubTransactionId>,
}

#[derive(Default)]
struct WriterState {
    context: Option<Cached<Rc<WriterContext>>>,
    subjects: DigestMap<SubjectKey>,
    /// Subjects cached since the transaction began, with the subtransaction
    /// that cached them: only these need attention at commit or abort.
    pending_subjects: Vec<([u8; DIGEST_LEN], pg_sys::SubTransactionId)>,
    /// `since` is set when this transaction created the secret: a rollback
    /// takes the secret away again, so the digester must go with it.
    digester: Option<Cached<SubjectDigester>>,
    /// OIDs of the tables whose invalidation clears the caches above.
    watched: Option<(pg_sys::Oid, pg_sys::Oid)>,
    /// Keys this transaction created, for the shared cache once it commits.
    created: Option<Created>,
    /// Subjects this transaction erased (and the subtransaction that did),
    /// evicted again once it commits. While there are any, the shared cache
    /// is not used: it may hold what this transaction erased (another
    /// backend, which cannot see the erasure yet, may have put it back).
    erased: Vec<([u8; DIGEST_LEN], pg_sys::SubTransactionId)>,
    /// Where they are evicted from, if there is a shared cache.
    erased_scope: Option<shared::Scope>,
    /// Subtransactions this transaction has begun for keys inserted without
    /// ON CONFLICT (see `create_unless_existing`).
    subtransactions: usize,
}

/// At most this many subtransactions per transaction for keys inserted
/// without ON CONFLICT: each that stands keeps its subtransaction id in the
/// backend's cache until the transaction ends, and past 64 of them
/// (`PGPROC_MAX_CACHED_SUBXIDS`) snapshots taken meanwhile, every session's,
/// must look transaction ids up in pg_subtrans.
const MAX_SUBTRANSACTIONS: usize = 32;

/// At most this many created keys wait for the shared cache per transaction
/// (a bulk load creates more than it can hold anyway).
const MAX_CREATED: usize = 65_536;

struct Created {
    scope: shared::Scope,
    /// The shared cache's generation before the first of them was created.
    seen: u64,
    keys: Vec<([u8; DIGEST_LEN], SubjectKey, pg_sys::SubTransactionId)>,
}

thread_local! {
    static WRITER: RefCell<WriterState> = RefCell::new(WriterState::default());
    /// Bumped whenever an invalidation clears the caches: a lookup that saw it
    /// change underneath may have read the old truth, and is not cached.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn generation() -> u64 {
    GENERATION.with(std::cell::Cell::get)
}

fn current_subxact() -> Option<pg_sys::SubTransactionId> {
    Some(unsafe { pg_sys::GetCurrentSubTransactionId() })
}

fn watch_tables() {
    let r = store::relations();
    WRITER.with(|w| w.borrow_mut().watched = Some((r.writer_key, r.subject_key)));
}

/// This backend's sender context to the active writer key, created (and its
/// encapsulated key stored) on first use.
pub fn writer_context() -> Rc<WriterContext> {
    if let Some(ctx) = WRITER.with(|w| w.borrow().context.as_ref().map(|c| c.value.clone())) {
        return ctx;
    }
    watch_tables();
    let seen = generation();
    let (key_id, public_key) = store::as_owner(|| {
        Spi::get_two::<i32, Vec<u8>>(
            "SELECT key_id, public_key FROM subject_audit.writer_key \
             WHERE retired_at IS NULL ORDER BY key_id DESC LIMIT 1",
        )
    })
    .ok()
    .and_then(|(id, pk)| Some((id?, pk?)))
    .unwrap_or_else(|| {
        raise_with_hint(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_subject_audit has no active writer key",
            "install one with subject_audit.install_public_key()",
        )
    });
    let sender = SenderContext::new(&public_key)
        .unwrap_or_else(|e| raise(ERRCODE_DATA_CORRUPTED, format!("writer key {key_id}: {e}")));
    let context_id = store::as_owner(|| {
        Spi::get_one_with_args::<i64>(
            "INSERT INTO subject_audit.writer_context (key_id, encapsulated_key) VALUES ($1, $2) RETURNING context_id",
            &[key_id.into(), sender.encapsulated_key().to_vec().into()],
        )
    });
    let Ok(Some(context_id)) = context_id else {
        raise(ERRCODE_INTERNAL_ERROR, "could not store the writer context");
    };
    let ctx = Rc::new(WriterContext { context_id, sender });
    if generation() != seen {
        // A key changed while this one was being read: use it for this
        // statement only, and look again next time.
        return ctx;
    }
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        // Subject keys are derived per context: a new context starts them over.
        w.subjects.clear();
        w.pending_subjects.clear();
        w.context = Some(Cached {
            value: ctx.clone(),
            since: current_subxact(),
        });
    });
    ctx
}

/// The secret that keys subject digests, created on first use (then the
/// flag is true).
fn installation_secret() -> (Vec<u8>, bool) {
    // The secret or, without one, whether any subject key exists, read in
    // one statement (one snapshot): a first writer committing both between
    // two reads would look like keys without a secret.
    let read = || {
        store::as_owner(|| {
            // Read-only (no transaction id assigned): readers digest tokens too.
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT s, CASE WHEN s IS NULL THEN EXISTS (SELECT FROM subject_audit.subject_key) END \
                         FROM (SELECT (SELECT subject_secret FROM subject_audit.installation)) AS i(s)",
                        Some(1),
                        &[],
                    )?
                    .first()
                    .get_two::<Vec<u8>, bool>()
            })
        })
    };
    let orphans = match read() {
        Ok((Some(secret), _)) => return (secret, false),
        Ok((None, Some(false))) => false,
        _ => true,
    };
    // Subject keys without the secret that made their digests: a restore
    // has not brought the secret back yet. A new one would orphan them all.
    if orphans {
        raise_with_hint(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "subject_audit.installation holds no secret, but subject keys exist",
            "a restore may be in progress: let pg_restore finish (restore into a database nobody writes to)",
        );
    }
    let mut secret = Zeroizing::new(vec![0u8; DIGEST_LEN]);
    crypto::fill_random(&mut secret)
        .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));
    // Two first writers at once: one row wins, both then read it.
    store::as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO subject_audit.installation (subject_secret) VALUES ($1) ON CONFLICT DO NOTHING",
            &[secret.to_vec().into()],
        )
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("could not create the installation secret (nothing has been recorded in this database yet): {e}"),
        )
    });
    match read() {
        Ok((Some(secret), _)) => (secret, true),
        _ => raise(
            ERRCODE_DATA_CORRUPTED,
            "subject_audit.installation holds no secret; reinstall pg_subject_audit",
        ),
    }
}

/// Whether this transaction created, and has not committed yet, the live
/// key of the subject `digest` or the installation secret: until it
/// commits, another transaction (the background writer) recording an event
/// of that subject would wait for it.
pub fn created_here(digest: &[u8; DIGEST_LEN]) -> bool {
    let secret_created = WRITER.with(|w| {
        w.borrow()
            .digester
            .as_ref()
            .is_some_and(|d| d.since.is_some())
    });
    if secret_created {
        return true;
    }
    let xmin = store::as_owner(|| {
        store::select_one::<String>(
            "SELECT xmin::pg_catalog.text FROM subject_audit.subject_key \
             WHERE subject_digest OPERATOR(pg_catalog.=) $1 AND erased_at IS NULL",
            &[digest.to_vec().into()],
        )
    });
    match xmin {
        Ok(Some(xmin)) => xmin.parse::<u32>().is_ok_and(|xid| unsafe {
            pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xid))
        }),
        _ => false,
    }
}

/// The keyed digest of a subject token, as stored in `subject_key`.
pub fn subject_digest(token: &[u8]) -> [u8; DIGEST_LEN] {
    if let Some(d) = WRITER.with(|w| w.borrow().digester.as_ref().map(|c| c.value.clone())) {
        return d.digest(token);
    }
    watch_tables();
    let (secret, created) = installation_secret();
    let secret = Zeroizing::new(secret);
    let digester = SubjectDigester::new(&secret);
    let digest = digester.digest(token);
    let since = created.then(current_subxact).flatten();
    WRITER.with(|w| {
        w.borrow_mut().digester = Some(Cached {
            value: digester,
            since,
        })
    });
    digest
}

/// The live key of every subject in `digests`, creating keys (random salts)
/// for subjects seen for the first time. A few queries per batch, whatever
/// its size (see `load_or_create`).
pub fn subject_keys(digests: &[[u8; DIGEST_LEN]]) -> DigestMap<SubjectKey> {
    let mut found = DigestMap::with_capacity_and_hasher(digests.len(), Default::default());
    let mut missing = DigestMap::default();
    WRITER.with(|w| {
        let w = w.borrow();
        for d in digests {
            match w.subjects.get(d) {
                Some(key) => {
                    found.insert(*d, key.clone());
                }
                None => {
                    missing.insert(*d, ());
                }
            }
        }
    });
    let mut missing: Vec<[u8; DIGEST_LEN]> = missing.into_keys().collect();
    if missing.is_empty() {
        return found;
    }
    // In digest order, new keys go into `subject_key_digest` leaf by leaf
    // (and probes walk it so) instead of to random leaves.
    missing.sort_unstable();
    watch_tables();
    let seen = generation();
    let loaded = load_or_create(&missing);
    if generation() != seen {
        // A subject was erased meanwhile: these keys serve this statement only.
        found.extend(loaded);
        return found;
    }
    let since = current_subxact().unwrap_or_default();
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        if w.subjects.len() + loaded.len() > MAX_SUBJECTS {
            w.subjects.clear();
        }
        w.subjects.reserve(loaded.len());
        for (d, key) in &loaded {
            w.subjects.insert(*d, key.clone());
            w.pending_subjects.push((*d, since));
        }
    });
    found.extend(loaded);
    found
}

/// Keys of subjects missing from this backend's cache: from the shared
/// cache, then the table, then new ones.
fn load_or_create(missing: &[[u8; DIGEST_LEN]]) -> DigestMap<SubjectKey> {
    let erasing = WRITER.with(|w| !w.borrow().erased.is_empty());
    let scope = shared_scope().filter(|_| !erasing);
    let shared_seen = shared::generation();
    let mut loaded: DigestMap<SubjectKey> = scope
        .map(|scope| shared::lookup(scope, missing))
        .unwrap_or_default()
        .into_iter()
        .map(|(digest, id, salt)| (digest, subject_key(id, salt)))
        .collect();
    let misses = absent_from(missing, &loaded);
    if misses.is_empty() {
        return loaded;
    }
    // A batch of subjects mostly seen for the first time (a bulk load):
    // probe a sample only, and let the insert itself find the rest that
    // exist, instead of probing every one and then inserting.
    let sample = &misses[..misses.len().min(NEWNESS_SAMPLE)];
    let probe_all = misses.len() < NEWNESS_BATCH;
    let mut read = load_subject_keys(if probe_all { &misses } else { sample });
    let mostly_new = !probe_all && read.len() * 4 <= sample.len();
    if !probe_all && !mostly_new {
        read.extend(load_subject_keys(&misses[sample.len()..]));
    }
    if let Some(scope) = scope {
        // Only keys known to be committed: read under a fresh snapshot (not
        // a REPEATABLE READ one, which may predate an erasure), by a
        // transaction that has created none (it would see its own).
        let fresh = unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32;
        if fresh && WRITER.with(|w| w.borrow().created.is_none()) {
            shared::publish(
                scope,
                shared_seen,
                read.iter().map(|(d, k)| (d, k.subject_key_id, &**k.salt)),
            );
        }
    }
    let none_sampled = read.is_empty();
    loaded.extend(read);
    let new = absent_from(&misses, &loaded);
    if !new.is_empty() {
        let created = if mostly_new {
            let (created, existing) = create_unless_existing(&new, none_sampled);
            loaded.extend(existing);
            created
        } else {
            create_subject_keys(&new)
        };
        if let Some(scope) = scope {
            let since = current_subxact().unwrap_or_default();
            WRITER.with(|w| {
                let mut w = w.borrow_mut();
                let pending = w.created.get_or_insert_with(|| Created {
                    scope,
                    seen: shared_seen,
                    keys: Vec::new(),
                });
                let room = MAX_CREATED.saturating_sub(pending.keys.len());
                pending.keys.extend(
                    created
                        .iter()
                        .take(room)
                        .map(|(d, k)| (*d, k.clone(), since)),
                );
            });
        }
        loaded.extend(created);
    }
    loaded
}

/// The shared cache's scope for this database, read under a lock on the key
/// table: taking it processes pending invalidations (a TRUNCATE or VACUUM
/// FULL that gave the table a new relfilenode), and no rewrite can commit
/// while this transaction uses keys from the cache.
fn shared_scope() -> Option<shared::Scope> {
    let subject_key = store::relations().subject_key;
    unsafe {
        pg_sys::LockRelationOid(subject_key, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    shared::scope(subject_key)
}

fn subject_key(subject_key_id: i64, salt: [u8; 32]) -> SubjectKey {
    SubjectKey {
        subject_key_id,
        salt: Rc::new(Zeroizing::new(salt)),
    }
}

/// Notes that this transaction erases the subject: its shared cache entry
/// goes now and again at commit (a lookup in between may have put it back),
/// and this backend's own entry now (the invalidation that clears it comes
/// only at the next command, and a capture in this one must not use it).
pub fn note_erased(digest: [u8; DIGEST_LEN]) {
    let scope = shared_scope();
    if let Some(scope) = scope {
        shared::evict(scope, &[digest]);
    }
    let since = current_subxact().unwrap_or_default();
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        w.subjects.remove(&digest);
        w.erased.push((digest, since));
        w.erased_scope = w.erased_scope.or(scope);
    });
}

/// A prepared transaction commits in another session, where no callback
/// of ours would evict what it erased.
pub(super) fn before_prepare() {
    if WRITER.with(|w| !w.borrow().erased.is_empty()) {
        pgrx::error!("a transaction that erased a subject (forget_subject) cannot be prepared");
    }
}

fn collect_keys(table: pgrx::spi::SpiTupleTable<'_>) -> DigestMap<SubjectKey> {
    let mut out = DigestMap::default();
    for row in table {
        let digest: Option<Vec<u8>> = row.get(1).ok().flatten();
        let id: Option<i64> = row.get(2).ok().flatten();
        let salt: Option<Vec<u8>> = row.get(3).ok().flatten();
        if let (Some(digest), Some(id), Some(salt)) = (digest, id, salt) {
            if let (Ok(digest), Ok(salt)) = (
                <[u8; DIGEST_LEN]>::try_from(digest),
                <[u8; 32]>::try_from(salt),
            ) {
                out.insert(
                    digest,
                    SubjectKey {
                        subject_key_id: id,
                        salt: Rc::new(Zeroizing::new(salt)),
                    },
                );
            }
        }
    }
    out
}

const LOAD_SUBJECT_KEYS: &str = "SELECT k.subject_digest, k.subject_key_id, k.salt \
     FROM subject_audit.subject_key k \
     WHERE k.subject_digest OPERATOR(pg_catalog.=) ANY ($1) AND k.erased_at IS NULL";

/// Keys for the digests and salts in two arrays; the argument is the ON
/// CONFLICT clause (none: a subject with a live key is a unique violation).
/// Each salt's commitment (`salt_hash`, which the ledger checks) is computed
/// here, once per key created, never per event.
macro_rules! insert_subject_keys {
    ($on_conflict:literal) => {
        concat!(
            "INSERT INTO subject_audit.subject_key AS k (subject_digest, salt, salt_hash) \
             SELECT d, s, pg_catalog.sha256(s) FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.bytea[]), pg_catalog.unnest($2::pg_catalog.bytea[])) AS u(d, s) ",
            $on_conflict,
            " RETURNING k.subject_digest, k.subject_key_id, k.salt"
        )
    };
}

/// Returns every key, the existing one where there was a conflict.
const CREATE_SUBJECT_KEYS: &str = insert_subject_keys!(
    "ON CONFLICT (subject_digest, erased_at) DO UPDATE SET subject_digest = excluded.subject_digest"
);
/// Returns only the keys it created.
const CREATE_NEW_SUBJECT_KEYS: &str =
    insert_subject_keys!("ON CONFLICT (subject_digest, erased_at) DO NOTHING");
/// Fails (unique violation) if any of the subjects has a live key.
const CREATE_ALL_SUBJECT_KEYS: &str = insert_subject_keys!("");

const CREATE_SUBJECT_KEY: &str =
    "INSERT INTO subject_audit.subject_key AS k (subject_digest, salt, salt_hash) VALUES ($1, $2, pg_catalog.sha256($2)) \
     ON CONFLICT (subject_digest, erased_at) \
     DO UPDATE SET subject_digest = excluded.subject_digest \
     RETURNING k.subject_digest, k.subject_key_id, k.salt";

/// Up to this many subjects, keys are created by a one-subject statement per
/// subject, prepared once per backend (never replanned), and looked up by
/// index probes; beyond it, one statement for the whole batch, planned for
/// it (for thousands of subjects the planner picks a hashed scan).
const PER_SUBJECT_BATCH: usize = 16;
/// From this many subjects missing from the caches on, a sample of them is
/// probed first; if at most a quarter of the sample has a key, the batch is
/// taken for new subjects (see `load_or_create`).
const NEWNESS_BATCH: usize = 256;
/// The first this many of them (in digest order, so a random choice).
const NEWNESS_SAMPLE: usize = 32;
/// Rows of `subject_key` per 8 kB page (about 110 bytes each), for a table
/// never analyzed.
const SUBJECT_KEYS_PER_PAGE: f64 = 70.0;

fn subject_key_error(e: pgrx::spi::SpiError) -> ! {
    raise(
        ERRCODE_INTERNAL_ERROR,
        format!("could not read or create subject keys: {e}"),
    )
}

/// Runs `batch_query` with bytea-array arguments once, or `single_query`
/// (if any) with bytea arguments once per row of them, as the extension owner.
fn run_subject_key_query(
    batch_query: &'static str,
    single_query: Option<&'static str>,
    columns: Vec<Vec<Vec<u8>>>,
) -> DigestMap<SubjectKey> {
    let rows = columns.first().map_or(0, Vec::len);
    store::as_owner(|| {
        Spi::connect_mut(|client| {
            let mut keys = DigestMap::with_capacity_and_hasher(rows, Default::default());
            if let Some(single_query) = single_query.filter(|_| rows <= PER_SUBJECT_BATCH) {
                let types = vec![PgOid::BuiltIn(PgBuiltInOids::BYTEAOID); columns.len()];
                let plan = store::prepared(client, single_query, &types);
                for row in 0..rows {
                    let args: Vec<pgrx::datum::DatumWithOid> =
                        columns.iter().map(|c| c[row].as_slice().into()).collect();
                    let table = client
                        .update(&*plan, None, &args)
                        .unwrap_or_else(|e| subject_key_error(e));
                    keys.extend(collect_keys(table));
                }
            } else {
                let args: Vec<pgrx::datum::DatumWithOid> =
                    columns.into_iter().map(Into::into).collect();
                let table = client
                    .update(batch_query, None, &args)
                    .unwrap_or_else(|e| subject_key_error(e));
                keys.extend(collect_keys(table));
            }
            keys
        })
    })
}

/// Probing the index costs a few microseconds a subject; the batch query's
/// plan for thousands of subjects scans the whole key table. Probe unless
/// the subjects are a sizeable share of the table (a bulk change of cold
/// subjects), as the size of the table tells.
fn probing_is_cheaper(subjects: usize) -> bool {
    subjects <= PER_SUBJECT_BATCH
        || subjects as f64 * 32.0
            <= store::estimated_rows(store::relations().subject_key, SUBJECT_KEYS_PER_PAGE)
}

fn load_subject_keys(digests: &[[u8; DIGEST_LEN]]) -> DigestMap<SubjectKey> {
    if probing_is_cheaper(digests.len()) {
        return store::probe_live_subject_keys(digests)
            .into_iter()
            .map(|(digest, id, salt)| (digest, subject_key(id, salt)))
            .collect();
    }
    let digests = digests.iter().map(|d| d.to_vec()).collect::<Vec<_>>();
    run_subject_key_query(LOAD_SUBJECT_KEYS, None, vec![digests])
}

/// Creates keys for `digests` that have no live key, and reads the keys of
/// those that have one (the insert skips them, having found them in the
/// index): returns (created, existing).
///
/// If none of the sample had a key (`none_sampled`), most likely none of
/// them has: keys for all are inserted first without ON CONFLICT, whose
/// check and speculative insertion of each row take half the insert's
/// time. In a subtransaction, undone if some subject had a key after all
/// (up to `MAX_SUBTRANSACTIONS` times per transaction).
fn create_unless_existing(
    digests: &[[u8; DIGEST_LEN]],
    none_sampled: bool,
) -> (DigestMap<SubjectKey>, DigestMap<SubjectKey>) {
    let subtransaction = none_sampled
        && WRITER.with(|w| {
            let mut w = w.borrow_mut();
            w.subtransactions += 1;
            w.subtransactions <= MAX_SUBTRANSACTIONS
        });
    if subtransaction {
        let all = store::unless_error(ERRCODE_UNIQUE_VIOLATION, || {
            run_subject_key_query(CREATE_ALL_SUBJECT_KEYS, None, new_key_rows(digests))
        });
        if let Some(created) = all {
            return (created, DigestMap::default());
        }
    }
    let mut created = run_subject_key_query(CREATE_NEW_SUBJECT_KEYS, None, new_key_rows(digests));
    let skipped = absent_from(digests, &created);
    if skipped.is_empty() {
        return (created, DigestMap::default());
    }
    let existing = load_subject_keys(&skipped);
    // Skipped but not found: erased by a transaction that committed in
    // between. The general path settles these as it would have without the
    // sample.
    let gone = absent_from(&skipped, &existing);
    if gone.is_empty() {
        return (created, existing);
    }
    created.extend(create_subject_keys(&gone));
    (created, existing)
}

/// The digests of `digests` that `keys` has no key for, in their order.
fn absent_from(
    digests: &[[u8; DIGEST_LEN]],
    keys: &DigestMap<SubjectKey>,
) -> Vec<[u8; DIGEST_LEN]> {
    digests
        .iter()
        .filter(|d| !keys.contains_key(*d))
        .copied()
        .collect()
}

/// The query arguments for new keys: the digests and fresh random salts.
fn new_key_rows(digests: &[[u8; DIGEST_LEN]]) -> Vec<Vec<Vec<u8>>> {
    let mut salts = Zeroizing::new(vec![0u8; 32 * digests.len()]);
    crypto::fill_random(&mut salts)
        .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, e.to_string()));
    let digests = digests.iter().map(|d| d.to_vec()).collect::<Vec<_>>();
    let salts = salts.chunks(32).map(<[u8]>::to_vec).collect::<Vec<_>>();
    vec![digests, salts]
}

fn create_subject_keys(digests: &[[u8; DIGEST_LEN]]) -> DigestMap<SubjectKey> {
    // A concurrent writer may create the same subject first: then its salt
    // wins and is returned here (DO UPDATE, because DO NOTHING returns no row).
    run_subject_key_query(
        CREATE_SUBJECT_KEYS,
        Some(CREATE_SUBJECT_KEY),
        new_key_rows(digests),
    )
}

pub(super) fn on_commit() {
    let (created, erased, erased_scope) = WRITER.with(|w| {
        let mut w = w.borrow_mut();
        (
            w.created.take(),
            std::mem::take(&mut w.erased),
            w.erased_scope.take(),
        )
    });
    if let Some(created) = created {
        shared::publish(
            created.scope,
            created.seen,
            created
                .keys
                .iter()
                .map(|(d, k, _)| (d, k.subject_key_id, &**k.salt)),
        );
    }
    if let Some(scope) = erased_scope {
        let digests: Vec<_> = erased.iter().map(|(d, _)| *d).collect();
        shared::evict(scope, &digests);
    }
    // Under REPEATABLE READ or SERIALIZABLE, lookups read the transaction's
    // snapshot, which may predate a key retirement or an erasure that this
    // backend has already been told about: keep nothing they loaded.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        on_abort(INVALID_SUBTRANSACTION_ID);
    }
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        if let Some(c) = w.context.as_mut() {
            c.since = None;
        }
        if let Some(c) = w.digester.as_mut() {
            c.since = None;
        }
        w.pending_subjects.clear();
        w.subtransactions = 0;
    });
}

/// Drops what the aborted (sub)transaction cached: subtransaction ids grow
/// within a transaction, so that is every entry cached at or after `subid`
/// (`InvalidSubTransactionId`, 0, for a whole transaction).
pub(super) fn on_abort(subid: pg_sys::SubTransactionId) {
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        if w.digester
            .as_ref()
            .is_some_and(|c| c.since.is_some_and(|s| s >= subid))
        {
            w.digester = None;
        }
        if subid == INVALID_SUBTRANSACTION_ID {
            w.created = None;
            w.erased.clear();
            w.erased_scope = None;
            w.subtransactions = 0;
        } else {
            if let Some(created) = w.created.as_mut() {
                created.keys.retain(|(_, _, since)| *since < subid);
            }
            w.erased.retain(|(_, since)| *since < subid);
        }
        if w.context
            .as_ref()
            .is_some_and(|c| c.since.is_some_and(|s| s >= subid))
        {
            w.context = None;
            w.subjects.clear();
            w.pending_subjects.clear();
            return;
        }
        let WriterState {
            subjects,
            pending_subjects,
            ..
        } = &mut *w;
        pending_subjects.retain(|(digest, since)| {
            let aborted = *since >= subid;
            if aborted {
                subjects.remove(digest);
            }
            !aborted
        });
    });
}

/// Forgets the subject keys this backend has cached, as a new backend would start.
#[cfg(any(test, feature = "pg_test"))]
pub fn forget_cached_subjects() {
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        w.subjects.clear();
        w.pending_subjects.clear();
    });
}

pub(super) fn on_relation_invalidated(relid: pg_sys::Oid) {
    WRITER.with(|w| {
        let mut w = w.borrow_mut();
        let Some((writer_key, subject_key)) = w.watched else {
            return;
        };
        let all = relid == pg_sys::InvalidOid;
        if all || relid == writer_key || relid == subject_key {
            GENERATION.with(|g| g.set(g.get() + 1));
        }
        if all || relid == writer_key {
            // A key was installed or retired (or the extension dropped): the
            // next write sets up a new context.
            w.context = None;
            w.subjects.clear();
            w.pending_subjects.clear();
            w.digester = None;
        }
        if all || relid == subject_key {
            // A subject was erased somewhere: never encrypt under its old salt again.
            w.subjects.clear();
            w.pending_subjects.clear();
        }
    });
}
