-- Partitioned tables: tracking the parent covers its partitions, through the
-- parent or named directly, also partitions created or attached later (with
-- other column numbers); a detached partition is no longer captured; TRUNCATE
-- records every row once.
CREATE EXTENSION pg_subject_audit;
SELECT public_key AS pk, encode(private_key, 'hex') AS sk FROM subject_audit.generate_keypair() \gset
SELECT subject_audit.install_public_key(:'pk');
SELECT subject_audit.unlock(decode(:'sk', 'hex'));
CREATE TABLE orders (id int, region text, who text, item text, secret text) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
SELECT subject_audit.track('orders', 'who', '{secret}');
-- Created later, in the same statement form.
CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us') PARTITION BY LIST (item);
CREATE TABLE orders_us_all PARTITION OF orders_us DEFAULT;
-- Attached later, with its columns in another order and a dropped one (other attnums).
CREATE TABLE orders_asia (junk int, secret text, item text, who text, region text, id int);
ALTER TABLE orders_asia DROP COLUMN junk;
ALTER TABLE orders ATTACH PARTITION orders_asia FOR VALUES IN ('asia');
SELECT tgrelid::regclass AS partition, count(*) AS triggers,
       bool_and(tgenabled = 'A') AS always
FROM pg_trigger WHERE tgname LIKE 'subject_audit_capture_%' GROUP BY 1 ORDER BY 1;

-- Through the parent, and naming each partition directly.
INSERT INTO orders VALUES (1, 'eu', 'ann', 'book', 's1'), (2, 'us', 'ann', 'pen', 's2'), (3, 'asia', 'ann', 'cup', 's3');
INSERT INTO orders_eu VALUES (4, 'eu', 'ann', 'lamp', 's4');
INSERT INTO orders_us_all VALUES (5, 'us', 'ann', 'desk', 's5');
INSERT INTO orders_asia (id, region, who, item, secret) VALUES (6, 'asia', 'ann', 'fan', 's6');
UPDATE orders_asia SET item = 'teapot' WHERE id = 3;
UPDATE orders SET region = 'eu' WHERE id = 2;   -- moves the row to another partition
DELETE FROM orders_eu WHERE id = 4;
SELECT operation, table_name, changed_columns, before, after
FROM subject_audit.audit_for_subject('ann') WHERE operation <> 'READ' ORDER BY event_id;

-- TRUNCATE of the parent: each remaining row once, with its before values.
-- A partition whose own trigger does not fire is read by the parent's, in the
-- parent's column layout.
-- (Here it fires only in replica sessions, and this one is not.)
ALTER TABLE orders_asia ENABLE REPLICA TRIGGER subject_audit_capture_truncate;
TRUNCATE orders;
ALTER TABLE orders_asia ENABLE ALWAYS TRIGGER subject_audit_capture_truncate;
SELECT count(*) AS truncate_events, count(DISTINCT before ->> 'id') AS distinct_rows
FROM subject_audit.audit_for_subject('ann') WHERE operation = 'TRUNCATE';
SELECT before FROM subject_audit.audit_for_subject('ann')
WHERE operation = 'TRUNCATE' AND before ->> 'region' = 'asia' ORDER BY before ->> 'id';
-- TRUNCATE of one partition: its rows only.
INSERT INTO orders VALUES (7, 'asia', 'ann', 'mat', 's7'), (8, 'eu', 'ann', 'rug', 's8');
TRUNCATE orders_asia;
SELECT before FROM subject_audit.audit_for_subject('ann') WHERE operation = 'TRUNCATE' AND before ->> 'id' IN ('7', '8');

-- Detached: no longer captured, no longer carrying our triggers.
ALTER TABLE orders DETACH PARTITION orders_asia;
INSERT INTO orders_asia (id, region, who, item, secret) VALUES (9, 'asia', 'ann', 'vase', 's9');
SELECT count(*) AS events_for_row_9 FROM subject_audit.audit_for_subject('ann') WHERE after ->> 'id' = '9';
SELECT count(*) AS triggers_on_detached FROM pg_trigger
WHERE tgrelid = 'orders_asia'::regclass AND tgname LIKE 'subject_audit_capture_%';
SELECT operation, title FROM subject_audit.events WHERE operation IN ('TRACK', 'UNTRACK') ORDER BY event_id;
-- Untracking the parent takes the triggers off every partition.
SELECT subject_audit.untrack('orders');
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgname LIKE 'subject_audit_capture_%';
SELECT ok, problems FROM subject_audit.verify();
