-- pg_subject_audit: storage. Nothing here holds personal plaintext: payloads
-- are AES-256-GCM ciphertext, subjects are keyed digests.
-- Functions and operators are schema-qualified, as in every query of the
-- extension: names here are resolved once, as this script runs, and no object
-- of another schema on the script's path may stand in for a built-in.

-- The schema must be the extension's own. CREATE EXTENSION takes one that
-- exists already: created beforehand by a role that is no superuser (say the
-- database's owner), its owner could add functions to it (an unlock(text)
-- that a caller's literal key would reach before ours) and grant them to all.
DO $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n
            JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
            WHERE n.nspname OPERATOR(pg_catalog.=) 'subject_audit') THEN
        RAISE EXCEPTION 'schema subject_audit exists and is owned by a role that is not a superuser'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Drop it, or make a superuser its owner, before CREATE EXTENSION pg_subject_audit.';
    END IF;
END
$$;

-- One row: the secret that keys subject digests (HMAC-SHA256). Readable only
-- by the extension owner; the extension's functions use it on the caller's behalf.
-- Created (from the OS random source) on first use, not here: pg_restore
-- brings the original one back into a fresh CREATE EXTENSION.
CREATE TABLE subject_audit.installation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    subject_secret bytea NOT NULL CHECK (pg_catalog.length(subject_secret) OPERATOR(pg_catalog.=) 32),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Reader public keys (X25519). The active writer key is the newest one not retired.
CREATE SEQUENCE subject_audit.writer_key_key_id_seq AS integer;
CREATE TABLE subject_audit.writer_key (
    key_id integer PRIMARY KEY DEFAULT pg_catalog.nextval('subject_audit.writer_key_key_id_seq'::pg_catalog.regclass),
    public_key bytea NOT NULL UNIQUE CHECK (pg_catalog.length(public_key) OPERATOR(pg_catalog.=) 32),
    installed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
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
    context_id bigint PRIMARY KEY DEFAULT pg_catalog.nextval('subject_audit.writer_context_context_id_seq'::pg_catalog.regclass),
    key_id integer NOT NULL,
    encapsulated_key bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Per-subject random salts: the HPKE exporter context of each subject's data
-- key. Erasing a subject deletes its salt (crypto-shredding); a later event
-- for the same token starts a new subject key. salt_hash, the SHA-256 of the
-- salt (32 random bytes: it reveals nothing), is set with it and kept when
-- it is erased: ledger blocks commit to it, and verify() checks salts against it.
CREATE SEQUENCE subject_audit.subject_key_subject_key_id_seq AS bigint;
CREATE TABLE subject_audit.subject_key (
    subject_key_id bigint PRIMARY KEY DEFAULT pg_catalog.nextval('subject_audit.subject_key_subject_key_id_seq'::pg_catalog.regclass),
    subject_digest bytea NOT NULL,
    salt bytea CHECK (pg_catalog.length(salt) OPERATOR(pg_catalog.=) 32),
    salt_hash bytea CHECK (pg_catalog.length(salt_hash) OPERATOR(pg_catalog.=) 32),
    erased_at timestamptz,
    CHECK ((salt IS NULL) OPERATOR(pg_catalog.=) (erased_at IS NOT NULL))
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
    since timestamptz NOT NULL DEFAULT pg_catalog.now(),
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
    label_id integer PRIMARY KEY DEFAULT pg_catalog.nextval('subject_audit.event_label_label_id_seq'::pg_catalog.regclass),
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
    event_id bigint PRIMARY KEY DEFAULT pg_catalog.nextval('subject_audit.event_event_id_seq'::pg_catalog.regclass),
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
-- subject_keys_digest and writer_contexts_digest cover the subject_key rows
-- (id, digest, salt_hash) and writer_context rows (id, key_id,
-- encapsulated_key) its events name, as they were at sealing; NULL in blocks
-- sealed before blocks had them.
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
    subject_keys_digest bytea,
    writer_contexts_digest bytea,
    sealed_at timestamptz NOT NULL DEFAULT pg_catalog.now()
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
-- (the first 48 bits of the keyed digest), not the token. actor is whatever
-- the session set; db_role, the role that ran the statement, shows it beside.
CREATE VIEW subject_audit.events AS
SELECT e.event_id,
       e.at,
       l.table_name,
       l.operation,
       CASE WHEN e.title OPERATOR(pg_catalog.<>) '' THEN e.title
            ELSE pg_catalog.lower(l.operation) OPERATOR(pg_catalog.||) ' ' OPERATOR(pg_catalog.||) l.table_name END AS title,
       l.status,
       l.sqlstate,
       l.actor,
       l.changed_columns,
       pg_catalog.substr(pg_catalog.encode(k.subject_digest, 'hex'), 1, 12) AS subject_ref,
       l.db_role
FROM subject_audit.event e
LEFT JOIN subject_audit.event_label l ON l.label_id OPERATOR(pg_catalog.=) e.label_id
LEFT JOIN subject_audit.subject_key k ON k.subject_key_id OPERATOR(pg_catalog.=) e.subject_key_id;

-- Reporting without a key: events per day (in the session's time zone),
-- table, operation and status, and how many distinct subjects they touched.
CREATE VIEW subject_audit.activity AS
SELECT e.at::pg_catalog.date AS day,
       l.table_name,
       l.operation,
       l.status,
       pg_catalog.count(*) AS events,
       pg_catalog.count(DISTINCT e.subject_key_id) AS subjects
FROM subject_audit.event e
LEFT JOIN subject_audit.event_label l ON l.label_id OPERATOR(pg_catalog.=) e.label_id
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
