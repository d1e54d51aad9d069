//! End-to-end: calsync's engine against graph-sim and real PostgreSQL.

use crate::harness::*;
use calsync_engine::{Health, Outcome, SyncSettings};
use calsync_store::TupleStatus;
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrations = false)]
async fn full_sync_with_paging_matches_the_truth_at_page_sizes_1_7_and_500(pool: PgPool) {
    for page_size in [1u32, 7, 500] {
        let h = harness(pool.clone(), page_size).await;
        seed(&h, 30);
        let engine = h.engine(settings());
        let t = h
            .tuples(&engine, &[(&format!("p{page_size}"), USER, "default")])
            .await
            .remove(0);
        let r = report(sync(&engine, &t).await);
        let n = h.instances(&t).len() as u32;
        assert_eq!(n, 30 + 10);
        assert!(r.full);
        // Outlook lists the one series' master beside its instances (keeper.sh #409).
        assert_eq!(r.pages, (n + 1).div_ceil(page_size));
        h.assert_mirrors(std::slice::from_ref(&t)).await;
        // The next round is incremental and empty.
        let r = report(sync(&engine, &t).await);
        assert!(!r.full);
        assert_eq!((r.pages, r.upserted, r.removed), (1, 0, 0));
    }
}

#[sqlx::test(migrations = false)]
async fn incremental_create_update_and_delete_are_mirrored(pool: PgPool) {
    let h = harness(pool, 7).await;
    let ids = seed(&h, 12);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let created = h.create(single(
        "brand new",
        "2026-02-10T10:00:00",
        "2026-02-10T11:00:00",
    ));
    h.update(
        &ids[0],
        json!({"subject": "renamed ✎", "body": {"contentType": "text", "content": "new body"}}),
    );
    h.delete(&ids[1]);
    let r = report(sync(&engine, &t).await);
    assert!(!r.full);
    assert_eq!((r.upserted, r.removed), (2, 1));
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let rows = h.store.event_summaries(&t.key).await.unwrap();
    assert!(rows.iter().any(|r| r.event_id == created));
    assert!(
        rows.iter()
            .any(|r| r.event_id == ids[0] && r.subject.as_deref() == Some("renamed ✎"))
    );
    assert!(!rows.iter().any(|r| r.event_id == ids[1]));
}

#[sqlx::test(migrations = false)]
async fn an_event_moved_out_of_the_window_leaves_and_one_moved_in_appears(pool: PgPool) {
    let h = harness(pool, 7).await;
    let ids = seed(&h, 5);
    let outside = h.create(single(
        "later",
        "2026-06-01T10:00:00",
        "2026-06-01T11:00:00",
    ));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    h.update(
        &ids[0],
        json!({"start": at("2026-05-01T10:00:00"), "end": at("2026-05-01T11:00:00")}),
    );
    h.update(
        &outside,
        json!({"start": at("2026-03-31T23:30:00"), "end": at("2026-04-01T00:30:00")}),
    );
    let r = report(sync(&engine, &t).await);
    assert_eq!((r.upserted, r.removed), (1, 1));
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let rows = h.store.event_ids(&t.key).await.unwrap();
    assert!(!rows.contains(&ids[0]) && rows.contains(&outside));
}

#[sqlx::test(migrations = false)]
async fn recurring_series_edits_are_mirrored(pool: PgPool) {
    let h = harness(pool, 3).await;
    let master = h.create(weekly(
        "standup",
        "2026-01-05T09:00:00",
        "2026-01-05T09:15:00",
        8,
    ));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let occ: Vec<String> = h.instances(&t).into_iter().map(|i| i.id).collect();
    assert_eq!(occ.len(), 8);
    // One occurrence edited (becomes an exception), one cancelled.
    h.update(&occ[2], json!({"subject": "standup (moved)", "start": at("2026-01-19T11:00:00"), "end": at("2026-01-19T11:15:00")}));
    h.delete(&occ[4]);
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let rows = h.store.event_summaries(&t.key).await.unwrap();
    assert_eq!(rows.len(), 7);
    assert!(
        rows.iter()
            .any(|r| r.event_id == occ[2] && r.event_type.as_deref() == Some("exception"))
    );
    // The whole series changes: every instance follows, the exception keeps its own subject.
    h.update(&master, json!({"subject": "daily standup"}));
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    // Retiming the series drops its exceptions and cancellations, as Outlook does.
    h.update(
        &master,
        json!({"start": at("2026-01-05T10:00:00"), "end": at("2026-01-05T10:15:00")}),
    );
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_eq!(h.store.event_ids(&t.key).await.unwrap().len(), 8);
    // Deleting the series removes every instance.
    h.delete(&master);
    let r = report(sync(&engine, &t).await);
    assert_eq!(r.removed, 8);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

#[sqlx::test(migrations = false)]
async fn a_lost_delta_state_brings_a_full_resync_that_sweeps_what_vanished(pool: PgPool) {
    let h = harness(pool, 7).await;
    let ids = seed(&h, 20);
    let engine = h.engine(SyncSettings {
        max_attempts: 1,
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let before = h.store.event_ids(&t.key).await.unwrap();
    // While the token is dead, events are deleted; Graph will never report them as @removed.
    h.sim.lock().cache.evict(None);
    h.delete(&ids[3]);
    h.delete(&ids[4]);
    // The resync is cut off after its first page: the old rows must still be readable.
    h.sim.lock().faults.push(rule(
        json!({"nth": 3, "path_contains": "calendarView", "action": {"kind": "reset"}}),
    ));
    let o = sync(&engine, &t).await;
    assert!(
        matches!(o, Outcome::Failed(ref f) if f.health == Health::Retrying),
        "{o:?}"
    );
    let mid = h.store.event_ids(&t.key).await.unwrap();
    assert_eq!(
        mid, before,
        "nothing is deleted before the new round reaches its deltaLink"
    );
    h.sim.lock().faults.clear();
    let r = report(sync(&engine, &t).await);
    assert!(r.full);
    assert_eq!(r.swept, 2);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let status = h.store.status().await.unwrap();
    assert_eq!(status[0].phase, "incremental");
    assert_eq!(status[0].state, TupleStatus::Ok);
}

#[sqlx::test(migrations = false)]
async fn status_codes_in_any_letter_case_mean_resync(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 5);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    for code in ["resyncRequired", "SYNCSTATEINVALID", "syncStateNotFound"] {
        h.sim.lock().faults = vec![rule(
            json!({"nth": 1, "action": {"kind": "status", "status": 400, "code": code, "message": "m"}}),
        )];
        let r = report(sync(&engine, &t).await);
        assert_eq!(r.resyncs, 1, "{code}");
        assert!(r.full);
    }
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

#[sqlx::test(migrations = false)]
async fn a_crash_at_every_page_boundary_resumes_without_loss_or_duplicates(pool: PgPool) {
    let h = harness(pool, 7).await;
    let ids = seed(&h, 30);
    // 40 instances and the one series' master (Outlook lists it).
    let total_pages = 41u32.div_ceil(7);
    for k in 1..total_pages {
        let key = format!("crash-after-page-{k}");
        let first = h.engine(SyncSettings {
            max_attempts: 1,
            ..settings()
        });
        let t = h.tuples(&first, &[(&key, USER, "default")]).await.remove(0);
        // The request for page k+1 dies: pages 1..=k are committed, then the process "crashes".
        h.sim.lock().faults = vec![rule(
            json!({"nth": k + 1, "path_contains": "calendarView", "action": {"kind": "reset"}}),
        )];
        assert!(matches!(sync(&first, &t).await, Outcome::Failed(_)));
        drop(first);
        h.sim.lock().faults.clear();
        let stored = h.store.event_ids(&t.key).await.unwrap().len()
            + h.store.series_ids(&t.key).await.unwrap().len();
        assert_eq!(
            stored as u32,
            7 * k,
            "exactly the committed pages are stored"
        );
        // Changes while the daemon was down.
        h.update(
            &ids[k as usize],
            json!({"subject": format!("changed while down {k}")}),
        );
        // Restart: a new engine resumes from the saved nextLink, not from the start.
        let restarted = h.engine(settings());
        let r = report(sync(&restarted, &t).await);
        assert_eq!(r.pages, total_pages - k, "resumed at page {}", k + 1);
        assert!(r.full);
        report(sync(&restarted, &t).await);
        h.assert_mirrors(std::slice::from_ref(&t)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_crash_inside_the_page_transaction_rolls_back_and_resumes(pool: PgPool) {
    let h = harness(pool, 7).await;
    let ids = seed(&h, 20);
    let engine = h.engine(SyncSettings {
        max_attempts: 1,
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    // Statement points: claim the tuple, delete removals, upsert, and (full round) sweep.
    for n in 1..=3 {
        h.update(&ids[n], json!({"subject": format!("edit {n}")}));
        h.delete(&ids[10 + n]);
        let before = h.store.load(t.id).await.unwrap();
        let rows_before = h.store.event_summaries(&t.key).await.unwrap();
        h.store.inject_fault_after_statements(n as u32);
        assert!(matches!(sync(&engine, &t).await, Outcome::Failed(_)));
        let after = h.store.load(t.id).await.unwrap();
        assert_eq!(
            after.link_version, before.link_version,
            "the link did not advance"
        );
        assert_eq!(after.link, before.link);
        assert_eq!(
            h.store.event_summaries(&t.key).await.unwrap(),
            rows_before,
            "nothing of the page was applied"
        );
        report(sync(&engine, &t).await);
        h.assert_mirrors(std::slice::from_ref(&t)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_round_killed_at_random_instants_converges_to_the_truth(pool: PgPool) {
    let h = harness(pool, 3).await;
    let ids = seed(&h, 25);
    h.sim
        .lock()
        .faults
        .push(rule(json!({"action": {"kind": "delay", "ms": 3}})));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    for (i, after_ms) in [2u64, 9, 17, 26, 41, 55, 70, 90].into_iter().enumerate() {
        if i % 2 == 1 {
            h.update(&ids[i], json!({"subject": format!("kill {i}")}));
            h.delete(&ids[12 + i]);
        }
        let e = h.engine(settings());
        let t2 = t.clone();
        let task = tokio::spawn(async move {
            e.run_round(&t2, &tokio_util::sync::CancellationToken::new(), None)
                .await
        });
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        task.abort();
        let _ = task.await;
    }
    h.sim.lock().faults.clear();
    report(sync(&engine, &t).await);
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

#[sqlx::test(migrations = false)]
async fn a_next_link_to_a_foreign_host_is_refused_and_never_gets_the_token(pool: PgPool) {
    let h = harness(pool, 5).await;
    seed(&h, 12);
    // A listener on another port that records whatever reaches it.
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let foreign_addr = foreign.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorder = {
        let hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = foreign.accept().await {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                hits.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        })
    };
    h.sim.lock().cache.quirks.link_origin = Some(format!("http://{foreign_addr}"));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    let o = sync(&engine, &t).await;
    let Outcome::Failed(f) = o else {
        panic!("expected a failure, got {o:?}")
    };
    assert_eq!(f.health, Health::Degraded);
    assert_eq!(f.code, "ForeignLink");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        hits.lock().unwrap().is_empty(),
        "nothing, least of all the bearer token, was sent to the foreign host"
    );
    let state = h.store.load(t.id).await.unwrap();
    assert!(
        state
            .link
            .as_deref()
            .is_none_or(|l| !l.contains(&foreign_addr.to_string())),
        "the foreign link was not saved"
    );
    let status = h.store.status().await.unwrap();
    assert_eq!(status[0].state, TupleStatus::Degraded);
    assert_eq!(status[0].last_error_code.as_deref(), Some("ForeignLink"));
    recorder.abort();
}

#[sqlx::test(migrations = false)]
async fn a_mailbox_graph_rejects_is_marked_failed_and_the_others_carry_on(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 5);
    let engine = h.engine(settings());
    let tuples = h
        .tuples(
            &engine,
            &[
                ("good", USER, "default"),
                ("ghost", "nobody@contoso.onmicrosoft.com", "default"),
            ],
        )
        .await;
    let outcomes = engine
        .sync_all_once(&tuples, &tokio_util::sync::CancellationToken::new())
        .await;
    assert!(
        matches!(outcomes[0].1, Outcome::Failed(ref f) if f.health == Health::Failed && f.code == "ErrorInvalidUser"),
        "{:?}",
        outcomes[0]
    );
    assert!(matches!(outcomes[1].1, Outcome::Synced(_)));
    let status = h.store.status().await.unwrap();
    let ghost = status.iter().find(|s| s.tuple_key == "ghost").unwrap();
    assert_eq!(
        (ghost.state.as_str(), ghost.consecutive_failures),
        ("failed", 1)
    );
    assert!(
        ghost
            .last_error
            .as_deref()
            .unwrap()
            .contains("nobody@contoso.onmicrosoft.com")
    );
    h.assert_mirrors(&tuples[..1]).await;
}

#[sqlx::test(migrations = false)]
async fn a_changed_window_starts_a_full_round_and_keeps_old_rows_until_its_sweep(pool: PgPool) {
    let h = harness(pool, 7).await;
    seed(&h, 20);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let mut moved = t.clone();
    moved.window.end = "2026-02-01T00:00:00Z".parse().unwrap();
    let cfg = calsync_engine::TupleConfig {
        key: moved.key.clone(),
        user: moved.user.clone(),
        account: None,
        calendar: moved.calendar.clone(),
        window: moved.window,
        rolling: None,
        schedule: None,
        interval: None,
    };
    let moved = engine.register(&[cfg]).await.unwrap().remove(0);
    let r = report(sync(&engine, &moved).await);
    assert!(r.full, "a link made for the old window is not replayed");
    assert!(r.swept > 0);
    h.assert_mirrors(std::slice::from_ref(&moved)).await;
}

#[sqlx::test(migrations = false)]
async fn quirky_pages_are_survived_and_endless_loops_are_cut_off(pool: PgPool) {
    let h = harness(pool, 4).await;
    seed(&h, 15);
    h.sim.lock().cache.quirks = graph_sim::Quirks {
        empty_pages: 3,
        duplicate_across_pages: true,
        oversize_series_pages: true,
        ..Default::default()
    };
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    // The endless-nextLink bug: the round is abandoned as degraded instead of looping.
    h.sim.lock().cache.quirks = graph_sim::Quirks {
        oversize_series_pages: true,
        endless_next_link: true,
        ..Default::default()
    };
    h.sim.lock().cache.evict(None);
    let engine = h.engine(SyncSettings {
        max_stale_pages: 5,
        ..settings()
    });
    let o = sync(&engine, &t).await;
    assert!(
        matches!(o, Outcome::Failed(ref f) if f.health == Health::Degraded && f.code == "RepeatedPages"),
        "{o:?}"
    );
    let requests = h.sim.lock().requests().len();
    assert!(
        requests < 100,
        "stopped after a bounded number of requests ({requests})"
    );
}

#[sqlx::test(migrations = false)]
async fn the_scheduler_syncs_every_tuple_within_twice_its_interval(pool: PgPool) {
    let h = harness_with(pool, 50, crate::harness::sim_config()).await;
    seed(&h, 3);
    let engine = h.engine(SyncSettings {
        startup_spread: Duration::from_millis(500),
        // 60 tuples on one mailbox every second is 60 requests/s, 3.6× what Graph allows a
        // mailbox (10,000 per 10 min); the budget would rightly slow them. This test is about
        // the scheduler; the budget has its own (faults.rs).
        mailbox_budget: None,
        ..settings()
    });
    let specs: Vec<(String, &str, &str)> = (0..60)
        .map(|i| (format!("t{i:02}"), USER, "default"))
        .collect();
    let specs: Vec<(&str, &str, &str)> =
        specs.iter().map(|(k, u, c)| (k.as_str(), *u, *c)).collect();
    let tuples = h.tuples(&engine, &specs).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (engine, cancel, tuples) = (engine.clone(), cancel.clone(), tuples.clone());
        async move { engine.run(tuples, cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let status = h.store.status().await.unwrap();
    let now = chrono::Utc::now();
    for s in &status {
        let age = now - s.last_success_at.unwrap_or_default();
        assert!(
            age <= chrono::Duration::seconds(2),
            "{} last synced {age} ago",
            s.tuple_key
        );
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    // 60 tuples × ~4 rounds each, and no mailbox ever saw more than 4 requests at once.
    let v = h.sim.lock().violations();
    assert_eq!(v.concurrency, 0);
    assert!(v.max_in_flight <= 4);
}

#[sqlx::test(migrations = false)]
async fn an_expired_token_is_renewed_once_not_once_per_request(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 5);
    let engine = h.engine(settings());
    let specs: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    let specs: Vec<(&str, &str, &str)> = specs
        .iter()
        .map(|k| (k.as_str(), USER, "default"))
        .collect();
    let tuples = h.tuples(&engine, &specs).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    engine.sync_all_once(&tuples, &cancel).await;
    assert_eq!(h.sim.lock().stats().tokens_issued, 1);
    // Graph starts refusing the cached token (expired early, keys rolled over, ...).
    {
        let mut st = h.sim.lock();
        let now = st.tenant.now();
        st.auth.expire_all(now);
    }
    let outcomes = engine.sync_all_once(&tuples, &cancel).await;
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Synced(_))),
        "{outcomes:?}"
    );
    assert_eq!(
        h.sim.lock().stats().tokens_issued,
        2,
        "one renewal for twelve tuples that all saw the 401"
    );
    assert_eq!(engine.graph().tokens().renewals(), 2);
}

#[sqlx::test(migrations = false)]
async fn the_periodic_full_resync_runs_a_full_round_with_sweep(pool: PgPool) {
    let h = harness(pool, 7).await;
    seed(&h, 10);
    let engine = h.engine(SyncSettings {
        full_resync_every: Some(Duration::from_millis(1)),
        ..settings()
    });
    let t = h.default_tuple(&engine).await;
    assert!(report(sync(&engine, &t).await).full);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = report(sync(&engine, &t).await);
    assert!(
        r.full,
        "the backstop round is a full one even though the deltaLink works"
    );
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let engine = h.engine(SyncSettings {
        full_resync_every: None,
        ..settings()
    });
    assert!(!report(sync(&engine, &t).await).full);
}

/// A bug that panics inside a round must not vanish: `sync_all_once` reports the tuple as
/// failed with the panic's message, `sync-once`'s report names it and exits non-zero, the
/// failure is recorded, and the tuple's next round runs normally.
#[sqlx::test(migrations = false)]
async fn a_panicking_round_fails_sync_once_and_names_its_tuple(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 3);
    let engine = h.engine(settings());
    let tuples = h
        .tuples(
            &engine,
            &[
                ("adele", USER, "default"),
                ("alex", "alex@contoso.onmicrosoft.com", "default"),
            ],
        )
        .await;
    h.store.inject_panic_on_apply(tuples[0].id);
    let outcomes = engine
        .sync_all_once(&tuples, &CancellationToken::new())
        .await;
    assert_eq!(outcomes.len(), 2, "no tuple may drop out of the outcome");
    let (text, ok) = calsync::commands::outcome_report(&outcomes);
    assert!(!ok, "sync-once must exit non-zero:\n{text}");
    let adele = text.lines().find(|l| l.contains(" adele ")).unwrap();
    assert!(
        adele.starts_with("failed") && adele.contains("Panic") && adele.contains("panicked"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains(" alex ")),
        "{text}"
    );
    let status = h.store.status().await.unwrap();
    let row = status.iter().find(|r| r.tuple_key == "adele").unwrap();
    assert_eq!(row.state, TupleStatus::Failed);
    assert_eq!(row.last_error_code.as_deref(), Some("Panic"));
    // The bug was a one-off: the next round of the same engine syncs the tuple.
    report(sync(&engine, &tuples[0]).await);
    h.assert_mirrors(&tuples).await;
}

/// Another writer keeps advancing the tuple (a second process): this round retries once from
/// the store, then stands down — it never forgets the other writer's link and never marks the
/// tuple degraded.
#[sqlx::test(migrations = false)]
async fn a_round_that_keeps_losing_the_race_stands_down_without_touching_the_winner(pool: PgPool) {
    let h = harness(pool.clone(), 5).await;
    seed(&h, 10);
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let before: (Option<String>, String) =
        sqlx::query_as("SELECT link, state FROM sync_tuples WHERE id = $1")
            .bind(t.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    // A change makes the next round fetch a page; each request is slow, and meanwhile the
    // "other writer" bumps the tuple's version.
    h.create(single("new", "2026-01-20T10:00:00", "2026-01-20T11:00:00"));
    h.sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "action": {"kind": "delay", "ms": 150}}),
    )];
    let other = tokio::spawn({
        let pool = pool.clone();
        let id = t.id;
        async move {
            loop {
                sqlx::query("UPDATE sync_tuples SET link_version = link_version + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(40)).await;
            }
        }
    });
    let o = sync(&engine, &t).await;
    other.abort();
    match o {
        Outcome::Failed(f) => {
            assert_eq!(f.code, "Conflict");
            assert_eq!(f.health, calsync_engine::Health::Retrying);
        }
        other => panic!("expected to stand down, got {other:?}"),
    }
    let after: (Option<String>, String) =
        sqlx::query_as("SELECT link, state FROM sync_tuples WHERE id = $1")
            .bind(t.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(after, before, "the winner's link and state are untouched");
    h.sim.lock().faults.clear();
    let r = report(sync(&engine, &t).await);
    assert!(!r.full, "no full resync was forced");
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

/// The scheduler's rounds start in the quick lane (calsync-engine/src/quick.rs): a replay that
/// finds nothing is one request and one link commit; one that finds a change goes on in the full
/// round from the page in hand. Graph is never asked for the same link twice: every round here
/// is one page, so the delta requests are the rounds (one more at most, cut by the stop).
#[sqlx::test(migrations = false)]
async fn a_replay_that_finds_a_change_goes_on_from_the_page_in_hand(pool: PgPool) {
    let h = harness(pool, 50).await;
    let ids = seed(&h, 3);
    let engine = h.engine(SyncSettings {
        startup_spread: Duration::from_millis(50),
        ..settings()
    });
    let tuples = vec![h.default_tuple(&engine).await];
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (engine, cancel, tuples) = (engine.clone(), cancel.clone(), tuples.clone());
        async move { engine.run(tuples, cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(2600)).await;
    h.update(
        &ids[0],
        json!({"subject": "moved to the quick lane's hand-over"}),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.delete(&ids[1]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    let tally = engine.take_tally();
    let delta_requests = h
        .sim
        .lock()
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("calendarView/delta"))
        .count() as u64;
    assert_eq!(tally.failed, 0);
    assert!(
        tally.changed >= 3,
        "the first round and the two edits changed something: {tally:?}"
    );
    assert!(
        tally.synced >= 5,
        "no-change rounds ran between the edits: {tally:?}"
    );
    assert!(
        (tally.synced..=tally.synced + 1).contains(&delta_requests),
        "{delta_requests} delta requests for {} rounds: a link was fetched twice",
        tally.synced
    );
    h.assert_mirrors(&tuples).await;
}

/// A quick round refused by the fence (another replica holds the mailbox now) forgets its
/// cursor: when the mailbox comes back after the other replica synced, the next round starts
/// from the database, not from the link and version this process held before (issue 23,
/// point 6). Before: the stale cursor cost a replay, a refused commit and a second replay.
#[sqlx::test(migrations = false)]
async fn a_fenced_quick_round_forgets_its_cursor(pool: PgPool) {
    let h = harness(pool.clone(), 10).await;
    seed(&h, 3);
    let id = calsync_engine::Identity::new(
        "a",
        calsync_store::ReplicaKind::Run,
        Duration::from_secs(30),
    );
    let engine = calsync_engine::Engine::new(
        h.graph(),
        h.store.clone().as_incarnation(&id.incarnation),
        settings(),
    );
    let keeper = engine.fence_with(id.clone()).unwrap();
    let t = h.default_tuple(&engine).await;
    keeper.cycle().await.unwrap();
    assert_eq!(engine.leases().map(|l| l.len()), Some(1));
    let cancel = CancellationToken::new();
    report(engine.run_round(&t, &cancel, None).await);
    report(engine.run_round(&t, &cancel, None).await);

    // Another replica takes the mailbox; this process does not know yet.
    let fence: i64 = sqlx::query_scalar("SELECT fence FROM mailbox_leases")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE mailbox_leases SET owner = 'thief#1', fence = nextval('lease_fence')")
        .execute(&pool)
        .await
        .unwrap();
    match engine.run_round(&t, &cancel, None).await {
        Outcome::Failed(f) => assert_eq!(f.code, "LeaseLost"),
        o => panic!("expected to stand down, got {o:?}"),
    }
    // The other replica syncs (its commit moves the version), then the mailbox comes back.
    sqlx::query("UPDATE sync_tuples SET link_version = link_version + 1 WHERE id = $1")
        .bind(t.id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE mailbox_leases SET owner = $1, fence = $2")
        .bind(&id.incarnation)
        .bind(fence)
        .execute(&pool)
        .await
        .unwrap();
    h.sim.lock().clear_log();
    report(engine.run_round(&t, &cancel, None).await);
    let replays = h
        .sim
        .lock()
        .requests()
        .iter()
        .filter(|r| r.path.contains("calendarView"))
        .count();
    assert_eq!(
        replays, 1,
        "one replay, from the database's link and version"
    );
}

/// What 100,000 calendars cost at rest is 100,000 idle tasks, each holding its future (the
/// round is boxed, allocated only while it runs). Issue 23's wake path once awaited its
/// database calls inline in the task, and every task grew by ~1 KiB: idle RSS at 100,000
/// tuples went from 185 to 281 MiB (BENCHMARKS.md).
#[sqlx::test(migrations = false)]
async fn an_idle_tuple_task_stays_small(pool: PgPool) {
    let h = harness(pool, 7).await;
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    let size = engine.idle_task_size(&t);
    eprintln!("an idle task's future: {size} bytes");
    // 552 bytes in a debug build (tests), less in release; the inline wake path made it 1,288.
    assert!(size <= 640, "an idle task's future is {size} bytes");
}
