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
