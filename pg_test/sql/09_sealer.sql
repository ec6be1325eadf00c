-- With the library preloaded and subject_audit.database naming this
-- database, a background worker seals finished events by itself.
CREATE EXTENSION pg_subject_audit;
SELECT subject_audit.install_public_key(public_key) FROM subject_audit.generate_keypair();
CREATE TABLE notes (id int PRIMARY KEY, who text, body text);
SELECT subject_audit.track('notes', 'who');
INSERT INTO notes SELECT g, 'w' || g, 'note' FROM generate_series(1, 10) g;
-- The worker retries connecting every 10 s while this database did not exist yet.
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT unsealed = 0 FROM subject_audit.verify());
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT ok, events_checked >= 12 AS all_checked, unsealed FROM subject_audit.verify();
SELECT count(*) > 0 AS blocks FROM subject_audit.block;
SELECT backend_type FROM pg_stat_activity WHERE backend_type = 'pg_subject_audit sealer';
