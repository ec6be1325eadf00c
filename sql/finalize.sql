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
