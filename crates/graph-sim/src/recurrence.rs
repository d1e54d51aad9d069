//! Expansion of Graph `patternedRecurrence` values into occurrence dates.
//!
//! Follows the documented pattern types (daily, weekly, absoluteMonthly, relativeMonthly,
//! absoluteYearly, relativeYearly) and range types (endDate, numbered, noEnd). Dates are
//! calendar dates in the recurrence time zone, which the simulator takes to be UTC.

use chrono::{Datelike, Duration, NaiveDate, Weekday};
use serde::{Deserialize, Serialize};

/// Graph's `patternedRecurrence`: how often, and for how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatternedRecurrence {
    /// How often.
    pub pattern: RecurrencePattern,
    /// For how long.
    pub range: RecurrenceRange,
}

/// Graph's `recurrencePattern`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecurrencePattern {
    /// `type`.
    #[serde(rename = "type")]
    pub kind: PatternKind,
    /// Units of the pattern between occurrences (days, weeks, months, years).
    #[serde(default = "one")]
    pub interval: u32,
    /// Month of the year (1–12), for yearly patterns.
    #[serde(default)]
    pub month: u32,
    /// Day of the month (1–31), for absolute patterns.
    #[serde(default)]
    pub day_of_month: u32,
    /// Days of the week, for weekly and relative patterns.
    #[serde(default)]
    pub days_of_week: Vec<DayOfWeek>,
    /// The first day of the week (weekly patterns with an interval above 1).
    #[serde(default = "sunday")]
    pub first_day_of_week: DayOfWeek,
    /// Which week of the month, for relative patterns.
    #[serde(default = "first")]
    pub index: WeekIndex,
}

fn one() -> u32 {
    1
}
fn sunday() -> DayOfWeek {
    DayOfWeek::Sunday
}
fn first() -> WeekIndex {
    WeekIndex::First
}

/// `recurrencePatternType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PatternKind {
    /// Every `interval` days.
    Daily,
    /// On `daysOfWeek` every `interval` weeks.
    Weekly,
    /// On `dayOfMonth` every `interval` months.
    AbsoluteMonthly,
    /// On the `index` `daysOfWeek` every `interval` months.
    RelativeMonthly,
    /// On `month`/`dayOfMonth` every `interval` years.
    AbsoluteYearly,
    /// On the `index` `daysOfWeek` of `month` every `interval` years.
    RelativeYearly,
}

/// Graph's `dayOfWeek`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DayOfWeek {
    /// Sunday.
    Sunday,
    /// Monday.
    Monday,
    /// Tuesday.
    Tuesday,
    /// Wednesday.
    Wednesday,
    /// Thursday.
    Thursday,
    /// Friday.
    Friday,
    /// Saturday.
    Saturday,
}

impl DayOfWeek {
    fn weekday(self) -> Weekday {
        match self {
            DayOfWeek::Sunday => Weekday::Sun,
            DayOfWeek::Monday => Weekday::Mon,
            DayOfWeek::Tuesday => Weekday::Tue,
            DayOfWeek::Wednesday => Weekday::Wed,
            DayOfWeek::Thursday => Weekday::Thu,
            DayOfWeek::Friday => Weekday::Fri,
            DayOfWeek::Saturday => Weekday::Sat,
        }
    }

    /// The day of the week of `date`.
    pub fn of(date: NaiveDate) -> Self {
        match date.weekday() {
            Weekday::Sun => DayOfWeek::Sunday,
            Weekday::Mon => DayOfWeek::Monday,
            Weekday::Tue => DayOfWeek::Tuesday,
            Weekday::Wed => DayOfWeek::Wednesday,
            Weekday::Thu => DayOfWeek::Thursday,
            Weekday::Fri => DayOfWeek::Friday,
            Weekday::Sat => DayOfWeek::Saturday,
        }
    }
}

/// Graph's `weekIndex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WeekIndex {
    /// The first.
    First,
    /// The second.
    Second,
    /// The third.
    Third,
    /// The fourth.
    Fourth,
    /// The last in the month.
    Last,
}

/// Graph's `recurrenceRange`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecurrenceRange {
    /// `type`.
    #[serde(rename = "type")]
    pub kind: RangeKind,
    /// The first day of the series.
    pub start_date: NaiveDate,
    /// Graph writes `0001-01-01` for ranges without an end date.
    #[serde(default, serialize_with = "graph_end_date")]
    pub end_date: Option<NaiveDate>,
    /// The zone the pattern is expanded in; empty when the client sent none, and then the
    /// start's zone (filled in when the series is written).
    #[serde(default)]
    pub recurrence_time_zone: String,
    /// Occurrences of a numbered range.
    #[serde(default)]
    pub number_of_occurrences: u32,
}

fn graph_end_date<S: serde::Serializer>(d: &Option<NaiveDate>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&d.to_string()),
        None => s.serialize_str("0001-01-01"),
    }
}

/// `recurrenceRangeType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RangeKind {
    /// Until `endDate`, inclusive.
    EndDate,
    /// `numberOfOccurrences` times.
    Numbered,
    /// Forever.
    NoEnd,
}

/// Why a recurrence was refused, in the words of a Graph `ErrorInvalidParameter` message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecurrenceError {
    /// `interval` is 0.
    #[error("recurrence interval must be at least 1")]
    ZeroInterval,
    /// A weekly or relative pattern without days.
    #[error("weekly and relative patterns need at least one entry in daysOfWeek")]
    NoDaysOfWeek,
    /// `dayOfMonth` outside 1–31.
    #[error("dayOfMonth must be between 1 and 31")]
    BadDayOfMonth,
    /// `month` outside 1–12.
    #[error("month must be between 1 and 12")]
    BadMonth,
    /// An end date missing or before the start.
    #[error("an endDate range needs an endDate not before startDate")]
    BadEndDate,
    /// A numbered range of 0.
    #[error("a numbered range needs numberOfOccurrences of at least 1")]
    BadCount,
}

/// Hard stop for pathological patterns: no series expands past this many dates per call.
const MAX_EXPANSION: usize = 100_000;

impl PatternedRecurrence {
    /// Checks the fields a pattern and range need, as Graph refuses a write that lacks them.
    pub fn validate(&self) -> Result<(), RecurrenceError> {
        let p = &self.pattern;
        if p.interval == 0 {
            return Err(RecurrenceError::ZeroInterval);
        }
        match p.kind {
            PatternKind::Weekly | PatternKind::RelativeMonthly | PatternKind::RelativeYearly
                if p.days_of_week.is_empty() =>
            {
                return Err(RecurrenceError::NoDaysOfWeek);
            }
            PatternKind::AbsoluteMonthly | PatternKind::AbsoluteYearly
                if !(1..=31).contains(&p.day_of_month) =>
            {
                return Err(RecurrenceError::BadDayOfMonth);
            }
            _ => {}
        }
        if matches!(
            p.kind,
            PatternKind::AbsoluteYearly | PatternKind::RelativeYearly
        ) && !(1..=12).contains(&p.month)
        {
            return Err(RecurrenceError::BadMonth);
        }
        match self.range.kind {
            RangeKind::EndDate => match self.range.end_date {
                Some(end) if end >= self.range.start_date => {}
                _ => return Err(RecurrenceError::BadEndDate),
            },
            RangeKind::Numbered if self.range.number_of_occurrences == 0 => {
                return Err(RecurrenceError::BadCount);
            }
            _ => {}
        }
        Ok(())
    }

    /// All occurrence dates from the range start up to and including `until`, in order.
    ///
    /// Counting for `numbered` ranges starts at the range start, so the dates returned are the
    /// same whatever `until` is (a window never changes which occurrence is "the third").
    pub fn dates_until(&self, until: NaiveDate) -> Vec<NaiveDate> {
        let last = match self.range.kind {
            RangeKind::EndDate => self.range.end_date.map_or(until, |e| e.min(until)),
            _ => until,
        };
        let limit = match self.range.kind {
            RangeKind::Numbered => self.range.number_of_occurrences as usize,
            _ => MAX_EXPANSION,
        }
        .min(MAX_EXPANSION);
        let mut out = Vec::new();
        let start = self.range.start_date;
        if start > last || self.pattern.interval == 0 {
            return out;
        }
        let p = &self.pattern;
        let interval = i64::from(p.interval);
        let push = |d: NaiveDate, out: &mut Vec<NaiveDate>| -> bool {
            if d < start {
                return true;
            }
            if d > last || out.len() >= limit {
                return false;
            }
            out.push(d);
            true
        };
        match p.kind {
            PatternKind::Daily => {
                let mut d = start;
                while push(d, &mut out) {
                    d += Duration::days(interval);
                }
            }
            PatternKind::Weekly => {
                let first = p.first_day_of_week.weekday();
                let offset =
                    (7 + start.weekday().num_days_from_sunday() - first.num_days_from_sunday()) % 7;
                let mut week_start = start - Duration::days(i64::from(offset));
                let mut days: Vec<i64> = p
                    .days_of_week
                    .iter()
                    .map(|d| {
                        i64::from(
                            (7 + d.weekday().num_days_from_sunday() - first.num_days_from_sunday())
                                % 7,
                        )
                    })
                    .collect();
                days.sort_unstable();
                days.dedup();
                'weeks: loop {
                    for off in &days {
                        if !push(week_start + Duration::days(*off), &mut out) {
                            break 'weeks;
                        }
                    }
                    week_start += Duration::weeks(interval);
                }
            }
            PatternKind::AbsoluteMonthly | PatternKind::RelativeMonthly => {
                let mut month = (start.year(), start.month());
                'months: loop {
                    for d in month_dates(p, month.0, month.1) {
                        if !push(d, &mut out) {
                            break 'months;
                        }
                    }
                    month = add_months(month, p.interval);
                    if month.0 > last.year() + 1 {
                        break;
                    }
                }
            }
            PatternKind::AbsoluteYearly | PatternKind::RelativeYearly => {
                let mut year = start.year();
                'years: loop {
                    for d in month_dates(p, year, p.month) {
                        if !push(d, &mut out) {
                            break 'years;
                        }
                    }
                    year += p.interval as i32;
                    if year > last.year() + 1 {
                        break;
                    }
                }
            }
        }
        out
    }
}

fn add_months((y, m): (i32, u32), n: u32) -> (i32, u32) {
    let total = (y * 12 + m as i32 - 1) + n as i32;
    (total.div_euclid(12), total.rem_euclid(12) as u32 + 1)
}

/// The dates a monthly or yearly pattern picks in one month.
fn month_dates(p: &RecurrencePattern, year: i32, month: u32) -> Vec<NaiveDate> {
    match p.kind {
        PatternKind::AbsoluteMonthly | PatternKind::AbsoluteYearly => {
            // Outlook moves a day that the month lacks (the 31st in April) to the month's last day.
            let last = last_day_of_month(year, month);
            NaiveDate::from_ymd_opt(year, month, p.day_of_month.min(last))
                .into_iter()
                .collect()
        }
        _ => {
            let mut dates: Vec<NaiveDate> = p
                .days_of_week
                .iter()
                .filter_map(|d| nth_weekday(year, month, d.weekday(), p.index))
                .collect();
            dates.sort_unstable();
            dates.dedup();
            dates
        }
    }
}

fn last_day_of_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = add_months((year, month), 1);
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day())
}

fn nth_weekday(year: i32, month: u32, wd: Weekday, index: WeekIndex) -> Option<NaiveDate> {
    match index {
        WeekIndex::Last => {
            let last = NaiveDate::from_ymd_opt(year, month, last_day_of_month(year, month))?;
            let back = (7 + last.weekday().num_days_from_sunday() - wd.num_days_from_sunday()) % 7;
            Some(last - Duration::days(i64::from(back)))
        }
        _ => {
            let n = match index {
                WeekIndex::First => 0,
                WeekIndex::Second => 1,
                WeekIndex::Third => 2,
                _ => 3,
            };
            NaiveDate::from_weekday_of_month_opt(year, month, wd, n + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn rec(json: serde_json::Value) -> PatternedRecurrence {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn weekly_monday_series_from_the_docs_fixture_expands_to_mondays_until_end_date() {
        let r = rec(serde_json::json!({
            "pattern": {"type": "weekly", "interval": 1, "month": 0, "dayOfMonth": 0,
                         "daysOfWeek": ["monday"], "firstDayOfWeek": "sunday", "index": "first"},
            "range": {"type": "endDate", "startDate": "2017-09-04", "endDate": "2017-12-31",
                      "recurrenceTimeZone": "Pacific Standard Time", "numberOfOccurrences": 0}
        }));
        let dates = r.dates_until(d("2030-01-01"));
        assert_eq!(dates.len(), 17);
        assert_eq!(dates[0], d("2017-09-04"));
        assert_eq!(dates[16], d("2017-12-25"));
        assert!(dates.iter().all(|x| x.weekday() == Weekday::Mon));
    }

    #[test]
    fn numbered_daily_series_counts_from_range_start() {
        let r = rec(serde_json::json!({
            "pattern": {"type": "daily", "interval": 2},
            "range": {"type": "numbered", "startDate": "2024-01-01", "numberOfOccurrences": 3}
        }));
        assert_eq!(
            r.dates_until(d("2025-01-01")),
            vec![d("2024-01-01"), d("2024-01-03"), d("2024-01-05")]
        );
        assert_eq!(r.dates_until(d("2024-01-02")), vec![d("2024-01-01")]);
    }

    #[test]
    fn biweekly_pattern_skips_alternate_weeks_and_picks_several_days() {
        let r = rec(serde_json::json!({
            "pattern": {"type": "weekly", "interval": 2, "daysOfWeek": ["tuesday", "thursday"]},
            "range": {"type": "noEnd", "startDate": "2024-01-02"}
        }));
        assert_eq!(
            r.dates_until(d("2024-01-20")),
            vec![
                d("2024-01-02"),
                d("2024-01-04"),
                d("2024-01-16"),
                d("2024-01-18")
            ]
        );
    }

    #[test]
    fn absolute_monthly_on_the_31st_falls_back_to_the_last_day() {
        let r = rec(serde_json::json!({
            "pattern": {"type": "absoluteMonthly", "interval": 1, "dayOfMonth": 31},
            "range": {"type": "numbered", "startDate": "2024-01-31", "numberOfOccurrences": 3}
        }));
        assert_eq!(
            r.dates_until(d("2025-01-01")),
            vec![d("2024-01-31"), d("2024-02-29"), d("2024-03-31")]
        );
    }

    #[test]
    fn relative_monthly_last_friday() {
        let r = rec(serde_json::json!({
            "pattern": {"type": "relativeMonthly", "interval": 1, "daysOfWeek": ["friday"], "index": "last"},
            "range": {"type": "numbered", "startDate": "2024-01-01", "numberOfOccurrences": 2}
        }));
        assert_eq!(
            r.dates_until(d("2025-01-01")),
            vec![d("2024-01-26"), d("2024-02-23")]
        );
    }

    #[test]
    fn yearly_patterns() {
        let abs = rec(serde_json::json!({
            "pattern": {"type": "absoluteYearly", "interval": 1, "month": 3, "dayOfMonth": 15},
            "range": {"type": "endDate", "startDate": "2024-01-01", "endDate": "2026-12-31"}
        }));
        assert_eq!(
            abs.dates_until(d("2030-01-01")),
            vec![d("2024-03-15"), d("2025-03-15"), d("2026-03-15")]
        );
        let rel = rec(serde_json::json!({
            "pattern": {"type": "relativeYearly", "interval": 1, "month": 11, "daysOfWeek": ["thursday"], "index": "fourth"},
            "range": {"type": "numbered", "startDate": "2024-01-01", "numberOfOccurrences": 1}
        }));
        assert_eq!(rel.dates_until(d("2030-01-01")), vec![d("2024-11-28")]);
    }

    #[test]
    fn invalid_recurrences_are_refused() {
        let mut r = rec(serde_json::json!({
            "pattern": {"type": "weekly", "interval": 1},
            "range": {"type": "noEnd", "startDate": "2024-01-01"}
        }));
        assert_eq!(r.validate(), Err(RecurrenceError::NoDaysOfWeek));
        r.pattern.days_of_week = vec![DayOfWeek::Monday];
        assert_eq!(r.validate(), Ok(()));
        r.pattern.interval = 0;
        assert_eq!(r.validate(), Err(RecurrenceError::ZeroInterval));
    }
}
