//! calsync-details: the detail columns of the read model (subject, organizer, location, ...),
//! declared once in the table below. Everything else follows from that table: the
//! [`Details`] struct, how calsync-graph reads each field out of an event's JSON
//! ([`Details::from_graph`]), how calsync-store binds them to its upserts ([`COLUMNS`],
//! [`Details::fields`]) and the store test that `calendar_events`, `events` and `series` have
//! each of them. Adding a read-model column is a migration plus one line here.
//!
//! Knows neither HTTP nor SQL: graph and store both depend on it, it on neither.
//!
//! | module | owns |
//! |---|---|
//! | [`field`] | the kinds a column can have ([`Kind`]) and a field's value as bound ([`Field`]) |
//! | [`read`] | reading a value out of Graph's JSON (paths, strings, instants) |
#![warn(missing_docs)]

pub mod field;
pub mod read;

pub use field::{Field, Kind};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// One detail column: its name (the same in `events`, `series` and `calendar_events`) and its
/// SQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The column's name.
    pub name: &'static str,
    /// Its SQL type as PostgreSQL names it in `information_schema` (`text`, `boolean`, ...).
    pub sql_type: &'static str,
    /// The array type an `UNNEST` parameter of it is cast to (`text[]`, ...).
    pub array_type: &'static str,
    /// Whether `calendar_events` shows it (`view`), or only the store keeps it (`store`).
    pub in_view: bool,
}

macro_rules! details {
    (@in_view view) => { true };
    (@in_view store) => { false };
    ($( $(#[$doc:meta])* $shown:ident $field:ident: $ty:ty = $read:expr; )*) => {
        /// What an event says about itself beyond its id and times: the fields the read model
        /// indexes. An occurrence stub has none of them; its series has.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct Details {
            $( $(#[$doc])* pub $field: Option<$ty>, )*
        }

        /// The detail columns, in the order [`Details::fields`] gives their values.
        pub const COLUMNS: &[Column] = &[
            $( Column {
                name: stringify!($field),
                sql_type: <$ty as Kind>::SQL_TYPE,
                array_type: <$ty as Kind>::ARRAY_TYPE,
                in_view: details!(@in_view $shown),
            }, )*
        ];

        impl Details {
            /// Reads each field out of an event object as Graph sends it; a field that is
            /// absent, `null` or of another type is `None`.
            pub fn from_graph(event: &Map<String, Value>) -> Details {
                Details { $( $field: ($read)(event), )* }
            }

            /// The values, in the order of [`COLUMNS`].
            pub fn fields(&self) -> [Field<'_>; COLUMNS.len()] {
                [ $( Kind::field(&self.$field), )* ]
            }

            /// Lays `newer` over `self`: fields it has win, fields it lacks are kept.
            pub fn merge(&mut self, newer: Details) {
                $( if newer.$field.is_some() { self.$field = newer.$field; } )*
            }

            /// Each text field, to be repaired in place.
            pub fn texts_mut(&mut self) -> impl Iterator<Item = &mut String> {
                [ $( Kind::text_mut(&mut self.$field), )* ].into_iter().flatten()
            }
        }
    };
}

// The table. Each line: whether `calendar_events` shows the column (`view`) or only the store
// keeps it (`store`), its name, its type, and how Graph's event JSON gives it.
details! {
    /// `iCalUId`: shared by every instance of a series.
    view ical_uid: String = |e| read::text(e, &["iCalUId"]);
    /// `subject`.
    view subject: String = |e| read::text(e, &["subject"]);
    /// `isAllDay`.
    view is_all_day: bool = |e| read::boolean(e, &["isAllDay"]);
    /// `isCancelled`: an attendee's copy of a meeting its organizer cancelled.
    view is_cancelled: bool = |e| read::boolean(e, &["isCancelled"]);
    /// `organizer.emailAddress.address`.
    view organizer_email: String = |e| read::text(e, &["organizer", "emailAddress", "address"]);
    /// `location.displayName` (an empty one is none).
    view location: String = |e| read::text(e, &["location", "displayName"]).filter(|l| !l.is_empty());
    /// `showAs`: `free`, `tentative`, `busy`, `oof`, `workingElsewhere`.
    view show_as: String = |e| read::text(e, &["showAs"]);
    /// `onlineMeeting.joinUrl`, or the older `onlineMeetingUrl`.
    view online_meeting_url: String = |e| read::text(e, &["onlineMeeting", "joinUrl"])
        .or_else(|| read::text(e, &["onlineMeetingUrl"]));
    /// `originalStartTimeZone`: the zone the organizer used.
    view original_start_time_zone: String = |e| read::text(e, &["originalStartTimeZone"]);
    /// `lastModifiedDateTime`.
    view last_modified_at: DateTime<Utc> = |e| read::instant(e, &["lastModifiedDateTime"]);
    /// `changeKey`: an unchanged key means an unchanged row (the upsert skips it); the view
    /// shows it inside `payload`.
    store change_key: String = |e| read::text(e, &["changeKey"]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn each_field_is_read_from_where_graph_writes_it() {
        // Field names and shapes as in ../shared/graph-examples (event resource).
        let d = Details::from_graph(&event(json!({
            "iCalUId": "uid", "subject": "s", "isAllDay": false, "isCancelled": true,
            "organizer": {"emailAddress": {"name": "A", "address": "a@x"}},
            "location": {"displayName": "Room 1"}, "showAs": "busy",
            "onlineMeeting": {"joinUrl": "https://teams/j"},
            "originalStartTimeZone": "Pacific Standard Time",
            "lastModifiedDateTime": "2024-01-02T03:04:05.1234567Z", "changeKey": "ck"
        })));
        assert_eq!(d.ical_uid.as_deref(), Some("uid"));
        assert_eq!(d.subject.as_deref(), Some("s"));
        assert_eq!(d.is_all_day, Some(false));
        assert_eq!(d.is_cancelled, Some(true));
        assert_eq!(d.organizer_email.as_deref(), Some("a@x"));
        assert_eq!(d.location.as_deref(), Some("Room 1"));
        assert_eq!(d.show_as.as_deref(), Some("busy"));
        assert_eq!(d.online_meeting_url.as_deref(), Some("https://teams/j"));
        assert_eq!(
            d.original_start_time_zone.as_deref(),
            Some("Pacific Standard Time")
        );
        assert_eq!(
            d.last_modified_at.map(|t| t.to_rfc3339()),
            Some("2024-01-02T03:04:05.123456700+00:00".to_owned())
        );
        assert_eq!(d.change_key.as_deref(), Some("ck"));
    }

    #[test]
    fn absent_null_empty_and_mistyped_fields_are_none() {
        let d = Details::from_graph(&event(json!({
            "subject": null, "isAllDay": "yes", "location": {"displayName": ""},
            "organizer": {"emailAddress": null}, "lastModifiedDateTime": "yesterday",
            "onlineMeetingUrl": "https://old/j"
        })));
        assert_eq!(d.subject, None);
        assert_eq!(d.is_all_day, None);
        assert_eq!(d.location, None, "an empty location is none");
        assert_eq!(d.organizer_email, None);
        assert_eq!(d.last_modified_at, None);
        assert_eq!(
            d.online_meeting_url.as_deref(),
            Some("https://old/j"),
            "the older property when there is no onlineMeeting"
        );
    }

    #[test]
    fn the_table_and_the_values_agree() {
        let d = Details::from_graph(&event(json!({"subject": "s", "isAllDay": true})));
        let fields = d.fields();
        assert_eq!(fields.len(), COLUMNS.len());
        for (c, f) in COLUMNS.iter().zip(fields) {
            assert_eq!(f.array_type(), c.array_type, "{}", c.name);
            match c.name {
                "subject" => assert_eq!(f, Field::Text(Some("s"))),
                "is_all_day" => assert_eq!(f, Field::Bool(Some(true))),
                _ => assert!(f.is_none(), "{}", c.name),
            }
        }
        let mut names: Vec<_> = COLUMNS.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COLUMNS.len(), "a column named twice");
    }

    #[test]
    fn merge_keeps_what_the_newer_lacks() {
        let mut old = Details::from_graph(&event(json!({"subject": "a", "showAs": "busy"})));
        old.merge(Details::from_graph(&event(json!({"subject": "b"}))));
        assert_eq!(old.subject.as_deref(), Some("b"));
        assert_eq!(old.show_as.as_deref(), Some("busy"));
    }

    #[test]
    fn texts_mut_reaches_every_text_field_and_only_those() {
        let mut d = Details::from_graph(&event(json!({
            "iCalUId": "x", "subject": "x", "isAllDay": true, "showAs": "x", "changeKey": "x",
            "organizer": {"emailAddress": {"address": "x"}}, "location": {"displayName": "x"},
            "onlineMeetingUrl": "x", "originalStartTimeZone": "x", "isCancelled": false
        })));
        for s in d.texts_mut() {
            *s = "y".into();
        }
        let texts = COLUMNS.iter().filter(|c| c.sql_type == "text").count();
        let ys = d
            .fields()
            .iter()
            .filter(|f| **f == Field::Text(Some("y")))
            .count();
        assert_eq!(ys, texts);
        assert_eq!(d.is_all_day, Some(true));
    }
}
