-- Reads and failures the queue could not keep are never lost without a
-- trace: each drop is counted per reason, recorded as a DROPPED admin event
-- with the exact count, and a count not recorded yet when the server stops
-- is saved by the postmaster and recorded after the restart.
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION dblink;
SELECT public_key AS pk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE big (id int PRIMARY KEY, token text NOT NULL);
SELECT subject_audit.track('big', 'token');
-- Tokens of 3,000 bytes: each READ event takes a queue slot of its own (4 kB),
-- and 4,200 of them overflow the queue's 4,096 slots.
INSERT INTO big SELECT g, lpad(g::text, 3000, 'x') FROM generate_series(1, 4200) g;
SET subject_audit.log_reads = subject;
SELECT * FROM subject_audit.writer_status();

-- No writer can connect to this database (this session stays): the read
-- fills the queue, waits two seconds for room, and drops the rest; the
-- launcher gives up on the writer after three launches and drops what was queued.
SELECT dblink_connect('admin', format('dbname=postgres host=%s port=%s',
    current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('admin', format('ALTER DATABASE %I ALLOW_CONNECTIONS false', current_database()));
\o /dev/null
SELECT token FROM big;
\o
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT waiting FROM subject_audit.writer_status()) = 0;
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT dblink_exec('admin', format('ALTER DATABASE %I ALLOW_CONNECTIONS true', current_database()));
-- Every event is counted, none is recorded yet.
SELECT * FROM subject_audit.writer_status();
CREATE TABLE before_restart AS SELECT dropped FROM subject_audit.writer_status();
SELECT count(*) AS dropped_events FROM subject_audit.events WHERE operation = 'DROPPED';

-- @restart
-- The counts came through the restart; a writer records them.
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT dropped = dropped_recorded AND dropped > 0 FROM subject_audit.writer_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT * FROM subject_audit.writer_status();
SELECT operation, status, title FROM subject_audit.events WHERE operation = 'DROPPED' ORDER BY event_id;
SELECT sum(split_part(title, ' ', 1)::bigint) = (SELECT dropped FROM before_restart) AS every_drop_recorded
FROM subject_audit.events WHERE operation = 'DROPPED';
-- Recorded once: another restart brings nothing back.
-- @restart
SELECT pg_sleep(2);
SELECT * FROM subject_audit.writer_status();
SELECT count(*) AS dropped_events FROM subject_audit.events WHERE operation = 'DROPPED';

-- Entries still queued when the server stops are counted as dropped too. A
-- prepared transaction holds a lock the writer needs (on the trail's table),
-- from before the read until after the restart.
ALTER SYSTEM SET max_prepared_transactions = 2;
-- @restart
BEGIN;
LOCK TABLE subject_audit.event IN SHARE MODE;
PREPARE TRANSACTION 'hold_the_trail';
SET subject_audit.log_reads = subject;
\o /dev/null
SELECT token FROM big WHERE id <= 3;
\o
SELECT pg_sleep(1);
SELECT * FROM subject_audit.writer_status();
-- @restart
SELECT * FROM subject_audit.writer_status();
COMMIT PREPARED 'hold_the_trail';
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT dropped = dropped_recorded AND dropped > 0 FROM subject_audit.writer_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT * FROM subject_audit.writer_status();
SELECT operation, status, title FROM subject_audit.events WHERE operation = 'DROPPED' ORDER BY event_id;
-- The same when the server crashes (immediate shutdown: the postmaster saves
-- the counts as it exits, after its children).
BEGIN;
LOCK TABLE subject_audit.event IN SHARE MODE;
PREPARE TRANSACTION 'hold_the_trail_again';
SET subject_audit.log_reads = subject;
\o /dev/null
SELECT token FROM big WHERE id <= 2;
\o
SELECT pg_sleep(1);
SELECT waiting FROM subject_audit.writer_status();
-- @crash
SELECT * FROM subject_audit.writer_status();
COMMIT PREPARED 'hold_the_trail_again';
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT dropped = dropped_recorded AND dropped > 0 FROM subject_audit.writer_status());
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT * FROM subject_audit.writer_status();
SELECT operation, status, title FROM subject_audit.events WHERE operation = 'DROPPED' ORDER BY event_id;
ALTER SYSTEM RESET max_prepared_transactions;
-- (A standby started later needs at least the primary's setting.)
-- @restart
SHOW max_prepared_transactions;
