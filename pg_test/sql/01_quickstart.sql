-- The README story: a DBA tracks a table, an application changes it with no
-- key, a reader with the private key sees one person's history.
CREATE EXTENSION pg_subject_audit;
SELECT extname, extversion FROM pg_extension WHERE extname = 'pg_subject_audit';
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT length(:'pk'::bytea) AS public_key_bytes, length(:'sk'::bytea) AS private_key_bytes;
SELECT subject_audit.install_public_key(:'pk');

CREATE TABLE customers (
    id int PRIMARY KEY,
    token uuid NOT NULL,
    email text,
    phone text,
    password_hash text,
    profile jsonb
);
SELECT subject_audit.track('customers', 'token', exclude_columns => '{password_hash}');
SELECT table_name, subject_column, exclude_columns, since <= now() AS since_is_set FROM subject_audit.tracked;

CREATE ROLE app_writer LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO app_writer;

\c - app_writer
BEGIN;
SET LOCAL subject_audit.actor = 'support:alice';
SET LOCAL subject_audit.reason = 'signup';
INSERT INTO customers VALUES
    (1, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ann@example.com', '555-0100', 'h1', '{"lang": "en"}'),
    (2, 'b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22', 'bob@example.com', '555-0200', 'h2', NULL);
COMMIT;
BEGIN;
SET LOCAL subject_audit.actor = 'support:alice';
SET LOCAL subject_audit.reason = 'ticket #4711';
UPDATE customers SET email = 'ann@new.example', phone = '555-0199' WHERE id = 1;
COMMIT;
-- Changes only to excluded or unchanged columns record nothing.
UPDATE customers SET password_hash = 'h1b', email = email WHERE id = 1;
DELETE FROM customers WHERE id = 2;

\c - postgres
-- Metadata for reporting: no key, no personal values.
SELECT event_id, table_name, operation, title, status, actor, changed_columns,
       length(subject_ref) AS subject_ref_length
FROM subject_audit.events ORDER BY event_id;

-- Without a key nothing decrypts.
SELECT count(*) FROM subject_audit.audit_for_subject('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');

SELECT subject_audit.unlock(:'sk');
SELECT event_id, operation, title, status, description, actor, table_name, changed_columns, before, after
FROM subject_audit.audit_for_subject('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11') \gx
SELECT event_id AS ann_update FROM subject_audit.audit_for_subject('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')
WHERE operation = 'UPDATE' \gset
SELECT * FROM subject_audit.audit_event('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', :ann_update);
-- Another subject's event gives no rows.
SELECT * FROM subject_audit.audit_event('b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22', :ann_update);
SELECT event_id, operation, description, before, after
FROM subject_audit.audit_for_subject('b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22') \gx
-- An unknown subject has no trail.
SELECT count(*) FROM subject_audit.audit_for_subject('no such person');
SELECT subject_audit.lock();
SELECT count(*) FROM subject_audit.audit_for_subject('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');

-- untrack stops capture (leaving an UNTRACK event) and keeps the events.
SELECT subject_audit.untrack('customers');
INSERT INTO customers VALUES (3, 'c2aade77-7e2b-4ef8-bb6d-6bb9bd380a33', 'cy@example.com', NULL, 'h3', NULL);
SELECT operation, count(*) FROM subject_audit.events GROUP BY operation ORDER BY operation;
SELECT count(*) AS tracked FROM subject_audit.tracked;
SELECT subject_audit.untrack('customers');
