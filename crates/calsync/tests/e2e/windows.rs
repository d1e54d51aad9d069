//! Moving windows: a window re-based (a rolling window) or changed by a reload is served whole
//! until the first round of the new one ends, then switched at once.

use crate::harness::*;
use calsync_engine::{Tuple, TupleConfig};
use calsync_graph::ViewWindow;
use serde_json::json;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::time::Duration;

fn ids_in(h: &Harness, t: &Tuple, w: ViewWindow) -> BTreeSet<String> {
    let moved = Tuple {
        window: w,
        ..t.clone()
    };
    h.instances(&moved).into_iter().map(|i| i.id).collect()
}

/// Events that only the old window holds, both hold, and only the new one holds; a weekly
/// series crosses both edges.
fn seed_three_parts(h: &Harness) -> Vec<String> {
    let mut overlap = Vec::new();
    for d in 0..6 {
        h.create(single(
            &format!("leaving {d}"),
            &format!("2026-01-0{}T09:00:00", d + 2),
            &format!("2026-01-0{}T10:00:00", d + 2),
        ));
        overlap.push(h.create(single(
            &format!("staying {d}"),
            &format!("2026-02-1{d}T09:00:00"),
            &format!("2026-02-1{d}T10:00:00"),
        )));
        h.create(single(
            &format!("arriving {d}"),
            &format!("2026-04-0{}T09:00:00", d + 2),
            &format!("2026-04-0{}T10:00:00", d + 2),
        ));
    }
    h.create(weekly(
        "weekly across both edges",
        "2025-12-29T08:00:00",
        "2025-12-29T08:30:00",
        20,
    ));
    overlap
}

#[sqlx::test(migrations = false)]
async fn a_moved_window_is_served_whole_until_its_round_ends_then_switched_at_once(pool: PgPool) {
    let h = harness(pool.clone(), 2).await;
    let overlap = seed_three_parts(&h);
    let engine = h.engine(settings());
    let old = h.default_tuple(&engine).await;
    report(sync(&engine, &old).await);
    let new_window = ViewWindow {
        start: "2026-01-15T00:00:00Z".parse().unwrap(),
        end: "2026-04-15T00:00:00Z".parse().unwrap(),
    };
    let (old_ids, new_ids) = (ids_in(&h, &old, old.window), ids_in(&h, &old, new_window));
    assert!(old_ids.difference(&new_ids).count() >= 6 && new_ids.difference(&old_ids).count() >= 6);
    // The re-base: the tuple's window moves (what a rolling window does each day).
    let moved = engine
        .register(&[TupleConfig {
            key: old.key.clone(),
            user: old.user.clone(),
            account: None,
            calendar: old.calendar.clone(),
            window: new_window,
            rolling: None,
            schedule: None,
            interval: None,
        }])
        .await
        .unwrap()
        .remove(0);
    // Slow pages, so the round is seen half-way many times; edits go on meanwhile.
    h.sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "action": {"kind": "delay", "ms": 40}}),
    )];
    let round = tokio::spawn({
        let engine = engine.clone();
        let moved = moved.clone();
        async move { sync(&engine, &moved).await }
    });
    let (mut as_old, mut as_new, mut hidden_seen, mut edits) = (0, 0, 0, 0);
    let mut switched = false;
    while !round.is_finished() {
        h.update(
            &overlap[edits % overlap.len()],
            json!({"subject": format!("edited {edits}")}),
        );
        edits += 1;
        // One statement: one snapshot of the view and of the hidden rows.
        let (shown, window_start, pending): (Vec<String>, Option<chrono::DateTime<chrono::Utc>>, i64) =
            sqlx::query_as(
                "SELECT COALESCE((SELECT array_agg(event_id) FROM calendar_events WHERE tuple_key = $1), '{}'), \
                        (SELECT min(window_start) FROM calendar_events WHERE tuple_key = $1), \
                        (SELECT count(*) FROM events WHERE pending)",
            )
            .bind(&old.key)
            .fetch_one(&pool)
            .await
            .unwrap();
        let shown: BTreeSet<String> = shown.into_iter().collect();
        if shown == old_ids {
            assert!(!switched, "the old window came back after the switch");
            assert_eq!(window_start, Some(old.window.start));
            as_old += 1;
            if pending > 0 {
                hidden_seen += 1;
            }
        } else {
            assert_eq!(
                shown, new_ids,
                "neither the old window nor the new one (a mix)"
            );
            assert_eq!(window_start, Some(new_window.start));
            assert_eq!(pending, 0, "the switch shows every row the round added");
            switched = true;
            as_new += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = report(round.await.unwrap());
    assert!(r.full && r.swept > 0, "{r:?}");
    assert!(
        as_old >= 5 && hidden_seen >= 3,
        "the round was seen half-way: {as_old} samples of the old window, {hidden_seen} with rows held back"
    );
    assert!(as_new <= 2, "the switch is the round's last page: {as_new}");
    // After the switch: exactly the new window, edits included.
    h.sim.lock().faults.clear();
    report(sync(&engine, &moved).await);
    h.assert_mirrors(std::slice::from_ref(&moved)).await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE pending")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_window_moves_with_the_clock_in_the_running_daemon() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_rolling")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let sim = graph_sim::Sim::new(&sim_config());
    let now =
        chrono::DateTime::<chrono::Utc>::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let local = |s: i64| {
        (now + chrono::TimeDelta::seconds(s))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string()
    };
    let mut id = std::collections::HashMap::new();
    {
        let mut st = sim.lock();
        let u = st.tenant.add_user(USER, None, "Adele Vance");
        // The window is [anchor - 20 s, anchor + 20 s), re-based every 3 s: "leaving" ends
        // 14 s ago and leaves within seconds, "arriving" starts in 27 s and enters, "staying"
        // spans the whole test.
        for (name, from, to) in [
            ("leaving", -15, -14),
            ("arriving", 27, 28),
            ("staying", -3600, 3600),
        ] {
            let p =
                graph_sim::writes::EventPatch::from_json(&single(name, &local(from), &local(to)))
                    .unwrap();
            let created = st.tenant.create_event(u, 0, &p).unwrap();
            id.insert(name, created["id"].as_str().unwrap().to_owned());
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &url,
        &server,
        &format!(
            "[sync]\ninterval = \"1s\"\nstartup_spread = \"100ms\"\nwindow_rebase = \"3s\"\n\
             [[calendars]]\nname = \"adele\"\nuser = \"{USER}\"\ncalendar = \"default\"\nstart = \"-20s\"\nend = \"+20s\"\n"
        ),
    );
    let log = dir.path().join("calsync.log");
    let _daemon = run_daemon(&config, &log);
    // Reading the views while the daemon replaces them in its migrations can deadlock them:
    // wait until it runs.
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("calsync running")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One statement: the rows shown and the window they are said to be, in one snapshot.
    let shown = async || -> (BTreeSet<String>, Option<chrono::DateTime<chrono::Utc>>, String) {
        let (ids, served, state): (Vec<String>, Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
            sqlx::query_as(
                "SELECT COALESCE((SELECT array_agg(event_id) FROM calendar_events WHERE tuple_key = 'adele'), '{}'), \
                        (SELECT served_window_start FROM calendar_sync_status WHERE tuple_key = 'adele'), \
                        (SELECT state FROM calendar_sync_status WHERE tuple_key = 'adele')",
            )
            .fetch_one(&db)
            .await
            .unwrap();
        (ids.into_iter().collect(), served, state.unwrap_or_default())
    };
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| id[n].clone()).collect() };
    let started = std::time::Instant::now();
    let mut served_starts = BTreeSet::new();
    let mut seen_first = false;
    loop {
        let (ids, served, state) = shown().await;
        assert!(
            !matches!(state.as_str(), "degraded" | "failed"),
            "the tuple went {state}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if let Some(s) = served {
            served_starts.insert(s);
            // At every instant exactly the served window's events: never a mix, never empty.
            let mut expected = vec!["staying"];
            if s < now + chrono::TimeDelta::seconds(-14) {
                expected.push("leaving");
            }
            if s + chrono::TimeDelta::seconds(40) > now + chrono::TimeDelta::seconds(27) {
                expected.push("arriving");
            }
            assert_eq!(ids, set(&expected), "served from {s}");
        }
        if ids == set(&["leaving", "staying"]) {
            seen_first = true;
        }
        if ids == set(&["staying", "arriving"]) && served_starts.len() >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "the window did not move: {ids:?}, served {served_starts:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_first, "the first window held 'leaving' and 'staying'");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("rolling windows re-based"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_calendar_on_a_cron_schedule_syncs_at_its_fire_times_not_its_interval() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_cron")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let sim = graph_sim::Sim::new(&sim_config());
    sim.lock().tenant.add_user(USER, None, "Adele Vance");
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // An hour's interval, but a schedule that fires every 2 s (a seconds field, croner's).
    let config = write_config(
        dir.path(),
        &url,
        &server,
        &format!(
            "[sync]\nstartup_spread = \"100ms\"\n\
             [[calendars]]\nname = \"adele\"\nuser = \"{USER}\"\ncalendar = \"default\"\nstart = \"-1d\"\nend = \"+1d\"\n\
             interval = \"1h\"\nschedule = \"*/2 * * * * *\"\nschedule_zone = \"Europe/Berlin\"\n"
        ),
    );
    let log = dir.path().join("calsync.log");
    let _daemon = run_daemon(&config, &log);
    let mut successes = BTreeSet::new();
    let started = std::time::Instant::now();
    while successes.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rounds at {successes:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at: Option<chrono::DateTime<chrono::Utc>> = match sqlx::query_scalar(
            "SELECT last_success_at FROM sync_tuples WHERE tuple_key = 'adele'",
        )
        .fetch_optional(&db)
        .await
        {
            Ok(at) => at.flatten(),
            Err(_) => None, // before the daemon's migrations
        };
        successes.extend(at);
    }
    // After the first round (at start), each round began at an even second (plus a tenth of
    // the 2 s period at most) and two rounds were never closer than the schedule allows.
    let times: Vec<_> = successes.into_iter().collect();
    for pair in times.windows(2).skip(1) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!((1_500..=2_600).contains(&gap), "{times:?}");
    }
}
