//! What one delta page means for the store, decided in memory before any SQL runs.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// What an event says about itself beyond its id and times, declared in calsync-details.
pub use calsync_details::Details;

/// One event row to write: a single event, an occurrence or an exception.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Graph's event id.
    pub event_id: String,
    /// The start instant.
    pub start_at: Option<DateTime<Utc>>,
    /// The end instant.
    pub end_at: Option<DateTime<Utc>>,
    /// The date part of `start` as Graph wrote it (an all-day event's floating date).
    pub start_date: Option<NaiveDate>,
    /// The date part of `end` as Graph wrote it.
    pub end_date: Option<NaiveDate>,
    /// Why the times could not be read (an unknown time zone), if so.
    pub time_error: Option<String>,
    /// `singleInstance`, `occurrence` or `exception`.
    pub event_type: Option<String>,
    /// The series an occurrence or exception belongs to.
    pub series_master_id: Option<String>,
    /// The rest of what the read model indexes.
    pub details: Details,
    /// Merge into the stored row instead of replacing it.
    pub partial: bool,
    /// The item as Graph sent it (the read model's `payload`).
    pub payload: Map<String, Value>,
}

/// A series master: never an instance, kept so its occurrences can show its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesRow {
    /// The master's id (the `seriesMasterId` of its occurrences).
    pub master_id: String,
    /// Its fields.
    pub details: Details,
    /// The master as Graph sent it.
    pub payload: Map<String, Value>,
}

/// The instances of one series in a tuple's window, as `/instances` listed them: occurrences of
/// that series that are stored but not listed here left silently (cancelled, retimed).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInstances {
    /// The series.
    pub master_id: String,
    /// Ids of its live occurrences and exceptions in the window.
    pub live: Vec<String>,
}

/// PostgreSQL refuses U+0000 in `text` and in `jsonb` strings (SQLSTATE 22021, 22P05), and
/// bodies copied into Outlook from other systems carry it. It is removed wherever it appears
/// (values and keys alike); returns whether anything changed.
pub fn strip_nul(v: &mut Value) -> bool {
    match v {
        Value::String(s) => strip_nul_str(s),
        Value::Array(a) => a.iter_mut().fold(false, |acc, x| strip_nul(x) | acc),
        Value::Object(m) => strip_nul_map(m),
        _ => false,
    }
}

fn strip_nul_str(s: &mut String) -> bool {
    if s.contains('\0') {
        s.retain(|c| c != '\0');
        true
    } else {
        false
    }
}

fn strip_nul_map(m: &mut Map<String, Value>) -> bool {
    let mut changed = m.values_mut().fold(false, |acc, x| strip_nul(x) | acc);
    if m.keys().any(|k| k.contains('\0')) {
        let old = std::mem::take(m);
        for (mut k, v) in old {
            strip_nul_str(&mut k);
            m.insert(k, v);
        }
        changed = true;
    }
    changed
}

/// Removes NULs from every text field of `d`; returns whether it did.
fn strip_nul_details(d: &mut Details) -> bool {
    d.texts_mut()
        .fold(false, |changed, s| strip_nul_str(s) | changed)
}

impl EventRow {
    /// Removes what PostgreSQL would refuse (see [`strip_nul`]); returns whether it did.
    pub fn repair(&mut self) -> bool {
        let mut changed = strip_nul_details(&mut self.details) | strip_nul_map(&mut self.payload);
        for s in [
            &mut self.event_type,
            &mut self.series_master_id,
            &mut self.time_error,
        ]
        .into_iter()
        .flatten()
        {
            changed |= strip_nul_str(s);
        }
        changed |= strip_nul_str(&mut self.event_id);
        changed
    }
}

impl SeriesRow {
    /// Removes what PostgreSQL would refuse (see [`strip_nul`]); returns whether it did.
    pub fn repair(&mut self) -> bool {
        strip_nul_details(&mut self.details)
            | strip_nul_map(&mut self.payload)
            | strip_nul_str(&mut self.master_id)
    }
}

/// One item of a page, in arrival order.
// Nearly every op is an Upsert; boxing it would add an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum PageOp {
    /// Insert or change a row.
    Upsert(EventRow),
    /// An `@removed` for this id.
    Remove(String),
}

/// A page reduced to at most one write per id.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PageChanges {
    /// Rows that replace what is stored.
    pub full: Vec<EventRow>,
    /// Rows merged into what is stored (Graph sent only some fields).
    pub partial: Vec<EventRow>,
    /// Ids to delete. A series master's id deletes the series and all its instances too.
    pub removed: Vec<String>,
    /// Series masters to store (listed in the page, or fetched for its occurrence stubs).
    pub series: Vec<SeriesRow>,
    /// Series whose stored occurrences are reconciled with what `/instances` listed.
    pub reconcile: Vec<SeriesInstances>,
}

impl PageChanges {
    /// Nothing to write but the link.
    pub fn is_empty(&self) -> bool {
        self.full.is_empty()
            && self.partial.is_empty()
            && self.removed.is_empty()
            && self.series.is_empty()
            && self.reconcile.is_empty()
    }
}

impl EventRow {
    /// Lays `newer` (partial) over `self`: fields it has win, fields it lacks are kept.
    fn merge(mut self, newer: EventRow) -> EventRow {
        macro_rules! keep {
            ($($f:ident),*) => { $( if newer.$f.is_some() { self.$f = newer.$f; } )* };
        }
        keep!(
            start_at,
            end_at,
            start_date,
            end_date,
            event_type,
            series_master_id
        );
        if newer.start_at.is_some() || newer.time_error.is_some() {
            self.time_error = newer.time_error;
        }
        self.details.merge(newer.details);
        self.payload.extend(newer.payload);
        self
    }
}

/// Applies the page's items in order, last write wins per id, so the same id twice in a page
/// (which Graph allows) becomes one write. A partial item after a full one merges into it.
pub fn reduce(ops: Vec<PageOp>) -> PageChanges {
    let mut order: Vec<String> = Vec::new();
    let mut last: HashMap<String, PageOp> = HashMap::new();
    for mut op in ops {
        if let PageOp::Upsert(r) = &mut op {
            r.repair();
        }
        let id = match &op {
            PageOp::Upsert(r) => r.event_id.clone(),
            PageOp::Remove(id) => id.clone(),
        };
        let merged = match (last.remove(&id), op) {
            (Some(PageOp::Upsert(prev)), PageOp::Upsert(next)) if next.partial => {
                let partial = prev.partial;
                let mut m = prev.merge(next);
                m.partial = partial;
                PageOp::Upsert(m)
            }
            (prev, op) => {
                if prev.is_none() {
                    order.push(id.clone());
                }
                op
            }
        };
        last.insert(id, merged);
    }
    let mut out = PageChanges::default();
    for id in order {
        match last.remove(&id) {
            Some(PageOp::Upsert(r)) if r.partial => out.partial.push(r),
            Some(PageOp::Upsert(r)) => out.full.push(r),
            Some(PageOp::Remove(id)) => out.removed.push(id),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(id: &str, subject: Option<&str>, partial: bool) -> EventRow {
        let mut payload = Map::new();
        payload.insert("id".into(), json!(id));
        if let Some(s) = subject {
            payload.insert("subject".into(), json!(s));
        }
        EventRow {
            event_id: id.into(),
            start_at: None,
            end_at: None,
            start_date: None,
            end_date: None,
            time_error: None,
            event_type: None,
            series_master_id: None,
            details: Details {
                subject: subject.map(str::to_owned),
                ..Details::default()
            },
            partial,
            payload,
        }
    }

    #[test]
    fn a_page_reduces_to_one_write_per_id_last_write_wins() {
        type Case = (
            Vec<PageOp>,
            Vec<&'static str>,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            // (ops, full ids, partial ids, removed ids)
            (
                vec![
                    PageOp::Upsert(row("a", Some("1"), false)),
                    PageOp::Upsert(row("a", Some("2"), false)),
                ],
                vec!["a"],
                vec![],
                vec![],
            ),
            (
                vec![
                    PageOp::Upsert(row("a", Some("1"), false)),
                    PageOp::Remove("a".into()),
                ],
                vec![],
                vec![],
                vec!["a"],
            ),
            (
                vec![
                    PageOp::Remove("a".into()),
                    PageOp::Upsert(row("a", Some("1"), false)),
                ],
                vec!["a"],
                vec![],
                vec![],
            ),
            (
                vec![PageOp::Upsert(row("a", None, true))],
                vec![],
                vec!["a"],
                vec![],
            ),
            (
                vec![
                    PageOp::Upsert(row("a", Some("1"), false)),
                    PageOp::Upsert(row("a", None, true)),
                ],
                vec!["a"],
                vec![],
                vec![],
            ),
            (
                vec![
                    PageOp::Upsert(row("a", None, true)),
                    PageOp::Upsert(row("a", Some("1"), false)),
                ],
                vec!["a"],
                vec![],
                vec![],
            ),
            (
                vec![
                    PageOp::Remove("x".into()),
                    PageOp::Upsert(row("b", Some("1"), false)),
                ],
                vec!["b"],
                vec![],
                vec!["x"],
            ),
        ];
        for (ops, full, partial, removed) in cases {
            let c = reduce(ops.clone());
            let ids = |v: &Vec<EventRow>| v.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>();
            assert_eq!(ids(&c.full), full, "{ops:?}");
            assert_eq!(ids(&c.partial), partial, "{ops:?}");
            assert_eq!(c.removed, removed, "{ops:?}");
        }
    }

    #[test]
    fn nul_characters_postgresql_refuses_are_removed_everywhere() {
        let mut r = row("a\0b", Some("Sub\0ject"), false);
        r.payload.insert(
            "body".into(),
            json!({"content": "<p>x\u{0}y</p>", "k\u{0}ey": ["\u{0}", 1]}),
        );
        let c = reduce(vec![PageOp::Upsert(r)]);
        let r = &c.full[0];
        assert_eq!(r.event_id, "ab");
        assert_eq!(r.details.subject.as_deref(), Some("Subject"));
        assert_eq!(
            r.payload["body"],
            json!({"content": "<p>xy</p>", "key": ["", 1]})
        );
        assert_eq!(r.payload["subject"], "Subject");
    }

    #[test]
    fn a_partial_after_a_full_keeps_the_full_fields() {
        let mut p = row("a", None, true);
        p.start_at = Some(chrono::Utc::now());
        let c = reduce(vec![
            PageOp::Upsert(row("a", Some("kept"), false)),
            PageOp::Upsert(p),
        ]);
        assert_eq!(c.full[0].details.subject.as_deref(), Some("kept"));
        assert!(c.full[0].start_at.is_some());
        assert_eq!(c.full[0].payload["subject"], "kept");
    }
}
