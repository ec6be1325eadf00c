-- SPEC §3 properties 1-4, 7, 8: each check here fails if its property breaks.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL, full_name text, note text);
SELECT subject_audit.track('people', 'email');
CREATE ROLE app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON people TO app;

-- 1. Writers need no secret and no grant on the audit schema.
\c - app
SELECT has_schema_privilege('subject_audit', 'USAGE') AS can_use_schema,
       has_schema_privilege('subject_audit', 'CREATE') AS can_create;
INSERT INTO people VALUES (1, 'zoe@example.org', 'Zoë Quartermaine', 'likes tea'),
                          (2, 'yan@example.org', 'Yan Oduya', 'VIP');
UPDATE people SET full_name = 'Zoë Q. Quartermaine' WHERE id = 1;

-- 7. Application roles cannot read, insert, update or delete audit rows.
SELECT count(*) FROM subject_audit.event;
INSERT INTO subject_audit.event (event_id, at, txid, label_id, row_hash) VALUES (999, now(), 1, 1, '\x00');
UPDATE subject_audit.event SET label_id = 1;
INSERT INTO subject_audit.event_label (label_digest, operation, status, actor, db_role, session_role)
VALUES ('\x00', 'INSERT', 'ok', 'x', 'x', 'x');
UPDATE subject_audit.event_label SET actor = 'someone else';
DELETE FROM subject_audit.event;
TRUNCATE subject_audit.event;
SELECT * FROM subject_audit.subject_key;
SELECT * FROM subject_audit.installation;
SELECT subject_audit.track('people', 'email');
SELECT subject_audit.install_public_key('\x01');

\c - postgres
-- 7. The actor recorded is the role that made the change, not the extension owner.
SELECT event_id, operation, actor, db_role, session_role FROM subject_audit.event JOIN subject_audit.event_label USING (label_id) ORDER BY event_id;
-- (the first two are the admin trail: the key install and the track() call)
SET ROLE app;
SET subject_audit.actor = 'portal:agent-9';
DELETE FROM people WHERE id = 2;
RESET ROLE;
RESET subject_audit.actor;
SELECT event_id, operation, actor, db_role FROM subject_audit.event JOIN subject_audit.event_label USING (label_id) ORDER BY event_id;

-- 3. No personal value and no token in plaintext in any table of the audit
-- schema, raw or hex-encoded. The positive control proves the search works.
CREATE FUNCTION pg_temp.audit_rows_containing(needle text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
    hits bigint := 0;
    n bigint;
BEGIN
    FOR t IN SELECT c.oid FROM pg_class c WHERE c.relnamespace = 'subject_audit'::regnamespace AND c.relkind = 'r' LOOP
        EXECUTE format('SELECT count(*) FROM %s r WHERE r::text ILIKE %L OR r::text ILIKE %L',
                       t, '%' || needle || '%', '%' || encode(convert_to(needle, 'UTF8'), 'hex') || '%')
        INTO n;
        hits := hits + n;
    END LOOP;
    RETURN hits;
END $$;
SELECT needle, pg_temp.audit_rows_containing(needle) AS rows_containing_it
FROM unnest(ARRAY['zoe@example.org', 'yan@example.org', 'Quartermaine', 'Oduya', 'likes tea', 'VIP',
                  'public.people']) AS needle;
-- ... and the hex branch finds bytes hidden in a bytea (control table, dropped again).
CREATE TABLE subject_audit.search_control AS SELECT convert_to('hidden@example.org', 'UTF8') AS b;
SELECT pg_temp.audit_rows_containing('hidden@example.org') AS control_hits;
DROP TABLE subject_audit.search_control;

-- 2. Decryption needs an unlocked, matching key.
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
SELECT public_key AS other_pk, private_key AS other_sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.unlock(:'other_sk');
SELECT subject_audit.unlock('\x0102');
SELECT subject_audit.install_public_key(:'other_pk');
-- The other key is installed now, but the events were written under key 1.
SELECT subject_audit.unlock(:'other_sk');
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
SELECT subject_audit.unlock(:'sk');
SELECT operation, before, after FROM subject_audit.audit_for_subject('zoe@example.org');

-- 4. Ciphertext is bound to its event and subject: moved, it fails authentication;
-- that event is marked (a WARNING names it) and the rest of the trail is read.
SELECT min(event_id) AS zoe_1, max(event_id) AS zoe_2 FROM subject_audit.audit_for_subject('zoe@example.org') \gset
SELECT min(event_id) AS yan_1 FROM subject_audit.audit_for_subject('yan@example.org') \gset
-- (Events are append-only; only a superuser switching triggers off can move them.)
SET session_replication_role = replica;
CREATE TEMP TABLE saved AS SELECT event_id, nonce, payload FROM subject_audit.event;
-- (a) swap two events of the same subject
UPDATE subject_audit.event e SET nonce = s.nonce, payload = s.payload
FROM saved s WHERE (e.event_id, s.event_id) IN ((:zoe_1, :zoe_2), (:zoe_2, :zoe_1));
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
UPDATE subject_audit.event e SET nonce = s.nonce, payload = s.payload FROM saved s WHERE e.event_id = s.event_id;
-- (b) move another subject's ciphertext into Zoë's event
UPDATE subject_audit.event e SET nonce = s.nonce, payload = s.payload
FROM saved s WHERE e.event_id = :zoe_1 AND s.event_id = :yan_1;
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
-- (c) flip one bit
UPDATE subject_audit.event e SET nonce = s.nonce, payload = s.payload FROM saved s WHERE e.event_id = s.event_id;
UPDATE subject_audit.event SET payload = set_byte(payload, 5, get_byte(payload, 5) # 1) WHERE event_id = :zoe_2;
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
UPDATE subject_audit.event e SET nonce = s.nonce, payload = s.payload FROM saved s WHERE e.event_id = s.event_id;
SELECT count(*) AS zoe_events_readable_again,
       count(*) FILTER (WHERE description LIKE 'could not be authenticated%') AS unauthenticated
FROM subject_audit.audit_for_subject('zoe@example.org');
-- (d) the same event, only re-attributed to Yan's subject key
BEGIN;
UPDATE subject_audit.event SET subject_key_id = (SELECT subject_key_id FROM subject_audit.event WHERE event_id = :yan_1)
WHERE event_id = :zoe_2;
SELECT count(*) FROM subject_audit.audit_for_subject('yan@example.org');
ROLLBACK;
-- (e) the subject keys themselves swapped between Zoë and Yan: Zoë is shown none of Yan's
-- values (each of his events fails authentication under her digest, and is marked)
BEGIN;
SELECT subject_key_id AS zoe_key, subject_digest AS zoe_digest FROM subject_audit.subject_key
WHERE subject_key_id = (SELECT subject_key_id FROM subject_audit.event WHERE event_id = :zoe_1) \gset
SELECT subject_key_id AS yan_key, subject_digest AS yan_digest FROM subject_audit.subject_key
WHERE subject_key_id = (SELECT subject_key_id FROM subject_audit.event WHERE event_id = :yan_1) \gset
UPDATE subject_audit.subject_key SET subject_digest = '\x00' WHERE subject_key_id = :zoe_key;
UPDATE subject_audit.subject_key SET subject_digest = :'zoe_digest' WHERE subject_key_id = :yan_key;
UPDATE subject_audit.subject_key SET subject_digest = :'yan_digest' WHERE subject_key_id = :zoe_key;
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
ROLLBACK;
-- (f) the event relabelled around its ciphertext: another of her events' label
-- (operation and changed columns are bound to the ciphertext)
BEGIN;
UPDATE subject_audit.event SET label_id = (SELECT label_id FROM subject_audit.event WHERE event_id = :zoe_1)
WHERE event_id = :zoe_2;
SELECT count(*) FROM subject_audit.audit_for_subject('zoe@example.org');
ROLLBACK;
RESET session_replication_role;

-- 4. Each subject has its own key (salt); nothing of Yan's decrypts as Zoë's.
SELECT count(DISTINCT subject_key_id) AS subject_keys, count(DISTINCT salt) AS distinct_salts
FROM subject_audit.subject_key;

-- 8. Random 96-bit nonces, never repeated under a key: 300 events of one subject.
INSERT INTO people SELECT g, 'many@example.org', NULL, NULL FROM generate_series(10, 109) g;
UPDATE people SET note = 'n' WHERE email = 'many@example.org';
DELETE FROM people WHERE email = 'many@example.org';
SELECT count(*) AS events, count(DISTINCT nonce) AS distinct_nonces, min(length(nonce)) AS nonce_bytes
FROM subject_audit.event e JOIN subject_audit.subject_key k USING (subject_key_id)
WHERE k.subject_key_id = (SELECT subject_key_id FROM subject_audit.event ORDER BY event_id DESC LIMIT 1);
