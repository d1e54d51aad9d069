//! Cron schedules: a calendar synced at the fire times of one or more cron patterns (their
//! union), in a named IANA zone, e.g. every minute in business hours and every 30 minutes
//! otherwise. Patterns are parsed and evaluated by croner (POSIX/Vixie semantics with an
//! optional seconds field; across a DST change a fixed-time job runs once, at the first valid
//! time, and an interval job runs at each real occurrence).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::time::Duration;

/// One or more cron patterns in one zone.
#[derive(Clone)]
pub struct CronSchedule {
    patterns: Vec<String>,
    crons: Vec<croner::Cron>,
    zone: Tz,
}

impl std::fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} in {}", self.patterns, self.zone)
    }
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns && self.zone == other.zone
    }
}

impl Eq for CronSchedule {}

impl std::hash::Hash for CronSchedule {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.patterns.hash(state);
        self.zone.name().hash(state);
    }
}

/// Why a schedule was refused, naming the pattern or zone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronScheduleError {
    /// No pattern given.
    #[error("no cron pattern")]
    Empty,
    /// A pattern croner refused.
    #[error("'{pattern}' is not a cron pattern ({reason})")]
    Pattern {
        /// The pattern as written.
        pattern: String,
        /// croner's reason.
        reason: String,
    },
    /// A zone that is not in the IANA database.
    #[error("'{0}' is not an IANA time zone (e.g. \"Europe/Berlin\")")]
    Zone(String),
    /// A pattern that never fires (e.g. the 30th of February).
    #[error("'{0}' never fires")]
    Never(String),
}

impl CronSchedule {
    /// Parses `patterns` (5 fields, or 6 with seconds first) for `zone`.
    pub fn new(patterns: &[String], zone: &str) -> Result<Self, CronScheduleError> {
        if patterns.is_empty() {
            return Err(CronScheduleError::Empty);
        }
        let zone: Tz = zone
            .trim()
            .parse()
            .map_err(|_| CronScheduleError::Zone(zone.to_owned()))?;
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build();
        let crons = patterns
            .iter()
            .map(|p| {
                parser
                    .parse(p.trim())
                    .map_err(|e| CronScheduleError::Pattern {
                        pattern: p.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let s = CronSchedule {
            patterns: patterns.to_vec(),
            crons,
            zone,
        };
        // Refused now rather than a calendar that silently never syncs.
        let from = Utc::now();
        for (p, c) in s.patterns.iter().zip(&s.crons) {
            if c.find_next_occurrence(&from.with_timezone(&zone), false)
                .is_err()
            {
                return Err(CronScheduleError::Never(p.clone()));
            }
        }
        Ok(s)
    }

    /// The patterns as written.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The zone.
    pub fn zone(&self) -> &str {
        self.zone.name()
    }

    /// The first fire time of any pattern strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&self.zone);
        self.crons
            .iter()
            .filter_map(|c| c.find_next_occurrence(&local, false).ok())
            .map(|t| t.with_timezone(&Utc))
            .min()
    }

    /// The period in force at `at`: from the next fire time after it to the one after that.
    /// The no-starvation rule ("synced within 2 × the current period") is measured in it.
    pub fn period_at(&self, at: DateTime<Utc>) -> Option<Duration> {
        let first = self.next_after(at)?;
        let second = self.next_after(first)?;
        (second - first).to_std().ok()
    }

    /// How long from `now` until the tuple is due: the next fire time, plus up to a tenth of
    /// the period after it (`jitter` in 0..=1, at most 30 s), so calendars on one schedule do
    /// not all call Graph in the same second. Never before the fire time: "every minute from
    /// 08:00" starts at 08:00, not at 07:59:57.
    pub fn delay(&self, now: DateTime<Utc>, jitter: f64) -> Option<Duration> {
        let next = self.next_after(now)?;
        let until = (next - now).to_std().unwrap_or_default();
        let period = self.period_at(now).unwrap_or(until);
        let spread = (period / 10).min(Duration::from_secs(30));
        Some(until + spread.mul_f64(jitter.clamp(0.0, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn fires(s: &CronSchedule, from: &str, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = t(from);
        for _ in 0..n {
            at = s.next_after(at).unwrap();
            out.push(at);
        }
        out
    }

    fn schedule(patterns: &[&str], zone: &str) -> CronSchedule {
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        CronSchedule::new(&p, zone).unwrap()
    }

    #[test]
    fn business_hours_every_minute_and_every_30_minutes_otherwise() {
        let s = schedule(&["* 8-17 * * Mon-Fri", "*/30 * * * *"], "Europe/Berlin");
        // Friday 2026-11-27, 16:58 Berlin (15:58 UTC): every minute until 17:59, then :30s.
        assert_eq!(
            fires(&s, "2026-11-27T16:58:00Z", 3),
            [
                t("2026-11-27T16:59:00Z"),
                t("2026-11-27T17:00:00Z"),
                t("2026-11-27T17:30:00Z")
            ]
        );
        assert_eq!(
            s.period_at(t("2026-11-27T10:00:30Z")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            s.period_at(t("2026-11-28T10:00:30Z")),
            Some(Duration::from_secs(1800))
        );
    }

    #[test]
    fn a_schedule_fires_at_the_expected_instants_across_both_dst_changes_of_its_zone() {
        // Europe/Berlin springs forward on 2026-03-29 (02:00 CET → 03:00 CEST) and falls back
        // on 2026-10-25 (03:00 CEST → 02:00 CET).
        let daily = schedule(&["30 2 * * *"], "Europe/Berlin");
        assert_eq!(
            fires(&daily, "2026-03-27T12:00:00Z", 3),
            [
                t("2026-03-28T01:30:00Z"), // 02:30 CET
                t("2026-03-29T01:00:00Z"), // 02:30 does not exist: 03:00 CEST, the first valid time
                t("2026-03-30T00:30:00Z"), // 02:30 CEST
            ]
        );
        assert_eq!(
            fires(&daily, "2026-10-24T12:00:00Z", 3),
            [
                t("2026-10-25T00:30:00Z"), // 02:30 CEST, the first of two: runs once
                t("2026-10-26T01:30:00Z"), // 02:30 CET
                t("2026-10-27T01:30:00Z"),
            ]
        );
        // An interval job runs at every real occurrence: the repeated hour twice, the skipped
        // hour never, and never two fires in one instant.
        let hourly = schedule(&["0 * * * *"], "Europe/Berlin");
        assert_eq!(
            fires(&hourly, "2026-10-24T23:30:00Z", 4),
            [
                t("2026-10-25T00:00:00Z"), // 02:00 CEST
                t("2026-10-25T01:00:00Z"), // 02:00 CET
                t("2026-10-25T02:00:00Z"), // 03:00 CET
                t("2026-10-25T03:00:00Z"),
            ]
        );
        assert_eq!(
            fires(&hourly, "2026-03-28T23:30:00Z", 3),
            [
                t("2026-03-29T00:00:00Z"), // 01:00 CET
                t("2026-03-29T01:00:00Z"), // 03:00 CEST: 02:00 never was
                t("2026-03-29T02:00:00Z"),
            ]
        );
        // UTC has no DST: the same pattern there is plain.
        let utc = schedule(&["30 2 * * *"], "UTC");
        assert_eq!(
            fires(&utc, "2026-03-28T12:00:00Z", 1),
            [t("2026-03-29T02:30:00Z")]
        );
    }

    #[test]
    fn a_due_time_is_never_before_the_fire_time_and_jitter_is_bounded() {
        let s = schedule(&["*/5 * * * *"], "UTC");
        let now = t("2026-11-28T10:01:00Z");
        assert_eq!(s.delay(now, 0.0), Some(Duration::from_secs(240)));
        assert_eq!(s.delay(now, 1.0), Some(Duration::from_secs(240 + 30)));
        let secs = schedule(&["*/2 * * * * *"], "UTC");
        assert_eq!(
            secs.delay(t("2026-11-28T10:00:01Z"), 1.0),
            Some(Duration::from_millis(1200))
        );
    }

    #[test]
    fn bad_patterns_zones_and_never_firing_schedules_are_named() {
        let bad = |p: &[&str], z: &str| {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            CronSchedule::new(&p, z).unwrap_err()
        };
        assert_eq!(bad(&[], "UTC"), CronScheduleError::Empty);
        assert!(
            matches!(bad(&["61 * * * *"], "UTC"), CronScheduleError::Pattern { pattern, .. } if pattern == "61 * * * *")
        );
        assert_eq!(
            bad(&["* * * * *"], "Mars/Olympus"),
            CronScheduleError::Zone("Mars/Olympus".into())
        );
        assert_eq!(
            bad(&["0 0 30 2 *"], "UTC"),
            CronScheduleError::Never("0 0 30 2 *".into())
        );
    }
}
