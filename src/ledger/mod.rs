//! The tamper-evident ledger. `seal` groups finished events into blocks (a
//! Merkle root over their hashes, chained to the previous block); `verify`
//! recomputes every sealed event's hash from its stored fields, every root
//! and every link; a checkpoint kept outside the database catches a ledger
//! rebuilt from scratch.
//!
//! Each block also commits to the key material its events name: a digest
//! over their `subject_key` rows (with a SHA-256 commitment of each salt,
//! which erasure keeps) and their `writer_context` rows. Salts are checked
//! against their commitments, and an erased salt against its ERASE event.
//!
//! A block covers the events of a range of transaction ids, ending at the
//! sealing snapshot's xmin: every transaction below it has finished, so no
//! late commit can ever add an event to a sealed range. Writers never wait
//! for the ledger: each event's hash is computed at insert from that event
//! alone.

pub mod worker;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use std::collections::BTreeSet;

use crate::integrity::{
    self, BlockFields, EventFields, KeyMaterial, KeyRowsDigest, LabelFields, GENESIS,
};
use crate::store::{self, error::raise};

/// Rows fetched per round trip while reading events.
const FETCH: i64 = 10_000;
/// Problems listed before the rest are only counted.
const MAX_PROBLEMS: usize = 100;

struct Block {
    block_id: i64,
    from_txid: i64,
    to_txid: i64,
    event_count: i64,
    merkle_root: Vec<u8>,
    previous_hash: Vec<u8>,
    block_hash: Vec<u8>,
    /// NULL in blocks sealed before blocks committed to key material.
    subject_keys_digest: Option<Vec<u8>>,
    writer_contexts_digest: Option<Vec<u8>>,
}

impl Block {
    fn key_material(&self) -> Option<KeyMaterial<'_>> {
        match (&self.subject_keys_digest, &self.writer_contexts_digest) {
            (Some(subject_keys), Some(writer_contexts)) => Some(KeyMaterial {
                subject_keys,
                writer_contexts,
            }),
            _ => None,
        }
    }
}

/// The subject keys and writer contexts a block's events name.
#[derive(Default)]
struct KeyIds {
    subject_keys: BTreeSet<i64>,
    writer_contexts: BTreeSet<i64>,
}

impl KeyIds {
    fn note(&mut self, subject_key_id: Option<i64>, context_id: Option<i64>) {
        self.subject_keys.extend(subject_key_id);
        self.writer_contexts.extend(context_id);
    }

    /// The digests of those rows as they are now (`KeyRowsDigest`).
    fn digests(&self, client: &pgrx::spi::SpiClient<'_>) -> ([u8; 32], [u8; 32]) {
        let subject_keys = rows_digest(
            client,
            KeyRowsDigest::subject_keys(),
            "SELECT u.id, k.subject_key_id IS NOT NULL, k.subject_digest, k.salt_hash \
             FROM pg_catalog.unnest($1::pg_catalog.int8[]) AS u(id) \
             LEFT JOIN subject_audit.subject_key k ON k.subject_key_id OPERATOR(pg_catalog.=) u.id \
             ORDER BY u.id",
            &self.subject_keys,
        );
        let writer_contexts = rows_digest(
            client,
            KeyRowsDigest::writer_contexts(),
            "SELECT u.id, c.context_id IS NOT NULL, pg_catalog.int4send(c.key_id), c.encapsulated_key \
             FROM pg_catalog.unnest($1::pg_catalog.int8[]) AS u(id) \
             LEFT JOIN subject_audit.writer_context c ON c.context_id OPERATOR(pg_catalog.=) u.id \
             ORDER BY u.id",
            &self.writer_contexts,
        );
        (subject_keys, writer_contexts)
    }
}

/// Feeds `digest` the rows `query` returns for `ids`: (id, found, two fields).
fn rows_digest(
    client: &pgrx::spi::SpiClient<'_>,
    mut digest: KeyRowsDigest,
    query: &str,
    ids: &BTreeSet<i64>,
) -> [u8; 32] {
    let ids: Vec<i64> = ids.iter().copied().collect();
    let mut cursor = client.open_cursor(query, &[ids.into()]);
    loop {
        let chunk = cursor.fetch(FETCH).unwrap_or_else(|e| spi_error(e));
        if chunk.is_empty() {
            break;
        }
        for row in chunk {
            let id: i64 = row.get(1).ok().flatten().unwrap_or_default();
            let found: bool = row.get(2).ok().flatten().unwrap_or_default();
            let fields: [Option<Vec<u8>>; 2] =
                std::array::from_fn(|i| row.get::<Vec<u8>>(3 + i).ok().flatten());
            let fields: [Option<&[u8]>; 2] = [fields[0].as_deref(), fields[1].as_deref()];
            digest.add(id, found.then_some(&fields[..]));
        }
    }
    digest.finish()
}

fn spi_error(e: pgrx::spi::SpiError) -> ! {
    raise(ERRCODE_INTERNAL_ERROR, format!("ledger: {e}"))
}

fn read_blocks(client: &pgrx::spi::SpiClient<'_>, last_only: bool) -> Vec<Block> {
    let query = if last_only {
        "SELECT block_id, from_txid, to_txid, event_count, merkle_root, previous_hash, block_hash, \
         subject_keys_digest, writer_contexts_digest \
         FROM subject_audit.block ORDER BY block_id DESC LIMIT 1"
    } else {
        "SELECT block_id, from_txid, to_txid, event_count, merkle_root, previous_hash, block_hash, \
         subject_keys_digest, writer_contexts_digest \
         FROM subject_audit.block ORDER BY block_id"
    };
    let rows = client
        .select(query, None, &[])
        .unwrap_or_else(|e| spi_error(e));
    rows.map(|r| Block {
        block_id: r.get(1).ok().flatten().unwrap_or_default(),
        from_txid: r.get(2).ok().flatten().unwrap_or_default(),
        to_txid: r.get(3).ok().flatten().unwrap_or_default(),
        event_count: r.get(4).ok().flatten().unwrap_or_default(),
        merkle_root: r.get(5).ok().flatten().unwrap_or_default(),
        previous_hash: r.get(6).ok().flatten().unwrap_or_default(),
        block_hash: r.get(7).ok().flatten().unwrap_or_default(),
        subject_keys_digest: r.get(8).ok().flatten(),
        writer_contexts_digest: r.get(9).ok().flatten(),
    })
    .collect()
}

/// Seals every finished, unsealed event into one new block; returns how many.
pub fn seal() -> i64 {
    store::as_owner(|| {
        Spi::connect_mut(|client| {
            // One sealer at a time; writers are not blocked.
            client
                .update(
                    "LOCK TABLE subject_audit.block IN SHARE ROW EXCLUSIVE MODE",
                    None,
                    &[],
                )
                .unwrap_or_else(|e| spi_error(e));
            let last = read_blocks(client, true).pop();
            let from_txid = last.as_ref().map_or(0, |b| b.to_txid);
            let horizon = client
                .select(
                    "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8",
                    None,
                    &[],
                )
                .and_then(|t| t.first().get_one::<i64>())
                .unwrap_or_else(|e| spi_error(e))
                .unwrap_or(from_txid);
            if horizon <= from_txid {
                return 0;
            }
            let mut leaves = Vec::new();
            let mut key_ids = KeyIds::default();
            let mut cursor = client.open_cursor(
                "SELECT row_hash, subject_key_id, context_id FROM subject_audit.event \
                 WHERE txid OPERATOR(pg_catalog.>=) $1 AND txid OPERATOR(pg_catalog.<) $2 ORDER BY event_id",
                &[from_txid.into(), horizon.into()],
            );
            loop {
                let chunk = cursor.fetch(FETCH).unwrap_or_else(|e| spi_error(e));
                if chunk.is_empty() {
                    break;
                }
                for row in chunk {
                    let hash: Vec<u8> = row.get(1).ok().flatten().unwrap_or_default();
                    leaves.push(<[u8; 32]>::try_from(hash).unwrap_or([0; 32]));
                    key_ids.note(row.get(2).ok().flatten(), row.get(3).ok().flatten());
                }
            }
            drop(cursor);
            if leaves.is_empty() {
                return 0;
            }
            let block_id = last.as_ref().map_or(1, |b| b.block_id + 1);
            let previous_hash = last.map_or(GENESIS.to_vec(), |b| b.block_hash);
            let root = integrity::merkle_root(&leaves);
            // Those rows are committed: every transaction that named them has finished.
            let (subject_keys, writer_contexts) = key_ids.digests(client);
            let fields = BlockFields {
                block_id,
                from_txid,
                to_txid: horizon,
                event_count: leaves.len() as i64,
                merkle_root: &root,
                previous_hash: &previous_hash,
                key_material: Some(KeyMaterial {
                    subject_keys: &subject_keys,
                    writer_contexts: &writer_contexts,
                }),
            };
            let hash = integrity::block_hash(&fields);
            client
                .update(
                    "INSERT INTO subject_audit.block (block_id, from_txid, to_txid, event_count, first_event_id, \
                     last_event_id, merkle_root, previous_hash, block_hash, subject_keys_digest, writer_contexts_digest) \
                     SELECT $1, $2, $3, $4, pg_catalog.min(event_id), pg_catalog.max(event_id), $5, $6, $7, $8, $9 \
                     FROM subject_audit.event \
                     WHERE txid OPERATOR(pg_catalog.>=) $2 AND txid OPERATOR(pg_catalog.<) $3",
                    None,
                    &[
                        block_id.into(),
                        from_txid.into(),
                        horizon.into(),
                        fields.event_count.into(),
                        root.to_vec().into(),
                        previous_hash.clone().into(),
                        hash.to_vec().into(),
                        subject_keys.to_vec().into(),
                        writer_contexts.to_vec().into(),
                    ],
                )
                .unwrap_or_else(|e| spi_error(e));
            fields.event_count
        })
    })
}

/// The current ledger digest: the last block's id and hash.
pub fn checkpoint() -> String {
    store::as_owner(|| {
        Spi::connect(|client| match read_blocks(client, true).pop() {
            Some(b) => integrity::format_checkpoint(b.block_id, &b.block_hash),
            None => integrity::format_checkpoint(0, &GENESIS),
        })
    })
}

pub struct Verification {
    pub ok: bool,
    pub events_checked: i64,
    pub problems: Vec<String>,
    pub unsealed: i64,
}

struct Problems {
    listed: Vec<String>,
    more: usize,
}

impl Problems {
    fn push(&mut self, p: String) {
        if self.listed.len() < MAX_PROBLEMS {
            self.listed.push(p);
        } else {
            self.more += 1;
        }
    }
}

/// Checks every sealed event and block, and that the ledger still extends `checkpoint`.
pub fn verify(checkpoint: Option<&str>) -> Verification {
    store::as_owner(|| Spi::connect(|client| verify_with(client, checkpoint)))
}

fn verify_with(client: &pgrx::spi::SpiClient<'_>, checkpoint: Option<&str>) -> Verification {
    let mut problems = Problems {
        listed: Vec::new(),
        more: 0,
    };
    check_labels(client, &mut problems);
    check_salts(client, &mut problems);
    let blocks = read_blocks(client, false);
    let mut previous_hash = GENESIS.to_vec();
    let mut previous_to = 0i64;
    let mut events_checked = 0i64;
    for (i, b) in blocks.iter().enumerate() {
        let expected_id = i as i64 + 1;
        if b.block_id != expected_id {
            problems.push(format!(
                "block {expected_id} is missing (found block {} in its place)",
                b.block_id
            ));
        }
        if b.previous_hash != previous_hash {
            problems.push(format!(
                "block {}: does not chain to the block before it",
                b.block_id
            ));
        }
        if b.from_txid != previous_to {
            problems.push(format!(
                "block {}: does not start where the block before it ends",
                b.block_id
            ));
        }
        let recomputed = integrity::block_hash(&BlockFields {
            block_id: b.block_id,
            from_txid: b.from_txid,
            to_txid: b.to_txid,
            event_count: b.event_count,
            merkle_root: &b.merkle_root,
            previous_hash: &b.previous_hash,
            key_material: b.key_material(),
        });
        if recomputed[..] != b.block_hash[..] {
            problems.push(format!(
                "block {}: altered (its hash does not match its fields)",
                b.block_id
            ));
        }
        let mut key_ids = KeyIds::default();
        let leaves = block_events(client, b, &mut key_ids, &mut problems);
        if let Some(sealed) = b.key_material() {
            let (subject_keys, writer_contexts) = key_ids.digests(client);
            if subject_keys[..] != sealed.subject_keys[..] {
                problems.push(format!(
                    "block {}: a subject key its events use was changed since sealing (its digest or salt commitment, or the key deleted)",
                    b.block_id
                ));
            }
            if writer_contexts[..] != sealed.writer_contexts[..] {
                problems.push(format!(
                    "block {}: a writer context its events use was changed since sealing (its encapsulated key or writer key, or the context deleted)",
                    b.block_id
                ));
            }
        }
        events_checked += leaves.len() as i64;
        if leaves.len() as i64 != b.event_count
            || integrity::merkle_root(&leaves)[..] != b.merkle_root[..]
        {
            problems.push(format!(
                "block {}: its events were removed, added, moved or altered ({} found, {} sealed)",
                b.block_id,
                leaves.len(),
                b.event_count
            ));
        }
        previous_hash = b.block_hash.clone();
        previous_to = b.to_txid;
    }
    if let Some(text) = checkpoint {
        match integrity::parse_checkpoint(text) {
            None => problems
                .push("checkpoint: malformed (expected psa1:<block>:<64 hex digits>)".into()),
            Some((0, hash)) if hash == GENESIS => {}
            Some((id, hash)) => match blocks.iter().find(|b| b.block_id == id) {
                None => problems.push(format!("checkpoint: block {id} no longer exists")),
                Some(b) if b.block_hash != hash => problems.push(format!(
                    "checkpoint: block {id} differs from the checkpoint (ledger rewritten)"
                )),
                Some(_) => {}
            },
        }
    }
    let unsealed = client
        .select(
            "SELECT pg_catalog.count(*) FROM subject_audit.event WHERE txid OPERATOR(pg_catalog.>=) $1",
            None,
            &[previous_to.into()],
        )
        .and_then(|t| t.first().get_one::<i64>())
        .ok()
        .flatten()
        .unwrap_or(0);
    if problems.more > 0 {
        let more = problems.more;
        problems
            .listed
            .push(format!("... and {more} more problems"));
    }
    Verification {
        ok: problems.listed.is_empty(),
        events_checked,
        problems: problems.listed,
        unsealed,
    }
}

/// A label's columns as the queries below list them, in this order.
const LABEL_COLUMNS: &str = "l.operation, l.status, l.sqlstate, l.table_name, l.actor, l.db_role, \
     l.session_role, l.application_name, pg_catalog.host(l.client_addr), l.changed_columns";

/// A label read back, owned; `fields` lends it out for hashing.
struct StoredLabel {
    text: [Option<String>; 9],
    changed_columns: Option<Vec<String>>,
}

impl StoredLabel {
    /// Reads `LABEL_COLUMNS` starting at column `first` of `row`.
    fn read(row: &pgrx::spi::SpiHeapTupleData<'_>, first: usize) -> Self {
        StoredLabel {
            text: std::array::from_fn(|i| row.get::<String>(first + i).ok().flatten()),
            changed_columns: row.get(first + 9).ok().flatten(),
        }
    }

    fn with_fields<R>(&self, f: impl FnOnce(&LabelFields<'_>) -> R) -> R {
        let t = |i: usize| self.text[i].as_deref();
        let columns: Option<Vec<&str>> = self
            .changed_columns
            .as_ref()
            .map(|c| c.iter().map(String::as_str).collect());
        f(&LabelFields {
            operation: t(0).unwrap_or_default(),
            status: t(1).unwrap_or_default(),
            sqlstate: t(2),
            table_name: t(3),
            actor: t(4).unwrap_or_default(),
            db_role: t(5).unwrap_or_default(),
            session_role: t(6).unwrap_or_default(),
            application_name: t(7),
            client_addr: t(8),
            changed_columns: columns.as_deref(),
        })
    }
}

/// Labels are shared: one altered is reported by every event that names it,
/// and here once by itself (it no longer matches the digest it is found by).
fn check_labels(client: &pgrx::spi::SpiClient<'_>, problems: &mut Problems) {
    let labels = client
        .select(
            &format!(
                "SELECT l.label_id, l.label_digest, {LABEL_COLUMNS} \
                 FROM subject_audit.event_label l ORDER BY l.label_id"
            ),
            None,
            &[],
        )
        .unwrap_or_else(|e| spi_error(e));
    for row in labels {
        let digest = StoredLabel::read(&row, 3).with_fields(integrity::label_digest);
        if row.get::<Vec<u8>>(2).ok().flatten().as_deref() != Some(&digest[..]) {
            let label_id: i32 = row.get(1).ok().flatten().unwrap_or_default();
            problems.push(format!(
                "label {label_id}: altered (its fields do not match its digest)"
            ));
        }
    }
}

/// Every live salt must match the commitment stored with it (a salt swapped
/// or replaced would make that subject's payloads unreadable, or readable
/// under another's key), and every erased one must have its ERASE event
/// (crypto-shredding outside `forget_subject` leaves no trace otherwise).
fn check_salts(client: &pgrx::spi::SpiClient<'_>, problems: &mut Problems) {
    let rows = client
        .select(
            "SELECT k.subject_key_id, k.salt IS NOT NULL, k.salt_hash IS NOT NULL \
             FROM subject_audit.subject_key k \
             WHERE CASE WHEN k.salt IS NOT NULL \
                   THEN k.salt_hash IS NULL OR k.salt_hash OPERATOR(pg_catalog.<>) pg_catalog.sha256(k.salt) \
                   ELSE NOT EXISTS (SELECT FROM subject_audit.event e \
                        JOIN subject_audit.event_label l ON l.label_id OPERATOR(pg_catalog.=) e.label_id \
                        WHERE e.subject_key_id OPERATOR(pg_catalog.=) k.subject_key_id \
                        AND l.operation OPERATOR(pg_catalog.=) 'ERASE') END \
             ORDER BY k.subject_key_id",
            None,
            &[],
        )
        .unwrap_or_else(|e| spi_error(e));
    for row in rows {
        let id: i64 = row.get(1).ok().flatten().unwrap_or_default();
        let live: bool = row.get(2).ok().flatten().unwrap_or_default();
        let committed: bool = row.get(3).ok().flatten().unwrap_or_default();
        problems.push(match (live, committed) {
            (true, true) => format!(
                "subject key {id}: its salt does not match its commitment (salt replaced or swapped)"
            ),
            (true, false) => format!("subject key {id}: its salt has no commitment"),
            (false, _) => format!(
                "subject key {id}: its salt is gone, but no ERASE event records its erasure"
            ),
        });
    }
}

/// Recomputes the hash of every event in `block` from its stored fields.
fn block_events(
    client: &pgrx::spi::SpiClient<'_>,
    block: &Block,
    key_ids: &mut KeyIds,
    problems: &mut Problems,
) -> Vec<[u8; 32]> {
    let mut leaves = Vec::with_capacity(block.event_count.max(0) as usize);
    let mut cursor = client.open_cursor(
        &format!(
            "SELECT e.event_id, e.at, e.txid, {LABEL_COLUMNS}, CASE WHEN e.title OPERATOR(pg_catalog.<>) '' THEN e.title END, e.subject_key_id, e.context_id, \
             e.nonce, e.payload, e.row_hash, k.subject_digest, l.label_id \
             FROM subject_audit.event e \
             LEFT JOIN subject_audit.event_label l ON l.label_id OPERATOR(pg_catalog.=) e.label_id \
             LEFT JOIN subject_audit.subject_key k ON k.subject_key_id OPERATOR(pg_catalog.=) e.subject_key_id \
             WHERE e.txid OPERATOR(pg_catalog.>=) $1 AND e.txid OPERATOR(pg_catalog.<) $2 ORDER BY e.event_id"
        ),
        &[block.from_txid.into(), block.to_txid.into()],
    );
    loop {
        let chunk = cursor.fetch(FETCH).unwrap_or_else(|e| spi_error(e));
        if chunk.is_empty() {
            break;
        }
        for row in chunk {
            let bytes = |i: usize| row.get::<Vec<u8>>(i).ok().flatten();
            let event_id: i64 = row.get(1).ok().flatten().unwrap_or_default();
            let at: Option<TimestampWithTimeZone> = row.get(2).ok().flatten();
            let title: Option<String> = row.get(14).ok().flatten();
            let (nonce, payload, subject_digest) = (bytes(17), bytes(18), bytes(20));
            let (subject_key_id, context_id) =
                (row.get(15).ok().flatten(), row.get(16).ok().flatten());
            key_ids.note(subject_key_id, context_id);
            let hash = StoredLabel::read(&row, 4).with_fields(|label| {
                integrity::row_hash(&EventFields {
                    event_id,
                    at: at.map_or(0, |t| t.into_inner()),
                    txid: row.get::<i64>(3).ok().flatten().unwrap_or_default() as u64,
                    label,
                    title: title.as_deref(),
                    subject_key_id,
                    subject_digest: subject_digest.as_deref(),
                    context_id,
                    nonce: nonce.as_deref(),
                    payload: payload.as_deref(),
                })
            });
            if row.get::<i32>(21).ok().flatten().is_none() {
                problems.push(format!("event {event_id}: its label is missing"));
            } else if bytes(19).as_deref() != Some(&hash[..]) {
                problems.push(format!(
                    "event {event_id}: altered (its stored fields do not match its hash)"
                ));
            }
            leaves.push(hash);
        }
    }
    leaves
}
