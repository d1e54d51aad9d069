//! What a Graph delta page means for the store: a plain function, no I/O.

use calsync_graph::{DeltaItem, EventItem};
use calsync_store::{EventRow, PageChanges, PageOp, reduce};

/// Maps a page's items to store writes. Series masters are not instances and never enter the
/// read model (calendarView delta should not send them; if it does, they are skipped).
pub fn page_changes(items: Vec<DeltaItem>) -> PageChanges {
    let ops = items
        .into_iter()
        .filter_map(|item| match item {
            DeltaItem::Removed { id } => Some(PageOp::Remove(id)),
            DeltaItem::Event(e) if e.event_type.as_deref() == Some("seriesMaster") => None,
            DeltaItem::Event(e) => Some(PageOp::Upsert(row(*e))),
        })
        .collect();
    reduce(ops)
}

fn row(e: EventItem) -> EventRow {
    EventRow {
        event_id: e.id,
        ical_uid: e.ical_uid,
        subject: e.subject,
        start_at: e.start,
        end_at: e.end,
        is_all_day: e.is_all_day,
        event_type: e.event_type,
        series_master_id: e.series_master_id,
        last_modified_at: e.last_modified,
        change_key: e.change_key,
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
        assert_eq!(c.partial.len(), 1);
        assert_eq!(c.partial[0].event_id, "o");
        assert!(c.partial[0].start_at.is_some());
        assert_eq!(c.full.len(), 1);
        assert_eq!(c.full[0].subject.as_deref(), Some("hello"));
    }
}
