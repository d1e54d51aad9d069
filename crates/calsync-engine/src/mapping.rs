//! What a Graph delta page means for the store: plain functions, no I/O.

use calsync_graph::{DeltaItem, EventItem};
use calsync_store::{EventRow, PageChanges, PageOp, SeriesRow, reduce};
use std::collections::HashMap;

/// Maps a page's items to store writes. A series master is series data, never an instance:
/// it becomes a [`SeriesRow`] (the last one wins when a page lists a master twice).
pub fn page_changes(items: Vec<DeltaItem>) -> PageChanges {
    let mut masters: Vec<SeriesRow> = Vec::new();
    let mut ops = Vec::with_capacity(items.len());
    for item in items {
        match item {
            DeltaItem::Removed { id } => ops.push(PageOp::Remove(id)),
            DeltaItem::Event(e) if is_master(&e) => masters.push(series_row(*e)),
            DeltaItem::Event(e) => ops.push(PageOp::Upsert(row(*e))),
        }
    }
    let mut changes = reduce(ops);
    let mut last: HashMap<String, SeriesRow> = HashMap::new();
    let mut order = Vec::new();
    for m in masters {
        if !last.contains_key(&m.master_id) {
            order.push(m.master_id.clone());
        }
        last.insert(m.master_id.clone(), m);
    }
    changes.series = order
        .into_iter()
        .filter_map(|id| last.remove(&id))
        .collect();
    changes
}

/// Whether an item is a series master.
pub fn is_master(e: &EventItem) -> bool {
    e.event_type.as_deref() == Some("seriesMaster")
}

/// A series master as the store keeps it.
pub fn series_row(e: EventItem) -> SeriesRow {
    let mut row = SeriesRow {
        master_id: e.id,
        details: e.details,
        payload: e.payload,
    };
    row.repair();
    row
}

fn row(e: EventItem) -> EventRow {
    EventRow {
        details: e.details,
        event_id: e.id,
        start_at: e.start,
        end_at: e.end,
        start_date: e.start_date,
        end_date: e.end_date,
        time_error: e.time_error,
        event_type: e.event_type,
        series_master_id: e.series_master_id,
        partial: e.partial,
        payload: e.payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calsync_graph::parse_page;

    #[test]
    fn removed_items_and_series_masters_map_as_intended() {
        let page = parse_page(br#"{"@odata.deltaLink":"d","value":[
            {"id":"gone","@removed":{"reason":"deleted"}},
            {"id":"m","type":"seriesMaster","subject":"s"},
            {"id":"o","type":"occurrence","seriesMasterId":"m","start":{"dateTime":"2024-01-01T10:00:00.0000000","timeZone":"UTC"}},
            {"id":"s","type":"singleInstance","subject":"hello"}
        ]}"#).unwrap();
        let c = page_changes(page.items);
        assert_eq!(c.removed, vec!["gone"]);
        assert_eq!(c.series.len(), 1, "the master is series data");
        assert_eq!(c.series[0].master_id, "m");
        assert_eq!(c.series[0].details.subject.as_deref(), Some("s"));
        assert_eq!(c.partial.len(), 1);
        assert_eq!(c.partial[0].event_id, "o");
        assert!(c.partial[0].start_at.is_some());
        assert_eq!(c.full.len(), 1);
        assert_eq!(c.full[0].details.subject.as_deref(), Some("hello"));
    }
}
