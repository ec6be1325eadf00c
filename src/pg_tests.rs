//! `#[pg_test]`s: behaviour that needs a backend but not COMMIT, several
//! sessions or restarts (those live in `pg_test/`). Each runs in a
//! transaction that is rolled back.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Installs a fresh key pair, unlocks it, and returns nothing: the
    /// private key never leaves the backend.
    fn install_and_unlock() {
        Spi::run(
            "SELECT subject_audit.install_public_key(public_key), subject_audit.unlock(private_key)
             FROM subject_audit.generate_keypair()",
        )
        .unwrap();
    }

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).unwrap().unwrap()
    }

    #[pg_test]
    fn values_of_every_type_round_trip_as_text() {
        install_and_unlock();
        Spi::run(
            "CREATE TYPE mood AS ENUM ('calm', 'busy');
             CREATE DOMAIN positive AS int CHECK (VALUE > 0);
             CREATE TABLE typed (id int PRIMARY KEY, who text, n numeric, ts timestamptz, b bytea,
                                 arr int[], j jsonb, js json, m mood, p positive, c point, flag bool,
                                 big text, nothing text);
             SELECT subject_audit.track('typed', 'who');
             SET LOCAL timezone = 'UTC';
             INSERT INTO typed VALUES (1, 'w', 1.50, '2024-01-02 03:04:05+00', '\\xdeadbeef',
                                       '{1,2}', '{\"k\": [1, true]}', '{\"a\":1}', 'busy', 7, '(1,2)', true,
                                       repeat('x', 1000000), NULL);",
        )
        .unwrap();
        let after: pgrx::JsonB = one("SELECT after FROM subject_audit.audit_for_subject('w')");
        let a = after.0;
        assert_eq!(a["n"], "1.50");
        assert_eq!(a["ts"], "2024-01-02 03:04:05+00");
        assert_eq!(a["b"], "\\xdeadbeef");
        assert_eq!(a["arr"], "{1,2}");
        assert_eq!(a["j"], serde_json::json!({"k": [1, true]}));
        assert_eq!(a["js"], serde_json::json!({"a": 1}));
        assert_eq!(a["m"], "busy");
        assert_eq!(a["p"], "7");
        assert_eq!(a["c"], "(1,2)");
        assert_eq!(a["flag"], "t");
        assert_eq!(a["big"].as_str().unwrap().len(), 1_000_000);
        assert_eq!(a["nothing"], serde_json::Value::Null);
    }

    #[pg_test]
    fn update_records_only_changed_columns_and_nothing_when_nothing_changed() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE t (id int PRIMARY KEY, who text, a text, b text, secret text);
             SELECT subject_audit.track('t', 'who', '{secret}');
             INSERT INTO t VALUES (1, 'w', 'a', 'b', 's');
             UPDATE t SET a = 'a2', b = b WHERE id = 1;
             UPDATE t SET secret = 's2', a = a WHERE id = 1;
             UPDATE t SET a = NULL WHERE id = 1;",
        )
        .unwrap();
        // The admin trail (key install, track) is there too: count the captured events only.
        let captured = "SELECT count(*) FROM subject_audit.events \
                        WHERE table_name = 'public.t' AND operation IN ('INSERT', 'UPDATE')";
        assert_eq!(one::<i64>(captured), 3);
        let changed: Vec<String> = one(
            "SELECT changed_columns FROM subject_audit.events WHERE operation = 'UPDATE' ORDER BY event_id LIMIT 1",
        );
        assert_eq!(changed, vec!["a"]);
        let last: pgrx::JsonB = one(
            "SELECT after FROM subject_audit.audit_for_subject('w') ORDER BY event_id DESC LIMIT 1",
        );
        assert_eq!(last.0, serde_json::json!({"a": null}));
        // The excluded column appears nowhere, not even as a name.
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.events WHERE 'secret' = ANY (changed_columns)"
            ),
            0
        );
    }

    #[pg_test]
    fn events_alike_share_one_label_and_each_difference_makes_another() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE l (id int PRIMARY KEY, who text, a text, b text);
             SELECT subject_audit.track('l', 'who');
             INSERT INTO l SELECT g, 'w' || g, 'a', 'b' FROM generate_series(1, 50) g;
             UPDATE l SET a = 'a2' WHERE id <= 20;
             UPDATE l SET a = 'a3' WHERE id <= 20;
             UPDATE l SET b = 'b2' WHERE id <= 5;
             SET LOCAL subject_audit.actor = 'support:9';
             UPDATE l SET b = 'b3' WHERE id <= 5;",
        )
        .unwrap();
        let labels_of_table = |operation: &str| {
            one::<i64>(&format!(
                "SELECT count(DISTINCT e.label_id) FROM subject_audit.event e
                 JOIN subject_audit.event_label l USING (label_id)
                 WHERE l.table_name = 'public.l' AND l.operation = '{operation}'"
            ))
        };
        assert_eq!(labels_of_table("INSERT"), 1);
        // {a}, {b}, and {b} by another actor.
        assert_eq!(labels_of_table("UPDATE"), 3);
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.event_label WHERE table_name = 'public.l'"
            ),
            5
        );
        assert_eq!(
            one::<String>("SELECT actor FROM subject_audit.events ORDER BY event_id DESC LIMIT 1"),
            "support:9"
        );
    }

    #[pg_test]
    fn table_names_are_kept_as_text_across_renames_and_drops() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE old_name (id int PRIMARY KEY, who text);
             SELECT subject_audit.track('old_name', 'who');
             INSERT INTO old_name VALUES (1, 'w');
             ALTER TABLE old_name RENAME TO new_name;
             UPDATE new_name SET id = 2;",
        )
        .unwrap();
        let names: Vec<String> =
            one("SELECT array_agg(table_name ORDER BY event_id) FROM subject_audit.audit_for_subject('w')");
        assert_eq!(names, vec!["public.old_name", "public.new_name"]);
        Spi::run("SELECT subject_audit.untrack('new_name'); DROP TABLE new_name;").unwrap();
        // The two changes, and the READ the first look left.
        assert_eq!(
            one::<Vec<String>>(
                "SELECT array_agg(operation ORDER BY event_id) FROM subject_audit.audit_for_subject('w')"
            ),
            vec!["INSERT", "UPDATE", "READ"]
        );
    }

    #[pg_test]
    fn a_renamed_role_is_recorded_under_its_new_name_at_once() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE r (id int PRIMARY KEY, who text);
             SELECT subject_audit.track('r', 'who');
             CREATE ROLE audit_clerk;
             GRANT INSERT, UPDATE, SELECT ON r TO audit_clerk;
             SET LOCAL ROLE audit_clerk;
             INSERT INTO r VALUES (1, 'w');
             RESET ROLE;
             ALTER ROLE audit_clerk RENAME TO audit_clerk_renamed;
             SET LOCAL ROLE audit_clerk_renamed;
             UPDATE r SET id = 2;
             RESET ROLE;",
        )
        .unwrap();
        let roles: Vec<String> = one(
            "SELECT array_agg(l.db_role ORDER BY e.event_id) FROM subject_audit.event e
             JOIN subject_audit.event_label l USING (label_id)
             WHERE l.table_name = 'public.r' AND l.operation IN ('INSERT', 'UPDATE')",
        );
        assert_eq!(roles, vec!["audit_clerk", "audit_clerk_renamed"]);
    }

    #[pg_test]
    fn subject_change_reaches_both_subjects_and_null_subjects_are_recorded() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE t (id int PRIMARY KEY, who text);
             SELECT subject_audit.track('t', 'who');
             INSERT INTO t VALUES (1, 'old'), (2, NULL);
             UPDATE t SET who = 'new' WHERE id = 1;",
        )
        .unwrap();
        assert_eq!(
            one::<i64>("SELECT count(*) FROM subject_audit.audit_for_subject('old')"),
            2
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM subject_audit.audit_for_subject('new')"),
            1
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.events WHERE operation = 'INSERT' AND subject_ref IS NULL"
            ),
            1
        );
    }

    #[pg_test(error = "invalid public key: not a usable X25519 public key")]
    fn low_order_public_key_is_refused() {
        Spi::run("SELECT subject_audit.install_public_key(decode(repeat('00', 32), 'hex'))")
            .unwrap();
    }

    #[pg_test(error = "invalid public key: a key must be 32 bytes, got 3")]
    fn short_public_key_is_refused() {
        Spi::run("SELECT subject_audit.install_public_key('\\x010203')").unwrap();
    }

    #[pg_test(
        error = "install a public key with subject_audit.install_public_key() before tracking tables"
    )]
    fn tracking_needs_a_key() {
        Spi::run("CREATE TABLE t (id int, who text); SELECT subject_audit.track('t', 'who')")
            .unwrap();
    }

    #[pg_test(error = "public.v is not a table: only tables can be tracked")]
    fn views_cannot_be_tracked() {
        Spi::run("CREATE VIEW v AS SELECT 1 AS who; SELECT subject_audit.track('v', 'who')")
            .unwrap();
    }

    #[pg_test(error = "the subject column \"who\" cannot be excluded")]
    fn subject_column_cannot_be_excluded() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE t (id int, who text); SELECT subject_audit.track('t', 'who', '{who}')",
        )
        .unwrap();
    }

    #[pg_test(error = "column \"nope\" of public.t does not exist")]
    fn excluded_columns_must_exist() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE t (id int, who text); SELECT subject_audit.track('t', 'who', '{nope}')",
        )
        .unwrap();
    }

    #[pg_test]
    fn a_backend_finds_a_label_again_by_all_its_fields() {
        use crate::integrity::LabelFields;
        use crate::recorder::{forget_remembered, label_id};
        // Client addresses as capture stores them (host() of the client's inet).
        let addresses = [Some("127.0.0.1"), Some("::1"), Some("2001:db8::a"), None];
        let columns: [Option<&[&str]>; 3] = [Some(&["x", "y"]), Some(&[]), None];
        let mut ids = std::collections::HashSet::new();
        for client_addr in addresses {
            for changed_columns in columns {
                let label = LabelFields {
                    operation: "UPDATE",
                    status: "ok",
                    sqlstate: None,
                    table_name: Some("public.labelled"),
                    actor: "a",
                    db_role: "a",
                    session_role: "a",
                    application_name: None,
                    client_addr,
                    changed_columns,
                };
                let first = label_id(&label);
                // A backend that does not remember it looks it up, and must find it.
                forget_remembered();
                assert_eq!(
                    label_id(&label),
                    first,
                    "{client_addr:?} {changed_columns:?}"
                );
                ids.insert(first);
            }
        }
        assert_eq!(ids.len(), 12);
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.event_label WHERE table_name = 'public.labelled'"
            ),
            12
        );
    }

    #[pg_test]
    fn an_index_probe_finds_the_live_key_behind_an_erased_one() {
        let digest = [7u8; 32];
        // The erased key sorts first in the index (erased_at NULLS LAST).
        Spi::run_with_args(
            "INSERT INTO subject_audit.subject_key (subject_digest, salt, erased_at)
             VALUES ($1, NULL, now())",
            &[digest.to_vec().into()],
        )
        .unwrap();
        let live: i64 = Spi::get_one_with_args(
            "INSERT INTO subject_audit.subject_key (subject_digest, salt)
             VALUES ($1, decode(repeat('ab', 32), 'hex')) RETURNING subject_key_id",
            &[digest.to_vec().into()],
        )
        .unwrap()
        .unwrap();
        let found = crate::store::probe_live_subject_keys(&[digest]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1, live);
        assert_eq!(found[0].2, [0xab; 32]);
    }

    /// 400 people inserted at once, 5 of whom already have a key: those 5
    /// are picked by `pick` from the 400 tokens in the order of their
    /// subject digests (the order in which keys are looked up and created).
    fn bulk_of_new_subjects_with_five_known(pick: fn(&[String]) -> Vec<String>) {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE bulk_people (id int PRIMARY KEY, token text NOT NULL, note text);
             SELECT subject_audit.track('bulk_people', 'token');",
        )
        .unwrap();
        let mut tokens: Vec<String> = (1..=400).map(|g| format!("person-{g}")).collect();
        tokens.sort_by_key(|t| crate::keyring::subject_digest(t.as_bytes()));
        let known_tokens = pick(&tokens);
        Spi::run(&format!(
            "INSERT INTO bulk_people SELECT g, t, 'first' FROM unnest('{{{}}}'::text[]) WITH ORDINALITY AS u(t, g)",
            known_tokens.join(",")
        ))
        .unwrap();
        let known: Vec<i64> = one(
            "SELECT array_agg(subject_key_id ORDER BY subject_key_id) FROM subject_audit.subject_key",
        );
        assert_eq!(known.len(), 5);
        // 400 subjects missing from the backend's cache, 5 of them with a key:
        // taken for a bulk of new subjects, whose insert finds the 5.
        crate::keyring::forget_cached_subjects();
        Spi::run(
            "INSERT INTO bulk_people SELECT 100 + g, 'person-' || g, 'second' FROM generate_series(1, 400) g",
        )
        .unwrap();
        let live_keys = "SELECT count(*) FROM subject_audit.subject_key";
        assert_eq!(one::<i64>(live_keys), 400);
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT subject_digest) FROM subject_audit.subject_key"),
            400
        );
        // All keys are the transaction's own: no subtransaction of ours stood.
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT xmin::text) FROM subject_audit.subject_key"),
            1
        );
        let on_known_keys = format!(
            "SELECT count(*) FROM subject_audit.events WHERE operation <> 'READ' AND event_id IN
             (SELECT event_id FROM subject_audit.event WHERE subject_key_id = ANY ('{{{}}}'::bigint[]))",
            known.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        );
        assert_eq!(one::<i64>(&on_known_keys), 10);
        let notes = |token: &str| -> String {
            one(&format!(
                "SELECT string_agg(after->>'note', ',' ORDER BY event_id)
                 FROM subject_audit.audit_for_subject('{token}') WHERE operation = 'INSERT'"
            ))
        };
        assert_eq!(notes(&known_tokens[0]), "first,second");
        let unknown = tokens.iter().find(|t| !known_tokens.contains(t)).unwrap();
        assert_eq!(notes(unknown), "second");
        // 400 subjects missing from the cache, all with a key: probed, none created.
        crate::keyring::forget_cached_subjects();
        Spi::run("UPDATE bulk_people SET note = 'third' WHERE id > 100").unwrap();
        assert_eq!(one::<i64>(live_keys), 400);
        assert_eq!(one::<i64>(&on_known_keys), 15);
        assert_eq!(
            one::<String>(&format!(
                "SELECT string_agg(after->>'note', ',' ORDER BY event_id)
                 FROM subject_audit.audit_for_subject('{unknown}')"
            )),
            "second,third"
        );
    }

    #[pg_test]
    fn a_bulk_of_new_subjects_finds_the_keys_of_a_few_in_the_sample() {
        // The first in digest order is in the sample that is probed: the
        // insert skips the subjects with a key (ON CONFLICT DO NOTHING).
        bulk_of_new_subjects_with_five_known(|tokens| {
            [0, 100, 200, 300, 399].map(|i| tokens[i].clone()).to_vec()
        });
    }

    #[pg_test]
    fn a_bulk_of_new_subjects_finds_the_keys_of_a_few_outside_the_sample() {
        // None of the sample has a key: the insert without ON CONFLICT fails
        // on the 5, is undone, and the batch goes the way above.
        bulk_of_new_subjects_with_five_known(|tokens| tokens[395..].to_vec());
    }

    #[pg_test]
    fn bulks_of_new_subjects_take_at_most_32_subtransactions_per_transaction() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE bulk_batches (id int PRIMARY KEY, token text NOT NULL);
             SELECT subject_audit.track('bulk_batches', 'token');",
        )
        .unwrap();
        for batch in 0..34 {
            Spi::run(&format!(
                "INSERT INTO bulk_batches SELECT g, 'person-' || g FROM generate_series({}, {}) g",
                batch * 256 + 1,
                batch * 256 + 256
            ))
            .unwrap();
        }
        assert_eq!(
            one::<i64>("SELECT count(*) FROM subject_audit.subject_key"),
            34 * 256
        );
        // Keys created in a subtransaction carry its id: 32 of them, and the
        // transaction's own for the last two batches.
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT xmin::text) FROM subject_audit.subject_key"),
            33
        );
    }

    #[pg_test]
    fn a_subtransaction_undoes_what_failed_and_restores_role_and_search_path() {
        use crate::store::{as_owner, unless_error};
        use pgrx::PgSqlErrorCode::*;
        Spi::run(
            "CREATE TABLE sub (v int PRIMARY KEY); SET LOCAL search_path = public, pg_catalog",
        )
        .unwrap();
        let count = || one::<i64>("SELECT count(*) FROM sub");
        let restricted = || unsafe { pg_sys::InSecurityRestrictedOperation() };
        let kept = unless_error(ERRCODE_UNIQUE_VIOLATION, || {
            Spi::run("INSERT INTO sub VALUES (1)").unwrap()
        });
        assert!(kept.is_some());
        // The error named: undone, None, and what the failed work had set
        // (the owner's restricted context, its search_path) is back.
        let undone = unless_error(ERRCODE_UNIQUE_VIOLATION, || {
            as_owner(|| Spi::run("INSERT INTO public.sub VALUES (2), (1)").unwrap())
        });
        assert!(undone.is_none());
        assert_eq!(count(), 1);
        assert!(!restricted());
        assert_eq!(one::<String>("SHOW search_path"), "public, pg_catalog");
        // Any other error: undone too, and raised.
        let raised = PgTryBuilder::new(|| {
            unless_error(ERRCODE_UNIQUE_VIOLATION, || {
                as_owner(|| Spi::run("INSERT INTO public.sub VALUES (3); SELECT 1 / 0").unwrap())
            })
            .map(|_| "not raised")
        })
        .catch_when(ERRCODE_DIVISION_BY_ZERO, |_| Some("raised"))
        .execute();
        assert_eq!(raised, Some("raised"));
        assert_eq!(count(), 1);
        assert!(!restricted());
        assert_eq!(unsafe { pg_sys::GetCurrentTransactionNestLevel() }, 1);
        Spi::run("INSERT INTO sub VALUES (4)").unwrap();
        assert_eq!(count(), 2);
    }

    #[pg_test]
    fn a_subject_erased_before_a_bulk_of_new_ones_gets_a_new_key() {
        install_and_unlock();
        Spi::run(
            "CREATE TABLE bulk_erased (id int PRIMARY KEY, token text NOT NULL, note text);
             SELECT subject_audit.track('bulk_erased', 'token');
             INSERT INTO bulk_erased VALUES (1, 'person-1', 'before');
             SELECT subject_audit.forget_subject('person-1');",
        )
        .unwrap();
        // 400 subjects missing from the cache, none with a live key: the
        // erased subject's insert must not be skipped for its erased key.
        crate::keyring::forget_cached_subjects();
        Spi::run(
            "INSERT INTO bulk_erased SELECT 100 + g, 'person-' || g, 'after' FROM generate_series(1, 400) g",
        )
        .unwrap();
        assert_eq!(
            one::<i64>("SELECT count(*) FROM subject_audit.subject_key WHERE salt IS NOT NULL"),
            400
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM subject_audit.subject_key WHERE erased_at IS NOT NULL"
            ),
            1
        );
        // The 400 keys were inserted without ON CONFLICT, in a subtransaction
        // (its id on them), which stood: none of the sample had a key.
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT xmin::text) FROM subject_audit.subject_key"),
            2
        );
        // The old event stays unreadable; the new one is under the new key.
        assert_eq!(
            one::<String>(
                "SELECT string_agg(coalesce(after->>'note', '(erased)'), ',' ORDER BY event_id)
                 FROM subject_audit.audit_for_subject('person-1') WHERE operation = 'INSERT'"
            ),
            "(erased),after"
        );
    }

    #[pg_test(error = "this public key is already installed as key 1")]
    fn a_key_is_installed_once() {
        Spi::run(
            "ALTER SEQUENCE subject_audit.writer_key_key_id_seq RESTART;
             CREATE TEMP TABLE k AS SELECT public_key FROM subject_audit.generate_keypair();
             SELECT subject_audit.install_public_key(public_key) FROM k;
             SELECT subject_audit.install_public_key(public_key) FROM k;",
        )
        .unwrap();
    }
}
