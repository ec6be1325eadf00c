-- Privileges. Nothing in the schema is usable by PUBLIC: capture runs inside
-- the trigger and writes with the extension's own rights, so writers need no
-- grant at all. Everything else is handed out by grant_writer(),
-- grant_reader(), grant_auditor() and grant_admin() (docs/roles.md).
REVOKE ALL ON SCHEMA subject_audit FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA subject_audit FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA subject_audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA subject_audit FROM PUBLIC;
