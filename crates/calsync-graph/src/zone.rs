//! Time zones as Graph names them in `dateTimeTimeZone.timeZone`: UTC spellings, IANA names,
//! and Windows names ("Pacific Standard Time"), which some responses carry despite
//! `Prefer: outlook.timezone` (graph-delta-notes.md 1.8, Q&A 1382503). Windows names are mapped
//! with CLDR's windowsZones table (the `localzone` crate) and converted with the IANA rules
//! (`chrono-tz`), so daylight saving time is honoured.

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The zone `name` stands for, if calsync knows it.
pub fn resolve(name: &str) -> Option<Tz> {
    let name = name.trim();
    if matches!(
        name,
        "UTC" | "Etc/UTC" | "Coordinated Universal Time" | "tzone://Microsoft/Utc" | "GMT"
    ) {
        return Some(Tz::UTC);
    }
    if let Ok(tz) = name.parse::<Tz>() {
        return Some(tz);
    }
    localzone::win_zone_to_iana(name, None).and_then(|iana| iana.parse::<Tz>().ok())
}

/// A wall time in the zone named `zone` as an instant. A wall time that happens twice (the
/// hour after clocks go back) is the first of the two; one that never happens (the hour
/// clocks skip) is moved forward by the gap, as Outlook does.
pub fn to_utc(local: NaiveDateTime, zone: &str) -> Result<DateTime<Utc>, String> {
    let tz = resolve(zone).ok_or_else(|| format!("unknown time zone '{zone}'"))?;
    let at = match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t,
        LocalResult::None => {
            let hour = chrono::Duration::hours(1);
            match tz.from_local_datetime(&(local + hour)) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t,
                LocalResult::None => {
                    return Err(format!("{local} does not exist in time zone '{zone}'"));
                }
            }
        }
    };
    Ok(at.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn wall(y: i32, m: u32, d: u32, h: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_opt(h, 0, 0))
            .expect("a valid wall time")
    }

    #[test]
    fn windows_and_iana_names_convert_with_daylight_saving_time() {
        let cases = [
            // 09:00 Pacific is 17:00Z in winter and 16:00Z in summer (US DST from 8 March 2026).
            (
                "Pacific Standard Time",
                wall(2026, 3, 2, 9),
                "2026-03-02T17:00:00Z",
            ),
            (
                "Pacific Standard Time",
                wall(2026, 3, 9, 9),
                "2026-03-09T16:00:00Z",
            ),
            (
                "America/Los_Angeles",
                wall(2026, 3, 9, 9),
                "2026-03-09T16:00:00Z",
            ),
            (
                "W. Europe Standard Time",
                wall(2026, 7, 1, 9),
                "2026-07-01T07:00:00Z",
            ),
            (
                "Tokyo Standard Time",
                wall(2026, 1, 1, 9),
                "2026-01-01T00:00:00Z",
            ),
            ("UTC", wall(2026, 1, 1, 9), "2026-01-01T09:00:00Z"),
            (
                "tzone://Microsoft/Utc",
                wall(2026, 1, 1, 9),
                "2026-01-01T09:00:00Z",
            ),
            // 02:30 on 8 March 2026 does not exist in Los Angeles: moved past the gap.
            (
                "Pacific Standard Time",
                wall(2026, 3, 8, 2),
                "2026-03-08T10:00:00Z",
            ),
            // 01:00 on 1 November 2026 happens twice: the first one (PDT).
            (
                "Pacific Standard Time",
                wall(2026, 11, 1, 1),
                "2026-11-01T08:00:00Z",
            ),
        ];
        for (zone, local, want) in cases {
            assert_eq!(
                to_utc(local, zone).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                Ok(want.to_owned()),
                "{zone} {local}"
            );
        }
    }

    #[test]
    fn an_unknown_zone_is_an_error_that_names_it() {
        let err = to_utc(wall(2026, 1, 1, 9), "Mars Standard Time").unwrap_err();
        assert!(err.contains("Mars Standard Time"), "{err}");
        let err = to_utc(wall(2026, 1, 1, 9), "tzone://Microsoft/Custom").unwrap_err();
        assert!(err.contains("Custom"), "{err}");
    }
}
