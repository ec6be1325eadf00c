-- Issue 20, item 6: routes around the trail, closed.
-- (a) an excluded column's value in a failure event's message, and excluded
--     column names in READ events; (b) an uncapped actor and reason;
-- (c) a made-up actor with nothing beside it; (d) another encoding of an
-- installed key; (e) one event that fails authentication aborting a read.
ALTER DATABASE :"DBNAME" SET subject_audit.log_reads = subject;
ALTER DATABASE :"DBNAME" SET subject_audit.log_failures = on;
\c
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE notes (id int PRIMARY KEY, token text NOT NULL, topic text,
                    secret_note text CONSTRAINT notes_code UNIQUE);
SELECT subject_audit.track('notes', 'token', '{secret_note}');
INSERT INTO notes VALUES (1, 'n-1', 'first', 'the secret value');
-- A table without excluded columns whose trigger writes into notes.
CREATE TABLE inbox (id int PRIMARY KEY, token text NOT NULL, body text);
SELECT subject_audit.track('inbox', 'token');
CREATE FUNCTION inbox_to_notes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notes VALUES (NEW.id, NEW.token, 'from inbox', NEW.body);
    RETURN NEW;
END $$;
CREATE TRIGGER to_notes AFTER INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION inbox_to_notes();
CREATE ROLE r25_app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON notes, inbox TO r25_app;
-- Everything a subject's trail says, as one text per event (the READ events
-- of reading it left out).
CREATE FUNCTION trail(token text) RETURNS TABLE (operation text, status text, sqlstate text,
                                                 description text, changed_columns text[])
LANGUAGE sql AS $$
    SELECT operation, status, sqlstate, description, changed_columns
    FROM subject_audit.audit_for_subject(token)
    WHERE title NOT LIKE 'viewed audit trail%' AND title NOT LIKE 'exported audit trail%'
    ORDER BY event_id
$$;

-- (a) 1. A unique violation on the excluded column: its DETAIL quotes the value.
\c - r25_app
INSERT INTO notes VALUES (2, 'n-2', 'second', 'the secret value');
-- 2. A cast of the excluded column's value: the message itself quotes it.
INSERT INTO notes (id, token, topic) SELECT 3, 'n-3', secret_note::int::text FROM notes WHERE id = 1;
-- 3. Through a table without excluded columns: its trigger's insert fails.
INSERT INTO inbox VALUES (4, 'n-4', 'the secret value');
-- 4. A READ of every column, and one of the excluded column alone.
SELECT * FROM notes WHERE id = 1;
SELECT token, secret_note FROM notes WHERE id = 1;
SELECT secret_note FROM notes WHERE id = 1;
COPY notes (token, secret_note) TO STDOUT;
\c - postgres
SELECT subject_audit.wait_for_writer();
SELECT subject_audit.unlock(:'sk');
SELECT * FROM trail('n-2');
SELECT * FROM trail('n-4');
SELECT * FROM trail('n-1');
-- The excluded value is in no event's decrypted text, nor in any export; its
-- name is in no event's metadata.
SELECT count(*) AS events_quoting_it
FROM (SELECT t::text FROM subject_audit.audit_for_subject('n-1') t
      UNION ALL SELECT t::text FROM subject_audit.audit_for_subject('n-2') t
      UNION ALL SELECT t::text FROM subject_audit.audit_for_subject('n-4') t
      UNION ALL SELECT subject_audit.export_subject(x)::text FROM unnest('{n-1,n-2,n-3,n-4}'::text[]) x) q(t)
WHERE t LIKE '%secret value%' OR t LIKE '%secret_note%';
-- The reads without the subject column in their output (statement-level).
SELECT title, changed_columns FROM subject_audit.events
WHERE operation = 'READ' AND table_name = 'public.notes' AND subject_ref IS NULL ORDER BY event_id;
SELECT count(*) AS labels_naming_it FROM subject_audit.event_label WHERE 'secret_note' = ANY (changed_columns);
-- The statement with no subject (the cast) keeps SQLSTATE and title only.
SELECT status, sqlstate, title FROM subject_audit.events WHERE status = 'error' ORDER BY event_id;

-- (b) An actor or reason past its limit is refused, without repeating it.
SET subject_audit.reason = 'ticket #1';
SELECT set_config('subject_audit.reason', repeat('x', 100000), false);
SELECT set_config('subject_audit.actor', repeat('a', 201), false);
SHOW subject_audit.reason;
-- Up to the limit, in characters.
SELECT length(set_config('subject_audit.reason', repeat('é', 1000), false));
RESET subject_audit.reason;

-- (c) A made-up actor shows beside the role that acted.
\c - r25_app
SET subject_audit.actor = 'postgres';
UPDATE notes SET topic = 'changed' WHERE id = 1;
\c - postgres
SELECT subject_audit.unlock(:'sk');
SELECT operation, actor, db_role FROM subject_audit.events
WHERE table_name = 'public.notes' AND operation = 'UPDATE';
SELECT operation, actor, db_role FROM subject_audit.audit_for_subject('n-1') WHERE operation = 'UPDATE';
SELECT e ->> 'actor' AS actor, e ->> 'database_role' AS database_role
FROM jsonb_array_elements(subject_audit.export_subject('n-1') -> 'events') e
WHERE e ->> 'operation' = 'UPDATE';

-- (d) The installed key under another encoding (top bit set) is refused.
SELECT subject_audit.install_public_key(set_byte(:'pk'::bytea, 31, get_byte(:'pk'::bytea, 31) | 128));
SELECT count(*) AS keys FROM subject_audit.writer_key;

-- (e) One event whose ciphertext was altered (past the append-only trigger,
-- as a superuser could): the rest of the trail is read and exported.
ALTER TABLE subject_audit.event DISABLE TRIGGER append_only;
UPDATE subject_audit.event SET payload = set_byte(payload, 0, get_byte(payload, 0) # 1)
WHERE event_id = (SELECT min(event_id) FROM subject_audit.events
                  WHERE table_name = 'public.notes' AND operation = 'UPDATE');
ALTER TABLE subject_audit.event ENABLE TRIGGER append_only;
SELECT operation, description, before, after FROM subject_audit.audit_for_subject('n-1')
WHERE operation IN ('INSERT', 'UPDATE') ORDER BY event_id;
SELECT e ->> 'operation' AS operation, e ->> 'authenticated' AS authenticated,
       e -> 'after' AS after
FROM jsonb_array_elements(subject_audit.export_subject('n-1') -> 'events') e
WHERE e ->> 'operation' IN ('INSERT', 'UPDATE');
