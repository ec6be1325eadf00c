-- Issue 20, item 5: no read escapes the trail. A decrypting read of a trail
-- (audit_for_subject, audit_event, export_subject), an unlock, and the rows a
-- change hands back with RETURNING are recorded whatever becomes of the
-- reader's transaction: the background writer records them in its own. A
-- trail read returns its rows once its READ event is committed; with
-- subject_audit.require_recorded_reads on, it is refused when that cannot be
-- guaranteed.
ALTER DATABASE :"DBNAME" SET subject_audit.log_reads = subject;
\c
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
-- A test fixture, so the part without the preloaded library (a new psql) can unlock too.
CREATE TABLE test_key AS SELECT :'sk' AS sk;
CREATE TABLE customers (id int PRIMARY KEY, token text NOT NULL, email text);
SELECT subject_audit.track('customers', 'token');
-- Which subject an event belongs to, for the key-less checks: each token's
-- subject_ref, taken from its INSERT event.
CREATE TABLE refs (token text, ref text);
INSERT INTO customers VALUES (1, 'c-1', 'ann@example.com');
INSERT INTO refs SELECT 'c-1', subject_ref FROM subject_audit.events ORDER BY event_id DESC LIMIT 1;
INSERT INTO customers VALUES (2, 'c-2', 'bob@example.com');
INSERT INTO refs SELECT 'c-2', subject_ref FROM subject_audit.events ORDER BY event_id DESC LIMIT 1;
INSERT INTO customers VALUES (3, 'c-3', 'cy@example.com');
INSERT INTO refs SELECT 'c-3', subject_ref FROM subject_audit.events ORDER BY event_id DESC LIMIT 1;
CREATE TABLE mark AS SELECT max(event_id) AS last FROM subject_audit.event;
CREATE VIEW new_events AS
    SELECT e.operation, e.title, e.actor, e.table_name, e.changed_columns, r.token AS subject
    FROM subject_audit.events e LEFT JOIN refs r ON r.ref = e.subject_ref
    WHERE e.event_id > (SELECT last FROM mark) ORDER BY e.operation, r.token, e.title;
CREATE FUNCTION next_mark() RETURNS void LANGUAGE sql AS $$
    UPDATE mark SET last = (SELECT max(event_id) FROM subject_audit.event) $$;
CREATE ROLE r24_reader LOGIN;
SELECT subject_audit.grant_reader('r24_reader');
CREATE ROLE r24_app LOGIN;
GRANT ALL ON customers TO r24_app;
SELECT subject_audit.grant_writer('r24_app');

-- 1. Trail reads in a transaction that rolls back: every one is recorded, and
-- so is the unlock of the key given in the connection's startup options,
-- checked on the first read. Who, why, which subject: as in any READ event.
-- Connections by conninfo: psql then carries no option (a session key) over.
\set reader 'dbname=' :DBNAME ' user=r24_reader options=-csubject_audit.session_key=' :sk
\set admin_reader 'dbname=' :DBNAME ' user=postgres options=-csubject_audit.session_key=' :sk
\set admin 'dbname=' :DBNAME ' user=postgres'
\set keyless_reader 'dbname=' :DBNAME ' user=r24_reader'
\set app 'dbname=' :DBNAME ' user=r24_app'
\c :reader
BEGIN;
SET LOCAL subject_audit.actor = 'support:dave';
SET LOCAL subject_audit.reason = 'ticket #24';
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
SELECT subject_audit.export_subject('c-2') -> 'event_count' AS exported;
SELECT count(*) AS columns FROM subject_audit.audit_event('c-3', 1);
ROLLBACK;
\c :admin
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();
-- The subject sees who looked and why.
SELECT subject_audit.unlock(decode(:'sk', 'hex')) AS keys;
SELECT operation, title, description, actor, table_name FROM subject_audit.audit_for_subject('c-1')
WHERE operation = 'READ';
SELECT operation, title, description, actor FROM subject_audit.audit_for_subject('c-3')
WHERE operation = 'READ' ORDER BY event_id;
SELECT subject_audit.wait_for_writer();
SELECT next_mark();

-- 2. unlock() in a transaction that rolls back: the key stays unlocked (it
-- lives in the session, not in the transaction), and so does its event.
\c :keyless_reader
BEGIN;
SELECT subject_audit.unlock(decode(:'sk', 'hex')) AS keys;
ROLLBACK;
SELECT count(*) > 0 AS still_unlocked FROM subject_audit.audit_for_subject('c-2');
\c :admin
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 3. A read-only transaction: a trail read is recorded like a read of a
-- tracked table (before, only the table read was, and the trail read gave a NOTICE).
\c :app
BEGIN READ ONLY;
SELECT token FROM customers WHERE id = 1;
COMMIT;
\c :reader
BEGIN READ ONLY;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
SELECT count(*) AS columns FROM subject_audit.audit_event('c-1', 1);
COMMIT;
\c :admin
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 4. require_recorded_reads = on (superuser-only, set for the reader's role)
-- no longer refuses a read in a read-only transaction: its event is
-- committed by the writer before the rows return, so the next statement of
-- the same transaction already sees it, and the rollback keeps it.
ALTER ROLE r24_reader SET subject_audit.require_recorded_reads = on;
\c :reader
SHOW subject_audit.require_recorded_reads;
BEGIN READ ONLY;
SELECT count(*) FILTER (WHERE operation = 'READ') AS reads_before FROM subject_audit.audit_for_subject('c-2');
SELECT count(*) FILTER (WHERE operation = 'READ') AS reads_after FROM subject_audit.audit_for_subject('c-2');
ROLLBACK;
SELECT count(*) FILTER (WHERE operation = 'READ') AS reads_later FROM subject_audit.audit_for_subject('c-2');
-- The reader cannot turn it off.
SET subject_audit.require_recorded_reads = off;
\c :admin
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 5. With require_recorded_reads on, a read whose event cannot be written is
-- refused, no rows. Here no writer can connect to this database (it refuses
-- connections): the entry is dropped after three launches, so the read is
-- refused; the drop is recorded once a writer runs again.
\c :admin_reader
SET subject_audit.require_recorded_reads = on;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
CREATE EXTENSION dblink;
SELECT dblink_connect('admin', format('dbname=postgres host=%s port=%s',
    current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('admin', format('ALTER DATABASE %I ALLOW_CONNECTIONS false', current_database()));
-- The writer that ran leaves after two idle seconds.
SELECT pg_sleep(4);
SELECT count(*) FROM subject_audit.audit_for_subject('c-1');
-- With it off, the read goes on after a second, with a WARNING (not shown:
-- whether the writer has given the event up by then is a matter of timing);
-- the event is dropped like the other one.
RESET subject_audit.require_recorded_reads;
SET client_min_messages = error;
SELECT count(*) > 0 AS read_anyway FROM subject_audit.audit_for_subject('c-1');
RESET client_min_messages;
SELECT subject_audit.wait_for_writer(15000) AS given_up;
SET subject_audit.require_recorded_reads = on;
SELECT dblink_exec('admin', format('ALTER DATABASE %I ALLOW_CONNECTIONS true', current_database()));
SELECT count(*) > 0 AS read_again FROM subject_audit.audit_for_subject('c-1');
RESET subject_audit.require_recorded_reads;
SELECT subject_audit.wait_for_writer();
SELECT operation, title FROM subject_audit.events WHERE event_id > (SELECT last FROM mark)
ORDER BY event_id;
SELECT next_mark();

-- 6. RETURNING hands rows back: a read of them, recorded like a SELECT's —
-- per subject where the subject column is returned, one statement-level
-- event otherwise — also when the change is rolled back.
\c :app
SET subject_audit.actor = 'app:batch';
UPDATE customers SET email = email RETURNING *;
BEGIN;
DELETE FROM customers RETURNING *;
ROLLBACK;
BEGIN;
DELETE FROM customers WHERE id = 3 RETURNING id, email;
ROLLBACK;
INSERT INTO customers VALUES (4, 'c-4', 'dee@example.com') RETURNING token;
-- Inside a function: the rows it hands to PL/pgSQL.
DO $$ DECLARE e text; BEGIN
    UPDATE customers SET email = email WHERE id = 2 RETURNING email INTO e;
END $$;
-- Without RETURNING a change is no read: its events are its change events.
UPDATE customers SET email = email WHERE id = 1;
DELETE FROM customers WHERE id = 4;
\c :admin
INSERT INTO refs SELECT 'c-4', subject_ref FROM subject_audit.events WHERE operation = 'INSERT'
ORDER BY event_id DESC LIMIT 1;
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events WHERE operation = 'READ';
SELECT next_mark();

-- 7. A subject the reading transaction itself created: its key is not
-- committed, so the writer could not record the read before this transaction
-- ends. The read is recorded in it instead, at once (no wait for the writer:
-- a statement_timeout far below the ten seconds require_recorded_reads waits
-- is not hit); a rollback takes the subject, what was read and the read alike.
\c :admin_reader
SET subject_audit.require_recorded_reads = on;
BEGIN;
INSERT INTO customers VALUES (5, 'c-5', 'eve@example.com');
SET LOCAL statement_timeout = '900ms';
SELECT count(*) AS events FROM subject_audit.audit_for_subject('c-5');
SELECT operation, title FROM subject_audit.audit_for_subject('c-5') ORDER BY event_id;
COMMIT;
RESET subject_audit.require_recorded_reads;
SELECT operation, title FROM subject_audit.events WHERE event_id > (SELECT last FROM mark)
ORDER BY event_id;
SELECT next_mark();

-- 8. On a hot standby nothing can be written: a trail read or an unlock goes
-- on with a NOTICE that it is not recorded; require_recorded_reads refuses it.
-- @standby
SELECT sk FROM test_key \gset
SELECT subject_audit.unlock(decode(:'sk', 'hex')) AS keys;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
SET subject_audit.require_recorded_reads = on;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
SELECT subject_audit.unlock(decode(:'sk', 'hex')) AS keys;

-- 9. Without shared_preload_libraries there is no writer: a trail read is
-- recorded in the reader's transaction (as before), and goes unrecorded with
-- a NOTICE in a read-only one; require_recorded_reads refuses both, and an
-- unlock (which then adds no key).
-- @unpreloaded
SELECT sk FROM test_key \gset
SET subject_audit.require_recorded_reads = on;
SELECT subject_audit.unlock(decode(:'sk', 'hex')) AS keys;
RESET subject_audit.require_recorded_reads;
SELECT count(*) FROM subject_audit.audit_for_subject('c-1');
SELECT subject_audit.unlock(decode(:'sk', 'hex')) AS keys;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
BEGIN READ ONLY;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
ROLLBACK;
SET subject_audit.require_recorded_reads = on;
SELECT count(*) > 0 AS read FROM subject_audit.audit_for_subject('c-1');
RESET subject_audit.require_recorded_reads;
SELECT operation, title FROM subject_audit.events WHERE event_id > (SELECT last FROM mark)
ORDER BY event_id;
