//! Reading a subject's trail. Every call leaves a READ event in it.

use pgrx::prelude::*;

use super::access;
use crate::envelope::Value;
use crate::reading;

type TrailRowValues = (
    i64,
    TimestampWithTimeZone,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Vec<String>,
    Option<pgrx::JsonB>,
    Option<pgrx::JsonB>,
    String,
);

/// That subject's events, oldest first, decrypted with the session's keys.
/// `db_role` is the role that ran the statement: `actor` is whatever the
/// session set, so a made-up one shows beside the role that really acted.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn audit_for_subject(
    token: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(event_id, i64),
        name!(at, TimestampWithTimeZone),
        name!(operation, String),
        name!(title, String),
        name!(status, String),
        name!(sqlstate, Option<String>),
        name!(description, String),
        name!(actor, String),
        name!(table_name, Option<String>),
        name!(changed_columns, Vec<String>),
        name!(before, Option<pgrx::JsonB>),
        name!(after, Option<pgrx::JsonB>),
        name!(db_role, String),
    ),
> {
    let token = super::required(token, "token");
    access::before_trail_read(token);
    let events = reading::subject_events(token, None);
    access::record_trail_read(token, "viewed audit trail (audit_for_subject)");
    let rows: Vec<TrailRowValues> = events
        .into_iter()
        .map(|e| {
            let description = e.description();
            let (before, after) = e.images();
            (
                e.event_id,
                e.at,
                e.operation,
                e.title,
                e.status,
                e.sqlstate,
                description,
                e.actor,
                e.table_name,
                e.changed_columns,
                before.map(pgrx::JsonB),
                after.map(pgrx::JsonB),
                e.db_role,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// One event of that subject, column by column; another subject's event gives no rows.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_event(
    token: Option<&str>,
    event_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(column_name, String),
        name!(before, Option<String>),
        name!(after, Option<String>),
    ),
> {
    let token = super::required(token, "token");
    let event_id = super::required(event_id, "event_id");
    let text = |v: &Value<String>| match v {
        Value::Text(t) => Some(t.clone()),
        Value::Null | Value::Absent => None,
    };
    access::before_trail_read(token);
    let events = reading::subject_events(token, Some(event_id));
    access::record_trail_read(
        token,
        &format!("viewed audit event {event_id} (audit_event)"),
    );
    let rows: Vec<_> = events
        .into_iter()
        .flat_map(|e| {
            let values: Vec<(Option<String>, Option<String>)> = match &e.payload {
                Some(p) => p
                    .columns
                    .iter()
                    .map(|c| (text(&c.before), text(&c.after)))
                    .collect(),
                None => vec![(None, None); e.changed_columns.len()],
            };
            e.changed_columns
                .into_iter()
                .zip(values)
                .map(|(name, (b, a))| (name, b, a))
                .collect::<Vec<_>>()
        })
        .collect();
    TableIterator::new(rows)
}

/// The whole trail as one document, for a data-subject access request
/// (GDPR Art. 15/20); `docs/export.md` documents it.
#[pg_extern(volatile, parallel_unsafe)]
fn export_subject(token: Option<&str>) -> pgrx::JsonB {
    let token = super::required(token, "token");
    access::before_trail_read(token);
    let events = reading::subject_events(token, None);
    access::record_trail_read(token, "exported audit trail (export_subject)");
    pgrx::JsonB(reading::export_document(token, &events))
}

/// Records that the application retrieved this subject's data (no key
/// needed); returns the event id. The title is stored as plain metadata, the
/// description encrypted in the subject's trail.
#[pg_extern(volatile, parallel_unsafe)]
fn record_access(
    token: Option<&str>,
    title: Option<&str>,
    description: default!(Option<&str>, "NULL"),
) -> i64 {
    let token = super::required(token, "token");
    let title = super::required(title, "title");
    access::record_application_access(token, title, description)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).unwrap().unwrap()
    }

    fn tracked_with_events() {
        Spi::run(
            "SELECT subject_audit.install_public_key(public_key), subject_audit.unlock(private_key)
             FROM subject_audit.generate_keypair();
             CREATE TABLE r (id int PRIMARY KEY, who text, a text);
             SELECT subject_audit.track('r', 'who');
             INSERT INTO r VALUES (1, 'w', 'one');
             SET LOCAL subject_audit.actor = 'alice';
             UPDATE r SET a = 'two';
             RESET subject_audit.actor;
             UPDATE r SET a = 'three';",
        )
        .unwrap();
    }

    #[pg_test]
    fn a_made_up_actor_shows_beside_the_role_that_acted() {
        tracked_with_events();
        let me: String = one("SELECT current_user::text");
        let trail: String =
            one("SELECT db_role FROM subject_audit.audit_for_subject('w') WHERE actor = 'alice'");
        assert_eq!(trail, me);
        let view: String = one("SELECT db_role FROM subject_audit.events WHERE actor = 'alice'");
        assert_eq!(view, me);
        let export: String = one("SELECT e ->> 'database_role' FROM jsonb_array_elements(
                 subject_audit.export_subject('w') -> 'events') e WHERE e ->> 'actor' = 'alice'");
        assert_eq!(export, me);
    }

    #[pg_test]
    fn an_event_that_fails_authentication_is_marked_and_the_rest_is_read() {
        tracked_with_events();
        // Flip one bit of the middle event's ciphertext, past the append-only trigger.
        Spi::run(
            "ALTER TABLE subject_audit.event DISABLE TRIGGER append_only;
             UPDATE subject_audit.event SET payload = set_byte(payload, 0, get_byte(payload, 0) # 1)
             WHERE event_id = (SELECT event_id FROM subject_audit.events WHERE actor = 'alice');
             ALTER TABLE subject_audit.event ENABLE TRIGGER append_only;",
        )
        .unwrap();
        let marked: String = one(
            "SELECT string_agg(format('%s %s %s %s', operation, description, before IS NULL, after IS NULL), ' | ' ORDER BY event_id)
             FROM subject_audit.audit_for_subject('w') WHERE table_name = 'public.r'",
        );
        assert_eq!(
            marked,
            "INSERT created id, who, a t f | UPDATE could not be authenticated: its ciphertext does not belong to this event and subject (altered or moved; see subject_audit.verify()) t t | UPDATE changed a f f"
        );
        let export: String = one(
            "SELECT string_agg(e ->> 'authenticated', ',' ORDER BY (e ->> 'event_id')::bigint)
             FROM jsonb_array_elements(subject_audit.export_subject('w') -> 'events') e
             WHERE e ->> 'table_name' = 'public.r'",
        );
        assert_eq!(export, "true,false,true");
    }
}
