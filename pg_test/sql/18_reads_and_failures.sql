-- Issue 9: reads of tracked tables and failed changes enter the trail.
-- Reads: one READ event per subject in the rows a query returned; a
-- statement-level READ event where the subject column is not returned.
-- Failures: an error event per touched subject, with SQLSTATE and the
-- encrypted message, written by the background writer after the rollback.
-- The events reach the trail asynchronously: wait_for_writer() waits for them.
-- The test cluster has both off; this database turns them on.
ALTER DATABASE :"DBNAME" SET subject_audit.log_reads = subject;
ALTER DATABASE :"DBNAME" SET subject_audit.log_failures = on;
\c
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
CREATE TABLE test_key AS SELECT :'sk'::text AS sk;
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE customers (id int PRIMARY KEY, token text NOT NULL, email text UNIQUE, phone text,
                        CHECK (phone <> 'bad'));
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, item text);
SELECT subject_audit.track('customers', 'token');
INSERT INTO customers VALUES (1, 'c-1', 'ann@example.com', '555-0101'),
                             (2, 'c-2', 'bob@example.com', '555-0102'),
                             (3, 'c-3', 'cy@example.com', '555-0103');
CREATE ROLE r18_app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON customers, orders TO r18_app;
-- Only to order a savepoint's failure event before the transaction's next one (part 6).
GRANT USAGE ON SCHEMA subject_audit TO r18_app;
GRANT EXECUTE ON FUNCTION subject_audit.wait_for_writer(integer) TO r18_app;
-- What the trail of one subject holds, by operation and status.
CREATE FUNCTION trail(token text) RETURNS TABLE (operation text, status text, sqlstate text, title text,
                                                 description text, actor text, changed_columns text[])
LANGUAGE sql AS $$
    SELECT operation, status, sqlstate, title, description, actor, changed_columns
    FROM subject_audit.audit_for_subject(token) WHERE title NOT LIKE 'viewed audit trail%' ORDER BY event_id
$$;
-- Key-less view of the new events since a mark.
CREATE TABLE mark AS SELECT max(event_id) AS last FROM subject_audit.event;
CREATE VIEW new_events AS
    SELECT operation, status, sqlstate, title, table_name, changed_columns, subject_ref IS NOT NULL AS has_subject
    FROM subject_audit.events WHERE event_id > (SELECT last FROM mark) ORDER BY event_id;
CREATE FUNCTION next_mark() RETURNS void LANGUAGE sql AS $$
    UPDATE mark SET last = (SELECT max(event_id) FROM subject_audit.event) $$;

-- 1. Per-subject reads: only the rows actually returned.
\c - r18_app
SET subject_audit.actor = 'support:7';
SELECT id, token, email FROM customers WHERE id = 1;
-- The scan looks at every row; only c-2 is returned.
SELECT token, phone FROM customers WHERE phone LIKE '%02';
-- LIMIT: one row sent, one subject.
SELECT token FROM customers ORDER BY id LIMIT 1;
-- The same subject twice in one result: one event.
SELECT c.token FROM customers c CROSS JOIN generate_series(1, 2) ORDER BY c.id LIMIT 2;
-- No rows: no subject, no event.
SELECT token FROM customers WHERE id = 42;
\c - postgres
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 2. Statement-level reads: the subject column is not in the output.
\c - r18_app
SELECT count(*) FROM customers;
SELECT email FROM customers WHERE id = 2;
-- Through an expression the origin of a column is lost: statement-level too.
SELECT upper(token) FROM customers WHERE id = 3;
-- COPY TO bypasses the executor (pg_dump reads this way): statement-level.
COPY customers (id, token) TO STDOUT;
\c - postgres
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- The subject sees who read what, and when; values and statement text are not stored.
SELECT sk FROM test_key \gset
SELECT subject_audit.unlock(:'sk');
SELECT operation, title, description, actor, changed_columns FROM trail('c-1') WHERE operation = 'READ';
SELECT operation, title, description, actor, changed_columns FROM trail('c-2') WHERE operation = 'READ';
SELECT count(*) AS stored_with_values FROM subject_audit.event JOIN subject_audit.event_label USING (label_id)
WHERE position('\x616e6e406578616d706c652e636f6d'::bytea IN coalesce(payload, '')) > 0
   OR title LIKE '%ann@%' OR title LIKE '%LIKE%' OR array_to_string(changed_columns, ',') LIKE '%@%';
SELECT next_mark();

-- 2b. Reads inside other statements.
CREATE TABLE copy_of (token text);
CREATE FUNCTION token_of(int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT token FROM customers WHERE id = $1 $$;
CREATE FUNCTION email_of(int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT email FROM customers WHERE id = $1 $$;
\c - postgres
GRANT ALL ON copy_of TO r18_app;
GRANT EXECUTE ON FUNCTION token_of(int), email_of(int) TO r18_app;
\c - r18_app
-- INSERT … SELECT reads customers: statement-level, with the rows it processed.
INSERT INTO copy_of SELECT token FROM customers WHERE id < 3;
-- A function reading once per row: one event per subject for the whole statement;
-- without the subject column, one statement-level event with the rows added up.
SELECT token_of(id) FROM generate_series(1, 3) AS id;
SELECT email_of(id) FROM generate_series(1, 3) AS id;
-- A cursor opened in a savepoint that is released, fetched across another
-- savepoint rolled back, then closed: every row it returned.
BEGIN;
SAVEPOINT a;
DECLARE c CURSOR FOR SELECT token FROM customers ORDER BY id;
RELEASE a;
FETCH 1 FROM c;
SAVEPOINT b;
ROLLBACK TO b;
FETCH ALL FROM c;
CLOSE c;
COMMIT;
-- EXPLAIN ANALYZE runs the query but returns no row: no event.
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT token FROM customers WHERE id = 1;
-- A reason at its limit (1000 characters): a read's event keeps its first 256 bytes, the read recorded.
SELECT set_config('subject_audit.reason', repeat('x', 1000), false) IS NOT NULL AS reason_set;
SELECT token FROM customers WHERE id = 3;
RESET subject_audit.reason;
\c - postgres
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();
SELECT subject_audit.unlock(:'sk');
SELECT length(description) AS description_length FROM trail('c-3') WHERE operation = 'READ' AND description LIKE 'read token — x%';

-- 3. Our own functions are not counted as table reads; nor are foreign key checks.
INSERT INTO orders VALUES (1, 1, 'book');
SELECT count(*) FROM subject_audit.audit_for_subject('c-3');
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 4. log_reads: statement, off; per role and database; superuser-only.
\c - r18_app
SET subject_audit.log_reads = off;
\c - postgres
ALTER ROLE r18_app SET subject_audit.log_reads = statement;
\c - r18_app
SHOW subject_audit.log_reads;
SELECT token FROM customers WHERE id = 1;
\c - postgres
ALTER ROLE r18_app SET subject_audit.log_reads = off;
\c - r18_app
SELECT token FROM customers WHERE id = 1;
\c - postgres
ALTER ROLE r18_app RESET subject_audit.log_reads;
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 5. Read-only transactions: reads are recorded all the same (by the writer).
\c - r18_app
BEGIN READ ONLY;
SELECT token FROM customers WHERE id = 3;
COMMIT;
-- A read in a transaction that rolls back was still a read.
BEGIN;
SELECT token FROM customers WHERE id = 2;
ROLLBACK;
\c - postgres
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT next_mark();

-- 6. Failed changes: recorded after the rollback, message encrypted.
CREATE FUNCTION slow_phone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.phone = 'slow' THEN PERFORM pg_sleep(5); END IF; RETURN NEW; END $$;
CREATE TRIGGER zz_slow BEFORE UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION slow_phone();
\c - r18_app
SET subject_audit.actor = 'support:7';
SET subject_audit.reason = 'ticket #9';
-- A unique violation: the failing row's subject (c-4) is known.
INSERT INTO customers VALUES (4, 'c-4', 'ann@example.com', '555-0104');
-- A multi-row INSERT failing on its second row: both subjects.
INSERT INTO customers VALUES (5, 'c-5', 'eve@example.com', '555-0105'), (6, 'c-6', 'eve@example.com', '555-0106');
-- An UPDATE failing a CHECK, inside a transaction.
BEGIN;
UPDATE customers SET phone = 'bad' WHERE id = 2;
ROLLBACK;
-- A failure inside a savepoint; the transaction goes on and commits.
BEGIN;
SAVEPOINT s;
DELETE FROM customers WHERE id = 1;
ROLLBACK TO SAVEPOINT s;
-- The failure is written by the background writer, in its own transaction,
-- while this one goes on: wait for it, so the events list in a fixed order.
SELECT subject_audit.wait_for_writer(30000) AS failure_written;
UPDATE customers SET phone = '555-0133' WHERE id = 3;
COMMIT;
-- A cancel (statement_timeout) while updating: a slow trigger of the
-- application's, after ours, is interrupted.
SET statement_timeout = '200ms';
UPDATE customers SET phone = 'slow' WHERE id = 3;
RESET statement_timeout;
-- Caught by an exception handler: recorded with its SQLSTATE, without the message.
DO $$ BEGIN
    INSERT INTO customers VALUES (7, 'c-7', 'bob@example.com', NULL);
EXCEPTION WHEN unique_violation THEN RAISE NOTICE 'caught';
END $$;
-- A loop catching failures (an upsert pattern): each subject recorded.
DO $$ BEGIN
    FOR i IN 20..21 LOOP
        BEGIN
            INSERT INTO customers VALUES (i, 'c-' || i, 'bob@example.com', NULL);
        EXCEPTION WHEN unique_violation THEN NULL;
        END;
    END LOOP;
END $$;
-- An error passing through an exception block that does not handle it:
-- recorded with its SQLSTATE and message.
DO $$ BEGIN
    BEGIN
        INSERT INTO customers VALUES (22, 'c-22', 'bob@example.com', NULL);
    EXCEPTION WHEN no_data_found THEN NULL;
    END;
END $$;
-- A failed COPY: its rows are not noted (COPY keeps its batching, which a
-- row trigger would switch off), so one event of nobody's, without the detail.
COPY customers FROM stdin;
8	c-8	dee@example.com	555-0108
9	c-9	ann@example.com	555-0109
\.
\c - postgres
-- Permission denied: no row was touched, so the event has no subject.
CREATE ROLE r18_stranger LOGIN;
\c - r18_stranger
INSERT INTO customers VALUES (10, 'c-10', 'x@example.com', NULL);
\c - postgres
DROP TRIGGER zz_slow ON customers;
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT subject_audit.unlock(:'sk');
SELECT * FROM trail('c-4');
SELECT * FROM trail('c-6');
SELECT * FROM trail('c-2');
SELECT * FROM trail('c-1') WHERE status = 'error';
SELECT * FROM trail('c-3') WHERE operation = 'UPDATE';
SELECT * FROM trail('c-7');
SELECT operation, status, sqlstate, title FROM trail('c-22');
-- The failed rows themselves left nothing; neither message nor values are stored in plaintext.
SELECT count(*) AS customers FROM customers;
SELECT count(*) AS plaintext FROM subject_audit.event JOIN subject_audit.event_label USING (label_id)
WHERE position('\x616e6e406578616d706c652e636f6d'::bytea IN coalesce(payload, '')) > 0
   OR title LIKE '%already exists%' OR title LIKE '%@%';
SELECT e->>'operation' AS operation, e->>'status' AS status, e->>'sqlstate' AS sqlstate, e->>'description' AS description
FROM jsonb_path_query(subject_audit.export_subject('c-4'), '$.events[*] ? (@.status == "error")') e;
SELECT next_mark();

-- 6b. Whose rows an UPDATE, DELETE or MERGE touched is read from the rows
-- its plan hands to the change (no row trigger, so no row lock first): every
-- row handed over until the failure, across partitions (with another column
-- order), both subjects of an UPDATE setting the subject column, a MERGE's
-- matched row, a DELETE refused by a foreign key at the statement's end, an
-- UPDATE inside a WITH query.
CREATE TABLE accounts (id int, owner text NOT NULL, balance int CHECK (balance >= 0), PRIMARY KEY (id))
    PARTITION BY RANGE (id);
CREATE TABLE accounts_low PARTITION OF accounts FOR VALUES FROM (0) TO (100);
CREATE TABLE accounts_high (balance int CONSTRAINT accounts_balance_check CHECK (balance >= 0), owner text NOT NULL,
                            id int NOT NULL);
ALTER TABLE accounts ATTACH PARTITION accounts_high FOR VALUES FROM (100) TO (200);
CREATE TABLE transfers (account_id int REFERENCES accounts);
SELECT subject_audit.track('accounts', 'owner');
INSERT INTO accounts VALUES (1, 'a-1', 10), (2, 'a-2', 10), (101, 'a-101', 10);
INSERT INTO transfers VALUES (101);
GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO r18_app;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'accounts_high'::regclass AND NOT tgisinternal ORDER BY 1;
\c - r18_app
UPDATE accounts SET balance = balance - id / 10 - 1 WHERE id IN (2, 101);
UPDATE accounts SET owner = 'a-9', balance = -1 WHERE id = 1;
UPDATE accounts SET id = 150, balance = -5 WHERE id = 2;
MERGE INTO accounts a USING (VALUES (1, -50), (7, 5)) s(id, amount) ON a.id = s.id
    WHEN MATCHED THEN UPDATE SET balance = a.balance + s.amount
    WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'a-7', s.amount);
DELETE FROM accounts WHERE id = 101;
WITH w AS (UPDATE accounts SET balance = -1 WHERE id = 2 RETURNING id)
INSERT INTO accounts SELECT 3, 'a-3', 5 FROM w;
\c - postgres
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;
SELECT subject_audit.unlock(:'sk');
SELECT t AS subject, operation, sqlstate, title FROM unnest(array['a-1', 'a-2', 'a-3', 'a-7', 'a-9', 'a-101']) t,
    LATERAL trail(t) WHERE status = 'error';
SELECT next_mark();

-- 6c. Past 10,000 subjects, a failing statement's rows are counted, not itemized.
CREATE TABLE bulk (id int PRIMARY KEY, who text NOT NULL, v int CHECK (v <= 10005));
SELECT subject_audit.track('bulk', 'who');
INSERT INTO bulk SELECT g, 'b-' || g, g FROM generate_series(1, 10005) g;
SELECT next_mark();
UPDATE bulk SET v = v + 1;
SELECT subject_audit.wait_for_writer(60000);
SELECT operation, status, title, count(*) AS events, count(DISTINCT subject_ref) AS subjects
FROM subject_audit.events WHERE event_id > (SELECT last FROM mark) GROUP BY 1, 2, 3;
SELECT next_mark();

-- 7. log_failures = off: nothing recorded; superuser-only.
\c - r18_app
SET subject_audit.log_failures = off;
\c - postgres
SET subject_audit.log_failures = off;
INSERT INTO customers VALUES (11, 'c-11', 'ann@example.com', NULL);
RESET subject_audit.log_failures;
SELECT subject_audit.wait_for_writer();
SELECT * FROM new_events;

-- 8. Nothing silently lost: while the writer cannot connect to this database,
-- its entries are dropped after three launches, counted, and the count is
-- recorded in the admin trail once a writer can run again.
-- (This session stays; the setting is changed from the postgres database.)
CREATE EXTENSION dblink;
SELECT dblink_connect('admin', format('dbname=postgres host=%s port=%s',
    current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('admin', format('ALTER DATABASE %I ALLOW_CONNECTIONS false', current_database()));
-- The writer that ran leaves after two idle seconds.
SELECT pg_sleep(4);
SELECT token FROM customers WHERE id = 1;
SELECT subject_audit.wait_for_writer(15000);
SELECT waiting, dropped > 0 AS dropped FROM subject_audit.writer_status();
SELECT dblink_exec('admin', format('ALTER DATABASE %I ALLOW_CONNECTIONS true', current_database()));
SELECT token FROM customers WHERE id = 2;
SELECT subject_audit.wait_for_writer();
SELECT operation, status, title LIKE '% reads or failed statements not recorded%' AS reported FROM subject_audit.events
WHERE operation = 'DROPPED';
SELECT next_mark();

-- The ledger seals and verifies the deferred events like any other.
SELECT subject_audit.seal() > 0 AS sealed;
SELECT ok, problems FROM subject_audit.verify();

-- 9. On a hot standby nothing can be written: the read works, a NOTICE says
-- (once per session) that it is not recorded; require_recorded_reads refuses it.
-- @standby
SELECT token FROM customers WHERE id = 1;
SELECT token FROM customers WHERE id = 2;
SET subject_audit.require_recorded_reads = on;
SELECT token FROM customers WHERE id = 1;

-- 10. Without shared_preload_libraries: track() says what is off; capture works.
-- @unpreloaded
SHOW shared_preload_libraries;
CREATE TABLE patients (id int PRIMARY KEY, token text NOT NULL UNIQUE);
SELECT subject_audit.track('patients', 'token');
INSERT INTO patients VALUES (1, 'p-1');
INSERT INTO patients VALUES (2, 'p-1');
SELECT token FROM patients;
SELECT * FROM subject_audit.writer_status();
SELECT subject_audit.wait_for_writer(100);
SELECT operation, status, title FROM subject_audit.events WHERE table_name = 'public.patients' ORDER BY event_id;
