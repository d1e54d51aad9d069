//! Time zones as Graph names them: UTC spellings, IANA names and Windows names (mapped with
//! CLDR's windowsZones table, from the `localzone` crate), with the IANA rules of `chrono-tz`
//! so daylight saving time is honoured (graph-delta-notes.md 1.8).
//!
//! graph-sim reads zone names on its own rather than through calsync's client: the simulator
//! knows no calsync crate, and its reading of Graph must not borrow calsync's.

use chrono::{LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The zone `name` stands for, if known.
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

/// Whether `name` is a spelling of UTC.
pub fn is_utc(name: &str) -> bool {
    resolve(name) == Some(Tz::UTC)
}

/// A wall time in `zone` as a UTC wall time. A wall time that happens twice is the first; one
/// that never happens (the hour clocks skip) moves forward by the gap, as Outlook does. An
/// unknown zone (refused on writes, so never stored) counts as UTC.
pub fn to_utc(local: NaiveDateTime, zone: &str) -> NaiveDateTime {
    let Some(tz) = resolve(zone) else {
        return local;
    };
    let pick = |t: NaiveDateTime| match tz.from_local_datetime(&t) {
        LocalResult::Single(x) | LocalResult::Ambiguous(x, _) => Some(x.naive_utc()),
        LocalResult::None => None,
    };
    pick(local)
        .or_else(|| pick(local + chrono::Duration::hours(1)))
        .unwrap_or(local)
}

/// A UTC wall time as a wall time in `tz`.
pub fn from_utc(utc: NaiveDateTime, tz: Tz) -> NaiveDateTime {
    Utc.from_utc_datetime(&utc).with_timezone(&tz).naive_local()
}

/// The Windows name Outlook writes for `zone` ("Pacific Standard Time" for
/// America/Los_Angeles); `zone` itself when it already is one or has none.
pub fn windows_name(zone: &str) -> String {
    match resolve(zone) {
        Some(Tz::UTC) => "UTC".to_owned(),
        Some(tz) => localzone::iana_to_win_zone(tz.name())
            .map(|(w, _)| w.to_owned())
            .unwrap_or_else(|| zone.to_owned()),
        None => zone.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn wall(m: u32, d: u32, h: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2026, m, d)
            .and_then(|d| d.and_hms_opt(h, 0, 0))
            .expect("a valid wall time")
    }

    #[test]
    fn pacific_time_follows_us_daylight_saving() {
        assert_eq!(
            to_utc(wall(3, 2, 9), "Pacific Standard Time"),
            wall(3, 2, 17)
        );
        assert_eq!(
            to_utc(wall(3, 9, 9), "Pacific Standard Time"),
            wall(3, 9, 16)
        );
        assert_eq!(to_utc(wall(3, 9, 9), "America/Los_Angeles"), wall(3, 9, 16));
        assert_eq!(
            from_utc(wall(3, 9, 16), Tz::America__Los_Angeles),
            wall(3, 9, 9)
        );
        assert_eq!(windows_name("America/Los_Angeles"), "Pacific Standard Time");
        assert_eq!(
            windows_name("Pacific Standard Time"),
            "Pacific Standard Time"
        );
        assert!(resolve("Mars Standard Time").is_none());
        assert!(is_utc("Coordinated Universal Time"));
    }
}
