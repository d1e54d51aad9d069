//! Reading one value out of an event object as Graph sends it: by a path of property names,
//! with anything absent, `null` or of another type read as `None` (Graph omits properties a
//! `$select` left out, and an occurrence stub carries almost none).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

#[inline]
fn at<'a>(event: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    rest.iter().try_fold(event.get(*first)?, |v, k| v.get(k))
}

/// A string property.
#[inline]
pub fn text(event: &Map<String, Value>, path: &[&str]) -> Option<String> {
    at(event, path)?.as_str().map(str::to_owned)
}

/// A boolean property.
#[inline]
pub fn boolean(event: &Map<String, Value>, path: &[&str]) -> Option<bool> {
    at(event, path)?.as_bool()
}

/// An RFC 3339 instant (`lastModifiedDateTime`, seven fractional digits and `Z` as Graph
/// writes it), in UTC.
pub fn instant(event: &Map<String, Value>, path: &[&str]) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(at(event, path)?.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
