-- Issue 20: the owner of the audited database is no superuser, but it may
-- create objects in its database and set its search_path, and its own role's.
-- It plants operators, functions and catalog-named views that shadow the
-- built-ins, in public, in a schema named after itself and in one named after
-- the role the background workers run as (each one's "$user"). Neither the
-- sealer nor the deferred writer (both run as the bootstrap superuser), nor the
-- extension's own queries run as the audit schema's owner in the attacker's
-- session, may call any of them. Every trap notes who called it in trap_log,
-- and if that was a superuser, makes its owner one.
CREATE ROLE esc_owner LOGIN;
ALTER DATABASE :"DBNAME" OWNER TO esc_owner;
CREATE EXTENSION pg_subject_audit;
SELECT subject_audit.install_public_key(public_key) > 0 AS installed FROM subject_audit.generate_keypair();
CREATE TABLE people (id int PRIMARY KEY, token text NOT NULL, email text UNIQUE);
ALTER TABLE people OWNER TO esc_owner;
SELECT subject_audit.track('people', 'token');
-- Reads and failed changes are recorded by the deferred writer in this database.
ALTER DATABASE :"DBNAME" SET subject_audit.log_reads = subject;
ALTER DATABASE :"DBNAME" SET subject_audit.log_failures = on;
-- The sealer seals this database from the next start on.
ALTER SYSTEM SET subject_audit.database = '20_escalation';

\c - esc_owner
CREATE TABLE public.trap_log (trap text, ran_as name);
GRANT INSERT ON public.trap_log TO PUBLIC;
CREATE FUNCTION public.trap(what text) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO public.trap_log VALUES (what, current_user);
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE esc_owner SUPERUSER';
    END IF;
    RETURN true;
END
$$;
CREATE SCHEMA esc_owner;
CREATE SCHEMA postgres;
DO $$
DECLARE
    s text;
    op record;
    f record;
    n int := 0;
BEGIN
    FOREACH s IN ARRAY ARRAY['public', 'esc_owner', 'postgres'] LOOP
        FOR op IN SELECT * FROM (VALUES
                ('=', 'name', 'boolean'), ('=', 'text', 'boolean'), ('=', 'bytea', 'boolean'),
                ('=', 'integer', 'boolean'), ('=', 'bigint', 'boolean'), ('=', 'smallint', 'boolean'),
                ('=', 'oid', 'boolean'), ('=', 'inet', 'boolean'), ('=', 'text[]', 'boolean'),
                ('<>', 'text', 'boolean'), ('<>', 'name', 'boolean'), ('<>', 'oid', 'boolean'),
                ('<>', 'smallint', 'boolean'), ('<', 'bigint', 'boolean'), ('>=', 'bigint', 'boolean'),
                ('>', 'bigint', 'boolean'), ('||', 'text', 'text')) AS v(name, type, result) LOOP
            n := n + 1;
            EXECUTE format('CREATE FUNCTION %I.trap_op_%s(a %s, b %s) RETURNS %s LANGUAGE sql '
                           'AS $f$ SELECT CASE WHEN public.trap(%L) THEN a OPERATOR(pg_catalog.%s) b END $f$',
                           s, n, op.type, op.type, op.result, format('%s.%s(%s)', s, op.name, op.type), op.name);
            EXECUTE format('CREATE OPERATOR %I.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %I.trap_op_%s)',
                           s, op.name, op.type, op.type, s, n);
        END LOOP;
        FOR f IN SELECT * FROM (VALUES
                ('now', '', 'timestamptz', ''), ('clock_timestamp', '', 'timestamptz', ''),
                ('inet_client_addr', '', 'inet', ''), ('pg_current_snapshot', '', 'pg_snapshot', ''),
                ('lower', 'a text', 'text', 'a'), ('host', 'a inet', 'text', 'a'),
                ('length', 'a bytea', 'integer', 'a'), ('pg_snapshot_xmin', 'a pg_snapshot', 'xid8', 'a'))
                AS v(name, args, result, pass) LOOP
            EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE sql '
                           'AS $f$ SELECT CASE WHEN public.trap(%L) THEN pg_catalog.%I(%s) END $f$',
                           s, f.name, f.args, f.result, format('%s.%s()', s, f.name), f.name, f.pass);
        END LOOP;
        -- Catalogs and the extension's tables, as views that call the trap.
        FOR f IN SELECT unnest(ARRAY['pg_extension', 'pg_class', 'pg_namespace', 'pg_trigger',
                                     'pg_roles', 'pg_proc', 'pg_inherits']) AS name LOOP
            EXECUTE format('CREATE VIEW %I.%I AS SELECT * FROM pg_catalog.%I WHERE public.trap(%L)',
                           s, f.name, f.name, format('%s.%s', s, f.name));
        END LOOP;
        EXECUTE format('CREATE VIEW %I.pg_attribute AS SELECT attrelid, attname, attnum, atttypid '
                       'FROM pg_catalog.pg_attribute WHERE public.trap(%L)', s, s || '.pg_attribute');
        FOR f IN SELECT unnest(ARRAY['block', 'event', 'event_label', 'writer_key', 'writer_context',
                                     'subject_key', 'installation', 'tracked_table']) AS name LOOP
            EXECUTE format('CREATE VIEW %I.%I AS SELECT 1 AS x WHERE public.trap(%L)',
                           s, f.name, format('%s.%s', s, f.name));
        END LOOP;
    END LOOP;
END
$$;
SELECT count(*) AS operators FROM pg_operator WHERE oprnamespace::regnamespace::text IN ('public', 'esc_owner', 'postgres');
ALTER DATABASE :"DBNAME" SET search_path = "$user", public, pg_catalog;
ALTER ROLE esc_owner IN DATABASE :"DBNAME" SET search_path = "$user", public, pg_catalog;
-- And every transaction in this database read-only, which would stop the workers' writes.
ALTER DATABASE :"DBNAME" SET default_transaction_read_only = on;
-- The traps are live: in the attacker's own session, with its own rights.
\c - esc_owner
SHOW search_path;
SET default_transaction_read_only = off;
TRUNCATE trap_log;
SELECT 'a'::name = 'a'::name AS equal;
SELECT trap, ran_as FROM trap_log;
TRUNCATE trap_log;

-- @restart
-- The sealer now runs in this database, which tells it search_path = "$user", public, pg_catalog.
\c - esc_owner
SET default_transaction_read_only = off;
-- The attacker's session runs the extension's capture (as the audit schema's
-- owner), a failed change and a read (queued for the deferred writer).
INSERT INTO people VALUES (1, 't-1', 'one@example.com'), (2, 't-2', 'two@example.com');
UPDATE people SET email = 'uno@example.com' WHERE id = 1;
INSERT INTO people VALUES (3, 't-3', 'two@example.com');
SELECT token FROM people ORDER BY id;
\c - postgres
SET search_path = pg_catalog, pg_temp;
SET default_transaction_read_only = off;
SELECT subject_audit.wait_for_writer();
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT unsealed OPERATOR(pg_catalog.=) 0 FROM subject_audit.verify());
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT ok, events_checked, unsealed FROM subject_audit.verify();
SELECT operation, status, sqlstate, title FROM subject_audit.events ORDER BY event_id;
SELECT backend_type FROM pg_stat_activity WHERE backend_type = 'pg_subject_audit sealer' AND datname = current_database();
-- No trap ran with rights other than the attacker's own; it is no superuser.
SELECT DISTINCT trap, ran_as FROM public.trap_log WHERE ran_as <> 'esc_owner' ORDER BY 1, 2;
SELECT rolsuper FROM pg_roles WHERE rolname = 'esc_owner';
-- A database owner may also create the schema subject_audit before the
-- extension is installed: owning it, it could add functions there (an
-- unlock(text) that a caller's literal key would reach before ours) and
-- grant them to all. Such a schema is refused.
CREATE DATABASE esc_preinstalled OWNER esc_owner;
\c esc_preinstalled esc_owner
CREATE SCHEMA subject_audit;
\c esc_preinstalled postgres
CREATE EXTENSION pg_subject_audit;
SELECT count(*) AS installed FROM pg_extension WHERE extname = 'pg_subject_audit';
\c 20_escalation postgres
SET default_transaction_read_only = off;
DROP DATABASE esc_preinstalled;
ALTER SYSTEM RESET subject_audit.database;

-- @restart
SHOW subject_audit.database;
