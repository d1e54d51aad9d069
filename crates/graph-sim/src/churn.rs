//! Random edits a real user would make — creates, updates, moves across the window edges,
//! series edits, cancellations, deletions — for demos, tests and soak runs. Deterministic for
//! a given seed and state.

use crate::model::{InstanceKind, Tenant, Window, graph_date_time};
use crate::writes::EventPatch;
use chrono::{Duration, NaiveDateTime};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

/// What one random edit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// A single event was created; its id.
    CreatedSingle(String),
    /// A weekly series was created; the master's id.
    CreatedSeries(String),
    /// A single event got a new subject.
    Renamed(String),
    /// A single event moved out of the window.
    MovedOut(String),
    /// A single event moved into the window.
    MovedIn(String),
    /// One occurrence was edited into an exception; its id.
    OccurrenceEdited(String),
    /// One occurrence was cancelled; its id.
    OccurrenceCancelled(String),
    /// A series got a new subject; the master's id.
    SeriesRenamed(String),
    /// A series moved to another time of day; the master's id.
    SeriesRetimed(String),
    /// A single event was deleted.
    Deleted(String),
    /// A whole series was deleted; the master's id.
    SeriesDeleted(String),
    /// The organizer cancelled a meeting; this copy stays, cancelled.
    OrganizerCancelled(String),
}

impl Edit {
    /// The edit's name, for logs and counts.
    pub fn label(&self) -> &'static str {
        match self {
            Edit::CreatedSingle(_) => "created",
            Edit::CreatedSeries(_) => "created series",
            Edit::Renamed(_) => "renamed",
            Edit::MovedOut(_) => "moved out of window",
            Edit::MovedIn(_) => "moved into window",
            Edit::OccurrenceEdited(_) => "edited occurrence",
            Edit::OccurrenceCancelled(_) => "cancelled occurrence",
            Edit::SeriesRenamed(_) => "renamed series",
            Edit::SeriesRetimed(_) => "retimed series",
            Edit::Deleted(_) => "deleted",
            Edit::SeriesDeleted(_) => "deleted series",
            Edit::OrganizerCancelled(_) => "cancelled by organizer",
        }
    }
}

fn dt(t: NaiveDateTime) -> serde_json::Value {
    json!({"dateTime": graph_date_time(t), "timeZone": "UTC"})
}

/// The start and end of an event as Graph renders them.
fn start_end(event: &serde_json::Value) -> Option<(NaiveDateTime, NaiveDateTime)> {
    let parse = |k: &str| {
        NaiveDateTime::parse_from_str(event[k]["dateTime"].as_str()?, "%Y-%m-%dT%H:%M:%S%.f").ok()
    };
    Some((parse("start")?, parse("end")?))
}

fn random_time_in(rng: &mut StdRng, w: &Window) -> NaiveDateTime {
    let span = (w.end - w.start).num_minutes().max(120);
    let m = rng.gen_range(0..span - 120) / 15 * 15;
    w.start.naive_utc() + Duration::minutes(m)
}

/// Applies one random edit to `(user, calendar)`, aiming at `window`. Returns `None` when the
/// chosen kind of edit had nothing to act on.
pub fn random_edit(
    t: &mut Tenant,
    rng: &mut StdRng,
    user: usize,
    calendar: usize,
    window: &Window,
) -> Option<Edit> {
    let cal = t.users.get(user)?.calendars.get(calendar)?;
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for e in cal.events.values().filter(|e| e.recurrence.is_none()) {
        let i = e.single_instance();
        if window.overlaps(i.start, i.end) {
            inside.push(e.id.clone());
        } else {
            outside.push(e.id.clone());
        }
    }
    let series: Vec<String> = cal
        .events
        .values()
        .filter(|e| e.recurrence.is_some())
        .map(|e| e.id.clone())
        .collect();
    let occurrences: Vec<String> = cal
        .instances(window)
        .into_iter()
        .filter(|i| i.kind != InstanceKind::SingleInstance)
        .map(|i| i.id)
        .collect();
    let pick = |rng: &mut StdRng, v: &[String]| -> Option<String> {
        (!v.is_empty()).then(|| v[rng.gen_range(0..v.len())].clone())
    };
    let patch = |v: serde_json::Value| EventPatch::from_json(&v).ok();
    let kind = rng.gen_range(0..12);
    let result = match kind {
        0 | 1 => {
            let start = random_time_in(rng, window);
            let p = patch(
                json!({"subject": format!("New meeting #{}", rng.gen_range(1000..9999)),
                "start": dt(start), "end": dt(start + Duration::minutes(30))}),
            )?;
            let v = t.create_event(user, calendar, &p).ok()?;
            Edit::CreatedSingle(v["id"].as_str()?.to_owned())
        }
        2 => {
            let start = random_time_in(rng, window);
            let p = patch(json!({"subject": "New weekly sync 🔁",
                "start": dt(start), "end": dt(start + Duration::minutes(45)),
                "recurrence": {"pattern": {"type": "daily", "interval": 7},
                               "range": {"type": "numbered", "startDate": start.date().to_string(), "numberOfOccurrences": rng.gen_range(3..8)}}}))?;
            let v = t.create_event(user, calendar, &p).ok()?;
            Edit::CreatedSeries(v["id"].as_str()?.to_owned())
        }
        3 => {
            let id = pick(rng, &inside)?;
            let p = patch(json!({"subject": format!("Renamed ✎ {}", rng.gen_range(100..999))}))?;
            t.update_event(user, Some(calendar), &id, &p).ok()?;
            Edit::Renamed(id)
        }
        4 => {
            let id = pick(rng, &inside)?;
            let start = window.end.naive_utc() + Duration::days(rng.gen_range(1..30));
            let p = patch(json!({"start": dt(start), "end": dt(start + Duration::hours(1))}))?;
            t.update_event(user, Some(calendar), &id, &p).ok()?;
            Edit::MovedOut(id)
        }
        5 => {
            let id = pick(rng, &outside)?;
            let start = random_time_in(rng, window);
            let p = patch(
                json!({"isAllDay": false, "start": dt(start), "end": dt(start + Duration::hours(1))}),
            )?;
            t.update_event(user, Some(calendar), &id, &p).ok()?;
            Edit::MovedIn(id)
        }
        6 => {
            let id = pick(rng, &occurrences)?;
            let shift = Duration::hours(rng.gen_range(1..4));
            let current = t
                .get_event(user, Some(calendar), &id, &crate::model::Render::utc())
                .ok()?;
            let (s, e) = start_end(&current)?;
            let p = patch(
                json!({"subject": "Moved this week only", "start": dt(s + shift), "end": dt(e + shift)}),
            )?;
            t.update_event(user, Some(calendar), &id, &p).ok()?;
            Edit::OccurrenceEdited(id)
        }
        7 => {
            let id = pick(rng, &occurrences)?;
            t.delete_event(user, Some(calendar), &id).ok()?;
            Edit::OccurrenceCancelled(id)
        }
        8 => {
            let id = pick(rng, &series)?;
            let p = patch(json!({"subject": format!("Series renamed {}", rng.gen_range(10..99))}))?;
            t.update_event(user, Some(calendar), &id, &p).ok()?;
            Edit::SeriesRenamed(id)
        }
        9 => {
            let id = pick(rng, &series)?;
            let current = t
                .get_event(user, Some(calendar), &id, &crate::model::Render::utc())
                .ok()?;
            let (s, e) = start_end(&current)?;
            let shift = Duration::minutes(30);
            let p = patch(json!({"start": dt(s + shift), "end": dt(e + shift)}))?;
            t.update_event(user, Some(calendar), &id, &p).ok()?;
            Edit::SeriesRetimed(id)
        }
        11 => {
            let all: Vec<String> = inside.iter().chain(&series).cloned().collect();
            let id = pick(rng, &all)?;
            t.cancel_by_organizer(user, Some(calendar), &id).ok()?;
            Edit::OrganizerCancelled(id)
        }
        _ => {
            if rng.gen_bool(0.7) {
                let all: Vec<String> = inside.iter().chain(&outside).cloned().collect();
                let id = pick(rng, &all)?;
                t.delete_event(user, Some(calendar), &id).ok()?;
                Edit::Deleted(id)
            } else {
                let id = pick(rng, &series)?;
                t.delete_event(user, Some(calendar), &id).ok()?;
                Edit::SeriesDeleted(id)
            }
        }
    };
    Some(result)
}
