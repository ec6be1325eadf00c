-- pg_subject_audit: storage. Nothing here holds personal plaintext: payloads
-- are AES-256-GCM ciphertext, subjects are keyed digests.

-- One row: the secret that keys subject digests (HMAC-SHA256). Readable only
-- by the extension owner; the extension's functions use it on the caller's behalf.
-- Created (from the OS random source) on first use, not here: pg_restore
-- brings the original one back into a fresh CREATE EXTENSION.
CREATE TABLE subject_audit.installation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    subject_secret bytea NOT NULL CHECK (length(subject_secret) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Reader public keys (X25519). The active writer key is the newest one not retired.
CREATE SEQUENCE subject_audit.writer_key_key_id_seq AS integer;
CREATE TABLE subject_audit.writer_key (
    key_id integer PRIMARY KEY DEFAULT nextval('subject_audit.writer_key_key_id_seq'),
    public_key bytea NOT NULL UNIQUE CHECK (length(public_key) = 32),
    installed_at timestamptz NOT NULL DEFAULT now(),
    installed_by name NOT NULL DEFAULT session_user,
    retired_at timestamptz
);

-- One HPKE sender context per writing backend: its encapsulated key is all a
-- reader needs, with the private key, to derive that backend's data keys.
-- key_id names a writer_key row, but without a foreign key: these tables are
-- dumped as extension configuration, and pg_restore -j loads their data in
-- parallel, in any order (only the extension writes them, and never deletes).
CREATE SEQUENCE subject_audit.writer_context_context_id_seq AS bigint;
CREATE TABLE subject_audit.writer_context (
    context_id bigint PRIMARY KEY DEFAULT nextval('subject_audit.writer_context_context_id_seq'),
    key_id integer NOT NULL,
    encapsulated_key bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Per-subject random salts: the HPKE exporter context of each subject's data
-- key. Erasing a subject deletes its salt (crypto-shredding); a later event
-- for the same token starts a new subject key.
CREATE SEQUENCE subject_audit.subject_key_subject_key_id_seq AS bigint;
CREATE TABLE subject_audit.subject_key (
    subject_key_id bigint PRIMARY KEY DEFAULT nextval('subject_audit.subject_key_subject_key_id_seq'),
    subject_digest bytea NOT NULL,
    salt bytea CHECK (length(salt) = 32),
    erased_at timestamptz,
    CHECK ((salt IS NULL) = (erased_at IS NOT NULL))
);
-- One index serves every lookup: a subject's live key (erased_at NULL, at most
-- one: NULLS NOT DISTINCT) and all its keys (the digest prefix).
CREATE UNIQUE INDEX subject_key_digest ON subject_audit.subject_key (subject_digest, erased_at) NULLS NOT DISTINCT;

-- tracked_as: the table's quoted schema.name when track() last ran; a name
-- it no longer goes by is a problem `tracked` shows (see finalize.sql).
CREATE TABLE subject_audit.tracked_table (
    relid regclass PRIMARY KEY,
    subject_attnum smallint NOT NULL,
    exclude_attnums smallint[] NOT NULL DEFAULT '{}',
    since timestamptz NOT NULL DEFAULT now(),
    tracked_as text NOT NULL
);

CREATE SEQUENCE subject_audit.event_event_id_seq AS bigint;

-- What events say about themselves, apart from their subject, title and
-- payload: the same few combinations of operation, table, who and which
-- columns recur in millions of events, so each event names one by id (they
-- were a third of an event's bytes). Rows are looked up by the digest of their
-- fields and never change; two backends may add the same label at once
-- (harmless: events hash the label's fields, not its id).
CREATE SEQUENCE subject_audit.event_label_label_id_seq AS integer;
CREATE TABLE subject_audit.event_label (
    label_id integer PRIMARY KEY DEFAULT nextval('subject_audit.event_label_label_id_seq'),
    label_digest bytea NOT NULL,
    operation text NOT NULL,
    status text NOT NULL,
    sqlstate text,
    table_name text,
    actor text NOT NULL,
    db_role text NOT NULL,
    session_role text NOT NULL,
    application_name text,
    client_addr inet,
    changed_columns text[]
);
CREATE INDEX event_label_digest ON subject_audit.event_label (label_digest);

-- One row per event. Column order matters: capture writes tuples directly
-- (fixed-width columns first, so no alignment padding).
CREATE TABLE subject_audit.event (
    event_id bigint PRIMARY KEY DEFAULT nextval('subject_audit.event_event_id_seq'),
    at timestamptz NOT NULL,
    txid bigint NOT NULL,           -- top-level transaction id (epoch-extended)
    subject_key_id bigint,
    context_id bigint,
    label_id integer NOT NULL,      -- subject_audit.event_label
    -- Empty: the default, operation and table. Not NULL, so that a captured
    -- change, which has no NULL column, needs no null bitmap (7 bytes).
    title text NOT NULL,
    nonce bytea,
    payload bytea,
    row_hash bytea NOT NULL
);
ALTER SEQUENCE subject_audit.event_event_id_seq OWNED BY subject_audit.event.event_id;
ALTER SEQUENCE subject_audit.event_label_label_id_seq OWNED BY subject_audit.event_label.label_id;
ALTER SEQUENCE subject_audit.writer_key_key_id_seq OWNED BY subject_audit.writer_key.key_id;
ALTER SEQUENCE subject_audit.writer_context_context_id_seq OWNED BY subject_audit.writer_context.context_id;
ALTER SEQUENCE subject_audit.subject_key_subject_key_id_seq OWNED BY subject_audit.subject_key.subject_key_id;
-- Deduplicated (the default): a subject's events share one posting list,
-- a third less index than without, and no slower to write as measured by
-- bench/ (databases growing from empty, both ways, alternately).
CREATE INDEX event_subject ON subject_audit.event (subject_key_id);

-- Sealing reads events by transaction id range; events arrive in roughly that
-- order, so a BRIN index is enough and costs writers almost nothing.
CREATE INDEX event_txid ON subject_audit.event USING brin (txid) WITH (pages_per_range = 32);

-- The ledger: block n covers every event with from_txid <= txid < to_txid,
-- where to_txid was the sealing snapshot's xmin (all older transactions had
-- finished). merkle_root covers those events' row_hash in event_id order;
-- block_hash covers the block's fields and the previous block's hash.
CREATE TABLE subject_audit.block (
    block_id bigint PRIMARY KEY,
    from_txid bigint NOT NULL,
    to_txid bigint NOT NULL,
    event_count bigint NOT NULL,
    first_event_id bigint,
    last_event_id bigint,
    merkle_root bytea NOT NULL,
    previous_hash bytea NOT NULL,
    block_hash bytea NOT NULL,
    sealed_at timestamptz NOT NULL DEFAULT now()
);

-- Append-only, for every role including the owner: events and blocks are
-- never updated or deleted (erasure deletes salts, not events).
CREATE FUNCTION subject_audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    RAISE EXCEPTION 'subject_audit.% is append-only', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit events and ledger blocks are never updated or deleted.';
END
$$;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON subject_audit.event
    FOR EACH STATEMENT EXECUTE FUNCTION subject_audit.refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON subject_audit.block
    FOR EACH STATEMENT EXECUTE FUNCTION subject_audit.refuse_change();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON subject_audit.event_label
    FOR EACH STATEMENT EXECUTE FUNCTION subject_audit.refuse_change();

-- Reporting without a key: metadata only. subject_ref is a short pseudonym
-- (the first 48 bits of the keyed digest), not the token.
CREATE VIEW subject_audit.events AS
SELECT e.event_id,
       e.at,
       l.table_name,
       l.operation,
       coalesce(nullif(e.title, ''), lower(l.operation) || ' ' || l.table_name) AS title,
       l.status,
       l.sqlstate,
       l.actor,
       l.changed_columns,
       substr(encode(k.subject_digest, 'hex'), 1, 12) AS subject_ref
FROM subject_audit.event e
LEFT JOIN subject_audit.event_label l USING (label_id)
LEFT JOIN subject_audit.subject_key k USING (subject_key_id);

-- Reporting without a key: events per day (in the session's time zone),
-- table, operation and status, and how many distinct subjects they touched.
CREATE VIEW subject_audit.activity AS
SELECT e.at::date AS day,
       l.table_name,
       l.operation,
       l.status,
       count(*) AS events,
       count(DISTINCT e.subject_key_id) AS subjects
FROM subject_audit.event e
LEFT JOIN subject_audit.event_label l USING (label_id)
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4;

SELECT pg_catalog.pg_extension_config_dump('subject_audit.installation', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.writer_key', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.writer_context', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.subject_key', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.tracked_table', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.event', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.event_label', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.block', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.event_event_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.event_label_label_id_seq', '');
-- Plain sequences rather than identity columns: only an extension's own
-- sequences can be dumped, and the restored ids must continue, not restart.
SELECT pg_catalog.pg_extension_config_dump('subject_audit.writer_key_key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.writer_context_context_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('subject_audit.subject_key_subject_key_id_seq', '');
