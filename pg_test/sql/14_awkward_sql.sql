-- Bad input gets one clear error and no side effect; awkward SQL loses nothing:
-- TRUNCATE, COPY, ON CONFLICT, MERGE, multi-row statements, replica mode,
-- ALTER/DROP TABLE, NULL subjects and values of every common type.
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION file_fdw;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
CREATE TABLE people (id int PRIMARY KEY, who text, email text, note text);
CREATE VIEW people_view AS SELECT 1 AS one;
CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
CREATE FOREIGN TABLE people_file (id int, who text) SERVER files OPTIONS (filename '/dev/null');

-- 1. Bad input: one clear error each, and nothing tracked or recorded.
SELECT subject_audit.track('people_view', 'who');
SELECT subject_audit.track('people_file', 'who');
SELECT subject_audit.track('no_such_table', 'who');
SELECT subject_audit.track('people', 'no_such_column');
SELECT subject_audit.track('people', 'who', '{who}');
SELECT subject_audit.track('people', 'who', '{no_such_column}');
SELECT subject_audit.untrack('people');
SELECT subject_audit.unlock('\x0102');
SELECT subject_audit.install_public_key('\x0102');
SELECT subject_audit.install_public_key(decode(repeat('00', 32), 'hex'));
SELECT subject_audit.retire_public_key(99);
-- NULL for every argument of every function.
SELECT subject_audit.track(NULL, 'who');
SELECT subject_audit.track('people', NULL);
SELECT subject_audit.track('people', 'who', NULL);
SELECT subject_audit.track('people', 'who', '{NULL}');
SELECT subject_audit.untrack(NULL);
SELECT subject_audit.install_public_key(NULL);
SELECT subject_audit.retire_public_key(NULL);
SELECT subject_audit.unlock(NULL);
SELECT subject_audit.bind_subject(NULL);
SELECT * FROM subject_audit.audit_for_subject(NULL);
SELECT * FROM subject_audit.audit_event(NULL, 1);
SELECT * FROM subject_audit.audit_event('ann', NULL);
SELECT subject_audit.export_subject(NULL);
SELECT subject_audit.record_access(NULL, 'title');
SELECT subject_audit.record_access('ann', NULL);
SELECT subject_audit.forget_subject(NULL);
SELECT subject_audit.grant_reader(NULL);
SELECT subject_audit.grant_writer(NULL);
SELECT subject_audit.grant_admin(NULL);
SELECT subject_audit.grant_auditor(NULL);
SELECT subject_audit.revoke_grants(NULL);
-- (verify(NULL) is verify without a checkpoint: NULL is its default.)
SELECT ok FROM subject_audit.verify(NULL);
SELECT count(*) AS tracked FROM subject_audit.tracked;
SELECT operation, count(*) FROM subject_audit.events GROUP BY 1 ORDER BY 1;

-- 2. Awkward SQL.
SELECT subject_audit.track('people', 'who');
-- DDL the extension watches still works in all its forms.
CREATE INDEX people_email ON people (email);
DROP INDEX CONCURRENTLY people_email;
-- Multi-row, COPY, ON CONFLICT DO UPDATE, MERGE.
INSERT INTO people VALUES (1, 'ann', 'ann@example.com', 'a'), (2, 'ben', 'ben@example.com', 'b');
COPY people FROM stdin;
3	cat	cat@example.com	c
4	\N	nobody@example.com	d
\.
INSERT INTO people VALUES (1, 'ann', 'ann@upsert.example', 'a'), (5, 'dan', 'dan@example.com', 'e')
ON CONFLICT (id) DO UPDATE SET email = excluded.email;
MERGE INTO people p USING (VALUES (2, 'ben@merge.example'), (6, 'eve@example.com')) v(id, email) ON p.id = v.id
WHEN MATCHED THEN UPDATE SET email = v.email
WHEN NOT MATCHED THEN INSERT VALUES (v.id, 'eve', v.email, 'f');
-- Savepoints and rollbacks leave nothing.
BEGIN;
UPDATE people SET note = 'kept' WHERE id = 3;
SAVEPOINT s;
UPDATE people SET note = 'rolled back' WHERE id = 3;
ROLLBACK TO SAVEPOINT s;
COMMIT;
BEGIN;
DELETE FROM people;
TRUNCATE people;
ROLLBACK;
-- session_replication_role = replica skips ordinary triggers, not ours (ENABLE ALWAYS).
SET session_replication_role = replica;
UPDATE people SET note = 'in replica mode' WHERE id = 5;
RESET session_replication_role;
SELECT s.who, a.operation, a.changed_columns, a.after
FROM (VALUES ('ann'), ('ben'), ('cat'), ('dan'), ('eve')) s(who), subject_audit.audit_for_subject(s.who) a
WHERE a.operation <> 'READ'
ORDER BY a.event_id;
-- The row with a NULL subject is recorded too, with no subject.
SELECT operation, changed_columns, subject_ref FROM subject_audit.events
WHERE table_name = 'public.people' AND subject_ref IS NULL;

-- ALTER TABLE: added, dropped and renamed columns; the subject column renamed is followed.
ALTER TABLE people ADD COLUMN phone text;
-- A recorded column is dropped only once it holds no value: NULLed first, captured.
UPDATE people SET note = NULL WHERE note IS NOT NULL;
ALTER TABLE people DROP COLUMN note;
ALTER TABLE people RENAME COLUMN email TO mail;
ALTER TABLE people RENAME COLUMN who TO person;
UPDATE people SET phone = '555', mail = 'ann@renamed.example' WHERE id = 1;
SELECT operation, changed_columns, before, after FROM subject_audit.audit_for_subject('ann') WHERE operation = 'UPDATE';
SELECT table_name, subject_column FROM subject_audit.tracked;
-- Dropping the subject column is refused; untrack first.
ALTER TABLE people DROP COLUMN person;

-- TRUNCATE leaves an event for every row, with its before values.
TRUNCATE people;
SELECT operation, description, before FROM subject_audit.audit_for_subject('eve');
SELECT count(*) AS truncate_events FROM subject_audit.events WHERE operation = 'TRUNCATE';

-- DROP TABLE: no longer tracked (an UNTRACK event says why), its events stay.
INSERT INTO people VALUES (7, 'fay', 'fay@example.com');
DROP TABLE people;
SELECT count(*) AS tracked FROM subject_audit.tracked;
SELECT operation, title FROM subject_audit.events WHERE operation = 'UNTRACK';
SELECT operation, after FROM subject_audit.audit_for_subject('fay') WHERE operation <> 'READ';

-- Values of every common type round-trip.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE address AS (street text, zip text);
CREATE TABLE kinds (id int PRIMARY KEY, who text, j jsonb, b bytea, arr int[], n numeric, m mood,
                    d posint, addr address, ts timestamptz, big text);
SELECT subject_audit.track('kinds', 'who');
SET TimeZone = 'UTC';
INSERT INTO kinds VALUES (1, 'kim', '{"a": [1, {"b": null}], "c": "ü"}', '\x00ff10', '{1,NULL,3}',
    12345678901234567890.123456789, 'happy', 42, ROW('Main St 1', '12345'),
    '2026-01-02 03:04:05.678901+00', repeat('x', 1024 * 1024));
SELECT (after -> 'j') = k.j AS jsonb_same, after ->> 'b' = k.b::text AS bytea_same,
       after ->> 'arr' = k.arr::text AS array_same, after ->> 'n' = k.n::text AS numeric_same,
       after ->> 'm' = k.m::text AS enum_same, after ->> 'd' = k.d::text AS domain_same,
       after ->> 'addr' = k.addr::text AS composite_same, after ->> 'ts' = k.ts::text AS timestamptz_same,
       md5(after ->> 'big') = md5(k.big) AS big_text_same, length(after ->> 'big') AS big_length
FROM subject_audit.audit_for_subject('kim') a, kinds k WHERE a.operation = 'INSERT';
SELECT ok, problems FROM subject_audit.verify();
