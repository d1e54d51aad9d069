//! Every cause of a change, through the page transaction and registration: each test follows
//! the feed from a snapshot and checks the changes it read and that replaying them gives the
//! view (issue 25).

use crate::page::{Details, EventRow, PageOp, SeriesInstances, SeriesRow, reduce};
use crate::testing::FeedReplica;
use crate::{
    LinkKind, LinkStamp, PageApplied, PageChanges, PageWrite, RoundStart, Store, StoreError,
    TupleSpec,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn spec(calendar: &str, window_start: &str) -> TupleSpec {
    TupleSpec {
        key: "t".into(),
        user_id: "u".into(),
        mailbox: "u".into(),
        calendar_id: calendar.into(),
        window_start: at(window_start),
        window_end: at(window_start) + chrono::Duration::days(90),
        settings: None,
    }
}

/// A single event; `version` is its changeKey and is in its subject.
pub(super) fn event(id: &str, version: u32) -> EventRow {
    EventRow {
        event_id: id.into(),
        start_at: Some(at("2026-01-10T09:00:00Z")),
        end_at: Some(at("2026-01-10T10:00:00Z")),
        start_date: None,
        end_date: None,
        time_error: None,
        event_type: Some("singleInstance".into()),
        series_master_id: None,
        details: Details {
            subject: Some(format!("{id} v{version}")),
            change_key: Some(format!("{id}-{version}")),
            ..Details::default()
        },
        partial: false,
        payload: serde_json::Map::from_iter([
            ("id".to_owned(), serde_json::json!(id)),
            (
                "changeKey".to_owned(),
                serde_json::json!(format!("{id}-{version}")),
            ),
        ]),
    }
}

/// An occurrence stub of `master`: times and ids only, as Outlook sends them.
pub(super) fn stub(id: &str, master: &str) -> EventRow {
    EventRow {
        event_type: Some("occurrence".into()),
        series_master_id: Some(master.into()),
        details: Details::default(),
        partial: true,
        payload: serde_json::Map::from_iter([("id".to_owned(), serde_json::json!(id))]),
        ..event(id, 0)
    }
}

pub(super) fn master(id: &str, subject: &str) -> SeriesRow {
    SeriesRow {
        master_id: id.into(),
        details: Details {
            subject: Some(subject.into()),
            change_key: Some(subject.into()),
            ..Details::default()
        },
        payload: serde_json::Map::from_iter([
            ("id".to_owned(), serde_json::json!(id)),
            ("subject".to_owned(), serde_json::json!(subject)),
        ]),
    }
}

/// One calendar, written page by page as a round would, with a follower of the feed.
pub(super) struct Cal {
    pub(super) store: Store,
    id: i64,
    version: i64,
    stamp: LinkStamp,
    pub(super) follower: FeedReplica,
}

impl Cal {
    pub(super) async fn new(pool: &PgPool) -> Cal {
        Cal::with_store(Store::from_pool(pool.clone())).await
    }

    async fn with_store(store: Store) -> Cal {
        store.migrate().await.unwrap();
        let follower = FeedReplica::from_snapshot(&store).await.unwrap();
        let s = spec("default", "2026-01-01T00:00:00Z");
        let state = store
            .register_tuples(std::slice::from_ref(&s))
            .await
            .unwrap()
            .remove(0);
        Cal {
            store,
            id: state.id,
            version: state.link_version,
            stamp: LinkStamp {
                user_id: s.user_id,
                calendar_id: s.calendar_id,
                window_start: s.window_start,
                window_end: s.window_end,
            },
            follower,
        }
    }

    pub(super) async fn page(
        &mut self,
        start: Option<RoundStart>,
        kind: LinkKind,
        changes: PageChanges,
    ) -> PageApplied {
        let applied = self
            .store
            .apply_page(&PageWrite {
                tuple_id: self.id,
                expected_version: self.version,
                round_start: start,
                changes: &changes,
                link: "https://graph.example/v1.0/users/u/calendarView/delta?$deltatoken=x",
                link_kind: kind,
                stamp: &self.stamp,
                fence: None,
            })
            .await
            .unwrap();
        self.version = applied.version;
        applied
    }

    /// A whole round in one page that ends in a deltaLink.
    async fn round(&mut self, start: RoundStart, ops: Vec<PageOp>) -> PageApplied {
        self.page(Some(start), LinkKind::Delta, reduce(ops)).await
    }

    /// Follows the feed to now; returns the changes read as `op cause tuple/event` lines, and
    /// checks that the follower's copy is the view.
    pub(super) async fn read(&mut self) -> Vec<String> {
        let before = self.follower.applied.len();
        self.follower.catch_up(&self.store).await.unwrap();
        let view = self.store.view_as_feed_rows().await.unwrap();
        let differences = self.follower.differences(&view);
        assert!(
            differences.is_empty(),
            "the feed replayed is the view: {differences:?}"
        );
        self.follower.applied_lines()[before..].to_vec()
    }
}

#[sqlx::test(migrations = false)]
async fn items_of_a_page_are_upserts_and_removals_and_a_resent_item_changes_nothing(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    cal.round(
        RoundStart::Full,
        vec![PageOp::Upsert(event("a", 1)), PageOp::Upsert(event("b", 1))],
    )
    .await;
    assert_eq!(cal.read().await, ["upsert delta t/a", "upsert delta t/b"]);

    cal.round(
        RoundStart::Delta,
        vec![PageOp::Upsert(event("a", 2)), PageOp::Remove("b".into())],
    )
    .await;
    assert_eq!(cal.read().await, ["upsert delta t/a", "delete delta t/b"]);
    let upsert = &cal.follower.applied[cal.follower.applied.len() - 2];
    assert_eq!(upsert.data.as_ref().unwrap()["subject"], "a v2");

    // Graph sends an item again unchanged (it does, after a throttled page is retried), and
    // a round with no change moves only the link: neither writes a change.
    cal.round(RoundStart::Delta, vec![PageOp::Upsert(event("a", 2))])
        .await;
    cal.round(RoundStart::Delta, vec![]).await;
    cal.round(
        RoundStart::Delta,
        vec![PageOp::Remove("gone-long-ago".into())],
    )
    .await;
    assert_eq!(cal.read().await, Vec::<String>::new());
}

/// Issue 25 (sweep after 410): a full resync lists what exists; what it did not list is swept,
/// what it lists unchanged is rewritten in the table (its round number) but is no change.
#[sqlx::test(migrations = false)]
async fn a_resync_after_410_sweeps_what_vanished_and_reports_only_real_changes(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    let items = |v_b| {
        vec![
            PageOp::Upsert(event("a", 1)),
            PageOp::Upsert(event("b", v_b)),
        ]
    };
    let mut first = items(1);
    first.push(PageOp::Upsert(event("c", 1)));
    cal.round(RoundStart::Full, first).await;
    cal.read().await;
    let applied = cal.round(RoundStart::Full, items(2)).await;
    assert_eq!((applied.upserted, applied.swept), (2, 1));
    assert_eq!(cal.read().await, ["upsert delta t/b", "delete sweep t/c"]);
}

/// Issue 25 (a series rename reaches every occurrence): the view lays the master's subject
/// under each occurrence stub, so a master that changes changes every occurrence's row.
#[sqlx::test(migrations = false)]
async fn a_series_renamed_changes_every_occurrence_and_a_dropped_one_is_a_cancelled_delete(
    pool: PgPool,
) {
    let mut cal = Cal::new(&pool).await;
    let mut page = reduce(vec![
        PageOp::Upsert(stub("o1", "m")),
        PageOp::Upsert(stub("o2", "m")),
        PageOp::Upsert(stub("o3", "m")),
    ]);
    page.series = vec![master("m", "Standup")];
    cal.page(Some(RoundStart::Full), LinkKind::Delta, page)
        .await;
    assert_eq!(
        cal.read().await,
        [
            "upsert delta t/o1",
            "upsert delta t/o2",
            "upsert delta t/o3"
        ]
    );
    assert_eq!(
        cal.follower.applied[0].data.as_ref().unwrap()["subject"],
        "Standup"
    );

    let renamed = PageChanges {
        series: vec![master("m", "Daily sync")],
        ..PageChanges::default()
    };
    cal.page(Some(RoundStart::Delta), LinkKind::Delta, renamed)
        .await;
    assert_eq!(
        cal.read().await,
        [
            "upsert series t/o1",
            "upsert series t/o2",
            "upsert series t/o3"
        ]
    );
    assert!(
        cal.follower
            .rows
            .values()
            .all(|r| r["subject"] == "Daily sync"),
        "{:?}",
        cal.follower.rows
    );

    // Outlook drops an occurrence without an @removed (a cancelled meeting): the series'
    // /instances no longer lists it (issue 12's silent cancellation).
    let dropped = PageChanges {
        series: vec![master("m", "Daily sync")],
        reconcile: vec![SeriesInstances {
            master_id: "m".into(),
            live: vec!["o1".into(), "o3".into()],
        }],
        ..PageChanges::default()
    };
    cal.page(Some(RoundStart::Delta), LinkKind::Delta, dropped)
        .await;
    assert_eq!(cal.read().await, ["delete cancelled t/o2"]);

    // The master removed: its occurrences go with it.
    cal.round(RoundStart::Delta, vec![PageOp::Remove("m".into())])
        .await;
    assert_eq!(cal.read().await, ["delete delta t/o1", "delete delta t/o3"]);
}

/// Issue 25 (window switch): while a moved window's full round runs, the rows it adds are
/// hidden and write nothing; its last page sweeps what the new window lacks and shows them.
#[sqlx::test(migrations = false)]
async fn a_window_switch_shows_the_new_windows_rows_and_sweeps_the_old_ones(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    cal.round(
        RoundStart::Full,
        vec![PageOp::Upsert(event("a", 1)), PageOp::Upsert(event("b", 1))],
    )
    .await;
    cal.read().await;

    cal.stamp.window_start = at("2026-02-01T00:00:00Z");
    cal.stamp.window_end = at("2026-05-01T00:00:00Z");
    let first = reduce(vec![
        PageOp::Upsert(event("b", 1)),
        PageOp::Upsert(event("c", 1)),
    ]);
    cal.page(Some(RoundStart::Full), LinkKind::Next, first)
        .await;
    assert_eq!(
        cal.read().await,
        Vec::<String>::new(),
        "c waits hidden, b is unchanged"
    );
    // The last page's own items are written shown: it commits the switch.
    let last = reduce(vec![PageOp::Upsert(event("d", 1))]);
    cal.page(None, LinkKind::Delta, last).await;
    assert_eq!(
        cal.read().await,
        ["upsert delta t/d", "delete sweep t/a", "upsert window t/c"]
    );
}

/// Issue 25 (quarantine): an item PostgreSQL refuses is kept as a quarantined row, shown as
/// such; the feed carries it as the view shows it.
#[sqlx::test(migrations = false)]
async fn a_quarantined_item_is_an_upsert_of_its_quarantined_row(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    let mut bad = event("bad", 1);
    bad.start_date = Some(chrono::NaiveDate::MIN);
    cal.round(
        RoundStart::Full,
        vec![PageOp::Upsert(event("a", 1)), PageOp::Upsert(bad)],
    )
    .await;
    assert_eq!(
        cal.read().await,
        ["upsert delta t/a", "upsert quarantine t/bad"]
    );
    let row = cal.follower.applied[1].data.as_ref().unwrap();
    assert!(
        row["quarantined"]
            .as_str()
            .is_some_and(|q| q.contains("22008")),
        "{row}"
    );
}

/// Issue 25 (untrack, purge, tracking again, re-pointing): registration writes the rows that
/// leave or come back to the view with them; a purge of untracked rows changes nothing shown.
#[sqlx::test(migrations = false)]
async fn untracking_tracking_again_purging_and_repointing_are_changes_of_the_whole_calendar(
    pool: PgPool,
) {
    let mut cal = Cal::new(&pool).await;
    cal.round(
        RoundStart::Full,
        vec![PageOp::Upsert(event("a", 1)), PageOp::Upsert(event("b", 1))],
    )
    .await;
    cal.read().await;
    let store = cal.store.clone();
    let t = spec("default", "2026-01-01T00:00:00Z");

    store.register_tuples(&[]).await.unwrap();
    assert_eq!(
        cal.read().await,
        ["delete untrack t/a", "delete untrack t/b"]
    );
    // A page of a round still in flight commits into the untracked calendar: not shown, no
    // change.
    cal.round(RoundStart::Delta, vec![PageOp::Upsert(event("a", 2))])
        .await;
    assert_eq!(cal.read().await, Vec::<String>::new());

    store
        .register_tuples(std::slice::from_ref(&t))
        .await
        .unwrap();
    assert_eq!(cal.read().await, ["upsert track t/a", "upsert track t/b"]);
    assert_eq!(
        cal.follower.applied.last().unwrap().data.as_ref().unwrap()["subject"],
        "b v1"
    );

    store.register_tuples(&[]).await.unwrap();
    cal.read().await;
    assert_eq!(store.purge_untracked().await.unwrap(), (1, 2));
    assert_eq!(
        cal.read().await,
        Vec::<String>::new(),
        "a purge hides nothing shown"
    );

    // Re-pointed at another calendar: the old calendar's rows leave, under its name.
    let mut cal = Cal::with_store(store.clone()).await;
    cal.round(RoundStart::Full, vec![PageOp::Upsert(event("x", 1))])
        .await;
    cal.read().await;
    store
        .register_tuples(&[spec("other", "2026-01-01T00:00:00Z")])
        .await
        .unwrap();
    assert_eq!(cal.read().await, ["delete moved t/x"]);
    assert_eq!(cal.follower.applied.last().unwrap().calendar_id, "default");
}

/// Issue 25 (expired cursor): retention deletes old changes and marks where it stopped; a
/// cursor before the mark is refused as expired, never answered with a gap; a snapshot gives
/// a cursor to follow again.
#[sqlx::test(migrations = false)]
async fn a_cursor_older_than_retention_is_expired_and_a_snapshot_resumes(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    let start = cal.follower.cursor.clone();
    cal.round(
        RoundStart::Full,
        vec![PageOp::Upsert(event("a", 1)), PageOp::Upsert(event("b", 1))],
    )
    .await;
    cal.read().await;
    let after_first = cal.follower.applied[0].cursor.clone();
    cal.store.feed_settled().await.unwrap();
    let trimmed = cal
        .store
        .trim_changes(Utc::now() + chrono::Duration::seconds(1), 1)
        .await
        .unwrap();
    assert_eq!(trimmed.deleted, 2, "in batches of one");
    for old in [&start, &after_first] {
        match cal.store.changes_after(Some(old), 10).await {
            Err(StoreError::Expired { cursor }) => assert_eq!(&cursor, old),
            other => panic!("{old}: {other:?}"),
        }
    }
    // The last cursor read is the mark itself: following from it loses nothing.
    cal.round(RoundStart::Delta, vec![PageOp::Upsert(event("a", 2))])
        .await;
    assert_eq!(cal.read().await, ["upsert delta t/a"]);

    let mut again = FeedReplica::from_snapshot(&cal.store).await.unwrap();
    assert_eq!(again.rows, cal.follower.rows);
    cal.round(RoundStart::Delta, vec![PageOp::Remove("a".into())])
        .await;
    again.catch_up(&cal.store).await.unwrap();
    assert_eq!(again.rows, cal.store.view_as_feed_rows().await.unwrap());
    assert!(
        matches!(
            cal.store.changes_after(Some("12x"), 1).await,
            Err(StoreError::Refused { .. })
        ),
        "not a cursor"
    );
}

/// With the feed off (`changes.enabled = false`) pages and registrations write no change.
#[sqlx::test(migrations = false)]
async fn with_the_feed_off_nothing_is_written(pool: PgPool) {
    let mut cal = Cal::with_store(Store::from_pool(pool.clone()).with_feed(false)).await;
    cal.round(RoundStart::Full, vec![PageOp::Upsert(event("a", 1))])
        .await;
    cal.store.register_tuples(&[]).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM calendar_changes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// With `changes.payload`, a change carries the row's payload as the view shows it: for an
/// occurrence, the series master's laid under the stub's, so a rename reaches it there too.
#[sqlx::test(migrations = false)]
async fn with_the_payload_a_change_carries_the_views_payload(pool: PgPool) {
    let mut cal = Cal::with_store(Store::from_pool(pool.clone()).with_feed_payload(true)).await;
    let mut page = reduce(vec![PageOp::Upsert(stub("o1", "m"))]);
    page.series = vec![master("m", "Standup")];
    cal.page(Some(RoundStart::Full), LinkKind::Delta, page)
        .await;
    assert_eq!(cal.read().await, ["upsert delta t/o1"]);
    let renamed = PageChanges {
        series: vec![master("m", "Daily sync")],
        ..PageChanges::default()
    };
    cal.page(Some(RoundStart::Delta), LinkKind::Delta, renamed)
        .await;
    assert_eq!(cal.read().await, ["upsert series t/o1"]);
    let data = cal.follower.applied[1].data.as_ref().unwrap();
    assert_eq!(data["payload"]["subject"], "Daily sync");
    assert_eq!(
        data["payload"]["id"], "o1",
        "the stub's own fields over the master's"
    );
    // Without it (the default), no payload and every other column.
    let plain = Store::from_pool(pool.clone());
    let rows = plain.view_as_feed_rows().await.unwrap();
    let row = rows.values().next().unwrap();
    assert!(
        row.get("payload").is_none() && row["subject"] == "Daily sync",
        "{row}"
    );
}

/// Issue 25: a page that removes a series and writes one of its occurrences again (in one
/// page: its upsert comes after the removal) reports the occurrence as an upsert only; the
/// other occurrences as deletes.
#[sqlx::test(migrations = false)]
async fn an_id_removed_and_written_again_in_one_page_is_one_upsert(pool: PgPool) {
    let mut cal = Cal::new(&pool).await;
    let mut page = reduce(vec![
        PageOp::Upsert(stub("o1", "m")),
        PageOp::Upsert(stub("o2", "m")),
    ]);
    page.series = vec![master("m", "Standup")];
    cal.page(Some(RoundStart::Full), LinkKind::Delta, page)
        .await;
    cal.read().await;
    let mut again = event("o1", 2);
    again.series_master_id = Some("m".into());
    let page = PageChanges {
        removed: vec!["m".into()],
        full: vec![again],
        ..PageChanges::default()
    };
    cal.page(Some(RoundStart::Delta), LinkKind::Delta, page)
        .await;
    assert_eq!(cal.read().await, ["upsert delta t/o1", "delete delta t/o2"]);
}
