-- Caches never outlive the truth: a backend's first audited write rolls back
-- (taking its writer context and the new subject's key with it); the next
-- write commits and must decrypt.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric);
SELECT subject_audit.track('accounts', 'owner');

\c
BEGIN;
INSERT INTO accounts VALUES (1, 'rita', 10);
ROLLBACK;
INSERT INTO accounts VALUES (1, 'rita', 20);
SELECT count(*) AS writer_contexts FROM subject_audit.writer_context;

-- The same within savepoints: the rolled-back savepoint created the context.
\c
BEGIN;
SAVEPOINT a;
INSERT INTO accounts VALUES (2, 'sam', 1);
ROLLBACK TO SAVEPOINT a;
INSERT INTO accounts VALUES (2, 'sam', 2);
COMMIT;
-- A savepoint that rolls back after the subject key was created in an outer one keeps it.
BEGIN;
INSERT INTO accounts VALUES (3, 'tia', 3);
SAVEPOINT b;
UPDATE accounts SET balance = 4 WHERE id = 3;
ROLLBACK TO SAVEPOINT b;
UPDATE accounts SET balance = 5 WHERE id = 3;
COMMIT;

-- A key created by a transaction that rolls back never reaches the cache
-- shared by all backends, not even when the same backend commits later; nor
-- does a key created in a savepoint that rolls back: new backends create
-- these subjects' keys afresh.
BEGIN;
INSERT INTO accounts VALUES (4, 'uma', 6);
ROLLBACK;
BEGIN;
SAVEPOINT c;
INSERT INTO accounts VALUES (5, 'vic', 8);
ROLLBACK TO SAVEPOINT c;
INSERT INTO accounts VALUES (6, 'wes', 9);
COMMIT;
\c
INSERT INTO accounts VALUES (4, 'uma', 7);
INSERT INTO accounts VALUES (5, 'vic', 10);
SELECT count(*) AS events_without_their_key FROM subject_audit.event e
WHERE e.subject_key_id IS NOT NULL
  AND NOT EXISTS (SELECT FROM subject_audit.subject_key k WHERE k.subject_key_id = e.subject_key_id);
-- Event labels too: rita's INSERT label was first added by the rolled-back
-- transaction, tia's UPDATE label by the rolled-back savepoint b.
SELECT count(*) AS events_without_their_label FROM subject_audit.event e
WHERE NOT EXISTS (SELECT FROM subject_audit.event_label l WHERE l.label_id = e.label_id);

SELECT subject_audit.unlock(:'sk');
SELECT owner, operation, after
FROM (VALUES ('rita'), ('sam'), ('tia'), ('uma'), ('vic'), ('wes')) AS o(owner), subject_audit.audit_for_subject(owner)
ORDER BY event_id;
