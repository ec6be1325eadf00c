-- Least privilege and accountability: ready-made roles, each tried against
-- what it may and may not do; subject-bound sessions; the admin trail
-- (unlocks, grants, settings changes, capture switched off), sealed.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE ROLE r13_app LOGIN;
CREATE ROLE r13_portal LOGIN;
CREATE ROLE r13_dba LOGIN;
CREATE ROLE r13_auditor LOGIN;
CREATE ROLE r13_nobody LOGIN;
CREATE TABLE accounts (id int PRIMARY KEY, owner text, email text);
ALTER TABLE accounts OWNER TO r13_dba;
GRANT ALL ON accounts TO r13_app, r13_nobody;
SELECT subject_audit.grant_writer('r13_app'), subject_audit.grant_reader('r13_portal'),
       subject_audit.grant_admin('r13_dba'), subject_audit.grant_auditor('r13_auditor');
-- Refused: an unknown role; the grant functions for anyone but a superuser.
SELECT subject_audit.grant_reader('no such role');
SET ROLE r13_dba;
SELECT subject_audit.grant_admin('r13_nobody');
RESET ROLE;

-- PUBLIC (r13_nobody, no grant): nothing in the schema, not even a key pair or a report.
SET ROLE r13_nobody;
SELECT subject_audit.generate_keypair();
SELECT count(*) FROM subject_audit.events;
SELECT count(*) FROM subject_audit.audit_for_subject('o-1');
SELECT subject_audit.record_access('o-1', 'opened account');
RESET ROLE;

-- Admin: keys and tracking, reports without personal values; no reading, no raw rows.
SET ROLE r13_dba;
SELECT subject_audit.track('accounts', 'owner');
SELECT count(*) >= 0 AS reports FROM subject_audit.activity;
SELECT count(*) FROM subject_audit.event;
SELECT count(*) FROM subject_audit.subject_key;
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
SELECT count(*) FROM subject_audit.audit_for_subject('o-1');
RESET ROLE;

-- Writer: its changes are captured; it records its own retrievals; it reads nothing.
SET ROLE r13_app;
INSERT INTO accounts VALUES (1, 'o-1', 'one@example.com'), (2, 'o-2', 'two@example.com');
UPDATE accounts SET email = 'uno@example.com' WHERE id = 1;
SELECT subject_audit.record_access('o-1', 'opened account') > 0 AS recorded;
SELECT count(*) FROM subject_audit.audit_for_subject('o-1');
SELECT subject_audit.untrack('accounts');
INSERT INTO subject_audit.event (event_id, at, txid, label_id, row_hash) VALUES (0, now(), 0, 1, '\x00');
RESET ROLE;
-- A role with no grant at all on the schema is captured all the same.
SET ROLE r13_nobody;
UPDATE accounts SET email = 'two@new.example' WHERE id = 2;
RESET ROLE;

-- Auditor: ledger and reports; no sealing, no reading, no erasure.
SELECT subject_audit.seal() > 0 AS sealed;
SET ROLE r13_auditor;
SELECT ok, problems FROM subject_audit.verify();
SELECT length(subject_audit.checkpoint()) > 0 AS has_checkpoint;
SELECT operation, count(*) FROM subject_audit.events GROUP BY 1 ORDER BY 1;
SELECT subject_audit.seal();
SELECT count(*) FROM subject_audit.audit_for_subject('o-1');
SELECT subject_audit.forget_subject('o-1');
SELECT subject_audit.track('accounts', 'email');
RESET ROLE;

-- Reader, bound to o-1 from its startup options (a customer portal).
\set bound 'dbname=' :DBNAME ' user=r13_portal options=''-csubject_audit.session_key=' :sk ' -csubject_audit.session_subject=o-1'''
\c :bound
SELECT operation, description FROM subject_audit.audit_for_subject('o-1');
-- Every other token is refused, by every function.
SELECT count(*) FROM subject_audit.audit_for_subject('o-2');
SELECT count(*) FROM subject_audit.audit_event('o-2', 1);
SELECT subject_audit.export_subject('o-2');
SELECT subject_audit.record_access('o-2', 'opened account');
SELECT subject_audit.bind_subject('o-2');
-- Binding again to the same subject is fine; there is no way to unbind.
SELECT subject_audit.bind_subject('o-1');
SET subject_audit.session_subject = 'o-2';
RESET subject_audit.session_subject;
SHOW subject_audit.session_subject;
DISCARD ALL;
SELECT subject_audit.lock();
SELECT count(*) FROM subject_audit.audit_for_subject('o-2');
-- Readers have no admin rights and no raw rows either.
SELECT subject_audit.track('accounts', 'email');
SELECT count(*) FROM subject_audit.event;

-- An unbound reader binds itself with bind_subject().
\set reader 'dbname=' :DBNAME ' user=r13_portal options=-csubject_audit.session_key=' :sk
\c :reader
SELECT count(*) > 0 AS reads_o2 FROM subject_audit.audit_for_subject('o-2');
SELECT subject_audit.bind_subject('o-1');
SELECT count(*) FROM subject_audit.audit_for_subject('o-2');
SELECT subject_audit.bind_subject('');

-- The token is never stored: a binding anywhere but the startup options is refused.
\c - postgres
ALTER ROLE r13_portal SET subject_audit.session_subject = 'o-1';
ALTER SYSTEM SET subject_audit.session_subject = 'o-1';
SHOW subject_audit.session_subject;

-- The admin trail: settings changes and capture switched off behind untrack()'s back.
ALTER ROLE r13_app SET subject_audit.actor = 'billing service';
ALTER ROLE r13_app RESET subject_audit.actor;
ALTER SYSTEM SET subject_audit.seal_interval = 5000;
ALTER SYSTEM RESET subject_audit.seal_interval;
ALTER DATABASE postgres SET work_mem = '8MB';
ALTER DATABASE postgres RESET work_mem;
SET ROLE r13_dba;
ALTER TABLE accounts DISABLE TRIGGER subject_audit_capture_update;
-- Back on, but only in origin mode: replica sessions would go uncaptured.
ALTER TABLE accounts ENABLE TRIGGER subject_audit_capture_update;
ALTER TABLE accounts ENABLE REPLICA TRIGGER subject_audit_capture_insert;
-- Fully back: no new gap, no event.
ALTER TABLE accounts ENABLE ALWAYS TRIGGER subject_audit_capture_update,
                     ENABLE ALWAYS TRIGGER subject_audit_capture_insert;
DROP TRIGGER subject_audit_capture_delete ON accounts;
-- Capture triggers cannot be renamed, replaced or made by hand.
ALTER TRIGGER subject_audit_capture_insert ON accounts RENAME TO quiet;
CREATE OR REPLACE TRIGGER subject_audit_capture_update AFTER UPDATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION subject_audit.capture_change();
CREATE TRIGGER second_capture AFTER INSERT ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION subject_audit.capture_change();
CREATE TRIGGER other_trigger AFTER INSERT ON accounts FOR EACH STATEMENT EXECUTE FUNCTION suppress_redundant_updates_trigger();
ALTER TRIGGER other_trigger ON accounts RENAME TO subject_audit_capture_delete;
DROP TRIGGER other_trigger ON accounts;
SELECT subject_audit.untrack('accounts');
RESET ROLE;
SELECT operation, title, actor, subject_ref IS NULL AS no_subject
FROM subject_audit.events
WHERE operation NOT IN ('INSERT', 'UPDATE', 'DELETE', 'READ')
ORDER BY event_id;
-- Sealed like every other event; the ledger verifies.
SELECT subject_audit.seal() > 0 AS sealed;
SELECT ok, problems FROM subject_audit.verify();

-- Role names are recorded as they are when the event is written: a rename shows at
-- once, and a rename rolled back gives the old name back.
CREATE TABLE renames (id int PRIMARY KEY, owner text);
SELECT subject_audit.track('renames', 'owner');
CREATE ROLE r13_clerk;
GRANT ALL ON renames TO r13_clerk;
BEGIN;
SET LOCAL ROLE r13_clerk;
INSERT INTO renames VALUES (1, 'o-9');
RESET ROLE;
SAVEPOINT before_rename;
ALTER ROLE r13_clerk RENAME TO r13_clerk_renamed;
SET LOCAL ROLE r13_clerk_renamed;
UPDATE renames SET id = 2;
RESET ROLE;
ROLLBACK TO SAVEPOINT before_rename;
SET LOCAL ROLE r13_clerk;
UPDATE renames SET id = 3;
RESET ROLE;
COMMIT;
ALTER ROLE r13_clerk RENAME TO r13_clerk_renamed;
SET ROLE r13_clerk_renamed;
UPDATE renames SET id = 4;
RESET ROLE;
SELECT l.operation, l.db_role, l.session_role
FROM subject_audit.event e JOIN subject_audit.event_label l USING (label_id)
WHERE l.table_name = 'public.renames' AND l.operation IN ('INSERT', 'UPDATE')
ORDER BY e.event_id;
