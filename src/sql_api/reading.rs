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
);

/// That subject's events, oldest first, decrypted with the session's keys.
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
