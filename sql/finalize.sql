-- Privileges. Writers need nothing: capture runs inside the trigger and
-- writes with the extension's own rights. Readers need a private key, not a
-- grant on the tables. Administration is for superusers and roles granted it.
GRANT USAGE ON SCHEMA subject_audit TO PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA subject_audit FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.track(regclass, text, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.untrack(regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.install_public_key(bytea) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.retire_public_key(integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.forget_subject(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.seal() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.verify(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION subject_audit.checkpoint() FROM PUBLIC;
