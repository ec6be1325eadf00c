-- A bulk of new people gets its keys in one insert. When a probed sample of
-- them has no key, that insert runs without ON CONFLICT, in a subtransaction
-- of ours; if a few of them had a key after all, it fails with a unique
-- violation, is undone, and the batch takes ON CONFLICT. Nothing of that may
-- show: the known people keep their keys, and a statement that fails later
-- for its own reason is recorded with its own SQLSTATE, not ours.
ALTER DATABASE :"DBNAME" SET subject_audit.log_failures = on;
\c
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION pgcrypto;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
CREATE TABLE test_key AS SELECT :'sk'::bytea AS sk;
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE people (id int PRIMARY KEY, token text NOT NULL, note text);
SELECT subject_audit.track('people', 'token');
-- The first capture creates the installation secret.
INSERT INTO people VALUES (0, 'p-0', 'first');
-- The 300 people to come, ranked by their subject digest (keys are looked up
-- and created in that order; the sample is the first 32).
CREATE FUNCTION digest_of(token text) RETURNS bytea LANGUAGE sql AS $$
    SELECT hmac(convert_to(token, 'UTF8'), subject_secret, 'sha256') FROM subject_audit.installation $$;
SELECT digest_of('p-0') = subject_digest AS digest_is_the_extensions FROM subject_audit.subject_key;
CREATE TABLE by_digest AS
    SELECT 'p-' || g AS token, row_number() OVER (ORDER BY digest_of('p-' || g))::int AS rank
    FROM generate_series(1, 300) AS g;
-- The last three of them are known already.
INSERT INTO people SELECT 1000 + rank, token, 'known' FROM by_digest WHERE rank > 297;
CREATE TABLE known_keys AS
    SELECT k.subject_key_id FROM subject_audit.subject_key k JOIN by_digest b ON k.subject_digest = digest_of(b.token)
    WHERE b.rank > 297;
-- An application's trigger, after ours, refuses bulks while this is set.
CREATE FUNCTION refuse_bulk() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('app.refuse', true) = 'on' AND (SELECT count(*) FROM new_rows) > 100 THEN
        RAISE EXCEPTION 'bulk refused' USING ERRCODE = 'P0042';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER zz_refuse AFTER INSERT ON people REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_bulk();
CREATE VIEW failures AS
    SELECT sqlstate, count(*) AS events FROM subject_audit.events WHERE status = 'error' GROUP BY sqlstate;

-- 1. Refused, the error caught by an exception handler. A restart first:
-- no cache holds the known people's keys, so the key insert meets them.
-- @restart
SET app.refuse = on;
DO $$ BEGIN
    INSERT INTO people SELECT rank, token, 'bulk' FROM by_digest;
EXCEPTION WHEN others THEN RAISE NOTICE 'caught %', SQLSTATE;
END $$;
SELECT subject_audit.wait_for_writer();
SELECT * FROM failures;

-- 2. Refused, the error raised to the client.
-- @restart
SET app.refuse = on;
INSERT INTO people SELECT rank, token, 'bulk' FROM by_digest;
SELECT subject_audit.wait_for_writer();
SELECT * FROM failures;

-- 3. Accepted: one live key per person, the known ones' kept.
-- @restart
INSERT INTO people SELECT rank, token, 'bulk' FROM by_digest;
SELECT count(*) AS live_keys, count(DISTINCT subject_digest) AS people
FROM subject_audit.subject_key WHERE erased_at IS NULL;
SELECT count(*) AS events_under_the_known_keys
FROM subject_audit.event WHERE subject_key_id IN (SELECT subject_key_id FROM known_keys);
SELECT subject_audit.unlock(sk) FROM test_key;
SELECT b.rank, string_agg(t.after->>'note', ',' ORDER BY t.event_id) AS notes
FROM by_digest b, subject_audit.audit_for_subject(b.token) t
WHERE b.rank IN (1, 298, 300) AND t.operation = 'INSERT' GROUP BY b.rank ORDER BY b.rank;

-- 4. 300 people none of whom is known: the insert without ON CONFLICT stands.
-- @restart
INSERT INTO people SELECT 2000 + g, 'q-' || g, 'new' FROM generate_series(1, 300) AS g;
SELECT count(*) AS live_keys FROM subject_audit.subject_key WHERE erased_at IS NULL;
SELECT subject_audit.unlock(sk) FROM test_key;
SELECT operation, after->>'note' AS note FROM subject_audit.audit_for_subject('q-150');
