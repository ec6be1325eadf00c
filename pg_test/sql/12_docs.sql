-- The SQL of the documentation, run as written (extracted by pg_test/run).
\i results/docs/my-audit-trail.sql
\i results/docs/export.sql
\c - postgres
\i results/docs/roles.sql
