-- Events and keys survive a server restart; backends started after it write
-- and read as before.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, private_key AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
CREATE TABLE patients (id int PRIMARY KEY, mrn text, diagnosis text);
SELECT subject_audit.track('patients', 'mrn');
INSERT INTO patients VALUES (1, 'MRN-1', 'flu');
CREATE TABLE key_for_test AS SELECT :'sk'::bytea AS sk;
-- @restart
UPDATE patients SET diagnosis = 'cold' WHERE id = 1;
SELECT subject_audit.unlock(sk) FROM key_for_test;
SELECT event_id, operation, before, after FROM subject_audit.audit_for_subject('MRN-1');
