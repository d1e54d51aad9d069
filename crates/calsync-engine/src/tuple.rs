//! What a tracked (user, calendar, window) is: as configured ([`TupleConfig`]) and as
//! registered, with its store id and mailbox key ([`Tuple`]).

use crate::cron::CronSchedule;
use crate::window::WindowSpec;
use calsync_graph::{CalendarRef, ViewWindow};
use calsync_store::LinkStamp;
use std::sync::Arc;
use std::time::Duration;

/// A tracked (user, calendar, window) tuple as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleConfig {
    /// Stable name of the tuple; rows and sync state hang off it.
    pub key: String,
    /// The mailbox, by UPN or object id.
    pub user: String,
    /// The delegated account whose tokens read it (through `/me`); `None`: the app's.
    pub account: Option<String>,
    /// Which of the mailbox's calendars.
    pub calendar: CalendarRef,
    /// The calendarView window.
    pub window: ViewWindow,
    /// What `window` is computed from when an edge is an offset from now: the window is
    /// re-based as time passes ([`crate::Rebase`]). `None`: a fixed window.
    pub rolling: Option<WindowSpec>,
    /// Its own interval; `None` uses [`crate::SyncSettings::interval`].
    pub interval: Option<Duration>,
    /// Synced at these cron fire times instead of every `interval` (which then only spreads
    /// the first round and paces retries).
    pub schedule: Option<Arc<CronSchedule>>,
}

/// A registered tuple: its config plus its store id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    /// The store's id of the tuple.
    pub id: i64,
    /// Stable name of the tuple, as configured.
    pub key: String,
    /// The mailbox, by UPN or object id.
    pub user: String,
    /// The delegated account whose tokens read it (through `/me`); `None`: the app's.
    pub account: Option<String>,
    /// Which of the mailbox's calendars.
    pub calendar: CalendarRef,
    /// The calendarView window.
    pub window: ViewWindow,
    /// What `window` is computed from when it rolls; `None`: a fixed window.
    pub rolling: Option<WindowSpec>,
    /// Time between its rounds.
    pub interval: Duration,
    /// Its cron schedule, if it has one instead of `interval`.
    pub schedule: Option<Arc<CronSchedule>>,
    /// The mailbox's directory object id when it is known (else `user` as configured): the key
    /// of its request limits, so a UPN and an id naming one mailbox share them.
    pub mailbox: String,
}

impl Tuple {
    /// The tuple as configured (its interval explicit).
    pub fn config(&self) -> TupleConfig {
        TupleConfig {
            key: self.key.clone(),
            user: self.user.clone(),
            account: self.account.clone(),
            calendar: self.calendar.clone(),
            window: self.window,
            rolling: self.rolling,
            interval: Some(self.interval),
            schedule: self.schedule.clone(),
        }
    }

    /// The calendar's id, or `default`, for logs and status.
    pub fn calendar_name(&self) -> &str {
        match &self.calendar {
            CalendarRef::Default => "default",
            CalendarRef::Id(id) => id,
        }
    }

    /// What a saved link must have been made for to be replayed for this tuple.
    pub fn stamp(&self) -> LinkStamp {
        LinkStamp {
            user_id: self.user.clone(),
            calendar_id: self.calendar_name().to_owned(),
            window_start: self.window.start,
            window_end: self.window.end,
        }
    }
}

/// What a replica needs to schedule a tuple beside its identity, as stored with it
/// (`sync_tuples.settings`): every replica schedules the deployment's tuples from the
/// database, whatever its own config file says (issue 23).
pub mod settings {
    use super::*;
    use crate::window::Edge;
    use chrono::{DateTime, TimeDelta, Utc};
    use serde_json::{Value, json};

    fn edge(e: Edge) -> Value {
        match e {
            Edge::At(t) => json!({ "at": t.to_rfc3339() }),
            Edge::Offset(d) => json!({ "offset_s": d.num_seconds() }),
        }
    }

    fn edge_of(v: &Value) -> Option<Edge> {
        if let Some(s) = v.get("offset_s").and_then(Value::as_i64) {
            return TimeDelta::try_seconds(s).map(Edge::Offset);
        }
        let at = v.get("at")?.as_str()?;
        DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| Edge::At(t.with_timezone(&Utc)))
    }

    /// The longest time between two rounds a tuple's schedule plans: its interval, or for a
    /// cron schedule the longest gap between fire times over the coming week.
    pub fn cadence(interval: Duration, schedule: Option<&CronSchedule>) -> Duration {
        let Some(s) = schedule else {
            return interval;
        };
        let now = Utc::now();
        let horizon = now + TimeDelta::days(7);
        let mut at = now;
        let mut longest = Duration::ZERO;
        // At most 20,000 fire times (a schedule every 30 s covers a week in that many).
        for _ in 0..20_000 {
            let Some(next) = s.next_after(at) else { break };
            longest = longest.max((next - at).to_std().unwrap_or_default());
            if next > horizon {
                break;
            }
            at = next;
        }
        if longest.is_zero() { interval } else { longest }
    }

    /// When a tuple of this cadence is overdue (`calendar_sync_status.stale`): no round
    /// completed within max(3 × cadence, cadence + 10 min).
    pub fn stale_after(cadence: Duration) -> Duration {
        cadence
            .saturating_mul(3)
            .max(cadence.saturating_add(Duration::from_secs(600)))
    }

    /// The stored form of a tuple's interval, schedule and rolling window, and the bound
    /// past which it is overdue.
    pub fn encode(interval: Duration, c: &TupleConfig, cadence: Duration) -> String {
        let mut v = json!({
            "interval_ms": u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "stale_after_s": stale_after(cadence).as_secs_f64(),
        });
        if let Some(s) = &c.schedule {
            v["schedule"] = json!({ "zone": s.zone(), "patterns": s.patterns() });
        }
        if let Some(r) = c.rolling {
            v["rolling"] = json!({ "start": edge(r.start), "end": edge(r.end) });
        }
        if let Some(a) = &c.account {
            v["account"] = json!(a);
        }
        v.to_string()
    }

    /// The delegated account a tuple's stored settings name, if any.
    pub fn account_of(text: Option<&str>) -> Option<String> {
        let v: Value = serde_json::from_str(text?).ok()?;
        v.get("account")?.as_str().map(str::to_owned)
    }

    /// A tuple's stored settings read back: its interval (`default` when absent or
    /// unreadable), schedule and rolling window. What cannot be read is left at its default
    /// and said in the error, which the caller logs.
    pub fn decode(
        text: Option<&str>,
        default: Duration,
    ) -> (
        Duration,
        Option<Arc<CronSchedule>>,
        Option<WindowSpec>,
        Option<String>,
    ) {
        let Some(text) = text else {
            return (default, None, None, None);
        };
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return (default, None, None, Some(format!("not JSON: {e}"))),
        };
        let mut problem = None;
        let interval = v
            .get("interval_ms")
            .and_then(Value::as_u64)
            .filter(|ms| *ms > 0)
            .map_or(default, Duration::from_millis);
        let schedule = v.get("schedule").and_then(|s| {
            let zone = s.get("zone").and_then(Value::as_str).unwrap_or("UTC");
            let patterns: Vec<String> = s
                .get("patterns")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            match CronSchedule::new(&patterns, zone) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    problem = Some(format!("schedule: {e}"));
                    None
                }
            }
        });
        let rolling = v.get("rolling").and_then(|r| {
            let spec = WindowSpec {
                start: edge_of(r.get("start")?)?,
                end: edge_of(r.get("end")?)?,
            };
            Some(spec)
        });
        if v.get("rolling").is_some() && rolling.is_none() {
            problem = Some("rolling: unreadable edges".into());
        }
        (interval, schedule, rolling, problem)
    }
}
