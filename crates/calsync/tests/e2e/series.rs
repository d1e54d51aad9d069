//! Recurring series as production Outlook serves them (graph-sim's default `outlook` profile):
//! occurrence stubs, listed masters, silent cancellations. Every change converges in one
//! incremental round, never by waiting for a full resync.

use crate::harness::*;
use calsync_engine::{RoundReport, Tuple};
use graph_sim::{Behaviour, SimConfig};
use serde_json::{Value, json};
use sqlx::PgPool;

/// A series of any pattern, in UTC.
fn series(subject: &str, start: &str, end: &str, pattern: Value, range: Value) -> Value {
    json!({"subject": subject, "start": at(start), "end": at(end),
           "location": {"displayName": format!("{subject} room")},
           "recurrence": {"pattern": pattern, "range": range}})
}

/// A tenant with daily, weekly and monthly series (two started years before the window), an
/// all-day series, an exception and a cancelled occurrence, plus singles.
fn business_calendar(h: &Harness) -> Vec<String> {
    let mut masters = vec![
        h.create(series(
            "Daily standup",
            "2026-01-05T09:00:00",
            "2026-01-05T09:15:00",
            json!({"type": "daily", "interval": 1}),
            json!({"type": "endDate", "startDate": "2026-01-05", "endDate": "2026-02-27"}),
        )),
        h.create(series(
            "Weekly 1:1 since 2019",
            "2019-03-04T14:00:00",
            "2019-03-04T14:30:00",
            json!({"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]}),
            json!({"type": "noEnd", "startDate": "2019-03-04"}),
        )),
        h.create(series(
            "Monthly review since 2016",
            "2016-06-15T16:00:00",
            "2016-06-15T17:00:00",
            json!({"type": "absoluteMonthly", "interval": 1, "dayOfMonth": 15}),
            json!({"type": "noEnd", "startDate": "2016-06-15"}),
        )),
    ];
    let mut allday = series(
        "Sprint day",
        "2026-01-07T00:00:00",
        "2026-01-08T00:00:00",
        json!({"type": "weekly", "interval": 2, "daysOfWeek": ["wednesday"], "firstDayOfWeek": "sunday"}),
        json!({"type": "numbered", "startDate": "2026-01-07", "numberOfOccurrences": 6}),
    );
    allday["isAllDay"] = json!(true);
    masters.push(h.create(allday));
    for d in 1..=6 {
        h.create(single(
            &format!("customer call {d}"),
            &format!("2026-02-{:02}T11:00:00", d + 1),
            &format!("2026-02-{:02}T11:45:00", d + 1),
        ));
    }
    masters
}

fn occurrence_ids(h: &Harness, t: &Tuple, master: &str) -> Vec<String> {
    h.instances(t)
        .into_iter()
        .filter(|i| i.series_master_id.as_deref() == Some(master))
        .map(|i| i.id)
        .collect()
}

/// The harshest reading of the reports: occurrence stubs, and masters never listed.
async fn harness_without_listed_masters(pool: PgPool) -> Harness {
    harness_with(
        pool,
        10,
        SimConfig {
            behaviour: Behaviour {
                list_series_masters: false,
                ..Behaviour::outlook()
            },
            ..sim_config()
        },
    )
    .await
}

/// One incremental round, which must not be (or fall back to) a full one.
async fn one_incremental_round(engine: &calsync_engine::Engine, t: &Tuple) -> RoundReport {
    let r = report(sync(engine, t).await);
    assert!(!r.full, "converged without a full round: {r:?}");
    assert_eq!(r.resyncs, 0, "{r:?}");
    r
}

#[sqlx::test(migrations = false)]
async fn a_fresh_sync_gives_every_occurrence_its_series_fields_and_never_stores_a_master(
    pool: PgPool,
) {
    let h = harness(pool, 25).await;
    let masters = business_calendar(&h);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;

    let rows = h.store.event_summaries(&t.key).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.event_type.as_deref() != Some("seriesMaster"))
    );
    assert!(
        rows.iter().all(|r| !masters.contains(&r.event_id)),
        "no master is an instance"
    );
    let occurrences: Vec<_> = rows
        .iter()
        .filter(|r| r.event_type.as_deref() == Some("occurrence"))
        .collect();
    assert!(occurrences.len() > 50, "{}", occurrences.len());
    for o in &occurrences {
        assert!(o.subject.is_some(), "{o:?}");
        assert_eq!(
            o.organizer_email.as_deref(),
            Some(USER),
            "the series' organizer: {o:?}"
        );
        assert!(
            o.location.as_deref().is_some_and(|l| l.ends_with(" room")),
            "{o:?}"
        );
        assert!(o.is_all_day.is_some(), "{o:?}");
    }
    let since_2016: Vec<_> = occurrences
        .iter()
        .filter(|o| o.subject.as_deref() == Some("Monthly review since 2016"))
        .collect();
    assert_eq!(since_2016.len(), 3, "Jan, Feb and Mar 15th: {since_2016:?}");
    let sprint: Vec<_> = occurrences
        .iter()
        .filter(|o| o.subject.as_deref() == Some("Sprint day"))
        .collect();
    assert_eq!(sprint.len(), 6);
    for s in sprint {
        assert_eq!(s.is_all_day, Some(true));
        let day = s.start_date.unwrap();
        assert_eq!(s.end_date, Some(day + chrono::Duration::days(1)));
    }
    // Every series is kept once, as series data.
    let kept = h.store.series_ids(&t.key).await.unwrap();
    let mut want = masters.clone();
    want.sort();
    assert_eq!(kept, want);
    let status = h.store.status().await.unwrap();
    assert_eq!(status[0].incomplete_count, 0);
}

#[sqlx::test(migrations = false)]
async fn every_series_change_converges_in_one_incremental_round(pool: PgPool) {
    let h = harness(pool, 25).await;
    let masters = business_calendar(&h);
    let (daily, weekly, monthly) = (&masters[0], &masters[1], &masters[2]);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    one_incremental_round(&engine, &t).await;

    // A rename reaches every occurrence.
    h.update(weekly, json!({"subject": "Weekly 1:1 (renamed)"}));
    one_incremental_round(&engine, &t).await;
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let renamed = h
        .store
        .event_summaries(&t.key)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.subject.as_deref() == Some("Weekly 1:1 (renamed)"))
        .count();
    assert_eq!(renamed, occurrence_ids(&h, &t, weekly).len());

    // An edited occurrence becomes an exception with its own fields.
    let occ = occurrence_ids(&h, &t, daily);
    h.update(
        &occ[3],
        json!({"subject": "Standup moved", "location": {"displayName": "Roof"}}),
    );
    one_incremental_round(&engine, &t).await;
    h.assert_mirrors(std::slice::from_ref(&t)).await;

    // A cancelled occurrence: Outlook says nothing about it; the master shows up changed.
    let gone = occ[5].clone();
    h.delete(&gone);
    one_incremental_round(&engine, &t).await;
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert!(!h.store.event_ids(&t.key).await.unwrap().contains(&gone));

    // A retimed series: new occurrence ids, the old ones vanish silently.
    let before = occurrence_ids(&h, &t, monthly);
    h.update(
        monthly,
        json!({"start": at("2016-06-15T10:00:00"), "end": at("2016-06-15T11:00:00")}),
    );
    one_incremental_round(&engine, &t).await;
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let stored = h.store.event_ids(&t.key).await.unwrap();
    assert!(before.iter().all(|id| !stored.contains(id)));

    // A deleted series: only its master is reported; every occurrence leaves with it.
    h.delete(daily);
    one_incremental_round(&engine, &t).await;
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert!(!h.store.series_ids(&t.key).await.unwrap().contains(daily));

    // The organizer cancelled the weekly meeting: this (attendee's) copy stays, cancelled.
    {
        let mut st = h.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        st.tenant.cancel_by_organizer(u, None, weekly).unwrap();
    }
    one_incremental_round(&engine, &t).await;
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let cancelled: Vec<_> = h
        .store
        .event_summaries(&t.key)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.series_master_id.as_deref() == Some(weekly.as_str()))
        .collect();
    assert!(!cancelled.is_empty());
    assert!(
        cancelled
            .iter()
            .all(|r| r.is_cancelled
                && r.subject.as_deref() == Some("Canceled: Weekly 1:1 (renamed)"))
    );
}

#[sqlx::test(migrations = false)]
async fn stubs_without_a_listed_master_are_hydrated_through_the_gate_under_a_429_storm(
    pool: PgPool,
) {
    // The harshest reading of the reports: stubs, and masters never listed, so every series is
    // fetched (calendar-scoped) before its page commits; and the fetches meet a 429 storm.
    let h = harness_without_listed_masters(pool).await;
    let masters = business_calendar(&h);
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "/calendar/events/", "times": 6,
        "action": {"kind": "status", "status": 429, "code": "ApplicationThrottled",
                   "message": "Application is over its MailboxConcurrency limit.", "retry_after": 0.2}
    }))];
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_good_manners(&h);
    let log = h.sim.lock().requests();
    let fetches: Vec<_> = log
        .iter()
        .filter(|r| r.path.contains("/calendar/events/") && r.status == 200)
        .collect();
    assert_eq!(fetches.len(), masters.len(), "one fetch per series");
    assert_eq!(
        log.iter().filter(|r| r.status == 429).count(),
        6,
        "the storm happened"
    );
    let mut kept = h.store.series_ids(&t.key).await.unwrap();
    kept.sort();
    let mut want = masters;
    want.sort();
    assert_eq!(kept, want);
}

#[sqlx::test(migrations = false)]
async fn a_slow_throttled_sibling_fetch_is_read_before_the_page_is_retried(pool: PgPool) {
    // Two masters fetched at once: one answers 429 (Retry-After 0.1 s) at once, the other
    // 429 (Retry-After 1 s) 100 ms later. Dropping the slow one on the first failure would
    // retry the page inside its Retry-After, an answer calsync never read; graph-sim caught
    // exactly this under load (a page retry 1 ms inside a dropped sibling's Retry-After).
    let h = harness_without_listed_masters(pool).await;
    assert!(
        business_calendar(&h).len() >= 2,
        "two series to fetch at once"
    );
    let fetch = "/calendar/events/";
    h.sim.lock().faults = vec![
        rule(json!({"path_contains": fetch, "nth": 1, "action": {"kind": "delay", "ms": 100}})),
        rule(json!({"path_contains": fetch, "nth": 1,
            "action": {"kind": "status", "status": 429, "code": "ApplicationThrottled",
                       "message": "Application is over its MailboxConcurrency limit.", "retry_after": 1.0}})),
        rule(json!({"path_contains": fetch, "nth": 1,
            "action": {"kind": "status", "status": 429, "code": "ApplicationThrottled",
                       "message": "Application is over its MailboxConcurrency limit.", "retry_after": 0.1}})),
    ];
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_good_manners(&h);
    let log = h.sim.lock().requests();
    let slow = log
        .iter()
        .find(|r| r.fault.as_deref() == Some("status:429") && r.in_flight > 0)
        .map(|r| r.at_secs);
    let throttled: Vec<_> = log.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        throttled.len(),
        2,
        "both fetches were throttled: {throttled:?}"
    );
    let answered_last = throttled.iter().map(|r| r.at_secs).fold(0.0, f64::max);
    let next = log
        .iter()
        .filter(|r| r.status != 429 && r.at_secs > throttled[0].at_secs.min(throttled[1].at_secs))
        .map(|r| r.at_secs)
        .fold(f64::INFINITY, f64::min);
    assert!(
        slow.is_some(),
        "the slow 429 was answered (after its delay)"
    );
    assert!(
        next >= answered_last + 1.0,
        "the next request came {:.3} s after the slow 429 (Retry-After 1 s)",
        next - answered_last
    );
}

#[sqlx::test(migrations = false)]
async fn a_400_invalid_delta_token_starts_a_full_round(pool: PgPool) {
    let h = harness(pool, 25).await;
    seed(&h, 5);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    // Graph stops accepting the saved deltaLink's token (a foreign or broken token).
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "calendarView", "times": 1,
        "action": {"kind": "status", "status": 400, "code": "InvalidDeltaToken",
                   "message": "The value 'x' of parameter '$deltaToken' is invalid."}
    }))];
    let r = report(sync(&engine, &t).await);
    assert_eq!(r.resyncs, 1);
    assert!(r.full);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

fn in_zone(dt: &str, zone: &str) -> Value {
    json!({"dateTime": dt, "timeZone": zone})
}

#[sqlx::test(migrations = false)]
async fn times_in_other_zones_are_stored_as_the_right_instants_and_all_day_dates_float(
    pool: PgPool,
) {
    let h = harness(pool, 25).await;
    // A weekly 09:00 Pacific meeting across the US change to daylight saving time (8 March).
    let pacific = h.create(json!({
        "subject": "West coast sync",
        "start": in_zone("2026-03-02T09:00:00", "Pacific Standard Time"),
        "end": in_zone("2026-03-02T09:30:00", "Pacific Standard Time"),
        "recurrence": {"pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]},
                       "range": {"type": "numbered", "startDate": "2026-03-02", "numberOfOccurrences": 2}}
    }));
    // Outlook sends this one back in its own Windows zone despite Prefer: UTC.
    let berlin = h.create(json!({"subject": "Berlin review",
        "start": in_zone("2026-01-20T10:00:00", "W. Europe Standard Time"),
        "end": in_zone("2026-01-20T11:00:00", "W. Europe Standard Time")}));
    // All-day in Tokyo on the window's last day: in the window by Tokyo's midnight.
    let tokyo = h.create(json!({"subject": "Fiscal year (Tokyo)", "isAllDay": true,
        "start": in_zone("2026-03-31T00:00:00", "Tokyo Standard Time"),
        "end": in_zone("2026-04-01T00:00:00", "Tokyo Standard Time")}));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;

    let rows = h.store.event_summaries(&t.key).await.unwrap();
    let at = |s: &str| Some(s.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    let mut west: Vec<_> = rows
        .iter()
        .filter(|r| r.series_master_id.as_deref() == Some(pacific.as_str()))
        .map(|r| r.start_at)
        .collect();
    west.sort();
    assert_eq!(
        west,
        [at("2026-03-02T17:00:00Z"), at("2026-03-09T16:00:00Z")]
    );
    let b = rows.iter().find(|r| r.event_id == berlin).unwrap();
    assert_eq!(b.start_at, at("2026-01-20T09:00:00Z"));
    let day = rows.iter().find(|r| r.event_id == tokyo).unwrap();
    assert_eq!(day.start_date, chrono::NaiveDate::from_ymd_opt(2026, 3, 31));
    assert_eq!(day.end_date, chrono::NaiveDate::from_ymd_opt(2026, 4, 1));
    assert_eq!(h.store.status().await.unwrap()[0].incomplete_count, 0);
}

#[sqlx::test(migrations = false)]
async fn a_link_graph_refused_for_good_is_dropped_and_the_next_try_is_a_full_round(pool: PgPool) {
    let h = harness(pool, 5).await;
    seed(&h, 20);
    let engine = h.engine(calsync_engine::SyncSettings {
        max_attempts: 1,
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    // Page 1 commits (its nextLink is saved), then Graph refuses the nextLink for good.
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "calendarView", "nth": 2,
        "action": {"kind": "status", "status": 400, "code": "ErrorInvalidParameter",
                   "message": "The value of parameter 'x' is invalid."}
    }))];
    match sync(&engine, &t).await {
        calsync_engine::Outcome::Failed(f) => assert_eq!(f.code, "ErrorInvalidParameter"),
        other => panic!("expected a failure, got {other:?}"),
    }
    h.sim.lock().faults.clear();
    let r = report(sync(&engine, &t).await);
    assert!(r.full);
    // Every page from the first (instances and the one series' master), not the rest of the
    // round after the refused link.
    let items = h.instances(&t).len() as u32 + 1;
    assert_eq!(
        r.pages,
        items.div_ceil(5),
        "a new round from its first page"
    );
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

#[sqlx::test(migrations = false)]
async fn while_a_series_cannot_be_fetched_none_of_its_stubs_is_stored(pool: PgPool) {
    // Stubs and no listed masters, and every master GET fails: the pages holding stubs are
    // never committed half-done (the tuple retries), and nothing incomplete reaches the view.
    let h = harness_without_listed_masters(pool).await;
    business_calendar(&h);
    h.sim.lock().faults = vec![rule(json!({
        "path_contains": "/calendar/events/",
        "action": {"kind": "status", "status": 500, "code": "InternalServerError"}
    }))];
    let engine = h.engine(calsync_engine::SyncSettings {
        max_attempts: 2,
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    assert!(matches!(
        sync(&engine, &t).await,
        calsync_engine::Outcome::Failed(_)
    ));
    let rows = h.store.event_summaries(&t.key).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.event_type.as_deref() != Some("occurrence")),
        "no stub without its series: {rows:?}"
    );
    assert_eq!(h.store.status().await.unwrap()[0].incomplete_count, 0);
    h.sim.lock().faults.clear();
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}
