-- Issue 20, item 2: erasure reaches every value a row held while it belonged
-- to the erased subject, or before it was first assigned to it. A row whose
-- subject is NULL belongs to nobody: its events keep their metadata but no
-- values (no key that any erasure could shred would cover them). A change of
-- subject splits by ownership: the old subject's event holds the row as it
-- left (its before image), the new subject's the row as it arrived (its after
-- image), neither the other's values.
ALTER DATABASE :"DBNAME" SET subject_audit.log_reads = subject;
ALTER DATABASE :"DBNAME" SET subject_audit.log_failures = on;
\c
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
CREATE TABLE customers (id int PRIMARY KEY, token text, email text, plan text);
SELECT subject_audit.track('customers', 'token');
-- c-5's values, to look for everywhere after the erasure.
CREATE TABLE c5_values (v text);
INSERT INTO c5_values VALUES ('five@example.com'), ('five@new.example'), ('gold'),
    ('seven@unowned.example'), ('trial'), ('silver'), ('eight@for-five.example'), ('nine@of-five.example');
-- Every event of these subjects, as audit_for_subject shows it (the trail reads themselves left out).
CREATE FUNCTION trail(token text) RETURNS TABLE (operation text, description text, changed_columns text[],
                                                 before jsonb, after jsonb)
LANGUAGE sql AS $$
    SELECT operation, description, changed_columns, before, after
    FROM subject_audit.audit_for_subject(token) WHERE operation <> 'READ' ORDER BY event_id
$$;

-- c-5's own row, changed once.
INSERT INTO customers VALUES (5, 'c-5', 'five@example.com', 'gold');
UPDATE customers SET email = 'five@new.example' WHERE id = 5;
-- A row inserted with no subject and changed while nobody's, then assigned to c-5.
INSERT INTO customers VALUES (7, NULL, 'seven@unowned.example', 'trial');
UPDATE customers SET plan = 'silver' WHERE id = 7;
UPDATE customers SET token = 'c-5' WHERE id = 7;
-- A row of c-8 handed to c-5 with a new email; a row of c-5 handed to c-9 with a new one.
INSERT INTO customers VALUES (8, 'c-8', 'eight@example.com', 'basic'),
                             (9, 'c-5', 'nine@of-five.example', 'basic');
UPDATE customers SET token = 'c-5', email = 'eight@for-five.example' WHERE id = 8;
UPDATE customers SET token = 'c-9', email = 'nine@example.com' WHERE id = 9;

-- Before the erasure, c-5's trail and export show every value of its rows,
-- those of row 7 from before it was assigned too (in the assignment event).
SELECT * FROM trail('c-5');
SELECT e ->> 'operation' AS operation, e -> 'before' AS before, e -> 'after' AS after
FROM jsonb_array_elements(subject_audit.export_subject('c-5') -> 'events') e
WHERE e ->> 'operation' <> 'READ';
-- c-8 sees its row leave (its values only), c-9 its row arrive (its values only).
SELECT * FROM trail('c-8');
SELECT * FROM trail('c-9');

-- The issue's attack: blank the subject and the email, then erase. The rows
-- keep their plan and id, now nobody's.
UPDATE customers SET token = NULL, email = NULL WHERE token = 'c-5';
-- Changes, reads and a failure of the rows while nobody's.
UPDATE customers SET id = id + 100 WHERE token IS NULL;
SELECT id, plan FROM customers WHERE token IS NULL ORDER BY id;
CREATE FUNCTION refuse_gold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'plan % is locked', OLD.plan; END $$;
CREATE TRIGGER refuse_gold BEFORE UPDATE ON customers FOR EACH ROW WHEN (OLD.plan = 'gold')
    EXECUTE FUNCTION refuse_gold();
UPDATE customers SET plan = 'platinum' WHERE id = 105;
DELETE FROM customers WHERE id = 107;
SELECT subject_audit.wait_for_writer();
SELECT subject_audit.forget_subject('c-5') AS events_of_c5;
TRUNCATE customers;

-- Nobody's events hold no values: none has a payload at all.
SELECT l.operation, l.status, l.changed_columns, e.payload IS NULL AS no_payload
FROM subject_audit.event e JOIN subject_audit.event_label l USING (label_id)
WHERE e.subject_key_id IS NULL AND l.table_name = 'public.customers' ORDER BY e.event_id;
-- c-5's trail keeps the metadata, no values.
SELECT * FROM trail('c-5');
-- Every trail the key can still open: none holds any of c-5's values.
SELECT t.token, count(*) AS events,
       count(*) FILTER (WHERE EXISTS (SELECT FROM c5_values v
           WHERE strpos(coalesce(before::text, '') || coalesce(after::text, '') || description, v.v) > 0)) AS with_c5_values
FROM (VALUES ('c-5'), ('c-8'), ('c-9')) t(token), trail(t.token)
GROUP BY t.token ORDER BY t.token;
SELECT * FROM trail('c-8');
SELECT * FROM trail('c-9');
