//! The rows the change feed writes, against the view they mirror (issue 25).

use super::causes::{Cal, event, master, stub};
use crate::page::{PageOp, reduce};
use crate::{LinkKind, RoundStart, Store};
use sqlx::PgPool;

/// The columns of `calendar_events` a change does not carry in `data`: its calendar's (beside
/// it in the change) and the window, which is the calendar's (`calendar_sync_status`) and
/// changes for every row at once when the window moves.
const CALENDAR_COLUMNS: &[&str] = &[
    "deployment",
    "tuple_key",
    "user_id",
    "calendar_id",
    "window_start",
    "window_end",
];

/// Issue 25: the upsert writes its rows' changes itself, built as the view builds a row
/// (`changes::VIEW_COLUMNS`), not read back from it: for every kind of row (an occurrence stub
/// under its master, a full occurrence, a cancelled master's, an all-day event, a plain one),
/// with the payload (jsonb) and without (a `calendar_change_row`, read as jsonb), the two agree
/// with the snapshot column for column, and neither the view nor the row type has a column
/// the expressions miss.
#[sqlx::test(migrations = false)]
async fn the_view_and_the_upserts_rows_agree(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    let mut full = event("o2", 1);
    full.event_type = Some("occurrence".into());
    full.series_master_id = Some("m".into());
    let mut all_day = event("day", 1);
    all_day.details.is_all_day = Some(true);
    all_day.start_date = chrono::NaiveDate::from_ymd_opt(2026, 1, 10);
    all_day.end_date = chrono::NaiveDate::from_ymd_opt(2026, 1, 11);
    let mut cancelled = master("m", "Standup");
    cancelled.details.is_cancelled = Some(true);
    cancelled.details.is_all_day = Some(false);
    cancelled.details.location = Some("Room 1".into());
    let mut page = reduce(vec![
        PageOp::Upsert(stub("o1", "m")),
        PageOp::Upsert(full),
        PageOp::Upsert(all_day),
        PageOp::Upsert(event("plain", 1)),
    ]);
    page.series = vec![cancelled];
    cal.page(Some(RoundStart::Full), LinkKind::Delta, page)
        .await;
    assert_eq!(cal.read().await.len(), 4);
    for payload in [false, true] {
        let store = Store::from_pool(pool.clone()).with_feed_payload(payload);
        let view = store.view_as_feed_rows().await.unwrap();
        let stored = super::stored(payload, super::Source::Event);
        let built: Vec<(String, serde_json::Value)> = sqlx::query_as(&format!(
            "SELECT e.event_id, calsync_change_data({}, {}, e.event_id) FROM events e \
             LEFT JOIN series s ON s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id",
            if payload { &stored.expr } else { "NULL" },
            if payload { "NULL" } else { &stored.expr },
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(built.len(), view.len());
        for (id, row) in built {
            let shown = view.iter().find(|(k, _)| k.2 == id).unwrap().1;
            assert_eq!(&row, shown, "{id}, payload {payload}");
        }
    }
    let mut columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'calendar_events'::regclass \
         AND attnum > 0 AND NOT attisdropped",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    columns.retain(|c| !CALENDAR_COLUMNS.contains(&c.as_str()));
    columns.sort();
    let mut expressions: Vec<&str> = super::VIEW_COLUMNS.iter().map(|(c, _)| *c).collect();
    expressions.sort();
    assert_eq!(columns, expressions);
    let attributes: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = \
           (SELECT typrelid FROM pg_type WHERE typname = 'calendar_change_row') \
         AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let in_order: Vec<&str> = super::VIEW_COLUMNS
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| !["event_id", "payload"].contains(c))
        .collect();
    assert_eq!(
        attributes, in_order,
        "calendar_change_row, attribute by attribute"
    );
}

/// Issue 25: a page whose only changes are its items (written by the upsert itself) wakes a
/// follower with `NOTIFY calsync_changes` as any other page that wrote changes does.
#[sqlx::test(migrations = false)]
async fn a_page_of_items_alone_wakes_followers(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    let mut listener = cal.store.listen_changes().await.unwrap();
    cal.page(
        Some(RoundStart::Full),
        LinkKind::Delta,
        reduce(vec![PageOp::Upsert(event("a", 1))]),
    )
    .await;
    tokio::time::timeout(std::time::Duration::from_secs(5), listener.next())
        .await
        .expect("woken within 5 s")
        .unwrap();
    assert_eq!(cal.read().await, ["upsert delta t/a"]);
}
