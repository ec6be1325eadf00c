-- Key lifecycle and the right to erasure: rotation, retirement, a keyring
-- that DISCARD ALL wipes, crypto-shredding one subject.
CREATE EXTENSION pg_subject_audit;
CREATE EXTENSION dblink;
SELECT public_key AS pk1, encode(private_key, 'hex') AS sk1 FROM subject_audit.generate_keypair() \gset
SELECT public_key AS pk2, encode(private_key, 'hex') AS sk2 FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk1');
CREATE TABLE users (id int PRIMARY KEY, login text, email text);
SELECT subject_audit.track('users', 'login');
INSERT INTO users VALUES (1, 'ada', 'ada@example.com'), (2, 'ben', 'ben@example.com');

-- Rotation: key 2 becomes active, key 1 is retired; events keep their key.
SELECT subject_audit.install_public_key(:'pk2');
SELECT subject_audit.retire_public_key(1);
UPDATE users SET email = 'ada@new.example' WHERE id = 1;
SELECT e.event_id, l.operation, c.key_id FROM subject_audit.event e
JOIN subject_audit.event_label l ON l.label_id = e.label_id
JOIN subject_audit.writer_context c USING (context_id) ORDER BY e.event_id;
SELECT key_id, retired_at IS NOT NULL AS retired FROM subject_audit.writer_key ORDER BY key_id;
-- Refused: the only active key, an unknown key, a retired key.
SELECT subject_audit.retire_public_key(2);
SELECT subject_audit.retire_public_key(7);
SELECT subject_audit.retire_public_key(1);

-- A session unlocked with both keys from its startup options reads across the rotation.
\set both_keys 'dbname=' :DBNAME ' options=-csubject_audit.session_key=' :sk1 ',' :sk2
\c :both_keys
SELECT event_id, operation, before, after FROM subject_audit.audit_for_subject('ada');
-- DISCARD ALL (a pooler handing the connection on) wipes the keyring.
DISCARD ALL;
SELECT count(*) FROM subject_audit.audit_for_subject('ada');
\c - postgres

-- Erasure, with a second session that has ada's salt cached.
SELECT dblink_connect('w', format('dbname=%s host=%s port=%s', current_database(),
                                  current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('w', $$UPDATE users SET email = 'ada@cached.example' WHERE id = 1$$);
-- A REPEATABLE READ writer whose snapshot predates the erasure.
SELECT dblink_connect('rr', format('dbname=%s host=%s port=%s', current_database(),
                                   current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('rr', 'BEGIN ISOLATION LEVEL REPEATABLE READ');
SELECT dblink_exec('rr', $$UPDATE users SET email = 'ben@rr.example' WHERE id = 2$$);
SELECT subject_audit.forget_subject('ada') AS events_of_ada;
-- Inside its old snapshot it may still see ada's old salt; after its commit it must not keep it.
SELECT dblink_exec('rr', $$UPDATE users SET email = 'ada@rr.example' WHERE id = 1$$);
SELECT dblink_exec('rr', 'COMMIT');
SELECT dblink_exec('rr', $$UPDATE users SET email = 'ada@after-rr.example' WHERE id = 1$$);
SELECT dblink_disconnect('rr');
SELECT subject_audit.forget_subject('nobody we know') AS events_of_nobody;
-- The other session writes again: never under the erased salt.
SELECT dblink_exec('w', $$UPDATE users SET email = 'ada@after.example' WHERE id = 1$$);
SELECT dblink_disconnect('w');
-- Nor does a new backend, which finds keys in the shared cache that 'w' filled.
SELECT dblink_connect('fresh', format('dbname=%s host=%s port=%s', current_database(),
                                      current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('fresh', $$UPDATE users SET email = 'ada@fresh.example' WHERE id = 1$$);
SELECT dblink_disconnect('fresh');
-- The events of 'w' and 'fresh' are under ada's new key.
SELECT e.event_id, k.erased_at IS NULL AS under_live_key
FROM (SELECT event_id, subject_key_id FROM subject_audit.event JOIN subject_audit.event_label USING (label_id)
      WHERE operation = 'UPDATE' ORDER BY event_id DESC LIMIT 2) e
JOIN subject_audit.subject_key k USING (subject_key_id) ORDER BY e.event_id;
-- A transaction erases ben, then blanks his row. Meanwhile another backend,
-- which cannot see the uncommitted erasure, writes for ben with his old key
-- and caches it again in the shared cache: the erasing transaction must not
-- take it from there (its own event would be encrypted under the salt it erases).
BEGIN;
SELECT subject_audit.forget_subject('ben') AS events_of_ben;
SELECT dblink_connect('other', format('dbname=%s host=%s port=%s', current_database(),
                                      current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('other', $$UPDATE users SET email = 'ben@other.example' WHERE id = 2$$);
SELECT dblink_disconnect('other');
UPDATE users SET email = NULL WHERE id = 2;
COMMIT;
-- The other backend's event is under the old key (written while the erasure
-- was under way: unreadable, as documented); the erasing transaction's is under a new one.
SELECT e.event_id, k.erased_at IS NULL AS under_live_key
FROM (SELECT event_id, subject_key_id FROM subject_audit.event JOIN subject_audit.event_label USING (label_id)
      WHERE operation = 'UPDATE' ORDER BY event_id DESC LIMIT 2) e
JOIN subject_audit.subject_key k USING (subject_key_id) ORDER BY e.event_id;
-- The commit evicted what 'other' cached again: a new backend writes under the new key.
SELECT dblink_connect('later', format('dbname=%s host=%s port=%s', current_database(),
                                      current_setting('unix_socket_directories'), current_setting('port')));
SELECT dblink_exec('later', $$UPDATE users SET email = 'ben@later.example' WHERE id = 2$$);
SELECT dblink_disconnect('later');
SELECT k.erased_at IS NULL AS under_live_key FROM subject_audit.event e
JOIN subject_audit.subject_key k USING (subject_key_id)
WHERE e.event_id = (SELECT max(event_id) FROM subject_audit.event JOIN subject_audit.event_label USING (label_id) WHERE operation = 'UPDATE');
-- Erasing in the very statement that changes the subject's row, in a backend
-- that has her key cached: the change is captured after forget_subject ran, in
-- the same command, and goes under a new key — so its before (the value being
-- removed) reads again: erase after changing the rows (docs/keys.md).
UPDATE users SET email = 'ada@main.example' WHERE id = 1;
UPDATE users SET email = 'erased ' || subject_audit.forget_subject(login) WHERE id = 1;
SELECT k.erased_at IS NULL AS under_live_key FROM subject_audit.event e
JOIN subject_audit.subject_key k USING (subject_key_id)
WHERE e.event_id = (SELECT max(event_id) FROM subject_audit.event JOIN subject_audit.event_label USING (label_id) WHERE operation = 'UPDATE');
-- An erasure cannot be prepared (it would commit where nothing evicts the
-- cached salt); the refused transaction erased nothing.
BEGIN;
SELECT subject_audit.forget_subject('ben') AS events_of_ben;
PREPARE TRANSACTION 'erase ben';
SELECT count(*) FILTER (WHERE erased_at IS NOT NULL) AS erased_keys FROM subject_audit.subject_key;
-- Every subject key, erased or live.
SELECT count(*) AS subject_keys, count(*) FILTER (WHERE salt IS NULL AND erased_at IS NOT NULL) AS erased
FROM subject_audit.subject_key;

SELECT subject_audit.unlock(decode(:'sk1', 'hex')), subject_audit.unlock(decode(:'sk2', 'hex'));
-- Ada's trail: every event still listed, the old values gone for good, the
-- erasure itself recorded, the event after it readable under a fresh key.
SELECT event_id, operation, status, description, before, after FROM subject_audit.audit_for_subject('ada');
SELECT min(event_id) AS ada_first FROM subject_audit.audit_for_subject('ada') \gset
SELECT * FROM subject_audit.audit_event('ada', :ada_first);
-- Ben's trail: his values before the erasure are gone, the concurrent write under
-- the old key too; the erasing transaction's own write reads under his new key.
SELECT event_id, operation, after FROM subject_audit.audit_for_subject('ben');
-- The admin trail (no subject, no payload).
SELECT event_id, operation, title, table_name, actor FROM subject_audit.events
WHERE operation IN ('TRACK', 'KEY_INSTALL', 'KEY_RETIRE', 'ERASE') ORDER BY event_id;
