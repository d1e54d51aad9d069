//! Rolling windows: a window written as offsets from now ("-90d" to "+365d") is fixed at an
//! anchor instant and moved (re-based) when the anchor moves, on a cadence aligned to a time of
//! day. Every replica computes the same anchor from the clock, so they agree on each window
//! without talking to each other.

use calsync_graph::ViewWindow;
use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;

/// One edge of a configured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Edge {
    /// A fixed instant.
    At(DateTime<Utc>),
    /// An offset from the re-base anchor (negative: before it).
    Offset(TimeDelta),
}

impl Edge {
    fn at(self, anchor: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Edge::At(t) => t,
            Edge::Offset(d) => anchor + d,
        }
    }
}

/// A window as configured: fixed, rolling, or one fixed edge and one rolling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    /// The start edge.
    pub start: Edge,
    /// The end edge.
    pub end: Edge,
}

impl WindowSpec {
    /// A fixed window.
    pub fn fixed(w: ViewWindow) -> Self {
        WindowSpec {
            start: Edge::At(w.start),
            end: Edge::At(w.end),
        }
    }

    /// Whether an edge moves with the anchor.
    pub fn is_rolling(&self) -> bool {
        matches!(self.start, Edge::Offset(_)) || matches!(self.end, Edge::Offset(_))
    }

    /// The window at `anchor`; `None` if it is empty there (a fixed end the rolling start
    /// has passed).
    pub fn at(&self, anchor: DateTime<Utc>) -> Option<ViewWindow> {
        let w = ViewWindow {
            start: self.start.at(anchor),
            end: self.end.at(anchor),
        };
        (w.end > w.start).then_some(w)
    }
}

/// When rolling windows move: at `at` past midnight UTC, and every `every` from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rebase {
    /// The cadence (`sync.window_rebase`, default one day).
    pub every: Duration,
    /// The alignment: time past midnight UTC (`sync.window_rebase_at`, default 00:00).
    pub at: Duration,
}

impl Default for Rebase {
    fn default() -> Self {
        Rebase {
            every: Duration::from_secs(86_400),
            at: Duration::ZERO,
        }
    }
}

impl Rebase {
    /// The anchor in force at `now`: the latest aligned instant at or before it. Windows stay
    /// put between two anchors, so a restart, a reload or another replica computes the same.
    pub fn anchor(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let every = self.every.as_millis().max(1) as i64;
        let at = (self.at.as_millis() as i64).rem_euclid(every);
        let since = now.timestamp_millis() - at;
        let k = since.div_euclid(every);
        DateTime::<Utc>::from_timestamp_millis(k * every + at).unwrap_or(now)
    }

    /// The next anchor after `now`.
    pub fn next(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let every = TimeDelta::from_std(self.every).unwrap_or(TimeDelta::days(1));
        self.anchor(now) + every
    }
}

/// Moves every rolling window among `configs` to `anchor` (fixed ones, and a rolling one that
/// would be empty there, stay): configs made at another anchor (a discovery pass that began
/// before midnight, the config read at start) registered as they are would move windows back.
pub fn at_anchor(configs: &mut [crate::TupleConfig], anchor: DateTime<Utc>) {
    for c in configs {
        if let Some(w) = c.rolling.and_then(|spec| spec.at(anchor)) {
            c.window = w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn the_anchor_is_the_last_aligned_instant_and_moves_only_at_the_next() {
        let daily_at_3 = Rebase {
            every: Duration::from_secs(86_400),
            at: Duration::from_secs(3 * 3600),
        };
        assert_eq!(
            daily_at_3.anchor(t("2026-11-28T02:59:59Z")),
            t("2026-11-27T03:00:00Z")
        );
        assert_eq!(
            daily_at_3.anchor(t("2026-11-28T03:00:00Z")),
            t("2026-11-28T03:00:00Z")
        );
        assert_eq!(
            daily_at_3.anchor(t("2026-11-28T23:00:00Z")),
            t("2026-11-28T03:00:00Z")
        );
        assert_eq!(
            daily_at_3.next(t("2026-11-28T23:00:00Z")),
            t("2026-11-29T03:00:00Z")
        );
        // Across a year's end and before 1970 alike (euclidean division).
        assert_eq!(
            Rebase::default().anchor(t("2026-12-31T23:59:59Z")),
            t("2026-12-31T00:00:00Z")
        );
        assert_eq!(
            Rebase::default().anchor(t("1969-12-31T12:00:00Z")),
            t("1969-12-31T00:00:00Z")
        );
        let hourly_at_15 = Rebase {
            every: Duration::from_secs(3600),
            at: Duration::from_secs(15 * 60),
        };
        assert_eq!(
            hourly_at_15.anchor(t("2026-11-28T10:14:00Z")),
            t("2026-11-28T09:15:00Z")
        );
    }

    #[test]
    fn a_rolling_window_follows_its_anchor_and_a_fixed_one_does_not() {
        let rolling = WindowSpec {
            start: Edge::Offset(TimeDelta::days(-90)),
            end: Edge::Offset(TimeDelta::days(365)),
        };
        assert!(rolling.is_rolling());
        let w = rolling.at(t("2026-11-28T00:00:00Z")).unwrap();
        assert_eq!(w.start, t("2026-08-30T00:00:00Z"));
        assert_eq!(w.end, t("2027-11-28T00:00:00Z"));
        let fixed = WindowSpec::fixed(w);
        assert!(!fixed.is_rolling());
        assert_eq!(fixed.at(t("2030-01-01T00:00:00Z")), Some(w));
        // A fixed end that a rolling start has passed: nothing left to mirror.
        let ending = WindowSpec {
            start: Edge::Offset(TimeDelta::days(-1)),
            end: Edge::At(t("2026-12-01T00:00:00Z")),
        };
        assert!(ending.at(t("2026-11-28T00:00:00Z")).is_some());
        assert_eq!(ending.at(t("2026-12-05T00:00:00Z")), None);
    }

    #[test]
    fn configs_made_at_an_older_anchor_are_moved_to_the_current_one() {
        let spec = WindowSpec {
            start: Edge::Offset(TimeDelta::days(-1)),
            end: Edge::Offset(TimeDelta::days(1)),
        };
        let yesterday = t("2026-11-27T00:00:00Z");
        let fixed = ViewWindow {
            start: t("2026-01-01T00:00:00Z"),
            end: t("2026-02-01T00:00:00Z"),
        };
        let config = |window, rolling| crate::TupleConfig {
            key: "k".into(),
            user: "u".into(),
            account: None,
            calendar: calsync_graph::CalendarRef::Default,
            window,
            rolling,
            interval: None,
            schedule: None,
        };
        let mut configs = vec![
            config(spec.at(yesterday).unwrap(), Some(spec)),
            config(fixed, None),
        ];
        at_anchor(&mut configs, t("2026-11-28T00:00:00Z"));
        assert_eq!(configs[0].window.start, t("2026-11-27T00:00:00Z"));
        assert_eq!(configs[1].window, fixed);
    }
}
