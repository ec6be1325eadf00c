//! Per-event hashes for the tamper-evident ledger. Each event's hash covers
//! every stored field, its label's included, and is computed at insert from
//! the event alone: no other event is read, so writers never wait on each other.

use crate::crypto::{sha256, Sha256Stream};

/// What an event says about itself apart from its subject, title and
/// payload: a row of `subject_audit.event_label`, shared by many events.
#[derive(Clone, Copy, Debug)]
pub struct LabelFields<'a> {
    pub operation: &'a str,
    pub status: &'a str,
    pub sqlstate: Option<&'a str>,
    pub table_name: Option<&'a str>,
    pub actor: &'a str,
    pub db_role: &'a str,
    pub session_role: &'a str,
    pub application_name: Option<&'a str>,
    pub client_addr: Option<&'a str>,
    pub changed_columns: Option<&'a [&'a str]>,
}

/// The fields of one event as the ledger hashes them: its label's fields,
/// not the label's id, so a label altered or swapped is caught in every
/// event that names it.
pub struct EventFields<'a> {
    pub event_id: i64,
    /// Microseconds since 2000-01-01 UTC (PostgreSQL's timestamptz).
    pub at: i64,
    pub txid: u64,
    pub label: &'a LabelFields<'a>,
    pub title: Option<&'a str>,
    pub subject_key_id: Option<i64>,
    /// The keyed digest of that subject key (kept in `subject_key`): covering
    /// it means a subject key re-labelled as someone else's is caught.
    pub subject_digest: Option<&'a [u8]>,
    pub context_id: Option<i64>,
    pub nonce: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// SHA-256 over an unambiguous encoding: every field is tagged present or
/// NULL and length-prefixed, so no two different rows encode alike.
pub fn row_hash(f: &EventFields<'_>) -> [u8; 32] {
    let mut buf = Vec::with_capacity(256 + f.payload.map_or(0, <[u8]>::len));
    buf.extend_from_slice(b"pg_subject_audit event v1");
    buf.extend_from_slice(&f.event_id.to_be_bytes());
    buf.extend_from_slice(&f.at.to_be_bytes());
    buf.extend_from_slice(&f.txid.to_be_bytes());
    put_label(&mut buf, f.label);
    put_opt(&mut buf, f.title.map(str::as_bytes));
    put_opt(
        &mut buf,
        f.subject_key_id
            .map(i64::to_be_bytes)
            .as_ref()
            .map(|b| &b[..]),
    );
    put_opt(&mut buf, f.subject_digest);
    put_opt(
        &mut buf,
        f.context_id.map(i64::to_be_bytes).as_ref().map(|b| &b[..]),
    );
    put_opt(&mut buf, f.nonce);
    put_opt(&mut buf, f.payload);
    sha256(&[&buf])
}

/// The key a label is looked up by (`event_label.label_digest`).
pub fn label_digest(label: &LabelFields<'_>) -> [u8; 32] {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"pg_subject_audit label v1");
    put_label(&mut buf, label);
    sha256(&[&buf])
}

fn put_label(buf: &mut Vec<u8>, l: &LabelFields<'_>) {
    for s in [
        Some(l.operation),
        Some(l.status),
        l.sqlstate,
        l.table_name,
        Some(l.actor),
        Some(l.db_role),
        Some(l.session_role),
        l.application_name,
        l.client_addr,
    ] {
        put_opt(buf, s.map(str::as_bytes));
    }
    match l.changed_columns {
        None => buf.push(0),
        Some(cols) => {
            buf.push(1);
            buf.extend_from_slice(&(cols.len() as u32).to_be_bytes());
            for c in cols {
                put_opt(buf, Some(c.as_bytes()));
            }
        }
    }
}

fn put_opt(buf: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => buf.push(0),
        Some(bytes) => {
            buf.push(1);
            buf.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            buf.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_label() -> LabelFields<'static> {
        LabelFields {
            operation: "UPDATE",
            status: "ok",
            sqlstate: None,
            table_name: Some("public.customers"),
            actor: "app",
            db_role: "app",
            session_role: "app",
            application_name: Some("psql"),
            client_addr: None,
            changed_columns: Some(&["email"]),
        }
    }

    fn base<'a>(label: &'a LabelFields<'a>) -> EventFields<'a> {
        EventFields {
            event_id: 1,
            at: 0,
            txid: 700,
            label,
            title: None,
            subject_key_id: Some(1),
            subject_digest: Some(&[3; 32]),
            context_id: Some(1),
            nonce: Some(&[0; 12]),
            payload: Some(b"ct"),
        }
    }

    type LabelChange = Box<dyn Fn(&mut LabelFields<'static>)>;

    fn label_changes() -> Vec<LabelChange> {
        vec![
            Box::new(|l| l.operation = "DELETE"),
            Box::new(|l| l.status = "error"),
            Box::new(|l| l.sqlstate = Some("23505")),
            Box::new(|l| l.table_name = None),
            Box::new(|l| l.actor = "bob"),
            Box::new(|l| l.db_role = "bob"),
            Box::new(|l| l.session_role = "bob"),
            Box::new(|l| l.application_name = None),
            Box::new(|l| l.client_addr = Some("127.0.0.1")),
            Box::new(|l| l.changed_columns = Some(&["phone"])),
            Box::new(|l| l.changed_columns = None),
        ]
    }

    #[test]
    fn every_field_changes_the_hash() {
        let label = base_label();
        let h = row_hash(&base(&label));
        type Change = Box<dyn Fn(&mut EventFields<'_>)>;
        let variants: Vec<Change> = vec![
            Box::new(|f| f.event_id = 2),
            Box::new(|f| f.at = 1),
            Box::new(|f| f.txid = 701),
            Box::new(|f| f.title = Some("x")),
            Box::new(|f| f.subject_key_id = Some(2)),
            Box::new(|f| f.subject_digest = Some(&[4; 32])),
            Box::new(|f| f.context_id = None),
            Box::new(|f| f.nonce = Some(&[1; 12])),
            Box::new(|f| f.payload = Some(b"cu")),
        ];
        for change in variants {
            let mut f = base(&label);
            change(&mut f);
            assert_ne!(row_hash(&f), h);
        }
        for change in label_changes() {
            let mut other = base_label();
            change(&mut other);
            assert_ne!(row_hash(&base(&other)), h);
        }
        assert_eq!(row_hash(&base(&label)), h);
    }

    #[test]
    fn every_label_field_changes_the_label_digest() {
        let d = label_digest(&base_label());
        for change in label_changes() {
            let mut other = base_label();
            change(&mut other);
            assert_ne!(label_digest(&other), d);
        }
        assert_eq!(label_digest(&base_label()), d);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let (mut a, mut b) = (base_label(), base_label());
        (a.actor, a.db_role) = ("ab", "c");
        (b.actor, b.db_role) = ("a", "bc");
        assert_ne!(row_hash(&base(&a)), row_hash(&base(&b)));
        assert_ne!(label_digest(&a), label_digest(&b));
    }
}

/// Merkle root over a block's event hashes, in event order (RFC 6962 style:
/// leaves and nodes are domain-separated, an odd node is promoted).
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.is_empty() {
        return sha256(&[b"pg_subject_audit empty"]);
    }
    let mut level: Vec<[u8; 32]> = leaves.iter().map(|l| sha256(&[&[0u8], l])).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => sha256(&[&[1u8], l, r]),
                [single] => *single,
                _ => unreachable!(),
            })
            .collect();
    }
    level[0]
}

/// What a block commits to: its place in the chain, the transactions it
/// covers, its events, the key material they use, and the block before it.
pub struct BlockFields<'a> {
    pub block_id: i64,
    pub from_txid: i64,
    pub to_txid: i64,
    pub event_count: i64,
    pub merkle_root: &'a [u8],
    pub previous_hash: &'a [u8],
    /// None in blocks sealed before blocks committed to key material.
    pub key_material: Option<KeyMaterial<'a>>,
}

/// The digests (`KeyRowsDigest`) of the subject keys and of the writer
/// contexts a block's events name.
#[derive(Clone, Copy)]
pub struct KeyMaterial<'a> {
    pub subject_keys: &'a [u8],
    pub writer_contexts: &'a [u8],
}

pub fn block_hash(b: &BlockFields<'_>) -> [u8; 32] {
    let mut h = Sha256Stream::default();
    // v1 blocks keep their encoding, so a ledger sealed before still verifies.
    h.update(match b.key_material {
        None => b"pg_subject_audit block v1",
        Some(_) => b"pg_subject_audit block v2",
    });
    for part in [
        &b.block_id.to_be_bytes()[..],
        &b.from_txid.to_be_bytes(),
        &b.to_txid.to_be_bytes(),
        &b.event_count.to_be_bytes(),
        &(b.merkle_root.len() as u32).to_be_bytes(),
        b.merkle_root,
        &(b.previous_hash.len() as u32).to_be_bytes(),
        b.previous_hash,
    ] {
        h.update(part);
    }
    if let Some(k) = b.key_material {
        for digest in [k.subject_keys, k.writer_contexts] {
            h.update(&(digest.len() as u32).to_be_bytes());
            h.update(digest);
        }
    }
    h.finish()
}

/// A digest over rows of `subject_key` (id, subject digest, salt
/// commitment: never the salt, which erasure deletes) or of
/// `writer_context` (id, writer key id, encapsulated key), fed in id order.
/// Row hashes cover only a key's id and digest: this is what makes a salt
/// or an encapsulated key replaced after sealing show.
pub struct KeyRowsDigest(Sha256Stream);

impl KeyRowsDigest {
    pub fn subject_keys() -> Self {
        Self::new(b"pg_subject_audit subject keys v1")
    }

    pub fn writer_contexts() -> Self {
        Self::new(b"pg_subject_audit writer contexts v1")
    }

    fn new(domain: &[u8]) -> Self {
        let mut h = Sha256Stream::default();
        h.update(domain);
        KeyRowsDigest(h)
    }

    /// One row named by the block's events; `None`: the row is missing.
    pub fn add(&mut self, id: i64, row: Option<&[Option<&[u8]>]>) {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&id.to_be_bytes());
        match row {
            None => buf.push(0),
            Some(fields) => {
                buf.push(1);
                buf.extend_from_slice(&(fields.len() as u32).to_be_bytes());
                for f in fields {
                    put_opt(&mut buf, *f);
                }
            }
        }
        self.0.update(&buf);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finish()
    }
}

/// The `previous_hash` of the first block.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// `psa1:<block_id>:<block hash in hex>`, short enough to keep anywhere.
pub fn format_checkpoint(block_id: i64, hash: &[u8]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("psa1:{block_id}:{hex}")
}

/// Reads what `format_checkpoint` wrote (surrounding whitespace and the case
/// of the hex digits aside); anything else is `None`.
pub fn parse_checkpoint(text: &str) -> Option<(i64, Vec<u8>)> {
    let mut parts = text.trim().split(':');
    if parts.next()? != "psa1" {
        return None;
    }
    let id = parts.next()?;
    let block_id: i64 = id.parse().ok()?;
    // `parse` also takes "+7" and "007": not what a checkpoint holds.
    if block_id.to_string() != id {
        return None;
    }
    let hex = parts.next()?;
    // Only ASCII hex digits: slicing multi-byte text would panic, and
    // `from_str_radix` would take a "+" sign.
    if parts.next().is_some() || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Option<Vec<_>>>()?;
    Some((block_id, bytes))
}

#[cfg(test)]
mod ledger_tests {
    use super::*;

    #[test]
    fn merkle_root_depends_on_every_leaf_and_its_place() {
        let leaves: Vec<[u8; 32]> = (0..5u8).map(|i| [i; 32]).collect();
        let root = merkle_root(&leaves);
        for i in 0..leaves.len() {
            let mut changed = leaves.clone();
            changed[i][0] ^= 1;
            assert_ne!(merkle_root(&changed), root, "leaf {i}");
        }
        let mut swapped = leaves.clone();
        swapped.swap(1, 2);
        assert_ne!(merkle_root(&swapped), root);
        assert_ne!(merkle_root(&leaves[..4]), root);
        let mut extra = leaves.clone();
        extra.push([9; 32]);
        assert_ne!(merkle_root(&extra), root);
        // A leaf is not confusable with an inner node.
        let inner = sha256(&[
            &[1u8],
            &sha256(&[&[0u8], &leaves[0]]),
            &sha256(&[&[0u8], &leaves[1]]),
        ]);
        assert_ne!(merkle_root(&[inner]), merkle_root(&leaves[..2]));
        assert_eq!(merkle_root(&leaves), root);
    }

    #[test]
    fn block_hash_chains() {
        let root = merkle_root(&[[1; 32]]);
        let b = |id, prev: &[u8]| {
            block_hash(&BlockFields {
                block_id: id,
                from_txid: 0,
                to_txid: 10,
                event_count: 1,
                merkle_root: &root,
                previous_hash: prev,
                key_material: None,
            })
        };
        assert_ne!(b(1, &GENESIS), b(2, &GENESIS));
        assert_ne!(b(1, &GENESIS), b(1, &[1; 32]));
    }

    #[test]
    fn block_hash_covers_key_material() {
        let root = merkle_root(&[[1; 32]]);
        let b = |key_material| {
            block_hash(&BlockFields {
                block_id: 1,
                from_txid: 0,
                to_txid: 10,
                event_count: 1,
                merkle_root: &root,
                previous_hash: &GENESIS,
                key_material,
            })
        };
        let k = |subject_keys, writer_contexts| {
            Some(KeyMaterial {
                subject_keys,
                writer_contexts,
            })
        };
        let h = b(k(&[1; 32], &[2; 32]));
        assert_ne!(h, b(None));
        assert_ne!(h, b(k(&[3; 32], &[2; 32])));
        assert_ne!(h, b(k(&[1; 32], &[3; 32])));
        assert_ne!(h, b(k(&[2; 32], &[1; 32])));
        assert_eq!(h, b(k(&[1; 32], &[2; 32])));
    }

    #[test]
    fn key_rows_digest_covers_every_row_and_field() {
        type Row = (i64, Option<Vec<Option<Vec<u8>>>>);
        let digest = |rows: &[Row]| {
            let mut d = KeyRowsDigest::subject_keys();
            for (id, row) in rows {
                let fields: Option<Vec<Option<&[u8]>>> = row
                    .as_ref()
                    .map(|r| r.iter().map(|f| f.as_deref()).collect());
                d.add(*id, fields.as_deref());
            }
            d.finish()
        };
        let row = |digest: u8, commitment: Option<u8>| {
            Some(vec![
                Some(vec![digest; 32]),
                commitment.map(|c| vec![c; 32]),
            ])
        };
        let base: Vec<Row> = vec![(1, row(1, Some(7))), (2, row(2, Some(8)))];
        let h = digest(&base);
        let variants: Vec<Vec<Row>> = vec![
            vec![(1, row(1, Some(8))), (2, row(2, Some(7)))],
            vec![(1, row(1, None)), (2, row(2, Some(8)))],
            vec![(1, row(3, Some(7))), (2, row(2, Some(8)))],
            vec![(1, None), (2, row(2, Some(8)))],
            vec![(1, row(1, Some(7))), (3, row(2, Some(8)))],
            vec![(1, row(1, Some(7)))],
        ];
        for v in variants {
            assert_ne!(digest(&v), h);
        }
        assert_eq!(digest(&base), h);
        let mut contexts = KeyRowsDigest::writer_contexts();
        contexts.add(
            1,
            row(1, Some(7))
                .as_ref()
                .map(|r| r.iter().map(|f| f.as_deref()).collect::<Vec<_>>())
                .as_deref(),
        );
        assert_ne!(contexts.finish(), digest(&base[..1]));
    }

    #[test]
    fn checkpoints_round_trip() {
        let text = format_checkpoint(42, &[0xab; 32]);
        assert_eq!(parse_checkpoint(&text), Some((42, vec![0xab; 32])));
        assert_eq!(parse_checkpoint(" psa1:1:00 "), None);
        assert_eq!(parse_checkpoint("psa2:1:"), None);
        assert_eq!(parse_checkpoint(&format!("{text}:x")), None);
        assert_eq!(parse_checkpoint(&text.replace("ab", "zz")), None);
    }

    #[test]
    fn checkpoints_refuse_what_format_never_writes() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_checkpoint(&format!(" psa1:7:{} \n", hex.to_uppercase())),
            Some((7, vec![0xab; 32]))
        );
        // Found by fuzz_parse_checkpoint: a multi-byte character panicked
        // (slicing inside it), "+f" read as 0x0f, "+7" and "07" as block 7.
        for text in [
            format!("psa1:7:a\u{e9}{}", &hex[3..]),
            format!("psa1:7:+f{}", &hex[2..]),
            format!("psa1:+7:{hex}"),
            format!("psa1:07:{hex}"),
            format!("psa1:-0:{hex}"),
        ] {
            assert_eq!(parse_checkpoint(&text), None, "{text}");
        }
    }

    // Fuzz / property tests (`cargo test --lib fuzz_`; see `crate::test_support`).

    use crate::test_support::{fuzz, no_panic, Rng};

    const CHECKPOINT_CHARS: &[char] = &[
        'p', 's', 'a', '1', ':', ':', '0', '7', '9', 'a', 'b', 'f', 'A', 'F', 'g', '+', '-', ' ',
        '\u{e9}', '\u{2028}',
    ];

    fn random_checkpoint(rng: &mut Rng) -> (i64, Vec<u8>, String) {
        let id = match rng.below(3) {
            0 => rng.range(0, 100) as i64,
            1 => *rng.pick(&[0, -1, i64::MAX, i64::MIN]),
            _ => rng.next_u64() as i64,
        };
        let hash = rng.bytes(32);
        let text = format_checkpoint(id, &hash);
        (id, hash, text)
    }

    fn check_parse(text: &str) -> Option<(i64, Vec<u8>)> {
        let parsed = no_panic(&text, || parse_checkpoint(text));
        if let Some((id, hash)) = &parsed {
            assert_eq!(hash.len(), 32, "{text:?}");
            let formatted = format_checkpoint(*id, hash);
            assert!(
                formatted.eq_ignore_ascii_case(text.trim()),
                "accepted {text:?} as {formatted:?}"
            );
        }
        parsed
    }

    #[test]
    fn fuzz_parse_checkpoint() {
        fuzz("parse_checkpoint", 20_000, |rng| {
            let (id, hash, mut text) = random_checkpoint(rng);
            if rng.one_in(8) {
                // Valid, in another case and with whitespace around.
                if rng.coin() {
                    text = text.to_uppercase().replacen("PSA1", "psa1", 1);
                }
                let text = format!(
                    "{}{text}{}",
                    rng.pick(&["", " ", "\t\n"]),
                    rng.pick(&["", " "])
                );
                assert_eq!(check_parse(&text), Some((id, hash)));
                return;
            }
            match rng.below(3) {
                0 => {
                    // Random text made of what a checkpoint is made of.
                    text = format!("psa1:{}", rng.text(80, CHECKPOINT_CHARS));
                }
                1 => {
                    // A splice: a valid prefix, then random characters.
                    let cut = rng.range(0, text.len());
                    text.truncate(cut);
                    text.push_str(&rng.text(70, CHECKPOINT_CHARS));
                }
                _ => {}
            }
            for _ in 0..rng.range(if text.starts_with("psa1:") { 0 } else { 1 }, 3) {
                rng.mutate_text(&mut text, CHECKPOINT_CHARS);
            }
            let _ = check_parse(&text);
        });
    }
}

/// The ledger's cost per event on the write path, measured rather than guessed:
/// `cargo test --release --lib hashing_cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore]
    fn hashing_cost() {
        let payload = [7u8; 200];
        let columns = ["email", "updated_at"];
        let n = 200_000u32;
        let start = std::time::Instant::now();
        for i in 0..n {
            let label = LabelFields {
                operation: "UPDATE",
                status: "ok",
                sqlstate: None,
                table_name: Some("public.customers"),
                actor: "support:alice",
                db_role: "app",
                session_role: "app",
                application_name: Some("pgbench"),
                client_addr: None,
                changed_columns: Some(&columns),
            };
            let fields = EventFields {
                event_id: i64::from(i),
                at: 0,
                txid: 1,
                label: &label,
                title: None,
                subject_key_id: Some(42),
                subject_digest: Some(&[3; 32]),
                context_id: Some(1),
                nonce: Some(&[0; 12]),
                payload: Some(&payload),
            };
            std::hint::black_box(row_hash(&fields));
        }
        eprintln!("row_hash: {:?} per event", start.elapsed() / n);
    }
}
