//! The extension's own tables as seen from Rust: their OIDs (looked up once
//! per backend, never through search_path), the role that owns them, and
//! running work with that role's rights so that writers and readers need no
//! grants on the audit schema.

pub mod error;

use pgrx::pg_sys;
use pgrx::pg_sys::Oid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

pub const SCHEMA: &std::ffi::CStr = c"subject_audit";

#[derive(Clone, Copy, Debug)]
pub struct Relations {
    pub event: Oid,
    pub event_id_seq: Oid,
    pub event_label: Oid,
    pub subject_key: Oid,
    /// Unique index on (subject_digest, erased_at), NULLS NOT DISTINCT.
    pub subject_key_digest: Oid,
    pub writer_key: Oid,
    pub writer_context: Oid,
    pub tracked_table: Oid,
    /// Owner of the audit schema: the role the extension's own work runs as.
    pub owner: Oid,
}

thread_local! {
    static RELATIONS: Cell<Option<Relations>> = const { Cell::new(None) };
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// A statement prepared once per backend and kept: the plan cache replans it
/// by itself when a table it uses changes. Every name in `query` must be
/// schema-qualified (operators too), so search_path cannot divert it.
pub fn prepared(
    client: &SpiClient<'_>,
    query: &'static str,
    arg_types: &[PgOid],
) -> Rc<OwnedPreparedStatement> {
    if let Some(plan) = PLANS.with(|p| p.borrow().get(query).cloned()) {
        return plan;
    }
    let plan = client
        .prepare_mut(query, arg_types)
        .unwrap_or_else(|e| {
            error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("could not prepare: {e}"),
            )
        })
        .keep();
    let plan = Rc::new(plan);
    PLANS.with(|p| p.borrow_mut().insert(query, plan.clone()));
    plan
}

/// The first column of the first row of a read-only query. Unlike
/// `Spi::get_one_with_args`, it does not mark the transaction as writing:
/// no transaction id is assigned, and it works on a hot standby.
pub fn select_one<A: pgrx::FromDatum + pgrx::IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> pgrx::spi::Result<Option<A>> {
    pgrx::spi::Spi::connect(|client| client.select(query, Some(1), args)?.first().get_one())
}

/// The relation a statement's RangeVar names, if it exists. No lock is
/// taken: the statement takes (or holds) its own.
///
/// # Safety
/// `range_var` must point to a valid RangeVar.
pub unsafe fn relation_id(range_var: *mut pg_sys::RangeVar) -> Option<Oid> {
    let relid = pg_sys::RangeVarGetRelidExtended(
        range_var,
        pg_sys::NoLock as i32,
        pg_sys::RVROption::RVR_MISSING_OK,
        None,
        std::ptr::null_mut(),
    );
    (relid != pg_sys::InvalidOid).then_some(relid)
}

/// The audit schema's relations, resolved by name inside the schema only.
pub fn relations() -> Relations {
    if let Some(r) = RELATIONS.with(Cell::get) {
        return r;
    }
    let r = unsafe { lookup_relations() };
    RELATIONS.with(|c| c.set(Some(r)));
    r
}

unsafe fn lookup_relations() -> Relations {
    let schema = pg_sys::get_namespace_oid(SCHEMA.as_ptr(), true);
    if schema == pg_sys::InvalidOid {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "extension pg_subject_audit is not installed in this database",
        );
    }
    let rel = |name: &std::ffi::CStr| {
        let oid = pg_sys::get_relname_relid(name.as_ptr(), schema);
        if oid == pg_sys::InvalidOid {
            error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!(
                    "relation subject_audit.{} is missing; reinstall pg_subject_audit",
                    name.to_string_lossy()
                ),
            );
        }
        oid
    };
    let event = rel(c"event");
    let relation = pg_sys::RelationIdGetRelation(event);
    let owner = (*(*relation).rd_rel).relowner;
    pg_sys::RelationClose(relation);
    Relations {
        event,
        event_id_seq: rel(c"event_event_id_seq"),
        event_label: rel(c"event_label"),
        subject_key: rel(c"subject_key"),
        subject_key_digest: rel(c"subject_key_digest"),
        writer_key: rel(c"writer_key"),
        writer_context: rel(c"writer_context"),
        tracked_table: rel(c"tracked_table"),
        owner,
    }
}

/// Whether `relid` is one of ours, by the OIDs cached in this backend.
pub fn is_cached(relid: Oid, pick: impl Fn(&Relations) -> Oid) -> bool {
    RELATIONS.with(Cell::get).is_some_and(|r| pick(&r) == relid)
}

/// Relcache invalidation: a change to one of our relations (or a reset of
/// everything) may mean DROP/CREATE EXTENSION, so look the OIDs up again.
pub fn forget_relation(relid: Oid) {
    let Some(r) = RELATIONS.with(Cell::get) else {
        return;
    };
    let ours = [
        r.event,
        r.event_id_seq,
        r.event_label,
        r.subject_key,
        r.writer_key,
        r.writer_context,
        r.tracked_table,
    ];
    if relid == pg_sys::InvalidOid || ours.contains(&relid) {
        RELATIONS.with(|c| c.set(None));
    }
}

/// Runs `f` as the owner of the audit schema, in a security-restricted
/// operation and with `search_path = pg_catalog, pg_temp` (so no object of
/// the caller's can stand in for ours), then switches back. On error
/// PostgreSQL's (sub)transaction abort restores the user and the setting.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = relations().owner;
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    let nest_level;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
    let result = {
        let _own = OwnQueries::enter();
        f()
    };
    unsafe {
        pg_sys::AtEOXact_GUC(true, nest_level);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
    result
}

thread_local! {
    static OWN_QUERIES: Cell<u32> = const { Cell::new(0) };
}

/// Marks the extension's own queries while they run, however they end.
struct OwnQueries;

impl OwnQueries {
    fn enter() -> Self {
        OWN_QUERIES.with(|d| d.set(d.get() + 1));
        OwnQueries
    }
}

impl Drop for OwnQueries {
    fn drop(&mut self) {
        OWN_QUERIES.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Whether the statement running now is one of the extension's own (run
/// through `as_owner`): its reads of tracked tables are not the user's.
pub fn in_own_query() -> bool {
    OWN_QUERIES.with(Cell::get) > 0
}

/// The live key (id and salt) of each subject in `digests` that has one,
/// by direct probes of the `subject_key_digest` index under a fresh snapshot:
/// no SPI, no plan, for the few subjects of an ordinary statement.
pub fn probe_live_subject_keys(digests: &[[u8; 32]]) -> Vec<([u8; 32], i64, [u8; 32])> {
    let r = relations();
    let mut found = Vec::with_capacity(digests.len());
    unsafe {
        let heap = pg_sys::table_open(r.subject_key, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(
            r.subject_key_digest,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let scan = pg_sys::index_beginscan(heap, index, snapshot, 2, 0);
        for digest in digests {
            let key_datum =
                pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(digest.as_ptr().cast(), 32));
            // subject_digest = digest AND erased_at IS NULL: the live key,
            // not an erased one of the same subject (which sorts first).
            let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
            pg_sys::ScanKeyInit(
                &mut keys[0],
                1,
                pg_sys::BTEqualStrategyNumber as u16,
                pg_sys::F_BYTEAEQ.into(),
                key_datum,
            );
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[1],
                (pg_sys::SK_ISNULL | pg_sys::SK_SEARCHNULL) as i32,
                2,
                0, // InvalidStrategy: a null test, no operator
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::Datum::from(0),
            );
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
            if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
                pg_sys::slot_getallattrs(slot);
                // subject_key columns: subject_key_id, subject_digest, salt, ...
                let values = (*slot).tts_values;
                let nulls = (*slot).tts_isnull;
                if !*nulls.add(0) && !*nulls.add(2) {
                    let id = (*values.add(0)).value() as i64;
                    let salt =
                        pgrx::varlena::varlena_to_byte_slice((*values.add(2)).cast_mut_ptr());
                    if let Ok(salt) = <[u8; 32]>::try_from(salt) {
                        found.push((*digest, id, salt));
                    }
                }
                pg_sys::ExecClearTuple(slot);
            }
        }
        pg_sys::index_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::index_close(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    found
}

thread_local! {
    /// The SQLSTATE (packed) that `unless_error` is catching right now.
    static CAUGHT_HERE: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Whether an error with SQLSTATE `code` (packed, as `geterrcode()` gives
/// it) raised now will be caught and undone by `unless_error`: it fails no
/// statement, though the error context callbacks of the statements around
/// still see it.
pub fn is_caught_here(code: i32) -> bool {
    CAUGHT_HERE.with(|c| c.get() == Some(code))
}

/// Runs `f` in a subtransaction of its own, as a PL/pgSQL block with an
/// EXCEPTION clause does: if `f` fails with the error `code`, what it did is
/// undone and `None` returned; any other error undoes it too and goes on up.
pub fn unless_error<R>(code: pgrx::PgSqlErrorCode, f: impl FnOnce() -> R) -> Option<R> {
    struct Catching(Option<i32>);
    impl Drop for Catching {
        fn drop(&mut self) {
            CAUGHT_HERE.with(|c| c.set(self.0));
        }
    }
    let _catching = Catching(CAUGHT_HERE.with(|c| c.replace(Some(code as i32))));
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        let restore = move || {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        };
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            let result = f();
            pg_sys::ReleaseCurrentSubTransaction();
            restore();
            Some(result)
        }))
        .catch_when(code, |_| {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            restore();
            None
        })
        .catch_others(|e| {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            restore();
            e.rethrow()
        })
        .execute()
    }
}

/// Reads the relcache entry of `relid` (no lock taken), if it exists.
pub fn with_relation<R>(relid: Oid, read: impl FnOnce(&pg_sys::RelationData) -> R) -> Option<R> {
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        if relation.is_null() {
            return None;
        }
        let result = read(&*relation);
        pg_sys::RelationClose(relation);
        Some(result)
    }
}

/// About how many rows a table has now, estimated as the planner does: the
/// rows per page its statistics last saw (`rows_per_page` if never
/// analyzed) times its pages now. The statistics alone lag behind a table
/// that grew since (autovacuum may not have analyzed it yet).
pub fn estimated_rows(relid: Oid, rows_per_page: f64) -> f64 {
    // Its size is read from its file: locked, so that no rewrite (VACUUM
    // FULL, CLUSTER) swaps the file meanwhile.
    unsafe { pg_sys::LockRelationOid(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    with_relation(relid, |r| unsafe {
        let relation = r as *const pg_sys::RelationData as *mut pg_sys::RelationData;
        let pages_now =
            pg_sys::RelationGetNumberOfBlocksInFork(relation, pg_sys::ForkNumber::MAIN_FORKNUM);
        let (pages, rows) = ((*r.rd_rel).relpages, (*r.rd_rel).reltuples);
        let density = if pages > 0 && rows >= 0.0 {
            f64::from(rows) / f64::from(pages)
        } else {
            rows_per_page
        };
        density * f64::from(pages_now)
    })
    .unwrap_or(0.0)
}

/// What a background worker pins as soon as it is connected. It runs as the
/// bootstrap superuser, but its connection took the settings of its database
/// and role (ALTER DATABASE/ROLE … SET), which the database's owner, no
/// superuser, may choose: on its search_path an operator, function or view of
/// that owner's would run with superuser rights, and the others could stop or
/// skew the worker's statements. PGC_S_OVERRIDE outranks those sources, a
/// reload of postgresql.conf and any later SET.
const WORKER_SETTINGS: &[(&std::ffi::CStr, &std::ffi::CStr)] = &[
    (c"search_path", c"pg_catalog, pg_temp"),
    // How string literals and `= NULL` parse.
    (c"standard_conforming_strings", c"on"),
    (c"transform_null_equals", c"off"),
    (c"bytea_output", c"hex"),
    // What would make every transaction of the worker fail or behave otherwise.
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_deferrable", c"off"),
    (c"statement_timeout", c"0"),
    (c"idle_in_transaction_session_timeout", c"0"),
];

/// Pins `WORKER_SETTINGS` and `extra` (name, value) for this background
/// worker, before it runs any query. Call right after connecting.
pub fn pin_worker_settings(extra: &[(&std::ffi::CStr, &std::ffi::CStr)]) {
    for (name, value) in WORKER_SETTINGS.iter().chain(extra) {
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
}

/// Whether the extension is installed in this database, by a catalog
/// lookup: no SQL, so no name is resolved through any search_path.
pub fn extension_installed() -> bool {
    unsafe { pg_sys::get_extension_oid(c"pg_subject_audit".as_ptr(), true) != pg_sys::InvalidOid }
}

/// A string setting, `None` when unset or empty.
pub fn setting(name: &std::ffi::CStr) -> Option<String> {
    let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
    if value.is_null() {
        return None;
    }
    let value = unsafe { std::ffi::CStr::from_ptr(value) }.to_string_lossy();
    (!value.is_empty()).then(|| value.into_owned())
}

/// Asks every backend (this one included) to drop what it cached about
/// `relid`; sent at commit, dropped on rollback.
pub fn invalidate(relid: Oid) {
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
}

/// Registers the relcache callback that drops stale OIDs. Called from `_PG_init`.
pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: Oid) {
    forget_relation(relid);
}
