-- Who looked: reads of the trail are events in it, across sessions; the
-- application records its own accesses; the export document; reporting
-- views without a key; reads in a read-only or rolled-back transaction and on
-- a standby.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
-- A test fixture, so the part on the standby (a new psql) can unlock too.
CREATE TABLE test_key AS SELECT :'sk' AS sk;
CREATE TABLE patients (id int PRIMARY KEY, ref text, email text, notes jsonb);
SELECT subject_audit.track('patients', 'ref');
CREATE ROLE clinic_app LOGIN;
GRANT ALL ON patients TO clinic_app;
SELECT subject_audit.grant_writer('clinic_app');
SET ROLE clinic_app;
INSERT INTO patients VALUES (1, 'p-1', 'ann@example.com', '{"allergy": "none"}'),
                            (2, 'p-2', 'bob@example.com', NULL);
BEGIN;
SET LOCAL subject_audit.reason = 'moved house';
UPDATE patients SET email = 'ann@new.example' WHERE id = 1;
COMMIT;
-- The application records its own retrieval of a profile, without any key.
BEGIN;
SET LOCAL subject_audit.actor = 'nurse:carol';
SET LOCAL subject_audit.reason = 'appointment';
SELECT subject_audit.record_access('p-1', 'opened patient record', 'front desk screen') > 0 AS recorded;
COMMIT;
-- Refused: an empty title; and it needs a read-write transaction.
SELECT subject_audit.record_access('p-1', ' ');
BEGIN READ ONLY;
SELECT subject_audit.record_access('p-1', 'opened patient record');
ROLLBACK;
RESET ROLE;

-- Session 1: a support agent reads Ann's trail and opens one event.
\set reader 'dbname=' :DBNAME ' options=-csubject_audit.session_key=' :sk
\c :reader
BEGIN;
SET LOCAL subject_audit.actor = 'support:dave';
SET LOCAL subject_audit.reason = 'ticket #77';
SELECT operation, title, status, description, actor FROM subject_audit.audit_for_subject('p-1');
SELECT max(event_id) AS ann_update FROM subject_audit.audit_for_subject('p-1') WHERE operation = 'UPDATE' \gset
SELECT * FROM subject_audit.audit_event('p-1', :ann_update);
COMMIT;
-- A read that rolls back is recorded all the same: the background writer
-- committed its event, in a transaction of its own, before the read returned.
BEGIN;
SELECT count(*) FROM subject_audit.audit_for_subject('p-1');
ROLLBACK;

-- Session 2: Ann's own view shows who looked, when and why; Bob's trail has no reads of Ann's.
\c :reader
SELECT operation, title, description, actor FROM subject_audit.audit_for_subject('p-1');
SELECT operation, title, description FROM subject_audit.audit_for_subject('p-2');

-- In a read-only transaction the read works and is recorded (by the writer).
BEGIN READ ONLY;
SELECT count(*) AS events FROM subject_audit.audit_for_subject('p-1');
SELECT count(*) AS columns FROM subject_audit.audit_event('p-1', :ann_update);
SELECT subject_audit.export_subject('p-1') -> 'event_count' AS exported;
COMMIT;
SELECT count(*) FILTER (WHERE operation = 'READ') AS reads_of_ann FROM subject_audit.audit_for_subject('p-1');
-- With subject_audit.require_recorded_reads on (superuser-only) too: the event is
-- committed before the rows return, whatever becomes of this transaction.
SET subject_audit.require_recorded_reads = on;
BEGIN READ ONLY;
SELECT count(*) FROM subject_audit.audit_for_subject('p-1');
ROLLBACK;
RESET subject_audit.require_recorded_reads;
SET ROLE clinic_app;
SET subject_audit.require_recorded_reads = off;
RESET ROLE;
-- A settings change that could not be recorded is refused before it happens.
SET default_transaction_read_only = on;
ALTER SYSTEM SET subject_audit.seal_interval = 300;
RESET default_transaction_read_only;

-- The export document: header, one object per event with its context and values.
SELECT subject_audit.export_subject('p-2') AS doc \gset
SELECT :'doc'::jsonb ->> 'format' AS format, :'doc'::jsonb -> 'format_version' AS version,
       :'doc'::jsonb -> 'subject' ->> 'token' AS token,
       length(:'doc'::jsonb -> 'subject' ->> 'subject_ref') AS ref_length,
       jsonb_array_length(:'doc'::jsonb -> 'events') = (:'doc'::jsonb ->> 'event_count')::int AS counted,
       :'doc'::jsonb ? 'generated_at' AS dated;
SELECT jsonb_pretty((:'doc'::jsonb -> 'events' -> 0) - 'at' - 'event_id' - 'transaction_id');
SELECT e ->> 'operation' AS operation, e ->> 'title' AS title, e ->> 'erased' AS erased
FROM jsonb_array_elements(:'doc'::jsonb -> 'events') e;
-- After erasure the export still lists every event, marked erased, values gone.
\c - postgres
SELECT subject_audit.forget_subject('p-2') > 0 AS erased;
\c :reader
SELECT e ->> 'operation' AS operation, e ->> 'erased' AS erased, e -> 'before' AS before, e -> 'after' AS after
FROM jsonb_array_elements(subject_audit.export_subject('p-2') -> 'events') e;

-- Reporting without a key: metadata only, no personal values.
\c - postgres
SELECT operation, title, status, actor, changed_columns, length(subject_ref) AS ref_length
FROM subject_audit.events ORDER BY event_id;
SELECT table_name, operation, status, events, subjects FROM subject_audit.activity;
SELECT count(*) AS plaintext_hits FROM subject_audit.events e
WHERE e::text ~ '(ann|bob)@|p-1|p-2|front desk|ticket #77|moved house';
-- Nor in the stored rows: access descriptions and reasons are inside the ciphertext.
SELECT count(*) AS plaintext_in_event_rows
FROM subject_audit.event e JOIN subject_audit.event_label l USING (label_id),
     (VALUES ('front desk'), ('appointment'), ('ticket #77'), ('moved house'), ('ann@')) n(needle)
WHERE e::text LIKE '%' || n.needle || '%' OR l::text LIKE '%' || n.needle || '%'
   OR position(convert_to(n.needle, 'UTF8') IN coalesce(e.payload, '')) > 0;

-- On a hot standby nothing can be written: the read works, with a NOTICE that
-- it is not recorded (refused with require_recorded_reads, see 24_recorded_reads).
-- @standby
SELECT sk FROM test_key \gset
\set reader 'dbname=' :DBNAME ' options=-csubject_audit.session_key=' :sk
\c :reader
SELECT pg_is_in_recovery();
SELECT count(*) AS events FROM subject_audit.audit_for_subject('p-1');
SELECT subject_audit.record_access('p-1', 'opened patient record');
-- ALTER SYSTEM works on a standby, where its SETTING event cannot be written.
ALTER SYSTEM SET subject_audit.seal_interval = 300;
ALTER SYSTEM RESET subject_audit.seal_interval;
