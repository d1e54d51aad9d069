//! Delta pages as calsync reads them: items (events or `@removed`) and the one link.
//!
//! The parser never panics and never trusts sizes from the server: anything that is not a
//! well-formed page is a [`GraphError::Malformed`], and the page is not applied.

use crate::error::GraphError;
use calsync_details::Details;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::{Map, Value};

/// One page of a delta round.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaPage {
    /// Events and removals, in the order Graph sent them.
    pub items: Vec<DeltaItem>,
    /// Where the round goes on, or the link that ends it.
    pub link: PageLink,
    /// Items left out because nothing identifies them (no `id`): they cannot be stored or
    /// removed, and failing the page for them would fail it every time Graph sends it.
    pub skipped: u32,
    /// The page's share of the memory budget, released when the page is dropped.
    pub hold: crate::budget::PageHold,
}

/// The one link a delta page ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageLink {
    /// More pages in this round.
    Next(String),
    /// The round is complete; replay this link for the next round.
    Delta(String),
}

/// One entry of a delta page.
#[derive(Debug, Clone, PartialEq)]
pub enum DeltaItem {
    /// An event instance (single, occurrence, exception or series master).
    Event(Box<EventItem>),
    /// No longer part of this window (deleted, or moved out). Any `reason` counts.
    Removed {
        /// The removed item's id.
        id: String,
    },
}

impl DeltaItem {
    /// The item's Graph id.
    pub fn id(&self) -> &str {
        match self {
            DeltaItem::Event(e) => &e.id,
            DeltaItem::Removed { id } => id,
        }
    }
}

/// An event instance with the fields the read model indexes, and the whole object as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct EventItem {
    /// Graph's id of the instance.
    pub id: String,
    /// `start`, converted to UTC from whatever zone it was written in.
    pub start: Option<DateTime<Utc>>,
    /// `end`, converted to UTC.
    pub end: Option<DateTime<Utc>>,
    /// The date part of `start` as written: an all-day event's floating first day.
    pub start_date: Option<NaiveDate>,
    /// The date part of `end` as written: the day after an all-day event's last day.
    pub end_date: Option<NaiveDate>,
    /// Why `start` or `end` could not be read (an unknown zone), if so.
    pub time_error: Option<String>,
    /// `type`: `singleInstance`, `occurrence`, `exception` or `seriesMaster`.
    pub event_type: Option<String>,
    /// `seriesMasterId`, for occurrences and exceptions.
    pub series_master_id: Option<String>,
    /// The fields beyond id and times, as the read model keeps them (calsync-details).
    pub details: Details,
    /// Only some properties were sent (seen for occurrences: id, type, start, end): merge it
    /// into what is stored instead of replacing it.
    pub partial: bool,
    /// The whole object as Graph sent it.
    pub payload: Map<String, Value>,
}

fn str_field(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_owned)
}

/// A `dateTimeTimeZone` as written: the wall time and its zone's name.
fn wall_time(m: &Map<String, Value>, k: &str) -> Result<Option<(NaiveDateTime, String)>, String> {
    let Some(v) = m.get(k).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(dt) = v.get("dateTime").and_then(Value::as_str) else {
        return Err(format!("{k} has no dateTime"));
    };
    let tz = v.get("timeZone").and_then(Value::as_str).unwrap_or("UTC");
    let t = dt.trim_end_matches('Z');
    let local = NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| format!("{k}.dateTime '{dt}' is not a date and time"))?;
    Ok(Some((local, tz.to_owned())))
}

/// A `dateTimeTimeZone` as an instant and the date as written. calsync asks for UTC
/// (`Prefer: outlook.timezone`), but a response may carry another zone, Windows names included:
/// each is converted (DST-correct); a zone calsync does not know is an error, not a guess. An
/// all-day event is a floating date, midnight to midnight in whatever zone the response was
/// rendered in (docs#1802): its instants are its dates' midnights in UTC, whatever the label.
fn date_time(
    m: &Map<String, Value>,
    k: &str,
    all_day: bool,
) -> Result<Option<(DateTime<Utc>, NaiveDate)>, String> {
    let Some((local, tz)) = wall_time(m, k)? else {
        return Ok(None);
    };
    if all_day {
        return Ok(Some((
            local.date().and_time(NaiveTime::MIN).and_utc(),
            local.date(),
        )));
    }
    let at = crate::zone::to_utc(local, &tz)?;
    Ok(Some((at, local.date())))
}

impl EventItem {
    /// Reads the indexed fields out of an event object; only a missing or empty `id` is an error.
    pub fn from_map(payload: Map<String, Value>) -> Result<Self, GraphError> {
        let id = str_field(&payload, "id")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| GraphError::Malformed {
                reason: "an item has no id".into(),
            })?;
        let details = Details::from_graph(&payload);
        let all_day = details.is_all_day == Some(true);
        let start = date_time(&payload, "start", all_day);
        let end = date_time(&payload, "end", all_day);
        let time_error = match (&start, &end) {
            (Err(e), _) | (_, Err(e)) => Some(e.clone()),
            _ => None,
        };
        let (start, start_date) = start.ok().flatten().unzip();
        let (end, end_date) = end.ok().flatten().unzip();
        Ok(EventItem {
            start,
            end,
            start_date,
            end_date,
            time_error,
            event_type: str_field(&payload, "type"),
            series_master_id: str_field(&payload, "seriesMasterId"),
            details,
            partial: !payload.contains_key("subject"),
            id,
            payload,
        })
    }
}

/// Parses a 200 body into a page.
pub fn parse_page(body: &[u8]) -> Result<DeltaPage, GraphError> {
    if let Some(page) = empty_page(body) {
        return Ok(page);
    }
    let malformed = |reason: String| GraphError::Malformed { reason };
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(mut top) = v else {
        return Err(malformed("the body is not a JSON object".into()));
    };
    let next = top.remove("@odata.nextLink");
    let delta = top.remove("@odata.deltaLink");
    let link = match (next, delta) {
        (Some(Value::String(n)), None) => PageLink::Next(n),
        (None, Some(Value::String(d))) => PageLink::Delta(d),
        (None, None) => {
            return Err(malformed(
                "the page has neither nextLink nor deltaLink".into(),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(malformed("the page has both nextLink and deltaLink".into()));
        }
        _ => return Err(malformed("a page link is not a string".into())),
    };
    let values = match top.remove("value") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(malformed("value is not an array".into())),
        None => return Err(malformed("the page has no value array".into())),
    };
    let mut items = Vec::with_capacity(values.len());
    let mut skipped = 0;
    for v in values {
        let Value::Object(m) = v else {
            return Err(malformed("an item is not an object".into()));
        };
        if str_field(&m, "id").is_none_or(|id| id.is_empty()) {
            skipped += 1;
            continue;
        }
        if m.contains_key("@removed") {
            let id = str_field(&m, "id").unwrap_or_default();
            items.push(DeltaItem::Removed { id });
        } else {
            items.push(DeltaItem::Event(Box::new(EventItem::from_map(m)?)));
        }
    }
    Ok(DeltaPage {
        items,
        link,
        skipped,
        hold: Default::default(),
    })
}

type Raw = serde_json::value::RawValue;

/// The top of a page, its values left unparsed (a `null` is present, not absent).
#[derive(serde::Deserialize)]
struct PageTop<'a> {
    #[serde(
        rename = "@odata.nextLink",
        borrow,
        default,
        deserialize_with = "present"
    )]
    next: Option<&'a Raw>,
    #[serde(
        rename = "@odata.deltaLink",
        borrow,
        default,
        deserialize_with = "present"
    )]
    delta: Option<&'a Raw>,
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a Raw>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de Raw>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// The page most rounds get, `{"value": [], "@odata.deltaLink": "…"}` (a replay that found no
/// change), read without building a tree of it. `None` for anything else, which
/// [`parse_page`] then reads in full (and judges, malformed or not).
fn empty_page(body: &[u8]) -> Option<DeltaPage> {
    let top: PageTop<'_> = serde_json::from_slice(body).ok()?;
    let empty = top.value?.get().trim_start_matches('[').trim_start();
    if empty != "]" {
        return None;
    }
    let text = |raw: &Raw| serde_json::from_str::<String>(raw.get()).ok();
    let link = match (top.next, top.delta) {
        (Some(n), None) => PageLink::Next(text(n)?),
        (None, Some(d)) => PageLink::Delta(text(d)?),
        _ => return None,
    };
    Some(DeltaPage {
        items: Vec::new(),
        link,
        skipped: 0,
        hold: Default::default(),
    })
}

/// One page of a plain list (`/instances`): its events and the link to the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    /// The events, in the order Graph sent them.
    pub items: Vec<EventItem>,
    /// `@odata.nextLink`, when there are more pages.
    pub next: Option<String>,
}

/// Parses a 200 body of a plain list into a page.
pub fn parse_list(body: &[u8]) -> Result<ListPage, GraphError> {
    let malformed = |reason: String| GraphError::Malformed { reason };
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(mut top) = v else {
        return Err(malformed("the body is not a JSON object".into()));
    };
    let next = match top.remove("@odata.nextLink") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n),
        Some(_) => return Err(malformed("a page link is not a string".into())),
    };
    let Some(Value::Array(values)) = top.remove("value") else {
        return Err(malformed("the list has no value array".into()));
    };
    let items = values
        .into_iter()
        .map(|v| match v {
            Value::Object(m) => EventItem::from_map(m),
            _ => Err(malformed("an item is not an object".into())),
        })
        .collect::<Result<_, _>>()?;
    Ok(ListPage { items, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick read of an empty page gives what the full read gives, and leaves every other
    /// body to it.
    #[test]
    fn an_empty_page_reads_as_the_full_parser_reads_it() {
        for body in [
            &br#"{"@odata.context":"c","value":[],"@odata.deltaLink":"https://g/v1.0/d?$deltatoken=x"}"#[..],
            br#"{ "value" : [ ] , "@odata.nextLink" : "n\u0041" }"#,
        ] {
            let quick = empty_page(body).expect("read quickly");
            let mut full = parse_page(body).unwrap();
            full.hold = Default::default();
            assert_eq!(quick, full);
        }
        for body in [
            &br#"{"value":[{"id":"a"}],"@odata.deltaLink":"d"}"#[..],
            br#"{"value":[],"@odata.deltaLink":"d","@odata.nextLink":"n"}"#,
            br#"{"value":[],"@odata.deltaLink":null}"#,
            br#"{"value":[],"@odata.deltaLink":"d","@odata.nextLink":null}"#,
            br#"{"value":[],"@odata.deltaLink":"d","@odata.deltaLink":"e"}"#,
            br#"{"value":[]}"#,
            br#"{"value":{},"@odata.deltaLink":"d"}"#,
            br#"[]"#,
        ] {
            assert_eq!(empty_page(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn garbage_never_panics() {
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"{\"value\":[]}",
            b"{\"value\":5,\"@odata.deltaLink\":\"x\"}",
            b"{\"value\":[1],\"@odata.deltaLink\":\"x\"}",
            b"{\"value\":[],\"@odata.deltaLink\":7}",
            b"{\"value\":[],\"@odata.deltaLink\":\"a\",\"@odata.nextLink\":\"b\"}",
        ] {
            assert!(
                matches!(parse_page(body), Err(GraphError::Malformed { .. })),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn items_without_an_id_are_left_out_and_counted_not_fatal() {
        let page = parse_page(
            br#"{"@odata.deltaLink":"d","value":[
            {}, {"subject":"no id"}, {"id":""}, {"@removed":{"reason":"deleted"}},
            {"id":"ok","subject":"s"}
        ]}"#,
        )
        .unwrap();
        assert_eq!(page.skipped, 4);
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].id(), "ok");
    }

    #[test]
    fn odd_field_types_are_tolerated_and_kept_in_the_payload() {
        let page = parse_page(br#"{"@odata.deltaLink":"d","value":[{"id":"a","subject":5,"start":"x","isAllDay":"yes","extra":{"k":1}}]}"#).unwrap();
        let DeltaItem::Event(e) = &page.items[0] else {
            panic!()
        };
        assert_eq!(e.details.subject, None);
        assert_eq!(e.details.is_all_day, None);
        assert_eq!(e.start, None);
        assert!(!e.partial);
        assert_eq!(e.payload["extra"]["k"], 1);
    }

    #[test]
    fn all_day_multi_day_unicode_and_sparse_events_parse() {
        let body = r#"{"@odata.nextLink":"n","value":[
          {"id":"allday","subject":"Offsite 🏔️ — Zürich","isAllDay":true,
           "start":{"dateTime":"2026-03-02T00:00:00.0000000","timeZone":"UTC"},
           "end":{"dateTime":"2026-03-05T00:00:00.0000000","timeZone":"UTC"},
           "body":{"contentType":"html","content":"<p>日本語 · العربية · emoji 👩‍💻</p>"},
           "newGraphField":{"nested":[1,2,3]}},
          {"id":"sparse","subject":"only a subject"},
          {"id":"occ","type":"occurrence","start":{"dateTime":"2026-03-09T09:00:00","timeZone":"UTC"},
           "end":{"dateTime":"2026-03-09T09:30:00","timeZone":"UTC"}}]}"#;
        let page = parse_page(body.as_bytes()).unwrap();
        let events: Vec<&EventItem> = page
            .items
            .iter()
            .filter_map(|i| match i {
                DeltaItem::Event(e) => Some(e.as_ref()),
                DeltaItem::Removed { .. } => None,
            })
            .collect();
        let all_day = events[0];
        assert_eq!(all_day.details.is_all_day, Some(true));
        assert_eq!(
            (all_day.end.unwrap() - all_day.start.unwrap()).num_days(),
            3,
            "multi-day"
        );
        assert_eq!(
            all_day.details.subject.as_deref(),
            Some("Offsite 🏔️ — Zürich")
        );
        assert_eq!(
            all_day.payload["newGraphField"]["nested"][2], 3,
            "unknown fields kept"
        );
        let sparse = events[1];
        assert_eq!(
            (
                sparse.start,
                sparse.details.is_all_day,
                sparse.details.ical_uid.as_deref()
            ),
            (None, None, None)
        );
        assert!(
            events[2].partial,
            "an occurrence without a subject merges into what is stored"
        );
    }

    #[test]
    fn times_in_other_zones_are_converted_and_all_day_dates_float() {
        let page = parse_page(br#"{"@odata.deltaLink":"d","value":[
            {"id":"pst","subject":"s","start":{"dateTime":"2026-03-09T09:00:00.0000000","timeZone":"Pacific Standard Time"},
             "end":{"dateTime":"2026-03-09T09:30:00.0000000","timeZone":"Pacific Standard Time"}},
            {"id":"day","subject":"s","isAllDay":true,"start":{"dateTime":"2026-04-01T00:00:00.0000000","timeZone":"Tokyo Standard Time"},
             "end":{"dateTime":"2026-04-02T00:00:00.0000000","timeZone":"Tokyo Standard Time"}},
            {"id":"mars","subject":"s","start":{"dateTime":"2026-03-09T09:00:00.0000000","timeZone":"Mars Standard Time"},
             "end":{"dateTime":"2026-03-09T10:00:00.0000000","timeZone":"Mars Standard Time"}}
        ]}"#).unwrap();
        let ev = |i: usize| match &page.items[i] {
            DeltaItem::Event(e) => e.clone(),
            DeltaItem::Removed { .. } => panic!("an event"),
        };
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            ev(0).start,
            Some(at("2026-03-09T16:00:00Z")),
            "PDT, after 8 March"
        );
        assert_eq!(ev(0).end, Some(at("2026-03-09T16:30:00Z")));
        assert_eq!(
            ev(1).start,
            Some(at("2026-04-01T00:00:00Z")),
            "a floating date"
        );
        assert_eq!(ev(1).start_date, NaiveDate::from_ymd_opt(2026, 4, 1));
        assert_eq!(ev(1).end_date, NaiveDate::from_ymd_opt(2026, 4, 2));
        let mars = ev(2);
        assert_eq!(mars.start, None);
        assert!(
            mars.time_error
                .as_deref()
                .is_some_and(|e| e.contains("Mars Standard Time")),
            "{mars:?}"
        );
    }

    #[test]
    fn a_huge_page_parses() {
        let item = r#"{"id":"ID","subject":"s","body":{"content":"BODY"},"start":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T11:00:00","timeZone":"UTC"}}"#;
        let filler = "x".repeat(64 * 1024);
        let items: Vec<String> = (0..200)
            .map(|i| {
                item.replace("ID", &format!("e{i}"))
                    .replace("BODY", &filler)
            })
            .collect();
        let body = format!(
            r#"{{"@odata.deltaLink":"d","value":[{}]}}"#,
            items.join(",")
        );
        assert!(body.len() > 12 * 1024 * 1024);
        let page = parse_page(body.as_bytes()).unwrap();
        assert_eq!(page.items.len(), 200);
    }
}
