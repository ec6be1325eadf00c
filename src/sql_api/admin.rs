//! The admin trail: key and tracking changes and erasures are events too
//! (no subject, no payload), so they are sealed into the ledger like the rest.

use crate::recorder::{self, Draft, Header, StatementContext, Subject};

/// Records one admin event of nobody's.
pub fn record(operation: &str, title: &str, table_name: Option<&str>) {
    record_for(operation, title, table_name, Subject::Nobody);
}

pub fn record_for(operation: &str, title: &str, table_name: Option<&str>, subject: Subject) {
    let header = Header {
        operation,
        status: "ok",
        title: Some(title),
        table_name,
    };
    let draft = Draft {
        subject,
        columns: None,
        payload: None,
    };
    recorder::record(&header, &StatementContext::current(), &[draft]);
}
