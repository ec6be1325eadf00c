-- Under load: 4 sessions change the same subjects in two tables; every
-- subject's trail is complete and in commit order. Then the postmaster is
-- killed (-9) in the middle of the load: after restart, the committed updates
-- equal the UPDATE events exactly, and the ledger verifies.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE test_key AS SELECT :'sk' AS sk;
CREATE TABLE wallet (id int PRIMARY KEY, who text, n int NOT NULL);
CREATE TABLE points (id int PRIMARY KEY, who text, n int NOT NULL);
INSERT INTO wallet SELECT i, 's' || i, 0 FROM generate_series(1, 10) i;
INSERT INTO points SELECT i, 's' || i, 0 FROM generate_series(1, 10) i;
SELECT subject_audit.track('wallet', 'who'), subject_audit.track('points', 'who');
\setenv DB :DBNAME
\! printf '\\set id random(1, 10)\nBEGIN;\nUPDATE wallet SET n = n + 1 WHERE id = :id;\nUPDATE points SET n = n + 1 WHERE id = :id;\nEND;\n' > "$PG_TEST_DIR/two_tables.sql"
\! /usr/lib/postgresql/15/bin/pgbench -n -c 4 -j 2 -T 5 -f "$PG_TEST_DIR/two_tables.sql" "$DB" > "$PG_TEST_DIR/pgbench1.log" 2>&1 && echo pgbench done
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
-- Complete: as many UPDATE events per subject and table as increments.
WITH trail AS (
    SELECT s.who, a.table_name, count(*) AS updates
    FROM (SELECT 's' || i AS who FROM generate_series(1, 10) i) s, subject_audit.audit_for_subject(s.who) a
    WHERE a.operation = 'UPDATE' GROUP BY 1, 2)
SELECT count(*) AS subject_tables,
       bool_and(t.updates = CASE t.table_name WHEN 'public.wallet' THEN w.n ELSE p.n END) AS complete,
       sum(t.updates) > 0 AS did_work
FROM trail t JOIN wallet w USING (who) JOIN points p USING (who);
-- In commit order: each event's before is the previous event's after.
WITH steps AS (
    SELECT s.who, a.table_name, a.event_id, (a.before ->> 'n')::int AS b, (a.after ->> 'n')::int AS f
    FROM (SELECT 's' || i AS who FROM generate_series(1, 10) i) s, subject_audit.audit_for_subject(s.who) a
    WHERE a.operation = 'UPDATE'),
chained AS (
    SELECT *, lag(f) OVER (PARTITION BY who, table_name ORDER BY event_id) AS previous FROM steps)
SELECT count(*) FILTER (WHERE b <> coalesce(previous, 0) OR f <> b + 1) AS out_of_order FROM chained;

-- Kill -9 the postmaster while 4 clients update.
UPDATE wallet SET n = 0;
CREATE TABLE test_mark AS SELECT max(event_id) AS mark FROM subject_audit.events;
\! printf '\\set id random(1, 10)\nUPDATE wallet SET n = n + 1 WHERE id = :id;\n' > "$PG_TEST_DIR/counter.sql"
\! (/usr/lib/postgresql/15/bin/pgbench -n -c 4 -j 2 -T 30 -f "$PG_TEST_DIR/counter.sql" "$DB" > "$PG_TEST_DIR/pgbench2.log" 2>&1 &); sleep 4; kill -9 "$(head -n 1 "$PG_TEST_DIR/data/postmaster.pid")"; sleep 3; echo killed
-- @restart
SELECT sum(n) > 0 AS updates_committed,
       sum(n) = (SELECT count(*) FROM subject_audit.events
                 WHERE table_name = 'public.wallet' AND operation = 'UPDATE'
                 AND event_id > (SELECT mark FROM test_mark)) AS every_update_has_its_event
FROM wallet;
SELECT subject_audit.seal() > 0 AS sealed;
SELECT ok, problems FROM subject_audit.verify();
