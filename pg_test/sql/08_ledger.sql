-- The tamper-evident ledger: seal, verify, checkpoint. Each tampering runs
-- as a superuser who switched triggers off (session_replication_role), in
-- a transaction that verify() inspects and that is then rolled back.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE orders (id int PRIMARY KEY, customer text, item text);
SELECT subject_audit.track('orders', 'customer');
INSERT INTO orders SELECT g, 'c' || (g % 3), 'item ' || g FROM generate_series(1, 6) g;
UPDATE orders SET item = item || '!' WHERE id <= 2;

-- Append-only for everyone, the owner included.
UPDATE subject_audit.event SET txid = 0 WHERE event_id = 1;
DELETE FROM subject_audit.event WHERE event_id = 1;
TRUNCATE subject_audit.event;
UPDATE subject_audit.event_label SET actor = 'x';
DELETE FROM subject_audit.event_label;
TRUNCATE subject_audit.event_label;

SELECT subject_audit.seal() AS sealed;
SELECT subject_audit.seal() AS sealed_again;
SELECT block_id, event_count, first_event_id, last_event_id FROM subject_audit.block;
SELECT * FROM subject_audit.verify();
SELECT subject_audit.checkpoint() AS cp \gset
SELECT :'cp' ~ '^psa1:1:[0-9a-f]{64}$' AS checkpoint_format;
-- Events written since are counted as unsealed, then sealed into block 2.
DELETE FROM orders WHERE id = 6;
SELECT ok, events_checked, unsealed FROM subject_audit.verify(:'cp');
SELECT subject_audit.seal() AS sealed;
SELECT * FROM subject_audit.verify(:'cp');
SELECT subject_audit.checkpoint() AS cp_latest \gset

SET session_replication_role = replica;
-- 1. A changed field of a sealed event.
BEGIN;
UPDATE subject_audit.event SET at = at - interval '1 day' WHERE event_id = 3;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- ... of the label it shares with others: each of them is reported.
BEGIN;
UPDATE subject_audit.event_label SET actor = 'someone else'
WHERE label_id = (SELECT label_id FROM subject_audit.event WHERE event_id = 3);
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- ... another label swapped in (a real one: an UPDATE's for an INSERT's).
BEGIN;
UPDATE subject_audit.event SET label_id = (SELECT label_id FROM subject_audit.event WHERE event_id = 9)
WHERE event_id = 3;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- ... or its label gone: the views still list its events, reading them stops.
BEGIN;
DELETE FROM subject_audit.event_label WHERE label_id = (SELECT label_id FROM subject_audit.event WHERE event_id = 9);
SELECT ok, problems FROM subject_audit.verify();
SELECT event_id, operation, subject_ref IS NOT NULL AS has_subject FROM subject_audit.events WHERE event_id >= 9;
SELECT subject_audit.unlock(:'sk') AS unlocked;
SELECT event_id, operation FROM subject_audit.audit_for_subject('c1');
ROLLBACK;
-- ... even when the attacker recomputes nothing else: the ciphertext swapped too.
BEGIN;
UPDATE subject_audit.event SET payload = (SELECT payload FROM subject_audit.event WHERE event_id = 4) WHERE event_id = 3;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 2. A deleted sealed event.
BEGIN;
DELETE FROM subject_audit.event WHERE event_id = 5;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 3. An event inserted into a sealed range (a copy of a real one under a new id).
BEGIN;
INSERT INTO subject_audit.event
SELECT 1000, at, txid, subject_key_id, context_id, label_id, title, nonce, payload, row_hash
FROM subject_audit.event WHERE event_id = 2;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 4. An event moved within its range.
BEGIN;
UPDATE subject_audit.event SET event_id = 999 WHERE event_id = 2;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 5. A changed block, and a deleted one.
BEGIN;
UPDATE subject_audit.block SET event_count = event_count - 1 WHERE block_id = 1;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- Dropping the newest block: its events count as unsealed again, and the
-- newest checkpoint no longer matches.
BEGIN;
DELETE FROM subject_audit.block WHERE block_id = 2;
SELECT ok, problems, unsealed FROM subject_audit.verify(:'cp');
SELECT ok, problems, unsealed FROM subject_audit.verify(:'cp_latest');
ROLLBACK;
-- 6. A ledger rebuilt from scratch after removing an event verifies on its own,
-- but not against the checkpoint kept outside.
BEGIN;
DELETE FROM subject_audit.event WHERE event_id = 3;
DELETE FROM subject_audit.block;
SET LOCAL session_replication_role = origin;
SELECT subject_audit.seal() > 0 AS resealed;
SELECT ok, problems FROM subject_audit.verify();
SELECT ok, problems FROM subject_audit.verify(:'cp');
ROLLBACK;
-- 7. A subject key re-labelled as another subject's (its digest changed).
BEGIN;
UPDATE subject_audit.subject_key SET subject_digest = '\x00'
WHERE subject_key_id = (SELECT subject_key_id FROM subject_audit.event WHERE event_id = 3);
SELECT ok, problems[1] FROM subject_audit.verify();
ROLLBACK;
RESET session_replication_role;
SELECT ok, problems FROM subject_audit.verify('not a checkpoint');

-- Erasure never breaks verification.
SELECT subject_audit.forget_subject('c1') AS erased_events;
SELECT subject_audit.seal() AS sealed;
SELECT ok, problems, unsealed FROM subject_audit.verify(:'cp');
-- (A checkpoint belongs outside the database; this table stands in for that.)
CREATE TABLE kept_outside AS SELECT subject_audit.checkpoint() AS cp;
UPDATE orders SET item = 'after crash?' WHERE id = 2;
-- @crash
-- After crash recovery the committed events are there and the ledger verifies.
SELECT count(*) AS events FROM subject_audit.event;
SELECT subject_audit.seal() AS sealed;
SELECT ok, problems, unsealed FROM subject_audit.verify((SELECT cp FROM kept_outside));
