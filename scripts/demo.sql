-- The pg_subject_audit story, played by scripts/demo. psql echoes each query.
\pset footer off
\echo '== 1. The DBA installs the extension and a reader key pair'
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk_hex FROM subject_audit.generate_keypair() \gset
\getenv demo_dir DEMO_DIR
-- Keep the private key outside the database; the demo leaves it in a file.
\o :demo_dir/demo_private_key.hex
\qecho :sk_hex
\o
SELECT subject_audit.install_public_key(:'pk') AS key_id;

\echo '== 2. A customers table is tracked (password_hash never enters the trail)'
CREATE TABLE customers (
    id int PRIMARY KEY,
    token uuid NOT NULL,
    email text,
    full_name text,
    phone text,
    password_hash text
);
SELECT subject_audit.track('customers', 'token', exclude_columns => '{password_hash}');
SELECT table_name, subject_column, exclude_columns FROM subject_audit.tracked;

\echo '== 3. The application (no key, no grant on the audit schema) makes changes'
CREATE ROLE shop_app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO shop_app;
\c - shop_app
BEGIN;
SET LOCAL subject_audit.actor = 'signup-form';
INSERT INTO customers VALUES
    (1, '6f1c1f2e-4c5a-4d7e-9a5b-1f2e3d4c5b6a', 'ann@example.com', 'Ann Lee', '555-0100', 'x1'),
    (2, '0b7e9a3c-2d4f-4e6a-8b1c-3d5e7f9a1b2c', 'bob@example.com', 'Bob Roy', '555-0200', 'x2');
COMMIT;
BEGIN;
SET LOCAL subject_audit.actor = 'support:alice';
SET LOCAL subject_audit.reason = 'ticket #4711';
UPDATE customers SET email = 'ann@new.example', phone = '555-0199' WHERE id = 1;
COMMIT;
BEGIN;
SET LOCAL subject_audit.actor = 'support:alice';
SET LOCAL subject_audit.reason = 'account closed on request';
DELETE FROM customers WHERE id = 2;
COMMIT;
\c - postgres

\echo '== 4. Reporting, no key needed: metadata only'
SELECT event_id, operation, title, actor, changed_columns, subject_ref FROM subject_audit.events ORDER BY event_id;

\echo '== 5. The raw audit rows hold no personal value: ciphertext and digests'
SELECT event_id, label_id, subject_key_id, encode(substr(payload, 1, 16), 'hex') || '...' AS payload_start,
       length(payload) AS payload_bytes
FROM subject_audit.event ORDER BY event_id;
SELECT count(*) AS rows_mentioning_ann FROM subject_audit.event e WHERE e::text LIKE '%ann@%';

\echo '== 6. A reader unlocks the private key and reads one person''s history'
SELECT subject_audit.unlock(decode(:'sk_hex', 'hex')) AS keys_unlocked;
SELECT event_id, operation, description, actor, before, after
FROM subject_audit.audit_for_subject('6f1c1f2e-4c5a-4d7e-9a5b-1f2e3d4c5b6a');

\echo '== 7. The drill-down of one change'
SELECT event_id AS change_id FROM subject_audit.audit_for_subject('6f1c1f2e-4c5a-4d7e-9a5b-1f2e3d4c5b6a')
WHERE operation = 'UPDATE' \gset
SELECT * FROM subject_audit.audit_event('6f1c1f2e-4c5a-4d7e-9a5b-1f2e3d4c5b6a', :change_id);
