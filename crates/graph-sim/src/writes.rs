//! Graph's own write endpoints on events: create, update and delete a single event, a series
//! master (every instance follows) or one occurrence (which becomes an exception, or is
//! cancelled).

use crate::error::GraphError;
use crate::model::{Attendee, ChangeKind, Exception, Props, Render, StoredEvent, Tenant};
use crate::recurrence::PatternedRecurrence;
use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use serde_json::Value;

/// The writable event properties a POST or PATCH body sets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventPatch {
    /// `subject`.
    pub subject: Option<String>,
    /// `body`: content type and content.
    pub body: Option<(String, String)>,
    /// `location.displayName`.
    pub location: Option<String>,
    /// `attendees`.
    pub attendees: Option<Vec<Attendee>>,
    /// `isAllDay`.
    pub is_all_day: Option<bool>,
    /// `start`: a wall time and the zone it is in (UTC, IANA or Windows name).
    pub start: Option<(NaiveDateTime, String)>,
    /// `end`: a wall time and the zone it is in.
    pub end: Option<(NaiveDateTime, String)>,
    /// `showAs`.
    pub show_as: Option<String>,
    /// `importance`.
    pub importance: Option<String>,
    /// `sensitivity`.
    pub sensitivity: Option<String>,
    /// `categories`.
    pub categories: Option<Vec<String>>,
    /// `Some(None)` removes the recurrence (`"recurrence": null`).
    pub recurrence: Option<Option<PatternedRecurrence>>,
}

fn bad_property(name: &str) -> GraphError {
    GraphError::new(
        400,
        "RequestBodyRead",
        format!(
            "The property '{name}' does not exist on type 'microsoft.graph.event'. Make sure to \
             only use property names that are defined by the type or mark the type as open type."
        ),
    )
}

fn invalid_value(name: &str) -> GraphError {
    GraphError::new(
        400,
        "RequestBodyRead",
        format!("Cannot convert the literal value of property '{name}' to the expected type."),
    )
}

fn string_field(v: &Value, name: &str) -> Result<String, GraphError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid_value(name))
}

/// Reads a `dateTimeTimeZone`: a wall time and a zone Graph knows (UTC, an IANA name or a
/// Windows name such as "Pacific Standard Time"); any other zone is refused as Graph refuses it.
fn date_time_field(v: &Value, name: &str) -> Result<(NaiveDateTime, String), GraphError> {
    let dt = v
        .get("dateTime")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_value(name))?;
    let tz = v.get("timeZone").and_then(Value::as_str).unwrap_or("UTC");
    if crate::zone::resolve(tz).is_none() {
        return Err(GraphError::new(
            400,
            "TimeZoneNotSupportedException",
            format!(
                "A valid TimeZone value must be specified. The following TimeZone value is not supported: '{tz}'."
            ),
        ));
    }
    let trimmed = dt.trim_end_matches('Z');
    let local = NaiveDateTime::parse_from_str(trimmed, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(trimmed, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| invalid_value(name))?;
    Ok((local, tz.to_owned()))
}

/// Sets `props`' times from a patch: the start's zone becomes the event's zone, and an end
/// written in another zone is moved into it.
fn set_times(props: &mut Props, patch: &EventPatch) {
    if let Some((start, zone)) = &patch.start {
        if *zone != props.zone {
            // Keep the end's instant while the event changes zone.
            let end_utc = crate::zone::to_utc(props.end, &props.zone);
            props.end = in_zone(end_utc, zone);
            props.zone = zone.clone();
        }
        props.start = *start;
    }
    if let Some((end, zone)) = &patch.end {
        props.end = if *zone == props.zone {
            *end
        } else {
            in_zone(crate::zone::to_utc(*end, zone), &props.zone)
        };
    }
    if let Some(a) = patch.is_all_day {
        props.is_all_day = a;
    }
}

/// A UTC wall time as a wall time in the zone named `zone`.
fn in_zone(utc: NaiveDateTime, zone: &str) -> NaiveDateTime {
    match crate::zone::resolve(zone) {
        Some(tz) => crate::zone::from_utc(utc, tz),
        None => utc,
    }
}

impl EventPatch {
    /// Parses a request body. Unknown or read-only properties are refused as Graph refuses them.
    pub fn from_json(body: &Value) -> Result<Self, GraphError> {
        let obj = body
            .as_object()
            .ok_or_else(|| GraphError::new(400, "RequestBodyRead", "the body is not an object"))?;
        let mut p = EventPatch::default();
        for (k, v) in obj {
            match k.as_str() {
                "@odata.type" => {}
                "subject" => p.subject = Some(string_field(v, k)?),
                "body" => {
                    let ct = v
                        .get("contentType")
                        .and_then(Value::as_str)
                        .unwrap_or("html")
                        .to_owned();
                    let content = v
                        .get("content")
                        .and_then(Value::as_str)
                        .ok_or_else(|| invalid_value(k))?
                        .to_owned();
                    p.body = Some((ct, content));
                }
                "location" => {
                    p.location = Some(
                        v.get("displayName")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    )
                }
                "attendees" => {
                    let arr = v.as_array().ok_or_else(|| invalid_value(k))?;
                    let mut out = Vec::new();
                    for a in arr {
                        let email = a.get("emailAddress").ok_or_else(|| invalid_value(k))?;
                        out.push(Attendee {
                            name: email
                                .get("name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            address: email
                                .get("address")
                                .and_then(Value::as_str)
                                .ok_or_else(|| invalid_value(k))?
                                .to_owned(),
                            kind: a
                                .get("type")
                                .and_then(Value::as_str)
                                .unwrap_or("required")
                                .to_owned(),
                        });
                    }
                    p.attendees = Some(out);
                }
                "isAllDay" => p.is_all_day = Some(v.as_bool().ok_or_else(|| invalid_value(k))?),
                "start" => p.start = Some(date_time_field(v, k)?),
                "end" => p.end = Some(date_time_field(v, k)?),
                "showAs" => p.show_as = Some(string_field(v, k)?),
                "importance" => p.importance = Some(string_field(v, k)?),
                "sensitivity" => p.sensitivity = Some(string_field(v, k)?),
                "categories" => {
                    p.categories =
                        Some(serde_json::from_value(v.clone()).map_err(|_| invalid_value(k))?)
                }
                "recurrence" => {
                    p.recurrence = Some(if v.is_null() {
                        None
                    } else {
                        let rec: PatternedRecurrence =
                            serde_json::from_value(v.clone()).map_err(|e| {
                                GraphError::invalid_parameter(format!("recurrence: {e}"))
                            })?;
                        rec.validate()
                            .map_err(|e| GraphError::invalid_parameter(e.to_string()))?;
                        Some(rec)
                    })
                }
                other => return Err(bad_property(other)),
            }
        }
        Ok(p)
    }

    fn touches_time(&self) -> bool {
        self.start.is_some()
            || self.end.is_some()
            || self.is_all_day.is_some()
            || self.recurrence.is_some()
    }

    /// Applies the non-time fields to `props` where `props` still shows `old` (so an exception's
    /// own edits survive a series edit); returns whether anything changed.
    fn apply_shared(&self, props: &mut Props, old: Option<&Props>) -> bool {
        let before = props.clone();
        macro_rules! set {
            ($field:ident, $val:expr) => {
                if let Some(v) = $val {
                    if old.is_none_or(|o| o.$field == props.$field) {
                        props.$field = v.clone();
                    }
                }
            };
        }
        set!(subject, &self.subject);
        set!(location, &self.location);
        set!(attendees, &self.attendees);
        set!(show_as, &self.show_as);
        set!(importance, &self.importance);
        set!(sensitivity, &self.sensitivity);
        set!(categories, &self.categories);
        if let Some((ct, content)) = &self.body {
            if old.is_none_or(|o| o.body == props.body && o.body_type == props.body_type) {
                props.body_type = ct.clone();
                props.body = content.clone();
            }
        }
        *props != before
    }
}

fn check_times(props: &Props) -> Result<(), GraphError> {
    if props.end < props.start {
        return Err(GraphError::invalid_parameter(
            "The end time of the event must not be before its start time.",
        ));
    }
    if props.is_all_day
        && (props.start.time() != NaiveTime::MIN || props.end.time() != NaiveTime::MIN)
    {
        return Err(GraphError::invalid_parameter(
            "Start and end times of an all-day event must be set to midnight.",
        ));
    }
    Ok(())
}

impl Tenant {
    /// `POST /users/{u}/events` (or `/calendars/{c}/events`): a single event, or a series when
    /// the body has a `recurrence`. Returns the created event as Graph returns it (201).
    pub fn create_event(
        &mut self,
        user: usize,
        calendar: usize,
        patch: &EventPatch,
    ) -> Result<Value, GraphError> {
        let (Some((start, zone)), Some(_)) = (patch.start.clone(), &patch.end) else {
            return Err(GraphError::invalid_parameter(
                "An event needs both start and end.",
            ));
        };
        let now = self.now();
        let mut props = Props {
            subject: String::new(),
            body_type: "html".into(),
            body: String::new(),
            location: String::new(),
            attendees: Vec::new(),
            is_all_day: patch.is_all_day.unwrap_or(false),
            start,
            end: start,
            zone,
            show_as: "busy".into(),
            importance: "normal".into(),
            sensitivity: "normal".into(),
            categories: Vec::new(),
            is_cancelled: false,
            change_key: self.ids.change_key(),
            last_modified: now,
        };
        patch.apply_shared(&mut props, None);
        set_times(&mut props, patch);
        check_times(&props)?;
        let mut recurrence = patch.recurrence.clone().flatten();
        if let Some(rec) = &mut recurrence {
            if rec.range.recurrence_time_zone.is_empty() {
                rec.range.recurrence_time_zone = props.zone.clone();
            }
        }
        if let Some(rec) = &recurrence {
            // Graph starts the series on its first occurrence, whatever date `start` said.
            if let Some(first) = rec
                .dates_until(rec.range.start_date + chrono::Duration::days(800))
                .first()
            {
                let shift = first.and_time(props.start.time()) - props.start;
                props.start += shift;
                props.end += shift;
            }
        }
        let id = self.ids.event_id();
        let ical_uid = self.ids.ical_uid();
        let u = self
            .users
            .get_mut(user)
            .ok_or_else(|| GraphError::not_found("user"))?;
        let organizer = (u.display_name.clone(), u.upn.clone());
        let ev = StoredEvent {
            id: id.clone(),
            ical_uid,
            created: now,
            organizer,
            props,
            recurrence,
            exceptions: Default::default(),
            cancelled: Default::default(),
        };
        let cal = u
            .calendars
            .get_mut(calendar)
            .ok_or_else(|| GraphError::not_found("calendar"))?;
        cal.events.insert(id.clone(), ev);
        cal.touch(&id);
        self.journal_change(user, calendar, &id, ChangeKind::Created);
        let user_ref = &self.users[user];
        Ok(user_ref.calendars[calendar].events[&id].master_json(&Render::utc()))
    }

    /// `PATCH /users/{u}/events/{id}` on a single event, a series master or an instance.
    pub fn update_event(
        &mut self,
        user: usize,
        calendar: Option<usize>,
        id: &str,
        patch: &EventPatch,
    ) -> Result<Value, GraphError> {
        let (ci, master, date) = self.locate(user, calendar, id)?;
        let new_key = self.ids.change_key();
        let now = self.now();
        let u = &mut self.users[user];
        let cal = &mut u.calendars[ci];
        let ev = cal.events.get_mut(&master).ok_or_else(|| {
            GraphError::not_found("The specified object was not found in the store.")
        })?;
        match date {
            None => {
                let old = ev.props.clone();
                let mut props = ev.props.clone();
                patch.apply_shared(&mut props, None);
                set_times(&mut props, patch);
                check_times(&props)?;
                let mut recurrence = match &patch.recurrence {
                    Some(r) => r.clone(),
                    None => ev.recurrence.clone(),
                };
                if let Some(rec) = &mut recurrence {
                    if rec.range.recurrence_time_zone.is_empty() || patch.start.is_some() {
                        rec.range.recurrence_time_zone = props.zone.clone();
                    }
                }
                if ev.recurrence.is_some() {
                    if patch.touches_time() {
                        // Outlook drops a series' exceptions when its time or pattern changes.
                        ev.exceptions.clear();
                        ev.cancelled.clear();
                    } else {
                        for ex in ev.exceptions.values_mut() {
                            if patch.apply_shared(&mut ex.props, Some(&old)) {
                                ex.props.change_key = format!("{new_key}x");
                                ex.props.last_modified = now;
                            }
                        }
                    }
                }
                props.change_key = new_key;
                props.last_modified = now;
                ev.props = props;
                ev.recurrence = recurrence;
            }
            Some(date) => {
                if patch.recurrence.is_some() {
                    return Err(GraphError::invalid_parameter(
                        "The recurrence of an occurrence cannot be set.",
                    ));
                }
                if !ev.has_occurrence_on(date) {
                    return Err(GraphError::not_found(
                        "The specified object was not found in the store.",
                    ));
                }
                let duration = ev.props.end - ev.props.start;
                let mut props = match ev.exceptions.get(&date) {
                    Some(ex) => ex.props.clone(),
                    None => {
                        let mut p = ev.props.clone();
                        p.start = date.and_time(ev.props.start.time());
                        p.end = p.start + duration;
                        p
                    }
                };
                patch.apply_shared(&mut props, None);
                set_times(&mut props, patch);
                check_times(&props)?;
                props.change_key = new_key.clone();
                props.last_modified = now;
                ev.exceptions.insert(date, Exception { props });
                // The master holds its exceptions: it changes too (docs#5520: a change
                // notification for an instance names the master).
                ev.props.change_key = format!("{new_key}m");
                ev.props.last_modified = now;
            }
        }
        cal.touch(&master);
        self.journal_change(user, ci, &master, ChangeKind::Updated);
        self.get_event(user, calendar, id, &Render::utc())
    }

    /// `DELETE /users/{u}/events/{id}`: removes a single event or a whole series; on an
    /// occurrence it cancels just that one.
    pub fn delete_event(
        &mut self,
        user: usize,
        calendar: Option<usize>,
        id: &str,
    ) -> Result<(), GraphError> {
        let (ci, master, date) = self.locate(user, calendar, id)?;
        let change_key = self.ids.change_key();
        let now = self.now();
        let cal = &mut self.users[user].calendars[ci];
        let kind = match date {
            None => ChangeKind::Deleted,
            Some(_) => ChangeKind::Updated,
        };
        match date {
            None => {
                cal.events.remove(&master);
            }
            Some(date) => {
                let ev = cal.events.get_mut(&master).ok_or_else(|| {
                    GraphError::not_found("The specified object was not found in the store.")
                })?;
                if !ev.has_occurrence_on(date) {
                    return Err(GraphError::not_found(
                        "The specified object was not found in the store.",
                    ));
                }
                ev.exceptions.remove(&date);
                ev.cancelled.insert(date);
                // Cancelling an occurrence is a change of the master (docs#5520).
                ev.props.change_key = change_key;
                ev.props.last_modified = now;
            }
        }
        cal.touch(&master);
        self.journal_change(user, ci, &master, kind);
        Ok(())
    }

    /// The organizer cancelled the meeting: this mailbox's copy (an attendee's) stays in the
    /// calendar with `isCancelled: true` and its subject prefixed "Canceled: " until the
    /// attendee removes it (microsoft-graph-docs #8692, docs-contrib #803). On a series it
    /// applies to the whole series, exceptions included.
    pub fn cancel_by_organizer(
        &mut self,
        user: usize,
        calendar: Option<usize>,
        id: &str,
    ) -> Result<(), GraphError> {
        let (ci, master, _) = self.locate(user, calendar, id)?;
        let change_key = self.ids.change_key();
        let now = self.now();
        let cal = &mut self.users[user].calendars[ci];
        let ev = cal.events.get_mut(&master).ok_or_else(|| {
            GraphError::not_found("The specified object was not found in the store.")
        })?;
        let cancel = |p: &mut Props| {
            if !p.is_cancelled {
                p.is_cancelled = true;
                p.subject = format!("Canceled: {}", p.subject);
            }
            p.change_key = change_key.clone();
            p.last_modified = now;
        };
        cancel(&mut ev.props);
        for ex in ev.exceptions.values_mut() {
            cancel(&mut ex.props);
        }
        cal.touch(&master);
        self.journal_change(user, ci, &master, ChangeKind::Updated);
        Ok(())
    }

    /// `GET …/events/{id}/instances?startDateTime=&endDateTime=`: the occurrences and
    /// exceptions of a series in the window, in full, by start (a single event lists itself
    /// when it overlaps). A deleted series is 404 `ErrorItemNotFound`.
    pub fn instances_of(
        &self,
        user: usize,
        calendar: Option<usize>,
        id: &str,
        window: &crate::model::Window,
        render: &Render,
    ) -> Result<Vec<Value>, GraphError> {
        let (ci, master, _) = self.locate(user, calendar, id)?;
        let ev = &self.users[user].calendars[ci].events[&master];
        let mut out = Vec::new();
        ev.instances_in(window, &mut out);
        out.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
        Ok(out.iter().map(|i| i.to_graph_json(render)).collect())
    }

    /// `GET /users/{u}/events/{id}`.
    pub fn get_event(
        &self,
        user: usize,
        calendar: Option<usize>,
        id: &str,
        render: &Render,
    ) -> Result<Value, GraphError> {
        let (ci, master, date) = self.locate(user, calendar, id)?;
        let u = &self.users[user];
        let ev = &u.calendars[ci].events[&master];
        match date {
            None if ev.recurrence.is_some() => Ok(ev.master_json(render)),
            None => Ok(ev.single_instance().to_graph_json(render)),
            Some(date) => {
                if !ev.has_occurrence_on(date) {
                    return Err(GraphError::not_found(
                        "The specified object was not found in the store.",
                    ));
                }
                Ok(ev.instance_on(date).to_graph_json(render))
            }
        }
    }

    fn locate(
        &self,
        user: usize,
        calendar: Option<usize>,
        id: &str,
    ) -> Result<(usize, String, Option<NaiveDate>), GraphError> {
        let u = self
            .users
            .get(user)
            .ok_or_else(|| GraphError::not_found("user"))?;
        let found = u.locate(id).ok_or_else(|| {
            GraphError::not_found("The specified object was not found in the store.")
        })?;
        if calendar.is_some_and(|c| c != found.0) {
            return Err(GraphError::not_found(
                "The specified object was not found in the store.",
            ));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_read_only_properties_are_refused() {
        let err = EventPatch::from_json(&json!({"id": "x"})).unwrap_err();
        assert_eq!(err.code, "RequestBodyRead");
        assert!(err.message.contains("'id'"));
    }

    #[test]
    fn windows_and_iana_zones_are_accepted_and_unknown_ones_refused_as_graph_does() {
        for zone in ["Pacific Standard Time", "Europe/Berlin", "UTC"] {
            let p = EventPatch::from_json(&json!({
                "start": {"dateTime": "2024-01-01T10:00:00", "timeZone": zone}
            }))
            .unwrap();
            assert_eq!(p.start.unwrap().1, zone);
        }
        let err = EventPatch::from_json(&json!({
            "start": {"dateTime": "2024-01-01T10:00:00", "timeZone": "Mars Standard Time"}
        }))
        .unwrap_err();
        assert_eq!(err.code, "TimeZoneNotSupportedException");
        assert!(err.message.contains("'Mars Standard Time'"));
    }

    #[test]
    fn seven_digit_fractions_parse() {
        let p = EventPatch::from_json(&json!({
            "start": {"dateTime": "2024-01-01T10:00:00.0000000", "timeZone": "UTC"}
        }))
        .unwrap();
        assert_eq!(p.start.unwrap().0.to_string(), "2024-01-01 10:00:00");
    }
}
