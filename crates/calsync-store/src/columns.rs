//! The read model's detail columns (subject, organizer, location, ...), as bound to a write:
//! their names, their SQL types, the per-row arrays of an `UNNEST`, and their `ON CONFLICT`
//! updates, shared by the event and the series upserts.

use crate::page::Details;
use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::postgres::PgArguments;

/// A statement that takes bound parameters: a plain query or one that returns a column.
pub(crate) trait Binds<'q>: Sized {
    /// Binds the next parameter.
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self;
}

impl<'q> Binds<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self {
        self.bind(v)
    }
}

impl<'q, O> Binds<'q> for sqlx::query::QueryScalar<'q, Postgres, O, PgArguments> {
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self {
        self.bind(v)
    }
}

/// The per-row arrays of the read model's detail columns, bound as `UNNEST` parameters.
pub(crate) struct DetailColumns<'a> {
    ical_uid: Vec<Option<&'a str>>,
    subject: Vec<Option<&'a str>>,
    is_all_day: Vec<Option<bool>>,
    is_cancelled: Vec<Option<bool>>,
    organizer_email: Vec<Option<&'a str>>,
    location: Vec<Option<&'a str>>,
    show_as: Vec<Option<&'a str>>,
    online_meeting_url: Vec<Option<&'a str>>,
    original_start_time_zone: Vec<Option<&'a str>>,
    last_modified_at: Vec<Option<DateTime<Utc>>>,
    change_key: Vec<Option<&'a str>>,
}

/// The detail columns, in the order [`DetailColumns::bind`] binds them.
pub(crate) const DETAIL_COLUMNS: &str = "ical_uid, subject, is_all_day, is_cancelled, organizer_email, location, \
     show_as, online_meeting_url, original_start_time_zone, last_modified_at, change_key";
const DETAIL_TYPES: [&str; 11] = [
    "text[]",
    "text[]",
    "bool[]",
    "bool[]",
    "text[]",
    "text[]",
    "text[]",
    "text[]",
    "text[]",
    "timestamptz[]",
    "text[]",
];

impl<'a> DetailColumns<'a> {
    pub(crate) fn of(details: impl Iterator<Item = &'a Details>) -> Self {
        let mut c = DetailColumns {
            ical_uid: Vec::new(),
            subject: Vec::new(),
            is_all_day: Vec::new(),
            is_cancelled: Vec::new(),
            organizer_email: Vec::new(),
            location: Vec::new(),
            show_as: Vec::new(),
            online_meeting_url: Vec::new(),
            original_start_time_zone: Vec::new(),
            last_modified_at: Vec::new(),
            change_key: Vec::new(),
        };
        for d in details {
            c.ical_uid.push(d.ical_uid.as_deref());
            c.subject.push(d.subject.as_deref());
            c.is_all_day.push(d.is_all_day);
            c.is_cancelled.push(d.is_cancelled);
            c.organizer_email.push(d.organizer_email.as_deref());
            c.location.push(d.location.as_deref());
            c.show_as.push(d.show_as.as_deref());
            c.online_meeting_url.push(d.online_meeting_url.as_deref());
            c.original_start_time_zone
                .push(d.original_start_time_zone.as_deref());
            c.last_modified_at.push(d.last_modified_at);
            c.change_key.push(d.change_key.as_deref());
        }
        c
    }

    pub(crate) fn bind<'q, Q: Binds<'q>>(&'q self, q: Q) -> Q {
        q.bind_one(&self.ical_uid)
            .bind_one(&self.subject)
            .bind_one(&self.is_all_day)
            .bind_one(&self.is_cancelled)
            .bind_one(&self.organizer_email)
            .bind_one(&self.location)
            .bind_one(&self.show_as)
            .bind_one(&self.online_meeting_url)
            .bind_one(&self.original_start_time_zone)
            .bind_one(&self.last_modified_at)
            .bind_one(&self.change_key)
    }
}

/// `$first::text[], …` for the detail columns' parameters.
pub(crate) fn detail_params(first: usize) -> String {
    DETAIL_TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}", first + i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `col = EXCLUDED.col` (or, for a partial row, `COALESCE(EXCLUDED.col, table.col)`).
pub(crate) fn detail_updates(table: &str, partial: bool) -> String {
    DETAIL_COLUMNS
        .split(',')
        .map(str::trim)
        .map(|c| {
            if partial {
                format!("{c} = COALESCE(EXCLUDED.{c}, {table}.{c})")
            } else {
                format!("{c} = EXCLUDED.{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
