-- Issue 20, item 3: DDL that routes around the audit trail, closed.
-- (a) ALTER COLUMN TYPE that may change a recorded value without an UPDATE;
-- (b) DROP COLUMN of a recorded column that holds values (even hidden ones);
-- (c) capture triggers disabled or set to fire in origin mode only;
-- (d) a tracked table renamed away and another table given its name.
-- The table owner is no superuser.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE ROLE r22_owner LOGIN;
GRANT CREATE ON SCHEMA public TO r22_owner;
SELECT subject_audit.grant_admin('r22_owner');
SET ROLE r22_owner;
CREATE TABLE people (id int PRIMARY KEY, token text NOT NULL, name varchar(50),
                     age int, note text, scratch text, memo text);
SELECT subject_audit.track('people', 'token', '{scratch}');
INSERT INTO people VALUES (1, 'p-1', 'Ann', 41, 'likes tea', 'x', NULL),
                          (2, 'p-2', 'Bob', 37, NULL, 'y', NULL);
CREATE FUNCTION ddl_events() RETURNS TABLE (operation text, title text, db_role text)
LANGUAGE sql AS $$
    SELECT operation, title, db_role FROM subject_audit.events
    WHERE operation IN ('ALTER', 'CAPTURE_OFF', 'RENAME', 'TRACK', 'DDL') ORDER BY event_id
$$;

-- (a) Refused: a USING expression on a recorded column and on the subject
-- column, a narrowing varchar (though today's values fit), int to bigint
-- (an implicit cast all the same).
ALTER TABLE people ALTER COLUMN name TYPE text USING upper(name);
ALTER TABLE people ALTER COLUMN token TYPE text USING 'someone else';
ALTER TABLE people ALTER COLUMN name TYPE varchar(3);
ALTER TABLE people ALTER COLUMN age TYPE bigint;
-- Allowed: widening, then to text; and anything on an excluded column.
ALTER TABLE people ALTER COLUMN name TYPE varchar(100);
ALTER TABLE people ALTER COLUMN name TYPE text;
ALTER TABLE people ALTER COLUMN scratch TYPE text USING 'gone';
SELECT id, token, name, age, scratch FROM people ORDER BY id;

-- (b) Refused: a recorded column holding a value; the subject column.
ALTER TABLE people DROP COLUMN note;
ALTER TABLE people DROP COLUMN token;
-- Allowed: after NULLing it (the UPDATE is captured), and a column all NULL.
UPDATE people SET note = NULL WHERE note IS NOT NULL;
ALTER TABLE people DROP COLUMN note;
ALTER TABLE people DROP COLUMN memo;
-- A value the owner's own row security hides: still refused.
ALTER TABLE people ADD COLUMN hidden text;
UPDATE people SET hidden = 'h' WHERE id = 2;
ALTER TABLE people ENABLE ROW LEVEL SECURITY;
ALTER TABLE people FORCE ROW LEVEL SECURITY;
CREATE POLICY nothing ON people USING (false);
SELECT count(*) AS visible FROM people;
ALTER TABLE people DROP COLUMN hidden;
DROP POLICY nothing ON people;
ALTER TABLE people NO FORCE ROW LEVEL SECURITY;
ALTER TABLE people DISABLE ROW LEVEL SECURITY;
SELECT * FROM ddl_events();
SELECT operation, changed_columns FROM subject_audit.events
WHERE operation = 'UPDATE' ORDER BY event_id;

-- (c) Every weakening of capture leaves CAPTURE_OFF.
ALTER TABLE people DISABLE TRIGGER ALL;
ALTER TABLE people ENABLE TRIGGER ALL;
ALTER TABLE people DISABLE TRIGGER subject_audit_capture_update;
SELECT operation, title FROM subject_audit.events WHERE operation = 'CAPTURE_OFF' ORDER BY event_id;
SELECT table_name, capture_ok, problems FROM subject_audit.tracked;
SELECT subject_audit.track('people', 'token', '{scratch}');
SELECT table_name, capture_ok, problems FROM subject_audit.tracked;
SELECT title FROM subject_audit.events WHERE operation = 'TRACK' ORDER BY event_id DESC LIMIT 1;

-- (d) The rename swap: the tracked table goes to old_people, a new table
-- (not tracked) takes the name people.
ALTER TABLE people RENAME TO old_people;
CREATE TABLE people (id int PRIMARY KEY, token text NOT NULL, name text);
SELECT operation, title FROM subject_audit.events WHERE operation = 'RENAME' ORDER BY event_id;
SELECT table_name, capture_ok, problems FROM subject_audit.tracked;
RESET ROLE;
SELECT ok, problems FROM subject_audit.verify();
