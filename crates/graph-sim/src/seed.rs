//! Seeding a tenant: generated users and events from a few numbers, or a scenario file.

use crate::error::GraphError;
use crate::faults::FaultRule;
use crate::model::Tenant;
use crate::sim::{Sim, SimConfig};
use crate::writes::EventPatch;
use chrono::{Datelike, Duration, NaiveTime};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;

/// The zones generated events are written in.
const ZONES: [&str; 7] = [
    "UTC",
    "UTC",
    "Pacific Standard Time",
    "W. Europe Standard Time",
    "Eastern Standard Time",
    "Tokyo Standard Time",
    "Europe/London",
];
/// How to generate a tenant: `--users 50 --events-per-user 200 --recurring 0.3 --seed 42`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateSpec {
    /// Users to generate (`user0000@…` upward).
    pub users: u32,
    /// Events per user; a series counts as one event however many instances it has.
    pub events_per_user: u32,
    /// Share of events that are recurring series (0.0–1.0).
    pub recurring: f64,
    /// Extra (non-default) calendars per user; events are spread over all of them.
    pub extra_calendars: u32,
}

impl Default for GenerateSpec {
    fn default() -> Self {
        GenerateSpec {
            users: 5,
            events_per_user: 40,
            recurring: 0.3,
            extra_calendars: 0,
        }
    }
}

/// A scenario file (TOML): simulator settings, generated and hand-written users, faults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Simulator settings.
    pub sim: SimConfig,
    /// A generated tenant, when wanted.
    pub generate: Option<GenerateSpec>,
    /// Hand-written users and their events.
    pub users: Vec<ScenarioUser>,
    /// Faults scripted from the start.
    pub faults: Vec<FaultRule>,
}

/// A hand-written user of a scenario.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScenarioUser {
    /// User principal name.
    pub upn: String,
    /// Object id; a GUID is generated when absent.
    pub id: Option<String>,
    /// Display name; derived from the UPN when absent.
    pub display_name: Option<String>,
    /// Names of extra calendars to create besides the default one.
    pub calendars: Vec<String>,
    /// Events as Graph POST bodies, plus an optional `calendar` naming one of `calendars`.
    pub events: Vec<toml::Table>,
}

/// Why a scenario could not be loaded or built; each names the file or the user and event.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid scenario.
    #[error("invalid scenario file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The TOML error.
        source: Box<toml::de::Error>,
    },
    /// An event was refused as Graph would refuse its POST.
    #[error("scenario user {user}: event {index}: {message}")]
    Event {
        /// The user's UPN.
        user: String,
        /// The event's index in the user's list.
        index: usize,
        /// Why.
        message: String,
    },
    #[error(
        "scenario user {user}: event {index} names calendar '{calendar}', which the user does not have"
    )]
    /// An event names a calendar the user does not have.
    UnknownCalendar {
        /// The user's UPN.
        user: String,
        /// The event's index in the user's list.
        index: usize,
        /// The calendar it names.
        calendar: String,
    },
}

impl Scenario {
    /// Reads and parses a scenario file; the error names the file.
    pub fn from_file(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ScenarioError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// Builds the simulator this scenario describes.
    pub fn build(&self) -> Result<Sim, ScenarioError> {
        let sim = Sim::new(&self.sim);
        {
            let mut st = sim.lock();
            if let Some(g) = &self.generate {
                generate(&mut st.tenant, g, self.sim.seed);
            }
            for u in &self.users {
                let name = u.display_name.clone().unwrap_or_else(|| u.upn.clone());
                let ui = st.tenant.add_user(&u.upn, u.id.clone(), &name);
                let mut cals = vec![("default".to_owned(), 0usize)];
                for (i, c) in u.calendars.iter().enumerate() {
                    st.tenant.add_calendar(ui, c);
                    cals.push((c.clone(), i + 1));
                }
                for (index, ev) in u.events.iter().enumerate() {
                    let mut body = serde_json::to_value(ev).unwrap_or(Value::Null);
                    let cal = body
                        .as_object_mut()
                        .and_then(|m| m.remove("calendar"))
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "default".into());
                    let ci = cals
                        .iter()
                        .find(|(n, _)| *n == cal)
                        .map(|(_, i)| *i)
                        .ok_or_else(|| ScenarioError::UnknownCalendar {
                            user: u.upn.clone(),
                            index,
                            calendar: cal.clone(),
                        })?;
                    let err = |e: GraphError| ScenarioError::Event {
                        user: u.upn.clone(),
                        index,
                        message: e.message,
                    };
                    let patch = EventPatch::from_json(&body).map_err(err)?;
                    st.tenant.create_event(ui, ci, &patch).map_err(err)?;
                }
            }
            st.faults = self.faults.clone();
        }
        Ok(sim)
    }
}

const FIRST: &[&str] = &[
    "Adele",
    "Alex",
    "Diego",
    "Grady",
    "Isaiah",
    "Johanna",
    "Lee",
    "Lidia",
    "Lynne",
    "Megan",
    "Miriam",
    "Nestor",
    "Patti",
    "Pradeep",
    "Zoë",
    "Søren",
    "Małgorzata",
    "Ngọc",
    "Ásgeir",
    "Chidi",
];
const LAST: &[&str] = &[
    "Vance",
    "Wilber",
    "Siciliani",
    "Archie",
    "Henderson",
    "Lauer",
    "Gu",
    "Holgate",
    "Robbins",
    "Bowen",
    "Nielsen",
    "Kowalska",
    "Nguyễn",
    "Okafor",
    "Müller",
];
const SUBJECTS: &[&str] = &[
    "Standup",
    "1:1",
    "Quarterly review",
    "Customer call",
    "Design review",
    "Lunch",
    "Café sync ☕",
    "Планёрка",
    "会议：路线图",
    "Revisión del presupuesto 📅",
    "Ölçüm toplantısı",
    "Τεχνική συνάντηση",
    "प्रोजेक्ट अपडेट",
    "Retro 🎉 & planning",
    "Board prep — \"final\" draft",
    "Interview: backend",
    "Dentist",
    "Focus time",
    "Sprint planning",
    "All hands",
];
const LOCATIONS: &[&str] = &[
    "",
    "",
    "Room 101",
    "Teams",
    "Café Olé",
    "会议室 3",
    "Harry's Bar",
    "Building 4 / 2nd floor",
];

fn large_body(rng: &mut StdRng) -> String {
    let mut s = String::from("<html><body>");
    let target = rng.gen_range(64_000..160_000);
    while s.len() < target {
        s.push_str(
            "<p>Agenda item — détails, 詳細, подробности. Lorem ipsum dolor sit amet.</p>\r\n",
        );
    }
    s.push_str("</body></html>");
    s
}

/// Generates users and events deterministically from `seed`, around the tenant clock's today.
pub fn generate(tenant: &mut Tenant, spec: &GenerateSpec, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
    let today = tenant.now().date_naive();
    let base = tenant.users.len();
    let mut people = Vec::new();
    for i in 0..spec.users {
        let first = FIRST[rng.gen_range(0..FIRST.len())];
        let last = LAST[rng.gen_range(0..LAST.len())];
        let upn = format!("user{:04}@contoso.onmicrosoft.com", base as u32 + i);
        let ui = tenant.add_user(&upn, None, &format!("{first} {last}"));
        for c in 0..spec.extra_calendars {
            tenant.add_calendar(ui, &format!("Calendar {}", c + 2));
        }
        people.push((format!("{first} {last}"), upn));
    }
    for i in 0..spec.users as usize {
        let ui = base + i;
        let ncal = tenant.users[ui].calendars.len();
        for _ in 0..spec.events_per_user {
            let subject = SUBJECTS[rng.gen_range(0..SUBJECTS.len())];
            let location = LOCATIONS[rng.gen_range(0..LOCATIONS.len())];
            let body = if rng.gen_bool(0.02) {
                large_body(&mut rng)
            } else {
                format!("<html><body><p>{subject}</p></body></html>")
            };
            let mut attendees = Vec::new();
            for _ in 0..rng.gen_range(0..4) {
                if let Some((name, upn)) = people.choose(&mut rng) {
                    attendees.push(
                        json!({"type": "required", "emailAddress": {"name": name, "address": upn}}),
                    );
                }
            }
            let recurring = rng.gen_bool(spec.recurring.clamp(0.0, 1.0));
            let mut ev = json!({
                "subject": subject,
                "body": {"contentType": "html", "content": body},
                "location": {"displayName": location},
                "attendees": attendees,
            });
            let hour = rng.gen_range(7..19);
            let minutes = [0, 15, 30, 45][rng.gen_range(0..4)];
            let time = NaiveTime::from_hms_opt(hour, minutes, 0).unwrap_or(NaiveTime::MIN);
            let duration = Duration::minutes([15, 30, 45, 60, 90, 120][rng.gen_range(0..6)]);
            // Tenants span zones: events are written in their organizer's zone, Windows and
            // IANA names both, so series expand across daylight-saving changes.
            let zone = ZONES[rng.gen_range(0..ZONES.len())];
            let dt = |d: chrono::NaiveDateTime| json!({"dateTime": crate::model::graph_date_time(d), "timeZone": zone});
            if recurring {
                let start_day = today + Duration::days(rng.gen_range(-150..60));
                let start = start_day.and_time(time);
                ev["start"] = dt(start);
                ev["end"] = dt(start + duration);
                let day = crate::recurrence::DayOfWeek::of(start_day);
                let dow = serde_json::to_value(day).unwrap_or(json!("monday"));
                let (pattern, range) = match rng.gen_range(0..5) {
                    0 => (
                        json!({"type": "daily", "interval": rng.gen_range(1..3)}),
                        json!({"type": "numbered", "numberOfOccurrences": rng.gen_range(5..30)}),
                    ),
                    1 => (
                        json!({"type": "weekly", "interval": 1, "daysOfWeek": [dow], "firstDayOfWeek": "sunday"}),
                        json!({"type": "endDate", "endDate": (start_day + Duration::days(rng.gen_range(30..300))).to_string()}),
                    ),
                    2 => (
                        json!({"type": "weekly", "interval": rng.gen_range(1..3), "daysOfWeek": [dow, "friday"]}),
                        json!({"type": "noEnd"}),
                    ),
                    3 => (
                        json!({"type": "absoluteMonthly", "interval": 1, "dayOfMonth": start_day.day()}),
                        json!({"type": "noEnd"}),
                    ),
                    _ => (
                        json!({"type": "relativeMonthly", "interval": 1, "daysOfWeek": [dow], "index": "first"}),
                        json!({"type": "numbered", "numberOfOccurrences": rng.gen_range(3..12)}),
                    ),
                };
                let mut range = range;
                range["startDate"] = json!(start_day.to_string());
                range["recurrenceTimeZone"] = json!(zone);
                ev["recurrence"] = json!({"pattern": pattern, "range": range});
            } else {
                let day = today + Duration::days(rng.gen_range(-120..240));
                let kind = rng.gen_range(0..100);
                if kind < 8 {
                    let days = if kind < 3 { rng.gen_range(2..5) } else { 1 };
                    ev["isAllDay"] = json!(true);
                    ev["start"] = dt(day.and_time(NaiveTime::MIN));
                    ev["end"] = dt((day + Duration::days(days)).and_time(NaiveTime::MIN));
                } else if kind < 12 {
                    let start = day.and_time(time);
                    ev["start"] = dt(start);
                    ev["end"] = dt(start + Duration::hours(rng.gen_range(24..72)));
                } else {
                    let start = day.and_time(time);
                    ev["start"] = dt(start);
                    ev["end"] = dt(start + duration);
                }
            }
            let ci = if ncal > 1 && rng.gen_bool(0.3) {
                rng.gen_range(1..ncal)
            } else {
                0
            };
            if let Ok(patch) = EventPatch::from_json(&ev) {
                let _ = tenant.create_event(ui, ci, &patch);
            }
        }
    }
}
