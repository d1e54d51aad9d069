//! One event as the tenant stores it (a single event or a series master with its exceptions
//! and cancelled dates), the instances it expands into, and how an instance is rendered as
//! Graph's JSON.

use super::Window;
use crate::recurrence::PatternedRecurrence;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

/// An attendee of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attendee {
    /// Display name.
    pub name: String,
    /// Email address.
    pub address: String,
    /// `required`, `optional` or `resource`.
    pub kind: String,
}

/// The properties an instance shows. A series master's are copied into its occurrences; an
/// exception keeps its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Props {
    /// `subject`.
    pub subject: String,
    /// `body.contentType`: `text` or `html`.
    pub body_type: String,
    /// `body.content`.
    pub body: String,
    /// `location.displayName`.
    pub location: String,
    /// `attendees`.
    pub attendees: Vec<Attendee>,
    /// `isAllDay`.
    pub is_all_day: bool,
    /// Start, as a wall time in `zone`.
    pub start: NaiveDateTime,
    /// End, as a wall time in `zone`.
    pub end: NaiveDateTime,
    /// The zone the event was written in (`start.timeZone`: UTC, an IANA or a Windows name):
    /// its `originalStartTimeZone`, the zone its recurrence expands in, and for an all-day
    /// event the zone whose midnights decide which windows it is in.
    pub zone: String,
    /// `showAs`: `busy`, `free`, `tentative`, `oof`, …
    pub show_as: String,
    /// `importance`: `low`, `normal` or `high`.
    pub importance: String,
    /// `sensitivity`: `normal`, `personal`, `private` or `confidential`.
    pub sensitivity: String,
    /// `categories`.
    pub categories: Vec<String>,
    /// `isCancelled`: set on an attendee's copy when the organizer cancels the meeting.
    pub is_cancelled: bool,
    /// `changeKey`: new on every write.
    pub change_key: String,
    /// `lastModifiedDateTime`.
    pub last_modified: DateTime<Utc>,
}

/// One occurrence of a series edited on its own.
#[derive(Clone, Debug)]
pub struct Exception {
    /// Its own properties, start and end included.
    pub props: Props,
}

/// An event as the mailbox stores it: a single event, or a series master with its exceptions and cancelled dates.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// Graph id.
    pub id: String,
    /// `iCalUId`: shared by all instances of a series.
    pub ical_uid: String,
    /// `createdDateTime`.
    pub created: DateTime<Utc>,
    /// The organizer's display name and address.
    pub organizer: (String, String),
    /// The event's (or series') own properties.
    pub props: Props,
    /// The pattern and range of a series; `None` for a single event.
    pub recurrence: Option<PatternedRecurrence>,
    /// Edited occurrences, keyed by the date the occurrence originally fell on.
    pub exceptions: BTreeMap<NaiveDate, Exception>,
    /// Original dates of cancelled occurrences.
    pub cancelled: BTreeSet<NaiveDate>,
}

/// The `type` of an instance in a calendarView.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InstanceKind {
    /// A non-recurring event.
    SingleInstance,
    /// An occurrence of a series, unchanged.
    Occurrence,
    /// An occurrence edited on its own.
    Exception,
}

impl InstanceKind {
    /// The name Graph uses in `type`.
    pub fn graph_name(self) -> &'static str {
        match self {
            InstanceKind::SingleInstance => "singleInstance",
            InstanceKind::Occurrence => "occurrence",
            InstanceKind::Exception => "exception",
        }
    }
}

/// One entry of a calendarView: a single event, an occurrence or an exception.
#[derive(Clone, Debug)]
pub struct Instance<'a> {
    /// Graph id (for occurrences, derived from the series and the original date).
    pub id: String,
    /// Single, occurrence or exception.
    pub kind: InstanceKind,
    /// The stored event it comes from (the master, for occurrences and exceptions).
    pub event: &'a StoredEvent,
    /// The date the occurrence was scheduled on by the pattern.
    pub original_date: Option<NaiveDate>,
    /// The properties it shows.
    pub props: &'a Props,
    /// Start, as a UTC wall time (the instant; an all-day event's is midnight in its zone).
    pub start: NaiveDateTime,
    /// End, as a UTC wall time.
    pub end: NaiveDateTime,
    /// Start, as a wall time in the event's zone (an all-day event's floating date).
    pub local_start: NaiveDateTime,
    /// End, as a wall time in the event's zone.
    pub local_end: NaiveDateTime,
}

/// The zone a response renders times in: what `Prefer: outlook.timezone` named (UTC without
/// it), and whether items may come in their own zone anyway.
#[derive(Clone, Debug)]
pub struct Render {
    /// The zone's name as the client wrote it; it labels every `timeZone`.
    pub label: String,
    /// The zone.
    pub tz: chrono_tz::Tz,
    /// Render a (full) item written in another zone in that zone, under its Windows name,
    /// whatever the client asked for (Q&A 1382503; the `own_time_zone_despite_prefer` switch).
    pub own_zone: bool,
}

impl Render {
    /// Plain UTC, as write answers always are (Prefer is ignored on writes: docs#116, #8755).
    pub fn utc() -> Self {
        Render {
            label: "UTC".to_owned(),
            tz: chrono_tz::Tz::UTC,
            own_zone: false,
        }
    }
}

impl Instance<'_> {
    /// Changes whenever anything Graph would show for this instance changes.
    pub fn version(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.props.change_key.hash(&mut h);
        self.start.hash(&mut h);
        self.end.hash(&mut h);
        self.kind.hash(&mut h);
        h.finish()
    }

    /// The master's id, for occurrences and exceptions.
    pub fn series_master_id(&self) -> Option<&str> {
        match self.kind {
            InstanceKind::SingleInstance => None,
            _ => Some(&self.event.id),
        }
    }

    /// The `iCalUId` it shows.
    pub fn ical_uid(&self) -> String {
        match self.original_date {
            None => self.event.ical_uid.clone(),
            Some(d) => format!("{}{}", self.event.ical_uid, d.format("%Y%m%d")),
        }
    }

    /// The change key it shows: an occurrence's and an exception's are the master's, as in
    /// Microsoft's `/instances` example (`v1-event-instances-occurrences-and-exception.json`):
    /// Outlook stores exceptions inside the master item.
    fn shown_change_key(&self) -> &str {
        match self.kind {
            InstanceKind::SingleInstance => &self.props.change_key,
            InstanceKind::Occurrence | InstanceKind::Exception => &self.event.props.change_key,
        }
    }

    /// When the occurrence was scheduled by the pattern, as a UTC wall time.
    fn original_start(&self) -> Option<NaiveDateTime> {
        self.original_date.map(|d| {
            crate::zone::to_utc(
                d.and_time(self.event.props.start.time()),
                self.event.series_zone(),
            )
        })
    }

    /// `start` and `end` as `dateTimeTimeZone`s in the zone `render` says. An all-day event is
    /// a floating date: midnight to midnight in whatever zone the response is rendered in
    /// (docs#1802, "by design").
    fn times(&self, render: &Render, full: bool) -> (Value, Value) {
        if self.props.is_all_day {
            return (
                json!({"dateTime": graph_date_time(self.local_start), "timeZone": render.label}),
                json!({"dateTime": graph_date_time(self.local_end), "timeZone": render.label}),
            );
        }
        if full && render.own_zone && !crate::zone::is_utc(&self.props.zone) {
            let label = crate::zone::windows_name(&self.props.zone);
            return (
                json!({"dateTime": graph_date_time(self.local_start), "timeZone": label}),
                json!({"dateTime": graph_date_time(self.local_end), "timeZone": label}),
            );
        }
        let at = |t: NaiveDateTime| json!({"dateTime": graph_date_time(crate::zone::from_utc(t, render.tz)), "timeZone": render.label});
        (at(self.start), at(self.end))
    }

    /// An occurrence as Outlook lists it in calendarView delta: no subject, organizer,
    /// location or anything else but these (microsoft-graph-docs #22197, contrib #34).
    pub fn to_stub_json(&self, render: &Render) -> Value {
        let (start, end) = self.times(render, false);
        json!({
            "@odata.type": "#microsoft.graph.event",
            "@odata.etag": format!("W/\"{}\"", self.shown_change_key()),
            "id": self.id,
            "seriesMasterId": self.series_master_id(),
            "type": self.kind.graph_name(),
            "start": start,
            "end": end,
        })
    }

    /// The instance as Graph renders it in full (calendarView, `/instances`, `GET` of one).
    pub fn to_graph_json(&self, render: &Render) -> Value {
        let p = self.props;
        let change_key = self.shown_change_key();
        let mut m = Map::new();
        m.insert("@odata.type".into(), json!("#microsoft.graph.event"));
        m.insert("@odata.etag".into(), json!(format!("W/\"{change_key}\"")));
        m.insert("id".into(), json!(self.id));
        m.insert(
            "createdDateTime".into(),
            json!(graph_instant(self.event.created)),
        );
        m.insert(
            "lastModifiedDateTime".into(),
            json!(graph_instant(p.last_modified)),
        );
        m.insert("changeKey".into(), json!(change_key));
        m.insert("categories".into(), json!(p.categories));
        m.insert("transactionId".into(), Value::Null);
        m.insert("originalStartTimeZone".into(), json!(p.zone));
        m.insert("originalEndTimeZone".into(), json!(p.zone));
        m.insert("iCalUId".into(), json!(self.ical_uid()));
        m.insert("reminderMinutesBeforeStart".into(), json!(15));
        m.insert("isReminderOn".into(), json!(!p.is_all_day));
        m.insert("hasAttachments".into(), json!(false));
        m.insert("subject".into(), json!(p.subject));
        m.insert("bodyPreview".into(), json!(body_preview(&p.body)));
        m.insert("importance".into(), json!(p.importance));
        m.insert("sensitivity".into(), json!(p.sensitivity));
        m.insert("isAllDay".into(), json!(p.is_all_day));
        m.insert("isCancelled".into(), json!(p.is_cancelled));
        m.insert("isOrganizer".into(), json!(true));
        m.insert("responseRequested".into(), json!(true));
        m.insert("seriesMasterId".into(), json!(self.series_master_id()));
        m.insert("showAs".into(), json!(p.show_as));
        m.insert("type".into(), json!(self.kind.graph_name()));
        if let Some(original) = self.original_start() {
            // v1.0 documents `originalStart` on occurrences and exceptions (event.md).
            m.insert(
                "originalStart".into(),
                json!(graph_instant(original.and_utc())),
            );
        }
        m.insert(
            "webLink".into(),
            json!(format!(
                "https://outlook.office365.com/owa/?itemid={}&exvsurl=1&path=/calendar/item",
                self.id
            )),
        );
        m.insert("onlineMeetingUrl".into(), Value::Null);
        m.insert("isOnlineMeeting".into(), json!(false));
        m.insert("onlineMeetingProvider".into(), json!("unknown"));
        m.insert("allowNewTimeProposals".into(), json!(true));
        m.insert("isDraft".into(), json!(false));
        m.insert("hideAttendees".into(), json!(false));
        m.insert("recurrence".into(), Value::Null);
        m.insert("onlineMeeting".into(), Value::Null);
        m.insert(
            "responseStatus".into(),
            json!({"response": "organizer", "time": "0001-01-01T00:00:00Z"}),
        );
        m.insert(
            "body".into(),
            json!({"contentType": p.body_type, "content": p.body}),
        );
        let (start, end) = self.times(render, true);
        m.insert("start".into(), start);
        m.insert("end".into(), end);
        // Graph names a free-text location as its own private uniqueId; an empty one has none.
        // v1.0's physicalAddress has no `type` (beta's does: the official SDK saw the beta shape).
        let location = if p.location.is_empty() {
            json!({"displayName": "", "locationType": "default", "uniqueIdType": "unknown",
                   "address": {}, "coordinates": {}})
        } else {
            json!({"displayName": p.location, "locationType": "default", "uniqueId": p.location,
                   "uniqueIdType": "private", "address": {"type": "unknown"}, "coordinates": {}})
        };
        m.insert("location".into(), location);
        let locations = if p.location.is_empty() {
            json!([])
        } else {
            json!([{"displayName": p.location, "locationType": "default", "uniqueIdType": "unknown"}])
        };
        m.insert("locations".into(), locations);
        let attendees: Vec<Value> = p
            .attendees
            .iter()
            .map(|a| {
                json!({"type": a.kind,
                       "status": {"response": "none", "time": "0001-01-01T00:00:00Z"},
                       "emailAddress": {"name": a.name, "address": a.address}})
            })
            .collect();
        m.insert("attendees".into(), Value::Array(attendees));
        let (name, address) = &self.event.organizer;
        m.insert(
            "organizer".into(),
            json!({"emailAddress": {"name": name, "address": address}}),
        );
        Value::Object(m)
    }
}

/// `2016-12-09T20:30:00.0000000`: seven fraction digits and no offset, as Graph writes
/// `dateTimeTimeZone.dateTime`.
pub fn graph_date_time(t: NaiveDateTime) -> String {
    use chrono::Timelike;
    format!(
        "{}.{:07}",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.nanosecond() / 100
    )
}

/// `2020-06-16T04:05:43.8668791Z`: a UTC DateTimeOffset as in `lastModifiedDateTime`.
pub fn graph_instant(t: DateTime<Utc>) -> String {
    format!("{}Z", graph_date_time(t.naive_utc()))
}

fn body_preview(body: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.chars().take(255).collect()
}

impl StoredEvent {
    /// The zone a series expands in: its `recurrenceTimeZone`, else its start's zone.
    pub fn series_zone(&self) -> &str {
        match &self.recurrence {
            Some(r)
                if !r.range.recurrence_time_zone.is_empty()
                    && crate::zone::resolve(&r.range.recurrence_time_zone).is_some() =>
            {
                &r.range.recurrence_time_zone
            }
            _ => &self.props.zone,
        }
    }

    /// The event itself as an instance (a single event, or a master's own first occurrence).
    fn own_instance(&self, kind: InstanceKind) -> Instance<'_> {
        Instance {
            id: self.id.clone(),
            kind,
            event: self,
            original_date: None,
            props: &self.props,
            start: crate::zone::to_utc(self.props.start, &self.props.zone),
            end: crate::zone::to_utc(self.props.end, &self.props.zone),
            local_start: self.props.start,
            local_end: self.props.end,
        }
    }

    /// Every instance of this event that a calendarView over `window` lists. Membership is
    /// decided on real instants: an all-day event's start is midnight in its own zone
    /// (Q&A 970643).
    pub fn instances_in<'a>(&'a self, window: &Window, out: &mut Vec<Instance<'a>>) {
        let Some(rec) = &self.recurrence else {
            let inst = self.own_instance(InstanceKind::SingleInstance);
            if window.overlaps(inst.start, inst.end) {
                out.push(inst);
            }
            return;
        };
        // Expand two days past the window end: zones are up to 14 hours from UTC, and an
        // occurrence starting late on the last day may still overlap.
        let until = (window.end + Duration::days(2)).date_naive();
        let mut dates: BTreeSet<NaiveDate> = rec.dates_until(until).into_iter().collect();
        dates.extend(self.exceptions.keys().copied());
        for date in dates {
            if self.cancelled.contains(&date) {
                continue;
            }
            let inst = self.instance_on(date);
            if window.overlaps(inst.start, inst.end) {
                out.push(inst);
            }
        }
    }

    /// The instance the pattern put on `date`: an occurrence, or the exception made of it.
    pub fn instance_on(&self, date: NaiveDate) -> Instance<'_> {
        let time = self.props.start.time();
        let id = occurrence_id(&self.id, date.and_time(time));
        match self.exceptions.get(&date) {
            Some(ex) => Instance {
                id,
                kind: InstanceKind::Exception,
                event: self,
                original_date: Some(date),
                props: &ex.props,
                start: crate::zone::to_utc(ex.props.start, &ex.props.zone),
                end: crate::zone::to_utc(ex.props.end, &ex.props.zone),
                local_start: ex.props.start,
                local_end: ex.props.end,
            },
            None => {
                let local_start = date.and_time(time);
                let local_end = local_start + (self.props.end - self.props.start);
                let zone = self.series_zone();
                Instance {
                    id,
                    kind: InstanceKind::Occurrence,
                    event: self,
                    original_date: Some(date),
                    props: &self.props,
                    start: crate::zone::to_utc(local_start, zone),
                    end: crate::zone::to_utc(local_end, zone),
                    local_start,
                    local_end,
                }
            }
        }
    }

    /// A single event as `GET` shows it.
    pub fn single_instance(&self) -> Instance<'_> {
        self.own_instance(InstanceKind::SingleInstance)
    }

    /// Changes whenever anything of the series changes: its own properties, pattern,
    /// exceptions or cancelled dates.
    pub fn series_version(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.props.change_key.hash(&mut h);
        self.props.start.hash(&mut h);
        self.props.end.hash(&mut h);
        for (d, ex) in &self.exceptions {
            (d, &ex.props.change_key).hash(&mut h);
        }
        self.cancelled.hash(&mut h);
        serde_json::to_string(&self.recurrence)
            .unwrap_or_default()
            .hash(&mut h);
        h.finish()
    }

    /// Whether `date` is an occurrence date of this series that has not been cancelled.
    pub fn has_occurrence_on(&self, date: NaiveDate) -> bool {
        match &self.recurrence {
            Some(rec) => {
                !self.cancelled.contains(&date)
                    && (self.exceptions.contains_key(&date)
                        || rec.dates_until(date).contains(&date))
            }
            None => false,
        }
    }

    /// The series master as `GET /events/{id}` shows it, and as Outlook lists it in delta:
    /// with its first occurrence's start and end.
    pub fn master_json(&self, render: &Render) -> Value {
        let mut v = self
            .own_instance(InstanceKind::SingleInstance)
            .to_graph_json(render);
        if let (Some(rec), Value::Object(m)) = (&self.recurrence, &mut v) {
            m.insert("type".into(), json!("seriesMaster"));
            m.insert("seriesMasterId".into(), Value::Null);
            m.insert(
                "recurrence".into(),
                serde_json::to_value(rec).unwrap_or(Value::Null),
            );
        }
        v
    }
}

pub(super) const SINGLE_PREFIX: &str = "AAMkAGev";
const OCCURRENCE_PREFIX: &str = "AAMkAGoc";

/// Occurrence ids name their series and original start, as Outlook's do: a PATCH or DELETE on
/// an occurrence id finds its way back to the master, and a series moved to another time of day
/// gets new occurrence ids (the old ones are simply gone).
pub fn occurrence_id(master_id: &str, original_start: NaiveDateTime) -> String {
    let raw = format!("{master_id}|{}", original_start.format("%Y%m%dT%H%M%S"));
    format!("{OCCURRENCE_PREFIX}{}=", URL_SAFE_NO_PAD.encode(raw))
}

/// The master id and original start an occurrence id was made from; `None` for other ids.
pub fn parse_occurrence_id(id: &str) -> Option<(String, NaiveDateTime)> {
    let rest = id.strip_prefix(OCCURRENCE_PREFIX)?.strip_suffix('=')?;
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(rest).ok()?).ok()?;
    let (master, start) = raw.rsplit_once('|')?;
    Some((
        master.to_owned(),
        NaiveDateTime::parse_from_str(start, "%Y%m%dT%H%M%S").ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrence_ids_round_trip_to_master_and_original_start() {
        let start = NaiveDate::from_ymd_opt(2024, 5, 6)
            .unwrap()
            .and_hms_opt(9, 30, 0)
            .unwrap();
        let id = occurrence_id("AAMkAGevXYZ=", start);
        assert_eq!(
            parse_occurrence_id(&id),
            Some(("AAMkAGevXYZ=".to_owned(), start))
        );
        assert_ne!(
            id,
            occurrence_id("AAMkAGevXYZ=", start + Duration::hours(1)),
            "a retimed series gets new occurrence ids"
        );
        assert_eq!(parse_occurrence_id("AAMkAGevXYZ="), None);
    }

    #[test]
    fn graph_date_time_has_seven_fraction_digits_and_no_offset() {
        let t = NaiveDate::from_ymd_opt(2016, 12, 9)
            .unwrap()
            .and_hms_opt(20, 30, 0)
            .unwrap();
        assert_eq!(graph_date_time(t), "2016-12-09T20:30:00.0000000");
    }
}
