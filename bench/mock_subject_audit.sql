-- HARNESS SELF-TEST ONLY (bench/run --mock-ours).
-- A PL/pgSQL stand-in with the same SQL names as pg_subject_audit (SPEC section 1) that the
-- benchmark calls, so that the code path of the `pg_subject_audit` variant and workload (e)
-- can be exercised before the real extension exists. No cryptography; numbers from it mean nothing.
CREATE SCHEMA subject_audit;

CREATE TABLE subject_audit.writer_key (
    key_id serial PRIMARY KEY,
    public_key bytea NOT NULL,
    active bool NOT NULL DEFAULT true
);

CREATE TABLE subject_audit.event (
    event_id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    operation text NOT NULL,
    table_name regclass,
    subject_digest bytea,
    actor text NOT NULL DEFAULT current_user,
    changed_columns text[],
    payload bytea
);
CREATE INDEX ON subject_audit.event (subject_digest, event_id);

CREATE TABLE subject_audit.tracked_table (
    table_name regclass PRIMARY KEY,
    subject_column name NOT NULL,
    exclude_columns name[] NOT NULL DEFAULT '{}',
    since timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION subject_audit.generate_keypair(OUT public_key bytea, OUT private_key bytea)
RETURNS SETOF record LANGUAGE sql AS $$
    SELECT sha256(k), k FROM (SELECT gen_random_uuid()::text::bytea AS k) s
$$;

CREATE FUNCTION subject_audit.install_public_key(public_key bytea) RETURNS int LANGUAGE sql AS $$
    UPDATE subject_audit.writer_key SET active = false;
    INSERT INTO subject_audit.writer_key (public_key) VALUES (public_key) RETURNING key_id;
$$;

CREATE FUNCTION subject_audit.capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    col text := TG_ARGV[0];
    n jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    o jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
BEGIN
    INSERT INTO subject_audit.event (operation, table_name, subject_digest, payload)
    VALUES (TG_OP, TG_RELID, sha256(convert_to(coalesce(n, o) ->> col, 'UTF8')),
            convert_to(jsonb_build_object('b', o, 'a', n)::text, 'UTF8'));
    RETURN NULL;
END
$$;

CREATE FUNCTION subject_audit.track(tbl regclass, subject_column name, exclude_columns name[] DEFAULT '{}')
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subject_audit.tracked_table VALUES (tbl, subject_column, exclude_columns);
    EXECUTE format('CREATE TRIGGER subject_audit_capture AFTER INSERT OR UPDATE OR DELETE ON %s
                    FOR EACH ROW EXECUTE FUNCTION subject_audit.capture(%L)', tbl, subject_column);
END
$$;

CREATE FUNCTION subject_audit.untrack(tbl regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER subject_audit_capture ON %s', tbl);
    DELETE FROM subject_audit.tracked_table WHERE table_name = tbl;
END
$$;

CREATE FUNCTION subject_audit.unlock(private_key bytea) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM subject_audit.writer_key k WHERE k.public_key = sha256(private_key)) THEN
        RAISE EXCEPTION 'mock: key matches no installed public key';
    END IF;
    PERFORM set_config('subject_audit_mock.unlocked', 'on', false);
    RETURN 1;
END
$$;

CREATE FUNCTION subject_audit.audit_for_subject(token text)
RETURNS TABLE (event_id bigint, at timestamptz, operation text, title text, status text, description text,
               actor text, table_name text, changed_columns text[], before jsonb, after jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    d bytea := sha256(convert_to(token, 'UTF8'));
BEGIN
    IF current_setting('subject_audit_mock.unlocked', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'mock: session is locked';
    END IF;
    RETURN QUERY
        SELECT e.event_id, e.at, e.operation, lower(e.operation) || ' ' || e.table_name::text, 'ok'::text, NULL::text,
               e.actor, e.table_name::text, e.changed_columns,
               convert_from(e.payload, 'UTF8')::jsonb -> 'b', convert_from(e.payload, 'UTF8')::jsonb -> 'a'
        FROM subject_audit.event e WHERE e.subject_digest = d ORDER BY e.event_id;
    INSERT INTO subject_audit.event (operation, subject_digest) VALUES ('READ', d);
END
$$;
