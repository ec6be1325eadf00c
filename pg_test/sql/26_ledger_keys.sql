-- The ledger covers the key material events name: each subject key's salt
-- is checked against the commitment stored with it (salt_hash, kept when
-- the salt is erased), an erased salt against its ERASE event, and each
-- block commits to its events' subject_key and writer_context rows. Each
-- tampering runs as a superuser, in a transaction that verify() inspects
-- and that is then rolled back.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE people (id int PRIMARY KEY, token text NOT NULL, note text);
SELECT subject_audit.track('people', 'token');
INSERT INTO people VALUES (1, 'ann', 'a'), (2, 'bob', 'b'), (3, 'cy', 'c');
SELECT subject_audit.seal() AS sealed;
SELECT ok, problems FROM subject_audit.verify();
-- Every salt has its commitment; the block commits to the keys and context.
SELECT count(*) AS keys, count(*) FILTER (WHERE salt_hash = sha256(salt)) AS committed
FROM subject_audit.subject_key;
SELECT block_id, length(subject_keys_digest) AS keys_digest, length(writer_contexts_digest) AS contexts_digest
FROM subject_audit.block;
SELECT min(subject_key_id) AS k1, max(subject_key_id) AS k3 FROM subject_audit.subject_key \gset

-- 1. A salt deleted without forget_subject (crypto-shredding that leaves no trace).
BEGIN;
UPDATE subject_audit.subject_key SET salt = NULL, erased_at = now() WHERE subject_key_id = :k1;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 2. Two subjects' salts swapped (each one's payloads read under the other's key).
BEGIN;
UPDATE subject_audit.subject_key k SET salt = o.salt
FROM subject_audit.subject_key o
WHERE (k.subject_key_id, o.subject_key_id) IN ((:k1, :k3), (:k3, :k1));
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- ... with their commitments swapped too: the block's commitment to its keys.
BEGIN;
UPDATE subject_audit.subject_key k SET salt = o.salt, salt_hash = o.salt_hash
FROM subject_audit.subject_key o
WHERE (k.subject_key_id, o.subject_key_id) IN ((:k1, :k3), (:k3, :k1));
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- ... or a new salt with a matching commitment.
BEGIN;
UPDATE subject_audit.subject_key SET salt = sha256(salt), salt_hash = sha256(sha256(salt))
WHERE subject_key_id = :k1;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- ... or a commitment removed.
BEGIN;
UPDATE subject_audit.subject_key SET salt_hash = NULL WHERE subject_key_id = :k1;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 3. A writer context's encapsulated key overwritten (no payload of that
-- backend can be read any more), re-pointed at another writer key, or deleted.
BEGIN;
UPDATE subject_audit.writer_context SET encapsulated_key = decode(repeat('00', 32), 'hex');
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
BEGIN;
UPDATE subject_audit.writer_context SET key_id = key_id + 1;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
BEGIN;
DELETE FROM subject_audit.writer_context;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- 4. The block's commitments removed: its hash no longer matches.
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE subject_audit.block SET subject_keys_digest = NULL, writer_contexts_digest = NULL;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
-- A block sealed before blocks had these commitments (NULL, and the block
-- hash without them) still verifies: only its keys' salts are checked.
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE subject_audit.block SET subject_keys_digest = NULL, writer_contexts_digest = NULL,
    block_hash = sha256('pg_subject_audit block v1'::bytea || int8send(block_id) || int8send(from_txid)
        || int8send(to_txid) || int8send(event_count) || int4send(length(merkle_root)) || merkle_root
        || int4send(length(previous_hash)) || previous_hash);
SELECT ok, problems FROM subject_audit.verify();
UPDATE subject_audit.writer_context SET encapsulated_key = decode(repeat('00', 32), 'hex');
UPDATE subject_audit.subject_key SET salt = NULL, erased_at = now() WHERE subject_key_id = :k1;
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;

-- 5. Erasure is not tampering: the salt goes, its commitment and the ERASE
-- event stay, and everything verifies, before and after sealing.
SELECT subject_audit.forget_subject('ann');
SELECT count(*) FILTER (WHERE salt IS NULL) AS erased,
       count(*) FILTER (WHERE salt IS NULL AND salt_hash IS NOT NULL) AS erased_and_committed
FROM subject_audit.subject_key;
SELECT ok, problems FROM subject_audit.verify();
INSERT INTO people VALUES (4, 'ann', 'again');
SELECT subject_audit.seal() AS sealed;
SELECT ok, problems, unsealed FROM subject_audit.verify();
SELECT subject_audit.unlock(:'sk') AS unlocked;
SELECT operation, description FROM subject_audit.audit_for_subject('ann') ORDER BY event_id;
-- The ERASE event is what makes an erased salt legitimate: a second key
-- erased by hand, with no ERASE event of its own, is reported.
BEGIN;
UPDATE subject_audit.subject_key SET salt = NULL, erased_at = now()
WHERE salt IS NOT NULL AND subject_digest = (SELECT subject_digest FROM subject_audit.subject_key WHERE salt IS NULL);
SELECT ok, problems FROM subject_audit.verify();
ROLLBACK;
