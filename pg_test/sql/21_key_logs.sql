-- Issue 20: a private key reaches no server log line, no pg_stat_statements
-- entry and no other session's pg_stat_activity, whatever route it took. The
-- server logs every statement (log_statement = all, log_min_duration_statement
-- = 0) and the errors' statements (log_min_error_statement = error, the
-- default), and runs pg_stat_statements. The keys go from generate_keypair()
-- into psql variables and the environment only (psql echoes :'sk', not the key).
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION pg_stat_statements;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk') > 0 AS installed;
-- A key whose public key is not installed: unlock() refuses it.
SELECT encode(private_key, 'hex') AS stray FROM subject_audit.generate_keypair() \gset
CREATE ROLE r21_reader LOGIN;
\getenv dir PG_TEST_DIR
\setenv SK :sk
\setenv STRAY :stray
\setenv DB :DBNAME
SELECT pg_stat_statements_reset() IS NULL AS reset;
SELECT 'key logs: statements are logged' AS marker;

-- 1. A failed unlock with the key as a literal.
SELECT subject_audit.unlock(decode(:'stray', 'hex'));
-- 2. unlock() in an aborted transaction.
BEGIN;
SELECT 1 / 0;
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
ROLLBACK;
-- 3. The key stored per role, per database, for the server: refused.
ALTER ROLE r21_reader SET subject_audit.session_key = :'sk';
ALTER DATABASE :"DBNAME" SET subject_audit.session_key = :'sk';
ALTER SYSTEM SET subject_audit.session_key = :'sk';
-- 4. set_config() in a statement that fails, and alone: refused.
SELECT set_config('subject_audit.session_key', :'sk', false) || 1 / 0;
SELECT set_config('subject_audit.session_key', :'sk', false);
-- 5. SET in the session: refused (pooled applications use unlock() with a bind parameter).
SET subject_audit.session_key = :'sk';
SHOW subject_audit.session_key;
-- 6. A prepared unlock run with the key in EXECUTE's text (psql 15 has no
-- \bind: pgbench sends it as a real bind parameter below).
PREPARE open_with(bytea) AS SELECT subject_audit.unlock($1);
EXECUTE open_with(decode(:'stray', 'hex'));
EXECUTE open_with(decode(:'sk', 'hex'));
-- The same in a DO block, which pg_stat_statements would keep verbatim.
DO $$ BEGIN PERFORM subject_audit.lock(); END $$;
\set do_unlock 'DO $$ BEGIN PERFORM subject_audit.unlock(decode(''' :sk ''', ''hex'')); END $$'
:do_unlock;
-- 7. The key as a bind parameter of the extended protocol (pgbench -M
-- extended and -M prepared), once refused with the parameters logged on error.
\! printf 'SELECT subject_audit.unlock(decode(:key, %s));\n' "'hex'" >"$PG_TEST_DIR/unlock.pgbench"
\! pgbench -n -M extended -t 1 -f "$PG_TEST_DIR/unlock.pgbench" -D key="$SK" "$DB" >/dev/null 2>&1 && echo "extended: unlocked"
\! pgbench -n -M prepared -t 1 -f "$PG_TEST_DIR/unlock.pgbench" -D key="$SK" "$DB" >/dev/null 2>&1 && echo "prepared: unlocked"
\! PGOPTIONS="-c log_parameter_max_length_on_error=-1" pgbench -n -M extended -t 1 -f "$PG_TEST_DIR/unlock.pgbench" -D key="$STRAY" "$DB" >/dev/null 2>&1 || echo "extended: refused"
-- 8. A successful unlock with a literal, and what another session sees of
-- one while it runs.
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
\! psql -X -q -d "$DB" -c "SELECT subject_audit.unlock(decode('$SK', 'hex')), pg_sleep(2)" >/dev/null 2>&1 &
SELECT true AS waited FROM pg_sleep(1);
\o :dir/key_logs_views.txt
SELECT query FROM pg_stat_activity WHERE pid <> pg_backend_pid();
SELECT query FROM pg_stat_statements;
\o
SELECT true AS waited FROM pg_sleep(2);
-- pg_stat_statements keeps no statement that carried a key, not even normalized.
SELECT query FROM pg_stat_statements WHERE query ILIKE '%unlock%' OR query ILIKE '%session_key%';
SELECT count(*) > 0 AS other_statements_kept FROM pg_stat_statements WHERE query LIKE '%AS marker%';
-- The log holds this scenario's statements, the hidden ones' traces, and no key;
-- neither do pg_stat_activity and pg_stat_statements as seen above.
SELECT true AS log_flushed FROM pg_sleep(0.5);
\! grep -q "key logs: statements are logged" "$PG_TEST_DIR/server.log" && echo "log has statements"
\! grep -q "hidden by pg_subject_audit" "$PG_TEST_DIR/server.log" && echo "log has hidden statements"
\! grep -q "hidden by pg_subject_audit" "$PG_TEST_DIR/key_logs_views.txt" && echo "pg_stat_activity shows the mask"
\! cat "$PG_TEST_DIR/server.log" "$PG_TEST_DIR/key_logs_views.txt" | grep -ci -e "$SK" -e "$STRAY"
