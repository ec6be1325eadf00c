//! `#[pg_test]`s: behaviour that needs a backend but not COMMIT, several
//! sessions or restarts (those live in `pg_test/`).

#[pgrx::pg_schema]
mod tests {}
