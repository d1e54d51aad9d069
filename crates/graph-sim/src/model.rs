//! Tenant state: users, calendars, events and series, and how they expand into the instances
//! a calendarView shows.

use crate::clock::Clock;
use crate::recurrence::PatternedRecurrence;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// A half-open time window `[start, end)` as given by `startDateTime`/`endDateTime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// calendarView semantics: an instance is in the window when it overlaps it; a zero-length
    /// instance counts when it starts inside.
    pub fn overlaps(&self, start: NaiveDateTime, end: NaiveDateTime) -> bool {
        let (ws, we) = (self.start.naive_utc(), self.end.naive_utc());
        if start == end {
            start >= ws && start < we
        } else {
            start < we && end > ws
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attendee {
    pub name: String,
    pub address: String,
    pub kind: String,
}

/// The properties an instance shows. A series master's are copied into its occurrences; an
/// exception keeps its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Props {
    pub subject: String,
    pub body_type: String,
    pub body: String,
    pub location: String,
    pub attendees: Vec<Attendee>,
    pub is_all_day: bool,
    pub start: NaiveDateTime,
    pub end: NaiveDateTime,
    pub show_as: String,
    pub importance: String,
    pub sensitivity: String,
    pub categories: Vec<String>,
    pub change_key: String,
    pub last_modified: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct Exception {
    pub props: Props,
}

#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub id: String,
    pub ical_uid: String,
    pub created: DateTime<Utc>,
    pub organizer: (String, String),
    pub props: Props,
    pub recurrence: Option<PatternedRecurrence>,
    /// Edited occurrences, keyed by the date the occurrence originally fell on.
    pub exceptions: BTreeMap<NaiveDate, Exception>,
    pub cancelled: BTreeSet<NaiveDate>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InstanceKind {
    SingleInstance,
    Occurrence,
    Exception,
}

impl InstanceKind {
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
    pub id: String,
    pub kind: InstanceKind,
    pub event: &'a StoredEvent,
    pub original_date: Option<NaiveDate>,
    pub props: &'a Props,
    pub start: NaiveDateTime,
    pub end: NaiveDateTime,
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

    pub fn series_master_id(&self) -> Option<&str> {
        match self.kind {
            InstanceKind::SingleInstance => None,
            _ => Some(&self.event.id),
        }
    }

    pub fn ical_uid(&self) -> String {
        match self.original_date {
            None => self.event.ical_uid.clone(),
            Some(d) => format!("{}{}", self.event.ical_uid, d.format("%Y%m%d")),
        }
    }

    /// The instance as Graph renders it in a calendarView (delta) page.
    pub fn to_graph_json(&self) -> Value {
        let p = self.props;
        let mut m = Map::new();
        m.insert("@odata.type".into(), json!("#microsoft.graph.event"));
        m.insert(
            "@odata.etag".into(),
            json!(format!("W/\"{}\"", p.change_key)),
        );
        m.insert("id".into(), json!(self.id));
        m.insert(
            "createdDateTime".into(),
            json!(graph_instant(self.event.created)),
        );
        m.insert(
            "lastModifiedDateTime".into(),
            json!(graph_instant(p.last_modified)),
        );
        m.insert("changeKey".into(), json!(p.change_key));
        m.insert("categories".into(), json!(p.categories));
        m.insert("transactionId".into(), Value::Null);
        m.insert("originalStartTimeZone".into(), json!("UTC"));
        m.insert("originalEndTimeZone".into(), json!("UTC"));
        m.insert("iCalUId".into(), json!(self.ical_uid()));
        m.insert("reminderMinutesBeforeStart".into(), json!(15));
        m.insert("isReminderOn".into(), json!(!p.is_all_day));
        m.insert("hasAttachments".into(), json!(false));
        m.insert("subject".into(), json!(p.subject));
        m.insert("bodyPreview".into(), json!(body_preview(&p.body)));
        m.insert("importance".into(), json!(p.importance));
        m.insert("sensitivity".into(), json!(p.sensitivity));
        m.insert("isAllDay".into(), json!(p.is_all_day));
        m.insert("isCancelled".into(), json!(false));
        m.insert("isOrganizer".into(), json!(true));
        m.insert("responseRequested".into(), json!(true));
        m.insert("seriesMasterId".into(), json!(self.series_master_id()));
        m.insert("showAs".into(), json!(p.show_as));
        m.insert("type".into(), json!(self.kind.graph_name()));
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
        m.insert("start".into(), date_time_time_zone(self.start));
        m.insert("end".into(), date_time_time_zone(self.end));
        // Graph names a free-text location as its own private uniqueId; an empty one has none.
        let location = if p.location.is_empty() {
            json!({"displayName": "", "locationType": "default", "uniqueIdType": "unknown",
                   "address": {"type": "unknown"}, "coordinates": {}})
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

fn date_time_time_zone(t: NaiveDateTime) -> Value {
    json!({"dateTime": graph_date_time(t), "timeZone": "UTC"})
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
    /// Every instance of this event that a calendarView over `window` lists.
    pub fn instances_in<'a>(&'a self, window: &Window, out: &mut Vec<Instance<'a>>) {
        let Some(rec) = &self.recurrence else {
            if window.overlaps(self.props.start, self.props.end) {
                out.push(Instance {
                    id: self.id.clone(),
                    kind: InstanceKind::SingleInstance,
                    event: self,
                    original_date: None,
                    props: &self.props,
                    start: self.props.start,
                    end: self.props.end,
                });
            }
            return;
        };
        let duration = self.props.end - self.props.start;
        let time = self.props.start.time();
        // Expand one day past the window end: an occurrence starting late on the last day may
        // still overlap, and exceptions can move an occurrence from outside into the window.
        let until = (window.end + Duration::days(1)).date_naive();
        let mut dates: BTreeSet<NaiveDate> = rec.dates_until(until).into_iter().collect();
        dates.extend(self.exceptions.keys().copied());
        for date in dates {
            if self.cancelled.contains(&date) {
                continue;
            }
            let inst = self.instance_on(date, time, duration);
            if window.overlaps(inst.start, inst.end) {
                out.push(inst);
            }
        }
    }

    fn instance_on(&self, date: NaiveDate, time: NaiveTime, duration: Duration) -> Instance<'_> {
        let id = occurrence_id(&self.id, date);
        match self.exceptions.get(&date) {
            Some(ex) => Instance {
                id,
                kind: InstanceKind::Exception,
                event: self,
                original_date: Some(date),
                props: &ex.props,
                start: ex.props.start,
                end: ex.props.end,
            },
            None => {
                let start = date.and_time(time);
                Instance {
                    id,
                    kind: InstanceKind::Occurrence,
                    event: self,
                    original_date: Some(date),
                    props: &self.props,
                    start,
                    end: start + duration,
                }
            }
        }
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

    /// The series master as `GET /events/{id}` shows it.
    pub fn master_json(&self) -> Value {
        let inst = Instance {
            id: self.id.clone(),
            kind: InstanceKind::SingleInstance,
            event: self,
            original_date: None,
            props: &self.props,
            start: self.props.start,
            end: self.props.end,
        };
        let mut v = inst.to_graph_json();
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

const SINGLE_PREFIX: &str = "AAMkAGev";
const OCCURRENCE_PREFIX: &str = "AAMkAGoc";

/// Occurrence ids are stable and name their series and original date, so a PATCH or DELETE
/// on an occurrence id finds its way back to the master.
pub fn occurrence_id(master_id: &str, date: NaiveDate) -> String {
    let raw = format!("{master_id}|{}", date.format("%Y%m%d"));
    format!("{OCCURRENCE_PREFIX}{}=", URL_SAFE_NO_PAD.encode(raw))
}

pub fn parse_occurrence_id(id: &str) -> Option<(String, NaiveDate)> {
    let rest = id.strip_prefix(OCCURRENCE_PREFIX)?.strip_suffix('=')?;
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(rest).ok()?).ok()?;
    let (master, date) = raw.rsplit_once('|')?;
    Some((
        master.to_owned(),
        NaiveDate::parse_from_str(date, "%Y%m%d").ok()?,
    ))
}

#[derive(Clone, Debug)]
pub struct Calendar {
    pub id: String,
    pub name: String,
    pub is_default: bool,
    pub events: BTreeMap<String, StoredEvent>,
    /// Bumped on every change in this calendar; a delta token remembers the value it saw.
    pub seq: u64,
    /// `(seq, event id)` for every change, so a round can tell which events moved.
    pub change_log: Vec<(u64, String)>,
}

impl Calendar {
    pub fn instances<'a>(&'a self, window: &Window) -> Vec<Instance<'a>> {
        let mut out = Vec::new();
        for ev in self.events.values() {
            ev.instances_in(window, &mut out);
        }
        out
    }

    pub fn touch(&mut self, event_id: &str) {
        self.seq += 1;
        self.change_log.push((self.seq, event_id.to_owned()));
    }

    /// Event ids changed after `seq`, oldest first, without repeats; `None` when the log no
    /// longer reaches back that far.
    pub fn changed_since(&self, seq: u64) -> Option<Vec<&str>> {
        let first = self.change_log.first().map_or(self.seq + 1, |(s, _)| *s);
        if seq + 1 < first && seq < self.seq {
            return None;
        }
        let from = self.change_log.partition_point(|(s, _)| *s <= seq);
        let mut seen = BTreeSet::new();
        Some(
            self.change_log[from..]
                .iter()
                .filter(|(_, id)| seen.insert(id.as_str()))
                .map(|(_, id)| id.as_str())
                .collect(),
        )
    }
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub upn: String,
    pub display_name: String,
    /// The first calendar is the default one.
    pub calendars: Vec<Calendar>,
}

impl User {
    pub fn calendar_index(&self, id: &str) -> Option<usize> {
        self.calendars.iter().position(|c| c.id == id)
    }

    /// Where an event (single, master, or an occurrence's master) lives: calendar index and
    /// master id.
    pub fn locate(&self, id: &str) -> Option<(usize, String, Option<NaiveDate>)> {
        let (master, date) = match parse_occurrence_id(id) {
            Some((m, d)) => (m, Some(d)),
            None => (id.to_owned(), None),
        };
        let ci = self
            .calendars
            .iter()
            .position(|c| c.events.contains_key(&master))?;
        Some((ci, master, date))
    }
}

/// Deterministic ids, change keys and iCalUIds from the simulator seed.
#[derive(Debug)]
pub struct IdGen {
    rng: StdRng,
}

impl IdGen {
    pub fn new(seed: u64) -> Self {
        IdGen {
            rng: StdRng::seed_from_u64(seed ^ 0x6772_6170_6873_696d),
        }
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        self.rng.fill(&mut b[..]);
        b
    }

    pub fn event_id(&mut self) -> String {
        format!(
            "{SINGLE_PREFIX}{}=",
            URL_SAFE_NO_PAD.encode(self.bytes::<24>())
        )
    }

    pub fn change_key(&mut self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.bytes::<15>())
    }

    pub fn ical_uid(&mut self) -> String {
        let hex: String = self
            .bytes::<16>()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        format!("040000008200E00074C5B7101A82E00800000000{hex}")
    }

    pub fn guid(&mut self) -> String {
        let b = self.bytes::<16>();
        let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// All users of the simulated tenant.
#[derive(Debug)]
pub struct Tenant {
    pub users: Vec<User>,
    by_key: HashMap<String, usize>,
    pub ids: IdGen,
    pub clock: Clock,
}

impl Tenant {
    pub fn new(seed: u64, clock: Clock) -> Self {
        Tenant {
            users: Vec::new(),
            by_key: HashMap::new(),
            ids: IdGen::new(seed),
            clock,
        }
    }

    /// Adds a user with a default calendar named "Calendar"; returns its index.
    pub fn add_user(&mut self, upn: &str, id: Option<String>, display_name: &str) -> usize {
        let id = id.unwrap_or_else(|| self.ids.guid());
        let cal_id = self.calendar_id();
        let idx = self.users.len();
        self.by_key.insert(id.to_lowercase(), idx);
        self.by_key.insert(upn.to_lowercase(), idx);
        self.users.push(User {
            id,
            upn: upn.to_owned(),
            display_name: display_name.to_owned(),
            calendars: vec![Calendar {
                id: cal_id,
                name: "Calendar".into(),
                is_default: true,
                events: BTreeMap::new(),
                seq: 0,
                change_log: Vec::new(),
            }],
        });
        idx
    }

    pub fn add_calendar(&mut self, user: usize, name: &str) -> String {
        let id = self.calendar_id();
        if let Some(u) = self.users.get_mut(user) {
            u.calendars.push(Calendar {
                id: id.clone(),
                name: name.to_owned(),
                is_default: false,
                events: BTreeMap::new(),
                seq: 0,
                change_log: Vec::new(),
            });
        }
        id
    }

    fn calendar_id(&mut self) -> String {
        format!(
            "AAMkAGca{}=",
            URL_SAFE_NO_PAD.encode(self.ids.bytes::<18>())
        )
    }

    /// A user by id or UPN, case-insensitively, as Graph resolves `/users/{id | userPrincipalName}`.
    pub fn user_index(&self, key: &str) -> Option<usize> {
        self.by_key.get(&key.to_lowercase()).copied()
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn occurrence_ids_round_trip_to_master_and_date() {
        let date = NaiveDate::from_ymd_opt(2024, 5, 6).unwrap();
        let id = occurrence_id("AAMkAGevXYZ=", date);
        assert_eq!(
            parse_occurrence_id(&id),
            Some(("AAMkAGevXYZ=".to_owned(), date))
        );
        assert_eq!(parse_occurrence_id("AAMkAGevXYZ="), None);
    }

    #[test]
    fn window_overlap_is_half_open() {
        let w = Window {
            start: Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2024, 1, 2, 0, 0, 0).unwrap(),
        };
        let t = |h: u32, d: u32| {
            NaiveDate::from_ymd_opt(2024, 1, d)
                .unwrap()
                .and_hms_opt(h, 0, 0)
                .unwrap()
        };
        assert!(w.overlaps(t(23, 31 - 30), t(1, 2)));
        assert!(!w.overlaps(t(0, 2), t(1, 2)));
        assert!(w.overlaps(t(0, 1), t(0, 1)));
        assert!(!w.overlaps(t(0, 2), t(0, 2)));
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
