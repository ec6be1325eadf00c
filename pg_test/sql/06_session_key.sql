-- subject_audit.session_key unlocks a session from its startup options: the
-- key appears in no statement (so in no log line), SHOW masks it, pg_settings
-- does not list it. The server here logs every statement and runs
-- pg_stat_statements.
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION pg_stat_statements;
-- The private key goes straight from the result into a psql variable.
SELECT public_key AS pk, encode(private_key, 'hex') AS sk_hex FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE clients (id int PRIMARY KEY, token text, email text);
SELECT subject_audit.track('clients', 'token');
INSERT INTO clients VALUES (1, 't-1', 'one@example.com');
CREATE ROLE reader LOGIN;
SELECT subject_audit.grant_reader('reader');
\getenv test_dir PG_TEST_DIR
\setenv SK_HEX :sk_hex
\set with_key 'dbname=' :DBNAME ' user=reader options=-csubject_audit.session_key=' :sk_hex
\set superuser_with_key 'dbname=' :DBNAME ' user=postgres options=-csubject_audit.session_key=' :sk_hex
\set with_malformed_key 'dbname=' :DBNAME ' user=reader options=-csubject_audit.session_key=abcd'
\c :with_key
-- Nobody but a superuser may even ask.
SHOW subject_audit.session_key;
SELECT current_setting('subject_audit.session_key') AS current_setting;
SELECT count(*) AS listed_in_pg_settings FROM pg_settings WHERE name = 'subject_audit.session_key';
SELECT event_id, operation, after FROM subject_audit.audit_for_subject('t-1');
SELECT subject_audit.lock();
SELECT count(*) FROM subject_audit.audit_for_subject('t-1');
-- Never stored: not per role, not per database (the value is not echoed).
ALTER ROLE reader SET subject_audit.session_key = 'abababababababababababababababababababababababababababababababab';
\c :with_malformed_key
SELECT count(*) FROM subject_audit.audit_for_subject('t-1');
-- A superuser session unlocked the same way sees only the mask.
\c :superuser_with_key
SHOW subject_audit.session_key;
SELECT count(*) AS events_readable FROM subject_audit.audit_for_subject('t-1');
-- What every session is running, and every statement pg_stat_statements
-- kept, as a superuser sees them.
\o :test_dir/activity.txt
SELECT query FROM pg_stat_activity;
SELECT query FROM pg_stat_statements;
\o
-- The server log and pg_stat_statements hold this scenario's statements (the
-- track() call is found) and never the key.
\! grep -q "subject_audit.track('clients'" "$PG_TEST_DIR/server.log" && echo "log has statements"
\! grep -q "subject_audit.track" "$PG_TEST_DIR/activity.txt" && echo "pg_stat_statements has statements"
\! cat "$PG_TEST_DIR/server.log" "$PG_TEST_DIR/activity.txt" | grep -c "$SK_HEX"
