-- Two sessions at once: a long-lived writer (through dblink) keeps its caches
-- while another session changes keys and the table. Nothing it caches may
-- outlive the change.
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION dblink;
SELECT public_key AS pk1, private_key AS sk1 FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk1');
CREATE TABLE members (id int PRIMARY KEY, member text, email text);
SELECT subject_audit.track('members', 'member');
CREATE ROLE writer LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON members TO writer;
SELECT dblink_connect('w', format('dbname=%s user=writer host=%s port=%s',
                                  current_database(), current_setting('unix_socket_directories'), current_setting('port')));

-- The writer session has no key and writes under key 1.
SELECT dblink_exec('w', $$INSERT INTO members VALUES (1, 'm1', 'one@example.com')$$);

-- Key rotation in this session: the writer must switch to key 2 at its next write.
SELECT public_key AS pk2, private_key AS sk2 FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk2');
SELECT dblink_exec('w', $$UPDATE members SET email = 'uno@example.com' WHERE id = 1$$);
SELECT e.event_id, l.operation, c.key_id
FROM subject_audit.event e JOIN subject_audit.event_label l ON l.label_id = e.label_id
JOIN subject_audit.writer_context c USING (context_id) ORDER BY e.event_id;

-- ALTER TABLE in this session: the writer must capture the new column.
ALTER TABLE members ADD COLUMN phone text;
SELECT dblink_exec('w', $$UPDATE members SET phone = '555-1' WHERE id = 1$$);
-- Renaming the subject column is followed (tracking is by column number).
ALTER TABLE members RENAME COLUMN member TO member_ref;
SELECT dblink_exec('w', $$UPDATE members SET email = 'one@example.com' WHERE id = 1$$);
SELECT table_name, subject_column, exclude_columns FROM subject_audit.tracked;

-- Re-tracking with an exclusion: the writer stops recording that column.
SELECT subject_audit.track('members', 'member_ref', '{email}');
SELECT dblink_exec('w', $$UPDATE members SET email = 'hidden@example.com', phone = '555-2' WHERE id = 1$$);

-- Reading needs both keys: the trail spans the rotation.
SELECT subject_audit.unlock(:'sk2');
SELECT count(*) FROM subject_audit.audit_for_subject('m1');
SELECT subject_audit.unlock(:'sk1');
SELECT event_id, operation, changed_columns, before, after FROM subject_audit.audit_for_subject('m1');

-- Two sessions bringing in the same 300 new people at once (a bulk of new
-- subjects: their keys are inserted without ON CONFLICT, undone if some
-- exist, then with ON CONFLICT, which skips those). The writer's insert
-- waits for this transaction's new keys; once they commit, it uses them:
-- one live key per person, and both sessions' events under it.
CREATE TABLE people (id int PRIMARY KEY, person text NOT NULL, note text);
SELECT subject_audit.track('people', 'person');
GRANT SELECT, INSERT ON people TO writer;
BEGIN;
INSERT INTO people SELECT g, 'p' || g, 'here' FROM generate_series(1, 300) g;
SELECT dblink_send_query('w', $$INSERT INTO people SELECT 1000 + g, 'p' || g, 'writer' FROM generate_series(1, 300) g$$);
SELECT pg_sleep(0.5);
COMMIT;
SELECT * FROM dblink_get_result('w') AS r(status text);
SELECT * FROM dblink_get_result('w') AS r(status text); -- done: the connection is free again
SELECT count(*) AS live_keys, count(DISTINCT subject_digest) AS people
FROM subject_audit.subject_key WHERE salt IS NOT NULL;
SELECT count(DISTINCT e.subject_key_id) AS keys_used, count(*) AS events
FROM subject_audit.event e JOIN subject_audit.event_label l USING (label_id)
WHERE l.table_name = 'public.people';
SELECT string_agg(after->>'note', ',' ORDER BY event_id) FROM subject_audit.audit_for_subject('p123');

-- The same, but this transaction rolls back: the writer then creates the keys.
BEGIN;
INSERT INTO people SELECT 2000 + g, 'q' || g, 'gone' FROM generate_series(1, 300) g;
SELECT dblink_send_query('w', $$INSERT INTO people SELECT 3000 + g, 'q' || g, 'writer' FROM generate_series(1, 300) g$$);
SELECT pg_sleep(0.5);
ROLLBACK;
SELECT * FROM dblink_get_result('w') AS r(status text);
SELECT * FROM dblink_get_result('w') AS r(status text); -- done: the connection is free again
SELECT count(*) AS live_keys, count(DISTINCT subject_digest) AS people
FROM subject_audit.subject_key WHERE salt IS NOT NULL;
SELECT string_agg(after->>'note', ',' ORDER BY event_id) FROM subject_audit.audit_for_subject('q123');
SELECT dblink_disconnect('w');
