-- pg_dump / pg_restore: the restored database reads the trail with the key,
-- finds subjects by their tokens, verifies the ledger against a checkpoint
-- taken before the dump, and goes on writing, sealing and verifying.
\set origdb :DBNAME
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE members (id int PRIMARY KEY, who text, email text);
SELECT subject_audit.track('members', 'who');
INSERT INTO members VALUES (1, 'ann', 'ann@example.com'), (2, 'ben', 'ben@example.com');
-- A partitioned tracked table too, restored in parallel below.
CREATE TABLE visits (id int, region text, who text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE visits_eu PARTITION OF visits FOR VALUES IN ('eu');
CREATE TABLE visits_us PARTITION OF visits FOR VALUES IN ('us');
SELECT subject_audit.track('visits', 'who');
INSERT INTO visits VALUES (1, 'eu', 'ann'), (2, 'us', 'ann');
UPDATE members SET email = 'ann@new.example' WHERE id = 1;
SELECT subject_audit.forget_subject('ben') > 0 AS ben_erased;
SELECT subject_audit.seal() > 0 AS sealed;
SELECT subject_audit.checkpoint() AS checkpoint \gset
\setenv DUMP_DB :DBNAME
\! pg_dump -Fc -d "$DUMP_DB" -f "$PG_TEST_DIR/16.dump" && echo dumped
CREATE DATABASE restored_16;
\! pg_restore --exit-on-error -j 2 -d restored_16 "$PG_TEST_DIR/16.dump" && echo restored

\set restored 'dbname=restored_16 options=-csubject_audit.session_key=' :sk
\c :restored
-- Restored into a cluster whose transaction counter is behind the sealed
-- ledger (simulated with a block far ahead): writes are refused, not let
-- fall into sealed blocks.
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO subject_audit.block (block_id, from_txid, to_txid, event_count, merkle_root, previous_hash, block_hash)
VALUES (1000, 0, 1000000000000, 0, '\x00', '\x00', '\x00');
SET LOCAL session_replication_role = origin;
DO $$ BEGIN
    UPDATE members SET email = 'ann@refused.example' WHERE id = 1;
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RAISE NOTICE 'refused: %', regexp_replace(SQLERRM, '[0-9]+', 'N', 'g');
END $$;
ROLLBACK;
SELECT operation, before, after FROM subject_audit.audit_for_subject('ann') WHERE operation <> 'READ';
SELECT operation, before, after FROM subject_audit.audit_for_subject('ben') WHERE operation <> 'READ';
SELECT ok, problems FROM subject_audit.verify(:'checkpoint');
SELECT table_name, subject_column FROM subject_audit.tracked ORDER BY 1;
-- Restored partitions are captured, directly and through the parent, with no gap reported.
INSERT INTO visits_us VALUES (3, 'us', 'ann');
INSERT INTO visits VALUES (4, 'eu', 'ann');
SELECT operation, table_name, after FROM subject_audit.audit_for_subject('ann') WHERE table_name = 'public.visits';
SELECT count(*) AS capture_off_events FROM subject_audit.events WHERE operation = 'CAPTURE_OFF';
-- It goes on: new events, new subjects, new keys, sealing.
INSERT INTO members VALUES (3, 'cat', 'cat@example.com');
UPDATE members SET email = 'ann@restored.example' WHERE id = 1;
SELECT operation, after FROM subject_audit.audit_for_subject('ann') WHERE operation = 'UPDATE';
SELECT count(*) = count(DISTINCT event_id) AS ids_unique FROM subject_audit.events;
SELECT public_key AS pk2 FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk2') > 1 AS new_key;
SELECT subject_audit.seal() > 0 AS sealed;
SELECT ok, problems FROM subject_audit.verify(:'checkpoint');
\c :origdb postgres
DROP DATABASE restored_16;
