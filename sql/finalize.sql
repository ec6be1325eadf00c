-- Capture health. Here rather than in bootstrap.sql: the views name the
-- trigger function, which exists only now.

-- Every capture trigger of a tracked table and of its partitions that does
-- not capture as track() made it: missing, calling another function,
-- narrowed (other events, a column list, a WHEN clause), disabled, or firing
-- only in origin or replica mode (not ALWAYS). The names and pg_trigger.tgtype
-- are those of src/sql_api/capture_triggers.rs. Walks pg_inherits, not
-- pg_partition_tree (which locks every partition): the utility hook reads it
-- around DDL.
CREATE VIEW subject_audit.trigger_gaps AS
WITH RECURSIVE tables(tracked, relid) AS (
    SELECT t.relid, t.relid::pg_catalog.oid FROM subject_audit.tracked_table t
    UNION
    SELECT tables.tracked, i.inhrelid FROM pg_catalog.pg_inherits i JOIN tables ON i.inhparent OPERATOR(pg_catalog.=) tables.relid
), expected(tgname, tgtype) AS (
    VALUES ('subject_audit_capture_insert'::pg_catalog.name, 4::pg_catalog.int2),
           ('subject_audit_capture_update', 16),
           ('subject_audit_capture_delete', 8),
           ('subject_audit_capture_truncate', 34)
)
SELECT tables.tracked,
       pg_catalog.format('%I.%I', n.nspname, c.relname) AS table_name,
       e.tgname AS trigger_name,
       CASE WHEN g.oid IS NULL THEN 'missing'
            WHEN g.tgfoid OPERATOR(pg_catalog.<>) 'subject_audit.capture_change()'::pg_catalog.regprocedure THEN 'calls another function'
            WHEN g.tgtype OPERATOR(pg_catalog.<>) e.tgtype OR g.tgqual IS NOT NULL
                 OR pg_catalog.cardinality(g.tgattr::pg_catalog.int2[]) OPERATOR(pg_catalog.>) 0 THEN 'narrowed'
            WHEN g.tgenabled OPERATOR(pg_catalog.=) 'D' THEN 'disabled'
            WHEN g.tgenabled OPERATOR(pg_catalog.=) 'R' THEN 'fires only in replica mode'
            ELSE 'fires only in origin mode' END AS problem
FROM tables
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tables.relid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
CROSS JOIN expected e
LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid OPERATOR(pg_catalog.=) tables.relid
    AND g.tgname OPERATOR(pg_catalog.=) e.tgname
WHERE g.oid IS NULL
   OR g.tgfoid OPERATOR(pg_catalog.<>) 'subject_audit.capture_change()'::pg_catalog.regprocedure
   OR g.tgtype OPERATOR(pg_catalog.<>) e.tgtype OR g.tgqual IS NOT NULL
   OR pg_catalog.cardinality(g.tgattr::pg_catalog.int2[]) OPERATOR(pg_catalog.>) 0
   OR g.tgenabled OPERATOR(pg_catalog.<>) 'A';

CREATE VIEW subject_audit.tracked AS
SELECT t.relid AS table_name,
       a.attname AS subject_column,
       ARRAY(SELECT x.attname FROM pg_catalog.pg_attribute x
             WHERE x.attrelid OPERATOR(pg_catalog.=) t.relid
               AND x.attnum OPERATOR(pg_catalog.=) ANY (t.exclude_attnums)
             ORDER BY x.attnum)::pg_catalog.name[] AS exclude_columns,
       t.since,
       pg_catalog.cardinality(p.problems) OPERATOR(pg_catalog.=) 0 AS capture_ok,
       p.problems
FROM subject_audit.tracked_table t
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) t.relid
    AND a.attnum OPERATOR(pg_catalog.=) t.subject_attnum
CROSS JOIN LATERAL (SELECT
    ARRAY(SELECT pg_catalog.format('%s: %s %s', g.table_name, g.trigger_name, g.problem)
          FROM subject_audit.trigger_gaps g WHERE g.tracked OPERATOR(pg_catalog.=) t.relid
          ORDER BY g.table_name, g.trigger_name)
    OPERATOR(pg_catalog.||) CASE WHEN pg_catalog.format('%I.%I', n.nspname, c.relname) OPERATOR(pg_catalog.<>) t.tracked_as
            THEN ARRAY[pg_catalog.format('renamed: tracked as %s, now %s; %s', t.tracked_as,
                       pg_catalog.format('%I.%I', n.nspname, c.relname),
                       CASE WHEN pg_catalog.to_regclass(t.tracked_as) IS NULL
                            THEN pg_catalog.format('no table is named %s', t.tracked_as)
                            ELSE pg_catalog.format('%s now names another table', t.tracked_as) END)]
            ELSE '{}'::pg_catalog.text[] END AS problems) p;
COMMENT ON VIEW subject_audit.tracked IS
    'Tracked tables and the health of their capture; subject_audit.track() run again repairs what problems lists.';
COMMENT ON COLUMN subject_audit.tracked.capture_ok IS
    'Every change to the table is captured: all capture triggers present, unchanged and firing ALWAYS (on its partitions too), and the table still goes by the name it was tracked under.';
COMMENT ON COLUMN subject_audit.tracked.problems IS
    'What stands between the table and full capture, one line each: a capture trigger missing, disabled, firing only in origin or replica mode, narrowed or calling another function; the table renamed since track() (whatever took its old name is not captured).';

-- Privileges. Nothing in the schema is usable by PUBLIC: capture runs inside
-- the trigger and writes with the extension's own rights, so writers need no
-- grant at all. Everything else is handed out by grant_writer(),
-- grant_reader(), grant_auditor() and grant_admin() (docs/roles.md).
REVOKE ALL ON SCHEMA subject_audit FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA subject_audit FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA subject_audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA subject_audit FROM PUBLIC;

-- Every function runs with search_path pinned, so no object a caller puts
-- first on its path can stand in for a built-in. The trigger function is
-- the exception, on the hot path: it resolves no names itself (all its SQL
-- runs as the owner with the path pinned), so a SET clause would only cost
-- time.
DO $$
DECLARE
    f pg_catalog.regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace OPERATOR(pg_catalog.=) 'subject_audit'::pg_catalog.regnamespace
               AND p.proname OPERATOR(pg_catalog.<>) 'capture_change'
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$$;
