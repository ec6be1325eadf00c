-- search_path tricks: a hostile role puts its own schema first (even before
-- pg_catalog), holding tables, functions and operators named like the ones
-- the extension uses. Each trap raises if it is ever called. Capture and
-- reading must neither be diverted nor break.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE accounts (id int PRIMARY KEY, holder text, iban text);
SELECT subject_audit.track('accounts', 'holder');
CREATE ROLE mallory LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO mallory;
CREATE SCHEMA evil AUTHORIZATION mallory;

\c - mallory
CREATE TABLE evil.event (event_id bigint);
CREATE TABLE evil.subject_key (subject_key_id bigint);
CREATE FUNCTION evil.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'trap: unnest'; END $$;
CREATE FUNCTION evil.lower(text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'trap: lower'; END $$;
CREATE FUNCTION evil.host(inet) RETURNS text LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'trap: host'; END $$;
CREATE FUNCTION evil.bytea_eq(bytea, bytea) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'trap: ='; END $$;
CREATE OPERATOR evil.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = evil.bytea_eq);
CREATE FUNCTION evil.bigint_eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'trap: ='; END $$;
CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.bigint_eq);
SET search_path = evil, public, pg_catalog;
-- One row (the single-subject path) and forty rows (the batch path) as mallory.
INSERT INTO accounts VALUES (1, 'h-1', 'DE00 0001');
INSERT INTO accounts SELECT g, 'h-' || g, 'DE00 ' || g FROM pg_catalog.generate_series(2, 41) g;
UPDATE accounts SET iban = iban || '9';
DELETE FROM accounts WHERE id > 30;

\c - postgres
SET search_path = evil, public, pg_catalog;
SELECT subject_audit.unlock(:'sk');
SELECT operation, before, after FROM subject_audit.audit_for_subject('h-1');
SELECT column_name, before, after FROM subject_audit.audit_event('h-1',
    (SELECT max(event_id) FROM subject_audit.audit_for_subject('h-1') WHERE operation = 'UPDATE'));
SELECT operation, pg_catalog.count(*) FROM subject_audit.events GROUP BY operation ORDER BY operation;
SELECT subject_audit.seal() > 0 AS sealed;
SELECT ok, problems, unsealed FROM subject_audit.verify();
SELECT subject_audit.forget_subject('h-2') AS erased_events;
