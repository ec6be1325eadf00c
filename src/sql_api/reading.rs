//! Reading a subject's trail.

use pgrx::prelude::*;

use crate::envelope::Value;
use crate::reading;

type TrailRowValues = (
    i64,
    TimestampWithTimeZone,
    String,
    String,
    String,
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
    token: &str,
) -> TableIterator<
    'static,
    (
        name!(event_id, i64),
        name!(at, TimestampWithTimeZone),
        name!(operation, String),
        name!(title, String),
        name!(status, String),
        name!(description, String),
        name!(actor, String),
        name!(table_name, Option<String>),
        name!(changed_columns, Vec<String>),
        name!(before, Option<pgrx::JsonB>),
        name!(after, Option<pgrx::JsonB>),
    ),
> {
    let rows: Vec<TrailRowValues> = reading::subject_events(token, None)
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
    token: &str,
    event_id: i64,
) -> TableIterator<
    'static,
    (
        name!(column_name, String),
        name!(before, Option<String>),
        name!(after, Option<String>),
    ),
> {
    let text = |v: &Value<String>| match v {
        Value::Text(t) => Some(t.clone()),
        Value::Null | Value::Absent => None,
    };
    let rows: Vec<_> = reading::subject_events(token, Some(event_id))
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
